"""The current case: its FOVs, control calibration, the pathologist's adjustments and the running case score.

Persisted atomically after every change (``case.json`` written to a temporary file, fsynced, renamed), with each
captured image saved losslessly beside it, so that a daemon restarted mid-case resumes it where it was. Each FOV's
result (its cells and their rings: ~100-300 kB) is written once, to a file of its own, before ``case.json`` names
it scored: ``case.json`` stays small, and a capture costs the same at the 40th FOV as at the first.

Layout under the state directory::

    current -> cases/<case_id>              (a file naming the open case)
    cases/<case_id>/case.json               (the case without its FOVs' results)
    cases/<case_id>/<fov_id>.png            (BGR as captured, lossless)
    cases/<case_id>/<fov_id>.result.json    (the FOV's FovResult)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.protocol import NO_CASE, AuditEntry, CaseCall, CaseSummary, ControlEntry, FovEntry
from her2scope.scoring.case import score_case
from her2scope.scoring.results import ControlCalibration, FovResult

RowCol = tuple[float, float]
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class CaseError(ValueError):
    """A request that does not fit the case (unknown FOV, no open case, bad case id); says why."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FovRecord(_Model):
    """One captured field (or the control) of the case."""

    fov_id: str
    kind: Literal["fov", "control"]
    index: int
    captured_at: str
    trigger: str
    image_file: str
    pixel_size_um: float
    status: Literal["pending", "scored", "failed"] = "pending"
    result: FovResult | None = None
    error: str | None = None
    excluded: bool = False
    roi: tuple[RowCol, ...] | None = None
    calibration_region: tuple[RowCol, ...] | None = Field(
        None, description="For a control: the region the intense threshold is taken from (None: all of it)"
    )


class CaseState(_Model):
    """Everything needed to resume, audit and re-score the case."""

    case_id: str
    operator: str | None = None
    started_at: str
    closed_at: str | None = None
    params: ScoringParams
    rule: CaseRule
    control: ControlCalibration | None = None
    control_fov_id: str | None = None
    fovs: tuple[FovRecord, ...] = ()
    adjustments: tuple[AuditEntry, ...] = ()
    next_index: int = 1


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def private_dir(path: Path) -> None:
    """Create ``path`` (and its missing parents) readable by the service's user only, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask, and an existing folder keeps its own


def _private_opener(path: str, flags: int) -> int:
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # the mode given to open is masked by the umask (and a left-over file keeps its own)
    return fd


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a torn one.

    The file is the service user's only (0600), whatever the umask: it holds patients' images and results.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb", opener=_private_opener) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a torn temporary file would hold on to the space of a full disk
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ImageWriter:
    """Encodes and writes captured images (lossless PNG) on a thread of its own, in order.

    PNG-encoding a 1080p frame takes 50–100 ms; done on the daemon's loop it would delay every result. Writes that
    fail (a full disk) are reported by :meth:`poll` and retried by the caller; the image stays in memory meanwhile.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[str, Path, npt.NDArray[np.uint8]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[str, str | None]] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="her2scope-image-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, path: Path, image: npt.NDArray[np.uint8]) -> None:
        """Queue ``image`` to be written to ``path``; ``key`` identifies it in :meth:`poll`."""
        with self._idle:
            self._pending += 1
        self._jobs.put((key, path, image))

    def poll(self) -> list[tuple[str, str | None]]:
        """(key, None) for each image written since the last call, (key, error) for each that failed."""
        finished = []
        while True:
            try:
                finished.append(self._done.get_nowait())
            except queue.Empty:
                return finished

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued image is written (or failed); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            key, path, image = job
            error: str | None = None
            try:
                ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                if not ok:
                    raise OSError(f"could not encode {path.name} as PNG")
                atomic_write(path, png.tobytes())
            except Exception as failure:  # reported to the caller, never fatal to the thread
                error = f"{type(failure).__name__}: {failure}"
            self._done.put((key, error))
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()


class CaseStore:
    """Holds the open case and keeps its folder in step. Used from the daemon's main thread only.

    Captured images are written by an :class:`ImageWriter`; until they are on disk they are served from memory.
    Call :meth:`poll_images` regularly (the daemon's loop does) to learn of written and failed images.
    """

    #: A failed image write is tried again after this long (the disk may have been cleared).
    RETRY_S = 5.0
    #: ... and this often while the daemon waits to exit.
    SHUTDOWN_RETRY_S = 0.5

    def __init__(self, directory: Path, max_audit_entries: int = 10_000) -> None:
        self.directory = directory
        self.max_audit_entries = max_audit_entries
        self._case: CaseState | None = None
        self._writer = ImageWriter()
        self.repaired: list[tuple[str, str]] = []  # FOVs the last resume found without their image or result
        self._unsaved: dict[str, tuple[Path, npt.NDArray[np.uint8]]] = {}  # fov_id → (path, image)
        self._failed_at: dict[str, float] = {}

    @property
    def case(self) -> CaseState | None:
        """The open case, or None."""
        return self._case

    @property
    def case_dir(self) -> Path:
        """The open case's folder."""
        if self._case is None:
            raise CaseError("no case is open")
        return self.directory / "cases" / self._case.case_id

    def resume(self, default_rule: CaseRule | None = None) -> CaseState | None:
        """Reopen the case that was open when the daemon stopped, if any.

        A case saved before its rule had a field (``guideline``, ``specimen``, the cluster settings) takes that
        field from ``default_rule`` (the configuration's), not from the model's default.

        A FOV whose image or result did not reach the disk (the daemon was killed between writing ``case.json``
        and its image, or the disk was full) becomes ``failed``, saying why, and is listed in :attr:`repaired`:
        one FOV never keeps the case (or the daemon) from starting. A case that cannot be read at all raises
        CaseError; :meth:`set_aside` then stops it from being resumed again.
        """
        self.repaired = []
        pointer = self.directory / "current"
        if not pointer.is_file():
            return None
        try:
            case_id = pointer.read_text(encoding="utf-8").strip()
        except (OSError, ValueError) as error:
            raise CaseError(f"cannot read the open case's name from {pointer}: {error}") from None
        if not _CASE_ID.fullmatch(case_id):  # it names a folder: nothing outside cases/
            raise CaseError(f"{pointer} names {case_id[:80]!r}, which is not a case id")
        path = self.directory / "cases" / case_id / "case.json"
        try:
            document = json.loads(path.read_bytes())
            if default_rule is not None and isinstance(document, dict) and isinstance(document.get("rule"), dict):
                document["rule"] = {**default_rule.model_dump(mode="json"), **document["rule"]}
            case = CaseState.model_validate(document)
        except (OSError, ValueError, RecursionError) as error:
            raise CaseError(f"cannot resume case {case_id!r} from {path}: {error}") from None
        case, self.repaired = _with_results(case, path.parent)
        if case.closed_at is not None:
            return None
        self._case = case
        if self.repaired:
            with contextlib.suppress(OSError):  # a full disk: repaired in memory, written at the next change
                self._commit(case)
        return self._case

    def set_aside(self) -> Path | None:
        """Stop the case named by ``current`` from being resumed (its folder stays as it is, for a person to look
        at): ``current`` is renamed ``current.set-aside``. Returns the new name, None if there was no pointer."""
        pointer = self.directory / "current"
        aside = pointer.with_name("current.set-aside")
        try:
            os.replace(pointer, aside)
        except FileNotFoundError:
            return None
        return aside

    def start(
        self, params: ScoringParams, rule: CaseRule, case_id: str | None = None, operator: str | None = None
    ) -> CaseState:
        """Open a new case (closing the open one first)."""
        if case_id is None:
            case_id = "case-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        if not _CASE_ID.fullmatch(case_id):  # not match: "$" would let a trailing newline (a scanner's) through
            raise CaseError(f"case id {case_id!r} must be 1-80 letters, digits, '.', '_' or '-' (it names a folder)")
        if (self.directory / "cases" / case_id / "case.json").exists():
            raise CaseError(f"case {case_id!r} already exists; choose another id")
        if self._case is not None:
            self.close()
        case = CaseState(case_id=case_id, operator=operator, started_at=_now(), params=params, rule=rule)
        for folder in (self.directory, self.directory / "cases", self.directory / "cases" / case_id):
            private_dir(folder)  # patients' images: readable by the service's user only
        self._commit(case)
        atomic_write(self.directory / "current", case_id.encode())
        return case

    def close(self) -> CaseState:
        """Close the open case (after its images are written); it stays on disk."""
        self.flush_images()
        closed = self._require().model_copy(update={"closed_at": _now()})
        self._commit(closed)
        (self.directory / "current").unlink(missing_ok=True)
        self._case = None
        return closed

    def add_capture(
        self, kind: Literal["fov", "control"], image_bgr: npt.NDArray[np.uint8], trigger: str, pixel_size_um: float
    ) -> FovRecord:
        """Add a captured image to the case as pending; it is written losslessly in the background.

        Raises OSError when ``case.json`` cannot be written (a full disk); the case is then unchanged.
        """
        case = self._require()
        fov_id = f"{'control' if kind == 'control' else 'fov'}-{case.next_index:03d}"
        file_name = f"{fov_id}.png"
        record = FovRecord(
            fov_id=fov_id,
            kind=kind,
            index=case.next_index,
            captured_at=_now(),
            trigger=trigger,
            image_file=file_name,
            pixel_size_um=pixel_size_um,
        )
        self._commit(case.model_copy(update={"fovs": (*case.fovs, record), "next_index": case.next_index + 1}))
        path = self.case_dir / file_name
        self._unsaved[fov_id] = (path, image_bgr)
        self._writer.submit(fov_id, path, image_bgr)
        return record

    def poll_images(self) -> list[tuple[str, str]]:
        """Note the images written since the last call; return (fov_id, error) for those that failed.

        Failed writes are retried every ``RETRY_S`` seconds; the image is kept in memory until it is on disk.
        """
        failures = []
        for fov_id, error in self._writer.poll():
            if error is None:
                self._unsaved.pop(fov_id, None)
                self._failed_at.pop(fov_id, None)
            else:
                self._failed_at[fov_id] = time.monotonic()
                failures.append((fov_id, error))
        now = time.monotonic()
        for fov_id, failed_at in list(self._failed_at.items()):
            if now - failed_at >= self.RETRY_S and fov_id in self._unsaved:
                del self._failed_at[fov_id]
                self._writer.submit(fov_id, *self._unsaved[fov_id])
        return failures

    @property
    def unsaved_images(self) -> int:
        """Captured images not yet on disk (being written, or failed and waiting for a retry)."""
        return len(self._unsaved)

    def flush_images(self, timeout_s: float = 30.0) -> bool:
        """Wait for the queued image writes; False if some are still unwritten (failed or timed out)."""
        self._writer.flush(timeout_s)
        self.poll_images()
        return not self._unsaved

    def shutdown(self, timeout_s: float = 30.0, on_wait: Callable[[int], None] | None = None) -> bool:
        """Write the queued images and stop the writer; False if some images could not be written.

        Images that fail (a full disk) are tried again every ``SHUTDOWN_RETRY_S`` until ``timeout_s``: space freed
        meanwhile saves them (``on_wait(unsaved)`` is called once when it comes to waiting).
        """
        deadline = time.monotonic() + timeout_s
        while not self.flush_images(max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            if on_wait is not None:
                on_wait(self.unsaved_images)
                on_wait = None
            time.sleep(min(self.SHUTDOWN_RETRY_S, max(0.0, deadline - time.monotonic())))
            self._failed_at = dict.fromkeys(self._failed_at, -self.RETRY_S)  # due now: the next poll retries them
        self._writer.stop(max(0.0, deadline - time.monotonic()))
        return not self._unsaved

    def record(self, fov_id: str) -> FovRecord:
        """The record of ``fov_id``; CaseError if the case has no such FOV."""
        for record in self._require().fovs:
            if record.fov_id == fov_id:
                return record
        raise CaseError(f"no FOV {fov_id!r} in case {self._require().case_id!r}")

    def image(self, fov_id: str) -> npt.NDArray[np.uint8]:
        """The captured image (BGR) of ``fov_id``: from memory while it is being written, else from its file."""
        if fov_id in self._unsaved:
            return self._unsaved[fov_id][1]
        path = self.case_dir / self.record(fov_id).image_file
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise CaseError(f"the image of {fov_id} ({path}) cannot be read")
        return np.asarray(image, dtype=np.uint8)

    def image_png(self, fov_id: str) -> bytes:
        """The captured image of ``fov_id`` as lossless PNG bytes (the file's, or encoded while it is unsaved)."""
        record = self.record(fov_id)
        if fov_id in self._unsaved:
            ok, png = cv2.imencode(".png", self._unsaved[fov_id][1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise CaseError(f"the image of {fov_id} cannot be encoded")
            return png.tobytes()
        try:
            return (self.case_dir / record.image_file).read_bytes()
        except OSError as error:
            raise CaseError(f"the image of {fov_id} cannot be read: {error}") from None

    def set_result(
        self,
        fov_id: str,
        result: FovResult | None,
        error: str | None,
        calibration: ControlCalibration | None = None,
    ) -> FovRecord:
        """Store a FOV's outcome; a control's calibration becomes the case's."""
        record = self.record(fov_id).model_copy(
            update={"status": "scored" if error is None else "failed", "result": _lean(result), "error": error}
        )
        if result is not None:  # on disk before case.json says the FOV is scored
            atomic_write(self.case_dir / _result_file(fov_id), result.model_dump_json().encode())
        update: dict[str, Any] = {}
        if calibration is not None and record.kind == "control":
            update = {"control": calibration, "control_fov_id": fov_id}
        self._commit(self._replaced(record, **update))
        return record

    def full_result(self, fov_id: str) -> FovResult:
        """A scored FOV's whole result, its cells included, from its file (the store keeps the rest in memory).

        Raises
        ------
        CaseError
            The FOV is not scored, or its result file cannot be read.
        """
        record = self.record(fov_id)
        if record.result is None:
            raise CaseError(f"{fov_id} has no result")
        try:
            return FovResult.model_validate_json((self.case_dir / _result_file(fov_id)).read_bytes())
        except (OSError, ValueError) as error:
            raise CaseError(f"the result of {fov_id} cannot be read ({type(error).__name__}): rescore it") from None

    def set_excluded(self, fov_id: str, excluded: bool) -> FovRecord:
        """Exclude a FOV from (or include it again in) the case score."""
        record = self.record(fov_id).model_copy(update={"excluded": excluded})
        self._commit(self._adjusted(self._replaced(record), "exclude" if excluded else "include", {"fov_id": fov_id}))
        return record

    def set_roi(self, fov_id: str, roi: tuple[RowCol, ...] | None) -> FovRecord:
        """Set (or clear, with None) the ROI polygon of a FOV; it must then be re-scored."""
        record = self.record(fov_id).model_copy(update={"roi": roi, "status": "pending"})
        self._commit(self._adjusted(self._replaced(record), "set-roi", {"fov_id": fov_id, "polygon": roi}))
        return record

    def set_calibration_region(self, fov_id: str, region: tuple[RowCol, ...] | None) -> FovRecord:
        """Set (or clear) the region of a control the intense threshold is taken from; it must be re-scored."""
        record = self.record(fov_id)
        if record.kind != "control":
            raise CaseError(f"{fov_id} is not a positive control; the intense threshold comes from a control")
        record = record.model_copy(update={"calibration_region": region, "status": "pending"})
        self._commit(self._adjusted(self._replaced(record), "set-intense", {"fov_id": fov_id, "polygon": region}))
        return record

    def set_params(self, params: ScoringParams, action: str, args: dict[str, Any]) -> None:
        """Change the case's scoring parameters (e.g. the weak threshold from a region)."""
        self._commit(self._adjusted(self._require().model_copy(update={"params": params}), action, args))

    def adjust(self, action: str, args: dict[str, Any]) -> None:
        """Append an adjustment to the audit trail and persist."""
        self._commit(self._adjusted(self._require(), action, args))

    def summary(self, case: CaseState | None = None) -> CaseSummary:
        """The summary of ``case`` (default: the open case) published with every result and in ``snapshot``."""
        case = case or self._case
        if case is None:
            return NO_CASE
        scored = [r for r in case.fovs if r.kind == "fov" and r.status == "scored" and not r.excluded]
        results = [r.result for r in scored if r.result is not None]
        return CaseSummary(
            case_id=case.case_id,
            open=case.closed_at is None,
            operator=case.operator,
            guideline=case.rule.guideline,
            specimen=case.rule.specimen,
            started_at=case.started_at,
            closed_at=case.closed_at,
            adjustments=case.adjustments,
            fovs=tuple(
                FovEntry(
                    fov_id=r.fov_id,
                    kind=r.kind,
                    index=r.index,
                    status=r.status,
                    excluded=r.excluded,
                    roi=r.roi is not None,
                    score=r.result.call.score if r.result else None,
                    counts=r.result.counts if r.result else None,
                    total=r.result.counts.total if r.result else 0,
                    error=r.error,
                )
                for r in case.fovs
            ),
            control=ControlEntry(fov_id=case.control_fov_id, **dict(case.control)) if case.control else None,
            case=CaseCall.of(score_case(results, case.rule, case.control)),
        )

    def _adjusted(self, case: CaseState, action: str, args: dict[str, Any]) -> CaseState:
        """``case`` with an adjustment appended to its audit trail; CaseError when the trail is full (an audit
        trail that dropped entries would not be one, and case.json is rewritten at every change)."""
        if len(case.adjustments) >= self.max_audit_entries:
            raise CaseError(
                f"the audit trail of case {case.case_id!r} is full ({self.max_audit_entries} adjustments); "
                "close the case and start a new one to go on adjusting"
            )
        adjustment = AuditEntry(time=_now(), action=action, args=json.loads(json.dumps(args)))
        return case.model_copy(update={"adjustments": (*case.adjustments, adjustment)})

    def _require(self) -> CaseState:
        if self._case is None:
            raise CaseError("no case is open: start one with start-case (a capture starts one too)")
        return self._case

    def _replaced(self, record: FovRecord, **update: Any) -> CaseState:
        case = self._require()
        fovs = tuple(record if r.fov_id == record.fov_id else r for r in case.fovs)
        return case.model_copy(update={"fovs": fovs, **update})

    def _commit(self, case: CaseState) -> None:
        """Persist ``case``, then make it the open case: after a failed write, memory still matches the disk."""
        path = self.directory / "cases" / case.case_id / "case.json"
        atomic_write(path, case.model_dump_json(indent=1, exclude={"fovs": {"__all__": {"result"}}}).encode())
        self._case = case


def _lean(result: FovResult | None) -> FovResult | None:
    """A result as the store keeps it in memory: without its cells (most of a 20x FOV's megabytes), which stay in
    its file; the counts, calls and clusters are all the case score and the summary read."""
    return result.model_copy(update={"cells": ()}) if result is not None else None


def _result_file(fov_id: str) -> str:
    return f"{fov_id}.result.json"


#: The last chunk of every complete PNG file (IEND with its CRC).
_PNG_END = b"IEND\xaeB`\x82"


def _png_complete(path: Path) -> bool:
    """Whether ``path`` is a whole PNG file (cheap: its first and last bytes, not a decode)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - len(_PNG_END)))
            return head == b"\x89PNG\r\n\x1a\n" and handle.read() == _PNG_END
    except OSError:
        return False


def _with_results(case: CaseState, folder: Path) -> tuple[CaseState, list[tuple[str, str]]]:
    """``case`` as read from ``case.json``, with each scored FOV's result read from its own file (a case saved
    before results had files of their own carries them inline), and each FOV whose image or result is missing or
    torn marked failed; returns the case and the (fov_id, problem) of those."""
    fovs = []
    repaired = []
    for record in case.fovs:
        problem = None
        if record.status == "failed" and record.result is None:
            pass  # already failed, saying why; a rescore says so again if its image is gone
        elif not _png_complete(folder / record.image_file):
            problem = f"its image {record.image_file} was not saved before the daemon stopped: capture the field again"
        elif record.status == "scored" and record.result is None:
            try:
                result = FovResult.model_validate_json((folder / _result_file(record.fov_id)).read_bytes())
                record = record.model_copy(update={"result": _lean(result)})
            except (OSError, ValueError) as error:
                problem = f"its result cannot be read ({type(error).__name__}): rescore it"
        if problem is not None:
            record = record.model_copy(update={"status": "failed", "result": None, "error": problem})
            repaired.append((record.fov_id, problem))
        fovs.append(record)
    return case.model_copy(update={"fovs": tuple(fovs)}), repaired
