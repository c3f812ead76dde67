"""End to end: the daemon as a real process on the simulated microscope, on random loopback ports.

One daemon runs for the whole module (starting takes a few seconds: the virtual slide and the worker process);
the tests talk to it over its real ZeroMQ sockets, in the order a pathologist would work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from her2scope.clients.control import ControlClient, ControlError
from her2scope.daemon.protocol import Topic
from tests.helpers.daemon import CONFIG, Daemon, arrive, next_message, running_daemon, wait_for

pytestmark = pytest.mark.e2e  # a real daemon process


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("daemon")) as running:
        yield running


def test_previews_and_heartbeats_are_published(daemon: Daemon) -> None:
    with daemon.subscribe(Topic.PREVIEW, Topic.STATUS) as subscriber:
        preview = next_message(subscriber, lambda m: m.header.topic == Topic.PREVIEW, "a preview")
        status = next_message(subscriber, lambda m: m.header.topic == Topic.STATUS, "a heartbeat")
    jpeg = preview.payload("preview")
    assert jpeg[:2] == b"\xff\xd8"  # a JPEG
    assert preview.body.width == 960  # type: ignore[attr-defined]
    assert status.body.camera["state"] == "live"  # type: ignore[attr-defined]
    assert status.header.seq > 0 and status.header.time_ms > 0


def test_a_field_where_the_stage_stops_is_captured_once_and_scored(daemon: Daemon) -> None:
    daemon.control.call("stage", action="goto-field", field=0)
    arrive(daemon, "field 0")  # settled (and captured) here: what follows is about the next field only
    with daemon.subscribe(Topic.CAPTURE, Topic.RESULT) as subscriber:
        daemon.control.call("stage", action="goto-field", field=1)
        capture = next_message(
            subscriber,
            lambda m: m.header.topic == Topic.CAPTURE and m.body.trigger == "auto",  # type: ignore[attr-defined]
            "an auto capture",
        )
        fov_id = capture.body.fov_id  # type: ignore[attr-defined]
        result = next_message(
            subscriber,
            lambda m: m.header.topic == Topic.RESULT and m.body.fov_id == fov_id,  # type: ignore[attr-defined]
            "its result",
        )
        assert result.body.status == "scored"  # type: ignore[attr-defined]
        counts = result.body.result.model_dump(mode="json")["counts"]  # type: ignore[attr-defined]
        assert sum(counts.values()) > 50
        assert result.body.case.case.n_fovs >= 1  # type: ignore[attr-defined]
        # the stage rests on this field: no second auto capture of it
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            message = subscriber.receive(timeout_ms=100)
            if message is not None and message.header.topic == Topic.CAPTURE:
                trigger = message.body.trigger  # type: ignore[attr-defined]
                assert trigger != "auto", "the same still field was auto-captured twice"
    stage = daemon.control.call("stage", action="status")["stage"]
    assert stage["target"] == "field 1" and stage["state"] == "held"


def test_capture_over_the_control_endpoint_and_control_calibration(daemon: Daemon) -> None:
    daemon.control.call("auto-capture", enabled=False)
    with daemon.subscribe(Topic.RESULT) as subscriber:
        daemon.control.call("stage", action="goto-control")
        arrive(daemon, "control")
        reply = daemon.control.call("capture-control")
        assert reply["kind"] == "control"
        control = next_message(
            subscriber,
            lambda m: m.body.fov_id == reply["fov_id"] and m.body.status == "scored",  # type: ignore[attr-defined]
            "the control's result",
        )
        calibration = control.body.calibration  # type: ignore[attr-defined]
        assert calibration is not None and calibration.qc_passed
        daemon.control.call("stage", action="goto-field", field=2)
        arrive(daemon, "field 2")
        fov = daemon.control.call("capture")
        result = next_message(
            subscriber,
            lambda m: m.body.fov_id == fov["fov_id"] and m.body.status == "scored",  # type: ignore[attr-defined]
            "the next FOV's result",
        )
    assert result.body.result.intense_threshold_source == "positive control"  # type: ignore[attr-defined]
    assert result.body.result.intense_threshold_od == pytest.approx(calibration.intense_threshold_od)  # type: ignore[attr-defined]
    assert result.body.case.control.fov_id == reply["fov_id"]  # type: ignore[attr-defined]
    daemon.control.call("auto-capture", enabled=True)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"command": "bogus"}', "command"),
        (b'{"command": "status", "extra": 1}', "extra"),
        (b'{"command": "exclude", "args": {}}', "fov_id"),
        (b'{"command": "exclude", "args": {"fov_id": "fov-999"}}', "no FOV"),
        (b'{"command": "set-roi", "args": {"fov_id": "fov-001", "polygon": [[1, 2]]}}', "polygon"),
        (b'{"command": "replay", "args": {"since_seq": -1}}', "since_seq"),
        (b'{"command": "stage", "args": {"action": "fly"}}', "unknown stage action"),
        (b"\xff\xfe\x00", "not JSON"),
        (b'{"command": "rescore", "args": {"fov": "fov-001"}}', "unknown argument(s) fov for rescore"),
        (b'{"command": "capture", "args": {"kind": "control"}}', "unknown argument"),
    ],
)
def test_malformed_requests_get_error_replies_and_change_nothing(daemon: Daemon, frame: bytes, message: str) -> None:
    before = daemon.control.call("snapshot")["case"]
    reply, extra = daemon.control.request_raw(frame)
    assert not reply.ok and reply.error is not None and message in reply.error
    assert extra == []
    after = daemon.control.call("snapshot")["case"]
    assert [f["fov_id"] for f in after["fovs"]] == [f["fov_id"] for f in before["fovs"]]
    assert daemon.process.poll() is None


def test_a_late_subscriber_gets_a_snapshot_and_the_missed_messages(daemon: Daemon) -> None:
    snapshot = daemon.control.call("snapshot")
    assert snapshot["case"]["case_id"] is not None and snapshot["last_seq"] > 0
    replay = daemon.control.replay(max(0, snapshot["last_seq"] - 20))
    messages, complete = replay.messages, replay.complete
    assert messages, "recent results and status messages are buffered"
    sequences = [m.header.seq for m in messages]
    assert sequences == sorted(sequences) and all(m.header.topic != Topic.PREVIEW for m in messages)
    assert isinstance(complete, bool)


def test_a_simulated_unplug_is_detected_and_recovered(daemon: Daemon) -> None:
    before = daemon.control.call("status")["camera"]["reconnects"]
    with daemon.subscribe(Topic.STATUS, Topic.PREVIEW) as subscriber:
        daemon.control.call("stage", action="unplug", duration_ms=1500)
        next_message(
            subscriber,
            lambda m: m.header.topic == Topic.STATUS and m.body.camera["state"] == "lost",  # type: ignore[attr-defined]
            "the camera reported lost",
        )
        next_message(
            subscriber,
            lambda m: m.header.topic == Topic.STATUS and m.body.camera["state"] == "live",  # type: ignore[attr-defined]
            "the camera live again",
        )
        next_message(subscriber, lambda m: m.header.topic == Topic.PREVIEW, "previews again")
    assert daemon.control.call("status")["camera"]["reconnects"] > before


def test_exclude_and_rescore_update_the_case(daemon: Daemon) -> None:
    case = daemon.control.call("snapshot")["case"]
    fov = next(f for f in case["fovs"] if f["kind"] == "fov" and f["status"] == "scored")
    with daemon.subscribe(Topic.RESULT) as subscriber:
        daemon.control.call("exclude", fov_id=fov["fov_id"])
        update = next_message(subscriber, lambda m: m.body.fov_id == fov["fov_id"], "the excluded FOV's update")  # type: ignore[attr-defined]
        entry = update.body.case.fov(fov["fov_id"])  # type: ignore[attr-defined]
        assert entry is not None and entry.excluded
        daemon.control.call("include", fov_id=fov["fov_id"])
        daemon.control.call("rescore", fov_id=fov["fov_id"])
        rescored = next_message(
            subscriber,
            lambda m: m.body.fov_id == fov["fov_id"] and m.body.latency_ms is not None,  # type: ignore[attr-defined]
            "the re-scored FOV",
        )
    assert rescored.body.result.model_dump(mode="json")["counts"] == fov["counts"]  # type: ignore[attr-defined]


def test_the_lossless_image_of_a_fov_can_be_fetched(daemon: Daemon) -> None:
    import cv2
    import numpy as np

    case = daemon.control.call("snapshot")["case"]
    fov = case["fovs"][0]
    frame = json.dumps({"command": "image", "args": {"fov_id": fov["fov_id"]}}).encode()
    reply, frames = daemon.control.request_raw(frame)
    assert reply.ok and reply.payload_count == 1 and reply.data["encoding"] == "png"
    image = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.shape == (540, 960, 3) and image.dtype == np.uint8
    on_disk = cv2.imread(str(daemon.state / "cases" / case["case_id"] / f"{fov['fov_id']}.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(image, on_disk)


def test_the_objective_can_be_switched_and_captures_carry_its_pixel_size(daemon: Daemon) -> None:
    status = daemon.control.call("status")
    assert (status["objective"], status["pixel_size_um"]) == ("20x", 0.5)
    with pytest.raises(ControlError, match="unknown objective '60x'; the configuration names: 20x, 40x"):
        daemon.control.call("set-objective", objective="60x")
    assert daemon.control.call("set-objective", objective="40x") == {"objective": "40x", "pixel_size_um": 0.25}
    try:
        with daemon.subscribe(Topic.CAPTURE) as subscriber:
            daemon.control.call("capture")
            capture = next_message(subscriber, lambda m: True, "the capture")
        assert capture.body.pixel_size_um == 0.25  # type: ignore[attr-defined]
        assert daemon.control.call("status")["objective"] == "40x"
    finally:
        daemon.control.call("set-objective", objective="20x")  # the simulated camera renders at 0.5 µm/px


def test_a_late_reply_is_never_taken_for_the_next_request(daemon: Daemon) -> None:
    # SIGSTOP the daemon so that a request times out; its reply arrives late, while the next request waits.
    client = ControlClient(daemon.endpoints["control"], timeout_ms=300)
    try:
        os.kill(daemon.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ControlError, match="did not answer"):
                client.call("snapshot")
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        status = client.call("status", timeout_ms=5000)  # the snapshot's late reply comes first and is dropped
        assert "camera" in status and "last_seq" not in status
    finally:
        client.close()


def test_sigterm_stops_cleanly_and_a_restart_resumes_the_case(daemon: Daemon, tmp_path: Path) -> None:
    snapshot = daemon.control.call("snapshot")
    case, session = snapshot["case"], snapshot["session"]
    assert daemon.stop() == 0
    events = [e.get("event") for e in daemon.logs()]
    assert "daemon_stopped" in events
    assert not any(e.get("level") == "error" and e.get("event") == "loop_step_failed" for e in daemon.logs())
    config = daemon.state.parent / "config.toml"
    restarted = Daemon(daemon.state, config, tmp_path / "restart.log")
    try:
        snapshot = restarted.control.call("snapshot")
        assert snapshot["session"] != session  # subscribers can tell the restart
        resumed = snapshot["case"]
        assert resumed["case_id"] == case["case_id"]
        assert [f["fov_id"] for f in resumed["fovs"]][: len(case["fovs"])] == [f["fov_id"] for f in case["fovs"]]
        assert resumed["control"] is not None
        messages = restarted.control.replay(0).messages  # what a recorder that was not listening at start-up fetches
        announced = [m for m in messages if m.header.topic == Topic.CASE]
        assert announced and announced[0].body.event == "resumed"  # type: ignore[attr-defined]
        assert announced[0].body.case.case_id == case["case_id"]  # type: ignore[attr-defined]
        assert announced[0].body.params["weak_threshold_od"] > 0  # type: ignore[attr-defined]
    finally:
        assert restarted.stop() == 0


def test_a_corrupt_saved_case_does_not_stop_the_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    case_dir = state / "cases" / "broken"
    case_dir.mkdir(parents=True)
    (case_dir / "case.json").write_text('{"case_id": "broken", "fovs": [tru')  # torn by a crash or a full disk
    (state / "current").write_text("broken")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(state=state))
    running = Daemon(state, config, tmp_path / "daemon.log")
    try:
        assert running.control.call("snapshot")["case"]["case_id"] is None  # nothing resumed, nothing lost
        assert (case_dir / "case.json").read_text().startswith('{"case_id": "broken"')  # left for a person to see
        failed = [e for e in running.logs() if e.get("event") == "case_resume_failed"]
        assert failed and "broken" in str(failed[0]["error"])
        assert running.control.call("start-case", case_id="next")["case_id"] == "next"
    finally:
        assert running.stop() == 0


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ('[daemon.camera]\nkind = "webcam"\n', "camera kind must be one of"),
        ("[daemon.zmq]\npublish = 'tcp://10.0.0.1:5560'\n", "not loopback"),
    ],
)
def test_bad_daemon_configurations_exit_with_a_clear_message(tmp_path: Path, config_text: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text + f'\n[daemon.state]\ndirectory = "{tmp_path / "state"}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "her2scope", "daemon", "--config", str(config), "--json-logs"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_camera_that_cannot_open_is_reported_and_retried_not_fatal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    missing = tmp_path / "no-such-folder"
    config.write_text(
        f'[daemon.camera]\nkind = "replay"\npath = "{missing}"\n'
        f"[daemon.watchdog]\nreopen_interval_ms = 200\n"
        f'[daemon.zmq]\npublish = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"\n'
        f'[daemon.state]\ndirectory = "{state}"\n'
    )
    running = Daemon(state, config, tmp_path / "daemon.log")
    try:
        camera = running.control.call("status")["camera"]
        assert camera["state"] in ("opening", "lost")
        wait_for(lambda: running.control.call("status")["camera"]["last_error"], what="the camera's error")
        assert str(missing) in running.control.call("status")["camera"]["last_error"]
        with pytest.raises(ControlError, match="no live frame to capture"):
            running.control.call("capture")
    finally:
        assert running.stop() == 0
