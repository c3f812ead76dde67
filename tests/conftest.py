"""Shared fixtures (the real sample crops). The helpers the test modules share are in ``tests/helpers/``: test
modules import them from there, never from one another or from this file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers.recorder import Setup

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


@pytest.fixture(scope="session")
def sample() -> Callable[[str], np.ndarray]:
    """Read a real sample crop (RGB) by its file name."""

    def read(name: str) -> np.ndarray:
        bgr = cv2.imread(str(SAMPLES / name))
        assert bgr is not None, f"missing sample {name}"
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    return read


@pytest.fixture
def own_setup(tmp_path: Path) -> Iterator[Setup]:
    """A test's own state folder and config, no daemon yet: for tests that stop, restart or start it late."""
    bench = Setup(tmp_path, start_daemon=False)
    try:
        yield bench
    finally:
        bench.close()
