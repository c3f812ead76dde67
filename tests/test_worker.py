"""The scoring worker process: results and overlays, failures contained, crash and timeout recovery, job order.

Real spawned processes (each start costs ~1 s), so most tests share one worker; every wait has a deadline.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import select
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from her2scope.config.scoring import CaseRule, ScoringParams
from her2scope.daemon.worker import JobOverlay, JobResult, Outcome, ScoreJob, ScoringWorker, WorkerState
from her2scope.scoring import ControlCalibration, analyse_fov, calibrate_from_control, score_fov
from her2scope.scoring.overlay import LAYER_NAMES, render_overlay

pytestmark = pytest.mark.e2e  # spawned scoring worker processes

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
PIXEL_SIZE_UM = 0.25
PARAMS = ScoringParams()
RULE = CaseRule()
OVERLAY_WIDTH = 480
DEADLINE_S = 30.0

_job_ids = itertools.count(1)


def _read_bgr(name: str) -> npt.NDArray[np.uint8]:
    image = cv2.imread(str(SAMPLES / name), cv2.IMREAD_COLOR)
    assert image is not None, f"missing sample {name}"
    return np.asarray(image, dtype=np.uint8)


CONTROL_BGR = _read_bgr("control_3plus.jpg")
FOV_BGR = _read_bgr("her2_2plus.jpg")


def _job(image: npt.NDArray[np.uint8] | None, kind: Literal["fov", "control"] = "fov", **options: Any) -> ScoreJob:
    job_id = next(_job_ids)
    return ScoreJob(
        job_id=job_id,
        fov_id=f"{kind}-{job_id:03d}",
        kind=kind,
        image=image,
        pixel_size_um=PIXEL_SIZE_UM,
        params=PARAMS,
        rule=RULE,
        **options,
    )


def _collect(
    worker: ScoringWorker, done: Callable[[list[Outcome]], bool], timeout_s: float = DEADLINE_S
) -> list[Outcome]:
    """Poll the worker until ``done(outcomes)``; waits on its pipe between polls, fails after ``timeout_s``."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + timeout_s
    while True:
        outcomes.extend(worker.poll())
        if done(outcomes):
            return outcomes
        if time.monotonic() > deadline:
            raise AssertionError(f"worker did not finish within {timeout_s} s; outcomes so far: {outcomes}")
        fileno = worker.fileno()
        if fileno is not None:
            select.select([fileno], [], [], 0.05)


def _finished(*jobs: ScoreJob) -> Callable[[list[Outcome]], bool]:
    """Done when every job has its result, and every scored job that asked for an overlay has its overlay."""

    def done(outcomes: list[Outcome]) -> bool:
        for job in jobs:
            results = [o for o in outcomes if isinstance(o, JobResult) and o.job is job]
            if not results:
                return False
            if results[0].ok and job.overlay and not any(isinstance(o, JobOverlay) and o.job is job for o in outcomes):
                return False
        return True

    return done


def _run(worker: ScoringWorker, *jobs: ScoreJob) -> list[Outcome]:
    for job in jobs:
        worker.submit(job)
    outcomes = _collect(worker, _finished(*jobs))
    assert _state(worker) is WorkerState.IDLE
    assert worker.poll() == []  # nothing more is coming
    return outcomes


def _state(worker: ScoringWorker) -> WorkerState:
    return worker.state  # (a call, so that mypy does not narrow the property across the test)


@pytest.fixture(scope="module")
def worker() -> Iterator[ScoringWorker]:
    worker = ScoringWorker(timeout_ms=20_000.0)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
    assert _state(worker) is WorkerState.STOPPED
    assert worker.fileno() is None


@pytest.fixture(scope="module")
def control_outcomes(worker: ScoringWorker) -> tuple[ScoreJob, list[Outcome]]:
    job = _job(CONTROL_BGR, "control", overlay_width=OVERLAY_WIDTH)
    return job, _run(worker, job)


@pytest.fixture(scope="module")
def calibration(control_outcomes: tuple[ScoreJob, list[Outcome]]) -> ControlCalibration:
    result = control_outcomes[1][0]
    assert isinstance(result, JobResult) and result.calibration is not None
    return result.calibration


def test_a_control_job_yields_its_calibration_then_its_overlay(
    control_outcomes: tuple[ScoreJob, list[Outcome]],
) -> None:
    job, outcomes = control_outcomes
    assert [type(o) for o in outcomes] == [JobResult, JobOverlay]
    result, overlay = outcomes
    assert isinstance(result, JobResult) and isinstance(overlay, JobOverlay)
    assert result.job is job and overlay.job is job
    assert result.ok and result.error is None
    assert result.score_ms > 0.0
    expected = calibrate_from_control(CONTROL_BGR, PIXEL_SIZE_UM, PARAMS, rule=RULE, channel_order="BGR")
    assert result.calibration == expected
    assert result.calibration.control_score == expected.control_score
    assert result.result is not None
    assert result.result.intense_threshold_od == expected.intense_threshold_od

    height = round(CONTROL_BGR.shape[0] * OVERLAY_WIDTH / CONTROL_BGR.shape[1])
    assert (overlay.width, overlay.height) == (OVERLAY_WIDTH, height)
    assert tuple(name for name, _ in overlay.layers) == LAYER_NAMES
    assert len(overlay.layers) == 5
    drawn = render_overlay(
        analyse_fov(CONTROL_BGR, PIXEL_SIZE_UM, PARAMS, control=expected, rule=RULE, channel_order="BGR"),
        width=OVERLAY_WIDTH,
    )
    for name, png in overlay.layers:
        decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded is not None, f"layer {name} is not a PNG"
        assert decoded.shape == (height, OVERLAY_WIDTH, 4)
        assert decoded.dtype == np.uint8
        # PNG is lossless and the channels arrive in OpenCV's BGRA order
        np.testing.assert_array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGBA), drawn.layers[name], err_msg=name)
    panel = cv2.imdecode(np.frombuffer(overlay.layers[-1][1], np.uint8), cv2.IMREAD_UNCHANGED)
    assert panel is not None and panel[..., 3].any(), "the panel layer is blank"


def test_a_fov_job_scores_as_in_process(worker: ScoringWorker, calibration: ControlCalibration) -> None:
    job = _job(FOV_BGR, control=calibration, overlay_width=OVERLAY_WIDTH)
    outcomes = _run(worker, job)
    assert [type(o) for o in outcomes] == [JobResult, JobOverlay]
    result = outcomes[0]
    assert isinstance(result, JobResult)
    assert result.ok and result.calibration is None
    expected = score_fov(FOV_BGR, PIXEL_SIZE_UM, PARAMS, control=calibration, rule=RULE, channel_order="BGR")
    assert result.result is not None
    assert result.result.counts == expected.counts
    assert result.result.counts.total > 100
    assert result.result.call == expected.call
    assert result.result.intense_threshold_od == calibration.intense_threshold_od
    assert result.result == expected  # every field survives the JSON pipe


def test_a_roi_restricts_the_count(worker: ScoringWorker, calibration: ControlCalibration) -> None:
    rows, cols = FOV_BGR.shape[:2]
    roi = ((0.0, 0.0), (0.0, cols / 2), (rows / 2, cols / 2), (rows / 2, 0.0))
    outcomes = _run(worker, _job(FOV_BGR, control=calibration, roi=roi, overlay=False))
    result = outcomes[0]
    assert isinstance(result, JobResult) and result.result is not None
    expected = score_fov(
        FOV_BGR, PIXEL_SIZE_UM, PARAMS, control=calibration, roi_polygon=roi, rule=RULE, channel_order="BGR"
    )
    assert result.result.counts == expected.counts
    whole = score_fov(FOV_BGR, PIXEL_SIZE_UM, PARAMS, control=calibration, rule=RULE, channel_order="BGR")
    assert 0 < result.result.counts.total < whole.counts.total


def test_a_bad_job_fails_alone(worker: ScoringWorker) -> None:
    restarts = worker.restarts
    bad = _job(np.zeros((8, 8, 3), np.uint8))
    outcomes = _run(worker, bad)
    assert len(outcomes) == 1
    failed = outcomes[0]
    assert isinstance(failed, JobResult)
    assert failed.job is bad
    assert not failed.ok
    assert failed.error == "ValueError: image of shape (8, 8, 3) is too small to score (at least 16x16 pixels)"
    assert failed.result is None and failed.calibration is None
    assert worker.restarts == restarts  # the process survived

    good = _job(FOV_BGR, overlay=False)
    result = _run(worker, good)[0]
    assert isinstance(result, JobResult) and result.ok and result.result is not None


def test_overlay_false_yields_no_overlay(worker: ScoringWorker) -> None:
    job = _job(FOV_BGR, overlay=False)
    outcomes = _run(worker, job)
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], JobResult) and outcomes[0].ok and outcomes[0].job is job


def test_jobs_come_back_in_submission_order(worker: ScoringWorker) -> None:
    jobs = [_job(FOV_BGR, overlay=False), _job(np.zeros((4, 4, 3), np.uint8)), _job(CONTROL_BGR, overlay=False)]
    for index, job in enumerate(jobs):
        worker.submit(job)
        assert worker.queued == index  # the first goes straight to the worker
    assert _state(worker) is WorkerState.BUSY
    outcomes = _collect(worker, _finished(*jobs))
    assert [o.job.job_id for o in outcomes] == [j.job_id for j in jobs]
    assert [isinstance(o, JobResult) and o.ok for o in outcomes] == [True, False, True]
    assert worker.queued == 0
    assert _state(worker) is WorkerState.IDLE


def test_a_job_from_a_png_file_is_read_by_the_worker(worker: ScoringWorker, tmp_path: Path) -> None:
    png = tmp_path / "fov.png"
    assert cv2.imwrite(str(png), FOV_BGR)
    from_memory = _run(worker, _job(FOV_BGR, overlay=False))[0]
    from_file = _run(worker, _job(None, overlay=False, image_path=png))[0]
    missing = _job(None, overlay=False, image_path=tmp_path / "gone.png")
    failed = _run(worker, missing)[0]
    assert isinstance(from_memory, JobResult) and isinstance(from_file, JobResult)
    assert from_file.ok and from_file.result == from_memory.result
    assert isinstance(failed, JobResult) and not failed.ok
    assert failed.error == f"the image of {missing.fov_id} ({tmp_path / 'gone.png'}) cannot be read"


def test_a_fov_waits_once_with_its_newest_job(worker: ScoringWorker) -> None:
    first = _job(FOV_BGR, overlay=False, case_id="c")
    older = dataclasses.replace(_job(FOV_BGR, overlay=False, case_id="c"), fov_id="fov-x")
    newer = dataclasses.replace(older, job_id=next(_job_ids), roi=((0.0, 0.0), (0.0, 900.0), (900.0, 0.0)))
    other_case = dataclasses.replace(older, job_id=next(_job_ids), case_id="d")
    assert [worker.submit(job) for job in (first, older, newer, other_case)] == [True, True, False, True]
    assert worker.is_queued("c", "fov-x") and worker.is_queued("d", "fov-x")
    outcomes = _collect(worker, _finished(first, newer, other_case))
    # the newer job took the older one's place: the older is never scored
    assert [o.job.job_id for o in outcomes] == [first.job_id, newer.job_id, other_case.job_id]
    assert all(isinstance(o, JobResult) and o.ok for o in outcomes)
    assert worker.queued == 0


def test_a_worker_killed_while_idle_is_restarted_before_the_next_job(worker: ScoringWorker) -> None:
    # (it used to go unnoticed until the next FOV failed on the broken pipe)
    _run(worker, _job(FOV_BGR, overlay=False))  # a worker that has started and served
    restarts = worker.restarts
    worker.kill_for_test()
    _collect(worker, lambda _: worker.restarts == restarts + 1)
    assert _state(worker) is WorkerState.RESTARTING  # until the new process has imported everything
    _collect(worker, lambda _: _state(worker) is WorkerState.IDLE)

    job = _job(FOV_BGR, overlay=False)
    result = _run(worker, job)[0]
    assert isinstance(result, JobResult) and result.ok
    assert worker.restarts == restarts + 1


def test_a_job_sent_to_a_worker_that_just_died_waits_for_the_new_one(worker: ScoringWorker) -> None:
    restarts = worker.restarts
    worker.kill_for_test()
    assert worker._process is not None
    worker._process.join(timeout=10)  # dead, and not yet noticed by a poll
    job = _job(FOV_BGR, overlay=False)
    worker.submit(job)
    result = _collect(worker, _finished(job))[0]
    assert isinstance(result, JobResult) and result.ok
    assert worker.restarts == restarts + 1


def test_a_worker_killed_while_busy_fails_its_job_and_serves_the_queue(worker: ScoringWorker) -> None:
    restarts = worker.restarts
    lost, queued = _job(FOV_BGR, overlay=False), _job(FOV_BGR, overlay=False)
    worker.submit(lost)
    worker.submit(queued)
    worker.kill_for_test()
    outcomes = _collect(worker, _finished(lost, queued))
    assert [o.job for o in outcomes] == [lost, queued]
    failed, scored = outcomes
    assert isinstance(failed, JobResult) and isinstance(scored, JobResult)
    assert failed.error is not None
    # how the loss shows depends on where the worker was: EOF, a reset (it had unread input), or found dead
    assert re.fullmatch(
        r"scoring worker died \((pipe closed|\[Errno 104\] Connection reset by peer|exit code -9)\)", failed.error
    ), failed.error
    assert scored.ok
    assert worker.restarts == restarts + 1


def test_a_failing_overlay_loses_only_the_overlay(worker: ScoringWorker) -> None:
    """An overlay width the renderer refuses: the result stands, no overlay comes, the worker lives on."""
    restarts = worker.restarts
    job = _job(FOV_BGR, overlay_width=8)
    worker.submit(job)
    outcomes = _collect(worker, lambda outcomes: bool(outcomes) and _state(worker) is WorkerState.IDLE)
    assert len(outcomes) == 1
    result = outcomes[0]
    assert isinstance(result, JobResult) and result.ok and result.result is not None
    assert worker.restarts == restarts
    assert worker.poll() == []

    after = _run(worker, _job(FOV_BGR, overlay=False))[0]
    assert isinstance(after, JobResult) and after.ok


def test_a_job_that_is_not_a_uint8_image_fails_without_reaching_the_worker(worker: ScoringWorker) -> None:
    restarts = worker.restarts
    job = _job(FOV_BGR.astype(np.float32), overlay=False)
    worker.submit(job)
    outcomes = worker.poll()
    assert len(outcomes) == 1 and isinstance(outcomes[0], JobResult)
    assert outcomes[0].error is not None and "uint8" in outcomes[0].error
    assert worker.restarts == restarts and worker.queued == 0


def test_a_job_that_takes_too_long_fails_and_restarts_the_worker() -> None:
    worker = ScoringWorker(timeout_ms=1.0)
    worker.start()
    try:
        _collect(worker, lambda _: worker._ready)  # the timeout runs from sending the job, not from spawning
        job = _job(FOV_BGR)
        worker.submit(job)
        outcomes: list[Outcome] = []
        deadline = time.monotonic() + DEADLINE_S
        while not outcomes and time.monotonic() < deadline:  # poll while the job runs, as the daemon's loop does
            outcomes = worker.poll()
            time.sleep(0.002)
        assert len(outcomes) == 1
        failed = outcomes[0]
        assert isinstance(failed, JobResult) and failed.job is job
        assert failed.error == "scoring took longer than 1 ms"
        assert failed.result is None
        assert failed.score_ms >= 1.0
        assert worker.restarts == 1
        _collect(worker, lambda _: _state(worker) is WorkerState.IDLE)
        assert worker.poll() == []  # the abandoned job's result never turns up
    finally:
        worker.stop()
    assert _state(worker) is WorkerState.STOPPED
