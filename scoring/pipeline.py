"""Score one field of view: deconvolution → membranes and nuclei → per-cell classes → the FOV's call.

Both membrane methods start from colour deconvolution to haematoxylin (H) and DAB OD (``scoring.stains``) and a
membrane DAB image (DAB above its local cytoplasmic background, a white top-hat).

Per-cell method (the default, ``membrane_method = "per-cell"``; ``scoring.cells``): nuclei by a difference of
Gaussians → tumour nuclei by area, anisotropy and cohesion → 24 rays per tumour cell to its boundary → each
cell's completeness, pattern and ring OD → its class as the case's guideline words it.

Contour-hierarchy method (the published one, ``membrane_method = "contour-hierarchy"``), with its names:

1. [M_weak] = membrane DAB > weak threshold; [M_intense] = DAB > intense threshold (from the positive control),
   ⊆ M_weak.
2. [D_weak], [D_intense]: the masks dilated by a tumour-cell radius.
3. Complete membranes on each mask from the contour hierarchy → [M_weak,complete], [M_intense,complete] (filled)
   and their centres [P_weak,complete], [P_intense,complete] (``scoring.membranes``).
4. Clear nuclei [P_clear] from H, inside the tumour region (``scoring.nuclei``).
5. Counts:
   N3+ = |P_intense,complete|;  N2+ = |P_weak,complete \\ M_intense,complete|;
   N1+ = |P_clear ∩ D_weak \\ (D_intense ∪ M_intense,complete ∪ M_weak,complete)|;
   N0  = |P_clear \\ (D_intense ∪ M_intense,complete ∪ M_weak,complete ∪ D_weak)|.

The image is first resampled to ``analysis_pixel_size_um`` if it is finer; all sizes are µm converted with
the pixel size, and every reported position is in the caller's FOV pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from her2scope.config.scoring import MAX_PIXEL_SIZE_UM, MIN_PIXEL_SIZE_UM, CaseRule, MembraneMethod, ScoringParams
from her2scope.scoring import cells as cells_module
from her2scope.scoring import morphology, nuclei, stains
from her2scope.scoring.case import NO_CONTROL_WARNING, call_score, cluster_sizes
from her2scope.scoring.membranes import CompleteMembranes, cell_area_bounds_px, complete_membranes
from her2scope.scoring.morphology import BoolArray
from her2scope.scoring.results import Cell, ClassCounts, ControlCalibration, FovResult, Her2Score, ThresholdSource
from her2scope.scoring.stains import ChannelOrder

#: The tumour region is a coarse shape; it is computed at about this pixel size.
_REGION_PIXEL_SIZE_UM = 2.0
#: D_weak and D_intense (dilations by a cell radius) are evaluated at about this pixel size.
_DILATION_PIXEL_SIZE_UM = 1.0
#: Haematoxylin + DAB OD (smoothed over 1 µm) at most this on glass, at least this in tissue (a lumen is glass).
_GLASS_MAX_OD = 0.05

RowCol = tuple[float, float]


@dataclass(frozen=True, slots=True)
class AnalysisImage:
    """A FOV resampled to analysis resolution and deconvolved.

    Attributes
    ----------
    densities : H and DAB OD at analysis resolution
    scale : (row, col) FOV pixels per analysis pixel (1.0 when not resampled)
    pixel_size_um : µm per analysis pixel
    fov_shape : (rows, cols) of the original FOV
    """

    densities: stains.StainDensities
    scale: tuple[float, float]
    pixel_size_um: float
    fov_shape: tuple[int, int]

    def to_fov(self, points_rc: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """(row, col) analysis pixels → FOV pixels (pixel centres map to pixel centres)."""
        scale = np.asarray(self.scale, dtype=np.float64)
        return np.asarray((points_rc + 0.5) * scale - 0.5, dtype=np.float64)

    def from_fov(self, points_rc: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """(row, col) FOV pixels → analysis pixels."""
        scale = np.asarray(self.scale, dtype=np.float64)
        return np.asarray((points_rc + 0.5) / scale - 0.5, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class FovAnalysis:
    """A FOV's result with the intermediate masks that explain it (analysis resolution), for the overlays."""

    result: FovResult
    image: AnalysisImage
    weak: BoolArray
    intense: BoolArray
    weak_complete: CompleteMembranes
    intense_complete: CompleteMembranes
    tumour_region: BoolArray
    excluded_nuclei_rc: npt.NDArray[np.float64]


def check_pixel_size(pixel_size_um: float) -> float:
    """Return ``pixel_size_um`` as a float, or raise a ValueError naming a plausible range."""
    if not isinstance(pixel_size_um, (int, float)) or not math.isfinite(pixel_size_um):
        raise ValueError(f"pixel size must be a finite number of µm/px, got {pixel_size_um!r}")
    if not MIN_PIXEL_SIZE_UM < pixel_size_um <= MAX_PIXEL_SIZE_UM:
        raise ValueError(
            f"pixel size {pixel_size_um} µm/px is outside ({MIN_PIXEL_SIZE_UM}, {MAX_PIXEL_SIZE_UM}]; "
            "a 40x objective gives about 0.25 µm/px, a 20x about 0.5 µm/px"
        )
    return float(pixel_size_um)


def prepare(
    image: npt.NDArray[np.generic], pixel_size_um: float, params: ScoringParams, channel_order: ChannelOrder = "RGB"
) -> AnalysisImage:
    """Check, resample to analysis resolution and deconvolve a FOV."""
    image = stains.check_rgb(image)
    pixel_size_um = check_pixel_size(pixel_size_um)
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    rows, cols = image.shape[:2]
    factor = params.analysis_pixel_size_um / pixel_size_um
    if factor > 1.05:
        size = (max(16, round(cols / factor)), max(16, round(rows / factor)))
        # Area averaging in the intensity domain is what a coarser camera pixel would have measured.
        small: npt.NDArray[Any] = np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))  # type: ignore[arg-type]
    else:
        small = image
    if params.stains.estimate_from_image:
        rgb_small = small[:, :, ::-1] if channel_order == "BGR" else small
        h_vec, d_vec = stains.estimate_stain_vectors(rgb_small, params.stains)
    else:
        h_vec, d_vec = params.stains.haematoxylin, params.stains.dab
    densities = stains.deconvolve(small, h_vec, d_vec, channel_order)
    scale = (rows / small.shape[0], cols / small.shape[1])
    return AnalysisImage(densities, scale, pixel_size_um * scale[1], (rows, cols))


def polygon_mask(polygon_rc: Sequence[RowCol], analysis: AnalysisImage) -> BoolArray:
    """Rasterise an ROI polygon given in FOV (row, col) pixels at analysis resolution.

    Raises
    ------
    ValueError
        Fewer than three vertices, non-finite coordinates, or a polygon that misses the FOV.
    """
    points = np.asarray(polygon_rc, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"an ROI polygon needs at least 3 (row, col) vertices, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("ROI polygon has non-finite coordinates")
    rows, cols = analysis.fov_shape
    if points[:, 0].max() < 0 or points[:, 1].max() < 0 or points[:, 0].min() >= rows or points[:, 1].min() >= cols:
        raise ValueError(f"ROI polygon lies outside the {rows}x{cols} FOV")
    small = analysis.from_fov(points)
    mask = np.zeros(analysis.densities.dab.shape, dtype=np.uint8)
    xy = np.rint(small[:, ::-1]).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [xy], 1)
    if not mask.any():
        raise ValueError("ROI polygon encloses no pixel of the FOV")
    return mask.astype(bool)


@dataclass(frozen=True, slots=True)
class MembraneMasks:
    """The membrane stain of one FOV at analysis resolution.

    Attributes
    ----------
    membrane_dab : (M, N) float32, DAB OD above the local (cytoplasmic) background
    weak : (M, N) bool [M_weak], stained membrane: membrane DAB above the weak threshold
    intense : (M, N) bool [M_intense], stained membrane whose DAB OD is above the intense threshold (⊆ weak)
    """

    membrane_dab: npt.NDArray[np.float32]
    weak: BoolArray
    intense: BoolArray


@dataclass(frozen=True, slots=True)
class StainMasks(MembraneMasks):
    """The membrane masks and, for the contour-hierarchy method, the nuclei and the tumour region (all (M, N)).

    Attributes
    ----------
    smooth_haematoxylin : (M, N) float32, H OD smoothed for nucleus detection
    nuclei : (M, N) bool, smoothed haematoxylin above its threshold, opened
    tumour_region : (M, N) bool, where cells are counted, before any ROI polygon
    """

    smooth_haematoxylin: npt.NDArray[np.float32]
    nuclei: BoolArray
    tumour_region: BoolArray


def membrane_masks(
    analysis: AnalysisImage, params: ScoringParams, intense_threshold_od: float, *, drop_specks: bool = True
) -> MembraneMasks:
    """Membrane DAB and the weak and intense membrane masks of an analysed FOV.

    Membranes are thin DAB ridges: a white top-hat (DAB minus its grey opening by a disk wider than a membrane)
    keeps them and removes diffuse cytoplasmic DAB, which would otherwise fill cells and hide their outlines.
    M_weak is the top-hat above the weak threshold; M_intense those M_weak pixels whose DAB OD itself is above
    the intense threshold, so M_intense ⊆ M_weak. ``drop_specks`` drops stained specks smaller than
    ``min_membrane_fragment_um2`` from M_weak (the per-cell method drops lone stained rays instead and uses the
    masks only to draw them).
    """
    px = analysis.pixel_size_um
    dab = analysis.densities.dab
    background = cv2.morphologyEx(dab, cv2.MORPH_OPEN, morphology.disk_kernel(params.membrane_width_um / px))
    membrane_dab = np.asarray(cv2.subtract(dab, background), dtype=np.float32)
    weak = membrane_dab > params.weak_threshold_od
    if drop_specks:
        weak = morphology.remove_small(weak, params.min_membrane_fragment_um2 / (px * px))
    intense = weak & (dab > intense_threshold_od)
    return MembraneMasks(membrane_dab, weak, intense)


def stain_masks(analysis: AnalysisImage, params: ScoringParams, intense_threshold_od: float) -> StainMasks:
    """The membrane masks (:func:`membrane_masks`), the nucleus mask and the tumour region: the contour-hierarchy
    method's masks."""
    px = analysis.pixel_size_um
    membrane = membrane_masks(analysis, params, intense_threshold_od)
    nucleus_radius_px = params.nucleus_diameter_um / 2.0 / px
    smooth_h = nuclei.smooth_haematoxylin(analysis.densities.haematoxylin, nucleus_radius_px)
    nucleus_mask = nuclei.nucleus_mask(smooth_h, params.haematoxylin_threshold_od, nucleus_radius_px)
    region = nuclei.tumour_region(
        nucleus_mask | membrane.weak,
        params.tumour_region_closing_um / px,
        params.tumour_region_opening_um / px,
        params.tumour_region_margin_um / px,
        work_scale=max(1, round(_REGION_PIXEL_SIZE_UM / px)),
    )
    return StainMasks(membrane.membrane_dab, membrane.weak, membrane.intense, smooth_h, nucleus_mask, region)


def analyse_fov(
    image: npt.NDArray[np.generic],
    pixel_size_um: float,
    params: ScoringParams | None = None,
    *,
    control: ControlCalibration | None = None,
    roi_polygon: Sequence[RowCol] | None = None,
    rule: CaseRule | None = None,
    channel_order: ChannelOrder = "RGB",
) -> FovAnalysis:
    """Score one FOV and keep the masks that explain the score.

    Parameters
    ----------
    image : (M, N, 3) uint8, uint16 or float [0, 1] ndarray
        The FOV; not modified.
    pixel_size_um : float
        µm per pixel of ``image`` (objective and camera).
    params : scoring parameters (defaults if None).
    control : the positive-control calibration; without it the default intense threshold applies and the
        result says so.
    roi_polygon : the pathologist's ROI as (row, col) FOV pixels; counting is restricted to it.
    rule : the case's rule: its guideline words the per-cell classes and makes the per-FOV call.
    channel_order : "RGB", or "BGR" for frames from OpenCV.
    """
    params = params or ScoringParams()
    rule = rule or CaseRule()
    analysis = prepare(image, pixel_size_um, params, channel_order)
    px = analysis.pixel_size_um

    if control is None:
        intense_threshold, source = params.default_intense_threshold_od, ThresholdSource.DEFAULT
    else:
        intense_threshold, source = control.intense_threshold_od, control.source
    roi = polygon_mask(roi_polygon, analysis) if roi_polygon is not None else None
    membrane: MembraneMasks
    if params.membrane_method == MembraneMethod.PER_CELL:
        grades = cells_module.StainGrades.of_batch(
            intense_threshold, params.moderate_fraction_of_intense, params.weak_threshold_od
        )
        found, membrane = _per_cell(analysis, params, rule, grades, roi)
        weak_threshold = grades.faint_od
    else:
        masks = stain_masks(analysis, params, intense_threshold)
        found = _contour_hierarchy(analysis, masks, params, roi)
        membrane = masks
        weak_threshold = params.weak_threshold_od
    cells, region, excluded = found.cells, found.region, found.excluded_rc
    weak, intense = membrane.weak, membrane.intense
    counts = ClassCounts(
        zero=sum(c.her2_class == Her2Score.ZERO for c in cells),
        one_plus=sum(c.her2_class == Her2Score.ONE_PLUS for c in cells),
        two_plus=sum(c.her2_class == Her2Score.TWO_PLUS for c in cells),
        three_plus=sum(c.her2_class == Her2Score.THREE_PLUS for c in cells),
    )
    clusters = cluster_sizes(cells, pixel_size_um, rule.cohesion_distance_um)
    call = call_score(counts, rule, clusters)
    warnings = [] if control is not None else [NO_CONTROL_WARNING]
    warnings.extend(found.warnings)
    if call.score is None:
        warnings.append(call.reason)
    result = FovResult(
        counts=counts,
        percentages=counts.percentages(),
        call=call,
        cells=cells,
        n_excluded_nuclei=len(excluded),
        weak_threshold_od=weak_threshold,
        intense_threshold_od=intense_threshold,
        intense_threshold_source=source,
        pixel_size_um=analysis.pixel_size_um / analysis.scale[1],
        analysis_pixel_size_um=px,
        tumour_area_mm2=float(region.sum()) * px * px * 1e-6,
        stain_vectors=analysis.densities.vectors,
        warnings=tuple(warnings),
        clusters=clusters,
    )
    return FovAnalysis(
        result=result,
        image=analysis,
        weak=weak,
        intense=intense,
        weak_complete=found.weak_complete,
        intense_complete=found.intense_complete,
        tumour_region=region,
        excluded_nuclei_rc=analysis.to_fov(excluded),
    )


@dataclass(frozen=True, slots=True)
class _FoundCells:
    """What a membrane method found: the counted cells (FOV pixels), where they were counted (analysis pixels),
    the nuclei counted in no class (analysis pixels), and the contour method's complete membranes."""

    cells: tuple[Cell, ...]
    region: BoolArray
    excluded_rc: npt.NDArray[np.float64]
    weak_complete: CompleteMembranes
    intense_complete: CompleteMembranes
    warnings: tuple[str, ...] = ()


def _no_membranes(shape: tuple[int, ...]) -> CompleteMembranes:
    return CompleteMembranes(np.zeros(shape, dtype=bool), np.zeros((0, 2)), ())


def _per_cell(
    analysis: AnalysisImage,
    params: ScoringParams,
    rule: CaseRule,
    grades: cells_module.StainGrades,
    roi: BoolArray | None,
) -> tuple[_FoundCells, MembraneMasks]:
    """Nuclei → tumour nuclei by shape and cohesion → a ring of rays per tumour cell → class by the guideline.

    What the rays read is computed on a second thread while the nuclei are found (OpenCV and NumPy release the
    GIL; the results are those of a serial run).
    """
    noise = cells_module.pixel_noise_od(analysis.densities)
    if noise >= params.weak_threshold_od:
        masks = membrane_masks(analysis, params, grades.intense_od, drop_specks=False)
        return _too_noisy(analysis.densities.dab.shape, noise, params.weak_threshold_od), masks
    with ThreadPoolExecutor(max_workers=1) as pool:
        membrane_future = pool.submit(_membrane_inputs, analysis, params, grades.intense_od)
        nuclei = _tumour_nuclei(analysis, params, roi)
        masks, membrane_dab, tissue = membrane_future.result()
    centres = nuclei.centres
    px = analysis.pixel_size_um
    shape = analysis.densities.dab.shape
    index = np.flatnonzero(nuclei.counted)
    rings = cells_module.measure_rings(
        membrane_dab,
        analysis.densities.dab,
        tissue,
        centres,
        centres[index],
        px,
        min_radius_um=params.nucleus_diameter_um / 4.0,
        max_radius_um=params.max_cell_radius_um,
        boundary_margin_um=params.membrane_search_margin_um,
        weak_threshold_od=grades.faint_od,
        intense_threshold_od=grades.intense_od,
    )
    classes = cells_module.classify_cells(rings, rule.guideline, grades.intense_od, grades.moderate_od)
    fov_centres = analysis.to_fov(centres[index])
    # rays are measured in analysis pixels; the result gives them in µm from the nucleus centre
    radii_um = np.round(rings.radii_px * px, 1).tolist()  # 0.1 µm: a fifth of an analysis pixel
    levels = [row.tobytes().decode("ascii") for row in (rings.level + ord("0")).astype(np.uint8)]  # "0", "1", "2"
    completeness = np.round(rings.completeness, 4).tolist()
    intense_completeness = np.round(rings.intense_completeness, 4).tolist()
    ring_od = np.round(rings.ring_od, 4).tolist()
    nucleus_area = np.round(nuclei.area_um2[index], 1).tolist()
    # the values are made here and valid by construction: validating ~1000 cells per FOV would cost more than
    # measuring them
    cells = Cell.from_columns(
        {
            "row": fov_centres[:, 0].tolist(),
            "col": fov_centres[:, 1].tolist(),
            "her2_class": classes,
            "pattern": rings.pattern.tolist(),
            "completeness": completeness,
            "intense_completeness": intense_completeness,
            "membrane_od": ring_od,
            "nucleus_area_um2": nucleus_area,
            "ring_radii_um": [tuple(radii) for radii in radii_um],
            "ring_levels": levels,
        }
    )
    region = _cells_region(centres[index], rings.radii_px, shape, px)
    found = _FoundCells(cells, region, nuclei.excluded_rc, _no_membranes(shape), _no_membranes(shape))
    return found, masks


def _cells_region(
    centres: npt.NDArray[np.float64], radii_px: npt.NDArray[np.float64], shape: tuple[int, ...], px: float
) -> BoolArray:
    """Where the cells were counted (:func:`cells.counted_region`), brought back to ``shape``."""
    small, _ = cells_module.counted_region(cells_module.ring_points(centres, radii_px), shape, px)
    full = cv2.resize(small.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.asarray(full, dtype=bool)


def _membrane_inputs(
    analysis: AnalysisImage, params: ScoringParams, intense_threshold: float
) -> tuple[MembraneMasks, npt.NDArray[np.float32], BoolArray]:
    """What the rays read: the membrane masks, the membrane DAB averaged over half a membrane's width, and the
    tissue (not glass)."""
    px = analysis.pixel_size_um
    densities = analysis.densities
    masks = membrane_masks(analysis, params, intense_threshold, drop_specks=False)
    # a membrane is a continuous line about 1 µm wide: averaging over half of that keeps its OD and averages out
    # pixel noise and JPEG blocks, which a single pixel's maximum along a ray would pick up as "staining"
    membrane_dab = cv2.GaussianBlur(masks.membrane_dab, (0, 0), max(0.5, params.membrane_width_um / 4.0 / px))
    # glass: a ray that leaves the tissue (into a gland's lumen) has left its cell
    stain = cv2.GaussianBlur(cv2.add(densities.haematoxylin, densities.dab), (0, 0), max(0.7, 1.0 / px))
    tissue = np.asarray(stain, dtype=np.float32) > _GLASS_MAX_OD
    return masks, np.asarray(membrane_dab, dtype=np.float32), tissue


@dataclass(frozen=True, slots=True)
class _Nuclei:
    """The nuclei of a FOV (analysis pixels).

    Attributes
    ----------
    centres : (K, 2) every nucleus's centre (row, col)
    area_um2 : (K,) outline areas (0 for spindles, whose outline is not traced)
    counted : (K,) tumour nuclei inside the frame and the ROI: the cells to measure
    excluded_rc : nuclei inside the frame that are not tumour, shown as such
    """

    centres: npt.NDArray[np.float64]
    area_um2: npt.NDArray[np.float64]
    counted: BoolArray
    excluded_rc: npt.NDArray[np.float64]


def _tumour_nuclei(analysis: AnalysisImage, params: ScoringParams, roi: BoolArray | None) -> _Nuclei:
    """Every nucleus, its area, which are tumour (area, anisotropy, cohesion) and which of those are counted."""
    px = analysis.pixel_size_um
    densities = analysis.densities
    shape = densities.dab.shape
    centres, nucleus_scale = cells_module.find_nuclei(
        densities.haematoxylin, px, params.nucleus_diameter_um, params.nucleus_min_contrast_od
    )
    anisotropy = cells_module.nucleus_anisotropy(nucleus_scale, centres)
    # outlines are traced only for the nuclei that are not spindles (the others are no tumour whatever their area)
    area = np.zeros(len(centres))
    candidates = anisotropy <= params.max_tumour_nucleus_anisotropy
    area[candidates] = cells_module.nucleus_areas(
        densities.haematoxylin, centres[candidates], centres, px, params.nucleus_diameter_um
    )
    tumour = cells_module.tumour_nuclei(
        centres,
        area,
        anisotropy,
        px,
        min_area_um2=params.min_tumour_nucleus_area_um2,
        max_anisotropy=params.max_tumour_nucleus_anisotropy,
        neighbour_distance_um=params.tumour_neighbour_distance_um,
        min_neighbours=params.min_tumour_neighbours,
    )
    inside_frame = _inside_frame(centres, shape, params, px)
    counted = tumour & inside_frame
    if roi is not None:
        counted &= morphology.sample(roi, centres).astype(bool)
    return _Nuclei(centres, area, counted, centres[~tumour & inside_frame])


def _inside_frame(
    centres: npt.NDArray[np.float64], shape: tuple[int, ...], params: ScoringParams, px: float
) -> BoolArray:
    """Nuclei at least a cell radius from the frame: a cell closer to it is cut by it and its ring cannot be
    judged, as at the microscope."""
    edge = params.tumour_cell_diameter_um / 2.0 / px
    rows, cols = centres[:, 0], centres[:, 1]
    inside: BoolArray = (rows >= edge) & (rows <= shape[0] - 1 - edge) & (cols >= edge) & (cols <= shape[1] - 1 - edge)
    return inside


def _too_noisy(shape: tuple[int, ...], noise_od: float, weak_threshold_od: float) -> _FoundCells:
    """No cells, and why: pixel-to-pixel variation as large as barely perceptible staining hides every membrane."""
    return _FoundCells(
        (),
        np.zeros(shape, dtype=bool),
        np.zeros((0, 2)),
        _no_membranes(shape),
        _no_membranes(shape),
        (
            f"the image is too noisy to score: its pixel-to-pixel stain variation ({noise_od:.2f} OD) is as large "
            f"as barely perceptible membrane staining ({weak_threshold_od:.2f} OD); check exposure and focus",
        ),
    )


def _contour_hierarchy(
    analysis: AnalysisImage, masks: StainMasks, params: ScoringParams, roi: BoolArray | None
) -> _FoundCells:
    """The published method: complete membranes as innermost holes of M_weak and M_intense, and clear nuclei in the
    tumour region classed by their distance to stained membrane (see the module docstring)."""
    px = analysis.pixel_size_um
    weak, intense, region = masks.weak, masks.intense, masks.tumour_region
    if roi is not None:
        region = region & roi
    cell_radius_px = params.tumour_cell_diameter_um / 2.0 / px
    nucleus_radius_px = params.nucleus_diameter_um / 2.0 / px
    min_area, max_area = cell_area_bounds_px(params.min_cell_diameter_um, params.max_cell_diameter_um, px)
    # The three slowest steps are independent and OpenCV releases the GIL in them: run two of them on a
    # second thread (results are the same as serially; only the latency halves on a multi-core machine).
    with ThreadPoolExecutor(max_workers=1) as pool:
        intense_future = pool.submit(complete_membranes, intense, min_area, max_area, params.min_cell_solidity)
        nuclei_future = pool.submit(nuclei.clear_nuclei, masks.smooth_haematoxylin, masks.nuclei, nucleus_radius_px)
        weak_complete = complete_membranes(weak, min_area, max_area, params.min_cell_solidity)
        intense_complete = intense_future.result()
        p_clear = nuclei_future.result()

    p_intense = intense_complete.centres[morphology.sample(region, intense_complete.centres).astype(bool)]
    p_weak = weak_complete.centres[morphology.sample(region, weak_complete.centres).astype(bool)]
    p_two_plus = p_weak[~morphology.sample(intense_complete.filled, p_weak).astype(bool)]

    p_clear = p_clear[morphology.sample(region, p_clear).astype(bool)]
    # D_weak and D_intense are needed only at the nuclei; a 1 µm grid is ample for a dilation by a cell radius.
    coarse = max(1, round(_DILATION_PIXEL_SIZE_UM / px))
    in_d_weak = morphology.within(weak, cell_radius_px, p_clear, coarse)
    in_d_intense = morphology.within(intense, cell_radius_px, p_clear, coarse)
    in_complete = morphology.sample(weak_complete.filled | intense_complete.filled, p_clear).astype(bool)
    not_excluded = ~(in_d_intense | in_complete)
    p_one_plus = p_clear[in_d_weak & not_excluded]
    p_zero = p_clear[~in_d_weak & not_excluded]
    excluded = p_clear[in_d_intense & ~in_complete]  # next to intense staining: in no class
    cells = tuple(
        Cell(row=float(r), col=float(c), her2_class=her2_class)
        for her2_class, points in (
            (Her2Score.ZERO, p_zero),
            (Her2Score.ONE_PLUS, p_one_plus),
            (Her2Score.TWO_PLUS, p_two_plus),
            (Her2Score.THREE_PLUS, p_intense),
        )
        for r, c in analysis.to_fov(points)
    )
    return _FoundCells(cells, region, excluded, weak_complete, intense_complete)


def score_fov(
    image: npt.NDArray[np.generic],
    pixel_size_um: float,
    params: ScoringParams | None = None,
    *,
    control: ControlCalibration | None = None,
    roi_polygon: Sequence[RowCol] | None = None,
    rule: CaseRule | None = None,
    channel_order: ChannelOrder = "RGB",
) -> FovResult:
    """Score one FOV; see :func:`analyse_fov`, which also returns the masks."""
    return analyse_fov(
        image,
        pixel_size_um,
        params,
        control=control,
        roi_polygon=roi_polygon,
        rule=rule,
        channel_order=channel_order,
    ).result
