"""The frames the daemon would publish, made in the test process, and a viewer state that has its first snapshot."""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from her2scope.clients import viewer
from her2scope.clients.viewer import Responding, Snapshot, ViewerState, apply
from her2scope.daemon.protocol import (
    CaptureBody,
    OverlayBody,
    Payload,
    PreviewBody,
    ResultBody,
    StatusBody,
    Topic,
    encode,
)

SESSION = "0123456789abcdef"
CASE_ID = "case-1"


def jpeg_bytes(bgr: np.ndarray) -> bytes:
    """A BGR image as the JPEG of a preview."""
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def png_bytes(image: np.ndarray) -> bytes:
    """An image as the PNG of an overlay layer."""
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def status_body(**changes: Any) -> dict[str, Any]:
    """A heartbeat's body (a live camera, an open case of one FOV), with ``changes``."""
    body = {
        "daemon": "running",
        "camera": {"state": "live", "source": "simulated", "fps": 15.0},
        "stability": "stable",
        "auto_capture": True,
        "case_id": CASE_ID,
        "n_fovs": 1,
        "control_calibrated": False,
        "worker": "idle",
        "queue": 0,
        "unsaved_images": 0,
        "uptime_s": 5.0,
    }
    return {**body, **changes}


def case_summary(
    *entries: dict[str, Any], score: str | None = "2+", control: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The open case's summary with the given FOV ``entries`` (see ``fov_entry``)."""
    counts = {"0": 40, "1+": 30, "2+": 25, "3+": 5}
    return {
        "case_id": CASE_ID,
        "open": True,
        "operator": None,
        "started_at": "2026-11-26T18:00:00Z",
        "closed_at": None,
        "adjustments": [],
        "fovs": list(entries),
        "control": control,
        "case": {
            "score": score,
            "status": "equivocal, reflex ISH",
            "her2_low": True,
            "zero_subtype": None,
            "reason": ">10% of cells 2+",
            "counts": counts,
            "total": 100,
            "percentages": {"0": 40.0, "1+": 30.0, "2+": 25.0, "3+": 5.0},
            "n_fovs": len(entries),
            "warnings": [] if control else ["no positive control: the default intense threshold was used"],
        },
    }


def fov_entry(fov_id: str, score: str | None = "2+", **changes: Any) -> dict[str, Any]:
    """One scored FOV of a case summary, with ``changes``."""
    entry = {
        "fov_id": fov_id,
        "kind": "fov",
        "index": 1,
        "status": "scored",
        "excluded": False,
        "roi": False,
        "score": score,
        "counts": {"0": 40, "1+": 30, "2+": 25, "3+": 5},
        "total": 100,
        "error": None,
    }
    return {**entry, **changes}


class Daemonish:
    """Makes the frames the daemon would publish, with consistent sequence numbers."""

    def __init__(self, session: str = SESSION) -> None:
        self.session = session
        self.seq = 0
        self.topic_seqs: dict[Topic, int] = {}

    def frames(self, topic: Topic, body: Any, payloads: list[tuple[Payload, bytes]] | None = None) -> list[bytes]:
        self.seq += 1
        self.topic_seqs[topic] = self.topic_seqs.get(topic, 0) + 1
        return encode(
            topic,
            self.seq,
            time.time() * 1000,
            body,
            payloads or [],
            case_id=CASE_ID,
            topic_seq=self.topic_seqs[topic],
            session=self.session,
        )

    def preview(self, frame_index: int, bgr: np.ndarray, stability: str = "stable") -> list[bytes]:
        body = PreviewBody(
            frame_index=frame_index,
            width=bgr.shape[1],
            height=bgr.shape[0],
            stability=stability,
            motion_um=0.2,
            focus_ratio=0.97,
        )
        return self.frames(Topic.PREVIEW, body, [(Payload(name="preview", encoding="jpeg"), jpeg_bytes(bgr))])

    def status(self, **changes: Any) -> list[bytes]:
        return self.frames(Topic.STATUS, StatusBody(**status_body(**changes)))

    def capture(self, fov_id: str, kind: str = "fov") -> list[bytes]:
        body = CaptureBody(fov_id=fov_id, kind=kind, trigger="control", frame_index=1, pixel_size_um=0.25)
        return self.frames(Topic.CAPTURE, body)

    def result(self, fov_id: str, case: dict[str, Any]) -> list[bytes]:
        return self.frames(Topic.RESULT, ResultBody(fov_id=fov_id, kind="fov", status="scored", case=case))

    def overlay(self, fov_id: str, layers: dict[str, np.ndarray], kind: str = "fov") -> list[bytes]:
        rows, cols = next(iter(layers.values())).shape[:2]
        body = OverlayBody(fov_id=fov_id, kind=kind, layers=tuple(layers), width=cols, height=rows)
        payloads = [(Payload(name=name, encoding="png"), png_bytes(layer)) for name, layer in layers.items()]
        return self.frames(Topic.OVERLAY, body, payloads)


def connected(daemon: Daemonish | None = None, now: float = 0.0) -> ViewerState:
    """A viewer that has its snapshot (empty case) and a heartbeat, and whose follower says the daemon responds."""
    daemon = daemon or Daemonish()
    state = apply(viewer.initial_state(now), Responding())
    state = apply(state, Snapshot({"last_seq": 0, "session": SESSION, "case": case_summary(), "status": status_body()}))
    return apply(state, daemon.status())
