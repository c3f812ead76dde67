"""A recorded case for other tools: QuPath (an OME-TIFF and a GeoJSON per FOV), spreadsheets (CSV), the lab
information system (the report as PDF). ``her2scope export CASE_DIR``; the recorder writes the QuPath files as it
records (:meth:`CaseFolder.write_exports <her2scope.clients.recorder.CaseFolder.write_exports>`).

Files, in the case folder::

    qupath/<fov_id>.ome.tif   the field, lossless, calibrated in µm (``clients.qupath``)
    qupath/<fov_id>.geojson   its counted cells, the tumour region and the ROI as QuPath objects
    cells.csv                 one row per counted cell of every scored FOV
    fovs.csv                  one row per FOV: counts, shares, score, thresholds, pixel size
    report.pdf                report.html printed by headless Chromium

A FOV's cells come from ``results/<fov_id>.json``, which the recorder writes beside each result; a FOV recorded
without one (an older recording, or a result recovered from the daemon's summary after a gap) is scored again from
its lossless image with the recorded parameters, which reproduce the recorded result. Export re-renders
``report.html`` from the log, with links to what it wrote; the log and the images are never modified.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import structlog
from pydantic import ValidationError

from her2scope.clients.qupath import decode_rgb, geojson_path, ome_tiff_path, qupath_files, result_path
from her2scope.clients.recorder import REPORT_FILE, CaseFolder, EventDoc, atomic_write
from her2scope.clients.report import render_report
from her2scope.clients.rescore import RecordedCase, RescoreError, rescored_results
from her2scope.scoring.results import HER2_SCORES, FovResult

log = structlog.get_logger(__name__)

CELLS_CSV = "cells.csv"
FOVS_CSV = "fovs.csv"
PDF_FILE = "report.pdf"
FORMATS = ("qupath", "csv")
#: Names Chromium's executable goes by (Debian, other distributions, Google's build).
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PDF_TIMEOUT_S = 120.0

RowCol = tuple[float, float]


class ExportError(ValueError):
    """A case folder cannot be exported, or the PDF cannot be printed; the message says which file and why."""


# --- tables ----------------------------------------------------------------------------------------------------------

CELL_COLUMNS = (
    "fov",
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "class",
    "pattern",
    "completeness",
    "intense_completeness",
    "membrane_od",
    "nucleus_area_um2",
)
FOV_COLUMNS = (
    "fov",
    "kind",
    "status",
    "excluded",
    "roi",
    "cells",
    *(f"cells_{c.value}" for c in HER2_SCORES),
    *(f"percent_{c.value}" for c in HER2_SCORES),
    "score",
    "call_status",
    "reason",
    "weak_threshold_od",
    "intense_threshold_od",
    "intense_threshold_source",
    "tumour_area_mm2",
    "pixel_size_um",
    "error",
)


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def cells_csv(results: Mapping[str, FovResult]) -> str:
    """One row per counted cell: its FOV, position (FOV image pixels, x = column; and µm), class and measures."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CELL_COLUMNS)
    for fov_id, result in results.items():
        px = result.pixel_size_um
        for cell in result.cells:
            writer.writerow(
                [
                    fov_id,
                    _number(cell.col, 2),
                    _number(cell.row, 2),
                    _number(cell.col * px, 2),
                    _number(cell.row * px, 2),
                    cell.her2_class.value,
                    cell.pattern.value if cell.pattern is not None else "",
                    _number(cell.completeness, 3),
                    _number(cell.intense_completeness, 3),
                    _number(cell.membrane_od),
                    _number(cell.nucleus_area_um2, 2),
                ]
            )
    return out.getvalue()


def fovs_csv(events: Sequence[EventDoc], excluded: set[str], rois: set[str]) -> str:
    """One row per FOV (its latest result): the counts and shares per class, the call, thresholds, pixel size."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FOV_COLUMNS)
    for event in events:
        data = event.data
        counts = data.counts or {}
        percentages = data.percentages or {}
        writer.writerow(
            [
                event.fov_id,
                event.kind,
                event.status,
                "yes" if event.fov_id in excluded else "no",
                "yes" if event.fov_id in rois else "no",
                data.total,
                *(counts.get(c.value, "") for c in HER2_SCORES),
                *(_number(percentages.get(c.value), 2) for c in HER2_SCORES),
                data.score or "",
                data.call_status or "",
                data.reason or "",
                _number(data.weak_threshold_od),
                _number(data.intense_threshold_od),
                data.intense_threshold_source or "",
                _number(data.tumour_area_mm2, 6),
                _number(data.pixel_size_um),
                data.error or "",
            ]
        )
    return out.getvalue()


# --- the case --------------------------------------------------------------------------------------------------------


def _read_results(case: RecordedCase) -> tuple[dict[str, FovResult], list[str]]:
    """The whole result of every scored FOV: recorded, or scored again from its image; and notes on how."""
    results: dict[str, FovResult] = {}
    missing: list[str] = []
    for fov_id, event in case.latest.items():
        if event.status != "scored":
            continue
        path = case.case_dir / result_path(fov_id)
        if not path.is_file():
            missing.append(fov_id)
            continue
        try:
            results[fov_id] = FovResult.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as error:
            reason = error.strerror if isinstance(error, OSError) else error.errors()[0]["msg"]
            raise ExportError(f"{path}: not a readable result ({reason}); delete it to score the FOV again") from None
    notes: list[str] = []
    if missing:
        rescored, errors = rescored_results(case)
        for fov_id in missing:
            result = rescored.get(fov_id)
            if result is None:
                raise ExportError(f"{fov_id}: no recorded result and it cannot be scored again: {errors.get(fov_id)}")
            results[fov_id] = result
            recorded = case.latest[fov_id].data.counts
            same = recorded is None or recorded == result.counts.model_dump(mode="json")
            notes.append(
                f"{fov_id}: no recorded result: scored again from its image with the recorded parameters"
                + ("" if same else f" (counts {recorded} recorded, {result.counts.model_dump(mode='json')} now)")
            )
    return {fov_id: results[fov_id] for fov_id in case.latest if fov_id in results}, notes


def export_case(case_dir: Path, formats: Iterable[str] = FORMATS, *, pdf: bool = False) -> tuple[list[str], list[str]]:
    """Write the chosen exports of a recorded case into its folder; the files written (relative) and notes.

    Raises
    ------
    ExportError
        Not a case folder, an unreadable log, result or image, an unknown format, no Chromium for ``pdf``.
    """

    chosen = set(formats)
    if unknown := chosen - set(FORMATS):
        raise ExportError(f"unknown format {sorted(unknown)[0]!r}; known: {', '.join(FORMATS)}")
    chromium = find_chromium() if pdf else None
    if pdf and chromium is None:
        raise ExportError(no_chromium_message())
    try:
        case = RecordedCase(case_dir)
    except RescoreError as error:
        raise ExportError(str(error)) from None
    results, notes = _read_results(case)
    files: dict[str, bytes] = {}
    if "qupath" in chosen:
        for fov_id, result in results.items():
            image = case.case_dir / case.latest[fov_id].data.image
            try:
                png = image.read_bytes()
            except OSError as error:
                raise ExportError(f"{image}: {error.strerror or error}") from None
            rgb = decode_rgb(png)
            if rgb is None:
                raise ExportError(f"{image}: not a readable image")
            roi = case.rois.get(fov_id)
            files |= qupath_files(fov_id, result, rgb, roi, f"{case.start.case_id}/{fov_id}")
    if "csv" in chosen:
        events = list(case.latest.values())
        files[CELLS_CSV] = cells_csv(results).encode()
        files[FOVS_CSV] = fovs_csv(events, case.excluded, {f for f, roi in case.rois.items() if roi}).encode()
    for relative, data in files.items():
        target = case.case_dir / relative
        target.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(target, data)
    exports = {
        fov_id: [(label, path) for label, path in links if (case.case_dir / path).is_file()]
        for fov_id in case.latest
        for links in [[("OME-TIFF", ome_tiff_path(fov_id)), ("GeoJSON", geojson_path(fov_id))]]
    }
    tables = [name for name in (CELLS_CSV, FOVS_CSV) if (case.case_dir / name).is_file()]
    report = render_report(case.docs, None, exports=exports, tables=tables, generated=time.time())
    atomic_write(case.case_dir / REPORT_FILE, report.encode())
    written = [*files, REPORT_FILE]
    if pdf and chromium is not None:
        print_pdf(case.case_dir / REPORT_FILE, case.case_dir / PDF_FILE, chromium=chromium)
        written.append(PDF_FILE)
    return written, notes


# --- PDF -------------------------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on the PATH, if there is one."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def no_chromium_message() -> str:
    """What to do when there is no Chromium to print with."""
    return "--pdf needs Chromium to print the report, and none was found: install it (Debian: apt-get install chromium)"


def _print_command(chromium: str, html: Path, pdf: Path, profile: Path) -> list[str]:
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-pdf-header-footer",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--print-to-pdf={pdf}",
        html.resolve().as_uri(),
    ]


def pdf_pages(data: bytes) -> int:
    """Pages of a PDF (its page objects); 0 when ``data`` is not a PDF."""
    if not data.startswith(b"%PDF-"):
        return 0
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


def _finish_print(returncode: int | None, output: Path, pdf: Path, html: Path, stderr: str) -> None:
    data = output.read_bytes() if output.is_file() else b""
    if returncode != 0 or pdf_pages(data) == 0:
        detail = next((line for line in reversed(stderr.splitlines()) if "print" in line.lower()), "no PDF written")
        raise ExportError(f"{html}: Chromium could not print it (exit code {returncode}: {detail.strip()})")
    atomic_write(pdf, data)


def _start_print(chromium: str, html: Path, work: Path) -> subprocess.Popen[bytes]:
    """Chromium printing ``html`` to ``work``/report.pdf, its messages (many, on a server) to ``work``/chromium.log."""
    with open(work / "chromium.log", "wb") as messages:
        return subprocess.Popen(
            _print_command(chromium, html, work / PDF_FILE, work / "profile"),
            stdout=subprocess.DEVNULL,
            stderr=messages,
            start_new_session=True,  # its helper processes go with it on a timeout
        )


def _messages(work: Path) -> str:
    try:
        return (work / "chromium.log").read_text(errors="replace")
    except OSError:
        return ""


def print_pdf(html: Path, pdf: Path, *, chromium: str | None = None, timeout_s: float = PDF_TIMEOUT_S) -> None:
    """Print ``html`` (with the files it links, relative to it) to ``pdf`` with headless Chromium.

    Raises
    ------
    ExportError
        No Chromium, it failed or took longer than ``timeout_s``, or what it wrote is not a PDF.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise ExportError(no_chromium_message())
    if not html.is_file():
        raise ExportError(f"{html}: no such report")
    with tempfile.TemporaryDirectory(prefix="her2scope-pdf-") as name:
        work = Path(name)
        process = _start_print(chromium, html, work)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(process)
            raise ExportError(f"{html}: Chromium did not print it within {timeout_s:g} s") from None
        _finish_print(process.returncode, work / PDF_FILE, pdf, html, _messages(work))


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)
    process.wait()


class ReportPrinter:
    """Prints the report of every case the recorder has closed to ``report.pdf``, without holding up the recording:
    one Chromium process per case, started and collected by :meth:`update` (call it every turn of the loop)."""

    def __init__(self, chromium: str, timeout_s: float = PDF_TIMEOUT_S) -> None:
        self.chromium = chromium
        self.timeout_s = timeout_s
        self._running: dict[str, tuple[subprocess.Popen[bytes], tempfile.TemporaryDirectory[str], float, Path]] = {}
        self._done: set[str] = set()

    def update(self, folders: Iterable[CaseFolder]) -> None:
        """Start printing each closed case whose final report is on disk; collect the prints that finished."""
        for folder in folders:
            key = str(folder.path)
            if key in self._done or key in self._running or not folder.stopped or folder.pending:
                continue
            if (folder.path / PDF_FILE).exists() or not (folder.path / REPORT_FILE).is_file():
                self._done.add(key)
                continue
            work = tempfile.TemporaryDirectory(prefix="her2scope-pdf-")
            process = _start_print(self.chromium, folder.path / REPORT_FILE, Path(work.name))
            self._running[key] = (process, work, time.monotonic(), folder.path)
        self._collect()

    def _collect(self) -> None:
        for key, (process, work, started, path) in list(self._running.items()):
            if process.poll() is None:
                if time.monotonic() - started < self.timeout_s:
                    continue
                _kill(process)
            del self._running[key]
            self._done.add(key)
            output = Path(work.name)
            try:
                _finish_print(
                    process.returncode, output / PDF_FILE, path / PDF_FILE, path / REPORT_FILE, _messages(output)
                )
                log.info("report_pdf_written", case_dir=str(path), file=PDF_FILE)
            except (ExportError, OSError) as error:
                log.error("report_pdf_failed", case_dir=str(path), error=str(error))
            finally:
                work.cleanup()

    def finish(self, timeout_s: float | None = None) -> None:
        """Wait for the prints still running (at most ``timeout_s`` each, default the printer's)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while self._running and time.monotonic() < deadline:
            self._collect()
            time.sleep(0.05)
        for process, _, _, _ in self._running.values():
            _kill(process)
        self._collect()
