"""Binary morphology with round structuring elements, done by distance transforms.

For the large radii of this method (a tumour-cell radius is 10–30 px), thresholding a distance transform is
exact up to OpenCV's 5x5 L2 approximation and costs the same at any radius, unlike cv2.dilate with an elliptic
kernel whose cost grows with the kernel.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]


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


def sample(mask: npt.NDArray[np.generic], points_rc: npt.NDArray[np.float64]) -> npt.NDArray[np.generic]:
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
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # background
    return keep[labels]  # type: ignore[no-any-return]
