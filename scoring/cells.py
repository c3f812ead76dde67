"""Per-cell membrane measurement: nuclei found in the haematoxylin, told tumour from stroma by their shape, and the
membrane DAB measured along rays cast from each tumour nucleus to its cell's boundary.

Why rays. A pathologist looks at each tumour cell and asks how much of its outline is brown, and how brown. Here
each nucleus casts ``N_RAYS`` rays outwards. A ray ends where the cell ends: at its neighbour's territory (the
Voronoi boundary between nuclei, plus a margin, since the membrane lies near it), at glass, or at the largest cell
radius. The most stained point of membrane DAB along the ray is where the membrane crosses it. The cell's
*completeness* is the share of its rays that cross stained membrane; one missing ray between two stained ones is
a gap of about a micrometre, which a pathologist still reads as a closed ring, so it counts as stained. Unlike
the contour hierarchy of a thresholded mask, one missing pixel does not open a ring.

The *pattern* follows the guidelines' words: complete (circumferential), basolateral (U-shaped: one unstained
arc, the apical side), lateral (two opposite stained arcs), partial, or none.

Nuclei are blobs of haematoxylin at nucleus scale (a difference of Gaussians), so pale, faded nuclei are found by
their contrast, not their darkness. Tumour or not: carcinoma nuclei are large and round to oval; fibroblast and
smooth-muscle nuclei are long and thin, a ridge of haematoxylin that curves several times more sharply across than
along (the Hessian's anisotropy); debris and the smallest lymphocytes are below a tumour nucleus's area. Tumour
cells are also cohesive: they lie in sheets, glands, nests and cords, with tumour-like neighbours within a cell
diameter or two. Each criterion is a measurement with its physical reason in ``config.scoring.ScoringParams``.

Everything here is at analysis resolution (``analysis_pixel_size_um``), (row, col), and pure.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.scoring import Guideline
from her2scope.scoring import morphology
from her2scope.scoring.morphology import BoolArray
from her2scope.scoring.results import Her2Score, MembranePattern
from her2scope.scoring.stains import StainDensities

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

#: Rays per cell: 24 rays are 15° apart, about 1.3 µm of membrane apart on a 5 µm cell radius, so one ray's gap
#: is a gap a pathologist does not see as a break.
N_RAYS = 24
#: A nucleus's outline lies where its haematoxylin has fallen to 30% of its contrast over the surroundings: the
#: half maximum lies inside pale, vesicular nuclei whose chromatin is clumped at the centre and rim.
_OUTLINE_CONTRAST = 0.3


def ray_directions(n_rays: int = N_RAYS) -> F64:
    """(n_rays, 2) unit (row, col) steps of the rays: ray k at angle 2πk/n from the +col axis towards +row."""
    angles = np.linspace(0.0, 2.0 * math.pi, n_rays, endpoint=False)
    return np.stack([np.sin(angles), np.cos(angles)], axis=1)


_DIRECTIONS = ray_directions()
#: The nearest nuclei first read for a cell's territory: a Voronoi cell has about six neighbours and hardly ever
#: more than a dozen, so the sixteen nearest nearly always include those that bound it (more are read when not).
_TERRITORY_NEIGHBOURS = 16


def ring_points(centres: F64, radii: F64) -> F64:
    """(K, N, 2) (row, col) points of K rings of N rays: ``radii`` (K, N) along each ray from ``centres`` (K, 2),
    in the same units as both."""
    return centres[:, None, :] + radii[:, :, None] * ray_directions(radii.shape[1])[None, :, :]


#: The region the cells were counted in is drawn on a grid of about this pitch (a coarse outline) ...
REGION_GRID_UM = 2.0
#: ... and their rings are joined across the membranes and gaps between neighbours by a closing of this radius (the
#: nests they form).
REGION_JOIN_UM = 2.0


def counted_region(rings_rc: F64, shape: tuple[int, ...], pixel_size_um: float) -> tuple[BoolArray, int]:
    """Where cells were counted: their rings ((K, N, 2) (row, col) points in pixels of ``pixel_size_um``, as
    :func:`ring_points` gives them) filled and joined by a closing of ``REGION_JOIN_UM``, on a grid of about
    ``REGION_GRID_UM``; the grid's mask and its pitch in pixels (grid sample (i, j) covers pixels
    [i·pitch, (i + 1)·pitch) × [j·pitch, (j + 1)·pitch) of an image of ``shape``)."""
    pitch = max(1, round(REGION_GRID_UM / pixel_size_um))
    small = np.zeros((max(1, shape[0] // pitch), max(1, shape[1] // pitch)), dtype=np.uint8)
    if len(rings_rc):
        points_rc = (np.asarray(rings_rc, dtype=np.float64) + 0.5) / pitch - 0.5
        cv2.fillPoly(small, list(np.rint(points_rc[:, :, ::-1]).astype(np.int32)), 1)
        return morphology.close(small.astype(bool), REGION_JOIN_UM / (pixel_size_um * pitch)), pitch
    return small.astype(bool), pitch


@dataclass(frozen=True, slots=True)
class Rings:
    """Membrane measurements of a set of cells along ``N_RAYS`` rays each.

    Attributes
    ----------
    radii_px : (K, N_RAYS) float64 — distance from the nucleus centre to the membrane point of each ray (the most
        stained point, or the ray's end when nothing is stained), analysis pixels
    level : (K, N_RAYS) int8 — 0 unstained, 1 stained (weak to moderate), 2 intense
    ring_od : (K,) float64 — the cell's membrane DAB OD: the median peak OD of its stained rays (0 if none)
    completeness : (K,) float64 — share of rays crossing stained membrane (gaps of one ray closed)
    intense_completeness : (K,) float64 — share of rays crossing intense membrane (gaps of one ray closed)
    pattern : (K,) object array of MembranePattern, of the stained rays
    """

    radii_px: F64
    level: npt.NDArray[np.int8]
    ring_od: F64
    completeness: F64
    intense_completeness: F64
    pattern: npt.NDArray[np.object_]


@dataclass(frozen=True, slots=True)
class StainGrades:
    """The DAB OD levels of a staining batch: a ring is strong above ``intense_od``, weak to moderate above
    ``moderate_od``, faint ("barely perceptible") above ``faint_od``, unstained below."""

    faint_od: float
    moderate_od: float
    intense_od: float

    @classmethod
    def of_batch(cls, intense_od: float, step: float, perceptible_od: float) -> StainGrades:
        """The grades below an intense threshold (from the positive control, or the default).

        The guidelines' magnification rule spaces the grades a step apart — strong staining is seen at 2.5–5x,
        weak to moderate at 10–20x, faint only at 40x — and each step of magnification is about a factor ``step``
        (0.5) of contrast: moderate starts at ``step`` × intense, faint at ``step``² × intense. Staining at
        ``perceptible_od`` is perceptible whatever the batch, so faint starts no higher than that: a weakly
        stained batch (a fainter control) lowers the faint level with the others, a strong one does not raise it.
        """
        return cls(
            faint_od=min(perceptible_od, step * step * intense_od), moderate_od=step * intense_od, intense_od=intense_od
        )


#: The patterns each guideline accepts as the membrane staining of 2+ and 3+ cells: the breast guideline asks for
#: complete (circumferential) staining; the gastroesophageal one accepts "complete, basolateral or lateral".
QUALIFYING_PATTERNS: dict[Guideline, frozenset[MembranePattern]] = {
    Guideline.BREAST: frozenset({MembranePattern.COMPLETE}),
    Guideline.GASTRIC: frozenset({MembranePattern.COMPLETE, MembranePattern.BASOLATERAL, MembranePattern.LATERAL}),
}
_INCOMPLETE_SIDES = frozenset({MembranePattern.BASOLATERAL, MembranePattern.LATERAL})


def classify_cells(
    rings: Rings, guideline: Guideline, intense_threshold_od: float, moderate_threshold_od: float
) -> list[Her2Score]:
    """Each cell's HER2 class from its ring, as the guideline words the classes.

    The pattern says where the membrane is stained; the intensity is the cell's, its ring OD (the median over its
    stained rays), as a pathologist grades a cell's staining as a whole: strong above the intense threshold,
    weak to moderate above the moderate one, faint ("barely perceptible") below it.

    - 3+: the qualifying pattern, strong ("intense complete" in breast; "strong complete, basolateral or lateral"
      in gastric);
    - 2+: the qualifying pattern, weak to moderate; in breast also the unusual pattern "moderate to intense but
      incomplete (basolateral or lateral)";
    - 1+: faint staining, or staining of only part of the membrane ("faint/barely perceptible", "incomplete");
    - 0: none.
    """
    qualifying = QUALIFYING_PATTERNS[guideline]
    classes: list[Her2Score] = []
    for pattern, ring_od in zip(rings.pattern, rings.ring_od, strict=True):
        if pattern == MembranePattern.NONE:
            classes.append(Her2Score.ZERO)
        elif pattern in qualifying and ring_od > intense_threshold_od:
            classes.append(Her2Score.THREE_PLUS)
        elif ring_od > moderate_threshold_od and (
            pattern in qualifying or (guideline == Guideline.BREAST and pattern in _INCOMPLETE_SIDES)
        ):
            classes.append(Her2Score.TWO_PLUS)
        else:
            classes.append(Her2Score.ONE_PLUS)
    return classes


def pixel_noise_od(densities: StainDensities) -> float:
    """Robust pixel-to-pixel variation of the stains (H + DAB OD): 1.4826 × the median absolute deviation of the
    image minus its 1-pixel Gaussian blur, over the central quarter of the field (ample for a statistic of the
    camera). Tissue fields measure 0.02–0.06 OD; a frame of random noise ~0.13."""
    rows, cols = densities.dab.shape
    centre = (slice(rows // 4, rows - rows // 4), slice(cols // 4, cols - cols // 4))  # a quarter of the field
    total = cv2.add(densities.haematoxylin[centre], densities.dab[centre])
    detail = cv2.subtract(total, cv2.GaussianBlur(total, (0, 0), 1.0))[::2, ::2]
    return float(1.4826 * np.median(np.abs(detail - np.median(detail))))


#: Nuclei are found and their elongation measured on a grid of about this pitch: at nucleus scale (a blur of σ = 2 µm, a
#: quarter of a nucleus diameter) a 1 µm grid loses nothing, and costs a quarter of a 0.5 µm one.
_NUCLEUS_GRID_UM = 1.0


@dataclass(frozen=True, slots=True)
class NucleusScale:
    """The haematoxylin at nucleus scale: smoothed by a quarter of a nucleus diameter, on a grid ``step`` analysis
    pixels apart (grid sample (i, j) averages analysis pixels [i·step, (i + 1)·step) × [j·step, (j + 1)·step))."""

    smooth: F32
    step: int

    def to_grid(self, centres: F64) -> F64:
        """(row, col) analysis pixels → grid samples."""
        return (centres - (self.step - 1) / 2.0) / self.step

    def from_grid(self, points: F64) -> F64:
        """(row, col) grid samples → analysis pixels."""
        return points * self.step + (self.step - 1) / 2.0


def find_nuclei(
    haematoxylin_od: F32,
    pixel_size_um: float,
    nucleus_diameter_um: float,
    min_contrast_od: float,
) -> tuple[F64, NucleusScale]:
    """Nucleus centres: blobs of haematoxylin at nucleus scale (difference of Gaussians).

    A difference of Gaussians at the nucleus's scale responds to a blob of the nucleus's size whatever its
    absolute darkness, so pale, faded nuclei are found as well as dark ones; thin membranes and the colour fringes
    of JPEG chroma subsampling along brown membranes are averaged out at that scale. It is computed on a grid of
    about ``_NUCLEUS_GRID_UM``, and each peak placed to a fraction of a grid step by a parabola through it and its
    neighbours.

    Returns
    -------
    centres : (K, 2) float64 (row, col), analysis pixels
    scale : the haematoxylin smoothed at a quarter of a nucleus diameter (for :func:`nucleus_anisotropy`)
    """
    step = max(1, int(_NUCLEUS_GRID_UM / pixel_size_um + 1e-6))
    rows, cols = haematoxylin_od.shape
    grid = haematoxylin_od
    if step > 1:
        cropped = haematoxylin_od[: rows - rows % step, : cols - cols % step]
        grid = np.asarray(cv2.resize(cropped, (cols // step, rows // step), interpolation=cv2.INTER_AREA), np.float32)
    radius = nucleus_diameter_um / 2.0 / (pixel_size_um * step)  # grid samples
    fine = np.asarray(cv2.GaussianBlur(grid, (0, 0), max(0.7, radius / 2.0)), dtype=np.float32)
    dog = np.asarray(cv2.subtract(fine, _wide_blur(grid, 2.0 * radius)), dtype=np.float32)
    side = 2 * max(1, round(0.8 * radius)) + 1
    local_max = cv2.dilate(dog, np.ones((side, side), np.uint8))
    # a float DoG has no plateaus above the contrast floor: each peak is one sample
    peak_rows, peak_cols = np.nonzero((dog >= local_max) & (dog > min_contrast_od))
    peaks = np.column_stack(
        [peak_rows + _vertex(dog, peak_rows, peak_cols, 0), peak_cols + _vertex(dog, peak_rows, peak_cols, 1)]
    )
    scale = NucleusScale(fine, step)
    centres = np.clip(scale.from_grid(peaks), 0.0, np.array([rows - 1, cols - 1], dtype=np.float64))
    return centres, scale


def _vertex(image: F32, rows: npt.NDArray[np.intp], cols: npt.NDArray[np.intp], axis: int) -> F64:
    """Sub-sample offset (within ±0.5) of each peak along ``axis``: the vertex of the parabola through the peak and
    its two neighbours (0 at the image's edge)."""
    size = image.shape[axis]
    centre = rows if axis == 0 else cols
    before, after = np.clip(centre - 1, 0, size - 1), np.clip(centre + 1, 0, size - 1)
    at = image[rows, cols].astype(np.float64)
    low = (image[before, cols] if axis == 0 else image[rows, before]).astype(np.float64)
    high = (image[after, cols] if axis == 0 else image[rows, after]).astype(np.float64)
    curvature = low - 2.0 * at + high
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curvature < 0.0, 0.5 * (low - high) / curvature, 0.0)
    return np.clip(offset, -0.5, 0.5)


def _wide_blur(image: F32, sigma_px: float) -> F32:
    """A Gaussian blur of a large sigma, computed on a grid a quarter as fine and interpolated back (a smooth
    background of a sigma of several coarse pixels loses nothing on it): a wide kernel at full resolution costs
    about ten times more."""
    factor = 4 if sigma_px >= 8.0 else 1
    if factor == 1:
        return np.asarray(cv2.GaussianBlur(image, (0, 0), sigma_px), dtype=np.float32)
    rows, cols = image.shape
    small = cv2.resize(image, (max(1, cols // factor), max(1, rows // factor)), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(small, (0, 0), sigma_px / factor)
    return np.asarray(cv2.resize(blurred, (cols, rows), interpolation=cv2.INTER_LINEAR), dtype=np.float32)


def territory_limits(centres: F64, nuclei: F64, reach_px: float, margin_px: float) -> F64:
    """(K, N_RAYS) how far each ray of each of the ``centres`` stays in its cell's territory, in pixels.

    A cell's territory is where its nucleus is at most ``margin_px`` farther than any other of the ``nuclei`` (its
    Voronoi cell widened by the margin; ``nuclei`` may include ``centres`` themselves). Along a ray p = c + t·u from
    the centre c, the excess |p − c| − |p − n| over a neighbour n = c + d grows with t, and reaches the margin m at
    t = (|d|² − m²) / (2 (d·u − m)) when d·u > m (never otherwise): the ray leaves the territory at the smallest
    such t over the neighbours. No ray of a neighbour at distance D ends before (D + m) / 2, so only the nearest
    neighbours are read, more only for the cells whose rays reach farther than that (up to ``reach_px``): the
    limits are exact. Centres are taken at their pixel, as the rays are cast from it.
    """
    seeds = np.rint(centres)
    others = np.rint(nuclei)
    limits = np.full((len(seeds), N_RAYS), np.inf)
    if len(seeds) == 0 or len(others) == 0:
        return limits
    from scipy.spatial import cKDTree  # scipy comes with scikit-image

    tree = cKDTree(others)
    bound = 2.0 * reach_px + margin_px + 1.0  # a neighbour farther away ends no ray within reach
    todo = np.arange(len(seeds))
    k = _TERRITORY_NEIGHBOURS
    while len(todo):
        k = min(k, len(others))
        distance, index = tree.query(seeds[todo], k=k, distance_upper_bound=bound)
        distance, index = distance.reshape(len(todo), k), index.reshape(len(todo), k)
        limits[todo] = _nearest_ends(seeds[todo], others, distance, index, margin_px)
        # exact unless a ray may reach a neighbour beyond the k-th (all neighbours within the bound were read when
        # the k-th is missing)
        farthest = distance[:, -1]
        unsure = np.isfinite(farthest) & (np.minimum(limits[todo].max(axis=1), reach_px) > (farthest + margin_px) / 2)
        todo = todo[unsure] if k < len(others) else todo[:0]
        k *= 2
    return limits


def _nearest_ends(seeds: F64, others: F64, distance: F64, index: npt.NDArray[np.intp], margin_px: float) -> F64:
    """The territory limits of :func:`territory_limits` over the neighbours ``index`` (at ``distance``) of each of
    the ``seeds``: 1 / t = 2 (d·u − m) / (|d|² − m²), and the nearest end is the largest 1 / t."""
    valid = np.isfinite(distance) & (distance > 0.0)  # not the centre itself, nor a missing neighbour
    offset = others[np.where(valid, index, 0)] - seeds[:, None, :]  # (K, k, 2)
    excess = (offset * offset).sum(axis=2) - margin_px * margin_px
    # a neighbour closer than the margin never ends a ray: its weight is 0
    weight = np.where(valid & (excess > 0.0), 2.0 / np.where(excess > 0.0, excess, 1.0), 0.0)
    terms = np.stack([offset[:, :, 0] * weight, offset[:, :, 1] * weight, -margin_px * weight]).astype(np.float32)
    axes = np.vstack([_DIRECTIONS.T, np.ones((1, N_RAYS))]).astype(np.float32)  # (3, N_RAYS): u_row, u_col, 1
    inverse = terms[:, :, 0].T @ axes  # neighbour by neighbour: (K, 3) @ (3, N_RAYS) is fast, (K·k, 3) is not
    for j in range(1, terms.shape[2]):
        np.maximum(inverse, terms[:, :, j].T @ axes, out=inverse)
    with np.errstate(divide="ignore"):
        return np.where(inverse > 0.0, 1.0 / inverse.astype(np.float64), np.inf)


def nucleus_areas(haematoxylin_od: F32, centres: F64, nuclei: F64, pixel_size_um: float, max_radius_um: float) -> F64:
    """The area (µm²) of each of the nuclei at ``centres``, from its outline along the rays.

    Along each ray the nucleus ends where the haematoxylin (smoothed over its chromatin texture, σ = 1 µm) has
    fallen to ``_OUTLINE_CONTRAST`` of the way from the nucleus's centre to the ray's lowest value, or at the
    Voronoi boundary to its neighbour among all the ``nuclei`` (touching nuclei).
    """
    if len(centres) == 0:
        return np.zeros(0)
    smooth = np.asarray(cv2.GaussianBlur(haematoxylin_od, (0, 0), max(0.7, 1.0 / pixel_size_um)), dtype=np.float32)
    reach_px = max_radius_um / pixel_size_um
    values, inside, _, length = _ray_samples(
        smooth, centres, territory_limits(centres, nuclei, reach_px, 0.0), 0.0, reach_px
    )
    centre_value = values[:, :, :2].mean(axis=(1, 2))[:, None, None]
    floor = np.where(inside, values, np.inf).min(axis=2, keepdims=True)
    level = floor + _OUTLINE_CONTRAST * (centre_value - floor)
    below = (values < level) | ~inside
    below[:, :, -1] = True
    first_below = np.argmax(below, axis=2)  # the first step below the outline level
    radius = np.maximum(length[np.arange(N_RAYS)[None, :], first_below], 0.5).astype(np.float64) * pixel_size_um
    sector = 2.0 * math.pi / N_RAYS
    return np.asarray(0.5 * math.sin(sector) * (radius * np.roll(radius, -1, axis=1)).sum(axis=1), dtype=np.float64)


def nucleus_anisotropy(scale: NucleusScale, centres: F64) -> F64:
    """How spindle-shaped each nucleus is: the ratio of the haematoxylin's curvature across the nucleus to its
    curvature along it (Hessian eigenvalues at the centre of the haematoxylin smoothed at a quarter of a nucleus
    diameter, as :func:`find_nuclei` returns it).

    A round nucleus gives about 1 and an oval tumour nucleus up to about 2.5; the long, thin nuclei of fibroblasts
    and smooth muscle, a flat ridge along their length, give 3 and more. Unlike an outline's length and width, the
    ratio does not depend on where a long nucleus's outline is cut by its neighbours. A point that is no maximum
    (both curvatures not negative) gives infinity.
    """
    if len(centres) == 0:
        return np.zeros(0)
    smooth = scale.smooth
    grid = np.rint(scale.to_grid(centres)).astype(np.intp)
    rows = np.clip(grid[:, 0], 1, smooth.shape[0] - 2)
    cols = np.clip(grid[:, 1], 1, smooth.shape[1] - 2)
    centre = smooth[rows, cols].astype(np.float64)
    d_rr = smooth[rows + 1, cols] + smooth[rows - 1, cols] - 2.0 * centre
    d_cc = smooth[rows, cols + 1] + smooth[rows, cols - 1] - 2.0 * centre
    d_rc = (
        smooth[rows + 1, cols + 1]
        - smooth[rows + 1, cols - 1]
        - smooth[rows - 1, cols + 1]
        + smooth[rows - 1, cols - 1]
    ) / 4.0
    half_trace = (d_rr + d_cc) / 2.0
    spread = np.sqrt(((d_rr - d_cc) / 2.0) ** 2 + d_rc**2)
    across, along = half_trace - spread, half_trace + spread  # across <= along; both < 0 at a maximum
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(along < 0, across / np.minimum(along, -1e-12), np.inf)
    return np.asarray(ratio, dtype=np.float64)


def tumour_nuclei(
    centres: F64,
    area_um2: F64,
    anisotropy: F64,
    pixel_size_um: float,
    *,
    min_area_um2: float,
    max_anisotropy: float,
    neighbour_distance_um: float,
    min_neighbours: int,
) -> npt.NDArray[np.bool_]:
    """Which nuclei are tumour: tumour-like shape (large enough, not spindle-shaped) and cohesive context (enough
    tumour-like neighbours close by). See the module docstring for the reasons."""
    if len(centres) == 0:
        return np.zeros(0, dtype=bool)
    shaped = (area_um2 >= min_area_um2) & (anisotropy <= max_anisotropy)
    if min_neighbours <= 0 or not shaped.any():
        return shaped
    points = centres[shaped] * pixel_size_um
    neighbours = _count_within(points, neighbour_distance_um)
    tumour = shaped.copy()
    tumour[np.flatnonzero(shaped)] = neighbours >= min_neighbours
    return tumour


def measure_rings(
    membrane_dab: F32,
    dab_od: F32,
    tissue: BoolArray,
    nuclei: F64,
    centres: F64,
    pixel_size_um: float,
    *,
    min_radius_um: float,
    max_radius_um: float,
    boundary_margin_um: float,
    weak_threshold_od: float,
    intense_threshold_od: float,
) -> Rings:
    """Cast ``N_RAYS`` rays from each of the ``centres`` and measure its cell's membrane.

    Parameters
    ----------
    membrane_dab : (M, N) float32 — DAB above the local cytoplasmic background (white top-hat)
    dab_od : (M, N) float32 — DAB OD itself, whose value at the membrane point is the ray's intensity
    tissue : (M, N) bool — not glass; a ray that leaves the tissue has left its cell
    nuclei : (L, 2) float64 — every nucleus, tumour or not (each owns its territory)
    centres : (K, 2) float64 — the nuclei of the cells to measure
    min_radius_um, max_radius_um : rays start outside the nucleus's centre and end at the largest cell radius
    boundary_margin_um : how far beyond the Voronoi boundary a ray may look for the membrane
    """
    if len(centres) == 0:
        empty = np.zeros(0)
        none = np.zeros(0, dtype=object)
        return Rings(np.zeros((0, N_RAYS)), np.zeros((0, N_RAYS), np.int8), empty, empty, empty, none)
    reach_px = max_radius_um / pixel_size_um
    signal, inside, flat, length = _ray_samples(
        membrane_dab,
        centres,
        territory_limits(centres, nuclei, reach_px, boundary_margin_um / pixel_size_um),
        max(1.0, round(min_radius_um / pixel_size_um)),
        reach_px,
        tissue=tissue,
    )
    signal = np.where(inside, signal, np.float32(-1.0))
    peak_step = np.argmax(signal, axis=2)
    peak = np.take_along_axis(signal, peak_step[:, :, None], axis=2)[:, :, 0]
    # a ray ends at its last inside sample: where it is drawn when it crosses nothing stained
    last_inside = inside.shape[2] - 1 - np.argmax(inside[:, :, ::-1], axis=2)
    # a lone stained ray with no stained neighbour is a speck (dust, noise, a JPEG block), not a membrane: stained
    # membrane runs at least two rays, about 2.5 µm
    stained = _drop_lone(peak > weak_threshold_od)
    radius_step = np.where(stained, peak_step, last_inside)
    radii = length[np.arange(N_RAYS)[None, :], radius_step].astype(np.float64)
    peak_od = dab_od.ravel()[np.take_along_axis(flat, radius_step[:, :, None], axis=2)[:, :, 0]]
    intense = stained & (peak_od > intense_threshold_od)
    stained_closed = _close_gaps(stained)
    level = np.where(intense, 2, np.where(stained, 1, 0)).astype(np.int8)
    return Rings(
        radii_px=radii,
        level=level,
        ring_od=_median_where(peak_od, stained),
        completeness=stained_closed.mean(axis=1),
        intense_completeness=_close_gaps(intense).mean(axis=1),
        pattern=membrane_patterns(stained_closed),
    )


def _median_where(values: F32, valid: npt.NDArray[np.bool_]) -> F64:
    """Per row, the median of ``values`` where ``valid`` (0 where none is): a sort of 24 values per row."""
    ordered = np.sort(np.where(valid, values, np.float32(np.inf)), axis=1)
    n = valid.sum(axis=1)
    low = np.take_along_axis(ordered, np.maximum(n - 1, 0)[:, None] // 2, axis=1)[:, 0]
    high = np.take_along_axis(ordered, np.minimum(n // 2, valid.shape[1] - 1)[:, None], axis=1)[:, 0]
    return np.where(n > 0, (low.astype(np.float64) + high) / 2.0, 0.0)


def membrane_patterns(stained: npt.NDArray[np.bool_]) -> npt.NDArray[np.object_]:
    """The pattern of each cell's stained rays ((K, N_RAYS) bool, gaps already closed).

    - complete: at least 90% of the rays (at most two rays, ~30°, unstained);
    - basolateral: one stained arc of at least half the circumference (U-shaped, the apical side open);
    - lateral: two stained arcs facing each other (their middles at least 120° apart), each at least 45°;
    - partial: any other stained rays (at least two, ~2.5 µm of membrane; one ray may be a speck);
    - none: otherwise.
    """
    # cells share few distinct patterns (all stained, none, ...): work out each distinct one once
    codes = stained.astype(np.int64) @ (np.int64(1) << np.arange(N_RAYS, dtype=np.int64))
    distinct, inverse = np.unique(codes, return_inverse=True)
    if len(distinct) < len(codes):
        unpacked = ((distinct[:, None] >> np.arange(N_RAYS)) & 1).astype(bool)
        return membrane_patterns(unpacked)[inverse.ravel()]
    n_cells = len(stained)
    n_stained = stained.sum(axis=1)
    # arcs: run lengths around the circle, read on the ray sequence laid twice end to end
    doubled = np.concatenate([stained, stained], axis=1).astype(np.int16)
    run = np.zeros_like(doubled)
    run[:, 0] = doubled[:, 0]
    for k in range(1, 2 * N_RAYS):
        run[:, k] = (run[:, k - 1] + 1) * doubled[:, k]
    # an arc ends at ray k of the second lap when ray k is stained and ray k + 1 is not
    following = np.roll(stained, -1, axis=1)
    ends = stained & ~following
    length = np.where(ends, np.minimum(run[:, N_RAYS:], N_RAYS), 0)
    longest = np.where(n_stained == N_RAYS, N_RAYS, length.max(axis=1, initial=0))
    long_arc = length * 360.0 / N_RAYS >= 45.0
    # facing arcs are looked for only where there are two long arcs and no longer pattern
    maybe_lateral = np.flatnonzero((long_arc.sum(axis=1) >= 2) & (longest < N_RAYS // 2))
    middle = np.arange(N_RAYS)[None, :] - (length[maybe_lateral] - 1) / 2.0
    separation = np.abs(middle[:, :, None] - middle[:, None, :]) % N_RAYS
    separation = np.minimum(separation, N_RAYS - separation) * 360.0 / N_RAYS
    candidates = long_arc[maybe_lateral]
    facing = np.zeros(n_cells, dtype=bool)
    facing[maybe_lateral] = (candidates[:, :, None] & candidates[:, None, :] & (separation >= 120.0)).any(axis=(1, 2))
    patterns = np.empty(n_cells, dtype=object)  # np.full would store the enum as a plain str
    patterns[:] = [MembranePattern.PARTIAL] * n_cells
    patterns[facing] = MembranePattern.LATERAL
    patterns[longest >= N_RAYS // 2] = MembranePattern.BASOLATERAL
    patterns[n_stained >= 0.9 * N_RAYS] = MembranePattern.COMPLETE
    patterns[n_stained < 2] = MembranePattern.NONE
    return patterns


def _drop_lone(rays: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Unset stained rays whose two neighbours are both unstained."""
    return rays & (np.roll(rays, 1, axis=1) | np.roll(rays, -1, axis=1))


def _close_gaps(rays: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Fill single unstained rays between two stained ones (a ~1 µm gap in a ring is no break to the eye)."""
    return rays | (np.roll(rays, 1, axis=1) & np.roll(rays, -1, axis=1))


@functools.lru_cache(maxsize=16)
def _ray_offsets(start: float, stop: float) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], F32]:
    """Integer (row, col) pixel offsets of the samples of every ray, one pixel apart from ``start`` to ``stop``
    pixels, and their exact distances from the centre pixel: (N_RAYS, S) each, computed once per step range."""
    steps = np.arange(start, stop + 0.5)
    d_row = np.rint(steps[None, :] * _DIRECTIONS[:, 0, None]).astype(np.int32)
    d_col = np.rint(steps[None, :] * _DIRECTIONS[:, 1, None]).astype(np.int32)
    length = np.hypot(d_row, d_col).astype(np.float32)
    for table in (d_row, d_col, length):
        table.flags.writeable = False  # shared by every call
    return d_row, d_col, length


def _ray_samples(
    image: F32,
    centres: F64,
    limits: F64,
    start_px: float,
    stop_px: float,
    *,
    tissue: BoolArray | None = None,
) -> tuple[F32, npt.NDArray[np.bool_], npt.NDArray[np.intp], F32]:
    """``image`` sampled along every ray of every centre, and whether each sample still lies in the cell.

    Rays start at the centre's pixel and step one pixel at a time from ``start_px`` to ``stop_px``. A sample is in
    the cell while it lies within its ray's territory limit (``limits``, (K, N_RAYS), :func:`territory_limits`),
    inside the image and (with ``tissue``) in tissue; the first sample outside ends the ray.

    Returns
    -------
    values, inside, flat, length : (K, N_RAYS, S) arrays for K centres: the samples, whether each is in the cell,
        its flat pixel index, and (N_RAYS, S) its distance from the centre pixel.
    """
    height, width = image.shape
    d_row, d_col, length = _ray_offsets(float(start_px), float(stop_px))
    seed = np.rint(centres).astype(np.intp)
    flat = (seed[:, 0] * width + seed[:, 1])[:, None, None] + (d_row * width + d_col)[None]
    inside = length[None] <= limits[:, :, None]
    # only the rays of centres within reach of the frame can leave the image
    reach = math.ceil(stop_px) + 1  # offsets are rounded steps up to stop_px + 0.5
    near_edge = np.flatnonzero(
        (seed[:, 0] < reach) | (seed[:, 0] >= height - reach) | (seed[:, 1] < reach) | (seed[:, 1] >= width - reach)
    )
    if len(near_edge):
        rows = seed[near_edge, 0, None, None] + d_row[None]
        cols = seed[near_edge, 1, None, None] + d_col[None]
        inside[near_edge] &= (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        flat[near_edge] = np.clip(rows, 0, height - 1) * width + np.clip(cols, 0, width - 1)
    if tissue is not None:
        inside &= tissue.ravel()[flat]
        # the first sample off the tissue ends the ray (the territory and the frame end it for good: the distances
        # grow along a ray, and the frame is convex)
        inside = np.logical_and.accumulate(inside, axis=2)
    return image.ravel()[flat], inside, flat, length


def _count_within(points_um: F64, distance_um: float) -> npt.NDArray[np.intp]:
    """For each point, how many other points lie within ``distance_um`` (a k-d tree: linear-logarithmic)."""
    if len(points_um) == 0:
        return np.zeros(0, dtype=np.intp)
    from scipy.spatial import cKDTree  # scipy comes with scikit-image

    tree = cKDTree(points_um)
    counts = tree.query_ball_point(points_um, distance_um, return_length=True)
    return np.asarray(counts, dtype=np.intp) - 1
