"""The case folder on disk: an append-only, fsynced log of documents, atomically rewritten files, the state file.

Folder layout (``<out>/<case_id>/``, mode 0o700, files 0o600)::

    events.jsonl            append-only log; each line written whole, flushed and fsynced
    schema.json             JSON Schema of the documents (pydantic ``model_json_schema``)
    recorder-state.json     daemon session and last sequence number processed (atomic rewrite)
    images/<fov_id>.png     the captured FOV / control, lossless, byte for byte the daemon's file
    overlays/<fov_id>/<layer>.png   the overlay layers (RGBA) of the FOV's latest result
    overlays/<fov_id>.png   the default layers composed over the downscaled image, for the report
    results/<fov_id>.json   the FOV's latest whole result, its cells included (``FovResult``)
    qupath/<fov_id>.ome.tif the field as a lossless OME-TIFF calibrated in µm (QuPath, Fiji)
    qupath/<fov_id>.geojson its cells, tumour region and ROI as QuPath objects (``clients.qupath``)
    report.html             for people; rewritten atomically after every change, final at stop

A torn last line (a crash mid-write) is truncated at the next start; the message it held is replayed.
A failed write (a full disk) is logged, kept in memory and retried; it never leaves a partial line behind.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from her2scope.clients.qupath import decode_rgb, qupath_files, result_path
from her2scope.clients.recorder.documents import DOCUMENT, ActionDoc, EventDoc, Run, StopDoc, document_schema
from her2scope.daemon.protocol import CaseSummary
from her2scope.scoring.results import FovResult

log = structlog.get_logger(__name__)

EVENTS_FILE = "events.jsonl"
SCHEMA_FILE = "schema.json"
STATE_FILE = "recorder-state.json"
REPORT_FILE = "report.html"


def read_log(path: Path) -> tuple[list[BaseModel], int]:
    """The documents of an events.jsonl and the byte length of its whole lines (a torn tail is not counted).

    Raises
    ------
    ValueError
        A complete line that is not a valid document (the log was edited or is not a her2scope log).
    """
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1  # bytes after the last newline: a line torn by a crash
    docs: list[BaseModel] = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            docs.append(DOCUMENT.validate_json(line))
        except ValidationError as error:
            raise ValueError(f"{path}: line {number} is not a valid document: {error.errors()[0]['msg']}") from None
    return docs, end


# --- durable files -----------------------------------------------------------------------------------------------


def _write_fully(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (the one place bytes reach the disk; tests replace it to fill the disk)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # the mode given to open is masked by the umask: 0600 whatever it is
    return fd


def append_line(path: Path, line: bytes) -> None:
    """Append one whole line and fsync; after any failure the file is cut back to its previous length."""
    fd = _open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_fully(fd, line)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)  # never leave a partial line behind (a full disk)
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (temporary file, fsync, rename): a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_fully(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial temporary file would hold on to the space of a full disk
        raise
    _fsync_dir(path.parent)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


class CaseFolder:
    """One case's folder: its documents (in memory and in ``events.jsonl``) and its files.

    Every write that fails (a full disk) is logged and queued; :meth:`retry` writes the queue in order, so the
    log on disk is always a prefix of the documents in memory, made of whole lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        _private_dir(path)
        for sub in ("images", "overlays"):
            _private_dir(path / sub)
        log_path = path / EVENTS_FILE
        self.docs, end = read_log(log_path)
        if log_path.exists() and log_path.stat().st_size > end:
            torn = log_path.stat().st_size - end
            with open(log_path, "r+b") as handle:  # the torn tail of a crash mid-write: its message is replayed
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
            log.warning("torn_line_truncated", case_dir=str(path), bytes=torn)
        self.run = Run.resume(self.docs)
        self.state: dict[str, Any] = {}
        try:
            self.state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.state = {}
        self.summary: CaseSummary | None = None  # the latest case summary heard from the daemon
        self.overlay_layers: dict[str, tuple[str, ...]] = {}
        self._pending_lines: list[bytes] = []
        self._pending_files: dict[str, bytes] = {}  # relative path → content, in insertion order
        if not (path / SCHEMA_FILE).exists():
            self.write_file(SCHEMA_FILE, json.dumps(document_schema(), indent=1).encode())

    @property
    def case_id(self) -> str:
        """The case (the folder's name)."""
        return self.path.name

    @property
    def stopped(self) -> bool:
        """The case has its stop document."""
        return any(isinstance(d, StopDoc) for d in self.docs)

    def events(self) -> list[EventDoc]:
        """Every FOV event, in log order."""
        return [d for d in self.docs if isinstance(d, EventDoc)]

    def has_event(self, fov_id: str) -> bool:
        """Whether ``fov_id`` has an event."""
        return any(isinstance(d, EventDoc) and d.fov_id == fov_id for d in self.docs)

    def latest_event(self, fov_id: str) -> EventDoc | None:
        """The last event of ``fov_id`` (a re-score's replaces an earlier one), if it has one."""
        return next((d for d in reversed(self.docs) if isinstance(d, EventDoc) and d.fov_id == fov_id), None)

    def seen(self, session: str, seq: int) -> bool:
        """Whether the daemon message ``(session, seq)`` already has an event."""
        return any(isinstance(d, EventDoc) and d.daemon_seq == seq and d.daemon_session == session for d in self.docs)

    def n_actions(self) -> int:
        """Actions recorded (the case's adjustments are recorded in order, once each)."""
        return sum(1 for d in self.docs if isinstance(d, ActionDoc))

    @property
    def pending(self) -> int:
        """Writes waiting for a retry."""
        return len(self._pending_lines) + len(self._pending_files)

    def append(self, doc: BaseModel) -> None:
        """Add a document to the log (written now, or queued if the disk refuses it)."""
        self.docs.append(doc)
        self._pending_lines.append(doc.model_dump_json().encode() + b"\n")
        self.retry()

    def write_file(self, relative: str, data: bytes) -> None:
        """Atomically (re)write a file of the folder (queued if the disk refuses it)."""
        self._pending_files.pop(relative, None)
        self._pending_files[relative] = data
        self.retry()

    def read_file(self, relative: str) -> bytes | None:
        """A file's content (waiting to be written, or on disk); None if there is none."""
        if relative in self._pending_files:
            return self._pending_files[relative]
        try:
            return (self.path / relative).read_bytes()
        except OSError:
            return None

    def has_file(self, relative: str) -> bool:
        """The file exists or is waiting to be written."""
        return relative in self._pending_files or (self.path / relative).exists()

    def retry(self) -> bool:
        """Write what is queued, in order; False (and logged) when the disk still refuses."""
        try:
            while self._pending_lines:
                append_line(self.path / EVENTS_FILE, self._pending_lines[0])
                self._pending_lines.pop(0)
            for relative in list(self._pending_files):
                target = self.path / relative
                _private_dir(target.parent)
                atomic_write(target, self._pending_files[relative])
                del self._pending_files[relative]
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error(
                "disk_full" if full else "write_failed",
                case_dir=str(self.path),
                error=str(error),
                pending=self.pending,
                hint="free disk space: the recorder keeps the data in memory and retries" if full else None,
            )
            return False
        return True

    def roi(self, fov_id: str) -> list[list[float]] | None:
        """The FOV's ROI polygon ([row, col] FOV pixels) as the recorded ``set-roi`` actions left it."""
        polygon = None
        for doc in self.docs:
            if isinstance(doc, ActionDoc) and doc.action == "set-roi" and doc.args.get("fov_id") == fov_id:
                polygon = doc.args.get("polygon") or None
        return polygon

    def write_exports(self, fov_id: str, result: FovResult | None) -> None:
        """Write a scored FOV's whole result and its QuPath files (see the layout above) beside its event.

        Call it after the FOV's event (and its image) were added, and the ROI actions before it. A failure is
        logged and costs these files only (``her2scope export`` can make them again), never the record.
        """
        if result is None:
            return
        try:
            self.write_file(result_path(fov_id), result.model_dump_json().encode())
            rgb = decode_rgb(self.read_file(f"images/{fov_id}.png"))
            files = qupath_files(fov_id, result, rgb, self.roi(fov_id), f"{self.case_id}/{fov_id}")
        except Exception as error:  # the exports are derived data: the event and the image are the record
            log.error("export_failed", case_dir=str(self.path), fov=fov_id, error=f"{type(error).__name__}: {error}")
            return
        for relative, data in files.items():
            self.write_file(relative, data)

    def save_state(self, **update: Any) -> None:
        """Update ``recorder-state.json`` (atomically)."""
        self.state.update(update, updated=time.time())
        self.write_file(STATE_FILE, json.dumps(self.state).encode())
