"""The recorder's loop: follows the daemon's messages and turns them into the documents and files of case folders.

Following is the :class:`~her2scope.clients.follower.Follower`'s (zguide "Clone"): at start, on a ``topic_seq`` gap,
on a new daemon ``session`` and when a silent daemon is heard again it takes a ``snapshot`` and ``replay``s the
messages after the last sequence number the recorder processed (in a daemon run new to it, after the one its case
folders' state files name). The recorder records the replayed messages and, at the snapshot, gives every scored FOV
of the snapshot's case that has no event yet one (``source: "snapshot"``). Duplicates are impossible: an event
carries the daemon's ``(session, seq)`` and actions their index in the case's adjustments.

States of the loop (the follower's): DISCONNECTED (no daemon found, retried every ``RETRY_S``) → SYNCING (snapshot +
replay) → FOLLOWING; a gap, a new session or silence → SYNCING.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import structlog
import zmq

from her2scope.clients.control import ControlError
from her2scope.clients.follower import (
    ORDERED_TOPICS,
    Connected,
    Event,
    Follower,
    Invalid,
    LoopState,
    NotFound,
    Received,
    Resyncing,
    Silent,
    Snapshot,
    Synced,
    Unreachable,
)
from her2scope.clients.recorder.documents import compose_start, fov_data
from her2scope.clients.recorder.folder import REPORT_FILE, STATE_FILE, CaseFolder, _private_dir
from her2scope.clients.report import write_report
from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.curve import ClientKeys
from her2scope.daemon.protocol import (
    NO_CASE,
    CaseBody,
    CaseSummary,
    Message,
    OverlayBody,
    ResultBody,
    StatusBody,
    Topic,
)

log = structlog.get_logger(__name__)

TOPICS = ORDERED_TOPICS  # what the recorder follows: every topic but previews
__all__ = ["TOPICS", "LoopState", "Recorder", "compose_overlay"]


class Recorder:
    """Follows the daemon and writes the case folders under ``out``. Drive it with :meth:`step` or :meth:`run`.

    ``endpoints`` is called whenever the recorder (re)connects (a restarted daemon may use new ports).
    ``daemon_state`` (the daemon's state folder), when readable, supplies a case's parameters and images that
    the daemon can no longer send (the case message was missed, the case is closed).
    """

    RETRY_S = Follower.RETRY_S

    def __init__(
        self,
        out: Path,
        endpoints: Callable[[], dict[str, str]],
        *,
        fallback_params: ScoringParams,
        fallback_rule: CaseRule,
        pixel_size_um: float | None = None,
        daemon_state: Path | None = None,
        heartbeat_ms: float = 1000.0,
        timeout_ms: float = 5000.0,
        curve: ClientKeys | None = None,
    ) -> None:
        self.out = out.expanduser()
        _private_dir(self.out)
        self._endpoints = endpoints
        self._fallback = (fallback_params, fallback_rule, pixel_size_um)
        self._daemon_state = daemon_state.expanduser() if daemon_state else None
        self._context: zmq.Context[Any] = zmq.Context()
        self.follower = Follower(
            endpoints,
            heartbeat_ms=heartbeat_ms,
            timeout_ms=timeout_ms,
            resume=self._persisted_seq,
            context=self._context,
            curve=curve,  # CURVE keys for a daemon that uses them (docs/protocol.md, section 11)
        )
        self._session: str | None = None  # the daemon run of the message being recorded
        self._snapshot_seq = 0  # the last snapshot's sequence number: replayed messages after it are the present
        self._last_retry = time.monotonic()
        self._daemon_case: str | None = None
        self.folders: dict[str, CaseFolder] = {}
        self._dirty: set[str] = set()

    @property
    def state(self) -> LoopState:
        """What the loop is doing (disconnected, syncing, following)."""
        return self.follower.state

    @property
    def session(self) -> str | None:
        """The daemon run of the messages being recorded."""
        return self._session

    @property
    def last_seq(self) -> int:
        """The sequence number of the last message the follower handed on."""
        return self.follower.position.last_seq

    # life cycle

    def close(self) -> None:
        """Close the sockets (everything written is already on disk)."""
        self.follower.close()
        self._context.term()

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Record until ``should_stop()``."""
        try:
            while not should_stop():
                self.step()
        finally:
            for folder in self.folders.values():
                folder.retry()
            self.close()

    def step(self, timeout_ms: float = 200.0) -> None:
        """One turn of the loop: what the follower hands on (at most a batch of messages), then retry writes."""
        events = self.follower.poll(timeout_ms)
        snapshot = next((e for e in events if isinstance(e, Snapshot)), None)
        if snapshot is not None:  # the daemon's open case now: the messages replayed before the snapshot are the past
            self._daemon_case = CaseSummary.model_validate(snapshot.data["case"]).case_id
            self._snapshot_seq = snapshot.last_seq
        for event in events:
            self._on_event(event)
        if time.monotonic() - self._last_retry >= self.RETRY_S:
            self._last_retry = time.monotonic()
            for folder in self.folders.values():
                if folder.pending:
                    folder.retry()
        self._flush_reports()

    def _on_event(self, event: Event) -> None:
        match event:
            case Received(message=message, source=source) if message.header.topic != Topic.PREVIEW:
                self._on_message(message, source)
            case Snapshot():
                self._on_snapshot(event)
            case Synced(session=session, last_seq=last_seq):
                if self._daemon_case in self.folders:
                    self.folders[self._daemon_case].save_state(
                        session=session, last_seq=last_seq, case_id=self._daemon_case
                    )
            case Connected(endpoints=endpoints):
                log.info("recorder_connected", **endpoints)
            case NotFound(error=error):
                log.warning("daemon_not_found", error=error)
            case Unreachable(error=error):
                log.warning("daemon_unreachable", error=error)
            case Invalid(error=error):
                log.warning("message_invalid", error=error)
            case Resyncing(why=why, topic=topic):
                log.warning("daemon_restarted" if why == "restart" else "gap_detected", topic=topic)
            case Silent(silent_ms=silent_ms):
                log.warning("daemon_silent", silent_ms=round(silent_ms))

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        """The snapshot comes after the replayed messages it is up to date with, before those after it: its case is
        the daemon's at that point; the FOVs it has without an event get one, cases it no longer has stop."""
        log.info(
            "recorder_sync",
            why=snapshot.why,
            session=snapshot.session,
            since_seq=snapshot.since_seq,
            replayed=snapshot.replayed,
            complete=snapshot.complete,
        )
        self._session, self._snapshot_seq = snapshot.session, snapshot.last_seq
        case = CaseSummary.model_validate(snapshot.data["case"])
        self._daemon_case = case.case_id
        self._reconcile(case)

    def _persisted_seq(self, session: str) -> int:
        """The last sequence number processed in this daemon session, from the case folders' state files."""
        best = 0
        for state_file in self.out.glob(f"*/{STATE_FILE}"):
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if state.get("session") == session:
                best = max(best, int(state.get("last_seq", 0)))
        return best

    def _on_message(self, message: Message, source: Literal["live", "replay"]) -> None:
        """Process a message, handed on once and in order by the follower."""
        header = message.header
        body = message.body
        if source == "live" or header.seq > self._snapshot_seq:  # what the daemon has open now (not the past)
            if isinstance(body, StatusBody):
                self._daemon_case = body.case_id
            elif isinstance(body, CaseBody):
                self._daemon_case = None if body.event == "closed" else body.case.case_id
        self._session = header.session or self._session
        if isinstance(body, CaseBody):
            self._on_case(body, header.session)
        elif isinstance(body, ResultBody) and header.case_id:
            self._on_result(body, header.case_id, header.session, header.seq, header.time_ms / 1000.0, source)
        elif isinstance(body, OverlayBody) and header.case_id:
            self._on_overlay(body, message, header.case_id)
        if header.case_id and header.topic != Topic.STATUS and header.case_id in self.folders:
            self.folders[header.case_id].save_state(session=header.session, last_seq=header.seq, case_id=header.case_id)

    # folders

    def folder(self, case_id: str) -> CaseFolder:
        """The folder of ``case_id`` (opened, or created, on first use)."""
        if case_id not in self.folders:
            self.folders[case_id] = CaseFolder(self.out / case_id)
        return self.folders[case_id]

    def _ensure_start(self, folder: CaseFolder, summary: CaseSummary, body: CaseBody | None = None) -> None:
        if folder.run is not None:
            if folder.run.descriptor is None:
                folder.append(folder.run.make_descriptor())
            return
        software = {"name": "her2scope", "version": "unknown"}
        pixel_size = self._fallback[2]
        source: Literal["case message", "daemon state", "recorder config"]
        if body is not None:
            params, rule = ScoringParams.model_validate(body.params), CaseRule.model_validate(body.rule)
            software, pixel_size, source = dict(body.software), body.pixel_size_um, "case message"
        elif (stored := self._stored_case(folder.case_id)) is not None:
            params = ScoringParams.model_validate(stored["params"])
            rule = CaseRule.model_validate(stored["rule"])
            source = "daemon state"
        else:
            params, rule, _ = self._fallback
            source = "recorder config"
            log.warning("case_parameters_unknown", case_id=folder.case_id, using="the recorder's configuration")
        start, folder.run = compose_start(
            case_id=folder.case_id,
            operator=summary.operator,
            started_at=summary.started_at,
            software=software,
            params=params,
            rule=rule,
            params_source=source,
            pixel_size_um=pixel_size,
            control=summary.control,
            daemon_session=self.session,
        )
        folder.append(start)
        folder.append(folder.run.make_descriptor())
        log.info("case_recording", case_id=folder.case_id, params_source=source, case_dir=str(folder.path))

    def _stored_case(self, case_id: str) -> dict[str, Any] | None:
        if self._daemon_state is None:
            return None
        try:
            return dict(json.loads((self._daemon_state / "cases" / case_id / "case.json").read_text("utf-8")))
        except (OSError, ValueError):
            return None

    def _record_actions(self, folder: CaseFolder, summary: CaseSummary) -> None:
        assert folder.run is not None
        adjustments = summary.adjustments
        for index in range(folder.n_actions(), len(adjustments)):
            folder.append(folder.run.action(index, adjustments[index]))

    # handlers

    def _on_case(self, body: CaseBody, session: str) -> None:
        summary = body.case
        case_id = summary.case_id
        if not case_id:
            return
        folder = self.folder(case_id)
        if folder.stopped:
            return
        if body.event in ("started", "resumed"):
            for other in self.folders.values():
                if other is not folder and not other.stopped and other.run is not None:
                    self._abort(other, f"case {case_id} was {body.event} before this case's close was heard")
        self._ensure_start(folder, summary, body)
        self._record_actions(folder, summary)
        folder.summary = summary
        if body.event == "closed":
            self._fill_from_summary(folder, summary)
            self._finish(folder, summary)
        self._dirty.add(case_id)

    def _on_result(
        self,
        body: ResultBody,
        case_id: str,
        session: str,
        seq: int,
        when: float,
        source: Literal["live", "replay"],
    ) -> None:
        folder = self.folder(case_id)
        if folder.stopped:
            return
        self._ensure_start(folder, body.case)
        self._record_actions(folder, body.case)
        folder.summary = body.case
        self._dirty.add(case_id)
        if body.status == "pending" or body.score_ms is None:
            return  # an exclude/include update: recorded as an action, not a new result
        if folder.seen(session, seq):
            return
        assert folder.run is not None
        self._fetch_image(folder, body.fov_id)
        event = folder.run.event(
            time=when,
            fov_id=body.fov_id,
            kind=body.kind,
            status=body.status,
            rescore=folder.has_event(body.fov_id),
            source=source,
            daemon_session=session,
            daemon_seq=seq,
            data=fov_data(body.fov_id, body.model_dump(mode="json"), body.case),
        )
        folder.append(event)
        folder.write_exports(body.fov_id, body.result)
        log.info(
            "fov_recorded",
            case_id=case_id,
            fov=body.fov_id,
            status=body.status,
            score=event.data.score,
            n_cells=event.data.total,
            rescore=event.rescore,
        )

    def _on_overlay(self, body: OverlayBody, message: Message, case_id: str) -> None:
        folder = self.folder(case_id)
        if folder.stopped:
            return
        layers = dict(zip(body.layers, message.payloads, strict=True))
        for name, png in layers.items():
            folder.write_file(f"overlays/{body.fov_id}/{name}.png", png)
        folder.overlay_layers[body.fov_id] = body.layers
        self._fetch_image(folder, body.fov_id)
        try:
            image = folder.read_file(f"images/{body.fov_id}.png")
            composed = compose_overlay(image, layers, body.width, body.height)
        except Exception as error:  # a bad layer costs the picture, never the record
            log.warning("overlay_compose_failed", fov=body.fov_id, error=f"{type(error).__name__}: {error}")
        else:
            folder.write_file(f"overlays/{body.fov_id}.png", composed)
        self._dirty.add(case_id)

    def _fetch_image(self, folder: CaseFolder, fov_id: str) -> None:
        """Keep the FOV's lossless image: from the daemon (its open case only), else from its state folder."""
        relative = f"images/{fov_id}.png"
        if folder.has_file(relative):
            return
        if self.follower.connected and self._daemon_case == folder.case_id:
            try:  # a request without an answer renews the follower's control socket (a late reply would be taken
                reply, frames = self.follower.request("image", fov_id=fov_id)  # for the next request's)
                if reply.ok and frames:
                    folder.write_file(relative, frames[0])
                    return
                log.warning("image_unavailable", case_id=folder.case_id, fov=fov_id, error=reply.error)
            except ControlError as error:
                log.warning("image_unavailable", case_id=folder.case_id, fov=fov_id, error=str(error))
        if self._daemon_state is not None:
            stored = self._daemon_state / "cases" / folder.case_id / f"{fov_id}.png"
            try:
                folder.write_file(relative, stored.read_bytes())
                return
            except OSError:
                pass
        log.warning("image_missing", case_id=folder.case_id, fov=fov_id)

    def _fill_from_summary(self, folder: CaseFolder, summary: CaseSummary) -> None:
        """Give each scored/failed FOV of ``summary`` without an event one (after a gap), and one more to each FOV
        recorded as scored that the daemon now says failed (it lost the FOV's image when it was killed before the
        image reached its disk, and says so when it starts again); fetch the images."""
        assert folder.run is not None
        for entry in summary.fovs:
            latest = folder.latest_event(entry.fov_id)
            lost = latest is not None and latest.status == "scored" and entry.status == "failed"
            if entry.status == "pending" or (latest is not None and not lost):
                continue
            self._fetch_image(folder, entry.fov_id)
            event = folder.run.event(
                fov_id=entry.fov_id,
                kind=entry.kind,
                status=entry.status,
                rescore=lost,
                source="snapshot",
                daemon_session=self.session,
                daemon_seq=None,
                data=fov_data(entry.fov_id, None, summary, entry),
            )
            folder.append(event)
            log.info("fov_recorded_from_snapshot", case_id=folder.case_id, fov=entry.fov_id)
        for entry in summary.fovs:  # images of FOVs whose event was written while an image was missing
            self._fetch_image(folder, entry.fov_id)

    def _reconcile(self, case: CaseSummary) -> None:
        """After a replay: the snapshot's case gets events for its unrecorded FOVs; cases that ended unheard stop."""
        case_id = case.case_id
        if case_id:
            folder = self.folder(case_id)
            if not folder.stopped:
                self._ensure_start(folder, case)
                self._record_actions(folder, case)
                folder.summary = case
                self._fill_from_summary(folder, case)
                self._dirty.add(case_id)
        for state_file in self.out.glob(f"*/{STATE_FILE}"):  # cases the recorder was following before
            other_id = state_file.parent.name
            if other_id == case_id:
                continue
            try:
                closed = bool(json.loads(state_file.read_text(encoding="utf-8")).get("closed"))
            except (OSError, ValueError):
                continue
            if not closed:
                other = self.folder(other_id)
                if other.run is not None and not other.stopped:
                    self._abort(other, "the daemon no longer has this case open and its close was not heard")

    def _abort(self, folder: CaseFolder, reason: str) -> None:
        assert folder.run is not None
        summary = folder.summary or NO_CASE
        self._fetch_missing(folder)
        folder.append(folder.run.stop(summary, "abort", reason))
        folder.save_state(closed=True)
        self._dirty.add(folder.case_id)
        log.warning("case_aborted", case_id=folder.case_id, reason=reason)

    def _fetch_missing(self, folder: CaseFolder) -> list[str]:
        """Fetch the images still missing; the scored FOVs whose image is still missing (a FOV that failed because
        the daemon lost its image has none to miss)."""
        for event in folder.events():
            self._fetch_image(folder, event.fov_id)
        latest = {e.fov_id: e for e in folder.events()}
        return [e.fov_id for e in latest.values() if e.status == "scored" and not folder.has_file(e.data.image)]

    def _finish(self, folder: CaseFolder, summary: CaseSummary) -> None:
        assert folder.run is not None
        missing = self._fetch_missing(folder)
        unscored = [f.fov_id for f in summary.fovs if f.status == "pending"]
        problems = []
        if missing:
            problems.append(f"images missing: {', '.join(missing)}")
        if unscored:
            problems.append(f"not scored when the case closed: {', '.join(unscored)}")
        stop = folder.run.stop(
            summary,
            "fail" if problems else "success",
            "; ".join(problems) if problems else "case closed by the pathologist",
        )
        folder.append(stop)
        folder.save_state(closed=True)
        log.info("case_recorded", case_id=folder.case_id, score=stop.score, exit_status=stop.exit_status)

    def _flush_reports(self) -> None:
        for case_id in sorted(self._dirty):
            folder = self.folders.get(case_id)
            if folder is not None and folder.run is not None:
                try:
                    folder.write_file(REPORT_FILE, write_report(folder.docs, folder.summary).encode())
                except Exception as error:  # the report is for people; the log stays the record
                    log.error("report_failed", case_id=case_id, error=f"{type(error).__name__}: {error}")
        self._dirty.clear()


def compose_overlay(image_png: bytes | None, layers: dict[str, bytes], width: int, height: int) -> bytes:
    """PNG of the default overlay layers over the image (PNG bytes, BGR) downscaled to the layers' size (over
    grey when there is no image)."""
    import cv2
    import numpy as np

    from her2scope.scoring.overlay import DEFAULT_LAYERS, compose

    bgr = cv2.imdecode(np.frombuffer(image_png, np.uint8), cv2.IMREAD_COLOR) if image_png else None
    rgb: Any = np.full((height, width, 3), 200, np.uint8)
    if bgr is not None:
        rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    rgba: list[Any] = []
    for name in DEFAULT_LAYERS:
        if name in layers:
            bgra = cv2.imdecode(np.frombuffer(layers[name], np.uint8), cv2.IMREAD_UNCHANGED)
            if bgra is not None and bgra.ndim == 3 and bgra.shape[2] == 4:
                rgba.append(cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA))
    composed = compose(np.asarray(rgb, np.uint8), rgba)
    ok, png = cv2.imencode(".png", cv2.cvtColor(composed, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the composed overlay")
    return bytes(png.tobytes())
