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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from her2scope.clients.control import ControlClient, ControlError
from her2scope.daemon.protocol import Command, ProtocolError, Reply, Request, parse_request, request_id
from tests.helpers.daemon import CONFIG, Daemon, running_daemon, wait_for

pytestmark = pytest.mark.e2e  # most start the daemon or the command line as processes (three in-process checks too)

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
        [sys.executable, "-m", "her2scope", "score", str(ROOT / "samples" / "her2_0.jpg"), "--roi", str(roi)],
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
    from her2scope.clients.control import ControlError

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


# --- v, and the session's own helpers -----------------------------------------------------------------------------


def _raw_dealer(endpoint: str, **options: int) -> zmq.Socket[bytes]:
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    socket.connect(endpoint)
    return socket


def _assert_running(daemon: Daemon) -> None:
    wait_for(lambda: daemon.control.call("status")["daemon"] == "running", what="the daemon to answer")
    assert daemon.process.poll() is None
    assert os.path.exists(daemon.state / "endpoints.json")


# --- D1: a daemon killed between case.json and the image starts again ---------------------------------------------


def _crashed_case(state: Path) -> None:
    """The state folder of a daemon killed right after captures: case.json names three pending FOVs; the image of
    fov-001 never reached the disk, fov-003's is torn, fov-002's is whole."""
    import numpy as np

    from her2scope.config.scoring import CaseRule, ScoringParams
    from her2scope.daemon.case_store import CaseStore

    store = CaseStore(state)
    store.start(ScoringParams(), CaseRule(), case_id="crashed")
    image = np.random.default_rng(0).integers(0, 255, (540, 960, 3), dtype=np.uint8)
    for _ in range(3):
        store.add_capture("fov", image, "control", 0.5)
    assert store.shutdown(timeout_s=30)
    folder = state / "cases" / "crashed"
    (folder / "fov-001.png").unlink()
    torn = (folder / "fov-003.png").read_bytes()
    (folder / "fov-003.png").write_bytes(torn[: len(torn) // 2])


def test_a_fov_without_its_image_fails_and_the_daemon_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    _crashed_case(tmp_path / "state")
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(30.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
        with running_daemon(tmp_path) as daemon:
            assert listener.recv(4096).startswith(b"READY=1")
            _assert_running(daemon)
            fovs = {f["fov_id"]: f for f in daemon.control.call("snapshot")["case"]["fovs"]}
            assert fovs["fov-001"]["status"] == "failed"
            assert "image fov-001.png was not saved" in fovs["fov-001"]["error"]
            assert fovs["fov-003"]["status"] == "failed"
            wait_for(
                lambda: daemon.control.call("snapshot")["case"]["fovs"][1]["status"] == "scored",
                what="fov-002, whose image is whole, to be scored",
            )
            events = [e.get("event") for e in daemon.logs()]
            assert events.count("fov_lost_at_restart") == 2
            assert events.index("fov_lost_at_restart") < events.index("daemon_ready")
            assert _problems(daemon) == []
            with pytest.raises(Exception, match="cannot be read"):
                daemon.control.call("rescore", fov_id="fov-001")  # nothing to score: capture it again
        # repaired on disk: the next start does not find the same FOVs lost again
        with running_daemon(tmp_path) as again:
            assert "fov_lost_at_restart" not in [e.get("event") for e in again.logs()]
            assert again.control.call("snapshot")["case"]["fovs"][0]["status"] == "failed"


def test_a_case_that_cannot_be_read_is_set_aside_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "cases" / "broken").mkdir(parents=True)
    (state / "cases" / "broken" / "case.json").write_bytes(b'{"case_id": "broken", "fovs": ' + DEEP + b"}")
    (state / "current").write_text("broken")
    with running_daemon(tmp_path) as daemon:
        _assert_running(daemon)
        failed = [e for e in daemon.logs() if e.get("event") == "case_resume_failed"]
        assert len(failed) == 1 and failed[0]["set_aside"] == str(state / "current.set-aside")
        assert (state / "cases" / "broken" / "case.json").exists()  # left for a person to look at
    with running_daemon(tmp_path) as daemon:  # set aside: not tried (nor logged) again
        assert not [e for e in daemon.logs() if e.get("event") == "case_resume_failed"]
        assert daemon.control.call("snapshot")["case"]["case_id"] is None


# --- the audit trail ----------------------------------------------------------------------------------------------


def test_the_audit_trail_is_bounded(tmp_path: Path) -> None:
    import numpy as np

    from her2scope.config.scoring import CaseRule, ScoringParams
    from her2scope.daemon.case_store import CaseError, CaseStore

    store = CaseStore(tmp_path, max_audit_entries=4)
    store.start(ScoringParams(), CaseRule(), case_id="audited")
    store.add_capture("fov", np.zeros((60, 80, 3), np.uint8), "control", 0.5)
    for excluded in (True, False, True, False):
        store.set_excluded("fov-001", excluded)
    with pytest.raises(CaseError, match=r"audit trail of case 'audited' is full \(4 adjustments\)"):
        store.set_excluded("fov-001", True)
    with pytest.raises(CaseError, match="is full"):
        store.set_roi("fov-001", ((0.0, 0.0), (0.0, 10.0), (10.0, 10.0)))
    on_disk = json.loads((tmp_path / "cases" / "audited" / "case.json").read_text())
    assert len(on_disk["adjustments"]) == 4
    assert on_disk["fovs"][0]["excluded"] is False and on_disk["fovs"][0]["roi"] is None  # refused: unchanged
    assert store.shutdown()


# --- file modes ---------------------------------------------------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    import stat

    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _private(modes: dict[str, int], root: Path) -> dict[str, str]:
    """The paths under ``root`` whose mode is not 0700 (folders) or 0600 (files), with their modes."""
    return {name: oct(mode) for name, mode in modes.items() if mode != (0o700 if (root / name).is_dir() else 0o600)}


def test_daemon_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    from tests.helpers.processes import die_with_parent

    def open_umask() -> None:
        os.umask(0)
        die_with_parent()

    with running_daemon(tmp_path, preexec_fn=open_umask) as daemon:
        daemon.control.call("auto-capture", enabled=False)
        wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="the camera")
        fov_id = daemon.control.call("capture")["fov_id"]
        wait_for(lambda: list((daemon.state / "cases").glob(f"*/{fov_id}.result.json")), what="its result file")
        wait_for(lambda: daemon.control.call("status")["unsaved_images"] == 0, what="the image on disk")
        modes = _modes(daemon.state)
    assert len(modes) >= 7  # state, endpoints, current, cases, the case, case.json, the image and result
    assert _private(modes, daemon.state) == {}


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_recorder_files_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    from her2scope.clients.recorder.documents import DescriptorDoc
    from her2scope.clients.recorder.folder import CaseFolder

    previous = os.umask(umask)
    try:
        folder = CaseFolder(tmp_path / "case-1")
        folder.append(DescriptorDoc(uid="d-1", time=0.0, run_start="s-1", data_keys={}))
        folder.write_file("overlays/fov-001/cells.png", b"png")
        assert folder.pending == 0
    finally:
        os.umask(previous)
    modes = _modes(tmp_path / "case-1")
    assert {"events.jsonl", "schema.json", "overlays/fov-001/cells.png"} <= set(modes)
    assert _private(modes, tmp_path / "case-1") == {}


# --- D3, D8: a client that does not read its replies -------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _unread_then_read(daemon: Daemon, command: str, args: dict[str, object], n: int) -> tuple[dict[str, int], int]:
    """Send ``n`` requests from a DEALER that reads nothing (its receive queue holds one message) until the daemon
    says it holds replies back, then read them all: the replies per request id, and the daemon's RSS growth (MiB)
    while they were unread."""
    baseline = _rss_mib(daemon.process.pid)
    socket = _raw_dealer(daemon.endpoints["control"], RCVHWM=1, RCVBUF=4096)
    try:
        for i in range(n):
            socket.send_multipart([b"", json.dumps({"id": f"r{i}", "command": command, "args": args}).encode()])
        wait_for(
            lambda: any(e.get("event") == "client_not_reading" for e in daemon.logs()),
            what="the daemon to hold replies back",
        )
        growth = round(_rss_mib(daemon.process.pid) - baseline)
        replies: dict[str, int] = {}
        errors: set[str] = set()
        while sum(replies.values()) < n:
            assert socket.poll(30_000), f"only {sum(replies.values())} of {n} replies came"
            reply = Reply.model_validate_json(socket.recv_multipart()[1])
            replies[reply.id] = replies.get(reply.id, 0) + 1
            if not reply.ok:
                errors.add(reply.error or "")
        assert not socket.poll(500), "a reply too many"
    finally:
        socket.close(linger=0)
    assert errors <= {"busy: 16 replies to this client are unread; read them before sending more requests"}
    return replies, growth


def test_unread_image_replies_do_not_pile_up(daemon: Daemon) -> None:
    fov_id = daemon.control.call("snapshot")["case"]["fovs"][0]["fov_id"]
    png = len(daemon.control.request_raw(json.dumps({"command": "image", "args": {"fov_id": fov_id}}).encode())[1][0])
    n = 300
    replies, growth = _unread_then_read(daemon, "image", {"fov_id": fov_id}, n)
    assert replies == {f"r{i}": 1 for i in range(n)}
    # 300 unread PNGs would be 300 x png bytes; at most the 16 the client may leave unread (and socket buffers) are
    assert growth < 16 * png / 2**20 + 48, f"RSS grew {growth} MiB with {n} image replies of {png} bytes unread"


def test_every_request_of_a_flood_gets_exactly_one_reply(daemon: Daemon) -> None:
    n = 20_000  # 20,000 unread status replies: 15,000 of them were dropped silently
    replies, _ = _unread_then_read(daemon, "status", {}, n)
    assert replies == {f"r{i}": 1 for i in range(n)}
    assert _problems(daemon) == []


# --- D9: image files -----------------------------------------------------------------------------------------------


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small PNG file whose header declares ``width`` x ``height`` RGB pixels (its data holds a few rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" + b"\xf0" * 3 * width * 8)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def _score(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "her2scope", "score", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_an_image_over_the_pixel_limit_is_refused_undecoded(tmp_path: Path) -> None:
    huge = _png_declaring(tmp_path / "huge.png", 30_000, 30_000)
    done = _score(huge, "--pixel-size", "0.25")
    assert done.returncode == 2
    assert done.stderr == f"error: {huge}: 900 megapixels; the limit is 100 (limits.max_image_megapixels)\n"


def test_a_truncated_png_is_one_error_line(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    image = np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    whole = cv2.imencode(".png", image)[1].tobytes()
    torn = tmp_path / "torn.png"
    torn.write_bytes(whole[: len(whole) // 2])
    done = _score(torn, "--pixel-size", "0.25")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {torn}: not a readable image (corrupt, truncated or an unsupported format)"
    ]


# --- D6: images waiting for disk space at shutdown --------------------------------------------------------------------


def test_sigterm_waits_for_an_image_that_waits_for_space(tmp_path: Path) -> None:
    import resource
    import signal

    from tests.helpers.processes import die_with_parent

    limit = 500_000  # bytes per file: case.json, a result and the log fit, a captured image (~1 MB) does not

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        die_with_parent()

    with running_daemon(tmp_path, preexec_fn=small_disk) as daemon:
        daemon.control.call("auto-capture", enabled=False)
        wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="the camera")
        fov_id = daemon.control.call("capture")["fov_id"]
        wait_for(lambda: any(e.get("event") == "image_not_saved" for e in daemon.logs()), what="the full disk")
        daemon.control.close()
        daemon.process.send_signal(signal.SIGTERM)
        wait_for(lambda: any(e.get("event") == "waiting_for_disk_space" for e in daemon.logs()), what="the wait")
        assert daemon.process.poll() is None  # still waiting for space, as the docs promise (up to 30 s)
        resource.prlimit(daemon.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert daemon.process.wait(timeout=30) == 0
        events = [e.get("event") for e in daemon.logs()]
    assert "images_not_saved_at_exit" not in events
    png = next((daemon.state / "cases").glob(f"*/{fov_id}.png"))
    assert png.stat().st_size > limit


# --- D4: re-scoring a whole case ----------------------------------------------------------------------------------

#: Full-HD frames, as on the microscope: reading one captured PNG back takes tens of ms, so a re-score that read the
#: case's images on the loop held every other request for a second or more.
FULL_HD = CONFIG.replace("width = 960\nheight = 540\nfps = 15", "width = 1920\nheight = 1080\nfps = 5")


def _send(socket: zmq.Socket[bytes], request_id: str, command: str) -> None:
    socket.send_multipart([b"", Request(id=request_id, command=Command(command)).model_dump_json().encode()])


def test_rescores_queue_each_fov_once_and_leave_the_loop_free(tmp_path: Path) -> None:
    n_fovs, n_rescores = 13, 5
    assert "width = 1920" in FULL_HD
    with running_daemon(tmp_path, base_config=FULL_HD) as daemon:
        daemon.control.call("auto-capture", enabled=False)
        daemon.control.call("start-case", case_id="rescored")
        wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="the camera")
        for _ in range(n_fovs):
            daemon.control.call("capture")
        # on disk: a re-score then has to read every image back (captures still in memory would not be read)
        wait_for(lambda: daemon.control.call("status")["unsaved_images"] == 0, what="the images on disk")
        baseline = _rss_mib(daemon.process.pid)
        socket = _raw_dealer(daemon.endpoints["control"])
        replies: dict[str, tuple[Reply, float]] = {}
        try:
            sent = time.monotonic()
            for i in range(n_rescores):
                _send(socket, f"r{i}", "rescore")
            _send(socket, "status", "status")  # behind the re-scores in the daemon's queue
            while len(replies) < n_rescores + 1:
                assert socket.poll(30_000), f"only {len(replies)} replies came"
                reply = Reply.model_validate_json(socket.recv_multipart()[1])
                replies[reply.id] = (reply, time.monotonic() - sent)
        finally:
            socket.close(linger=0)
        growth = _rss_mib(daemon.process.pid) - baseline
        assert _problems(daemon) == []
    rescores = [replies[f"r{i}"][0] for i in range(n_rescores)]
    assert all(r.ok and r.data["queued"] == n_fovs for r in rescores), rescores
    # every FOV waits once, with the newest request's parameters: 13 at most, not 5 x 13
    assert max(r.data["queue"] for r in rescores) <= n_fovs
    status, status_s = replies["status"]
    assert status.ok and status.data["queue"] <= n_fovs
    # the loop reads no image for a re-score: the status behind five of them is answered at once (it took 4 s)
    assert status_s < 1.0, f"status answered {status_s:.2f} s after {n_rescores} re-scores of {n_fovs} FOVs"
    assert growth < 100, f"RSS grew {growth:.0f} MiB with {n_rescores} re-scores queued"


def test_a_rescore_beyond_the_queue_bound_is_refused_busy(tmp_path: Path) -> None:
    from her2scope.clients.control import ControlError

    with running_daemon(tmp_path, "\n[limits]\nmax_queued_jobs = 4\n") as daemon:
        daemon.control.call("auto-capture", enabled=False)
        daemon.control.call("start-case", case_id="bounded")
        wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="the camera")
        for _ in range(6):
            daemon.control.call("capture")
        wait_for(
            lambda: (
                all(f["status"] == "scored" for f in daemon.control.call("snapshot")["case"]["fovs"])
                and daemon.control.call("status")["worker"] == "idle"
            ),
            what="the six FOVs to be scored",
        )
        audit = len(daemon.control.call("snapshot")["case"]["adjustments"])
        busy = (
            r"^busy: re-scoring 6 FOVs would make 6 wait to be scored; the limit is 4 \(limits\.max_queued_jobs\): "
            r"re-score single FOVs, or wait for the queue to drain$"
        )
        with pytest.raises(ControlError, match=busy):
            daemon.control.call("rescore")
        status = daemon.control.call("status")
        assert status["queue"] == 0 and status["worker"] == "idle"  # refused: nothing queued
        assert len(daemon.control.call("snapshot")["case"]["adjustments"]) == audit  # ... nor recorded
        assert daemon.control.call("rescore", fov_id="fov-001")["queued"] == 1
        assert _problems(daemon) == []


def test_a_message_far_over_the_size_limit_is_dropped_unread(daemon: Daemon) -> None:
    """Up to four times the limit a request is read and refused with a reply; a larger one is never held: ZeroMQ
    drops it and disconnects its sender (no reply comes), and the daemon serves everyone else as before."""
    huge = b'{"v": 1, "id": "huge", "command": "status", "args": {"x": "' + b"x" * (5 * 1024 * 1024) + b'"}}'
    with (
        ControlClient(daemon.endpoints["control"], timeout_ms=2000) as sender,
        pytest.raises(ControlError, match="did not answer"),
    ):
        sender.request_raw(huge)
    _assert_running(daemon)
