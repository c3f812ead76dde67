"""The grab thread: drives a frame source, keeps only its latest frame, and reopens it when it is lost or frozen.

State diagram (``CameraState``)::

    OPENING --first frame--> LIVE --no frame for frame_timeout_ms, SourceError, any exception--> LOST
       |                      |  \\--frozen_frames identical frames in a row-----------------> FROZEN
       |                      \\--a finite source (replay without loop) finished-------------> ENDED
       \\--open() fails--> LOST

    LOST, FROZEN --close; every reopen_interval_ms: open()--> (first frame) LIVE   [reconnects += 1]
    any state --stop()--> STOPPED

A source is closed as soon as it is LOST or FROZEN and reopened after ``reopen_interval_ms``, until it works or the
grabber is stopped; nothing a source does ends the grab thread. Frame indices from the grabber keep increasing across
reopens (a reopened source may count from 0 again); gaps within one opening are counted as dropped frames.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Final, Self

import numpy as np
import numpy.typing as npt
import structlog

from her2scope.config.daemon import WatchdogConfig
from her2scope.daemon.frames import Frame, FrameSource, SourceError

__all__ = ["CameraState", "CameraStatus", "FrameGrabber"]

log = structlog.get_logger(__name__)

_FPS_WINDOW_S: Final = 2.0
_POLL_MS: Final = 100.0
"""Longest single ``read`` call, so that stop() and the watchdog act within this time (for sources that honour it)."""
_FREEZE_STRIDE: Final = 4
"""Frozen-frame detection compares every 4th row and column (1/16 of the pixels; a noisy sensor differs anywhere)."""


class CameraState(StrEnum):
    """The grabber's view of the camera."""

    OPENING = "opening"
    """Started; the source is being opened and has not delivered a frame yet."""
    LIVE = "live"
    """Frames are arriving."""
    LOST = "lost"
    """No frames (unplugged, failed to open, raised an error); the source is being reopened."""
    FROZEN = "frozen"
    """The source delivered identical frames; it is being reopened."""
    ENDED = "ended"
    """A finite source (a replay without loop) delivered its last frame; not an error, not reopened."""
    STOPPED = "stopped"
    """``stop()`` was called; the source is closed."""


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """A snapshot of the grabber, for the status topic.

    Attributes
    ----------
    state : the current state
    source : the source's name, e.g. ``usb:/dev/v4l/by-id/...``
    fps : frames per second received over the last ~2 s (0 when none)
    frames_total : frames received since start
    frames_dropped : frames the source skipped (gaps in its frame indices)
    reconnects : times the camera came back to LIVE after being LOST or FROZEN
    last_error : why the camera was last lost, frozen or failed to open; None if it never was
    warnings : settings the source ignored or changed (from its ``warnings`` attribute, if it has one)
    last_frame_ms : monotonic time (ms) of the newest frame, None before the first
    """

    state: CameraState
    source: str
    fps: float
    frames_total: int
    frames_dropped: int
    reconnects: int
    last_error: str | None
    warnings: tuple[str, ...]
    last_frame_ms: float | None


class FrameGrabber:
    """Runs a frame source on its own daemon thread and keeps only the newest frame.

    Consumers call ``latest()``; they never see an old buffered frame, and a slow consumer never slows the camera.
    ``on_status`` is called with a ``CameraStatus`` on every state change, from the grab thread (or from ``stop()``
    when the thread never ran); an exception it raises is logged and ignored. The source is used from the grab thread
    only, including ``close()``.

    Parameters
    ----------
    source : any ``FrameSource``; not yet opened (the grabber opens it)
    watchdog : timeouts for lost and frozen cameras and the interval between reopen attempts
    on_status : optional callback for state changes
    """

    def __init__(
        self,
        source: FrameSource,
        watchdog: WatchdogConfig,
        *,
        on_status: Callable[[CameraStatus], None] | None = None,
    ) -> None:
        self._source = source
        self._source_name = source.name
        self._watchdog = watchdog
        self._on_status = on_status
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Guarded by _cond:
        self._state = CameraState.OPENING
        self._latest: Frame | None = None
        self._frames_total = 0
        self._frames_dropped = 0
        self._reconnects = 0
        self._been_live = False
        self._last_error: str | None = None
        self._arrivals: deque[float] = deque(maxlen=4096)
        self._finished = False  # the grab thread has ended: latest() stops waiting
        # Used by the grab thread only:
        self._source_index: int | None = None  # the source's index of the last frame of this opening
        self._frozen_sample: npt.NDArray[np.uint8] | None = None  # what a FROZEN source kept showing
        self._lost_at = 0.0
        self._warnings: tuple[str, ...] = ()  # guarded by _cond; refreshed from the source on the grab thread

    # -- public API ------------------------------------------------------------------------------------------------

    @property
    def source_name(self) -> str:
        """The source's name."""
        return self._source_name

    def start(self) -> None:
        """Start the grab thread (once; calling it again while running does nothing)."""
        with self._cond:
            if self._thread is not None:
                if self._stopping.is_set():
                    raise RuntimeError("a stopped FrameGrabber cannot be restarted; create a new one")
                return
            self._thread = threading.Thread(target=self._run, name=f"grab:{self._source_name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_ms: float = 5000.0) -> bool:
        """Stop the grab thread, wait for it to close the source, and return whether it did within ``timeout_ms``.

        Idempotent. A source stuck inside ``read`` (some drivers block for seconds) can make this return False; the
        daemon thread then closes the source when ``read`` returns.
        """
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._close_source()
            self._set_state(CameraState.STOPPED)
            with self._cond:
                self._finished = True
                self._cond.notify_all()
            return True
        if thread is threading.current_thread():
            raise RuntimeError("stop() called from the grab thread (from on_status?); call it from another thread")
        thread.join(timeout_ms / 1000.0)
        if thread.is_alive():
            log.warning("camera_stop_timeout", source=self._source_name, timeout_ms=timeout_ms)
            return False
        return True

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def status(self) -> CameraStatus:
        """A snapshot of the grabber's state and counters."""
        with self._cond:
            return self._snapshot(time.monotonic())

    def latest(self, after_index: int | None = None, timeout_ms: float = 1000.0) -> Frame | None:
        """The newest frame, waiting up to ``timeout_ms`` for one newer than ``after_index``.

        Parameters
        ----------
        after_index : the index of the last frame the caller has seen; None accepts any frame (returns at once when
            there is one)
        timeout_ms : the longest wait

        Returns
        -------
        The newest frame, or None when no frame newer than ``after_index`` came in time (or the grabber has ended).
        """
        deadline = time.monotonic() + max(timeout_ms, 0.0) / 1000.0
        with self._cond:
            while True:
                frame = self._latest
                if frame is not None and (after_index is None or frame.index > after_index):
                    return frame
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._finished:
                    return None
                self._cond.wait(remaining)

    # -- grab thread -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            first_attempt = True
            while not self._stopping.is_set():
                if not first_attempt and self._stopping.wait(self._watchdog.reopen_interval_ms / 1000.0):
                    break
                first_attempt = False
                if not self._open_source():
                    continue
                ended = self._pump()
                self._close_source()
                if ended:
                    self._set_state(CameraState.ENDED)
                    with self._cond:
                        self._finished = True
                        self._cond.notify_all()
                        frames_total = self._frames_total
                    log.info("camera_ended", source=self._source_name, frames_total=frames_total)
                    self._stopping.wait()
        except BaseException as error:  # a bug in the grabber itself: report it rather than die silently
            log.exception("grabber_failed", source=self._source_name)
            with self._cond:
                self._last_error = f"grabber failed: {type(error).__name__}: {error}"
            raise
        finally:
            self._close_source()
            self._set_state(CameraState.STOPPED)
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _open_source(self) -> bool:
        """Open the source; on failure report LOST with the error and return False."""
        try:
            self._source.open()
        except Exception as error:
            message = str(error) if isinstance(error, SourceError) else f"unexpected {type(error).__name__}: {error}"
            with self._cond:
                repeated = self._last_error == message
                self._last_error = message
            if not repeated:
                if isinstance(error, SourceError):
                    log.warning("camera_open_failed", source=self._source_name, error=message)
                else:
                    log.exception("camera_open_failed", source=self._source_name, error=message)
            self._close_source()
            self._set_state(CameraState.LOST)
            return False
        self._source_index = None
        warnings = self._source_warnings()
        with self._cond:
            self._warnings = warnings
        log.info("camera_opened", source=self._source_name, warnings=list(warnings))
        return True

    def _pump(self) -> bool:
        """Read frames until the source is lost or frozen (False) or has finished (True), or stop() is called."""
        watchdog = self._watchdog
        poll_ms = min(_POLL_MS, watchdog.frame_timeout_ms / 2.0)
        last_arrival = time.monotonic()
        # A source reopened after FROZEN stays FROZEN while it shows the same picture as before.
        previous_sample = self._frozen_sample
        identical = watchdog.frozen_frames - 1 if previous_sample is not None else 0
        bad_frame_logged = False
        while not self._stopping.is_set():
            try:
                frame = self._source.read(poll_ms)
            except SourceError as error:
                self._lose(CameraState.LOST, str(error))
                return False
            except Exception as error:
                log.exception("camera_read_failed", source=self._source_name)
                self._lose(CameraState.LOST, f"unexpected {type(error).__name__}: {error}")
                return False
            now = time.monotonic()
            if frame is not None and not _is_frame(frame):
                if not bad_frame_logged:  # once per opening: a broken source must not flood the log
                    log.warning("camera_bad_frame", source=self._source_name, frame=_describe(frame))
                    bad_frame_logged = True
                frame = None
            if frame is None:
                if bool(getattr(self._source, "finished", False)):
                    return True
                silent_ms = (now - last_arrival) * 1000.0
                if silent_ms >= watchdog.frame_timeout_ms:
                    self._lose(CameraState.LOST, f"no frame for {silent_ms:.0f} ms")
                    return False
                continue
            last_arrival = now
            sample = frame.image[::_FREEZE_STRIDE, ::_FREEZE_STRIDE]
            if previous_sample is not None and np.array_equal(sample, previous_sample):
                identical += 1
            else:
                identical = 1
                previous_sample = sample.copy()
                self._frozen_sample = None
            if identical >= watchdog.frozen_frames:
                self._frozen_sample = previous_sample
                self._lose(CameraState.FROZEN, f"{watchdog.frozen_frames} identical frames in a row")
                return False
            self._publish(frame, now)
        return False

    def _publish(self, frame: Frame, now: float) -> None:
        source_index = frame.index
        if frame.image.flags.writeable:  # consumers share the frame: nobody may write into it
            image = frame.image.view()
            image.flags.writeable = False
            frame = dataclasses.replace(frame, image=image)
        warnings = self._source_warnings()
        with self._cond:
            self._warnings = warnings
            newest = self._latest
            if newest is None:
                index = source_index
            elif self._source_index is not None and source_index > self._source_index:
                self._frames_dropped += source_index - self._source_index - 1
                index = newest.index + (source_index - self._source_index)
            else:  # the first frame of a reopened source, or a source that counted backwards
                index = newest.index + 1
            self._source_index = source_index
            self._latest = frame if index == source_index else dataclasses.replace(frame, index=index)
            self._frames_total += 1
            self._arrivals.append(now)
            self._cond.notify_all()
            came_back = self._state is not CameraState.LIVE and self._been_live
        if came_back:
            with self._cond:
                self._reconnects += 1
                reconnects = self._reconnects
            log.info(
                "camera_reopened",
                source=self._source_name,
                reconnects=reconnects,
                down_ms=round((now - self._lost_at) * 1000.0),
            )
        self._set_state(CameraState.LIVE)
        with self._cond:
            self._been_live = True

    def _lose(self, state: CameraState, reason: str) -> None:
        with self._cond:
            self._last_error = reason
            frames_total = self._frames_total
            was = self._state
        if was is not state:  # a camera that stays lost is logged once, not at every reopen attempt
            self._lost_at = time.monotonic()
            log.warning("camera_lost", source=self._source_name, state=state.value, reason=reason, frames=frames_total)
        self._set_state(state)

    def _close_source(self) -> None:
        try:
            self._source.close()
        except Exception:
            log.exception("camera_close_failed", source=self._source_name)

    def _source_warnings(self) -> tuple[str, ...]:
        try:
            return tuple(str(w) for w in getattr(self._source, "warnings", ()))
        except Exception:
            return ()

    # -- state and snapshots ---------------------------------------------------------------------------------------

    def _set_state(self, state: CameraState) -> None:
        """Change the state and report it; only STOPPED is accepted once stop() was called."""
        with self._cond:
            if self._state is state or self._state is CameraState.STOPPED:
                return
            if self._stopping.is_set() and state is not CameraState.STOPPED:
                return
            self._state = state
            snapshot = self._snapshot(time.monotonic())
        callback = self._on_status
        if callback is not None:
            try:
                callback(snapshot)
            except Exception:
                log.exception("on_status_failed", source=self._source_name, state=state.value)

    def _snapshot(self, now: float) -> CameraStatus:
        """The status; the caller holds the lock."""
        arrivals = self._arrivals
        while arrivals and now - arrivals[0] > _FPS_WINDOW_S:
            arrivals.popleft()
        fps = (len(arrivals) - 1) / (now - arrivals[0]) if len(arrivals) >= 2 and now > arrivals[0] else 0.0
        return CameraStatus(
            state=self._state,
            source=self._source_name,
            fps=fps,
            frames_total=self._frames_total,
            frames_dropped=self._frames_dropped,
            reconnects=self._reconnects,
            last_error=self._last_error,
            warnings=self._warnings,
            last_frame_ms=None if self._latest is None else self._latest.timestamp_ms,
        )


def _is_frame(frame: object) -> bool:
    if not isinstance(frame, Frame):
        return False
    image = frame.image
    return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def _describe(frame: object) -> str:
    image = getattr(frame, "image", None)
    if isinstance(image, np.ndarray):
        return f"{type(frame).__name__} with image {image.shape} {image.dtype}"
    return type(frame).__name__
