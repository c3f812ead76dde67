"""The viewer's link to the daemon (ZeroMQ I/O): where to connect, its follower of the daemon, and commands."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from her2scope.clients.control import ControlError, read_endpoints
from her2scope.clients.follower import Follower, Snapshot
from her2scope.clients.viewer.state import (
    Action,
    ImageFetched,
    Quit,
    Replied,
    Send,
    Tick,
    ViewerState,
    apply,
    daemon_responding,
    image_wanted,
)
from her2scope.daemon.curve import ClientKeys
from her2scope.daemon.protocol import Message, OverlayBody


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The daemon's publisher and control endpoints."""

    publish: str
    control: str


def resolve_endpoints(config_path: Path | None, daemon_state: Path | None) -> tuple[Endpoints, Path | None, float]:
    """The endpoints to connect to, the state folder to re-read them from (random ports), and the heartbeat (s).

    ``daemon_state`` (the daemon's state folder) wins; otherwise the configuration's endpoints, or, when those
    are random ports (``*``), the ``endpoints.json`` of the configuration's state folder.

    Raises
    ------
    ConfigError, ControlError
        The configuration is invalid, or no running daemon wrote its endpoints.
    """
    from her2scope.config.app import load_config

    config = load_config(config_path)
    zmq_config = config.daemon.zmq
    heartbeat_s = zmq_config.heartbeat_ms / 1000.0
    if daemon_state is None and "*" in zmq_config.publish + zmq_config.control:
        daemon_state = config.daemon.state.directory
    if daemon_state is None:
        return Endpoints(zmq_config.publish, zmq_config.control), None, heartbeat_s
    found = read_endpoints(daemon_state)
    return Endpoints(found["publish"], found["control"]), daemon_state, heartbeat_s


class DaemonLink:
    """The viewer's I/O around the pure state: a :class:`~her2scope.clients.follower.Follower` of the daemon (with
    the previews, on a socket of their own that keeps only the newest) feeds ``apply``, and commands go to the
    control endpoint with a short timeout; a daemon that does not answer never blocks the window for long, and
    nothing is sent while it is silent.

    ``endpoints_dir``: the daemon's state folder, whose ``endpoints.json`` is read again while the daemon is silent
    (a restarted daemon may listen on new ports). ``heartbeat_ms``: the daemon's, for the silence limit.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        endpoints_dir: Path | None = None,
        control_timeout_ms: float = 2000.0,
        heartbeat_ms: float = 1000.0,
        context: zmq.Context[Any] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        given = {"publish": endpoints.publish, "control": endpoints.control}

        def where() -> Mapping[str, str]:
            if endpoints_dir is None:
                return given
            try:
                return read_endpoints(endpoints_dir)
            except ControlError:
                return self._follower.endpoints or given  # none written (yet): stay where it is

        self._initial = endpoints
        self._follower = Follower(
            where,
            heartbeat_ms=heartbeat_ms,
            timeout_ms=control_timeout_ms,
            previews=True,
            context=context,
            curve=curve,  # CURVE keys for a daemon that uses them (docs/protocol.md, section 11)
        )

    @property
    def endpoints(self) -> Endpoints:
        """Where the link is connected (or will connect)."""
        found = self._follower.endpoints
        return Endpoints(found["publish"], found["control"]) if found else self._initial

    def close(self) -> None:
        """Close the sockets."""
        self._follower.close()

    def __enter__(self) -> DaemonLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, command: str, **args: Any) -> tuple[dict[str, Any], list[bytes]]:
        """Send a command; its reply data and payload frames. ControlError: an error reply, or no answer."""
        reply, frames = self._follower.request(command, **args)
        if not reply.ok:
            raise ControlError(reply.error or f"{command} failed")
        return reply.data, frames

    def start(self, state: ViewerState) -> ViewerState:
        """Connect and synchronise with the daemon (snapshot, recent overlays); never raises."""
        return self.poll(state, 0)

    def poll(self, state: ViewerState, timeout_ms: float = 0.0) -> ViewerState:
        """Wait up to ``timeout_ms`` for messages; apply what the follower hands on (only the newest preview)."""
        state = self._fetch_image(state)  # here, not after the messages: a new overlay is shown first
        events = self._follower.poll(timeout_ms)
        state = apply(state, Tick(time.monotonic()))
        for event in events:
            state = apply(state, event)
            if isinstance(event, Snapshot) and not event.replayed_before:
                state = self._recent_overlays(state)
        return state

    def perform(self, state: ViewerState, actions: Sequence[Action]) -> tuple[ViewerState, bool]:
        """Carry out ``actions``; the new state and whether to quit."""
        for action in actions:
            if isinstance(action, Quit):
                return state, True
            state, _ = self.send(state, action)
        return state, False

    def send(self, state: ViewerState, action: Send) -> tuple[ViewerState, Replied]:
        """Send one command (not while the daemon is silent); the new state and the reply, as ``apply`` took it."""
        if not daemon_responding(state):
            replied = Replied(action.command, False, error="the daemon is not responding; not sent")
        else:
            try:
                data, _ = self.request(action.command, **action.args)
            except ControlError as error:
                replied = Replied(action.command, False, error=str(error))
            else:
                replied = Replied(action.command, True, data)
        return apply(state, replied), replied

    def _fetch_image(self, state: ViewerState) -> ViewerState:
        fov = state.fovs.get(image_wanted(state) or "")
        if fov is not None:
            try:
                data, frames = self.request("image", fov_id=fov.fov_id)
                if len(frames) != 1:
                    raise ControlError(f"image reply has {len(frames)} frames, expected 1")
                image = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_COLOR)
                if image is None:
                    raise ControlError("the image cannot be decoded")
                state = apply(state, ImageFetched(str(data.get("fov_id", fov.fov_id)), np.asarray(image, np.uint8)))
            except ControlError as error:
                state = apply(state, ImageFetched(fov.fov_id, None, str(error)))
        return state

    def _recent_overlays(self, state: ViewerState) -> ViewerState:
        """Overlays are not in snapshots: apply the newest buffered one of the last FOV and of the control."""
        try:
            messages = self._follower.replay(0).messages
        except ControlError:
            return state
        case_id = state.case.case_id
        newest: dict[str, Message] = {}
        for message in messages:
            body = message.body
            if isinstance(body, OverlayBody) and message.header.case_id == case_id:
                newest[body.kind] = message
        for kind in ("control", "fov"):
            if kind in newest:
                state = apply(state, newest[kind])
        return state
