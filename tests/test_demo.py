"""``her2scope demo``, the main job: daemon, recorder (and viewer) as real processes, a scripted case, a report."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.processes import die_with_parent

pytestmark = pytest.mark.e2e  # the demo's processes

ROOT = Path(__file__).resolve().parent.parent


def run_demo(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "her2scope", "demo", "--out", str(out), "--fields", "3", *extra],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def check_case(done: subprocess.CompletedProcess[str], out: Path) -> Path:
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any("positive control control-001" in line and "QC passed" in line for line in lines)
    assert sum(line.lstrip().startswith("fov-") and "cells" in line and "FOV" in line for line in lines) == 3
    final = next(line for line in lines if line.startswith("CASE HER2 IHC"))
    report = Path(next(line for line in lines if line.startswith("report: ")).removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(out)
    events = [json.loads(line) for line in (report.parent / "events.jsonl").read_text().splitlines()]
    kinds = [e["doc"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "stop" and kinds.count("event") >= 4  # control + 3 FOVs
    stop = events[-1]
    assert stop["exit_status"] == "success"
    assert f"CASE HER2 IHC {stop['score'] or 'not assessable'}" in final
    assert len(list((report.parent / "images").glob("*.png"))) == 4
    return report


def test_the_demo_runs_a_case_and_writes_its_report(tmp_path: Path) -> None:
    done = run_demo(tmp_path / "demo", "--no-window")
    report = check_case(done, tmp_path / "demo")
    assert "viewer: none" in done.stdout
    html = report.read_text()
    assert "HER2 IHC" in html and "control-001" in html


def _free_display() -> int:
    for number in range(90, 200):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(f"/tmp/.X{number}-lock").exists():
            return number
    raise RuntimeError("no free X display number")


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)")
def test_the_demo_opens_the_viewer_window_when_there_is_a_display(tmp_path: Path) -> None:
    display = _free_display()
    xvfb = subprocess.Popen(
        ["Xvfb", f":{display}", "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{display}").exists():
            assert time.monotonic() < deadline, "Xvfb did not start"
            time.sleep(0.05)
        done = run_demo(tmp_path / "demo", env={"DISPLAY": f":{display}"})
        check_case(done, tmp_path / "demo")
        assert "viewer: a window" in done.stdout
        viewer_log = next((tmp_path / "demo").glob("run-*/viewer.log")).read_text()
        assert "Traceback" not in viewer_log
    finally:
        xvfb.terminate()
        xvfb.wait(timeout=10)


def test_a_port_in_use_does_not_matter_the_demo_picks_free_ones(tmp_path: Path) -> None:
    # the demo binds random loopback ports, so a daemon already on the default ports does not get in its way
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 5561))
        done = run_demo(tmp_path / "demo", "--no-window")
    check_case(done, tmp_path / "demo")


def test_the_demo_with_web_serves_the_browser_viewer_beside_the_case(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "her2scope", "demo", "--out", str(tmp_path / "demo"), "--fields", "3"),
            *("--no-window", "--web", "--web-port", "0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        preexec_fn=die_with_parent,
    )
    assert process.stdout is not None
    lines: list[str] = []
    settings = None
    for line in process.stdout:  # the demo prints the address before the case starts, and serves until it ends
        lines.append(line)
        if line.startswith("browser viewer: ") and settings is None:
            url = line.removeprefix("browser viewer: ").strip()
            with urllib.request.urlopen(url + "api/settings", timeout=30) as response:
                settings = json.loads(response.read())
    process.stdout.close()
    assert process.wait(timeout=240) == 0, "".join(lines)
    assert settings is not None and settings["control"] is False, "".join(lines)  # read-only beside the demo
    assert any(line.startswith("CASE HER2 IHC") for line in lines)
    web_log = next((tmp_path / "demo").glob("run-*/web.log")).read_text()
    assert "Traceback" not in web_log and "web_stopped" in web_log
