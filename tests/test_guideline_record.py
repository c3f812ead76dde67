"""A gastric biopsy case recorded by a real daemon and a real recorder: the report names its rule, and
``her2scope rescore`` re-scores it by that rule (unless told otherwise)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from her2scope.clients.cli import app
from tests.helpers.daemon import wait_for
from tests.helpers.recorder import Setup, capture, has_stop, read_docs, settled, start_daemon_setup, wait_for_docs

pytestmark = pytest.mark.e2e  # a case recorded by a real daemon and recorder

runner = CliRunner()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    setup: Setup = start_daemon_setup(tmp_path_factory.mktemp("guideline-record"))
    recorder = setup.recorder()
    try:
        daemon = setup.daemon
        daemon.control.call("start-case", case_id="gastric-biopsy", guideline="gastric", specimen="biopsy")
        wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="a live camera")
        capture(daemon, "control")
        capture(daemon, "field 1")
        settled(daemon)
        daemon.control.call("close-case")
        wait_for_docs(setup.out / "gastric-biopsy", has_stop, "the stop document")
    finally:
        assert recorder.stop() == 0
        setup.close()
    yield setup.out / "gastric-biopsy"


def rescore(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["rescore", *args, "--json"])
    assert result.exit_code == 0, result.output
    comparison: dict[str, Any] = json.loads(result.stdout)
    return comparison


def test_the_record_and_its_report_name_the_rule(case_dir: Path) -> None:
    docs = read_docs(case_dir)
    start, stop = docs[0], docs[-1]
    assert (start["rule"]["guideline"], start["rule"]["specimen"]) == ("gastric", "biopsy")
    assert stop["case_reason"].startswith("gastric (biopsy): ")
    events = [d for d in docs if d["doc"] == "event" and d["kind"] == "fov"]
    assert events and all(e["data"]["reason"].startswith("gastric (biopsy): ") for e in events)
    report = (case_dir / "report.html").read_text()
    assert "gastric, CAP/ASCP/ASCO 2016 gastroesophageal adenocarcinoma (biopsy: by cohesive clusters" in report
    assert "gastric (biopsy): " in report


def test_rescore_keeps_the_recorded_guideline(case_dir: Path, tmp_path: Path) -> None:
    comparison = rescore(str(case_dir))
    assert comparison["reproduced"] and not comparison["changed"]
    assert (comparison["case"]["new"]["guideline"], comparison["case"]["new"]["specimen"]) == ("gastric", "biopsy")
    # another configuration changes the parameters, not the case's guideline
    config = tmp_path / "other.toml"
    config.write_text('[case_rule]\nguideline = "breast"\nmin_tumour_cells = 90\n')
    other = rescore(str(case_dir), "--config", str(config))
    assert other["changes"] == {"case_rule.min_tumour_cells": [100, 90]}
    assert other["case"]["new"]["guideline"] == "gastric"
    table = runner.invoke(app, ["rescore", str(case_dir)])
    assert table.exit_code == 0 and "rule: gastric (biopsy): " in table.stdout


def test_rescore_can_apply_another_guideline(case_dir: Path) -> None:
    comparison = rescore(str(case_dir), "--guideline", "breast", "--specimen", "resection")
    assert comparison["changes"] == {
        "case_rule.guideline": ["gastric", "breast"],
        "case_rule.specimen": ["biopsy", "resection"],
    }
    new = comparison["case"]["new"]
    assert (new["guideline"], new["specimen"]) == ("breast", "resection")
    assert not new["reason"].startswith("gastric")
    out = Path(comparison["output"])
    assert read_docs(out)[0]["rule"]["guideline"] == "breast"
    bad = runner.invoke(app, ["rescore", str(case_dir), "--guideline", "lung"])
    assert bad.exit_code == 2 and "guideline" in bad.stderr
