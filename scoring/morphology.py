"""Binary morphology with round structuring elements, done by distance transforms.

For the large radii of this method (a tumour-cell radius is 10–30 px), thresholding a distance transform is
exact up to OpenCV's 5x5 L2 approximation and costs the same at any radius, unlike cv2.dilate with an elliptic
kernel whose cost grows with the kernel.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]


def within(mask: BoolArray, radius_px: float, points_rc: npt.NDArray[np.float64], coarse: int = 1) -> BoolArray:
    """Whether each (row, col) point lies within ``radius_px`` of a True pixel of ``mask`` (in its dilation).

    With ``coarse`` > 1 the distances are taken on a grid that many times coarser (a coarse pixel is set if any
    of its pixels is): faster, and at most one coarse pixel generous.
    """
    if coarse > 1:
        rows, cols = mask.shape
        small = coarsen_any(mask, coarse)
        scale = np.array([small.shape[0] / rows, small.shape[1] / cols])
        return within(small, radius_px * float(scale.mean()), (points_rc + 0.5) * scale - 0.5)
    return sample(distance_to(mask), points_rc) <= radius_px


def coarsen_any(mask: BoolArray, factor: int) -> BoolArray:
    """``mask`` on a grid ``factor`` times coarser; a coarse pixel is True if any pixel under it is.

    (Area averaging in float32, so that a single True pixel among many never rounds away.)
    """
    rows, cols = mask.shape
    size = (max(1, cols // factor), max(1, rows // factor))
    return np.asarray(cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)) > 0


def distance_to(mask: BoolArray) -> npt.NDArray[np.float32]:
    """Distance in pixels from every pixel to the nearest True pixel of ``mask`` (inf-like when there is none)."""
    if not mask.any():
        return np.full(mask.shape, np.float32(np.finfo(np.float32).max))
    background = np.where(mask, np.uint8(0), np.uint8(1))
    return cv2.distanceTransform(background, cv2.DIST_L2, 5)  # type: ignore[return-value]


def dilate(mask: BoolArray, radius_px: float) -> BoolArray:
    """Dilation of ``mask`` by a disk of ``radius_px``."""
    return distance_to(mask) <= radius_px


def erode(mask: BoolArray, radius_px: float) -> BoolArray:
    """Erosion of ``mask`` by a disk of ``radius_px``."""
    return ~dilate(~mask, radius_px)


def close(mask: BoolArray, radius_px: float) -> BoolArray:
    """Closing (dilation then erosion) by a disk: joins parts closer than 2 * radius."""
    return erode(dilate(mask, radius_px), radius_px)


def open_(mask: BoolArray, radius_px: float) -> BoolArray:
    """Opening (erosion then dilation) by a disk: removes parts narrower than 2 * radius."""
    return dilate(erode(mask, radius_px), radius_px)


def disk_kernel(radius_px: float) -> npt.NDArray[np.uint8]:
    """A disk structuring element for cv2 morphology, at least 3x3."""
    size = max(3, 2 * round(radius_px) + 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))  # type: ignore[return-value]


def sample(mask: npt.NDArray[Any], points_rc: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    """Values of ``mask`` at (row, col) points, rounded to the nearest pixel and clipped to the image."""
    if len(points_rc) == 0:
        return np.zeros(0, dtype=mask.dtype)
    rows = np.clip(np.rint(points_rc[:, 0]).astype(np.intp), 0, mask.shape[0] - 1)
    cols = np.clip(np.rint(points_rc[:, 1]).astype(np.intp), 0, mask.shape[1] - 1)
    return mask[rows, cols]


def remove_small(mask: BoolArray, min_area_px: float) -> BoolArray:
    """``mask`` without its 8-connected components smaller than ``min_area_px``."""
    if min_area_px <= 1 or not mask.any():
        return mask
    return _drop_small_components(mask, min_area_px, connectivity=8)


def _drop_small_components(mask: BoolArray, min_area_px: float, connectivity: int) -> BoolArray:
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area_px
    keep[0] = False  # label 0 is what is not in mask
    return np.take(keep, np.asarray(labels))
