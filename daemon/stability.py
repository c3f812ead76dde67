"""Stability detection: decide from the live frames when a field of view is still and in focus, and capture it once.

Every frame is reduced to a small greyscale *analysis view* (``CaptureConfig.analysis_width_px`` wide, INTER_AREA),
on which two measurements are made:

Motion
    Phase correlation (``cv2.phaseCorrelate``, Hanning-windowed float32) between consecutive views gives the
    translation in analysis pixels, converted to µm with ``pixel_size_um`` times the downsampling factor. Phase
    correlation is blind to changes that are not a translation: a new scene (the camera reconnected, the slide
    swapped), a corrupt frame, the lamp switched. Its peak response then collapses (about 0.05 against 0.3–1.0 for
    a real shift of tissue), so a low response is settled by the mean absolute difference (MAD) of the two views:
    a large difference is motion of unknown size (``motion_um = inf``), a small one is a still featureless view.
    Views with no texture (glass, a uniform frame) have nothing to correlate and are judged by the MAD alone.
    Views that look like pixel noise (Laplacian energy far above their contrast, which no optical image has after
    area downsampling) are corrupt frames: they read as motion of unknown size and are otherwise skipped, so the
    next good frame is compared with the last good one.
Focus
    The variance of the Laplacian of the view divided by the variance of the view: the share of the image's
    contrast at the finest scale. Dividing by the contrast makes it independent of exposure and gain, and much
    less dependent on how much tissue is in view. Focus is judged relative to the *recent peak*: the best focus
    seen in the last ``PEAK_LOOKBACK_MS`` of the approach to this field and since it stopped. The approach
    counts because a field that stops out of focus would otherwise be its own peak; only its last part counts
    because the frames of a long pan show other tissue. Featureless views are never in focus.

State machine (one ``StabilityState`` per update)::

                    motion > max_motion_um (from any state), a scene change, a corrupt frame
          +-------------------------------------------------------------------------------+
          v                                                                               |
      MOVING --motion <= max_motion_um--> SETTLING --still >= settle_ms and in focus--> STABLE
                                            ^  |                                          |  (auto: capture=True once)
                                            |  +--the field was captured before--+        |
                                            +--------focus lost (auto off)-------|--------+
                                                                                 v        v
                                                                               CAPTURED <-+  (or mark_captured())

With auto-capture on, the update on which a field becomes STABLE carries ``capture=True`` and the next update
reports CAPTURED. With it off, STABLE is reported for as long as the field stays still and in focus, until
``mark_captured()`` (a pedal or control capture) moves it to CAPTURED. A field that stops where the last capture
was taken (within ``SAME_FIELD_FRACTION`` of the view's width) is not captured again: a bumped table or a corrupt
frame does not duplicate a FOV. A change of frame size resets the detector.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.daemon import CaptureConfig
from her2scope.daemon.frames import Frame

__all__ = [
    "MAD_LIMIT_GREY",
    "MIN_CONTRAST_GREY",
    "MIN_RESPONSE",
    "NOISE_RATIO",
    "PEAK_LOOKBACK_MS",
    "SAME_FIELD_FRACTION",
    "StabilityDetector",
    "StabilityState",
    "StabilityUpdate",
]

MIN_RESPONSE: Final = 0.1
"""Phase-correlation peak response below which the measured shift is meaningless (views do not correlate)."""

MAD_LIMIT_GREY: Final = 5.0
"""Mean absolute grey difference (0–255) above which two views that do not correlate are different scenes."""

MIN_CONTRAST_GREY: Final = 2.0
"""Standard deviation of the grey view below which it is featureless (glass, a blank frame): never in focus."""

NOISE_RATIO: Final = 10.0
"""Focus measure above which a view is pixel noise, a corrupt frame (white noise scores about 20, tissue 0.5–2)."""

PEAK_LOOKBACK_MS: Final = 500.0
"""How far back into the approach to a field the focus peak reaches."""

SAME_FIELD_FRACTION: Final = 0.05
"""A stable view shifted less than this share of the view's width from the last capture is the same field."""


class StabilityState(StrEnum):
    """Where the field of view is in its cycle; see the module docstring for the diagram."""

    MOVING = "moving"
    SETTLING = "settling"
    STABLE = "stable"
    CAPTURED = "captured"


@dataclass(frozen=True, slots=True)
class StabilityUpdate:
    """The detector's verdict on one frame.

    Attributes
    ----------
    state : the state after this frame
    motion_um : displacement since the previous frame in µm; ``inf`` when it cannot be measured (the first
        frame, a scene change, a corrupt frame)
    focus : variance of the Laplacian over the variance of the analysis view (dimensionless, 0 when uniform)
    focus_ratio : ``focus`` over the recent peak, 0 when the view is featureless or corrupt
    still_ms : how long the field has been still (0 while moving)
    capture : True exactly once per field, on the update where it becomes STABLE with auto-capture on
    """

    state: StabilityState
    motion_um: float
    focus: float
    focus_ratio: float
    still_ms: float
    capture: bool


@dataclass(frozen=True, slots=True)
class _View:
    """One frame reduced for analysis."""

    grey: npt.NDArray[np.uint8]
    windowed: npt.NDArray[np.float32]
    focus: float
    featureless: bool
    corrupt: bool


class StabilityDetector:
    """Turns a stream of frames into moving → settling → stable → captured (see the module docstring).

    Parameters
    ----------
    config : CaptureConfig
        ``auto``, ``max_motion_um``, ``settle_ms``, ``min_focus_ratio`` and ``analysis_width_px`` are used.
    pixel_size_um : float
        µm per camera pixel, > 0.

    Notes
    -----
    Not thread-safe: call ``update``, ``mark_captured`` and ``reset`` from one thread (the grab loop's).
    Time comes only from ``Frame.timestamp_ms``.
    """

    def __init__(self, config: CaptureConfig, pixel_size_um: float) -> None:
        if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise ValueError(f"pixel_size_um must be a positive number of µm per pixel, got {pixel_size_um!r}")
        self._config = config
        self._pixel_size_um = pixel_size_um
        self._window: npt.NDArray[np.float32] | None = None
        self.reset()

    @property
    def state(self) -> StabilityState:
        """The current state."""
        return self._state

    def reset(self) -> None:
        """Forget the previous frames, the focus peak and the last capture; the next frame starts MOVING."""
        self._state = StabilityState.MOVING
        self._frame_shape: tuple[int, ...] | None = None
        self._analysis_shape: tuple[int, int] = (0, 0)
        self._scale_rc: tuple[float, float] = (1.0, 1.0)
        self._previous: _View | None = None
        self._previous_ms = 0.0
        self._still_since_ms = 0.0
        self._recent_focus: deque[tuple[float, float]] = deque()
        self._peak = 0.0
        self._captured: _View | None = None

    def mark_captured(self) -> None:
        """Record a capture taken by another trigger (pedal, control) so that this field is not auto-captured.

        The last view seen is remembered as captured; a still field moves to CAPTURED at once, a moving one will
        not be auto-captured if it stops on the same field.
        """
        if self._previous is not None:
            self._captured = self._previous
        if self._state in (StabilityState.SETTLING, StabilityState.STABLE):
            self._state = StabilityState.CAPTURED

    def update(self, frame: Frame) -> StabilityUpdate:
        """Advance the state machine by one frame.

        Parameters
        ----------
        frame : Frame
            ``image`` is (M, N, 3) uint8 BGR (also accepted: (M, N) grey, (M, N, 4) BGRA).

        Returns
        -------
        StabilityUpdate

        Raises
        ------
        ValueError
            The image is not a non-empty uint8 grey, BGR or BGRA array.
        """
        image = frame.image
        _check_image(image)
        if image.shape != self._frame_shape:
            self.reset()
            self._set_geometry(image.shape)
        view = self._analyse(image)
        now = frame.timestamp_ms
        previous = self._previous
        motion_um = math.inf if previous is None or view.corrupt else self._motion_um(previous, view)

        if view.corrupt:  # skipped: the next frame is compared with the last good one
            return self._moved(now, view, math.inf, usable=False)
        self._previous, previous_ms, self._previous_ms = view, self._previous_ms, now
        if not math.isfinite(motion_um):  # new scene: earlier focus is not comparable
            self._recent_focus.clear()
        if motion_um > self._config.max_motion_um:
            return self._moved(now, view, motion_um, usable=True)

        if self._state is StabilityState.MOVING:
            self._state = StabilityState.SETTLING
            self._still_since_ms = previous_ms
            self._peak = max((f for t, f in self._recent_focus if t >= now - PEAK_LOOKBACK_MS), default=0.0)
        self._remember_focus(now, view)
        self._peak = max(self._peak, view.focus) if not view.featureless else self._peak
        still_ms = max(0.0, now - self._still_since_ms)
        ratio = self._ratio(view)
        in_focus = not view.featureless and ratio >= self._config.min_focus_ratio and self._peak > 0.0
        capture = False

        if self._state is StabilityState.SETTLING and in_focus and still_ms >= self._config.settle_ms:
            if self._captured is not None and self._same_field(self._captured, view):
                self._state = StabilityState.CAPTURED
            else:
                self._state = StabilityState.STABLE
                capture = self._config.auto
        elif self._state is StabilityState.STABLE and not in_focus:
            self._state = StabilityState.SETTLING
        state = self._state
        if capture:
            self._captured = view
            self._state = StabilityState.CAPTURED
        return StabilityUpdate(state, motion_um, view.focus, ratio, still_ms, capture)

    # ------------------------------------------------------------------------------------------------ internals

    def _moved(self, now: float, view: _View, motion_um: float, *, usable: bool) -> StabilityUpdate:
        self._state = StabilityState.MOVING
        if usable:
            self._remember_focus(now, view)
        self._peak = max((f for _, f in self._recent_focus), default=0.0)
        ratio = self._ratio(view) if usable else 0.0
        return StabilityUpdate(StabilityState.MOVING, motion_um, view.focus, ratio, 0.0, False)

    def _remember_focus(self, now: float, view: _View) -> None:
        if not view.featureless:
            self._recent_focus.append((now, view.focus))
        while self._recent_focus and self._recent_focus[0][0] < now - PEAK_LOOKBACK_MS:
            self._recent_focus.popleft()

    def _ratio(self, view: _View) -> float:
        if view.featureless or view.corrupt or self._peak <= 0.0:
            return 0.0
        return view.focus / self._peak

    def _set_geometry(self, shape: tuple[int, ...]) -> None:
        rows, cols = shape[:2]
        width = min(cols, self._config.analysis_width_px)
        height = max(2, round(rows * width / cols))
        width = max(2, width)
        self._frame_shape = shape
        self._analysis_shape = (height, width)
        self._scale_rc = (rows / height, cols / width)
        self._window = np.asarray(cv2.createHanningWindow((width, height), cv2.CV_32F), dtype=np.float32)

    def _analyse(self, image: npt.NDArray[np.uint8]) -> _View:
        if image.ndim == 2:
            grey_full = image
        else:
            code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
            grey_full = np.asarray(cv2.cvtColor(image, code), dtype=np.uint8)
        height, width = self._analysis_shape
        # Grey first, then area-reduce: one channel to average instead of three (about twice as fast).
        grey = np.asarray(cv2.resize(grey_full, (width, height), interpolation=cv2.INTER_AREA), dtype=np.uint8)
        _, grey_sd = cv2.meanStdDev(grey)
        _, laplacian_sd = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
        contrast = float(grey_sd[0, 0])
        laplacian_var = float(laplacian_sd[0, 0]) ** 2
        featureless = contrast < MIN_CONTRAST_GREY
        focus = laplacian_var / contrast**2 if contrast > 0.0 else 0.0
        assert self._window is not None
        # Windowed here, once per frame, and not by phaseCorrelate: OpenCV 5.0 multiplies its inputs by the window
        # in place, which would corrupt the view kept for the next frame.
        windowed = np.multiply(grey, self._window, dtype=np.float32)
        return _View(grey, windowed, focus, featureless, not featureless and focus > NOISE_RATIO)

    def _motion_um(self, previous: _View, view: _View) -> float:
        difference = float(cv2.absdiff(previous.grey, view.grey).mean())
        if previous.featureless or view.featureless:
            return 0.0 if difference <= MAD_LIMIT_GREY else math.inf
        (d_col, d_row), response = cv2.phaseCorrelate(previous.windowed, view.windowed)
        if not (response >= MIN_RESPONSE and math.isfinite(d_col) and math.isfinite(d_row)):
            return 0.0 if difference <= MAD_LIMIT_GREY else math.inf
        scale_row, scale_col = self._scale_rc
        return math.hypot(d_row * scale_row, d_col * scale_col) * self._pixel_size_um

    def _same_field(self, captured: _View, view: _View) -> bool:
        if captured.grey.shape != view.grey.shape:
            return False
        (d_col, d_row), response = cv2.phaseCorrelate(captured.windowed, view.windowed)
        limit_px = SAME_FIELD_FRACTION * view.grey.shape[1]
        return bool(response >= MIN_RESPONSE and math.hypot(d_col, d_row) <= limit_px)


def _check_image(image: object) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"frame image must be a uint8 BGR array, got {kind}; convert it in the frame source")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or image.size == 0:
        raise ValueError(f"frame image must be (rows, cols, 3) BGR, got shape {image.shape}")
