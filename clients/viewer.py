"""The viewer: the monitor beside the microscope, drawn from the daemon's messages by a pure reducer.

Three layers, each testable on its own:

- **state**: ``ViewerState``, a frozen dataclass, changed only by ``apply(state, event) -> state``. Events are the
  daemon's published messages (decoded ``Message`` or raw frames; malformed ones are counted and skipped) and the
  viewer's own: ``Tick`` (the clock), ``Snapshot``, ``ImageFetched``, ``Replied``, ``Click``, ``Hover``. Keys go
  through ``press(state, key) -> (state, actions)``: the actions (``Send`` a command, ``Quit``) are carried out by
  the link, whose replies come back as events.
- **rendering**: ``render(state, size) -> BGR ndarray`` is a pure function of the state. The text it draws comes from
  pure functions too (``status_segments``, ``panel_lines``, ``footer_segments``); ``terminal_summary`` is the same
  content as plain text for a terminal.
- **I/O**: ``DaemonLink`` holds the sockets: previews on a SUB socket of their own with a tiny high-water mark,
  drained every tick keeping only the newest (a slow viewer drops frames, it never slows the daemon); the other
  topics on a second SUB socket, in order, with gap detection (``replay``) and a ``snapshot`` at start and after a
  daemon restart (new ``session``). ``run_window`` (OpenCV highgui) and ``run_headless`` (PNG frames) only feed
  messages, keys and mouse events into the state and show ``render(state)``.

Coordinates: polygons are sent as ``[row, col]`` in full-resolution FOV pixels; the display shows the FOV at the
overlay's width, letterboxed into its pane (``display_to_fov`` / ``fov_to_display`` map between the two).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import zmq

from clients.control import ControlClient, ControlError, read_endpoints
from daemon.protocol import (
    CaptureBody,
    CaseBody,
    Message,
    OverlayBody,
    PreviewBody,
    ProtocolError,
    ResultBody,
    Topic,
    decode,
)
from scoring.overlay import CLASS_COLOURS, LAYER_NAMES, compose
from scoring.results import Her2Score

Image = npt.NDArray[np.uint8]
BGR = tuple[int, int, int]
Size = tuple[int, int]  # (rows, cols) of a canvas, like an ndarray's shape
Vertex = tuple[float, float]  # (row, col) in full-resolution FOV pixels
Mode = Literal["view", "roi", "weak", "intense"]

DEFAULT_SIZE: Size = (900, 1600)
MAX_CACHED_FOVS = 12
#: Layers shown at start. The daemon's ``panel`` layer is off: the viewer prints the same facts beside the image,
#: in a font that stays sharp at any size (key 5 shows it).
VIEWER_LAYERS: tuple[str, ...] = ("cells", "completeness", "region")
#: No heartbeat for this many intervals: the daemon is taken as gone (protocol.md, section 4.5).
SILENT_INTERVALS = 3.0

KEY_TAB, KEY_ENTER, KEY_RETURN, KEY_ESC, KEY_BACKSPACE, KEY_DELETE = 9, 13, 10, 27, 8, 127
LAYER_KEYS: Mapping[str, str] = {str(i + 1): name for i, name in enumerate(LAYER_NAMES)}
MODE_NAMES: Mapping[Mode, str] = {"roi": "ROI", "weak": "weak-staining region", "intense": "intense region"}
MODE_COMMANDS: Mapping[Mode, str] = {"roi": "set-roi", "weak": "set-weak", "intense": "set-intense"}
HELP: tuple[tuple[str, str], ...] = (
    ("space", "capture"),
    ("k", "control"),
    ("n", "new case"),
    ("x", "close case"),
    ("a", "auto-capture"),
    ("1-5", "layers"),
    ("tab", "live/FOV"),
    ("r", "ROI"),
    ("w", "weak"),
    ("i", "intense"),
    ("e", "exclude"),
    ("esc", "cancel"),
    ("q", "quit"),
)

# Colours, BGR.
BACKGROUND: BGR = (30, 27, 25)
SURFACE: BGR = (46, 42, 39)
TEXT: BGR = (240, 240, 240)
MUTED: BGR = (170, 165, 160)
GOOD: BGR = (110, 200, 80)
WARN: BGR = (40, 180, 250)
BAD: BGR = (70, 70, 235)
ACCENT: BGR = (230, 190, 60)
BAR: BGR = (22, 20, 19)
DRAW: BGR = (255, 80, 255)
CLASS_BGR: Mapping[str, BGR] = {
    score.value: (colour[2], colour[1], colour[0]) for score, colour in CLASS_COLOURS.items()
}
STABILITY_COLOURS: Mapping[str, BGR] = {"moving": WARN, "settling": (60, 220, 230), "stable": GOOD, "captured": ACCENT}
CLASSES: tuple[str, ...] = tuple(score.value for score in Her2Score)

EMPTY_CASE: Mapping[str, Any] = {
    "case_id": None,
    "open": False,
    "operator": None,
    "started_at": None,
    "closed_at": None,
    "adjustments": [],
    "fovs": [],
    "control": None,
    "case": None,
}


# --- state --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FovView:
    """A captured FOV (or control) as the viewer shows it.

    Attributes
    ----------
    base : (M, N, 3) uint8 BGR ndarray or None
        The FOV downscaled for display: the preview at capture, then the lossless image from the daemon.
    shape : (rows, cols) of the full-resolution FOV, known once its image was fetched; polygons need it.
    image : whether the lossless image is still ``"wanted"``, ``"fetched"`` or ``"failed"``.
    layers : overlay layer name -> (H, W, 4) uint8 BGRA ndarray, at the overlay's size.
    composite : ``base`` with the visible layers blended in, at the overlay's size (None: compute when drawn).
    """

    fov_id: str
    kind: str
    case_id: str | None
    base: Image | None = None
    shape: tuple[int, int] | None = None
    image: Literal["wanted", "fetched", "failed"] = "wanted"
    layers: Mapping[str, Image] = field(default_factory=dict)
    overlay_seq: int = -1
    composite: Image | None = None
    composite_layers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ViewerState:
    """Everything the viewer shows; built by ``apply`` from the messages it received (``now``: monotonic s)."""

    now: float = 0.0
    started_at: float = 0.0
    heartbeat_s: float = 1.0
    session: str | None = None
    last_seq: int = 0
    topic_seqs: Mapping[str, int] = field(default_factory=dict)
    resync: Literal["snapshot", "replay"] | None = "snapshot"
    last_heard: float | None = None
    status: Mapping[str, Any] | None = None
    status_seq: int = 0
    case: Mapping[str, Any] = field(default_factory=lambda: EMPTY_CASE)
    preview: Image | None = None
    preview_frame_index: int = -1
    preview_session: str | None = None
    preview_body: Mapping[str, Any] | None = None
    fovs: Mapping[str, FovView] = field(default_factory=dict)
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    shown_fov: str | None = None
    big: Literal["live", "fov"] = "live"
    big_follows: bool = True
    visible_layers: tuple[str, ...] = VIEWER_LAYERS
    mode: Mode = "view"
    mode_fov: str | None = None
    polygon: tuple[Vertex, ...] = ()
    hover: tuple[int, int] | None = None
    notice: str = ""
    notice_error: bool = False
    malformed: int = 0
    last_malformed: str = ""


def initial_state(now: float, heartbeat_s: float = 1.0) -> ViewerState:
    """The state before anything was received; ``heartbeat_s`` is the daemon's status interval."""
    return ViewerState(now=now, started_at=now, heartbeat_s=heartbeat_s, notice="connecting to the daemon…")


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock moved on (monotonic seconds)."""

    now: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The reply to ``snapshot``: ``{"last_seq", "session", "case", "status"}``."""

    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ImageFetched:
    """The reply to ``image``: the FOV's lossless image (BGR), or None and an error when it could not be had."""

    fov_id: str
    image: Image | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Replied:
    """The daemon's reply to a command the viewer sent."""

    command: str
    ok: bool
    data: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Click:
    """A left click at display pixel ``(x, y)`` of a canvas of ``size``."""

    x: int
    y: int
    size: Size = DEFAULT_SIZE


@dataclass(frozen=True, slots=True)
class Hover:
    """The mouse moved to display pixel ``(x, y)`` of a canvas of ``size``."""

    x: int
    y: int
    size: Size = DEFAULT_SIZE


@dataclass(frozen=True, slots=True)
class Send:
    """An action: send ``command`` with ``args`` to the daemon's control endpoint."""

    command: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Quit:
    """An action: close the viewer."""


Event = Message | Sequence[bytes] | Tick | Snapshot | ImageFetched | Replied | Click | Hover
Action = Send | Quit


# --- the reducer --------------------------------------------------------------------------------------------------


def apply(state: ViewerState, event: Event) -> ViewerState:
    """The state after ``event``; a malformed message is counted and skipped, it never raises."""
    match event:
        case Tick(now=now):
            return dataclasses.replace(state, now=now)
        case Snapshot():
            return _guard(state, lambda: _apply_snapshot(state, event.data), "snapshot")
        case ImageFetched():
            return _guard(state, lambda: _apply_image(state, event), "image")
        case Replied():
            return _apply_reply(state, event)
        case Click():
            return _apply_click(state, event)
        case Hover(x=x, y=y):
            return dataclasses.replace(state, hover=(x, y)) if state.mode != "view" else state
        case Message():
            return _guard(state, lambda: _apply_message(state, event), event.header.topic.value)
    try:
        message = decode(event)
    except ProtocolError as error:
        return _malformed(state, str(error))
    return apply(state, message)


def _guard(state: ViewerState, update: Callable[[], ViewerState], what: str) -> ViewerState:
    try:
        return update()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, cv2.error) as error:
        return _malformed(state, f"{what}: {type(error).__name__}: {error}")


def _malformed(state: ViewerState, reason: str) -> ViewerState:
    return dataclasses.replace(state, malformed=state.malformed + 1, last_malformed=reason[:160])


def _apply_message(state: ViewerState, message: Message) -> ViewerState:
    header = message.header
    if header.session and header.session != state.session and state.session is not None:
        # the daemon restarted: its sequence numbers start again; a snapshot replaces what we knew
        state = dataclasses.replace(state, session=header.session, last_seq=0, topic_seqs={}, resync="snapshot")
    elif state.session is None and header.session:
        state = dataclasses.replace(state, session=header.session)
    topic = header.topic
    if topic == Topic.PREVIEW:
        return _apply_preview(state, message)
    if header.seq <= state.last_seq:
        # already part of the snapshot; overlays are not in snapshots, so an older one is still welcome
        return _apply_overlay(state, message) if topic == Topic.OVERLAY else state
    known = state.topic_seqs.get(topic.value)
    if known is not None and header.topic_seq > known + 1 and state.resync is None:
        return dataclasses.replace(state, resync="replay")  # not applied: the replay brings it, in order
    state = dataclasses.replace(
        state, last_seq=header.seq, topic_seqs={**state.topic_seqs, topic.value: header.topic_seq}
    )
    match topic:
        case Topic.STATUS:
            return dataclasses.replace(
                state, status=message.body.model_dump(), status_seq=header.seq, last_heard=state.now
            )
        case Topic.CAPTURE:
            return _apply_capture(state, message)
        case Topic.RESULT:
            body = message.body
            assert isinstance(body, ResultBody)
            state = _with_case(state, dict(body.case))
            if body.result is None or header.case_id != state.case.get("case_id"):
                return state
            return dataclasses.replace(state, results={**state.results, body.fov_id: _result_facts(body.result)})
        case Topic.CASE:
            case_body = message.body
            assert isinstance(case_body, CaseBody)
            state = _with_case(state, dict(case_body.case))
            return _notice(state, f"case {case_body.case.get('case_id')} {case_body.event}")
        case Topic.OVERLAY:
            return _apply_overlay(state, message)
    return state


def _result_facts(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """What the viewer prints about a scored FOV (a FovResult without its cell list)."""
    call = result["call"]
    return {
        "score": call["score"],
        "status": call["status"],
        "her2_low": call["her2_low"],
        "reason": call["reason"],
        "counts": dict(result["counts"]),
        "percentages": dict(result["percentages"]),
        "intense_threshold_od": float(result["intense_threshold_od"]),
        "intense_threshold_source": str(result["intense_threshold_source"]),
        "weak_threshold_od": float(result["weak_threshold_od"]),
        "warnings": [str(w) for w in result["warnings"]],
    }


def _with_case(state: ViewerState, case: Mapping[str, Any]) -> ViewerState:
    if not isinstance(case.get("fovs", []), list):
        raise TypeError("case summary 'fovs' is not a list")
    case_id = case.get("case_id")
    fovs, results = state.fovs, state.results
    if case_id is not None and case_id != state.case.get("case_id"):
        fovs = {k: v for k, v in fovs.items() if v.case_id == case_id}  # FOV ids start again in every case
        results = {}
    shown = state.shown_fov if state.shown_fov in fovs else None
    return dataclasses.replace(state, case=case, fovs=fovs, results=results, shown_fov=shown)


def _apply_snapshot(state: ViewerState, data: Mapping[str, Any]) -> ViewerState:
    state = _with_case(state, dict(data["case"]))
    return dataclasses.replace(
        state,
        session=str(data["session"]),
        last_seq=int(data["last_seq"]),
        topic_seqs={},
        resync=None,
        status=dict(data["status"]),
        status_seq=int(data["last_seq"]),
        last_heard=state.now,
        notice="connected to the daemon" if state.notice.startswith("connecting") else state.notice,
    )


def _decode_image(data: bytes, flags: int) -> Image:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if image is None:
        raise ValueError("an image payload cannot be decoded")
    decoded: Image = np.asarray(image, dtype=np.uint8)
    decoded.flags.writeable = False  # state is immutable: nothing draws into a received image
    return decoded


def _apply_preview(state: ViewerState, message: Message) -> ViewerState:
    body = message.body
    assert isinstance(body, PreviewBody)
    same_session = message.header.session == state.preview_session
    if same_session and body.frame_index <= state.preview_frame_index:
        return state  # stale: an older frame never replaces a newer one
    image = _decode_image(message.payload("preview"), cv2.IMREAD_COLOR)
    big, follows = state.big, state.big_follows
    if follows and big == "fov" and body.stability == "moving" and state.mode == "view":
        big = "live"  # the slide moves again: back to the live view
    return dataclasses.replace(
        state,
        preview=image,
        preview_frame_index=body.frame_index,
        preview_session=message.header.session,
        preview_body=body.model_dump(),
        big=big,
    )


def _apply_capture(state: ViewerState, message: Message) -> ViewerState:
    body = message.body
    assert isinstance(body, CaptureBody)
    fov = FovView(body.fov_id, body.kind, message.header.case_id, base=state.preview)
    state = _store_fov(state, fov)
    if state.mode != "view":
        return state
    big = "fov" if state.big_follows else state.big
    return _show(dataclasses.replace(state, big=big), body.fov_id)


def _apply_overlay(state: ViewerState, message: Message) -> ViewerState:
    body = message.body
    assert isinstance(body, OverlayBody)
    fov = state.fovs.get(body.fov_id)
    if fov is not None and fov.case_id != message.header.case_id:
        fov = None  # an id of an earlier case
    if fov is not None and fov.overlay_seq >= message.header.seq:
        return state
    if fov is None:
        if message.header.case_id != state.case.get("case_id"):
            return state
        fov = FovView(body.fov_id, body.kind, message.header.case_id)
    layers: dict[str, Image] = {}
    for name in body.layers:
        layer = _decode_image(message.payload(name), cv2.IMREAD_UNCHANGED)
        if layer.ndim != 3 or layer.shape[2] != 4 or layer.shape[:2] != (body.height, body.width):
            raise ValueError(f"overlay layer {name!r} is {layer.shape}, expected ({body.height}, {body.width}, 4)")
        layers[name] = layer
    base = fov.base
    if base is not None and base.shape[1] > body.width:  # keep it at the overlay's size: less to blend per frame
        base = np.asarray(cv2.resize(base, (body.width, body.height), interpolation=cv2.INTER_AREA), np.uint8)
        base.flags.writeable = False
    fov = dataclasses.replace(fov, base=base, layers=layers, overlay_seq=message.header.seq, composite=None)
    state = _store_fov(state, fov)
    return _show(state, body.fov_id) if state.shown_fov is None else _refresh_composite(state)


def _apply_image(state: ViewerState, event: ImageFetched) -> ViewerState:
    fov = state.fovs.get(event.fov_id)
    if fov is None:
        return state
    if event.image is None:
        fov = dataclasses.replace(fov, image="failed")
        state = _notice(state, f"the image of {event.fov_id} is not available: {event.error}", error=True)
        return _store_fov(state, fov)
    rows, cols = event.image.shape[:2]
    layer = next(iter(fov.layers.values()), None)
    width = layer.shape[1] if layer is not None else min(cols, 1280)
    base = event.image
    if width < cols:
        base = np.asarray(cv2.resize(base, (width, max(1, round(rows * width / cols))), interpolation=cv2.INTER_AREA))
    base.flags.writeable = False
    fov = dataclasses.replace(fov, base=base, shape=(rows, cols), image="fetched", composite=None)
    return _refresh_composite(_store_fov(state, fov))


def _store_fov(state: ViewerState, fov: FovView) -> ViewerState:
    fovs = {k: v for k, v in state.fovs.items() if k != fov.fov_id}
    fovs[fov.fov_id] = fov  # most recent last
    keep = {state.shown_fov, state.mode_fov, fov.fov_id}
    while len(fovs) > MAX_CACHED_FOVS:
        oldest = next(k for k in fovs if k not in keep)
        del fovs[oldest]
    return dataclasses.replace(state, fovs=fovs)


def _show(state: ViewerState, fov_id: str | None) -> ViewerState:
    return _refresh_composite(dataclasses.replace(state, shown_fov=fov_id))


def _refresh_composite(state: ViewerState) -> ViewerState:
    """Keep the shown FOV's composite up to date (so that rendering it is a resize)."""
    fov = state.fovs.get(state.shown_fov or "")
    if fov is None or (fov.composite is not None and fov.composite_layers == state.visible_layers):
        return state
    composite = composite_image(fov, state.visible_layers)
    if composite is None:
        return state
    composite.flags.writeable = False
    fov = dataclasses.replace(fov, composite=composite, composite_layers=state.visible_layers)
    return dataclasses.replace(state, fovs={**state.fovs, fov.fov_id: fov})


def image_wanted(state: ViewerState) -> str | None:
    """The FOV whose lossless image should be fetched now, if any: the shown one, once it is needed.

    Until its overlay is there the preview at capture stands in for it, and the daemon, which encodes a FOV it has
    not written to disk yet, is only asked once a heartbeat after the overlay says every image is on disk. Drawing a
    region needs the FOV's size: then it is fetched at once.
    """
    fov = state.fovs.get(state.shown_fov or "")
    if fov is None or fov.image != "wanted" or not daemon_responding(state):
        return None
    if state.mode != "view" and state.mode_fov == fov.fov_id:
        return fov.fov_id
    written = state.status_seq > fov.overlay_seq and not (state.status or {}).get("unsaved_images")
    return fov.fov_id if fov.layers and written else None


def composite_image(fov: FovView, visible: Sequence[str]) -> Image | None:
    """The FOV's base image with its ``visible`` overlay layers blended in (BGR), at the overlay's size.

    Without layers it is the base image; without a base image the layers are drawn on dark grey; None when
    there is neither.
    """
    layer = next(iter(fov.layers.values()), None)
    if layer is None:
        return None if fov.base is None else np.array(fov.base)
    rows, cols = layer.shape[:2]
    if fov.base is None:
        base = np.full((rows, cols, 3), 60, np.uint8)
    elif fov.base.shape[:2] != (rows, cols):
        base = np.asarray(cv2.resize(fov.base, (cols, rows), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    else:
        base = np.asarray(fov.base, dtype=np.uint8)
    names = [name for name in LAYER_NAMES if name in visible and name in fov.layers]
    return compose(base, [fov.layers[name] for name in names])


def _notice(state: ViewerState, text: str, error: bool = False) -> ViewerState:
    return dataclasses.replace(state, notice=text, notice_error=error)


def _apply_reply(state: ViewerState, reply: Replied) -> ViewerState:
    if not reply.ok:
        return _notice(state, f"{reply.command} failed: {reply.error}", error=True)
    data = reply.data
    match reply.command:
        case "capture" | "capture-control":
            return _notice(state, f"captured {data.get('fov_id')}: scoring…")
        case "start-case":
            return _notice(state, f"case {data.get('case_id')} started")
        case "close-case":
            return _notice(state, f"case {data.get('case_id')} closed")
        case "auto-capture":
            return _notice(state, f"auto-capture {'on' if data.get('auto_capture') else 'off'}")
        case "set-roi" | "set-intense":
            return _notice(state, f"{reply.command} sent for {data.get('fov_id')}: re-scoring…")
        case "set-weak":
            return _notice(state, f"weak threshold {data.get('weak_threshold_od', 0):.3f} OD: re-scoring all FOVs…")
        case "exclude" | "include":
            return _notice(state, f"{data.get('fov_id')} {'excluded' if data.get('excluded') else 'included'}")
    return state


# --- keys and mouse -----------------------------------------------------------------------------------------------


def press(state: ViewerState, key: int) -> tuple[ViewerState, tuple[Action, ...]]:
    """The state after a key press and the actions it asks for (commands to send, quitting)."""
    char = chr(key) if 32 <= key < 127 else ""
    if char == "q":
        return state, (Quit(),)
    if key == KEY_ESC:
        return _notice(_leave_mode(state), "cancelled" if state.mode != "view" else ""), ()
    if state.mode != "view":
        if key in (KEY_ENTER, KEY_RETURN):
            return _finish_polygon(state)
        if key in (KEY_BACKSPACE, KEY_DELETE):
            return dataclasses.replace(state, polygon=state.polygon[:-1]), ()
    if char in LAYER_KEYS:
        name = LAYER_KEYS[char]
        shown = set(state.visible_layers) ^ {name}
        visible = tuple(n for n in LAYER_NAMES if n in shown)
        on = "on" if name in visible else "off"
        return _notice(_refresh_composite(dataclasses.replace(state, visible_layers=visible)), f"{name} {on}"), ()
    if key == KEY_TAB:
        if state.big == "live" and state.shown_fov is None:
            return _notice(state, "no FOV captured yet: press space to capture one"), ()
        return dataclasses.replace(state, big="fov" if state.big == "live" else "live", big_follows=False), ()
    modes: Mapping[str, Mode] = {"r": "roi", "w": "weak", "i": "intense"}
    if char in modes:
        return _enter_mode(state, modes[char]), ()
    commands: Mapping[str, Send] = {
        " ": Send("capture"),
        "c": Send("capture"),
        "k": Send("capture-control"),
        "n": Send("start-case"),
        "x": Send("close-case"),
    }
    if char in commands:
        return _notice(state, f"{commands[char].command}…"), (commands[char],)
    if char == "a":
        enabled = not bool((state.status or {}).get("auto_capture", True))
        return state, (Send("auto-capture", {"enabled": enabled}),)
    if char == "e" and state.shown_fov is not None:
        entry = case_entry(state, state.shown_fov)
        command = "include" if entry is not None and entry.get("excluded") else "exclude"
        return state, (Send(command, {"fov_id": state.shown_fov}),)
    return state, ()


def case_entry(state: ViewerState, fov_id: str) -> Mapping[str, Any] | None:
    return next((f for f in state.case.get("fovs") or [] if f.get("fov_id") == fov_id), None)


def _enter_mode(state: ViewerState, mode: Mode) -> ViewerState:
    if mode == "intense":
        target = next((f for f in reversed(list(state.fovs.values())) if f.kind == "control"), None)
        if target is None:
            return _notice(state, "no positive control shown yet: press k to capture the control", error=True)
    elif mode == "roi":
        shown = state.fovs.get(state.shown_fov or "")
        target = shown if shown is not None and shown.kind == "fov" else None
        target = target or next((f for f in reversed(list(state.fovs.values())) if f.kind == "fov"), None)
        if target is None:
            return _notice(state, "no tumour FOV yet: press space to capture one", error=True)
    else:
        target = state.fovs.get(state.shown_fov or "")
        if target is None:
            return _notice(state, "no FOV captured yet: press space to capture one", error=True)
    state = _show(state, target.fov_id)
    return dataclasses.replace(
        state,
        mode=mode,
        mode_fov=target.fov_id,
        polygon=(),
        big="fov",
        notice=f"{MODE_NAMES[mode]} on {target.fov_id}: click the corners, enter to send, esc to cancel",
        notice_error=False,
    )


def _leave_mode(state: ViewerState) -> ViewerState:
    return dataclasses.replace(state, mode="view", mode_fov=None, polygon=(), hover=None)


def _finish_polygon(state: ViewerState) -> tuple[ViewerState, tuple[Action, ...]]:
    if len(state.polygon) < 3:
        return _notice(state, "a region needs at least 3 corners (esc cancels)", error=True), ()
    polygon = [[round(row, 1), round(col, 1)] for row, col in state.polygon]
    command = MODE_COMMANDS[state.mode]
    send = Send(command, {"fov_id": state.mode_fov, "polygon": polygon})
    return _notice(_leave_mode(state), f"{command} {state.mode_fov}…"), (send,)


def _apply_click(state: ViewerState, click: Click) -> ViewerState:
    if state.mode == "view":
        return state
    fov = state.fovs.get(state.mode_fov or "")
    rect = fov_display_rect(state, click.size)
    if fov is None or rect is None:
        return state
    if fov.shape is None:
        return _notice(state, f"waiting for the image of {fov.fov_id} (its size is not known yet)", error=True)
    vertex = display_to_fov((click.x, click.y), rect, fov.shape)
    if vertex is None:
        return _notice(state, "click inside the FOV", error=True)
    return dataclasses.replace(state, polygon=(*state.polygon, vertex), hover=(click.x, click.y))


# --- geometry -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rect:
    """A rectangle of the canvas in display pixels: left ``x``, top ``y``, width ``w``, height ``h``."""

    x: int
    y: int
    w: int
    h: int

    def contains(self, x: float, y: float) -> bool:
        return self.x <= x < self.x + self.w and self.y <= y < self.y + self.h


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything goes on a canvas: status bar, big pane, thumbnail, info box, side panel, footer."""

    status: Rect
    big: Rect
    thumb: Rect
    info: Rect
    panel: Rect
    footer: Rect


TITLE_H = 30


def layout(size: Size) -> Layout:
    """The canvas layout for ``size`` (rows, cols); proportions of a 1600x900 monitor window."""
    rows, cols = size
    margin = max(6, round(cols / 130))
    status_h, footer_h = max(28, round(rows * 0.045)), max(24, round(rows * 0.038))
    top, bottom = status_h + margin, rows - footer_h - margin
    left_w = round(cols * 0.655) - margin
    big_h = min(round(left_w * 9 / 16) + TITLE_H, round((bottom - top) * 0.74))
    thumb_y = top + big_h + margin
    thumb_h = max(40, bottom - thumb_y)
    thumb_w = min(round((thumb_h - TITLE_H) * 16 / 9), left_w // 2)
    info_x = margin + thumb_w + margin
    panel_x = margin + left_w + margin
    return Layout(
        status=Rect(0, 0, cols, status_h),
        big=Rect(margin, top, left_w, big_h),
        thumb=Rect(margin, thumb_y, thumb_w, thumb_h),
        info=Rect(info_x, thumb_y, margin + left_w - info_x, thumb_h),
        panel=Rect(panel_x, top, cols - panel_x - margin, bottom - top),
        footer=Rect(0, rows - footer_h, cols, footer_h),
    )


def fit(area: Rect, image_shape: tuple[int, int]) -> Rect:
    """The largest rectangle of the image's aspect ratio centred in ``area`` (letterboxing)."""
    rows, cols = image_shape
    scale = min(area.w / cols, area.h / rows)
    w, h = max(1, round(cols * scale)), max(1, round(rows * scale))
    return Rect(area.x + (area.w - w) // 2, area.y + (area.h - h) // 2, w, h)


def _image_area(pane: Rect) -> Rect:
    return Rect(pane.x, pane.y + TITLE_H, pane.w, max(1, pane.h - TITLE_H))


def display_to_fov(point: tuple[float, float], rect: Rect, fov_shape: tuple[int, int]) -> Vertex | None:
    """Display pixel ``(x, y)`` -> ``(row, col)`` in full-resolution FOV pixels; None outside the shown FOV.

    ``rect`` is where the FOV is drawn; pixel centres map onto pixel centres, so ``fov_to_display`` inverts it.
    """
    x, y = point
    if not (rect.x - 0.5 <= x <= rect.x + rect.w - 0.5 and rect.y - 0.5 <= y <= rect.y + rect.h - 0.5):
        return None
    rows, cols = fov_shape
    col = (x - rect.x + 0.5) * cols / rect.w - 0.5
    row = (y - rect.y + 0.5) * rows / rect.h - 0.5
    return (min(max(row, 0.0), rows - 1.0), min(max(col, 0.0), cols - 1.0))


def fov_to_display(vertex: Vertex, rect: Rect, fov_shape: tuple[int, int]) -> tuple[float, float]:
    """``(row, col)`` in FOV pixels -> display pixel ``(x, y)`` where the FOV is drawn in ``rect``."""
    row, col = vertex
    rows, cols = fov_shape
    return (rect.x + (col + 0.5) * rect.w / cols - 0.5, rect.y + (row + 0.5) * rect.h / rows - 0.5)


def fov_display_rect(state: ViewerState, size: Size) -> Rect | None:
    """Where the shown FOV is drawn when it is in the big pane (None: no FOV image to show)."""
    fov = state.fovs.get(state.shown_fov or "")
    if fov is None or state.big != "fov":
        return None
    shape = _fov_display_shape(fov)
    return None if shape is None else fit(_image_area(layout(size).big), shape)


def _fov_display_shape(fov: FovView) -> tuple[int, int] | None:
    layer = next(iter(fov.layers.values()), None)
    source = layer if layer is not None else fov.base
    return None if source is None else (source.shape[0], source.shape[1])


# --- text content (pure) ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """A line of the side panel: ``style`` is ``"heading"``, ``"score"``, ``"text"``, ``"small"``, ``"gap"``,
    ``"bar"`` (a stacked bar of ``values``, percent per HER2 class) or ``"row"`` (a table row: ``row``)."""

    text: str
    colour: BGR = TEXT
    style: str = "text"
    values: tuple[float, ...] = ()
    row: TableRow | None = None


def silence_s(state: ViewerState) -> float:
    """Seconds since the daemon was last heard from (its status heartbeat, or a snapshot)."""
    return state.now - (state.last_heard if state.last_heard is not None else state.started_at)


def daemon_responding(state: ViewerState) -> bool:
    """Whether a heartbeat came within the last ``SILENT_INTERVALS`` heartbeat intervals."""
    return state.last_heard is not None and silence_s(state) <= SILENT_INTERVALS * state.heartbeat_s


def status_segments(state: ViewerState) -> list[tuple[str, BGR]]:
    """The status bar: connection, camera, stability, control calibration, auto-capture, worker."""
    segments: list[tuple[str, BGR]] = []
    if daemon_responding(state):
        segments.append(("daemon ok", GOOD))
    elif state.last_heard is None and silence_s(state) <= SILENT_INTERVALS * state.heartbeat_s:
        segments.append(("connecting…", WARN))
    else:
        segments.append((f"daemon not responding (no heartbeat for {silence_s(state):.0f} s)", BAD))
    status = state.status
    if status is None:
        return segments
    camera = status.get("camera") or {}
    camera_state = str(camera.get("state", "?"))
    fps = camera.get("fps")
    fps_text = f" {fps:.1f} fps" if isinstance(fps, int | float) and camera_state == "live" else ""
    segments.append((f"camera {camera_state}{fps_text}", GOOD if camera_state == "live" else BAD))
    stability = str((state.preview_body or {}).get("stability") or status.get("stability", "?"))
    segments.append((stability, STABILITY_COLOURS.get(stability, MUTED)))
    calibrated = bool(status.get("control_calibrated"))
    segments.append(("control calibrated" if calibrated else "control not calibrated", GOOD if calibrated else WARN))
    auto = bool(status.get("auto_capture"))
    segments.append((f"auto-capture {'on' if auto else 'off'}", TEXT if auto else MUTED))
    worker, queue = status.get("worker", "?"), int(status.get("queue") or 0)
    busy = worker != "idle" or queue
    segments.append((f"scoring {worker}" + (f", {queue} queued" if queue else ""), WARN if busy else MUTED))
    if status.get("unsaved_images"):
        segments.append((f"{status['unsaved_images']} images not saved yet", WARN))
    return segments


def _score_text(score: object) -> str:
    return f"HER2 {score}" if score is not None else "HER2 n/a"


def _percentages(counts: Mapping[str, Any] | None) -> list[float] | None:
    if not counts:
        return None
    total = sum(int(counts.get(c, 0)) for c in CLASSES)
    return [100.0 * int(counts.get(c, 0)) / total if total else 0.0 for c in CLASSES]


@dataclass(frozen=True, slots=True)
class TableRow:
    """A row of the per-FOV table: its cells (id, cells, % 0, % 1+, % 2+, % 3+, score), marks and colour."""

    cells: tuple[str, ...]
    marks: str = ""
    colour: BGR = TEXT

    @property
    def text(self) -> str:
        """The row as aligned plain text (for a terminal)."""
        if len(self.cells) == 1:
            return f"{self.cells[0]:<11} {self.marks}".rstrip()
        first, *numbers = self.cells
        return f"{first:<11} " + " ".join(f"{n:>5}" for n in numbers) + (f"  {self.marks}" if self.marks else "")


TABLE_HEADER = TableRow(("FOV", "cells", "0", "1+", "2+", "3+", "score"), colour=MUTED)


def fov_table(state: ViewerState) -> list[TableRow]:
    """The per-FOV table, header first: id, cells, % per class, score and marks (ROI, excluded, failed)."""
    rows = [TABLE_HEADER]
    for entry in state.case.get("fovs") or []:
        fov_id = str(entry.get("fov_id", "?"))
        status = entry.get("status")
        percentages = _percentages(entry.get("counts"))
        if status == "failed":
            rows.append(TableRow((fov_id,), f"failed: {str(entry.get('error') or '')[:40]}", BAD))
            continue
        if status == "pending" and percentages is None:
            rows.append(TableRow((fov_id,), "scoring…", MUTED))
            continue
        numbers = [f"{p:.1f}" for p in percentages] if percentages else ["-"] * 4
        score = entry.get("score")
        marks = [mark for mark, on in (("ROI", entry.get("roi")), ("excl.", entry.get("excluded"))) if on]
        if status == "pending":
            marks.append("re-scoring")
        colour = MUTED if entry.get("excluded") else TEXT
        cells = (fov_id, str(int(entry.get("total") or 0)), *numbers, str(score) if score is not None else "n/a")
        rows.append(TableRow(cells, " ".join(marks), colour))
    return rows


def case_lines(state: ViewerState) -> list[Line]:
    """The running case summary: score, status, HER2-low/ultralow, percentages, control, warnings."""
    case = state.case
    case_id = case.get("case_id")
    if case_id is None:
        return [
            Line("NO OPEN CASE", MUTED, "heading"),
            Line("press n to start a case, or space to capture (a case starts by itself)", MUTED, "small"),
        ]
    closed = " (closed)" if not case.get("open") else ""
    lines = [Line(f"CASE {case_id}{closed}", MUTED, "heading")]
    result = case.get("case")
    if not result:
        lines.append(Line("no scored FOV yet", MUTED))
        return lines
    score = result.get("score")
    lines.append(Line(_score_text(score), CLASS_BGR.get(str(score), TEXT), "score"))
    lines.append(Line(str(result.get("status", "")), TEXT))
    if result.get("her2_low"):
        lines.append(Line("HER2-low", ACCENT))
    elif result.get("zero_subtype") == "ultralow":
        lines.append(Line("HER2-ultralow", ACCENT))
    elif result.get("zero_subtype") == "null":
        lines.append(Line("HER2-null", ACCENT))
    percentages = result.get("percentages") or {}
    values = tuple(float(percentages.get(c, 0.0)) for c in CLASSES)
    lines.append(Line("", style="bar", values=values))
    lines.append(Line("   ".join(f"{c}: {v:.1f}%" for c, v in zip(CLASSES, values, strict=True)), TEXT, "small"))
    n_fovs = int(result.get("n_fovs") or 0)
    lines.append(Line(f"{n_fovs} FOV{'' if n_fovs == 1 else 's'} · {int(result.get('total') or 0):,} cells", MUTED))
    control = case.get("control")
    if control:
        ok = bool(control.get("qc_passed", True))
        threshold = control.get("intense_threshold_od")
        detail = f", intense > {threshold:.2f} OD" if isinstance(threshold, int | float) else ""
        text = f"{control.get('fov_id')}: {'calibrated' if ok else 'failed QC'}{detail}"
        lines.append(Line(text, GOOD if ok else WARN, "small"))
    warnings = [str(w) for w in result.get("warnings") or []]
    if not control and not any("positive control" in w for w in warnings):
        warnings.insert(0, "no positive control: press k with the control tissue in view")
    reason = result.get("reason")
    if reason and not warnings and score is None:
        lines.append(Line(str(reason), MUTED, "small"))
    lines.extend(Line(f"! {w}", WARN, "small") for w in warnings)
    return lines


def panel_lines(state: ViewerState) -> list[Line]:
    """The side panel, top to bottom: the case summary, then the per-FOV table."""
    lines = case_lines(state)
    lines.append(Line("", style="gap"))
    lines.append(Line("FIELDS OF VIEW", MUTED, "heading"))
    table = fov_table(state)
    if len(table) == 1:
        lines.append(Line("none yet", MUTED, "small"))
    else:
        lines.extend(Line(row.text, row.colour, "row", row=row) for row in table)
    return lines


def footer_segments() -> list[tuple[str, str]]:
    """The key help: (key, what it does)."""
    return list(HELP)


def pane_title(state: ViewerState, which: Literal["live", "fov"]) -> tuple[str, BGR]:
    """The title above a pane: the live view's stability, motion and focus, or the shown FOV's id and score."""
    if which == "live":
        body = state.preview_body
        if body is None:
            return "LIVE", MUTED
        motion = float(body.get("motion_um", -1.0))
        motion_text = f"   motion {motion:.1f} µm" if motion >= 0 else ""
        focus = f"   focus {100 * float(body.get('focus_ratio', 0.0)):.0f}%"
        stability = str(body.get("stability", "?"))
        return f"LIVE   {stability}{motion_text}{focus}", STABILITY_COLOURS.get(stability, TEXT)
    fov_id = state.shown_fov
    if fov_id is None:
        return "LAST FOV", MUTED
    entry = case_entry(state, fov_id) or {}
    status = entry.get("status")
    if status == "scored":
        score_text = _score_text(entry.get("score"))
    else:
        score_text = "scoring…" if status == "pending" or not entry else str(status)
    if entry.get("excluded"):
        score_text += " (excluded)"
    return f"{fov_id}   {score_text}", CLASS_BGR.get(str(entry.get("score")), TEXT) if status == "scored" else TEXT


def fov_details(state: ViewerState) -> list[tuple[str, BGR]]:
    """What the shown FOV's overlay panel says, as text: score and status, counts, reason, thresholds, warnings."""
    fov_id = state.shown_fov
    facts = state.results.get(fov_id or "")
    if fov_id is None or facts is None:
        return []
    score = facts.get("score")
    low = ", HER2-low" if facts.get("her2_low") else ""
    lines = [(f"{fov_id}: {_score_text(score)}, {facts.get('status')}{low}", CLASS_BGR.get(str(score), TEXT))]
    counts = facts.get("counts") or {}
    percentages = facts.get("percentages") or {}
    total = sum(int(counts.get(c, 0)) for c in CLASSES)
    classes = "   ".join(f"{c}: {float(percentages.get(c, 0.0)):.1f}%" for c in CLASSES)
    lines.append((f"{total} tumour cells   {classes}", TEXT))
    lines.append((str(facts.get("reason", "")), MUTED))
    lines.append(
        (
            f"intense > {facts.get('intense_threshold_od', 0.0):.2f} OD ({facts.get('intense_threshold_source')}),"
            f" weak > {facts.get('weak_threshold_od', 0.0):.2f} OD",
            MUTED,
        )
    )
    reason = facts.get("reason")
    lines.extend((f"! {w}", WARN) for w in facts.get("warnings") or [] if w != reason)
    return lines


def terminal_summary(state: ViewerState) -> str:
    """The viewer's content as compact text, for a terminal without a display: status, case score, FOV table."""
    lines = ["  ·  ".join(text for text, _ in status_segments(state))]
    for line in case_lines(state):
        if line.style == "bar":
            continue
        lines.append(("" if line.style in ("heading", "score") else "  ") + line.text)
    table = fov_table(state)
    if len(table) > 1:
        lines.extend("  " + row.text for row in table)
    if state.malformed:
        lines.append(f"  ({state.malformed} malformed messages skipped; last: {state.last_malformed})")
    return "\n".join(lines)


# --- rendering (pure) ---------------------------------------------------------------------------------------------


@cache
def _font() -> Any | None:
    """OpenCV 5's built-in TrueType sans face, or None on OpenCV 4 (a Hershey font is used then)."""
    face = getattr(cv2, "FontFace", None)
    return None if face is None else face("sans")


def _text(canvas: Image, text: str, x: int, baseline: int, colour: BGR, px: int, *, bold: bool = False) -> int:
    """Draw ``text`` with its baseline at ``baseline`` and height ``px``; returns the x where it ends."""
    font = _font()
    if font is not None:
        end, _ = cv2.putText(canvas, text, (x, baseline), colour, font, px, 700 if bold else 400)
        return int(end[0])
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_DUPLEX, px)
    thickness = 2 if bold else 1
    cv2.putText(canvas, text, (x, baseline), cv2.FONT_HERSHEY_DUPLEX, scale, colour, thickness, cv2.LINE_AA)
    return x + int(cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, thickness)[0][0])


def _text_width(text: str, px: int, *, bold: bool = False) -> int:
    font = _font()
    if font is not None:
        rect = cv2.getTextSize((0, 0), text, (0, 0), font, px, 700 if bold else 400)
        return int(rect[0] + rect[2])
    scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_DUPLEX, px)
    return int(cv2.getTextSize(text, cv2.FONT_HERSHEY_DUPLEX, scale, 2 if bold else 1)[0][0])


def _wrap(text: str, width: int, px: int) -> list[str]:
    words, lines, current = text.split(" "), [], ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and _text_width(candidate, px) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current]


def _fill(canvas: Image, rect: Rect, colour: BGR) -> None:
    canvas[rect.y : rect.y + rect.h, rect.x : rect.x + rect.w] = colour


def _blit(canvas: Image, image: Image, area: Rect) -> Rect:
    """Draw ``image`` letterboxed into ``area``; returns where it went."""
    target = fit(area, (image.shape[0], image.shape[1]))
    interpolation = cv2.INTER_AREA if target.w < image.shape[1] else cv2.INTER_LINEAR
    canvas[target.y : target.y + target.h, target.x : target.x + target.w] = cv2.resize(
        image, (target.w, target.h), interpolation=interpolation
    )
    return target


def _layer_chips(canvas: Image, pane: Rect, state: ViewerState) -> None:
    """The layer keys at the right of the FOV pane's title: bright when shown, dim when hidden."""
    px = 15
    x = pane.x + pane.w - 10
    baseline = pane.y + TITLE_H - 9
    for index, name in reversed(list(enumerate(LAYER_NAMES, start=1))):
        on = name in state.visible_layers
        width = _text_width(f"{index} {name}", px, bold=True)
        x -= width
        end = _text(canvas, str(index), x, baseline, ACCENT if on else (90, 86, 82), px, bold=True)
        _text(canvas, name, end + 4, baseline, TEXT if on else (110, 105, 100), px, bold=on)
        x -= 16


def _pane(canvas: Image, state: ViewerState, pane: Rect, which: Literal["live", "fov"], big: bool) -> None:
    _fill(canvas, pane, SURFACE)
    title, colour = pane_title(state, which)
    if not big:
        title = "   ".join(title.split("   ")[:2])
    _text(canvas, title, pane.x + 10, pane.y + TITLE_H - 9, colour, 18 if big else 15, bold=True)
    if big and which == "fov" and state.shown_fov is not None:
        _layer_chips(canvas, pane, state)
    area = _image_area(pane)
    _fill(canvas, area, (18, 16, 15))
    image: Image | None
    if which == "live":
        image = state.preview
        empty = "waiting for the live view…"
    else:
        fov = state.fovs.get(state.shown_fov or "")
        image = None if fov is None else fov.composite
        if fov is not None and (image is None or fov.composite_layers != state.visible_layers):
            image = composite_image(fov, state.visible_layers)
        empty = "no FOV captured yet: press space" if fov is None else "waiting for the FOV…"
    if image is None:
        px = 22 if big else 15
        width = _text_width(empty, px)
        _text(canvas, empty, area.x + (area.w - width) // 2, area.y + area.h // 2, MUTED, px)
        return
    target = _blit(canvas, image, area)
    if big and which == "fov" and state.mode != "view":
        _polygon(canvas, state, target)


def _polygon(canvas: Image, state: ViewerState, target: Rect) -> None:
    fov = state.fovs.get(state.mode_fov or "")
    if fov is None or fov.shape is None:
        return
    points = [fov_to_display(v, target, fov.shape) for v in state.polygon]
    pts = np.array([[round(x), round(y)] for x, y in points], np.int32).reshape(-1, 1, 2)
    if len(points) >= 2:
        cv2.polylines(canvas, [pts], False, DRAW, 2, cv2.LINE_AA)
    if points and state.hover is not None:
        last = pts[-1, 0]
        cv2.line(canvas, (int(last[0]), int(last[1])), state.hover, DRAW, 1, cv2.LINE_AA)
        if len(points) >= 2:
            first = pts[0, 0]
            cv2.line(canvas, state.hover, (int(first[0]), int(first[1])), (200, 120, 200), 1, cv2.LINE_AA)
    for x, y in pts[:, 0]:
        cv2.circle(canvas, (int(x), int(y)), 5, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(canvas, (int(x), int(y)), 5, DRAW, 2, cv2.LINE_AA)
    banner = f"{MODE_NAMES[state.mode]} on {state.mode_fov}: {len(points)} corners"
    banner += "   ·   click: add   backspace: undo   enter: send   esc: cancel"
    box = Rect(target.x, target.y, target.w, 34)
    region = canvas[box.y : box.y + box.h, box.x : box.x + box.w]
    region[:] = (region * 0.3 + np.array((20, 18, 17)) * 0.7).astype(np.uint8)
    _text(canvas, banner, box.x + 10, box.y + 23, DRAW, 16, bold=True)


def _status_bar(canvas: Image, rect: Rect, state: ViewerState) -> None:
    _fill(canvas, rect, BAR)
    baseline = rect.y + rect.h // 2 + 7
    x = _text(canvas, "her2scope", rect.x + 14, baseline, ACCENT, 19, bold=True) + 24
    case_id = state.case.get("case_id")
    label = f"case {case_id}" if case_id else ""
    limit = rect.w - 30 - (_text_width(label, 17) if label else 0)
    for text, colour in status_segments(state):
        if x + 18 + _text_width(text, 17) > limit:
            break
        cv2.circle(canvas, (x + 6, baseline - 6), 6, colour, -1, cv2.LINE_AA)
        x = _text(canvas, text, x + 18, baseline, TEXT, 17) + 26
    if label:
        _text(canvas, label, rect.w - 14 - _text_width(label, 17), baseline, MUTED, 17)


def _footer(canvas: Image, rect: Rect) -> None:
    _fill(canvas, rect, BAR)
    baseline = rect.y + rect.h // 2 + 6
    x = rect.x + 14
    for key, what in footer_segments():
        x = _text(canvas, key, x, baseline, ACCENT, 15, bold=True) + 6
        x = _text(canvas, what, x, baseline, MUTED, 15) + 18


def _info(canvas: Image, rect: Rect, state: ViewerState) -> None:
    """The box under the big view: the notice (what just happened), the shown FOV's details, a debug line."""
    _fill(canvas, rect, SURFACE)
    x, width = rect.x + 14, rect.w - 28
    y = rect.y + 26
    bottom = rect.y + rect.h - 30
    lines: list[tuple[str, BGR, int, bool]] = []
    if not daemon_responding(state) and state.last_heard is not None:
        lines.append(("daemon not responding: retrying…", BAD, 17, True))
    if state.notice:
        lines.append((state.notice, BAD if state.notice_error else ACCENT, 16, False))
    lines.extend((text, colour, 16, i == 0) for i, (text, colour) in enumerate(fov_details(state)))
    for text, colour, px, bold in lines:
        if y > bottom:
            break
        for part in _wrap(text, width, px)[:2]:
            if y > bottom:
                break
            _text(canvas, part, x, y, colour, px, bold=bold)
            y += px + 7
    debug = f"seq {state.last_seq}   frame {state.preview_frame_index}   malformed messages skipped: {state.malformed}"
    if state.malformed:
        debug += f" (last: {state.last_malformed})"
    _text(canvas, _wrap(debug, width, 13)[0], x, rect.y + rect.h - 12, (120, 115, 110), 13)


STYLE_PX: Mapping[str, int] = {"heading": 15, "score": 44, "text": 19, "small": 16, "row": 16, "bar": 18, "gap": 10}
#: Table columns: right edges (fractions of the panel's width) of cells, % 0, % 1+, % 2+, % 3+ and score.
COLUMN_EDGES = (0.33, 0.45, 0.57, 0.69, 0.81, 0.92)


def _table_row(canvas: Image, row: TableRow, x: int, width: int, baseline: int, px: int) -> None:
    first, *numbers = row.cells
    header = row is TABLE_HEADER or row == TABLE_HEADER
    _text(canvas, first, x, baseline, row.colour, px, bold=header)
    if not numbers:
        _text(canvas, row.marks, x + round(COLUMN_EDGES[0] * width) - 40, baseline, row.colour, px)
        return
    for index, (cell, edge) in enumerate(zip(numbers, COLUMN_EDGES, strict=True)):
        colour = CLASS_BGR[CLASSES[index - 1]] if header and 1 <= index <= 4 else row.colour
        bold = header or index == 5
        if index == 5 and not header:
            colour = CLASS_BGR.get(cell, row.colour) if row.colour == TEXT else row.colour
        right = x + round(edge * width)
        _text(canvas, cell, right - _text_width(cell, px, bold=bold), baseline, colour, px, bold=bold)
    if row.marks:
        _text(canvas, row.marks, x + round(COLUMN_EDGES[-1] * width) + 8, baseline, MUTED, 13)


def _panel(canvas: Image, rect: Rect, state: ViewerState) -> None:
    _fill(canvas, rect, SURFACE)
    x, width = rect.x + 16, rect.w - 32
    y = rect.y + 10
    bottom = rect.y + rect.h - 8
    lines = panel_lines(state)
    rows = [line for line in lines if line.style == "row"]
    for index, line in enumerate(lines):
        px = STYLE_PX.get(line.style, 18)
        if line.style == "gap":
            y += px
            continue
        if line.style == "bar":
            y += 6
            left = x
            for value, name in zip(line.values, CLASSES, strict=False):
                w = round(width * value / 100)
                cv2.rectangle(canvas, (left, y), (left + w, y + px), CLASS_BGR[name], -1)
                left += w
            cv2.rectangle(canvas, (x, y), (x + width, y + px), MUTED, 1)
            y += px + 8
            continue
        if line.style == "row" and line.row is not None:
            if y + 2 * (px + 8) > bottom and line is not rows[-1]:
                _text(canvas, f"… and {len(rows) - rows.index(line)} more", x, y + px + 6, MUTED, 14)
                return
            y += px + 8
            _table_row(canvas, line.row, x, width, y, px)
            continue
        if line.style == "heading" and index > 0:
            cv2.line(canvas, (x, y + 2), (x + width, y + 2), (70, 66, 62), 1)
            y += 8
        parts = [line.text] if line.style == "score" else _wrap(line.text, width, px)
        for part in parts:
            y += px + (8 if line.style == "score" else 6)
            if y > bottom:
                return
            _text(canvas, part, x, y, line.colour, px, bold=line.style in ("score", "heading"))
        y += 4 if line.style != "score" else 10


def _banner(canvas: Image, rect: Rect, text: str) -> None:
    width = _text_width(text, 26, bold=True) + 40
    box = Rect(rect.x + (rect.w - width) // 2, rect.y + rect.h // 2 - 30, width, 56)
    _fill(canvas, box, (40, 40, 150))
    _text(canvas, text, box.x + 20, box.y + 38, (255, 255, 255), 26, bold=True)


def render(state: ViewerState, size: Size = DEFAULT_SIZE) -> Image:
    """The viewer's picture of ``state``: a new (rows, cols, 3) uint8 BGR image of ``size`` (rows, cols).

    Pure: it reads the state and returns a new image, and draws nothing else.
    """
    canvas = np.empty((*size, 3), np.uint8)
    canvas[:] = BACKGROUND
    parts = layout(size)
    _status_bar(canvas, parts.status, state)
    big: Literal["live", "fov"] = state.big if state.big == "live" or state.shown_fov is not None else "live"
    small: Literal["live", "fov"] = "fov" if big == "live" else "live"
    _pane(canvas, state, parts.big, big, big=True)
    _pane(canvas, state, parts.thumb, small, big=False)
    if not daemon_responding(state) and state.last_heard is not None:
        _banner(canvas, _image_area(parts.big), "daemon not responding")
    _info(canvas, parts.info, state)
    _panel(canvas, parts.panel, state)
    _footer(canvas, parts.footer)
    return canvas


# --- the link to the daemon (I/O) ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The daemon's publisher and control endpoints."""

    publish: str
    control: str


def resolve_endpoints(config_path: Path | None, daemon_state: Path | None) -> tuple[Endpoints, Path | None, float]:
    """The endpoints to connect to, the state folder to re-read them from (random ports), and the heartbeat (s).

    ``daemon_state`` (the daemon's state folder) wins; otherwise the configuration's endpoints, or, when those
    are random ports (``*``), the ``endpoints.json`` of the configuration's state folder.

    Raises
    ------
    ConfigError, ControlError
        The configuration is invalid, or no running daemon wrote its endpoints.
    """
    from config.app import load_config

    config = load_config(config_path)
    zmq_config = config.daemon.zmq
    heartbeat_s = zmq_config.heartbeat_ms / 1000.0
    if daemon_state is None and "*" in zmq_config.publish + zmq_config.control:
        daemon_state = config.daemon.state.directory
    if daemon_state is None:
        return Endpoints(zmq_config.publish, zmq_config.control), None, heartbeat_s
    found = read_endpoints(daemon_state)
    return Endpoints(found["publish"], found["control"]), daemon_state, heartbeat_s


NON_PREVIEW_TOPICS = (Topic.CAPTURE, Topic.RESULT, Topic.OVERLAY, Topic.STATUS, Topic.CASE)


class DaemonLink:
    """The viewer's sockets and the I/O around the pure state.

    Previews come on their own SUB socket with a receive high-water mark of a few messages: each ``poll`` drains
    it and decodes only the newest. The other topics come on a second SUB socket, all of them, in order. Commands
    go to the control endpoint with a short timeout; a daemon that does not answer never blocks the window for
    long, and nothing is sent while it is silent.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        endpoints_dir: Path | None = None,
        control_timeout_ms: float = 2000.0,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self._endpoints_dir = endpoints_dir
        self._timeout_ms = control_timeout_ms
        self._context = context or zmq.Context.instance()
        self._poller = zmq.Poller()
        self._last_attempt = -1e9
        self._last_endpoints_check = time.monotonic()
        self._connect()

    def _connect(self) -> None:
        self._previews = self._context.socket(zmq.SUB)
        self._previews.setsockopt(zmq.LINGER, 0)
        self._previews.setsockopt(zmq.RCVHWM, 2)
        self._previews.setsockopt(zmq.SUBSCRIBE, Topic.PREVIEW.value.encode())
        self._previews.connect(self.endpoints.publish)
        self._messages = self._context.socket(zmq.SUB)
        self._messages.setsockopt(zmq.LINGER, 0)
        self._messages.setsockopt(zmq.RCVHWM, 1000)
        for topic in NON_PREVIEW_TOPICS:
            self._messages.setsockopt(zmq.SUBSCRIBE, topic.value.encode())
        self._messages.connect(self.endpoints.publish)
        self._control = ControlClient(self.endpoints.control, self._timeout_ms, self._context)
        self._poller = zmq.Poller()
        self._poller.register(self._previews, zmq.POLLIN)
        self._poller.register(self._messages, zmq.POLLIN)

    def close(self) -> None:
        """Close the sockets."""
        self._previews.close(linger=0)
        self._messages.close(linger=0)
        self._control.close()

    def __enter__(self) -> DaemonLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, command: str, **args: Any) -> tuple[dict[str, Any], list[bytes]]:
        """Send a command; its reply data and payload frames. ControlError: an error reply, or no answer."""
        frame = json.dumps({"v": 1, "id": command, "command": command, "args": args}).encode()
        try:
            reply, frames = self._control.request_raw(frame)
        except ControlError:
            # a late reply would be taken for the next request's: start again with a fresh socket
            self._control.close()
            self._control = ControlClient(self.endpoints.control, self._timeout_ms, self._context)
            raise
        if not reply.ok:
            raise ControlError(reply.error or f"{command} failed")
        return reply.data, frames

    def start(self, state: ViewerState) -> ViewerState:
        """Synchronise with the daemon (snapshot, recent overlays, the shown FOV's image); never raises."""
        return self._follow_up(apply(state, Tick(time.monotonic())))

    def poll(self, state: ViewerState, timeout_ms: float = 0.0) -> ViewerState:
        """Wait up to ``timeout_ms`` for messages, apply what arrived (only the newest preview), follow up."""
        state = self._fetch_image(state)  # here, not after the messages: a new overlay is shown first
        events = dict(self._poller.poll(max(0, int(timeout_ms))))
        state = apply(state, Tick(time.monotonic()))
        if self._previews in events:
            newest = None
            while self._previews.poll(0, zmq.POLLIN):
                newest = self._previews.recv_multipart()
            if newest is not None:
                state = apply(state, newest)
        if self._messages in events:
            while self._messages.poll(0, zmq.POLLIN):
                state = apply(state, self._messages.recv_multipart())
                if state.resync is not None:
                    state = self._resync(state)
        return self._follow_up(state)

    def perform(self, state: ViewerState, actions: Sequence[Action]) -> tuple[ViewerState, bool]:
        """Carry out ``actions``; the new state and whether to quit."""
        for action in actions:
            if isinstance(action, Quit):
                return state, True
            if not daemon_responding(state):
                state = apply(state, Replied(action.command, False, error="the daemon is not responding; not sent"))
                continue
            try:
                data, _ = self.request(action.command, **action.args)
            except ControlError as error:
                state = apply(state, Replied(action.command, False, error=str(error)))
            else:
                state = apply(state, Replied(action.command, True, data))
        return state, False

    def _follow_up(self, state: ViewerState) -> ViewerState:
        """What the state asks for: a snapshot or replay, new endpoints after a daemon restart."""
        if state.resync is not None:
            state = self._resync(state)
        if self._endpoints_dir is not None and not daemon_responding(state):
            self._check_endpoints()
        return state

    def _fetch_image(self, state: ViewerState) -> ViewerState:
        fov = state.fovs.get(image_wanted(state) or "")
        if fov is not None:
            try:
                data, frames = self.request("image", fov_id=fov.fov_id)
                if len(frames) != 1:
                    raise ControlError(f"image reply has {len(frames)} frames, expected 1")
                image = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_COLOR)
                if image is None:
                    raise ControlError("the image cannot be decoded")
                state = apply(state, ImageFetched(str(data.get("fov_id", fov.fov_id)), np.asarray(image, np.uint8)))
            except ControlError as error:
                state = apply(state, ImageFetched(fov.fov_id, None, str(error)))
        return state

    def _check_endpoints(self) -> None:
        now = time.monotonic()
        if now - self._last_endpoints_check < 2.0:
            return
        self._last_endpoints_check = now
        try:
            found = read_endpoints(self._endpoints_dir or Path())
        except ControlError:
            return
        endpoints = Endpoints(found.get("publish", ""), found.get("control", ""))
        if endpoints != self.endpoints and endpoints.publish and endpoints.control:
            self.close()
            self.endpoints = endpoints
            self._connect()

    def _resync(self, state: ViewerState) -> ViewerState:
        now = time.monotonic()
        first = state.last_heard is None and state.session is None
        if not first and not daemon_responding(state) and state.resync == "snapshot":
            return state  # wait for a heartbeat (or a new session) before asking a silent daemon
        if state.resync == "snapshot" and now - self._last_attempt < 1.0:
            return state
        self._last_attempt = now
        if state.resync == "replay":
            try:
                messages, complete = self._control.replay(state.last_seq, self._timeout_ms)
            except (ControlError, ProtocolError):
                complete, messages = False, []
            if complete:
                state = dataclasses.replace(state, resync=None, topic_seqs={})
                for message in messages:
                    state = apply(state, message)
                return state
            state = dataclasses.replace(state, resync="snapshot")
        try:
            data, _ = self.request("snapshot")
        except ControlError as error:
            return _notice(state, f"cannot reach the daemon ({error}); retrying…", error=True)
        state = apply(apply(state, Tick(time.monotonic())), Snapshot(data))
        return self._recent_overlays(state)

    def _recent_overlays(self, state: ViewerState) -> ViewerState:
        """Overlays are not in snapshots: apply the newest buffered one of the last FOV and of the control."""
        try:
            messages, _ = self._control.replay(0, self._timeout_ms)
        except (ControlError, ProtocolError):
            return state
        case_id = state.case.get("case_id")
        newest: dict[str, Message] = {}
        for message in messages:
            body = message.body
            if isinstance(body, OverlayBody) and message.header.case_id == case_id:
                newest[body.kind] = message
        for kind in ("control", "fov"):
            if kind in newest:
                state = apply(state, newest[kind])
        return state


# --- the loops ----------------------------------------------------------------------------------------------------


def has_display() -> bool:
    """Whether a window can be opened (an X11 or Wayland display on Linux)."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


WINDOW_TITLE = "her2scope"


def run_window(link: DaemonLink, state: ViewerState, size: Size = DEFAULT_SIZE) -> ViewerState:
    """Show the viewer in an OpenCV window until q (or the window is closed); returns the last state."""
    mouse: list[Click | Hover] = []

    def on_mouse(event: int, x: int, y: int, _flags: int, _param: Any | None) -> None:
        if event == cv2.EVENT_LBUTTONDOWN:
            mouse.append(Click(x, y, size))
        elif event == cv2.EVENT_MOUSEMOVE:
            mouse.append(Hover(x, y, size))

    cv2.namedWindow(WINDOW_TITLE, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
    cv2.setMouseCallback(WINDOW_TITLE, on_mouse)
    state = link.start(state)
    try:
        while True:
            state = link.poll(state, 0)
            while mouse:
                state = apply(state, mouse.pop(0))
            cv2.imshow(WINDOW_TITLE, render(state, size))
            key = cv2.waitKey(15)
            if key != -1:
                state, actions = press(state, key & 0xFF)
                state, stop = link.perform(state, actions)
                if stop:
                    break
            if cv2.getWindowProperty(WINDOW_TITLE, cv2.WND_PROP_VISIBLE) < 1:
                break
    finally:
        cv2.destroyWindow(WINDOW_TITLE)
    return state


def run_headless(
    link: DaemonLink, state: ViewerState, frames: int, out: Path, size: Size = DEFAULT_SIZE, interval_s: float = 0.2
) -> tuple[ViewerState, list[Path]]:
    """Render ``frames`` frames, one every ``interval_s``, to ``out/viewer-NNNN.png`` without a window."""
    out.mkdir(parents=True, exist_ok=True)
    state = link.start(state)
    written = []
    for index in range(1, frames + 1):
        deadline = time.monotonic() + interval_s
        while (remaining := deadline - time.monotonic()) > 0:
            state = link.poll(state, remaining * 1000)
        path = out / f"viewer-{index:04d}.png"
        ok, png = cv2.imencode(".png", render(state, size))
        if not ok:  # pragma: no cover - encoding a uint8 BGR image does not fail
            raise OSError(f"{path}: could not encode the frame")
        path.write_bytes(png.tobytes())
        written.append(path)
    return state, written


def parse_size(text: str) -> Size:
    """``"1600x900"`` -> (900, 1600) rows, cols; ValueError for anything else."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"window size {text!r} must be WIDTHxHEIGHT, e.g. 1600x900") from None
    if not (800 <= width <= 7680 and 500 <= height <= 4320):
        raise ValueError(f"window size {text!r} must be between 800x500 and 7680x4320")
    return (height, width)


__all__ = [
    "Click",
    "DaemonLink",
    "Endpoints",
    "FovView",
    "Hover",
    "ImageFetched",
    "Layout",
    "Line",
    "Quit",
    "Rect",
    "Replied",
    "Send",
    "Snapshot",
    "TableRow",
    "Tick",
    "ViewerState",
    "apply",
    "case_entry",
    "composite_image",
    "daemon_responding",
    "display_to_fov",
    "fov_details",
    "fov_display_rect",
    "fov_table",
    "fov_to_display",
    "has_display",
    "image_wanted",
    "initial_state",
    "layout",
    "panel_lines",
    "parse_size",
    "press",
    "render",
    "resolve_endpoints",
    "run_headless",
    "run_window",
    "status_segments",
    "terminal_summary",
]
