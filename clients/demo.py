"""``her2scope demo``: the whole system on the simulated microscope, running a scripted case by itself.

It starts the daemon, the recorder, (when there is a display) the viewer and (``--web``) the browser viewer as real
processes on loopback ports, then plays the pathologist: starts a case, captures the positive control, captures
tumour fields one by one, closes the case; and prints each result, the final score and the path of the recorder's
report.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from her2scope.clients.control import ControlClient, ControlError, Subscriber, read_endpoints
from her2scope.clients.ctl import format_case
from her2scope.clients.viewer.app import has_display
from her2scope.daemon.protocol import CaseSummary, Topic

DEMO_CONFIG = """\
# her2scope demo: the simulated microscope over a synthetic HER2 slide, loopback ports chosen at start.
[optics]
pixel_size_um = 0.25

[daemon.camera]
kind = "simulated"
width = 1920
height = 1080
fps = 15
slide_fields = [2, 3]
class_fractions = {{ "0" = 0.35, "1+" = 0.3, "2+" = 0.3, "3+" = 0.05 }}
pan_ms = 800
dwell_ms = 3000
script = ["fields 6"]

[daemon.capture]
auto = false
settle_ms = 300

[daemon.zmq]
publish = "tcp://127.0.0.1:*"
control = "tcp://127.0.0.1:*"
heartbeat_ms = 500

[daemon.state]
directory = "{state}"
"""

DEADLINE_S = 60.0


class DemoError(RuntimeError):
    """The demo could not go on; the message says which part failed and where its log is."""


@dataclass
class _Processes:
    """The demo's child processes, stopped in reverse order."""

    started: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        handle = open(log, "wb")  # noqa: SIM115 - the child writes to it until it stops
        process = subprocess.Popen(
            [sys.executable, "-m", "her2scope", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        handle.close()
        self.started.append((name, process, log))

    def check(self) -> None:
        for name, process, log in self.started:
            if process.poll() is not None:
                raise DemoError(f"the {name} stopped (exit code {process.returncode}); see {log}")

    def stop(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in reversed(self.started):
            reap(process, timeout_s=30.0, kill_wait_s=5.0)


def reap(process: subprocess.Popen[Any], timeout_s: float, kill_wait_s: float = 10.0) -> None:
    """Wait up to ``timeout_s`` for ``process`` to end (after a SIGTERM), then SIGKILL it and wait for that."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=kill_wait_s)


def terminate(process: subprocess.Popen[Any], timeout_s: float, kill_wait_s: float = 10.0) -> None:
    """SIGTERM ``process`` (unless it has ended), then :func:`reap` it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    reap(process, timeout_s, kill_wait_s)


def _wait(predicate: Callable[[], Any], what: str, processes: _Processes, timeout_s: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        processes.check()
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def run_demo(
    out: Path,
    *,
    fields: int = 5,
    window: bool | None = None,
    keep_running: bool = False,
    web_port: int | None = None,
    echo: TextIO = sys.stdout,
) -> Path:
    """Run the scripted case; return the path of the recorder's report. Raises DemoError when a part fails.

    ``web_port``: also serve the browser viewer (``her2scope web``) on this loopback port (0: any free one)."""
    out = out.expanduser().resolve()
    run_dir = out / dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    state = run_dir / "daemon-state"
    cases = out / "cases"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "demo.toml"
    config.write_text(DEMO_CONFIG.format(state=state), encoding="utf-8")
    window = has_display() if window is None else window

    def say(line: str) -> None:
        echo.write(line + "\n")
        echo.flush()

    processes = _Processes()
    try:
        say(f"her2scope demo: logs and configuration in {run_dir}")
        processes.start("daemon", ["daemon", "--config", str(config), "--json-logs"], run_dir / "daemon.log")
        _wait(lambda: (state / "endpoints.json").exists(), "the daemon to start", processes)
        endpoints = read_endpoints(state)
        processes.start(
            "recorder",
            ["record", "--config", str(config), "--out", str(cases), "--daemon-state", str(state)],
            run_dir / "recorder.log",
        )
        if window:
            processes.start(
                "viewer", ["view", "--config", str(config), "--daemon-state", str(state)], run_dir / "viewer.log"
            )
        if web_port is not None:
            web_log = run_dir / "web.log"
            processes.start(
                "browser viewer",
                ["web", "--config", str(config), "--daemon-state", str(state), "--port", str(web_port)],
                web_log,
            )
            url = _wait(lambda: _serving(web_log), "the browser viewer to serve", processes)
            say(f"browser viewer: {url}")
        with (
            ControlClient(endpoints["control"], timeout_ms=20_000) as control,
            Subscriber(endpoints["publish"], [Topic.RESULT.value]) as results,
        ):
            _wait(lambda: control.call("status")["camera"]["state"] == "live", "the camera", processes)
            say(
                f"daemon up ({control.call('status')['camera']['source']} camera); "
                f"viewer: {'a window' if window else 'none (no display): results are printed here'}"
            )
            time.sleep(1.0)  # let the recorder and the viewer subscribe before the case starts
            case_id = control.call(
                "start-case", case_id=dt.datetime.now().strftime("demo-%Y%m%d-%H%M%S"), operator="demo"
            )["case_id"]
            say(f"case {case_id} started")

            def capture_at(target: str, command: str) -> dict[str, Any]:
                action = (
                    {"action": "goto-control"}
                    if target == "control"
                    else {"action": "goto-field", "field": int(target.split()[1])}
                )
                control.call("stage", **action)
                _wait(lambda: _arrived(control, target), f"the stage to reach {target}", processes)
                fov_id = control.call(command)["fov_id"]
                result: dict[str, Any] = _wait(
                    lambda: _result_for(results, fov_id), f"the result of {fov_id}", processes
                )
                return result

            body = capture_at("control", "capture-control")
            say(_control_line(body))
            for index in range(fields):
                body = capture_at(f"field {index}", "capture")
                say(_fov_line(body))
            closed = control.call("close-case")
        say("")
        say(format_case(CaseSummary.model_validate(closed["summary"])))
        report: Path = cases / case_id / "report.html"
        _wait(lambda: _report_final(cases / case_id), "the recorder's final report", processes)
        say("")
        say(f"report: {report}")
        if keep_running:
            say("running; Ctrl-C stops the demo")
            try:
                while True:
                    processes.check()
                    time.sleep(0.5)
            except KeyboardInterrupt:
                say("stopping")
        return report
    except ControlError as error:
        raise DemoError(f"the daemon did not answer: {error}; see {run_dir / 'daemon.log'}") from None
    finally:
        processes.stop()


def _serving(log: Path) -> str | None:
    """The URL ``her2scope web`` printed once it listens (its first line ``serving URL``), if it has yet."""
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("serving "):
            return line.removeprefix("serving ").strip()
    return None


def _arrived(control: ControlClient, target: str) -> bool:
    stage = control.call("stage", action="status")["stage"]
    if stage["state"] != "held" or stage["target"] != target:
        return False
    return bool(control.call("status")["stability"] in ("stable", "captured"))


def _result_for(results: Subscriber, fov_id: str) -> dict[str, Any] | None:
    message = results.receive(timeout_ms=100)
    if message is None:
        return None
    body = message.body.model_dump(mode="json")
    if body["fov_id"] == fov_id and body["status"] in ("scored", "failed"):
        return body
    return None


def _control_line(body: dict[str, Any]) -> str:
    calibration = body["calibration"] or {}
    if body["status"] != "scored" or not calibration:
        return f"  positive control {body['fov_id']}: FAILED ({body['error']})"
    qc = "passed" if calibration["qc_passed"] else "FAILED"
    return (
        f"  positive control {body['fov_id']}: intense threshold {calibration['intense_threshold_od']:.2f} OD, "
        f"control scored {calibration['control_score'] or 'n/a'}, QC {qc}"
    )


def _fov_line(body: dict[str, Any]) -> str:
    if body["status"] != "scored":
        return f"  {body['fov_id']}: FAILED ({body['error']})"
    result = body["result"]
    pct = result["percentages"]
    case = body["case"]["case"] or {}
    cells = sum(result["counts"].values())
    return (
        f"  {body['fov_id']}: {cells:4d} cells"
        f"  0 {pct['0']:4.1f}%  1+ {pct['1+']:4.1f}%  2+ {pct['2+']:4.1f}%  3+ {pct['3+']:4.1f}%"
        f"  FOV {result['call']['score'] or 'n/a':>3}   case so far {case.get('score') or 'n/a'}"
        f"  ({body['latency_ms']:.0f} ms)"
    )


def _report_final(case_dir: Path) -> bool:
    events = case_dir / "events.jsonl"
    if not (case_dir / "report.html").exists() or not events.exists():
        return False
    for line in events.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict) and "stop" in (document.get(k) for k in ("doc", "name", "type", "kind")):
            return True
    return False
