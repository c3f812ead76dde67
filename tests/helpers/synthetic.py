"""Synthetic fields with their truth, the calibrations of synthetic controls, and matching detections to truth."""

from __future__ import annotations

from functools import cache

import numpy as np

from her2scope.config.scoring import MembraneMethod, ScoringParams
from her2scope.scoring import ControlCalibration, calibrate_from_control
from her2scope.synthetic import SyntheticFov, render_control, render_fov

PIXEL_SIZE_40X = 0.25


@cache
def synthetic_fov(
    mix: tuple[tuple[str, float], ...],
    batch_strength: float = 1.0,
    pixel_size_um: float = PIXEL_SIZE_40X,
    seed: int = 5,
    shape: tuple[int, int] = (1080, 1920),
    jpeg_quality: int | None = None,
) -> SyntheticFov:
    """A cached synthetic FOV (rendering takes ~0.2 s; many tests share the same ones)."""
    return render_fov(
        shape, pixel_size_um, dict(mix), batch_strength=batch_strength, seed=seed, jpeg_quality=jpeg_quality
    )


@cache
def synthetic_control(
    batch_strength: float = 1.0, pixel_size_um: float = PIXEL_SIZE_40X, params: ScoringParams | None = None
) -> ControlCalibration:
    """The calibration from a synthetic positive control of the given batch (by ``params``' membrane method)."""
    control = render_control(pixel_size_um=pixel_size_um, batch_strength=batch_strength, seed=11)
    return calibrate_from_control(control.rgb, pixel_size_um, params)


#: The published method's parameters, for the tests of what only it draws or computes.
CONTOUR_METHOD = ScoringParams(membrane_method=MembraneMethod.CONTOUR_HIERARCHY)


def match_cells(detected_rc: np.ndarray, truth_rc: np.ndarray, max_distance_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one nearest matching; returns index arrays (detected, truth) of matched pairs."""
    if len(detected_rc) == 0 or len(truth_rc) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    distances = np.hypot(*(detected_rc[:, None, :] - truth_rc[None, :, :]).transpose(2, 0, 1))
    pairs = np.argwhere(distances <= max_distance_px)
    order = np.argsort(distances[pairs[:, 0], pairs[:, 1]])
    used_d: set[int] = set()
    used_t: set[int] = set()
    matched = []
    for d, t in pairs[order]:
        if d not in used_d and t not in used_t:
            used_d.add(int(d))
            used_t.add(int(t))
            matched.append((d, t))
    array = np.array(matched, dtype=int).reshape(-1, 2)
    return array[:, 0], array[:, 1]
