"""Scoring parameters: every size in µm, every stain level in optical density (OD, log10 units).

The models are frozen and reject unknown fields, so a typo in a config file is an error that names the field,
not a silently ignored setting.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

Vector3 = tuple[float, float, float]
PositiveUm = Annotated[float, Field(gt=0.0, le=1000.0)]
OpticalDensity = Annotated[float, Field(gt=0.0, le=3.0)]
Percent = Annotated[float, Field(ge=0.0, le=100.0)]


#: The pixel sizes a microscope camera can have in the specimen plane, µm per pixel: from beyond a 100x oil
#: objective's (about 0.06) to a 2x scanning objective's (about 3); 40x is about 0.25, 20x about 0.5.
MIN_PIXEL_SIZE_UM = 0.05
MAX_PIXEL_SIZE_UM = 5.0
PixelSize = Annotated[float, Field(gt=MIN_PIXEL_SIZE_UM, le=MAX_PIXEL_SIZE_UM)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StainVectors(_Frozen):
    """Optical-density colour vectors (R, G, B) of the two stains of a HER2 IHC slide.

    The defaults are Ruifrok & Johnston's (2001) haematoxylin and DAB vectors. They differ between stain kits and
    cameras; set measured ones per kit, or let the scorer estimate them from each image (Macenko et al. 2009).
    """

    haematoxylin: Vector3 = (0.650, 0.704, 0.286)
    dab: Vector3 = (0.268, 0.570, 0.776)
    estimate_from_image: bool = False

    @model_validator(mode="after")
    def _check_vectors(self) -> StainVectors:
        for name in ("haematoxylin", "dab"):
            vector = getattr(self, name)
            if not all(math.isfinite(v) and v >= 0 for v in vector) or math.hypot(*vector) < 1e-6:
                raise ValueError(f"{name} stain vector {vector} must be finite, non-negative and non-zero")
        h = _unit(self.haematoxylin)
        d = _unit(self.dab)
        cos = sum(a * b for a, b in zip(h, d, strict=True))
        if cos > 0.99:
            raise ValueError(
                f"haematoxylin {self.haematoxylin} and DAB {self.dab} vectors are nearly parallel "
                f"(cosine {cos:.3f}); the stains cannot be separated"
            )
        return self


def _unit(v: Vector3) -> Vector3:
    n = math.hypot(*v)
    return (v[0] / n, v[1] / n, v[2] / n)


class MembraneMethod(StrEnum):
    """How membrane staining is measured: per tumour cell (the default) or by the published method's contour
    hierarchy of the stain masks."""

    PER_CELL = "per-cell"
    CONTOUR_HIERARCHY = "contour-hierarchy"


class ScoringParams(_Frozen):
    """Parameters of the per-FOV scoring pipeline (Ruifrok deconvolution → masks → membranes → nuclei → counts).

    Sizes are in µm; the pixel size of the image (µm/px) is given with each image, not here, because it belongs
    to the objective and camera.
    """

    stains: StainVectors = StainVectors()
    membrane_method: MembraneMethod = Field(
        MembraneMethod.PER_CELL,
        description="per-cell: each tumour nucleus casts rays to its cell's boundary and the membrane DAB is "
        "measured along them (completeness, pattern, intensity per cell). contour-hierarchy: the published "
        "method, complete membranes as holes of the thresholded stain masks.",
    )
    analysis_pixel_size_um: PositiveUm = Field(
        0.5,
        description="Images finer than this are downsampled to it before analysis: membranes (~1 µm) stay "
        "resolved and a 40x FOV is analysed four times faster.",
    )
    weak_threshold_od: OpticalDensity = Field(
        0.10,
        description="DAB OD above which membrane is stained at all, ~barely perceptible brown (M_weak; per-cell "
        "method: a ray's membrane peak, or the batch's faint level if lower, see moderate_fraction_of_intense).",
    )
    membrane_width_um: PositiveUm = Field(
        2.0,
        description="Membranes are DAB ridges narrower than this. Diffuse cytoplasmic DAB, wider than it, is "
        "subtracted first (white top-hat), so that it neither joins cells nor hides their outlines.",
    )
    min_membrane_fragment_um2: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        4.0,
        description="Stained specks smaller than this (a 4 µm stretch of a 1 µm membrane) are noise, dust or "
        "JPEG artefacts, not membrane staining, and are dropped from M_weak.",
    )
    default_intense_threshold_od: OpticalDensity = Field(
        0.45, description="DAB OD for intense staining (M_intense) when no positive control was captured."
    )
    control_percentile_range: tuple[Percent, Percent] = Field(
        (50.0, 95.0),
        description="The intense threshold is the mean DAB OD of the control's stained membrane pixels whose OD "
        "lies between these percentiles, times control_intense_fraction.",
    )
    control_intense_fraction: Annotated[float, Field(gt=0.0, le=2.0)] = Field(
        0.55,
        description="Intense threshold as a fraction of the control's typical membrane DAB OD: 3+ membranes of "
        "the same batch stain at or above it along their whole ridge, 2+ membranes stay below.",
    )
    min_control_ridge_od: OpticalDensity = Field(
        0.45,
        description="A 3+ positive control's membrane ridge (the mean above) must reach this DAB OD; a fainter "
        "control fails QC, since calibrating on it would call moderate staining intense.",
    )
    tumour_cell_diameter_um: PositiveUm = Field(12.0, description="Typical tumour cell diameter.")
    min_cell_diameter_um: PositiveUm = Field(
        5.0,
        description="Smaller closed contours (pockets of background between stained membranes) are not cells.",
    )
    max_cell_diameter_um: PositiveUm = Field(30.0, description="Larger closed contours are not cells.")
    min_cell_solidity: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.7,
        description="Least area / convex-hull area of a complete membrane's interior: cells are roughly convex, "
        "the concave pocket between three round neighbours (about 0.6) is no cell.",
    )
    control_cell_intense_fraction: Annotated[float, Field(gt=0.0, le=2.0)] = Field(
        0.7,
        description="per-cell method: the intense threshold is this fraction of the median membrane DAB OD of the "
        "control's stained tumour cells, the geometric middle between the control's intense level and a moderate "
        "one at half its OD (sqrt(0.5) ~ 0.7): a ring within that of the control's is intense.",
    )
    moderate_fraction_of_intense: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        0.5,
        description="per-cell method: weak-to-moderate staining (2+) starts at this fraction of the intense "
        "threshold, and faint staining (1+) at its square (or at weak_threshold_od if lower). The guidelines' "
        "magnification rule spaces the grades: strong is seen at 2.5-5x, weak to moderate at 10-20x, faint only "
        "at 40x; each step is about half the contrast.",
    )
    nucleus_min_contrast_od: OpticalDensity = Field(
        0.015,
        description="per-cell method: a nucleus is a haematoxylin blob standing at least this OD above its "
        "surroundings at nucleus scale (difference of Gaussians); pale, faded nuclei are found by their contrast, "
        "not their absolute darkness.",
    )
    min_tumour_nucleus_area_um2: PositiveUm = Field(
        22.0,
        description="per-cell method: smaller nuclei (below ~5.3 µm across) are lymphocytes or debris, not "
        "carcinoma cells, whose nuclei are 6-12 µm across.",
    )
    max_tumour_nucleus_anisotropy: Annotated[float, Field(ge=1.0, le=100.0)] = Field(
        3.0,
        description="per-cell method: nuclei whose haematoxylin curves more than this many times as sharply across "
        "as along (Hessian at a quarter nucleus diameter) are spindle cells of stroma or smooth muscle; round to "
        "oval tumour nuclei, columnar ones included, stay under it.",
    )
    tumour_neighbour_distance_um: PositiveUm = Field(
        20.0,
        description="per-cell method: tumour cells are cohesive (sheets, glands, nests): a tumour nucleus has "
        "min_tumour_neighbours tumour-like nuclei within this distance (under two cell diameters).",
    )
    min_tumour_neighbours: Annotated[int, Field(ge=0, le=20)] = Field(
        2,
        description="per-cell method: see tumour_neighbour_distance_um; a cell in a sheet, gland or single-file cord "
        "has at least two such neighbours, a scattered stromal cell fewer.",
    )
    max_cell_radius_um: PositiveUm = Field(
        12.0,
        description="per-cell method: rays end this far from the nucleus centre at most (a tall columnar cell).",
    )
    membrane_search_margin_um: Annotated[float, Field(ge=0.0, le=20.0)] = Field(
        1.5,
        description="per-cell method: a ray looks for the membrane up to this far beyond the midline to the "
        "neighbouring nucleus (the membrane is rarely exactly half-way).",
    )
    haematoxylin_threshold_od: OpticalDensity = Field(
        0.12, description="H OD above which a pixel may be nuclear (nuclei are then found as local maxima)."
    )
    nucleus_diameter_um: PositiveUm = Field(
        8.0, description="Typical tumour nucleus diameter (carcinoma nuclei are 6-12 µm across)."
    )
    tumour_region_closing_um: PositiveUm = Field(
        8.0,
        description="The tumour region is the stained area (nuclei and DAB) closed by this radius, which joins "
        "the cells of a nest, ...",
    )
    tumour_region_opening_um: PositiveUm = Field(
        14.0,
        description="... then opened by this radius, which removes sparse stroma nuclei and thin strands, ...",
    )
    tumour_region_margin_um: Annotated[float, Field(ge=0.0, le=1000.0)] = Field(
        5.0,
        description="... and finally dilated by this margin, so that the cells on a nest's edge count too.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> ScoringParams:
        if self.min_cell_diameter_um >= self.max_cell_diameter_um:
            raise ValueError(
                f"min_cell_diameter_um ({self.min_cell_diameter_um}) must be below "
                f"max_cell_diameter_um ({self.max_cell_diameter_um})"
            )
        if not self.min_cell_diameter_um <= self.tumour_cell_diameter_um <= self.max_cell_diameter_um:
            raise ValueError(
                f"tumour_cell_diameter_um ({self.tumour_cell_diameter_um}) must lie between "
                f"min_cell_diameter_um and max_cell_diameter_um"
            )
        low, high = self.control_percentile_range
        if low >= high:
            raise ValueError(f"control_percentile_range {self.control_percentile_range} must be (low, high)")
        if self.weak_threshold_od >= self.default_intense_threshold_od:
            raise ValueError(
                f"weak_threshold_od ({self.weak_threshold_od}) must be below default_intense_threshold_od "
                f"({self.default_intense_threshold_od}): M_intense must be a subset of M_weak"
            )
        return self


class Guideline(StrEnum):
    """Which published HER2 IHC scoring guideline a case is scored by."""

    BREAST = "breast"  # ASCO/CAP 2018, reaffirmed 2023, with the 2025 consensus split of 0 into null / ultralow
    GASTRIC = "gastric"  # CAP/ASCP/ASCO 2016, gastroesophageal adenocarcinoma


class Specimen(StrEnum):
    """The kind of specimen; the gastric guideline scores a biopsy by clusters, a resection by shares."""

    RESECTION = "resection"
    BIOPSY = "biopsy"


class CaseRule(_Frozen):
    """The HER2 IHC rule over all tumour cells of a case (or of one FOV), chosen per case.

    ``guideline`` breast (the default): the ASCO/CAP 2018/2023 breast rule. ``guideline`` gastric: the 2016
    gastroesophageal adenocarcinoma guideline, by shares of tumour cells for a resection and by cohesive clusters
    of tumour cells for a biopsy (``specimen``). See scoring/case.py.
    """

    guideline: Guideline = Field(
        Guideline.BREAST,
        description="breast: ASCO/CAP 2018/2023 (0 split into null/ultralow); gastric: CAP/ASCP/ASCO 2016 "
        "gastroesophageal adenocarcinoma.",
    )
    specimen: Specimen = Field(
        Specimen.RESECTION,
        description="resection or biopsy; for gastric cases a biopsy is scored by its most stained cohesive "
        "cluster of cluster_min_cells tumour cells, whatever their share. The breast rule ignores it.",
    )
    cutoff_percent: Percent = Field(
        10.0,
        description="The guideline's 10% of tumour cells: breast takes more than it, a gastric resection at least it.",
    )
    min_3plus_percent_for_2plus: Percent = Field(
        1.0,
        description="3+ cells in no more than cutoff_percent make the case 2+ (unusual pattern) only when they "
        "reach this share; below it they are treated as isolated misclassifications. Breast only: the gastric "
        "guideline has no such pattern.",
    )
    min_tumour_cells: Annotated[int, Field(ge=1)] = Field(
        100, description="Fewer counted tumour cells than this give 'not assessable', never a guessed score."
    )
    cluster_min_cells: Annotated[int, Field(ge=2, le=1000)] = Field(
        5, description="The gastric biopsy guideline's 'tumor cell cluster (>= 5 cells)'."
    )
    cohesion_distance_um: PositiveUm = Field(
        18.0,
        description="Two tumour cells belong to one cohesive cluster when their centres are at most this far "
        "apart: neighbours that touch lie about one cell diameter (12 µm) apart, so 1.5 diameters joins "
        "touching cells of varied size and keeps cells parted by stroma apart.",
    )
