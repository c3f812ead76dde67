"""Offline re-scoring of a recorded case from its event log and lossless images (``her2scope rescore``).

What is re-scored is the case as it was closed: the latest result of every FOV, with the pathologist's
adjustments applied from the log's actions (ROIs from ``set-roi``, exclusions from ``exclude``/``include``, the
weak threshold from ``set-weak``, the control's calibration region from ``set-intense``). The images were saved as
captured (BGR) and are scored with ``channel_order="BGR"``, exactly as the daemon's worker did, so the recorded
parameters reproduce the recorded counts and case score exactly.

Parameters: the recorded ones (the start document, then ``set-weak``), or ``--config`` (its ``[scoring]`` and
``[case_rule]`` replace them; the case's adjustments still apply), then each ``--set`` on top. The guideline and
specimen kind are the case's, as recorded (a recording made before guidelines existed is a breast case), even
with ``--config``: only ``--guideline``/``--specimen`` (or ``--set case_rule.guideline=...``) change them. When
the result differs in parameters from the recording, it is written to ``CASE_DIR/rescore-<UTC time>/`` (its own
``events.jsonl``, ``report.html``, overlays and ``rescore.json``); the recorded files are never modified.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from her2scope.clients.recorder import (
    CLASSES,
    EVENTS_FILE,
    ActionDoc,
    EventDoc,
    StartDoc,
    StopDoc,
    atomic_write,
    compose_start,
    fov_data,
    read_log,
)
from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.protocol import AuditEntry, CaseCall, CaseSummary, ControlEntry, FovEntry
from her2scope.scoring.results import CaseResult, ControlCalibration, FovResult

RowCol = tuple[float, float]
SECTIONS = {"scoring": ScoringParams, "case_rule": CaseRule}


class RescoreError(ValueError):
    """The case folder or a parameter cannot be used; the message says which and why."""


# --- reading the record ------------------------------------------------------------------------------------------


class RecordedCase:
    """A case folder's documents, with the adjustments the pathologist made, in effect at the end."""

    def __init__(self, case_dir: Path) -> None:
        if not case_dir.is_dir():
            raise RescoreError(f"{case_dir}: not a folder (give a case folder written by `her2scope record`)")
        if not (case_dir / EVENTS_FILE).is_file():
            raise RescoreError(f"{case_dir}: no {EVENTS_FILE}; is this a case folder written by `her2scope record`?")
        try:
            docs, _ = read_log(case_dir / EVENTS_FILE)
        except (OSError, ValueError) as error:
            raise RescoreError(str(error)) from None
        start = next((d for d in docs if isinstance(d, StartDoc)), None)
        if start is None:
            raise RescoreError(f"{case_dir / EVENTS_FILE}: no start document; the case cannot be re-scored")
        self.case_dir = case_dir
        self.docs: list[BaseModel] = docs
        self.start = start
        self.stop = next((d for d in reversed(docs) if isinstance(d, StopDoc)), None)
        self.actions = [d for d in docs if isinstance(d, ActionDoc)]
        self.latest: dict[str, EventDoc] = {}
        for doc in docs:
            if isinstance(doc, EventDoc):
                self.latest[doc.fov_id] = doc
        self.rois: dict[str, tuple[RowCol, ...] | None] = {}
        self.regions: dict[str, tuple[RowCol, ...] | None] = {}
        self.excluded: set[str] = set()
        self.weak_threshold_od: float | None = None
        for action in self.actions:
            fov_id = str(action.args.get("fov_id"))
            if action.action == "set-roi":
                self.rois[fov_id] = _polygon(action.args.get("polygon"))
            elif action.action == "set-intense":
                self.regions[fov_id] = _polygon(action.args.get("polygon"))
            elif action.action == "exclude":
                self.excluded.add(fov_id)
            elif action.action == "include":
                self.excluded.discard(fov_id)
            elif action.action == "set-weak" and action.args.get("threshold_od") is not None:
                self.weak_threshold_od = float(action.args["threshold_od"])
        if self.stop is not None:
            self.excluded = set(self.stop.excluded)

    def recorded_params(self) -> ScoringParams:
        """The case's parameters at its end: the start document's, with the last ``set-weak`` threshold."""
        return self._with_weak(self.start.params)

    def _with_weak(self, params: ScoringParams) -> ScoringParams:
        if self.weak_threshold_od is None:
            return params
        return params.model_copy(update={"weak_threshold_od": self.weak_threshold_od})

    def control_fov_id(self) -> str | None:
        """The control that calibrated the case: the stop's, else the last scored control."""
        if self.stop is not None and self.stop.control_fov_id:
            return self.stop.control_fov_id
        controls = [e for e in self.latest.values() if e.kind == "control" and e.status == "scored"]
        return controls[-1].fov_id if controls else self.start.control_fov_id


def _polygon(value: Any) -> tuple[RowCol, ...] | None:
    if not value:
        return None
    return tuple((float(row), float(col)) for row, col in value)


# --- parameters --------------------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["scoring.weak_threshold_od=0.12", ...]`` → ``{"scoring.weak_threshold_od": 0.12, ...}`` (values read as
    JSON when they are JSON, else as text); RescoreError names a malformed item or an unknown key."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RescoreError(f"--set {item!r}: expected KEY=VALUE, e.g. scoring.weak_threshold_od=0.12")
        parts = key.split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise RescoreError(f"--set {key}: the key must start with 'scoring.' or 'case_rule.'")
        model: Any = SECTIONS[parts[0]]
        for depth, name in enumerate(parts[1:], start=1):
            fields = model.model_fields
            if name not in fields:
                raise RescoreError(f"--set {key}: unknown parameter {name!r}; known: {', '.join(sorted(fields))}")
            annotation = fields[name].annotation
            if depth < len(parts) - 1:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    raise RescoreError(f"--set {key}: {'.'.join(parts[: depth + 1])} has no sub-parameters")
                model = annotation
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        parsed[key] = value
    return parsed


def apply_overrides(params: ScoringParams, rule: CaseRule, overrides: dict[str, Any]) -> tuple[ScoringParams, CaseRule]:
    """The parameters with ``overrides`` set; RescoreError when a value is invalid (named, with the reason)."""
    documents = {"scoring": params.model_dump(mode="json"), "case_rule": rule.model_dump(mode="json")}
    for key, value in overrides.items():
        parts = key.split(".")
        node = documents[parts[0]]
        for name in parts[1:-1]:
            node = node[name]
        node[parts[-1]] = value
    try:
        return ScoringParams.model_validate(documents["scoring"]), CaseRule.model_validate(documents["case_rule"])
    except ValidationError as error:
        item = error.errors()[0]
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise RescoreError(f"--set {given}: invalid value ({where}: {item['msg']})") from None


def _flatten(document: Any, prefix: str) -> dict[str, Any]:
    if isinstance(document, dict):
        flat: dict[str, Any] = {}
        for key, value in document.items():
            flat.update(_flatten(value, f"{prefix}.{key}"))
        return flat
    return {prefix: document}


def parameter_changes(
    old: tuple[ScoringParams, CaseRule], new: tuple[ScoringParams, CaseRule]
) -> dict[str, tuple[Any, Any]]:
    """Every parameter that differs: key → (old, new)."""
    before = {
        **_flatten(old[0].model_dump(mode="json"), "scoring"),
        **_flatten(old[1].model_dump(mode="json"), "case_rule"),
    }
    after = {
        **_flatten(new[0].model_dump(mode="json"), "scoring"),
        **_flatten(new[1].model_dump(mode="json"), "case_rule"),
    }
    return {key: (before.get(key), after.get(key)) for key in sorted(after) if before.get(key) != after.get(key)}


# --- scoring -----------------------------------------------------------------------------------------------------


def _read_bgr(path: Path) -> Any:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if image is None:
        raise FileNotFoundError(f"{path}: missing or unreadable")
    return image


def rescore_case(
    case_dir: Path,
    *,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    guideline: str | None = None,
    specimen: str | None = None,
) -> dict[str, Any]:
    """Re-score ``case_dir``; return the comparison (old vs new per FOV and case). See the module docstring.

    Raises
    ------
    RescoreError
        Not a case folder, a log without a start, an unreadable config, a bad ``--set``.
    """
    from her2scope.scoring import score_case

    case = RecordedCase(case_dir)
    params, rule, changes = _chosen_parameters(case, config_path, overrides, guideline, specimen)
    rescored = _rescore_fovs(case, params, rule)
    included = [
        result
        for fov_id, result in rescored.results.items()
        if result is not None and case.latest[fov_id].kind == "fov" and fov_id not in case.excluded
    ]
    new_case = score_case(included, rule, rescored.control)
    fovs = _compare_fovs(case, rescored)
    old_case, new_case_doc = _compare_case(case, new_case, rescored.notes)
    case_same = old_case["score"] == new_case_doc["score"] and (
        old_case["counts"] is None or old_case["counts"] == new_case_doc["counts"]
    )
    comparison: dict[str, Any] = {
        "case_dir": str(case_dir),
        "case_id": case.start.case_id,
        "changed": bool(changes),
        "changes": {key: list(value) for key, value in changes.items()},
        "reproduced": case_same and all(f["same"] for f in fovs),
        "fovs": fovs,
        "case": {"old": old_case, "new": new_case_doc, "same": case_same},
        "notes": rescored.notes,
        "output": None,
    }
    if changes:
        comparison["output"] = str(_write_result(case, comparison, params, rule, changes, rescored, new_case))
    return comparison


def _chosen_parameters(
    case: RecordedCase,
    config_path: Path | None,
    overrides: list[str] | None,
    guideline: str | None,
    specimen: str | None,
) -> tuple[ScoringParams, CaseRule, dict[str, tuple[Any, Any]]]:
    """The parameters to re-score with (the recorded ones, or a configuration's, with the ``--set`` overrides and
    the chosen guideline), and what differs from the recorded ones."""
    chosen = [f"case_rule.{k}={v}" for k, v in (("guideline", guideline), ("specimen", specimen)) if v is not None]
    parsed = parse_overrides([*(overrides or []), *chosen])
    recorded = (case.recorded_params(), case.start.rule)
    if config_path is not None:
        from her2scope.config.app import ConfigError, load_config

        try:
            config = load_config(config_path)
        except ConfigError as error:
            raise RescoreError(str(error)) from None
        # the guideline belongs to the case (which tissue, which specimen), not to the configuration
        kept = {"guideline": case.start.rule.guideline, "specimen": case.start.rule.specimen}
        base = (case._with_weak(config.scoring), config.case_rule.model_copy(update=kept))
    else:
        base = recorded
    params, rule = apply_overrides(base[0], base[1], parsed)
    return params, rule, parameter_changes(recorded, (params, rule))


@dataclass
class _Rescored:
    """The recorded FOVs scored again: their images, analyses and results, the controls' calibrations, the case's
    control (None when it could not be calibrated), why a FOV failed, and notes for the comparison."""

    images: dict[str, Any] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)
    results: dict[str, FovResult | None] = field(default_factory=dict)
    calibrations: dict[str, ControlCalibration] = field(default_factory=dict)
    control: ControlCalibration | None = None
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _rescore_fovs(case: RecordedCase, params: ScoringParams, rule: CaseRule) -> _Rescored:
    """Score every recorded FOV again: the controls first, which calibrate the tumour FOVs."""
    from her2scope.scoring import analyse_fov, calibrate_from_control

    done = _Rescored()
    for fov_id, event in case.latest.items():
        try:
            done.images[fov_id] = _read_bgr(case.case_dir / event.data.image)
        except FileNotFoundError as error:
            done.errors[fov_id] = str(error)

    def pixel_size(event: EventDoc) -> float:
        size = event.data.pixel_size_um or case.start.pixel_size_um
        if size is None:
            raise RescoreError(f"{event.fov_id}: the record has no pixel size")
        return float(size)

    def analyse(fov_id: str, event: EventDoc, control: ControlCalibration | None) -> None:
        done.analyses[fov_id] = analyse_fov(
            done.images[fov_id],
            pixel_size(event),
            params,
            control=control,
            roi_polygon=case.rois.get(fov_id),
            rule=rule,
            channel_order="BGR",
        )

    for kind in ("control", "fov"):
        for fov_id, event in case.latest.items():
            if event.kind != kind or fov_id not in done.images:
                continue
            try:
                if kind == "control":
                    calibration = calibrate_from_control(
                        done.images[fov_id],
                        pixel_size(event),
                        params,
                        region_polygon=case.regions.get(fov_id),
                        rule=rule,
                        channel_order="BGR",
                    )
                    done.calibrations[fov_id] = calibration
                    analyse(fov_id, event, calibration)
                else:
                    analyse(fov_id, event, done.control)
            except ValueError as error:
                done.errors[fov_id] = f"ValueError: {error}"
        if kind == "control":
            control_id = case.control_fov_id()
            done.control = done.calibrations.get(control_id) if control_id else None
            if control_id and done.control is None:
                done.notes.append(
                    f"the control {control_id} could not be calibrated: the default intense threshold was used"
                )
    done.results = {fov_id: done.analyses[fov_id].result if fov_id in done.analyses else None for fov_id in case.latest}
    return done


def rescored_results(case: RecordedCase) -> tuple[dict[str, FovResult | None], dict[str, str]]:
    """Every recorded FOV scored again with the recorded parameters (which reproduce the recorded results): its
    result (None when it failed) by FOV, and why each FOV that failed did."""
    done = _rescore_fovs(case, case.recorded_params(), case.start.rule)
    return done.results, done.errors


def _compare_fovs(case: RecordedCase, rescored: _Rescored) -> list[dict[str, Any]]:
    """Per recorded FOV: its recorded and its new status, counts and score, and whether they are the same."""
    fovs = []
    for fov_id, event in case.latest.items():
        result = rescored.results[fov_id]
        old = {"status": event.status, "counts": event.data.counts, "score": event.data.score}
        new = {
            "status": "scored" if result is not None else "failed",
            "counts": result.counts.model_dump(mode="json") if result is not None else None,
            "score": result.call.score.value if result is not None and result.call.score else None,
            "error": rescored.errors.get(fov_id),
        }
        if result is not None and event.data.intense_threshold_source not in (None, result.intense_threshold_source):
            rescored.notes.append(
                f"{fov_id}: recorded with the {event.data.intense_threshold_source} threshold, re-scored with the "
                f"{result.intense_threshold_source.value} one (it was recorded before the control was calibrated)"
            )
        same = old["counts"] == new["counts"] and old["score"] == new["score"] and old["status"] == new["status"]
        fovs.append(
            {
                "fov_id": fov_id,
                "kind": event.kind,
                "excluded": fov_id in case.excluded,
                "old": old,
                "new": new,
                "same": same,
            }
        )
    return fovs


def _compare_case(case: RecordedCase, new_case: CaseResult, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recorded case score (the final one, or the last running one of a case not closed) and the new one."""
    if case.stop is not None:
        old_case = {"score": case.stop.score, "status": case.stop.status, "counts": case.stop.counts}
    else:
        last = list(case.latest.values())[-1] if case.latest else None
        old_case = {
            "score": last.data.case_score if last else None,
            "status": last.data.case_status if last else None,
            "counts": None,
        }
        notes.append("the case was not closed when recorded: compared with its last running score")
    new_case_doc = {
        **new_case.call.model_dump(mode="json"),
        "counts": new_case.counts.model_dump(mode="json"),
        "warnings": list(new_case.warnings),
    }
    return old_case, new_case_doc


def _write_result(
    case: RecordedCase,
    comparison: dict[str, Any],
    params: ScoringParams,
    rule: CaseRule,
    changes: dict[str, tuple[Any, Any]],
    rescored: _Rescored,
    new_case: CaseResult,
) -> Path:
    """Write the re-scored case beside the record: ``rescore-<time>/`` with its own log, report and overlays."""
    import os

    import cv2

    from her2scope.clients.report import render_report
    from her2scope.scoring.overlay import DEFAULT_LAYERS, render_overlay

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    out = case.case_dir / f"rescore-{stamp}"
    (out / "overlays").mkdir(parents=True, mode=0o700)
    os.chmod(out, 0o700)
    control_id = case.control_fov_id()
    control = rescored.calibrations.get(control_id) if control_id else None
    control_entry = ControlEntry(fov_id=control_id, **dict(control)) if control else None
    summary = CaseSummary(
        closed_at=case.stop.closed_at if case.stop else None,
        case=CaseCall.of(new_case),
        control=control_entry,
        fovs=tuple(
            FovEntry(fov_id=f["fov_id"], kind=f["kind"], index=index, status=f["new"]["status"], excluded=f["excluded"])
            for index, f in enumerate(comparison["fovs"], start=1)
        ),
    )
    start, run = compose_start(
        case_id=case.start.case_id,
        operator=case.start.operator,
        started_at=case.start.started_at,
        software=case.start.software,
        params=params,
        rule=rule,
        params_source="rescore",
        pixel_size_um=case.start.pixel_size_um,
        control=control_entry,
        daemon_session=None,
        rescore_of=case.start.uid,
        changes=changes,
    )
    docs: list[BaseModel] = [start, run.make_descriptor()]
    for action in case.actions:
        docs.append(run.action(action.index, AuditEntry(time=action.at, action=action.action, args=action.args)))
    for fov_id, event in case.latest.items():
        result = rescored.results[fov_id]
        body = {
            "result": result.model_dump(mode="json") if result else None,
            "calibration": (
                rescored.calibrations[fov_id].model_dump(mode="json") if fov_id in rescored.calibrations else None
            ),
            "error": None if result else comparison_error(comparison, fov_id),
        }
        data = fov_data(fov_id, body, summary).model_copy(
            update={"image": f"../{event.data.image}", "result_file": None, "ome_tiff": None, "geojson": None}
        )
        if fov_id in rescored.analyses:
            analysis = rescored.analyses[fov_id]
            width = min(960, analysis.image.fov_shape[1])
            overlay = render_overlay(analysis, width=width)
            height = next(iter(overlay.layers.values())).shape[0]
            rgb = cv2.cvtColor(
                cv2.resize(rescored.images[fov_id], (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB
            )
            ok, png = cv2.imencode(".png", cv2.cvtColor(overlay.compose(rgb, DEFAULT_LAYERS), cv2.COLOR_RGB2BGR))
            if ok:
                atomic_write(out / "overlays" / f"{fov_id}.png", png.tobytes())
        docs.append(
            run.event(
                fov_id=fov_id,
                kind=event.kind,
                status="scored" if result else "failed",
                rescore=False,
                source="rescore",
                daemon_session=None,
                daemon_seq=None,
                data=data,
            )
        )
    docs.append(run.stop(summary, "success", f"re-scored offline from {EVENTS_FILE} with changed parameters"))
    atomic_write(out / EVENTS_FILE, b"".join(d.model_dump_json().encode() + b"\n" for d in docs))
    comparison_out = {**comparison, "output": str(out)}
    atomic_write(out / "rescore.json", json.dumps(comparison_out, indent=1, ensure_ascii=False).encode())
    change_text = "; ".join(f"{k} {v[0]} → {v[1]}" for k, v in changes.items())
    old_score = comparison["case"]["old"]["score"] or "not assessable"
    banner = (
        f"RE-SCORED OFFLINE with changed parameters ({change_text}). Not the recorded result: the case was "
        f"recorded as {old_score} (see ../report.html)."
    )
    atomic_write(out / "report.html", render_report(docs, None, banner=banner).encode())
    return out


def comparison_error(comparison: dict[str, Any], fov_id: str) -> str | None:
    """The re-scoring error of ``fov_id`` in ``comparison``."""
    return next((f["new"]["error"] for f in comparison["fovs"] if f["fov_id"] == fov_id), None)


def _counts_text(counts: dict[str, int] | None) -> str:
    if not counts:
        return "—"
    return "/".join(str(counts.get(k, 0)) for k in CLASSES)


def format_comparison(comparison: dict[str, Any]) -> str:
    """A readable old-vs-new table."""
    lines = [f"case {comparison['case_id']} ({comparison['case_dir']})"]
    if comparison["changed"]:
        lines.append("re-scored with changed parameters:")
        lines.extend(f"  {key}: {old} → {new}" for key, (old, new) in comparison["changes"].items())
    else:
        lines.append("re-scored with the recorded parameters")
    new_case = comparison["case"]["new"]
    lines.append(f"rule: {new_case['guideline']} ({new_case['specimen']}): {new_case['reason']}")
    header = (
        f"{'FOV':<12} {'kind':<8} {'recorded 0/1+/2+/3+':>22} {'score':>6}   {'re-scored 0/1+/2+/3+':>22} {'score':>6}"
    )
    lines += ["", header, "-" * len(header)]
    for fov in comparison["fovs"]:
        flag = "" if fov["same"] else "  changed"
        if fov["excluded"]:
            flag += "  (excluded)"
        if fov["new"].get("error"):
            flag += f"  error: {fov['new']['error']}"
        lines.append(
            f"{fov['fov_id']:<12} {fov['kind']:<8} {_counts_text(fov['old']['counts']):>22} "
            f"{fov['old']['score'] or 'n/a':>6}   {_counts_text(fov['new']['counts']):>22} "
            f"{fov['new']['score'] or 'n/a':>6}{flag}"
        )
    old, new = comparison["case"]["old"], comparison["case"]["new"]
    lines.append("-" * len(header))
    lines.append(
        f"{'case':<12} {'':<8} {_counts_text(old['counts']):>22} {old['score'] or 'n/a':>6}   "
        f"{_counts_text(new['counts']):>22} {new['score'] or 'n/a':>6}"
        + ("" if comparison["case"]["same"] else "  changed")
    )
    lines.append("")
    lines.extend(f"note: {note}" for note in comparison["notes"])
    if comparison["changed"]:
        lines.append(f"re-scored case written to {comparison['output']} (the recorded files are unchanged)")
    elif comparison["reproduced"]:
        lines.append("REPRODUCED: every FOV's counts and the case score equal the recorded ones")
    else:
        lines.append("NOT REPRODUCED: see the rows marked 'changed'")
    return "\n".join(lines)
