"""Overlay layers that show why a FOV got its score, each an RGBA image that can be shown or hidden.

- ``cells``: every counted tumour cell as a dot on its nucleus coloured by class (0 blue, 1+ yellow, 2+ orange,
  3+ red); nuclei counted in no class (per-cell method: stroma, muscle, lymphocytes; contour method: next to
  intense staining) as small grey crosses.
- ``intensity``: the skeleton of the stained area, red where intense (M_intense), yellow where weak or moderate
  (M_weak − M_intense).
- ``completeness``: per-cell method, each tumour cell's ring as its rays measured it, coloured where it is
  stained: red intense, yellow weak to moderate, thin grey unstained; contour method, the innermost complete
  membrane contours, red for intense (3+), green for weak/moderate (2+).
- ``region``: the outline of the tumour region the cells were counted in.
- ``panel``: counts, percentages, the score with its reason and the threshold's source.

Drawing uses OpenCV's drawing functions only (no window); everything is in FOV pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from skimage.morphology import skeletonize

from her2scope.config.scoring import Guideline, Specimen
from her2scope.scoring.case import GUIDELINE_SOURCES
from her2scope.scoring.cells import ring_points
from her2scope.scoring.morphology import BoolArray, sample
from her2scope.scoring.pipeline import FovAnalysis
from her2scope.scoring.results import CaseResult, FovResult, Her2Score

RGB = tuple[int, int, int]

LAYER_NAMES: tuple[str, ...] = ("cells", "intensity", "completeness", "region", "panel")
#: What a pathologist sees first: the dense intensity skeleton hides the tissue, so it is shown on demand.
DEFAULT_LAYERS: tuple[str, ...] = ("cells", "completeness", "region", "panel")

CLASS_COLOURS: Mapping[Her2Score, RGB] = {
    Her2Score.ZERO: (40, 120, 255),
    Her2Score.ONE_PLUS: (255, 225, 0),
    Her2Score.TWO_PLUS: (255, 140, 0),
    Her2Score.THREE_PLUS: (230, 20, 20),
}
INTENSE_COLOUR: RGB = (230, 20, 20)
WEAK_COLOUR: RGB = (255, 225, 0)
COMPLETE_WEAK_COLOUR: RGB = (0, 200, 60)
EXCLUDED_COLOUR: RGB = (150, 150, 150)
UNSTAINED_COLOUR: RGB = (190, 190, 190)
REGION_COLOUR: RGB = (0, 200, 220)
_FONT = cv2.FONT_HERSHEY_DUPLEX


@dataclass(frozen=True, slots=True)
class Overlay:
    """The overlay layers of one FOV.

    Attributes
    ----------
    layers : name → (M, N, 4) uint8 RGBA ndarray, in FOV pixels, for the names in ``LAYER_NAMES``
    """

    layers: Mapping[str, npt.NDArray[np.uint8]]

    def compose(self, rgb: npt.NDArray[np.uint8], visible: Iterable[str] | None = None) -> npt.NDArray[np.uint8]:
        """Alpha-blend the ``visible`` layers, in the given order, over a copy of ``rgb`` (M, N, 3) uint8.

        ``None`` shows all layers in ``LAYER_NAMES`` order; an empty list shows none (a copy of ``rgb``).

        Raises
        ------
        ValueError
            A name in ``visible`` is not one of this overlay's layers, or a layer does not match ``rgb``.
        """
        names = list(LAYER_NAMES if visible is None else visible)
        unknown = [name for name in names if name not in self.layers]
        if unknown:
            raise ValueError(f"unknown overlay layer(s) {unknown}; the layers are {sorted(self.layers)}")
        return compose(rgb, [self.layers[name] for name in names])


def compose(rgb: npt.NDArray[np.uint8], layers: Iterable[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    """Alpha-blend RGBA ``layers`` in order over a copy of ``rgb`` (M, N, 3) uint8."""
    out = rgb.astype(np.float32)
    for layer in layers:
        if layer.shape[:2] != rgb.shape[:2]:
            raise ValueError(f"layer of shape {layer.shape} does not match image of shape {rgb.shape}")
        alpha = layer[:, :, 3:4].astype(np.float32) / 255.0
        out = out * (1.0 - alpha) + layer[:, :, :3].astype(np.float32) * alpha
    return np.asarray(np.clip(out + 0.5, 0, 255), dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class _Canvas:
    """Where layers are drawn: ``shape`` pixels, ``factor`` canvas pixels per FOV pixel."""

    shape: tuple[int, int]
    factor: float

    def points(self, fov_rc: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return (fov_rc + 0.5) * self.factor - 0.5


def render_overlay(analysis: FovAnalysis, case: CaseResult | None = None, *, width: int | None = None) -> Overlay:
    """Draw all layers of a FOV's analysis; ``case`` adds the running case score to the panel.

    ``width`` draws the layers at that width instead of the FOV's (e.g. a display's, which is also much faster to
    draw and to encode); the height follows the FOV's aspect ratio.
    """
    rows, cols = analysis.image.fov_shape
    if width is not None and width < 16:
        raise ValueError(f"overlay width must be at least 16 pixels, got {width}")
    factor = 1.0 if width is None else width / cols
    canvas = _Canvas((max(1, round(rows * factor)), width or cols), factor)
    result = analysis.result
    # Line widths and marker sizes follow the FOV's physical scale but stay visible on screen.
    um = factor / result.pixel_size_um  # canvas pixels per µm
    line = max(2, round(0.6 * um))
    layers = {
        "cells": _cells_layer(canvas, result, analysis.excluded_nuclei_rc, um),
        "intensity": _intensity_layer(analysis, canvas, line),
        "completeness": _completeness_layer(analysis, canvas, line),
        "region": _region_layer(analysis, canvas, line),
        "panel": panel_layer(canvas.shape, result, case),
    }
    return Overlay(layers)


def _blank(shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    return np.zeros((*shape, 4), dtype=np.uint8)


def _rgba(colour: RGB, alpha: int = 255) -> tuple[int, int, int, int]:
    return (*colour, alpha)


def _cells_layer(
    canvas: _Canvas, result: FovResult, excluded_rc: npt.NDArray[np.float64], um: float
) -> npt.NDArray[np.uint8]:
    layer = _blank(canvas.shape)
    radius = max(4, round(2.5 * um))
    dot = max(3, round(1.2 * um))
    thickness = max(2, round(0.5 * um))
    positions = canvas.points(np.array([(c.row, c.col) for c in result.cells], dtype=np.float64).reshape(-1, 2))
    for cell, (row, col) in zip(result.cells, positions, strict=True):
        centre = (round(col), round(row))
        colour = _rgba(CLASS_COLOURS[cell.her2_class])
        if cell.ring_radii_um:  # per-cell: the ring is drawn by the completeness layer; a dot marks the class
            cv2.circle(layer, centre, dot + 1, (0, 0, 0, 200), cv2.FILLED, cv2.LINE_AA)
            cv2.circle(layer, centre, dot, colour, cv2.FILLED, cv2.LINE_AA)
            continue
        cv2.circle(layer, centre, radius + thickness, (0, 0, 0, 160), thickness, cv2.LINE_AA)
        cv2.circle(layer, centre, radius, colour, thickness, cv2.LINE_AA)
    arm = max(3, round(1.2 * um))
    for row, col in canvas.points(excluded_rc):
        centre = (round(col), round(row))
        cv2.drawMarker(layer, centre, _rgba(EXCLUDED_COLOUR, 220), cv2.MARKER_CROSS, 2 * arm, max(2, thickness // 2))
    return layer


def _upsample_mask(mask: BoolArray, shape: tuple[int, int]) -> BoolArray:
    if mask.shape == shape:
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _intensity_layer(analysis: FovAnalysis, canvas: _Canvas, line: int) -> npt.NDArray[np.uint8]:
    shape = canvas.shape
    layer = _blank(shape)
    skeleton: BoolArray = skeletonize(analysis.weak)  # type: ignore[no-untyped-call]
    intense = skeleton & analysis.intense
    weak_only = skeleton & ~analysis.intense
    kernel = np.ones((line, line), np.uint8)
    for mask, colour in ((weak_only, WEAK_COLOUR), (intense, INTENSE_COLOUR)):
        big = cv2.dilate(_upsample_mask(mask, shape).astype(np.uint8), kernel).astype(bool)
        layer[big] = _rgba(colour, 230)
    return layer


def _scaled_contours(
    analysis: FovAnalysis, canvas: _Canvas, contours: Iterable[npt.NDArray[np.int32]]
) -> list[npt.NDArray[np.int32]]:
    scale_row, scale_col = analysis.image.scale
    factor = np.array([scale_col, scale_row]) * canvas.factor
    return [np.rint((c.astype(np.float64) + 0.5) * factor - 0.5).astype(np.int32) for c in contours]


def _completeness_layer(analysis: FovAnalysis, canvas: _Canvas, line: int) -> npt.NDArray[np.uint8]:
    layer = _blank(canvas.shape)
    if any(cell.ring_radii_um for cell in analysis.result.cells):
        _draw_rings(layer, analysis.result, canvas, line)
        return layer
    # a weak complete membrane whose centre lies inside an intense one is the same 3+ cell: draw it once, red
    inside_intense = sample(analysis.intense_complete.filled, analysis.weak_complete.centres)
    weak_only = [c for c, inside in zip(analysis.weak_complete.contours, inside_intense, strict=True) if not inside]
    cv2.drawContours(
        layer, _scaled_contours(analysis, canvas, weak_only), -1, _rgba(COMPLETE_WEAK_COLOUR), line, cv2.LINE_AA
    )
    cv2.drawContours(
        layer,
        _scaled_contours(analysis, canvas, analysis.intense_complete.contours),
        -1,
        _rgba(INTENSE_COLOUR),
        line,
        cv2.LINE_AA,
    )
    return layer


def _draw_rings(layer: npt.NDArray[np.uint8], result: FovResult, canvas: _Canvas, line: int) -> None:
    """Each cell's ring: the polygon through its rays' membrane points, each side coloured by how stained both
    of its rays are (the lesser of the two), so a stained arc shows exactly where the rays found membrane."""
    cells = [cell for cell in result.cells if cell.ring_radii_um]
    n_rays = len(cells[0].ring_radii_um)
    centres = np.array([(c.row, c.col) for c in cells], dtype=np.float64)
    radii_px = np.array([c.ring_radii_um for c in cells], dtype=np.float64) / result.pixel_size_um
    points_rc = ring_points(centres, radii_px)
    canvas_xy = (
        np.rint(canvas.points(points_rc.reshape(-1, 2))[:, ::-1]).astype(np.int32).reshape(len(cells), n_rays, 2)
    )
    digits = np.frombuffer("".join(c.ring_levels for c in cells).encode("ascii"), dtype=np.uint8)
    levels = (digits - ord("0")).reshape(len(cells), n_rays)  # "0", "1", "2" per ray
    side_level = np.minimum(levels, np.roll(levels, -1, axis=1))
    side_ends = np.roll(canvas_xy, -1, axis=1)
    thin = max(1, line // 2)
    for level, colour, alpha, width in (
        (0, UNSTAINED_COLOUR, 150, thin),
        (1, WEAK_COLOUR, 255, line),
        (2, INTENSE_COLOUR, 255, line),
    ):
        starts = canvas_xy[side_level == level]
        ends = side_ends[side_level == level]
        if len(starts):
            # one (n, 2, 1, 2) array, handed over as views of its two-point segments
            segments = list(np.stack([starts, ends], axis=1).reshape(-1, 2, 1, 2))
            # thin grey sides without antialiasing: a 1-pixel antialiased line would be all fringe
            line_type = cv2.LINE_8 if level == 0 else cv2.LINE_AA
            cv2.polylines(layer, segments, False, _rgba(colour, alpha), width, line_type)


def _region_layer(analysis: FovAnalysis, canvas: _Canvas, line: int) -> npt.NDArray[np.uint8]:
    layer = _blank(canvas.shape)
    # outer borders and holes (lumens, stroma islands): cells in a hole were not counted
    contours, _ = cv2.findContours(analysis.tumour_region.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outlines = [np.asarray(c, dtype=np.int32) for c in contours]
    cv2.drawContours(
        layer, _scaled_contours(analysis, canvas, outlines), -1, _rgba(REGION_COLOUR, 200), line, cv2.LINE_AA
    )
    return layer


def panel_lines(result: FovResult, case: CaseResult | None = None) -> list[tuple[str, RGB]]:
    """The text of the panel, line by line with a colour: what a pathologist reads first comes first."""
    call = result.call
    score = call.score.value if call.score else "n/a"
    lines: list[tuple[str, RGB]] = [(f"FOV  HER2 {score}   {call.status.value}", (255, 255, 255))]
    if case is not None:
        case_score = case.call.score.value if case.call.score else "n/a"
        fovs = f"{case.n_fovs} FOV" + ("" if case.n_fovs == 1 else "s")
        lines.append((f"CASE HER2 {case_score}   {case.call.status.value}   ({fovs})", (255, 255, 255)))
    lines.append((f"{result.counts.total} tumour cells", (230, 230, 230)))
    for her2_class in Her2Score:
        n = result.counts[her2_class]
        lines.append(
            (
                f"{her2_class.value:>2}: {n:5d}  {result.percentages[her2_class.value]:5.1f}%",
                CLASS_COLOURS[her2_class],
            )
        )
    lines.append((call.reason, (230, 230, 230)))
    gastric = call.guideline == Guideline.GASTRIC
    rule = f"{call.guideline.value} ({call.specimen.value})" if gastric else call.guideline.value
    lines.append((f"rule: {rule}, {GUIDELINE_SOURCES[call.guideline]}", (200, 200, 200)))
    if gastric and call.specimen == Specimen.BIOPSY:
        clusters = result.clusters
        lines.append(
            (
                f"largest cohesive clusters: 3+ {clusters.three_plus}, 2+/3+ {clusters.two_plus}, "
                f"1+ or more {clusters.one_plus}",
                (200, 200, 200),
            )
        )
    lines.append(
        (
            f"intense > {result.intense_threshold_od:.2f} OD ({result.intense_threshold_source.value})",
            (200, 200, 200),
        )
    )
    for warning in result.warnings:
        if warning == call.reason:  # "not assessable" is both the reason and a warning: show it once
            continue
        lines.append((f"! {warning}", (255, 190, 60)))
    return lines


def panel_layer(shape: tuple[int, int], result: FovResult, case: CaseResult | None = None) -> npt.NDArray[np.uint8]:
    """A semi-opaque box in the top-left corner with the panel's text, sized to the FOV's width.

    Lines in a class colour are written in white behind a swatch of that colour, which stays legible on the dark
    box; the font shrinks so that the longest line fits the FOV.
    """
    layer = _blank(shape)
    lines = panel_lines(result, case)
    class_colours = set(CLASS_COLOURS.values())
    font_scale = max(0.45, shape[1] / 1920 * 0.75)
    thickness = 1 if font_scale < 0.7 else 2
    (_, text_height), baseline = cv2.getTextSize("Hg", _FONT, font_scale, thickness)
    swatch = text_height + 4
    width = max(cv2.getTextSize(text, _FONT, font_scale, thickness)[0][0] for text, _ in lines) + swatch * 2
    if width > 0.95 * shape[1]:
        font_scale *= 0.95 * shape[1] / width
        thickness = 1
        (_, text_height), baseline = cv2.getTextSize("Hg", _FONT, font_scale, thickness)
        swatch = text_height + 4
        width = max(cv2.getTextSize(text, _FONT, font_scale, thickness)[0][0] for text, _ in lines) + swatch * 2
    step = text_height + baseline + max(4, text_height // 2)
    margin = max(6, text_height // 2)
    box_w = min(shape[1] - 1, width + 2 * margin)
    box_h = min(shape[0] - 1, step * len(lines) + margin)
    layer[:box_h, :box_w] = (20, 20, 20, 210)
    for i, (text, colour) in enumerate(lines):
        baseline_y = margin + text_height + i * step
        x = margin
        if colour in class_colours:
            cv2.rectangle(layer, (x, baseline_y - text_height), (x + swatch - 4, baseline_y), _rgba(colour), cv2.FILLED)
            x += swatch * 2
            colour = (255, 255, 255)
        cv2.putText(layer, text, (x, baseline_y), _FONT, font_scale, _rgba(colour), thickness, cv2.LINE_AA)
    return layer
