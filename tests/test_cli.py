"""The ``her2scope`` command line on the real sample FOVs: clients/cli.py and clients/scoring_report.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner, Result

from her2scope.clients.cli import app
from tests.helpers.images import read_image

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
HER2_0 = SAMPLES / "her2_0.jpg"
HER2_3PLUS = SAMPLES / "her2_3plus.jpg"
CONTROL = SAMPLES / "control_3plus.jpg"
FOV_SHAPE = (1080, 1920, 3)

SCORES = {"0", "1+", "2+", "3+"}
REPORT_KEYS = {"software", "pixel_size_um", "parameters", "control", "fovs", "case"}
FOV_KEYS = {
    "image",
    "counts",
    "total",
    "percentages",
    "score",
    "status",
    "her2_low",
    "zero_subtype",
    "reason",
    "guideline",
    "specimen",
    "clusters",
    "n_excluded_nuclei",
    "weak_threshold_od",
    "intense_threshold_od",
    "intense_threshold_source",
    "tumour_area_mm2",
    "pixel_size_um",
    "warnings",
    "overlay",
}
CASE_KEYS = {
    "score",
    "status",
    "her2_low",
    "zero_subtype",
    "reason",
    "guideline",
    "specimen",
    "counts",
    "total",
    "percentages",
    "n_fovs",
    "warnings",
}


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_json(*args: str | Path) -> dict[str, Any]:
    result = run("score", "--json", *args)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def assert_input_error(result: Result, *fragments: str) -> None:
    """Exit code 2 with our own one-line message (not a usage error or a traceback), nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def blank_png(path: Path, grey: int = 245) -> Path:
    assert cv2.imwrite(str(path), np.full(FOV_SHAPE, grey, np.uint8))
    return path


def roi_file(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def overlay_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("overlays")


@pytest.fixture(scope="module")
def case_report(overlay_dir: Path) -> dict[str, Any]:
    """her2_0 and her2_3plus scored against the positive control, with overlays."""
    return run_json(HER2_0, HER2_3PLUS, "--control", CONTROL, "--overlay-dir", overlay_dir)


# ----------------------------------------------------------------------------------------------------
# Version and help
# ----------------------------------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"her2scope {version('her2scope')}\n"


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"]])
def test_help(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 0
    assert "Usage" in result.stdout
    assert "score" in result.stdout


def test_score_help_lists_options() -> None:
    result = run("score", "--help")
    for option in ("--control", "--pixel-size", "--roi", "--overlay-dir", "--config", "--json"):
        assert option in result.stdout


# ----------------------------------------------------------------------------------------------------
# The JSON report on real FOVs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_json_report_structure(case_report: dict[str, Any]) -> None:
    assert set(case_report) == REPORT_KEYS
    assert case_report["software"] == {"name": "her2scope", "version": version("her2scope")}
    assert case_report["pixel_size_um"] == 0.25
    assert len(case_report["fovs"]) == 2
    for fov in case_report["fovs"]:
        assert set(fov) == FOV_KEYS
        assert list(fov["counts"]) == ["0", "1+", "2+", "3+"]
        assert all(type(n) is int and n >= 0 for n in fov["counts"].values())
        assert fov["total"] == sum(fov["counts"].values())
        assert fov["score"] in SCORES
        assert sum(fov["percentages"].values()) == pytest.approx(100.0)
        assert fov["intense_threshold_source"] == "positive control"
        assert fov["intense_threshold_od"] == case_report["control"]["intense_threshold_od"]
    assert [fov["image"] for fov in case_report["fovs"]] == [str(HER2_0), str(HER2_3PLUS)]


@pytest.mark.e2e
def test_json_case_sums_fovs(case_report: dict[str, Any]) -> None:
    case = case_report["case"]
    assert set(case) == CASE_KEYS
    assert case["n_fovs"] == 2
    for key in ("0", "1+", "2+", "3+"):
        assert case["counts"][key] == sum(fov["counts"][key] for fov in case_report["fovs"])
    assert case["total"] == sum(fov["total"] for fov in case_report["fovs"])
    assert case["score"] in SCORES
    # A control was given and passed its QC: no warning about the default threshold.
    assert case_report["control"]["qc_passed"] is True
    assert case["warnings"] == []


@pytest.mark.e2e
def test_real_fovs_score_as_labelled(case_report: dict[str, Any]) -> None:
    zero, three = case_report["fovs"]
    assert zero["score"] == "0"
    assert zero["status"] == "negative"
    assert zero["counts"]["3+"] == 0
    assert three["score"] == "3+"
    assert three["status"] == "positive"
    assert three["her2_low"] is False
    assert three["counts"]["3+"] > 0.1 * three["total"]
    # Enough cells in each 1080x1920 40x crop to be assessable on its own.
    assert zero["total"] >= 100
    assert three["total"] >= 100


@pytest.mark.e2e
def test_control_is_calibrated(case_report: dict[str, Any]) -> None:
    control = case_report["control"]
    assert control["image"] == str(CONTROL)
    assert control["source"] == "positive control"
    assert control["control_score"] == "3+"
    assert 0.0 < control["intense_threshold_od"] < control["membrane_ridge_od"]


@pytest.mark.e2e
def test_overlays_written(case_report: dict[str, Any], overlay_dir: Path) -> None:
    written = sorted(p.name for p in overlay_dir.iterdir())
    assert written == ["control_3plus_control_overlay.png", "her2_0_overlay.png", "her2_3plus_overlay.png"]
    for fov in case_report["fovs"]:
        assert fov["overlay"] == str(overlay_dir / f"{Path(fov['image']).stem}_overlay.png")
    assert case_report["control"]["overlay"] == str(overlay_dir / "control_3plus_control_overlay.png")
    for name in written:
        image = cv2.imread(str(overlay_dir / name), cv2.IMREAD_UNCHANGED)
        assert image is not None, name
        assert image.shape == FOV_SHAPE
        assert image.dtype == np.uint8
    # An overlay draws on the FOV: it differs from, but still resembles, the image under it.
    fov = read_image(HER2_3PLUS).astype(np.int16)
    overlay = read_image(overlay_dir / "her2_3plus_overlay.png").astype(np.int16)
    difference = np.abs(overlay - fov).mean()
    assert 0.5 < difference < 60.0


def test_no_overlay_without_overlay_dir() -> None:
    report = run_json(HER2_0)
    assert report["fovs"][0]["overlay"] is None
    assert report["control"] is None


def test_without_control_the_case_warns() -> None:
    report = run_json(HER2_0)
    assert report["fovs"][0]["intense_threshold_source"] == "default"
    assert report["case"]["warnings"] == ["no positive control: the default intense threshold was used"]


def test_table_output() -> None:
    result = run("score", HER2_0, HER2_3PLUS, "--control", CONTROL)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("control control_3plus.jpg: intense threshold ")
    assert "QC passed" in lines[0]
    assert any(line.startswith("her2_0.jpg") and line.rstrip().endswith("0 (ultralow)") for line in lines)
    assert any(line.startswith("her2_3plus.jpg") and line.rstrip().endswith("3+") for line in lines)
    assert "CASE HER2 IHC" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


@pytest.mark.e2e
def test_subprocess_console_script(tmp_path: Path) -> None:
    script = shutil.which("her2scope", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "her2scope"]
    completed = subprocess.run(
        [*command, "score", "--json", str(HER2_3PLUS), "--control", str(CONTROL)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert report["fovs"][0]["score"] == "3+"
    assert report["case"]["score"] == "3+"


@pytest.mark.e2e
def test_subprocess_module_error_exit_code(tmp_path: Path) -> None:
    missing = tmp_path / "absent.png"
    completed = subprocess.run(
        [sys.executable, "-m", "her2scope", "score", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr == f"error: {missing}: no such file\n"


# ----------------------------------------------------------------------------------------------------
# Bad input: exit code 2, a message naming the file, no traceback
# ----------------------------------------------------------------------------------------------------


def test_text_file_as_fov(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n", encoding="utf-8")
    assert_input_error(run("score", HER2_0, path), str(path), "not a readable image")


def test_greyscale_fov(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    assert cv2.imwrite(str(path), np.full((200, 300), 128, np.uint8))
    assert_input_error(run("score", path), str(path), "greyscale")


def test_missing_fov(tmp_path: Path) -> None:
    path = tmp_path / "absent.jpg"
    assert_input_error(run("score", HER2_0, path), str(path), "no such file")


def test_zero_byte_fov(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_input_error(run("score", path), str(path), "not a readable image")


def test_bad_input_fails_before_any_output(tmp_path: Path) -> None:
    # All inputs are checked before anything is scored or written.
    overlays = tmp_path / "overlays"
    result = run("score", HER2_0, tmp_path / "absent.jpg", "--overlay-dir", overlays)
    assert_input_error(result, "absent.jpg")
    assert not overlays.exists()


@pytest.mark.parametrize("pixel_size", ["0", "50", "-0.25", "nan"])
def test_implausible_pixel_size(pixel_size: str) -> None:
    assert_input_error(run("score", HER2_0, "--pixel-size", pixel_size), "--pixel-size", "pixel size")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("this is not json", "not a JSON ROI file"),
        ('{"polygon": [[0, 0], [100, 100]]}', "at least 3 vertices"),
        ('{"polygon": [[0, 0], [100, "x"], [100, 0]]}', "is not a [row, col] pair of numbers"),
    ],
)
def test_bad_roi(tmp_path: Path, text: str, fragment: str) -> None:
    roi = roi_file(tmp_path / "roi.json", text)
    assert_input_error(run("score", HER2_0, "--roi", roi), str(roi), fragment)


def test_missing_roi(tmp_path: Path) -> None:
    roi = tmp_path / "absent.json"
    assert_input_error(run("score", HER2_0, "--roi", roi), str(roi), "no such file")


def test_roi_outside_fov(tmp_path: Path) -> None:
    roi = roi_file(tmp_path / "roi.json", '{"polygon": [[5000, 5000], [5000, 6000], [6000, 6000]]}')
    assert_input_error(run("score", HER2_0, "--roi", roi), "outside")


def test_roi_restricts_counting(tmp_path: Path) -> None:
    full = run_json(HER2_0)["fovs"][0]
    roi = roi_file(tmp_path / "roi.json", '{"polygon": [[100, 100], [100, 600], [500, 600], [500, 100]]}')
    restricted = run_json(HER2_0, "--roi", roi)["fovs"][0]
    assert 0 < restricted["total"] < full["total"]
    # A 400x500 px window holds roughly its area's share of the cells, not most of them.
    assert restricted["total"] < 0.5 * full["total"]
    assert restricted["tumour_area_mm2"] < full["tumour_area_mm2"]


def test_roi_covering_the_fov_changes_nothing(tmp_path: Path) -> None:
    full = run_json(HER2_0)["fovs"][0]
    roi = roi_file(tmp_path / "roi.json", '{"polygon": [[-1, -1], [-1, 1921], [1081, 1921], [1081, -1]]}')
    everywhere = run_json(HER2_0, "--roi", roi)["fovs"][0]
    assert everywhere["counts"] == full["counts"]


def test_blank_fov_is_not_assessable_not_a_crash(tmp_path: Path) -> None:
    report = run_json(blank_png(tmp_path / "blank.png"))
    fov = report["fovs"][0]
    assert fov["total"] == 0
    assert fov["counts"] == {"0": 0, "1+": 0, "2+": 0, "3+": 0}
    assert fov["score"] is None
    assert fov["status"] == "not assessable"
    assert report["case"]["score"] is None
    assert report["case"]["status"] == "not assessable"


def test_blank_fov_table_says_not_assessable(tmp_path: Path) -> None:
    result = run("score", blank_png(tmp_path / "blank.png"))
    assert result.exit_code == 0, result.output
    assert "CASE HER2 IHC not assessable" in result.stdout


def test_blank_control(tmp_path: Path) -> None:
    control = blank_png(tmp_path / "blank_control.png")
    assert_input_error(run("score", HER2_0, "--control", control), str(control), "positive control")


def test_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "her2scope.toml"
    config.write_text("[scoring]\nweak_threshold_od = -1\n", encoding="utf-8")
    result = run("score", HER2_0, "--config", config)
    assert_input_error(result, str(config), "scoring.weak_threshold_od", "-1")


def test_config_file_is_used(tmp_path: Path) -> None:
    config = tmp_path / "her2scope.toml"
    text = "[optics]\npixel_size_um = 0.3\n\n[case_rule]\nmin_tumour_cells = 100000\n"
    config.write_text(text, encoding="utf-8")
    report = run_json(HER2_0, "--config", config)
    assert report["pixel_size_um"] == 0.3
    assert report["parameters"]["case_rule"]["min_tumour_cells"] == 100000
    assert report["case"]["score"] is None


# ----------------------------------------------------------------------------------------------------
# 16-bit images
# ----------------------------------------------------------------------------------------------------


def to_16bit(source: Path, target: Path) -> Path:
    image = read_image(source).astype(np.uint16) * 257
    assert cv2.imwrite(str(target), image)
    assert read_image(target, cv2.IMREAD_UNCHANGED).dtype == np.uint16
    return target


def test_16bit_fov_scores_like_8bit(tmp_path: Path) -> None:
    deep = to_16bit(HER2_3PLUS, tmp_path / "her2_3plus_16.png")
    report = run_json(HER2_3PLUS, deep)
    eight, sixteen = report["fovs"]
    # (the 8-bit field is averaged down to the analysis grid in whole grey levels, the 16-bit one in finer steps:
    # a few borderline nuclei differ)
    assert sixteen["total"] == pytest.approx(eight["total"], rel=0.03)
    assert sixteen["score"] == eight["score"]
    for key in ("0", "1+", "2+", "3+"):
        assert sixteen["percentages"][key] == pytest.approx(eight["percentages"][key], abs=1.0)


@pytest.mark.e2e
def test_16bit_control_calibrates_and_draws_like_8bit(tmp_path: Path) -> None:
    deep = to_16bit(CONTROL, tmp_path / "control_16.png")
    eight_dir, sixteen_dir = tmp_path / "eight", tmp_path / "sixteen"
    eight = run_json(HER2_0, "--control", CONTROL, "--overlay-dir", eight_dir)["control"]
    sixteen = run_json(HER2_0, "--control", deep, "--overlay-dir", sixteen_dir)["control"]
    assert sixteen["intense_threshold_od"] == pytest.approx(eight["intense_threshold_od"], rel=0.02)
    # The control overlay is drawn over the control converted to 8 bits, not over clipped 16-bit values.
    a = read_image(eight["overlay"]).astype(np.int16)
    b = read_image(sixteen["overlay"]).astype(np.int16)
    assert a.shape == b.shape == FOV_SHAPE
    assert np.abs(a - b).mean() < 5.0


def test_the_objective_sets_the_pixel_size() -> None:
    runner = CliRunner()
    at_40x = runner.invoke(app, ["score", str(HER2_0), "--objective", "40x", "--json"])
    at_20x = runner.invoke(app, ["score", str(HER2_0), "--objective", "20x", "--json"])
    assert at_40x.exit_code == 0 and at_20x.exit_code == 0
    assert json.loads(at_40x.stdout)["pixel_size_um"] == 0.25
    assert json.loads(at_20x.stdout)["pixel_size_um"] == 0.5
    unknown = runner.invoke(app, ["score", str(HER2_0), "--objective", "60x"])
    assert unknown.exit_code == 2 and "--objective '60x' is not in the configuration: 20x, 40x" in unknown.stderr
    both = runner.invoke(app, ["score", str(HER2_0), "--objective", "40x", "--pixel-size", "0.25"])
    assert both.exit_code == 2 and "not both" in both.stderr


@pytest.mark.e2e
def test_score_with_the_gastric_biopsy_guideline(case_report: dict[str, Any]) -> None:
    report = run_json(HER2_0, HER2_3PLUS, "--control", CONTROL, "--guideline", "gastric", "--specimen", "biopsy")
    assert report["parameters"]["case_rule"]["guideline"] == "gastric"
    assert report["parameters"]["case_rule"]["specimen"] == "biopsy"
    case = report["case"]
    assert (case["guideline"], case["specimen"]) == ("gastric", "biopsy")
    assert case["reason"].startswith("gastric (biopsy): ")
    three_plus = report["fovs"][1]
    assert three_plus["clusters"]["3+"] >= 5  # a real 3+ field has nests of cohesive 3+ cells
    assert case["score"] == "3+" and case["reason"].startswith("gastric (biopsy): a cluster of ")
    assert case["zero_subtype"] is None and case["her2_low"] is False
    # the same cells as the breast report; only lateral and basolateral staining counts more under the gastric rule
    for gastric, breast in zip(report["fovs"], case_report["fovs"], strict=True):
        assert gastric["total"] == breast["total"]
        assert gastric["counts"]["3+"] >= breast["counts"]["3+"]
        assert gastric["counts"]["0"] == breast["counts"]["0"]
    assert case_report["case"]["guideline"] == "breast"
    table = run("score", HER2_0, HER2_3PLUS, "--control", CONTROL, "--guideline", "gastric", "--specimen", "biopsy")
    assert table.exit_code == 0, table.output
    assert "rule: gastric, CAP/ASCP/ASCO 2016" in table.stdout and "largest cohesive clusters" in table.stdout


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--guideline", "lung", "--guideline 'lung': use one of breast, gastric"),
        ("--specimen", "cytology", "--specimen 'cytology': use one of resection, biopsy"),
    ],
)
def test_score_rejects_an_unknown_guideline(option: str, value: str, fragment: str) -> None:
    assert_input_error(run("score", HER2_0, option, value), fragment)
