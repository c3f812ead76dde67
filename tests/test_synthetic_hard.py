"""Tests of the hard synthetic fields (her2scope.synthetic): ring gaps, glands, guideline truth, non-tumour fields."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from her2scope.synthetic import (
    FIBROBLAST_LENGTH_UM,
    FIBROBLAST_WIDTH_UM,
    GLASS_LEVEL,
    HARD_VIGNETTE,
    HER2_CLASSES,
    LYMPHOCYTE_DIAMETER_UM,
    LYMPHOCYTE_H_OD,
    MEMBRANE_PATTERNS,
    MUSCLE_NUCLEUS_LENGTH_UM,
    MUSCLE_NUCLEUS_WIDTH_UM,
    NUCLEUS_OVERLAP_MAX,
    PALE_NUCLEUS_H_OD,
    RING_GAP_UM,
    SyntheticCell,
    SyntheticFov,
    render_fov,
    render_hard_control,
    render_hard_fov,
    stain_matrix,
    truth_class,
    vignette_gain,
)

SHAPE = (1080, 1920)
PX = 0.25
MIX: Mapping[str, float] = {"0": 0.2, "1+": 0.3, "2+": 0.3, "3+": 0.2}


# ------------------------------------------------------------------------------------------------ helpers


def deconvolve(fov: SyntheticFov) -> NDArray[np.float64]:
    """(rows, cols, 3) stain concentrations (H, DAB, residual) in OD, the field's known illumination divided out."""
    light = GLASS_LEVEL * vignette_gain(fov.rgb.shape[:2], fov.vignette, fov.vignette_centre)
    od = -np.log10(np.maximum(fov.rgb.astype(np.float64), 1.0) / light[..., None])
    return np.asarray((od.reshape(-1, 3) @ np.linalg.inv(stain_matrix())).reshape(fov.rgb.shape), dtype=np.float64)


def local_max(image: NDArray[np.float64]) -> NDArray[np.float64]:
    """Maximum over each pixel's 3x3 neighbourhood (a sample within 1 px of the outline)."""
    return np.asarray(cv2.dilate(image.astype(np.float32), np.ones((3, 3), np.uint8)), dtype=np.float64)


def ellipse_point(cell: SyntheticCell, t_deg: NDArray[np.float64], px: float) -> tuple[Any, Any]:
    """(rows, cols) of the ellipse outline at parameter angles ``t_deg`` (cv2.ellipse convention)."""
    t = np.radians(t_deg)
    a, b = cell.major_um / 2.0 / px, cell.minor_um / 2.0 / px
    phi = math.radians(cell.angle_deg)
    dc = a * np.cos(t) * math.cos(phi) - b * np.sin(t) * math.sin(phi)
    dr = a * np.cos(t) * math.sin(phi) + b * np.sin(t) * math.cos(phi)
    return np.round(cell.row + dr).astype(int), np.round(cell.col + dc).astype(int)


def polygon_point(cell: SyntheticCell, position_deg: NDArray[np.float64]) -> tuple[Any, Any]:
    """(rows, cols) of a gland cell's outline polygon at 360 x perimeter fractions from its first vertex."""
    pts = np.asarray(cell.outline, dtype=np.float64)
    closed = np.vstack([pts, pts[:1]])
    cumulative = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    s = (np.asarray(position_deg) % 360.0) / 360.0 * cumulative[-1]
    rows = np.interp(s, cumulative, closed[:, 0])
    cols = np.interp(s, cumulative, closed[:, 1])
    return np.round(rows).astype(int), np.round(cols).astype(int)


def side_positions(cell: SyntheticCell) -> NDArray[np.float64]:
    """Positions (degrees of the perimeter) of the outline's five vertices and of its end (360)."""
    pts = np.asarray(cell.outline, dtype=np.float64)
    closed = np.vstack([pts, pts[:1]])
    cumulative = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(closed, axis=0).T))])
    return np.asarray(cumulative / cumulative[-1] * 360.0, dtype=np.float64)


def nucleus_mean_h(h: NDArray[np.float64], cell: SyntheticCell, px: float) -> float:
    """Mean H OD over the central disc (half the equal-area radius) of a cell's nucleus."""
    radius = max(1, round(0.25 * cell.nucleus_diameter_um / px))
    disc = np.zeros(h.shape, dtype=np.uint8)
    cv2.circle(disc, (round(cell.nucleus_col), round(cell.nucleus_row)), radius, 1, -1)
    return float(h[disc > 0].mean())


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hard() -> SyntheticFov:
    return render_hard_fov(SHAPE, PX, MIX, seed=0, gland_fraction=0.5)


@pytest.fixture(scope="module")
def hard_dab(hard: SyntheticFov) -> NDArray[np.float64]:
    return local_max(deconvolve(hard)[..., 1])


# ------------------------------------------------------------------------------------------- truth rules


@pytest.mark.parametrize(
    ("pattern", "intensity", "breast", "gastric"),
    [
        ("complete", "3+", "3+", "3+"),
        ("complete", "2+", "2+", "2+"),
        ("complete", "1+", "1+", "1+"),
        ("basolateral", "3+", "2+", "3+"),
        ("basolateral", "2+", "2+", "2+"),
        ("basolateral", "1+", "1+", "1+"),
        ("lateral", "3+", "2+", "3+"),
        ("lateral", "2+", "2+", "2+"),
        ("lateral", "1+", "1+", "1+"),
        ("partial", "1+", "1+", "1+"),
        ("partial", "3+", "1+", "1+"),
        ("none", "0", "0", "0"),
    ],
)
def test_truth_class_per_guideline(pattern: str, intensity: str, breast: str, gastric: str) -> None:
    assert truth_class(pattern, intensity, "breast") == breast
    assert truth_class(pattern, intensity, "gastric") == gastric
    cell = SyntheticCell(
        row=0.0,
        col=0.0,
        nucleus_row=0.0,
        nucleus_col=0.0,
        diameter_um=12.0,
        her2_class=breast,
        membrane_complete=pattern == "complete",
        membrane_dab_od=0.5,
        membrane_pattern=pattern,
        membrane_intensity=intensity,
    )
    assert cell.truth_class("breast") == breast
    assert cell.truth_class("gastric") == gastric
    assert cell.truth_class() == breast


def test_truth_class_rejects_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="guideline"):
        truth_class("complete", "3+", "lung")
    with pytest.raises(ValueError, match="membrane_pattern"):
        truth_class("circular", "3+")
    with pytest.raises(ValueError, match="disagree"):
        truth_class("lateral", "0")
    with pytest.raises(ValueError, match="disagree"):
        truth_class("none", "2+")


def test_old_cells_keep_their_meaning() -> None:
    """Cells built the old way (no pattern) and today's fields: pattern from the class, same truth for both."""
    fov = render_fov((256, 384), 0.5, {"0": 0.25, "1+": 0.25, "2+": 0.25, "3+": 0.25}, seed=3)
    expected = {"0": "none", "1+": "partial", "2+": "complete", "3+": "complete"}
    for cell in fov.cells:
        assert cell.membrane_pattern == expected[cell.her2_class]
        assert cell.membrane_intensity == cell.her2_class
        assert cell.truth_class("breast") == cell.truth_class("gastric") == cell.her2_class
        assert cell.gland_id == -1 and cell.outline == ()
        assert 0.5 <= cell.nucleus_h_od <= 0.8
    assert fov.counts("gastric") == fov.counts("breast") == fov.counts()
    assert fov.vignette == 0.0 and fov.tissue == "tumour"
    assert {n.kind for n in fov.other_nuclei} == {"fibroblast"}
    bare = SyntheticCell(0.0, 0.0, 0.0, 0.0, 12.0, "1+", False, 0.2)
    assert (bare.membrane_pattern, bare.membrane_intensity) == ("partial", "1+")


# ----------------------------------------------------------------------------------- determinism and counts


def test_hard_fields_are_deterministic() -> None:
    a = render_hard_fov((360, 640), PX, MIX, seed=8)
    b = render_hard_fov((360, 640), PX, MIX, seed=8)
    c = render_hard_fov((360, 640), PX, MIX, seed=9)
    assert a.rgb.tobytes() == b.rgb.tobytes()
    assert a.cells == b.cells and a.other_nuclei == b.other_nuclei
    assert a.vignette_centre == b.vignette_centre
    assert a.rgb.tobytes() != c.rgb.tobytes()
    d = render_hard_control((360, 640), PX, seed=8)
    e = render_hard_control((360, 640), PX, seed=8)
    assert d.rgb.tobytes() == e.rgb.tobytes() and d.cells == e.cells
    for tissue in ("stroma", "muscle", "lymphocytes", "glass"):
        f = render_hard_fov((256, 384), PX, seed=8, tissue=tissue)
        g = render_hard_fov((256, 384), PX, seed=8, tissue=tissue)
        assert f.rgb.tobytes() == g.rgb.tobytes() and f.other_nuclei == g.other_nuclei


@pytest.mark.parametrize("guideline", ["breast", "gastric"])
@pytest.mark.e2e
def test_counts_follow_the_fractions_under_their_guideline(hard: SyntheticFov, guideline: str) -> None:
    # Gastric: mostly glands, so that some 3+ cells are glandular (basolateral/lateral intense, breast 2+).
    fov = (
        hard
        if guideline == "breast"
        else render_hard_fov(SHAPE, PX, MIX, seed=0, gland_fraction=0.9, guideline=guideline)
    )
    counts = fov.counts(guideline)
    total = len(fov.cells)
    assert total > 150
    for her2_class in HER2_CLASSES:
        assert abs(counts[her2_class] - MIX[her2_class] * total) <= 1.0
    # The other guideline differs only by intense basolateral/lateral cells: breast 2+, gastric 3+.
    breast, gastric = fov.counts("breast"), fov.counts("gastric")
    moved = sum(c.membrane_pattern in ("basolateral", "lateral") and c.membrane_intensity == "3+" for c in fov.cells)
    assert moved > 5
    assert breast["0"] == gastric["0"] and breast["1+"] == gastric["1+"]
    assert gastric["3+"] - breast["3+"] == breast["2+"] - gastric["2+"] == moved


@pytest.mark.e2e
def test_gland_cells_are_columnar_around_a_lumen(hard: SyntheticFov, hard_dab: NDArray[np.float64]) -> None:
    gland_cells = [c for c in hard.cells if c.gland_id >= 0]
    assert len(gland_cells) > 60
    assert {c.membrane_pattern for c in hard.cells} == set(MEMBRANE_PATTERNS)
    for cell in gland_cells:
        assert len(cell.outline) == 5
        assert 1.6 <= cell.major_um / cell.minor_um <= 3.5  # ~2–3:1 columnar
        assert cell.her2_class in HER2_CLASSES
        assert cell.membrane_pattern != "partial"
        # Nucleus towards the basal side: farther from the lumen (the apical midpoint, vertex 0) than the centre.
        apical = np.array(cell.outline[0])
        to_nucleus = np.hypot(*(np.array([cell.nucleus_row, cell.nucleus_col]) - apical))
        to_centre = np.hypot(*(np.array([cell.row, cell.col]) - apical))
        assert to_nucleus > to_centre
        # The apical midpoint faces the lumen, which is glass (bright, unstained) just beyond it.
        direction = math.radians(cell.angle_deg)
        r = round(apical[0] + 2.0 / PX * math.sin(direction))
        c = round(apical[1] + 2.0 / PX * math.cos(direction))
        assert hard.rgb[r, c].min() > 0.75 * GLASS_LEVEL
        assert not hard.tumour_mask[r, c]


# ---------------------------------------------------------------------------------------------- membranes


def test_complete_rings_have_small_gaps_but_stay_complete() -> None:
    fov = render_hard_control((540, 960), PX, seed=5)
    dab = local_max(deconvolve(fov)[..., 1])
    assert len(fov.cells) > 80
    coverage, dips = [], []
    for cell in fov.cells:
        assert cell.membrane_complete and cell.truth_class("breast") == cell.truth_class("gastric") == "3+"
        arcs = cell.membrane_arcs
        assert 1 <= len(arcs) <= 3
        assert 0.85 <= cell.membrane_coverage < 1.0
        t = np.linspace(0.0, 360.0, 720, endpoint=False)
        stained = dab[ellipse_point(cell, t, PX)] > 0.5 * cell.membrane_dab_od
        coverage.append(stained.mean())
        # The middle of each gap of at least 1 µm is visibly paler than the ring.
        perimeter_um = math.pi * (cell.major_um + cell.minor_um) / 2.0
        for k, (_, end) in enumerate(arcs):
            gap_deg = (arcs[(k + 1) % len(arcs)][0] - end) % 360.0
            assert gap_deg > 0
            assert gap_deg / 360.0 * perimeter_um < 1.6 * RING_GAP_UM[1]  # roughly; the outline is an ellipse
            if gap_deg / 360.0 * perimeter_um >= 1.0:
                middle = np.array([end + 0.5 * gap_deg])
                dips.append(float(dab[ellipse_point(cell, middle, PX)][0]) / cell.membrane_dab_od)
    assert np.min(coverage) >= 0.8
    assert np.median(coverage) >= 0.85
    assert np.median(coverage) < 0.99  # the gaps are there
    assert len(dips) > 30
    assert np.median(dips) < 0.5


@pytest.mark.e2e
def test_lateral_and_basolateral_membranes_lie_on_their_sides(
    hard: SyntheticFov, hard_dab: NDArray[np.float64]
) -> None:
    sides: dict[str, dict[str, list[float]]] = {}
    for cell in hard.cells:
        if cell.membrane_pattern not in ("basolateral", "lateral"):
            continue
        v = side_positions(cell)  # apical midpoint, apical corner, basal corner, basal corner, apical corner, end
        od = cell.membrane_dab_od
        probes = {
            "apical": np.array([v[0], v[0] + 0.4 * (v[1] - v[0]), v[4] + 0.6 * (v[5] - v[4])]),
            "lateral": np.array([0.5 * (v[1] + v[2]), 0.5 * (v[3] + v[4])]),
            "basal": np.array([0.5 * (v[2] + v[3])]),
        }
        measured = sides.setdefault(cell.membrane_pattern, {})
        for side, positions in probes.items():
            measured.setdefault(side, []).append(float(np.median(hard_dab[polygon_point(cell, positions)])) / od)
        # The truth arcs say the same: lateral sides stained, apical side not.
        assert all(v[1] - 1e-6 <= begin and end <= v[4] + 1e-6 for begin, end in cell.membrane_arcs)
    for pattern in ("basolateral", "lateral"):
        assert len(sides[pattern]["lateral"]) > 10
        assert np.median(sides[pattern]["lateral"]) > 0.6
        assert np.median(sides[pattern]["apical"]) < 0.3
        assert np.quantile(sides[pattern]["apical"], 0.9) < 0.5
    assert np.median(sides["basolateral"]["basal"]) > 0.6
    assert np.median(sides["lateral"]["basal"]) < 0.3


# ------------------------------------------------------------------------------------------------- nuclei


@pytest.mark.e2e
def test_pale_nuclei_have_the_requested_h_od() -> None:
    fov = render_fov(
        (720, 1280), PX, MIX, pale_nucleus_fraction=1.0, blur_um=0.0, noise_sigma=0.0, nucleus_diameter_um=7.0, seed=6
    )
    h = deconvolve(fov)[..., 0]
    assert len(fov.cells) > 100
    measured = np.array([nucleus_mean_h(h, c, PX) for c in fov.cells])
    drawn = np.array([c.nucleus_h_od for c in fov.cells])
    assert np.all((drawn >= PALE_NUCLEUS_H_OD[0]) & (drawn <= PALE_NUCLEUS_H_OD[1]))
    assert np.median(np.abs(measured - drawn)) < 0.015
    assert PALE_NUCLEUS_H_OD[0] - 0.02 < np.median(measured) < PALE_NUCLEUS_H_OD[1]
    # In a hard field the pale ones stay pale and the others are normal.
    hard = render_hard_fov((540, 960), PX, MIX, seed=6, noise_sigma=0.0)
    h = deconvolve(hard)[..., 0]
    pale = [nucleus_mean_h(h, c, PX) for c in hard.cells if c.nucleus_h_od <= PALE_NUCLEUS_H_OD[1]]
    normal = [nucleus_mean_h(h, c, PX) for c in hard.cells if c.nucleus_h_od >= 0.5]
    assert len(pale) > 10 and len(normal) > 30
    assert np.median(pale) < 0.22 < 0.4 < np.median(normal)


def test_crowded_nuclei_touch_or_overlap_a_little() -> None:
    fov = render_fov((540, 960), PX, MIX, nucleus_crowding=0.6, nucleus_diameter_um=7.0, seed=4)
    plain = render_fov((540, 960), PX, MIX, nucleus_diameter_um=7.0, seed=4)
    centres = np.array([(c.nucleus_row, c.nucleus_col) for c in fov.cells])
    radius = np.array([c.nucleus_diameter_um / 2.0 / PX for c in fov.cells])
    distance = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    reach = radius[:, None] + radius[None, :]
    touching = np.argwhere(np.triu(distance < reach))
    assert len(touching) > 0.15 * len(fov.cells)
    # Overlap (along the line between them, where the nuclei turn their short axes) at most NUCLEUS_OVERLAP_MAX of
    # the mean diameter; the equal-area radius bounds the short semi-axis from above.
    assert np.all(reach - distance <= (NUCLEUS_OVERLAP_MAX + 0.25) * reach)
    # Without crowding, nuclei stay inside their cells and never meet.
    centres = np.array([(c.nucleus_row, c.nucleus_col) for c in plain.cells])
    radius = np.array([c.nucleus_diameter_um / 2.0 / PX for c in plain.cells])
    distance = np.hypot(*(centres[:, None, :] - centres[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    assert np.all(distance > radius[:, None] + radius[None, :])


# ---------------------------------------------------------------------------------------- non-tumour fields


def component_sizes(
    fov: SyntheticFov, threshold: float, moment_factor: float
) -> dict[tuple[int, int], tuple[float, float]]:
    """(length, width) in µm of the H > threshold component around each isolated listed nucleus centre.

    Sizes come from the second moments: ``moment_factor`` x sqrt(variance) along and across the component (4 for
    an ellipse, sqrt(12) for a rectangle). Components holding more than one listed centre (touching nuclei) are
    skipped.
    """
    h = deconvolve(fov)[..., 0]
    _, labels = cv2.connectedComponents((h > threshold).astype(np.uint8), connectivity=8)
    centres = [(round(n.row), round(n.col)) for n in fov.other_nuclei]
    hits = np.bincount([labels[r, c] for r, c in centres], minlength=int(labels.max()) + 1)
    out = {}
    for r, c in centres:
        label = labels[r, c]
        if label == 0 or hits[label] != 1:
            continue
        rr, cc = np.nonzero(labels == label)
        if rr.size < 10:
            continue
        cov = np.cov(np.stack([rr, cc]).astype(np.float64))
        eigen = np.sort(np.linalg.eigvalsh(cov))[::-1]
        out[(r, c)] = (moment_factor * math.sqrt(eigen[0]) * PX, moment_factor * math.sqrt(eigen[1]) * PX)
    return out


@pytest.mark.parametrize("tissue", ["stroma", "muscle", "lymphocytes", "glass"])
@pytest.mark.e2e
def test_non_tumour_fields_have_no_tumour_cells(tissue: str) -> None:
    fov = render_hard_fov((540, 960), PX, MIX, seed=12, tissue=tissue, noise_sigma=0.0)
    assert fov.tissue == tissue
    assert fov.cells == ()
    assert not fov.tumour_mask.any()
    assert all(v == 0 for v in fov.counts().values()) and all(v == 0 for v in fov.counts("gastric").values())
    kinds = fov.other_counts()
    if tissue == "glass":
        assert sum(kinds.values()) == 0
        light = GLASS_LEVEL * vignette_gain((540, 960), fov.vignette, fov.vignette_centre)
        assert np.abs(fov.rgb.astype(np.float64).mean(axis=2) - light).max() < 3.0
        return
    main = {"stroma": "fibroblast", "muscle": "smooth_muscle", "lymphocytes": "lymphocyte"}[tissue]
    assert kinds[main] == max(kinds.values()) > 20
    nuclei = [n for n in fov.other_nuclei if n.kind == main]
    if main == "fibroblast":
        length, width, od = FIBROBLAST_LENGTH_UM, FIBROBLAST_WIDTH_UM, (0.3, 0.5)
    elif main == "smooth_muscle":
        length, width, od = MUSCLE_NUCLEUS_LENGTH_UM, MUSCLE_NUCLEUS_WIDTH_UM, (0.3, 0.45)
    else:
        length, width, od = LYMPHOCYTE_DIAMETER_UM, LYMPHOCYTE_DIAMETER_UM, LYMPHOCYTE_H_OD
    for n in nuclei:
        assert length[0] * 0.95 - 1e-9 <= n.major_um <= length[1] * 1.06 + 1e-9
        assert width[0] * 0.94 - 1e-9 <= n.minor_um <= width[1] * 1.05 + 1e-9
        assert od[0] - 1e-9 <= n.h_od <= od[1] + 1e-9
    # Measured in the image: the nucleus at each listed centre has the listed size (isolated ones only).
    measured = component_sizes(fov, 0.18, math.sqrt(12.0) if main == "smooth_muscle" else 4.0)
    truth = {(round(n.row), round(n.col)): (n.major_um, n.minor_um) for n in nuclei}
    pairs = [(measured[k], truth[k]) for k in truth if k in measured]
    assert len(pairs) > 10
    lengths = np.array([m[0] / t[0] for m, t in pairs])
    widths = np.array([m[1] / t[1] for m, t in pairs])
    assert 0.8 < np.median(lengths) < 1.25
    assert 0.8 < np.median(widths) < 1.35
    if main == "lymphocyte":
        area_1000_um2 = 540 * 960 * PX * PX / 1000.0
        assert kinds["lymphocyte"] / area_1000_um2 > 5.0  # dense: over 5 per 1000 µm² of field (stroma: ~1)
    if main == "smooth_muscle":  # parallel within a fascicle: angles cluster
        angles = np.radians([2.0 * n.angle_deg for n in nuclei])
        assert math.hypot(np.cos(angles).mean(), np.sin(angles).mean()) > 0.5


def test_tumour_fields_list_lymphocytes_and_fibroblasts_apart_from_the_tumour(hard: SyntheticFov) -> None:
    kinds = hard.other_counts()
    assert kinds["lymphocyte"] > 10 and kinds["fibroblast"] > 5 and kinds["smooth_muscle"] == 0
    cells = np.array([(c.nucleus_row, c.nucleus_col) for c in hard.cells])
    for nucleus in hard.other_nuclei:
        assert not hard.tumour_mask[round(nucleus.row), round(nucleus.col)]
        assert np.min(np.hypot(*(cells - (nucleus.row, nucleus.col)).T)) > 3.0 / PX
    # Lymphocytes gather near the nests.
    distance = cv2.distanceTransform((~hard.tumour_mask).astype(np.uint8), cv2.DIST_L2, 3) * PX
    near = [distance[round(n.row), round(n.col)] for n in hard.other_nuclei if n.kind == "lymphocyte"]
    assert np.median(near) < 30.0


# ------------------------------------------------------------------------------------------------- optics


@pytest.mark.parametrize(("vignette", "centre"), [(0.1, (0.5, 0.5)), (0.25, (0.5, 0.5)), (0.2, (0.3, 0.65))])
def test_vignette_lowers_the_corner_light(vignette: float, centre: tuple[float, float]) -> None:
    rows, cols = 360, 640
    fov = render_fov(
        (rows, cols), PX, tissue="glass", vignette=vignette, vignette_centre=centre, noise_sigma=0.0, blur_um=0.0
    )
    grey = fov.rgb.astype(np.float64).mean(axis=2)
    rc, cc = centre[0] * (rows - 1), centre[1] * (cols - 1)
    assert grey[round(rc), round(cc)] == pytest.approx(GLASS_LEVEL, abs=0.6)
    corners = {(r, c): math.hypot(r - rc, c - cc) for r in (0, rows - 1) for c in (0, cols - 1)}
    far = max(corners.values())
    for (r, c), d in corners.items():
        expected = GLASS_LEVEL * (1.0 - vignette * (d / far) ** 2)
        assert grey[r, c] == pytest.approx(expected, abs=0.6)
    farthest = max(corners, key=lambda k: corners[k])
    assert 1.0 - grey[farthest] / GLASS_LEVEL == pytest.approx(vignette, abs=0.004)
    # Smooth: no step anywhere larger than the fall-off allows.
    assert np.abs(np.diff(grey, axis=1)).max() <= 1.0


def test_hard_fields_have_uneven_light(hard: SyntheticFov) -> None:
    assert hard.vignette == HARD_VIGNETTE
    assert hard.vignette_centre != (0.5, 0.5)
    gain = vignette_gain(SHAPE, hard.vignette, hard.vignette_centre)
    assert gain.min() == pytest.approx(1.0 - HARD_VIGNETTE, abs=1e-4)
    assert gain.max() == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tissue": "bone"}, "tissue"),
        ({"fractions_guideline": "lung"}, "guideline"),
        ({"ring_gaps": 1}, "ring_gaps"),
        ({"gland_fraction": 1.5}, "gland_fraction"),
        ({"gland_intense_fraction": -0.1}, "gland_intense_fraction"),
        ({"pale_nucleus_fraction": 2.0}, "pale_nucleus_fraction"),
        ({"nucleus_crowding": -1.0}, "nucleus_crowding"),
        ({"lymphocyte_density": 100.0}, "lymphocyte_density"),
        ({"fibroblast_size_um": ((15.0, 10.0), (2.5, 3.5))}, "fibroblast_size_um"),
        ({"fibroblast_size_um": (10.0, 15.0)}, "fibroblast_size_um"),
        ({"vignette": 0.8}, "vignette"),
        ({"vignette_centre": (1.5, 0.5)}, "vignette_centre"),
        ({"vignette_centre": 0.5}, "vignette_centre"),
    ],
)
def test_bad_hard_options_raise(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_fov((256, 384), 0.5, **kwargs)


def test_bad_hard_entry_points_raise() -> None:
    with pytest.raises(ValueError, match="guideline"):
        render_hard_fov((256, 384), PX, guideline="lung")
    with pytest.raises(ValueError, match="guideline="):
        render_hard_fov((256, 384), PX, fractions_guideline="gastric")
    with pytest.raises(ValueError, match="3\\+ tumour"):
        render_hard_control((256, 384), PX, tissue="muscle")
    with pytest.raises(ValueError, match="guideline"):
        render_fov((256, 384), 0.5).counts("lung")
