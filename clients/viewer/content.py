"""What the viewer says, as text: the status bar, the side panel, the FOV table, pane titles, a terminal summary.

Pure functions of the state; ``render`` draws them, ``terminal_summary`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from her2scope.clients.viewer.palette import ACCENT, BAD, BGR, CLASS_BGR, GOOD, MUTED, STABILITY_COLOURS, TEXT, WARN
from her2scope.clients.viewer.state import (
    ViewerState,
    daemon_responding,
    rule_text,
    silence_s,
)
from her2scope.scoring.case import GUIDELINE_SOURCES
from her2scope.scoring.results import Her2Score

HELP: tuple[tuple[str, str], ...] = (
    ("space", "capture"),
    ("k", "control"),
    ("n", "new case"),
    ("g", "guideline"),
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
CLASSES: tuple[str, ...] = tuple(score.value for score in Her2Score)


@dataclass(frozen=True, slots=True)
class Line:
    """A line of the side panel: ``style`` is ``"heading"``, ``"score"``, ``"text"``, ``"small"``, ``"gap"``,
    ``"bar"`` (a stacked bar of ``values``, percent per HER2 class) or ``"row"`` (a table row: ``row``)."""

    text: str
    colour: BGR = TEXT
    style: str = "text"
    values: tuple[float, ...] = ()
    row: TableRow | None = None


def status_segments(state: ViewerState) -> list[tuple[str, BGR]]:
    """The status bar: connection, camera, stability, control calibration, auto-capture, worker."""
    segments: list[tuple[str, BGR]] = []
    if daemon_responding(state):
        segments.append(("daemon ok", GOOD))
    elif state.responding is None:
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
    if status.get("objective"):
        segments.append((f"{status['objective']} ({status.get('pixel_size_um', '?')} µm/px)", TEXT))
    if status.get("guideline"):
        segments.append((rule_text(status["guideline"], status.get("specimen")), TEXT))
    if state.next_rule is not None and (
        status.get("case_id") is None
        or rule_text(*state.next_rule) != rule_text(status.get("guideline"), status.get("specimen"))
    ):
        segments.append((f"next case: {rule_text(*state.next_rule)}", WARN))
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
    for entry in state.case.fovs:
        fov_id, status = entry.fov_id, entry.status
        percentages = list(entry.counts.percentages().values()) if entry.counts else None
        if status == "failed":
            rows.append(TableRow((fov_id,), f"failed: {(entry.error or '')[:40]}", BAD))
            continue
        if status == "pending" and percentages is None:
            rows.append(TableRow((fov_id,), "scoring…", MUTED))
            continue
        numbers = [f"{p:.1f}" for p in percentages] if percentages else ["-"] * 4
        score = entry.score
        marks = [mark for mark, on in (("ROI", entry.roi), ("excl.", entry.excluded)) if on]
        if status == "pending":
            marks.append("re-scoring")
        colour = MUTED if entry.excluded else TEXT
        cells = (fov_id, str(entry.total), *numbers, str(score) if score is not None else "n/a")
        rows.append(TableRow(cells, " ".join(marks), colour))
    return rows


def case_lines(state: ViewerState) -> list[Line]:
    """The running case summary: score, status, why (the rule's branch that decided, and the rule), HER2-low or
    ultralow, percentages, control, warnings."""
    case = state.case
    case_id = case.case_id
    if case_id is None:
        return [
            Line("NO OPEN CASE", MUTED, "heading"),
            Line("press n to start a case, or space to capture (a case starts by itself)", MUTED, "small"),
        ]
    closed = " (closed)" if not case.open else ""
    lines = [Line(f"CASE {case_id}{closed}", MUTED, "heading")]
    result = case.case
    if result is None:
        lines.append(Line("no scored FOV yet", MUTED))
        return lines
    score = result.score
    lines.append(Line(_score_text(score), CLASS_BGR.get(str(score), TEXT), "score"))
    lines.append(Line(str(result.status), TEXT))
    lines.append(Line(result.reason, TEXT, "small"))
    rule = rule_text(result.guideline.value, result.specimen.value)
    lines.append(Line(f"rule: {rule} ({GUIDELINE_SOURCES[result.guideline]})", MUTED, "small"))
    if result.her2_low:
        lines.append(Line("HER2-low", ACCENT))
    elif result.zero_subtype is not None:
        lines.append(Line(f"HER2-{result.zero_subtype}", ACCENT))
    values = tuple(float(result.percentages.get(c, 0.0)) for c in CLASSES)
    lines.append(Line("", style="bar", values=values))
    lines.append(Line("   ".join(f"{c}: {v:.1f}%" for c, v in zip(CLASSES, values, strict=True)), TEXT, "small"))
    n_fovs = result.n_fovs
    lines.append(Line(f"{n_fovs} FOV{'' if n_fovs == 1 else 's'} · {result.total:,} cells", MUTED))
    control = case.control
    if control:
        ok = control.qc_passed
        verdict = "calibrated" if ok else "failed QC"
        text = f"{control.fov_id}: {verdict}, intense > {control.intense_threshold_od:.2f} OD"
        lines.append(Line(text, GOOD if ok else WARN, "small"))
    warnings = list(result.warnings)
    if not control and not any("positive control" in w for w in warnings):
        warnings.insert(0, "no positive control: press k with the control tissue in view")
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
    entry = state.case.fov(fov_id)
    status = entry.status if entry else None
    if entry is not None and status == "scored":
        score_text = _score_text(entry.score)
    else:
        score_text = "scoring…" if status == "pending" or entry is None else str(status)
    if entry is not None and entry.excluded:
        score_text += " (excluded)"
    colour = CLASS_BGR.get(str(entry.score), TEXT) if entry is not None and status == "scored" else TEXT
    return f"{fov_id}   {score_text}", colour


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
