"""A simulated microscope: a camera looking at a synthetic HER2 slide under a scripted, motorised stage.

The virtual slide is built once with :mod:`her2scope.synthetic`: a tumour area of ``slide_fields`` (rows, cols)
fields of view, each rendered with the configured class mix (so each field's ground truth matches it), and one
positive-control field to their right, with glass in between::

    +---------+---------+---------+        +---------+
    | field 0 | field 1 | field 2 |  glass | control |
    +---------+---------+---------+        +---------+
    | field 5 | field 4 | field 3 |  glass
    +---------+---------+---------+

Fields are numbered in the serpentine order the script visits them. The stage runs ``config.script`` in a loop
(``control``, ``fields N``, ``pause MS``, ``defocus MS``) unless a scripting call interrupts it (``goto_control``,
``goto_field``, ``hold``); ``resume_script`` restarts the step that was interrupted. Stage states::

    script 'control' / 'fields N':  MOVING (pan_ms) ──► DWELLING (dwell_ms) ──► next step
    script 'pause MS':              PAUSED (MS) ──► next step
    script 'defocus MS':            DEFOCUSED (MS; focus error 0 → DEFOCUS_PEAK_UM → 0) ──► next step
    any state ──goto_*()──► MOVING (pan_ms) ──► HELD          (script suspended)
    any state ──hold()────► HELD, where the stage is, in focus (script suspended)
    HELD ──resume_script()──► the interrupted step, from the current position

All time comes from the injected ``clock`` (seconds) and ``sleep``, so tests drive the microscope with a fake
clock and run instantly. Frames are rendered from the stage state at the frame's due time: a crop of the slide,
a box blur along the motion while moving, a Gaussian blur growing with the focus error, and sensor noise taken
from a precomputed pool. A still, focused view is not re-rendered: only the noise changes.

Faults (``config.faults``, drawn from a seeded generator): dropped frames (an index gap), frozen frames (the
previous buffer again, new index), corrupt frames (random bytes or a truncated, half-black transfer) and
disconnects (``read`` raises :class:`~daemon.frames.SourceError`, ``open`` fails until the device is back).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.daemon import SimulatedCameraConfig
from her2scope.config.scoring import MAX_PIXEL_SIZE_UM, MIN_PIXEL_SIZE_UM
from her2scope.daemon.frames import Frame, SourceError
from her2scope.synthetic import (
    DEFAULT_CELL_DIAMETER_UM,
    GLASS_LEVEL,
    HER2_CLASSES,
    MIN_CELL_PX,
    SyntheticCell,
    render_control,
    render_fov,
)

__all__ = [
    "DEFOCUS_BLUR_PER_UM",
    "DEFOCUS_PEAK_UM",
    "SENSOR_NOISE_SIGMA",
    "SimulatedMicroscope",
    "StageState",
    "StageStatus",
    "VirtualSlide",
    "build_slide",
]

DEFOCUS_PEAK_UM: Final[float] = 6.0
"""Largest focus error of a ``defocus MS`` script step, reached half way through it."""

DEFOCUS_BLUR_PER_UM: Final[float] = 0.4
"""Sigma of the Gaussian defocus blur (µm) per µm of focus error (about half the geometric blur radius of a
0.65 NA objective)."""

SENSOR_NOISE_SIGMA: Final[float] = 1.5
"""Temporal sensor noise in grey levels (the slide itself carries the generator's static noise)."""

_NOISE_CLIP: Final = 4  # temporal noise is clipped to ±4 grey levels and stored with this bias in uint8
_NOISE_POOL: Final = 2  # noise buffers; each frame takes a randomly offset crop of one of them
_NOISE_MARGIN: Final = 16  # extra rows/cols of the noise buffers, the range of the crop offsets
_CONTROL_GAP: Final = 0.5  # glass between the tumour area and the control, in field widths
_STILL_PX: Final = 0.5  # the stage moved less than this during a frame: no motion blur
_DEFOCUS_STEP_PX: Final = 0.25  # defocus blur sigmas are quantised to this (so a steady blur is cached)
_SEEDS: Final = {"tumour": 0, "control": 1, "noise": 2, "faults": 3}


class StageState(StrEnum):
    """What the simulated stage is doing."""

    MOVING = "moving"
    """Panning to a target (a script step or a ``goto_*`` call)."""
    DWELLING = "dwelling"
    """Resting on a target for ``dwell_ms`` (script)."""
    PAUSED = "paused"
    """Holding still for a ``pause MS`` script step."""
    DEFOCUSED = "defocused"
    """A ``defocus MS`` script step: the focus drifts off and back while the stage is still."""
    HELD = "held"
    """Stopped by :meth:`SimulatedMicroscope.hold` or after a ``goto_*`` arrival; the script is suspended."""


@dataclass(frozen=True, slots=True)
class StageStatus:
    """A snapshot of the simulated stage.

    Attributes
    ----------
    position_um : (float, float)
        (row, col) of the view's centre on the virtual slide, µm.
    state : StageState
    target : str or None
        Where the stage is heading or resting: ``"control"``, ``"field 3"``; None between fields (held mid-pan).
    focus_error_um : float
        Distance from the focal plane, µm (0 in focus).
    on_control : bool
        The view's centre lies on the positive-control field.
    scripted : bool
        The stage follows ``config.script`` (False after a scripting call until ``resume_script``).
    speed_um_s : float
        Current stage speed, µm/s.
    time_s : float
        Clock reading of the snapshot, seconds.
    """

    position_um: tuple[float, float]
    state: StageState
    target: str | None
    focus_error_um: float
    on_control: bool
    scripted: bool
    speed_um_s: float
    time_s: float


@dataclass(frozen=True, slots=True, eq=False)
class VirtualSlide:
    """The rendered virtual slide and its ground truth.

    Attributes
    ----------
    bgr : (M, N, 3) uint8 ndarray
        The whole slide, BGR, read-only.
    field_shape : (int, int)
        (rows, cols) of one field of view, px.
    field_origins : tuple of (int, int)
        Top-left pixel (row, col) of each tumour field, in visiting (serpentine) order.
    control_origin : (int, int)
        Top-left pixel of the positive-control field.
    field_cells : tuple of tuple of SyntheticCell
        Tumour cells per field, in slide pixel coordinates.
    control_cells : tuple of SyntheticCell
        Control cells, in slide pixel coordinates.
    pixel_size_um : float
    """

    bgr: npt.NDArray[np.uint8]
    field_shape: tuple[int, int]
    field_origins: tuple[tuple[int, int], ...]
    control_origin: tuple[int, int]
    field_cells: tuple[tuple[SyntheticCell, ...], ...]
    control_cells: tuple[SyntheticCell, ...]
    pixel_size_um: float


def field_layout(config: SimulatedCameraConfig) -> tuple[tuple[tuple[int, int], ...], tuple[int, int], tuple[int, int]]:
    """Where the fields lie on the virtual slide.

    Returns
    -------
    field_origins : tuple of (int, int)
        Top-left (row, col) px of each tumour field, serpentine order (row 0 left to right, row 1 back, ...).
    control_origin : (int, int)
        Top-left px of the control field (right of the tumour area, top row, glass in between).
    slide_shape : (int, int)
        (rows, cols) of the whole slide, px.
    """
    rows, cols = config.slide_fields
    h, w = config.height, config.width
    origins: list[tuple[int, int]] = []
    for r in range(rows):
        order = range(cols) if r % 2 == 0 else range(cols - 1, -1, -1)
        origins.extend((r * h, c * w) for c in order)
    control = (0, cols * w + round(_CONTROL_GAP * w))
    return tuple(origins), control, (rows * h, control[1] + w)


def build_slide(config: SimulatedCameraConfig, pixel_size_um: float) -> VirtualSlide:
    """Render the virtual slide of a simulated microscope (about 0.35 s per 1080x1920 field at 0.25 µm/px).

    Parameters
    ----------
    config : SimulatedCameraConfig
        ``width``, ``height``, ``slide_fields``, ``class_fractions``, ``batch_strength`` and ``seed`` are used.
    pixel_size_um : float
        µm per pixel of the camera.

    Returns
    -------
    VirtualSlide
        Deterministic for a given config and pixel size.
    """
    rows, cols = config.slide_fields
    if rows < 1 or cols < 1:
        raise ValueError(f"slide_fields must be at least (1, 1), got {config.slide_fields!r}")
    origins, control_origin, shape = field_layout(config)
    field_shape = (config.height, config.width)
    bgr = np.full((*shape, 3), GLASS_LEVEL, dtype=np.uint8)
    field_cells = []
    for i, origin in enumerate(origins):
        fov = render_fov(
            field_shape,
            pixel_size_um,
            config.class_fractions,
            batch_strength=config.batch_strength,
            seed=np.random.default_rng((config.seed, _SEEDS["tumour"], i)),
        )
        _paste(bgr, fov.rgb, origin)
        field_cells.append(_shift_cells(fov.cells, origin))
    control = render_control(
        field_shape,
        pixel_size_um,
        batch_strength=config.batch_strength,
        seed=np.random.default_rng((config.seed, _SEEDS["control"])),
    )
    _paste(bgr, control.rgb, control_origin)
    bgr.flags.writeable = False
    return VirtualSlide(
        bgr=bgr,
        field_shape=field_shape,
        field_origins=origins,
        control_origin=control_origin,
        field_cells=tuple(field_cells),
        control_cells=_shift_cells(control.cells, control_origin),
        pixel_size_um=pixel_size_um,
    )


# ------------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True, slots=True)
class _Move:
    """One planned stage movement: go to ``target_px`` (or stay) in ``duration_s``, in ``state``."""

    state: StageState
    duration_s: float
    target_px: tuple[float, float] | None = None
    target: str | None = None
    defocus_peak_um: float = 0.0


@dataclass(frozen=True, slots=True)
class _Segment:
    """A started movement: from ``p0`` at ``t0`` to ``p1`` at ``t1`` (cosine speed profile)."""

    state: StageState
    t0: float
    t1: float
    p0: tuple[float, float]
    p1: tuple[float, float]
    target: str | None
    defocus_peak_um: float

    def position(self, t: float) -> tuple[float, float]:
        if self.p0 == self.p1 or t >= self.t1:
            return self.p1
        u = max(0.0, (t - self.t0) / (self.t1 - self.t0))
        e = 0.5 - 0.5 * math.cos(math.pi * u)
        return (self.p0[0] + (self.p1[0] - self.p0[0]) * e, self.p0[1] + (self.p1[1] - self.p0[1]) * e)

    def focus_error(self, t: float) -> float:
        if self.defocus_peak_um == 0.0 or t >= self.t1:
            return 0.0
        u = max(0.0, (t - self.t0) / (self.t1 - self.t0))
        return self.defocus_peak_um * math.sin(math.pi * u)


_Unit = tuple[_Move, ...]  # one script step's worth of moves (a visit is a pan then a dwell)


def _parse_script(script: Sequence[str]) -> list[tuple[str, float]]:
    """``("control", "fields 6", "pause 500", "defocus 800")`` → ``[("control", 0), ("fields", 6), ...]``."""
    forms = "'control', 'fields N', 'pause MS' or 'defocus MS'"
    steps: list[tuple[str, float]] = []
    for text in script:
        words = text.lower().split()
        if words == ["control"]:
            steps.append(("control", 0.0))
            continue
        if len(words) != 2 or words[0] not in ("fields", "pause", "defocus"):
            raise ValueError(f"simulated stage script step {text!r} is not one of {forms}")
        try:
            value = float(words[1])
        except ValueError:
            raise ValueError(f"simulated stage script step {text!r}: {words[1]!r} is not a number") from None
        if not math.isfinite(value) or value <= 0 or (words[0] == "fields" and value != int(value)):
            raise ValueError(f"simulated stage script step {text!r}: expected a positive {forms}")
        steps.append((words[0], value))
    return steps


class _Stage:
    """The stage's timeline: a current segment and the moves queued after it. Not thread-safe (the owner locks)."""

    def __init__(
        self, config: SimulatedCameraConfig, slide_origins: Sequence[tuple[int, int]], control: tuple[int, int]
    ):
        self._steps = _parse_script(config.script)
        self._pan_s = config.pan_ms / 1000.0
        self._dwell_s = config.dwell_ms / 1000.0
        self._fields = [(float(r), float(c)) for r, c in slide_origins]
        self._control = (float(control[0]), float(control[1]))
        self._step = 0  # next script step
        self._next_field = 0  # next tumour field the script visits (cycles over all fields)
        self._fields_left = 0  # visits left in the current 'fields N' step
        self._scripted = True
        self._unit: _Unit = ()  # the script step in progress (restarted by resume_script after an interrupt)
        self._queue: deque[_Move] = deque()
        self._start = self._fields[0]
        self._segment: _Segment | None = None

    # ----------------------------------------------------------------------------------------- queries

    def status(self, t: float, pixel_size_um: float, field_shape: tuple[int, int]) -> StageStatus:
        seg = self.advance(t)
        row, col = seg.position(t)
        h, w = field_shape
        prev = seg.position(t - 1e-3)
        speed = math.hypot(row - prev[0], col - prev[1]) * pixel_size_um / 1e-3
        centre = (row + h / 2.0, col + w / 2.0)
        on_control = (
            self._control[0] <= centre[0] < self._control[0] + h
            and self._control[1] <= centre[1] < self._control[1] + w
        )
        return StageStatus(
            position_um=(centre[0] * pixel_size_um, centre[1] * pixel_size_um),
            state=seg.state,
            target=seg.target,
            focus_error_um=seg.focus_error(t),
            on_control=on_control,
            scripted=self._scripted,
            speed_um_s=speed,
            time_s=t,
        )

    def advance(self, t: float) -> _Segment:
        """The segment running at time ``t`` (starting the timeline at ``t`` if it has not started)."""
        if self._segment is None:
            here = self._start
            self._segment = _Segment(StageState.HELD, t, t, here, here, self._name_at(here), 0.0)
        while t >= self._segment.t1:
            self._segment = self._start_move(self._next_move(), self._segment.t1, self._segment.p1)
        return self._segment

    # ---------------------------------------------------------------------------------------- commands

    def goto(self, t: float, target: str, field: int | None) -> None:
        """Interrupt the script: pan to the control (``field`` None) or a tumour field and stay there."""
        position = self._control if field is None else self._fields[field]
        self._interrupt(t, (self._pan(position, target), _Move(StageState.HELD, math.inf, None, target)))

    def hold(self, t: float) -> None:
        """Interrupt the script and stop where the stage is now (in focus)."""
        seg = self.advance(t)
        here = seg.position(t)
        target = self._name_at(here)
        self._interrupt(t, ())
        self._segment = _Segment(StageState.HELD, t, math.inf, here, here, target, 0.0)

    def resume(self, t: float) -> None:
        """Follow the script again, restarting the step it was interrupted in."""
        if self._scripted:
            return
        seg = self.advance(t)
        here = seg.position(t)
        self._scripted = True
        self._queue = deque(self._unit)
        self._segment = _Segment(StageState.HELD, t, t, here, here, seg.target, 0.0)

    # -------------------------------------------------------------------------------------------- internals

    def _interrupt(self, t: float, moves: Sequence[_Move]) -> None:
        seg = self.advance(t)
        here = seg.position(t)
        self._scripted = False
        self._queue = deque(moves)
        self._segment = _Segment(StageState.HELD, t, t, here, here, seg.target, 0.0)

    def _name_at(self, position: tuple[float, float]) -> str | None:
        if position == self._control:
            return "control"
        for i, origin in enumerate(self._fields):
            if position == origin:
                return f"field {i}"
        return None

    def _pan(self, position: tuple[float, float], target: str) -> _Move:
        return _Move(StageState.MOVING, self._pan_s, position, target)

    def _next_move(self) -> _Move:
        while not self._queue:
            if not self._scripted or not self._steps:
                return _Move(StageState.HELD, math.inf, None, None)
            self._unit = self._next_unit()
            self._queue.extend(self._unit)
        return self._queue.popleft()

    def _next_unit(self) -> _Unit:
        kind, value = self._steps[self._step]
        if kind == "fields":
            # 'fields N' expands in place into N single-field visits, so that an interrupt restarts one visit.
            if self._fields_left == 0:
                self._fields_left = int(value)
            self._fields_left -= 1
            if self._fields_left == 0:
                self._step = (self._step + 1) % len(self._steps)
            i = self._next_field
            self._next_field = (i + 1) % len(self._fields)
            return self._visit(self._fields[i], f"field {i}")
        self._step = (self._step + 1) % len(self._steps)
        if kind == "control":
            return self._visit(self._control, "control")
        if kind == "pause":
            return (_Move(StageState.PAUSED, value / 1000.0),)
        return (_Move(StageState.DEFOCUSED, value / 1000.0, defocus_peak_um=DEFOCUS_PEAK_UM),)

    def _visit(self, position: tuple[float, float], target: str) -> _Unit:
        return (self._pan(position, target), _Move(StageState.DWELLING, self._dwell_s, position, target))

    def _start_move(self, move: _Move, t: float, here: tuple[float, float]) -> _Segment:
        target_px = here if move.target_px is None else move.target_px
        duration = move.duration_s
        if move.state is StageState.MOVING and math.dist(here, target_px) < _STILL_PX:
            duration = 0.0  # already there: no pan
        target = move.target
        if target is None:  # pause, defocus, or the end of an empty script: where the stage is
            target = self._name_at(target_px)
        return _Segment(move.state, t, t + duration, here, target_px, target, move.defocus_peak_um)


# ------------------------------------------------------------------------------------------- the microscope


class SimulatedMicroscope:
    """A camera on a microscope with a scripted stage over a synthetic HER2 slide; a :class:`FrameSource`.

    Parameters
    ----------
    config : SimulatedCameraConfig
        Frame size and rate, the slide (fields, class mix, batch strength, seed), the stage script and faults.
    pixel_size_um : float
        µm per camera pixel, in (0.05, 2] (tumour cells must be at least 6 px across).
    clock : callable returning float, optional
        Monotonic seconds; every timing (frames, stage, faults) uses it. Default ``time.monotonic``.
    sleep : callable taking float, optional
        Sleeps that many seconds (a fake clock's sleep advances it). Default ``time.sleep``.

    Notes
    -----
    The slide is rendered at the first :meth:`open` (or the first ground-truth query) and kept across reopens.
    The stage starts at the first open (or the first stage call) and keeps moving while the camera is closed or
    unplugged, like a real one. Frames are due every ``1 / fps`` seconds from open; ``index`` counts the sensor's
    frames, so frames a late reader missed (or dropped ones) show up as gaps. ``read`` may be called from one
    thread while another calls the scripting methods, :meth:`unplug` or :meth:`status`.
    """

    def __init__(
        self,
        config: SimulatedCameraConfig,
        pixel_size_um: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (isinstance(pixel_size_um, int | float) and MIN_PIXEL_SIZE_UM < pixel_size_um <= MAX_PIXEL_SIZE_UM):
            raise ValueError(
                f"pixel_size_um must be in ({MIN_PIXEL_SIZE_UM}, {MAX_PIXEL_SIZE_UM:g}] µm/px, got {pixel_size_um!r}"
            )
        if DEFAULT_CELL_DIAMETER_UM / pixel_size_um < MIN_CELL_PX:  # a camera this coarse sees no synthetic cell
            raise ValueError(
                f"the simulated slide's {DEFAULT_CELL_DIAMETER_UM:g} µm tumour cells need at least {MIN_CELL_PX:g} px "
                f"each: pixel_size_um must be at most {DEFAULT_CELL_DIAMETER_UM / MIN_CELL_PX:g} µm/px, got "
                f"{pixel_size_um!r}"
            )
        self._config = config
        self._px = float(pixel_size_um)
        self._clock = clock
        self._sleep = sleep
        self._period = 1.0 / config.fps
        origins, control, _ = field_layout(config)
        self._stage = _Stage(config, origins, control)  # validates the script
        self._lock = threading.RLock()
        self._slide: VirtualSlide | None = None
        self._noise_pool: list[npt.NDArray[np.uint8]] = []
        self._noise_rng = np.random.default_rng((config.seed, _SEEDS["noise"]))
        self._fault_rng = np.random.default_rng((config.seed, _SEEDS["faults"]))
        # Session (between open and close).
        self._is_open = False
        self._lost = False  # unplugged during this session: reads fail until reopened
        self._session_start = 0.0
        self._next_k = 0  # next sensor frame of this session (due at session_start + k * period)
        self._index_base = 0
        self._next_index = 0
        self._disconnect_at: float | None = None
        self._unplugged_until = -math.inf
        self._frozen_until = -math.inf
        self._last_image: npt.NDArray[np.uint8] | None = None
        # The rendered view before noise, reused while the stage is still and in focus.
        self._view_key: tuple[int, int, int, int, float] | None = None
        self._view: npt.NDArray[np.uint8] | None = None

    # ------------------------------------------------------------------------------------ FrameSource

    @property
    def name(self) -> str:
        """``"simulated"``."""
        return "simulated"

    def open(self) -> None:
        """Open (or reopen) the camera; SourceError while it is unplugged. Builds the slide the first time."""
        with self._lock:
            now = self._clock()
            if now < self._unplugged_until:
                raise SourceError(
                    f"simulated camera unplugged; it comes back in {(self._unplugged_until - now) * 1000:.0f} ms"
                )
            self._ensure_slide()
            now = self._clock()  # building the slide takes a while on a real clock
            self._stage.advance(now)
            self._is_open = True
            self._lost = False
            self._session_start = now
            self._next_k = 0
            self._index_base = self._next_index
            after = self._config.faults.disconnect_after_ms
            self._disconnect_at = None if after is None else now + after / 1000.0
            self._frozen_until = -math.inf
            self._last_image = None

    def read(self, timeout_ms: float) -> Frame | None:
        """The next frame, paced at ``config.fps`` by the clock; None if none is due within ``timeout_ms``.

        Raises
        ------
        SourceError
            The camera is not open, or it was unplugged (reopen it once it is back).
        """
        deadline = self._clock() + max(0.0, timeout_ms) / 1000.0
        while True:
            with self._lock:
                now = self._clock()
                self._check_connected(now)
                elapsed = (now - self._session_start) / self._period
                latest = math.floor(elapsed + 1e-6)
                if latest >= self._next_k:
                    frame = self._deliver(latest)
                    if frame is not None:
                        return frame
                    continue  # dropped: wait for the next one
                due = self._session_start + self._next_k * self._period
                wake = min(due, deadline, math.inf if self._disconnect_at is None else self._disconnect_at)
            if now >= deadline:
                return None
            self._sleep(max(0.0, wake - now))

    def close(self) -> None:
        """Close the camera; safe to call twice. The slide and the stage are kept."""
        with self._lock:
            self._is_open = False
            self._lost = False
            self._disconnect_at = None
            self._last_image = None
            self._view_key = None
            self._view = None

    # ------------------------------------------------------------------------------ stage scripting

    def status(self) -> StageStatus:
        """A snapshot of the stage now."""
        with self._lock:
            return self._stage.status(self._clock(), self._px, self._field_shape)

    def stage_report(self) -> dict[str, Any]:
        """The stage now, as the daemon's ``stage`` command replies (``daemon.frames.StageControl``)."""
        status = self.status()
        return {
            "state": status.state.value,
            "target": status.target,
            "on_control": status.on_control,
            "position_um": list(status.position_um),
        }

    def goto_control(self) -> None:
        """Interrupt the script: pan to the positive control and stay there."""
        with self._lock:
            self._stage.goto(self._clock(), "control", None)

    def goto_field(self, field: int) -> None:
        """Interrupt the script: pan to tumour field ``field`` (0 to ``n_fields - 1``) and stay there."""
        if isinstance(field, bool) or not isinstance(field, int | np.integer) or not 0 <= field < self.n_fields:
            raise ValueError(f"field must be an integer in [0, {self.n_fields - 1}], got {field!r}")
        with self._lock:
            self._stage.goto(self._clock(), f"field {int(field)}", int(field))

    def hold(self) -> None:
        """Interrupt the script and stop the stage where it is now (in focus)."""
        with self._lock:
            self._stage.hold(self._clock())

    def resume_script(self) -> None:
        """Follow the script again, restarting the step it was interrupted in; no-op if it is running."""
        with self._lock:
            self._stage.resume(self._clock())

    # ---------------------------------------------------------------------------------------- faults

    def unplug(self, duration_ms: float) -> None:
        """Unplug the camera now for ``duration_ms``: reads fail, and ``open`` fails until it is back."""
        if not duration_ms >= 0:
            raise ValueError(f"duration_ms must be >= 0, got {duration_ms!r}")
        with self._lock:
            self._unplugged_until = max(self._unplugged_until, self._clock() + duration_ms / 1000.0)
            self._lost = self._is_open

    def freeze(self, duration_ms: float | None = None) -> None:
        """Freeze the sensor: every frame repeats the last one, for ``duration_ms`` or (None) until reopened."""
        with self._lock:
            self._frozen_until = math.inf if duration_ms is None else self._clock() + duration_ms / 1000.0

    # ---------------------------------------------------------------------------------- ground truth

    @property
    def n_fields(self) -> int:
        """Number of tumour fields on the slide (``rows * cols`` of ``config.slide_fields``)."""
        rows, cols = self._config.slide_fields
        return rows * cols

    @property
    def slide(self) -> VirtualSlide:
        """The virtual slide (rendered on first use)."""
        return self._ensure_slide()

    def field_truth(self, field: int) -> dict[str, int]:
        """Ground-truth tumour cells per HER2 class of tumour field ``field`` (keys ``HER2_CLASSES``)."""
        if not 0 <= field < self.n_fields:
            raise ValueError(f"field must be in [0, {self.n_fields - 1}], got {field!r}")
        return _counts(self._ensure_slide().field_cells[field])

    def control_truth(self) -> dict[str, int]:
        """Ground-truth tumour cells per HER2 class of the positive-control field (all 3+)."""
        return _counts(self._ensure_slide().control_cells)

    def cells_in_view(self) -> tuple[SyntheticCell, ...]:
        """The synthetic tumour cells whose centre lies in the current view, in view pixel coordinates."""
        slide = self._ensure_slide()
        with self._lock:
            t = self._clock()
            row, col = self._stage.advance(t).position(t)
        r0, c0 = self._crop_origin(slide, row, col)
        h, w = slide.field_shape
        cells = [*(c for field in slide.field_cells for c in field), *slide.control_cells]
        inside = [c for c in cells if r0 - 0.5 <= c.row < r0 + h - 0.5 and c0 - 0.5 <= c.col < c0 + w - 0.5]
        return _shift_cells(tuple(inside), (-r0, -c0))

    # ------------------------------------------------------------------------------------- internals

    @property
    def _field_shape(self) -> tuple[int, int]:
        return (self._config.height, self._config.width)

    def _ensure_slide(self) -> VirtualSlide:
        with self._lock:
            if self._slide is None:
                self._slide = build_slide(self._config, self._px)
                h, w = self._field_shape
                shape = (h + _NOISE_MARGIN, w + _NOISE_MARGIN, 3)
                for _ in range(_NOISE_POOL):
                    noise = self._noise_rng.normal(_NOISE_CLIP, SENSOR_NOISE_SIGMA, shape).astype(np.float32)
                    np.clip(np.rint(noise), 0, 2 * _NOISE_CLIP, out=noise)
                    pooled = noise.astype(np.uint8)
                    pooled.flags.writeable = False
                    self._noise_pool.append(pooled)
            return self._slide

    def _check_connected(self, now: float) -> None:
        if not self._is_open:
            raise SourceError("simulated camera is not open; call open() first")
        if self._disconnect_at is not None and now >= self._disconnect_at:
            back = self._disconnect_at + self._config.faults.disconnect_for_ms / 1000.0
            self._unplugged_until = max(self._unplugged_until, back)
            self._disconnect_at = None
            self._lost = True
        if self._lost:
            raise SourceError("simulated camera unplugged (simulated fault); reopen it once it is back")

    def _deliver(self, k: int) -> Frame | None:
        """Sensor frame ``k`` of this session, with faults; None if it is dropped."""
        t = self._session_start + k * self._period
        index = self._index_base + k
        self._next_k = k + 1
        self._next_index = index + 1
        faults = self._config.faults
        u = float(self._fault_rng.random())
        drop = faults.drop_probability
        freeze = drop + faults.freeze_probability
        corrupt = freeze + faults.corrupt_probability
        if u < drop:
            return None
        if (u < freeze or t < self._frozen_until) and self._last_image is not None:
            image = self._last_image
        else:
            image = self._render(t)
            if freeze <= u < corrupt:
                image = self._corrupt(image)
        self._last_image = image
        return Frame(image=image, index=index, timestamp_ms=t * 1000.0)

    def _crop_origin(self, slide: VirtualSlide, row: float, col: float) -> tuple[int, int]:
        h, w = slide.field_shape
        rows, cols = slide.bgr.shape[:2]
        return min(max(round(row), 0), rows - h), min(max(round(col), 0), cols - w)

    def _render(self, t: float) -> npt.NDArray[np.uint8]:
        """The camera image at time ``t``: the view (cached while unchanged) plus a fresh draw of sensor noise."""
        slide = self._ensure_slide()
        segment = self._stage.advance(t)
        row, col = segment.position(t)
        before = segment.position(t - self._period)
        r0, c0 = self._crop_origin(slide, row, col)
        blur_rows = round(abs(row - before[0]))
        blur_cols = round(abs(col - before[1]))
        sigma_px = DEFOCUS_BLUR_PER_UM * segment.focus_error(t) / self._px
        sigma_q = round(sigma_px / _DEFOCUS_STEP_PX) * _DEFOCUS_STEP_PX
        key = (r0, c0, blur_rows, blur_cols, sigma_q)
        if key != self._view_key or self._view is None:
            self._view = _optics(slide, (r0, c0), (blur_rows, blur_cols), sigma_q)
            self._view_key = key
        h, w = slide.field_shape
        pool = self._noise_pool[int(self._noise_rng.integers(len(self._noise_pool)))]
        dr, dc = (int(v) for v in self._noise_rng.integers(0, _NOISE_MARGIN + 1, 2))
        noise = pool[dr : dr + h, dc : dc + w]
        image = np.asarray(
            cv2.addWeighted(self._view, 1.0, noise, 1.0, -float(_NOISE_CLIP), dtype=cv2.CV_8U), dtype=np.uint8
        )
        image.flags.writeable = False
        return image

    def _corrupt(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Garbage of the frame's shape: random bytes, or a transfer that stopped part way (black below)."""
        if self._fault_rng.random() < 0.5:
            garbage = np.frombuffer(self._fault_rng.bytes(image.size), dtype=np.uint8).reshape(image.shape)
        else:
            garbage = image.copy()
            garbage[int(self._fault_rng.integers(image.shape[0] // 4, 3 * image.shape[0] // 4)) :] = 0
            garbage.flags.writeable = False
        return garbage


# ------------------------------------------------------------------------------------------------- helpers


def _optics(
    slide: VirtualSlide, origin: tuple[int, int], motion_px: tuple[int, int], defocus_sigma_px: float
) -> npt.NDArray[np.uint8]:
    """The view at ``origin`` with a box blur over the motion (rows, cols) and a Gaussian defocus blur.

    The motion blur is a box of the per-frame displacement (a line for pans along a row or a column, a rectangle
    for diagonal ones: cheap, and close enough for a stability detector). Wide Gaussian blurs are computed on a
    downscaled view and scaled back up.
    """
    h, w = slide.field_shape
    r0, c0 = origin
    view = slide.bgr[r0 : r0 + h, c0 : c0 + w]
    if max(motion_px) > 1:
        view = np.asarray(cv2.blur(view, (max(1, motion_px[1]), max(1, motion_px[0]))), dtype=np.uint8)
    if defocus_sigma_px > 0.3:
        factor = min(8, max(1, int(defocus_sigma_px // 2)))
        if factor == 1:
            view = np.asarray(cv2.GaussianBlur(view, (0, 0), defocus_sigma_px), dtype=np.uint8)
        else:
            small = cv2.resize(view, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
            small = cv2.GaussianBlur(small, (0, 0), defocus_sigma_px / factor)
            view = np.asarray(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    return view


def _paste(canvas: npt.NDArray[np.uint8], rgb: npt.NDArray[np.uint8], origin: tuple[int, int]) -> None:
    rows, cols = rgb.shape[:2]
    canvas[origin[0] : origin[0] + rows, origin[1] : origin[1] + cols] = rgb[:, :, ::-1]


def _shift_cells(cells: tuple[SyntheticCell, ...], offset: tuple[int, int]) -> tuple[SyntheticCell, ...]:
    dr, dc = offset
    return tuple(
        dataclasses.replace(
            c, row=c.row + dr, col=c.col + dc, nucleus_row=c.nucleus_row + dr, nucleus_col=c.nucleus_col + dc
        )
        for c in cells
    )


def _counts(cells: Sequence[SyntheticCell]) -> dict[str, int]:
    out = dict.fromkeys(HER2_CLASSES, 0)
    for cell in cells:
        out[cell.her2_class] += 1
    return out
