"""The recorder's documents: the pydantic models of a case's run, the factories that make them, their JSON Schema.

A case is a *run* in the sense of bluesky's event model: a ``start`` document (who, what, every scoring
parameter), a ``descriptor`` (the fields of a FOV event, with dtype, shape and units), one ``event`` per FOV
result, an ``action`` per adjustment of the pathologist, and a ``stop`` (the final score, ``exit_status``).
Documents are pydantic models, built only by :class:`Run` (so uids and sequence numbers cannot drift), one JSON
object per line of ``events.jsonl``. Large data is referenced by a path relative to the case folder.
"""

from __future__ import annotations

import secrets
import time
from importlib.metadata import version
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.protocol import AuditEntry, CaseSummary, ControlEntry, FovEntry
from her2scope.scoring.results import ControlCalibration

SCHEMA_VERSION = 1
CLASSES = ("0", "1+", "2+", "3+")


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
    result_file: str | None = Field(None, description="The FOV's whole result (its cells included), relative")
    ome_tiff: str | None = Field(None, description="The field as a calibrated OME-TIFF (for QuPath, Fiji), relative")
    geojson: str | None = Field(None, description="Its cells and regions as QuPath's GeoJSON, relative")
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
    "result_file": DataKey(dtype="string", description="path of the whole result JSON (cells included), relative"),
    "ome_tiff": DataKey(dtype="string", description="path of the calibrated OME-TIFF of the field, relative"),
    "geojson": DataKey(dtype="string", description="path of the cells and regions as QuPath GeoJSON, relative"),
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
    control: ControlEntry | None,
    daemon_session: str | None,
    rescore_of: str | None = None,
    changes: dict[str, tuple[Any, Any]] | None = None,
) -> tuple[StartDoc, Run]:
    """A case's start document and the :class:`Run` that makes the documents that follow it."""
    calibration = ControlCalibration.model_validate(control.model_dump(exclude={"fov_id"})) if control else None
    control_fov_id = control.fov_id if control else None
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

    def action(self, index: int, adjustment: AuditEntry) -> ActionDoc:
        """The action document of the case's adjustment number ``index``."""
        self._n_actions += 1
        return ActionDoc(
            uid=_uid(),
            time=time.time(),
            run_start=self.start.uid,
            seq_num=self._n_actions,
            index=index,
            at=adjustment.time,
            action=adjustment.action,
            args=dict(adjustment.args),
        )

    def stop(self, summary: CaseSummary, exit_status: Literal["success", "abort", "fail"], reason: str) -> StopDoc:
        """The stop document from the case's final summary."""
        case, control = summary.case, summary.control
        return StopDoc(
            uid=_uid(),
            time=time.time(),
            run_start=self.start.uid,
            exit_status=exit_status,
            reason=reason,
            closed_at=summary.closed_at,
            score=case.score.value if case and case.score else None,
            status=case.status.value if case else None,
            her2_low=case.her2_low if case else None,
            zero_subtype=case.zero_subtype.value if case and case.zero_subtype else None,
            case_reason=case.reason if case else None,
            counts=case.counts.model_dump(mode="json") if case else None,
            percentages=case.percentages if case else None,
            total=case.total if case else 0,
            n_fovs=case.n_fovs if case else 0,
            warnings=case.warnings if case else (),
            control_fov_id=control.fov_id if control else None,
            control_qc_passed=control.qc_passed if control else None,
            excluded=tuple(f.fov_id for f in summary.fovs if f.excluded),
            num_events=self._n_events,
        )


def document_schema() -> dict[str, Any]:
    """The JSON Schema of every document of ``events.jsonl`` (one source of truth: the pydantic models)."""
    schema = DOCUMENT.json_schema()
    schema["title"] = "her2scope case log document"
    schema["description"] = "One line of events.jsonl: start, descriptor, event, action or stop."
    return schema


def fov_data(
    fov_id: str, result_body: dict[str, Any] | None, summary: CaseSummary, entry: FovEntry | None = None
) -> FovData:
    """Event data from a result body (``ResultBody`` as JSON) or, after a gap, from the summary's FOV ``entry``."""
    case = summary.case
    refs = {
        "image": f"images/{fov_id}.png",
        "overlay": f"overlays/{fov_id}.png",
        "overlay_layers": f"overlays/{fov_id}/",
        "case_score": case.score.value if case and case.score else None,
        "case_status": case.status.value if case else None,
    }
    result = (result_body or {}).get("result")
    if result is not None:
        call = result["call"]
        refs |= {  # written beside the event by CaseFolder.write_exports
            "result_file": f"results/{fov_id}.json",
            "ome_tiff": f"qupath/{fov_id}.ome.tif",
            "geojson": f"qupath/{fov_id}.geojson",
        }
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
    counts = entry.counts.model_dump(mode="json") if entry and entry.counts else None
    total = sum(counts.values()) if counts else 0
    return FovData(
        counts=counts,
        total=total,
        percentages={k: 100.0 * v / total if total else 0.0 for k, v in counts.items()} if counts else None,
        score=entry.score.value if entry and entry.score else None,
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
        error=(result_body or {}).get("error") or (entry.error if entry else None),
        **refs,
    )
