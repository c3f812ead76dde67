"""Synthetic HER2 immunohistochemistry (IHC) fields of view with exact per-cell ground truth.

The generator paints two stain concentration maps, haematoxylin (H, the blue nuclear counterstain) and DAB
(the brown HER2 chromogen), in optical density units (OD, log10), and turns them into an RGB camera image with
the Beer–Lambert law::

    I_c = I0 * 10 ** -(H * h_c + DAB * d_c)        for c in (R, G, B)

where ``h`` and ``d`` are the unit-normalised stain OD vectors (Ruifrok & Johnston 2001 by default). Optical
blur, camera noise and an optional JPEG round trip follow.

The tissue is glass, fibrous stroma with sparse elongated stroma nuclei, and tumour cells grouped in irregular
nests. Every nest cell is an ellipse (gland cells, below, are wedge-shaped polygons) with a nucleus and a DAB
membrane ring whose intensity and completeness follow its HER2 class (``MEMBRANE_DAB_OD``): 3+ intense
complete, 2+ weak-to-moderate complete, 1+ faint incomplete, 0 none. Classes are assigned per nest (tumours are
regionally heterogeneous) so that the per-cell fractions match the requested mix.

All geometry is specified in µm and converted with ``pixel_size_um`` (µm/px); coordinates are (row, col) with
pixel centres at integer positions. The module is pure: no I/O, no logging, no global random state; the output
is a deterministic function of the arguments and the seed.

Harder fields (all off by default in :func:`render_fov`; :func:`render_hard_fov` and :func:`render_hard_control`
turn them all on at the ``HARD_*`` levels):

- small gaps in complete rings (``ring_gaps``), which a pathologist still calls complete;
- glands of columnar cells around an empty lumen (``gland_fraction``), stained basolateral (U-shaped, open on
  the apical side that faces the lumen) or lateral (the two long sides only), as in gastro-oesophageal
  adenocarcinoma; every cell carries a ``membrane_pattern`` and a ``membrane_intensity`` and its truth class
  depends on the guideline (:meth:`SyntheticCell.truth_class`);
- pale nuclei of a faded or thin section (``pale_nucleus_fraction``) and crowded nuclei that touch or overlap
  across the membrane of a thick section (``nucleus_crowding``);
- lymphocytes and fibroblasts in the stroma, listed in ``SyntheticFov.other_nuclei`` (``lymphocyte_density``),
  and fields without tumour (``tissue``: stroma, smooth muscle, lymphocytes, glass);
- uneven illumination (``vignette``): the incident light falls off smoothly towards the corners.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, TypedDict, Unpack

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from her2scope.config.scoring import StainVectors
from her2scope.scoring.stains import Vector3
from her2scope.scoring.stains import stain_matrix as scorer_stain_matrix

__all__ = [
    "CELL_GAP_UM",
    "COLUMNAR_ASPECT",
    "COLUMNAR_HEIGHT_UM",
    "DEFAULT_CELL_DIAMETER_UM",
    "DEFAULT_STAIN_VECTORS",
    "FIBROBLAST_LENGTH_UM",
    "FIBROBLAST_WIDTH_UM",
    "GLAND_LUMEN_RADIUS_UM",
    "GLASS_LEVEL",
    "GUIDELINES",
    "HARD_BLUR_UM",
    "HARD_GLAND_FRACTION",
    "HARD_GLAND_INTENSE_FRACTION",
    "HARD_LYMPHOCYTE_DENSITY",
    "HARD_NOISE_SIGMA",
    "HARD_NUCLEUS_CROWDING",
    "HARD_NUCLEUS_DIAMETER_UM",
    "HARD_PALE_NUCLEUS_FRACTION",
    "HARD_VIGNETTE",
    "HER2_CLASSES",
    "INCOMPLETE_MEMBRANE_COVERAGE",
    "LYMPHOCYTE_DIAMETER_UM",
    "LYMPHOCYTE_H_OD",
    "MEMBRANE_DAB_OD",
    "MEMBRANE_JITTER",
    "MEMBRANE_PATTERNS",
    "MEMBRANE_WIDTH_UM",
    "MIN_CELL_PX",
    "MUSCLE_NUCLEUS_LENGTH_UM",
    "MUSCLE_NUCLEUS_WIDTH_UM",
    "NUCLEUS_OVERLAP_MAX",
    "OTHER_NUCLEUS_KINDS",
    "PALE_NUCLEUS_H_OD",
    "RING_GAP_COUNT",
    "RING_GAP_UM",
    "TISSUES",
    "OtherNucleus",
    "RenderOptions",
    "SyntheticCell",
    "SyntheticFov",
    "Vector3",
    "blank_fov",
    "render_control",
    "render_fov",
    "render_hard_control",
    "render_hard_fov",
    "stain_matrix",
    "truth_class",
    "vignette_gain",
]

HER2_CLASSES: Final[tuple[str, ...]] = ("0", "1+", "2+", "3+")

MEMBRANE_DAB_OD: Final[Mapping[str, float]] = MappingProxyType({"0": 0.0, "1+": 0.22, "2+": 0.40, "3+": 0.90})
"""Peak DAB OD drawn along the membrane ring per HER2 class at ``batch_strength`` 1.0, before per-cell jitter,
texture and optical blur (a 0.5 µm blur lowers the peak of a 1.25 µm ring by roughly 20%)."""

MEMBRANE_JITTER: Final[float] = 0.15
"""Per-cell relative jitter of the membrane DAB OD: a factor drawn uniformly from [1 - j, 1 + j]."""

INCOMPLETE_MEMBRANE_COVERAGE: Final[tuple[float, float]] = (0.25, 0.60)
"""Range of the total fraction of the perimeter covered by the 1–3 arcs of a 1+ membrane."""

MEMBRANE_WIDTH_UM: Final[float] = 1.25
"""Width of the membrane ring, drawn centred on the cell outline (at least 1 px)."""

CELL_GAP_UM: Final[float] = 1.5
"""Nominal gap between the outlines of neighbouring tumour cells."""

DEFAULT_CELL_DIAMETER_UM: Final[float] = 12.0
"""The tumour cell diameter of a render unless another is given."""

MIN_CELL_PX: Final[float] = 6.0
"""Tumour cells are drawn at least this many pixels across (a nucleus, a cytoplasm and a membrane ring)."""

GLASS_LEVEL: Final[int] = 245
"""Incident light level I0 (grey levels): what empty glass renders as, before noise."""

DEFAULT_STAIN_VECTORS: Final[tuple[Vector3, Vector3]] = (StainVectors().haematoxylin, StainVectors().dab)
"""The scorer's default haematoxylin and DAB OD vectors (R, G, B; Ruifrok & Johnston 2001), not yet normalised."""

MEMBRANE_PATTERNS: Final[tuple[str, ...]] = ("complete", "basolateral", "lateral", "partial", "none")
"""Where a cell's membrane is stained: all round; all but the apical side (U-shaped, the side facing a gland
lumen); the two lateral sides only; 1–3 short arcs anywhere; nowhere."""

GUIDELINES: Final[tuple[str, ...]] = ("breast", "gastric")
"""Scoring guidelines of :meth:`SyntheticCell.truth_class`: ASCO/CAP breast 2018/2023 and ASCO/CAP/ASCP
gastroesophageal 2016."""

TISSUES: Final[tuple[str, ...]] = ("tumour", "stroma", "muscle", "lymphocytes", "glass")
"""Field contents of ``render_fov(tissue=...)``: only "tumour" fields have tumour cells."""

OTHER_NUCLEUS_KINDS: Final[tuple[str, ...]] = ("fibroblast", "smooth_muscle", "lymphocyte")
"""Kinds of the non-tumour nuclei listed in ``SyntheticFov.other_nuclei``."""

RING_GAP_COUNT: Final[tuple[int, int]] = (1, 3)
"""Number of gaps cut into a complete ring when ``ring_gaps`` is on (inclusive range)."""

RING_GAP_UM: Final[tuple[float, float]] = (0.5, 1.5)
"""Length of each ring gap along the outline, µm: short breaks (at most ~12% of a 12 µm cell's ~38 µm
perimeter for three 1.5 µm gaps) that a pathologist still reads as a complete ring."""

COLUMNAR_HEIGHT_UM: Final[tuple[float, float]] = (18.0, 26.0)
"""Height (long axis) of the columnar cells of a gland: gastric-type columnar epithelium is ~20–25 µm tall."""

COLUMNAR_ASPECT: Final[tuple[float, float]] = (2.0, 3.0)
"""Height-to-width ratio (at mid-height) of columnar cells; the number of cells around the lumen follows."""

GLAND_LUMEN_RADIUS_UM: Final[tuple[float, float]] = (8.0, 20.0)
"""Radius of a gland lumen (empty, glass-like): small tubular glands of a moderately differentiated
adenocarcinoma."""

PALE_NUCLEUS_H_OD: Final[tuple[float, float]] = (0.12, 0.20)
"""Mean haematoxylin OD of a pale nucleus (faded or thin section), against 0.5–0.8 for a normal one; still above
the ~0.035–0.09 of cytoplasm and stroma."""

NUCLEUS_OVERLAP_MAX: Final[float] = 0.2
"""Crowded nuclei overlap by up to this fraction of their mean diameter (from 0, just touching): nuclei of
neighbouring cells seen through a 3–4 µm section, one above the other."""

FIBROBLAST_LENGTH_UM: Final[tuple[float, float]] = (10.0, 15.0)
"""Length of the elongated fibroblast nuclei of :func:`render_hard_fov` stroma."""

FIBROBLAST_WIDTH_UM: Final[tuple[float, float]] = (2.5, 3.5)
"""Width of the fibroblast nuclei."""

MUSCLE_NUCLEUS_LENGTH_UM: Final[tuple[float, float]] = (15.0, 25.0)
"""Length of the cigar-shaped (blunt-ended) smooth-muscle nuclei."""

MUSCLE_NUCLEUS_WIDTH_UM: Final[tuple[float, float]] = (3.0, 4.0)
"""Width of the smooth-muscle nuclei."""

LYMPHOCYTE_DIAMETER_UM: Final[tuple[float, float]] = (5.0, 7.0)
"""Diameter of the small round lymphocyte nuclei (about a red cell's 7 µm or less)."""

LYMPHOCYTE_H_OD: Final[tuple[float, float]] = (0.7, 1.0)
"""Haematoxylin OD of lymphocyte nuclei: dense chromatin, darker than tumour nuclei."""

HARD_GLAND_FRACTION: Final[float] = 0.35
"""Fraction of the tumour area in columnar glands in :func:`render_hard_fov` (a mixed solid/glandular
gastro-oesophageal adenocarcinoma)."""

HARD_GLAND_INTENSE_FRACTION: Final[float] = 0.5
"""Fraction of the breast-2+ basolateral/lateral gland cells whose membrane is intense (gastric 3+)."""

HARD_PALE_NUCLEUS_FRACTION: Final[float] = 0.25
"""Fraction of tumour nuclei rendered pale (``PALE_NUCLEUS_H_OD``) in :func:`render_hard_fov`."""

HARD_NUCLEUS_CROWDING: Final[float] = 0.3
"""Fraction of solid-nest tumour cells whose nucleus touches or overlaps a neighbour's."""

HARD_LYMPHOCYTE_DENSITY: Final[float] = 1.0
"""Lymphocytes per 1000 µm² of stroma, concentrated within ~25 µm of the nests (a mild peritumoural infiltrate);
in a stroma-only field a fifth of it, scattered."""

HARD_VIGNETTE: Final[float] = 0.18
"""Fall-off of the incident light to the farthest corner (10–25% is typical of a microscope camera without
flat-field correction); the optical centre is off the image centre by up to ``_HARD_VIGNETTE_OFFSET``."""

HARD_NUCLEUS_DIAMETER_UM: Final[float] = 7.0
"""Tumour nucleus diameter in :func:`render_hard_fov`: carcinoma nuclei (7–9 µm) are at least as large as
lymphocytes (5–7 µm), so size alone does not tell them apart."""

HARD_BLUR_UM: Final[float] = 0.6
"""Optical blur sigma, µm: a 40x/0.65 objective slightly out of focus."""

HARD_NOISE_SIGMA: Final[float] = 3.0
"""Camera noise sigma, grey levels: a small sensor at moderate gain."""

_DEFAULT_FRACTIONS: Final[Mapping[str, float]] = MappingProxyType({"3+": 1.0})
# Default membrane (pattern, intensity) per class of today's solid nests.
_SOLID_MEMBRANE: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {"0": ("none", "0"), "1+": ("partial", "1+"), "2+": ("complete", "2+"), "3+": ("complete", "3+")}
)
_HARD_VIGNETTE_OFFSET: Final = 0.15  # optical centre offset, fraction of the image size
_NON_TUMOUR_GLASS: Final[Mapping[str, float]] = MappingProxyType({"stroma": 0.2, "muscle": 0.1, "lymphocytes": 0.15})
_MUSCLE_CYTOPLASM_H: Final = 0.07  # pale, finely fibrillar smooth-muscle cytoplasm
_MUSCLE_NUCLEUS_H: Final = (0.3, 0.45)
_MUSCLE_PITCH_UM: Final = (30.0, 6.5)  # (along, across) the fascicle
_LYMPHOCYTE_PITCH_UM: Final = 8.0  # lattice pitch of a dense infiltrate (lymphocytes 5–7 µm)
_LYMPHOCYTE_JITTER_UM: Final = 1.5  # sigma of the random displacement of each lymphocyte
_LYMPHOCYTE_REACH_UM: Final = 25.0  # the scattered infiltrate thins out over this distance from the nests
_COLUMNAR_NUCLEUS_ASPECT: Final = (1.3, 1.8)  # elongated nuclei along the cell axis
_APICAL_MIN_UM: Final = 1.5  # narrowest apical side of a gland cell (fewer cells around a small lumen)

# Stain levels (OD) of the tissue components.
_STROMA_H_MEAN: Final = 0.055
_STROMA_H_RANGE: Final = (0.025, 0.09)
_STROMA_NUCLEUS_H: Final = (0.32, 0.48)
_STROMA_NUCLEUS_AXES_UM: Final = ((8.0, 12.0), (2.5, 3.5))  # full lengths (major, minor)
_STROMA_NUCLEUS_AREA_UM2: Final = 800.0  # one stroma nucleus per this much stroma
_INTERCELLULAR_H: Final = 0.035
_CYTOPLASM_H: Final = (0.035, 0.055)
_CYTOPLASM_DAB_MAX: Final = 0.012  # at batch strength 1, so <= 0.02 for batch strengths up to ~1.6
_TISSUE_DAB_BACKGROUND: Final = 0.004
_NUCLEUS_H: Final = (0.5, 0.8)
_NUCLEUS_TEXTURE: Final = 0.2
_DAB_TEXTURE: Final = 0.06
# Geometry.
_NEST_DIAMETER_CELLS: Final = (5.0, 12.5)  # nest diameter in cell diameters (60–150 µm for 12 µm cells)
_NEST_SEPARATION_UM: Final = 6.0
_NEST_CLOSING_UM: Final = 3.0  # the tumour mask is the cell footprints closed by this radius ...
_NEST_MARGIN_UM: Final = 1.0  # ... and grown by this margin, within the nest outline
_NEST_COVERAGE_BOOST: Final = 1.3  # nest outlines cover this x tumour_fraction (cells do not fill the rim)
_CELL_SIZE_JITTER: Final = 0.2
_SIZE_DRAW_LOW: Final = 0.95  # cells are drawn from [0.95, 1.2] x diameter; crowded ones shrink to 0.8
_CELL_MAX_ASPECT: Final = 1.3
_LATTICE_SPACING: Final = 1.12  # lattice pitch in cell diameters (plus the gap)
_NUCLEUS_SIZE_JITTER: Final = 0.1
_NUCLEUS_MAX_ASPECT: Final = 1.25
_MIN_SHAPE: Final = 32
_MAX_PIXELS: Final = 400_000_000
_STRIP_ROWS: Final = 1024
_SHIFT: Final = 4  # fractional bits of cv2 drawing coordinates
_SCALE: Final = 1 << _SHIFT
_FILL_BIAS_PX: Final = 0.35


class RenderOptions(TypedDict, total=False):
    """Keyword options of :func:`render_fov` that :func:`render_control` passes through."""

    tumour_fraction: float
    cell_diameter_um: float
    nucleus_diameter_um: float
    cell_heterogeneity: float
    blur_um: float
    noise_sigma: float
    jpeg_quality: int | None
    stain_vectors: tuple[Vector3, Vector3] | None
    tissue: str
    fractions_guideline: str
    ring_gaps: bool
    gland_fraction: float
    gland_intense_fraction: float
    pale_nucleus_fraction: float
    nucleus_crowding: float
    lymphocyte_density: float
    fibroblast_size_um: tuple[tuple[float, float], tuple[float, float]] | None
    vignette: float
    vignette_centre: tuple[float, float]


@dataclass(frozen=True, slots=True)
class SyntheticCell:
    """Ground truth of one rendered tumour cell.

    Attributes
    ----------
    row, col : float
        Cell centre in pixels of the returned image (pixel centres at integer coordinates).
    nucleus_row, nucleus_col : float
        Nucleus centre in pixels.
    diameter_um : float
        Equal-area diameter of the cell outline, µm.
    her2_class : str
        One of ``HER2_CLASSES``.
    membrane_complete : bool
        True for a closed membrane ring (2+, 3+), False for 1+ arcs and for 0.
    membrane_dab_od : float
        Peak DAB OD drawn along the membrane (after batch strength and per-cell jitter; before texture and
        optical blur); 0.0 for class "0".
    major_um, minor_um : float
        Full axis lengths of the cell outline ellipse, µm.
    angle_deg : float
        Rotation of the major axis in degrees, OpenCV convention (from the +col axis towards +row).
    nucleus_diameter_um : float
        Equal-area diameter of the nucleus, µm.
    membrane_coverage : float
        Fraction of the outline (by its parameter angle) covered by membrane DAB: 1.0 for a complete ring without
        gaps, about 0.88–0.99 with ``ring_gaps``, 0.25–0.60 for partial arcs, 0.0 for none.
    nest_id : int
        Index of the nest (or gland) the cell belongs to.
    membrane_pattern : str
        One of ``MEMBRANE_PATTERNS``. Empty (the default) means the pattern of today's solid nests for
        ``her2_class``: complete for 2+ and 3+, partial for 1+, none for 0.
    membrane_intensity : str
        Intensity level of the stained membrane, a key of ``MEMBRANE_DAB_OD``: "0" none, "1+" faint,
        "2+" weak to moderate, "3+" intense. Empty (the default) means ``her2_class``.
    membrane_arcs : tuple of (float, float)
        The stained spans of the outline as (start, end) in degrees, ``start`` in [0, 360), ``end`` > ``start``
        (may exceed 360). For an ellipse cell they are parameter angles: the point at ``t`` is
        ``(row, col) + R(angle_deg) @ (major/2 cos t, minor/2 sin t)`` as in ``cv2.ellipse``. For a gland cell
        (with an ``outline``) they are 360 x the fraction of the outline's perimeter from its first vertex.
        Empty for none and for cells built without it.
    gland_id : int
        Index of the gland of a columnar cell, -1 for solid-nest cells.
    nucleus_h_od : float
        Haematoxylin OD drawn in the nucleus (before texture and blur); 0.0 when unknown.
    outline : tuple of (float, float)
        The polygon outline (row, col) of a gland cell, empty for ellipse cells. Gland cells are wedge-shaped
        columns: vertex 0 is the middle of the apical side (on the lumen), then an apical corner, the basal
        corners and the other apical corner; the sides 1→2 and 3→4 are lateral, 2→3 basal, 4→0→1 apical. For
        them ``major_um`` is the height, ``minor_um`` the width at mid-height, ``angle_deg`` points from the
        basal side to the lumen and ``diameter_um`` is the polygon's equal-area diameter.

    Notes
    -----
    ``her2_class`` is always the breast truth, ``truth_class("breast")``: for today's complete/partial cells
    it is the class they were drawn as, so ``counts()`` and older code keep their meaning.
    """

    row: float
    col: float
    nucleus_row: float
    nucleus_col: float
    diameter_um: float
    her2_class: str
    membrane_complete: bool
    membrane_dab_od: float
    major_um: float = 0.0
    minor_um: float = 0.0
    angle_deg: float = 0.0
    nucleus_diameter_um: float = 0.0
    membrane_coverage: float = 0.0
    nest_id: int = -1
    membrane_pattern: str = ""
    membrane_intensity: str = ""
    membrane_arcs: tuple[tuple[float, float], ...] = ()
    gland_id: int = -1
    nucleus_h_od: float = 0.0
    outline: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.her2_class not in HER2_CLASSES:
            raise ValueError(f"her2_class must be one of {HER2_CLASSES}, got {self.her2_class!r}")
        pattern, intensity = self.membrane_pattern, self.membrane_intensity
        if not pattern:
            pattern = _SOLID_MEMBRANE[self.her2_class][0]
            object.__setattr__(self, "membrane_pattern", pattern)
        if not intensity:
            intensity = self.her2_class
            object.__setattr__(self, "membrane_intensity", intensity)
        if pattern not in MEMBRANE_PATTERNS:
            raise ValueError(f"membrane_pattern must be one of {MEMBRANE_PATTERNS}, got {pattern!r}")
        if intensity not in HER2_CLASSES:
            raise ValueError(f"membrane_intensity must be one of {HER2_CLASSES}, got {intensity!r}")
        if (pattern == "none") != (intensity == "0"):
            raise ValueError(f"membrane_pattern {pattern!r} and membrane_intensity {intensity!r} disagree")

    def truth_class(self, guideline: str = "breast") -> str:
        """The cell's HER2 class under a scoring guideline; see :func:`truth_class`.

        Parameters
        ----------
        guideline : {"breast", "gastric"}

        Returns
        -------
        str
            One of ``HER2_CLASSES``.
        """
        return truth_class(self.membrane_pattern, self.membrane_intensity, guideline)


@dataclass(frozen=True, slots=True)
class OtherNucleus:
    """Ground truth of one non-tumour nucleus (a scorer that counts it as a tumour cell is wrong).

    Attributes
    ----------
    kind : str
        One of ``OTHER_NUCLEUS_KINDS``.
    row, col : float
        Centre in pixels.
    major_um, minor_um : float
        Full length and width, µm.
    angle_deg : float
        Rotation of the long axis, OpenCV convention (from the +col axis towards +row).
    h_od : float
        Haematoxylin OD drawn (before texture and blur).
    """

    kind: str
    row: float
    col: float
    major_um: float
    minor_um: float
    angle_deg: float
    h_od: float


@dataclass(frozen=True, slots=True, eq=False)
class SyntheticFov:
    """A rendered field of view and its ground truth.

    Attributes
    ----------
    rgb : numpy.ndarray
        (rows, cols, 3) uint8 RGB image, read-only.
    cells : tuple of SyntheticCell
        The tumour cells (stroma nuclei are not listed).
    pixel_size_um : float
        µm per pixel.
    batch_strength : float
        Staining batch factor that multiplied every DAB OD.
    tumour_mask : numpy.ndarray
        (rows, cols) bool mask of the tumour nests and glands (not their lumens), read-only.
    other_nuclei : tuple of OtherNucleus
        The non-tumour nuclei (fibroblasts, smooth muscle, lymphocytes), in drawing order.
    tissue : str
        What the field shows, one of ``TISSUES``.
    vignette : float
        Fall-off of the incident light to the farthest corner (see :func:`vignette_gain`); 0.0 for none.
    vignette_centre : (float, float)
        Optical centre as fractions of (rows - 1, cols - 1).

    Notes
    -----
    Equality is identity (``eq=False``): element-wise array comparison has no single truth value.
    """

    rgb: NDArray[np.uint8]
    cells: tuple[SyntheticCell, ...]
    pixel_size_um: float
    batch_strength: float
    tumour_mask: NDArray[np.bool_]
    other_nuclei: tuple[OtherNucleus, ...] = ()
    tissue: str = "tumour"
    vignette: float = 0.0
    vignette_centre: tuple[float, float] = (0.5, 0.5)

    def counts(self, guideline: str = "breast") -> dict[str, int]:
        """Ground-truth number of tumour cells per HER2 class under a guideline.

        Parameters
        ----------
        guideline : {"breast", "gastric"}
            Classes by :meth:`SyntheticCell.truth_class`; they differ only for basolateral/lateral cells.

        Returns
        -------
        dict of str to int
            Keys ``HER2_CLASSES`` in order; classes without cells count 0.
        """
        _check_guideline(guideline)
        out = dict.fromkeys(HER2_CLASSES, 0)
        for cell in self.cells:
            out[cell.truth_class(guideline)] += 1
        return out

    def other_counts(self) -> dict[str, int]:
        """Number of non-tumour nuclei per kind (keys ``OTHER_NUCLEUS_KINDS`` in order)."""
        out = dict.fromkeys(OTHER_NUCLEUS_KINDS, 0)
        for nucleus in self.other_nuclei:
            out[nucleus.kind] += 1
        return out


def truth_class(membrane_pattern: str, membrane_intensity: str, guideline: str = "breast") -> str:
    """HER2 class of a tumour cell from its membrane pattern and intensity, under a scoring guideline.

    Parameters
    ----------
    membrane_pattern : str
        One of ``MEMBRANE_PATTERNS``.
    membrane_intensity : str
        "0" none, "1+" faint, "2+" weak to moderate, "3+" intense.
    guideline : {"breast", "gastric"}
        "gastric" (ASCO/CAP/ASCP 2016 gastroesophageal): complete, basolateral or lateral membranes score their
        intensity (faint 1+, moderate 2+, intense 3+); partial arcs score 1+ when stained. "breast" (ASCO/CAP
        2018/2023): complete membranes score their intensity; basolateral or lateral membranes score 2+ when
        moderate or intense (the guideline's unusual "moderate to intense but incomplete" pattern, scored
        equivocal) and 1+ when faint; partial arcs score 1+. No staining scores 0 under both.

    Returns
    -------
    str
        One of ``HER2_CLASSES``.

    Raises
    ------
    ValueError
        On an unknown pattern, intensity or guideline, or a stained pattern with intensity "0".
    """
    _check_guideline(guideline)
    if membrane_pattern not in MEMBRANE_PATTERNS:
        raise ValueError(f"membrane_pattern must be one of {MEMBRANE_PATTERNS}, got {membrane_pattern!r}")
    if membrane_intensity not in HER2_CLASSES:
        raise ValueError(f"membrane_intensity must be one of {HER2_CLASSES}, got {membrane_intensity!r}")
    if membrane_pattern == "none" or membrane_intensity == "0":
        if membrane_pattern != "none" or membrane_intensity != "0":
            raise ValueError(f"membrane_pattern {membrane_pattern!r} and intensity {membrane_intensity!r} disagree")
        return "0"
    if membrane_pattern == "partial":
        return "1+"
    if membrane_pattern == "complete" or guideline == "gastric":
        return membrane_intensity
    return "1+" if membrane_intensity == "1+" else "2+"  # breast, basolateral or lateral


def vignette_gain(
    shape: tuple[int, int], vignette: float, centre: tuple[float, float] = (0.5, 0.5)
) -> NDArray[np.float32]:
    """Relative incident light of the camera model: ``1 - vignette * rho**2``.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) in pixels.
    vignette : float
        Fall-off in [0, 0.5] at the image corner farthest from the optical centre.
    centre : (float, float)
        Optical centre as fractions of (rows - 1, cols - 1), each in [0, 1].

    Returns
    -------
    numpy.ndarray
        (rows, cols) float32 gain in [1 - vignette, 1]; ``rho`` is the distance from the optical centre divided by
        its distance to the farthest corner.
    """
    rows, cols = _check_shape(shape)
    v = _check_number("vignette", vignette, 0.0, 0.5)
    row_term, col_term = _vignette_terms(rows, cols, _check_centre(centre))
    gain: NDArray[np.float32] = (np.float32(1.0) - np.float32(v) * row_term[:, None]) - np.float32(v) * col_term
    return gain


# ----------------------------------------------------------------------------------------------- public API


def stain_matrix(stain_vectors: tuple[Vector3, Vector3] | None = None) -> NDArray[np.float64]:
    """Unit stain OD vectors as the rows of a 3x3 matrix (H, DAB, residual): the scorer's own
    (``scoring.stains.stain_matrix``), checked as the scorer's configuration checks them.

    Parameters
    ----------
    stain_vectors : tuple of two (R, G, B) float triples, optional
        Haematoxylin and DAB OD vectors; any positive scale. Default ``DEFAULT_STAIN_VECTORS``.

    Returns
    -------
    numpy.ndarray
        (3, 3) float64. Row 0 is the unit haematoxylin vector, row 1 the unit DAB vector, row 2 their
        normalised cross product. A pixel's OD row vector ``od = -log10(I / I0)`` (shape (3,)) is ``c @ M``
        for the concentrations ``c = (H, DAB, residual)``, so ``c = od @ inv(M)``.

    Raises
    ------
    ValueError
        If a vector is not three finite non-negative numbers, is zero, or the two are nearly parallel.
    """
    vectors = DEFAULT_STAIN_VECTORS if stain_vectors is None else stain_vectors
    if len(vectors) != 2:
        raise ValueError(f"stain_vectors must be (haematoxylin, dab), got {len(vectors)} vectors")
    try:
        checked = StainVectors(haematoxylin=vectors[0], dab=vectors[1])
    except ValidationError as error:
        raise ValueError(f"stain_vectors {vectors!r}: {error.errors()[0]['msg']}") from None
    return scorer_stain_matrix(checked.haematoxylin, checked.dab)


def blank_fov(shape: tuple[int, int] = (1080, 1920), level: int = GLASS_LEVEL) -> NDArray[np.uint8]:
    """Empty glass: a uniform RGB image.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) in pixels.
    level : int
        Grey level 0–255 of every channel.

    Returns
    -------
    numpy.ndarray
        (rows, cols, 3) uint8, writeable.
    """
    rows, cols = _check_shape(shape)
    if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level <= 255:
        raise ValueError(f"level must be an integer grey level in [0, 255], got {level!r}")
    return np.full((rows, cols, 3), level, dtype=np.uint8)


def render_control(
    shape: tuple[int, int] = (1080, 1920),
    pixel_size_um: float = 0.25,
    *,
    batch_strength: float = 1.0,
    seed: int | np.random.Generator = 0,
    **kwargs: Unpack[RenderOptions],
) -> SyntheticFov:
    """Render a positive-control tissue: every nest is HER2 3+.

    Parameters
    ----------
    shape, pixel_size_um, batch_strength, seed
        As for :func:`render_fov`.
    **kwargs
        Further :func:`render_fov` options; ``tumour_fraction`` defaults to 0.5 here.

    Returns
    -------
    SyntheticFov
        See :func:`render_fov`.
    """
    if "class_fractions" in kwargs:
        raise ValueError("render_control always renders 3+ cells; use render_fov for other class mixes")
    options: RenderOptions = {"tumour_fraction": 0.5}
    options.update(kwargs)
    return render_fov(shape, pixel_size_um, _DEFAULT_FRACTIONS, batch_strength=batch_strength, seed=seed, **options)


def render_fov(
    shape: tuple[int, int] = (1080, 1920),
    pixel_size_um: float = 0.25,
    class_fractions: Mapping[str, float] = _DEFAULT_FRACTIONS,
    *,
    batch_strength: float = 1.0,
    tumour_fraction: float = 0.45,
    cell_diameter_um: float = DEFAULT_CELL_DIAMETER_UM,
    nucleus_diameter_um: float = 6.0,
    cell_heterogeneity: float = 0.0,
    blur_um: float = 0.5,
    noise_sigma: float = 2.0,
    jpeg_quality: int | None = None,
    stain_vectors: tuple[Vector3, Vector3] | None = None,
    seed: int | np.random.Generator = 0,
    tissue: str = "tumour",
    fractions_guideline: str = "breast",
    ring_gaps: bool = False,
    gland_fraction: float = 0.0,
    gland_intense_fraction: float = 0.5,
    pale_nucleus_fraction: float = 0.0,
    nucleus_crowding: float = 0.0,
    lymphocyte_density: float = 0.0,
    fibroblast_size_um: tuple[tuple[float, float], tuple[float, float]] | None = None,
    vignette: float = 0.0,
    vignette_centre: tuple[float, float] = (0.5, 0.5),
) -> SyntheticFov:
    """Render a synthetic HER2 IHC field of view (or a large virtual slide) with per-cell ground truth.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the image in pixels, each at least 32.
    pixel_size_um : float
        µm per pixel, in (0.05, 5]; 0.25 for a 40x objective, 0.5 for 20x.
    class_fractions : mapping of str to float
        Fraction of tumour cells per HER2 class under ``fractions_guideline``, keys from ``HER2_CLASSES``
        (missing keys are 0), summing to 1. The per-cell counts match it up to rounding (before
        ``cell_heterogeneity``); whole nests share a class, except at most one nest per class boundary, which is
        split along a straight line (around the lumen in a gland).
    batch_strength : float
        Staining batch factor in [0, 3] multiplying every DAB OD.
    tumour_fraction : float
        Target fraction of the field covered by tumour nests, in [0, 0.75]; the rest is stroma and some glass.
        Placement is best effort: crowded fields may fall slightly short.
    cell_diameter_um : float
        Mean equal-area tumour cell diameter, µm (jitter ±20%, aspect up to 1.3).
    nucleus_diameter_um : float
        Mean equal-area nucleus diameter, µm, at most 0.75 x ``cell_diameter_um`` (scales with the cell size,
        ±10% jitter, aspect up to 1.25, clipped to fit inside the membrane).
    cell_heterogeneity : float
        Probability in [0, 1] that a cell takes a uniformly random different class from its nest's.
    blur_um : float
        Sigma of the Gaussian optical blur, µm (0 for none).
    noise_sigma : float
        Sigma of the additive Gaussian camera noise in grey levels (0 for none).
    jpeg_quality : int or None
        If given (1–100), the image goes through a JPEG encode/decode round trip at this quality.
    stain_vectors : tuple of two (R, G, B) float triples, optional
        Haematoxylin and DAB OD vectors (normalised here); default ``DEFAULT_STAIN_VECTORS``.
    seed : int or numpy.random.Generator
        Seed or generator; the same seed gives a byte-identical result. A generator is advanced.
    tissue : str
        One of ``TISSUES``. "tumour" (default) is today's field. "stroma" (fibrous stroma with sparse
        fibroblasts), "muscle" (smooth-muscle fascicles), "lymphocytes" (a dense lymphocytic infiltrate in stroma)
        and "glass" (no tissue) have no tumour cells: ``class_fractions``, ``tumour_fraction`` and the tumour
        options are ignored.
    fractions_guideline : {"breast", "gastric"}
        The guideline whose truth classes ``class_fractions`` sets. The other guideline's counts differ only in
        the gland cells: with "breast", a 2+ gland cell is basolateral/lateral and moderate (gastric 2+) or,
        with probability ``gland_intense_fraction``, intense (gastric 3+); with "gastric", a 3+ gland cell is
        basolateral/lateral intense (breast 2+) with that probability, else complete.
    ring_gaps : bool
        Cut ``RING_GAP_COUNT`` gaps of ``RING_GAP_UM`` into every complete ring (still truth "complete").
    gland_fraction : float
        Approximate fraction in [0, 1] of the tumour area in glands of columnar cells around an empty lumen;
        their 1+ and 2+ cells are stained basolateral or lateral, 0 none, 3+ complete (breast fractions).
    gland_intense_fraction : float
        See ``fractions_guideline``; in [0, 1].
    pale_nucleus_fraction : float
        Fraction in [0, 1] of tumour nuclei drawn with ``PALE_NUCLEUS_H_OD`` instead of 0.5–0.8.
    nucleus_crowding : float
        Fraction in [0, 1] of solid-nest cells (best effort) whose nucleus is pushed against a neighbour's so that
        the two touch or overlap by up to ``NUCLEUS_OVERLAP_MAX`` of their diameter (overlaps add their OD).
    lymphocyte_density : float
        Lymphocytes per 1000 µm² of stroma (0 to 50), denser near the nests; listed in ``other_nuclei``.
    fibroblast_size_um : ((float, float), (float, float)) or None
        (length range, width range) of the stroma's fibroblast nuclei, µm; None for today's (8–12, 2.5–3.5).
    vignette : float
        Fall-off in [0, 0.5] of the incident light to the farthest corner (:func:`vignette_gain`).
    vignette_centre : (float, float)
        Optical centre as fractions of (rows - 1, cols - 1).

    Returns
    -------
    SyntheticFov
        ``rgb`` (rows, cols, 3) uint8 RGB and ``tumour_mask`` (rows, cols) bool, both read-only; ``cells`` the
        tumour cells in drawing order; ``other_nuclei`` the fibroblasts, muscle nuclei and lymphocytes.

    Raises
    ------
    ValueError
        On any out-of-range or inconsistent argument; the message names it.
    """
    rows, cols = _check_shape(shape)
    px = _check_number("pixel_size_um", pixel_size_um, 0.05, 5.0, low_open=True)
    fractions = _check_fractions(class_fractions)
    batch = _check_number("batch_strength", batch_strength, 0.0, 3.0)
    tumour_fraction = _check_number("tumour_fraction", tumour_fraction, 0.0, 0.75)
    cell_d = _check_number("cell_diameter_um", cell_diameter_um, 0.0, 100.0, low_open=True)
    nucleus_d = _check_number("nucleus_diameter_um", nucleus_diameter_um, 0.0, 0.75 * cell_d, low_open=True)
    heterogeneity = _check_number("cell_heterogeneity", cell_heterogeneity, 0.0, 1.0)
    blur = _check_number("blur_um", blur_um, 0.0, 20.0)
    noise = _check_number("noise_sigma", noise_sigma, 0.0, 64.0)
    if jpeg_quality is not None and (
        isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int | np.integer) or not 1 <= jpeg_quality <= 100
    ):
        raise ValueError(f"jpeg_quality must be None or an integer in [1, 100], got {jpeg_quality!r}")
    if tissue not in TISSUES:
        raise ValueError(f"tissue must be one of {TISSUES}, got {tissue!r}")
    _check_guideline(fractions_guideline)
    if not isinstance(ring_gaps, bool):
        raise ValueError(f"ring_gaps must be True or False, got {ring_gaps!r}")
    gland_fraction = _check_number("gland_fraction", gland_fraction, 0.0, 1.0)
    intense = _check_number("gland_intense_fraction", gland_intense_fraction, 0.0, 1.0)
    pale = _check_number("pale_nucleus_fraction", pale_nucleus_fraction, 0.0, 1.0)
    crowding = _check_number("nucleus_crowding", nucleus_crowding, 0.0, 1.0)
    lymphocytes = _check_number("lymphocyte_density", lymphocyte_density, 0.0, 50.0)
    fibroblast = _check_fibroblast_size(fibroblast_size_um)
    vignette = _check_number("vignette", vignette, 0.0, 0.5)
    centre = _check_centre(vignette_centre)
    if tissue != "tumour":
        tumour_fraction = 0.0
    if tumour_fraction > 0 and cell_d / px < MIN_CELL_PX:
        raise ValueError(
            f"cell_diameter_um {cell_d} is only {cell_d / px:.1f} px at {px} µm/px; tumour cells need at least "
            f"{MIN_CELL_PX:g} px"
        )
    stains = stain_matrix(stain_vectors)
    rng = _check_seed(seed)

    scene = _Scene(rows, cols, px)
    cells: tuple[SyntheticCell, ...] = ()
    if tissue == "tumour":
        tissue_mask = scene.tissue_mask(rng, glass_fraction=0.25 * (1.0 - tumour_fraction))
        glands: list[_CellGeometry] = []
        forbidden = None
        if gland_fraction > 0.0 and tumour_fraction > 0.0:
            target_px = gland_fraction * min(0.9, _NEST_COVERAGE_BOOST * tumour_fraction) * rows * cols
            glands, forbidden = scene.place_glands(rng, tissue_mask, target_px, nucleus_d)
            tumour_fraction *= 1.0 - gland_fraction
        nests = scene.place_nests(rng, tissue_mask, tumour_fraction, cell_d, forbidden)
        tissue_mask |= scene.tumour.astype(bool)
        geometries = scene.place_cells(rng, nests, cell_d, nucleus_d)
        geometries += [replace(g, nest=len(nests) + g.gland) for g in glands]
        if scene.lumen is not None:
            tissue_mask &= ~scene.lumen
        scene.hug_cells()
        scene.paint_stroma(rng, tissue_mask, fibroblast)
        if lymphocytes > 0.0:
            scene.paint_lymphocytes(rng, tissue_mask & (scene.tumour == 0), lymphocytes)
        classes = _assign_classes(rng, geometries, fractions, heterogeneity)
        membranes = _membranes(rng, geometries, classes, fractions_guideline, intense)
        if crowding > 0.0:
            geometries = _crowd_nuclei(rng, geometries, crowding)
        cells = scene.paint_cells(rng, geometries, membranes, batch, ring_gaps, pale, layered=crowding > 0.0)
    elif tissue == "glass":
        tissue_mask = np.zeros((rows, cols), dtype=bool)
    else:
        tissue_mask = scene.tissue_mask(rng, glass_fraction=_NON_TUMOUR_GLASS[tissue])
        if tissue == "muscle":
            scene.paint_muscle(rng, tissue_mask)
        else:
            scene.paint_stroma(rng, tissue_mask, fibroblast or (FIBROBLAST_LENGTH_UM, FIBROBLAST_WIDTH_UM))
            if tissue == "lymphocytes":
                scene.paint_lymphocyte_sheet(rng, tissue_mask)
            if lymphocytes > 0.0:
                scene.paint_lymphocytes(rng, tissue_mask, lymphocytes)
    scene.finish_maps(rng, tissue_mask, batch)

    rgb = _optics(rng, scene.h, scene.dab, stains, px, blur, noise, vignette, centre)
    if jpeg_quality is not None:
        rgb = _jpeg_round_trip(rgb, int(jpeg_quality))
    rgb.flags.writeable = False
    mask = scene.tumour.astype(bool)
    mask.flags.writeable = False
    return SyntheticFov(
        rgb=rgb,
        cells=cells,
        pixel_size_um=px,
        batch_strength=batch,
        tumour_mask=mask,
        other_nuclei=tuple(scene.other),
        tissue=tissue,
        vignette=vignette,
        vignette_centre=centre,
    )


def render_hard_fov(
    shape: tuple[int, int] = (1080, 1920),
    pixel_size_um: float = 0.25,
    class_fractions: Mapping[str, float] = _DEFAULT_FRACTIONS,
    *,
    batch_strength: float = 1.0,
    seed: int | np.random.Generator = 0,
    guideline: str = "breast",
    **kwargs: Unpack[RenderOptions],
) -> SyntheticFov:
    """Render a hard, realistic field: :func:`render_fov` with every difficulty on at the ``HARD_*`` levels.

    Complete rings have gaps (``RING_GAP_UM``); ``gland_fraction`` of the tumour is columnar glands with
    basolateral/lateral membranes; nuclei are ``HARD_NUCLEUS_DIAMETER_UM``, ``HARD_PALE_NUCLEUS_FRACTION`` of them
    pale, and ``HARD_NUCLEUS_CROWDING`` of the solid-nest cells have crowded nuclei; the stroma has fibroblasts
    (``FIBROBLAST_LENGTH_UM`` x ``FIBROBLAST_WIDTH_UM``) and ``HARD_LYMPHOCYTE_DENSITY`` lymphocytes; the light
    falls off by ``HARD_VIGNETTE`` to the farthest corner from an optical centre off the image centre (drawn from
    the seed); blur ``HARD_BLUR_UM`` and noise ``HARD_NOISE_SIGMA``.

    Parameters
    ----------
    shape, pixel_size_um, batch_strength, seed
        As for :func:`render_fov`.
    class_fractions : mapping of str to float
        Per-cell truth fractions under ``guideline``, honoured up to rounding.
    guideline : {"breast", "gastric"}
        The guideline of ``class_fractions`` (``render_fov``'s ``fractions_guideline``); the other guideline's
        truth differs only for intense basolateral/lateral gland cells (breast 2+, gastric 3+), which are
        ``HARD_GLAND_INTENSE_FRACTION`` of the 2+ (breast) or 3+ (gastric) gland cells.
    **kwargs
        Any other :func:`render_fov` option, overriding the hard level; notably ``tissue`` (one of ``TISSUES``,
        default "tumour"; the others have no tumour cells) and ``gland_fraction`` (default
        ``HARD_GLAND_FRACTION``).

    Returns
    -------
    SyntheticFov
        See :func:`render_fov`.
    """
    if "fractions_guideline" in kwargs:
        raise ValueError("render_hard_fov takes the guideline of class_fractions as guideline=")
    rng = _check_seed(seed)
    # The optical centre is drawn from its own child generator, so that it does not shift the tissue's draws.
    centre_rng = np.random.default_rng(rng.integers(0, 2**63))
    offset = centre_rng.uniform(-_HARD_VIGNETTE_OFFSET, _HARD_VIGNETTE_OFFSET, 2)
    options: RenderOptions = {
        "ring_gaps": True,
        "gland_intense_fraction": HARD_GLAND_INTENSE_FRACTION,
        "pale_nucleus_fraction": HARD_PALE_NUCLEUS_FRACTION,
        "nucleus_crowding": HARD_NUCLEUS_CROWDING,
        "lymphocyte_density": HARD_LYMPHOCYTE_DENSITY,
        "fibroblast_size_um": (FIBROBLAST_LENGTH_UM, FIBROBLAST_WIDTH_UM),
        "vignette": HARD_VIGNETTE,
        "vignette_centre": (0.5 + float(offset[0]), 0.5 + float(offset[1])),
        "nucleus_diameter_um": HARD_NUCLEUS_DIAMETER_UM,
        "blur_um": HARD_BLUR_UM,
        "noise_sigma": HARD_NOISE_SIGMA,
        "fractions_guideline": guideline,
        "gland_fraction": HARD_GLAND_FRACTION,
    }
    tissue = kwargs.get("tissue", "tumour")
    if tissue != "tumour":
        options["lymphocyte_density"] = 0.2 * HARD_LYMPHOCYTE_DENSITY if tissue == "stroma" else 0.0
    options.update(kwargs)
    return render_fov(shape, pixel_size_um, class_fractions, batch_strength=batch_strength, seed=rng, **options)


def render_hard_control(
    shape: tuple[int, int] = (1080, 1920),
    pixel_size_um: float = 0.25,
    *,
    batch_strength: float = 1.0,
    seed: int | np.random.Generator = 0,
    **kwargs: Unpack[RenderOptions],
) -> SyntheticFov:
    """Render a hard 3+ positive control: intense complete membranes (with gaps), solid nests, same hardness.

    Parameters
    ----------
    shape, pixel_size_um, batch_strength, seed
        As for :func:`render_fov`.
    **kwargs
        Further :func:`render_hard_fov` options; ``tumour_fraction`` defaults to 0.5 and ``gland_fraction`` to 0
        here (controls are solid breast tissue or cell lines).

    Returns
    -------
    SyntheticFov
        See :func:`render_fov`; every cell is complete, intense, 3+ under both guidelines.
    """
    if "class_fractions" in kwargs or kwargs.get("tissue", "tumour") != "tumour":
        raise ValueError("render_hard_control always renders 3+ tumour; use render_hard_fov for other fields")
    options: RenderOptions = {"tumour_fraction": 0.5, "gland_fraction": 0.0}
    options.update(kwargs)
    return render_hard_fov(
        shape, pixel_size_um, _DEFAULT_FRACTIONS, batch_strength=batch_strength, seed=seed, **options
    )


# ------------------------------------------------------------------------------------------------ validation


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    try:
        rows, cols = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (rows, cols), got {shape!r}") from None
    for name, n in (("rows", rows), ("cols", cols)):
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise ValueError(f"shape {name} must be an integer, got {n!r}")
        if n < _MIN_SHAPE:
            raise ValueError(f"shape {shape!r} is too small: {name} must be at least {_MIN_SHAPE} px")
    if int(rows) * int(cols) > _MAX_PIXELS:
        raise ValueError(f"shape {shape!r} exceeds {_MAX_PIXELS} pixels")
    return int(rows), int(cols)


def _check_number(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v > high or v < low or (low_open and v == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def _check_seed(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer | np.random.Generator):
        raise ValueError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")
    if isinstance(seed, int | np.integer) and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng(seed)


def _check_guideline(guideline: str) -> None:
    if guideline not in GUIDELINES:
        raise ValueError(f"guideline must be one of {GUIDELINES}, got {guideline!r}")


def _check_centre(centre: tuple[float, float]) -> tuple[float, float]:
    try:
        row, col = centre
    except (TypeError, ValueError):
        raise ValueError(f"vignette_centre must be (row, col) fractions, got {centre!r}") from None
    return (_check_number("vignette_centre row", row, 0.0, 1.0), _check_number("vignette_centre col", col, 0.0, 1.0))


def _check_fibroblast_size(
    size: tuple[tuple[float, float], tuple[float, float]] | None,
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    if size is None:
        return None
    try:
        (l0, l1), (w0, w1) = size
    except (TypeError, ValueError):
        raise ValueError(f"fibroblast_size_um must be ((min, max) length, (min, max) width), got {size!r}") from None
    length = (_check_number("fibroblast length", l0, 0.5, 40.0), _check_number("fibroblast length", l1, 0.5, 40.0))
    width = (_check_number("fibroblast width", w0, 0.5, 40.0), _check_number("fibroblast width", w1, 0.5, 40.0))
    if length[0] > length[1] or width[0] > width[1] or width[1] > length[0]:
        raise ValueError(f"fibroblast_size_um ranges must be (min, max) with width <= length, got {size!r}")
    return length, width


def _check_fractions(class_fractions: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(class_fractions, Mapping):
        raise ValueError(f"class_fractions must be a mapping of HER2 class to fraction, got {class_fractions!r}")
    unknown = [k for k in class_fractions if k not in HER2_CLASSES]
    if unknown:
        raise ValueError(f"unknown HER2 class key(s) {unknown!r} in class_fractions; expected {HER2_CLASSES}")
    out = dict.fromkeys(HER2_CLASSES, 0.0)
    for key, value in class_fractions.items():
        out[key] = _check_number(f"class_fractions[{key!r}]", value, 0.0, 1.0)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"class_fractions must sum to 1 (within 1e-6), got {total!r}")
    return out


# ------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True)
class _Nest:
    r0: int
    c0: int
    mask: NDArray[np.uint8]  # local (r1 - r0, c1 - c0) mask of this nest, clipped to the image
    centre: tuple[float, float]


@dataclass(frozen=True, slots=True)
class _CellGeometry:
    nest: int
    row: float
    col: float
    semi_major: float  # px
    semi_minor: float  # px
    angle_deg: float
    nucleus_row: float
    nucleus_col: float
    nucleus_semi_major: float  # px
    nucleus_semi_minor: float  # px
    nucleus_angle_deg: float
    order_key: float  # position along the nest's split direction (angle around the lumen in a gland)
    gland: int = -1  # index of the gland of a columnar cell (its long axis points at the lumen)
    outline: tuple[tuple[float, float], ...] = ()  # polygon (row, col) of a gland cell, from its apical midpoint
    area_px: float = 0.0  # polygon area of a gland cell


@dataclass(frozen=True, slots=True)
class _WedgeHalfWidth:
    """Half-width of a gland cell at distance ``x`` (px) from the gland centre: its lateral sides run parallel to
    the boundaries of its wedge (half-angle pi/n), ``gap / 2`` inside them."""

    n: int
    gap: float

    def __call__(self, x: float | NDArray[np.float64]) -> float | NDArray[np.float64]:
        return (x * math.sin(math.pi / self.n) - 0.5 * self.gap) / math.cos(math.pi / self.n)


def _f32(array: object) -> NDArray[np.float32]:
    """View a cv2 result as a float32 array (no copy when it already is one)."""
    return np.asarray(array, dtype=np.float32)


def _q(x: float) -> float:
    """Round a pixel coordinate to the cv2 drawing grid (1 / 2**_SHIFT px)."""
    return round(x * _SCALE) / _SCALE


def _ellipse(
    img: NDArray[np.uint8] | NDArray[np.float32],
    row: float,
    col: float,
    semi_axes: tuple[float, float],
    angle_deg: float,
    value: float,
    thickness: int = -1,
    arc: tuple[float, float] = (0.0, 360.0),
    offset: tuple[int, int] = (0, 0),
) -> None:
    """Draw a (sub-pixel) ellipse into ``img`` in place; ``offset`` is the image's (row, col) origin."""
    centre = (round((col - offset[1]) * _SCALE), round((row - offset[0]) * _SCALE))
    # cv2 fills every pixel the outline touches, which widens a filled ellipse by ~0.7 px: compensate.
    shrink = _FILL_BIAS_PX if thickness < 0 else 0.0
    axes = tuple(max(0, round((semi - shrink) * _SCALE)) for semi in semi_axes)
    cv2.ellipse(img, centre, axes, angle_deg, arc[0], arc[1], value, thickness, cv2.LINE_8, _SHIFT)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], px: float, corr_um: float) -> NDArray[np.float32]:
    """Zero-mean, unit-variance Gaussian random field, correlation length ~``corr_um``, (rows, cols)."""
    rows, cols = shape
    step = max(px, corr_um / 2.5)
    gr = math.ceil(rows * px / step) + 2
    gc = math.ceil(cols * px / step) + 2
    grid = rng.standard_normal((gr, gc), dtype=np.float32)
    sigma = corr_um / step
    grid = _f32(cv2.GaussianBlur(grid, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT))
    sample = grid[:: max(1, gr // 512), :: max(1, gc // 512)]
    grid -= np.float32(sample.mean())
    grid *= np.float32(1.0 / max(float(sample.std()), 1e-12))
    return _f32(cv2.resize(grid, (cols, rows), interpolation=cv2.INTER_LINEAR))


def _fibre_texture(
    rng: np.random.Generator, shape: tuple[int, int], px: float, angle_rad: float
) -> NDArray[np.float32]:
    """Wavy fibrous texture (zero mean, unit variance) running along ``angle_rad``, shape (rows, cols)."""
    rows, cols = shape
    step = max(px, 0.5)  # µm per output texture sample
    along_step, across_step = 2.0, 0.5  # µm per sample of the anisotropic base noise
    gr = math.ceil(rows * px / step) + 1
    gc = math.ceil(cols * px / step) + 1
    reach_um = 0.5 * math.hypot(gr, gc) * step + 40.0
    base_rows = math.ceil(2.0 * reach_um / across_step)
    base_cols = math.ceil(2.0 * reach_um / along_step)
    base = rng.standard_normal((base_rows, base_cols), dtype=np.float32)
    base = _f32(
        cv2.GaussianBlur(base, (0, 0), sigmaX=6.0 / along_step, sigmaY=0.6 / across_step, borderType=cv2.BORDER_REFLECT)
    )
    bend_um = _smooth_noise(rng, (gr, gc), step, 40.0) * 5.0
    rr, cc = np.mgrid[0:gr, 0:gc].astype(np.float32)
    rr = (rr - gr / 2.0) * step
    cc = (cc - gc / 2.0) * step
    cos, sin = math.cos(angle_rad), math.sin(angle_rad)
    along = (cos * cc + sin * rr + reach_um) / along_step
    across = (-sin * cc + cos * rr + bend_um + reach_um) / across_step
    tex = _f32(cv2.remap(base, along, across, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    tex = (tex - tex.mean()) / max(float(tex.std()), 1e-12)
    return _f32(cv2.resize(tex, (cols, rows), interpolation=cv2.INTER_LINEAR))


def _nest_polygon(rng: np.random.Generator, centre: tuple[float, float], radius_px: float) -> NDArray[np.float64]:
    """Irregular closed blob outline around ``centre``: (n, 2) float (row, col) vertices."""
    n = 72
    theta = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    k = np.arange(2, 7)
    amplitude = rng.uniform(0.0, 0.35 / k)
    phase = rng.uniform(0.0, 2.0 * np.pi, k.size)
    radius = np.maximum(1.0 + amplitude @ np.cos(np.outer(k, theta) + phase[:, None]), 0.45)
    elong = rng.uniform(1.0, 1.5)
    u = radius * np.cos(theta) * math.sqrt(elong)
    v = radius * np.sin(theta) / math.sqrt(elong)
    phi = rng.uniform(0.0, np.pi)
    dc = (u * math.cos(phi) - v * math.sin(phi)) * radius_px
    dr = (u * math.sin(phi) + v * math.cos(phi)) * radius_px
    return np.stack([centre[0] + dr, centre[1] + dc], axis=1)


class _Scene:
    """Mutable stain maps and masks under construction (private; render_fov returns frozen results)."""

    def __init__(self, rows: int, cols: int, px: float) -> None:
        self.rows = rows
        self.cols = cols
        self.px = px
        self.h = np.zeros((rows, cols), dtype=np.float32)
        self.dab = np.zeros((rows, cols), dtype=np.float32)
        self.tumour = np.zeros((rows, cols), dtype=np.uint8)
        self.occupied = np.zeros((rows, cols), dtype=np.uint8)  # cell footprints (outline + half the gap)
        self.fibre_angle = 0.0
        self.lumen: NDArray[np.bool_] | None = None  # gland lumens (glass), if any
        self.other: list[OtherNucleus] = []  # non-tumour nuclei, in drawing order

    def tissue_mask(self, rng: np.random.Generator, glass_fraction: float) -> NDArray[np.bool_]:
        field = _smooth_noise(rng, (self.rows, self.cols), self.px, 60.0)
        threshold = float(np.quantile(field[::4, ::4], glass_fraction))
        result: NDArray[np.bool_] = field > threshold
        return result

    def place_nests(
        self,
        rng: np.random.Generator,
        tissue: NDArray[np.bool_],
        tumour_fraction: float,
        cell_d: float,
        forbidden: NDArray[np.uint8] | None = None,
    ) -> list[_Nest]:
        rows, cols, px = self.rows, self.cols, self.px
        target = min(0.9, _NEST_COVERAGE_BOOST * tumour_fraction) * rows * cols
        lo, hi = _NEST_DIAMETER_CELLS
        mean_area = math.pi / 4.0 * (cell_d * (lo + hi) / 2.0 / px) ** 2
        max_attempts = 200 + int(60.0 * target / mean_area)
        margin = max(1, round(_NEST_SEPARATION_UM / px))
        nests: list[_Nest] = []
        covered = 0
        for attempt in range(max_attempts):
            if covered >= target:
                break
            radius = cell_d * rng.uniform(lo, hi) / 2.0 / px
            centre = (rng.uniform(0.0, rows - 1.0), rng.uniform(0.0, cols - 1.0))
            if not tissue[round(centre[0]), round(centre[1])]:
                continue
            poly = _nest_polygon(rng, centre, radius)
            r0 = max(0, math.floor(poly[:, 0].min()) - margin - 1)
            r1 = min(rows, math.ceil(poly[:, 0].max()) + margin + 2)
            c0 = max(0, math.floor(poly[:, 1].min()) - margin - 1)
            c1 = min(cols, math.ceil(poly[:, 1].max()) + margin + 2)
            pts = np.round((poly[:, ::-1] - (c0, r0)) * _SCALE).astype(np.int32)
            existing = self.tumour[r0:r1, c0:c1]
            if attempt < max_attempts // 2:  # keep nests apart first; merge only if the field is crowded
                halo = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
                cv2.fillPoly(halo, [pts], 1, cv2.LINE_8, _SHIFT)
                cv2.polylines(halo, [pts], True, 1, 2 * margin + 1, cv2.LINE_8, _SHIFT)
                if np.any(halo & existing):
                    continue
            local = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
            cv2.fillPoly(local, [pts], 1, cv2.LINE_8, _SHIFT)
            if forbidden is not None and np.any(local & forbidden[r0:r1, c0:c1]):
                continue
            added = int(np.count_nonzero(local > existing))
            if added == 0:
                continue
            np.maximum(existing, local, out=existing)
            covered += added
            nests.append(_Nest(r0=r0, c0=c0, mask=local, centre=centre))
        return nests

    def hug_cells(self) -> None:
        """Shrink the tumour mask from the nest outlines to the packed cells (closed, plus a small margin)."""
        if not np.any(self.occupied):
            self.tumour[:] = 0
            return
        close_px = _NEST_CLOSING_UM / self.px
        margin_px = _NEST_MARGIN_UM / self.px
        to_cells = cv2.distanceTransform((self.occupied == 0).view(np.uint8), cv2.DIST_L2, 3)
        dilated = (to_cells <= close_px).view(np.uint8)
        closed = cv2.distanceTransform(dilated, cv2.DIST_L2, 3) > close_px - margin_px
        self.tumour &= closed.view(np.uint8)

    def paint_stroma(
        self,
        rng: np.random.Generator,
        tissue: NDArray[np.bool_],
        fibroblast: tuple[tuple[float, float], tuple[float, float]] | None = None,
    ) -> None:
        rows, cols, px = self.rows, self.cols, self.px
        self.fibre_angle = float(rng.uniform(0.0, np.pi))
        fibres = _fibre_texture(rng, (rows, cols), px, self.fibre_angle)
        patchy = _smooth_noise(rng, (rows, cols), px, 80.0)
        stroma_h = _STROMA_H_MEAN + 0.012 * fibres + 0.008 * patchy
        np.clip(stroma_h, *_STROMA_H_RANGE, out=stroma_h)
        stroma = tissue & (self.tumour == 0)
        np.copyto(self.h, stroma_h, where=stroma)
        np.copyto(self.h, np.float32(_INTERCELLULAR_H), where=self.tumour > 0)
        # Sparse elongated stroma nuclei, away from the nests, roughly along the fibres.
        reach = max(1, round(5.0 / px))
        area_um2 = float(np.count_nonzero(stroma)) * px * px
        n = int(rng.poisson(area_um2 / _STROMA_NUCLEUS_AREA_UM2))
        rr = rng.uniform(0.0, rows - 1.0, n)
        cc = rng.uniform(0.0, cols - 1.0, n)
        axes = _STROMA_NUCLEUS_AXES_UM if fibroblast is None else fibroblast
        major = rng.uniform(*axes[0], n) / 2.0 / px
        minor = rng.uniform(*axes[1], n) / 2.0 / px
        angle = np.degrees(self.fibre_angle) + rng.normal(0.0, 20.0, n)
        od = rng.uniform(*_STROMA_NUCLEUS_H, n)
        for i in range(n):
            r, c = round(rr[i]), round(cc[i])
            near = self.tumour[max(0, r - reach) : r + reach + 1, max(0, c - reach) : c + reach + 1]
            if tissue[r, c] and not near.any():
                _ellipse(self.h, rr[i], cc[i], (major[i], minor[i]), float(angle[i]), float(od[i]))
                self.other.append(
                    OtherNucleus(
                        kind="fibroblast",
                        row=float(rr[i]),
                        col=float(cc[i]),
                        major_um=2.0 * float(major[i]) * px,
                        minor_um=2.0 * float(minor[i]) * px,
                        angle_deg=float(angle[i]),
                        h_od=float(od[i]),
                    )
                )

    def place_cells(
        self, rng: np.random.Generator, nests: list[_Nest], cell_d: float, nucleus_d: float
    ) -> list[_CellGeometry]:
        """Pack non-overlapping cells into every nest on a jittered hexagonal lattice."""
        px = self.px
        occupied = self.occupied
        ring_half = max(1, round(MEMBRANE_WIDTH_UM / px)) / 2.0
        half_gap = CELL_GAP_UM / 2.0 / px
        pitch = (_LATTICE_SPACING * cell_d + CELL_GAP_UM) / px
        min_reach = 0.5 * (1.0 - _CELL_SIZE_JITTER) * cell_d / px + ring_half
        cells: list[_CellGeometry] = []
        for nest_id, nest in enumerate(nests):
            h, w = nest.mask.shape
            phi = rng.uniform(0.0, np.pi / 3.0)
            split = rng.uniform(0.0, 2.0 * np.pi)
            n_side = math.ceil(math.hypot(h, w) / pitch) + 2
            i, j = np.mgrid[-n_side : n_side + 1, -n_side : n_side + 1]
            lat_x = (j + 0.5 * (i % 2)) * pitch
            lat_y = i * pitch * math.sqrt(3.0) / 2.0
            cen_r = nest.centre[0] - nest.r0 + lat_x * math.sin(phi) + lat_y * math.cos(phi)
            cen_c = nest.centre[1] - nest.c0 + lat_x * math.cos(phi) - lat_y * math.sin(phi)
            cen_r = cen_r.ravel()
            cen_c = cen_c.ravel()
            inside = (cen_r >= 0) & (cen_r <= h - 1) & (cen_c >= 0) & (cen_c <= w - 1)
            cen_r, cen_c = cen_r[inside], cen_c[inside]
            # Skip lattice points too close to the nest outline for even the smallest, roundest cell.
            depth = cv2.distanceTransform(nest.mask, cv2.DIST_L2, 5)
            deep = depth[np.round(cen_r).astype(int), np.round(cen_c).astype(int)] >= min_reach
            cen_r, cen_c = cen_r[deep], cen_c[deep]
            order = rng.permutation(cen_r.size)
            for k in order:
                geometry = self._fit_cell(
                    rng,
                    nest,
                    nest_id,
                    occupied,
                    float(cen_r[k]) + nest.r0,
                    float(cen_c[k]) + nest.c0,
                    cell_d,
                    nucleus_d,
                    pitch,
                    ring_half,
                    half_gap,
                    split,
                )
                if geometry is not None:
                    cells.append(geometry)
        return cells

    def _fit_cell(
        self,
        rng: np.random.Generator,
        nest: _Nest,
        nest_id: int,
        occupied: NDArray[np.uint8],
        row: float,
        col: float,
        cell_d: float,
        nucleus_d: float,
        pitch: float,
        ring_half: float,
        half_gap: float,
        split: float,
    ) -> _CellGeometry | None:
        px = self.px
        row = _q(row + rng.normal(0.0, 0.04 * pitch))
        col = _q(col + rng.normal(0.0, 0.04 * pitch))
        scale = rng.uniform(_SIZE_DRAW_LOW, 1.0 + _CELL_SIZE_JITTER)
        aspect = rng.uniform(1.0, _CELL_MAX_ASPECT)
        angle = float(rng.uniform(0.0, 180.0))
        while True:
            d_px = cell_d * scale / px
            semi = (0.5 * d_px * math.sqrt(aspect), 0.5 * d_px / math.sqrt(aspect))
            if self._fits(nest, occupied, row, col, semi, angle, ring_half, half_gap):
                break
            # Crowded: shrink towards the lower size limit, then try a rounder outline, then give up.
            if scale > 1.0 - _CELL_SIZE_JITTER + 1e-9:
                scale = max(1.0 - _CELL_SIZE_JITTER, scale * 0.93)
            elif aspect > 1.0:
                aspect = 1.0
            else:
                return None
        # Nucleus: scales with the cell, clipped to stay clear of the membrane ring.
        n_aspect = rng.uniform(1.0, _NUCLEUS_MAX_ASPECT)
        n_d = nucleus_d * scale * rng.uniform(1.0 - _NUCLEUS_SIZE_JITTER, 1.0 + _NUCLEUS_SIZE_JITTER) / px
        n_semi_major = 0.5 * n_d * math.sqrt(n_aspect)
        room = semi[1] - ring_half - 0.3 / px
        if n_semi_major > room:
            n_d *= room / n_semi_major
            n_semi_major = room
        n_semi = (n_semi_major, 0.5 * n_d / math.sqrt(n_aspect))
        shift = min(rng.uniform(0.0, 0.1 * cell_d / px), max(0.0, room - n_semi_major))
        direction = rng.uniform(0.0, 2.0 * np.pi)
        return _CellGeometry(
            nest=nest_id,
            row=row,
            col=col,
            semi_major=semi[0],
            semi_minor=semi[1],
            angle_deg=angle,
            nucleus_row=_q(row + shift * math.sin(direction)),
            nucleus_col=_q(col + shift * math.cos(direction)),
            nucleus_semi_major=n_semi[0],
            nucleus_semi_minor=n_semi[1],
            nucleus_angle_deg=float(rng.uniform(0.0, 180.0)),
            order_key=row * math.sin(split) + col * math.cos(split),
        )

    def _fits(
        self,
        nest: _Nest,
        occupied: NDArray[np.uint8],
        row: float,
        col: float,
        semi: tuple[float, float],
        angle: float,
        ring_half: float,
        half_gap: float,
    ) -> bool:
        """Whether the cell and its ring lie inside the nest and its gap footprint is free; if so, occupy."""
        h, w = nest.mask.shape
        reach = semi[0] + max(ring_half, half_gap) + 2.0
        r0, r1 = math.floor(row - reach), math.ceil(row + reach) + 1
        c0, c1 = math.floor(col - reach), math.ceil(col + reach) + 1
        if r0 < nest.r0 or c0 < nest.c0 or r1 > nest.r0 + h or c1 > nest.c0 + w:
            return False
        outer = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
        _ellipse(outer, row, col, (semi[0] + ring_half, semi[1] + ring_half), angle, 1, offset=(r0, c0))
        if np.any(outer > nest.mask[r0 - nest.r0 : r1 - nest.r0, c0 - nest.c0 : c1 - nest.c0]):
            return False
        foot = np.zeros_like(outer)
        _ellipse(foot, row, col, (semi[0] + half_gap, semi[1] + half_gap), angle, 1, offset=(r0, c0))
        window = occupied[r0:r1, c0:c1]
        if np.any(foot & window):
            return False
        np.maximum(window, foot, out=window)
        return True

    def paint_cells(
        self,
        rng: np.random.Generator,
        geometries: list[_CellGeometry],
        membranes: list[tuple[str, str]],
        batch: float,
        ring_gaps: bool = False,
        pale_fraction: float = 0.0,
        layered: bool = False,
    ) -> tuple[SyntheticCell, ...]:
        """Draw every cell (cytoplasm, nucleus, membrane) and return its ground truth.

        ``membranes`` holds each cell's (pattern, intensity). With ``layered`` the nuclei go on a layer of their
        own drawn last, so that a crowded nucleus shows over its neighbour's cytoplasm and overlaps add OD.
        """
        px = self.px
        thickness = max(1, round(MEMBRANE_WIDTH_UM / px))
        n = len(geometries)
        pale = np.zeros(n, dtype=bool)
        pale_od = np.zeros(n)
        if pale_fraction > 0.0:
            pale = rng.random(n) < pale_fraction
            pale_od = rng.uniform(*PALE_NUCLEUS_H_OD, n)
        nuclei = np.zeros((self.rows, self.cols), dtype=np.float32) if layered else None
        cells = []
        for i, (g, (pattern, intensity)) in enumerate(zip(geometries, membranes, strict=True)):
            semi = (g.semi_major, g.semi_minor)
            n_semi = (g.nucleus_semi_major, g.nucleus_semi_minor)
            cytoplasm_h = float(rng.uniform(*_CYTOPLASM_H))
            cytoplasm_dab = float(rng.uniform(0.0, _CYTOPLASM_DAB_MAX) * batch)
            if g.outline:
                cv2.fillPoly(self.h, [_cv_points(g.outline)], cytoplasm_h, cv2.LINE_8, _SHIFT)
                cv2.fillPoly(self.dab, [_cv_points(g.outline)], cytoplasm_dab, cv2.LINE_8, _SHIFT)
            else:
                _ellipse(self.h, g.row, g.col, semi, g.angle_deg, cytoplasm_h)
                _ellipse(self.dab, g.row, g.col, semi, g.angle_deg, cytoplasm_dab)
            nucleus_od = float(rng.uniform(*_NUCLEUS_H))
            if pale[i]:
                nucleus_od = float(pale_od[i])
            if nuclei is None:
                _ellipse(self.h, g.nucleus_row, g.nucleus_col, n_semi, g.nucleus_angle_deg, nucleus_od)
                _ellipse(self.dab, g.nucleus_row, g.nucleus_col, n_semi, g.nucleus_angle_deg, 0.0)
            else:
                _add_ellipse(nuclei, g.nucleus_row, g.nucleus_col, n_semi, g.nucleus_angle_deg, nucleus_od)
            jitter = rng.uniform(1.0 - MEMBRANE_JITTER, 1.0 + MEMBRANE_JITTER)
            membrane_od = MEMBRANE_DAB_OD[intensity] * batch * jitter if intensity != "0" else 0.0
            coverage = 0.0
            arcs: list[tuple[float, float]] = []
            if pattern == "complete" and not ring_gaps:
                coverage = 1.0
                arcs = [(0.0, 360.0)]
                _ellipse(self.dab, g.row, g.col, semi, g.angle_deg, membrane_od, thickness)
            elif pattern == "partial":
                coverage = float(rng.uniform(*INCOMPLETE_MEMBRANE_COVERAGE))
                n_arcs = int(rng.integers(1, 4))
                arc_deg = coverage * 360.0 * rng.dirichlet(np.ones(n_arcs))
                gaps = (1.0 - coverage) * 360.0 * rng.dirichlet(np.ones(n_arcs))
                start = float(rng.uniform(0.0, 360.0))
                # Thick cv2 arcs get round caps of half the thickness at both ends: trim them off so that
                # the stained fraction of the outline is ``coverage``.
                cap_deg = math.degrees(0.5 * thickness / math.sqrt(g.semi_major * g.semi_minor))
                for arc, gap in zip(arc_deg, gaps, strict=True):
                    trim = min(cap_deg, 0.25 * float(arc))
                    _ellipse(
                        self.dab,
                        g.row,
                        g.col,
                        semi,
                        g.angle_deg,
                        membrane_od,
                        thickness,
                        arc=(start + trim, start + float(arc) - trim),
                    )
                    arcs.append((start % 360.0, start % 360.0 + float(arc)))
                    start += float(arc + gap)
            elif pattern != "none":
                arcs = _gapped_ring(rng, g, px) if pattern == "complete" else _side_arcs(g, pattern)
                coverage = sum(end - begin for begin, end in arcs) / 360.0
                self.draw_arcs(g, membrane_od, thickness, arcs)
            cells.append(
                SyntheticCell(
                    row=g.row,
                    col=g.col,
                    nucleus_row=g.nucleus_row,
                    nucleus_col=g.nucleus_col,
                    diameter_um=(
                        2.0 * math.sqrt(g.area_px / math.pi) * px
                        if g.outline
                        else 2.0 * math.sqrt(g.semi_major * g.semi_minor) * px
                    ),
                    her2_class=truth_class(pattern, intensity, "breast"),
                    membrane_complete=pattern == "complete",
                    membrane_dab_od=float(membrane_od),
                    major_um=2.0 * g.semi_major * px,
                    minor_um=2.0 * g.semi_minor * px,
                    angle_deg=g.angle_deg,
                    nucleus_diameter_um=2.0 * math.sqrt(g.nucleus_semi_major * g.nucleus_semi_minor) * px,
                    membrane_coverage=coverage,
                    nest_id=g.nest,
                    membrane_pattern=pattern,
                    membrane_intensity=intensity,
                    membrane_arcs=tuple(arcs),
                    gland_id=g.gland,
                    nucleus_h_od=nucleus_od,
                    outline=g.outline,
                )
            )
        if nuclei is not None:
            under = nuclei > 0
            # The nucleus hides the faint cytoplasmic DAB under it, not the membranes that cross it.
            self.dab[under & (self.dab <= np.float32(_CYTOPLASM_DAB_MAX * batch))] = 0.0
            np.copyto(self.h, nuclei, where=under)
        return tuple(cells)

    def draw_arcs(self, g: _CellGeometry, od: float, thickness: int, arcs: Sequence[tuple[float, float]]) -> None:
        """Draw stained outline spans (degrees of the outline), trimming the round caps so each span is exact."""
        semi = (g.semi_major, g.semi_minor)
        perimeter = _perimeter(g.outline) if g.outline else None
        for begin, end in arcs:
            if perimeter is not None:
                total = float(perimeter[-1])
                if end - begin >= 360.0:
                    pts = _cv_points(g.outline)
                    cv2.polylines(self.dab, [pts], True, od, thickness, cv2.LINE_8, _SHIFT)
                    continue
                s0, s1 = begin / 360.0 * total, end / 360.0 * total
                trim = min(0.5 * thickness, 0.25 * (s1 - s0))
                path = _perimeter_path(g.outline, perimeter, s0 + trim, s1 - trim)
                cv2.polylines(self.dab, [_cv_points(path)], False, od, thickness, cv2.LINE_8, _SHIFT)
            elif end - begin >= 360.0:
                _ellipse(self.dab, g.row, g.col, semi, g.angle_deg, od, thickness)
            else:
                trim0 = math.degrees(0.5 * thickness / _outline_speed(g, begin))
                trim1 = math.degrees(0.5 * thickness / _outline_speed(g, end))
                limit = 0.25 * (end - begin)
                arc = (begin + min(trim0, limit), end - min(trim1, limit))
                _ellipse(self.dab, g.row, g.col, semi, g.angle_deg, od, thickness, arc=arc)

    def place_glands(
        self, rng: np.random.Generator, tissue: NDArray[np.bool_], target_px: float, nucleus_d: float
    ) -> tuple[list[_CellGeometry], NDArray[np.uint8]]:
        """Place round glands of columnar cells around empty lumens; return the cells and the glands' halo.

        A gland is one layer of ``n`` cells around a lumen of radius ``r``. Each cell fills its wedge of the ring
        between ``r`` (its apical side, on the lumen) and ``r + height`` (its basal side), its lateral sides
        ``CELL_GAP_UM`` from its neighbours'; ``n`` makes the width at mid-height ``height / COLUMNAR_ASPECT``.
        The elongated nucleus sits at the basal end. The glands are drawn into the tumour mask (without the
        lumen) and the cell footprints; the lumens are kept in ``self.lumen``.
        """
        rows, cols, px = self.rows, self.cols, self.px
        ring_half = max(1, round(MEMBRANE_WIDTH_UM / px)) / 2.0
        gap = CELL_GAP_UM / px
        margin = _NEST_SEPARATION_UM / px
        clear = ring_half + 0.3 / px  # nucleus to membrane
        forbidden = np.zeros((rows, cols), dtype=np.uint8)
        lumen = np.zeros((rows, cols), dtype=np.uint8)
        cells: list[_CellGeometry] = []
        covered = 0.0
        gland = 0
        t = np.linspace(0.0, 2.0 * np.pi, 32, endpoint=False)
        for _ in range(300):
            if covered >= target_px:
                break
            r_lumen = rng.uniform(*GLAND_LUMEN_RADIUS_UM) / px
            height = rng.uniform(*COLUMNAR_HEIGHT_UM) / px
            width = height / rng.uniform(*COLUMNAR_ASPECT)
            n = max(4, round(2.0 * math.pi * (r_lumen + 0.5 * height) / (width + gap)))
            while n > 4 and 2.0 * (r_lumen * math.sin(math.pi / n) - 0.5 * gap) < _APICAL_MIN_UM / px:
                n -= 1
            r_outer = r_lumen + height + ring_half + 1.0 / px
            reach = r_outer + margin
            if 2.0 * reach + 2.0 >= min(rows, cols):
                continue
            centre = (rng.uniform(reach, rows - 1.0 - reach), rng.uniform(reach, cols - 1.0 - reach))
            if not tissue[round(centre[0]), round(centre[1])]:
                continue
            r0, r1 = math.floor(centre[0] - reach), math.ceil(centre[0] + reach) + 1
            c0, c1 = math.floor(centre[1] - reach), math.ceil(centre[1] + reach) + 1
            halo = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
            _ellipse(halo, centre[0], centre[1], (reach, reach), 0.0, 1, offset=(r0, c0))
            if np.any(halo & forbidden[r0:r1, c0:c1]):
                continue
            np.maximum(forbidden[r0:r1, c0:c1], halo, out=forbidden[r0:r1, c0:c1])
            _ellipse(self.tumour, centre[0], centre[1], (r_outer, r_outer), 0.0, 1)
            _ellipse(self.tumour, centre[0], centre[1], (r_lumen, r_lumen), 0.0, 0)
            _ellipse(lumen, centre[0], centre[1], (r_lumen, r_lumen), 0.0, 1)
            theta0 = rng.uniform(0.0, 2.0 * np.pi / n)
            half_width = _WedgeHalfWidth(n, gap)
            for k in range(n):
                theta = theta0 + 2.0 * np.pi * k / n
                basal = r_lumen + height * rng.uniform(0.9, 1.0)
                radial = np.array([math.sin(theta), math.cos(theta)])  # (row, col), away from the lumen
                across = np.array([math.cos(theta), -math.sin(theta)])
                local = [(r_lumen, 0.0), (r_lumen, 1.0), (basal, 1.0), (basal, -1.0), (r_lumen, -1.0)]
                outline = tuple(
                    (
                        _q(centre[0] + x * radial[0] + side * float(half_width(x)) * across[0]),
                        _q(centre[1] + x * radial[1] + side * float(half_width(x)) * across[1]),
                    )
                    for x, side in local
                )
                # An elongated nucleus along the axis at the basal end, shrunk until it fits inside the membrane.
                n_aspect = rng.uniform(*_COLUMNAR_NUCLEUS_ASPECT)
                n_d = nucleus_d * rng.uniform(1.0 - _NUCLEUS_SIZE_JITTER, 1.0 + _NUCLEUS_SIZE_JITTER) / px
                n_a, n_b = 0.5 * n_d * math.sqrt(n_aspect), 0.5 * n_d / math.sqrt(n_aspect)
                n_a = min(n_a, 0.4 * (basal - r_lumen))
                gap_basal = rng.uniform(0.3, 1.2) / px
                x_n = basal - clear - gap_basal - n_a
                for _shrink in range(20):
                    xs = x_n + n_a * np.cos(t)
                    ys = n_b * np.sin(t)
                    if np.all(np.abs(ys) <= half_width(xs) - clear) and xs.min() >= r_lumen + clear:
                        break
                    n_a, n_b = 0.92 * n_a, 0.92 * n_b
                    x_n = basal - clear - gap_basal - n_a
                nucleus = centre[0] + x_n * radial[0], centre[1] + x_n * radial[1]
                fill = _cv_points(outline)
                cv2.fillPoly(self.occupied, [fill], 1, cv2.LINE_8, _SHIFT)
                cv2.polylines(self.occupied, [fill], True, 1, max(1, round(gap)), cv2.LINE_8, _SHIFT)
                mid = r_lumen + 0.5 * (basal - r_lumen)
                area = _polygon_area(outline)
                centroid = _polygon_centroid(outline)
                cells.append(
                    _CellGeometry(
                        nest=-1,
                        row=centroid[0],
                        col=centroid[1],
                        semi_major=0.5 * (basal - r_lumen),
                        semi_minor=float(half_width(mid)),
                        angle_deg=(math.degrees(theta) + 180.0) % 360.0,  # towards the lumen (apical)
                        nucleus_row=_q(nucleus[0]),
                        nucleus_col=_q(nucleus[1]),
                        nucleus_semi_major=n_a,
                        nucleus_semi_minor=n_b,
                        nucleus_angle_deg=math.degrees(theta) % 180.0,
                        order_key=theta,
                        gland=gland,
                        outline=outline,
                        area_px=area,
                    )
                )
            covered += math.pi * r_outer**2
            gland += 1
        self.lumen = lumen.astype(bool)
        return cells, forbidden

    def paint_lymphocytes(self, rng: np.random.Generator, stroma: NDArray[np.bool_], density: float) -> None:
        """Scatter ``density`` lymphocytes per 1000 µm² of ``stroma``, denser near the tumour, not overlapping."""
        px = self.px
        area_um2 = float(np.count_nonzero(stroma)) * px * px
        n = int(rng.poisson(density * area_um2 / 1000.0))
        if n == 0:
            return
        if np.any(self.tumour):
            distance_um = cv2.distanceTransform((self.tumour == 0).view(np.uint8), cv2.DIST_L2, 3) * px
        else:
            distance_um = None
        m = 30 * n
        rr = rng.uniform(0.0, self.rows - 1.0, m)
        cc = rng.uniform(0.0, self.cols - 1.0, m)
        accept = rng.random(m)
        diameter = rng.uniform(*LYMPHOCYTE_DIAMETER_UM, m)
        placed = 0
        for i in range(m):
            if placed >= n:
                break
            r, c = round(rr[i]), round(cc[i])
            if not stroma[r, c]:
                continue
            if distance_um is not None:
                weight = 0.05 + 0.95 * math.exp(-float(distance_um[r, c]) / _LYMPHOCYTE_REACH_UM)
                if accept[i] > weight:
                    continue
            if self.lymphocyte(rng, float(rr[i]), float(cc[i]), float(diameter[i]), check=True):
                placed += 1

    def paint_lymphocyte_sheet(self, rng: np.random.Generator, tissue: NDArray[np.bool_]) -> None:
        """A dense lymphocytic infiltrate over ~2/3 of the tissue: small dark nuclei, crowded but irregular.

        A hexagonal lattice of pitch ``_LYMPHOCYTE_PITCH_UM`` with 20% of its points dropped and the rest moved by
        ``_LYMPHOCYTE_JITTER_UM`` (so neighbours may touch or overlap a little, as in a section of a sheet).
        """
        rows, cols, px = self.rows, self.cols, self.px
        field = _smooth_noise(rng, (rows, cols), px, 60.0)
        region = tissue & (field > float(np.quantile(field[::4, ::4], 0.3)))
        pitch = _LYMPHOCYTE_PITCH_UM / px
        i, j = np.mgrid[0 : math.ceil(rows / (pitch * math.sqrt(3.0) / 2.0)) + 1, 0 : math.ceil(cols / pitch) + 1]
        rr = (i * pitch * math.sqrt(3.0) / 2.0).ravel() + rng.normal(0.0, _LYMPHOCYTE_JITTER_UM / px, i.size)
        cc = ((j + 0.5 * (i % 2)) * pitch).ravel() + rng.normal(0.0, _LYMPHOCYTE_JITTER_UM / px, i.size)
        keep = rng.random(i.size) < 0.8
        diameter = rng.uniform(*LYMPHOCYTE_DIAMETER_UM, i.size)
        inside = keep & (rr >= 0) & (rr <= rows - 1) & (cc >= 0) & (cc <= cols - 1)
        for k in np.flatnonzero(inside):
            r, c = round(rr[k]), round(cc[k])
            if region[r, c] and self.h[r, c] < 0.2:
                self.lymphocyte(rng, float(rr[k]), float(cc[k]), float(diameter[k]), check=False)

    def lymphocyte(self, rng: np.random.Generator, row: float, col: float, diameter_um: float, check: bool) -> bool:
        """Draw one round lymphocyte nucleus unless (with ``check``) it would touch a nucleus or the tumour."""
        px = self.px
        radius = 0.5 * diameter_um / px
        if check:
            reach = math.ceil(radius + 0.5 / px)
            r0, c0 = max(0, round(row) - reach), max(0, round(col) - reach)
            window = (slice(r0, round(row) + reach + 1), slice(c0, round(col) + reach + 1))
            if np.any(self.h[window] > 0.2) or np.any(self.tumour[window]):
                return False
        aspect = rng.uniform(1.0, 1.12)
        angle = float(rng.uniform(0.0, 180.0))
        od = float(rng.uniform(*LYMPHOCYTE_H_OD))
        semi = (radius * math.sqrt(aspect), radius / math.sqrt(aspect))
        _ellipse(self.h, row, col, semi, angle, od)
        self.other.append(
            OtherNucleus(
                kind="lymphocyte",
                row=row,
                col=col,
                major_um=2.0 * semi[0] * px,
                minor_um=2.0 * semi[1] * px,
                angle_deg=angle,
                h_od=od,
            )
        )
        return True

    def paint_muscle(self, rng: np.random.Generator, tissue: NDArray[np.bool_]) -> None:
        """Smooth muscle: three fascicles of pale fibrillar cytoplasm with dense parallel cigar-shaped nuclei."""
        rows, cols, px = self.rows, self.cols, self.px
        theta0 = float(rng.uniform(0.0, np.pi))
        self.fibre_angle = theta0
        field = _smooth_noise(rng, (rows, cols), px, 120.0)
        q = np.quantile(field[::4, ::4], [1.0 / 3.0, 2.0 / 3.0])
        band = np.digitize(field, q)
        cleft = (np.abs(field - np.float32(q[0])) < 0.03) | (np.abs(field - np.float32(q[1])) < 0.03)
        fibres = _fibre_texture(rng, (rows, cols), px, theta0)
        h = np.float32(_MUSCLE_CYTOPLASM_H) + np.float32(0.01) * fibres
        np.clip(h, 0.04, 0.1, out=h)
        h[cleft] = 0.02  # thin loose clefts between the fascicles
        np.copyto(self.h, h, where=tissue)
        along, across = (step / px for step in _MUSCLE_PITCH_UM)
        half = 0.5 * math.hypot(rows, cols)
        for k in range(3):
            theta = theta0 + float(rng.uniform(-0.6, 0.6))
            sin, cos = math.sin(theta), math.cos(theta)
            j = np.arange(-math.ceil(half / across), math.ceil(half / across) + 1)
            i = np.arange(-math.ceil(half / along) - 1, math.ceil(half / along) + 1)
            ii, jj = np.meshgrid(i, j)
            offset = rng.uniform(0.0, along, j.size)[:, None]
            u = (ii * along + offset).ravel() + rng.uniform(-2.0, 2.0, ii.size) / px
            v = (jj * across).ravel() + rng.uniform(-0.6, 0.6, ii.size) / px
            rr = 0.5 * (rows - 1) + u * sin + v * cos
            cc = 0.5 * (cols - 1) + u * cos - v * sin
            keep = rng.random(ii.size) < 0.8
            length = rng.uniform(*MUSCLE_NUCLEUS_LENGTH_UM, ii.size)
            width = rng.uniform(*MUSCLE_NUCLEUS_WIDTH_UM, ii.size)
            tilt = rng.normal(0.0, 3.0, ii.size)
            od = rng.uniform(*_MUSCLE_NUCLEUS_H, ii.size)
            inside = keep & (rr >= 0) & (rr <= rows - 1) & (cc >= 0) & (cc <= cols - 1)
            for m in np.flatnonzero(inside):
                r, c = round(rr[m]), round(cc[m])
                if not tissue[r, c] or band[r, c] != k or cleft[r, c]:
                    continue
                angle = math.degrees(theta) + float(tilt[m])
                self.capsule(float(rr[m]), float(cc[m]), float(length[m]), float(width[m]), angle, float(od[m]))

    def capsule(self, row: float, col: float, length_um: float, width_um: float, angle_deg: float, od: float) -> None:
        """Draw a cigar-shaped (round-ended) smooth-muscle nucleus unless it would touch another nucleus."""
        px = self.px
        half = 0.5 * (length_um - width_um) / px
        rad = math.radians(angle_deg)
        reach = math.ceil(0.5 * length_um / px + 2)
        r0, c0 = max(0, round(row) - reach), max(0, round(col) - reach)
        r1, c1 = min(self.rows, round(row) + reach + 1), min(self.cols, round(col) + reach + 1)
        patch = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
        dc, dr = half * math.cos(rad), half * math.sin(rad)
        ends = [(round((col - c0 + s * dc) * _SCALE), round((row - r0 + s * dr) * _SCALE)) for s in (-1.0, 1.0)]
        cv2.line(patch, ends[0], ends[1], 1, max(1, round(width_um / px)), cv2.LINE_8, _SHIFT)
        window = self.h[r0:r1, c0:c1]
        on = patch > 0
        if np.any(window[on] > 0.2):
            return
        window[on] = od
        self.other.append(
            OtherNucleus(
                kind="smooth_muscle",
                row=row,
                col=col,
                major_um=length_um,
                minor_um=width_um,
                angle_deg=angle_deg,
                h_od=od,
            )
        )

    def finish_maps(self, rng: np.random.Generator, tissue: NDArray[np.bool_], batch: float) -> None:
        """Add chromatin/granular texture and the faint DAB background of the tissue."""
        shape = (self.rows, self.cols)
        for stain, amount in ((self.h, _NUCLEUS_TEXTURE), (self.dab, _DAB_TEXTURE)):
            texture = _smooth_noise(rng, shape, self.px, 0.8)
            texture *= np.float32(amount)
            texture += np.float32(1.0)
            np.clip(texture, 1.0 - 2.0 * amount, 1.0 + 2.0 * amount, out=texture)
            stain *= texture
        self.dab += tissue.view(np.uint8) * np.float32(_TISSUE_DAB_BACKGROUND * batch)


def _assign_classes(
    rng: np.random.Generator,
    cells: list[_CellGeometry],
    fractions: Mapping[str, float],
    heterogeneity: float,
) -> list[str]:
    """HER2 class per cell: contiguous runs over nests in random order, so nests are mostly homogeneous.

    The per-class counts are the largest-remainder rounding of ``fractions`` times the number of cells.
    """
    n = len(cells)
    if n == 0:
        return []
    raw = np.array([fractions[c] * n for c in HER2_CLASSES])
    counts = np.floor(raw).astype(int)
    remainder = raw - counts
    tiebreak = rng.permutation(len(HER2_CLASSES))
    for k in sorted(range(len(HER2_CLASSES)), key=lambda k: (-remainder[k], tiebreak[k]))[: n - counts.sum()]:
        counts[k] += 1
    class_order = rng.permutation(len(HER2_CLASSES))
    sequence = np.repeat(class_order, counts[class_order])
    nest_ids = sorted({c.nest for c in cells})
    nest_rank = dict(zip(nest_ids, rng.permutation(len(nest_ids)).tolist(), strict=True))
    order = sorted(range(n), key=lambda i: (nest_rank[cells[i].nest], cells[i].order_key))
    labels = np.empty(n, dtype=int)
    labels[np.asarray(order)] = sequence
    if heterogeneity > 0.0:
        flip = rng.random(n) < heterogeneity
        labels = np.where(flip, (labels + rng.integers(1, len(HER2_CLASSES), n)) % len(HER2_CLASSES), labels)
    return [HER2_CLASSES[k] for k in labels]


def _membranes(
    rng: np.random.Generator,
    cells: list[_CellGeometry],
    classes: list[str],
    guideline: str,
    intense_fraction: float,
) -> list[tuple[str, str]]:
    """(pattern, intensity) per cell such that ``truth_class(pattern, intensity, guideline)`` is its class.

    Solid-nest cells are drawn as today (``_SOLID_MEMBRANE``). Gland cells: 0 none; 1+ faint basolateral or
    lateral; 2+ basolateral or lateral, moderate (or, for breast, intense with probability ``intense_fraction``:
    the breast guideline scores intense incomplete membranes 2+); 3+ complete intense (or, for gastric,
    basolateral/lateral intense with probability ``intense_fraction``). Only gland cells use ``rng``.
    """
    out = []
    for g, cls in zip(cells, classes, strict=True):
        if g.gland < 0 or cls == "0":
            out.append(_SOLID_MEMBRANE[cls])
            continue
        side = "basolateral" if rng.random() < 0.5 else "lateral"
        intense = bool(rng.random() < intense_fraction)
        if cls == "1+":
            out.append((side, "1+"))
        elif cls == "2+":
            out.append((side, "3+" if intense and guideline == "breast" else "2+"))
        elif guideline == "gastric" and intense:
            out.append((side, "3+"))
        else:
            out.append(("complete", "3+"))
    return out


def _crowd_nuclei(rng: np.random.Generator, cells: list[_CellGeometry], fraction: float) -> list[_CellGeometry]:
    """Push the nuclei of pairs of neighbouring solid-nest cells together until they touch or overlap.

    About ``fraction`` of the solid-nest cells are paired (best effort). Each pair's nuclei turn their short axes
    towards each other and move symmetrically along the line between the cell centres until they overlap by
    ``o`` x their mean diameter, ``o`` uniform in [0, ``NUCLEUS_OVERLAP_MAX``]; a pair is skipped when a nucleus
    centre would leave the inscribed circle of its own cell (85% of the semi-minor axis).
    """
    solid = [i for i, g in enumerate(cells) if g.gland < 0]
    if len(solid) < 2 or fraction <= 0.0:
        return cells
    by_nest: dict[int, list[int]] = {}
    for i in solid:
        by_nest.setdefault(cells[i].nest, []).append(i)
    centres = np.array([(g.row, g.col) for g in cells])
    out = list(cells)
    paired = np.zeros(len(cells), dtype=bool)
    target = round(fraction * len(solid) / 2.0)
    made = 0
    for k in rng.permutation(len(solid)):
        if made >= target:
            break
        i = solid[int(k)]
        if paired[i]:
            continue
        candidates = np.array([j for j in by_nest[cells[i].nest] if j != i and not paired[j]], dtype=int)
        if candidates.size == 0:
            continue
        distances = np.hypot(*(centres[candidates] - centres[i]).T)
        j = int(candidates[np.argmin(distances)])
        distance = float(distances.min())
        gi, gj = cells[i], cells[j]
        if distance > 1.5 * (gi.semi_major + gj.semi_major) or distance <= 0.0:
            continue
        u = (centres[j] - centres[i]) / distance
        overlap = rng.uniform(0.0, NUCLEUS_OVERLAP_MAX)
        mean_diameter = math.sqrt(gi.nucleus_semi_major * gi.nucleus_semi_minor) + math.sqrt(
            gj.nucleus_semi_major * gj.nucleus_semi_minor
        )
        apart = gi.nucleus_semi_minor + gj.nucleus_semi_minor - overlap * mean_diameter
        shift = 0.5 * (distance - apart)
        if shift > 0.85 * min(gi.semi_minor, gj.semi_minor):
            continue
        angle = (math.degrees(math.atan2(float(u[0]), float(u[1]))) + 90.0) % 180.0
        out[i] = replace(
            gi,
            nucleus_row=_q(gi.row + shift * float(u[0])),
            nucleus_col=_q(gi.col + shift * float(u[1])),
            nucleus_angle_deg=angle,
        )
        out[j] = replace(
            gj,
            nucleus_row=_q(gj.row - shift * float(u[0])),
            nucleus_col=_q(gj.col - shift * float(u[1])),
            nucleus_angle_deg=angle,
        )
        paired[i] = paired[j] = True
        made += 1
    return out


def _outline_speed(g: _CellGeometry, t_deg: float) -> float:
    """Length of the outline per radian of its parameter at parameter angle ``t_deg``, px."""
    t = math.radians(t_deg)
    return max(1e-6, math.hypot(g.semi_major * math.sin(t), g.semi_minor * math.cos(t)))


def _gapped_ring(rng: np.random.Generator, g: _CellGeometry, px: float) -> list[tuple[float, float]]:
    """Stained spans (parameter degrees) of a complete ring with ``RING_GAP_COUNT`` gaps of ``RING_GAP_UM``."""
    n = int(rng.integers(RING_GAP_COUNT[0], RING_GAP_COUNT[1] + 1))
    lengths = rng.uniform(*RING_GAP_UM, n) / px
    spacing = 360.0 * (0.5 / n + 0.5 * rng.dirichlet(np.ones(n)))  # gaps at least 180/n degrees apart
    start = float(rng.uniform(0.0, 360.0))
    centres = start + np.concatenate([[0.0], np.cumsum(spacing[:-1])])
    if g.outline:
        widths = [360.0 * float(length) / float(_perimeter(g.outline)[-1]) for length in lengths]
    else:
        widths = [math.degrees(float(lengths[k]) / _outline_speed(g, float(centres[k]))) for k in range(n)]
    arcs = []
    for k in range(n):
        begin = float(centres[k]) + 0.5 * widths[k]
        end = float(centres[(k + 1) % n]) + (360.0 if k == n - 1 else 0.0) - 0.5 * widths[(k + 1) % n]
        arcs.append((begin % 360.0, begin % 360.0 + end - begin))
    return arcs


def _side_arcs(g: _CellGeometry, pattern: str) -> list[tuple[float, float]]:
    """Stained spans (degrees of the outline from its apical midpoint) of a basolateral or lateral gland cell.

    Basolateral: both lateral sides and the basal side (a U open towards the lumen); lateral: the two lateral
    sides only. The outline's vertices are apical midpoint, apical corner, basal corner, basal corner, apical
    corner.
    """
    perimeter = _perimeter(g.outline)
    to_deg = 360.0 / float(perimeter[-1])
    corners = [float(perimeter[k]) * to_deg for k in (1, 2, 3, 4)]
    if pattern == "basolateral":
        return [(corners[0], corners[3])]
    return [(corners[0], corners[1]), (corners[2], corners[3])]


def _perimeter(outline: Sequence[tuple[float, float]]) -> NDArray[np.float64]:
    """Cumulative length along a closed polygon at each vertex and back at the first, px; shape (m + 1,)."""
    pts = np.asarray(outline, dtype=np.float64)
    steps = np.hypot(*(np.roll(pts, -1, axis=0) - pts).T)
    return np.concatenate([[0.0], np.cumsum(steps)])


def _perimeter_path(
    outline: Sequence[tuple[float, float]], perimeter: NDArray[np.float64], s0: float, s1: float
) -> list[tuple[float, float]]:
    """(row, col) points of a closed polygon from perimeter position ``s0`` to ``s1`` (px, may wrap once)."""
    pts = np.asarray(outline, dtype=np.float64)
    m = len(pts)
    total = float(perimeter[-1])

    def at(s: float) -> tuple[float, float]:
        s %= total
        k = min(int(np.searchsorted(perimeter, s, side="right")) - 1, m - 1)
        f = (s - perimeter[k]) / max(perimeter[k + 1] - perimeter[k], 1e-12)
        p = pts[k] + f * (pts[(k + 1) % m] - pts[k])
        return float(p[0]), float(p[1])

    path = [at(s0)]
    for lap in (0.0, total):
        for k in range(m):
            s = float(perimeter[k]) + lap
            if s0 < s < s1:
                path.append((float(pts[k, 0]), float(pts[k, 1])))
    path.append(at(s1))
    return path


def _cv_points(points: Sequence[tuple[float, float]]) -> NDArray[np.int32]:
    """(row, col) points → (n, 2) int32 (x, y) for cv2 drawing with ``_SHIFT`` fractional bits."""
    return np.round(np.asarray(points, dtype=np.float64)[:, ::-1] * _SCALE).astype(np.int32)


def _polygon_area(points: Sequence[tuple[float, float]]) -> float:
    pts = np.asarray(points, dtype=np.float64)
    r, c = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(r, np.roll(c, -1)) - np.dot(c, np.roll(r, -1))))


def _polygon_centroid(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    pts = np.asarray(points, dtype=np.float64)
    r, c = pts[:, 0], pts[:, 1]
    cross = r * np.roll(c, -1) - np.roll(r, -1) * c
    area6 = 3.0 * float(cross.sum())
    return (
        float(((r + np.roll(r, -1)) * cross).sum()) / area6,
        float(((c + np.roll(c, -1)) * cross).sum()) / area6,
    )


def _add_ellipse(
    img: NDArray[np.float32], row: float, col: float, semi_axes: tuple[float, float], angle_deg: float, value: float
) -> None:
    """Add ``value`` inside a (sub-pixel) filled ellipse of ``img``, in place (overlaps sum)."""
    reach = math.ceil(max(semi_axes)) + 2
    r0, c0 = max(0, math.floor(row) - reach), max(0, math.floor(col) - reach)
    r1, c1 = min(img.shape[0], math.ceil(row) + reach + 1), min(img.shape[1], math.ceil(col) + reach + 1)
    patch = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
    _ellipse(patch, row, col, semi_axes, angle_deg, value, offset=(r0, c0))
    img[r0:r1, c0:c1] += patch


def _vignette_terms(
    rows: int, cols: int, centre: tuple[float, float]
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Squared row and column distances from the optical centre over the squared farthest-corner distance."""
    rc, cc = centre[0] * (rows - 1), centre[1] * (cols - 1)
    far = max(rc, rows - 1 - rc) ** 2 + max(cc, cols - 1 - cc) ** 2
    far = max(far, 1.0)
    row_term = ((np.arange(rows, dtype=np.float64) - rc) ** 2 / far).astype(np.float32)
    col_term = ((np.arange(cols, dtype=np.float64) - cc) ** 2 / far).astype(np.float32)
    return row_term, col_term


# --------------------------------------------------------------------------------------------------- optics


def _optics(
    rng: np.random.Generator,
    h: NDArray[np.float32],
    dab: NDArray[np.float32],
    stains: NDArray[np.float64],
    px: float,
    blur_um: float,
    noise_sigma: float,
    vignette: float = 0.0,
    centre: tuple[float, float] = (0.5, 0.5),
) -> NDArray[np.uint8]:
    """Beer–Lambert: (rows, cols) H and DAB OD maps → (rows, cols, 3) uint8 RGB, with blur, vignette and noise."""
    sigma_px = blur_um / px
    if sigma_px > 0.05:
        h = _f32(cv2.GaussianBlur(h, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REFLECT))
        dab = _f32(cv2.GaussianBlur(dab, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REFLECT))
    rows, cols = h.shape
    out = np.empty((rows, cols, 3), dtype=np.uint8)
    ln10 = math.log(10.0)
    row_term, col_term = _vignette_terms(rows, cols, centre) if vignette > 0.0 else (None, None)
    for r0 in range(0, rows, _STRIP_ROWS):
        r1 = min(rows, r0 + _STRIP_ROWS)
        light: NDArray[np.float32] | np.float32 = np.float32(GLASS_LEVEL)
        if row_term is not None and col_term is not None:
            v = np.float32(vignette)
            light = ((np.float32(1.0) - v * row_term[r0:r1, None]) - v * col_term) * np.float32(GLASS_LEVEL)
        for channel in range(3):
            log_t = h[r0:r1] * np.float32(-ln10 * stains[0, channel])
            log_t += dab[r0:r1] * np.float32(-ln10 * stains[1, channel])
            intensity = _f32(cv2.exp(log_t))
            intensity *= light
            if noise_sigma > 0:
                noise = rng.standard_normal(intensity.shape, dtype=np.float32)
                noise *= np.float32(noise_sigma)
                intensity += noise
            intensity += np.float32(0.5)
            np.clip(intensity, 0.0, 255.0, out=intensity)
            out[r0:r1, :, channel] = intensity  # truncating x + 0.5 rounds to the nearest grey level
    return out


def _jpeg_round_trip(rgb: NDArray[np.uint8], quality: int) -> NDArray[np.uint8]:
    """Encode and decode an RGB image as JPEG at ``quality`` (1–100)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:  # pragma: no cover - cv2 only fails on invalid input, which render_fov never produces
        raise RuntimeError("JPEG round trip failed")
    return np.ascontiguousarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), dtype=np.uint8)
