"""``her2scope export`` and ``record --pdf`` as real processes: on a case recorded by a real daemon and recorder, on
bad input, and printing the report with headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile

from her2scope.clients.export import PDF_FILE, find_chromium, pdf_pages
from her2scope.clients.qupath import FeatureCollection, class_counts, ome_pixel_size_um
from tests.helpers.cases import synthetic_case
from tests.helpers.daemon import wait_for
from tests.helpers.images import read_image
from tests.helpers.processes import ROOT, die_with_parent
from tests.helpers.recorder import ROI, Setup, capture, has_stop, read_docs, settled, start_daemon_setup, wait_for_docs

pytestmark = pytest.mark.e2e  # real processes: the command line, a daemon, a recorder, Chromium

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to print PDFs with (Debian: chromium)")


def her2scope(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "her2scope", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        preexec_fn=die_with_parent,
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A closed case recorded by ``her2scope record --pdf`` (when there is Chromium): a control, two FOVs, an ROI."""
    setup: Setup = start_daemon_setup(tmp_path_factory.mktemp("export-recorded"))
    recorder = setup.recorder(*(("--pdf",) if CHROMIUM else ()))
    case_dir = setup.out / "export-me"
    try:
        daemon = setup.daemon
        daemon.control.call("start-case", case_id="export-me")
        capture(daemon, "control")
        fovs = [capture(daemon, "field 0"), capture(daemon, "field 1")]
        settled(daemon)
        daemon.control.call("set-roi", fov_id=fovs[0], polygon=ROI)
        settled(daemon)
        daemon.control.call("close-case")
        wait_for_docs(case_dir, has_stop, "the stop document")
        if CHROMIUM:
            wait_for(lambda: (case_dir / PDF_FILE).exists(), timeout_s=120, what="the recorder's report.pdf")
    finally:
        assert recorder.stop() == 0
        setup.close()
    yield case_dir


def latest_events(case_dir: Path) -> dict[str, dict[str, Any]]:
    return {d["fov_id"]: d for d in read_docs(case_dir) if d["doc"] == "event"}


@needs_chromium
def test_the_recorder_prints_each_closed_cases_report_to_pdf(recorded: Path) -> None:
    data = (recorded / PDF_FILE).read_bytes()
    assert data.startswith(b"%PDF-") and pdf_pages(data) >= 1
    assert (recorded / PDF_FILE).stat().st_mode & 0o777 == 0o600


def test_export_writes_qupath_files_and_tables_of_a_recorded_case(recorded: Path) -> None:
    done = her2scope("export", str(recorded), "--format", "qupath", "--format", "csv")
    assert done.returncode == 0, done.stderr
    events = latest_events(recorded)
    assert len(events) == 3
    for fov_id, event in events.items():
        data = event["data"]
        assert isinstance(data, dict) and event["status"] == "scored"
        assert f"wrote {recorded / 'qupath' / (fov_id + '.geojson')}" in done.stdout
        tiff = (recorded / "qupath" / f"{fov_id}.ome.tif").read_bytes()
        assert ome_pixel_size_um(tiff) == (data["pixel_size_um"], data["pixel_size_um"]) == (0.5, 0.5)
        image = read_image(recorded / str(data["image"]))  # BGR as captured
        np.testing.assert_array_equal(tifffile.imread(recorded / "qupath" / f"{fov_id}.ome.tif"), image[:, :, ::-1])
        collection = FeatureCollection.model_validate_json((recorded / "qupath" / f"{fov_id}.geojson").read_bytes())
        assert class_counts(collection) == data["counts"]
    cells = (recorded / "cells.csv").read_text(encoding="utf-8").splitlines()
    assert len(cells) - 1 == sum(int(e["data"]["total"]) for e in events.values())
    report = (recorded / "report.html").read_text(encoding="utf-8")
    assert all(f"href='qupath/{fov_id}.geojson'" in report for fov_id in events)


def test_the_recorder_writes_the_qupath_files_as_it_records(recorded: Path) -> None:
    """Every scored FOV's whole result, OME-TIFF and GeoJSON, beside its event, before any export."""
    for fov_id, event in latest_events(recorded).items():
        data = event["data"]
        assert isinstance(data, dict)
        for key in ("result_file", "ome_tiff", "geojson"):
            assert (recorded / str(data[key])).is_file(), f"{fov_id}: {data[key]}"
        result = json.loads((recorded / str(data["result_file"])).read_text(encoding="utf-8"))
        assert result["counts"] == data["counts"]


@needs_chromium
def test_export_prints_the_report_to_a_pdf_that_shows_the_report(tmp_path: Path) -> None:
    case = synthetic_case(tmp_path)
    done = her2scope("export", str(case.path), "--pdf")
    assert done.returncode == 0, done.stderr
    data = (case.path / PDF_FILE).read_bytes()
    assert data.startswith(b"%PDF-") and pdf_pages(data) >= 1
    assert f"wrote {case.path / PDF_FILE}" in done.stdout
    if (pdftoppm := _which("pdftoppm")) is not None:  # its first page: the report's title and score, not a blank
        subprocess.run(
            [pdftoppm, "-png", "-r", "40", "-f", "1", "-l", "1", str(case.path / PDF_FILE), str(tmp_path / "page")],
            check=True,
            timeout=60,
        )
        page = cv2.imread(str(next(tmp_path.glob("page*.png"))))
        assert page is not None and page.std() > 10
        red = (page[:, :, 2] > 150) & (page[:, :, 1] < 80) & (page[:, :, 0] < 80)  # "HER2 IHC 3+" in red
        assert red.sum() > 50


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing", "not a folder"),
        ("empty", "no events.jsonl"),
        ("corrupt log", "line 1 is not a valid document"),
        ("corrupt result", "not a readable result"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, make: str, message: str) -> None:
    case_dir = tmp_path / "case"
    if make == "empty":
        case_dir.mkdir()
    elif make == "corrupt log":
        case_dir.mkdir()
        (case_dir / "events.jsonl").write_text('{"doc": "start", "uid": 3}\n')
    elif make == "corrupt result":
        case_dir = synthetic_case(tmp_path).path
        (case_dir / "results" / "fov-002.json").write_bytes(b"\x00\x01 not json")
    done = her2scope("export", str(case_dir))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr


def test_pdf_without_chromium_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no Chromium on this PATH
    for args in (["export", str(tmp_path), "--pdf"], ["record", "--out", str(tmp_path / "cases"), "--pdf"]):
        done = her2scope(*args, env=env)
        assert done.returncode == 2, done.stderr
        assert (
            done.stderr.count("\n") == 1
            and "needs Chromium" in done.stderr
            and "apt-get install chromium" in done.stderr
        )
