"""Colour deconvolution: agreement with scikit-image, Beer–Lambert round trips, input handling, Macenko."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data
from skimage.color import hdx_from_rgb, separate_stains

from her2scope.config.scoring import StainVectors
from her2scope.scoring import stains

H = (0.650, 0.704, 0.286)
DAB = (0.268, 0.570, 0.776)


def render(
    h_od: np.ndarray,
    dab_od: np.ndarray,
    h: tuple[float, float, float] = H,
    dab: tuple[float, float, float] = DAB,
    white: float = 255.0,
) -> np.ndarray:
    """Beer–Lambert forward model: stain amounts → float RGB intensities in [0, white]."""
    h_unit = np.asarray(h) / np.linalg.norm(h)
    d_unit = np.asarray(dab) / np.linalg.norm(dab)
    od = h_od[..., None] * h_unit + dab_od[..., None] * d_unit
    rgb: np.ndarray = white * 10.0 ** (-od)
    return rgb


@pytest.fixture(scope="module")
def amounts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.uniform(0, 1.0, (64, 64)), rng.uniform(0, 1.2, (64, 64))


def test_matches_scikit_image_separate_stains() -> None:
    image = data.immunohistochemistry()
    ours = stains.deconvolve(image, H, DAB)
    reference = separate_stains(image, hdx_from_rgb)  # natural log scaled by log(1e-6): OD / 6
    valid = (image > 0).all(axis=2)  # skimage clamps 0 at 1e-6, we at one grey level
    np.testing.assert_allclose(
        ours.haematoxylin[valid], np.maximum(6 * reference[..., 0], 0)[valid], rtol=1e-3, atol=1e-3
    )
    np.testing.assert_allclose(ours.dab[valid], np.maximum(6 * reference[..., 1], 0)[valid], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_round_trip_recovers_stain_amounts(dtype: type, amounts: tuple[np.ndarray, np.ndarray]) -> None:
    h_od, dab_od = amounts
    intensity = render(h_od, dab_od) / 255.0
    if dtype is np.uint8:
        image, tolerance = np.rint(intensity * 255).astype(np.uint8), 0.05
    elif dtype is np.uint16:
        image, tolerance = np.rint(intensity * 65535).astype(np.uint16), 0.002
    else:
        image, tolerance = intensity.astype(dtype), 0.002
    result = stains.deconvolve(image, H, DAB)
    assert result.haematoxylin.dtype == np.float32 and result.dab.dtype == np.float32
    np.testing.assert_allclose(result.haematoxylin, h_od, atol=tolerance)
    np.testing.assert_allclose(result.dab, dab_od, atol=tolerance)


def test_bgr_order_gives_the_same_amounts(amounts: tuple[np.ndarray, np.ndarray]) -> None:
    rgb = np.rint(render(*amounts)).astype(np.uint8)
    from_rgb = stains.deconvolve(rgb, H, DAB)
    from_bgr = stains.deconvolve(np.ascontiguousarray(rgb[:, :, ::-1]), H, DAB, channel_order="BGR")
    np.testing.assert_allclose(from_bgr.dab, from_rgb.dab, atol=1e-5)
    np.testing.assert_allclose(from_bgr.haematoxylin, from_rgb.haematoxylin, atol=1e-5)


def test_input_is_not_modified_and_alpha_is_ignored(amounts: tuple[np.ndarray, np.ndarray]) -> None:
    rgb = np.rint(render(*amounts)).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    before = rgba.copy()
    result = stains.deconvolve(rgba, H, DAB)
    np.testing.assert_array_equal(rgba, before)
    np.testing.assert_array_equal(result.dab, stains.deconvolve(rgb, H, DAB).dab)


def test_white_is_zero_and_amounts_are_never_negative() -> None:
    white = np.full((32, 32, 3), 255, np.uint8)
    result = stains.deconvolve(white, H, DAB)
    assert result.dab.max() == 0.0 and result.haematoxylin.max() == 0.0
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = stains.deconvolve(noise, H, DAB)
    assert result.dab.min() >= 0.0 and result.haematoxylin.min() >= 0.0


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.zeros((64, 64), np.uint8), ValueError, "colour image"),
        (np.zeros((64, 64, 2), np.uint8), ValueError, "colour image"),
        (np.zeros((8, 64, 3), np.uint8), ValueError, "too small"),
        (np.zeros((64, 64, 3), np.int32), TypeError, "dtype"),
        (np.full((64, 64, 3), 2.0), ValueError, "[0, 1]"),
        (np.full((64, 64, 3), np.nan), ValueError, "[0, 1]"),
        ([[1, 2, 3]], TypeError, "numpy array"),
    ],
)
def test_bad_images_are_refused_clearly(image: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        stains.deconvolve(image, H, DAB)  # type: ignore[arg-type]


def test_macenko_recovers_vectors_of_another_stain_kit() -> None:
    # A kit whose DAB is redder and haematoxylin bluer than Ruifrok–Johnston's.
    kit_h, kit_dab = (0.55, 0.72, 0.42), (0.35, 0.60, 0.72)
    rng = np.random.default_rng(3)
    h_od = np.where(rng.random((200, 200)) < 0.5, rng.uniform(0.2, 1.0, (200, 200)), 0.0)
    dab_od = np.where(h_od == 0, rng.uniform(0.2, 1.0, (200, 200)), 0.0)
    image = np.rint(render(h_od, dab_od, kit_h, kit_dab)).astype(np.uint8)
    est_h, est_dab = stains.estimate_stain_vectors(image)
    for estimated, true in ((est_h, kit_h), (est_dab, kit_dab)):
        cosine = float(np.dot(estimated, np.asarray(true) / np.linalg.norm(true)))
        assert cosine > 0.999, (estimated, true)


def test_macenko_falls_back_to_defaults_without_tissue() -> None:
    blank = np.full((100, 100, 3), 250, np.uint8)
    h, d = stains.estimate_stain_vectors(blank, StainVectors())
    np.testing.assert_allclose(h, np.asarray(H) / np.linalg.norm(H), atol=1e-9)
    np.testing.assert_allclose(d, np.asarray(DAB) / np.linalg.norm(DAB), atol=1e-9)
