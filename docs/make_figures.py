"""Regenerate the overlay figures shown in the README: ``python docs/make_figures.py``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from her2scope.config.scoring import CaseRule
from her2scope.scoring import analyse_fov, calibrate_from_control, score_case
from her2scope.scoring.overlay import DEFAULT_LAYERS, render_overlay
from her2scope.synthetic import render_control, render_fov

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WIDTH = 1280


def _read(name: str) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(ROOT / "samples" / name)), cv2.COLOR_BGR2RGB)


def _write(name: str, rgb: np.ndarray, width: int | None = WIDTH) -> None:
    if width is not None and rgb.shape[1] != width:
        height = round(rgb.shape[0] * width / rgb.shape[1])
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(DOCS / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(DOCS / name)


def main() -> None:
    """Score a real and a synthetic FOV and write their overlays."""
    control = calibrate_from_control(_read("control_3plus.jpg"), 0.25)
    real = _read("her2_3plus.jpg")
    analysis = analyse_fov(real, 0.25, control=control)
    overlay = render_overlay(analysis)
    _write("overlay_real_3plus.png", overlay.compose(real, DEFAULT_LAYERS))
    _write("overlay_real_3plus_detail.png", overlay.compose(real, DEFAULT_LAYERS)[380:880, 900:1700], None)

    synthetic_control = calibrate_from_control(render_control(seed=11).rgb, 0.25)
    fov = render_fov(class_fractions={"0": 0.4, "1+": 0.3, "2+": 0.25, "3+": 0.05}, seed=7)
    analysis = analyse_fov(fov.rgb, 0.25, control=synthetic_control)
    case = score_case([analysis.result], CaseRule(), synthetic_control)
    overlay = render_overlay(analysis, case)
    _write("overlay_synthetic.png", overlay.compose(fov.rgb, [*DEFAULT_LAYERS[:-1], "intensity", "panel"]))


if __name__ == "__main__":
    main()
