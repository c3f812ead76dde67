"""Faults found by attacking a running daemon (and the CLI), each pinned by a test: bad input is refused with a
clear error, a client cannot make the daemon hold unbounded memory or drop replies, and a crash at the wrong moment
leaves a daemon that starts again.

The daemons are real processes on random loopback ports (tests/test_daemon_e2e.py); one serves the module, the
tests that need their own configuration or a prepared state folder start their own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from daemon.protocol import ProtocolError, Reply, parse_request, request_id
from tests.test_daemon_e2e import Daemon, running_daemon, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("faults")) as running:
        running.control.call("auto-capture", enabled=False)
        running.control.call("start-case", case_id="faults")
        wait_for(lambda: running.control.call("status")["camera"]["state"] == "live", what="the camera")
        running.control.call("capture")
        yield running


def _problems(daemon: Daemon) -> list[dict[str, object]]:
    """Log events that mean a request reached a bug: an internal error or a failed loop step."""
    names = {"control_request_failed", "loop_step_failed"}
    return [e for e in daemon.logs() if e.get("event") in names]


# --- the version --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_a_version_that_only_equals_1_is_refused(version: str) -> None:
    with pytest.raises(ProtocolError, match=r"v: .*the protocol version must be the integer 1"):
        parse_request(f'{{"v": {version}, "command": "status"}}'.encode())
    with pytest.raises(ValueError, match="the protocol version must be the integer 1"):
        Reply.model_validate_json(f'{{"v": {version}, "ok": true}}')
    assert parse_request(b'{"v": 1, "command": "status"}').v == 1


# --- D7: deep JSON ------------------------------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_deeply_nested_json_is_refused_not_an_internal_error(daemon: Daemon) -> None:
    assert request_id(DEEP) == ""
    reply, extra = daemon.control.request_raw(DEEP)
    assert not reply.ok and reply.error == "request is nested too deeply to be read" and extra == []
    nested = b'{"v": 1, "id": "deep", "command": "status", "args": {"x": ' + DEEP + b"}}"
    reply, _ = daemon.control.request_raw(nested)
    assert (reply.id, reply.ok, reply.error) == ("", False, "request is nested too deeply to be read")
    assert daemon.control.call("status")["daemon"] == "running"
    assert _problems(daemon) == []


def test_a_deeply_nested_roi_file_is_an_input_error(tmp_path: Path) -> None:
    roi = tmp_path / "roi.json"
    roi.write_bytes(DEEP)
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "score", str(ROOT / "samples" / "her2_0.jpg"), "--roi", str(roi)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {roi}: not a JSON ROI file (nested too deeply)\n"


# --- D2: polygons and request size --------------------------------------------------------------------------------


def _polygon(n: int) -> list[list[float]]:
    # a regular n-gon inside the 960x540 test FOV
    angles = [2 * math.pi * i / n for i in range(n)]
    return [[270.0 + 200.0 * math.sin(a), 480.0 + 200.0 * math.cos(a)] for a in angles]


def test_a_polygon_with_too_many_vertices_is_refused(daemon: Daemon) -> None:
    from clients.control import ControlError

    fov_id = daemon.control.call("snapshot")["case"]["fovs"][0]["fov_id"]
    with pytest.raises(ControlError, match="'polygon' has 10001 vertices; the limit is 10000"):
        daemon.control.call("set-roi", fov_id=fov_id, polygon=_polygon(10_001))
    with pytest.raises(ControlError, match="'polygon' has 10001 vertices; the limit is 10000"):
        daemon.control.call("set-weak", fov_id=fov_id, polygon=_polygon(10_001))
    adjustments = daemon.control.call("snapshot")["case"]["adjustments"]
    assert not any(a["action"] == "set-roi" for a in adjustments)  # refused: nothing changed
    assert daemon.control.call("set-roi", fov_id=fov_id, polygon=_polygon(10_000)) == {"fov_id": fov_id}
    daemon.control.call("set-roi", fov_id=fov_id, polygon=None)


def test_a_request_over_the_size_limit_is_refused_unread(daemon: Daemon) -> None:
    request = {"v": 1, "id": "big", "command": "set-roi", "args": {"fov_id": "fov-001", "polygon": _polygon(60_000)}}
    frame = json.dumps(request).encode()
    assert len(frame) > 1024 * 1024
    reply, _ = daemon.control.request_raw(frame)
    assert reply.id == "big" and not reply.ok
    assert reply.error == f"request too large: {len(frame)} bytes; the limit is 1048576 bytes"
    assert daemon.control.call("snapshot")["case"]["fovs"][0]["roi"] is False


# --- v, and the session's own helpers ------------------------------------------------------------------------------


def _raw_dealer(endpoint: str, **options: int) -> zmq.Socket[bytes]:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    socket.connect(endpoint)
    return socket


def _assert_running(daemon: Daemon) -> None:
    wait_for(lambda: daemon.control.call("status")["daemon"] == "running", what="the daemon to answer")
    assert daemon.process.poll() is None
    assert os.path.exists(daemon.state / "endpoints.json")
