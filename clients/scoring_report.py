"""Offline scoring of image files: the engine behind ``her2scope score``."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from her2scope.clients.images import InputError, read_rgb, write_rgb
from her2scope.clients.report import guideline_label
from her2scope.config.scoring import CaseRule, Guideline, ScoringParams, Specimen
from her2scope.scoring import analyse_fov, calibrate_from_control, score_case
from her2scope.scoring.overlay import DEFAULT_LAYERS, render_overlay
from her2scope.scoring.pipeline import check_pixel_size
from her2scope.scoring.results import CaseResult, FovResult

Report = dict[str, Any]


def chosen_rule(rule: CaseRule, guideline: str | None, specimen: str | None) -> CaseRule:
    """``rule`` with the guideline and specimen chosen on the command line; InputError names a bad choice."""
    update: dict[str, str] = {}
    for option, value, choices in (("guideline", guideline, Guideline), ("specimen", specimen, Specimen)):
        if value is None:
            continue
        if value not in {c.value for c in choices}:
            raise InputError(f"--{option} {value!r}: use one of {', '.join(c.value for c in choices)}")
        update[option] = value
    return CaseRule.model_validate({**rule.model_dump(mode="json"), **update}) if update else rule


def fov_document(image: Path, result: FovResult, overlay: Path | None) -> dict[str, Any]:
    """The JSON document of one scored FOV."""
    return {
        "image": str(image),
        "counts": result.counts.model_dump(mode="json"),
        "total": result.counts.total,
        "percentages": result.percentages,
        **result.call.model_dump(mode="json"),
        "n_excluded_nuclei": result.n_excluded_nuclei,
        "weak_threshold_od": result.weak_threshold_od,
        "intense_threshold_od": result.intense_threshold_od,
        "intense_threshold_source": result.intense_threshold_source.value,
        "tumour_area_mm2": result.tumour_area_mm2,
        "pixel_size_um": result.pixel_size_um,
        "warnings": list(result.warnings),
        "clusters": result.clusters.model_dump(mode="json"),
        "overlay": str(overlay) if overlay else None,
    }


def case_document(case: CaseResult) -> dict[str, Any]:
    """The JSON document of a case's score."""
    return {
        **case.call.model_dump(mode="json"),
        "counts": case.counts.model_dump(mode="json"),
        "total": case.counts.total,
        "percentages": case.percentages,
        "n_fovs": case.n_fovs,
        "warnings": list(case.warnings),
    }


def score_files(
    fovs: Sequence[Path],
    *,
    control: Path | None,
    pixel_size_um: float,
    roi_polygon: Sequence[tuple[float, float]] | None,
    overlay_dir: Path | None,
    params: ScoringParams,
    rule: CaseRule,
    max_pixels: int | None = None,
) -> Report:
    """Read, score and (optionally) draw every FOV; return the JSON-able report. An image of more than
    ``max_pixels`` pixels is refused before it is decoded.

    All inputs are checked before anything is scored, so a bad file fails fast and names itself.

    Raises
    ------
    InputError
        An unreadable image, a control that cannot calibrate, a wrong pixel size or a bad ROI.
    OSError
        The overlay folder cannot be written.
    """
    if not fovs:
        raise InputError("no FOV images given")
    try:
        check_pixel_size(pixel_size_um)
    except ValueError as error:
        raise InputError(f"--pixel-size: {error}") from None
    images = [(path, read_rgb(path, max_pixels)) for path in fovs]
    control_image = read_rgb(control, max_pixels) if control is not None else None
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)

    calibration = None
    control_doc: dict[str, Any] | None = None
    if control is not None and control_image is not None:
        try:
            calibration = calibrate_from_control(control_image, pixel_size_um, params, rule=rule)
        except ValueError as error:
            raise InputError(f"{control}: {error}") from None
        control_doc = {"image": str(control), **calibration.model_dump(mode="json")}
        if overlay_dir is not None:
            analysis = analyse_fov(control_image, pixel_size_um, params, control=calibration, rule=rule)
            path = overlay_dir / f"{control.stem}_control_overlay.png"
            write_rgb(path, render_overlay(analysis).compose(_as_uint8(control_image), DEFAULT_LAYERS))
            control_doc["overlay"] = str(path)

    fov_docs = []
    results = []
    for path, image in images:
        try:
            analysis = analyse_fov(
                image, pixel_size_um, params, control=calibration, roi_polygon=roi_polygon, rule=rule
            )
        except ValueError as error:
            raise InputError(f"{path}: {error}") from None
        results.append(analysis.result)
        overlay_path = None
        if overlay_dir is not None:
            overlay_path = overlay_dir / f"{path.stem}_overlay.png"
            write_rgb(overlay_path, render_overlay(analysis).compose(_as_uint8(image), DEFAULT_LAYERS))
        fov_docs.append(fov_document(path, analysis.result, overlay_path))
    case = score_case(results, rule, calibration)
    return {
        "software": {"name": "her2scope", "version": version("her2scope")},
        "pixel_size_um": pixel_size_um,
        "parameters": {"scoring": params.model_dump(mode="json"), "case_rule": rule.model_dump(mode="json")},
        "control": control_doc,
        "fovs": fov_docs,
        "case": case_document(case),
    }


def _as_uint8(image: Any) -> Any:
    import numpy as np

    if image.dtype == np.uint16:
        return (image // 257).astype(np.uint8)
    return image


def format_table(report: Report) -> str:
    """A readable table of the per-FOV results and the case score."""
    lines = []
    control = report["control"]
    if control is not None:
        qc = "passed" if control["qc_passed"] else "FAILED"
        lines.append(
            f"control {Path(control['image']).name}: intense threshold {control['intense_threshold_od']:.2f} OD, "
            f"scored {control['control_score'] or 'n/a'}, QC {qc}"
        )
    else:
        lines.append("no positive control: default intense threshold")
    width = max([len(Path(f["image"]).name) for f in report["fovs"]] + [3])
    header = f"{'FOV':<{width}}  {'cells':>6}  {'0':>6}  {'1+':>6}  {'2+':>6}  {'3+':>6}  score"
    lines += ["", header, "-" * len(header)]
    for fov in report["fovs"]:
        pct = fov["percentages"]
        score = fov["score"] or "n/a"
        if fov["zero_subtype"]:
            score += f" ({fov['zero_subtype']})"
        lines.append(
            f"{Path(fov['image']).name:<{width}}  {fov['total']:>6}  "
            + "  ".join(f"{pct[k]:>5.1f}%" for k in ("0", "1+", "2+", "3+"))
            + f"  {score}"
        )
    case = report["case"]
    pct = case["percentages"]
    if case.get("specimen") == "biopsy" and case.get("guideline") == "gastric":
        for fov in report["fovs"]:
            clusters = fov["clusters"]
            lines.append(
                f"  {Path(fov['image']).name}: largest cohesive clusters "
                + ", ".join(f"{clusters[k]} of {k}{'' if k == '3+' else ' or more'}" for k in ("3+", "2+", "1+"))
            )
    lines.append("-" * len(header))
    lines.append(
        f"{'case':<{width}}  {case['total']:>6}  "
        + "  ".join(f"{pct[k]:>5.1f}%" for k in ("0", "1+", "2+", "3+"))
        + f"  {case['score'] or 'n/a'}"
    )
    lines.append("")
    score = case["score"] or "not assessable"
    extra = []
    if case["zero_subtype"]:
        extra.append(f"HER2-{case['zero_subtype']}")
    if case["her2_low"]:
        extra.append("HER2-low" if case["score"] == "1+" else "HER2-low if ISH negative")
    lines.append(f"CASE HER2 IHC {score}: {case['status']}" + (f" ({', '.join(extra)})" if extra else ""))
    lines.append(f"  {case['reason']}")
    lines.append(f"  rule: {guideline_label(case.get('guideline'), case.get('specimen'))}")
    lines.extend(f"  warning: {w}" for w in case["warnings"])
    return "\n".join(lines)
