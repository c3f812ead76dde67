"""A client of the daemon's control endpoint and publisher, used by ``her2scope ctl``, the viewer and the tests."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from her2scope.daemon.curve import ClientKeys, secure_client
from her2scope.daemon.protocol import Command, Message, ProtocolError, Reply, Request, decode, request_id


class ControlError(RuntimeError):
    """The daemon did not answer in time, or answered with an error."""


class ControlClient:
    """Sends requests to the daemon's ROUTER endpoint from a DEALER socket; every call has a timeout. With
    ``curve``, the socket authenticates with those keys and is encrypted (a daemon that uses CURVE answers nothing
    else: requests then time out)."""

    def __init__(
        self,
        endpoint: str,
        timeout_ms: float = 5000.0,
        context: zmq.Context[Any] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        secure_client(self._socket, curve)
        self._socket.connect(endpoint)
        self._timeout_ms = timeout_ms
        self._ids = itertools.count(1)

    def close(self) -> None:
        """Close the socket."""
        self._socket.close(linger=0)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request_raw(self, frame: bytes, timeout_ms: float | None = None) -> tuple[Reply, list[bytes]]:
        """Send one raw request frame; return the reply and its payload frames.

        A DEALER socket does not pair replies with requests: the late reply to an earlier request that timed out
        would be taken for this one's. So when the request carries an ``id``, replies with another id are dropped.
        """
        expected = request_id(frame)
        deadline = time.monotonic() + (timeout_ms or self._timeout_ms) / 1000.0
        # a DEALER with no connection to send on (the daemon refused this client's CURVE key, say) would block the
        # send for ever: wait for one as long as for the reply
        if not self._socket.poll(max(1, int(timeout_ms or self._timeout_ms)), zmq.POLLOUT):
            raise ControlError(
                f"the daemon did not answer within {timeout_ms or self._timeout_ms:.0f} ms: no connection to it (is it "
                "running? with CURVE, is this client's key on its list?)"
            )
        self._socket.send_multipart([b"", frame], zmq.NOBLOCK)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                raise ControlError(f"the daemon did not answer within {timeout_ms or self._timeout_ms:.0f} ms")
            frames = self._socket.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]
            try:
                reply = Reply.model_validate_json(frames[0])
            except ValueError as error:
                raise ControlError(f"malformed reply from the daemon: {error}") from None
            if expected and reply.id != expected:
                continue  # a late reply to an earlier request
            return reply, frames[1:]

    def next_id(self) -> str:
        """A request id unique to this client (process id and a counter)."""
        return f"{os.getpid()}-{next(self._ids)}"

    def request(
        self, command: Command | str, timeout_ms: float | None = None, **args: Any
    ) -> tuple[Reply, list[bytes]]:
        """Send one command; its reply (an error reply too) and payload frames.

        The request is the protocol's :class:`Request`, so an unknown command fails here with ControlError, before
        anything is sent. ControlError also when the daemon does not answer in time.
        """
        try:
            frame = Request(id=self.next_id(), command=Command(command), args=args).model_dump_json().encode()
        except (ValueError, ValidationError, PydanticSerializationError) as error:
            raise ControlError(f"not a request the daemon takes: {error}") from None
        return self.request_raw(frame, timeout_ms)

    def call(self, command: Command | str, timeout_ms: float | None = None, **args: Any) -> dict[str, Any]:
        """Send a command; return its reply data, or raise ControlError with the daemon's error message."""
        reply, _ = self.request(command, timeout_ms, **args)
        if not reply.ok:
            raise ControlError(reply.error or f"{command} failed")
        return reply.data

    def replay(self, since_seq: int, timeout_ms: float | None = None) -> Replay:
        """The published messages after ``since_seq`` still buffered by the daemon (``replay``)."""
        reply, frames = self.request(Command.REPLAY, timeout_ms, since_seq=since_seq)
        if not reply.ok:
            raise ControlError(reply.error or "replay failed")
        messages: list[Message] = []
        invalid: list[str] = []
        offset = 0
        for count in reply.data["frames_per_message"]:
            try:
                messages.append(decode(frames[offset : offset + count]))
            except ProtocolError as error:  # one bad message must not hide the others
                invalid.append(str(error))
            offset += count
        return Replay(tuple(messages), bool(reply.data["complete"]), int(reply.data["last_seq"]), tuple(invalid))


@dataclass(frozen=True, slots=True)
class Replay:
    """What ``replay`` returned: the messages (oldest first), whether they are all since the asked sequence number
    (the buffer may have dropped older ones), the last sequence number published, and why any message was skipped."""

    messages: tuple[Message, ...]
    complete: bool
    last_seq: int
    invalid: tuple[str, ...] = ()


class Subscriber:
    """A SUB socket on the daemon's publisher that decodes messages; ``receive`` has a timeout. ``curve``: as for
    :class:`ControlClient`; ``hwm``: how many messages it queues before it drops new ones (2 for previews: only the
    newest matters)."""

    def __init__(
        self,
        endpoint: str,
        topics: Sequence[str] = ("",),
        context: zmq.Context[Any] | None = None,
        curve: ClientKeys | None = None,
        hwm: int = 1000,
    ) -> None:
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        secure_client(self._socket, curve)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(endpoint)

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The SUB socket, to wait on it together with others (``zmq.Poller``)."""
        socket: zmq.Socket[Any] = self._socket
        return socket

    def close(self) -> None:
        """Close the socket."""
        self._socket.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def receive(self, timeout_ms: float) -> Message | None:
        """The next message, or None after ``timeout_ms``; a malformed one raises ProtocolError."""
        if not self._socket.poll(max(0, int(timeout_ms)), zmq.POLLIN):
            return None
        return decode(self._socket.recv_multipart())


def read_endpoints(state_directory: Path) -> dict[str, str]:
    """The endpoints a running daemon wrote to its state folder (for random ports); ControlError if none."""
    path = state_directory.expanduser() / "endpoints.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise ControlError(f"no running daemon found ({path}: {error})") from None


def live_endpoints(state_directory: Path, configured: dict[str, str] | None = None) -> dict[str, str]:
    """The running daemon's endpoints: its ``endpoints.json`` when the pid in it is alive, else ``configured``.

    Raises
    ------
    ControlError
        No live daemon wrote its endpoints and ``configured`` is missing or uses ports chosen at start (``*``).
    """
    path = state_directory.expanduser() / "endpoints.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        pid = int(document.get("pid", 0))
        if pid > 0 and Path(f"/proc/{pid}").exists():
            return {"publish": str(document["publish"]), "control": str(document["control"])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    if configured and not any("*" in e for e in configured.values()):
        return configured
    raise ControlError(f"no running daemon found: none wrote {path}, and the configured ports are chosen at start")


def daemon_endpoints(config_path: Path | None = None, state_directory: Path | None = None) -> dict[str, str]:
    """Where the daemon of a configuration listens (see :func:`live_endpoints`); ``state_directory`` defaults to
    the configuration's. ConfigError for a bad configuration, ControlError when no daemon can be found."""
    from her2scope.config.app import load_config

    config = load_config(config_path)
    state = state_directory or config.daemon.state.directory
    return live_endpoints(state, {"publish": config.daemon.zmq.publish, "control": config.daemon.zmq.control})


def daemon_curve(
    config_path: Path | None = None, state_directory: Path | None = None, key_file: Path | None = None
) -> ClientKeys | None:
    """The CURVE keys a client of the configuration's daemon uses (``key_file`` or ``client_key``, with the daemon's
    public key), None without a key. ConfigError for a bad configuration, CurveError for a missing or bad key."""
    from her2scope.config.app import load_config
    from her2scope.daemon.curve import client_keys

    config = load_config(config_path)
    state = (state_directory or config.daemon.state.directory).expanduser()
    return client_keys(config.daemon.zmq, state, key_file)


__all__ = [
    "ControlClient",
    "ControlError",
    "ProtocolError",
    "Replay",
    "Subscriber",
    "daemon_curve",
    "daemon_endpoints",
    "live_endpoints",
    "read_endpoints",
]
