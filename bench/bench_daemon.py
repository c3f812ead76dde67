"""Benchmark of the running daemon on the simulated microscope at 1920x1080, 30 fps.

Run: ``python -m bench.bench_daemon [--captures N] [--live-s S] [--soak-s S] [--pixel-size UM]``. It starts a real
daemon process on random loopback ports, with a subscriber reading everything it publishes (as a viewer would), and
measures:

- trigger → result latency: ``capture`` requests sent one at a time on a still field; the time from sending the
  request to receiving the FOV's result on the SUB socket (p50, p95), and the daemon's own ``latency_ms``;
- CPU and memory while live at 30 fps with no captures, the stage still and then panning: CPU time of the daemon
  process (and of its scoring worker, idle) from /proc, as a share of one core; resident memory;
- memory over a longer run (``--soak-s``): resident set size sampled every few seconds, and its growth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from her2scope.clients.control import ControlClient, Subscriber, read_endpoints
from her2scope.clients.demo import terminate
from her2scope.daemon.protocol import Topic

CONFIG = """
[optics]
pixel_size_um = {pixel_size_um}
[daemon.camera]
kind = "simulated"
width = {width}
height = {height}
fps = 30
slide_fields = [2, 2]
pan_ms = 1500
dwell_ms = 1500
script = ["fields 4"]
[daemon.capture]
auto = false
[daemon.zmq]
publish = "tcp://127.0.0.1:*"
control = "tcp://127.0.0.1:*"
[daemon.state]
directory = "{state}"
"""

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def children(pid: int) -> list[int]:
    """Direct child processes (the scoring worker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Drain(threading.Thread):
    """A subscriber that reads every message (like a viewer), remembering result arrival times."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.subscriber = Subscriber(endpoint)
        self.results: dict[str, tuple[float, float | None, float | None]] = {}
        self.overlays: set[str] = set()
        self.previews = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            message = self.subscriber.receive(timeout_ms=100)
            if message is None:
                continue
            if message.header.topic == Topic.RESULT:
                body = message.body
                self.results[body.fov_id] = (time.perf_counter(), body.latency_ms, body.score_ms)  # type: ignore[attr-defined]
            elif message.header.topic == Topic.OVERLAY:
                self.overlays.add(message.body.fov_id)  # type: ignore[attr-defined]
            elif message.header.topic == Topic.PREVIEW:
                self.previews += 1
        self.subscriber.close()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_live(pid: int, seconds: float) -> tuple[float, float, float]:
    """CPU share of one core for the daemon and its children over ``seconds``, and the daemon's RSS."""
    workers = children(pid)
    start_cpu = cpu_seconds(pid)
    start_children = sum(cpu_seconds(c) for c in workers)
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    daemon_share = (cpu_seconds(pid) - start_cpu) / elapsed
    worker_share = (sum(cpu_seconds(c) for c in workers) - start_children) / elapsed
    return 100.0 * daemon_share, 100.0 * worker_share, rss_mib(pid)


def measure_captures(
    control: ControlClient, drain: Drain, captures: int
) -> tuple[list[float], list[float], list[float]]:
    """Send ``captures`` capture requests one at a time on a still field; per capture, in ms: the time from the
    request to its result on the SUB socket, the daemon's own trigger -> result, and the worker's scoring."""
    round_trip: list[float] = []
    in_daemon: list[float] = []
    scoring: list[float] = []
    for _ in range(captures):
        sent = time.perf_counter()
        fov_id = control.call("capture")["fov_id"]
        while fov_id not in drain.results:
            if time.perf_counter() - sent > 30:
                raise SystemExit(f"no result for {fov_id}")
            time.sleep(0.001)
        arrived, latency, score_ms = drain.results[fov_id]
        round_trip.append((arrived - sent) * 1000.0)
        if latency is not None:
            in_daemon.append(latency)
        if score_ms is not None:
            scoring.append(score_ms)
        # the worker draws the overlay after the result: the next capture waits for it, as a pathologist looks at
        # one FOV before the next
        while fov_id not in drain.overlays:
            if time.perf_counter() - sent > 30:
                raise SystemExit(f"no overlay for {fov_id}")
            time.sleep(0.001)
    return round_trip, in_daemon, scoring


@contextmanager
def running_daemon(
    prefix: str, width: int = 1920, height: int = 1080, pixel_size_um: float = 0.25
) -> Iterator[tuple[int, dict[str, str]]]:
    """A daemon process on the simulated microscope (``width`` x ``height`` at 30 fps and ``pixel_size_um``,
    random loopback ports); yields its pid and endpoints, and stops it (SIGTERM, then kill) afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    state = root / "state"
    config = root / "config.toml"
    config.write_text(CONFIG.format(state=state, width=width, height=height, pixel_size_um=pixel_size_um))
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "her2scope", "daemon", "--config", str(config), "--json-logs"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not (state / "endpoints.json").exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"the daemon did not start; see {root / 'daemon.log'}")
            time.sleep(0.1)
        yield process.pid, read_endpoints(state)
    finally:
        terminate(process, timeout_s=20.0)
        log.close()


def main() -> None:
    """Start a daemon, measure, stop it, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--captures", type=int, default=40)
    parser.add_argument("--live-s", type=float, default=20.0)
    parser.add_argument("--soak-s", type=float, default=60.0)
    parser.add_argument(
        "--pixel-size", type=float, default=0.25, help="µm per camera pixel: 0.25 is a 40x objective, 0.5 a 20x one"
    )
    args = parser.parse_args()
    print(f"objective: {args.pixel_size} µm/px")
    with running_daemon("her2scope-bench-", pixel_size_um=args.pixel_size) as (pid, endpoints):
        drain = Drain(endpoints["publish"])
        drain.start()
        with ControlClient(endpoints["control"], timeout_ms=20000) as control:
            while control.call("status")["camera"]["state"] != "live":
                time.sleep(0.2)
            control.call("stage", action="goto-field", field=0)
            while control.call("stage", action="status")["stage"]["state"] != "held":
                time.sleep(0.1)
            time.sleep(2.0)  # let the start-up work settle before measuring

            still_cpu, still_worker, still_rss = measure_live(pid, args.live_s)
            control.call("stage", action="resume")
            pan_cpu, pan_worker, pan_rss = measure_live(pid, args.live_s)
            control.call("stage", action="goto-field", field=1)
            while control.call("stage", action="status")["stage"]["state"] != "held":
                time.sleep(0.1)

            round_trip, in_daemon, scoring = measure_captures(control, drain, args.captures)

            rss: list[tuple[float, float]] = []
            control.call("stage", action="resume")
            start = time.monotonic()
            while time.monotonic() - start < args.soak_s:
                rss.append((time.monotonic() - start, rss_mib(pid)))
                time.sleep(max(1.0, args.soak_s / 30))
        drain.stop.set()
        drain.join(timeout=5)

    half = len(rss) // 2
    first = statistics.mean(r for _, r in rss[: max(1, half)])
    last = statistics.mean(r for _, r in rss[half:]) if rss[half:] else first
    frames = f"1920x1080 @ 30 fps, {args.pixel_size} um/px"
    print(json.dumps({"frames": frames, "captures": args.captures}, indent=None))
    print(
        f"trigger -> result received (SUB), ms:  p50 {percentile(round_trip, 50):6.1f}   "
        f"p95 {percentile(round_trip, 95):6.1f}   max {max(round_trip):6.1f}"
    )
    print(
        f"trigger -> result published (daemon), ms: p50 {percentile(in_daemon, 50):6.1f}   "
        f"p95 {percentile(in_daemon, 95):6.1f}"
    )
    print(
        f"of which scoring (worker), ms:          p50 {percentile(scoring, 50):6.1f}   "
        f"p95 {percentile(scoring, 95):6.1f}"
    )
    print(
        f"live, stage still:   daemon CPU {still_cpu:5.1f}% of one core, idle worker {still_worker:4.1f}%, "
        f"RSS {still_rss:.0f} MiB"
    )
    print(
        f"live, stage panning: daemon CPU {pan_cpu:5.1f}% of one core, idle worker {pan_worker:4.1f}%, "
        f"RSS {pan_rss:.0f} MiB"
    )
    print(
        f"soak {args.soak_s:.0f} s (panning, no captures): RSS first half {first:.1f} MiB, second half "
        f"{last:.1f} MiB, growth {last - first:+.1f} MiB; samples {[round(r) for _, r in rss]}"
    )
    print(f"previews received by the subscriber: {drain.previews}")
    print(
        f"goals: p95 <= 150 ms {'met' if percentile(round_trip, 95) <= 150 else 'NOT met'}; "
        f"CPU <= 25% {'met' if max(still_cpu, pan_cpu) <= 25 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
