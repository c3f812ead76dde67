"""Clear nuclei from the haematoxylin channel, and the tumour region they are counted in."""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.scoring import morphology
from her2scope.scoring.morphology import BoolArray


def smooth_haematoxylin(haematoxylin_od: npt.NDArray[np.float32], radius_px: float) -> npt.NDArray[np.float32]:
    """Haematoxylin OD smoothed at a third of the nucleus radius: chromatin texture, JPEG blocks and noise merge,
    so that a pale nucleus is one solid blob with one peak."""
    return np.asarray(cv2.GaussianBlur(haematoxylin_od, (0, 0), max(0.8, radius_px / 3.0)), dtype=np.float32)


def nucleus_mask(smooth_h_od: npt.NDArray[np.float32], threshold_od: float, radius_px: float) -> BoolArray:
    """Smoothed haematoxylin above ``threshold_od``, opened by a disk of a third of a nucleus radius (specks go)."""
    mask = (smooth_h_od > threshold_od).astype(np.uint8)
    kernel = morphology.disk_kernel(max(1.0, radius_px / 3.0))
    return np.asarray(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)).astype(bool)


def clear_nuclei(
    smooth_h_od: npt.NDArray[np.float32],
    mask: BoolArray,
    radius_px: float,
    min_prominence_od: float = 0.03,
) -> npt.NDArray[np.float64]:
    """Centres of clear nuclei [P_clear]: local maxima of the smoothed haematoxylin inside ``mask``.

    The smoothing (:func:`smooth_haematoxylin`) merges a nucleus's chromatin texture into one peak; a peak must be
    the maximum of a square around it as large as a disk of one nucleus radius, so two nuclei closer than about
    that count once (a square, not a disk, because its max filter is separable and several times faster).
    A peak must also rise ``min_prominence_od`` above the lowest value within two nucleus radii: a uniform field
    (a dark frame, a smear) has no nuclei. Plateaus are merged.

    Returns
    -------
    (K, 2) float64 ndarray of (row, col).
    """
    if not mask.any():
        return np.zeros((0, 2))
    smooth = smooth_h_od
    side = 2 * max(1, round(radius_px * math.sqrt(math.pi) / 2.0)) + 1
    neighbourhood = cv2.dilate(smooth, np.ones((side, side), np.uint8))
    floor = cv2.erode(smooth, np.ones((2 * side - 1, 2 * side - 1), np.uint8))
    peaks = ((smooth >= neighbourhood) & (smooth - floor >= min_prominence_od) & mask).astype(np.uint8)
    _, _, _, centroids = cv2.connectedComponentsWithStats(peaks, connectivity=8)
    return np.ascontiguousarray(centroids[1:, ::-1], dtype=np.float64).reshape(-1, 2)


def tumour_region(
    tissue: BoolArray,
    closing_radius_px: float,
    opening_radius_px: float,
    margin_px: float = 0.0,
    work_scale: int = 1,
) -> BoolArray:
    """The tumour region: stained tissue closed (cells of a nest join), opened (stroma strands and scattered
    nuclei go), then dilated by a margin (the opening's round disk cuts the corners of a nest).

    ``work_scale`` > 1 computes it on a mask ``work_scale`` times coarser, which is exact enough for a region
    tens of µm across and much faster; the result has ``tissue``'s shape.
    """
    if work_scale > 1:
        rows, cols = tissue.shape
        small = morphology.coarsen_any(tissue, work_scale)  # a thin nucleus or membrane must not vanish
        region_small = tumour_region(
            small, closing_radius_px / work_scale, opening_radius_px / work_scale, margin_px / work_scale
        )
        return cv2.resize(region_small.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(bool)
    region = morphology.open_(morphology.close(tissue, closing_radius_px), opening_radius_px)
    return morphology.dilate(region, margin_px) if margin_px > 0 else region
