"""The recorder as a real process (or in process) following a real daemon, and reading the case folder it writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from her2scope.clients.control import ControlError
from tests.helpers.daemon import CONFIG, Daemon, arrive, json_lines, wait_for
from tests.helpers.processes import ROOT, die_with_parent

if TYPE_CHECKING:
    from her2scope.clients.recorder import Recorder

ROI = [[20.0, 20.0], [20.0, 700.0], [500.0, 700.0], [500.0, 20.0]]


class RecorderProcess:
    """``her2scope record`` as a subprocess, logging JSON lines to a file; with ``state``, it may read the daemon's
    state folder, with ``key``, it authenticates with that CURVE key; ``options`` are more of its options."""

    def __init__(
        self,
        config: Path,
        out: Path,
        state: Path | None,
        log_path: Path,
        key: Path | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "her2scope", "record", "--config", str(config), "--out", str(out)),
                *(("--daemon-state", str(state)) if state is not None else ()),
                *(("--key", str(key)) if key is not None else ()),
                *options,
                "--json-logs",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=die_with_parent,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.log_path)


class Setup:
    """A daemon (the module's, or a test's own), its config file and where recorders write."""

    daemon: Daemon

    def __init__(self, root: Path, *, start_daemon: bool = True) -> None:
        self.root = root
        self.state = root / "state"
        self.config = root / "config.toml"
        self.config.write_text(CONFIG.format(state=self.state))
        self.out = root / "cases"
        self._daemons: list[Daemon] = []
        self._recorders: list[RecorderProcess] = []
        if start_daemon:
            self.start_daemon()

    def start_daemon(self) -> Daemon:
        """A daemon on the state folder (a restart resumes its open case), on new random ports, auto-capture off."""
        self.daemon = Daemon(self.state, self.config, self.root / f"daemon-{len(self._daemons) + 1}.log")
        self._daemons.append(self.daemon)
        self.daemon.control.call("auto-capture", enabled=False)
        return self.daemon

    def recorder(self, *options: str) -> RecorderProcess:
        """``her2scope record`` (with ``options``, e.g. ``--pdf``) into ``out``, reading the daemon's state folder."""
        recorder = RecorderProcess(
            self.config, self.out, self.state, self.root / f"recorder-{len(self._recorders) + 1}.log", options=options
        )
        self._recorders.append(recorder)
        return recorder

    def in_process_recorder(self, out: Path, *, with_daemon_state: bool = True, **options: Any) -> Recorder:
        """A Recorder object driven by the test (``step``), following this setup's daemon."""
        from her2scope.clients.recorder import Recorder
        from her2scope.config.scoring import CaseRule, ScoringParams

        daemon = self.daemon
        if with_daemon_state:
            options["daemon_state"] = self.state
        return Recorder(
            out,
            lambda: daemon.endpoints,
            fallback_params=ScoringParams(),
            fallback_rule=CaseRule(),
            heartbeat_ms=300,
            **options,
        )

    def close(self) -> None:
        """Stop every process this setup started that still runs (a stopped daemon is continued first)."""
        for recorder in self._recorders:
            if not recorder.log.closed:
                recorder.stop()
        for daemon in self._daemons:
            if daemon.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    daemon.process.send_signal(signal.SIGCONT)
                daemon.stop()


def records_a_capture(daemon: Daemon, recorder: RecorderProcess, out: Path, case_id: str) -> str:
    """Start ``case_id``, capture a FOV and wait until ``recorder`` has logged it scored under ``out`` (then stop
    the recorder); the FOV's id."""
    try:
        daemon.control.call("auto-capture", enabled=False)
        daemon.control.call("start-case", case_id=case_id)
        fov_id = capture_when_live(daemon)
        events = out / case_id / "events.jsonl"
        wait_for(
            lambda: events.exists() and f'"{fov_id}"' in events.read_text() and "scored" in events.read_text(),
            what="the recorder to log the scored FOV",
        )
    finally:
        recorder.stop()
    return str(fov_id)


def capture_when_live(daemon: Daemon) -> str:
    """Capture as soon as the daemon has a live frame (the camera reports live a moment before the daemon holds its
    first frame); the FOV's id."""
    captured: list[str] = []

    def attempt() -> bool:
        try:
            captured.append(str(daemon.control.call("capture")["fov_id"]))
        except ControlError as error:
            if "no live frame" not in str(error):
                raise
            return False
        return True

    wait_for(attempt, what="a live frame to capture")
    return captured[0]


def start_daemon_setup(root: Path) -> Setup:
    return Setup(root)


def capture(daemon: Daemon, target: str) -> str:
    """Move the stage to ``target`` ("control" or "field N"), wait until still, capture; return the FOV id."""
    if target == "control":
        daemon.control.call("stage", action="goto-control")
    else:
        daemon.control.call("stage", action="goto-field", field=int(target.split()[1]))
    arrive(daemon, target)
    command = "capture-control" if target == "control" else "capture"
    return str(daemon.control.call(command)["fov_id"])


def settled(daemon: Daemon) -> dict[str, Any]:
    """Wait until every FOV of the open case is scored (or failed) and the worker is idle; the case summary."""

    def done() -> dict[str, Any] | None:
        status = daemon.control.call("status")
        case: dict[str, Any] = daemon.control.call("snapshot")["case"]
        if status["worker"] == "idle" and status["queue"] == 0 and all(f["status"] != "pending" for f in case["fovs"]):
            return case
        return None

    return wait_for(done, what="every FOV scored")  # type: ignore[return-value]


def read_docs(case_dir: Path) -> list[dict[str, Any]]:
    path = case_dir / "events.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


def events_of(case_dir: Path) -> list[dict[str, Any]]:
    return [d for d in read_docs(case_dir) if d["doc"] == "event"]


def wait_for_docs(case_dir: Path, predicate: Any, what: str) -> list[dict[str, Any]]:
    return wait_for(lambda: predicate(read_docs(case_dir)) and read_docs(case_dir), what=what)  # type: ignore[return-value]


def has_events(*fov_ids: str) -> Any:
    return lambda docs: set(fov_ids) <= {d["fov_id"] for d in docs if d["doc"] == "event"}


def has_stop(docs: list[dict[str, Any]]) -> bool:
    return any(d["doc"] == "stop" for d in docs)
