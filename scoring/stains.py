"""Colour deconvolution of a brightfield RGB image into haematoxylin and DAB optical density (Ruifrok–Johnston).

Beer–Lambert: each channel's optical density OD_c = -log10(I_c / I0) is a non-negative mix of the stains'
OD vectors. With the stain vectors as rows of a 3x3 matrix S (haematoxylin, DAB, and their cross product as the
residual), the stain amounts of a pixel are OD @ inv(S). Stain vectors can also be estimated from the image
itself (Macenko et al. 2009), which adapts to the stain kit and the camera's white balance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.scoring import StainVectors

Vector3 = tuple[float, float, float]
ChannelOrder = Literal["RGB", "BGR"]

#: Lowest intensity used in the logarithm, as a fraction of full scale: one grey level of 8 bits.
_MIN_TRANSMISSION = 1.0 / 255.0
#: OD of the 8-bit grey levels 0..255 against a white of 255; 0 is clamped to 1 (the log would be infinite).
_OD_LUT_U8 = (-np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)


@dataclass(frozen=True, slots=True)
class StainDensities:
    """Per-pixel stain amounts in optical density units.

    Attributes
    ----------
    haematoxylin : (M, N) float32 ndarray
    dab : (M, N) float32 ndarray
    vectors : the (haematoxylin, DAB) unit OD vectors used
    """

    haematoxylin: npt.NDArray[np.float32]
    dab: npt.NDArray[np.float32]
    vectors: tuple[Vector3, Vector3]


def _unit(vector: npt.ArrayLike) -> npt.NDArray[np.float64]:
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def stain_matrix(haematoxylin: Vector3, dab: Vector3) -> npt.NDArray[np.float64]:
    """Rows: unit haematoxylin, DAB and residual (their cross product) OD vectors, in R, G, B order.

    Returns
    -------
    (3, 3) float64 ndarray
    """
    h = _unit(haematoxylin)
    d = _unit(dab)
    residual = np.cross(h, d)
    return np.stack([h, d, _unit(residual)])


def check_rgb(image: object, name: str = "image") -> npt.NDArray[np.generic]:
    """Return ``image`` as an (M, N, 3) ndarray of an image dtype, or raise a ValueError/TypeError saying why not.

    Accepts uint8, uint16 and floats in [0, 1]; an alpha channel (M, N, 4) is ignored.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(
            f"{name} must be a colour image of shape (rows, cols, 3), got shape {image.shape}; "
            "a greyscale or single-stain image cannot be colour-deconvolved"
        )
    if image.shape[0] < 16 or image.shape[1] < 16:
        raise ValueError(f"{name} of shape {image.shape} is too small to score (at least 16x16 pixels)")
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise TypeError(f"{name} has dtype {image.dtype}; use uint8, uint16, or float32/float64 in [0, 1]")
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise ValueError(f"{name} has NaN or infinite values; floats must lie in [0, 1]")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{name} is a float image with values in [{low}, {high}]; floats must lie in [0, 1]")
    return image[:, :, :3] if image.shape[2] == 4 else image


def optical_density(image: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """Per-channel OD = -log10(I / white) of an (M, N, 3) uint8, uint16 or float [0, 1] image; float32 out."""
    if image.dtype == np.uint8:
        return np.asarray(cv2.LUT(np.ascontiguousarray(image), _OD_LUT_U8), dtype=np.float32)
    full_scale = 65535.0 if image.dtype == np.uint16 else 1.0
    transmission = np.maximum(image.astype(np.float32) / np.float32(full_scale), np.float32(_MIN_TRANSMISSION))
    return np.asarray(-np.log10(transmission), dtype=np.float32)


def deconvolve(
    image: npt.NDArray[np.generic],
    haematoxylin: Vector3,
    dab: Vector3,
    channel_order: ChannelOrder = "RGB",
) -> StainDensities:
    """Haematoxylin and DAB optical density of each pixel.

    Parameters
    ----------
    image : (M, N, 3) uint8, uint16 or float ndarray
        Brightfield image; not modified.
    haematoxylin, dab : RGB OD vectors of the two stains (normalised here).
    channel_order : "RGB", or "BGR" for frames straight from OpenCV (saves a copy).

    Returns
    -------
    StainDensities
        Stain amounts clipped at 0 (negative amounts are noise).
    """
    image = check_rgb(image)
    inverse = np.linalg.inv(stain_matrix(haematoxylin, dab))  # od_row @ inverse = amounts
    if channel_order == "BGR":
        inverse = inverse[::-1, :]
    # cv2.transform computes dst_i = sum_j m[i, j] * src_j; keep the H and DAB rows only, one transform each (a
    # single-channel output is several times faster than a two-channel one and needs no split)
    m = inverse[:, :2].T.astype(np.float32)
    od = optical_density(image)
    h, d = (np.asarray(cv2.transform(od, m[row : row + 1]), dtype=np.float32) for row in (0, 1))
    np.maximum(h, 0.0, out=h)
    np.maximum(d, 0.0, out=d)
    return StainDensities(
        haematoxylin=np.asarray(h, dtype=np.float32),
        dab=np.asarray(d, dtype=np.float32),
        vectors=(_as_vector(_unit(haematoxylin)), _as_vector(_unit(dab))),
    )


def _as_vector(v: npt.NDArray[np.float64]) -> Vector3:
    return (float(v[0]), float(v[1]), float(v[2]))


def estimate_stain_vectors(
    image: npt.NDArray[np.generic],
    defaults: StainVectors | None = None,
    *,
    min_od: float = 0.15,
    angle_percentile: float = 1.0,
    min_pixels: int = 2000,
) -> tuple[Vector3, Vector3]:
    """Estimate the (haematoxylin, DAB) OD vectors of an RGB image by Macenko's method.

    Tissue pixels (total OD above ``min_od``) are projected onto the plane of their two main OD directions; the
    extreme angles (``angle_percentile`` and 100 - it) there are the two pure stains. The bluer-absorbing one
    (larger blue OD share) is DAB. Too little tissue, or vectors that come out implausibly close, fall back to
    ``defaults`` (Ruifrok–Johnston), so a blank field never yields nonsense vectors.

    Returns
    -------
    (haematoxylin, dab) unit OD vectors in R, G, B order.
    """
    fallback = defaults or StainVectors()
    fallback_pair = (_as_vector(_unit(fallback.haematoxylin)), _as_vector(_unit(fallback.dab)))
    od = optical_density(check_rgb(image)).reshape(-1, 3)
    tissue = od[od.sum(axis=1) > min_od]
    if len(tissue) < min_pixels:
        return fallback_pair
    if len(tissue) > 200_000:  # a regular subsample is as good and keeps this fast and deterministic
        tissue = tissue[:: len(tissue) // 200_000 + 1]
    tissue64 = tissue.astype(np.float64)
    _, eigenvectors = np.linalg.eigh(np.cov(tissue64, rowvar=False))
    plane = eigenvectors[:, 1:3]  # the two largest
    plane = plane * np.sign(plane.sum(axis=0, keepdims=True) + 1e-12)  # point into the positive octant
    projected = tissue64 @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [angle_percentile, 100.0 - angle_percentile])
    candidates = []
    for angle in (low, high):
        v = plane @ np.array([np.cos(angle), np.sin(angle)])
        if np.any(v < -0.05):
            return fallback_pair
        candidates.append(_unit(np.clip(v, 1e-6, None)))
    first, second = candidates
    if float(first @ second) > 0.98:
        return fallback_pair
    # DAB absorbs blue most, haematoxylin red/green: order them by blue share.
    h, d = (first, second) if first[2] < second[2] else (second, first)
    return _as_vector(h), _as_vector(d)
