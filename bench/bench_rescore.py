"""Benchmark of ``rescore`` on a whole case: reply latency, the scoring queue and the daemon's memory.

Run: ``python -m bench.bench_rescore [--fovs N] [--rescores K]``. It starts a real daemon on the simulated
microscope at 1920x1080 (random loopback ports), captures N FOVs, waits until they are scored and on disk, then
sends K ``rescore`` requests in a row, one after the other, and a ``status`` right after them. It prints each
re-score's reply time, the queue length (``status.queue``), the ``status`` reply time and the daemon's RSS growth.
"""

from __future__ import annotations

import argparse
import time

from bench.bench_daemon import rss_mib, running_daemon
from her2scope.clients.control import ControlClient


def main() -> None:
    """Start a daemon, fill a case, re-score it K times, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fovs", type=int, default=13)
    parser.add_argument("--rescores", type=int, default=5)
    args = parser.parse_args()
    with (
        running_daemon("her2scope-bench-rescore-", pixel_size_um=0.5) as (pid, endpoints),
        ControlClient(endpoints["control"], timeout_ms=60_000) as control,
    ):
        while control.call("status")["camera"]["state"] != "live":
            time.sleep(0.1)
        control.call("start-case", case_id="bench-rescore")
        for _ in range(args.fovs):
            control.call("capture")
        print(f"{args.fovs} FOVs captured; waiting until they are scored and on disk ...", flush=True)
        while True:
            status = control.call("status")
            fovs = control.call("snapshot")["case"]["fovs"]
            if (
                status["unsaved_images"] == 0
                and status["worker"] == "idle"
                and all(f["status"] != "pending" for f in fovs)
            ):
                break
            time.sleep(0.2)
        baseline = rss_mib(pid)
        for i in range(args.rescores):
            start = time.perf_counter()
            reply, _ = control.request("rescore")
            elapsed = (time.perf_counter() - start) * 1000.0
            outcome = reply.data if reply.ok else reply.error
            print(f"rescore {i + 1}: reply in {elapsed:6.1f} ms: {outcome}")
        start = time.perf_counter()
        status = control.call("status")
        elapsed = (time.perf_counter() - start) * 1000.0
        print(f"status: reply in {elapsed:.1f} ms; queue {status['queue']}, worker {status['worker']}")
        print(f"daemon RSS growth: {rss_mib(pid) - baseline:+.0f} MiB")


if __name__ == "__main__":
    main()
