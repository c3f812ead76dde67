"""A FOV the daemon lost when it was killed (acknowledged, scored and recorded, but its image never reached the
daemon's disk) is failed by the restarted daemon; the recorder hears it and records the FOV as failed, not as
scored, and its log still ends well (found by the chaos suite: a SIGKILL ~80 ms after a capture)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.daemon import wait_for
from tests.helpers.recorder import Setup, capture, has_events, has_stop, settled, wait_for_docs

pytestmark = pytest.mark.e2e  # real daemon and recorder processes


def test_a_fov_the_daemon_lost_at_a_crash_is_recorded_as_failed(own_setup: Setup) -> None:
    recorder = own_setup.recorder()
    daemon = own_setup.start_daemon()
    case_dir = own_setup.out / "lost-1"
    daemon.control.call("start-case", case_id="lost-1")
    control, fov = capture(daemon, "control"), capture(daemon, "field 0")
    settled(daemon)
    wait_for_docs(case_dir, has_events(control, fov), "the scored events")
    assert daemon.stop() == 0
    # what a SIGKILL before the background image write leaves: the case says scored, the image is not there
    (own_setup.state / "cases" / "lost-1" / f"{fov}.png").unlink()
    daemon = own_setup.start_daemon()
    entry = next(f for f in daemon.control.call("snapshot")["case"]["fovs"] if f["fov_id"] == fov)
    assert entry["status"] == "failed" and "was not saved" in entry["error"]

    def failed_again(docs: list[dict[str, Any]]) -> bool:
        return any(d["doc"] == "event" and d["fov_id"] == fov and d["status"] == "failed" for d in docs)

    docs = wait_for_docs(case_dir, failed_again, "the lost FOV recorded as failed")
    events = [d for d in docs if d["doc"] == "event" and d["fov_id"] == fov]
    assert [e["status"] for e in events] == ["scored", "failed"]
    assert (
        events[-1]["rescore"] and events[-1]["source"] == "snapshot" and "was not saved" in events[-1]["data"]["error"]
    )
    daemon.control.call("close-case")
    docs = wait_for_docs(case_dir, has_stop, "the stop document")
    stop = docs[-1]
    assert stop["exit_status"] == "success", stop["reason"]
    wait_for(lambda: recorder.process.poll() is None, what="the recorder to keep running")
    assert recorder.stop() == 0
