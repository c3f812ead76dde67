"""Complete membranes from the contour hierarchy of a stain mask (Suzuki–Abe border following).

In a mask of stained membrane, a cell whose whole circumference is stained encloses a hole. OpenCV's
``findContours`` with ``RETR_TREE`` returns the holes as children of the outer borders. A hole that has a parent
(it lies inside stained tissue) and no child (nothing stained inside it) and the area of a tumour cell is a
complete membrane; its filled interior is [M_complete] and its centroid is [P_complete].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.scoring.morphology import BoolArray

_NO_CONTOUR = -1


@dataclass(frozen=True, slots=True)
class CompleteMembranes:
    """Complete membranes of one mask, at analysis resolution.

    Attributes
    ----------
    filled : (M, N) bool ndarray
        The membranes' filled interiors [M_complete].
    centres : (K, 2) float64 ndarray
        (row, col) centroids [P_complete].
    contours : the K contours as OpenCV (L, 1, 2) int32 (x, y) point arrays, for drawing.
    """

    filled: BoolArray
    centres: npt.NDArray[np.float64]
    contours: tuple[npt.NDArray[np.int32], ...]


def cell_area_bounds_px(min_diameter_um: float, max_diameter_um: float, pixel_size_um: float) -> tuple[float, float]:
    """Area bounds in px² of a round cell of the given diameters (µm) at ``pixel_size_um``."""

    def area(diameter_um: float) -> float:
        return math.pi * (diameter_um / pixel_size_um / 2.0) ** 2

    return area(min_diameter_um), area(max_diameter_um)


def complete_membranes(
    mask: BoolArray, min_area_px: float, max_area_px: float, min_solidity: float = 0.0
) -> CompleteMembranes:
    """Find the complete membranes in a binary stain mask.

    Parameters
    ----------
    mask : (M, N) bool ndarray
        M_weak or M_intense.
    min_area_px, max_area_px : float
        Area bounds of a tumour cell's interior; other closed contours are not cells.
    min_solidity : float
        Least area / convex-hull area of a cell's interior. Cells are roughly convex; the pocket enclosed
        between three neighbouring round cells is a concave triangle (solidity about 0.6) and is no cell.
    """
    filled = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return CompleteMembranes(filled.astype(bool), np.zeros((0, 2)), ())
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return CompleteMembranes(filled.astype(bool), np.zeros((0, 2)), ())
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    innermost = [contours[int(i)] for i in np.flatnonzero((links[:, 2] == _NO_CONTOUR) & (links[:, 3] != _NO_CONTOUR))]
    if not innermost:
        return CompleteMembranes(filled.astype(bool), np.zeros((0, 2)), ())
    # Most innermost contours are pinholes far smaller than a cell: their areas and centroids come from one
    # vectorised shoelace sum over all of them (Green's theorem, as cv2.moments computes them) rather than a call each.
    area, centre_rc = _polygon_areas_and_centroids(innermost)
    selected: list[npt.NDArray[np.int32]] = []
    centres: list[npt.NDArray[np.float64]] = []
    for index in np.flatnonzero((area >= min_area_px) & (area <= max_area_px)):
        contour = np.asarray(innermost[int(index)], dtype=np.int32)
        if min_solidity > 0 and area[index] < min_solidity * cv2.contourArea(cv2.convexHull(contour)):
            continue
        selected.append(contour)
        centres.append(centre_rc[index])
    if selected:
        cv2.drawContours(filled, selected, -1, 1, thickness=cv2.FILLED)
    points = np.array(centres, dtype=np.float64).reshape(-1, 2)
    return CompleteMembranes(filled.astype(bool), points, tuple(selected))


def _polygon_areas_and_centroids(
    contours: Sequence[npt.NDArray[Any]],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unsigned areas (px²) and (row, col) centroids of closed polygons given as OpenCV (L, 1, 2) x, y arrays."""
    lengths = np.fromiter((len(c) for c in contours), dtype=np.intp, count=len(contours))
    xy = np.concatenate(contours).reshape(-1, 2).astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    following = np.arange(1, len(xy) + 1)
    following[starts + lengths - 1] = starts  # each polygon closes on its own first vertex
    x, y = xy[:, 0], xy[:, 1]
    x_next, y_next = x[following], y[following]
    cross = x * y_next - x_next * y
    signed = np.add.reduceat(cross, starts) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        col = np.add.reduceat((x + x_next) * cross, starts) / (6.0 * signed)
        row = np.add.reduceat((y + y_next) * cross, starts) / (6.0 * signed)
    return np.abs(signed), np.column_stack([row, col])
