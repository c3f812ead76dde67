"""Tests of the synthetic HER2 IHC field-of-view generator (her2scope.synthetic)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from her2scope.synthetic import (
    GLASS_LEVEL,
    HER2_CLASSES,
    MEMBRANE_DAB_OD,
    SyntheticCell,
    SyntheticFov,
    blank_fov,
    render_control,
    render_fov,
    stain_matrix,
)

SMALL = (540, 960)
ALL_CLASSES: Mapping[str, float] = {"0": 0.1, "1+": 0.2, "2+": 0.3, "3+": 0.4}


# ------------------------------------------------------------------------------------------------ helpers


def deconvolve(rgb: NDArray[np.uint8], stains: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
    """(rows, cols, 3) uint8 RGB → (rows, cols, 3) stain concentrations (H, DAB, residual) in OD."""
    matrix = stain_matrix() if stains is None else stains
    od = -np.log10(np.maximum(rgb.astype(np.float64), 1.0) / GLASS_LEVEL)
    return np.asarray((od.reshape(-1, 3) @ np.linalg.inv(matrix)).reshape(rgb.shape), dtype=np.float64)


def outline(cell: SyntheticCell, px: float, n: int = 180, offset_px: float = 0.0) -> tuple[Any, Any]:
    """Integer (rows, cols) of ``n`` points on the cell outline ellipse, pushed out by ``offset_px``."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    a = cell.major_um / 2.0 / px + offset_px
    b = cell.minor_um / 2.0 / px + offset_px
    phi = math.radians(cell.angle_deg)
    dc = a * np.cos(t) * math.cos(phi) - b * np.sin(t) * math.sin(phi)
    dr = a * np.cos(t) * math.sin(phi) + b * np.sin(t) * math.cos(phi)
    return np.round(cell.row + dr).astype(int), np.round(cell.col + dc).astype(int)


def ring_profile(dab: NDArray[np.float64], cell: SyntheticCell, px: float, n: int = 180) -> NDArray[np.float64]:
    """DAB OD along the outline: per angle, the maximum over radial offsets of -1, 0, +1 px."""
    samples = []
    for offset in (-1.0, 0.0, 1.0):
        rr, cc = outline(cell, px, n, offset)
        rr = np.clip(rr, 0, dab.shape[0] - 1)
        cc = np.clip(cc, 0, dab.shape[1] - 1)
        samples.append(dab[rr, cc])
    return np.asarray(np.max(samples, axis=0), dtype=np.float64)


def cells_of(fov: SyntheticFov, her2_class: str) -> list[SyntheticCell]:
    return [c for c in fov.cells if c.her2_class == her2_class]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mixed() -> SyntheticFov:
    return render_fov(SMALL, 0.5, ALL_CLASSES, seed=7)


@pytest.fixture(scope="module")
def mixed_40x() -> SyntheticFov:
    return render_fov(SMALL, 0.25, {"2+": 0.5, "3+": 0.5}, seed=11)


# ---------------------------------------------------------------------------------------------- structure


def test_constants() -> None:
    assert HER2_CLASSES == ("0", "1+", "2+", "3+")
    assert set(MEMBRANE_DAB_OD) == set(HER2_CLASSES)
    assert MEMBRANE_DAB_OD["0"] == 0.0 < MEMBRANE_DAB_OD["1+"] < MEMBRANE_DAB_OD["2+"] < MEMBRANE_DAB_OD["3+"]
    with pytest.raises(TypeError):
        MEMBRANE_DAB_OD["3+"] = 2.0  # type: ignore[index]


def test_shape_dtype_and_read_only(mixed: SyntheticFov) -> None:
    assert mixed.rgb.shape == (*SMALL, 3)
    assert mixed.rgb.dtype == np.uint8
    assert mixed.tumour_mask.shape == SMALL
    assert mixed.tumour_mask.dtype == np.bool_
    assert not mixed.rgb.flags.writeable
    assert not mixed.tumour_mask.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        mixed.rgb[0, 0, 0] = 0
    with pytest.raises(AttributeError):
        mixed.pixel_size_um = 1.0  # type: ignore[misc]
    assert mixed.pixel_size_um == 0.5
    assert mixed.batch_strength == 1.0
    assert len(mixed.cells) >= 200
    assert list(mixed.counts()) == list(HER2_CLASSES)
    assert sum(mixed.counts().values()) == len(mixed.cells)


def test_deterministic_for_a_seed() -> None:
    a = render_fov((256, 384), 0.5, ALL_CLASSES, seed=3)
    b = render_fov((256, 384), 0.5, ALL_CLASSES, seed=3)
    c = render_fov((256, 384), 0.5, ALL_CLASSES, seed=4)
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert a.cells == b.cells
    assert np.array_equal(a.tumour_mask, b.tumour_mask)
    assert a.rgb.tobytes() != c.rgb.tobytes()
    assert a.cells != c.cells
    # A generator seeds identically to its integer seed and is advanced by the call.
    rng = np.random.default_rng(3)
    d = render_fov((256, 384), 0.5, ALL_CLASSES, seed=rng)
    assert d.rgb.tobytes() == a.rgb.tobytes()
    e = render_fov((256, 384), 0.5, ALL_CLASSES, seed=rng)
    assert e.rgb.tobytes() != a.rgb.tobytes()


def test_counts_follow_class_fractions(mixed: SyntheticFov) -> None:
    counts = mixed.counts()
    total = sum(counts.values())
    for her2_class, fraction in ALL_CLASSES.items():
        assert abs(counts[her2_class] / total - fraction) <= 1.0 / total + 1e-9
    # Classes come in regions: most nests hold a single class.
    by_nest: dict[int, set[str]] = {}
    for cell in mixed.cells:
        by_nest.setdefault(cell.nest_id, set()).add(cell.her2_class)
    mixed_nests = sum(len(classes) > 1 for classes in by_nest.values())
    assert mixed_nests <= len(HER2_CLASSES) - 1
    assert len(by_nest) >= 10


def test_missing_classes_get_no_cells() -> None:
    fov = render_fov(SMALL, 0.5, {"0": 0.25, "3+": 0.75}, seed=2)
    counts = fov.counts()
    assert counts["1+"] == counts["2+"] == 0
    assert abs(counts["3+"] / len(fov.cells) - 0.75) < 0.01


def test_cell_heterogeneity_flips_single_cells() -> None:
    fov = render_fov(SMALL, 0.5, {"3+": 1.0}, cell_heterogeneity=0.3, seed=5)
    counts = fov.counts()
    other = 1.0 - counts["3+"] / len(fov.cells)
    assert 0.22 < other < 0.38
    assert all(counts[c] > 0 for c in ("0", "1+", "2+"))
    for cell in fov.cells:  # ground truth stays consistent with what was drawn
        assert cell.membrane_complete == (cell.her2_class in ("2+", "3+"))
        assert (cell.membrane_dab_od == 0.0) == (cell.her2_class == "0")


def test_cells_lie_inside_the_nests_and_the_image(mixed: SyntheticFov, mixed_40x: SyntheticFov) -> None:
    for fov in (mixed, mixed_40x):
        rows, cols = fov.tumour_mask.shape
        px = fov.pixel_size_um
        for cell in fov.cells:
            reach = cell.major_um / 2.0 / px
            assert reach <= cell.row <= rows - 1 - reach
            assert reach <= cell.col <= cols - 1 - reach
            assert fov.tumour_mask[round(cell.row), round(cell.col)]
            assert fov.tumour_mask[round(cell.nucleus_row), round(cell.nucleus_col)]
            rr, cc = outline(cell, px, 36)
            assert fov.tumour_mask[rr, cc].all()
        assert 0.3 < fov.tumour_mask.mean() < 0.6


def test_cells_do_not_overlap(mixed_40x: SyntheticFov) -> None:
    cells = mixed_40x.cells
    centres = np.array([(c.row, c.col) for c in cells])
    minor = np.array([c.minor_um for c in cells]) / mixed_40x.pixel_size_um
    distance = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    # Inscribed circles (minor semi-axes) of two cells never touch.
    assert np.all(distance > (minor[:, None] + minor[None, :]) / 2.0)


@pytest.mark.e2e
def test_sizes_in_micrometres() -> None:
    for px in (0.25, 0.5):
        shape = (540, 960) if px == 0.5 else (720, 1280)
        fov = render_fov(shape, px, {"0": 1.0}, blur_um=0.0, noise_sigma=0.0, seed=13)
        diameters = np.array([c.diameter_um for c in fov.cells])
        assert abs(diameters.mean() - 12.0) < 0.8
        assert diameters.min() >= 0.8 * 12.0 - 1e-6 and diameters.max() <= 1.2 * 12.0 + 1e-6
        # Measure the nuclei in the (unblurred) image: H OD well above cytoplasm and stroma (<= 0.1) and
        # below any nucleus (>= 0.5, texture included >= 0.3); one connected component per nucleus.
        h = deconvolve(fov.rgb)[..., 0]
        n_labels, labels, stats, _ = cv2.connectedComponentsWithStats((h > 0.25).astype(np.uint8), connectivity=8)
        measured, truth = [], []
        for cell in fov.cells:
            label = labels[round(cell.nucleus_row), round(cell.nucleus_col)]
            assert label > 0
            area_um2 = stats[label, cv2.CC_STAT_AREA] * px * px
            measured.append(2.0 * math.sqrt(area_um2 / math.pi))
            truth.append(cell.nucleus_diameter_um)
        assert n_labels > len(fov.cells)  # stroma nuclei are there too
        assert abs(np.median(measured) - 6.0) < 0.8
        assert abs(np.median(truth) - 6.0) < 0.5
        assert np.median(np.abs(np.array(measured) - np.array(truth))) < 0.25


# ---------------------------------------------------------------------------------------------- membranes


def test_three_plus_membranes_are_darker_and_browner_than_two_plus(mixed_40x: SyntheticFov) -> None:
    px = mixed_40x.pixel_size_um
    dab = deconvolve(mixed_40x.rgb)[..., 1]
    grey = mixed_40x.rgb.astype(np.float64).mean(axis=2)
    level: dict[str, float] = {}
    brightness: dict[str, float] = {}
    for her2_class in ("2+", "3+"):
        cells = cells_of(mixed_40x, her2_class)
        assert len(cells) > 30
        level[her2_class] = float(np.median([np.median(ring_profile(dab, c, px)) for c in cells]))
        brightness[her2_class] = float(np.median([grey[outline(c, px)].mean() for c in cells]))
    assert level["3+"] > 1.6 * level["2+"]
    assert brightness["3+"] < brightness["2+"] - 20
    # Rendered peaks are the drawn levels, lowered a little by the 0.5 µm blur.
    for her2_class, measured in level.items():
        assert 0.6 * MEMBRANE_DAB_OD[her2_class] < measured < 1.1 * MEMBRANE_DAB_OD[her2_class]
    # Brown: the membrane absorbs more blue than red, the nuclei more red than blue.
    rgb = mixed_40x.rgb.astype(np.float64)
    ring_r, ring_b = [], []
    for cell in cells_of(mixed_40x, "3+"):
        rr, cc = outline(cell, px)
        ring_r.append(rgb[rr, cc, 0].mean())
        ring_b.append(rgb[rr, cc, 2].mean())
    assert np.mean(ring_r) > np.mean(ring_b) + 20
    nuclei = np.array([rgb[round(c.nucleus_row), round(c.nucleus_col)] for c in mixed_40x.cells])
    assert nuclei[:, 2].mean() > nuclei[:, 0].mean() + 20


def test_membrane_od_ground_truth(mixed_40x: SyntheticFov) -> None:
    for cell in mixed_40x.cells:
        nominal = MEMBRANE_DAB_OD[cell.her2_class]
        assert 0.85 * nominal - 1e-9 <= cell.membrane_dab_od <= 1.15 * nominal + 1e-9
        assert cell.membrane_complete
        assert cell.membrane_coverage == 1.0


@pytest.mark.e2e
def test_batch_strength_scales_membrane_dab() -> None:
    measured = {}
    geometry = {}
    for batch in (0.6, 1.0, 1.4):
        fov = render_control((400, 640), 0.5, batch_strength=batch, seed=21)
        assert fov.batch_strength == batch
        assert fov.counts()["3+"] == len(fov.cells) > 50
        dab = deconvolve(fov.rgb)[..., 1]
        measured[batch] = float(np.median([np.median(ring_profile(dab, c, 0.5)) for c in fov.cells]))
        geometry[batch] = [(c.row, c.col) for c in fov.cells]
        drawn = np.array([c.membrane_dab_od for c in fov.cells])
        assert np.all(drawn >= 0.85 * 0.9 * batch - 1e-9) and np.all(drawn <= 1.15 * 0.9 * batch + 1e-9)
    assert geometry[0.6] == geometry[1.4]  # same seed, same tissue: only the stain changes
    assert measured[0.6] < measured[1.0] < measured[1.4]
    assert measured[1.4] / measured[0.6] == pytest.approx(1.4 / 0.6, rel=0.15)


def test_one_plus_membranes_are_incomplete() -> None:
    fov = render_fov(SMALL, 0.25, {"1+": 1.0}, seed=17)
    px = fov.pixel_size_um
    dab = deconvolve(fov.rgb)[..., 1]
    coverage = []
    for cell in fov.cells:
        assert not cell.membrane_complete
        assert 0.25 <= cell.membrane_coverage <= 0.60
        stained = ring_profile(dab, cell, px, n=360) > 0.5 * cell.membrane_dab_od
        coverage.append(stained.mean())
        assert stained.mean() < 0.6 + 0.05  # the blur lengthens the arcs a little
        assert abs(stained.mean() - cell.membrane_coverage) < 0.1
    assert len(coverage) > 30
    assert 0.3 < np.mean(coverage) < 0.5
    # Complete rings, by contrast, are stained all round.
    control = render_control(SMALL, 0.25, seed=17)
    dab = deconvolve(control.rgb)[..., 1]
    full = [np.mean(ring_profile(dab, c, px, n=360) > 0.5 * c.membrane_dab_od) for c in control.cells]
    assert np.min(full) > 0.95


def test_zero_cells_have_no_membrane_dab() -> None:
    fov = render_fov(SMALL, 0.5, {"0": 1.0}, seed=19)
    dab = deconvolve(fov.rgb)[..., 1]
    rings = [np.median(ring_profile(dab, c, 0.5)) for c in fov.cells]
    assert np.median(rings) < 0.06
    assert all(c.membrane_dab_od == 0.0 and c.membrane_coverage == 0.0 for c in fov.cells)


# ------------------------------------------------------------------------------------------------- optics


def test_beer_lambert_glass_and_stain_vectors() -> None:
    fov = render_fov((256, 384), 0.5, {"3+": 1.0}, noise_sigma=0.0, blur_um=0.0, seed=1)
    assert np.any(np.all(fov.rgb == GLASS_LEVEL, axis=2))  # empty glass renders at I0
    assert fov.rgb.max() <= GLASS_LEVEL
    matrix = stain_matrix()
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0)
    assert np.allclose(matrix[0], np.array([0.650, 0.704, 0.286]) / np.linalg.norm([0.650, 0.704, 0.286]))
    # Other stain vectors change the colours but deconvolve back to the same DAB rings.
    vectors = ((0.55, 0.75, 0.36), (0.30, 0.55, 0.78))
    other = render_fov((256, 384), 0.5, {"3+": 1.0}, stain_vectors=vectors, seed=1)
    assert other.rgb.tobytes() != fov.rgb.tobytes()
    dab = deconvolve(other.rgb, stain_matrix(vectors))[..., 1]
    ring = np.median([np.median(ring_profile(dab, c, 0.5)) for c in other.cells])
    assert 0.5 < ring < 1.0


def test_noise_and_blur() -> None:
    clean = render_fov((256, 384), 0.5, ALL_CLASSES, noise_sigma=0.0, seed=9)
    noisy = render_fov((256, 384), 0.5, ALL_CLASSES, noise_sigma=4.0, seed=9)
    diff = noisy.rgb.astype(np.float64) - clean.rgb.astype(np.float64)
    assert 3.0 < diff[clean.rgb < 240].std() < 5.0
    sharp = render_fov((256, 384), 0.5, ALL_CLASSES, blur_um=0.0, noise_sigma=0.0, seed=9)
    blurred = render_fov((256, 384), 0.5, ALL_CLASSES, blur_um=1.5, noise_sigma=0.0, seed=9)
    gradient = [np.abs(np.diff(f.rgb.astype(np.float64), axis=1)).mean() for f in (sharp, blurred)]
    assert gradient[1] < 0.7 * gradient[0]


def test_jpeg_round_trip() -> None:
    raw = render_fov((256, 384), 0.5, ALL_CLASSES, seed=9)
    jpeg = render_fov((256, 384), 0.5, ALL_CLASSES, jpeg_quality=80, seed=9)
    assert jpeg.rgb.shape == raw.rgb.shape and jpeg.rgb.dtype == np.uint8
    assert not jpeg.rgb.flags.writeable
    assert jpeg.rgb.tobytes() != raw.rgb.tobytes()
    error = np.abs(jpeg.rgb.astype(np.float64) - raw.rgb.astype(np.float64))
    assert error.mean() < 4.0
    # Channel order survives the BGR round trip: per-channel means stay put.
    assert np.allclose(jpeg.rgb.mean(axis=(0, 1)), raw.rgb.mean(axis=(0, 1)), atol=1.5)
    assert jpeg.cells == raw.cells


def test_control_and_blank() -> None:
    control = render_control(SMALL, 0.5, batch_strength=1.2, seed=4)
    assert control.counts()["3+"] == len(control.cells) > 100
    assert control.batch_strength == 1.2
    assert 0.4 < control.tumour_mask.mean() < 0.6
    assert render_control(SMALL, 0.5, tumour_fraction=0.2, seed=4).tumour_mask.mean() < 0.3
    blank = blank_fov((100, 200))
    assert blank.shape == (100, 200, 3) and blank.dtype == np.uint8
    assert np.all(blank == GLASS_LEVEL)
    assert np.all(blank_fov((64, 64), level=10) == 10)


@pytest.mark.e2e
def test_virtual_slide_at_20x() -> None:
    fov = render_fov((2000, 2600), 0.5, ALL_CLASSES, seed=23)
    assert fov.rgb.shape == (2000, 2600, 3)
    assert len(fov.cells) > 2000
    assert 0.35 < fov.tumour_mask.mean() < 0.55


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_fractions": {"4+": 1.0}}, "unknown HER2 class"),
        ({"class_fractions": {"3+": 0.5, "2+": 0.4}}, "sum to 1"),
        ({"class_fractions": {"3+": 1.5, "2+": -0.5}}, "class_fractions"),
        ({"class_fractions": [("3+", 1.0)]}, "mapping"),
        ({"pixel_size_um": 0.05}, "pixel_size_um"),
        ({"pixel_size_um": 5.5}, "pixel_size_um"),
        ({"pixel_size_um": float("nan")}, "pixel_size_um"),
        ({"shape": (20, 960)}, "too small"),
        ({"shape": (540,)}, "shape"),
        ({"shape": (540.0, 960)}, "integer"),
        ({"cell_diameter_um": -12.0}, "cell_diameter_um"),
        ({"nucleus_diameter_um": 0.0}, "nucleus_diameter_um"),
        ({"nucleus_diameter_um": 11.0}, "nucleus_diameter_um"),
        ({"batch_strength": -0.1}, "batch_strength"),
        ({"tumour_fraction": 0.95}, "tumour_fraction"),
        ({"cell_heterogeneity": 1.5}, "cell_heterogeneity"),
        ({"blur_um": -1.0}, "blur_um"),
        ({"noise_sigma": -1.0}, "noise_sigma"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
        ({"jpeg_quality": 80.0}, "jpeg_quality"),
        ({"stain_vectors": ((0.65, 0.70, 0.29), (0.65, 0.70, 0.29))}, "parallel"),
        ({"stain_vectors": ((0.65, -0.70, 0.29), (0.27, 0.57, 0.78))}, "haematoxylin"),
        ({"seed": -1}, "seed"),
        ({"seed": "abc"}, "seed"),
        ({"pixel_size_um": 4.0}, "at least 6 px"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"shape": (256, 384), "pixel_size_um": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        render_fov(**arguments)


def test_bad_arguments_of_helpers() -> None:
    with pytest.raises(ValueError, match="class mixes"):
        render_control(SMALL, 0.5, class_fractions={"0": 1.0})  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="level"):
        blank_fov((64, 64), level=300)
    with pytest.raises(ValueError, match="too small"):
        blank_fov((8, 64))
