"""A case's guideline over the real control socket: start-case chooses it, status and the case topic report it,
results are called by it, and a restarted daemon resumes the case with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from her2scope.clients.control import ControlError
from her2scope.daemon.protocol import Topic
from tests.helpers.daemon import Daemon, next_message, running_daemon, wait_for

pytestmark = pytest.mark.e2e  # a real daemon process


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path) as running:
        running.control.call("auto-capture", enabled=False)  # captures come from the test only
        yield running


def test_a_gastric_biopsy_case_is_reported_scored_and_resumed_with_its_guideline(
    daemon: Daemon, tmp_path: Path
) -> None:
    with pytest.raises(ControlError, match="unknown specimen 'cytology'; use one of: resection, biopsy"):
        daemon.control.call("start-case", case_id="bad", specimen="cytology")
    with daemon.subscribe(Topic.CASE, Topic.STATUS, Topic.RESULT) as subscriber:
        reply = daemon.control.call("start-case", case_id="gastric-1", guideline="gastric", specimen="biopsy")
        assert reply == {"case_id": "gastric-1", "guideline": "gastric", "specimen": "biopsy"}
        started = next_message(
            subscriber,
            lambda m: m.header.topic == Topic.CASE and m.body.event == "started",  # type: ignore[attr-defined]
            "the case started",
        )
        assert started.body.rule["guideline"] == "gastric"  # type: ignore[attr-defined]
        assert started.body.rule["specimen"] == "biopsy"  # type: ignore[attr-defined]
        assert started.body.case.guideline == "gastric"  # type: ignore[attr-defined]
        heartbeat = next_message(
            subscriber,
            lambda m: m.header.topic == Topic.STATUS and m.body.case_id == "gastric-1",  # type: ignore[attr-defined]
            "a heartbeat of the case",
        )
        assert (heartbeat.body.guideline, heartbeat.body.specimen) == ("gastric", "biopsy")  # type: ignore[attr-defined]
        wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="a live camera")
        fov_id = daemon.control.call("capture")["fov_id"]
        result = next_message(
            subscriber,
            lambda m: (
                m.header.topic == Topic.RESULT
                and m.body.fov_id == fov_id  # type: ignore[attr-defined]
                and m.body.status == "scored"  # type: ignore[attr-defined]
            ),
            "the FOV's result",
        )
    call = result.body.result.model_dump(mode="json")["call"]  # type: ignore[attr-defined]
    assert (call["guideline"], call["specimen"]) == ("gastric", "biopsy")
    assert call["reason"].startswith("gastric (biopsy): ")
    assert set(result.body.result.model_dump(mode="json")["clusters"]) == {"0", "1+", "2+", "3+"}  # type: ignore[attr-defined]
    case = result.body.case.case.model_dump(mode="json")  # type: ignore[attr-defined]
    assert case["guideline"] == "gastric" and case["reason"].startswith("gastric (biopsy): ")
    status = daemon.control.call("status")
    assert (status["guideline"], status["specimen"]) == ("gastric", "biopsy")

    assert daemon.stop() == 0
    restarted = Daemon(daemon.state, daemon.state.parent / "config.toml", tmp_path / "restart.log")
    try:
        snapshot = restarted.control.call("snapshot")
        assert snapshot["case"]["case_id"] == "gastric-1"
        assert (snapshot["case"]["guideline"], snapshot["case"]["specimen"]) == ("gastric", "biopsy")
        assert snapshot["status"]["guideline"] == "gastric"
        messages = restarted.control.replay(0).messages
        resumed = [m for m in messages if m.header.topic == Topic.CASE]
        assert resumed and resumed[0].body.event == "resumed"  # type: ignore[attr-defined]
        assert resumed[0].body.rule["guideline"] == "gastric"  # type: ignore[attr-defined]
        # a case started without a guideline takes the configuration's (breast here)
        assert restarted.control.call("start-case", case_id="default-1")["guideline"] == "breast"
        assert restarted.control.call("status")["specimen"] == "resection"
        # stopped while its camera still opens, a daemon aborts at exit ("terminate called without an active
        # exception"): a problem of its own, not of guidelines
        wait_for(lambda: restarted.control.call("status")["camera"]["state"] == "live", what="a live camera")
    finally:
        assert restarted.stop() == 0


def test_an_old_saved_case_without_a_guideline_resumes_with_the_configurations(tmp_path: Path) -> None:
    from her2scope.config.scoring import CaseRule, Guideline, ScoringParams, Specimen
    from her2scope.daemon.case_store import CaseStore

    store = CaseStore(tmp_path)
    store.start(ScoringParams(), CaseRule(), case_id="old-case")
    store.shutdown()
    path = tmp_path / "cases" / "old-case" / "case.json"
    document = json.loads(path.read_text())
    for key in ("guideline", "specimen", "cluster_min_cells", "cohesion_distance_um"):
        del document["rule"][key]  # as saved before these fields existed
    document["rule"]["min_tumour_cells"] = 50  # a saved setting still wins over the configuration
    path.write_text(json.dumps(document))

    configured = CaseRule(guideline=Guideline.GASTRIC, specimen=Specimen.BIOPSY, min_tumour_cells=200)
    resumed = CaseStore(tmp_path)
    try:
        case = resumed.resume(default_rule=configured)
        assert case is not None
        assert (case.rule.guideline, case.rule.specimen) == (Guideline.GASTRIC, Specimen.BIOPSY)
        assert case.rule.min_tumour_cells == 50
        assert resumed.summary().guideline == "gastric"
    finally:
        resumed.shutdown()
    plain = CaseStore(tmp_path)
    try:
        case = plain.resume()  # no configuration given: the model's default, breast
        assert case is not None and case.rule.guideline == Guideline.BREAST
    finally:
        plain.shutdown()
