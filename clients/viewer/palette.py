"""The viewer's colours (BGR, as OpenCV draws them): surfaces, text, states and the HER2 classes."""

from __future__ import annotations

from collections.abc import Mapping

from her2scope.scoring.overlay import CLASS_COLOURS

BGR = tuple[int, int, int]

# Colours, BGR.
BACKGROUND: BGR = (30, 27, 25)
SURFACE: BGR = (46, 42, 39)
TEXT: BGR = (240, 240, 240)
MUTED: BGR = (170, 165, 160)
GOOD: BGR = (110, 200, 80)
WARN: BGR = (40, 180, 250)
BAD: BGR = (70, 70, 235)
ACCENT: BGR = (230, 190, 60)
BAR: BGR = (22, 20, 19)
DRAW: BGR = (255, 80, 255)
CLASS_BGR: Mapping[str, BGR] = {
    score.value: (colour[2], colour[1], colour[0]) for score, colour in CLASS_COLOURS.items()
}
STABILITY_COLOURS: Mapping[str, BGR] = {"moving": WARN, "settling": (60, 220, 230), "stable": GOOD, "captured": ACCENT}
