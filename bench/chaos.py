"""Chaos and fuzz suite: real daemon and recorder processes on the simulated microscope, attacked three ways.

Run: ``python -m bench.chaos --runs N [--seed S] [--requests R] [--out FILE.json]``. Everything is drawn from the
seed: the generated requests, which process is killed, when, and at which step of the case.

1. **Fuzz** (``fuzz``): ``R`` generated control requests (wrong types and sizes, deep nesting, NaN/inf, path-like
   ids, unknown commands and arguments, huge strings, bad ``v``, non-JSON bytes, extra frames) from one DEALER,
   pipelined. Each must get exactly one reply, in order, with the request's id when one could be read; none may
   be an internal error or carry out a request the protocol refuses. Afterwards ``status`` answers and a capture
   is scored; the daemon's resident memory before and after is reported.
2. **Kills** (``kill_cycles``): a scripted case (start-case, the control, FOV captures, close) played ``N`` times
   per fault, with a SIGKILL at a random moment of it: of the daemon, of its scoring worker while it scores and
   while it is idle, and of the recorder. The killed process is restarted (the worker by the daemon itself) and
   the time until it is ready measured; the case goes on. Then the daemon's ``case.json`` and result files and
   the recorder's ``events.jsonl`` are compared with what was captured: no FOV lost, none recorded twice.
3. **Full disk** (``full_disk``): the daemon's state folder on a tmpfs of a few MB (root only; skipped with the
   reason otherwise): captures until the disk is full, then space is freed; every capture is answered, none lost.

The processes are started from the calling thread with ``preexec_fn`` (default: die with this process), so that a
killed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from her2scope.clients.control import ControlClient, ControlError, Subscriber, read_endpoints
from her2scope.clients.demo import terminate
from her2scope.daemon.protocol import Command, ProtocolError, Reply, Topic, command_args, parse_request

ROOT = Path(__file__).resolve().parent.parent
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")  # a valid case id (docs/protocol.md, start-case)

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
auto = false
settle_ms = 300

[daemon.zmq]
publish = "tcp://127.0.0.1:*"
control = "tcp://127.0.0.1:*"
heartbeat_ms = 300

[daemon.state]
directory = "{state}"
"""

#: Generous: the suite must not fail because a loaded CI machine is slow, only because something is wrong.
DEADLINE_S = 60.0
MAX_REQUEST_BYTES = 1024 * 1024  # [limits] max_request_kib's default


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends the child SIGTERM when the thread that started it dies (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a torn or foreign line is skipped."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return math.nan


def worker_pid(daemon_pid: int) -> int | None:
    """The daemon's scoring worker: its child started by multiprocessing's spawn (not the resource tracker)."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{daemon_pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in command and b"resource_tracker" not in command:
            return pid
    return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the processes --------------------------------------------------------------------------------------------------


class DaemonDiedError(RuntimeError):
    """The daemon process is gone (the chaos killed it): restart it and do the step again."""


class DaemonProcess:
    """``her2scope daemon`` as a subprocess, logging JSON lines to its own file; ``ready_s`` is the time from the
    spawn to a ``status`` that says running (and ``daemon_ready`` in its log)."""

    def __init__(self, config: Path, state: Path, log_path: Path, preexec_fn: Callable[[], None]) -> None:
        self.state = state
        self.log_path = log_path
        started = time.monotonic()
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "her2scope", "daemon", "--config", str(config), "--json-logs"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=preexec_fn,
            )
        self.pid = self.process.pid
        endpoints = state / "endpoints.json"

        def bound() -> bool:
            self._check_alive()
            with contextlib.suppress(OSError, ValueError):
                return bool(json.loads(endpoints.read_text()).get("pid") == self.pid)
            return False

        wait_for(bound, "the daemon's endpoints")
        self.endpoints = read_endpoints(state)
        self.control = ControlClient(self.endpoints["control"], timeout_ms=2000)
        wait_for(self._answers, "the daemon to answer status")
        self.ready_s = time.monotonic() - started
        wait_for(lambda: any(e.get("event") == "daemon_ready" for e in self.logs()), "daemon_ready in its log")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise DaemonDiedError(f"the daemon exited ({self.process.returncode}); see {self.log_path}")

    def _answers(self) -> bool:
        try:
            return bool(self.request("status").data.get("daemon") == "running")
        except (ControlError, TimeoutError):
            return False

    def request(self, command: str, timeout_s: float = 10.0, **args: Any) -> Reply:
        """One request; a live daemon that does not answer within ``timeout_s`` raises TimeoutError, a dead one
        DaemonDiedError (asked again in short slices, so that a kill is noticed at once)."""
        deadline = time.monotonic() + timeout_s
        reply: Reply | None = None
        while reply is None:
            self._check_alive()
            try:
                reply, _ = self.control.request(command, timeout_ms=500, **args)
            except ControlError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command}: no answer within {timeout_s:.0f} s") from None
                if command in ("capture", "capture-control", "start-case", "close-case", "rescore"):
                    # not repeated blindly: a capture asked twice is two FOVs; the caller checks what happened
                    self._check_alive()
                    raise TimeoutError(f"{command}: no answer within 0.5 s") from None
        return reply

    def call(self, command: str, **args: Any) -> dict[str, Any]:
        """A request that must succeed; its data."""
        reply = self.request(command, **args)
        if not reply.ok:
            raise RuntimeError(f"{command} refused: {reply.error}")
        return reply.data

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.log_path)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM (a killed one is reaped), then SIGKILL if it does not end."""
        self.control.close()
        terminate(self.process, timeout_s=30.0)


class RecorderProcess:
    """``her2scope record`` as a subprocess; ``ready_s``: spawn to its first ``recorder_sync`` (following)."""

    def __init__(self, config: Path, out: Path, state: Path, log_path: Path, preexec_fn: Callable[[], None]) -> None:
        self.log_path = log_path
        started = time.monotonic()
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "her2scope", "record", "--config", str(config), "--out", str(out)),
                    *("--daemon-state", str(state), "--json-logs"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=preexec_fn,
            )
        self.pid = self.process.pid

        def synced() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"the recorder exited ({self.process.returncode}); see {log_path}")
            return any(e.get("event") == "recorder_sync" for e in json_lines(log_path))

        wait_for(synced, "the recorder to follow the daemon")
        self.ready_s = time.monotonic() - started

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        terminate(self.process, timeout_s=30.0)


class Bench:
    """One state folder, configuration and recorder output; the daemon and the recorder, restarted as needed."""

    def __init__(self, root: Path, preexec_fn: Callable[[], None] = die_with_parent, state: Path | None = None):
        self.root = root
        self.state = state or root / "state"
        self.config = root / "config.toml"
        self.config.write_text(CONFIG.format(state=self.state))
        self.out = root / "cases"
        self.preexec_fn = preexec_fn
        self._n_daemons = 0
        self._n_recorders = 0
        self.daemon = self.start_daemon()
        self.recorder: RecorderProcess | None = None

    def start_daemon(self) -> DaemonProcess:
        self._n_daemons += 1
        self.daemon = DaemonProcess(
            self.config, self.state, self.root / f"daemon-{self._n_daemons}.log", self.preexec_fn
        )
        return self.daemon

    def start_recorder(self) -> RecorderProcess:
        self._n_recorders += 1
        log = self.root / f"recorder-{self._n_recorders}.log"
        self.recorder = RecorderProcess(self.config, self.out, self.state, log, self.preexec_fn)
        return self.recorder

    def daemon_logs(self) -> list[dict[str, Any]]:
        """Every daemon run's log, in order."""
        return [e for n in range(1, self._n_daemons + 1) for e in json_lines(self.root / f"daemon-{n}.log")]

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
        self.daemon.stop()


# --- 1. fuzz --------------------------------------------------------------------------------------------------------

#: Commands a generated request may carry out when it happens to be valid: they change nothing. Valid requests of
#: other commands (a capture, a new case, a camera unplug) are drawn again: the fuzz attacks the parser and the
#: handlers' checks, it does not play a case.
HARMLESS = {Command.STATUS, Command.SNAPSHOT, Command.REPLAY, Command.IMAGE}

PATHS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "fov-001/../../../etc/shadow",
    "..\\..\\windows\\system32",
    "fov-001\x00.png",
    "%2e%2e%2f%2e%2e%2fetc",
    "~root/.ssh/id_rsa",
    "fov-001\n",
    "current",
    "cases/../current",
    "endpoints.json",
    "file:///etc/passwd",
    "\u202efov-001",
    "ﬀov-001",
    "",
    " ",
]
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    -(2**63) - 1,
    10**400,
    1.5,
    -0.0,
    1e308,
    "",
    "x",
    "1",
    "true",
    [],
    [[]],
    [1, 2],
    {},
    {"a": 1},
    [[0, 0], [0, 1]],
    "\ud800",
]
NON_FINITE = ["NaN", "Infinity", "-Infinity"]
ARG_NAMES = [
    "fov_id",
    "polygon",
    "case_id",
    "operator",
    "guideline",
    "specimen",
    "since_seq",
    "enabled",
    "action",
    "field",
    "duration_ms",
    "objective",
]


@dataclass(frozen=True, slots=True)
class FuzzCase:
    """One generated request: the frames the DEALER sends, the reply id it must get, whether the protocol must
    refuse it, and its family (for the report)."""

    frames: list[bytes]
    expect_id: str
    must_refuse: bool
    family: str


def _dumps(document: object) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _runs(frame: bytes) -> Command | None:
    """The command ``frame`` would carry out if the daemon's parser accepts it (None: refused by the protocol)."""
    try:
        request = parse_request(frame, MAX_REQUEST_BYTES)
        command_args(request)
    except (ProtocolError, ValueError):
        return None
    return request.command


class Generator:
    """Deterministic generated requests (``random.Random(seed)``), each family as often as its weight."""

    def __init__(self, seed: int, fov_id: str) -> None:
        self.rng = random.Random(seed)
        self.fov_id = fov_id
        self.n = 0
        self.huge_left = 40  # frames over the size limit cost a MiB each: a few are enough
        self.families: list[tuple[str, int, Callable[[str], tuple[list[bytes], str, bool]]]] = [
            ("valid", 8, self._valid),
            ("wrong type", 14, self._wrong_type),
            ("unknown command", 6, self._unknown_command),
            ("unknown argument", 8, self._unknown_argument),
            ("bad v", 6, self._bad_v),
            ("extra top-level field", 3, self._extra_field),
            ("NaN/inf", 8, self._non_finite),
            ("path-like id", 10, self._path_like),
            ("huge string", 4, self._huge),
            ("size", 5, self._size),
            ("deep nesting", 4, self._deep),
            ("non-JSON", 10, self._non_json),
            ("extra frames", 8, self._extra_frames),
            ("JSON not an object", 3, self._not_object),
        ]
        self._weights = [w for _, w, _ in self.families]

    def __iter__(self) -> Iterator[FuzzCase]:
        return self

    def __next__(self) -> FuzzCase:
        self.n += 1
        rid = f"z{self.n}"
        while True:
            family, _, make = self.rng.choices(self.families, weights=self._weights)[0]
            frames, expect_id, must_refuse = make(rid)
            command = _runs(frames[-1]) if len(frames[-1]) <= MAX_REQUEST_BYTES else None
            if command is not None and command not in HARMLESS and not must_refuse:
                continue  # it would change the case or the camera: drawn again (see HARMLESS)
            return FuzzCase(frames, expect_id, must_refuse, family)

    # the families: each returns (frames, the id the reply must carry, whether the protocol must refuse it)

    def _command(self) -> str:
        return self.rng.choice([c.value for c in Command])

    def _args(self, command: str) -> dict[str, Any]:
        """Plausible arguments for ``command`` (valid or not: the command's own checks decide)."""
        rng = self.rng
        fov = rng.choice([self.fov_id, "fov-999", "control-001"])
        table: dict[str, dict[str, Any]] = {
            "set-roi": {"fov_id": fov, "polygon": [[0, 0], [0, 50], [50, 50]]},
            "set-weak": {"fov_id": fov, "polygon": [[0, 0], [0, 50], [50, 50]]},
            "set-intense": {"polygon": None},
            "exclude": {"fov_id": fov},
            "include": {"fov_id": fov},
            "rescore": {"fov_id": fov},
            "replay": {"since_seq": rng.randrange(0, 10**6)},
            "auto-capture": {"enabled": rng.random() < 0.5},
            "stage": {"action": rng.choice(["status", "hold", "goto-field", "freeze", "unplug"])},
            "image": {"fov_id": fov},
            "set-objective": {"objective": rng.choice(["20x", "40x", "60x"])},
            "start-case": {"case_id": f"fz-{rng.randrange(10**9)}"},
        }
        return dict(table.get(command, {}))

    def _valid(self, rid: str) -> tuple[list[bytes], str, bool]:
        command = self.rng.choice(["status", "snapshot", "replay", "stage", "image"])
        args = {"action": "status"} if command == "stage" else self._args(command)
        return [b"", _dumps({"v": 1, "id": rid, "command": command, "args": args})], rid, False

    def _wrong_type(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        command = self._command()
        args = self._args(command)
        where = rng.choice(["arg", "arg", "id", "command", "args"])
        odd = rng.choice(ODD_VALUES)
        document: dict[str, Any] = {"v": 1, "id": rid, "command": command, "args": args}
        if where == "arg" and args:
            args[rng.choice(list(args))] = odd
        elif where == "id":
            document["id"] = odd if not isinstance(odd, str) else [odd]
            rid = ""
        elif where == "command":
            document["command"] = odd if not isinstance(odd, str) else {"name": odd}
        else:
            document["args"] = odd if not isinstance(odd, dict) else [odd]
        return [b"", _dumps(document)], rid, where in ("command", "args")

    def _unknown_command(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        command = rng.choice(
            [
                "bogus",
                "CAPTURE",
                "capture ",
                "capture\x00",
                "start_case",
                "shutdown",
                "exec",
                "__class__",
                "status;rm -rf /",
                "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 40))),
            ]
        )
        return [b"", _dumps({"v": 1, "id": rid, "command": command, "args": {}})], rid, True

    def _unknown_argument(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        command = self._command()
        args = self._args(command)
        name = rng.choice([*ARG_NAMES, "fov", "fovId", "polygons", "force", "__proto__", "x" * rng.randrange(1, 300)])
        while name in args or (name in ARG_NAMES and _takes(command, name)):
            name += "_"
        args[name] = rng.choice(ODD_VALUES)
        return [b"", _dumps({"v": 1, "id": rid, "command": command, "args": args})], rid, True

    def _bad_v(self, rid: str) -> tuple[list[bytes], str, bool]:
        command = self._command()
        v = self.rng.choice(
            ["0", "2", "-1", "true", "1.0", '"1"', "null", "1e308", "[1]", "NaN", "18446744073709551617"]
        )
        frame = f'{{"v": {v}, "id": "{rid}", "command": "{command}", "args": {{}}}}'.encode()
        return [b"", frame], rid, True

    def _extra_field(self, rid: str) -> tuple[list[bytes], str, bool]:
        document = {"v": 1, "id": rid, "command": "status", "args": {}, self.rng.choice(["cmd", "data", "ok"]): 1}
        return [b"", _dumps(document)], rid, True

    def _non_finite(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        token = rng.choice(NON_FINITE)
        shape = rng.randrange(5)
        fov = self.fov_id
        body = [
            f'"command": "replay", "args": {{"since_seq": {token}}}',
            f'"command": "set-roi", "args": {{"fov_id": "{fov}", "polygon": [[0, 0], [{token}, 5], [5, 5]]}}',
            f'"command": "stage", "args": {{"action": "unplug", "duration_ms": {token}}}',
            f'"command": "stage", "args": {{"action": "goto-field", "field": {token}}}',
            f'"command": "set-weak", "args": {{"fov_id": "{fov}", "polygon": [[{token}, 0], [0, 5], [5, 5]]}}',
        ][shape]
        return [b"", f'{{"v": 1, "id": "{rid}", {body}}}'.encode()], rid, True

    def _path_like(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        path = rng.choice(PATHS)
        command, key = rng.choice(
            [
                ("image", "fov_id"),
                ("exclude", "fov_id"),
                ("rescore", "fov_id"),
                ("set-roi", "fov_id"),
                ("start-case", "case_id"),
                ("set-objective", "objective"),
                ("stage", "action"),
                ("start-case", "guideline"),
            ]
        )
        if key == "case_id" and _CASE_ID.fullmatch(path):
            path = "../" + path  # "current" is a fine case id; "../current" is the attack
        args: dict[str, Any] = {key: path}
        if command == "set-roi":
            args["polygon"] = [[0, 0], [0, 5], [5, 5]]
        # no FOV, case id, objective, action or guideline has such a name: every one is refused
        return [b"", _dumps({"v": 1, "id": rid, "command": command, "args": args})], rid, True

    def _huge(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        over = self.huge_left > 0 and rng.random() < 0.3
        self.huge_left -= over
        size = MAX_REQUEST_BYTES + rng.randrange(1, 4096) if over else rng.randrange(10_000, 200_000)
        text = rng.choice('aé\u4e00"\\') * (size // 3 if over else size)
        where = rng.choice(["arg", "command", "id", "operator"])
        document: dict[str, Any] = {"id": rid, "v": 1, "command": "image", "args": {"fov_id": text}}
        if where == "command":
            document["command"] = text
        elif where == "id":
            document["id"] = rid + text  # over 200 chars: refused, and the reply's id is its first 200
        elif where == "operator":
            document.update(command="start-case", args={"operator": text, "case_id": "../x"})
        frame = _dumps(document)
        # refused unread over the size limit: the id is looked for in the first 4 KiB only
        expect = _id_in_head(frame) if len(frame) > MAX_REQUEST_BYTES else document["id"][:200]
        return [b"", frame], expect, where in ("command", "id")

    def _size(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        n = rng.choice([0, 1, 2, 3, 9_999, 10_001, 50_000])
        polygon = [[rng.uniform(-1e9, 1e9), rng.uniform(-1e9, 1e9)] for _ in range(n)]
        command = rng.choice(["set-roi", "set-weak", "set-intense", "replay"])
        args: dict[str, Any] = {"fov_id": "fov-999", "polygon": polygon}
        if command == "set-intense":
            args = {"polygon": polygon, "fov_id": "fov-999"}
        elif command == "replay":
            args = {"since_seq": rng.choice([2**64, 10**30, -(2**64), 1e20])}
        # no FOV fov-999: refused; replay takes any integer >= 0 (a huge one replays nothing), not a negative or float
        refused = command != "replay" or not (isinstance(args["since_seq"], int) and args["since_seq"] >= 0)
        return [b"", _dumps({"v": 1, "id": rid, "command": command, "args": args})], rid, refused

    def _deep(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        depth = rng.choice([50, 500, 5_000, 50_000, 200_000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        nested = opener * depth + "1" + closer * depth
        whole = rng.random() < 0.3
        text = nested if whole else f'{{"v": 1, "id": "{rid}", "command": "status", "args": {{"x": {nested}}}}}'
        frame = text.encode()
        if len(frame) > MAX_REQUEST_BYTES:  # refused unread, by its size
            return [b"", frame], _id_in_head(frame), True
        # shallow enough for Python's parser: the id is the request's; else the reply's id is ""
        readable = not whole and _readable(text)
        return [b"", frame], rid if readable else "", True

    def _non_json(self, rid: str) -> tuple[list[bytes], str, bool]:
        rng = self.rng
        good = f'{{"v": 1, "id": "{rid}", "command": "status"}}'.encode()
        choice = rng.randrange(9)
        frame = [
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
            good[: rng.randrange(1, len(good) - 1)],
            b"",
            b"\xef\xbb\xbf" + good.replace(b"status", b"stat us"),  # a BOM is read past (json.loads of bytes)
            good.replace(b"status", b"stat\xffus"),
            b"\x00" * rng.randrange(1, 100),
            good + b" trailing",
            b"{'v': 1, 'command': 'status'}",
            b'{"v": 1, "id": "' + rid.encode() + b'", "command": "status",}',
        ][choice]
        return [b"", frame], rid if choice == 3 else "", True

    def _extra_frames(self, rid: str) -> tuple[list[bytes], str, bool]:
        # the daemon answers the last frame, to the envelope in front of it (section 7)
        rng = self.rng
        last = _dumps({"v": 1, "id": rid, "command": "status"})
        shape = rng.randrange(6)
        if shape == 0:
            return [b"", b"junk", last], rid, False
        if shape == 1:
            return [last, last], rid, False  # no delimiter: the reply comes back without one
        if shape == 2:
            return [b"", b"", last], rid, False
        if shape == 3:
            return [b""], "", True  # a delimiter and nothing else: an empty request
        if shape == 4:
            return [b"", *[b"x" * rng.randrange(100)] * rng.randrange(2, 20), last], rid, False
        return [b"", last, b"not json"], "", True

    def _not_object(self, rid: str) -> tuple[list[bytes], str, bool]:
        frame = self.rng.choice([b"[]", b"1", b"null", b'"status"', b"true", f'["{rid}"]'.encode(), b"NaN"])
        return [b"", frame], "", True


def _id_in_head(frame: bytes) -> str:
    """The id the daemon can read from a frame over the size limit (section 9: it looks in the first 4 KiB only):
    a plain string (no escape) of at most 200 characters, else none."""
    head = frame[:4096]
    found = re.search(rb'"id"\s*:\s*"', head)
    if found is None:
        return ""
    rest = head[found.end() :]
    end = rest.find(b'"')
    if end < 0 or end > 200 or b"\\" in rest[:end]:
        return ""
    return rest[:end].decode("utf-8", "replace")


def _readable(text: str) -> bool:
    """Whether Python's JSON parser (the daemon's) reads ``text`` without running out of recursion."""
    try:
        json.loads(text)
    except RecursionError:
        return False
    return True


def _takes(command: str, name: str) -> bool:
    from her2scope.daemon.protocol import COMMANDS

    try:
        return name in COMMANDS[Command(command)].args.model_fields
    except ValueError:
        return False


@dataclass
class FuzzReport:
    requests: int = 0
    replies: int = 0
    missing: int = 0
    id_mismatches: int = 0
    accepted_but_must_refuse: int = 0
    internal_errors: int = 0
    bad_payload_counts: int = 0
    families: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    status_after: bool = False
    capture_scored_after: bool = False
    daemon_problems: int = 0  # log lines of internal errors or failed loop steps
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.replies == self.requests
            and not (self.missing or self.id_mismatches or self.accepted_but_must_refuse or self.internal_errors)
            and not (self.bad_payload_counts or self.daemon_problems)
            and self.status_after
            and self.capture_scored_after
        )


def _note(report: FuzzReport, text: str) -> None:
    if len(report.examples) < 10:
        report.examples.append(text[:300])


def fuzz(daemon: DaemonProcess, n: int, seed: int, window: int = 8) -> FuzzReport:
    """Send ``n`` generated requests from one DEALER, at most ``window`` unanswered at once (fewer than the daemon's
    16 unread replies, so none is answered 'busy'), and check each reply; then that the daemon still serves."""
    daemon.call("auto-capture", enabled=False)
    opened = daemon.call("snapshot")["case"]
    if not opened["case_id"]:
        daemon.call("start-case", case_id=f"fuzz-{seed}")
    fov_id = capture_scored(daemon, "field 0")
    report = FuzzReport(rss_before_mib=rss_mib(daemon.pid))
    n_problems = _problem_count(daemon.logs())
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.endpoints["control"])
    generator = Generator(seed, fov_id)
    outstanding: deque[FuzzCase] = deque()
    families: Counter[str] = Counter()
    started = time.monotonic()
    try:
        while report.requests < n or outstanding:
            if report.requests < n and len(outstanding) < window:
                case = next(generator)
                socket.send_multipart(case.frames)
                outstanding.append(case)
                families[case.family] += 1
                report.requests += 1
                continue
            if not socket.poll(int(DEADLINE_S * 1000)):
                report.missing += len(outstanding)
                _note(report, f"no reply within {DEADLINE_S:.0f} s to {len(outstanding)} requests")
                break
            _check_reply(report, outstanding.popleft(), socket.recv_multipart(), socket)
    finally:
        socket.close(linger=0)
    report.seconds = time.monotonic() - started
    report.families = dict(sorted(families.items()))
    report.rss_after_mib = rss_mib(daemon.pid)
    report.status_after = daemon.call("status")["daemon"] == "running"
    daemon.call("auto-capture", enabled=False)  # harmless requests cannot turn it on; made sure anyway
    try:
        capture_scored(daemon, "field 1")
        report.capture_scored_after = True
    except (TimeoutError, RuntimeError) as error:
        _note(report, f"capture after the fuzz: {error}")
    report.daemon_problems = _problem_count(daemon.logs()) - n_problems
    return report


def _check_reply(report: FuzzReport, case: FuzzCase, frames: list[bytes], socket: zmq.Socket[bytes]) -> None:
    report.replies += 1
    body = frames[1:] if frames and frames[0] == b"" else frames
    try:
        reply = Reply.model_validate_json(body[0])
    except (ValueError, IndexError) as error:
        report.id_mismatches += 1
        _note(report, f"{case.family}: unreadable reply: {error}")
        return
    if reply.id != case.expect_id:
        report.id_mismatches += 1
        _note(report, f"{case.family}: reply id {reply.id!r:.60}, expected {case.expect_id!r:.60}")
    if reply.ok and case.must_refuse:
        report.accepted_but_must_refuse += 1
        _note(report, f"{case.family}: accepted {case.frames[-1][:200]!r}")
    if not reply.ok and (reply.error or "").startswith("internal error"):
        report.internal_errors += 1
        _note(report, f"{case.family}: {reply.error} for {case.frames[-1][:200]!r}")
    if len(body) - 1 != reply.payload_count:
        report.bad_payload_counts += 1
        _note(report, f"{case.family}: payload_count {reply.payload_count}, {len(body) - 1} frames")


def _problem_count(entries: list[dict[str, Any]]) -> int:
    """Log events that mean a request or a loop step reached a bug."""
    return sum(e.get("event") in ("control_request_failed", "loop_step_failed") for e in entries)


# --- the scripted case ------------------------------------------------------------------------------------------------


def goto(daemon: DaemonProcess, target: str) -> None:
    """Move the simulated stage to ``target`` ("control" or "field N") and wait until the daemon sees it still."""
    if target == "control":
        daemon.call("stage", action="goto-control")
    else:
        daemon.call("stage", action="goto-field", field=int(target.split()[1]))

    def arrived() -> bool:
        stage = daemon.call("stage", action="status")["stage"]
        status = daemon.call("status")
        return bool(
            stage["state"] == "held"
            and stage["target"] == target
            and status["camera"]["state"] == "live"
            and status["stability"] in ("stable", "captured")
        )

    wait_for(arrived, f"the stage to rest on {target}")


def capture_scored(daemon: DaemonProcess, target: str) -> str:
    """Capture ``target`` and wait for its result on the publisher; its FOV id (RuntimeError if not scored)."""
    with Subscriber(daemon.endpoints["publish"], [Topic.RESULT.value]) as results:
        goto(daemon, target)
        fov_id = str(daemon.call("capture-control" if target == "control" else "capture")["fov_id"])
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            message = results.receive(timeout_ms=200)
            body: Any = message.body if message is not None else None
            if body is not None and body.fov_id == fov_id and body.status != "pending":
                if body.status != "scored":
                    raise RuntimeError(f"{fov_id} {body.status}: {body.error}")
                return fov_id
    raise TimeoutError(f"no result for {fov_id}")


def settled(daemon: DaemonProcess) -> dict[str, Any]:
    """Wait until the worker is idle and no FOV of the open case waits; the case summary."""

    def done() -> dict[str, Any] | None:
        status = daemon.call("status")
        case: dict[str, Any] = daemon.call("snapshot")["case"]
        idle = status["worker"] == "idle" and status["queue"] == 0 and status["unsaved_images"] == 0
        return case if idle and all(f["status"] != "pending" for f in case["fovs"]) else None

    case: dict[str, Any] = wait_for(done, "every FOV scored")
    return case


# --- 2. kills -------------------------------------------------------------------------------------------------------

FAULTS = ("daemon", "worker-busy", "worker-idle", "recorder")


@dataclass
class CycleReport:
    fault: str
    case_id: str
    kill_step: str
    kill_delay_ms: int
    killed: bool = False
    restart_s: float | None = None  # the killed process's time to ready after the kill (the worker: the daemon's)
    hit_busy: bool | None = None  # worker-busy: the FOV being scored failed with the worker
    acknowledged: list[str] = field(default_factory=list)  # captures the daemon answered
    in_case: list[str] = field(default_factory=list)  # the FOVs of case.json
    lost: list[str] = field(default_factory=list)  # acknowledged, not in case.json, or without an event
    duplicated: list[str] = field(default_factory=list)  # twice in case.json, or two first events
    phantom: list[str] = field(default_factory=list)  # events of FOVs the case does not have
    disagree: list[str] = field(default_factory=list)  # the recorder's last status is not case.json's
    image_not_saved: list[str] = field(default_factory=list)  # failed at restart: the kill beat the image write
    unacknowledged: list[str] = field(default_factory=list)  # in case.json, its reply lost to the kill
    recorder_exit: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.killed and not (self.lost or self.duplicated or self.phantom or self.disagree or self.errors)


class Chaos:
    """Plays scripted cases on a :class:`Bench`, killing one process per case at a moment drawn from ``rng``."""

    def __init__(self, bench: Bench, rng: random.Random, n_fields: int = 3) -> None:
        self.bench = bench
        self.rng = rng
        self.n_fields = n_fields
        self.daemon_restarts: list[float] = []
        self.recorder_restarts: list[float] = []
        self._report: CycleReport | None = None

    @property
    def daemon(self) -> DaemonProcess:
        return self.bench.daemon

    def _supervise(self) -> None:
        """Restart what the chaos killed (from this thread: the children die with the thread that started them)."""
        if self.daemon.process.poll() is not None:
            self.daemon.stop()  # reaped
            self.bench.start_daemon()
            self.daemon_restarts.append(self.daemon.ready_s)
            if self._report is not None and self._report.fault == "daemon":
                self._report.restart_s = self.daemon.ready_s
            self.daemon.call("auto-capture", enabled=False)
        recorder = self.bench.recorder
        if recorder is not None and not recorder.alive():
            recorder.stop()  # reaped
            self.recorder_restarts.append(self.bench.start_recorder().ready_s)
            if self._report is not None and self._report.fault == "recorder":
                self._report.restart_s = self.recorder_restarts[-1]

    def cycle(self, fault: str, n: int) -> CycleReport:
        """One scripted case with one ``fault``; the report of what the daemon and the recorder kept."""
        rng = self.rng
        targets = ["control", *(f"field {rng.randrange(4)}" for _ in range(self.n_fields))]
        steps = ["start", *targets, "close"]
        capture_steps = [i for i, s in enumerate(steps) if s not in ("start", "close")]
        kill_at = rng.choice(capture_steps if fault == "worker-busy" else list(range(len(steps))))
        # busy: within the ~0.1-0.3 s a 960x540 FOV takes to score; idle: before the stage's 0.5 s pan ends in a capture
        delay_ms = {"worker-busy": rng.randrange(0, 60), "worker-idle": rng.randrange(0, 400)}.get(
            fault, rng.randrange(0, 1500)
        )
        report = CycleReport(fault, f"chaos-{n:03d}", steps[kill_at], delay_ms)
        self._report = report
        timer: threading.Timer | None = None
        case_id = report.case_id
        i = 0
        while i < len(steps):
            step = steps[i]
            try:
                if i == kill_at and timer is None:
                    timer = self._arm(fault, delay_ms, report)
                if step == "start":
                    case_id = self._start_case(case_id)
                    report.case_id = case_id
                elif step == "close":
                    self._close(case_id)
                else:
                    fov_id = self._capture(step)
                    if fov_id is not None:
                        report.acknowledged.append(fov_id)
                    if fault == "worker-busy" and i == kill_at:
                        assert timer is not None
                        timer.join()  # the kill lands while this FOV is scored (or just after)
                i += 1
            except DaemonDiedError:
                self._supervise()  # and the step again
            except TimeoutError as error:
                if self.daemon.process.poll() is None:
                    report.errors.append(f"{step}: {error}")
                    i += 1
                else:
                    self._supervise()
            self._supervise()
        if timer is not None:
            timer.join()
        self._supervise()
        self._verify(report)
        return report

    def _arm(self, fault: str, delay_ms: int, report: CycleReport) -> threading.Timer:
        def kill() -> None:
            # waited for: a process just sent SIGKILL may still look alive to the main thread's poll()
            if fault == "daemon":
                self.daemon.kill()
                self.daemon.process.wait(timeout=30)
                report.killed = True
            elif fault == "recorder":
                if self.bench.recorder is not None:
                    self.bench.recorder.kill()
                    self.bench.recorder.process.wait(timeout=30)
                    report.killed = True
            else:
                self._kill_worker(report, busy=fault == "worker-busy")

        if fault == "worker-idle":  # idle: nothing queued or in flight, then a random delay
            settled(self.daemon)
        timer = threading.Timer(delay_ms / 1000.0, kill)
        timer.start()
        return timer

    def _kill_worker(self, report: CycleReport, busy: bool) -> None:
        """SIGKILL the scoring worker, then time until the daemon has a new one ready (on this thread's own
        socket: a ZeroMQ socket belongs to one thread, and the main thread goes on with the case)."""
        daemon = self.daemon
        pid = worker_pid(daemon.pid)
        if pid is None:
            report.errors.append("no scoring worker to kill")
            return
        with ControlClient(daemon.endpoints["control"], timeout_ms=10_000) as control:
            try:
                report.hit_busy = control.call("status")["worker"] == "busy"
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                report.killed = True

                def replaced() -> bool:
                    new = worker_pid(daemon.pid)
                    return new is not None and new != pid and control.call("status")["worker"] in ("idle", "busy")

                wait_for(replaced, "a new scoring worker")
                report.restart_s = time.monotonic() - killed_at
            except (TimeoutError, ControlError) as error:
                report.errors.append(f"worker not replaced: {error}")

    def _start_case(self, case_id: str) -> str:
        reply = self.daemon.request("start-case", case_id=case_id)
        if reply.ok:
            return case_id
        if "already exists" in (reply.error or ""):
            # a retry after a kill: the first request may have opened it already
            if self.daemon.call("snapshot")["case"]["case_id"] == case_id:
                return case_id
            return self._start_case(case_id + "r")  # created but never made current: a new id
        raise RuntimeError(f"start-case refused: {reply.error}")

    def _capture(self, target: str) -> str | None:
        goto(self.daemon, target)
        command = "capture-control" if target == "control" else "capture"
        reply = self.daemon.request(command)
        if not reply.ok:
            raise RuntimeError(f"{command} refused: {reply.error}")
        return str(reply.data["fov_id"])

    def _close(self, case_id: str) -> None:
        case = settled(self.daemon)
        if case["case_id"] == case_id:
            # FOVs whose scoring the worker's death failed are scored again (docs: "retried with rescore"); those
            # whose image never reached the disk cannot be: they stay failed, saying so
            for fov in case["fovs"]:
                if fov["status"] == "failed" and "not saved" not in (fov["error"] or ""):
                    self.daemon.call("rescore", fov_id=fov["fov_id"])
            settled(self.daemon)
            reply = self.daemon.request("close-case", timeout_s=DEADLINE_S)
            if not reply.ok:
                raise RuntimeError(f"close-case refused: {reply.error}")
        elif not self._closed_on_disk(case_id):  # a retry after a kill: it may have closed already
            raise RuntimeError(f"{case_id} is neither open nor closed (open: {case['case_id']})")

    def _closed_on_disk(self, case_id: str) -> bool:
        path = self.bench.state / "cases" / case_id / "case.json"
        return bool(json.loads(path.read_text()).get("closed_at"))

    def _verify(self, report: CycleReport) -> None:
        """Compare what was captured with the daemon's case folder and the recorder's event log."""
        folder = self.bench.state / "cases" / report.case_id
        case = json.loads((folder / "case.json").read_text())
        fovs = case["fovs"]
        ids = [f["fov_id"] for f in fovs]
        report.in_case = ids
        report.duplicated += sorted(i for i, k in Counter(ids).items() if k > 1)
        report.lost += sorted(set(report.acknowledged) - set(ids))
        report.unacknowledged = sorted(set(ids) - set(report.acknowledged))
        for fov in fovs:
            if fov["status"] == "scored":
                try:
                    json.loads((folder / f"{fov['fov_id']}.result.json").read_bytes())
                except (OSError, ValueError) as error:
                    report.lost.append(f"{fov['fov_id']} (result file: {error})")
            elif fov["status"] == "failed" and "not saved" in (fov["error"] or ""):
                report.image_not_saved.append(fov["fov_id"])
            elif fov["status"] == "pending":
                report.errors.append(f"{fov['fov_id']} still pending in a closed case")
        recorded = self.bench.out / report.case_id / "events.jsonl"
        try:
            docs = wait_for(lambda: _stopped(recorded), f"the recorder's stop document of {report.case_id}")
        except TimeoutError as error:
            report.errors.append(str(error))
            docs = _docs(recorded)
        events = [d for d in docs if d.get("doc") == "event"]
        stop = [d for d in docs if d.get("doc") == "stop"]
        report.recorder_exit = stop[-1].get("exit_status") if stop else None
        firsts = Counter(e["fov_id"] for e in events if not e.get("rescore"))
        report.lost += sorted(f"{i} (no event)" for i in set(ids) - set(firsts))
        report.duplicated += sorted(f"{i} (events)" for i, k in firsts.items() if k > 1)
        sources = Counter((e.get("daemon_session"), e.get("daemon_seq")) for e in events if e.get("daemon_seq"))
        report.duplicated += [f"message {s} recorded {k} times" for s, k in sources.items() if k > 1]
        report.phantom = sorted(set(firsts) - set(ids))
        last = {e["fov_id"]: e.get("status") for e in events}
        report.disagree = sorted(f["fov_id"] for f in fovs if f["fov_id"] in last and last[f["fov_id"]] != f["status"])
        if [e.get("seq_num") for e in events] != list(range(1, len(events) + 1)):
            report.errors.append("the recorder's event numbers are not 1..n")


def _docs(path: Path) -> list[dict[str, Any]]:
    return json_lines(path)


def _stopped(path: Path) -> list[dict[str, Any]] | None:
    docs = _docs(path)
    return docs if any(d.get("doc") == "stop" for d in docs) else None


def kill_cycles(
    root: Path, runs: int, seed: int, faults: tuple[str, ...] = FAULTS, preexec_fn: Callable[[], None] = die_with_parent
) -> tuple[list[CycleReport], Chaos]:
    """``runs`` scripted cases per fault (in a seeded random order), each with one SIGKILL."""
    rng = random.Random(seed)
    plan = [fault for fault in faults for _ in range(runs)]
    rng.shuffle(plan)
    bench = Bench(root, preexec_fn)
    chaos = Chaos(bench, rng)
    reports = []
    try:
        bench.daemon.call("auto-capture", enabled=False)
        bench.start_recorder()
        for n, fault in enumerate(plan, 1):
            reports.append(chaos.cycle(fault, n))
    finally:
        bench.close()
    return reports, chaos


# --- 3. full disk ---------------------------------------------------------------------------------------------------


def can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a small filesystem needs root"
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder], capture_output=True)
        if done.returncode != 0:
            return f"mount failed: {done.stderr.decode(errors='replace').strip()}"
        subprocess.run(["umount", folder], check=True)
    return None


@dataclass
class DiskReport:
    size_mib: int
    captures: int = 0
    answered: int = 0
    acknowledged: list[str] = field(default_factory=list)
    refused_full: int = 0  # "cannot write the case to disk"
    other_refusals: list[str] = field(default_factory=list)
    image_not_saved_events: int = 0
    unsaved_peak: int = 0
    lost: list[str] = field(default_factory=list)
    not_scored: list[str] = field(default_factory=list)  # after the disk was freed and the case re-scored
    internal_errors: int = 0
    restart_s: float | None = None
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.answered == self.captures and not (self.lost or self.internal_errors) and self.resumed


@contextlib.contextmanager
def small_disk(size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB, unmounted afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="her2scope-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def full_disk(
    root: Path, size_mib: int = 12, captures: int = 6, preexec_fn: Callable[[], None] = die_with_parent
) -> DiskReport:
    """Captures on a state folder that fills up; then the disk is freed: every capture answered, none lost, and a
    restarted daemon resumes the case."""
    report = DiskReport(size_mib)
    with small_disk(size_mib) as disk:
        bench = Bench(root, preexec_fn, state=disk / "state")
        try:
            daemon = bench.daemon
            daemon.call("auto-capture", enabled=False)
            daemon.call("start-case", case_id="full-disk")
            # the disk fills after a capture or two (a 960x540 FOV is ~1 MB of PNG and ~0.2 MB of result)
            filler = disk / "filler"
            filler.write_bytes(b"\0" * max(0, (size_mib - 3) * 2**20))
            for n in range(captures):
                goto(daemon, f"field {n % 4}")
                report.captures += 1
                reply = daemon.request("capture")
                report.answered += 1
                if reply.ok:
                    report.acknowledged.append(str(reply.data["fov_id"]))
                elif "cannot write the case to disk" in (reply.error or ""):
                    report.refused_full += 1
                else:
                    report.other_refusals.append(reply.error or "")
                report.unsaved_peak = max(report.unsaved_peak, int(daemon.call("status")["unsaved_images"]))
            # the disk is freed (as a person would): the daemon's retries then save what waits in memory
            filler.unlink()
            wait_for(lambda: daemon.call("status")["unsaved_images"] == 0, "the images kept in memory to be saved")
            case = settled(daemon)
            failed = [f["fov_id"] for f in case["fovs"] if f["status"] == "failed"]
            for fov_id in failed:
                daemon.call("rescore", fov_id=fov_id)
            case = settled(daemon)
            ids = [f["fov_id"] for f in case["fovs"]]
            report.lost = sorted(set(report.acknowledged) - set(ids))
            report.not_scored = [f["fov_id"] for f in case["fovs"] if f["status"] != "scored"]
            report.image_not_saved_events = sum(e.get("event") == "image_not_saved" for e in daemon.logs())
            report.internal_errors = _problem_count(daemon.logs())
            daemon.stop()
            again = bench.start_daemon()
            report.restart_s = again.ready_s
            resumed = again.call("snapshot")["case"]
            report.resumed = resumed["case_id"] == "full-disk" and [f["fov_id"] for f in resumed["fovs"]] == ids
        finally:
            bench.close()
    return report


# --- the report -----------------------------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2] * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="scripted cases per fault")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--requests", type=int, default=10_000, help="generated control requests")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    parser.add_argument("--skip", action="append", default=[], choices=["fuzz", "kills", "disk"])
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS, help="the processes to kill")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="her2scope-chaos-"))
    print(f"seed {args.seed}, {os.cpu_count()} cores, logs in {root}")
    figures: dict[str, Any] = {"seed": args.seed, "runs": args.runs, "cores": os.cpu_count()}
    failed = False

    if "fuzz" not in args.skip:
        (root / "fuzz").mkdir()
        bench = Bench(root / "fuzz")
        try:
            fuzzed = fuzz(bench.daemon, args.requests, args.seed)
        finally:
            bench.close()
        figures["fuzz"] = asdict(fuzzed)
        failed |= not fuzzed.ok
        print(
            f"fuzz: {fuzzed.requests} requests, {fuzzed.replies} replies in {fuzzed.seconds:.1f} s; missing "
            f"{fuzzed.missing}, wrong id {fuzzed.id_mismatches}, accepted though invalid "
            f"{fuzzed.accepted_but_must_refuse}, internal errors {fuzzed.internal_errors}, daemon log problems "
            f"{fuzzed.daemon_problems}; status after: {fuzzed.status_after}, capture scored after: "
            f"{fuzzed.capture_scored_after}; RSS {fuzzed.rss_before_mib:.1f} -> {fuzzed.rss_after_mib:.1f} MiB"
        )
        print(f"  families: {fuzzed.families}")
        for example in fuzzed.examples:
            print(f"  ! {example}")

    if "kills" not in args.skip:
        (root / "kills").mkdir()
        reports, chaos = kill_cycles(root / "kills", args.runs, args.seed, tuple(args.faults))
        figures["kills"] = [asdict(r) for r in reports]
        figures["daemon_restarts_s"] = chaos.daemon_restarts
        figures["recorder_restarts_s"] = chaos.recorder_restarts
        for fault in FAULTS:
            mine = [r for r in reports if r.fault == fault]
            if not mine:
                continue
            restarts = [r.restart_s for r in mine if r.restart_s is not None]
            failures = [r for r in mine if not r.ok]
            failed |= bool(failures)
            line = (
                f"kill {fault}: {len(mine)} runs, {len(failures)} failed; FOVs acknowledged "
                f"{sum(len(r.acknowledged) for r in mine)}, lost {sum(len(r.lost) for r in mine)}, duplicated "
                f"{sum(len(r.duplicated) for r in mine)}, phantom {sum(len(r.phantom) for r in mine)}, "
                f"image not saved (marked failed) {sum(len(r.image_not_saved) for r in mine)}, reply lost "
                f"{sum(len(r.unacknowledged) for r in mine)}; recorder stop {Counter(r.recorder_exit for r in mine)}"
            )
            if fault.startswith("worker"):
                line += f"; worker ready again {_ms(restarts)}"
            if fault == "worker-busy":
                line += f"; killed while scoring {sum(bool(r.hit_busy) for r in mine)}/{len(mine)}"
            print(line)
            for r in failures:
                print(f"  ! {r.case_id} ({r.kill_step} +{r.kill_delay_ms} ms): {r}")
        print(f"daemon restarts (spawn -> status answers): {_ms(chaos.daemon_restarts)}")
        print(f"recorder restarts (spawn -> following): {_ms(chaos.recorder_restarts)}")

    if "disk" not in args.skip:
        why = can_mount()
        if why is not None:
            figures["disk"] = {"skipped": why}
            print(f"full disk: skipped ({why})")
        else:
            (root / "disk").mkdir()
            disk = full_disk(root / "disk")
            figures["disk"] = asdict(disk)
            failed |= not disk.ok
            print(f"full disk: {disk}")

    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=1, default=str))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
