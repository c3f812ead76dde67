"""Scoring in a worker process, so that a crash or a slow FOV never stalls the live view or kills the daemon.

The daemon sends one job at a time over a pipe: a JSON header (what to do, the parameters) and the raw BGR image,
or, for a FOV whose image is on disk, its PNG's path: the worker reads it, so that re-scoring a case never decodes
images on the daemon's loop nor holds them in its memory while they wait.
The worker answers with a JSON header (the error, or that the result follows), the result as a JSON frame, and the
overlay layers as PNG frames. A worker that dies or overruns ``timeout_ms`` is killed and restarted, and its job is
reported as failed (it can be retried with ``rescore``). Nothing is pickled: only bytes cross the pipe.

States: IDLE (no job) → BUSY (a job in flight) → IDLE; any failure → RESTARTING → IDLE.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import structlog

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.scoring.results import ControlCalibration, FovResult

log = structlog.get_logger(__name__)

RowCol = tuple[float, float]


class WorkerState(StrEnum):
    """What the scoring worker is doing."""

    IDLE = "idle"
    BUSY = "busy"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ScoreJob:
    """One FOV (or the control) to score.

    ``kind`` "control" calibrates the intense threshold from the image (or from ``region`` of it) and scores the
    control with it; "fov" scores a tumour FOV with ``control`` (or the default threshold). The image is ``image``
    (BGR, in memory) or, when that is None, the PNG file ``image_path``, which the worker process reads.
    """

    job_id: int
    fov_id: str
    kind: Literal["fov", "control"]
    image: npt.NDArray[np.uint8] | None  # BGR
    pixel_size_um: float
    params: ScoringParams
    rule: CaseRule
    control: ControlCalibration | None = None
    roi: tuple[RowCol, ...] | None = None
    region: tuple[RowCol, ...] | None = None
    overlay: bool = True
    overlay_width: int | None = None  # draw the layers at this width (a display's), not the FOV's
    case_id: str | None = None  # the case the FOV belongs to (FOV ids restart in every case)
    image_path: Path | None = None
    submitted_ms: float = field(default_factory=lambda: time.monotonic() * 1000.0)


@dataclass(frozen=True, slots=True)
class JobResult:
    """What became of a job: a result (and calibration, for a control) or an error. Comes before its overlay."""

    job: ScoreJob
    result: FovResult | None
    calibration: ControlCalibration | None
    error: str | None
    score_ms: float

    @property
    def ok(self) -> bool:
        """Whether the FOV was scored."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class JobOverlay:
    """The overlay layers of a scored job, as RGBA PNGs of ``width`` x ``height``."""

    job: ScoreJob
    layers: tuple[tuple[str, bytes], ...]
    width: int
    height: int


Outcome = JobResult | JobOverlay


def _job_header(job: ScoreJob) -> bytes:
    return json.dumps(
        {
            "job_id": job.job_id,
            "fov_id": job.fov_id,
            "kind": job.kind,
            "shape": list(job.image.shape) if job.image is not None else None,
            "image_path": str(job.image_path) if job.image is None and job.image_path is not None else None,
            "pixel_size_um": job.pixel_size_um,
            "params": job.params.model_dump(mode="json"),
            "rule": job.rule.model_dump(mode="json"),
            "control": job.control.model_dump(mode="json") if job.control else None,
            "roi": job.roi,
            "region": job.region,
            "overlay": job.overlay,
            "overlay_width": job.overlay_width,
        }
    ).encode()


def _serve_job(connection: Connection, header: dict[str, Any], image: npt.NDArray[np.uint8]) -> None:
    """Score one job and send its result, then (if asked) its overlay (in the worker process)."""
    import cv2

    from her2scope.scoring import analyse_fov, calibrate_from_control
    from her2scope.scoring.overlay import render_overlay

    start = time.perf_counter()
    reply: dict[str, Any] = {"job_id": header["job_id"], "type": "result", "calibration": None}
    analysis = None
    try:
        params = ScoringParams.model_validate(header["params"])
        rule = CaseRule.model_validate(header["rule"])
        pixel_size = float(header["pixel_size_um"])
        calibration: ControlCalibration | None
        if header["kind"] == "control":
            calibration = calibrate_from_control(
                image, pixel_size, params, region_polygon=header["region"], rule=rule, channel_order="BGR"
            )
            reply["calibration"] = calibration.model_dump(mode="json")
        else:
            calibration = ControlCalibration.model_validate(header["control"]) if header["control"] else None
        analysis = analyse_fov(
            image, pixel_size, params, control=calibration, roi_polygon=header["roi"], rule=rule, channel_order="BGR"
        )
        # the result follows the reply as a frame of its own, serialised once by pydantic (a FOV's cells and rings
        # are ~100-300 kB: building them as Python dicts and parsing them back cost ~10 ms each way)
        result_json = analysis.result.model_dump_json().encode()
        reply["result_follows"] = True
        reply["error"] = None
    except Exception as error:  # a bad FOV must fail only its own job
        reply["error"] = f"{type(error).__name__}: {error}"
        reply["result_follows"] = False
    reply["score_ms"] = (time.perf_counter() - start) * 1000.0
    connection.send_bytes(json.dumps(reply).encode())
    if reply["result_follows"]:
        connection.send_bytes(result_json)
    if analysis is None or not header["overlay"]:
        return
    try:
        overlay = render_overlay(analysis, width=header["overlay_width"])
    except Exception as error:  # the result is out; only the overlay is lost
        failure = {"job_id": header["job_id"], "type": "overlay", "layers": [], "width": 0, "height": 0}
        connection.send_bytes(json.dumps({**failure, "error": f"{type(error).__name__}: {error}"}).encode())
        return

    def encode(layer: npt.NDArray[np.uint8]) -> bytes | None:
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(layer, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        return encoded.tobytes() if ok else None

    # PNG encoding is most of the overlay's latency and releases the GIL: two layers at a time
    with ThreadPoolExecutor(max_workers=2) as pool:
        encoded_layers = list(zip(overlay.layers, pool.map(encode, overlay.layers.values()), strict=True))
    names = [name for name, png in encoded_layers if png is not None]
    pngs = [png for _, png in encoded_layers if png is not None]
    height, width = next(iter(overlay.layers.values())).shape[:2]
    connection.send_bytes(
        json.dumps(
            {"job_id": header["job_id"], "type": "overlay", "layers": names, "width": width, "height": height}
        ).encode()
    )
    for png in pngs:
        connection.send_bytes(png)


class ImageReadError(ValueError):
    """The PNG file of a job cannot be read (in the worker process)."""


def _job_image(header: dict[str, Any], buffer: bytes) -> npt.NDArray[np.uint8]:
    """The job's BGR image: the raw pixels that followed the header, or the PNG file it names."""
    if header.get("image_path") is None:
        return np.frombuffer(buffer, dtype=np.uint8).reshape(header["shape"])
    import cv2

    image = cv2.imread(header["image_path"], cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(f"the image of {header.get('fov_id')} ({header['image_path']}) cannot be read")
    return np.asarray(image, dtype=np.uint8)


def _worker_main(connection: Connection) -> None:
    """The worker process: say it is ready (imports done), then serve jobs until the pipe closes."""
    import her2scope.scoring.overlay  # noqa: F401  (imported before "ready", so the first job is not slow)

    try:
        connection.send_bytes(json.dumps({"type": "ready"}).encode())
    except (EOFError, OSError):
        return
    while True:
        try:
            header = json.loads(connection.recv_bytes())
            buffer = connection.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            image = _job_image(header, buffer)
        except (ValueError, KeyError, TypeError) as error:
            reply = {"job_id": header.get("job_id"), "type": "result", "calibration": None}
            reply.update(error=str(error) if isinstance(error, ImageReadError) else f"malformed job: {error}")
            reply.update(score_ms=0.0)
            try:
                connection.send_bytes(json.dumps(reply).encode())
            except (EOFError, OSError):
                return
            continue
        try:
            _serve_job(connection, header, image)
        except (EOFError, OSError):
            return


class ScoringWorker:
    """Owns the worker process: a queue of jobs, one in flight, crash and timeout recovery.

    Used from one thread (the daemon's main loop): ``submit`` queues, ``poll`` collects outcomes: for each job a
    ``JobResult``, then (when scored and asked for) a ``JobOverlay``.
    """

    def __init__(self, timeout_ms: float) -> None:
        self._timeout_ms = timeout_ms
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None
        self._queue: deque[ScoreJob] = deque()
        self._in_flight: ScoreJob | None = None
        self._result_sent = False  # the in-flight job's result has been delivered; its overlay is pending
        self._sent_ms = 0.0
        self._send_failure: str | None = None
        self._ready = False  # the process has imported everything and said so
        self._rejected: list[Outcome] = []
        self._restart_times: deque[float] = deque(maxlen=5)
        self.restarts = 0
        self._state = WorkerState.STOPPED

    @property
    def state(self) -> WorkerState:
        """IDLE, BUSY, RESTARTING or STOPPED."""
        return self._state

    @property
    def queued(self) -> int:
        """Jobs waiting, not counting the one in flight."""
        return len(self._queue)

    def is_queued(self, case_id: str | None, fov_id: str) -> bool:
        """Whether a job for ``fov_id`` of ``case_id`` waits in the queue (the one in flight does not count: a
        re-score asked for while it is scored must score it again, with the parameters of then)."""
        return any(job.case_id == case_id and job.fov_id == fov_id for job in self._queue)

    def has_work_for(self, case_id: str | None) -> bool:
        """Whether a job of ``case_id`` is queued or in flight (its result or its overlay not delivered yet)."""
        in_flight = self._in_flight is not None and self._in_flight.case_id == case_id
        return in_flight or any(job.case_id == case_id for job in self._queue)

    def fileno(self) -> int | None:
        """The pipe's file descriptor, to poll alongside sockets (None when not running)."""
        return self._connection.fileno() if self._connection is not None else None

    def start(self) -> None:
        """Start the worker process."""
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_worker_main, args=(child,), name="her2scope-scorer", daemon=True)
        process.start()
        child.close()
        self._process, self._connection = process, parent
        self._ready = False
        self._state = WorkerState.RESTARTING if self.restarts else WorkerState.IDLE

    def stop(self) -> None:
        """Stop the worker process (its current job is abandoned)."""
        if self._connection is not None:
            self._connection.close()
        if self._process is not None:
            self._process.join(timeout=2.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=2.0)
        self._process = self._connection = None
        self._state = WorkerState.STOPPED

    def submit(self, job: ScoreJob) -> bool:
        """Queue a job; it is sent when the worker is free. A job that is not an (M, N, 3) uint8 image (nor an image
        path) fails at once (reported by the next ``poll``): it could only crash the worker.

        A job for a FOV that already waits takes that job's place (it has the newer parameters), so a FOV waits
        once however often it is re-scored. Returns whether the queue grew.
        """
        image = job.image
        from_file = image is None and job.image_path is not None
        if not from_file and (
            not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
        ):
            found = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            self._rejected.append(JobResult(job, None, None, f"not an (M, N, 3) uint8 BGR image: {found}", 0.0))
            return False
        for position, waiting in enumerate(self._queue):
            if waiting.case_id == job.case_id and waiting.fov_id == job.fov_id:
                self._queue[position] = job
                return False
        self._queue.append(job)
        self._send_next()
        return True

    def _send_next(self) -> None:
        # not before the process said it is ready: a 6 MB image would fill the pipe and block the caller
        if self._in_flight is not None or not self._queue or self._connection is None or not self._ready:
            return
        self._check_idle()
        if not self._ready:  # it had died: the job waits for the new process
            return
        job = self._queue.popleft()
        self._in_flight = job
        self._result_sent = False
        self._sent_ms = time.monotonic() * 1000.0
        self._state = WorkerState.BUSY
        try:
            self._connection.send_bytes(_job_header(job))
            if job.image is None:
                self._connection.send_bytes(b"")  # the worker reads the image from job.image_path
            else:
                # a flat uint8 view: send_bytes sizes its frame by len(), which is the first axis of an image
                self._connection.send_bytes(np.ascontiguousarray(job.image).reshape(-1).data)
        except (OSError, ValueError) as error:
            # the job fails (it may be what broke the pipe); the next poll reports it and restarts the worker
            self._send_failure = f"cannot send the job to the scoring worker: {error}"

    def poll(self) -> list[Outcome]:
        """Collect what the worker finished, without blocking; detect a dead or overrunning worker."""
        outcomes: list[Outcome] = self._rejected
        self._rejected = []
        if not self._ready:
            self._await_ready()
        elif self._in_flight is None:
            self._check_idle()
        while (job := self._in_flight) is not None and self._connection is not None:
            if self._send_failure is not None:
                outcomes.append(self._failed(job, self._send_failure))
                self._send_failure = None
                self._restart("job could not be sent")
                break
            try:
                if not self._connection.poll(0):
                    self._check_alive(job, outcomes)
                    break
                reply = json.loads(self._connection.recv_bytes())
                if reply.get("type") == "overlay":
                    layers = tuple((name, self._connection.recv_bytes()) for name in reply["layers"])
                    if reply.get("error"):
                        log.warning("overlay_failed", fov=job.fov_id, error=reply["error"])
                    else:
                        outcomes.append(JobOverlay(job, layers, int(reply["width"]), int(reply["height"])))
                    self._finish()
                    continue
                result_json = self._connection.recv_bytes() if reply.get("result_follows") else None
                outcomes.append(_result(job, reply, result_json))
                self._result_sent = True
                if reply.get("error") or not job.overlay:
                    self._finish()
            except (EOFError, OSError, ValueError, KeyError) as error:
                self._fail_in_flight(job, outcomes, f"scoring worker died ({str(error) or 'pipe closed'})")
                break
        self._send_next()
        return outcomes

    def _await_ready(self) -> None:
        if self._connection is None:
            return
        try:
            if self._connection.poll(0):
                message = json.loads(self._connection.recv_bytes())
                if message.get("type") == "ready":
                    self._ready = True
                    self._state = WorkerState.BUSY if self._in_flight else WorkerState.IDLE
            elif self._process is not None and not self._process.is_alive():
                self._restart(f"worker exited while starting (exit code {self._process.exitcode})")
        except (EOFError, OSError, ValueError) as error:
            self._restart(f"worker failed while starting: {error}")

    def _check_idle(self) -> None:
        # a worker that died between jobs is replaced now, not when the next FOV fails on its broken pipe (an idle
        # worker's pipe is readable only when it closed)
        if self._connection is None or self._process is None:
            return
        try:
            closed = self._connection.poll(0)
        except (EOFError, OSError):
            closed = True
        if closed or not self._process.is_alive():
            self._process.join(timeout=1.0)
            self._restart(f"scoring worker died while idle (exit code {self._process.exitcode})")

    def _check_alive(self, job: ScoreJob, outcomes: list[Outcome]) -> None:
        if self._process is not None and not self._process.is_alive():
            self._fail_in_flight(job, outcomes, f"scoring worker died (exit code {self._process.exitcode})")
        elif time.monotonic() * 1000.0 - self._sent_ms > self._timeout_ms:
            self._fail_in_flight(job, outcomes, f"scoring took longer than {self._timeout_ms:.0f} ms")

    def _fail_in_flight(self, job: ScoreJob, outcomes: list[Outcome], error: str) -> None:
        if not self._result_sent:  # a worker lost while drawing the overlay loses only the overlay
            outcomes.append(self._failed(job, error))
        self._restart(error)

    def _finish(self) -> None:
        self._in_flight = None
        self._result_sent = False
        self._state = WorkerState.IDLE

    def _failed(self, job: ScoreJob, error: str) -> JobResult:
        return JobResult(job, None, None, error, time.monotonic() * 1000.0 - self._sent_ms)

    def _restart(self, reason: str) -> None:
        log.warning("scoring_worker_restart", reason=reason, restarts=self.restarts + 1)
        now = time.monotonic()
        if len(self._restart_times) == self._restart_times.maxlen and now - self._restart_times[0] < 10.0:
            time.sleep(1.0)  # crash-looping: don't spin the CPU respawning
        self._restart_times.append(now)
        self._state = WorkerState.RESTARTING
        self._finish()
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self.stop()
        self.restarts += 1
        self.start()

    def kill_for_test(self) -> None:
        """Kill the worker process abruptly (to exercise crash recovery)."""
        if self._process is not None:
            self._process.kill()


def _result(job: ScoreJob, reply: dict[str, Any], result_json: bytes | None) -> JobResult:
    result = FovResult.model_validate_json(result_json) if result_json else None
    calibration = ControlCalibration.model_validate(reply["calibration"]) if reply.get("calibration") else None
    return JobResult(job, result, calibration, reply.get("error"), float(reply.get("score_ms", 0.0)))
