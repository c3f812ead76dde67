"""The viewer's immutable state and the pure reducer that changes it on messages, keys and mouse clicks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.clients.follower import (
    Connected,
    Invalid,
    NotFound,
    Received,
    Responding,
    Resyncing,
    Silent,
    Snapshot,
    Stale,
    Synced,
    Unreachable,
)
from her2scope.clients.follower import Event as FollowerEvent
from her2scope.clients.viewer.geometry import DEFAULT_SIZE, Rect, Size, Vertex, display_to_fov, fit, image_area, layout
from her2scope.daemon.protocol import (
    NO_CASE,
    CaptureBody,
    CaseBody,
    CaseSummary,
    Message,
    OverlayBody,
    PreviewBody,
    ProtocolError,
    ResultBody,
    Topic,
    decode,
)
from her2scope.scoring.overlay import LAYER_NAMES, compose
from her2scope.scoring.results import FovResult

Image = npt.NDArray[np.uint8]
Mode = Literal["view", "roi", "weak", "intense"]

MAX_CACHED_FOVS = 12
#: Layers shown at start. The daemon's ``panel`` layer is off: the viewer prints the same facts beside the image,
#: in a font that stays sharp at any size (key 5 shows it).
VIEWER_LAYERS: tuple[str, ...] = ("cells", "completeness", "region")

KEY_TAB, KEY_ENTER, KEY_RETURN, KEY_ESC, KEY_BACKSPACE, KEY_DELETE = 9, 13, 10, 27, 8, 127
LAYER_KEYS: Mapping[str, str] = {str(i + 1): name for i, name in enumerate(LAYER_NAMES)}
MODE_NAMES: Mapping[Mode, str] = {"roi": "ROI", "weak": "weak-staining region", "intense": "intense region"}
MODE_COMMANDS: Mapping[Mode, str] = {"roi": "set-roi", "weak": "set-weak", "intense": "set-intense"}

EMPTY_CASE: CaseSummary = NO_CASE

#: The rules key g cycles through for the next case: (guideline, specimen).
RULE_CHOICES: tuple[tuple[str, str], ...] = (("breast", "resection"), ("gastric", "resection"), ("gastric", "biopsy"))


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
    layers : overlay layer name -> (H, W, 4) uint8 BGRA ndarray, at the overlay's size (a client that draws).
    layer_files : overlay layer name -> the layer's PNG as the daemon sent it (a client that hands it on).
    overlay_shape : (rows, cols) of the overlay, once it came.
    composite : ``base`` with the visible layers blended in, at the overlay's size (None: compute when drawn).
    """

    fov_id: str
    kind: str
    case_id: str | None
    base: Image | None = None
    shape: tuple[int, int] | None = None
    image: Literal["wanted", "fetched", "failed"] = "wanted"
    layers: Mapping[str, Image] = field(default_factory=dict)
    layer_files: Mapping[str, bytes] = field(default_factory=dict)
    overlay_shape: tuple[int, int] | None = None
    overlay_seq: int = -1
    composite: Image | None = None
    composite_layers: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ViewerState:
    """Everything the viewer shows; built by ``apply`` from what its follower hands on (``now``: monotonic s).

    ``session`` and ``last_seq``: the daemon run shown and the last message applied (the follower keeps the order);
    ``responding``: what the follower last said of the daemon (None: not heard from yet, nor silent for long).
    """

    now: float = 0.0
    started_at: float = 0.0
    session: str | None = None
    last_seq: int = 0
    responding: bool | None = None
    last_heard: float | None = None
    status: Mapping[str, Any] | None = None
    status_seq: int = 0
    case: CaseSummary = EMPTY_CASE
    preview: Image | None = None
    preview_jpeg: bytes | None = None  # the preview as the daemon sent it
    # False: a client that hands the images on rather than drawing them (the browser viewer, whose page decodes the
    # previews and blends the layers): no preview is decoded and no composite is blended here
    draws: bool = True
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
    next_rule: tuple[str, str] | None = None  # (guideline, specimen) for key n; None: the daemon's configured one


def initial_state(now: float) -> ViewerState:
    """The state before anything was received."""
    return ViewerState(now=now, started_at=now, notice="connecting to the daemon…")


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock moved on (monotonic seconds)."""

    now: float


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


#: What ``apply`` takes: a message (decoded, or its frames), what the follower hands on, the viewer's own events.
Event = Message | Sequence[bytes] | Tick | FollowerEvent | ImageFetched | Replied | Click | Hover
Action = Send | Quit


# --- the reducer --------------------------------------------------------------------------------------------------


def apply(state: ViewerState, event: Event) -> ViewerState:
    """The state after ``event``; a malformed message is counted and skipped, it never raises."""
    match event:
        case Tick(now=now):
            return dataclasses.replace(state, now=now)
        case Snapshot():
            return _guard(state, lambda: _apply_snapshot(state, event.data), "snapshot")
        case Received(message=message):
            return _guard(state, lambda: _apply_message(state, message), message.header.topic.value)
        case Stale(message=message) if message.header.topic == Topic.OVERLAY:
            # a message the snapshot is newer than; overlays are not in snapshots, so an older one is still welcome
            return _guard(state, lambda: _apply_overlay(state, message), "overlay")
        case Silent():
            return dataclasses.replace(state, responding=False)
        case Responding():
            return dataclasses.replace(state, responding=True)
        case Invalid(error=error):
            return _malformed(state, error)
        case Unreachable(error=error):
            return with_notice(state, f"cannot reach the daemon ({error}); retrying…", error=True)
        case Stale() | Connected() | NotFound() | Resyncing() | Synced():
            return state
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
    """Apply a message; which ones, in what order, is the follower's business (``clients.follower``)."""
    header = message.header
    topic = header.topic
    if topic == Topic.PREVIEW:  # no part of the order
        return _apply_preview(state, message)
    state = dataclasses.replace(state, last_seq=header.seq)
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
            state = _with_case(state, body.case)
            if body.result is None or header.case_id != state.case.case_id:
                return state
            return dataclasses.replace(state, results={**state.results, body.fov_id: _result_facts(body.result)})
        case Topic.CASE:
            case_body = message.body
            assert isinstance(case_body, CaseBody)
            state = _with_case(state, case_body.case)
            return with_notice(state, f"case {case_body.case.case_id} {case_body.event}")
        case Topic.OVERLAY:
            return _apply_overlay(state, message)
    return state


def _result_facts(result: FovResult) -> Mapping[str, Any]:
    """What the viewer prints about a scored FOV (its result without the cell list, as JSON values)."""
    facts = result.model_dump(
        mode="json",
        include={"counts", "percentages", "intense_threshold_od", "intense_threshold_source", "weak_threshold_od"},
    )
    call = result.call
    return {
        **facts,
        "score": call.score.value if call.score else None,
        "status": call.status.value,
        "her2_low": call.her2_low,
        "reason": call.reason,
        "warnings": list(result.warnings),
    }


def _with_case(state: ViewerState, case: CaseSummary) -> ViewerState:
    case_id = case.case_id
    fovs, results = state.fovs, state.results
    if case_id is not None and case_id != state.case.case_id:
        fovs = {k: v for k, v in fovs.items() if v.case_id == case_id}  # FOV ids start again in every case
        results = {}
    shown = state.shown_fov if state.shown_fov in fovs else None
    return dataclasses.replace(state, case=case, fovs=fovs, results=results, shown_fov=shown)


def _apply_snapshot(state: ViewerState, data: Mapping[str, Any]) -> ViewerState:
    state = _with_case(state, CaseSummary.model_validate(data["case"]))
    return dataclasses.replace(
        state,
        session=str(data["session"]),
        last_seq=int(data["last_seq"]),
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
    jpeg = message.payload("preview")
    # decoding a 1080p frame costs a few ms a frame: done only for a client that draws it
    image = _decode_image(jpeg, cv2.IMREAD_COLOR) if state.draws else None
    big, follows = state.big, state.big_follows
    if follows and big == "fov" and body.stability == "moving" and state.mode == "view":
        big = "live"  # the slide moves again: back to the live view
    return dataclasses.replace(
        state,
        preview=image,
        preview_jpeg=jpeg,
        preview_frame_index=body.frame_index,
        preview_session=message.header.session,
        preview_body=body.model_dump(),
        big=big,
    )


def _apply_capture(state: ViewerState, message: Message) -> ViewerState:
    body = message.body
    assert isinstance(body, CaptureBody)
    base = state.preview
    if base is None and state.preview_jpeg is not None:  # a client that decodes no preview decodes this one
        base = _decode_image(state.preview_jpeg, cv2.IMREAD_COLOR)
    fov = FovView(body.fov_id, body.kind, message.header.case_id, base=base)
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
        if message.header.case_id != state.case.case_id:
            return state
        fov = FovView(body.fov_id, body.kind, message.header.case_id)
    layers: dict[str, Image] = {}
    files: dict[str, bytes] = {}
    for name in body.layers:
        data = message.payload(name)
        if state.draws:
            layer = _decode_image(data, cv2.IMREAD_UNCHANGED)
            shape = layer.shape
            layers[name] = layer
        else:  # handed on as it is: only its header is read
            shape = _png_shape(data)
            files[name] = data
        if len(shape) != 3 or shape[2] != 4 or shape[:2] != (body.height, body.width):
            raise ValueError(f"overlay layer {name!r} is {shape}, expected ({body.height}, {body.width}, 4)")
    base = fov.base
    if base is not None and base.shape[1] > body.width:  # keep it at the overlay's size: less to blend per frame
        base = np.asarray(cv2.resize(base, (body.width, body.height), interpolation=cv2.INTER_AREA), np.uint8)
        base.flags.writeable = False
    fov = dataclasses.replace(
        fov,
        base=base,
        layers=layers,
        layer_files=files,
        overlay_shape=(body.height, body.width),
        overlay_seq=message.header.seq,
        composite=None,
    )
    state = _store_fov(state, fov)
    return _show(state, body.fov_id) if state.shown_fov is None else _refresh_composite(state)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey + alpha, RGB + alpha


def _png_shape(data: bytes) -> tuple[int, ...]:
    """(rows, cols, channels) of an 8-bit PNG from its header (IHDR), without decoding it."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or data[24] != 8:
        raise ValueError("an overlay layer is not an 8-bit PNG")
    cols, rows = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (rows, cols, _PNG_CHANNELS.get(data[25], 0))


def _apply_image(state: ViewerState, event: ImageFetched) -> ViewerState:
    fov = state.fovs.get(event.fov_id)
    if fov is None:
        return state
    if event.image is None:
        fov = dataclasses.replace(fov, image="failed")
        state = with_notice(state, f"the image of {event.fov_id} is not available: {event.error}", error=True)
        return _store_fov(state, fov)
    rows, cols = event.image.shape[:2]
    width = fov.overlay_shape[1] if fov.overlay_shape is not None else min(cols, 1280)
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
    if not state.draws or fov is None or (fov.composite is not None and fov.composite_layers == state.visible_layers):
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
    return fov.fov_id if fov.overlay_shape is not None and written else None


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


def with_notice(state: ViewerState, text: str, error: bool = False) -> ViewerState:
    """The state with ``text`` as its notice, the line under the big view (shown as an error when ``error``)."""
    return dataclasses.replace(state, notice=text, notice_error=error)


def _apply_reply(state: ViewerState, reply: Replied) -> ViewerState:
    if not reply.ok:
        return with_notice(state, f"{reply.command} failed: {reply.error}", error=True)
    data = reply.data
    match reply.command:
        case "capture" | "capture-control":
            return with_notice(state, f"captured {data.get('fov_id')}: scoring…")
        case "start-case":
            rule = f" ({rule_text(data.get('guideline'), data.get('specimen'))})" if data.get("guideline") else ""
            return with_notice(state, f"case {data.get('case_id')} started{rule}")
        case "close-case":
            return with_notice(state, f"case {data.get('case_id')} closed")
        case "auto-capture":
            return with_notice(state, f"auto-capture {'on' if data.get('auto_capture') else 'off'}")
        case "set-roi" | "set-intense":
            return with_notice(state, f"{reply.command} sent for {data.get('fov_id')}: re-scoring…")
        case "set-weak":
            return with_notice(state, f"weak threshold {data.get('weak_threshold_od', 0):.3f} OD: re-scoring all FOVs…")
        case "exclude" | "include":
            return with_notice(state, f"{data.get('fov_id')} {'excluded' if data.get('excluded') else 'included'}")
    return state


# --- keys and mouse -----------------------------------------------------------------------------------------------


def press(state: ViewerState, key: int) -> tuple[ViewerState, tuple[Action, ...]]:
    """The state after a key press and the actions it asks for (commands to send, quitting)."""
    char = chr(key) if 32 <= key < 127 else ""
    if char == "q":
        return state, (Quit(),)
    if key == KEY_ESC:
        return with_notice(_leave_mode(state), "cancelled" if state.mode != "view" else ""), ()
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
        return with_notice(_refresh_composite(dataclasses.replace(state, visible_layers=visible)), f"{name} {on}"), ()
    if key == KEY_TAB:
        if state.big == "live" and state.shown_fov is None:
            return with_notice(state, "no FOV captured yet: press space to capture one"), ()
        return dataclasses.replace(state, big="fov" if state.big == "live" else "live", big_follows=False), ()
    modes: Mapping[str, Mode] = {"r": "roi", "w": "weak", "i": "intense"}
    if char in modes:
        return _enter_mode(state, modes[char]), ()
    commands: Mapping[str, Send] = {
        " ": Send("capture"),
        "c": Send("capture"),
        "k": Send("capture-control"),
        "n": Send("start-case", start_case_args(state)),
        "x": Send("close-case"),
    }
    if char == "g":
        chosen = _next_rule_choice(state)
        text = f"next case: {rule_text(*chosen)} (press n to start it)"
        return with_notice(dataclasses.replace(state, next_rule=chosen), text), ()
    if char in commands:
        return with_notice(state, f"{commands[char].command}…"), (commands[char],)
    if char == "a":
        enabled = not bool((state.status or {}).get("auto_capture", True))
        return state, (Send("auto-capture", {"enabled": enabled}),)
    if char == "e" and state.shown_fov is not None:
        entry = state.case.fov(state.shown_fov)
        command = "include" if entry is not None and entry.excluded else "exclude"
        return state, (Send(command, {"fov_id": state.shown_fov}),)
    return state, ()


def rule_text(guideline: object, specimen: object) -> str:
    """A rule as the viewer words it: "breast", "gastric resection", "gastric biopsy"."""
    return str(guideline) if guideline == "breast" or not specimen else f"{guideline} {specimen}"


def start_case_args(state: ViewerState) -> Mapping[str, Any]:
    """The start-case arguments for key n: the guideline picked with key g, if any."""
    if state.next_rule is None:
        return {}
    guideline, specimen = state.next_rule
    return {"guideline": guideline, "specimen": specimen}


def _next_rule_choice(state: ViewerState) -> tuple[str, str]:
    """The rule after the one picked (or, before any pick, after the open case's) in RULE_CHOICES."""
    current = state.next_rule
    if current is None:
        status = state.status or {}
        current = (str(status.get("guideline") or "breast"), str(status.get("specimen") or "resection"))
        if current[0] == "breast":
            current = RULE_CHOICES[0]  # the breast rule ignores the specimen
    index = RULE_CHOICES.index(current) if current in RULE_CHOICES else -1
    return RULE_CHOICES[(index + 1) % len(RULE_CHOICES)]


def _enter_mode(state: ViewerState, mode: Mode) -> ViewerState:
    if mode == "intense":
        target = next((f for f in reversed(list(state.fovs.values())) if f.kind == "control"), None)
        if target is None:
            return with_notice(state, "no positive control shown yet: press k to capture the control", error=True)
    elif mode == "roi":
        shown = state.fovs.get(state.shown_fov or "")
        target = shown if shown is not None and shown.kind == "fov" else None
        target = target or next((f for f in reversed(list(state.fovs.values())) if f.kind == "fov"), None)
        if target is None:
            return with_notice(state, "no tumour FOV yet: press space to capture one", error=True)
    else:
        target = state.fovs.get(state.shown_fov or "")
        if target is None:
            return with_notice(state, "no FOV captured yet: press space to capture one", error=True)
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
        return with_notice(state, "a region needs at least 3 corners (esc cancels)", error=True), ()
    polygon = [[round(row, 1), round(col, 1)] for row, col in state.polygon]
    command = MODE_COMMANDS[state.mode]
    send = Send(command, {"fov_id": state.mode_fov, "polygon": polygon})
    return with_notice(_leave_mode(state), f"{command} {state.mode_fov}…"), (send,)


def _apply_click(state: ViewerState, click: Click) -> ViewerState:
    if state.mode == "view":
        return state
    fov = state.fovs.get(state.mode_fov or "")
    rect = fov_display_rect(state, click.size)
    if fov is None or rect is None:
        return state
    if fov.shape is None:
        return with_notice(state, f"waiting for the image of {fov.fov_id} (its size is not known yet)", error=True)
    vertex = display_to_fov((click.x, click.y), rect, fov.shape)
    if vertex is None:
        return with_notice(state, "click inside the FOV", error=True)
    return dataclasses.replace(state, polygon=(*state.polygon, vertex), hover=(click.x, click.y))


# --- the daemon's heartbeat and the shown FOV's place -------------------------------------------------------------


def silence_s(state: ViewerState) -> float:
    """Seconds since the daemon was last heard from (its status heartbeat, or a snapshot)."""
    return state.now - (state.last_heard if state.last_heard is not None else state.started_at)


def daemon_responding(state: ViewerState) -> bool:
    """Whether the follower says the daemon's heartbeat came recently enough (``Responding``, not yet ``Silent``)."""
    return state.responding is True


def fov_display_rect(state: ViewerState, size: Size) -> Rect | None:
    """Where the shown FOV is drawn when it is in the big pane (None: no FOV image to show)."""
    fov = state.fovs.get(state.shown_fov or "")
    if fov is None or state.big != "fov":
        return None
    shape = _fov_display_shape(fov)
    return None if shape is None else fit(image_area(layout(size).big), shape)


def _fov_display_shape(fov: FovView) -> tuple[int, int] | None:
    if fov.overlay_shape is not None:
        return fov.overlay_shape
    return None if fov.base is None else (fov.base.shape[0], fov.base.shape[1])
