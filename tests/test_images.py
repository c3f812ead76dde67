"""Reading images and ROI files: clients/images.py."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from her2scope.clients.images import InputError, read_rgb, read_roi, write_rgb
from tests.helpers.images import read_image

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def write_bgr(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


# ----------------------------------------------------------------------------------------------------
# read_rgb
# ----------------------------------------------------------------------------------------------------


def test_read_rgb_returns_rgb_not_bgr(tmp_path: Path) -> None:
    red_bgr = np.zeros((4, 6, 3), np.uint8)
    red_bgr[:] = (0, 0, 255)
    image = read_rgb(write_bgr(tmp_path / "red.png", red_bgr))
    assert image.shape == (4, 6, 3)
    assert image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 0, 0]
    assert (image == np.array([255, 0, 0], np.uint8)).all()


def test_read_rgb_keeps_channel_order_of_each_pixel(tmp_path: Path) -> None:
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[0, 0] = (255, 0, 0)  # blue
    bgr[0, 1] = (0, 255, 0)  # green
    bgr[0, 2] = (10, 20, 30)
    image = read_rgb(write_bgr(tmp_path / "mix.png", bgr))
    assert image[0, 0].tolist() == [0, 0, 255]
    assert image[0, 1].tolist() == [0, 255, 0]
    assert image[0, 2].tolist() == [30, 20, 10]


def test_read_rgba_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((5, 7, 4), np.uint8)
    bgra[:] = (0, 0, 255, 128)
    image = read_rgb(write_bgr(tmp_path / "rgba.png", bgra))
    assert image.shape == (5, 7, 3)
    assert image[2, 3].tolist() == [255, 0, 0]


def test_read_16bit_keeps_dtype_and_order(tmp_path: Path) -> None:
    bgr = np.zeros((3, 3, 3), np.uint16)
    bgr[:] = (1000, 20000, 65535)
    image = read_rgb(write_bgr(tmp_path / "deep.png", bgr))
    assert image.dtype == np.uint16
    assert image[1, 1].tolist() == [65535, 20000, 1000]


def test_read_sample_jpeg() -> None:
    image = read_rgb(SAMPLES / "her2_3plus.jpg")
    assert image.shape == (1080, 1920, 3)
    assert image.dtype == np.uint8
    # Brightfield IHC: a bright background; matches cv2's BGR read reversed.
    np.testing.assert_array_equal(image, read_image(SAMPLES / "her2_3plus.jpg")[:, :, ::-1])


def test_write_rgb_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    path = tmp_path / "round.png"
    write_rgb(path, rgb)
    np.testing.assert_array_equal(read_rgb(path), rgb)
    # On disk it is BGR, as every other tool expects.
    np.testing.assert_array_equal(cv2.imread(str(path)), rgb[:, :, ::-1])


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 1)])
def test_greyscale_is_rejected(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write_bgr(tmp_path / "grey.png", np.full(shape, 128, np.uint8))
    with pytest.raises(InputError, match="greyscale") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.png"
    with pytest.raises(InputError, match="no such file") as info:
        read_rgb(path)
    assert str(info.value).startswith(str(path))


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_rgb(tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.png", b""),
        ("text.png", b"this is not an image\n"),
        ("truncated.jpg", (SAMPLES / "her2_0.jpg").read_bytes()[:20]),
    ],
)
def test_unreadable_image(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match="not a readable image") as info:
        read_rgb(path)
    assert str(path) in str(info.value)


def test_float_tiff_is_rejected(tmp_path: Path) -> None:
    path = write_bgr(tmp_path / "float.tif", np.full((4, 4, 3), 0.5, np.float32))
    with pytest.raises(InputError, match="float32 pixels are not supported"):
        read_rgb(path)


def test_input_error_is_a_value_error() -> None:
    assert issubclass(InputError, ValueError)


# ----------------------------------------------------------------------------------------------------
# read_roi
# ----------------------------------------------------------------------------------------------------


def write_roi(tmp_path: Path, document: object | str) -> Path:
    path = tmp_path / "roi.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def test_read_roi_valid(tmp_path: Path) -> None:
    path = write_roi(tmp_path, {"polygon": [[10, 20], [10.5, 400], [300, 400.25]], "note": "ignored"})
    vertices = read_roi(path)
    assert vertices == [(10.0, 20.0), (10.5, 400.0), (300.0, 400.25)]
    assert all(isinstance(v, float) for vertex in vertices for v in vertex)


def test_read_roi_many_vertices(tmp_path: Path) -> None:
    polygon = [[100 + 50 * np.sin(t), 100 + 50 * np.cos(t)] for t in np.linspace(0, 6, 40)]
    assert len(read_roi(write_roi(tmp_path, {"polygon": polygon}))) == 40


@pytest.mark.parametrize(
    ("document", "match"),
    [
        ("not json at all", "not a JSON ROI file"),
        ("", "not a JSON ROI file"),
        ('{"polygon": [[0, 0], [1, 1], [2, 0]]', "not a JSON ROI file"),  # unterminated
        ([[0, 0], [1, 1], [2, 0]], "at least 3 vertices"),  # a bare list, no "polygon" key
        ({"vertices": [[0, 0], [1, 1], [2, 0]]}, "at least 3 vertices"),
        ({"polygon": []}, "at least 3 vertices"),
        ({"polygon": [[0, 0], [1, 1]]}, "at least 3 vertices"),
        ({"polygon": "0,0 1,1 2,0"}, "at least 3 vertices"),
        ({"polygon": [[0, 0], [1, "a"], [2, 0]]}, r"ROI vertex \[1, 'a'\]"),
        ({"polygon": [[0, 0], [1, 1, 1], [2, 0]]}, r"ROI vertex \[1, 1, 1\]"),
        ({"polygon": [[0, 0], [1], [2, 0]]}, r"ROI vertex \[1\]"),
        ({"polygon": [[0, 0], [True, 1], [2, 0]]}, r"ROI vertex \[True, 1\]"),
        ({"polygon": [[0, 0], None, [2, 0]]}, "ROI vertex None"),
        ({"polygon": [[0, 0], {"row": 1, "col": 1}, [2, 0]]}, "ROI vertex"),
    ],
)
def test_read_roi_invalid(tmp_path: Path, document: object, match: str) -> None:
    path = write_roi(tmp_path, document)
    with pytest.raises(InputError, match=match) as info:
        read_roi(path)
    assert str(info.value).startswith(f"{path}: ")


def test_read_roi_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(InputError, match="no such file") as info:
        read_roi(path)
    assert str(path) in str(info.value)


def test_read_roi_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "roi.json"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(InputError, match="not a JSON ROI file"):
        read_roi(path)
