"""The case report for people: one self-contained HTML page built from a case's documents (no new dependencies).

It shows the case score with its status and HER2-low / ultralow reading, the warnings (control QC, too few cells,
no control), a chart of the class proportions (inline SVG), the per-FOV table, the overlays (linked by relative
path) and the pathologist's adjustments. ``render_report`` is a pure function of the documents.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from her2scope.config.scoring import Guideline
from her2scope.daemon.protocol import CaseSummary
from her2scope.scoring import overlay
from her2scope.scoring.case import GUIDELINE_SOURCES
from her2scope.scoring.results import HER2_SCORES as CLASSES

#: The overlays' class colours (scoring.overlay.CLASS_COLOURS), so chart, table and pictures agree.
CLASS_COLOURS = {score.value: "#{:02x}{:02x}{:02x}".format(*rgb) for score, rgb in overlay.CLASS_COLOURS.items()}
STATUS_COLOURS = {
    "positive": "#b3001b",
    "equivocal, reflex ISH": "#c46a00",
    "negative": "#1d6b35",
    "not assessable": "#555555",
}

_CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;margin:0;background:#f4f5f7;color:#1c1c1c;font-size:15px}
main{max-width:1200px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:2px solid #d7dae0;padding-bottom:4px}
.meta{color:#555;font-size:13px}
.banner{background:#243b6b;color:#fff;padding:10px 16px;border-radius:6px;margin:12px 0;font-weight:bold}
.result{display:flex;gap:22px;align-items:stretch;margin-top:14px}
.score{background:#fff;border-radius:8px;padding:14px 22px;border-left:10px solid var(--c);min-width:300px}
.score .big{font-size:44px;font-weight:bold;color:var(--c);line-height:1.1}
.score .status{font-size:19px;font-weight:bold;color:var(--c)}
.facts{background:#fff;border-radius:8px;padding:12px 18px;flex:1}
.facts td{padding:2px 12px 2px 0;vertical-align:top}
.facts td:first-child{color:#555;white-space:nowrap}
.warn{background:#fff4d6;border:1px solid #e0b000;border-radius:6px;padding:8px 14px;margin:10px 0}
.warn.bad{background:#fde3e3;border-color:#c0392b}
.warn li{margin:2px 0}
.ok{background:#e3f4e8;border:1px solid #3c9a5a;border-radius:6px;padding:8px 14px;margin:10px 0}
.pending{background:#e8eefc;border:1px solid #5b7bd5;border-radius:6px;padding:8px 14px;margin:10px 0}
table.fovs{border-collapse:collapse;background:#fff;width:100%;font-size:14px}
table.fovs th,table.fovs td{border-bottom:1px solid #e3e5e9;padding:5px 8px;text-align:right}
table.fovs th{background:#eceef2;text-align:right}
table.fovs td.l,table.fovs th.l{text-align:left}
table.fovs tr.excluded td{color:#999;text-decoration:line-through}
table.fovs tr.case td{font-weight:bold;background:#f7f8fa}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:-1px;margin-right:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
figure{margin:0;background:#fff;border-radius:6px;padding:8px}
figure img{width:100%;display:block;border-radius:3px}
figcaption{font-size:13px;padding-top:6px}
.chart{background:#fff;border-radius:8px;padding:10px}
.small{font-size:12px;color:#666}
code{font-size:12px}
@page{size:A4;margin:10mm}
@media print{body{background:#fff}main{padding:0}figure,tr,.result{break-inside:avoid}}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _fmt_time(unix_s: float | None) -> str:
    if unix_s is None:
        return ""
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(text: str | None) -> str:
    """ISO 8601 UTC → "2026-11-26 18:47:49 UTC" (unchanged if it does not parse)."""
    if not text:
        return ""
    try:
        return dt.datetime.fromisoformat(text).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return text


GUIDELINE_LABELS = {
    "breast": f"breast, {GUIDELINE_SOURCES[Guideline.BREAST]} (0 split into null/ultralow, 2025)",
    "gastric": f"gastric, {GUIDELINE_SOURCES[Guideline.GASTRIC]} gastroesophageal adenocarcinoma",
}


def guideline_label(guideline: str | None, specimen: str | None) -> str:
    """How reports name a case's rule, e.g. "gastric, CAP/ASCP/ASCO 2016 ... (biopsy: by cohesive clusters)".

    A record without a guideline (made before guidelines could be chosen) is a breast one.
    """
    guideline = str(guideline or "breast")
    label = GUIDELINE_LABELS.get(guideline, guideline)
    if guideline == "gastric":
        label += (
            " (biopsy: by cohesive clusters of tumour cells)"
            if specimen == "biopsy"
            else " (resection: by share of tumour cells)"
        )
    return label


def _field(doc: object, name: str) -> Any:
    return getattr(doc, name, None)


def _of(docs: Sequence[BaseModel], kind: str) -> list[BaseModel]:
    return [d for d in docs if _field(d, "doc") == kind]


def _score_label(score: str | None) -> str:
    return f"HER2 IHC {score}" if score is not None else "Not assessable"


def _low_text(score: str | None, her2_low: bool | None, zero_subtype: str | None) -> str:
    if zero_subtype:
        return f"HER2-{zero_subtype} (IHC 0)"
    if her2_low:
        return "HER2-low" if score == "1+" else "HER2-low if ISH is negative"
    if score == "3+":
        return "HER2-positive (not HER2-low)"
    return "—"


def proportions_svg(rows: Sequence[tuple[str, dict[str, float] | None, bool]], cutoff: float = 10.0) -> str:
    """A horizontal stacked-bar chart (inline SVG) of the class percentages, one bar per (label, percentages,
    dimmed) row; a dashed line marks the rule's cut-off."""
    label_w, bar_w, bar_h, gap, top = 120, 820, 22, 8, 30
    height = top + len(rows) * (bar_h + gap) + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 40}" height="{height}" '
        'font-family="DejaVu Sans,Arial,sans-serif" font-size="13" role="img" '
        'aria-label="Share of tumour cells per HER2 class">'
    ]
    for tick in range(0, 101, 10):
        x = label_w + bar_w * tick / 100
        parts.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 30}" stroke="#e3e5e9"/>')
        parts.append(f'<text x="{x:.1f}" y="{top - 10}" text-anchor="middle" fill="#666">{tick}%</text>')
    for i, (label, percentages, dimmed) in enumerate(rows):
        y = top + i * (bar_h + gap)
        weight = "bold" if label == "Case" else "normal"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" font-weight="{weight}" '
            f'fill="{"#999" if dimmed else "#1c1c1c"}">{_e(label)}</text>'
        )
        if not percentages or sum(percentages.values()) <= 0:
            parts.append(f'<text x="{label_w + 6}" y="{y + bar_h * 0.7:.1f}" fill="#999">no cells</text>')
            continue
        x = float(label_w)
        for cls in CLASSES:
            width = bar_w * percentages.get(cls, 0.0) / 100
            if width <= 0:
                continue
            opacity = 0.35 if dimmed else 1.0
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{bar_h}" fill="{CLASS_COLOURS[cls]}" '
                f'opacity="{opacity}"><title>{_e(label)} {cls}: {percentages[cls]:.1f}%</title></rect>'
            )
            if width > 34:
                colour = "#fff" if cls in ("0", "3+") else "#1c1c1c"
                parts.append(
                    f'<text x="{x + width / 2:.1f}" y="{y + bar_h * 0.7:.1f}" text-anchor="middle" '
                    f'fill="{colour}" font-size="12">{percentages[cls]:.0f}%</text>'
                )
            x += width
    x_cut = label_w + bar_w * cutoff / 100
    parts.append(
        f'<line x1="{x_cut:.1f}" y1="{top - 4}" x2="{x_cut:.1f}" y2="{height - 30}" stroke="#1c1c1c" '
        'stroke-dasharray="4 3"/>'
    )
    legend_y = height - 12
    lx = float(label_w)
    for cls in CLASSES:
        parts.append(f'<rect x="{lx:.1f}" y="{legend_y - 11}" width="12" height="12" fill="{CLASS_COLOURS[cls]}"/>')
        parts.append(f'<text x="{lx + 16:.1f}" y="{legend_y}">{cls}</text>')
        lx += 60
    parts.append(f'<text x="{lx + 10:.1f}" y="{legend_y}" fill="#444">dashed line: {cutoff:g}% cut-off</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_report(
    docs: Sequence[BaseModel],
    summary: CaseSummary | None = None,
    *,
    files_prefix: str = "",
    banner: str | None = None,
    generated: float | None = None,
    exports: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    tables: Sequence[str] = (),
) -> str:
    """The HTML report of a case from its documents (start, events, actions, stop) and, while the case is open,
    the daemon's latest case ``summary`` (excluded FOVs, running score).

    ``files_prefix`` is prepended to the documents' relative file paths (e.g. ``"../"`` for a report written in
    a sub-folder); ``banner`` is shown at the top (e.g. what a re-score changed). Each FOV links its files for
    QuPath: ``exports`` (FOV → (label, relative path)) when given, else those its event names; ``tables`` are
    the relative paths of the case's CSV files, linked under the FOV table.
    """
    start = next(iter(_of(docs, "start")), None)
    stops = _of(docs, "stop")
    stop = stops[-1] if stops else None
    actions = _of(docs, "action")
    latest: dict[str, BaseModel] = {}
    for event in _of(docs, "event"):
        latest[_field(event, "fov_id")] = event
    excluded = _excluded(actions, summary, stop)
    rois = _rois(actions)
    case = _case_result(stop, summary, latest)
    rule = _field(start, "rule") if start else None
    cutoff = float(_field(rule, "cutoff_percent") or 10.0) if start else 10.0

    out: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>HER2 report {_e(_field(start, 'case_id'))}</title><style>{_CSS}</style></head><body><main>",
    ]
    case_id = _field(start, "case_id") or "(unknown case)"
    out.append(f"<h1>HER2 IHC report — case {_e(case_id)}</h1>")
    meta = [
        f"operator: {_e(_field(start, 'operator') or 'not given')}",
        f"started: {_e(_iso(_field(start, 'started_at')))}",
    ]
    if stop is not None:
        meta.append(f"closed: {_e(_iso(_field(stop, 'closed_at')) or _fmt_time(_field(stop, 'time')))}")
    if start is not None:
        software = _field(start, "software") or {}
        meta.append(f"her2scope {_e(software.get('version', '?'))}")
        meta.append(f"pixel size {_e(_field(start, 'pixel_size_um'))} µm/px")
    out.append(f"<div class='meta'>{' · '.join(meta)}</div>")
    if banner:
        out.append(f"<div class='banner'>{_e(banner)}</div>")
    if stop is None:
        out.append(
            "<div class='pending'><b>Case in progress</b> — the score below is the running score over the FOVs "
            "captured so far; it becomes final when the case is closed.</div>"
        )
    elif _field(stop, "exit_status") != "success":
        out.append(
            f"<div class='warn bad'><b>Record {_e(_field(stop, 'exit_status'))}:</b> {_e(_field(stop, 'reason'))}</div>"
        )

    # the result
    colour = STATUS_COLOURS.get(str(case.get("status")), "#555555")
    label = "Final score" if stop is not None else "Running score"
    out.append(f"<div class='result'><div class='score' style='--c:{colour}'>")
    out.append(f"<div class='small'>{label}</div><div class='big'>{_e(_score_label(case.get('score')))}</div>")
    out.append(f"<div class='status'>{_e(case.get('status') or 'no FOV scored yet')}</div></div>")
    facts = [
        ("HER2-low / ultralow", _low_text(case.get("score"), case.get("her2_low"), case.get("zero_subtype"))),
        ("Rule", guideline_label(_field(rule, "guideline"), _field(rule, "specimen"))),
        ("Why", case.get("reason") or "—"),
        ("Tumour cells", f"{case.get('total', 0)} in {case.get('n_fovs', 0)} FOV(s)"),
        ("Control", _control_text(start, docs, summary, stop)),
    ]
    percentages = case.get("percentages") or {}
    if percentages:
        facts.insert(
            2,
            (
                "Class shares",
                " &nbsp; ".join(
                    f"<span class='sw' style='background:{CLASS_COLOURS[c]}'></span>{c} {percentages.get(c, 0):.1f}%"
                    for c in CLASSES
                ),
            ),
        )
    out.append("<div class='facts'><table>")
    for name, value in facts:
        text = value if name == "Class shares" else _e(value)
        out.append(f"<tr><td>{_e(name)}</td><td>{text}</td></tr>")
    out.append("</table></div></div>")

    warnings = list(case.get("warnings") or [])
    if warnings:
        qc_bad = any("control" in w.lower() for w in warnings)
        out.append(f"<div class='warn{' bad' if qc_bad else ''}'><b>Warnings</b><ul>")
        out.extend(f"<li>{_e(w)}</li>" for w in warnings)
        out.append("</ul></div>")
    elif case.get("status"):
        out.append("<div class='ok'>No warnings: control QC passed and enough tumour cells were counted.</div>")

    # chart
    tumour = [e for e in latest.values() if _field(e, "kind") == "fov"]
    rows: list[tuple[str, dict[str, float] | None, bool]] = [("Case", percentages or None, False)]
    for event in tumour:
        fov_id = _field(event, "fov_id")
        rows.append((fov_id, _field(_field(event, "data"), "percentages"), fov_id in excluded))
    out.append("<h2>Class proportions (share of tumour cells)</h2><div class='chart'>")
    out.append(proportions_svg(rows, cutoff))
    out.append("<div class='small'>Excluded FOVs are shown faded and do not count in the case score.</div></div>")

    # table
    out.append("<h2>Fields of view</h2><table class='fovs'><tr><th class='l'>FOV</th><th class='l'>kind</th>")
    out.append("<th>cells</th>")
    out.extend(f"<th><span class='sw' style='background:{CLASS_COLOURS[c]}'></span>{c}</th>" for c in CLASSES)
    out.append("<th>score</th><th class='l'>threshold</th><th class='l'>notes</th></tr>")
    for event in latest.values():
        out.append(_fov_row(event, excluded, rois))
    counts = case.get("counts") or {}
    if counts:
        out.append("<tr class='case'><td class='l'>Case</td><td class='l'>included FOVs</td>")
        out.append(f"<td>{case.get('total', 0)}</td>")
        out.extend(f"<td>{counts.get(c, 0)} ({percentages.get(c, 0.0):.1f}%)</td>" for c in CLASSES)
        out.append(f"<td>{_e(case.get('score') or 'n/a')}</td><td></td><td></td></tr>")
    out.append("</table>")
    if tables:
        links = " · ".join(f"<a href='{_e(files_prefix + t)}'>{_e(t)}</a>" for t in tables)
        out.append(f"<div class='small'>Spreadsheets: {links} (one row per cell, one row per FOV).</div>")

    # overlays
    out.append("<h2>Overlays</h2><div class='small'>Dots: counted tumour cells by class (colours as above); rings: ")
    out.append("each cell's membrane where stained (red intense, yellow weak to moderate, grey unstained); grey ")
    out.append("crosses: nuclei that are not tumour; cyan: where cells were counted. (Contour-hierarchy method: ")
    out.append("rings by class, green/red contours of complete membranes.)</div><div class='grid'>")
    for event in latest.values():
        data = _field(event, "data")
        fov_id = _field(event, "fov_id")
        src = files_prefix + (_field(data, "overlay") or f"overlays/{fov_id}.png")
        score = _field(data, "score") or "n/a"
        note = " — excluded" if fov_id in excluded else ""
        files = _export_links(event, exports, files_prefix)
        out.append(
            f"<figure><a href='{_e(files_prefix + _field(data, 'image'))}'><img src='{_e(src)}' "
            f"alt='overlay of {_e(fov_id)}'></a><figcaption><b>{_e(fov_id)}</b> ({_e(_field(event, 'kind'))}) "
            f"score {_e(score)}, {_field(data, 'total')} cells{note}{files}</figcaption></figure>"
        )
    out.append("</div>")

    # audit trail
    out.append("<h2>Adjustments by the pathologist (audit trail)</h2>")
    if actions:
        out.append("<table class='fovs'><tr><th class='l'>time (UTC)</th><th class='l'>action</th>")
        out.append("<th class='l'>details</th></tr>")
        for action in actions:
            out.append(
                f"<tr><td class='l'>{_e(_iso(_field(action, 'at')))}</td>"
                f"<td class='l'>{_e(_field(action, 'action'))}</td>"
                f"<td class='l'>{_e(_action_text(_field(action, 'args') or {}))}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<div class='small'>None.</div>")

    stamp = _fmt_time(generated)
    out.append(
        f"<p class='small'>Generated {stamp} by the her2scope recorder from <code>events.jsonl</code>. "
        "Decision support for a pathologist; the pathologist's reading of the slide is the diagnosis.</p>"
    )
    out.append("</main></body></html>")
    return "\n".join(out)


def write_report(docs: Sequence[BaseModel], summary: CaseSummary | None = None) -> str:
    """:func:`render_report` stamped with the current time (the recorder's entry point)."""
    import time

    return render_report(docs, summary, generated=time.time())


def _export_links(event: BaseModel, exports: Mapping[str, Sequence[tuple[str, str]]] | None, prefix: str) -> str:
    """A line "QuPath: OME-TIFF · GeoJSON" linking a FOV's files (given, or named by its event), or nothing."""
    if exports is not None:
        links = list(exports.get(_field(event, "fov_id"), ()))
    else:
        data = _field(event, "data")
        links = [
            (label, path)
            for label, path in (("OME-TIFF", _field(data, "ome_tiff")), ("GeoJSON", _field(data, "geojson")))
            if path
        ]
    if not links:
        return ""
    anchors = " · ".join(f"<a href='{_e(prefix + path)}'>{_e(label)}</a>" for label, path in links)
    return f"<br><span class='small'>QuPath: {anchors}</span>"


def _excluded(actions: Sequence[BaseModel], summary: CaseSummary | None, stop: BaseModel | None) -> set[Any]:
    if stop is not None:
        return set(_field(stop, "excluded") or ())
    if summary is not None:
        return {f.fov_id for f in summary.fovs if f.excluded}
    excluded: set[Any] = set()
    for action in actions:
        fov_id = (_field(action, "args") or {}).get("fov_id")
        if _field(action, "action") == "exclude":
            excluded.add(fov_id)
        elif _field(action, "action") == "include":
            excluded.discard(fov_id)
    return excluded


def _rois(actions: Sequence[BaseModel]) -> set[Any]:
    rois: set[Any] = set()
    for action in actions:
        args = _field(action, "args") or {}
        if _field(action, "action") == "set-roi":
            if args.get("polygon"):
                rois.add(args.get("fov_id"))
            else:
                rois.discard(args.get("fov_id"))
    return rois


def _case_result(stop: BaseModel | None, summary: CaseSummary | None, latest: dict[str, BaseModel]) -> dict[str, Any]:
    if stop is not None:
        return {
            name: _field(stop, name)
            for name in ("score", "status", "her2_low", "zero_subtype", "counts", "percentages", "total", "n_fovs")
        } | {"reason": _field(stop, "case_reason"), "warnings": list(_field(stop, "warnings") or ())}
    if summary is not None and summary.case is not None:
        return summary.case.model_dump(mode="json")
    if latest:
        data = _field(list(latest.values())[-1], "data")
        return {"score": _field(data, "case_score"), "status": _field(data, "case_status")}
    return {}


def _control_text(
    start: BaseModel | None, docs: Sequence[BaseModel], summary: CaseSummary | None, stop: BaseModel | None
) -> str:
    control = summary.control if summary else None
    if control:
        qc = "QC passed" if control.qc_passed else "QC FAILED"
        scored = control.control_score.value if control.control_score else "n/a"
        return (
            f"{control.fov_id}: intense threshold {control.intense_threshold_od:.3f} OD "
            f"({control.source.value}), control scored {scored}, {qc}"
        )
    controls = [e for e in _of(docs, "event") if _field(e, "kind") == "control"]
    if controls:
        data = _field(controls[-1], "data")
        calibration = _field(data, "calibration")
        if calibration is not None:
            qc = "QC passed" if _field(calibration, "qc_passed") else "QC FAILED"
            return (
                f"{_field(controls[-1], 'fov_id')}: intense threshold "
                f"{_field(calibration, 'intense_threshold_od'):.3f} OD, {qc}"
            )
        return f"{_field(controls[-1], 'fov_id')}: not calibrated ({_field(data, 'error') or 'failed'})"
    return "none captured — the default intense threshold was used"


def _fov_row(event: BaseModel, excluded: set[Any], rois: set[Any]) -> str:
    data = _field(event, "data")
    fov_id = _field(event, "fov_id")
    counts = _field(data, "counts") or {}
    percentages = _field(data, "percentages") or {}
    notes = []
    if fov_id in excluded:
        notes.append("excluded")
    if fov_id in rois:
        notes.append("ROI")
    if _field(event, "status") == "failed":
        notes.append(f"failed: {_field(data, 'error')}")
    if _field(event, "rescore"):
        notes.append("re-scored")
    if _field(event, "source") == "snapshot":
        notes.append("recovered from snapshot")
    notes.extend(_field(data, "warnings") or ())
    threshold = _field(data, "intense_threshold_od")
    source = _field(data, "intense_threshold_source")
    threshold_text = f"{threshold:.3f} OD ({source})" if threshold is not None else "—"
    cls = " class='excluded'" if fov_id in excluded else ""
    cells = "".join(
        f"<td>{counts.get(c, 0)} ({percentages.get(c, 0.0):.1f}%)</td>" if counts else "<td>—</td>" for c in CLASSES
    )
    return (
        f"<tr{cls}><td class='l'>{_e(fov_id)}</td><td class='l'>{_e(_field(event, 'kind'))}</td>"
        f"<td>{_field(data, 'total')}</td>{cells}<td>{_e(_field(data, 'score') or 'n/a')}</td>"
        f"<td class='l'>{_e(threshold_text)}</td><td class='l'>{_e('; '.join(notes))}</td></tr>"
    )


def _action_text(args: dict[str, Any]) -> str:
    parts = []
    for key, value in args.items():
        if key in ("polygon",) and isinstance(value, list):
            parts.append(f"polygon of {len(value)} vertices")
        elif key == "polygon" and value is None:
            parts.append("polygon cleared")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.3f}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "all FOVs"
