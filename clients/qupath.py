"""A scored FOV for QuPath and Fiji: the field as a calibrated OME-TIFF, its cells and regions as QuPath's GeoJSON.

The GeoJSON follows what QuPath 0.4 and later (0.5, 0.6) read and write (``PathIO.readObjects``, *File → Import
objects from file*; the type adapter in ``qupath/lib/io/PathObjectTypeAdapters.java``): a ``FeatureCollection`` whose
``Feature``s carry a ``geometry`` in full-resolution image pixels, x = column and y = row, origin at the top-left
corner of the image, and ``properties`` with ``objectType`` (``"cell"``, ``"detection"`` or ``"annotation"``), a
``classification`` ``{"name", "color": [r, g, b]}``, ``measurements`` as an object of name → number (the 0.4 form;
QuPath 0.2–0.3 wrote a list of ``{name, value}``) and ``metadata`` of name → text; a cell's ``nucleusGeometry`` is a
member of the Feature beside ``geometry``; ``id`` is a UUID (0.4+). Geometries are RFC 7946 ``Polygon``,
``MultiPolygon`` and ``Point``: a ring is closed (its last position repeats its first) and has at least four.

Each counted tumour cell is a ``cell`` whose boundary is the ring its 24 rays measured (``Cell.ring_radii_um``), its
nucleus a circle of the measured nucleus area (her2scope measures the nucleus's area, not its outline; none when
the area could not be measured, as QuPath allows); a cell
without a ring (the contour-hierarchy method) is a ``detection`` at its nucleus centre, a ``Point``. Both are
classified ``0``, ``1+``, ``2+`` or ``3+`` in the overlays' colours and measured (names carry their units, as
QuPath's do): ``Membrane: completeness`` and ``Membrane: intense completeness`` (share of the ring, 0–1),
``Membrane: DAB OD median``, ``Nucleus: Area µm^2``, ``Cell: Area µm^2``; the membrane pattern is the metadata
``Membrane pattern``. Two locked annotations: the tumour region the cells were counted in (their rings joined
across the membranes between neighbours, as the overlay's ``region`` layer draws it) and the pathologist's ROI.

:func:`qupath_files` makes a FOV's two files, ``qupath/<fov_id>.ome.tif`` and ``qupath/<fov_id>.geojson`` of its
case folder. :class:`FeatureCollection` is the schema (pydantic; ``geojson_schema()`` as JSON Schema): what is
written validates against it, and it refuses what QuPath would not read as intended.
"""

from __future__ import annotations

import io
import math
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import tifffile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from her2scope.scoring.cells import N_RAYS, counted_region, ring_points
from her2scope.scoring.overlay import CLASS_COLOURS, REGION_COLOUR
from her2scope.scoring.results import Cell, FovResult, Her2Score

TUMOUR_REGION = "Tumour region (cells counted)"
ROI_NAME = "ROI"
ROI_COLOUR = (255, 255, 255)
#: Vertices of the circle drawn for a nucleus.
_NUCLEUS_VERTICES = 16
_ID_NAMESPACE = uuid.UUID("5d0b8f0e-6a43-4a35-9c55-2f6f3a0f5b1e")

QUPATH_DIR = "qupath"
RESULTS_DIR = "results"

RowCol = tuple[float, float]

# --- the schema ------------------------------------------------------------------------------------------------------

Position = tuple[float, float]


def _check_ring(ring: list[Position]) -> list[Position]:
    if len(ring) < 4:
        raise ValueError(f"a linear ring needs at least 4 positions, got {len(ring)}")
    if ring[0] != ring[-1]:
        raise ValueError("a linear ring must be closed: its last position must equal its first")
    return ring


class _Geo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Point(_Geo):
    """A GeoJSON Point, (x, y) image pixels."""

    type: Literal["Point"] = "Point"
    coordinates: Position


class Polygon(_Geo):
    """A GeoJSON Polygon: an outer ring, then its holes; each ring closed, at least four positions."""

    type: Literal["Polygon"] = "Polygon"
    coordinates: list[list[Position]] = Field(min_length=1)

    @field_validator("coordinates")
    @classmethod
    def _rings(cls, rings: list[list[Position]]) -> list[list[Position]]:
        return [_check_ring(ring) for ring in rings]


class MultiPolygon(_Geo):
    """A GeoJSON MultiPolygon: polygons, each an outer ring and its holes."""

    type: Literal["MultiPolygon"] = "MultiPolygon"
    coordinates: list[list[list[Position]]] = Field(min_length=1)

    @field_validator("coordinates")
    @classmethod
    def _polygons(cls, polygons: list[list[list[Position]]]) -> list[list[list[Position]]]:
        for rings in polygons:
            if not rings:
                raise ValueError("a polygon needs an outer ring")
            for ring in rings:
                _check_ring(ring)
        return polygons


Geometry = Annotated[Point | Polygon | MultiPolygon, Field(discriminator="type")]


class Classification(_Geo):
    """A QuPath class: its name and its colour."""

    name: str = Field(min_length=1)
    color: tuple[int, int, int]


class Properties(_Geo):
    """The QuPath properties of a Feature (``PathObjectTypeAdapters``)."""

    objectType: Literal["cell", "detection", "annotation"]  # noqa: N815 - QuPath's name
    name: str | None = None
    color: tuple[int, int, int] | None = None
    classification: Classification | None = None
    isLocked: bool | None = None  # noqa: N815 - QuPath's name
    measurements: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("measurements")
    @classmethod
    def _finite(cls, measurements: dict[str, float]) -> dict[str, float]:
        for name, value in measurements.items():
            if not math.isfinite(value):
                raise ValueError(f"measurement {name!r} is {value}: QuPath's measurements are finite numbers")
        return measurements


class Feature(_Geo):
    """One QuPath object: a cell (boundary and nucleus), a detection or an annotation."""

    type: Literal["Feature"] = "Feature"
    id: uuid.UUID
    geometry: Geometry
    nucleusGeometry: Geometry | None = None  # noqa: N815 - QuPath's name
    properties: Properties


class FeatureCollection(_Geo):
    """A FOV's objects as QuPath imports them."""

    type: Literal["FeatureCollection"] = "FeatureCollection"
    features: list[Feature]


def geojson_schema() -> dict[str, Any]:
    """The JSON Schema of the GeoJSON files (from :class:`FeatureCollection`)."""
    schema = FeatureCollection.model_json_schema()
    schema["title"] = "her2scope FOV objects for QuPath (GeoJSON FeatureCollection)"
    schema["description"] = "Coordinates are (x, y) = (column, row) pixels of the full-resolution FOV image."
    return schema


# --- geometry --------------------------------------------------------------------------------------------------------


def _closed(points_xy: npt.NDArray[np.float64]) -> list[Position]:
    ring = [(round(float(x), 2), round(float(y), 2)) for x, y in points_xy]
    return [*ring, ring[0]]


def ring_xy(cell: Cell, pixel_size_um: float) -> npt.NDArray[np.float64]:
    """(N, 2) (x, y) FOV pixels of ``cell``'s ring (its rays as :func:`her2scope.scoring.cells.ring_points` casts
    them: ray k at angle 2πk/N from +x (+col) towards +y (+row))."""
    radii = np.asarray(cell.ring_radii_um, dtype=np.float64)[None, :] / pixel_size_um
    return ring_points(np.array([[cell.row, cell.col]]), radii)[0, :, ::-1]


def _polygon_area(points_xy: npt.NDArray[np.float64]) -> float:
    x, y = points_xy[:, 0], points_xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _nucleus_circle(cell: Cell, pixel_size_um: float) -> Polygon | None:
    if not cell.nucleus_area_um2 or cell.nucleus_area_um2 <= 0:
        return None
    radius = math.sqrt(cell.nucleus_area_um2 / math.pi) / pixel_size_um
    angles = 2.0 * math.pi * np.arange(_NUCLEUS_VERTICES) / _NUCLEUS_VERTICES
    points = np.stack([cell.col + radius * np.cos(angles), cell.row + radius * np.sin(angles)], axis=1)
    return Polygon(coordinates=[_closed(points)])


def tumour_region(
    cells: Sequence[Cell], pixel_size_um: float, shape: tuple[int, int]
) -> list[list[npt.NDArray[np.float64]]]:
    """The region the cells were counted in, as polygons of (x, y) FOV pixel rings (outer ring first, then holes):
    :func:`her2scope.scoring.cells.counted_region` of their rings, as the overlay's region layer draws it."""

    ringed = [c for c in cells if len(c.ring_radii_um) == N_RAYS]
    if not ringed:
        return []
    rings_rc = np.stack([ring_xy(c, pixel_size_um)[:, ::-1] for c in ringed])
    region, scale = counted_region(rings_rc, shape, pixel_size_um)
    contours, hierarchy = cv2.findContours(region.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []

    def to_fov(contour: Any) -> npt.NDArray[np.float64]:
        # pixel centres of the grid back to FOV pixels; a contour runs along the outer pixels' centres
        return (np.asarray(contour, dtype=np.float64).reshape(-1, 2) + 0.5) * scale - 0.5

    polygons: list[list[npt.NDArray[np.float64]]] = []
    for index, (_, _, _, parent) in enumerate(hierarchy[0]):
        if parent < 0 and len(contours[index]) >= 3:
            holes = [
                to_fov(contours[i])
                for i, (_, _, _, p) in enumerate(hierarchy[0])
                if p == index and len(contours[i]) >= 3
            ]
            polygons.append([to_fov(contours[index]), *holes])
    return polygons


# --- the features ----------------------------------------------------------------------------------------------------


def _measurements(cell: Cell, pixel_size_um: float, ring: npt.NDArray[np.float64] | None) -> dict[str, float]:
    values: dict[str, float | None] = {
        "Membrane: completeness": cell.completeness,
        "Membrane: intense completeness": cell.intense_completeness,
        "Membrane: DAB OD median": cell.membrane_od,
        "Nucleus: Area µm^2": cell.nucleus_area_um2 or None,  # 0: its outline could not be measured
        "Cell: Area µm^2": _polygon_area(ring) * pixel_size_um**2 if ring is not None else None,
    }
    return {name: float(value) for name, value in values.items() if value is not None and math.isfinite(value)}


def cell_feature(cell: Cell, pixel_size_um: float, feature_id: uuid.UUID) -> Feature:
    """One counted cell: a ``cell`` (ring boundary, nucleus circle) or, without a ring, a ``detection`` point."""
    her2_class = Her2Score(cell.her2_class).value
    ring = ring_xy(cell, pixel_size_um) if len(cell.ring_radii_um) >= 3 else None
    properties = Properties(
        objectType="cell" if ring is not None else "detection",
        classification=Classification(name=her2_class, color=CLASS_COLOURS[cell.her2_class]),
        measurements=_measurements(cell, pixel_size_um, ring),
        metadata={"Membrane pattern": cell.pattern.value} if cell.pattern is not None else {},
    )
    if ring is None:
        return Feature(id=feature_id, geometry=Point(coordinates=(cell.col, cell.row)), properties=properties)
    return Feature(
        id=feature_id,
        geometry=Polygon(coordinates=[_closed(ring)]),
        nucleusGeometry=_nucleus_circle(cell, pixel_size_um),
        properties=properties,
    )


def _annotation(name: str, colour: tuple[int, int, int], geometry: Polygon | MultiPolygon, key: str) -> Feature:
    return Feature(
        id=uuid.uuid5(_ID_NAMESPACE, key),
        geometry=geometry,
        properties=Properties(objectType="annotation", name=name, color=colour, isLocked=True),
    )


def fov_features(
    result: FovResult,
    shape: tuple[int, int],
    *,
    roi: Sequence[RowCol] | None = None,
    key: str = "",
) -> FeatureCollection:
    """The QuPath objects of a scored FOV: the tumour region and the ROI (annotations), then every counted cell.

    Parameters
    ----------
    result : the FOV's result, its cells included
    shape : (rows, cols) of the FOV image
    roi : the pathologist's ROI polygon, (row, col) FOV pixels, if one was set
    key : makes the objects' UUIDs (the same objects of the same FOV get the same ids: e.g. ``"case/fov-001"``)
    """
    px = result.pixel_size_um
    features: list[Feature] = []
    region = tumour_region(result.cells, px, shape)
    if region:
        polygons = [[_closed(ring) for ring in rings] for rings in region]
        geometry: Polygon | MultiPolygon = (
            Polygon(coordinates=polygons[0]) if len(polygons) == 1 else MultiPolygon(coordinates=polygons)
        )
        features.append(_annotation(TUMOUR_REGION, REGION_COLOUR, geometry, f"{key}/tumour-region"))
    if roi is not None and len(roi) >= 3:
        roi_xy = np.asarray([(col, row) for row, col in roi], dtype=np.float64)
        features.append(_annotation(ROI_NAME, ROI_COLOUR, Polygon(coordinates=[_closed(roi_xy)]), f"{key}/roi"))
    features.extend(
        cell_feature(cell, px, uuid.uuid5(_ID_NAMESPACE, f"{key}/cell-{index}"))
        for index, cell in enumerate(result.cells)
    )
    return FeatureCollection(features=features)


def geojson_bytes(collection: FeatureCollection) -> bytes:
    """The GeoJSON file's content (UTF-8; compact: a 20x FOV has thousands of cells)."""
    return collection.model_dump_json(exclude_none=True).encode()


def class_counts(collection: FeatureCollection) -> dict[str, int]:
    """Cells per class name in ``collection`` (its cells and detections; annotations are not counted)."""
    counts = {score.value: 0 for score in Her2Score}
    for feature in collection.features:
        classification = feature.properties.classification
        if feature.properties.objectType != "annotation" and classification is not None:
            counts[classification.name] = counts.get(classification.name, 0) + 1
    return counts


# --- the image -------------------------------------------------------------------------------------------------------


def ome_tiff_bytes(rgb: npt.NDArray[np.uint8], pixel_size_um: float, *, name: str = "") -> bytes:
    """A lossless (deflate) OME-TIFF of an (M, N, 3) uint8 RGB field with its physical pixel size in µm: in the OME
    XML (``PhysicalSizeX``/``Y``, read by QuPath and Fiji's Bio-Formats) and in the TIFF resolution tags (pixels
    per cm, read by ImageJ's own TIFF reader)."""

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"an (M, N, 3) uint8 RGB image is needed, got {rgb.shape} {rgb.dtype}")
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel size must be a positive number of µm/px, got {pixel_size_um!r}")
    per_cm = 1e4 / pixel_size_um
    buffer = io.BytesIO()
    metadata: Mapping[str, Any] = {
        "axes": "YXS",
        "Name": name,
        "PhysicalSizeX": pixel_size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": pixel_size_um,
        "PhysicalSizeYUnit": "µm",
    }
    tifffile.imwrite(
        buffer,
        np.ascontiguousarray(rgb),
        ome=True,
        photometric="rgb",
        compression="zlib",
        resolution=(per_cm, per_cm),
        resolutionunit="CENTIMETER",
        metadata=dict(metadata),
    )
    return buffer.getvalue()


def ome_pixel_size_um(data: bytes) -> tuple[float, float]:
    """(x, y) µm per pixel of an OME-TIFF, read from its OME XML; ValueError when it has none in µm."""

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        xml = tiff.ome_metadata
    if not xml:
        raise ValueError("no OME metadata")
    for element in ElementTree.fromstring(xml).iter():
        if element.tag.endswith("}Pixels"):
            units = {element.get("PhysicalSizeXUnit", "µm"), element.get("PhysicalSizeYUnit", "µm")}
            if units != {"µm"} or element.get("PhysicalSizeX") is None or element.get("PhysicalSizeY") is None:
                raise ValueError(f"no physical pixel size in µm (units {sorted(units)})")
            return float(element.get("PhysicalSizeX", "nan")), float(element.get("PhysicalSizeY", "nan"))
    raise ValueError("no Pixels element in the OME metadata")


# --- a FOV's files ------------------------------------------------------------------------------------------------


def result_path(fov_id: str) -> str:
    """Where a FOV's whole result is kept, relative to the case folder."""
    return f"{RESULTS_DIR}/{fov_id}.json"


def ome_tiff_path(fov_id: str) -> str:
    """The FOV's OME-TIFF, relative to the case folder."""
    return f"{QUPATH_DIR}/{fov_id}.ome.tif"


def geojson_path(fov_id: str) -> str:
    """The FOV's GeoJSON, relative to the case folder."""
    return f"{QUPATH_DIR}/{fov_id}.geojson"


def decode_rgb(png: bytes | None) -> npt.NDArray[np.uint8] | None:
    """The RGB pixels of a recorded image (a PNG as the daemon captured it, BGR); None when it cannot be read."""

    if not png:
        return None
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def qupath_files(
    fov_id: str,
    result: FovResult,
    rgb: npt.NDArray[np.uint8] | None,
    roi: Sequence[Sequence[float]] | None,
    key: str,
) -> dict[str, bytes]:
    """The QuPath files of one scored FOV, relative path → content: the GeoJSON, and the OME-TIFF of its image
    (``rgb``, :func:`decode_rgb`) when there is one (without it the GeoJSON's frame is the cells' extent)."""
    if rgb is not None:
        shape = (int(rgb.shape[0]), int(rgb.shape[1]))
    else:  # the image is not there (yet): the region's grid needs only to hold the cells
        reach = max((max(c.ring_radii_um, default=0.0) for c in result.cells), default=0.0) / result.pixel_size_um
        shape = (
            int(max((c.row for c in result.cells), default=0.0) + reach) + 2,
            int(max((c.col for c in result.cells), default=0.0) + reach) + 2,
        )
    polygon = tuple((float(row), float(col)) for row, col in roi) if roi else None
    files = {geojson_path(fov_id): geojson_bytes(fov_features(result, shape, roi=polygon, key=key))}
    if rgb is not None:
        files[ome_tiff_path(fov_id)] = ome_tiff_bytes(rgb, result.pixel_size_um, name=fov_id)
    return files
