"""The accuracy benchmark's own parts (bench/bench_accuracy.py): field cutting, κ, cell matching, a synthetic smoke
run. Self-contained: no real TMA data needed."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

from her2scope.config.scoring import ScoringParams


def _load_bench() -> ModuleType:
    """bench/ is no installed package: load the module from its file (as ``python -m bench...`` runs it)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

GLASS_RGB = (244, 235, 235)
TISSUE_RGB = (190, 160, 200)
CORE_SIZE = 5000
CORE_RADIUS = 2500


def disk_core(size: int = CORE_SIZE, radius: int = CORE_RADIUS, seed: int = 3) -> np.ndarray:
    """A synthetic TMA "core": a disk of purple tissue on glass, with camera noise."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = GLASS_RGB
    cv2.circle(image, (size // 2, size // 2), radius, TISSUE_RGB, thickness=-1)
    noise = np.empty_like(image)
    cv2.setRNGSeed(seed)
    # 0-6 grey levels darker, drawn per pixel and channel (OpenCV's stubs want arrays for the bounds; it takes numbers)
    cv2.randu(noise, 0, 7)  # type: ignore[call-overload]
    return cv2.subtract(image, noise)


@pytest.fixture(scope="module")
def core() -> np.ndarray:
    image = disk_core()
    image.flags.writeable = False  # field cutting must not modify the core
    return image


@pytest.mark.e2e
def test_tissue_mask_separates_the_disk_from_glass(core: np.ndarray) -> None:
    mask = bench.tissue_mask(core)
    d = bench.MASK_DOWNSCALE
    assert mask.shape == (CORE_SIZE // d, CORE_SIZE // d)
    rows, cols = np.indices(mask.shape)
    centre_distance = np.hypot((rows + 0.5) * d - CORE_SIZE / 2, (cols + 0.5) * d - CORE_SIZE / 2)
    assert mask[centre_distance < CORE_RADIUS - d].all()
    assert not mask[centre_distance > CORE_RADIUS + d].any()


@pytest.mark.e2e
def test_five_fields_inside_the_disk_without_overlap(core: np.ndarray) -> None:
    windows = bench.field_windows(core)
    assert len(windows) == 5
    height, width = bench.FIELD_SHAPE
    for window in windows:
        assert window.shape == bench.FIELD_SHAPE
        assert window.row % bench.WINDOW_STRIDE_PX == 0 and window.col % bench.WINDOW_STRIDE_PX == 0
        assert window.tissue_fraction == 1.0
        corners = [(window.row + r, window.col + c) for r in (0, height) for c in (0, width)]
        for r, c in corners:  # every corner inside the disk (one mask block of slack)
            assert math.hypot(r - CORE_SIZE / 2, c - CORE_SIZE / 2) <= CORE_RADIUS + bench.MASK_DOWNSCALE
        assert window.cut(core).shape == (height, width, 3)
    for a, b in itertools.combinations(windows, 2):
        assert not a.overlaps(b)
        assert not (
            a.row < b.row + height and b.row < a.row + height and a.col < b.col + width and b.col < a.col + width
        )
    assert bench.field_windows(core) == windows  # deterministic


def test_ties_are_broken_top_left_first() -> None:
    # Tissue in rows 0-2399, glass below: every window with its top row at most 1320 is all tissue (a tie).
    image = np.full((2800, 4096, 3), GLASS_RGB, dtype=np.uint8)
    image[:2400] = TISSUE_RGB
    windows = bench.field_windows(image, n_fields=3)
    assert [(w.row, w.col) for w in windows] == [(0, 0), (0, 1920), (1152, 0)]
    assert [w.tissue_fraction for w in windows] == [1.0, 1.0, 1.0]


def test_field_windows_overlap_rule() -> None:
    a = bench.FieldWindow(0, 0, 1.0)
    assert a.overlaps(bench.FieldWindow(1079, 1919, 1.0))
    assert not a.overlaps(bench.FieldWindow(1080, 0, 1.0))
    assert not a.overlaps(bench.FieldWindow(0, 1920, 1.0))


def test_field_windows_rejects_a_stride_off_the_mask_grid(core: np.ndarray) -> None:
    with pytest.raises(ValueError, match="multiples"):
        bench.field_windows(core, stride=100)


def test_kappa_perfect_agreement() -> None:
    assert bench.quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)


def test_kappa_worked_examples() -> None:
    # Four items, A = 0 1 2 3, B = 0 2 2 3; weights w_ij = (i - j)^2 / 9.
    # Observed weighted disagreement: one (1, 2) pair, 1/9.
    # Marginals A = (1, 1, 1, 1), B = (1, 0, 2, 1); expected E_ij = a_i b_j / 4, so
    # sum w E = (1 / 36) * sum_j b_j * sum_i (i - j)^2 = (1 / 36) * (1*14 + 2*6 + 1*14) = 40 / 36 = 10/9.
    # kappa = 1 - (1/9) / (10/9) = 0.9.
    assert bench.quadratic_weighted_kappa([0, 1, 2, 3], [0, 2, 2, 3]) == pytest.approx(0.9)
    # Eight items: A = 0 0 1 1 2 2 3 3, B = 0 1 1 2 2 2 3 1.
    # Observed: (0,1) 1/9, (1,2) 1/9, (3,1) 4/9: 6/9. Marginals A = (2, 2, 2, 2), B = (1, 3, 3, 1).
    # sum w E = (2 / 72) * (1*14 + 3*6 + 3*6 + 1*14) = 128 / 72 = 16/9; kappa = 1 - 6/16 = 0.625.
    a, b = [0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 1, 2, 2, 2, 3, 1]
    assert bench.quadratic_weighted_kappa(a, b) == pytest.approx(0.625)
    assert bench.quadratic_weighted_kappa(b, a) == pytest.approx(0.625)  # symmetric


def test_kappa_worst_and_undefined() -> None:
    assert bench.quadratic_weighted_kappa([0, 3], [3, 0]) == pytest.approx(-1.0)
    assert math.isnan(bench.quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))  # no expected disagreement
    assert math.isnan(bench.quadratic_weighted_kappa([], []))
    with pytest.raises(ValueError, match="range"):
        bench.quadratic_weighted_kappa([0, 4], [0, 1])


def test_match_cells_is_one_to_one_nearest_first() -> None:
    truth = np.array([[100.0, 100.0], [100.0, 140.0]])
    detected = np.array([[100.0, 103.0], [100.0, 101.0], [100.0, 130.0]])
    matches = bench.match_cells(detected, truth, truth, max_distance_px=12.0)
    # detected 1 is nearest to truth 0 and takes it; detected 0 finds no other truth cell in range
    assert matches == [(1, 0), (2, 1)]
    assert len({d for d, _ in matches}) == len({t for _, t in matches}) == len(matches)


def test_match_cells_distance_bound_and_nuclei() -> None:
    centres = np.array([[50.0, 50.0]])
    nuclei = np.array([[50.0, 60.0]])
    assert bench.match_cells(np.array([[50.0, 62.0]]), centres, centres, max_distance_px=10.0) == []
    # the nucleus is 2 px away although the centre is 12 px away
    assert bench.match_cells(np.array([[50.0, 62.0]]), centres, nuclei, max_distance_px=10.0) == [(0, 0)]
    assert bench.match_cells(np.array([[50.0, 60.0]]), centres, centres, max_distance_px=10.0) == [(0, 0)]
    assert bench.match_cells(np.empty((0, 2)), centres, nuclei, 10.0) == []


def test_class_share_error() -> None:
    assert bench.class_share_error({"0": 5, "1+": 5}, {"0": 1, "1+": 1}) == 0.0
    # detected (0.5, 0.5, 0, 0) against true (1, 0, 0, 0): (0.5 + 0.5) / 4
    assert bench.class_share_error({"0": 5, "1+": 5}, {"0": 3}) == pytest.approx(0.25)
    assert bench.class_share_error({}, {"3+": 7}) == pytest.approx(0.25)


def test_synthetic_smoke_run_on_one_small_field() -> None:
    # The figures' plumbing only: the scorer's accuracy is what the benchmark measures, not what this test asserts.
    figures, calls, notes = bench.run_synthetic(
        ["breast", "gastric"],
        ScoringParams(),
        strengths=(1.0,),
        mixes={"mixed": {"0": 0.5, "3+": 0.5}},
        non_tumour=("glass", "no such field"),
        shape=(540, 960),
    )
    assert [(f.guideline, f.control) for f in figures] == [
        ("breast", True),
        ("breast", False),
        ("gastric", True),
        ("gastric", False),
    ]
    for f in figures:
        assert f.mix == "mixed" and f.batch_strength == 1.0
        assert f.n_truth > 20 and f.n_detected >= 0
        assert 0.0 <= f.class_share_error <= 1.0
        assert f.count_ratio == pytest.approx(f.n_detected / f.n_truth)
        assert 0.0 <= f.found <= 1.0
        assert f.false_positives == f.n_detected - round(f.found * f.n_truth)
        assert f.ours in {"0", "1+", "2+", "3+", "n/a"} and f.truth_call in {"0", "1+", "2+", "3+", "n/a"}
    assert [(c.kind, c.guideline, c.control) for c in calls][:2] == [
        ("glass", "breast", True),
        ("glass", "breast", False),
    ]
    assert all(c.ours is not None for c in calls if c.kind == "glass")
    assert all(c.ours is None and not c.passed for c in calls if c.kind == "no such field")
    assert notes[0].startswith("generator: ")
    assert any("no such field" in note for note in notes)


def test_missing_data_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--data", str(tmp_path / "absent"), "--real-only"]) == 2
    assert "no TMA data" in capsys.readouterr().err
