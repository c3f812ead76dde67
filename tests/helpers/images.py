"""Reading image files in a test."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def read_image(path: Path | str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """``cv2.imread`` that fails the test, naming the file, when it cannot be read (where OpenCV returns None)."""
    image = cv2.imread(str(path), flags)
    assert image is not None, f"cannot read {path}"
    return image
