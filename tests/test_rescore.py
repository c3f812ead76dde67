"""``her2scope rescore`` on a case recorded by a real daemon and a real recorder (recorded once for the module)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from her2scope.clients.cli import app
from tests.helpers.recorder import ROI, Setup, capture, has_stop, read_docs, settled, start_daemon_setup, wait_for_docs

pytestmark = pytest.mark.e2e  # a case recorded by a real daemon and recorder

runner = CliRunner()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A closed case with a control, three FOVs, an ROI and an exclusion, as the recorder wrote it."""
    setup: Setup = start_daemon_setup(tmp_path_factory.mktemp("rescore"))
    recorder = setup.recorder()
    try:
        daemon = setup.daemon
        daemon.control.call("start-case", case_id="rescore-me")
        fovs = [capture(daemon, "field 0")]  # before the control: re-scored when the control is calibrated
        capture(daemon, "control")
        fovs += [capture(daemon, "field 1"), capture(daemon, "field 3")]
        settled(daemon)
        daemon.control.call("set-roi", fov_id=fovs[1], polygon=ROI)
        daemon.control.call("exclude", fov_id=fovs[2])
        settled(daemon)
        daemon.control.call("close-case")
        wait_for_docs(setup.out / "rescore-me", has_stop, "the stop document")
    finally:
        assert recorder.stop() == 0
        setup.daemon.stop()
    yield setup.out / "rescore-me"


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["rescore", *args])


def test_the_recorded_parameters_reproduce_the_recorded_numbers_exactly(case_dir: Path) -> None:
    result = invoke(str(case_dir), "--json")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert comparison["reproduced"] and not comparison["changed"] and comparison["output"] is None
    docs = read_docs(case_dir)
    latest = {d["fov_id"]: d for d in docs if d["doc"] == "event"}
    stop = docs[-1]
    assert {f["fov_id"] for f in comparison["fovs"]} == set(latest)
    for fov in comparison["fovs"]:
        assert fov["new"]["counts"] == latest[fov["fov_id"]]["data"]["counts"], fov["fov_id"]
        assert fov["new"]["score"] == latest[fov["fov_id"]]["data"]["score"]
    assert comparison["case"]["new"]["score"] == stop["score"]
    assert comparison["case"]["new"]["counts"] == stop["counts"]
    assert not list(case_dir.glob("rescore-*"))
    table = invoke(str(case_dir))
    assert table.exit_code == 0 and "REPRODUCED" in table.stdout


def test_a_changed_weak_threshold_writes_a_labelled_result_beside_the_record(case_dir: Path) -> None:
    log_before = (case_dir / "events.jsonl").read_bytes()
    report_before = (case_dir / "report.html").read_bytes()
    result = invoke(str(case_dir), "--set", "scoring.weak_threshold_od=0.14", "--json")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert comparison["changed"] and comparison["changes"] == {"scoring.weak_threshold_od": [0.1, 0.14]}
    assert any(not fov["same"] for fov in comparison["fovs"]), "a higher weak threshold changes some counts"
    out = Path(comparison["output"])
    assert out.parent == case_dir and out.name.startswith("rescore-")
    assert (case_dir / "events.jsonl").read_bytes() == log_before  # the record is never modified
    assert (case_dir / "report.html").read_bytes() == report_before
    docs = read_docs(out)
    assert docs[0]["params_source"] == "rescore" and docs[0]["params"]["weak_threshold_od"] == 0.14
    assert docs[0]["rescore_of"] == read_docs(case_dir)[0]["uid"]
    assert docs[-1]["score"] == comparison["case"]["new"]["score"]
    new_counts = {d["fov_id"]: d["data"]["counts"] for d in docs if d["doc"] == "event"}
    assert new_counts == {f["fov_id"]: f["new"]["counts"] for f in comparison["fovs"]}
    report = (out / "report.html").read_text()
    assert "RE-SCORED OFFLINE" in report and "weak_threshold_od 0.1 → 0.14" in report
    assert json.loads((out / "rescore.json").read_text())["changes"] == comparison["changes"]
    assert all((out / "overlays" / f"{fov_id}.png").exists() for fov_id in new_counts)
    table = invoke(str(case_dir), "--set", "scoring.weak_threshold_od=0.14")
    assert table.exit_code == 0 and "changed" in table.stdout and "0.1 → 0.14" in table.stdout


def test_another_config_file_is_a_change_too(case_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text("[case_rule]\nmin_tumour_cells = 5000\n")
    result = invoke(str(case_dir), "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    comparison = json.loads(result.stdout)
    assert comparison["changes"]["case_rule.min_tumour_cells"] == [100, 5000]
    assert comparison["case"]["new"]["score"] is None  # too few cells for the stricter rule


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "not a folder"),
        (["{empty}"], "no events.jsonl"),
        (["{case}", "--set", "scoring.no_such=1"], "unknown parameter 'no_such'"),
        (["{case}", "--set", "weak_threshold_od=0.2"], "must start with 'scoring.' or 'case_rule.'"),
        (["{case}", "--set", "scoring.weak_threshold_od"], "expected KEY=VALUE"),
        (["{case}", "--set", "scoring.weak_threshold_od=abc"], "invalid value"),
        (["{case}", "--set", "scoring.weak_threshold_od=0.9"], "must be below default_intense_threshold_od"),
        (["{case}", "--config", "{missing}"], "cannot read"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(case_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    values = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "case": str(case_dir)}
    result = invoke(*(a.format(**values) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
