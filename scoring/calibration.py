"""Stain thresholds from the slide itself: the intense threshold from the positive control, the weak threshold
from a region of typical weak staining.

The positive control is 3+ tissue stained in the same batch, so its membranes show what "intense" looks like for
this batch.

Per-cell method (the default): the control's tumour cells are measured like any FOV's; the median membrane DAB OD
of those with stained membrane is the batch's intense level, and the intense threshold is
``control_cell_intense_fraction`` (0.7) of it: the geometric middle between that level and a moderate one at
half its OD. A ring within that of the control's is intense.

Contour-hierarchy method: its stained membrane pixels are those of M_weak inside its tumour region. Their DAB OD
spreads from the weak threshold (membrane edges, blurred) to the ridge of the membranes; the mean over the
percentile range ``control_percentile_range`` (default the 50th–95th, the upper half without the darkest outliers)
is the typical membrane ridge OD of this batch. The intense threshold is ``control_intense_fraction`` of it: a 3+
membrane of the same batch stays above it along its whole ring, a moderately stained (2+) one does not.

Quality control: the control is scored with its own threshold and must come out 3+; and since a threshold
relative to the control would make any control look 3+, its ridge must also reach ``min_control_ridge_od``.
Either failure is a warning on every result of the case: the assay or the chosen control is questionable.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.scoring import CaseRule, MembraneMethod, ScoringParams
from her2scope.scoring.pipeline import RowCol, analyse_fov, polygon_mask, prepare, stain_masks
from her2scope.scoring.results import ClassCounts, ControlCalibration, Her2Score, MembranePattern, ThresholdSource
from her2scope.scoring.stains import ChannelOrder

#: Fewer stained membrane pixels than this area cannot calibrate anything (a few cells' worth).
_MIN_MEMBRANE_AREA_UM2 = 200.0
#: Per-cell method: fewer stained tumour cells than this cannot tell the batch's intense level.
_MIN_CONTROL_CELLS = 20


def calibrate_from_control(
    image: npt.NDArray[np.generic],
    pixel_size_um: float,
    params: ScoringParams | None = None,
    *,
    region_polygon: Sequence[RowCol] | None = None,
    rule: CaseRule | None = None,
    channel_order: ChannelOrder = "RGB",
) -> ControlCalibration:
    """Derive the intense DAB threshold from a positive-control FOV and check that the control scores 3+.

    Parameters
    ----------
    image : (M, N, 3) ndarray
        The positive-control FOV; not modified.
    pixel_size_um : µm per pixel of ``image``.
    region_polygon : optional (row, col) polygon of the control to calibrate from (the pathologist's pick).

    Raises
    ------
    ValueError
        The control has too little stained membrane to calibrate from (blank field, wrong slide).
    """
    params = params or ScoringParams()
    rule = rule or CaseRule()
    source = ThresholdSource.CONTROL if region_polygon is None else ThresholdSource.CONTROL_REGION
    if params.membrane_method == MembraneMethod.PER_CELL:
        ridge, n_membrane = _control_cells_ridge(image, pixel_size_um, params, region_polygon, rule, channel_order)
        threshold = params.control_cell_intense_fraction * ridge
    else:
        ridge, n_membrane = _control_pixels_ridge(image, pixel_size_um, params, region_polygon, channel_order)
        threshold = params.control_intense_fraction * ridge
    warnings: list[str] = []
    if threshold <= 1.5 * params.weak_threshold_od:
        warnings.append(
            f"the control's membranes are faint (ridge DAB OD {ridge:.2f}): intense threshold {threshold:.2f} is "
            f"close to the weak threshold {params.weak_threshold_od:.2f}; check the staining run"
        )
        threshold = 1.5 * params.weak_threshold_od
    provisional = ControlCalibration(
        intense_threshold_od=threshold,
        source=source,
        membrane_ridge_od=ridge,
        percentile_range=params.control_percentile_range,
        n_membrane_pixels=n_membrane,
        control_counts=ClassCounts(),
        control_score=None,
        qc_passed=False,
    )
    control_result = analyse_fov(
        image,
        pixel_size_um,
        params,
        control=provisional,
        roi_polygon=region_polygon,
        rule=rule,
        channel_order=channel_order,
    ).result
    strong_enough = ridge >= params.min_control_ridge_od
    if not strong_enough:
        warnings.append(
            f"positive control QC failed: its membranes stain at {ridge:.2f} OD, fainter than the "
            f"{params.min_control_ridge_od:.2f} OD of a 3+ control; the assay or the chosen control is questionable"
        )
    qc_passed = strong_enough and control_result.call.score == Her2Score.THREE_PLUS
    if control_result.call.score != Her2Score.THREE_PLUS:
        scored = control_result.call.score.value if control_result.call.score else "not assessable"
        warnings.append(
            f"positive control QC failed: the control scored {scored} ({control_result.call.reason}), not 3+; "
            "the assay or the chosen control region is questionable"
        )
    return provisional.model_copy(
        update={
            "control_counts": control_result.counts,
            "control_score": control_result.call.score,
            "qc_passed": qc_passed,
            "warnings": tuple(warnings),
        }
    )


def _control_pixels_ridge(
    image: npt.NDArray[np.generic],
    pixel_size_um: float,
    params: ScoringParams,
    region_polygon: Sequence[RowCol] | None,
    channel_order: ChannelOrder,
) -> tuple[float, int]:
    """Contour-hierarchy method: the mean DAB OD of the control's stained membrane pixels (M_weak in its tumour
    region) between the percentiles of ``control_percentile_range``, and how many pixels that was."""
    analysis = prepare(image, pixel_size_um, params, channel_order)
    px = analysis.pixel_size_um
    masks = stain_masks(analysis, params, params.default_intense_threshold_od)
    region = masks.tumour_region
    if region_polygon is not None:
        region = region & polygon_mask(region_polygon, analysis)
    membrane_od = analysis.densities.dab[masks.weak & region]
    min_pixels = _MIN_MEMBRANE_AREA_UM2 / (px * px)
    if membrane_od.size < min_pixels:
        raise ValueError(
            f"the positive control has {membrane_od.size * px * px:.0f} µm² of stained membrane, less than the "
            f"{_MIN_MEMBRANE_AREA_UM2:.0f} µm² needed to calibrate: is this the control tissue, in focus?"
        )
    return range_mean(membrane_od, params.control_percentile_range), int(membrane_od.size)


def _control_cells_ridge(
    image: npt.NDArray[np.generic],
    pixel_size_um: float,
    params: ScoringParams,
    region_polygon: Sequence[RowCol] | None,
    rule: CaseRule,
    channel_order: ChannelOrder,
) -> tuple[float, int]:
    """Per-cell method: the median membrane DAB OD of the control's tumour cells with stained membrane (a 3+
    control's cells are its intense level), and how many stained membrane pixels the control has."""
    analysis = analyse_fov(
        image, pixel_size_um, params, roi_polygon=region_polygon, rule=rule, channel_order=channel_order
    )
    ring_od = np.array(
        [c.membrane_od for c in analysis.result.cells if c.pattern not in (None, MembranePattern.NONE)],
        dtype=np.float64,
    )
    if ring_od.size < _MIN_CONTROL_CELLS:
        raise ValueError(
            f"the positive control has {ring_od.size} tumour cells with stained membrane, fewer than the "
            f"{_MIN_CONTROL_CELLS} needed to calibrate: is this the control tissue, in focus?"
        )
    return float(np.median(ring_od)), int((analysis.weak & analysis.tumour_region).sum())


def range_mean(values: npt.NDArray[np.float32], percentile_range: tuple[float, float]) -> float:
    """Mean of ``values`` lying between the two percentiles (inclusive)."""
    low, high = np.percentile(values, percentile_range)
    inside = values[(values >= low) & (values <= high)]
    return float(inside.mean()) if inside.size else float(low)


def weak_threshold_from_region(
    image: npt.NDArray[np.generic],
    pixel_size_um: float,
    region_polygon: Sequence[RowCol],
    params: ScoringParams | None = None,
    *,
    channel_order: ChannelOrder = "RGB",
) -> float:
    """The weak DAB threshold from a region of typical weak staining picked by the pathologist.

    Otsu's threshold on the region's DAB OD separates its faintly stained membranes from the unstained
    background around them; the weak threshold is that split.

    Raises
    ------
    ValueError
        The region holds no DAB contrast to split (no stained membrane in it).
    """
    params = params or ScoringParams()
    analysis = prepare(image, pixel_size_um, params, channel_order)
    values = analysis.densities.dab[polygon_mask(region_polygon, analysis)]
    if values.size < 50 or float(values.max() - values.min()) < 0.02:
        raise ValueError("the selected region has no DAB contrast to set a weak threshold from")
    scaled = np.clip(values / values.max() * 255.0, 0, 255).astype(np.uint8).reshape(-1, 1)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(otsu) / 255.0 * float(values.max())
    if not 0.0 < threshold < params.default_intense_threshold_od:
        raise ValueError(
            f"the selected region gives a weak threshold of {threshold:.2f} OD, not below the intense "
            f"threshold {params.default_intense_threshold_od:.2f}: pick a region of weak, not intense, staining"
        )
    return threshold
