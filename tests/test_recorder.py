"""The recorder against a real daemon process on the simulated microscope, itself a real process (killed, too).

One daemon runs for the module. Each test records its own case (case ids are unique per test); the FOVs are
captured over the control endpoint with auto-capture off, so that the test decides what is captured.
"""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from her2scope.clients.control import ControlError
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.recorder import (
    ROI,
    RecorderProcess,
    Setup,
    capture,
    events_of,
    has_events,
    has_stop,
    read_docs,
    settled,
    start_daemon_setup,
    wait_for_docs,
)

pytestmark = pytest.mark.e2e  # a real daemon and recorder processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    running = start_daemon_setup(tmp_path_factory.mktemp("recorder"))
    yield running
    running.close()


def daemon_image(daemon: Daemon, fov_id: str) -> bytes:
    frame = json.dumps({"command": "image", "args": {"fov_id": fov_id}}).encode()
    reply, frames = daemon.control.request_raw(frame)
    assert reply.ok, reply.error
    return frames[0]


def step_recorder_until(recorder: Any, predicate: Any, what: str) -> None:
    """Drive an in-process recorder until ``predicate()``."""
    deadline = time.monotonic() + 30
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        recorder.step(100)


def test_a_whole_case_is_recorded(setup: Setup) -> None:
    daemon = setup.daemon
    recorder = setup.recorder()
    try:
        daemon.control.call("start-case", case_id="rec-full", operator="Dr Test")
        case_dir = setup.out / "rec-full"
        wait_for_docs(case_dir, lambda docs: any(d["doc"] == "descriptor" for d in docs), "start and descriptor")
        control = capture(daemon, "control")
        settled(daemon)
        fovs = [capture(daemon, "field 0"), capture(daemon, "field 1")]
        settled(daemon)
        daemon.control.call("set-roi", fov_id=fovs[0], polygon=ROI)
        daemon.control.call("exclude", fov_id=fovs[1])
        snapshot = settled(daemon)
        wait_for(lambda: all((case_dir / "images" / f"{f}.png").exists() for f in [control, *fovs]), what="images")
        for fov_id in [control, *fovs]:  # lossless: byte for byte what the daemon serves
            assert (case_dir / "images" / f"{fov_id}.png").read_bytes() == daemon_image(daemon, fov_id)
        closed = daemon.control.call("close-case")["summary"]
        docs = wait_for_docs(case_dir, has_stop, "the stop document")
    finally:
        assert recorder.stop() == 0

    kinds = [d["doc"] for d in docs]
    assert kinds[0] == "start" and kinds[1] == "descriptor" and kinds[-1] == "stop"
    start, descriptor, stop = docs[0], docs[1], docs[-1]
    assert start["case_id"] == "rec-full" and start["operator"] == "Dr Test"
    assert start["params_source"] == "case message" and start["params"]["weak_threshold_od"] > 0
    assert start["rule"]["cutoff_percent"] == 10.0 and start["pixel_size_um"] == 0.5
    assert descriptor["run_start"] == start["uid"] and descriptor["data_keys"]["percentages"]["units"] == "%"
    events = [d for d in docs if d["doc"] == "event"]
    assert {e["fov_id"] for e in events} == {f["fov_id"] for f in snapshot["fovs"]}
    assert [e["seq_num"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["descriptor"] == descriptor["uid"] for e in events)
    latest = {e["fov_id"]: e for e in events}
    for entry in closed["fovs"]:
        assert latest[entry["fov_id"]]["data"]["counts"] == entry["counts"]
    assert latest[fovs[0]]["rescore"]  # scored again after set-roi
    assert latest[control]["data"]["calibration"]["qc_passed"]
    actions = [d for d in docs if d["doc"] == "action"]
    assert [(a["index"], a["action"]) for a in actions] == [(0, "set-roi"), (1, "exclude")]
    assert actions[0]["args"]["polygon"] == ROI
    assert stop["exit_status"] == "success", stop["reason"]
    assert stop["score"] == closed["case"]["score"] and stop["counts"] == closed["case"]["counts"]
    assert stop["status"] == closed["case"]["status"] and stop["excluded"] == [fovs[1]]
    assert stop["control_fov_id"] == control and stop["control_qc_passed"]

    for fov_id in [control, *fovs]:
        assert (case_dir / "overlays" / f"{fov_id}.png").stat().st_size > 1000
        assert {p.name for p in (case_dir / "overlays" / fov_id).iterdir()} >= {"cells.png", "panel.png"}
    report = (case_dir / "report.html").read_text()
    assert f"HER2 IHC {closed['case']['score']}" in report and "Final score" in report
    assert all(fov_id in report for fov_id in [control, *fovs])
    schema = json.loads((case_dir / "schema.json").read_text())
    assert {"start", "event", "stop"} <= {
        v["properties"]["doc"]["const"] for v in schema["$defs"].values() if "doc" in v.get("properties", {})
    }
    assert stat.S_IMODE(case_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in case_dir.rglob("*") if p.is_file())
    state = json.loads((case_dir / "recorder-state.json").read_text())
    assert state["closed"] and state["case_id"] == "rec-full"


def test_a_recorder_killed_mid_case_loses_nothing(setup: Setup) -> None:
    daemon = setup.daemon
    recorder = setup.recorder()
    case_dir = setup.out / "rec-kill"
    try:
        daemon.control.call("start-case", case_id="rec-kill")
        control = capture(daemon, "control")
        first = capture(daemon, "field 2")
        wait_for_docs(case_dir, has_events(control, first), "the first FOV's event")
        recorder.kill()
        later = [capture(daemon, "field 3"), capture(daemon, "field 0")]
        settled(daemon)
        recorder = setup.recorder()
        wait_for_docs(case_dir, has_events(*later), "the FOVs captured while the recorder was down")
        daemon.control.call("close-case")
        docs = wait_for_docs(case_dir, has_stop, "the stop document")
    finally:
        assert recorder.stop() == 0
    events = [d for d in docs if d["doc"] == "event"]
    fov_ids = [control, first, *later]
    assert sorted(e["fov_id"] for e in events) == sorted(fov_ids)  # each once: no FOV missing, none twice
    assert [e["seq_num"] for e in events] == list(range(1, len(events) + 1))
    assert sum(d["doc"] == "start" for d in docs) == 1 and sum(d["doc"] == "descriptor" for d in docs) == 1
    assert all((case_dir / "images" / f"{f}.png").stat().st_size > 1000 for f in fov_ids)
    assert docs[-1]["exit_status"] == "success", docs[-1]["reason"]
    assert any(e.get("event") == "recorder_sync" and e.get("since_seq", 0) > 0 for e in recorder.logs())


def test_a_torn_last_line_is_truncated_on_restart(setup: Setup) -> None:
    daemon = setup.daemon
    recorder = setup.recorder()
    case_dir = setup.out / "rec-torn"
    try:
        daemon.control.call("start-case", case_id="rec-torn")
        first = capture(daemon, "field 1")
        docs = wait_for_docs(case_dir, has_events(first), "the first event")
        recorder.kill()
        whole = (case_dir / "events.jsonl").read_bytes()
        torn = json.dumps(docs[-1]).encode()
        with open(case_dir / "events.jsonl", "ab") as handle:  # a crash in the middle of writing a line
            handle.write(torn[: len(torn) // 2])
        second = capture(daemon, "field 2")
        settled(daemon)
        recorder = setup.recorder()
        docs = wait_for_docs(case_dir, has_events(second), "the event after the restart")
        data = (case_dir / "events.jsonl").read_bytes()
        assert data.startswith(whole) and data.endswith(b"\n")
        daemon.control.call("close-case")
        docs = wait_for_docs(case_dir, has_stop, "the stop document")
    finally:
        assert recorder.stop() == 0
    from her2scope.clients.recorder import read_log

    parsed, end = read_log(case_dir / "events.jsonl")
    assert end == (case_dir / "events.jsonl").stat().st_size and len(parsed) == len(docs)
    assert sorted(d["fov_id"] for d in docs if d["doc"] == "event") == sorted([first, second])
    assert any(e.get("event") == "torn_line_truncated" for e in recorder.logs())


def test_a_full_disk_is_reported_and_corrupts_nothing(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    from her2scope.clients.recorder import folder as folder_module  # where bytes reach the disk

    daemon = setup.daemon
    out = setup.root / "disk-cases"
    recorder = setup.in_process_recorder(out)

    def step_until(predicate: Any, what: str) -> None:
        step_recorder_until(recorder, predicate, what)

    try:
        daemon.control.call("start-case", case_id="rec-disk")
        case_dir = out / "rec-disk"
        step_until(lambda: any(d["doc"] == "descriptor" for d in read_docs(case_dir)), "the start")
        before = (case_dir / "events.jsonl").read_bytes()
        real_write = folder_module._write_fully

        def full_disk(fd: int, data: bytes) -> None:
            real_write(fd, data[: len(data) // 2])  # part of it fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(folder_module, "_write_fully", full_disk)
        with capture_logs() as logs:
            fov_id = capture(daemon, "field 3")
            step_until(
                lambda: recorder.folders["rec-disk"].pending > 0 and recorder.folders["rec-disk"].has_event(fov_id),
                "the FOV's result (held in memory)",
            )
            recorder.step(100)
        assert any(entry["event"] == "disk_full" and entry["log_level"] == "error" for entry in logs)
        assert (case_dir / "events.jsonl").read_bytes() == before  # no partial line, nothing torn
        assert not (case_dir / "images" / f"{fov_id}.png").exists()
        assert not list(case_dir.glob("**/.*.tmp"))  # no half-written temporary files left taking space
        monkeypatch.setattr(folder_module, "_write_fully", real_write)  # space is back
        step_until(lambda: any(e["fov_id"] == fov_id for e in events_of(case_dir)), "the retried write")
        step_until(lambda: recorder.folders["rec-disk"].pending == 0, "every queued write")
        assert (case_dir / "images" / f"{fov_id}.png").read_bytes() == daemon_image(daemon, fov_id)
        assert read_docs(case_dir)[0]["doc"] == "start"
        daemon.control.call("close-case")
        step_until(lambda: has_stop(read_docs(case_dir)), "the stop")
    finally:
        recorder.close()
        with contextlib.suppress(ControlError):
            daemon.control.call("close-case")


# resynchronisation: the daemon appears late, restarts, or falls silent

SILENCE_S = 2.0  # the recorder's silence limit: max(3 heartbeats, 2 s), heartbeat_ms = 300 in CONFIG


def wait_for_log(recorder: RecorderProcess, predicate: Any, what: str) -> list[dict[str, Any]]:
    """Poll the recorder's JSON log until ``predicate(entries)``; fail if the recorder exits meanwhile."""

    def ready() -> list[dict[str, Any]] | None:
        assert recorder.process.poll() is None, f"the recorder exited ({recorder.process.returncode}) before {what}"
        entries = recorder.logs()
        return entries if predicate(entries) else None

    return wait_for(ready, what=what)  # type: ignore[return-value]


def logged(name: str, **fields: Any) -> Any:
    return lambda entries: any(e.get("event") == name and fields.items() <= e.items() for e in entries)


def assert_each_message_once(events: list[dict[str, Any]], fov_ids: list[str]) -> None:
    """Every FOV has exactly one event (none was rescored) and no daemon message has two."""
    assert sorted(e["fov_id"] for e in events) == sorted(fov_ids)
    sources = [(e["daemon_session"], e["daemon_seq"]) for e in events if e["daemon_seq"] is not None]
    assert len(sources) == len(set(sources))
    assert [e["seq_num"] for e in events] == list(range(1, len(events) + 1))


def test_a_recorder_started_before_the_daemon_waits_for_it(own_setup: Setup) -> None:
    recorder = own_setup.recorder()
    wait_for_log(recorder, logged("daemon_not_found"), "the recorder to look for the daemon in vain")
    daemon = own_setup.start_daemon()
    wait_for_log(recorder, logged("recorder_connected", control=daemon.endpoints["control"]), "the connection")
    case_dir = own_setup.out / "rec-late"
    daemon.control.call("start-case", case_id="rec-late")
    fov = capture(daemon, "field 1")
    wait_for_docs(case_dir, has_events(fov), "the FOV's event")
    daemon.control.call("close-case")
    docs = wait_for_docs(case_dir, has_stop, "the stop document")
    assert recorder.process.poll() is None
    assert recorder.stop() == 0
    assert [d["doc"] for d in docs] == ["start", "descriptor", "event", "stop"]
    assert docs[0]["params_source"] == "case message" and docs[-1]["exit_status"] == "success", docs[-1]["reason"]
    assert (case_dir / "images" / f"{fov}.png").read_bytes() == (
        daemon.state / "cases" / "rec-late" / f"{fov}.png"
    ).read_bytes()


def test_a_daemon_restart_mid_case_loses_and_repeats_nothing(own_setup: Setup) -> None:
    recorder = own_setup.recorder()
    daemon = own_setup.start_daemon()
    wait_for_log(recorder, logged("recorder_sync"), "the recorder to follow the daemon")
    case_dir = own_setup.out / "rec-restart"
    daemon.control.call("start-case", case_id="rec-restart")
    before = [capture(daemon, "control"), capture(daemon, "field 0")]
    settled(daemon)  # nothing left for the restarted daemon to score again
    wait_for_docs(case_dir, has_events(*before), "the events before the restart")
    old_session, old_endpoints = daemon.control.call("snapshot")["session"], daemon.endpoints
    n_before = len(recorder.logs())
    assert daemon.stop() == 0
    entries = wait_for_log(  # silence, then endpoints.json names a dead pid: the recorder retries, it does not exit
        recorder,
        lambda es: any(e.get("event") == "daemon_not_found" for e in es[n_before:]),
        "the recorder to notice the daemon is gone",
    )
    names = [e.get("event") for e in entries[n_before:]]
    assert "daemon_silent" in names[: names.index("daemon_not_found")]
    daemon = own_setup.start_daemon()  # resumes the case, on new random ports written to endpoints.json
    session = daemon.control.call("snapshot")["session"]
    assert session != old_session and daemon.control.call("snapshot")["case"]["case_id"] == "rec-restart"
    assert daemon.endpoints["control"] != old_endpoints["control"]
    wait_for_log(recorder, logged("recorder_sync", session=session), "the recorder to follow the new daemon")
    after = [capture(daemon, "field 2"), capture(daemon, "field 3")]
    settled(daemon)
    wait_for_docs(case_dir, has_events(*after), "the events after the restart")
    closed = daemon.control.call("close-case")["summary"]
    docs = wait_for_docs(case_dir, has_stop, "the stop document")
    assert recorder.process.poll() is None  # a daemon restart never ends the recorder
    assert recorder.stop() == 0

    fov_ids = [*before, *after]
    events = [d for d in docs if d["doc"] == "event"]
    assert_each_message_once(events, fov_ids)
    assert {e["daemon_session"] for e in events if e["fov_id"] in after} == {session}
    assert [d["doc"] for d in docs].count("start") == 1 and [d["doc"] for d in docs].count("descriptor") == 1
    assert docs[-1]["doc"] == "stop" and docs[-1]["exit_status"] == "success", docs[-1]["reason"]
    assert docs[-1]["score"] == closed["case"]["score"] and docs[-1]["control_fov_id"] == before[0]
    for fov_id in fov_ids:
        stored = own_setup.state / "cases" / "rec-restart" / f"{fov_id}.png"
        assert (case_dir / "images" / f"{fov_id}.png").read_bytes() == stored.read_bytes()
    connected = [e["control"] for e in recorder.logs() if e.get("event") == "recorder_connected"]
    assert connected[0] == old_endpoints["control"] and connected[-1] == daemon.endpoints["control"]


def test_a_silent_daemon_is_resynchronised_without_duplicates(setup: Setup) -> None:
    daemon = setup.daemon
    recorder = setup.recorder()
    case_dir = setup.out / "rec-silent"
    try:
        daemon.control.call("start-case", case_id="rec-silent")
        first = capture(daemon, "field 1")
        settled(daemon)
        wait_for_docs(case_dir, has_events(first), "the first event")
        session = daemon.control.call("snapshot")["session"]
        wait_for_log(recorder, logged("recorder_sync", why="start"), "the first sync")
        daemon.process.send_signal(signal.SIGSTOP)  # alive (its pid and ports stay), but it says nothing
        try:
            entries = wait_for_log(recorder, logged("daemon_silent"), "the recorder to notice the silence")
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        silent = next(e for e in entries if e.get("event") == "daemon_silent")
        # counted from the last heartbeat heard, up to a heartbeat before the stop (not from the stop: that would race)
        assert silent["silent_ms"] >= SILENCE_S * 1000
        n_silent = len(entries)
        resynced = wait_for_log(
            recorder,
            lambda es: any(e.get("event") == "recorder_sync" for e in es[n_silent:]),
            "the resync after the silence",
        )
        sync = next(e for e in resynced[n_silent:] if e.get("event") == "recorder_sync")
        assert sync["session"] == session and sync["since_seq"] > 0  # same session: replay from where it was
        second = capture(daemon, "field 2")
        settled(daemon)
        wait_for_docs(case_dir, has_events(second), "the event after the silence")
        daemon.control.call("close-case")
        docs = wait_for_docs(case_dir, has_stop, "the stop document")
        assert recorder.process.poll() is None
    finally:
        assert recorder.stop() == 0
        with contextlib.suppress(ControlError):
            daemon.control.call("close-case")
    events = [d for d in docs if d["doc"] == "event"]
    assert_each_message_once(events, [first, second])
    assert {e["daemon_session"] for e in events} == {session}
    assert docs[-1]["exit_status"] == "success", docs[-1]["reason"]
    assert not any(e.get("event") == "daemon_restarted" for e in recorder.logs())


def test_a_case_started_between_the_snapshot_and_the_replay_is_followed(setup: Setup) -> None:
    """The sync's snapshot predates its replay: a case the replay starts is not "no longer open" (was aborted)."""
    daemon = setup.daemon
    out = setup.root / "race-cases"
    recorder = setup.in_process_recorder(out)
    real_replay = recorder.follower.replay
    started: list[dict[str, Any]] = []

    def start_case_then_replay(since: int) -> Any:  # the pathologist starts a case while the recorder syncs
        if not started:
            started.append(daemon.control.call("start-case", case_id="rec-race"))
        return real_replay(since)

    recorder.follower.replay = start_case_then_replay  # type: ignore[method-assign,assignment]
    case_dir = out / "rec-race"
    try:
        assert daemon.control.call("snapshot")["case"]["case_id"] is None
        step_recorder_until(recorder, lambda: recorder.state == "following", "the first sync")
        assert started and not has_stop(read_docs(case_dir))
        fov = capture(daemon, "field 0")
        step_recorder_until(recorder, lambda: has_events(fov)(read_docs(case_dir)), "the FOV's event")
        daemon.control.call("close-case")
        step_recorder_until(recorder, lambda: has_stop(read_docs(case_dir)), "the stop")
    finally:
        recorder.close()
        with contextlib.suppress(ControlError):
            daemon.control.call("close-case")
    docs = read_docs(case_dir)
    assert [d["doc"] for d in docs] == ["start", "descriptor", "event", "stop"]
    assert docs[-1]["exit_status"] == "success", docs[-1]["reason"]


def test_a_late_image_reply_is_never_taken_for_the_next_image(setup: Setup) -> None:
    """An image request that timed out (the daemon stalled) gets its reply later: the next request must not take it.

    The control socket is a DEALER: replies are not matched to requests, so after a timeout the socket is replaced.
    """
    daemon = setup.daemon
    out = setup.root / "stall-cases"
    # no daemon state folder: images come over the control endpoint only
    recorder = setup.in_process_recorder(out, with_daemon_state=False, timeout_ms=300)
    case_dir = out / "rec-stall"
    try:
        daemon.control.call("start-case", case_id="rec-stall")
        fovs = [capture(daemon, "field 1"), capture(daemon, "field 2")]
        settled(daemon)
        step_recorder_until(recorder, lambda: has_events(*fovs)(read_docs(case_dir)), "both events")
        folder = recorder.folders["rec-stall"]
        for fov_id in fovs:
            (case_dir / "images" / f"{fov_id}.png").unlink()
        daemon.process.send_signal(signal.SIGSTOP)
        try:
            recorder._fetch_image(folder, fovs[0])  # times out: the daemon answers once it runs again
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        assert not (case_dir / "images" / f"{fovs[0]}.png").exists()
        wait_for(lambda: daemon.control.call("status"), what="the daemon to answer again (the late reply is sent)")
        recorder._fetch_image(folder, fovs[1])
        assert (case_dir / "images" / f"{fovs[1]}.png").read_bytes() == daemon_image(daemon, fovs[1])
    finally:
        recorder.close()
        with contextlib.suppress(ControlError):
            daemon.control.call("close-case")
