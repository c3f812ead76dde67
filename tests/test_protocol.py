"""The wire protocol: round trips for every topic, and every malformed message or request refused by name."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from her2scope.daemon.protocol import (
    PROTOCOL_VERSION,
    CaptureBody,
    CaseBody,
    CaseSummary,
    Command,
    Header,
    OverlayBody,
    Payload,
    PreviewBody,
    ProtocolError,
    ResultBody,
    StatusBody,
    Topic,
    _Model,
    decode,
    encode,
    parse_request,
)

BODIES: dict[Topic, _Model] = {
    Topic.PREVIEW: PreviewBody(
        frame_index=41, width=960, height=540, stability="stable", motion_um=0.5, focus_ratio=0.97
    ),
    Topic.CAPTURE: CaptureBody(fov_id="fov-003", kind="fov", trigger="pedal", frame_index=41, pixel_size_um=0.25),
    Topic.RESULT: ResultBody(
        fov_id="control-001",
        kind="control",
        status="failed",
        error="ValueError: too small",
        case=CaseSummary(case_id="c1", open=True),
        score_ms=12.5,
        latency_ms=80.25,
    ),
    Topic.OVERLAY: OverlayBody(fov_id="fov-003", kind="fov", layers=("cells", "panel"), width=960, height=540),
    Topic.STATUS: StatusBody(
        daemon="running",
        camera={"state": "live", "fps": 29.5},
        stability="moving",
        auto_capture=True,
        case_id=None,
        n_fovs=0,
        control_calibrated=False,
        worker="idle",
        queue=0,
        uptime_s=3.5,
    ),
    Topic.CASE: CaseBody(
        event="closed",
        case=CaseSummary(case_id="c1", open=False),
        params={"weak_threshold_od": 0.1},
        rule={"cutoff_percent": 10.0},
        pixel_size_um=0.25,
        software={"name": "her2scope", "version": "0.1.0"},
    ),
}

PAYLOADS: dict[Topic, list[tuple[Payload, bytes]]] = {
    Topic.PREVIEW: [(Payload(name="preview", encoding="jpeg"), b"\xff\xd8jpeg-bytes\xff\xd9")],
    Topic.CAPTURE: [],
    Topic.RESULT: [(Payload(name="fov", encoding="raw", dtype="uint8", shape=(2, 3)), bytes(range(6)))],
    Topic.OVERLAY: [
        (Payload(name="cells", encoding="png"), b"\x89PNG cells"),
        (Payload(name="panel", encoding="png"), b"\x89PNG panel"),
    ],
    Topic.STATUS: [],
    Topic.CASE: [],
}


def _valid(topic: Topic = Topic.CAPTURE) -> list[bytes]:
    return encode(topic, 7, 1_700_000_000_123.5, BODIES[topic], PAYLOADS[topic], case_id="case-1")


def _header(frames: list[bytes]) -> dict[str, Any]:
    document = json.loads(frames[1])
    assert isinstance(document, dict)
    return document


def _with_header(frames: list[bytes], **changes: Any) -> list[bytes]:
    header = _header(frames)
    header.update(changes)
    return [frames[0], json.dumps(header).encode(), *frames[2:]]


def _refused(frames: list[bytes]) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    return str(info.value)


@pytest.mark.parametrize("topic", list(Topic))
def test_round_trip_every_topic(topic: Topic) -> None:
    frames = _valid(topic)
    assert frames[0] == topic.value.encode()
    assert len(frames) == 2 + len(PAYLOADS[topic])

    message = decode(frames)

    assert message.header.v == PROTOCOL_VERSION == 1
    assert message.header.topic is topic
    assert message.header.seq == 7
    assert message.header.time_ms == 1_700_000_000_123.5
    assert message.header.case_id == "case-1"
    assert message.body == BODIES[topic]
    assert type(message.body) is type(BODIES[topic])
    assert message.header.payloads == tuple(p for p, _ in PAYLOADS[topic])
    assert message.payloads == tuple(data for _, data in PAYLOADS[topic])


def test_decode_accepts_memoryview_like_frames() -> None:
    """Frames received with copy=False are zmq.Frame/memoryview-like; decode takes anything bytes() takes."""
    frames = _valid(Topic.OVERLAY)
    message = decode([memoryview(f) for f in frames])  # type: ignore[misc]
    assert message.payloads == (b"\x89PNG cells", b"\x89PNG panel")
    assert all(type(p) is bytes for p in message.payloads)


def test_payload_by_name() -> None:
    message = decode(_valid(Topic.OVERLAY))
    assert message.payload("panel") == b"\x89PNG panel"
    assert message.payload("cells") == b"\x89PNG cells"
    with pytest.raises(KeyError, match="intensity"):
        message.payload("intensity")


def test_raw_payload_rebuilds_the_array() -> None:
    message = decode(_valid(Topic.RESULT))
    description = message.header.payloads[0]
    assert description.dtype is not None and description.shape is not None
    array = np.frombuffer(message.payload("fov"), dtype=description.dtype).reshape(description.shape)
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.uint8).reshape(2, 3))


@pytest.mark.parametrize("count", [0, 1])
def test_decode_rejects_fewer_than_two_frames(count: int) -> None:
    message = _refused(_valid()[:count])
    assert message == f"a message has at least 2 frames (topic, header), got {count}"


@pytest.mark.parametrize("topic_frame", [b"results", b"", b"\xff\xfe", b"PREVIEW"])
def test_decode_rejects_unknown_topic(topic_frame: bytes) -> None:
    frames = _valid()
    message = _refused([topic_frame, *frames[1:]])
    assert message.startswith("unknown topic ")
    assert repr(topic_frame) in message


@pytest.mark.parametrize("header", [b"", b"not json", b'{"v": 1', b"\xff\x00", b"[]", b"42"])
def test_decode_rejects_a_header_that_is_not_a_json_object(header: bytes) -> None:
    message = _refused([b"capture", header])
    assert message.startswith("invalid capture header: ")


def test_decode_rejects_another_protocol_version() -> None:
    message = _refused(_with_header(_valid(), v=2))
    assert message.startswith("invalid capture header: v: ")
    assert "(got 2)" in message


def test_decode_rejects_an_unknown_header_field() -> None:
    message = _refused(_with_header(_valid(), colour="blue"))
    assert message.startswith("invalid capture header: colour: Extra inputs are not permitted")


def test_decode_rejects_a_body_missing_a_field() -> None:
    frames = _valid()
    body = _header(frames)["body"]
    del body["pixel_size_um"]
    message = _refused(_with_header(frames, body=body))
    assert message.startswith("invalid capture body: pixel_size_um: Field required")


def test_decode_rejects_a_body_with_an_extra_field() -> None:
    frames = _valid()
    body = _header(frames)["body"] | {"magnification": 40}
    message = _refused(_with_header(frames, body=body))
    assert message.startswith("invalid capture body: magnification: Extra inputs are not permitted")


def test_decode_rejects_a_body_with_a_wrong_value() -> None:
    frames = _valid()
    body = _header(frames)["body"] | {"kind": "tissue"}
    message = _refused(_with_header(frames, body=body))
    assert message.startswith("invalid capture body: kind: ")
    assert "'tissue'" in message


def test_decode_rejects_a_topic_frame_that_is_not_the_header_topic() -> None:
    frames = _valid(Topic.CAPTURE)
    message = _refused([b"status", *frames[1:]])
    assert message == "topic frame 'status' does not match header topic 'capture'"


@pytest.mark.parametrize(("topic", "extra"), [(Topic.OVERLAY, -1), (Topic.OVERLAY, 1), (Topic.CAPTURE, 1)])
def test_decode_rejects_a_payload_count_mismatch(topic: Topic, extra: int) -> None:
    frames = _valid(topic)
    frames = frames[:extra] if extra < 0 else [*frames, b"stray"]
    declared = len(PAYLOADS[topic])
    message = _refused(frames)
    assert message == f"header declares {declared} payloads, message has {declared + extra}"


@pytest.mark.parametrize(
    ("topic", "body"),
    [(Topic.RESULT, BODIES[Topic.CAPTURE]), (Topic.PREVIEW, BODIES[Topic.STATUS]), (Topic.STATUS, Header)],
)
def test_encode_refuses_the_body_of_another_topic(topic: Topic, body: Any) -> None:
    with pytest.raises(TypeError, match=f"a {topic.value} message needs a "):
        encode(topic, 1, 0.0, body)


def test_encode_refuses_a_negative_sequence_number() -> None:
    with pytest.raises(ValueError, match="seq"):
        encode(Topic.CAPTURE, -1, 0.0, BODIES[Topic.CAPTURE])


# --- requests -------------------------------------------------------------------------------------------------


def test_parse_request_valid() -> None:
    request = parse_request(b'{"v": 1, "id": "r-9", "command": "set-roi", "args": {"fov_id": "fov-002"}}')
    assert request.command is Command.SET_ROI
    assert request.id == "r-9"
    assert request.args == {"fov_id": "fov-002"}
    assert request.v == 1


def test_parse_request_defaults() -> None:
    request = parse_request(b'{"command": "status"}')
    assert (request.command, request.id, request.args, request.v) == (Command.STATUS, "", {}, 1)


@pytest.mark.parametrize("frame", [b"", b"status", b"{'command': 'status'}", b"\xff\xfe"])
def test_parse_request_rejects_non_json(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match=r"^request is not JSON: "):
        parse_request(frame)


@pytest.mark.parametrize("frame", [b'["status"]', b'"status"', b"null", b"3"])
def test_parse_request_rejects_json_that_is_not_an_object(frame: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(frame)
    assert str(info.value) == "request must be a JSON object with 'command' and 'args'"


def test_parse_request_rejects_an_unknown_command() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"command": "launch"}')
    assert str(info.value).startswith("invalid request: command: Input should be 'capture'")
    assert str(info.value).endswith("(got 'launch')")


def test_parse_request_rejects_an_extra_top_level_field() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"command": "status", "fov_id": "fov-001"}')
    assert str(info.value) == "invalid request: fov_id: Extra inputs are not permitted (got 'fov-001')"


@pytest.mark.parametrize(
    ("frame", "where"),
    [
        (b'{"command": "status", "v": 2}', "v"),
        (b'{"command": "status", "args": []}', "args"),
        (b'{"args": {}}', "command"),
        (b'{"command": "status", "id": "' + b"x" * 201 + b'"}', "id"),
    ],
)
def test_parse_request_rejects_invalid_fields(frame: bytes, where: str) -> None:
    with pytest.raises(ProtocolError, match=f"^invalid request: {where}: "):
        parse_request(frame)


# --- fuzz -----------------------------------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [None, -1, 2, 1e308, "", "x" * 300, [], {}, [1, "a"], {"name": 3}, True, "status"]


def _mutations(rng: np.random.Generator, valid: list[bytes]) -> list[bytes]:
    """One randomly damaged copy of ``valid``."""
    frames = list(valid)
    kind = int(rng.integers(6))
    if kind == 0:  # random byte strings
        return [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(0, 5)))]
    if kind == 1:  # flip bytes of the header
        header = bytearray(frames[1])
        for position in rng.integers(0, len(header), size=int(rng.integers(1, 6))):
            header[position] = int(rng.integers(256))
        frames[1] = bytes(header)
    elif kind == 2:  # truncate the header
        frames[1] = frames[1][: int(rng.integers(len(frames[1])))]
    elif kind == 3:  # an odd value in the header or the body
        document = _header(frames)
        target = document["body"] if rng.random() < 0.5 and document["body"] else document
        key = list(target)[int(rng.integers(len(target)))]
        target[key] = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
        frames[1] = json.dumps(document).encode()
    elif kind == 4:  # drop, duplicate or reorder frames
        order = rng.integers(0, len(frames), size=int(rng.integers(0, len(frames) + 2)))
        frames = [frames[i] for i in order]
    else:  # another topic frame
        frames[0] = [t.value.encode() for t in Topic][int(rng.integers(len(Topic)))] + rng.bytes(
            int(rng.integers(0, 2))
        )
    return frames


def test_decode_only_ever_raises_protocol_error() -> None:
    rng = np.random.default_rng(0)
    valids = [_valid(topic) for topic in Topic]
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(600):
        frames = _mutations(rng, valids[int(rng.integers(len(valids)))])
        try:
            message = decode(frames)
        except ProtocolError as error:
            assert str(error), "a ProtocolError must say what is wrong"
            outcomes["refused"] += 1
        else:  # whatever decodes is self-consistent
            assert message.header.topic.value.encode() == bytes(frames[0])
            assert len(message.payloads) == len(message.header.payloads) == len(frames) - 2
            outcomes["decoded"] += 1
    # the fuzzing did exercise both paths (mostly refusals)
    assert outcomes["refused"] > 300
    assert outcomes["decoded"] > 10


def test_parse_request_only_ever_raises_protocol_error() -> None:
    rng = np.random.default_rng(0)
    valid = b'{"v": 1, "id": "r-1", "command": "exclude", "args": {"fov_id": "fov-001"}}'
    refused = 0
    for _ in range(300):
        frame = bytearray(valid)
        for position in rng.integers(0, len(frame), size=int(rng.integers(1, 4))):
            frame[position] = int(rng.integers(256))
        try:
            parse_request(bytes(frame))
        except ProtocolError:
            refused += 1
    assert refused > 250
