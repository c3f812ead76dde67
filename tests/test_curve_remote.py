"""A daemon in remote mode (``allow_remote``, bound to 127.0.0.2, which the configuration does not take for the
workstation's loopback) with CURVE keys: the viewer's link, ctl and the recorder with a listed key are served, a
keyless or unknown-key client gets nothing (docs/protocol.md, section 11)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from her2scope.clients.control import ControlClient, ControlError
from her2scope.clients.viewer.link import DaemonLink, Endpoints
from her2scope.clients.viewer.state import daemon_responding, initial_state
from her2scope.daemon.curve import ClientKeys, load_client_keys
from tests.helpers.daemon import CONFIG, running_daemon
from tests.helpers.recorder import RecorderProcess, records_a_capture

pytestmark = pytest.mark.e2e  # a daemon process in remote mode

ROOT = Path(__file__).resolve().parent.parent
REMOTE_CONFIG = CONFIG.replace(
    'publish = "tcp://127.0.0.1:*"\ncontrol = "tcp://127.0.0.1:*"',
    'publish = "tcp://127.0.0.2:*"\ncontrol = "tcp://127.0.0.2:*"\nallow_remote = true',
)


def _her2scope(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "her2scope", *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def _client_keys(state: Path, name: str, listed: bool) -> tuple[Path, ClientKeys]:
    folder = state / "curve" / "clients" if listed else state.parent / "elsewhere"
    assert _her2scope("keys", "client", name, "--dir", folder).returncode == 0
    secret = folder / f"{name}.key_secret"
    return secret, load_client_keys(secret, state / "curve" / "server.key")


def _link_hears_the_daemon(endpoints: dict[str, str], keys: ClientKeys | None, within_s: float) -> bool:
    """Whether the viewer's link, with ``keys``, gets the daemon's heartbeat and a snapshot within ``within_s``."""
    link = DaemonLink(
        Endpoints(endpoints["publish"], endpoints["control"]), control_timeout_ms=1000, heartbeat_ms=300, curve=keys
    )
    try:
        state = link.start(initial_state(time.monotonic()))
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            state = link.poll(state, timeout_ms=100)
            if daemon_responding(state) and state.session is not None:
                return True
        return False
    finally:
        link.close()


def test_remote_mode_serves_listed_keys_only(tmp_path: Path) -> None:
    assert "allow_remote = true" in REMOTE_CONFIG
    state = tmp_path / "state"
    assert _her2scope("keys", "server", "--dir", state / "curve").returncode == 0
    lab_secret, lab = _client_keys(state, "wall-screen", listed=True)
    _, stranger = _client_keys(state, "stranger", listed=False)
    with running_daemon(tmp_path, base_config=REMOTE_CONFIG, curve=lab) as daemon:
        assert daemon.endpoints["control"].startswith("tcp://127.0.0.2:")
        assert _link_hears_the_daemon(daemon.endpoints, lab, within_s=30.0)  # the viewer, remotely, with its key
        done = _her2scope("ctl", "--key", lab_secret, "status", "--config", tmp_path / "config.toml", "--json")
        assert done.returncode == 0 and '"daemon": "running"' in done.stdout, done.stderr
        for keys in (stranger, None):
            assert not _link_hears_the_daemon(daemon.endpoints, keys, within_s=2.0)
            with (
                ControlClient(daemon.endpoints["control"], timeout_ms=1000, curve=keys) as client,
                pytest.raises(ControlError, match="did not answer"),
            ):
                client.call("status")
        assert daemon.control.call("status")["daemon"] == "running"  # the strangers changed nothing
        # the recorder, remotely, with its key: a captured FOV reaches its case log
        out = tmp_path / "cases"
        recorder = RecorderProcess(tmp_path / "config.toml", out, None, tmp_path / "recorder.log", key=lab_secret)
        records_a_capture(daemon, recorder, out, "remote")
