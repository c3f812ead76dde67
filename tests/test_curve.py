"""CurveZMQ: a daemon with keys serves the clients on its allow-list and nobody else (docs/protocol.md, section 11).

Real processes on random loopback ports with ``require_curve`` (CURVE on loopback too); the keys are made by
``her2scope keys``. An unknown client's handshake is denied by the daemon's ZAP handler: it gets no message at all.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from her2scope.clients.control import ControlClient, ControlError, Subscriber
from her2scope.daemon.curve import ClientKeys, load_client_keys
from her2scope.daemon.protocol import Topic
from tests.helpers.daemon import CONFIG, running_daemon
from tests.helpers.recorder import RecorderProcess, records_a_capture

pytestmark = pytest.mark.e2e  # the daemon, ctl, the recorder and the keys command as processes

ROOT = Path(__file__).resolve().parent.parent
CURVE_CONFIG = CONFIG.replace("heartbeat_ms = 300\n", "heartbeat_ms = 300\nrequire_curve = true\n")


def _her2scope(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "her2scope", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _keys(state: Path) -> tuple[Path, Path]:
    """The daemon's keys and client 'lab''s, in the state folder, made by `her2scope keys`; (lab's secret key file,
    a stranger's secret key file, made the same way but not on the allow-list)."""
    curve = state / "curve"
    assert _her2scope("keys", "server", "--dir", curve).returncode == 0
    made = _her2scope("keys", "client", "lab", "--dir", curve / "clients")
    assert made.returncode == 0, made.stderr
    stranger = _her2scope("keys", "client", "stranger", "--dir", state.parent / "elsewhere")
    assert stranger.returncode == 0, stranger.stderr
    return curve / "clients" / "lab.key_secret", state.parent / "elsewhere" / "stranger.key_secret"


def _lab(state: Path, key: Path) -> ClientKeys:
    return load_client_keys(key, state / "curve" / "server.key")


def test_keys_are_private_and_not_overwritten(tmp_path: Path) -> None:
    lab, _ = _keys(tmp_path / "state")
    curve = tmp_path / "state" / "curve"
    for path in (curve, curve / "clients", curve / "server.key_secret", lab):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    again = _her2scope("keys", "server", "--dir", curve)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_allow_remote_without_keys_is_refused_at_start(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        CONFIG.format(state=tmp_path / "state").replace(
            'publish = "tcp://127.0.0.1:*"', 'publish = "tcp://0.0.0.0:*"\nallow_remote = true'
        )
    )
    done = _her2scope("daemon", "--config", config)
    assert done.returncode == 2
    assert "error: [daemon.zmq] allow_remote = true needs CURVE keys: no CurveZMQ server key" in done.stderr
    assert "her2scope keys server" in done.stderr
    assert not (tmp_path / "state" / "endpoints.json").exists()  # never bound


def test_only_listed_clients_get_anything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lab_key, stranger_key = _keys(state)
    lab = _lab(state, lab_key)
    stranger = load_client_keys(stranger_key, state / "curve" / "server.key")
    with running_daemon(tmp_path, base_config=CURVE_CONFIG, curve=lab) as daemon:
        config = tmp_path / "config.toml"
        # ctl with the listed key works; without a key, or with another, nothing answers (exit 3)
        ok = _her2scope("ctl", "--key", lab_key, "status", "--config", config, "--json")
        assert ok.returncode == 0 and '"daemon": "running"' in ok.stdout, ok.stderr
        no_key: list[str | Path] = []
        for key in (no_key, ["--key", stranger_key]):
            refused = _her2scope("ctl", *key, "status", "--config", config, "--timeout-ms", "1500")
            assert refused.returncode == 3 and "did not answer" in refused.stderr, refused.stderr
        # a subscriber and a control client with an unknown key or none get nothing, while a listed one is served
        outsiders = [Subscriber(daemon.endpoints["publish"], curve=keys) for keys in (stranger, None)]
        try:
            with daemon.subscribe(Topic.STATUS) as listed:
                heartbeats = 0
                while heartbeats < 5:  # 5 heartbeats (1.5 s) reached the listed subscriber ...
                    message = listed.receive(timeout_ms=5000)
                    assert message is not None, "the listed subscriber got no heartbeat"
                    heartbeats += message.header.topic == Topic.STATUS
            for outsider in outsiders:  # ... and none of them the others
                assert outsider.receive(timeout_ms=0) is None
        finally:
            for outsider in outsiders:
                outsider.close()
        for keys in (stranger, None):
            with (
                ControlClient(daemon.endpoints["control"], timeout_ms=1500, curve=keys) as client,
                pytest.raises(ControlError, match="did not answer"),
            ):
                client.call("status")
        assert daemon.control.call("status")["daemon"] == "running"


def test_the_recorder_records_with_its_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lab_key, _ = _keys(state)
    with running_daemon(tmp_path, base_config=CURVE_CONFIG, curve=_lab(state, lab_key)) as daemon:
        out = tmp_path / "cases"
        recorder = RecorderProcess(tmp_path / "config.toml", out, None, tmp_path / "recorder.log", key=lab_key)
        fov_id = records_a_capture(daemon, recorder, out, "curved")
        assert (out / "curved" / f"{fov_id}.png").exists() or any((out / "curved").rglob(f"{fov_id}*.png"))
