"""Following the daemon's published messages in order, for every client (the viewer and the recorder): where a
follower stands, and what a new message means for it (zguide "Clone": sequence numbers, gaps, restarts).

Every message carries the daemon run's ``session``, its ``seq`` (+1 per message) and its ``topic_seq`` (+1 per
message of its topic, so that a subscriber to some topics only sees its own gaps). A follower applies a message
once, in order; a ``topic_seq`` that jumps means messages were lost (a full socket queue, a reconnect) and the
follower must catch up (``replay`` since its ``last_seq``, or a ``snapshot``); a new ``session`` means the daemon
restarted and its numbers start again. How long without a heartbeat makes the daemon silent is
:func:`her2scope.daemon.protocol.silence_limit_ms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from her2scope.daemon.protocol import Header


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
