"""``her2scope web`` as a real process beside a test daemon, and headless Chromium driven by Selenium through the
system's chromedriver (Debian packages ``chromium`` and ``chromium-driver``; never a driver Selenium would download)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from her2scope.clients.export import find_chromium
from tests.helpers.daemon import Daemon, wait_for
from tests.helpers.processes import ROOT, die_with_parent

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMEDRIVER is None or CHROMIUM is None,
    reason="Chromium and its driver are not installed (Debian: apt-get install chromium chromium-driver)",
)
#: The browser's window: the page's layout at a workstation monitor's width.
WINDOW = (1600, 1000)


class WebProcess:
    """``her2scope web`` on a random loopback port, following ``daemon``; ``url`` once it serves (and the URL with
    the token it made, ``control_url``, when it made one)."""

    def __init__(self, daemon: Daemon, root: Path, *options: str, env: dict[str, str] | None = None) -> None:
        self.log_path = root / "web.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "her2scope", "web", "--config", str(root / "config.toml")),
                *("--daemon-state", str(daemon.state), "--port", "0", "--json-logs", *options),
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            text=True,
            preexec_fn=die_with_parent,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            line = str(wait_for(self._serving, timeout_s=60, what="her2scope web to serve"))
        except BaseException:
            self.stop()
            raise
        self.url = line.removeprefix("serving ").strip()
        made = [line for line in self.lines if line.startswith("control: open ")]
        self.control_url = made[0].split()[2] if made else None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def _serving(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"her2scope web exited with {self.process.returncode}: {self.log_path.read_text()}")
        return next((line for line in self.lines if line.startswith("serving ")), None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=5)
            self._reader.join(timeout=10)  # the pipe is at its end once the process has gone
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.log.close()
        return code


@contextlib.contextmanager
def running_web(daemon: Daemon, root: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[WebProcess]:
    web = WebProcess(daemon, root, *options, env=env)
    try:
        yield web
    finally:
        web.stop()


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    """A headless Chromium through the system's chromedriver, with a 1600x1000 page; quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMEDRIVER is not None and CHROMIUM is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        # the page's own size, whatever the headless window's frame takes
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()
