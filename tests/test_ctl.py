"""``her2scope ctl`` against a real daemon process: output and exit codes that scripts can use."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from her2scope.daemon.protocol import Topic
from tests.helpers.daemon import CONFIG, Daemon, next_message, wait_for

pytestmark = pytest.mark.e2e  # a real daemon process, and ctl as a subprocess


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("ctl")
    state = root / "state"
    config = root / "config.toml"
    config.write_text(CONFIG.format(state=state))
    running = Daemon(state, config, root / "daemon.log")
    running.control.call("auto-capture", enabled=False)  # captures come from the shell only
    wait_for(lambda: running.control.call("status")["camera"]["state"] == "live", what="a live camera")
    if running.control.call("status")["case_id"] is not None:
        running.control.call("close-case")  # an auto capture before auto-capture was switched off
    yield running
    if running.process.poll() is None:
        running.stop()


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    config = daemon.state.parent / "config.toml"
    return subprocess.run(
        [sys.executable, "-m", "her2scope", "ctl", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_status_reports_the_camera_and_the_case(daemon: Daemon) -> None:
    done = ctl(daemon, "status")
    assert done.returncode == 0, done.stderr
    assert "daemon running, camera live (simulated" in done.stdout


def test_a_case_is_started_captured_and_closed_from_the_shell(daemon: Daemon) -> None:
    started = ctl(daemon, "case", "start", "--case-id", "shell-case", "--operator", "dr-a")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "started case shell-case (breast, resection)"  # the configuration's rule
    captured = ctl(daemon, "capture")
    assert captured.returncode == 0 and captured.stdout.startswith("captured fov-001")
    control = ctl(daemon, "control", "--json")
    assert control.returncode == 0 and '"kind": "control"' in control.stdout
    closed = ctl(daemon, "case", "close")
    assert closed.returncode == 0, closed.stderr
    assert "closed case shell-case" in closed.stdout and "fov-001" in closed.stdout and "CASE HER2 IHC" in closed.stdout


def test_a_refused_command_exits_1_with_the_daemons_reason(daemon: Daemon) -> None:
    done = ctl(daemon, "case", "close")  # no case is open any more
    assert done.returncode == 1
    assert "refused close-case: no case is open" in done.stderr


def test_a_duplicate_case_id_is_refused(daemon: Daemon) -> None:
    assert ctl(daemon, "case", "start", "--case-id", "twice").returncode == 0
    done = ctl(daemon, "case", "start", "--case-id", "twice")
    assert done.returncode == 1 and "already exists" in done.stderr


def test_no_daemon_exits_3_and_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon.zmq]\ncontrol = "tcp://127.0.0.1:9"\n[daemon.state]\ndirectory = "{tmp_path}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "her2scope", "ctl", "status", "--config", str(config), "--timeout-ms", "300"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and "is the daemon running?" in done.stderr
    config.write_text("[daemon.zmq]\nheartbeat_ms = -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "her2scope", "ctl", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "daemon.zmq.heartbeat_ms = -1" in done.stderr


def test_closing_a_case_publishes_its_last_overlay_before_the_close(daemon: Daemon) -> None:
    wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="a live camera")
    daemon.control.call("start-case", case_id="closes-fast")
    with daemon.subscribe(Topic.OVERLAY, Topic.CASE) as subscriber:
        fov_id = daemon.control.call("capture")["fov_id"]
        daemon.control.call("close-case")  # at once: the FOV is still being scored
        seen: list[tuple[Topic, str]] = []
        while not any(topic == Topic.CASE for topic, _ in seen):
            message = next_message(subscriber, lambda m: True, "the overlay and the close")
            body = message.body
            seen.append((message.header.topic, body.event if message.header.topic == Topic.CASE else body.fov_id))  # type: ignore[attr-defined]
    assert (Topic.OVERLAY, fov_id) in seen
    assert seen.index((Topic.OVERLAY, fov_id)) < seen.index((Topic.CASE, "closed"))


def test_a_case_started_from_the_shell_with_the_gastric_biopsy_guideline(daemon: Daemon) -> None:
    started = ctl(
        daemon, "case", "start", "--case-id", "shell-gastric", "--guideline", "gastric", "--specimen", "biopsy"
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "started case shell-gastric (gastric, biopsy)"
    status = ctl(daemon, "status")
    assert "case shell-gastric, scored by the gastric guideline (biopsy)" in status.stdout
    refused = ctl(daemon, "case", "start", "--guideline", "lung")
    assert refused.returncode == 1
    assert "unknown guideline 'lung'; use one of: breast, gastric" in refused.stderr
    assert ctl(daemon, "case", "close").returncode == 0


@pytest.mark.parametrize(("command", "args"), [("nonsense", {}), ("status", {"v": object()})])
def test_a_request_the_protocol_refuses_is_never_sent(command: str, args: dict[str, Any]) -> None:
    """ControlClient.request builds the protocol's Request: an unknown command (or arguments that are not JSON)
    fails at once, without waiting for a daemon that would refuse it."""
    import time

    from her2scope.clients.control import ControlClient, ControlError

    with ControlClient("tcp://127.0.0.1:9", timeout_ms=60_000) as client:  # nothing listens: a send would hang
        start = time.monotonic()
        with pytest.raises(ControlError, match="not a request the daemon takes"):
            client.request(command, **args)
        assert time.monotonic() - start < 10.0  # refused before sending, not timed out
