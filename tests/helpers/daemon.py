"""A real daemon process on the simulated microscope, on random loopback ports, and waiting for what it does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from her2scope.clients.control import ControlClient, ControlError, Subscriber, read_endpoints
from her2scope.daemon.curve import ClientKeys
from her2scope.daemon.protocol import Message, Topic
from tests.helpers.processes import ROOT, die_with_parent

CONFIG = """
[optics]
objectives = {{ "20x" = 0.5, "40x" = 0.25 }}
objective = "20x"

[daemon.camera]
kind = "simulated"
width = 960
height = 540
fps = 15
slide_fields = [2, 2]
pan_ms = 500
dwell_ms = 2500
script = ["fields 4"]
class_fractions = {{ "0" = 0.4, "1+" = 0.3, "2+" = 0.3 }}

[daemon.watchdog]
frame_timeout_ms = 700
reopen_interval_ms = 300

[daemon.capture]
settle_ms = 300

[daemon.zmq]
publish = "tcp://127.0.0.1:*"
control = "tcp://127.0.0.1:*"
heartbeat_ms = 300

[daemon.state]
directory = "{state}"
"""

DEADLINE_S = 30.0


def wait_for(predicate: Callable[[], object], timeout_s: float = DEADLINE_S, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail loudly after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Daemon:
    """A daemon subprocess with its clients."""

    def __init__(
        self,
        state: Path,
        config_path: Path,
        log_path: Path,
        preexec_fn: Callable[[], None] = die_with_parent,
        curve: ClientKeys | None = None,
    ) -> None:
        self.state = state
        self.curve = curve  # the clients' keys, for a daemon that uses CURVE
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "her2scope", "daemon", "--config", str(config_path), "--json-logs"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
        endpoints_file = state / "endpoints.json"
        try:
            wait_for(
                lambda: (
                    endpoints_file.exists() and json.loads(endpoints_file.read_text()).get("pid") == self.process.pid
                ),
                what="the daemon's endpoints",
            )
            self.endpoints = read_endpoints(state)
            self.control = ControlClient(self.endpoints["control"], timeout_ms=5000, curve=curve)
            wait_for(self._running, what="the daemon to answer status")
        except BaseException:  # a daemon that never got ready is killed, not left behind
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)
            if hasattr(self, "control"):
                self.control.close()
            self.log.close()
            raise

    def _running(self) -> bool:
        try:
            return bool(self.control.call("status")["daemon"] == "running")
        except ControlError:
            return False

    def subscribe(self, *topics: Topic) -> Subscriber:
        return Subscriber(self.endpoints["publish"], [t.value for t in topics] or [""], curve=self.curve)

    def stop(self) -> int:
        self.control.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=15)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()
        return code

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.log_path)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines log, skipping lines that are not JSON (a process's stray output)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def arrive(daemon: Daemon, target: str) -> None:
    """Wait until the simulated stage rests on ``target`` and the daemon sees the field as still."""

    def arrived() -> bool:
        stage = daemon.control.call("stage", action="status")["stage"]
        return bool(stage["state"] == "held" and stage["target"] == target)

    wait_for(arrived, what=f"the stage to arrive at {target}")
    wait_for(
        lambda: daemon.control.call("status")["stability"] in ("stable", "captured"),
        what=f"{target} to be still",
    )


def next_message(subscriber: Subscriber, predicate: Callable[[Message], bool], what: str) -> Message:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        message = subscriber.receive(timeout_ms=200)
        if message is not None and predicate(message):
            return message
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running_daemon(
    root: Path,
    extra_config: str = "",
    preexec_fn: Callable[[], None] = die_with_parent,
    base_config: str = CONFIG,
    curve: ClientKeys | None = None,
) -> Iterator[Daemon]:
    """A daemon on ``base_config`` (``CONFIG``, with ``{state}`` filled in) plus ``extra_config``, with its state,
    configuration and log in ``root``; stopped afterwards (or, when it has died, its log closed)."""
    state = root / "state"
    config = root / "config.toml"
    config.write_text(base_config.format(state=state) + extra_config)
    running = Daemon(state, config, root / "daemon.log", preexec_fn, curve)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.stop()
        else:
            running.log.close()
