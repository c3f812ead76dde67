"""The PUB side: sequence numbers, a replay buffer for late joiners, and the last value of every topic.

After zguide chapter 5 (Clone): a subscriber that joins late, or notices a gap in ``seq`` (or ``topic_seq`` for
the topics it follows), or a new ``session``, asks the control endpoint for a snapshot (the case, the status) and
for the messages it missed (``replay``), which this buffer keeps (previews excepted: they are stale by the time
anyone would replay them). ``last(topic)`` is a last-value cache of every topic.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq

from her2scope.daemon.protocol import Payload, Topic, _Model, encode

#: Previews are never buffered: a late joiner wants the next frame, not old ones.
_UNBUFFERED = frozenset({Topic.PREVIEW})


class Publisher:
    """Publishes protocol messages on a bound PUB socket."""

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        replay_buffer: int,
        clock_ms: Callable[[], float] | None = None,
        *,
        replay_bytes: int = 64 * 2**20,
    ) -> None:
        self._socket = socket
        self._buffer: deque[tuple[int, list[bytes]]] = deque()
        self._max_messages = replay_buffer
        # overlays weigh about 0.5 MB each: a day of captures must not grow the daemon without bound
        self._max_bytes = replay_bytes
        self._bytes = 0
        self._last: dict[Topic, list[bytes]] = {}
        self._seq = 0
        self._topic_seq: dict[Topic, int] = dict.fromkeys(Topic, 0)
        self.session = secrets.token_hex(8)  # new every run: subscribers tell a restart from a gap
        self._evicted_up_to = 0  # highest sequence number that has left the replay buffer
        self._clock_ms = clock_ms or (lambda: time.time() * 1000.0)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held by the replay buffer."""
        return self._bytes

    @property
    def last_seq(self) -> int:
        """Sequence number of the last message published (0 before the first)."""
        return self._seq

    def publish(
        self,
        topic: Topic,
        body: _Model,
        payloads: Sequence[tuple[Payload, bytes]] = (),
        case_id: str | None = None,
    ) -> int:
        """Send one message; return its sequence number. Never blocks: a slow subscriber loses messages at its
        high-water mark and recovers them by ``replay``."""
        self._seq += 1
        self._topic_seq[topic] += 1
        frames = encode(
            topic,
            self._seq,
            self._clock_ms(),
            body,
            payloads,
            case_id,
            topic_seq=self._topic_seq[topic],
            session=self.session,
        )
        self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        if topic not in _UNBUFFERED:
            self._buffer.append((self._seq, frames))
            self._bytes += sum(len(frame) for frame in frames)
            while len(self._buffer) > 1 and (len(self._buffer) > self._max_messages or self._bytes > self._max_bytes):
                evicted, old = self._buffer.popleft()
                self._bytes -= sum(len(frame) for frame in old)
                self._evicted_up_to = evicted
        self._last[topic] = frames
        return self._seq

    def since(self, seq: int) -> tuple[list[list[bytes]], bool]:
        """Buffered messages after ``seq`` (oldest first), and whether that is all of them (False when some have
        already left the buffer: the caller should take a snapshot instead)."""
        messages = [frames for s, frames in self._buffer if s > seq]
        return messages, seq >= self._evicted_up_to

    def last(self, topic: Topic) -> list[bytes] | None:
        """The last message published on ``topic`` (last-value cache), or None."""
        return self._last.get(topic)
