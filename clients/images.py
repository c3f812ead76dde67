"""Reading FOV images and ROI files from disk, with errors that name the file and the problem."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt


class InputError(ValueError):
    """A file given by the user cannot be used; the message names the file and says why."""


def _declared_pixels(path: Path) -> int | None:
    """The pixel count an image file's header declares (read without decoding it); None if it cannot be told."""
    from PIL import Image

    bound, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours is the bound: only the header is read
    try:
        with Image.open(path) as image:
            return int(image.width) * int(image.height)
    except (OSError, ValueError, SyntaxError):  # not a format Pillow knows: OpenCV may
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = bound


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence what the C image libraries print on stderr (libpng's "libpng error: ..." for a truncated file):
    the failure is reported once, as an InputError naming the file."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def read_rgb(path: Path, max_pixels: int | None = None) -> npt.NDArray[np.generic]:
    """Read a colour image file as (M, N, 3) RGB (uint8 or uint16), or raise InputError. An image of more than
    ``max_pixels`` pixels is refused from its header, before it is decoded."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if max_pixels is not None and (pixels := _declared_pixels(path)) is not None and pixels > max_pixels:
        raise InputError(
            f"{path}: {pixels / 1e6:.0f} megapixels; the limit is {max_pixels / 1e6:g} (limits.max_image_megapixels)"
        )
    data = np.fromfile(path, dtype=np.uint8)
    with _quiet_stderr():
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise InputError(f"{path}: not a readable image (corrupt, truncated or an unsupported format)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise InputError(f"{path}: greyscale image; HER2 IHC scoring needs a colour (RGB) brightfield image")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"{path}: unexpected image shape {image.shape}; expected (rows, cols, 3)")
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path}: {image.dtype} pixels are not supported; use 8- or 16-bit RGB")
    code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


def write_rgb(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    """Write an RGB image (format from the suffix, lossless for .png/.tif), or raise OSError."""
    ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: could not encode image")
    path.write_bytes(encoded.tobytes())


def read_roi(path: Path) -> list[tuple[float, float]]:
    """Read an ROI polygon: JSON ``{"polygon": [[row, col], ...]}`` in FOV pixels, or raise InputError."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a JSON ROI file ({error})") from None
    except RecursionError:  # nested deeper than Python's stack: no ROI is
        raise InputError(f"{path}: not a JSON ROI file (nested too deeply)") from None
    polygon = document.get("polygon") if isinstance(document, dict) else None
    if not isinstance(polygon, list) or len(polygon) < 3:
        raise InputError(f'{path}: expected {{"polygon": [[row, col], ...]}} with at least 3 vertices')
    vertices: list[tuple[float, float]] = []
    for vertex in polygon:
        if (
            not isinstance(vertex, list)
            or len(vertex) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vertex)
        ):
            raise InputError(f"{path}: ROI vertex {vertex!r} is not a [row, col] pair of numbers")
        try:
            row, col = float(vertex[0]), float(vertex[1])
        except OverflowError:
            row = col = float("inf")
        if not (math.isfinite(row) and math.isfinite(col)):
            raise InputError(f"{path}: ROI vertex {vertex!r} is not finite")
        vertices.append((row, col))
    return vertices
