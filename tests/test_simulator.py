"""Tests of the simulated microscope (daemon.simulator), driven by a fake clock: no real sleeping."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from her2scope.config.daemon import SimulatedCameraConfig, SimulatedFaults
from her2scope.daemon.frames import Frame, FrameSource, SourceError
from her2scope.daemon.simulator import SimulatedMicroscope, StageState, StageStatus
from her2scope.scoring import score_fov

pytestmark = pytest.mark.e2e  # each test renders a virtual slide for the simulated microscope (about a second)

PIXEL_SIZE = 0.5
FPS = 30.0
MIX = {"0": 0.3, "1+": 0.3, "2+": 0.3, "3+": 0.1}


class FakeClock:
    """A monotonic clock that only moves when told to (or when someone sleeps on it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0.0
        self.now += seconds
        self.slept += seconds


def small_config(**changes: object) -> SimulatedCameraConfig:
    base: dict[str, object] = {
        "width": 480,
        "height": 270,
        "fps": FPS,
        "slide_fields": (2, 2),
        "class_fractions": MIX,
        "pan_ms": 300.0,
        "dwell_ms": 500.0,
        "script": ("control", "fields 3"),
        "seed": 3,
    }
    base.update(changes)
    return SimulatedCameraConfig.model_validate(base)


def microscope(
    config: SimulatedCameraConfig | None = None, pixel_size: float = PIXEL_SIZE
) -> tuple[SimulatedMicroscope, FakeClock]:
    clock = FakeClock()
    scope = SimulatedMicroscope(config or small_config(), pixel_size, clock=clock, sleep=clock.sleep)
    return scope, clock


def frames(scope: SimulatedMicroscope, n: int) -> Iterator[tuple[Frame, StageStatus]]:
    """``n`` frames with the stage status at each, failing loudly if a read times out."""
    for _ in range(n):
        frame = scope.read(1000.0)
        assert frame is not None, "no frame within 1 s of fake time"
        yield frame, scope.status()


def read_until(
    scope: SimulatedMicroscope, predicate: Callable[[StageStatus], bool], max_frames: int = 2000
) -> tuple[Frame, StageStatus]:
    """Read frames until the stage status satisfies ``predicate``; raise instead of looping forever."""
    for frame, status in frames(scope, max_frames):
        if predicate(status):
            return frame, status
    raise AssertionError(f"stage never reached the expected state in {max_frames} frames")


def gray(image: NDArray[np.uint8]) -> NDArray[np.float64]:
    return np.asarray(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), dtype=np.float64)


def sharpness(image: NDArray[np.uint8]) -> float:
    return float(cv2.Laplacian(gray(image), cv2.CV_64F).var())


def mean_abs_diff(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


# ------------------------------------------------------------------------------------------------ frames


def test_is_a_frame_source_of_read_only_bgr_frames() -> None:
    scope, clock = microscope()
    assert isinstance(scope, FrameSource)
    assert scope.name == "simulated"
    scope.open()
    start = clock.now
    got = [frame for frame, _ in frames(scope, 12)]
    for frame in got:
        assert frame.image.shape == (270, 480, 3)
        assert frame.image.dtype == np.uint8
        assert not frame.image.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            frame.image[0, 0, 0] = 0
    assert [f.index for f in got] == list(range(12))
    assert np.allclose(np.diff([f.timestamp_ms for f in got]), 1000.0 / FPS)
    assert got[0].timestamp_ms == pytest.approx(start * 1000.0)
    assert clock.now == pytest.approx(start + 11 / FPS)  # paced by sleeping on the clock, frame by frame
    # BGR: haematoxylin absorbs red most, so in the dark nuclei channel 0 (blue) is the brightest.
    image = got[0].image.astype(np.float64)
    nuclei = gray(got[0].image) < 120
    assert nuclei.sum() > 1000
    assert image[nuclei, 0].mean() > image[nuclei, 2].mean() + 30
    scope.close()


def test_read_times_out_with_none_when_no_frame_is_due() -> None:
    scope, clock = microscope(small_config(fps=2.0))
    scope.open()
    assert scope.read(10.0) is not None  # the first frame is due at open
    before = clock.now
    assert scope.read(100.0) is None
    assert clock.now == pytest.approx(before + 0.1)  # blocked for the timeout, no longer
    assert scope.read(0.0) is None
    frame = scope.read(1000.0)
    assert frame is not None and frame.index == 1


def test_a_late_reader_sees_the_latest_frame_and_an_index_gap() -> None:
    scope, clock = microscope()
    scope.open()
    first = scope.read(100.0)
    clock.now += 10.5 / FPS
    late = scope.read(100.0)
    assert first is not None and late is not None
    assert late.index == first.index + 10
    assert late.timestamp_ms <= clock.now * 1000.0


def test_close_is_idempotent_and_reopen_continues_the_index() -> None:
    scope, _ = microscope()
    scope.open()
    last = [f for f, _ in frames(scope, 3)][-1]
    slide_before = scope.slide.bgr.copy()
    scope.close()
    scope.close()
    with pytest.raises(SourceError, match="not open"):
        scope.read(10.0)
    scope.open()
    again = scope.read(100.0)
    assert again is not None and again.index > last.index
    assert not scope.slide.bgr.flags.writeable
    assert np.array_equal(scope.slide.bgr, slide_before)  # rendering never touches the slide


def test_bad_script_and_bad_field_are_rejected() -> None:
    with pytest.raises(ValueError, match="'wiggle 3'"):
        microscope(small_config(script=("control", "wiggle 3")))
    with pytest.raises(ValueError, match="positive"):
        microscope(small_config(script=("fields 0",)))
    scope, _ = microscope()
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        scope.goto_field(4)


# ------------------------------------------------------------------------------------------------- stage


def test_script_visits_the_control_then_distinct_fields_in_a_loop() -> None:
    scope, _ = microscope()
    scope.open()
    visits: list[StageStatus] = []
    for _, status in frames(scope, int(FPS * 0.8 * 9)):  # pan + dwell is 0.8 s; 8 visits and a bit
        if status.state is StageState.DWELLING and (not visits or visits[-1].target != status.target):
            visits.append(status)
    targets = [v.target for v in visits]
    assert targets[:8] == ["control", "field 0", "field 1", "field 2", "control", "field 3", "field 0", "field 1"]
    assert [v.on_control for v in visits[:5]] == [True, False, False, False, True]
    positions = {v.target: v.position_um for v in visits}
    assert len(set(positions.values())) == len(positions)  # every target is somewhere else
    # Field centres lie on the grid of field-sized tiles, in µm (row, col).
    h_um, w_um = 270 * PIXEL_SIZE, 480 * PIXEL_SIZE
    assert positions["field 0"] == pytest.approx((h_um / 2, w_um / 2))
    assert positions["field 1"] == pytest.approx((h_um / 2, 1.5 * w_um))
    assert positions["field 2"] == pytest.approx((1.5 * h_um, 1.5 * w_um))  # serpentine: second row backwards
    assert all(v.scripted and v.focus_error_um == 0.0 for v in visits)


def test_moving_frames_change_while_dwelling_frames_differ_only_by_noise() -> None:
    scope, _ = microscope()
    scope.open()
    read_until(scope, lambda s: s.state is StageState.MOVING and s.speed_um_s > 200.0)
    (a, s1), (b, s2) = frames(scope, 2)
    assert s1.state is s2.state is StageState.MOVING
    assert mean_abs_diff(a.image, b.image) > 3.0
    read_until(scope, lambda s: s.state is StageState.DWELLING)
    (c, _), (d, _) = frames(scope, 2)
    diff = np.abs(c.image.astype(np.int16) - d.image.astype(np.int16))
    assert 0.5 < diff.mean() < 2.5  # sensor noise: never identical, never more than its clip
    assert diff.max() <= 8
    assert sharpness(c.image) > 2.0 * sharpness(a.image)  # the motion blur smears the moving view


def test_defocus_lowers_sharpness_and_refocus_restores_it() -> None:
    scope, _ = microscope(small_config(script=("pause 300", "defocus 1000")))
    scope.open()
    focused, _ = read_until(scope, lambda s: s.state is StageState.PAUSED)
    blurred, status = read_until(scope, lambda s: s.focus_error_um > 5.0)
    assert status.state is StageState.DEFOCUSED and status.target == "field 0"
    refocused, _ = read_until(scope, lambda s: s.state is StageState.PAUSED)
    assert sharpness(blurred.image) < 0.3 * sharpness(focused.image)
    assert sharpness(refocused.image) == pytest.approx(sharpness(focused.image), rel=0.1)


def test_goto_hold_and_resume_interrupt_the_script() -> None:
    scope, clock = microscope()
    scope.open()
    scope.goto_field(3)
    assert scope.status().state is StageState.MOVING and not scope.status().scripted
    _, status = read_until(scope, lambda s: s.state is StageState.HELD)
    assert status.target == "field 3" and not status.on_control
    clock.now += 60.0  # held for a minute: it stays
    assert scope.status().position_um == status.position_um
    scope.goto_control()
    _, status = read_until(scope, lambda s: s.state is StageState.HELD)
    assert status.on_control and status.target == "control"
    scope.resume_script()  # restarts the interrupted step: the visit to the control, already there
    _, status = read_until(scope, lambda s: s.state is StageState.DWELLING)
    assert status.scripted
    read_until(scope, lambda s: s.state is StageState.MOVING and s.speed_um_s > 100.0)
    scope.hold()
    held = scope.status()
    assert held.state is StageState.HELD and held.target is None  # between fields
    (a, _), (b, _) = frames(scope, 2)
    assert mean_abs_diff(a.image, b.image) < 2.5


def test_ground_truth_of_the_view() -> None:
    scope, _ = microscope()
    scope.goto_field(2)
    assert scope.status().state is StageState.MOVING
    scope.open()
    read_until(scope, lambda s: s.state is StageState.HELD)
    cells = scope.cells_in_view()
    counts = {k: sum(c.her2_class == k for c in cells) for k in MIX}
    assert counts == scope.field_truth(2)
    assert all(0 <= c.row < 270 and 0 <= c.col < 480 for c in cells)
    total = sum(counts.values())
    for key, fraction in MIX.items():
        assert counts[key] == pytest.approx(fraction * total, abs=1)  # each field has the configured mix
    control = scope.control_truth()
    assert control["3+"] > 0 and sum(control.values()) == control["3+"]


# ------------------------------------------------------------------------------------------------ faults


def test_dropped_frames_leave_index_gaps() -> None:
    scope, _ = microscope(small_config(faults=SimulatedFaults(drop_probability=0.3)))
    scope.open()
    indices = [f.index for f, _ in frames(scope, 60)]
    steps = np.diff(indices)
    assert np.all(steps >= 1)
    assert np.any(steps > 1)
    assert 0.15 < (indices[-1] + 1 - len(indices)) / (indices[-1] + 1) < 0.45


def test_frozen_frames_repeat_the_previous_pixels() -> None:
    scope, _ = microscope(small_config(faults=SimulatedFaults(freeze_probability=0.3)))
    scope.open()
    got = [f for f, _ in frames(scope, 40)]
    repeats = [b for a, b in pairwise(got) if np.array_equal(a.image, b.image)]
    assert 5 <= len(repeats) <= 25
    assert all(b.index > a.index for a, b in pairwise(got))


def test_freeze_on_demand_lasts_until_reopened() -> None:
    scope, _ = microscope()
    scope.open()
    scope.read(100.0)
    scope.freeze()
    got = [f for f, _ in frames(scope, 40)]
    assert all(np.array_equal(f.image, got[0].image) for f in got)
    scope.close()
    scope.open()
    (a, _), (b, _) = frames(scope, 2)
    assert not np.array_equal(a.image, b.image)


def test_corrupt_frames_are_garbage_but_delivered() -> None:
    scope, _ = microscope(small_config(faults=SimulatedFaults(corrupt_probability=1.0)))
    scope.open()
    kinds = set()
    for frame, _ in frames(scope, 20):
        assert frame.image.shape == (270, 480, 3) and frame.image.dtype == np.uint8
        assert not frame.image.flags.writeable
        if not frame.image[-1].any():
            kinds.add("truncated")
        else:
            assert 100 < frame.image.mean() < 155 and frame.image.std() > 60  # uniform random bytes
            kinds.add("noise")
    assert kinds == {"truncated", "noise"}


def test_disconnect_then_reconnect() -> None:
    faults = SimulatedFaults(disconnect_after_ms=1000.0, disconnect_for_ms=500.0)
    scope, clock = microscope(small_config(faults=faults))
    scope.open()
    opened = clock.now
    last = None
    with pytest.raises(SourceError, match="unplugged"):
        for _ in range(100):
            last = scope.read(100.0)
    assert last is not None and clock.now == pytest.approx(opened + 1.0)
    with pytest.raises(SourceError, match="unplugged"):
        scope.read(100.0)
    with pytest.raises(SourceError, match="unplugged"):
        scope.open()
    clock.now += 0.3
    with pytest.raises(SourceError, match="comes back in 200 ms"):
        scope.open()
    clock.now += 0.2
    scope.open()
    resumed = scope.read(100.0)
    assert resumed is not None and resumed.index > last.index


def test_unplug_on_demand() -> None:
    scope, clock = microscope()
    scope.open()
    assert scope.read(100.0) is not None
    scope.unplug(2000.0)
    with pytest.raises(SourceError, match="unplugged"):
        scope.read(100.0)
    scope.close()
    with pytest.raises(SourceError, match="unplugged"):
        scope.open()
    clock.now += 2.0
    scope.open()
    assert scope.read(100.0) is not None


def test_same_seed_same_frames_and_faults() -> None:
    faults = SimulatedFaults(drop_probability=0.1, freeze_probability=0.1, corrupt_probability=0.05)

    def run(seed: int) -> list[Frame]:
        scope, _ = microscope(small_config(seed=seed, faults=faults))
        scope.open()
        return [f for f, _ in frames(scope, 40)]

    a, b, c = run(1), run(1), run(2)
    assert [f.index for f in a] == [f.index for f in b]
    assert [f.timestamp_ms for f in a] == [f.timestamp_ms for f in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0].image, c[0].image)


# ------------------------------------------------------------------------------------------------ scoring


def test_full_size_views_score_like_their_ground_truth() -> None:
    """At 1080x1920 and 0.25 µm/px the control scores 3+ and a tumour field scores its class mix."""
    config = small_config(width=1920, height=1080, slide_fields=(1, 1))
    scope, _ = microscope(config, pixel_size=0.25)
    scope.open()
    scope.goto_control()
    control_frame, status = read_until(scope, lambda s: s.state is StageState.HELD)
    assert status.on_control
    control = score_fov(control_frame.image, 0.25, channel_order="BGR")
    assert control.total > 0.7 * scope.control_truth()["3+"]
    assert control.percentages["3+"] > 80.0

    scope.goto_field(0)
    field_frame, _ = read_until(scope, lambda s: s.state is StageState.HELD)
    truth = scope.field_truth(0)
    result = score_fov(field_frame.image, 0.25, channel_order="BGR")
    assert result.total == pytest.approx(sum(truth.values()), rel=0.15)
    for key, fraction in MIX.items():
        assert result.percentages[key] == pytest.approx(100.0 * fraction, abs=8.0), (result.percentages, truth)


@pytest.mark.parametrize(
    ("pixel_size", "match"),
    [
        (0.0, r"\(0.05, 5\]"),  # the pixel sizes any camera may have (config.scoring)
        (6.0, r"\(0.05, 5\]"),
        (3.0, "at most 2 µm/px"),  # a camera may, but the simulated slide's cells would be under 6 px
    ],
)
def test_pixel_sizes_the_simulated_slide_cannot_show_are_refused(pixel_size: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimulatedMicroscope(small_config(), pixel_size)
