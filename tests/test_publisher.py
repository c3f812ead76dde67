"""The publisher on a real PUB socket: sequence numbers, the replay buffer, the last-value cache, never blocking."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from her2scope.daemon.protocol import CaptureBody, Message, OverlayBody, Payload, PreviewBody, StatusBody, Topic, decode
from her2scope.daemon.publisher import Publisher

RECEIVE_TIMEOUT_MS = 2000
JOIN_DEADLINE_S = 5.0


def _status(n_fovs: int = 0) -> StatusBody:
    return StatusBody(
        daemon="running",
        camera={"state": "live"},
        stability="stable",
        auto_capture=False,
        case_id=None,
        n_fovs=n_fovs,
        control_calibrated=False,
        worker="idle",
        queue=0,
        uptime_s=1.0,
    )


def _capture(index: int) -> CaptureBody:
    return CaptureBody(fov_id=f"fov-{index:03d}", kind="fov", trigger="auto", frame_index=index, pixel_size_um=0.25)


def _preview(index: int) -> PreviewBody:
    return PreviewBody(frame_index=index, width=4, height=3, stability="moving", motion_um=3.0, focus_ratio=1.0)


JPEG = (Payload(name="preview", encoding="jpeg"), b"\xff\xd8fake\xff\xd9")


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()  # hangs if a test left a socket open with linger: the fixtures close every one with linger=0


@pytest.fixture
def pub(context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[tuple[zmq.Socket[bytes], int]]:
    socket = context.socket(zmq.PUB)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, port
    socket.close(linger=0)


@pytest.fixture
def sub(context: zmq.Context[zmq.Socket[bytes]], pub: tuple[zmq.Socket[bytes], int]) -> Iterator[zmq.Socket[bytes]]:
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(f"tcp://127.0.0.1:{pub[1]}")
    yield socket
    socket.close(linger=0)


def _receive(socket: zmq.Socket[bytes], timeout_ms: int = RECEIVE_TIMEOUT_MS) -> list[bytes]:
    if not socket.poll(timeout_ms, zmq.POLLIN):
        raise AssertionError(f"no message within {timeout_ms} ms")
    return socket.recv_multipart()


def _join(publisher: Publisher, sub: zmq.Socket[bytes]) -> Message:
    """Publish status messages until the subscriber gets one (the slow joiner); return the first it got."""
    deadline = time.monotonic() + JOIN_DEADLINE_S
    while time.monotonic() < deadline:
        publisher.publish(Topic.STATUS, _status())
        if sub.poll(20, zmq.POLLIN):
            return decode(sub.recv_multipart())
    raise AssertionError(f"the subscriber received nothing within {JOIN_DEADLINE_S} s")


def _drain(sub: zmq.Socket[bytes], up_to_seq: int) -> list[Message]:
    """Receive until the message numbered ``up_to_seq``."""
    messages = [decode(_receive(sub))]
    while messages[-1].header.seq < up_to_seq:
        messages.append(decode(_receive(sub)))
    return messages


def test_sequence_numbers_and_frames_on_the_wire(pub: tuple[zmq.Socket[bytes], int], sub: zmq.Socket[bytes]) -> None:
    clock = iter(range(1000, 100_000))
    publisher = Publisher(pub[0], replay_buffer=50, clock_ms=lambda: float(next(clock)))
    assert publisher.last_seq == 0
    first = _join(publisher, sub)
    assert first.header.topic is Topic.STATUS
    joined = publisher.last_seq
    assert 1 <= first.header.seq <= joined

    seqs = [
        publisher.publish(Topic.CAPTURE, _capture(1), case_id="case-7"),
        publisher.publish(Topic.PREVIEW, _preview(2), [JPEG]),
        publisher.publish(Topic.STATUS, _status(n_fovs=1)),
    ]
    assert seqs == [joined + 1, joined + 2, joined + 3]
    assert publisher.last_seq == joined + 3

    received = [m for m in _drain(sub, joined + 3) if m.header.seq > joined]
    assert [m.header.seq for m in received] == seqs
    capture, preview, status = received
    assert capture.header.topic is Topic.CAPTURE
    assert capture.body == _capture(1)
    assert capture.header.case_id == "case-7"
    assert preview.body == _preview(2)
    assert preview.payload("preview") == JPEG[1]
    assert status.body == _status(n_fovs=1)
    # the injected clock stamps each message once, in order
    times = [m.header.time_ms for m in received]
    assert times == sorted(times) and len(set(times)) == 3


def test_the_sequence_numbers_a_subscriber_sees_have_no_gaps(
    pub: tuple[zmq.Socket[bytes], int], sub: zmq.Socket[bytes]
) -> None:
    publisher = Publisher(pub[0], replay_buffer=10)
    first = _join(publisher, sub).header.seq
    last = 0
    for index in range(100):
        publisher.publish(Topic.CAPTURE, _capture(index))
        last = publisher.publish(Topic.PREVIEW, _preview(index), [JPEG])
    seqs = [m.header.seq for m in _drain(sub, last)]
    assert seqs == list(range(first + 1, last + 1))  # including the status messages sent while joining


def test_since_returns_buffered_messages_after_seq_oldest_first(pub: tuple[zmq.Socket[bytes], int]) -> None:
    publisher = Publisher(pub[0], replay_buffer=10)
    assert publisher.since(0) == ([], True)
    c1 = publisher.publish(Topic.CAPTURE, _capture(1))
    p2 = publisher.publish(Topic.PREVIEW, _preview(2), [JPEG])
    s3 = publisher.publish(Topic.STATUS, _status())
    c4 = publisher.publish(Topic.CAPTURE, _capture(4))
    assert (c1, p2, s3, c4) == (1, 2, 3, 4)

    messages, complete = publisher.since(0)
    assert complete is True
    decoded = [decode(frames) for frames in messages]
    assert [m.header.seq for m in decoded] == [1, 3, 4]  # the preview (2) is not buffered
    assert [m.header.topic for m in decoded] == [Topic.CAPTURE, Topic.STATUS, Topic.CAPTURE]
    assert decoded[2].body == _capture(4)

    messages, complete = publisher.since(1)
    assert [decode(f).header.seq for f in messages] == [3, 4]
    assert complete is True
    assert publisher.since(4) == ([], True)
    assert publisher.since(99) == ([], True)


def test_previews_are_never_buffered(pub: tuple[zmq.Socket[bytes], int]) -> None:
    publisher = Publisher(pub[0], replay_buffer=3)
    publisher.publish(Topic.CAPTURE, _capture(1))
    for index in range(20):
        publisher.publish(Topic.PREVIEW, _preview(index), [JPEG])
    messages, complete = publisher.since(0)
    assert [decode(f).header.seq for f in messages] == [1]
    assert complete is True  # previews do not push the capture out of the buffer
    assert publisher.last_seq == 21


def test_overflowing_the_buffer_makes_old_requests_incomplete(pub: tuple[zmq.Socket[bytes], int]) -> None:
    publisher = Publisher(pub[0], replay_buffer=3)
    for index in range(1, 8):
        publisher.publish(Topic.CAPTURE, _capture(index))
    last = publisher.last_seq
    assert last == 7

    messages, complete = publisher.since(0)
    assert complete is False
    assert [decode(f).header.seq for f in messages] == [5, 6, 7]  # what is left, still oldest first

    messages, complete = publisher.since(last - 1)
    assert complete is True
    assert [decode(f).header.seq for f in messages] == [7]

    # the boundary: 4 is the newest evicted, so after 4 everything is there; after 3, message 4 is lost
    assert publisher.since(4)[1] is True
    assert [decode(f).header.seq for f in publisher.since(4)[0]] == [5, 6, 7]
    assert publisher.since(3)[1] is False


def test_overflow_counts_only_buffered_topics(pub: tuple[zmq.Socket[bytes], int]) -> None:
    """Previews between buffered messages take sequence numbers but never count as evicted."""
    publisher = Publisher(pub[0], replay_buffer=2)
    publisher.publish(Topic.CAPTURE, _capture(1))  # 1
    publisher.publish(Topic.PREVIEW, _preview(2), [JPEG])  # 2
    publisher.publish(Topic.CAPTURE, _capture(3))  # 3
    publisher.publish(Topic.PREVIEW, _preview(4), [JPEG])  # 4
    publisher.publish(Topic.CAPTURE, _capture(5))  # 5: evicts 1
    assert [decode(f).header.seq for f in publisher.since(0)[0]] == [3, 5]
    assert publisher.since(0)[1] is False
    assert publisher.since(1)[1] is True
    assert publisher.since(2)[1] is True  # 2 was a preview: nothing after 2 is missing


def test_last_is_the_last_message_of_each_topic(pub: tuple[zmq.Socket[bytes], int]) -> None:
    publisher = Publisher(pub[0], replay_buffer=2)
    assert publisher.last(Topic.CAPTURE) is None
    publisher.publish(Topic.CAPTURE, _capture(1))
    publisher.publish(Topic.STATUS, _status(n_fovs=1))
    publisher.publish(Topic.CAPTURE, _capture(2), case_id="c")
    publisher.publish(Topic.PREVIEW, _preview(9), [JPEG])
    for _ in range(5):  # pushes both captures out of the replay buffer; the last-value cache keeps its own
        publisher.publish(Topic.STATUS, _status(n_fovs=2))

    capture = publisher.last(Topic.CAPTURE)
    assert capture is not None
    assert decode(capture).body == _capture(2)
    assert decode(capture).header.seq == 3
    assert decode(capture).header.case_id == "c"
    preview = publisher.last(Topic.PREVIEW)
    assert preview is not None
    assert decode(preview).header.seq == 4  # previews are cached as last values, just not buffered
    status = publisher.last(Topic.STATUS)
    assert status is not None
    assert decode(status).header.seq == 9
    assert publisher.last(Topic.RESULT) is None
    assert publisher.last(Topic.OVERLAY) is None


def test_publishing_never_blocks_without_a_subscriber(pub: tuple[zmq.Socket[bytes], int]) -> None:
    publisher = Publisher(pub[0], replay_buffer=100)
    start = time.perf_counter()
    for index in range(10_000):
        publisher.publish(Topic.PREVIEW, _preview(index), [JPEG])
    elapsed = time.perf_counter() - start
    assert publisher.last_seq == 10_000
    assert elapsed < 5.0, f"10,000 publishes took {elapsed:.1f} s"


def test_publishing_never_blocks_on_a_subscriber_that_does_not_read(
    pub: tuple[zmq.Socket[bytes], int], sub: zmq.Socket[bytes]
) -> None:
    """A stalled subscriber past its high-water mark loses messages; the publisher goes on."""
    pub[0].setsockopt(zmq.SNDHWM, 10)
    publisher = Publisher(pub[0], replay_buffer=100)
    _join(publisher, sub)
    start = time.perf_counter()
    big = (Payload(name="preview", encoding="jpeg"), bytes(100_000))
    for index in range(3_000):
        publisher.publish(Topic.PREVIEW, _preview(index), [big])
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"3,000 publishes to a stalled subscriber took {elapsed:.1f} s"


def test_the_buffer_is_bounded_in_bytes_too(pub: tuple[zmq.Socket[bytes], int]) -> None:
    layers = [(Payload(name="cells", encoding="png"), bytes(300_000))]  # an overlay-sized message
    publisher = Publisher(pub[0], replay_buffer=1000, replay_bytes=1_000_000)
    for index in range(10):
        publisher.publish(
            Topic.OVERLAY,
            OverlayBody(fov_id=f"fov-{index:03d}", kind="fov", layers=("cells",), width=960, height=540),
            layers,
        )
    assert publisher.buffered_bytes <= 1_000_000
    messages, complete = publisher.since(0)
    assert complete is False and 1 <= len(messages) <= 3
    assert decode(messages[-1]).header.seq == publisher.last_seq  # the newest is always kept
