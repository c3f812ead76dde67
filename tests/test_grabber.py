"""The grab thread: latest-frame semantics, watchdog (lost, frozen), reopening, containment, clean stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from her2scope.config.daemon import ReplayCameraConfig, UsbCameraConfig, WatchdogConfig
from her2scope.daemon.frames import Frame, FrameSource, SourceError
from her2scope.daemon.grabber import CameraState, CameraStatus, FrameGrabber
from her2scope.daemon.sources import ReplaySource, UsbCamera

WATCHDOG = WatchdogConfig(frame_timeout_ms=200.0, frozen_frames=5, reopen_interval_ms=30.0)
WAIT_S = 3.0


class ScriptedCamera:
    """A frame source the test steers through ``mode``.

    ``live``: a new noisy frame every ``period_s``; ``silent``: no frames; ``error``: raises SourceError;
    ``crash``: raises an unexpected exception; ``frozen``: the same picture again and again; ``bad``: frames whose
    image is not BGR uint8. ``fail_opens`` makes the next opens fail; ``stop_after`` goes silent after that many
    frames; ``index_step`` > 1 skips frame indices like a camera dropping frames. Like a real camera, it counts
    frames from 0 again after each open.
    """

    def __init__(self, *, period_s: float = 0.002, index_step: int = 1, stop_after: int | None = None) -> None:
        self.mode = "live"
        self.fail_opens = 0
        self.opens = 0
        self.closes = 0
        self.is_open = False
        self.period_s = period_s
        self.index_step = index_step
        self.stop_after = stop_after
        self.delivered = 0
        self._next_index = 0
        self._rng = np.random.default_rng(3)
        self._frozen = self._rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        self._idle = threading.Event()  # never set: waiting on it is the camera's exposure time

    @property
    def name(self) -> str:
        return "scripted:0"

    def open(self) -> None:
        self.opens += 1
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise SourceError("camera unplugged (test)")
        self.is_open = True
        self._next_index = 0

    def read(self, timeout_ms: float) -> Frame | None:
        assert self.is_open, "read on a closed source"
        mode = self.mode
        if mode == "error":
            raise SourceError("device gone (test)")
        if mode == "crash":
            raise ZeroDivisionError("bug in the driver (test)")
        if mode == "silent" or (self.stop_after is not None and self.delivered >= self.stop_after):
            self._idle.wait(timeout_ms / 1000.0)
            return None
        self._idle.wait(self.period_s)
        if mode == "frozen":
            image = self._frozen
        elif mode == "bad":
            image = np.zeros((24, 32), np.float32)
        else:
            image = self._rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        frame = Frame(image, self._next_index, time.monotonic() * 1000.0)
        self._next_index += self.index_step
        self.delivered += 1
        return frame

    def close(self) -> None:
        if self.is_open:
            self.closes += 1
        self.is_open = False


class StatusLog:
    """Records the statuses reported through ``on_status`` and waits for states, with a timeout."""

    def __init__(self) -> None:
        self.statuses: list[CameraStatus] = []
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, status: CameraStatus) -> None:
        with self._cond:
            self.statuses.append(status)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    @property
    def states(self) -> list[CameraState]:
        with self._cond:
            return [s.state for s in self.statuses]

    def wait_for(self, state: CameraState, *, count: int = 1, timeout_s: float = WAIT_S) -> CameraStatus:
        """The ``count``-th report of ``state``; AssertionError when it does not come in time."""
        with self._cond:
            ok = self._cond.wait_for(lambda: [s.state for s in self.statuses].count(state) >= count, timeout_s)
            assert ok, f"no {state} (#{count}) within {timeout_s} s; states so far: {self.states}"
            return [s for s in self.statuses if s.state is state][count - 1]


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def make_grabber() -> Iterator[Callable[..., tuple[FrameGrabber, StatusLog]]]:
    """Builds started grabbers and always stops them."""
    grabbers: list[FrameGrabber] = []

    def make(source: FrameSource, watchdog: WatchdogConfig = WATCHDOG) -> tuple[FrameGrabber, StatusLog]:
        log = StatusLog()
        grabber = FrameGrabber(source, watchdog, on_status=log)
        grabbers.append(grabber)
        grabber.start()
        return grabber, log

    yield make
    for grabber in grabbers:
        assert grabber.stop(timeout_ms=2000), "grab thread did not stop"


def test_slow_consumer_sees_only_the_newest_frame(make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]]) -> None:
    camera = ScriptedCamera(stop_after=20)
    grabber, log = make_grabber(camera, WatchdogConfig(frame_timeout_ms=5000.0, frozen_frames=5))
    first = grabber.latest(timeout_ms=WAIT_S * 1000)
    assert first is not None
    wait_until(lambda: grabber.status.frames_total == 20, "20 frames")
    newest = grabber.latest(after_index=first.index, timeout_ms=WAIT_S * 1000)
    assert newest is not None and newest.index == 19  # not first.index + 1: nothing is queued
    assert grabber.latest(after_index=19, timeout_ms=50) is None  # nothing newer came
    assert grabber.latest(timeout_ms=0) is newest
    assert not newest.image.flags.writeable
    assert grabber.status.frames_dropped == 0
    assert log.states == [CameraState.LIVE]


def test_index_gaps_are_counted_as_dropped_frames(
    make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]],
) -> None:
    camera = ScriptedCamera(index_step=3, stop_after=10)
    grabber, _ = make_grabber(camera, WatchdogConfig(frame_timeout_ms=5000.0, frozen_frames=5))
    wait_until(lambda: grabber.status.frames_total == 10, "10 frames")
    status = grabber.status
    assert status.frames_dropped == 2 * 9
    newest = grabber.latest(timeout_ms=0)
    assert newest is not None and newest.index == 27


def test_status_snapshot(make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]]) -> None:
    grabber, log = make_grabber(ScriptedCamera(period_s=0.005))
    log.wait_for(CameraState.LIVE)
    wait_until(lambda: grabber.status.frames_total >= 30, "30 frames")
    status = grabber.status
    assert status.state is CameraState.LIVE and status.source == "scripted:0"
    assert 10.0 < status.fps < 1000.0
    assert status.reconnects == 0 and status.last_error is None and status.warnings == ()
    assert status.last_frame_ms is not None and status.last_frame_ms <= time.monotonic() * 1000.0
    with pytest.raises(AttributeError):
        status.fps = 1.0  # type: ignore[misc]


def test_lost_camera_is_reopened(make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]]) -> None:
    camera = ScriptedCamera()
    with capture_logs() as events:
        grabber, log = make_grabber(camera)
        log.wait_for(CameraState.LIVE)
        before = grabber.latest(timeout_ms=WAIT_S * 1000)
        assert before is not None
        camera.fail_opens = 2
        camera.mode = "silent"
        lost = log.wait_for(CameraState.LOST)
        assert lost.last_error is not None and lost.last_error.startswith("no frame for")
        camera.mode = "live"
        live = log.wait_for(CameraState.LIVE, count=2)
        assert live.reconnects == 1
        after = grabber.latest(after_index=before.index, timeout_ms=WAIT_S * 1000)
    assert after is not None and after.index > before.index  # indices keep increasing though the camera restarted
    assert camera.opens >= 4 and camera.closes >= 1
    assert grabber.status.last_error == "camera unplugged (test)"
    assert log.states[:3] == [CameraState.LIVE, CameraState.LOST, CameraState.LIVE]
    names = [e["event"] for e in events]
    assert names.count("camera_lost") == 1 and names.count("camera_reopened") == 1
    assert "camera_open_failed" in names
    assert log.threads == {"grab:scripted:0"}


def test_camera_that_is_missing_at_start(make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]]) -> None:
    camera = ScriptedCamera()
    camera.fail_opens = 3
    _, log = make_grabber(camera)
    lost = log.wait_for(CameraState.LOST)
    assert lost.last_error == "camera unplugged (test)"
    live = log.wait_for(CameraState.LIVE)
    assert live.reconnects == 0  # it never was live before
    assert camera.opens == 4


@pytest.mark.parametrize(
    ("mode", "error"),
    [("error", "device gone (test)"), ("crash", "unexpected ZeroDivisionError: bug in the driver (test)")],
)
def test_source_errors_are_contained(
    make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]], mode: str, error: str
) -> None:
    camera = ScriptedCamera()
    grabber, log = make_grabber(camera)
    log.wait_for(CameraState.LIVE)
    camera.mode = mode
    assert log.wait_for(CameraState.LOST).last_error == error
    wait_until(lambda: camera.opens >= 3, "reopen attempts")
    camera.mode = "live"
    assert log.wait_for(CameraState.LIVE, count=2).reconnects == 1
    assert grabber.latest(timeout_ms=0) is not None


def test_bad_frames_are_skipped(make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]]) -> None:
    camera = ScriptedCamera()
    with capture_logs() as events:
        grabber, log = make_grabber(camera)
        log.wait_for(CameraState.LIVE)
        camera.mode = "bad"
        lost = log.wait_for(CameraState.LOST)
    assert lost.last_error is not None and lost.last_error.startswith("no frame for")
    newest = grabber.latest(timeout_ms=0)
    assert newest is not None and newest.image.dtype == np.uint8 and newest.image.shape == (24, 32, 3)
    assert any(e["event"] == "camera_bad_frame" for e in events)


def test_frozen_camera_is_detected_and_reopened(make_grabber: Callable[..., tuple[FrameGrabber, StatusLog]]) -> None:
    camera = ScriptedCamera()
    grabber, log = make_grabber(camera)
    log.wait_for(CameraState.LIVE)
    camera.mode = "frozen"
    frozen = log.wait_for(CameraState.FROZEN)
    assert frozen.last_error == "5 identical frames in a row"
    opens = camera.opens
    wait_until(lambda: camera.opens >= opens + 2, "two reopen attempts")
    assert log.states[-1] is CameraState.FROZEN  # a reopened camera still showing the same picture stays FROZEN
    assert grabber.status.reconnects == 0
    camera.mode = "live"
    assert log.wait_for(CameraState.LIVE, count=2).reconnects == 1


def test_failing_status_listener_does_not_stop_the_camera() -> None:
    calls: list[CameraState] = []

    def listener(status: CameraStatus) -> None:
        calls.append(status.state)
        raise RuntimeError("listener bug (test)")

    grabber = FrameGrabber(ScriptedCamera(), WATCHDOG, on_status=listener)
    with capture_logs() as events, grabber:
        first = grabber.latest(timeout_ms=WAIT_S * 1000)
        assert first is not None
        second = grabber.latest(after_index=first.index, timeout_ms=WAIT_S * 1000)
        assert second is not None
        assert grabber.status.state is CameraState.LIVE
    assert calls == [CameraState.LIVE, CameraState.STOPPED]
    assert [e["event"] for e in events].count("on_status_failed") == 2


def test_stop_joins_and_closes_the_source() -> None:
    camera = ScriptedCamera()
    log = StatusLog()
    grabber = FrameGrabber(camera, WATCHDOG, on_status=log)
    grabber.start()
    grabber.start()  # already running: nothing happens
    log.wait_for(CameraState.LIVE)
    started = time.monotonic()
    assert grabber.stop(timeout_ms=2000)
    assert time.monotonic() - started < 1.0
    assert not camera.is_open and camera.closes == 1
    assert grabber.status.state is CameraState.STOPPED
    assert log.states == [CameraState.LIVE, CameraState.STOPPED]
    assert grabber.stop()  # idempotent
    newest = grabber.latest(timeout_ms=0)
    assert newest is not None
    started = time.monotonic()
    assert grabber.latest(after_index=newest.index, timeout_ms=5000) is None  # no waiting once stopped
    assert time.monotonic() - started < 0.5
    with pytest.raises(RuntimeError, match="cannot be restarted"):
        grabber.start()


def test_stop_without_start() -> None:
    camera = ScriptedCamera()
    grabber = FrameGrabber(camera, WATCHDOG)
    assert grabber.status.state is CameraState.OPENING
    assert grabber.stop()
    stopped = grabber.status
    assert stopped.state is CameraState.STOPPED
    assert grabber.latest(timeout_ms=1000) is None


def test_finished_replay_ends_without_reopening(tmp_path: Path) -> None:
    for i in range(3):
        assert cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16, 3), 40 * i, np.uint8))
    log = StatusLog()
    source = ReplaySource(ReplayCameraConfig(path=tmp_path, fps=200.0, loop=False))
    with FrameGrabber(source, WATCHDOG, on_status=log) as grabber:
        ended = log.wait_for(CameraState.ENDED)
        assert ended.frames_total == 3 and ended.last_error is None
        newest = grabber.latest(timeout_ms=0)
        assert newest is not None and newest.index == 2
        assert grabber.latest(after_index=2, timeout_ms=5000) is None  # returns at once: nothing more will come
    assert log.states == [CameraState.LIVE, CameraState.ENDED, CameraState.STOPPED]


def test_real_capture_end_of_video_is_recovered_like_an_unplug(tmp_path: Path) -> None:
    path = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(10):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    log = StatusLog()
    camera = UsbCamera(UsbCameraConfig(device=str(path), width=64, height=48, fps=30.0))
    with FrameGrabber(camera, WATCHDOG, on_status=log) as grabber:
        lost = log.wait_for(CameraState.LOST)
        assert lost.last_error is not None and "camera stopped delivering frames" in lost.last_error
        live = log.wait_for(CameraState.LIVE, count=2)
        assert live.reconnects == 1
        wait_until(lambda: grabber.status.frames_total >= 20, "the video twice")
        newest = grabber.latest(timeout_ms=0)
        assert newest is not None and newest.index >= 19 and newest.image.shape == (48, 64, 3)
