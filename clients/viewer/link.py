"""The viewer's link to the daemon (ZeroMQ I/O): where to connect, the sockets, commands and resynchronisation."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from her2scope.clients.control import ControlClient, ControlError, read_endpoints
from her2scope.clients.viewer.state import (
    Action,
    ImageFetched,
    Quit,
    Replied,
    Snapshot,
    Tick,
    ViewerState,
    apply,
    daemon_responding,
    image_wanted,
    with_notice,
)
from her2scope.daemon.curve import ClientKeys, secure_client
from her2scope.daemon.protocol import Message, OverlayBody, Topic


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


NON_PREVIEW_TOPICS = (Topic.CAPTURE, Topic.RESULT, Topic.OVERLAY, Topic.STATUS, Topic.CASE)


class DaemonLink:
    """The viewer's sockets and the I/O around the pure state.

    Previews come on their own SUB socket with a receive high-water mark of a few messages: each ``poll`` drains
    it and decodes only the newest. The other topics come on a second SUB socket, all of them, in order. Commands
    go to the control endpoint with a short timeout; a daemon that does not answer never blocks the window for
    long, and nothing is sent while it is silent.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        endpoints_dir: Path | None = None,
        control_timeout_ms: float = 2000.0,
        context: zmq.Context[Any] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self.endpoints = endpoints
        self._curve = curve  # CURVE keys for a daemon that uses them (docs/protocol.md, section 11)
        self._endpoints_dir = endpoints_dir
        self._timeout_ms = control_timeout_ms
        self._context = context or zmq.Context.instance()
        self._poller = zmq.Poller()
        self._last_attempt = -1e9
        self._last_endpoints_check = time.monotonic()
        self._connect()

    def _connect(self) -> None:
        self._previews = self._context.socket(zmq.SUB)
        self._previews.setsockopt(zmq.LINGER, 0)
        self._previews.setsockopt(zmq.RCVHWM, 2)
        self._previews.setsockopt(zmq.SUBSCRIBE, Topic.PREVIEW.value.encode())
        secure_client(self._previews, self._curve)
        self._previews.connect(self.endpoints.publish)
        self._messages = self._context.socket(zmq.SUB)
        self._messages.setsockopt(zmq.LINGER, 0)
        self._messages.setsockopt(zmq.RCVHWM, 1000)
        for topic in NON_PREVIEW_TOPICS:
            self._messages.setsockopt(zmq.SUBSCRIBE, topic.value.encode())
        secure_client(self._messages, self._curve)
        self._messages.connect(self.endpoints.publish)
        self._control = ControlClient(self.endpoints.control, self._timeout_ms, self._context, self._curve)
        self._poller = zmq.Poller()
        self._poller.register(self._previews, zmq.POLLIN)
        self._poller.register(self._messages, zmq.POLLIN)

    def close(self) -> None:
        """Close the sockets."""
        self._previews.close(linger=0)
        self._messages.close(linger=0)
        self._control.close()

    def __enter__(self) -> DaemonLink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, command: str, **args: Any) -> tuple[dict[str, Any], list[bytes]]:
        """Send a command; its reply data and payload frames. ControlError: an error reply, or no answer."""
        try:
            reply, frames = self._control.request(command, **args)
        except ControlError:
            # a late reply would be taken for the next request's: start again with a fresh socket
            self._control.close()
            self._control = ControlClient(self.endpoints.control, self._timeout_ms, self._context, self._curve)
            raise
        if not reply.ok:
            raise ControlError(reply.error or f"{command} failed")
        return reply.data, frames

    def start(self, state: ViewerState) -> ViewerState:
        """Synchronise with the daemon (snapshot, recent overlays, the shown FOV's image); never raises."""
        return self._follow_up(apply(state, Tick(time.monotonic())))

    def poll(self, state: ViewerState, timeout_ms: float = 0.0) -> ViewerState:
        """Wait up to ``timeout_ms`` for messages, apply what arrived (only the newest preview), follow up."""
        state = self._fetch_image(state)  # here, not after the messages: a new overlay is shown first
        events = dict(self._poller.poll(max(0, int(timeout_ms))))
        state = apply(state, Tick(time.monotonic()))
        if self._previews in events:
            newest = None
            while self._previews.poll(0, zmq.POLLIN):
                newest = self._previews.recv_multipart()
            if newest is not None:
                state = apply(state, newest)
        if self._messages in events:
            while self._messages.poll(0, zmq.POLLIN):
                state = apply(state, self._messages.recv_multipart())
                if state.resync is not None:
                    state = self._resync(state)
        return self._follow_up(state)

    def perform(self, state: ViewerState, actions: Sequence[Action]) -> tuple[ViewerState, bool]:
        """Carry out ``actions``; the new state and whether to quit."""
        for action in actions:
            if isinstance(action, Quit):
                return state, True
            if not daemon_responding(state):
                state = apply(state, Replied(action.command, False, error="the daemon is not responding; not sent"))
                continue
            try:
                data, _ = self.request(action.command, **action.args)
            except ControlError as error:
                state = apply(state, Replied(action.command, False, error=str(error)))
            else:
                state = apply(state, Replied(action.command, True, data))
        return state, False

    def _follow_up(self, state: ViewerState) -> ViewerState:
        """What the state asks for: a snapshot or replay, new endpoints after a daemon restart."""
        if state.resync is not None:
            state = self._resync(state)
        if self._endpoints_dir is not None and not daemon_responding(state):
            self._check_endpoints()
        return state

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

    def _check_endpoints(self) -> None:
        now = time.monotonic()
        if now - self._last_endpoints_check < 2.0:
            return
        self._last_endpoints_check = now
        try:
            found = read_endpoints(self._endpoints_dir or Path())
        except ControlError:
            return
        endpoints = Endpoints(found.get("publish", ""), found.get("control", ""))
        if endpoints != self.endpoints and endpoints.publish and endpoints.control:
            self.close()
            self.endpoints = endpoints
            self._connect()

    def _resync(self, state: ViewerState) -> ViewerState:
        now = time.monotonic()
        first = state.last_heard is None and state.session is None
        if not first and not daemon_responding(state) and state.resync == "snapshot":
            return state  # wait for a heartbeat (or a new session) before asking a silent daemon
        if state.resync == "snapshot" and now - self._last_attempt < 1.0:
            return state
        self._last_attempt = now
        if state.resync == "replay":
            try:
                replay = self._control.replay(state.last_seq, self._timeout_ms)
            except ControlError:
                replay = None
            if replay is not None and replay.complete and not replay.invalid:
                state = dataclasses.replace(state, resync=None, follow=state.follow.caught_up())
                for message in replay.messages:
                    state = apply(state, message)
                return state
            state = dataclasses.replace(state, resync="snapshot")
        try:
            data, _ = self.request("snapshot")
        except ControlError as error:
            return with_notice(state, f"cannot reach the daemon ({error}); retrying…", error=True)
        state = apply(apply(state, Tick(time.monotonic())), Snapshot(data))
        return self._recent_overlays(state)

    def _recent_overlays(self, state: ViewerState) -> ViewerState:
        """Overlays are not in snapshots: apply the newest buffered one of the last FOV and of the control."""
        try:
            messages = self._control.replay(0, self._timeout_ms).messages
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
