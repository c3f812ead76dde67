"""The case recorder: follows the daemon and keeps one folder per case, a durable, auditable record.

A case is a *run* in the sense of bluesky's event model: a ``start`` document (who, what, every scoring
parameter), a ``descriptor`` (the fields of a FOV event, with dtype, shape and units), one ``event`` per FOV
result, an ``action`` per adjustment of the pathologist, and a ``stop`` (the final score, ``exit_status``).
Documents are pydantic models, built only by :class:`Run` (so uids and sequence numbers cannot drift), one JSON
object per line of ``events.jsonl``. Large data is referenced by a path relative to the case folder.

Folder layout (``<out>/<case_id>/``, mode 0o700, files 0o600)::

    events.jsonl            append-only log; each line written whole, flushed and fsynced
    schema.json             JSON Schema of the documents (pydantic ``model_json_schema``)
    recorder-state.json     daemon session and last sequence number processed (atomic rewrite)
    images/<fov_id>.png     the captured FOV / control, lossless, byte for byte the daemon's file
    overlays/<fov_id>/<layer>.png   the overlay layers (RGBA) of the FOV's latest result
    overlays/<fov_id>.png   the default layers composed over the downscaled image, for the report
    report.html             for people; rewritten atomically after every change, final at stop

Recovery (zguide "Clone"): at start, on a ``topic_seq`` gap, on a new daemon ``session`` and when the heartbeat
stops, the recorder takes a ``snapshot``, ``replay``s the messages after the last sequence number it processed and
gives every scored FOV of the snapshot that has no event yet one (``source: "snapshot"``). Duplicates are
impossible: an event carries the daemon's ``(session, seq)`` and actions their index in the case's adjustments.
A torn last line (a crash mid-write) is truncated at the next start; the message it held is replayed.
A failed write (a full disk) is logged, kept in memory and retried; it never leaves a partial line behind.

States of the loop: DISCONNECTED (no daemon found) → SYNCING (snapshot + replay) → FOLLOWING; a gap, a new
session or silence → SYNCING; a failed request → DISCONNECTED (retried every ``RETRY_S``).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from collections.abc import Callable
from enum import StrEnum
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from clients.control import ControlClient, ControlError, Subscriber
from config.scoring import CaseRule, ScoringParams
from daemon.protocol import CaseBody, Message, OverlayBody, ProtocolError, ResultBody, StatusBody, Topic, decode
from scoring.results import ControlCalibration

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
EVENTS_FILE = "events.jsonl"
SCHEMA_FILE = "schema.json"
STATE_FILE = "recorder-state.json"
REPORT_FILE = "report.html"
CLASSES = ("0", "1+", "2+", "3+")
TOPICS = (Topic.CAPTURE, Topic.RESULT, Topic.OVERLAY, Topic.STATUS, Topic.CASE)


# --- documents ---------------------------------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StartDoc(_Doc):
    """The case's start: who and what, before any data; every parameter the scores depend on."""

    doc: Literal["start"] = "start"
    uid: str
    time: float = Field(description="Unix time (s) the document was made")
    schema_version: int = SCHEMA_VERSION
    case_id: str
    operator: str | None
    started_at: str | None = Field(description="ISO 8601 UTC time the daemon started the case")
    software: dict[str, str] = Field(description="name and version of the daemon that scored the case")
    recorder_version: str
    params: ScoringParams = Field(description="The case's scoring parameters when it started")
    rule: CaseRule = Field(description="The ASCO/CAP rule settings")
    params_source: Literal["case message", "daemon state", "recorder config", "rescore"] = Field(
        description="Where params/rule came from: the daemon's case message (normal), its case.json, (when "
        "neither could be read) the recorder's own configuration, or an offline re-score's choice"
    )
    pixel_size_um: float | None = Field(description="µm per camera pixel")
    control_fov_id: str | None = Field(description="The control calibrating the case when it started (resumed)")
    control: ControlCalibration | None = None
    daemon_session: str | None = None
    rescore_of: str | None = Field(None, description="For a re-score: uid of the recorded case's start document")
    changes: dict[str, tuple[Any, Any]] | None = Field(None, description="For a re-score: parameter → (old, new)")


class DataKey(_Doc):
    """One field of a FOV event, declared once in the descriptor."""

    dtype: Literal["string", "number", "integer", "boolean", "object", "array"]
    shape: tuple[int, ...] = ()
    units: str | None = None
    description: str


class DescriptorDoc(_Doc):
    """Declares the fields of the FOV events that follow."""

    doc: Literal["descriptor"] = "descriptor"
    uid: str
    time: float
    run_start: str
    name: Literal["fov"] = "fov"
    data_keys: dict[str, DataKey]


class FovData(_Doc):
    """The data of one FOV event (see the descriptor for units). Nullable fields are null for a failed FOV."""

    counts: dict[str, int] | None
    total: int
    percentages: dict[str, float] | None
    score: str | None
    call_status: str | None
    her2_low: bool | None
    zero_subtype: str | None
    reason: str | None
    weak_threshold_od: float | None
    intense_threshold_od: float | None
    intense_threshold_source: str | None
    n_excluded_nuclei: int | None
    tumour_area_mm2: float | None
    pixel_size_um: float | None
    warnings: tuple[str, ...] = ()
    error: str | None = None
    calibration: ControlCalibration | None = None
    image: str
    overlay: str
    overlay_layers: str
    case_score: str | None = Field(description="The running case score after this FOV")
    case_status: str | None


class EventDoc(_Doc):
    """One FOV (or control) result."""

    doc: Literal["event"] = "event"
    uid: str
    time: float
    descriptor: str
    seq_num: int = Field(ge=1)
    fov_id: str
    kind: Literal["fov", "control"]
    status: Literal["scored", "failed"]
    rescore: bool = Field(description="The FOV had an event before: this result replaces it")
    source: Literal["live", "replay", "snapshot", "rescore"] = Field(
        description="live/replay: from the daemon's result message; snapshot: from its case summary after a gap "
        "(counts and score only); rescore: computed offline by `her2scope rescore`"
    )
    daemon_session: str | None
    daemon_seq: int | None
    data: FovData


class ActionDoc(_Doc):
    """An adjustment by the pathologist (ROI, weak/intense threshold region, exclusion, re-score)."""

    doc: Literal["action"] = "action"
    uid: str
    time: float
    run_start: str
    seq_num: int = Field(ge=1)
    index: int = Field(ge=0, description="Its index in the case's adjustments (each is recorded once)")
    at: str = Field(description="ISO 8601 UTC time the daemon recorded it")
    action: str
    args: dict[str, Any]


class StopDoc(_Doc):
    """The case's end: the final score over the included tumour FOVs."""

    doc: Literal["stop"] = "stop"
    uid: str
    time: float
    run_start: str
    exit_status: Literal["success", "abort", "fail"]
    reason: str
    closed_at: str | None
    score: str | None
    status: str | None
    her2_low: bool | None
    zero_subtype: str | None
    case_reason: str | None
    counts: dict[str, int] | None
    percentages: dict[str, float] | None
    total: int
    n_fovs: int
    warnings: tuple[str, ...]
    control_fov_id: str | None
    control_qc_passed: bool | None
    excluded: tuple[str, ...]
    num_events: int


Document = Annotated[StartDoc | DescriptorDoc | EventDoc | ActionDoc | StopDoc, Field(discriminator="doc")]
DOCUMENT = TypeAdapter(Document)

FOV_DATA_KEYS: dict[str, DataKey] = {
    "counts": DataKey(dtype="object", shape=(4,), units="cells", description="tumour cells per class 0/1+/2+/3+"),
    "total": DataKey(dtype="integer", units="cells", description="tumour cells counted"),
    "percentages": DataKey(dtype="object", shape=(4,), units="%", description="share of each class"),
    "score": DataKey(dtype="string", description="the FOV's ASCO/CAP score (null: too few cells)"),
    "call_status": DataKey(dtype="string", description="negative / equivocal, reflex ISH / positive / ..."),
    "her2_low": DataKey(dtype="boolean", description="1+ or 2+"),
    "zero_subtype": DataKey(dtype="string", description="ultralow / null for a 0"),
    "reason": DataKey(dtype="string", description="which branch of the rule decided"),
    "weak_threshold_od": DataKey(dtype="number", units="OD", description="DAB optical density of any staining"),
    "intense_threshold_od": DataKey(dtype="number", units="OD", description="DAB optical density of intense"),
    "intense_threshold_source": DataKey(dtype="string", description="default / positive control (region) / ..."),
    "n_excluded_nuclei": DataKey(dtype="integer", units="nuclei", description="next to intense staining"),
    "tumour_area_mm2": DataKey(dtype="number", units="mm²", description="analysed tumour area"),
    "pixel_size_um": DataKey(dtype="number", units="µm/px", description="of the captured image"),
    "warnings": DataKey(dtype="array", shape=(-1,), description="scoring warnings of this FOV"),
    "error": DataKey(dtype="string", description="why scoring failed"),
    "calibration": DataKey(dtype="object", description="a control's calibration (ControlCalibration)"),
    "image": DataKey(dtype="string", description="path of the lossless PNG (BGR as captured), relative"),
    "overlay": DataKey(dtype="string", description="path of the composed overlay PNG, relative"),
    "overlay_layers": DataKey(dtype="string", description="folder of the RGBA layer PNGs, relative"),
    "case_score": DataKey(dtype="string", description="running case score after this FOV"),
    "case_status": DataKey(dtype="string", description="running case status after this FOV"),
}


def _uid() -> str:
    return secrets.token_hex(16)


def _recorder_version() -> str:
    try:
        return version("her2scope")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def compose_start(
    *,
    case_id: str,
    operator: str | None,
    started_at: str | None,
    software: dict[str, str],
    params: ScoringParams,
    rule: CaseRule,
    params_source: Literal["case message", "daemon state", "recorder config", "rescore"],
    pixel_size_um: float | None,
    control: dict[str, Any] | None,
    daemon_session: str | None,
    rescore_of: str | None = None,
    changes: dict[str, tuple[Any, Any]] | None = None,
) -> tuple[StartDoc, Run]:
    """A case's start document and the :class:`Run` that makes the documents that follow it."""
    calibration = None
    control_fov_id = None
    if control:
        control_fov_id = control.get("fov_id")
        calibration = ControlCalibration.model_validate({k: v for k, v in control.items() if k != "fov_id"})
    start = StartDoc(
        uid=_uid(),
        time=time.time(),
        case_id=case_id,
        operator=operator,
        started_at=started_at,
        software=software,
        recorder_version=_recorder_version(),
        params=params,
        rule=rule,
        params_source=params_source,
        pixel_size_um=pixel_size_um,
        control_fov_id=control_fov_id,
        control=calibration,
        daemon_session=daemon_session,
        rescore_of=rescore_of,
        changes=changes,
    )
    return start, Run(start)


class Run:
    """Makes the documents of one case after its start: ids and sequence numbers are kept here only."""

    def __init__(self, start: StartDoc, descriptor: DescriptorDoc | None = None, n_events: int = 0, n_actions: int = 0):
        self.start = start
        self.descriptor = descriptor
        self._n_events = n_events
        self._n_actions = n_actions

    @classmethod
    def resume(cls, docs: list[BaseModel]) -> Run | None:
        """The run of a log read back from disk (None when it has no start)."""
        start = next((d for d in docs if isinstance(d, StartDoc)), None)
        if start is None:
            return None
        descriptor = next((d for d in docs if isinstance(d, DescriptorDoc)), None)
        events = sum(1 for d in docs if isinstance(d, EventDoc))
        actions = sum(1 for d in docs if isinstance(d, ActionDoc))
        return cls(start, descriptor, events, actions)

    def make_descriptor(self) -> DescriptorDoc:
        """The descriptor of FOV events (made once)."""
        if self.descriptor is None:
            self.descriptor = DescriptorDoc(
                uid=_uid(), time=time.time(), run_start=self.start.uid, data_keys=FOV_DATA_KEYS
            )
        return self.descriptor

    def event(self, **fields: Any) -> EventDoc:
        """The next FOV event; the descriptor must have been made."""
        if self.descriptor is None:
            raise RuntimeError("make_descriptor() before the first event")
        self._n_events += 1
        fields.setdefault("time", time.time())
        return EventDoc(uid=_uid(), descriptor=self.descriptor.uid, seq_num=self._n_events, **fields)

    def action(self, index: int, adjustment: dict[str, Any]) -> ActionDoc:
        """The action document of the case's adjustment number ``index``."""
        self._n_actions += 1
        return ActionDoc(
            uid=_uid(),
            time=time.time(),
            run_start=self.start.uid,
            seq_num=self._n_actions,
            index=index,
            at=str(adjustment.get("time", "")),
            action=str(adjustment.get("action", "")),
            args=dict(adjustment.get("args") or {}),
        )

    def stop(self, summary: dict[str, Any], exit_status: Literal["success", "abort", "fail"], reason: str) -> StopDoc:
        """The stop document from the case's final summary (``CaseStore.summary``)."""
        case = summary.get("case") or {}
        control = summary.get("control") or None
        return StopDoc(
            uid=_uid(),
            time=time.time(),
            run_start=self.start.uid,
            exit_status=exit_status,
            reason=reason,
            closed_at=summary.get("closed_at"),
            score=case.get("score"),
            status=case.get("status"),
            her2_low=case.get("her2_low"),
            zero_subtype=case.get("zero_subtype"),
            case_reason=case.get("reason"),
            counts=case.get("counts"),
            percentages=case.get("percentages"),
            total=int(case.get("total") or 0),
            n_fovs=int(case.get("n_fovs") or 0),
            warnings=tuple(case.get("warnings") or ()),
            control_fov_id=control.get("fov_id") if control else None,
            control_qc_passed=control.get("qc_passed") if control else None,
            excluded=tuple(f["fov_id"] for f in summary.get("fovs", []) if f.get("excluded")),
            num_events=self._n_events,
        )


def document_schema() -> dict[str, Any]:
    """The JSON Schema of every document of ``events.jsonl`` (one source of truth: the pydantic models)."""
    schema = DOCUMENT.json_schema()
    schema["title"] = "her2scope case log document"
    schema["description"] = "One line of events.jsonl: start, descriptor, event, action or stop."
    return schema


def fov_data(
    fov_id: str, result_body: dict[str, Any] | None, summary: dict[str, Any], entry: dict[str, Any] | None = None
) -> FovData:
    """Event data from a result body (``ResultBody`` as JSON) or, after a gap, from the summary's FOV ``entry``."""
    case = summary.get("case") or {}
    refs = {
        "image": f"images/{fov_id}.png",
        "overlay": f"overlays/{fov_id}.png",
        "overlay_layers": f"overlays/{fov_id}/",
        "case_score": case.get("score"),
        "case_status": case.get("status"),
    }
    result = (result_body or {}).get("result")
    if result is not None:
        call = result["call"]
        return FovData(
            counts=result["counts"],
            total=sum(result["counts"].values()),
            percentages=result["percentages"],
            score=call["score"],
            call_status=call["status"],
            her2_low=call["her2_low"],
            zero_subtype=call["zero_subtype"],
            reason=call["reason"],
            weak_threshold_od=result["weak_threshold_od"],
            intense_threshold_od=result["intense_threshold_od"],
            intense_threshold_source=result["intense_threshold_source"],
            n_excluded_nuclei=result["n_excluded_nuclei"],
            tumour_area_mm2=result["tumour_area_mm2"],
            pixel_size_um=result["pixel_size_um"],
            warnings=tuple(result["warnings"]),
            error=None,
            calibration=(result_body or {}).get("calibration"),
            **refs,
        )
    counts = (entry or {}).get("counts")
    total = sum(counts.values()) if counts else 0
    return FovData(
        counts=counts,
        total=total,
        percentages={k: 100.0 * v / total if total else 0.0 for k, v in counts.items()} if counts else None,
        score=(entry or {}).get("score"),
        call_status=None,
        her2_low=None,
        zero_subtype=None,
        reason=None,
        weak_threshold_od=None,
        intense_threshold_od=None,
        intense_threshold_source=None,
        n_excluded_nuclei=None,
        tumour_area_mm2=None,
        pixel_size_um=None,
        error=(result_body or {}).get("error") or (entry or {}).get("error"),
        **refs,
    )


def read_log(path: Path) -> tuple[list[BaseModel], int]:
    """The documents of an events.jsonl and the byte length of its whole lines (a torn tail is not counted).

    Raises
    ------
    ValueError
        A complete line that is not a valid document (the log was edited or is not a her2scope log).
    """
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1  # bytes after the last newline: a line torn by a crash
    docs: list[BaseModel] = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            docs.append(DOCUMENT.validate_json(line))
        except ValidationError as error:
            raise ValueError(f"{path}: line {number} is not a valid document: {error.errors()[0]['msg']}") from None
    return docs, end


# --- durable files -----------------------------------------------------------------------------------------------


def _write_fully(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (the one place bytes reach the disk; tests replace it to fill the disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, line: bytes) -> None:
    """Append one whole line and fsync; after any failure the file is cut back to its previous length."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_fully(fd, line)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)  # never leave a partial line behind (a full disk)
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (temporary file, fsync, rename): a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_fully(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial temporary file would hold on to the space of a full disk
        raise
    _fsync_dir(path.parent)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


class CaseFolder:
    """One case's folder: its documents (in memory and in ``events.jsonl``) and its files.

    Every write that fails (a full disk) is logged and queued; :meth:`retry` writes the queue in order, so the
    log on disk is always a prefix of the documents in memory, made of whole lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        _private_dir(path)
        for sub in ("images", "overlays"):
            _private_dir(path / sub)
        log_path = path / EVENTS_FILE
        self.docs, end = read_log(log_path)
        if log_path.exists() and log_path.stat().st_size > end:
            torn = log_path.stat().st_size - end
            with open(log_path, "r+b") as handle:  # the torn tail of a crash mid-write: its message is replayed
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
            log.warning("torn_line_truncated", case_dir=str(path), bytes=torn)
        self.run = Run.resume(self.docs)
        self.state: dict[str, Any] = {}
        try:
            self.state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.state = {}
        self.summary: dict[str, Any] | None = None  # the latest case summary heard from the daemon
        self.overlay_layers: dict[str, tuple[str, ...]] = {}
        self._pending_lines: list[bytes] = []
        self._pending_files: dict[str, bytes] = {}  # relative path → content, in insertion order
        self.write_errors = 0
        if not (path / SCHEMA_FILE).exists():
            self.write_file(SCHEMA_FILE, json.dumps(document_schema(), indent=1).encode())

    @property
    def case_id(self) -> str:
        """The case (the folder's name)."""
        return self.path.name

    @property
    def stopped(self) -> bool:
        """The case has its stop document."""
        return any(isinstance(d, StopDoc) for d in self.docs)

    def events(self) -> list[EventDoc]:
        """Every FOV event, in log order."""
        return [d for d in self.docs if isinstance(d, EventDoc)]

    def has_event(self, fov_id: str) -> bool:
        """Whether ``fov_id`` has an event."""
        return any(isinstance(d, EventDoc) and d.fov_id == fov_id for d in self.docs)

    def seen(self, session: str, seq: int) -> bool:
        """Whether the daemon message ``(session, seq)`` already has an event."""
        return any(isinstance(d, EventDoc) and d.daemon_seq == seq and d.daemon_session == session for d in self.docs)

    def n_actions(self) -> int:
        """Actions recorded (the case's adjustments are recorded in order, once each)."""
        return sum(1 for d in self.docs if isinstance(d, ActionDoc))

    @property
    def pending(self) -> int:
        """Writes waiting for a retry."""
        return len(self._pending_lines) + len(self._pending_files)

    def append(self, doc: BaseModel) -> None:
        """Add a document to the log (written now, or queued if the disk refuses it)."""
        self.docs.append(doc)
        self._pending_lines.append(doc.model_dump_json().encode() + b"\n")
        self.retry()

    def write_file(self, relative: str, data: bytes) -> None:
        """Atomically (re)write a file of the folder (queued if the disk refuses it)."""
        self._pending_files.pop(relative, None)
        self._pending_files[relative] = data
        self.retry()

    def read_file(self, relative: str) -> bytes | None:
        """A file's content (waiting to be written, or on disk); None if there is none."""
        if relative in self._pending_files:
            return self._pending_files[relative]
        try:
            return (self.path / relative).read_bytes()
        except OSError:
            return None

    def has_file(self, relative: str) -> bool:
        """The file exists or is waiting to be written."""
        return relative in self._pending_files or (self.path / relative).exists()

    def retry(self) -> bool:
        """Write what is queued, in order; False (and logged) when the disk still refuses."""
        try:
            while self._pending_lines:
                append_line(self.path / EVENTS_FILE, self._pending_lines[0])
                self._pending_lines.pop(0)
            for relative in list(self._pending_files):
                target = self.path / relative
                _private_dir(target.parent)
                atomic_write(target, self._pending_files[relative])
                del self._pending_files[relative]
        except OSError as error:
            self.write_errors += 1
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error(
                "disk_full" if full else "write_failed",
                case_dir=str(self.path),
                error=str(error),
                pending=self.pending,
                hint="free disk space: the recorder keeps the data in memory and retries" if full else None,
            )
            return False
        return True

    def save_state(self, **update: Any) -> None:
        """Update ``recorder-state.json`` (atomically)."""
        self.state.update(update, updated=time.time())
        self.write_file(STATE_FILE, json.dumps(self.state).encode())


# --- the recorder ------------------------------------------------------------------------------------------------


class LoopState(StrEnum):
    """What the recorder's loop is doing."""

    DISCONNECTED = "disconnected"
    SYNCING = "syncing"
    FOLLOWING = "following"


class Recorder:
    """Follows the daemon and writes the case folders under ``out``. Drive it with :meth:`step` or :meth:`run`.

    ``endpoints`` is called whenever the recorder (re)connects (a restarted daemon may use new ports).
    ``daemon_state`` (the daemon's state folder), when readable, supplies a case's parameters and images that
    the daemon can no longer send (the case message was missed, the case is closed).
    """

    RETRY_S = 1.0

    def __init__(
        self,
        out: Path,
        endpoints: Callable[[], dict[str, str]],
        *,
        fallback_params: ScoringParams,
        fallback_rule: CaseRule,
        pixel_size_um: float | None = None,
        daemon_state: Path | None = None,
        heartbeat_ms: float = 1000.0,
        timeout_ms: float = 5000.0,
    ) -> None:
        self.out = out.expanduser()
        _private_dir(self.out)
        self._endpoints = endpoints
        self._fallback = (fallback_params, fallback_rule, pixel_size_um)
        self._daemon_state = daemon_state.expanduser() if daemon_state else None
        self._silence_ms = max(5 * heartbeat_ms, 2000.0)
        self._timeout_ms = timeout_ms
        self._context: zmq.Context[Any] = zmq.Context()
        self._subscriber: Subscriber | None = None
        self._control: ControlClient | None = None
        self.state = LoopState.DISCONNECTED
        self.session: str | None = None
        self.last_seq = 0
        self._topic_seq: dict[str, int] = {}
        self._last_heard = time.monotonic()
        self._last_attempt = -1e9
        self._last_retry = time.monotonic()
        self._daemon_case: str | None = None
        self.folders: dict[str, CaseFolder] = {}
        self._dirty: set[str] = set()

    # life cycle

    def close(self) -> None:
        """Close the sockets (everything written is already on disk)."""
        self._disconnect()
        self._context.term()

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Record until ``should_stop()``."""
        try:
            while not should_stop():
                self.step()
        finally:
            for folder in self.folders.values():
                folder.retry()
            self.close()

    def step(self, timeout_ms: float = 200.0) -> None:
        """One turn of the loop: (re)connect if needed, handle at most a batch of messages, retry writes."""
        now = time.monotonic()
        if self.state == LoopState.DISCONNECTED:
            if now - self._last_attempt < self.RETRY_S:
                time.sleep(min(timeout_ms / 1000.0, self.RETRY_S))
                return
            self._last_attempt = now
            self._connect()
            return
        assert self._subscriber is not None
        try:
            for turn in range(50):
                message = self._subscriber.receive(timeout_ms if turn == 0 else 0)
                if message is None:
                    break
                self._last_heard = time.monotonic()
                self._on_live(message)
                if self.state != LoopState.FOLLOWING:
                    break
            if self.state == LoopState.SYNCING:
                self._sync("gap")
            elif (time.monotonic() - self._last_heard) * 1000.0 > self._silence_ms:
                log.warning("daemon_silent", silent_ms=round((time.monotonic() - self._last_heard) * 1000.0))
                self._disconnect()
                self._connect()
        except ControlError as error:
            log.warning("daemon_unreachable", error=str(error))
            self._disconnect()
        except ProtocolError as error:
            log.warning("message_invalid", error=str(error))
        if time.monotonic() - self._last_retry >= self.RETRY_S:
            self._last_retry = time.monotonic()
            for folder in self.folders.values():
                if folder.pending:
                    folder.retry()
        self._flush_reports()

    def _connect(self) -> None:
        try:
            endpoints = self._endpoints()
        except ControlError as error:
            log.warning("daemon_not_found", error=str(error))
            self.state = LoopState.DISCONNECTED
            return
        self._subscriber = Subscriber(endpoints["publish"], [t.value for t in TOPICS], context=self._context)
        self._control = ControlClient(endpoints["control"], timeout_ms=self._timeout_ms, context=self._context)
        log.info("recorder_connected", **endpoints)
        try:
            self._sync("start")
        except ControlError as error:
            log.warning("daemon_unreachable", error=str(error))
            self._disconnect()

    def _disconnect(self) -> None:
        for socket in (self._subscriber, self._control):
            if socket is not None:
                socket.close()
        self._subscriber = self._control = None
        self.state = LoopState.DISCONNECTED

    # synchronisation

    def _sync(self, why: str) -> None:
        """Snapshot, replay since the last processed message, then give unrecorded FOVs of the snapshot events."""
        assert self._control is not None
        self.state = LoopState.SYNCING
        snapshot = self._control.call("snapshot")
        session = str(snapshot["session"])
        if session != self.session:
            self.session = session
            self._topic_seq = {}
            self.last_seq = self._persisted_seq(session)
        since = self.last_seq
        messages, complete, last_seq = self._replay(since)
        log.info("recorder_sync", why=why, session=session, since_seq=since, replayed=len(messages), complete=complete)
        self._daemon_case = snapshot["case"].get("case_id")
        for message in messages:
            self._apply(message, "replay")
        self.last_seq = max(self.last_seq, last_seq)
        self._reconcile(snapshot["case"])
        if self._daemon_case in self.folders:
            self.folders[self._daemon_case].save_state(
                session=session, last_seq=self.last_seq, case_id=self._daemon_case
            )
        self._last_heard = time.monotonic()
        self.state = LoopState.FOLLOWING

    def _replay(self, since: int) -> tuple[list[Message], bool, int]:
        assert self._control is not None
        frame = json.dumps({"v": 1, "id": "replay", "command": "replay", "args": {"since_seq": since}}).encode()
        reply, frames = self._control.request_raw(frame)
        if not reply.ok:
            raise ControlError(reply.error or "replay failed")
        messages, offset = [], 0
        for count in reply.data["frames_per_message"]:
            try:
                messages.append(decode(frames[offset : offset + count]))
            except ProtocolError as error:
                log.warning("message_invalid", error=str(error))
            offset += count
        return messages, bool(reply.data["complete"]), int(reply.data["last_seq"])

    def _persisted_seq(self, session: str) -> int:
        """The last sequence number processed in this daemon session, from the case folders' state files."""
        best = 0
        for state_file in self.out.glob(f"*/{STATE_FILE}"):
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if state.get("session") == session:
                best = max(best, int(state.get("last_seq", 0)))
        return best

    def _on_live(self, message: Message) -> None:
        header = message.header
        body = message.body
        if isinstance(body, StatusBody):  # what the daemon has open now (replayed messages tell the past)
            self._daemon_case = body.case_id
        elif isinstance(body, CaseBody):
            self._daemon_case = None if body.event == "closed" else body.case.get("case_id")
        if header.session != self.session:
            log.info("daemon_restarted", session=header.session)
            self.state = LoopState.SYNCING
            return
        topic = header.topic.value
        known = self._topic_seq.get(topic)
        if header.seq > self.last_seq and known is not None and header.topic_seq > known + 1:
            log.warning("gap_detected", topic=topic, expected=known + 1, got=header.topic_seq)
            self.state = LoopState.SYNCING
            return
        self._apply(message, "live")

    def _apply(self, message: Message, source: Literal["live", "replay"]) -> None:
        header = message.header
        self._topic_seq[header.topic.value] = max(self._topic_seq.get(header.topic.value, 0), header.topic_seq)
        if header.seq <= self.last_seq:
            return  # already processed (or part of the snapshot)
        body = message.body
        if isinstance(body, CaseBody):
            self._on_case(body, header.session)
        elif isinstance(body, ResultBody) and header.case_id:
            self._on_result(body, header.case_id, header.session, header.seq, header.time_ms / 1000.0, source)
        elif isinstance(body, OverlayBody) and header.case_id:
            self._on_overlay(body, message, header.case_id)
        self.last_seq = header.seq
        if header.case_id and header.topic != Topic.STATUS and header.case_id in self.folders:
            self.folders[header.case_id].save_state(session=header.session, last_seq=header.seq, case_id=header.case_id)

    # folders

    def folder(self, case_id: str) -> CaseFolder:
        """The folder of ``case_id`` (opened, or created, on first use)."""
        if case_id not in self.folders:
            self.folders[case_id] = CaseFolder(self.out / case_id)
        return self.folders[case_id]

    def _ensure_start(self, folder: CaseFolder, summary: dict[str, Any], body: CaseBody | None = None) -> None:
        if folder.run is not None:
            if folder.run.descriptor is None:
                folder.append(folder.run.make_descriptor())
            return
        software = {"name": "her2scope", "version": "unknown"}
        pixel_size = self._fallback[2]
        source: Literal["case message", "daemon state", "recorder config"]
        if body is not None:
            params, rule = ScoringParams.model_validate(body.params), CaseRule.model_validate(body.rule)
            software, pixel_size, source = dict(body.software), body.pixel_size_um, "case message"
        elif (stored := self._stored_case(folder.case_id)) is not None:
            params = ScoringParams.model_validate(stored["params"])
            rule = CaseRule.model_validate(stored["rule"])
            source = "daemon state"
        else:
            params, rule, _ = self._fallback
            source = "recorder config"
            log.warning("case_parameters_unknown", case_id=folder.case_id, using="the recorder's configuration")
        start, folder.run = compose_start(
            case_id=folder.case_id,
            operator=summary.get("operator"),
            started_at=summary.get("started_at"),
            software=software,
            params=params,
            rule=rule,
            params_source=source,
            pixel_size_um=pixel_size,
            control=summary.get("control"),
            daemon_session=self.session,
        )
        folder.append(start)
        folder.append(folder.run.make_descriptor())
        log.info("case_recording", case_id=folder.case_id, params_source=source, case_dir=str(folder.path))

    def _stored_case(self, case_id: str) -> dict[str, Any] | None:
        if self._daemon_state is None:
            return None
        try:
            return dict(json.loads((self._daemon_state / "cases" / case_id / "case.json").read_text("utf-8")))
        except (OSError, ValueError):
            return None

    def _record_actions(self, folder: CaseFolder, summary: dict[str, Any]) -> None:
        assert folder.run is not None
        adjustments = summary.get("adjustments") or []
        for index in range(folder.n_actions(), len(adjustments)):
            folder.append(folder.run.action(index, adjustments[index]))

    # handlers

    def _on_case(self, body: CaseBody, session: str) -> None:
        summary = body.case
        case_id = summary.get("case_id")
        if not case_id:
            return
        folder = self.folder(case_id)
        if folder.stopped:
            return
        if body.event in ("started", "resumed"):
            for other in self.folders.values():
                if other is not folder and not other.stopped and other.run is not None:
                    self._abort(other, f"case {case_id} was {body.event} before this case's close was heard")
        self._ensure_start(folder, summary, body)
        self._record_actions(folder, summary)
        folder.summary = summary
        if body.event == "closed":
            self._fill_from_summary(folder, summary)
            self._finish(folder, summary)
        self._dirty.add(case_id)

    def _on_result(
        self,
        body: ResultBody,
        case_id: str,
        session: str,
        seq: int,
        when: float,
        source: Literal["live", "replay"],
    ) -> None:
        folder = self.folder(case_id)
        if folder.stopped:
            return
        self._ensure_start(folder, body.case)
        self._record_actions(folder, body.case)
        folder.summary = body.case
        self._dirty.add(case_id)
        if body.status == "pending" or body.score_ms is None:
            return  # an exclude/include update: recorded as an action, not a new result
        if folder.seen(session, seq):
            return
        assert folder.run is not None
        self._fetch_image(folder, body.fov_id)
        event = folder.run.event(
            time=when,
            fov_id=body.fov_id,
            kind=body.kind,
            status=body.status,
            rescore=folder.has_event(body.fov_id),
            source=source,
            daemon_session=session,
            daemon_seq=seq,
            data=fov_data(body.fov_id, body.model_dump(mode="json"), body.case),
        )
        folder.append(event)
        log.info(
            "fov_recorded",
            case_id=case_id,
            fov=body.fov_id,
            status=body.status,
            score=event.data.score,
            n_cells=event.data.total,
            rescore=event.rescore,
        )

    def _on_overlay(self, body: OverlayBody, message: Message, case_id: str) -> None:
        folder = self.folder(case_id)
        if folder.stopped:
            return
        layers = dict(zip(body.layers, message.payloads, strict=True))
        for name, png in layers.items():
            folder.write_file(f"overlays/{body.fov_id}/{name}.png", png)
        folder.overlay_layers[body.fov_id] = body.layers
        self._fetch_image(folder, body.fov_id)
        try:
            image = folder.read_file(f"images/{body.fov_id}.png")
            composed = compose_overlay(image, layers, body.width, body.height)
        except Exception as error:  # a bad layer costs the picture, never the record
            log.warning("overlay_compose_failed", fov=body.fov_id, error=f"{type(error).__name__}: {error}")
        else:
            folder.write_file(f"overlays/{body.fov_id}.png", composed)
        self._dirty.add(case_id)

    def _fetch_image(self, folder: CaseFolder, fov_id: str) -> None:
        """Keep the FOV's lossless image: from the daemon (its open case only), else from its state folder."""
        relative = f"images/{fov_id}.png"
        if folder.has_file(relative):
            return
        if self._control is not None and self._daemon_case == folder.case_id:
            try:
                frame = json.dumps({"v": 1, "id": "image", "command": "image", "args": {"fov_id": fov_id}}).encode()
                reply, frames = self._control.request_raw(frame)
                if reply.ok and frames:
                    folder.write_file(relative, frames[0])
                    return
                log.warning("image_unavailable", case_id=folder.case_id, fov=fov_id, error=reply.error)
            except ControlError as error:
                log.warning("image_unavailable", case_id=folder.case_id, fov=fov_id, error=str(error))
        if self._daemon_state is not None:
            stored = self._daemon_state / "cases" / folder.case_id / f"{fov_id}.png"
            try:
                folder.write_file(relative, stored.read_bytes())
                return
            except OSError:
                pass
        log.warning("image_missing", case_id=folder.case_id, fov=fov_id)

    def _fill_from_summary(self, folder: CaseFolder, summary: dict[str, Any]) -> None:
        """Give each scored/failed FOV of ``summary`` without an event one (after a gap), and fetch its image."""
        assert folder.run is not None
        for entry in summary.get("fovs", []):
            if entry["status"] == "pending" or folder.has_event(entry["fov_id"]):
                continue
            self._fetch_image(folder, entry["fov_id"])
            event = folder.run.event(
                fov_id=entry["fov_id"],
                kind=entry["kind"],
                status=entry["status"],
                rescore=False,
                source="snapshot",
                daemon_session=self.session,
                daemon_seq=None,
                data=fov_data(entry["fov_id"], None, summary, entry),
            )
            folder.append(event)
            log.info("fov_recorded_from_snapshot", case_id=folder.case_id, fov=entry["fov_id"])
        for entry in summary.get("fovs", []):  # images of FOVs whose event was written while an image was missing
            self._fetch_image(folder, entry["fov_id"])

    def _reconcile(self, case: dict[str, Any]) -> None:
        """After a replay: the snapshot's case gets events for its unrecorded FOVs; cases that ended unheard stop."""
        case_id = case.get("case_id")
        if case_id:
            folder = self.folder(case_id)
            if not folder.stopped:
                self._ensure_start(folder, case)
                self._record_actions(folder, case)
                folder.summary = case
                self._fill_from_summary(folder, case)
                self._dirty.add(case_id)
        for state_file in self.out.glob(f"*/{STATE_FILE}"):  # cases the recorder was following before
            other_id = state_file.parent.name
            if other_id == case_id:
                continue
            try:
                closed = bool(json.loads(state_file.read_text(encoding="utf-8")).get("closed"))
            except (OSError, ValueError):
                continue
            if not closed:
                other = self.folder(other_id)
                if other.run is not None and not other.stopped:
                    self._abort(other, "the daemon no longer has this case open and its close was not heard")

    def _abort(self, folder: CaseFolder, reason: str) -> None:
        assert folder.run is not None
        summary = folder.summary or {}
        self._fetch_missing(folder, summary)
        folder.append(folder.run.stop(summary, "abort", reason))
        folder.save_state(closed=True)
        self._dirty.add(folder.case_id)
        log.warning("case_aborted", case_id=folder.case_id, reason=reason)

    def _fetch_missing(self, folder: CaseFolder, summary: dict[str, Any]) -> list[str]:
        for event in folder.events():
            self._fetch_image(folder, event.fov_id)
        return [e.fov_id for e in folder.events() if not folder.has_file(e.data.image)]

    def _finish(self, folder: CaseFolder, summary: dict[str, Any]) -> None:
        assert folder.run is not None
        missing = self._fetch_missing(folder, summary)
        unscored = [f["fov_id"] for f in summary.get("fovs", []) if f["status"] == "pending"]
        problems = []
        if missing:
            problems.append(f"images missing: {', '.join(missing)}")
        if unscored:
            problems.append(f"not scored when the case closed: {', '.join(unscored)}")
        stop = folder.run.stop(
            summary,
            "fail" if problems else "success",
            "; ".join(problems) if problems else "case closed by the pathologist",
        )
        folder.append(stop)
        folder.save_state(closed=True)
        log.info("case_recorded", case_id=folder.case_id, score=stop.score, exit_status=stop.exit_status)

    def _flush_reports(self) -> None:
        from clients.report import write_report

        for case_id in sorted(self._dirty):
            folder = self.folders.get(case_id)
            if folder is not None and folder.run is not None:
                try:
                    folder.write_file(REPORT_FILE, write_report(folder.docs, folder.summary).encode())
                except Exception as error:  # the report is for people; the log stays the record
                    log.error("report_failed", case_id=case_id, error=f"{type(error).__name__}: {error}")
        self._dirty.clear()


def compose_overlay(image_png: bytes | None, layers: dict[str, bytes], width: int, height: int) -> bytes:
    """PNG of the default overlay layers over the image (PNG bytes, BGR) downscaled to the layers' size (over
    grey when there is no image)."""
    import cv2
    import numpy as np

    from scoring.overlay import DEFAULT_LAYERS, compose

    bgr = cv2.imdecode(np.frombuffer(image_png, np.uint8), cv2.IMREAD_COLOR) if image_png else None
    rgb: Any = np.full((height, width, 3), 200, np.uint8)
    if bgr is not None:
        rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    rgba: list[Any] = []
    for name in DEFAULT_LAYERS:
        if name in layers:
            bgra = cv2.imdecode(np.frombuffer(layers[name], np.uint8), cv2.IMREAD_UNCHANGED)
            if bgra is not None and bgra.ndim == 3 and bgra.shape[2] == 4:
                rgba.append(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA))
    composed = compose(np.asarray(rgb, np.uint8), rgba)
    ok, png = cv2.imencode(".png", cv2.cvtColor(composed, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the composed overlay")
    return bytes(png.tobytes())
