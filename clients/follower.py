"""Following the daemon's published messages in order, for every client (the viewer and the recorder): where a
follower stands, and what a new message means for it (zguide "Clone": sequence numbers, gaps, restarts).

Every message carries the daemon run's ``session``, its ``seq`` (+1 per message) and its ``topic_seq`` (+1 per
message of its topic, so that a subscriber to some topics only sees its own gaps). A follower applies a message
once, in order; a ``topic_seq`` that jumps means messages were lost (a full socket queue, a reconnect) and the
follower must catch up (``replay`` since its ``last_seq``, or a ``snapshot``); a new ``session`` means the daemon
restarted and its numbers start again. How long without a heartbeat makes the daemon silent is
:func:`her2scope.daemon.protocol.silence_limit_ms`.

:class:`FollowPosition` is where a follower stands and what a message means for it (pure). :class:`Follower` is the
one loop around it that every client uses: the sockets, the catch-up (``snapshot`` and ``replay``), silence and
reconnecting; it hands its user typed events (:data:`Event`), never sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal

import zmq

from her2scope.clients.control import ControlClient, ControlError, Replay, Subscriber
from her2scope.daemon.curve import ClientKeys
from her2scope.daemon.protocol import Header, Message, ProtocolError, Reply, Topic, decode, silence_limit_ms


class Verdict(StrEnum):
    """What a message means for a follower."""

    APPLY = "apply"  # the next one: apply it
    SEEN = "seen"  # already applied (or part of the snapshot the follower started from)
    GAP = "gap"  # messages of its topic were lost before it: catch up before applying anything
    RESTARTED = "restarted"  # a new daemon run: what the follower knew is stale, start again from a snapshot


@dataclass(frozen=True, slots=True)
class FollowPosition:
    """Where a follower stands: the daemon run it follows, the last message it applied, the last ``topic_seq`` of
    each topic it has seen."""

    session: str | None = None
    last_seq: int = 0
    topic_seqs: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def place(self, header: Header) -> Verdict:
        """What a message with ``header`` means here."""
        if header.session and self.session is not None and header.session != self.session:
            return Verdict.RESTARTED
        if header.seq <= self.last_seq:
            return Verdict.SEEN
        known = self.topic_seqs.get(header.topic.value)
        if known is not None and header.topic_seq > known + 1:
            return Verdict.GAP
        return Verdict.APPLY

    def after(self, header: Header) -> FollowPosition:
        """The position once the message with ``header`` is applied (a new daemon run starts from nothing)."""
        session = header.session or self.session
        start = self if session == self.session else FollowPosition(session=session)
        seqs = MappingProxyType({**start.topic_seqs, header.topic.value: header.topic_seq})
        return replace(start, last_seq=max(start.last_seq, header.seq), topic_seqs=seqs)

    def caught_up(self, session: str | None = None, last_seq: int | None = None) -> FollowPosition:
        """The position after a snapshot (of ``session`` up to ``last_seq``) or a complete replay (this run, from
        here): topic gaps are counted afresh from the messages that follow."""
        return FollowPosition(
            session=self.session if session is None else session,
            last_seq=self.last_seq if last_seq is None else last_seq,
        )


# --- what a follower hands its user -------------------------------------------------------------------------------

#: The topics a follower follows in order: all but previews, which are never replayed and have a socket of their own.
ORDERED_TOPICS = tuple(topic for topic in Topic if topic != Topic.PREVIEW)

Source = Literal["live", "replay"]
#: Why a follower catches up: it (re)connected, a topic lost messages, the daemon restarted, or it fell silent.
Why = Literal["start", "gap", "restart", "silence"]


@dataclass(frozen=True, slots=True)
class Connected:
    """The follower's sockets were (re)connected to these endpoints (``publish``, ``control``)."""

    endpoints: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class NotFound:
    """No daemon to connect to was found (the follower retries)."""

    error: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    """A ``snapshot`` or ``replay`` to catch up got no answer, or an error (the follower retries)."""

    error: str


@dataclass(frozen=True, slots=True)
class Invalid:
    """A published or replayed message that does not follow the protocol was skipped."""

    error: str


@dataclass(frozen=True, slots=True)
class Resyncing:
    """A live message of ``topic`` showed a gap (messages were lost) or a restart (a new ``session``): the follower
    catches up before it applies anything more."""

    why: Literal["gap", "restart"]
    topic: str


@dataclass(frozen=True, slots=True)
class Silent:
    """No heartbeat for longer than the silence limit (the first time it was noticed)."""

    silent_ms: float


@dataclass(frozen=True, slots=True)
class Responding:
    """The daemon is heard from again (its heartbeat, or a snapshot), or for the first time."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The reply to ``snapshot`` (``{"last_seq", "session", "case", "status"}``): the daemon's state as of
    ``last_seq``. In a catch-up it comes in sequence order: after the replayed messages up to ``last_seq``, before
    those after it. ``why`` the follower caught up; the replay around it started after ``since_seq``, brought
    ``replayed`` messages and was ``complete`` (no message since ``since_seq`` had left the daemon's buffer)."""

    data: Mapping[str, Any]
    why: Why = "start"
    since_seq: int = 0
    replayed: int = 0
    complete: bool = True

    @property
    def session(self) -> str:
        """The daemon run of the snapshot."""
        return str(self.data["session"])

    @property
    def last_seq(self) -> int:
        """The sequence number the snapshot is up to date with."""
        return int(self.data["last_seq"])

    @property
    def replayed_before(self) -> bool:
        """Whether the messages before the snapshot were all replayed (else the snapshot is where the follower
        starts: what it does not hold, overlays, was not replayed)."""
        return self.complete and self.since_seq < self.last_seq


@dataclass(frozen=True, slots=True)
class Received:
    """A message to apply: the next one, in order, exactly once (``live`` from the publisher, or ``replay``ed in a
    catch-up). Previews come this way too, the newest only, outside the order."""

    message: Message
    source: Source = "live"


@dataclass(frozen=True, slots=True)
class Stale:
    """A live message the follower does not apply: already applied, older than its snapshot, or arriving while it
    catches up (the catch-up brings it). A snapshot holds no overlays: an older overlay may still be news."""

    message: Message


@dataclass(frozen=True, slots=True)
class Synced:
    """A catch-up is over: the follower is at ``last_seq`` of ``session``."""

    session: str
    last_seq: int


#: What :meth:`Follower.poll` hands on.
Event = (
    Connected
    | NotFound
    | Unreachable
    | Invalid
    | Resyncing
    | Silent
    | Responding
    | Snapshot
    | Received
    | Stale
    | Synced
)


class LoopState(StrEnum):
    """What a follower is doing."""

    DISCONNECTED = "disconnected"  # no daemon found yet
    SYNCING = "syncing"  # a catch-up is due
    FOLLOWING = "following"


# --- the follower -------------------------------------------------------------------------------------------------


class Follower:
    """Follows the daemon: its published messages in order, each once, and its silence; see :meth:`poll`.

    ``endpoints`` says where the daemon is (``{"publish", "control"}``; ControlError: no daemon found): it is asked
    when the follower connects, and again every ``RETRY_S`` while the daemon is silent, to follow a daemon that
    restarted on new ports. ``resume(session)``: where to start in a daemon run not followed before, the
    sequence number of the last message already processed elsewhere (the recorder's case folders); without it a
    follower starts from the snapshot and nothing before it is replayed. ``previews``: also the live view, on a
    socket of its own that keeps only the newest frames. ``heartbeat_ms``: the daemon's heartbeat interval, for the
    silence limit (:func:`her2scope.daemon.protocol.silence_limit_ms`). ``timeout_ms``: of every request.

    Catching up (zguide "Clone"), at connection, after a gap or a restart, and when a silent daemon is heard again:
    a ``snapshot``, then a ``replay`` of what came after the follower's position (or after ``resume``, or after the
    snapshot), delivered in sequence order with the snapshot in its place. A silent daemon is not asked (the request
    would only time out) until it is heard again, except on a new connection.
    """

    RETRY_S = 1.0
    BATCH = 50  # live messages handled per poll at most

    def __init__(
        self,
        endpoints: Callable[[], Mapping[str, str]],
        *,
        heartbeat_ms: float = 1000.0,
        timeout_ms: float = 5000.0,
        previews: bool = False,
        resume: Callable[[str], int] | None = None,
        context: zmq.Context[Any] | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self._find = endpoints
        self._resume = resume
        self._previews_wanted = previews
        self._timeout_ms = timeout_ms
        self._context = context or zmq.Context.instance()
        self._curve = curve  # CURVE keys for a daemon that uses them (docs/protocol.md, section 11)
        self.silence_limit_ms = silence_limit_ms(heartbeat_ms)
        self.position = FollowPosition()
        self.endpoints: dict[str, str] | None = None
        self.responding: bool | None = None  # None: not heard from yet, and not for long enough to be silent
        self._ordered: Subscriber | None = None
        self._previews: Subscriber | None = None
        self._control: ControlClient | None = None
        self._poller = zmq.Poller()
        self._due: Why | None = None  # a catch-up is due, and why
        self._synced_here = False  # a catch-up succeeded on this connection
        now = time.monotonic()
        self._last_heard = now
        self._next_connect = now
        self._next_sync = now
        self._next_lookup = now + self.RETRY_S

    @property
    def connected(self) -> bool:
        """Whether the follower has sockets on a daemon's endpoints."""
        return self._control is not None

    @property
    def state(self) -> LoopState:
        """Disconnected, catching up, or following."""
        if not self.connected:
            return LoopState.DISCONNECTED
        return LoopState.SYNCING if self._due is not None else LoopState.FOLLOWING

    def close(self) -> None:
        """Close the sockets."""
        for socket in (self._ordered, self._previews, self._control):
            if socket is not None:
                socket.close()
        self._ordered = self._previews = self._control = None
        self._poller = zmq.Poller()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # what the user calls

    def poll(self, timeout_ms: float = 0.0) -> list[Event]:
        """Wait up to ``timeout_ms`` for messages; what happened since the last call, in order: (re)connecting, the
        messages to apply (a batch at most), a catch-up, the daemon falling silent or being heard again."""
        events: list[Event] = []
        if not self.connected:
            wait_s = self._next_connect - time.monotonic()
            if wait_s > 0:
                time.sleep(min(timeout_ms / 1000.0, wait_s))
            else:
                self._connect(events)
        else:
            self._receive(timeout_ms, events)
        self._catch_up_if_due(events)
        self._watch_silence(events)
        return events

    def request(self, command: str, timeout_ms: float | None = None, **args: Any) -> tuple[Reply, list[bytes]]:
        """Send a command on the follower's control socket; its reply (an error reply too) and payload frames.
        ControlError when not connected or without an answer (the socket is then replaced: a DEALER does not match
        replies to requests, and a late reply would be taken for the next request's)."""
        if self._control is None:
            raise ControlError("not connected to the daemon")
        try:
            return self._control.request(command, timeout_ms, **args)
        except ControlError:
            self._renew_control()
            raise

    def replay(self, since_seq: int) -> Replay:
        """The daemon's buffered messages after ``since_seq`` (``replay``); ControlError as for :meth:`request`."""
        if self._control is None:
            raise ControlError("not connected to the daemon")
        try:
            return self._control.replay(since_seq)
        except ControlError:
            self._renew_control()
            raise

    # connecting

    def _connect(self, events: list[Event]) -> None:
        self._next_connect = time.monotonic() + self.RETRY_S
        found = self._lookup(events)
        if found is not None:
            self._open(found, events)

    def _lookup(self, events: list[Event]) -> dict[str, str] | None:
        try:
            found = self._find()
            endpoints = {"publish": str(found["publish"]), "control": str(found["control"])}
        except (ControlError, KeyError) as error:
            events.append(NotFound(str(error)))
            return None
        return endpoints if endpoints["publish"] and endpoints["control"] else None

    def _open(self, endpoints: dict[str, str], events: list[Event]) -> None:
        """Subscribe first, then the control socket: nothing published after the snapshot is missed."""
        self.close()
        self.endpoints = endpoints
        self._ordered = Subscriber(
            endpoints["publish"], [t.value for t in ORDERED_TOPICS], context=self._context, curve=self._curve
        )
        self._poller.register(self._ordered.socket, zmq.POLLIN)
        if self._previews_wanted:
            self._previews = Subscriber(
                endpoints["publish"], [Topic.PREVIEW.value], context=self._context, curve=self._curve, hwm=2
            )
            self._poller.register(self._previews.socket, zmq.POLLIN)
        self._control = ControlClient(endpoints["control"], self._timeout_ms, self._context, self._curve)
        self._due, self._synced_here = "start", False
        self._next_sync = time.monotonic()
        events.append(Connected(dict(endpoints)))

    def _renew_control(self) -> None:
        if self._control is not None and self.endpoints is not None:
            self._control.close()
            self._control = ControlClient(self.endpoints["control"], self._timeout_ms, self._context, self._curve)

    # live messages

    def _receive(self, timeout_ms: float, events: list[Event]) -> None:
        ready = dict(self._poller.poll(max(0, int(timeout_ms))))
        if self._previews is not None and self._previews.socket in ready:
            newest = None
            while self._previews.socket.poll(0, zmq.POLLIN):
                newest = self._previews.socket.recv_multipart()
            if newest is not None and (message := self._decode(newest, events)) is not None:
                self._place_preview(message, events)
        if self._ordered is not None and self._ordered.socket in ready:
            for _ in range(self.BATCH):
                if not self._ordered.socket.poll(0, zmq.POLLIN):
                    break
                message = self._decode(self._ordered.socket.recv_multipart(), events)
                if message is not None and not self._place(message, events):
                    break

    @staticmethod
    def _decode(frames: list[bytes], events: list[Event]) -> Message | None:
        try:
            return decode(frames)
        except ProtocolError as error:
            events.append(Invalid(str(error)))
            return None

    def _place(self, message: Message, events: list[Event]) -> bool:
        """Hand on a live message as its verdict says; False when a catch-up is due now."""
        header = message.header
        if header.topic == Topic.STATUS:
            self._heard(events)
        if self._due is not None:
            events.append(Stale(message))
            return False
        verdict = self.position.place(header)
        if verdict == Verdict.APPLY:
            self.position = self.position.after(header)
            events.append(Received(message, "live"))
            return True
        if verdict == Verdict.SEEN:
            events.append(Stale(message))
            return True
        why: Literal["gap", "restart"] = "restart" if verdict == Verdict.RESTARTED else "gap"
        events.extend((Resyncing(why, header.topic.value), Stale(message)))
        self._due = why
        return False

    def _place_preview(self, message: Message, events: list[Event]) -> None:
        """Previews are no part of the order; they only say which daemon run it is."""
        session = message.header.session
        if session and self.position.session is not None and session != self.position.session and self._due is None:
            events.append(Resyncing("restart", Topic.PREVIEW.value))
            self._due = "restart"
        events.append(Received(message, "live"))

    # catching up

    def _catch_up_if_due(self, events: list[Event]) -> None:
        now = time.monotonic()
        if self._due is None or not self.connected or now < self._next_sync:
            return
        if self._synced_here and self.responding is False:
            return  # a silent daemon would not answer: wait until it is heard again
        try:
            self._catch_up(self._due, events)
        except ControlError as error:
            self._renew_control()
            self._next_sync = time.monotonic() + self.RETRY_S
            events.append(Unreachable(str(error)))

    def _catch_up(self, why: Why, events: list[Event]) -> None:
        """Snapshot, replay after the position, and deliver both in sequence order; ControlError: try again later."""
        reply, _ = self.request("snapshot")
        if not reply.ok:
            raise ControlError(reply.error or "snapshot failed")
        data = reply.data
        session, snapshot_seq = str(data["session"]), int(data["last_seq"])
        position = self.position
        if session != position.session:  # a daemon run not followed before: from ``resume``, or from the snapshot
            start = self._resume(session) if self._resume is not None else snapshot_seq
            position = FollowPosition(session=session, last_seq=start)
        since = position.last_seq
        replay = self.replay(since)
        if replay.last_seq < snapshot_seq or any(
            m.header.session and m.header.session != session for m in replay.messages
        ):
            raise ControlError("the daemon restarted while the follower caught up")
        caught: list[Event] = [Invalid(error) for error in replay.invalid]
        snapshot: Snapshot | None = Snapshot(data, why, since, len(replay.messages), replay.complete)
        position = position.caught_up()  # a replay may start after a hole (the buffer dropped it): no topic gaps
        for message in (*replay.messages, None):
            if snapshot is not None and (message is None or message.header.seq > snapshot_seq):
                caught.append(snapshot)
                position = position.caught_up(last_seq=max(position.last_seq, snapshot_seq))
                snapshot = None
            if message is None or position.place(message.header) == Verdict.SEEN:
                continue
            position = position.after(message.header)
            caught.append(Received(message, "replay"))
        self.position = position.caught_up(last_seq=max(position.last_seq, replay.last_seq))
        self._due, self._synced_here = None, True
        self._heard(events, catching_up=True)
        events.extend(caught)
        events.append(Synced(session, self.position.last_seq))

    # silence

    def _heard(self, events: list[Event], catching_up: bool = False) -> None:
        self._last_heard = time.monotonic()
        if self.responding is not True:
            if self.responding is False and not catching_up and self._due is None and self.connected:
                self._due = "silence"  # messages may have been lost meanwhile: catch up
                self._next_sync = time.monotonic()
            self.responding = True
            events.append(Responding())

    def _watch_silence(self, events: list[Event]) -> None:
        now = time.monotonic()
        silent_ms = (now - self._last_heard) * 1000.0
        if silent_ms > self.silence_limit_ms and self.responding is not False:
            self.responding = False
            events.append(Silent(silent_ms))
        if self.responding is False and self.connected and now >= self._next_lookup:
            self._next_lookup = now + self.RETRY_S  # a daemon that restarted may listen elsewhere now
            found = self._lookup(events)
            if found is not None and found != self.endpoints:
                self._open(found, events)
