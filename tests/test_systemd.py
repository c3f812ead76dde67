"""sd_notify without systemd: real AF_UNIX datagram sockets stand in for systemd's notification socket.

The last test runs the daemon as a real process with NOTIFY_SOCKET and WATCHDOG_USEC set, as systemd would for
``Type=notify`` and ``WatchdogSec=`` (config/her2scope.service), and listens for READY, WATCHDOG and STOPPING.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from her2scope.daemon import systemd
from tests.helpers.daemon import CONFIG, Daemon


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 108, "AF_UNIX paths are limited to 107 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in Linux's abstract namespace, named "@name" in NOTIFY_SOCKET as systemd does."""
    name = f"her2scope-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_notify_sends_one_datagram_to_a_socket_path(listener: socket.socket) -> None:
    assert systemd.notify("READY=1")
    assert listener.recv(4096) == b"READY=1"
    assert systemd.notify("STATUS=scoring fov-001\nWATCHDOG=1")
    assert listener.recv(4096) == b"STATUS=scoring fov-001\nWATCHDOG=1"


def test_notify_reaches_the_abstract_namespace(abstract_listener: socket.socket) -> None:
    assert systemd.notify("READY=1")
    assert abstract_listener.recv(4096) == b"READY=1"


def test_notify_without_notify_socket_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.notify("READY=1") is False


def test_notify_to_a_socket_that_is_gone_is_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nobody listens: connection refused
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert systemd.notify("READY=1") is False
    path.unlink()  # no file at all
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@her2scope-test-nobody-{uuid.uuid4().hex}")
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("10000000", None, 5000.0),  # WatchdogSec=10s: pet it every 5 s
        ("1000000", "self", 500.0),
        ("1000000", "1", None),  # the watchdog is another process's (WATCHDOG_PID mismatch)
        ("ten seconds", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval_ms() == expected


def _receive_until(sock: socket.socket, wanted: set[str], timeout_s: float, seen: list[str]) -> None:
    """Collect notification lines into ``seen`` until every line in ``wanted`` has arrived."""
    deadline = time.monotonic() + timeout_s
    while not wanted <= set(seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {sorted(wanted - set(seen))}; received {seen}")
        sock.settimeout(remaining)
        try:
            seen.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            continue


def _drain(sock: socket.socket, seen: list[str]) -> None:
    """Collect the notification lines already queued on ``sock`` into ``seen``."""
    sock.settimeout(0.1)
    while True:
        try:
            seen.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            return


@pytest.mark.e2e
def test_the_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, abstract_listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTIFY_SOCKET is set by abstract_listener; the Daemon helper passes os.environ on to the process
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # systemd sets it to the main PID; unset is accepted too
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(state=state))
    daemon = Daemon(state, config, tmp_path / "daemon.log")
    seen: list[str] = []
    try:
        _receive_until(abstract_listener, {"READY=1"}, 10.0, seen)
        assert "STATUS=running" in seen and "STOPPING=1" not in seen
        # WATCHDOG=1 every 500 ms (half of WATCHDOG_USEC) from the main loop: several within two seconds
        time.sleep(2.0)
        _drain(abstract_listener, seen)
        assert seen.count("WATCHDOG=1") >= 3, seen
    finally:
        code = daemon.stop()
    assert code == 0
    _receive_until(abstract_listener, {"STOPPING=1"}, 5.0, seen)
    assert seen.index("READY=1") < seen.index("STOPPING=1")
