"""The daemon: camera → stability → capture → scoring worker → ZeroMQ, and the control endpoint.

One thread (the one calling :meth:`Daemon.run`) owns every ZeroMQ socket, the case and the worker. The camera is
read by the grabber's thread (latest frame only) and the pedal by its own; both hand over through thread-safe
queues. The loop never blocks on scoring: jobs go to the worker process and outcomes are collected when its pipe
is readable.

States: STARTING (binding, opening the camera, starting the worker) → RUNNING → STOPPING (on SIGTERM/SIGINT or
:meth:`Daemon.request_stop`) → STOPPED. A failure inside one step of the loop (a bad frame, a bad request, a
full disk) is logged and reported, and the loop goes on.
"""

from __future__ import annotations

import json
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import cv2
import numpy as np
import structlog
import zmq

from her2scope.config.app import AppConfig, ConfigError
from her2scope.config.scoring import CaseRule, Guideline, Specimen
from her2scope.daemon import systemd
from her2scope.daemon.case_store import CaseError, CaseState, CaseStore, FovRecord, atomic_write, private_dir
from her2scope.daemon.curve import CurveError, ServerKeys, curve_directory, load_server_keys, secure_server
from her2scope.daemon.frames import Frame, FrameSource, StageControl
from her2scope.daemon.grabber import CameraState, CameraStatus, FrameGrabber
from her2scope.daemon.protocol import (
    AutoCaptureArgs,
    CaptureBody,
    CaseBody,
    Command,
    FovArgs,
    IntenseArgs,
    NoArgs,
    ObjectiveArgs,
    OverlayBody,
    Payload,
    PreviewBody,
    ProtocolError,
    ReplayArgs,
    Reply,
    RescoreArgs,
    ResultBody,
    RoiArgs,
    StageArgs,
    StartCaseArgs,
    StatusBody,
    Topic,
    WeakArgs,
    command_args,
    parse_request,
)
from her2scope.daemon.protocol import request_id as protocol_request_id
from her2scope.daemon.publisher import Publisher
from her2scope.daemon.stability import StabilityDetector, StabilityState, StabilityUpdate
from her2scope.daemon.worker import JobOverlay, JobResult, ScoreJob, ScoringWorker

log = structlog.get_logger(__name__)

#: The control socket drops messages over this many times ``[limits] max_request_kib`` unread (ZeroMQ's MAXMSGSIZE).
MESSAGE_CAP_FACTOR = 4

FovKind = Literal["fov", "control"]


class DaemonState(StrEnum):
    """The daemon's life cycle."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class RequestError(ValueError):
    """A control request that cannot be carried out; the message goes back in the error reply."""


@dataclass(frozen=True, slots=True)
class _Trigger:
    kind: FovKind
    trigger: Literal["auto", "pedal", "control"]
    time_ms: float  # monotonic


#: Replies kept for one client whose queue is full (all but the first are short 'busy' errors, ~150 bytes each):
#: a client that sends this many requests more without reading one gets no reply to the next ones.
MAX_BACKLOG = 100_000


def _now_ms() -> float:
    return time.monotonic() * 1000.0


class Daemon:
    """The her2scope service. ``source`` replaces the configured camera (tests, embedding)."""

    def __init__(self, config: AppConfig, *, source: FrameSource | None = None) -> None:
        self.config = config
        self.objective = config.optics.objective
        self.pixel_size_um = config.optics.pixel_size_um
        daemon_config = config.daemon
        self.state = DaemonState.STARTING
        self._stop = threading.Event()
        self._started_ms = _now_ms()
        if source is None:
            from her2scope.daemon.sources import open_source

            source = open_source(daemon_config.camera, self.pixel_size_um)
        self.source = source
        self._camera_events: queue.SimpleQueue[CameraStatus] = queue.SimpleQueue()
        self.grabber = FrameGrabber(source, daemon_config.watchdog, on_status=self._camera_events.put)
        self.stability = StabilityDetector(daemon_config.capture, self.pixel_size_um)
        self.auto_capture = daemon_config.capture.auto
        self.worker = ScoringWorker(daemon_config.worker.timeout_ms)
        state_dir = daemon_config.state.directory.expanduser()
        private_dir(state_dir)
        self._curve: ServerKeys | None = None
        if daemon_config.zmq.curve:  # refused here, before anything starts: never exposed without keys
            why = "allow_remote = true" if daemon_config.zmq.allow_remote else "require_curve = true"
            try:
                self._curve = load_server_keys(curve_directory(daemon_config.zmq, state_dir))
            except CurveError as error:
                raise ConfigError(f"[daemon.zmq] {why} needs CURVE keys: {error}") from None
        self._authenticator: Any = None
        self.store = CaseStore(state_dir, max_audit_entries=config.limits.max_audit_entries)
        self._triggers: queue.SimpleQueue[_Trigger] = queue.SimpleQueue()
        self._trigger_ms: dict[str, float] = {}  # fov_id → when its capture was asked for
        self._next_job = 1
        self._last_frame: Frame | None = None
        self._last_update: StabilityUpdate | None = None
        self._last_preview_ms = -1e18
        self._last_status_ms = -1e18
        self._last_watchdog_ms = -1e18
        self._watchdog_ms = systemd.watchdog_interval_ms()
        self._pedal: Any = None
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._control = self._context.socket(zmq.ROUTER)
        self.publisher = Publisher(
            self._pub, daemon_config.zmq.replay_buffer, replay_bytes=daemon_config.zmq.replay_buffer_mib * 2**20
        )
        self.endpoints: dict[str, str] = {}
        self._backlogs: dict[bytes, deque[list[bytes]]] = {}  # client identity → replies its full queue held back
        self.replies_dropped = 0
        self._poller: zmq.Poller | None = None
        self._polled_worker_fd: int | None = None

    # --- life cycle ----------------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from any thread and from signal handlers)."""
        self._stop.set()

    def run(self, on_ready: Callable[[dict[str, str]], None] | None = None) -> None:
        """Start everything, serve until stopped, then tear down (always)."""
        try:
            self._start()
            if on_ready is not None:
                on_ready(self.endpoints)
            while not self._stop.is_set():
                self._step()
        finally:
            self._shutdown()

    def _start(self) -> None:
        zmq_config = self.config.daemon.zmq
        for socket in (self._pub, self._control):
            socket.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 1000)
        # a client that does not read its replies: ZeroMQ would queue up to the high-water mark of them (images of
        # megabytes each), then drop the rest silently; mandatory routing makes a full queue an error we answer
        self._control.setsockopt(zmq.SNDHWM, self.config.limits.max_unread_replies)
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # a request up to MESSAGE_CAP_FACTOR times the size limit is read and refused with a reply; a larger message
        # is never held in memory: ZeroMQ drops it and disconnects its sender
        self._control.setsockopt(zmq.MAXMSGSIZE, MESSAGE_CAP_FACTOR * self.config.limits.max_request_bytes)
        if self._curve is not None:
            self._start_authenticator(self._curve)
        self._pub.bind(zmq_config.publish)
        self._control.bind(zmq_config.control)
        self.endpoints = {
            "publish": self._pub.getsockopt_string(zmq.LAST_ENDPOINT),
            "control": self._control.getsockopt_string(zmq.LAST_ENDPOINT),
        }
        self._write_endpoints()
        resumed = self._resume()
        self.worker.start()
        self.grabber.start()
        if self.config.daemon.pedal.enabled:
            self._start_pedal()
        if resumed is not None:
            self._publish_case("resumed", resumed)
            # FOVs captured but not scored when the daemon stopped are scored now
            for record in resumed.fovs:
                if record.status == "pending":
                    try:
                        self._submit(record, trigger="rescore")
                    except (CaseError, OSError) as error:  # one FOV never stops the start
                        log.error("resume_rescore_failed", fov=record.fov_id, error=str(error))
        # ready only now: a daemon that announced itself and then died would be restarted in a loop by systemd
        self.state = DaemonState.RUNNING
        systemd.notify("READY=1\nSTATUS=running")
        log.info(
            "daemon_ready",
            camera=self.grabber.source_name,
            pixel_size_um=self.pixel_size_um,
            resumed_case=resumed.case_id if resumed else None,
            **self.endpoints,
        )

    def _start_authenticator(self, keys: ServerKeys) -> None:
        """CURVE on both sockets, and a ZAP handler that lets only the allow-list's public keys complete the
        handshake (an unknown client gets nothing, not even previews)."""
        from zmq.auth.thread import ThreadAuthenticator

        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=str(keys.allowed))
        for socket in (self._pub, self._control):
            secure_server(socket, keys)
        log.info("curve_enabled", allowed_keys=len(list(keys.allowed.glob("*.key"))), folder=str(keys.allowed))

    def _resume(self) -> CaseState | None:
        """The case open when the daemon stopped; one that cannot be read is set aside (never resumed again, its
        folder left as it is) so that the daemon starts, and starts again, without it."""
        try:
            resumed = self.store.resume(default_rule=self.config.case_rule)
        except CaseError as error:
            aside = self.store.set_aside()
            log.error(
                "case_resume_failed",
                error=str(error),
                set_aside=str(aside) if aside else None,
                hint="the case was not resumed and its files are left as they are; start a new case",
            )
            return None
        for fov_id, problem in self.store.repaired:
            log.error("fov_lost_at_restart", fov=fov_id, error=problem)
        return resumed

    def _write_endpoints(self) -> None:
        document = {**self.endpoints, "pid": os.getpid()}
        atomic_write(self.store.directory / "endpoints.json", json.dumps(document).encode())

    def _start_pedal(self) -> None:
        from her2scope.daemon.pedal import FootPedal, PedalError, TriggerKind

        def on_trigger(kind: TriggerKind) -> None:
            self._triggers.put(_Trigger("control" if kind == TriggerKind.CONTROL else "fov", "pedal", _now_ms()))

        try:
            self._pedal = FootPedal(self.config.daemon.pedal, on_trigger)
            self._pedal.start()
        except PedalError as error:
            log.error("pedal_unavailable", error=str(error))
            self._pedal = None

    def _save_images(self) -> None:
        def waiting(unsaved: int) -> None:
            log.error("waiting_for_disk_space", unsaved=unsaved, hint="free disk space: the images are kept 30 s")

        if not self.store.shutdown(timeout_s=30.0, on_wait=waiting):
            log.error("images_not_saved_at_exit", unsaved=self.store.unsaved_images)

    def _shutdown(self) -> None:
        self.state = DaemonState.STOPPING
        systemd.notify("STOPPING=1")
        log.info("daemon_stopping")
        for name, stop in (
            ("pedal", (lambda: self._pedal.stop()) if self._pedal is not None else None),
            ("grabber", self.grabber.stop),
            ("worker", self.worker.stop),
            ("images", self._save_images),
        ):
            if stop is None:
                continue
            try:
                stop()
            except Exception as error:  # teardown goes on whatever one part does
                log.error("shutdown_step_failed", step=name, error=repr(error))
        self._pub.close(linger=0)
        self._control.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()
        self.state = DaemonState.STOPPED
        log.info("daemon_stopped")

    # --- the loop ------------------------------------------------------------------------------------------------

    def _step(self) -> None:
        worker_fd = self.worker.fileno()
        if self._poller is None or worker_fd != self._polled_worker_fd:  # a restarted worker has a new pipe
            self._poller = zmq.Poller()
            self._poller.register(self._control, zmq.POLLIN)
            if worker_fd is not None:
                self._poller.register(worker_fd, zmq.POLLIN)
            self._polled_worker_fd = worker_fd
        events = dict(self._poller.poll(timeout=10))
        if self._backlogs:
            self._guarded("replies", self._flush_backlogs)
        if self._control in events:
            self._guarded("control", self._serve_control)
        self._guarded("worker", self._collect_outcomes)
        self._guarded("images", self._check_images)
        self._guarded("camera_events", self._camera_changes)
        self._guarded("frame", self._on_frame)
        self._guarded("triggers", self._drain_triggers)
        self._guarded("status", self._heartbeat)

    def _guarded(self, step: str, function: Callable[[], None]) -> None:
        try:
            function()
        except Exception as error:  # a long-running process never dies of one bad step
            log.exception("loop_step_failed", step=step, error=repr(error))

    def _on_frame(self) -> None:
        after = self._last_frame.index if self._last_frame is not None else None
        frame = self.grabber.latest(after_index=after, timeout_ms=0)
        if frame is None or (self._last_frame is not None and frame.index == self._last_frame.index):
            return
        self._last_frame = frame
        try:
            update = self.stability.update(frame)
        except ValueError as error:
            log.warning("frame_rejected", error=str(error), index=frame.index)
            return
        self._last_update = update
        if update.capture and self.auto_capture:
            self._capture(_Trigger("fov", "auto", frame.timestamp_ms))
        now = _now_ms()
        if now - self._last_preview_ms >= 1000.0 / self.config.daemon.preview.max_fps:
            self._last_preview_ms = now
            self._publish_preview(frame, update)

    def _publish_preview(self, frame: Frame, update: StabilityUpdate) -> None:
        preview = self.config.daemon.preview
        rows, cols = frame.image.shape[:2]
        width = min(preview.width_px, cols)
        height = max(1, round(rows * width / cols))
        small = cv2.resize(frame.image, (width, height), interpolation=cv2.INTER_AREA) if width != cols else frame.image
        ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, preview.jpeg_quality])
        if not ok:
            return
        body = PreviewBody(
            frame_index=frame.index,
            width=width,
            height=height,
            stability=update.state.value,
            motion_um=update.motion_um if np.isfinite(update.motion_um) else -1.0,
            focus_ratio=update.focus_ratio,
        )
        self.publisher.publish(
            Topic.PREVIEW, body, [(Payload(name="preview", encoding="jpeg"), jpeg.tobytes())], self._case_id()
        )

    def _drain_triggers(self) -> None:
        while True:
            try:
                trigger = self._triggers.get_nowait()
            except queue.Empty:
                return
            try:
                self._capture(trigger)
            except (RequestError, CaseError, OSError) as error:
                log.error("capture_failed", trigger=trigger.trigger, kind=trigger.kind, error=str(error))

    def _camera_changes(self) -> None:
        changed = False
        while True:
            try:
                status = self._camera_events.get_nowait()
            except queue.Empty:
                break
            changed = True
            if status.state in (CameraState.LOST, CameraState.FROZEN):
                log.warning("camera_problem", state=status.state.value, error=status.last_error)
                self.stability.reset()
        if changed:
            self._publish_status()

    def _check_images(self) -> None:
        for fov_id, error in self.store.poll_images():
            # kept in memory and retried: clearing the disk loses nothing
            log.error("image_not_saved", fov=fov_id, error=error, unsaved=self.store.unsaved_images)
            self._publish_status()

    def _heartbeat(self) -> None:
        now = _now_ms()
        if now - self._last_status_ms >= self.config.daemon.zmq.heartbeat_ms:
            self._publish_status()
        if self._watchdog_ms is not None and now - self._last_watchdog_ms >= self._watchdog_ms:
            # only a loop that goes round pets the watchdog: a hung loop gets restarted by systemd
            self._last_watchdog_ms = now
            systemd.notify("WATCHDOG=1")

    # --- capture and scoring -------------------------------------------------------------------------------------

    def _case_id(self) -> str | None:
        return self.store.case.case_id if self.store.case else None

    def _ensure_case(self) -> None:
        if self.store.case is None:
            case = self.store.start(self.config.scoring, self.config.case_rule)
            log.info("case_started", case_id=case.case_id, reason="first capture")
            self._publish_case("started", case)
            self._publish_status()

    def _publish_case(self, event: Literal["started", "resumed", "closed"], case: CaseState) -> None:
        from importlib.metadata import version

        body = CaseBody(
            event=event,
            case=self.store.summary(case),
            params=case.params.model_dump(mode="json"),
            rule=case.rule.model_dump(mode="json"),
            pixel_size_um=self.pixel_size_um,
            software={"name": "her2scope", "version": version("her2scope")},
        )
        self.publisher.publish(Topic.CASE, body, case_id=case.case_id)

    def _capture(self, trigger: _Trigger) -> FovRecord:
        frame = self._last_frame
        if frame is None or self.grabber.status.state != CameraState.LIVE:
            raise RequestError(f"no live frame to capture (camera {self.grabber.status.state.value})")
        self._ensure_case()
        record = self.store.add_capture(trigger.kind, frame.image, trigger.trigger, self.pixel_size_um)
        self.stability.mark_captured()
        self._trigger_ms[record.fov_id] = trigger.time_ms
        body = CaptureBody(
            fov_id=record.fov_id,
            kind=record.kind,
            trigger=trigger.trigger,
            frame_index=frame.index,
            pixel_size_um=self.pixel_size_um,
        )
        self.publisher.publish(Topic.CAPTURE, body, case_id=self._case_id())
        log.info("fov_captured", fov=record.fov_id, kind=record.kind, trigger=trigger.trigger, frame=frame.index)
        self._submit(record, trigger=trigger.trigger, image=frame.image)
        return record

    def _submit(
        self,
        record: FovRecord,
        *,
        trigger: str,
        image: np.ndarray[Any, np.dtype[np.uint8]] | None = None,
        region: tuple[tuple[float, float], ...] | None = None,
    ) -> None:
        case = self.store.case
        if case is None:
            raise CaseError("no case is open")
        if record.fov_id not in self._trigger_ms:
            self._trigger_ms[record.fov_id] = _now_ms()
        if region is None and record.kind == "control":
            region = record.calibration_region
        path = self.store.case_dir / record.image_file
        if image is None and not path.is_file():  # not written yet: served from memory (or CaseError: lost)
            image = self.store.image(record.fov_id)
        job = ScoreJob(
            job_id=self._next_job,
            fov_id=record.fov_id,
            kind=record.kind,
            # an image on disk is read by the worker: decoding it here would hold the loop ~60 ms per 1080p FOV
            image=image,
            image_path=path,
            pixel_size_um=record.pixel_size_um,
            params=case.params,
            rule=case.rule,
            control=case.control,
            roi=record.roi,
            region=region,
            overlay_width=self.config.daemon.preview.overlay_width_px,
            case_id=case.case_id,
        )
        self._next_job += 1
        self.worker.submit(job)

    def _check_room(self, records: list[FovRecord]) -> None:
        """Refuse 'busy' a re-score that would make more than ``[limits] max_queued_jobs`` FOVs wait (each FOV waits
        once: those already waiting are not counted again); call it before changing anything."""
        case_id = self._case_id()
        new = sum(1 for record in records if not self.worker.is_queued(case_id, record.fov_id))
        limit = self.config.limits.max_queued_jobs
        if new and self.worker.queued + new > limit:
            raise RequestError(
                f"busy: re-scoring {len(records)} FOVs would make {self.worker.queued + new} wait to be scored; the "
                f"limit is {limit} (limits.max_queued_jobs): re-score single FOVs, or wait for the queue to drain"
            )

    def _collect_outcomes(self) -> None:
        for outcome in self.worker.poll():
            if isinstance(outcome, JobResult):
                self._on_result(outcome)
            elif isinstance(outcome, JobOverlay):
                self._on_overlay(outcome)

    def _on_result(self, outcome: JobResult) -> None:
        job = outcome.job
        if self.store.case is None or job.case_id != self.store.case.case_id:
            return  # its case was closed meanwhile (FOV ids restart in every case)
        previous_control = self.store.case.control
        self.store.set_result(job.fov_id, outcome.result, outcome.error, outcome.calibration)
        latency = _now_ms() - self._trigger_ms.pop(job.fov_id, job.submitted_ms)
        body = ResultBody(
            fov_id=job.fov_id,
            kind=job.kind,
            status="scored" if outcome.ok else "failed",
            result=outcome.result,
            calibration=outcome.calibration,
            error=outcome.error,
            case=self.store.summary(),
            score_ms=outcome.score_ms,
            latency_ms=latency,
        )
        self.publisher.publish(Topic.RESULT, body, case_id=self._case_id())
        log.info(
            "fov_scored" if outcome.ok else "fov_failed",
            fov=job.fov_id,
            kind=job.kind,
            score=outcome.result.call.score.value if outcome.result and outcome.result.call.score else None,
            n_cells=outcome.result.counts.total if outcome.result else 0,
            case_score=body.case.case.score if body.case.case else None,
            ms=round(latency, 1),
            error=outcome.error,
        )
        if job.kind == "control" and outcome.calibration is not None and outcome.calibration != previous_control:
            try:
                self._rescore("control calibrated", tumour_only=True)
            except RequestError as error:  # the queue is full: the FOVs keep their scores until re-scored
                log.error("rescore_refused", reason="control calibrated", error=str(error))

    def _on_overlay(self, outcome: JobOverlay) -> None:
        job = outcome.job
        if self.store.case is None or job.case_id != self.store.case.case_id:
            return
        body = OverlayBody(
            fov_id=job.fov_id,
            kind=job.kind,
            layers=tuple(name for name, _ in outcome.layers),
            width=outcome.width,
            height=outcome.height,
        )
        payloads = [(Payload(name=name, encoding="png"), png) for name, png in outcome.layers]
        self.publisher.publish(Topic.OVERLAY, body, payloads, case_id=self._case_id())

    def _rescored(self, *, tumour_only: bool = False) -> list[FovRecord]:
        """The open case's FOVs that a re-score scores again (only the tumour FOVs with ``tumour_only``)."""
        case = self.store.case
        if case is None:
            raise CaseError("no case is open")
        return [r for r in case.fovs if r.kind == "fov" or not tumour_only]

    def _rescore(self, reason: str, *, tumour_only: bool = False) -> int:
        """Queue the open case's FOVs (only the tumour FOVs with ``tumour_only``) for scoring again; RequestError
        'busy' (nothing queued) beyond ``[limits] max_queued_jobs``."""
        records = self._rescored(tumour_only=tumour_only)
        self._check_room(records)
        for record in records:
            self._submit(record, trigger="rescore")
        if records:
            log.info("rescoring", reason=reason, n_fovs=len(records))
        return len(records)

    # --- status --------------------------------------------------------------------------------------------------

    def status_body(self) -> StatusBody:
        """The heartbeat's content, also the reply to ``status``."""
        camera = self.grabber.status
        case = self.store.case
        return StatusBody(
            daemon=self.state.value,
            camera={
                "state": camera.state.value,
                "source": camera.source,
                "fps": round(camera.fps, 2),
                "frames_total": camera.frames_total,
                "frames_dropped": camera.frames_dropped,
                "reconnects": camera.reconnects,
                "last_error": camera.last_error,
                "warnings": list(camera.warnings),
            },
            stability=(self._last_update.state if self._last_update else StabilityState.MOVING).value,
            auto_capture=self.auto_capture,
            case_id=case.case_id if case else None,
            n_fovs=sum(1 for r in case.fovs if r.kind == "fov") if case else 0,
            control_calibrated=bool(case and case.control),
            worker=self.worker.state.value,
            queue=self.worker.queued,
            unsaved_images=self.store.unsaved_images,
            uptime_s=round((_now_ms() - self._started_ms) / 1000.0, 1),
            objective=self.objective,
            pixel_size_um=self.pixel_size_um,
            guideline=case.rule.guideline.value if case else None,
            specimen=case.rule.specimen.value if case else None,
        )

    def _publish_status(self) -> None:
        self._last_status_ms = _now_ms()
        self.publisher.publish(Topic.STATUS, self.status_body(), case_id=self._case_id())

    # --- control endpoint ----------------------------------------------------------------------------------------

    def _serve_control(self) -> None:
        for _ in range(100):  # bounded: a flood of requests must not starve the camera
            try:
                frames = self._control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._answer(frames)

    def _answer(self, frames: list[bytes]) -> None:
        # ROUTER envelope: [identity, (empty delimiter from REQ), request]
        if len(frames) < 2:
            return  # nobody to answer
        identity = frames[0]
        envelope = [identity, b""] if len(frames) >= 3 and frames[1] == b"" else [identity]
        if self._busy(envelope, frames[-1]):
            return
        request_id = ""
        extra: list[bytes] = []
        try:
            max_bytes = self.config.limits.max_request_bytes
            request_id = protocol_request_id(frames[-1], max_bytes)
            request = parse_request(frames[-1], max_bytes)
            data, extra = COMMAND_HANDLERS[request.command](self, command_args(request))
            reply = Reply(id=request_id, ok=True, data=data, payload_count=len(extra))
        except (ProtocolError, RequestError, CaseError) as error:
            reply = Reply(id=request_id, ok=False, error=str(error))
        except OSError as error:  # a full or failing disk: the case is unchanged (it is written before it is kept)
            log.error("control_request_io_error", error=str(error))
            reply = Reply(id=request_id, ok=False, error=f"cannot write the case to disk: {error}")
        except Exception as error:  # a bug in a handler answers with an error, never kills the daemon
            log.exception("control_request_failed", error=repr(error))
            reply = Reply(id=request_id, ok=False, error=f"internal error: {type(error).__name__}: {error}")
            extra = []
        self._send_reply(envelope, [*envelope, reply.model_dump_json().encode(), *extra])

    def _busy(self, envelope: list[bytes], request_frame: bytes) -> bool:
        """Answer a request of a client whose replies back up with 'busy', without carrying it out."""
        backlog = self._backlogs.get(envelope[0])
        if backlog is None:
            return False
        reply = Reply(
            id=protocol_request_id(request_frame, self.config.limits.max_request_bytes),
            ok=False,
            error=f"busy: {self.config.limits.max_unread_replies} replies to this client are unread; read them "
            "before sending more requests",
        )
        self._send_reply(envelope, [*envelope, reply.model_dump_json().encode()])
        return True

    def _send_reply(self, envelope: list[bytes], frames: list[bytes]) -> None:
        """Send a reply, or keep it (in order) while the client's queue is full: every request gets one reply."""
        identity = envelope[0]
        backlog = self._backlogs.get(identity)
        if backlog is not None:
            if len(backlog) >= MAX_BACKLOG:  # a client that never reads: at some point it gets no more
                self.replies_dropped += 1
                if self.replies_dropped % 1000 == 1:
                    log.error("replies_dropped", dropped=self.replies_dropped, backlog=len(backlog))
                return
            backlog.append(frames)
            return
        try:
            self._control.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self._backlogs[identity] = deque([frames])
            log.warning("client_not_reading", unread=self.config.limits.max_unread_replies)
        except zmq.ZMQError as error:  # EHOSTUNREACH: the client is gone, nobody to answer
            log.info("reply_undeliverable", error=str(error))

    def _flush_backlogs(self) -> None:
        """Send what clients' full queues held back, oldest first, as far as their queues take it."""
        for identity, backlog in list(self._backlogs.items()):
            try:
                while backlog:
                    self._control.send_multipart(backlog[0], zmq.NOBLOCK)
                    backlog.popleft()
            except zmq.Again:
                continue
            except zmq.ZMQError:  # the client is gone
                pass
            del self._backlogs[identity]

    # the commands (COMMAND_HANDLERS below; their arguments and summaries: protocol.COMMANDS)

    def _on_capture(self, _: NoArgs, kind: FovKind = "fov") -> Handled:
        record = self._capture(_Trigger(kind, "control", _now_ms()))
        return {"fov_id": record.fov_id, "kind": kind}, []

    def _on_capture_control(self, args: NoArgs) -> Handled:
        return self._on_capture(args, "control")

    def _on_start_case(self, args: StartCaseArgs) -> Handled:
        rule = _case_rule(self.config.case_rule, args)  # a bad guideline refuses before anything closes
        if self.store.case is not None:  # starting a case closes the open one, for all to see
            self._close_case()
        case = self.store.start(self.config.scoring, rule, case_id=args.case_id, operator=args.operator)
        log.info(
            "case_started",
            case_id=case.case_id,
            operator=case.operator,
            guideline=case.rule.guideline.value,
            specimen=case.rule.specimen.value,
        )
        self._publish_case("started", case)
        self._publish_status()
        return {
            "case_id": case.case_id,
            "guideline": case.rule.guideline.value,
            "specimen": case.rule.specimen.value,
        }, []

    def _on_close_case(self, _: NoArgs) -> Handled:
        closed = self._close_case()
        self._publish_status()
        return {"case_id": closed.case_id, "summary": self.store.summary(closed).model_dump(mode="json")}, []

    def _on_set_roi(self, args: RoiArgs) -> Handled:
        polygon = self._polygon(args.polygon, allow_none=True)
        self._check_room([self.store.record(args.fov_id)])
        record = self.store.set_roi(args.fov_id, polygon)
        self._submit(record, trigger="rescore")
        return {"fov_id": args.fov_id}, []

    def _on_exclude(self, args: FovArgs, excluded: bool = True) -> Handled:
        record = self.store.set_excluded(args.fov_id, excluded)
        self._republish(record)
        return {"fov_id": args.fov_id, "excluded": record.excluded}, []

    def _on_include(self, args: FovArgs) -> Handled:
        return self._on_exclude(args, excluded=False)

    def _on_rescore(self, args: RescoreArgs) -> Handled:
        one = args.fov_id
        records = [self.store.record(one)] if one is not None else self._rescored()
        self._check_room(records)  # a full queue or audit trail refuses it before anything changes
        self.store.adjust("rescore", {"fov_id": one} if one is not None else {})
        for record in records:
            self._submit(record, trigger="rescore")
        if one is None and records:
            log.info("rescoring", reason="rescore requested", n_fovs=len(records))
        return {"queued": len(records), "queue": self.worker.queued}, []

    def _on_status(self, _: NoArgs) -> Handled:
        return self.status_body().model_dump(mode="json"), []

    def _on_snapshot(self, _: NoArgs) -> Handled:
        return {
            "last_seq": self.publisher.last_seq,
            "session": self.publisher.session,
            "case": self.store.summary().model_dump(mode="json"),
            "status": self.status_body().model_dump(mode="json"),
        }, []

    def _on_replay(self, args: ReplayArgs) -> Handled:
        messages, complete = self.publisher.since(args.since_seq)
        frames = [frame for message in messages for frame in message]
        return {
            "complete": complete,
            "last_seq": self.publisher.last_seq,
            "frames_per_message": [len(m) for m in messages],
        }, frames

    def _on_auto_capture(self, args: AutoCaptureArgs) -> Handled:
        self.auto_capture = args.enabled
        self._publish_status()
        return {"auto_capture": args.enabled}, []

    def _on_image(self, args: FovArgs) -> Handled:
        record = self.store.record(args.fov_id)
        png = self.store.image_png(args.fov_id)
        return {
            "fov_id": args.fov_id,
            "kind": record.kind,
            "encoding": "png",
            "pixel_size_um": record.pixel_size_um,
        }, [png]

    def _polygon(self, value: object, allow_none: bool = False) -> tuple[tuple[float, float], ...] | None:
        return _polygon(value, allow_none, self.config.limits.max_polygon_vertices)

    def _on_set_objective(self, args: ObjectiveArgs) -> Handled:
        objective = args.objective
        objectives = self.config.optics.objectives
        if objective not in objectives:
            known = ", ".join(objectives)
            raise RequestError(f"unknown objective {objective!r}; the configuration names: {known}")
        self.objective, self.pixel_size_um = objective, objectives[objective]
        # motion thresholds are in µm: the stability detector starts over at the new scale
        self.stability = StabilityDetector(self.config.daemon.capture, self.pixel_size_um)
        log.info("objective_changed", objective=objective, pixel_size_um=self.pixel_size_um)
        self._publish_status()
        return {"objective": objective, "pixel_size_um": self.pixel_size_um}, []

    def _close_case(self) -> CaseState:
        """Close the open case once its queued work is done, so that its last results and overlays are published
        before the ``case`` "closed" message (a recorder's report then has every overlay)."""
        case = self.store.case
        if case is None:
            raise CaseError("no case is open")
        deadline = _now_ms() + self.config.daemon.worker.timeout_ms
        while self.worker.has_work_for(case.case_id) and _now_ms() < deadline:
            fd = self.worker.fileno()
            if fd is not None:
                select.select([fd], [], [], 0.01)
            self._collect_outcomes()
        closed = self.store.close()
        self._publish_case("closed", closed)
        call = self.store.summary(closed).case
        log.info("case_closed", case_id=closed.case_id, score=call.score if call else None)
        return closed

    def _republish(self, record: FovRecord) -> None:
        result = record.result
        if result is not None:
            try:
                result = self.store.full_result(record.fov_id)
            except CaseError as error:  # its file is gone: the counts the store kept are still right
                log.warning("result_file_unreadable", fov=record.fov_id, error=str(error))
        body = ResultBody(
            fov_id=record.fov_id,
            kind=record.kind,
            status=record.status,
            result=result,
            error=record.error,
            case=self.store.summary(),
        )
        self.publisher.publish(Topic.RESULT, body, case_id=self._case_id())

    def _on_set_weak(self, args: WeakArgs) -> Handled:
        from her2scope.scoring import weak_threshold_from_region

        fov_id = args.fov_id
        polygon = self._polygon(args.polygon)
        if polygon is None:  # pragma: no cover - _polygon raises for None unless allowed
            raise RequestError("set-weak needs a polygon")
        record = self.store.record(fov_id)
        case = self.store.case
        assert case is not None
        try:
            threshold = weak_threshold_from_region(
                self.store.image(fov_id), record.pixel_size_um, polygon, case.params, channel_order="BGR"
            )
        except ValueError as error:
            raise RequestError(str(error)) from None
        params = case.params.model_copy(update={"weak_threshold_od": threshold})
        self._check_room(self._rescored())
        self.store.set_params(params, "set-weak", {"fov_id": fov_id, "polygon": polygon, "threshold_od": threshold})
        queued = self._rescore("weak threshold changed")
        return {"weak_threshold_od": threshold, "queued": queued}, []

    def _on_set_intense(self, args: IntenseArgs) -> Handled:
        case = self.store.case
        if case is None:
            raise CaseError("no case is open")
        fov_id = args.fov_id or case.control_fov_id
        if fov_id is None:
            raise RequestError("set-intense needs a captured positive control (or 'fov_id' of one)")
        record = self.store.record(fov_id)
        if record.kind != "control":
            raise RequestError(f"{fov_id} is not a positive control; the intense threshold comes from a control")
        polygon = self._polygon(args.polygon, allow_none=True)  # None: calibrate from the whole control again
        self._check_room([record])
        record = self.store.set_calibration_region(fov_id, polygon)
        self._submit(record, trigger="rescore")
        return {"fov_id": fov_id, "queued": 1}, []

    def _on_stage(self, args: StageArgs) -> Handled:
        stage = self.source
        if not isinstance(stage, StageControl):
            raise RequestError("stage commands need the simulated microscope (camera kind 'simulated')")
        action = args.action
        if action == "goto-control":
            stage.goto_control()
        elif action == "goto-field":
            field = args.field
            if not isinstance(field, int) or isinstance(field, bool) or not 0 <= field < stage.n_fields:
                raise RequestError(f"goto-field needs 'field', an integer in [0, {stage.n_fields})")
            stage.goto_field(field)
        elif action == "hold":
            stage.hold()
        elif action == "resume":
            stage.resume_script()
        elif action == "unplug":
            duration = args.duration_ms
            if not isinstance(duration, (int, float)) or isinstance(duration, bool) or not 0 < duration <= 600_000:
                raise RequestError("unplug needs 'duration_ms' in (0, 600000]")
            stage.unplug(float(duration))
        elif action == "freeze":
            stage.freeze()
        elif action != "status":
            raise RequestError(
                f"unknown stage action {action!r}; use goto-control, goto-field, hold, resume, unplug, freeze or status"
            )
        return {"action": action, "stage": stage.stage_report()}, []


Handled = tuple[dict[str, Any], list[bytes]]
"""What a command's handler returns: its reply data and payload frames."""

#: Each command's handler (its arguments and summary: protocol.COMMANDS). A new command is a Command, an entry of
#: COMMANDS and a handler here.
COMMAND_HANDLERS: dict[Command, Callable[[Daemon, Any], Handled]] = {
    Command.CAPTURE: Daemon._on_capture,
    Command.CAPTURE_CONTROL: Daemon._on_capture_control,
    Command.START_CASE: Daemon._on_start_case,
    Command.CLOSE_CASE: Daemon._on_close_case,
    Command.SET_ROI: Daemon._on_set_roi,
    Command.SET_WEAK: Daemon._on_set_weak,
    Command.SET_INTENSE: Daemon._on_set_intense,
    Command.EXCLUDE: Daemon._on_exclude,
    Command.INCLUDE: Daemon._on_include,
    Command.RESCORE: Daemon._on_rescore,
    Command.STATUS: Daemon._on_status,
    Command.SNAPSHOT: Daemon._on_snapshot,
    Command.REPLAY: Daemon._on_replay,
    Command.AUTO_CAPTURE: Daemon._on_auto_capture,
    Command.STAGE: Daemon._on_stage,
    Command.IMAGE: Daemon._on_image,
    Command.SET_OBJECTIVE: Daemon._on_set_objective,
}


def _case_rule(default: CaseRule, args: StartCaseArgs) -> CaseRule:
    """The configuration's case rule with the guideline and specimen a start-case request chose."""
    update: dict[str, Any] = {}
    for key, choices in (("guideline", Guideline), ("specimen", Specimen)):
        value = getattr(args, key)
        if value is None:
            continue
        if value not in {c.value for c in choices}:
            raise RequestError(f"unknown {key} {value!r}; use one of: {', '.join(c.value for c in choices)}")
        update[key] = choices(value)
    return CaseRule.model_validate({**default.model_dump(), **update}) if update else default


def _polygon(value: object, allow_none: bool, max_vertices: int) -> tuple[tuple[float, float], ...] | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, list) or len(value) < 3:
        raise RequestError("'polygon' must be a list of at least 3 [row, col] vertices in FOV pixels")
    if len(value) > max_vertices:  # it is stored in the case and drawn on every re-score
        raise RequestError(f"'polygon' has {len(value)} vertices; the limit is {max_vertices}")
    vertices = []
    for vertex in value:
        if (
            not isinstance(vertex, list)
            or len(vertex) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vertex)
            or not all(np.isfinite(v) for v in vertex)
        ):
            raise RequestError(f"polygon vertex {vertex!r:.60} is not a [row, col] pair of finite numbers")
        vertices.append((float(vertex[0]), float(vertex[1])))
    return tuple(vertices)
