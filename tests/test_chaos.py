"""The chaos and fuzz suite (bench/chaos.py), short: 1,000 generated control requests; a kill of the daemon, and
one of its scoring worker while it scores, each in a scripted case (the recorder's kill: tests/test_recorder.py); a
full disk where a small filesystem can be mounted.

Real daemon and recorder processes on random loopback ports; every wait is on a reply, a published message or a
file, with generous deadlines. ``python -m bench.chaos --runs N`` is the long version (docs/reliability.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos import Bench, Chaos, can_mount, full_disk, fuzz
from tests.helpers.processes import die_with_parent

pytestmark = pytest.mark.e2e  # real daemon and recorder processes

SEED = 9


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    """One daemon and recorder for the module (restarted by the chaos when it kills them)."""
    running = Bench(tmp_path_factory.mktemp("chaos"), die_with_parent)
    try:
        running.start_recorder()
        yield running
    finally:
        running.close()


def test_every_generated_request_gets_one_reply_and_the_daemon_still_serves(bench: Bench) -> None:
    report = fuzz(bench.daemon, 1_000, SEED)
    assert report.requests == report.replies == 1_000
    assert (report.missing, report.id_mismatches) == (0, 0), report.examples
    assert report.accepted_but_must_refuse == 0, report.examples
    assert (report.internal_errors, report.daemon_problems, report.bad_payload_counts) == (0, 0, 0), report.examples
    assert report.status_after and report.capture_scored_after, report.examples
    # a parsed request leaves nothing behind (1,000 of them; a leak of a few kB each would show)
    assert report.rss_after_mib - report.rss_before_mib < 50


@pytest.mark.parametrize(("n", "fault"), [(1, "daemon"), (2, "worker-busy")])
def test_a_kill_mid_case_loses_and_repeats_no_fov(bench: Bench, n: int, fault: str) -> None:
    report = Chaos(bench, random.Random(SEED + n), n_fields=2).cycle(fault, n)
    assert report.killed, f"the {fault} was not killed"
    assert report.restart_s is not None, "the killed process did not come back"
    assert report.acknowledged, "no capture was answered"
    assert report.lost == [] and report.duplicated == [] and report.phantom == [], report
    assert report.disagree == [] and report.errors == [], report
    assert set(report.acknowledged) <= set(report.in_case)
    assert report.recorder_exit is not None, "the recorder did not end the case"


def test_a_full_disk_loses_no_capture(tmp_path: Path) -> None:
    why = can_mount()
    if why is not None:
        pytest.skip(f"no small filesystem to fill: {why}")
    report = full_disk(tmp_path, captures=4, preexec_fn=die_with_parent)
    assert report.answered == report.captures
    assert report.image_not_saved_events > 0, "the disk never filled: the test tested nothing"
    assert report.lost == [] and report.not_scored == [] and report.internal_errors == 0, report
    assert report.resumed, "the restarted daemon did not resume the case as it was"
