"""Following the daemon, one definition for the viewer and the recorder: where a follower stands and what each
message means for it (pure), and the Follower itself on a real daemon process over loopback ZeroMQ: joining late,
losing messages, a daemon restart, silence. The tests wait for what the follower hands on, never for a fixed time."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from her2scope.clients.control import Subscriber, live_endpoints
from her2scope.clients.follower import (
    ORDERED_TOPICS,
    Connected,
    Event,
    Follower,
    FollowPosition,
    NotFound,
    Received,
    Responding,
    Resyncing,
    Silent,
    Snapshot,
    Synced,
    Verdict,
)
from her2scope.daemon.protocol import Header, Topic
from tests.helpers.daemon import DEADLINE_S, Daemon, next_message
from tests.helpers.recorder import Setup


def header(seq: int, topic_seq: int, topic: Topic = Topic.RESULT, session: str = "run-1") -> Header:
    return Header(topic=topic, seq=seq, topic_seq=topic_seq, session=session, time_ms=0.0)


def test_messages_in_order_are_applied_once() -> None:
    position = FollowPosition(session="run-1")
    first, second = header(5, 1), header(6, 2)
    assert position.place(first) == Verdict.APPLY
    position = position.after(first)
    assert (position.last_seq, dict(position.topic_seqs)) == (5, {"result": 1})
    assert position.place(first) == Verdict.SEEN
    assert position.place(second) == Verdict.APPLY
    assert position.after(second).place(header(7, 1, Topic.STATUS)) == Verdict.APPLY  # each topic counts alone


def test_a_lost_message_of_a_topic_is_a_gap_and_a_new_run_a_restart() -> None:
    position = FollowPosition(session="run-1").after(header(5, 1))
    assert position.place(header(9, 3)) == Verdict.GAP  # result 2 was lost
    assert position.place(header(9, 1, Topic.STATUS)) == Verdict.APPLY  # other topics' numbers are their own
    assert position.place(header(1, 1, session="run-2")) == Verdict.RESTARTED
    restarted = position.after(header(1, 1, session="run-2"))
    assert (restarted.session, restarted.last_seq, dict(restarted.topic_seqs)) == ("run-2", 1, {"result": 1})


def test_catching_up_counts_topics_afresh() -> None:
    position = FollowPosition(session="run-1").after(header(5, 1))
    caught = position.caught_up(last_seq=20)
    assert (caught.session, caught.last_seq, dict(caught.topic_seqs)) == ("run-1", 20, {})
    assert caught.place(header(21, 7)) == Verdict.APPLY  # no gap against numbers from before the catch-up
    assert caught.place(header(20, 6)) == Verdict.SEEN


# --- the Follower on a real daemon --------------------------------------------------------------------------------

HEARTBEAT_MS = 300.0  # tests/helpers/daemon.CONFIG


class Followed:
    """A follower driven by the test, with everything it handed on so far."""

    def __init__(self, follower: Follower) -> None:
        self.follower = follower
        self.events: list[Event] = []
        self._looked_at = 0  # the events before this one were looked at by an earlier ``until``

    def until(self, wanted: Callable[[Event], bool], what: str) -> Event:
        """The next event that is ``wanted`` after the one the last call returned, polling until it comes."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            for index in range(self._looked_at, len(self.events)):
                if wanted(self.events[index]):
                    self._looked_at = index + 1
                    return self.events[index]
            self._looked_at = len(self.events)
            if time.monotonic() > deadline:
                break
            self.events.extend(self.follower.poll(100))
        kinds = [type(event).__name__ for event in self.events]
        raise AssertionError(f"timed out waiting for {what}; what the follower handed on: {kinds}")

    def received(self) -> list[Received]:
        """The messages it handed on to apply, previews aside."""
        return [e for e in self.events if isinstance(e, Received) and e.message.header.topic != Topic.PREVIEW]


def follower_of(daemon: Daemon, **options: object) -> Follower:
    state = daemon.state
    return Follower(lambda: live_endpoints(state), heartbeat_ms=HEARTBEAT_MS, **options)  # type: ignore[arg-type]


def assert_each_once_in_order(received: list[Received]) -> None:
    """Every message handed on once, in sequence order, and of each topic none missing in between."""
    seqs = [(r.message.header.session, r.message.header.seq) for r in received]
    assert len(seqs) == len(set(seqs))
    for session in {s for s, _ in seqs}:
        numbers = [n for s, n in seqs if s == session]
        assert numbers == sorted(numbers)
        for topic in ORDERED_TOPICS:
            counts = [
                r.message.header.topic_seq
                for r in received
                if r.message.header.session == session and r.message.header.topic == topic
            ]
            assert counts == list(range(counts[0], counts[0] + len(counts))) if counts else True, (topic, counts)


def is_status(event: Event) -> bool:
    return isinstance(event, Received) and event.message.header.topic == Topic.STATUS


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    running = Setup(tmp_path_factory.mktemp("follower"))
    yield running
    running.close()


@pytest.mark.e2e
def test_a_late_joiner_starts_from_the_snapshot(setup: Setup) -> None:
    daemon = setup.daemon
    daemon.control.call("start-case", case_id="late-1")
    try:
        with follower_of(daemon) as fresh, follower_of(daemon, resume=lambda session: 0) as from_the_start:
            joined = Followed(fresh)
            snapshot = joined.until(lambda e: isinstance(e, Snapshot), "the snapshot")
            assert isinstance(snapshot, Snapshot) and isinstance(joined.events[0], Connected)
            assert snapshot.why == "start" and snapshot.session == daemon.control.call("snapshot")["session"]
            assert snapshot.data["case"]["case_id"] == "late-1" and snapshot.last_seq > 0
            assert snapshot.since_seq == snapshot.last_seq and not snapshot.replayed_before  # nothing before it
            joined.until(is_status, "a heartbeat after the snapshot")
            assert all(r.message.header.seq > snapshot.last_seq for r in joined.received())
            assert fresh.responding and fresh.position.session == snapshot.session

            replayed = Followed(from_the_start)  # a follower that resumes from 0 gets the buffered past first
            snapshot = replayed.until(lambda e: isinstance(e, Snapshot), "the snapshot")
            assert isinstance(snapshot, Snapshot) and snapshot.since_seq == 0 and snapshot.replayed_before
            before = replayed.events[: replayed.events.index(snapshot)]
            past = [e for e in before if isinstance(e, Received)]
            assert past and all(e.source == "replay" and e.message.header.seq <= snapshot.last_seq for e in past)
            assert any(e.message.header.topic == Topic.CASE and e.message.header.case_id == "late-1" for e in past)
            replayed.until(is_status, "a heartbeat after the snapshot")
            assert_each_once_in_order(replayed.received())
    finally:
        daemon.control.call("close-case")


def lose_messages(follower: Follower, daemon: Daemon, heartbeats: int) -> None:
    """What a reconnect does: the follower's subscription is closed while the daemon publishes ``heartbeats`` status
    messages (they are lost to it: nothing was there to queue them), then opened again."""
    lost = follower._ordered
    assert lost is not None and follower.endpoints is not None
    follower._poller.unregister(lost.socket)
    lost.close()
    with daemon.subscribe() as watcher:
        for _ in range(heartbeats):
            next_message(watcher, lambda m: m.header.topic == Topic.STATUS, "a heartbeat")
    again = Subscriber(follower.endpoints["publish"], [t.value for t in ORDERED_TOPICS])
    follower._ordered = again
    follower._poller.register(again.socket, zmq.POLLIN)


@pytest.mark.e2e
def test_a_follower_that_lost_messages_catches_up_by_replay_and_applies_each_once(setup: Setup) -> None:
    daemon = setup.daemon
    with follower_of(daemon) as follower:
        followed = Followed(follower)
        followed.until(is_status, "a heartbeat")
        before = follower.position.last_seq
        lose_messages(follower, daemon, 2)
        gap = followed.until(lambda e: isinstance(e, Resyncing), "the gap")
        assert gap == Resyncing("gap", Topic.STATUS.value)
        snapshot = followed.until(lambda e: isinstance(e, Snapshot), "the catch-up")
        assert isinstance(snapshot, Snapshot) and snapshot.why == "gap" and snapshot.complete
        assert snapshot.since_seq == before and snapshot.replayed_before
        followed.until(lambda e: isinstance(e, Synced), "the end of the catch-up")
        followed.until(is_status, "a heartbeat after it")
    received = followed.received()
    replayed = [r for r in received if r.source == "replay"]
    assert len([r for r in replayed if r.message.header.topic == Topic.STATUS]) >= 2  # the lost ones, and more
    assert_each_once_in_order(received)


@pytest.mark.e2e
def test_silence_is_reported_after_the_limit_and_the_follower_catches_up_when_heard_again(setup: Setup) -> None:
    daemon = setup.daemon
    with follower_of(daemon) as follower:
        followed = Followed(follower)
        followed.until(is_status, "a heartbeat")
        assert follower.silence_limit_ms == 2000.0  # three heartbeats, at least 2 s: protocol.silence_limit_ms
        daemon.process.send_signal(signal.SIGSTOP)  # alive (its pid and ports stay), but it says nothing
        try:
            stopped_at = time.monotonic()
            silent = followed.until(lambda e: isinstance(e, Silent), "the silence")
            assert time.monotonic() - stopped_at >= 2.0
            assert isinstance(silent, Silent) and silent.silent_ms > follower.silence_limit_ms
            assert follower.responding is False
            n_silent = len(followed.events)
        finally:
            daemon.process.send_signal(signal.SIGCONT)
        followed.until(lambda e: isinstance(e, Responding), "the daemon heard again")
        snapshot = followed.until(lambda e: isinstance(e, Snapshot), "the catch-up after the silence")
        assert isinstance(snapshot, Snapshot) and snapshot.why == "silence" and snapshot.replayed_before
        assert not any(isinstance(e, Connected) for e in followed.events[n_silent:])  # the same sockets
        followed.until(is_status, "a heartbeat after it")
        assert follower.responding is True
    assert_each_once_in_order(followed.received())


@pytest.mark.e2e
def test_a_restarted_daemon_gives_a_fresh_snapshot(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    try:
        daemon = setup.daemon
        with follower_of(daemon) as follower:
            followed = Followed(follower)
            first = followed.until(lambda e: isinstance(e, Snapshot), "the first snapshot")
            assert isinstance(first, Snapshot)
            followed.until(is_status, "a heartbeat")
            assert daemon.stop() == 0
            followed.until(lambda e: isinstance(e, Silent), "the silence")
            followed.until(lambda e: isinstance(e, NotFound), "the endpoints of a dead daemon refused")
            restarted = setup.start_daemon()  # on the state folder, on new random ports
            connected = followed.until(lambda e: isinstance(e, Connected), "the new endpoints")
            assert isinstance(connected, Connected) and connected.endpoints["control"] == restarted.endpoints["control"]
            fresh = followed.until(lambda e: isinstance(e, Snapshot), "a snapshot of the restarted daemon")
            assert isinstance(fresh, Snapshot) and fresh.session != first.session
            assert fresh.session == restarted.control.call("snapshot")["session"]
            followed.until(is_status, "a heartbeat of the restarted daemon")
            assert follower.responding is True and follower.position.session == fresh.session
        after = followed.events[followed.events.index(fresh) :]
        assert all(e.message.header.session == fresh.session for e in after if isinstance(e, Received))
        assert_each_once_in_order(followed.received())
    finally:
        setup.close()
