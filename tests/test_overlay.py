"""The overlays draw what the analysis found, where it found it: pixel checks against synthetic ground truth."""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from skimage.morphology import skeletonize

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.scoring import FovAnalysis, Her2Score, analyse_fov, score_case
from her2scope.scoring.case import NO_CONTROL_WARNING
from her2scope.scoring.overlay import (
    CLASS_COLOURS,
    COMPLETE_WEAK_COLOUR,
    EXCLUDED_COLOUR,
    INTENSE_COLOUR,
    LAYER_NAMES,
    UNSTAINED_COLOUR,
    WEAK_COLOUR,
    Overlay,
    compose,
    panel_layer,
    panel_lines,
    render_overlay,
)
from her2scope.synthetic import SyntheticCell, SyntheticFov, blank_fov
from tests.helpers.synthetic import CONTOUR_METHOD, PIXEL_SIZE_40X, synthetic_control, synthetic_fov

PIXEL_SIZE_20X = 0.5
SMALL = (540, 960)
FULL = (1080, 1920)
MIX = (("0", 0.25), ("1+", 0.25), ("2+", 0.25), ("3+", 0.25))
#: Nominal radius of a cell marker ring, µm (the overlay draws it at 2.5 µm, at least 4 px).
MARKER_RADIUS_UM = 2.5

Rgba = npt.NDArray[np.uint8]


@cache
def analysed(
    mix: tuple[tuple[str, float], ...],
    pixel_size_um: float = PIXEL_SIZE_40X,
    shape: tuple[int, int] = SMALL,
    seed: int = 5,
    params: ScoringParams | None = None,
) -> tuple[SyntheticFov, FovAnalysis, Overlay]:
    """A synthetic FOV, its analysis (40x: calibrated by the synthetic control) and its overlay, cached."""
    fov = synthetic_fov(mix, 1.0, pixel_size_um, seed, shape)
    control = synthetic_control(params=params) if pixel_size_um == PIXEL_SIZE_40X else None
    analysis = analyse_fov(fov.rgb, pixel_size_um, params, control=control)
    return fov, analysis, render_overlay(analysis)


def painted(layer: Rgba, colour: tuple[int, int, int], alpha: int = 255) -> npt.NDArray[np.bool_]:
    """Pixels of ``layer`` drawn exactly in ``colour`` at ``alpha`` (the cores of lines, not their AA edges)."""
    mask: npt.NDArray[np.bool_] = np.all(layer[:, :, :3] == colour, axis=-1) & (layer[:, :, 3] == alpha)
    return mask


def drawn(layer: Rgba) -> npt.NDArray[np.bool_]:
    return layer[:, :, 3] > 0


def marker_radius_px(pixel_size_um: float) -> float:
    return max(4.0, MARKER_RADIUS_UM / pixel_size_um)


def distance_to(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Distance in px from every pixel to the nearest True pixel of ``mask``."""
    return cv2.distanceTransform(np.where(mask, 0, 1).astype(np.uint8), cv2.DIST_L2, 5)  # type: ignore[return-value]


def boundary(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The pixels of ``mask`` next to a pixel outside it or to the edge of the image."""
    m = mask.astype(np.uint8)
    inner = cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m - inner).astype(bool)


def ellipse_radius(points_rc: npt.NDArray[np.float64], cells: tuple[SyntheticCell, ...], px: float) -> np.ndarray:
    """Per point, its normalised elliptic radius in the nearest true cell (1.0 on the cell outline)."""
    centres = np.array([(c.row, c.col) for c in cells])
    semi = np.array([(c.major_um / 2.0 / px, c.minor_um / 2.0 / px) for c in cells])
    theta = np.radians([c.angle_deg for c in cells])
    d_row = points_rc[:, None, 0] - centres[None, :, 0]
    d_col = points_rc[:, None, 1] - centres[None, :, 1]
    # OpenCV's angle turns the major axis from +col towards +row
    along = d_col * np.cos(theta) + d_row * np.sin(theta)
    across = -d_col * np.sin(theta) + d_row * np.cos(theta)
    rho = np.hypot(along / semi[None, :, 0], across / semi[None, :, 1])
    return rho.min(axis=1)  # type: ignore[no-any-return]


def to_analysis_pixels(analysis: FovAnalysis, mask_fov: npt.NDArray[np.bool_]) -> tuple[np.ndarray, np.ndarray]:
    """Analysis (row, col) index arrays of the FOV pixels in ``mask_fov``."""
    rc = analysis.image.from_fov(np.argwhere(mask_fov).astype(np.float64))
    rows, cols = analysis.weak.shape
    return np.clip(np.rint(rc[:, 0]), 0, rows - 1).astype(int), np.clip(np.rint(rc[:, 1]), 0, cols - 1).astype(int)


def grow(mask: npt.NDArray[np.bool_], px: int = 1) -> npt.NDArray[np.bool_]:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)).astype(bool)


# ------------------------------------------------------------------------------------------------ all layers


@pytest.mark.parametrize(
    ("pixel_size_um", "shape", "scale"),
    [
        (PIXEL_SIZE_40X, SMALL, 2.0),  # 40x: analysed at half resolution
        (PIXEL_SIZE_20X, SMALL, 1.0),  # 20x: analysed as is
        (PIXEL_SIZE_40X, (301, 457), 2.0),  # odd sizes do not halve exactly
    ],
)
@pytest.mark.e2e
def test_every_layer_is_rgba_in_fov_pixels(pixel_size_um: float, shape: tuple[int, int], scale: float) -> None:
    fov, analysis, overlay = analysed(MIX, pixel_size_um, shape)
    assert analysis.image.scale == pytest.approx((scale, scale), rel=0.01)
    assert set(overlay.layers) == set(LAYER_NAMES)
    for name, layer in overlay.layers.items():
        assert layer.shape == (*shape, 4), name
        assert layer.dtype == np.uint8, name
        assert drawn(layer).any(), f"layer {name} is empty on a mixed FOV"
    assert overlay.compose(fov.rgb).shape == fov.rgb.shape


# ----------------------------------------------------------------------------------------------------- cells


@pytest.mark.parametrize("pixel_size_um", [PIXEL_SIZE_40X, PIXEL_SIZE_20X])
@pytest.mark.e2e
def test_contour_method_draws_each_cell_as_a_ring_of_its_class_colour(pixel_size_um: float) -> None:
    _, analysis, overlay = analysed(MIX, pixel_size_um, params=CONTOUR_METHOD)
    layer = overlay.layers["cells"]
    cells = analysis.result.cells
    assert {c.her2_class for c in cells} == set(Her2Score)
    radius = marker_radius_px(pixel_size_um)
    angles = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
    radii = np.arange(0.6 * radius, 1.4 * radius + 0.5, 0.5)
    rows, cols = layer.shape[:2]
    ringed = []
    hollow = []
    in_colour = {her2_class: painted(layer, colour) for her2_class, colour in CLASS_COLOURS.items()}
    for cell in cells:
        r = np.clip(np.rint(cell.row + np.outer(radii, np.sin(angles))).astype(int), 0, rows - 1)
        c = np.clip(np.rint(cell.col + np.outer(radii, np.cos(angles))).astype(int), 0, cols - 1)
        on_ray = in_colour[cell.her2_class][r, c].any(axis=0)  # per angle: the class colour somewhere in the annulus
        ringed.append(on_ray.mean() >= 0.9)
        hollow.append(layer[round(cell.row), round(cell.col), 3] == 0)  # a ring, not a disc over the nucleus
    assert np.mean(ringed) >= 0.95, f"{len(ringed) - sum(ringed)} of {len(cells)} cells lack a ring of their colour"
    assert np.mean(hollow) >= 0.95


@pytest.mark.parametrize("pixel_size_um", [PIXEL_SIZE_40X, PIXEL_SIZE_20X])
@pytest.mark.e2e
def test_each_cell_is_a_dot_of_its_class_colour_on_its_nucleus(pixel_size_um: float) -> None:
    _, analysis, overlay = analysed(MIX, pixel_size_um)
    layer = overlay.layers["cells"]
    cells = analysis.result.cells
    assert {c.her2_class for c in cells} == set(Her2Score)
    in_colour = {her2_class: painted(layer, colour) for her2_class, colour in CLASS_COLOURS.items()}
    dotted = [in_colour[cell.her2_class][round(cell.row), round(cell.col)] for cell in cells]
    assert np.mean(dotted) >= 0.95, f"{len(dotted) - sum(dotted)} of {len(cells)} cells lack a dot of their colour"


@pytest.mark.parametrize(
    ("her2_class", "stained_least", "stained_most"),
    [("3+", 0.8, 1.0), ("2+", 0.8, 1.0), ("1+", 0.15, 0.75), ("0", 0.0, 0.02)],
)
@pytest.mark.e2e
def test_rings_are_coloured_where_the_membrane_is_stained(
    her2_class: str, stained_least: float, stained_most: float
) -> None:
    """Each side of each cell's ring is drawn in the colour of how stained its rays found the membrane (red
    intense, yellow weak, grey none); the stained share follows the true membrane (whole for 2+/3+, arcs for 1+,
    none for 0), and the stained sides lie on the true membrane ring."""
    fov, analysis, overlay = analysed(((her2_class, 1.0),))
    layer = overlay.layers["completeness"]
    colours = {
        0: painted(layer, UNSTAINED_COLOUR, 150),
        1: painted(layer, WEAK_COLOUR),
        2: painted(layer, INTENSE_COLOUR),
    }
    colours = {level: grow(mask) for level, mask in colours.items()}
    agree, stained, total = 0, 0, 0
    midpoints = []
    for cell in analysis.result.cells:
        levels = np.array([int(ch) for ch in cell.ring_levels])
        n = len(levels)
        angles = 2.0 * np.pi * np.arange(n) / n
        radius = np.asarray(cell.ring_radii_um) / fov.pixel_size_um
        rows, cols = cell.row + radius * np.sin(angles), cell.col + radius * np.cos(angles)
        mid_r, mid_c = (rows + np.roll(rows, -1)) / 2.0, (cols + np.roll(cols, -1)) / 2.0
        side = np.minimum(levels, np.roll(levels, -1))
        for r, c, level in zip(np.rint(mid_r).astype(int), np.rint(mid_c).astype(int), side, strict=True):
            if not (0 <= r < layer.shape[0] and 0 <= c < layer.shape[1]):
                continue
            total += 1
            stained += level > 0
            agree += bool(colours[int(level)][r, c])
            if level > 0:
                midpoints.append((r, c))
    assert agree >= 0.9 * total, f"{total - agree} of {total} ring sides not drawn in their level's colour"
    assert stained_least <= stained / total <= stained_most, stained / total
    if midpoints:
        rho = ellipse_radius(np.array(midpoints, dtype=np.float64), fov.cells, fov.pixel_size_um)
        assert np.mean((rho > 0.7) & (rho < 1.3)) >= 0.9, np.percentile(rho, [5, 50, 95])
    red = colours[2].sum()
    if her2_class == "3+":
        assert red > 1000
    else:
        assert red <= 0.05 * max(1, colours[1].sum())


@pytest.mark.parametrize("pixel_size_um", [PIXEL_SIZE_40X, PIXEL_SIZE_20X])
def test_no_marker_far_from_a_cell(pixel_size_um: float) -> None:
    _, analysis, overlay = analysed(MIX, pixel_size_um)
    layer = overlay.layers["cells"]
    seeds = np.zeros(layer.shape[:2], dtype=bool)
    points = [(c.row, c.col) for c in analysis.result.cells] + [tuple(p) for p in analysis.excluded_nuclei_rc]
    for row, col in points:
        seeds[round(row), round(col)] = True
    reach = 2.0 * marker_radius_px(pixel_size_um) + 3.0  # ring, its dark halo and antialiasing
    far = distance_to(seeds) > reach
    assert not (drawn(layer) & far).any()
    for her2_class, colour in CLASS_COLOURS.items():
        own = np.zeros_like(seeds)
        for cell in analysis.result.cells:
            if cell.her2_class == her2_class:
                own[round(cell.row), round(cell.col)] = True
        # a class colour appears only around cells of that class (1+ yellow is not confused with others)
        assert not (painted(layer, colour) & (distance_to(own) > reach)).any(), her2_class


def test_excluded_nuclei_are_grey_crosses() -> None:
    _, analysis, _ = analysed(MIX)
    arm = max(3, round(1.2 / PIXEL_SIZE_40X))
    excluded = np.array([[60.0, 80.0], [300.0, 500.0]])
    overlay = render_overlay(dataclasses.replace(analysis, excluded_nuclei_rc=excluded))
    layer = overlay.layers["cells"]
    grey = painted(layer, EXCLUDED_COLOUR, 220)
    for row, col in excluded.astype(int):
        half = arm // 2
        assert grey[row, col]
        for d_row, d_col in ((-half, 0), (half, 0), (0, -half), (0, half)):  # the arms ...
            assert grey[row + d_row, col + d_col]
        for d_row, d_col in ((-half, -half), (half, half), (-half, half), (half, -half)):  # ... no diagonals
            assert not grey[row + d_row, col + d_col]
    assert not (grey & (distance_to(grey_seeds(excluded, layer.shape[:2])) > 1.5 * arm)).any()


def grey_seeds(points_rc: np.ndarray, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    seeds = np.zeros(shape[:2], dtype=bool)
    for row, col in points_rc.astype(int):
        seeds[row, col] = True
    return seeds


# ---------------------------------------------------------------------------------------------- completeness


@pytest.mark.e2e
def test_intense_complete_contours_lie_on_the_true_membranes() -> None:
    fov, _, overlay = analysed((("3+", 1.0),), params=CONTOUR_METHOD)
    layer = overlay.layers["completeness"]
    red = painted(layer, INTENSE_COLOUR)
    green = painted(layer, COMPLETE_WEAK_COLOUR)
    assert red.sum() > 1000
    assert green.sum() <= 0.02 * red.sum(), "a 3+ cell is drawn green as well as red"
    rho = ellipse_radius(np.argwhere(red).astype(np.float64), fov.cells, fov.pixel_size_um)
    # the contour runs along the inner edge of the 1.25 µm membrane ring of a ~12 µm cell: rho ~0.9
    assert np.mean((rho > 0.7) & (rho < 1.15)) >= 0.95, np.percentile(rho, [1, 5, 50, 95, 99])


@pytest.mark.parametrize(("her2_class", "expect"), [("2+", "green"), ("1+", "none")])
@pytest.mark.e2e
def test_weak_complete_contours_only_on_complete_weak_membranes(her2_class: str, expect: str) -> None:
    fov, _, overlay = analysed(((her2_class, 1.0),), params=CONTOUR_METHOD)
    layer = overlay.layers["completeness"]
    red, green = painted(layer, INTENSE_COLOUR).sum(), painted(layer, COMPLETE_WEAK_COLOUR).sum()
    if expect == "green":
        assert green > 1000
        assert red <= 0.02 * green
        rho = ellipse_radius(np.argwhere(painted(layer, COMPLETE_WEAK_COLOUR)).astype(float), fov.cells, 0.25)
        assert np.mean((rho > 0.7) & (rho < 1.15)) >= 0.95
    else:  # incomplete membranes enclose nothing
        assert red + green <= 200, (red, green)


@pytest.mark.parametrize("pixel_size_um", [PIXEL_SIZE_40X, PIXEL_SIZE_20X])
def test_intense_contours_sit_on_dark_brown_pixels_of_the_image(pixel_size_um: float) -> None:
    """Catches contours scaled or shifted wrongly on their way from analysis to FOV pixels."""
    fov, _, overlay = analysed((("3+", 1.0),), pixel_size_um)
    red = painted(overlay.layers["completeness"], INTENSE_COLOUR)
    blue = fov.rgb[:, :, 2]  # DAB absorbs blue most: membranes are dark in the blue channel
    assert red.sum() > 500
    assert np.median(blue[red]) < 0.7 * np.median(blue[fov.tumour_mask])
    assert np.mean(blue[red] < 120) >= 0.6


# ------------------------------------------------------------------------------------------------- intensity


def test_intensity_skeleton_is_red_where_intense_and_yellow_where_weak_only() -> None:
    _, analysis, overlay = analysed(MIX)
    layer = overlay.layers["intensity"]
    red, yellow = painted(layer, INTENSE_COLOUR, 230), painted(layer, WEAK_COLOUR, 230)
    assert red.any()
    assert yellow.any()
    assert not (drawn(layer) & ~red & ~yellow).any(), "the skeleton is drawn in other colours"
    near_intense = grow(analysis.intense)
    near_weak_only = grow(analysis.weak & ~analysis.intense)
    assert np.mean(near_intense[to_analysis_pixels(analysis, red)]) >= 0.99
    assert np.mean(near_weak_only[to_analysis_pixels(analysis, yellow)]) >= 0.99
    # and every intense skeleton pixel is drawn red, where it is
    skeleton = skeletonize(analysis.weak) & analysis.intense  # type: ignore[no-untyped-call]
    at = np.rint(analysis.image.to_fov(np.argwhere(skeleton).astype(np.float64))).astype(int)
    assert np.mean(red[at[:, 0], at[:, 1]]) >= 0.99


@pytest.mark.parametrize(("her2_class", "least", "most"), [("3+", 0.9, 1.0), ("2+", 0.0, 0.3), ("1+", 0.0, 0.05)])
def test_share_of_red_in_the_skeleton_follows_the_class(her2_class: str, least: float, most: float) -> None:
    _, _, overlay = analysed(((her2_class, 1.0),))
    layer = overlay.layers["intensity"]
    red, yellow = painted(layer, INTENSE_COLOUR, 230).sum(), painted(layer, WEAK_COLOUR, 230).sum()
    assert red + yellow > 1000
    assert least <= red / (red + yellow) <= most


# ---------------------------------------------------------------------------------------------------- region


def test_contour_method_region_outline_follows_the_tumour_nests() -> None:
    fov, analysis, overlay = analysed(MIX, params=CONTOUR_METHOD)
    outline = drawn(overlay.layers["region"])
    assert outline.any()
    # near the true nest outline (the counting region has a margin and is computed on a 2 µm grid) ...
    to_truth = distance_to(boundary(fov.tumour_mask))[outline] * fov.pixel_size_um
    assert np.mean(to_truth <= 10.0) >= 0.95, np.percentile(to_truth, [50, 95, 100])
    # ... and on the boundary of the region the cells were counted in
    region = cv2.resize(analysis.tumour_region.astype(np.uint8), SMALL[::-1], interpolation=cv2.INTER_NEAREST).astype(
        bool
    )
    assert distance_to(boundary(region))[outline].max() <= 4.0


def test_region_outline_includes_holes() -> None:
    _, analysis, _ = analysed(MIX)
    rows, cols = analysis.tumour_region.shape
    ring = np.zeros((rows, cols), dtype=np.uint8)
    cv2.circle(ring, (cols // 2, rows // 2), 120, 1, cv2.FILLED)
    cv2.circle(ring, (cols // 2, rows // 2), 50, 0, cv2.FILLED)  # a lumen: no cells are counted in it
    outline = drawn(render_overlay(dataclasses.replace(analysis, tumour_region=ring.astype(bool))).layers["region"])
    centre = np.array(SMALL) / 2.0
    distance = np.hypot(*(np.argwhere(outline) - centre).T)
    assert np.any(np.abs(distance - 100) < 4), "the lumen's border is not drawn"
    assert np.any(np.abs(distance - 240) < 4)
    assert np.all((np.abs(distance - 100) < 6) | (np.abs(distance - 240) < 6))


# ----------------------------------------------------------------------------------------------------- panel


@pytest.mark.e2e
def test_panel_lines_state_score_counts_threshold_and_case() -> None:
    _, analysis, _ = analysed(MIX, shape=FULL, seed=8)
    result = analysis.result
    assert result.call.score is not None
    texts = [text for text, _ in panel_lines(result)]
    assert texts[0].startswith(f"FOV  HER2 {result.call.score.value}   {result.call.status.value}")
    assert result.call.reason in texts
    assert not any(text.startswith("CASE") for text in texts)
    for her2_class in Her2Score:
        line = next(text for text in texts if text.lstrip().startswith(f"{her2_class.value}:"))
        assert f" {result.counts[her2_class]} " in f"{line} "
    assert f"{result.counts.total} tumour cells" in texts
    assert any("(positive control)" in text and f"{result.intense_threshold_od:.2f}" in text for text in texts)
    assert not any(text.startswith("!") for text in texts)

    case = score_case([result, result], CaseRule())
    with_case = [text for text, _ in panel_lines(result, case)]
    assert case.call.score is not None
    assert with_case[1].startswith(f"CASE HER2 {case.call.score.value}")
    assert "(2 FOVs)" in with_case[1]


@pytest.mark.e2e
def test_panel_is_an_opaque_box_top_left_with_coloured_text() -> None:
    _, analysis, _ = analysed(MIX, shape=FULL, seed=8)
    shape = (1080, 1920)
    layer = panel_layer(shape, analysis.result, score_case([analysis.result], CaseRule()))
    box = drawn(layer)
    rows, cols = np.nonzero(box)
    assert rows.min() == 0 and cols.min() == 0
    assert layer[2, 2, 3] >= 180, "the box must hide the tissue enough for the text to be read"
    assert rows.max() < shape[0] / 2 and cols.max() < shape[1] / 2, "the panel covers most of the field"
    assert box[: rows.max() + 1, : cols.max() + 1].all(), "not a solid box"
    inside = layer[: rows.max() + 1, : cols.max() + 1]
    for her2_class, colour in CLASS_COLOURS.items():
        assert painted(inside, colour).sum() > 20, f"no legible {her2_class} line"
    white = np.argwhere(painted(inside, (255, 255, 255)))
    zero = np.argwhere(painted(inside, CLASS_COLOURS[Her2Score.ZERO]))
    assert white[:, 0].min() < zero[:, 0].min(), "the score must come before the counts"
    assert painted(inside, (255, 190, 60)).sum() == 0  # no warnings with a control


def test_panel_shows_warnings_once() -> None:
    _, analysis, _ = analysed(MIX, PIXEL_SIZE_20X)  # scored without a control
    texts = [text for text, _ in panel_lines(analysis.result)]
    assert f"! {NO_CONTROL_WARNING}" in texts
    assert any("(default)" in text for text in texts)
    layer = panel_layer((1080, 1920), analysis.result)
    assert painted(layer, (255, 190, 60)).sum() > 20

    blank = analyse_fov(blank_fov((200, 300)), PIXEL_SIZE_40X)
    texts = [text for text, _ in panel_lines(blank.result)]
    assert texts[0].endswith("not assessable")
    reason = blank.result.call.reason
    assert sum(reason in text for text in texts) == 1, texts


# --------------------------------------------------------------------------------------------------- compose


def test_compose_leaves_the_image_alone_and_shows_only_what_is_asked() -> None:
    fov, _, overlay = analysed(MIX)
    before = fov.rgb.copy()
    everything = overlay.compose(fov.rgb)
    assert np.array_equal(fov.rgb, before)
    assert everything is not fov.rgb
    assert not np.array_equal(everything, fov.rgb)
    assert np.array_equal(everything, compose(fov.rgb, [overlay.layers[name] for name in LAYER_NAMES]))
    nothing = overlay.compose(fov.rgb, [])
    assert np.array_equal(nothing, fov.rgb)
    assert nothing is not fov.rgb
    cells_only = overlay.compose(fov.rgb, ["cells"])
    untouched = ~drawn(overlay.layers["cells"])
    assert np.array_equal(cells_only[untouched], fov.rgb[untouched])
    opaque = overlay.layers["cells"][:, :, 3] == 255
    assert np.array_equal(cells_only[opaque], overlay.layers["cells"][opaque][:, :3])


def test_compose_draws_later_layers_on_top() -> None:
    fov, _, overlay = analysed(MIX, params=CONTOUR_METHOD)
    skeleton, contours = overlay.layers["intensity"], overlay.layers["completeness"]
    # where an opaque contour crosses the (slightly transparent) skeleton in another colour
    both = drawn(skeleton) & (contours[:, :, 3] == 255) & np.any(skeleton[:, :, :3] != contours[:, :, :3], -1)
    assert both.sum() > 100
    contour_on_top = overlay.compose(fov.rgb, ["intensity", "completeness"])[both]
    skeleton_on_top = overlay.compose(fov.rgb, ["completeness", "intensity"])[both]
    assert np.array_equal(contour_on_top, contours[both][:, :3])
    assert np.all(np.any(skeleton_on_top != contour_on_top, axis=-1))


def test_compose_rejects_mismatched_layers_and_unknown_names() -> None:
    fov, _, overlay = analysed(MIX)
    with pytest.raises(ValueError, match="does not match"):
        overlay.compose(fov.rgb[:-1])
    with pytest.raises(ValueError, match="does not match"):
        compose(fov.rgb, [overlay.layers["cells"][:, :-2]])
    with pytest.raises(ValueError, match="unknown overlay layer"):
        overlay.compose(fov.rgb, ["cells", "cell"])


def test_blank_fov_draws_no_cells() -> None:
    image = blank_fov((200, 300))
    analysis = analyse_fov(image, PIXEL_SIZE_40X)
    overlay = render_overlay(analysis)
    assert analysis.result.cells == ()
    for name in ("cells", "intensity", "completeness", "region"):
        assert overlay.layers[name].shape == (200, 300, 4)
        assert not drawn(overlay.layers[name]).any(), name
    assert drawn(overlay.layers["panel"]).any()
    assert math.isclose(float(overlay.compose(image, ["cells"]).mean()), float(image.mean()))
