"""The wire protocol: multipart ZeroMQ messages ``[topic, JSON header, binary payloads...]``.

Every header is a versioned pydantic model with a sequence number and a timestamp; its ``body`` is validated by
the model of its topic. Binary data (JPEG previews, PNG overlay layers, raw arrays) travel as separate frames,
described by the header's ``payloads``. Nothing is pickled. See docs/protocol.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from her2scope.config.scoring import Guideline, Specimen
from her2scope.scoring.results import CaseResult, ClassCounts, ControlCalibration, FovResult, Her2Score, ScoreCall

PROTOCOL_VERSION = 1


def _exactly_int(value: object) -> object:
    # JSON true and 1.0 compare equal to 1 in Python: a version is the integer itself, nothing that equals it
    if type(value) is not int:
        raise ValueError(f"the protocol version must be the integer {PROTOCOL_VERSION}")
    return value


#: The ``v`` of every header, request and reply.
Version = Annotated[Literal[1], BeforeValidator(_exactly_int)]


#: A daemon whose heartbeat (``status``) has not come for this many intervals, and for at least ``MIN_SILENCE_MS``,
#: is taken as gone by every client (section 4.5): three lets two heartbeats be late or lost on a loaded machine.
SILENT_HEARTBEATS = 3
MIN_SILENCE_MS = 2000.0


def silence_limit_ms(heartbeat_ms: float) -> float:
    """How long without a heartbeat a client waits before it takes the daemon as gone."""
    return max(SILENT_HEARTBEATS * heartbeat_ms, MIN_SILENCE_MS)


class ProtocolError(ValueError):
    """A message or request that does not follow the protocol; the message says what is wrong."""


class Topic(StrEnum):
    """PUB topics. Subscribers filter on the first frame, so ``b"result"`` receives only results."""

    PREVIEW = "preview"
    CAPTURE = "capture"
    RESULT = "result"
    OVERLAY = "overlay"
    STATUS = "status"
    CASE = "case"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Payload(_Model):
    """One binary frame after the header."""

    name: str = Field(description="What it is, e.g. 'preview', 'fov', or an overlay layer name")
    encoding: Literal["jpeg", "png", "raw"]
    dtype: str | None = Field(None, description="For raw arrays: numpy dtype string, e.g. 'uint8'")
    shape: tuple[int, ...] | None = Field(None, description="For raw arrays: the array shape")


class Header(_Model):
    """The JSON header of every published message."""

    v: Version = 1
    topic: Topic
    seq: int = Field(ge=0, description="Per-publisher sequence number, +1 per message (previews included)")
    topic_seq: int = Field(
        0, ge=0, description="+1 per message of this topic: a subscriber to some topics only detects its gaps"
    )
    session: str = Field("", description="Random id of this daemon run: a new value means the daemon restarted")
    time_ms: float = Field(description="Wall-clock time the message was made, ms since the Unix epoch")
    case_id: str | None = None
    payloads: tuple[Payload, ...] = ()
    body: dict[str, Any] = Field(default_factory=dict)


class PreviewBody(_Model):
    """A downscaled live frame (payload: one JPEG)."""

    frame_index: int
    width: int
    height: int
    stability: str
    motion_um: float
    focus_ratio: float


class CaptureBody(_Model):
    """A FOV (or the control) was captured and queued for scoring (payload: none; the image is in the result)."""

    fov_id: str
    kind: Literal["fov", "control"]
    trigger: Literal["auto", "pedal", "control"] = Field(
        description="What asked for it: auto-capture, the foot pedal, or a request on the control endpoint"
    )
    frame_index: int
    pixel_size_um: float


# --- the case summary (published with every result, in case messages and in snapshots) ------------------------


class FovEntry(_Model):
    """One FOV (or the control) of a case, as the case summary lists it."""

    fov_id: str
    kind: Literal["fov", "control"]
    index: int = Field(description="Capture order in the case, from 1")
    status: Literal["pending", "scored", "failed"]
    excluded: bool = Field(False, description="Left out of the case score by the pathologist")
    roi: bool = Field(False, description="Whether an ROI polygon restricts where cells are counted")
    score: Her2Score | None = Field(None, description="The FOV's own call (null: not scored, or too few cells)")
    counts: ClassCounts | None = None
    total: int = Field(0, description="Tumour cells counted")
    error: str | None = Field(None, description="Why scoring failed")


class AuditEntry(_Model):
    """Something the pathologist changed (ROI, thresholds, exclusions, re-scores), for the audit trail."""

    time: str = Field(description="ISO 8601, UTC")
    action: str
    args: dict[str, Any] = Field(default_factory=dict)


class ControlEntry(ControlCalibration):
    """The case's positive-control calibration and the FOV it came from."""

    fov_id: str | None = None


class CaseCall(ScoreCall):
    """The running case score: the guideline's call on the counts of all included, scored FOVs."""

    counts: ClassCounts
    total: int
    percentages: dict[str, float]
    n_fovs: int
    warnings: tuple[str, ...] = ()

    @classmethod
    def of(cls, result: CaseResult) -> CaseCall:
        """The call and counts of a case result."""
        return cls(
            **dict(result.call),
            counts=result.counts,
            total=result.counts.total,
            percentages=result.percentages,
            n_fovs=result.n_fovs,
            warnings=result.warnings,
        )


class CaseSummary(_Model):
    """The open (or just closed) case: its FOVs, control, audit trail and running score. The defaults are the
    summary when no case is open."""

    case_id: str | None = None
    open: bool = Field(False, description="False when no case is open, or this one was closed")
    operator: str | None = None
    guideline: Guideline | None = None
    specimen: Specimen | None = None
    started_at: str | None = None
    closed_at: str | None = None
    adjustments: tuple[AuditEntry, ...] = ()
    fovs: tuple[FovEntry, ...] = ()
    control: ControlEntry | None = None
    case: CaseCall | None = Field(None, description="The running case score; null when no case is open")

    def fov(self, fov_id: str) -> FovEntry | None:
        """The entry of ``fov_id``, if the case has it."""
        return next((entry for entry in self.fovs if entry.fov_id == fov_id), None)


#: The summary when no case is open.
NO_CASE = CaseSummary()


class ResultBody(_Model):
    """A FOV's scoring outcome and the running case summary."""

    fov_id: str
    kind: Literal["fov", "control"]
    status: Literal["scored", "failed", "pending"] = Field(
        description="pending: captured or changed (ROI, threshold) and waiting to be (re-)scored"
    )
    result: FovResult | None = Field(None, description="The FOV's result, its cells included; null unless scored")
    calibration: ControlCalibration | None = Field(None, description="For a control: the calibration it gave")
    error: str | None = None
    case: CaseSummary = Field(description="The case summary after this FOV")
    score_ms: float | None = Field(None, description="Time the worker took")
    latency_ms: float | None = Field(None, description="From the trigger to this message")


class OverlayBody(_Model):
    """The overlay layers of a FOV (payloads: one RGBA PNG per layer, in ``layers`` order)."""

    fov_id: str
    kind: Literal["fov", "control"]
    layers: tuple[str, ...]
    width: int
    height: int


class StatusBody(_Model):
    """The daemon's heartbeat."""

    daemon: str = Field(description="Daemon state; 'running' in every heartbeat")
    camera: dict[str, Any] = Field(description="Camera state, fps, frame counters, last error")
    stability: str
    auto_capture: bool
    case_id: str | None
    n_fovs: int
    control_calibrated: bool
    worker: str = Field(description="Scoring worker state: idle, busy, restarting or stopped")
    queue: int = Field(description="FOVs waiting to be scored")
    unsaved_images: int = Field(
        0, description="Captured images not yet on disk (being written, or waiting to retry after a full disk)"
    )
    uptime_s: float
    objective: str = Field("", description="The objective in use (a name from the configuration's optics)")
    pixel_size_um: float = Field(0.0, description="µm per camera pixel with that objective")
    guideline: str | None = Field(None, description="The open case's scoring guideline: breast or gastric")
    specimen: str | None = Field(None, description="The open case's specimen kind: resection or biopsy")


class CaseBody(_Model):
    """A case was started, resumed (after a daemon restart) or closed: the whole case, for recorders."""

    event: Literal["started", "resumed", "closed"]
    case: CaseSummary = Field(description="The case summary; for 'closed', the final one")
    params: dict[str, Any] = Field(description="The case's scoring parameters (ScoringParams as JSON)")
    rule: dict[str, Any] = Field(
        description="The case's rule settings (CaseRule as JSON), with its guideline and specimen kind"
    )
    pixel_size_um: float
    software: dict[str, str] = Field(description="name and version of the daemon")


BODY_MODELS: dict[Topic, type[_Model]] = {
    Topic.PREVIEW: PreviewBody,
    Topic.CAPTURE: CaptureBody,
    Topic.RESULT: ResultBody,
    Topic.OVERLAY: OverlayBody,
    Topic.STATUS: StatusBody,
    Topic.CASE: CaseBody,
}


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its header, its typed body and its payload frames."""

    header: Header
    body: _Model
    payloads: tuple[bytes, ...]

    def payload(self, name: str) -> bytes:
        """The payload frame called ``name``; KeyError if there is none."""
        for description, data in zip(self.header.payloads, self.payloads, strict=True):
            if description.name == name:
                return data
        raise KeyError(name)


def encode(
    topic: Topic,
    seq: int,
    time_ms: float,
    body: _Model,
    payloads: Sequence[tuple[Payload, bytes]] = (),
    case_id: str | None = None,
    *,
    topic_seq: int = 0,
    session: str = "",
) -> list[bytes]:
    """Frames of one message: ``[topic, header JSON, *payload bytes]``."""
    if not isinstance(body, BODY_MODELS[topic]):
        raise TypeError(f"a {topic.value} message needs a {BODY_MODELS[topic].__name__}, got {type(body).__name__}")
    header = Header(
        topic=topic,
        seq=seq,
        topic_seq=topic_seq,
        session=session,
        time_ms=time_ms,
        case_id=case_id,
        payloads=tuple(p for p, _ in payloads),
        body=body.model_dump(mode="json"),
    )
    return [topic.value.encode(), header.model_dump_json().encode(), *(data for _, data in payloads)]


def decode(frames: Sequence[bytes]) -> Message:
    """Parse and validate a published message; ProtocolError says what is wrong."""
    if len(frames) < 2:
        raise ProtocolError(f"a message has at least 2 frames (topic, header), got {len(frames)}")
    try:
        topic = Topic(bytes(frames[0]).decode())
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"unknown topic {bytes(frames[0])[:40]!r}") from None
    try:
        header = Header.model_validate_json(bytes(frames[1]))  # bytes() as for the other frames: zmq.Frame too
    except ValidationError as error:
        raise ProtocolError(f"invalid {topic.value} header: {_first_error(error)}") from None
    if header.topic != topic:  # before the body, which would otherwise fail against the wrong model
        raise ProtocolError(f"topic frame {topic.value!r} does not match header topic {header.topic.value!r}")
    try:
        body = BODY_MODELS[topic].model_validate(header.body)
    except ValidationError as error:
        raise ProtocolError(f"invalid {topic.value} body: {_first_error(error)}") from None
    if len(frames) - 2 != len(header.payloads):
        raise ProtocolError(f"header declares {len(header.payloads)} payloads, message has {len(frames) - 2}")
    return Message(header, body, tuple(bytes(f) for f in frames[2:]))


# --- control requests and replies -------------------------------------------------------------------------------


class Command(StrEnum):
    """Requests the control endpoint takes."""

    CAPTURE = "capture"
    CAPTURE_CONTROL = "capture-control"
    START_CASE = "start-case"
    CLOSE_CASE = "close-case"
    SET_ROI = "set-roi"
    SET_WEAK = "set-weak"
    SET_INTENSE = "set-intense"
    EXCLUDE = "exclude"
    INCLUDE = "include"
    RESCORE = "rescore"
    STATUS = "status"
    SNAPSHOT = "snapshot"
    REPLAY = "replay"
    AUTO_CAPTURE = "auto-capture"
    STAGE = "stage"
    IMAGE = "image"
    SET_OBJECTIVE = "set-objective"


class Request(_Model):
    """A control request: one JSON frame (after the ROUTER/DEALER envelope)."""

    v: Version = 1
    id: str = Field("", max_length=200, description="Echoed in the reply")
    command: Command
    args: dict[str, Any] = Field(default_factory=dict)


# --- the arguments of each command ------------------------------------------------------------------------------


class CommandArgs(_Model):
    """The arguments of a command. A key the command does not take is an error (so that a typo cannot change what
    it does); ``_messages`` words a field's error as docs/protocol.md does."""

    _messages: ClassVar[dict[str, str]] = {}


NonEmpty = Annotated[str, Field(min_length=1)]
#: A polygon as sent: its vertices are checked by the daemon against its configured limit.
PolygonArg = list[Any]


class NoArgs(CommandArgs):
    """The command takes no arguments."""


class StartCaseArgs(CommandArgs):
    case_id: NonEmpty | None = Field(None, description="default: case-DATE-TIME")
    operator: NonEmpty | None = None
    guideline: NonEmpty | None = Field(None, description="breast or gastric (default: the configuration's)")
    specimen: NonEmpty | None = Field(None, description="resection or biopsy (default: the configuration's)")
    _messages = {
        name: f"'{name}' must be a non-empty string when given"
        for name in ("case_id", "operator", "guideline", "specimen")
    }


class FovArgs(CommandArgs):
    fov_id: NonEmpty
    _messages = {"fov_id": "'fov_id' must be a non-empty string"}


class RoiArgs(FovArgs):
    polygon: PolygonArg | None = Field(None, description="null or missing: the whole FOV again")


class WeakArgs(FovArgs):
    polygon: PolygonArg


class IntenseArgs(CommandArgs):
    fov_id: NonEmpty | None = Field(None, description="default: the case's control")
    polygon: PolygonArg | None = Field(None, description="null: the whole control again")
    _messages = {"fov_id": "'fov_id' must be a non-empty string when given"}


class RescoreArgs(CommandArgs):
    fov_id: NonEmpty | None = Field(None, description="default: every FOV of the case")
    _messages = {"fov_id": "'fov_id' must be a non-empty string when given"}


class ReplayArgs(CommandArgs):
    since_seq: Annotated[int, Field(ge=0, strict=True)]
    _messages = {"since_seq": "replay needs 'since_seq', a non-negative integer"}


class AutoCaptureArgs(CommandArgs):
    enabled: Annotated[bool, Field(strict=True)]
    _messages = {"enabled": "auto-capture needs 'enabled': true or false"}


class StageArgs(CommandArgs):
    action: NonEmpty
    field: Any = Field(None, description="goto-field: the field's index")
    duration_ms: Any = Field(2000, description="unplug: for how long, ms")
    _messages = {"action": "'action' must be a non-empty string"}


class ObjectiveArgs(CommandArgs):
    objective: NonEmpty
    _messages = {"objective": "'objective' must be a non-empty string"}


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """What a command takes and what it does, in one line (docs/protocol.md section 8, ``her2scope ctl --help``)."""

    args: type[CommandArgs]
    summary: str


COMMANDS: dict[Command, CommandInfo] = {
    Command.CAPTURE: CommandInfo(NoArgs, "Capture the field in view now and score it."),
    Command.CAPTURE_CONTROL: CommandInfo(NoArgs, "Capture the field in view as the positive control and calibrate."),
    Command.START_CASE: CommandInfo(StartCaseArgs, "Start a case (closing the open one), with its guideline."),
    Command.CLOSE_CASE: CommandInfo(NoArgs, "Close the open case once its queued FOVs are scored."),
    Command.SET_ROI: CommandInfo(RoiArgs, "Count a FOV's cells inside a polygon only (or everywhere again)."),
    Command.SET_WEAK: CommandInfo(WeakArgs, "Take the weak threshold from a region of typical weak staining."),
    Command.SET_INTENSE: CommandInfo(IntenseArgs, "Calibrate the intense threshold from a region of the control."),
    Command.EXCLUDE: CommandInfo(FovArgs, "Leave a FOV out of the case score."),
    Command.INCLUDE: CommandInfo(FovArgs, "Count an excluded FOV in the case score again."),
    Command.RESCORE: CommandInfo(RescoreArgs, "Score one FOV, or the whole case, again."),
    Command.STATUS: CommandInfo(NoArgs, "The daemon's heartbeat body, now."),
    Command.SNAPSHOT: CommandInfo(NoArgs, "The daemon's status and the open case's summary and score."),
    Command.REPLAY: CommandInfo(ReplayArgs, "The buffered messages published after a sequence number."),
    Command.AUTO_CAPTURE: CommandInfo(AutoCaptureArgs, "Turn capture of stable fields on or off."),
    Command.STAGE: CommandInfo(StageArgs, "Drive the simulated microscope's stage (simulated camera only)."),
    Command.IMAGE: CommandInfo(FovArgs, "A FOV's lossless image (PNG)."),
    Command.SET_OBJECTIVE: CommandInfo(ObjectiveArgs, "Switch to another objective of the configuration."),
}


def command_args(request: Request) -> CommandArgs:
    """The request's arguments as its command's model; ProtocolError names an unknown or a bad argument."""
    model = COMMANDS[request.command].args
    unknown = sorted(set(request.args) - set(model.model_fields))
    if unknown:
        allowed = ", ".join(model.model_fields) or "none"
        raise ProtocolError(
            f"unknown argument(s) {', '.join(unknown)} for {request.command.value}; it takes: {allowed}"
        )
    try:
        return model.model_validate(request.args)
    except ValidationError as error:
        item = error.errors()[0]
        name = str(item["loc"][0]) if item["loc"] else ""
        raise ProtocolError(model._messages.get(name) or f"'{name}': {item['msg']}") from None


class Reply(_Model):
    """A control reply: one JSON frame, then any payload frames it declares."""

    v: Version = 1
    id: str = ""
    ok: bool
    error: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    payload_count: int = Field(0, ge=0, description="Frames that follow this one (replay: message frames)")


#: Where :func:`request_id` looks for the id of a request too large to parse.
_ID_PREFIX_BYTES = 4096
_ID_PATTERN = re.compile(rb'"id"\s*:\s*"([^"\\]{0,200})"')


def request_id(frame: bytes, max_bytes: int | None = None) -> str:
    """The ``id`` of a request frame when one can be read (even from an invalid request), else "".

    A frame over ``max_bytes`` is not parsed (that is what its limit is for): its id is looked for in its first
    4 KiB only.
    """
    if max_bytes is not None and len(frame) > max_bytes:
        match = _ID_PATTERN.search(bytes(frame[:_ID_PREFIX_BYTES]))
        return match.group(1).decode("utf-8", "replace") if match else ""
    try:
        document = json.loads(frame)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        return ""
    identifier = document.get("id") if isinstance(document, dict) else None
    return identifier[:200] if isinstance(identifier, str) else ""


def parse_request(frame: bytes, max_bytes: int | None = None) -> Request:
    """Validate one request frame (at most ``max_bytes`` long); ProtocolError says what is wrong."""
    if max_bytes is not None and len(frame) > max_bytes:
        raise ProtocolError(f"request too large: {len(frame)} bytes; the limit is {max_bytes} bytes")
    try:
        document = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"request is not JSON: {error}") from None
    except RecursionError:
        raise ProtocolError("request is nested too deeply to be read") from None
    if not isinstance(document, dict):
        raise ProtocolError("request must be a JSON object with 'command' and 'args'")
    try:
        return Request.model_validate(document)
    except ValidationError as error:
        raise ProtocolError(f"invalid request: {_first_error(error)}") from None


def _first_error(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(p) for p in item["loc"]) or "(top level)"
    return f"{where}: {item['msg']}" + (f" (got {item['input']!r:.80})" if "input" in item else "")
