"""Where a follower of the daemon's messages stands, and what each message means for it: one definition for the
viewer and the recorder."""

from __future__ import annotations

from her2scope.clients.follower import FollowPosition, Verdict
from her2scope.daemon.protocol import Header, Topic


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
