"""Benchmark: does the browser viewer with 20 tabs slow the daemon? Trigger -> result without and with it.

Run: ``python -m bench.bench_web [--captures N] [--tabs N]``. It starts a real daemon on the simulated microscope
(1920x1080, 30 fps, random loopback ports; ``bench.bench_daemon``'s), with a subscriber reading everything it
publishes, and measures trigger -> result (``bench_daemon.measure_captures``: a ``capture`` request to its result on
the SUB socket, one at a time on a still field) twice: first with no browser viewer, then with ``her2scope web``
following the daemon and ``--tabs`` WebSocket clients (aiohttp, as many browser tabs) reading everything it pushes.
It reports p50/p95 of both, what the tabs received, and the web process's CPU and resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.context
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import ClientSession, ClientWebSocketResponse, WSMsgType

from bench.bench_daemon import Drain, cpu_seconds, measure_captures, percentile, rss_mib, running_daemon
from her2scope.clients.control import ControlClient
from her2scope.clients.demo import terminate

WEB_CONFIG = """
[daemon.zmq]
publish = "{publish}"
control = "{control}"
"""


_SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: the parent has ZeroMQ threads


class Tabs(multiprocessing.context.SpawnProcess):
    """``count`` WebSocket clients of the browser viewer, reading every message, in a process of their own: as tabs
    in browsers, they do not share the interpreter (and its lock) of the subscriber that times the results."""

    def __init__(self, url: str, count: int) -> None:
        super().__init__(daemon=True)
        self.url, self.count = url, count
        self.models = _SPAWN.Array("q", count)
        self.previews = _SPAWN.Array("q", count)
        self.received = _SPAWN.Value("q", 0)  # bytes
        self.connected = _SPAWN.Event()
        self.stop = _SPAWN.Event()

    def run(self) -> None:
        asyncio.run(self._all())

    async def _all(self) -> None:
        async with ClientSession() as session:
            sockets = [await session.ws_connect(self.url) for _ in range(self.count)]
            self.connected.set()
            readers = [asyncio.create_task(self._read(index, socket)) for index, socket in enumerate(sockets)]
            while not self.stop.is_set():
                await asyncio.sleep(0.1)
            for socket in sockets:
                await socket.close()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _read(self, index: int, socket: ClientWebSocketResponse) -> None:
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                self.models[index] += 1
            elif message.type == WSMsgType.BINARY:
                self.previews[index] += 1
            else:
                continue
            with self.received.get_lock():
                self.received.value += len(message.data)


def _report(name: str, values: list[float]) -> str:
    return f"{name}: p50 {percentile(values, 50):6.1f}   p95 {percentile(values, 95):6.1f}   max {max(values):6.1f} ms"


def main() -> None:
    """Start a daemon, measure without and with the browser viewer and its tabs, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=int, default=30)
    parser.add_argument("--tabs", type=int, default=20)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="her2scope-bench-web-"))
    with running_daemon("her2scope-bench-web-daemon-") as (pid, endpoints):
        drain = Drain(endpoints["publish"])
        drain.start()
        with ControlClient(endpoints["control"], timeout_ms=20000) as control:
            while control.call("status")["camera"]["state"] != "live":
                time.sleep(0.2)
            control.call("auto-capture", enabled=False)
            control.call("stage", action="goto-field", field=1)
            while control.call("stage", action="status")["stage"]["state"] != "held":
                time.sleep(0.1)
            time.sleep(2.0)  # let the start-up work settle before measuring
            alone, alone_daemon, _ = measure_captures(control, drain, args.captures)

            config = root / "web.toml"
            config.write_text(WEB_CONFIG.format(**endpoints))
            log = open(root / "web.log", "wb")  # noqa: SIM115 - closed below
            web = subprocess.Popen(
                [sys.executable, "-m", "her2scope", "web", "--config", str(config), "--port", "0", "--json-logs"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            try:
                assert web.stdout is not None
                url = web.stdout.readline().removeprefix("serving ").strip()
                if not url.startswith("http"):
                    raise SystemExit(f"her2scope web did not start; see {root / 'web.log'}")
                tabs = Tabs(url.replace("http://", "ws://") + "ws", args.tabs)
                tabs.start()
                if not tabs.connected.wait(60):
                    raise SystemExit("the tabs could not connect")
                time.sleep(2.0)
                rss_start, cpu_start, started = rss_mib(web.pid), cpu_seconds(web.pid), time.monotonic()
                assert tabs.pid is not None
                tabs_cpu_start = cpu_seconds(tabs.pid)
                daemon_cpu_start = cpu_seconds(pid)
                shared, shared_daemon, _ = measure_captures(control, drain, args.captures)
                elapsed = time.monotonic() - started
                web_cpu = 100.0 * (cpu_seconds(web.pid) - cpu_start) / elapsed
                tabs_cpu = 100.0 * (cpu_seconds(tabs.pid) - tabs_cpu_start) / elapsed
                daemon_cpu = 100.0 * (cpu_seconds(pid) - daemon_cpu_start) / elapsed
                rss_end = rss_mib(web.pid)
                tabs.stop.set()
                tabs.join(timeout=30)
            finally:
                terminate(web, timeout_s=20.0)
                if web.stdout is not None:
                    web.stdout.close()
                log.close()
        drain.stop.set()
        drain.join(timeout=5)

    models, previews = list(tabs.models[:]), list(tabs.previews[:])
    print(json.dumps({"frames": "1920x1080 @ 30 fps, 0.25 um/px", "captures": args.captures, "tabs": args.tabs}))
    print(_report("no browser viewer,     trigger -> result (SUB)", alone))
    print(_report(f"web + {args.tabs} tabs,          trigger -> result (SUB)", shared))
    print(_report("no browser viewer,     trigger -> result (daemon)", alone_daemon))
    print(_report(f"web + {args.tabs} tabs,          trigger -> result (daemon)", shared_daemon))
    print(
        f"during the captures with the tabs: web CPU {web_cpu:.0f}% of one core, the tabs' {tabs_cpu:.0f}%, daemon "
        f"CPU {daemon_cpu:.0f}%; web RSS {rss_start:.0f} -> {rss_end:.0f} MiB"
    )
    print(
        f"each tab received {min(models)}-{max(models)} view models and "
        f"{min(previews)}-{max(previews)} previews ({tabs.received.value / 1e6:.0f} MB in all)"
    )


if __name__ == "__main__":
    main()
