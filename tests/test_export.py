"""Exports of a recorded case for QuPath, Fiji and spreadsheets, from a case folder made through the recorder's own
functions (tests/helpers/cases.py): the OME-TIFF's calibration and pixels, the GeoJSON's schema, frame and counts,
the CSV tables, the report's links."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from her2scope.clients.export import (
    CELL_COLUMNS,
    CELLS_CSV,
    FOVS_CSV,
    ExportError,
    export_case,
    pdf_pages,
)
from her2scope.clients.qupath import (
    ROI_NAME,
    TUMOUR_REGION,
    FeatureCollection,
    MultiPolygon,
    Polygon,
    class_counts,
    geojson_path,
    geojson_schema,
    ome_pixel_size_um,
    ome_tiff_bytes,
    ome_tiff_path,
    result_path,
)
from her2scope.clients.recorder import read_log
from her2scope.clients.recorder.documents import EventDoc
from her2scope.clients.report import write_report
from tests.helpers.cases import PIXEL_SIZE, ROI, SyntheticCase, synthetic_case


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCase:
    """A closed case whose recorder wrote each FOV's result and QuPath files beside its event."""
    return synthetic_case(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def events(case: SyntheticCase) -> dict[str, EventDoc]:
    docs, _ = read_log(case.path / "events.jsonl")
    return {d.fov_id: d for d in docs if isinstance(d, EventDoc)}


def features(path: Path) -> FeatureCollection:
    return FeatureCollection.model_validate_json(path.read_bytes())


def test_every_fov_has_a_lossless_ome_tiff_with_its_pixel_size(
    case: SyntheticCase, events: dict[str, EventDoc]
) -> None:
    assert set(events) == {"control-001", "fov-002", "fov-003"}
    for fov_id, event in events.items():
        assert event.data.ome_tiff == ome_tiff_path(fov_id)
        path = case.path / event.data.ome_tiff
        with tifffile.TiffFile(path) as tiff:
            assert tiff.is_ome
            page = tiff.pages[0]
            assert isinstance(page, tifffile.TiffPage)
            pixels = tiff.asarray()
            x_resolution = page.tags["XResolution"].value
            unit = page.tags["ResolutionUnit"].value
        assert ome_pixel_size_um(path.read_bytes()) == (event.data.pixel_size_um, event.data.pixel_size_um)
        assert event.data.pixel_size_um == PIXEL_SIZE
        # ImageJ's own TIFF reader: pixels per cm
        assert unit == 3 and math.isclose(x_resolution[0] / x_resolution[1], 1e4 / PIXEL_SIZE)
        assert pixels.dtype == np.uint8 and pixels.shape == (*case.images[fov_id].shape[:2], 3)
        np.testing.assert_array_equal(pixels, case.images[fov_id][:, :, ::-1])  # lossless, RGB


def test_an_ome_tiff_refuses_what_it_cannot_calibrate() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="positive number of µm/px"):
        ome_tiff_bytes(rgb, 0.0)
    with pytest.raises(ValueError, match=r"\(M, N, 3\) uint8"):
        ome_tiff_bytes(rgb[:, :, 0], 0.25)
    with pytest.raises(ValueError, match="no OME metadata"):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, rgb)
        ome_pixel_size_um(buffer.getvalue())


def test_every_geojson_validates_and_its_classes_count_the_recorded_cells(
    case: SyntheticCase, events: dict[str, EventDoc]
) -> None:
    for fov_id, event in events.items():
        assert event.data.geojson == geojson_path(fov_id)
        raw = json.loads((case.path / event.data.geojson).read_text(encoding="utf-8"))
        collection = FeatureCollection.model_validate(raw)
        assert event.data.counts is not None and sum(event.data.counts.values()) > 50
        assert class_counts(collection) == event.data.counts == case.results[fov_id].counts.model_dump(mode="json")
        # QuPath's shape: nucleusGeometry beside geometry, not in the properties; measurements an object of numbers
        cells = [f for f in raw["features"] if f["properties"]["objectType"] == "cell"]
        result = case.results[fov_id]
        assert len(cells) == event.data.total == len(result.cells)
        assert all("nucleusGeometry" not in f["properties"] for f in cells)
        measured = [
            ("nucleusGeometry" in f, (c.nucleus_area_um2 or 0) > 0) for f, c in zip(cells, result.cells, strict=True)
        ]
        assert all(has == area for has, area in measured) and sum(has for has, _ in measured) > 0.9 * len(cells)
        assert all(f["properties"]["classification"]["name"] in {"0", "1+", "2+", "3+"} for f in cells)
        assert all(len(f["properties"]["classification"]["color"]) == 3 for f in cells)
        assert {"Membrane: completeness", "Membrane: intense completeness", "Nucleus: Area µm^2"} <= set(
            cells[0]["properties"]["measurements"]
        )
        patterns = Counter(f["properties"]["metadata"]["Membrane pattern"] for f in cells)
        assert patterns == Counter(c.pattern.value for c in case.results[fov_id].cells if c.pattern is not None)
    schema = geojson_schema()
    assert schema["properties"]["type"]["const"] == "FeatureCollection" and "Feature" in schema["$defs"]


def test_the_schema_refuses_what_qupath_would_not_read_as_meant(case: SyntheticCase) -> None:
    raw = json.loads((case.path / geojson_path("fov-003")).read_text(encoding="utf-8"))
    cell = next(f for f in raw["features"] if f["properties"]["objectType"] == "cell")
    open_ring = {**cell, "geometry": {"type": "Polygon", "coordinates": [cell["geometry"]["coordinates"][0][:-1]]}}
    not_a_number = {**cell, "properties": {**cell["properties"], "measurements": {"Membrane: DAB OD median": "high"}}}
    unknown_type = {**cell, "properties": {**cell["properties"], "objectType": "blob"}}
    for feature, message in [(open_ring, "must be closed"), (not_a_number, "valid number"), (unknown_type, "cell")]:
        with pytest.raises(ValueError, match=message):
            FeatureCollection.model_validate({"type": "FeatureCollection", "features": [feature]})


def test_the_rings_sit_on_their_cells_in_image_pixels_x_right_y_down(case: SyntheticCase) -> None:
    result = case.results["fov-002"]
    collection = features(case.path / geojson_path("fov-002"))
    cells = [f for f in collection.features if f.properties.objectType == "cell"]
    assert len(cells) == len(result.cells)
    roi_x = [col for _, col in ROI]
    roi_y = [row for row, _ in ROI]
    for feature, cell in zip(cells, result.cells, strict=True):
        assert isinstance(feature.geometry, Polygon)
        ring = np.asarray(feature.geometry.coordinates[0][:-1])
        # ray 0 points along +x (+col) and ray 6 of 24 along +y (+row)
        assert ring[0] == pytest.approx((cell.col + cell.ring_radii_um[0] / PIXEL_SIZE, cell.row), abs=0.01)
        assert ring[6] == pytest.approx((cell.col, cell.row + cell.ring_radii_um[6] / PIXEL_SIZE), abs=0.01)
        contour = ring.astype(np.float32).reshape(-1, 1, 2)
        assert cv2.pointPolygonTest(contour, (cell.col, cell.row), False) > 0
        # counted inside the ROI (to a pixel: the analysis grid is coarser), which is wider (x) than high (y)
        assert min(roi_x) - 1 <= cell.col <= max(roi_x) + 1 and min(roi_y) - 1 <= cell.row <= max(roi_y) + 1
        area = feature.properties.measurements["Cell: Area µm^2"]
        assert 40 < area < 600 and cell.nucleus_area_um2 is not None and cell.nucleus_area_um2 < area


def test_the_roi_and_the_tumour_region_are_locked_annotations_around_the_cells(case: SyntheticCase) -> None:
    collection = features(case.path / geojson_path("fov-002"))
    annotations = {f.properties.name: f for f in collection.features if f.properties.objectType == "annotation"}
    assert set(annotations) == {TUMOUR_REGION, ROI_NAME}
    assert all(f.properties.isLocked for f in annotations.values())
    roi = annotations[ROI_NAME].geometry
    assert isinstance(roi, Polygon)
    assert roi.coordinates[0] == [(col, row) for row, col in [*ROI, ROI[0]]]
    region = annotations[TUMOUR_REGION].geometry
    assert isinstance(region, Polygon | MultiPolygon)
    outer = [rings[0] for rings in ([region.coordinates] if region.type == "Polygon" else region.coordinates)]
    contours = [np.asarray(ring, np.float32).reshape(-1, 1, 2) for ring in outer]
    for cell in case.results["fov-002"].cells:
        assert any(cv2.pointPolygonTest(c, (cell.col, cell.row), False) >= 0 for c in contours)
    # no ROI on fov-003: its region only
    others = features(case.path / geojson_path("fov-003"))
    assert [f.properties.name for f in others.features if f.properties.objectType == "annotation"] == [TUMOUR_REGION]


def test_the_ids_are_the_same_when_the_same_fov_is_exported_again(case: SyntheticCase, tmp_path: Path) -> None:
    before = features(case.path / geojson_path("fov-003"))
    copy = synthetic_case(tmp_path, with_results=True)
    again = features(copy.path / geojson_path("fov-003"))
    assert [f.id for f in again.features] == [f.id for f in before.features]
    assert len({f.id for f in before.features}) == len(before.features)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SyntheticCase, list[str], list[str]]]:
    """A case recorded without whole results (as before they were kept): ``export`` scores its FOVs again."""
    case = synthetic_case(tmp_path_factory.mktemp("export-again"), with_results=False)
    written, notes = export_case(case.path)
    yield case, written, notes


def test_export_scores_again_what_has_no_recorded_result_and_gets_the_recorded_counts(
    exported: tuple[SyntheticCase, list[str], list[str]],
) -> None:
    case, written, notes = exported
    docs, _ = read_log(case.path / "events.jsonl")
    for event in (d for d in docs if isinstance(d, EventDoc)):
        assert not (case.path / result_path(event.fov_id)).exists()
        assert geojson_path(event.fov_id) in written and ome_tiff_path(event.fov_id) in written
        assert class_counts(features(case.path / geojson_path(event.fov_id))) == event.data.counts
        assert ome_pixel_size_um((case.path / ome_tiff_path(event.fov_id)).read_bytes()) == (PIXEL_SIZE, PIXEL_SIZE)
    assert len(notes) == 3 and all("scored again from its image with the recorded parameters" in n for n in notes)
    assert not any("recorded," in n for n in notes)  # the counts were reproduced


def test_the_csv_tables_have_a_row_per_cell_and_a_row_per_fov(
    exported: tuple[SyntheticCase, list[str], list[str]],
) -> None:
    case, written, _ = exported
    assert CELLS_CSV in written and FOVS_CSV in written
    cells = list(csv.DictReader(io.StringIO((case.path / CELLS_CSV).read_text(encoding="utf-8"))))
    fovs = list(csv.DictReader(io.StringIO((case.path / FOVS_CSV).read_text(encoding="utf-8"))))
    assert tuple(cells[0]) == CELL_COLUMNS
    assert len(cells) == sum(r.counts.total for r in case.results.values())
    for fov in fovs:
        result = case.results[fov["fov"]]
        assert Counter(c["class"] for c in cells if c["fov"] == fov["fov"]) == {
            k: v for k, v in result.counts.model_dump(mode="json").items() if v
        }
        assert int(fov["cells"]) == result.counts.total and fov["score"] == result.call.score
        assert [int(fov[f"cells_{k}"]) for k in ("0", "1+", "2+", "3+")] == list(result.counts.model_dump().values())
        assert float(fov["pixel_size_um"]) == PIXEL_SIZE
        assert fov["roi"] == ("yes" if fov["fov"] == "fov-002" else "no")
    first = next(c for c in cells if c["fov"] == "fov-003")
    cell = case.results["fov-003"].cells[0]
    assert float(first["x_px"]) == pytest.approx(cell.col, abs=0.01)
    assert float(first["y_um"]) == pytest.approx(cell.row * PIXEL_SIZE, abs=0.01)
    assert {f["fov"] for f in fovs} == {"control-001", "fov-002", "fov-003"}


def test_the_reports_link_each_fovs_qupath_files_and_the_tables(
    case: SyntheticCase, exported: tuple[SyntheticCase, list[str], list[str]]
) -> None:
    docs, _ = read_log(case.path / "events.jsonl")
    recorded = write_report(docs)  # the recorder's: the files its events name
    exported_report = (exported[0].path / "report.html").read_text(encoding="utf-8")  # export's: the files it wrote
    for report in (recorded, exported_report):
        for fov_id in ("control-001", "fov-002", "fov-003"):
            assert f"href='qupath/{fov_id}.ome.tif'" in report and f"href='qupath/{fov_id}.geojson'" in report
    assert f"href='{CELLS_CSV}'" in exported_report and f"href='{CELLS_CSV}'" not in recorded


def test_a_corrupt_result_or_image_is_one_clear_error(tmp_path: Path) -> None:
    case = synthetic_case(tmp_path)
    (case.path / result_path("fov-003")).write_text('{"counts": ')
    with pytest.raises(ExportError, match=r"results/fov-003.json: not a readable result .*delete it"):
        export_case(case.path)
    (case.path / result_path("fov-003")).unlink()
    (case.path / "images" / "fov-002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ExportError, match=r"images/fov-002.png: not a readable image"):
        export_case(case.path)
    with pytest.raises(ExportError, match="unknown format 'xml'"):
        export_case(case.path, ["xml"])


def test_pdf_pages_counts_page_objects_only() -> None:
    assert pdf_pages(b"not a pdf /Type /Page") == 0
    assert pdf_pages(b"%PDF-1.4 /Type /Pages /Type /Page /Type/Page /Type /PageLabel") == 2
