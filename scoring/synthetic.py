"""Synthetic HER2 immunohistochemistry (IHC) fields of view with exact per-cell ground truth.

The generator paints two stain concentration maps, haematoxylin (H, the blue nuclear counterstain) and DAB
(the brown HER2 chromogen), in optical density units (OD, log10), and turns them into an RGB camera image with
the Beer–Lambert law::

    I_c = I0 * 10 ** -(H * h_c + DAB * d_c)        for c in (R, G, B)

where ``h`` and ``d`` are the unit-normalised stain OD vectors (Ruifrok & Johnston 2001 by default). Optical
blur, camera noise and an optional JPEG round trip follow.

The tissue is glass, fibrous stroma with sparse elongated stroma nuclei, and tumour cells grouped in irregular
nests. Every tumour cell is an ellipse with a nucleus and a DAB membrane ring whose intensity and completeness
follow its HER2 class (``MEMBRANE_DAB_OD``): 3+ intense complete, 2+ weak-to-moderate complete, 1+ faint
incomplete, 0 none. Classes are assigned per nest (tumours are regionally heterogeneous) so that the per-cell
fractions match the requested mix.

All geometry is specified in µm and converted with ``pixel_size_um`` (µm/px); coordinates are (row, col) with
pixel centres at integer positions. The module is pure: no I/O, no logging, no global random state; the output
is a deterministic function of the arguments and the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypedDict, Unpack

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "CELL_GAP_UM",
    "DEFAULT_STAIN_VECTORS",
    "GLASS_LEVEL",
    "HER2_CLASSES",
    "INCOMPLETE_MEMBRANE_COVERAGE",
    "MEMBRANE_DAB_OD",
    "MEMBRANE_JITTER",
    "MEMBRANE_WIDTH_UM",
    "RenderOptions",
    "SyntheticCell",
    "SyntheticFov",
    "Vector3",
    "blank_fov",
    "render_control",
    "render_fov",
    "stain_matrix",
]

Vector3 = tuple[float, float, float]

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

GLASS_LEVEL: Final[int] = 245
"""Incident light level I0 (grey levels): what empty glass renders as, before noise."""

DEFAULT_STAIN_VECTORS: Final[tuple[Vector3, Vector3]] = ((0.650, 0.704, 0.286), (0.268, 0.570, 0.776))
"""Ruifrok & Johnston (2001) haematoxylin and DAB OD vectors (R, G, B), not yet normalised."""

_DEFAULT_FRACTIONS: Final[Mapping[str, float]] = MappingProxyType({"3+": 1.0})

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
        Fraction of the outline covered by membrane DAB (1.0 complete, 0.25–0.60 for 1+, 0.0 for 0).
    nest_id : int
        Index of the nest the cell belongs to.
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
        (rows, cols) bool mask of the tumour nests, read-only.

    Notes
    -----
    Equality is identity (``eq=False``): element-wise array comparison has no single truth value.
    """

    rgb: NDArray[np.uint8]
    cells: tuple[SyntheticCell, ...]
    pixel_size_um: float
    batch_strength: float
    tumour_mask: NDArray[np.bool_]

    def counts(self) -> dict[str, int]:
        """Ground-truth number of tumour cells per HER2 class.

        Returns
        -------
        dict of str to int
            Keys ``HER2_CLASSES`` in order; classes without cells count 0.
        """
        out = dict.fromkeys(HER2_CLASSES, 0)
        for cell in self.cells:
            out[cell.her2_class] += 1
        return out


# ----------------------------------------------------------------------------------------------- public API


def stain_matrix(stain_vectors: tuple[Vector3, Vector3] | None = None) -> NDArray[np.float64]:
    """Unit stain OD vectors as the rows of a 3x3 matrix (H, DAB, residual).

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
    rows = []
    if len(vectors) != 2:
        raise ValueError(f"stain_vectors must be (haematoxylin, dab), got {len(vectors)} vectors")
    for name, vector in zip(("haematoxylin", "dab"), vectors, strict=True):
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (3,) or not np.all(np.isfinite(v)) or np.any(v < 0) or float(np.linalg.norm(v)) < 1e-6:
            raise ValueError(f"{name} stain vector {vector!r} must be three finite, non-negative, non-zero numbers")
        rows.append(v / np.linalg.norm(v))
    cosine = float(rows[0] @ rows[1])
    if cosine > 0.99:
        raise ValueError(f"haematoxylin and DAB stain vectors are nearly parallel (cosine {cosine:.4f})")
    residual = np.cross(rows[0], rows[1])
    rows.append(residual / np.linalg.norm(residual))
    return np.stack(rows)


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
    cell_diameter_um: float = 12.0,
    nucleus_diameter_um: float = 6.0,
    cell_heterogeneity: float = 0.0,
    blur_um: float = 0.5,
    noise_sigma: float = 2.0,
    jpeg_quality: int | None = None,
    stain_vectors: tuple[Vector3, Vector3] | None = None,
    seed: int | np.random.Generator = 0,
) -> SyntheticFov:
    """Render a synthetic HER2 IHC field of view (or a large virtual slide) with per-cell ground truth.

    Parameters
    ----------
    shape : (int, int)
        (rows, cols) of the image in pixels, each at least 32.
    pixel_size_um : float
        µm per pixel, in (0.05, 5]; 0.25 for a 40x objective, 0.5 for 20x.
    class_fractions : mapping of str to float
        Fraction of tumour cells per HER2 class, keys from ``HER2_CLASSES`` (missing keys are 0), summing
        to 1. The per-cell counts match it up to rounding (before ``cell_heterogeneity``); whole nests share a
        class, except at most one nest per class boundary, which is split along a straight line.
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

    Returns
    -------
    SyntheticFov
        ``rgb`` (rows, cols, 3) uint8 RGB and ``tumour_mask`` (rows, cols) bool, both read-only; ``cells`` the
        tumour cells in drawing order.

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
    if tumour_fraction > 0 and cell_d / px < 6.0:
        raise ValueError(
            f"cell_diameter_um {cell_d} is only {cell_d / px:.1f} px at {px} µm/px; tumour cells need at least 6 px"
        )
    stains = stain_matrix(stain_vectors)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer | np.random.Generator):
        raise ValueError(f"seed must be an int or a numpy.random.Generator, got {type(seed).__name__}")
    if isinstance(seed, int | np.integer) and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rng = np.random.default_rng(seed)

    scene = _Scene(rows, cols, px)
    tissue = scene.tissue_mask(rng, glass_fraction=0.25 * (1.0 - tumour_fraction))
    nests = scene.place_nests(rng, tissue, tumour_fraction, cell_d)
    tissue |= scene.tumour.astype(bool)
    geometries = scene.place_cells(rng, nests, cell_d, nucleus_d)
    scene.hug_cells()
    scene.paint_stroma(rng, tissue)
    classes = _assign_classes(rng, geometries, fractions, heterogeneity)
    cells = scene.paint_cells(rng, geometries, classes, batch)
    scene.finish_maps(rng, tissue, batch)

    rgb = _optics(rng, scene.h, scene.dab, stains, px, blur, noise)
    if jpeg_quality is not None:
        rgb = _jpeg_round_trip(rgb, int(jpeg_quality))
    rgb.flags.writeable = False
    mask = scene.tumour.astype(bool)
    mask.flags.writeable = False
    return SyntheticFov(rgb=rgb, cells=cells, pixel_size_um=px, batch_strength=batch, tumour_mask=mask)


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
    order_key: float  # position along the nest's split direction


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

    def tissue_mask(self, rng: np.random.Generator, glass_fraction: float) -> NDArray[np.bool_]:
        field = _smooth_noise(rng, (self.rows, self.cols), self.px, 60.0)
        threshold = float(np.quantile(field[::4, ::4], glass_fraction))
        result: NDArray[np.bool_] = field > threshold
        return result

    def place_nests(
        self, rng: np.random.Generator, tissue: NDArray[np.bool_], tumour_fraction: float, cell_d: float
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

    def paint_stroma(self, rng: np.random.Generator, tissue: NDArray[np.bool_]) -> None:
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
        major = rng.uniform(*_STROMA_NUCLEUS_AXES_UM[0], n) / 2.0 / px
        minor = rng.uniform(*_STROMA_NUCLEUS_AXES_UM[1], n) / 2.0 / px
        angle = np.degrees(self.fibre_angle) + rng.normal(0.0, 20.0, n)
        od = rng.uniform(*_STROMA_NUCLEUS_H, n)
        for i in range(n):
            r, c = round(rr[i]), round(cc[i])
            near = self.tumour[max(0, r - reach) : r + reach + 1, max(0, c - reach) : c + reach + 1]
            if tissue[r, c] and not near.any():
                _ellipse(self.h, rr[i], cc[i], (major[i], minor[i]), float(angle[i]), float(od[i]))

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
        classes: list[str],
        batch: float,
    ) -> tuple[SyntheticCell, ...]:
        px = self.px
        thickness = max(1, round(MEMBRANE_WIDTH_UM / px))
        cells = []
        for g, cls in zip(geometries, classes, strict=True):
            semi = (g.semi_major, g.semi_minor)
            n_semi = (g.nucleus_semi_major, g.nucleus_semi_minor)
            _ellipse(self.h, g.row, g.col, semi, g.angle_deg, float(rng.uniform(*_CYTOPLASM_H)))
            cytoplasm_dab = float(rng.uniform(0.0, _CYTOPLASM_DAB_MAX) * batch)
            _ellipse(self.dab, g.row, g.col, semi, g.angle_deg, cytoplasm_dab)
            nucleus_od = float(rng.uniform(*_NUCLEUS_H))
            _ellipse(self.h, g.nucleus_row, g.nucleus_col, n_semi, g.nucleus_angle_deg, nucleus_od)
            _ellipse(self.dab, g.nucleus_row, g.nucleus_col, n_semi, g.nucleus_angle_deg, 0.0)
            jitter = rng.uniform(1.0 - MEMBRANE_JITTER, 1.0 + MEMBRANE_JITTER)
            membrane_od = MEMBRANE_DAB_OD[cls] * batch * jitter if cls != "0" else 0.0
            coverage = 0.0
            if cls in ("2+", "3+"):
                coverage = 1.0
                _ellipse(self.dab, g.row, g.col, semi, g.angle_deg, membrane_od, thickness)
            elif cls == "1+":
                coverage = float(rng.uniform(*INCOMPLETE_MEMBRANE_COVERAGE))
                n_arcs = int(rng.integers(1, 4))
                arcs = coverage * 360.0 * rng.dirichlet(np.ones(n_arcs))
                gaps = (1.0 - coverage) * 360.0 * rng.dirichlet(np.ones(n_arcs))
                start = float(rng.uniform(0.0, 360.0))
                # Thick cv2 arcs get round caps of half the thickness at both ends: trim them off so that
                # the stained fraction of the outline is ``coverage``.
                cap_deg = math.degrees(0.5 * thickness / math.sqrt(g.semi_major * g.semi_minor))
                for arc, gap in zip(arcs, gaps, strict=True):
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
                    start += float(arc + gap)
            cells.append(
                SyntheticCell(
                    row=g.row,
                    col=g.col,
                    nucleus_row=g.nucleus_row,
                    nucleus_col=g.nucleus_col,
                    diameter_um=2.0 * math.sqrt(g.semi_major * g.semi_minor) * px,
                    her2_class=cls,
                    membrane_complete=coverage == 1.0,
                    membrane_dab_od=float(membrane_od),
                    major_um=2.0 * g.semi_major * px,
                    minor_um=2.0 * g.semi_minor * px,
                    angle_deg=g.angle_deg,
                    nucleus_diameter_um=2.0 * math.sqrt(g.nucleus_semi_major * g.nucleus_semi_minor) * px,
                    membrane_coverage=coverage,
                    nest_id=g.nest,
                )
            )
        return tuple(cells)

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


# --------------------------------------------------------------------------------------------------- optics


def _optics(
    rng: np.random.Generator,
    h: NDArray[np.float32],
    dab: NDArray[np.float32],
    stains: NDArray[np.float64],
    px: float,
    blur_um: float,
    noise_sigma: float,
) -> NDArray[np.uint8]:
    """Beer–Lambert: (rows, cols) H and DAB OD maps → (rows, cols, 3) uint8 RGB, with blur and noise."""
    sigma_px = blur_um / px
    if sigma_px > 0.05:
        h = _f32(cv2.GaussianBlur(h, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REFLECT))
        dab = _f32(cv2.GaussianBlur(dab, (0, 0), sigmaX=sigma_px, borderType=cv2.BORDER_REFLECT))
    rows, cols = h.shape
    out = np.empty((rows, cols, 3), dtype=np.uint8)
    ln10 = math.log(10.0)
    for r0 in range(0, rows, _STRIP_ROWS):
        r1 = min(rows, r0 + _STRIP_ROWS)
        for channel in range(3):
            log_t = h[r0:r1] * np.float32(-ln10 * stains[0, channel])
            log_t += dab[r0:r1] * np.float32(-ln10 * stains[1, channel])
            intensity = _f32(cv2.exp(log_t))
            intensity *= np.float32(GLASS_LEVEL)
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
