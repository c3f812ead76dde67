"""Frames and the port every frame source implements (USB, GigE, replay, simulated microscope)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


class SourceError(RuntimeError):
    """The frame source failed (unplugged, not found, unsupported); the message says what and what to do."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera frame.

    Attributes
    ----------
    image : (M, N, 3) uint8 ndarray, **BGR** channel order (OpenCV's), read-only
    index : the source's frame counter (gaps mean dropped frames)
    timestamp_ms : monotonic clock (``time.monotonic() * 1000``) when the frame was grabbed
    """

    image: npt.NDArray[np.uint8]
    index: int
    timestamp_ms: float


@runtime_checkable
class FrameSource(Protocol):
    """A camera, or anything that behaves like one.

    ``open`` may be called again after ``close`` or after an error (reconnect). ``read`` blocks for at most
    ``timeout_ms`` and returns None when no frame came in that time; it raises SourceError when the device is
    gone. Sources are used from one thread at a time.
    """

    @property
    def name(self) -> str:
        """A short description for logs and the status topic, e.g. ``usb:/dev/v4l/by-id/...``."""
        ...

    def open(self) -> None:
        """Open (or reopen) the device; raise SourceError with a clear message when it cannot."""
        ...

    def read(self, timeout_ms: float) -> Frame | None:
        """The next frame, or None after ``timeout_ms`` without one; SourceError when the device is gone."""
        ...

    def close(self) -> None:
        """Release the device; safe to call twice."""
        ...


@runtime_checkable
class StageControl(Protocol):
    """A frame source with a stage the daemon can drive: the simulated microscope (the ``stage`` command)."""

    @property
    def n_fields(self) -> int:
        """How many tumour fields the slide has."""
        ...

    def goto_control(self) -> None: ...

    def goto_field(self, field: int) -> None: ...

    def hold(self) -> None: ...

    def resume_script(self) -> None: ...

    def unplug(self, duration_ms: float) -> None: ...

    def freeze(self, duration_ms: float | None = None) -> None: ...

    def stage_report(self) -> dict[str, Any]:
        """The stage now, as the ``stage`` reply gives it: state, target, on_control, position_um."""
        ...
