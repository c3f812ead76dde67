"""Tests of the foot pedal (daemon.pedal): key mapping, grab, unplug and reconnect, errors that say what to do."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from her2scope.config.daemon import PedalConfig
from her2scope.daemon.pedal import (
    EV_KEY,
    FootPedal,
    KeyEvent,
    PedalDevice,
    PedalError,
    PedalState,
    PedalStatus,
    TriggerKind,
    open_evdev_device,
    resolve_keys,
)

evdev = pytest.importorskip("evdev", reason="python-evdev is not installed (pip install 'her2scope[pedal]')")
ecodes = evdev.ecodes
TIMEOUT_S = 3.0
UINPUT_USABLE = os.path.exists("/dev/uinput") and os.access("/dev/uinput", os.W_OK)


def key(code: int, value: int, event_type: int = EV_KEY) -> KeyEvent:
    """A real evdev event (seconds, microseconds, type, code, value)."""
    event: KeyEvent = evdev.InputEvent(0, 0, event_type, code, value)
    return event


class PipeDevice:
    """A stand-in for ``evdev.InputDevice`` with a real file descriptor: select() wakes when events are pushed."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._events: queue.SimpleQueue[KeyEvent] = queue.SimpleQueue()
        self.unplugged = False
        self.calls: list[str] = []
        self.closed = threading.Event()

    @property
    def fd(self) -> int:
        return self._read_fd

    def push(self, *events: KeyEvent) -> None:
        for event in events:
            self._events.put(event)
        os.write(self._write_fd, b"e")

    def unplug(self) -> None:
        self.unplugged = True
        os.write(self._write_fd, b"u")

    def read(self) -> Iterator[KeyEvent]:
        if self.unplugged:
            raise OSError(errno.ENODEV, "No such device")
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        if self._events.empty():
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        while not self._events.empty():
            yield self._events.get()

    def grab(self) -> None:
        self.calls.append("grab")

    def ungrab(self) -> None:
        self.calls.append("ungrab")
        if self.unplugged:
            raise OSError(errno.ENODEV, "No such device")

    def close(self) -> None:
        self.calls.append("close")
        os.close(self._read_fd)
        os.close(self._write_fd)
        self.closed.set()


class Opener:
    """Hands out devices in order; a PedalError stands for a pedal that is not plugged in."""

    def __init__(self, *devices: PipeDevice | PedalError) -> None:
        self.devices = list(devices)
        self.paths: list[Path] = []
        self.opened = threading.Semaphore(0)

    def __call__(self, path: Path) -> PipeDevice:
        self.paths.append(path)
        self.opened.release()
        item = self.devices.pop(0) if len(self.devices) > 1 else self.devices[0]
        if isinstance(item, PedalError):
            raise item
        return item


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT_S} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def triggers() -> queue.SimpleQueue[TriggerKind]:
    return queue.SimpleQueue()


def config(**changes: object) -> PedalConfig:
    return PedalConfig(enabled=True, device=Path("/dev/input/test-pedal"), **changes)


# ------------------------------------------------------------------------------------------------ key handling


def test_only_key_down_of_configured_keys_triggers() -> None:
    fired: list[TriggerKind] = []
    pedal = FootPedal(config(), fired.append)
    pedal._keys = resolve_keys(config())
    count = pedal._handle_events(
        [
            key(ecodes.KEY_B, 1),
            key(ecodes.KEY_B, 2),  # auto-repeat
            key(ecodes.KEY_B, 0),  # release
            key(ecodes.KEY_C, 1),
            key(ecodes.KEY_A, 1),  # not configured
            key(ecodes.MSC_SCAN, 1, ecodes.EV_MSC),  # the scan code HID keyboards send with each key
            key(0, 0, ecodes.EV_SYN),
        ]
    )
    assert fired == [TriggerKind.FOV, TriggerKind.CONTROL]
    assert count == 2


def test_resolve_keys_without_control_key() -> None:
    assert resolve_keys(config(capture_key="KEY_F13", control_key=None)) == {ecodes.KEY_F13: TriggerKind.FOV}


@pytest.mark.parametrize("name", ["KEY_NOPE", "B", "EV_KEY", "SYN_REPORT"])
def test_unknown_key_names_are_rejected_with_examples(name: str) -> None:
    pedal = FootPedal(config(capture_key=name), lambda kind: None)
    with pytest.raises(PedalError, match=rf"unknown pedal key '{name}'.*KEY_B, KEY_C"):
        pedal.start()
    assert pedal.status.state is PedalState.STOPPED


def test_same_key_twice_is_rejected() -> None:
    with pytest.raises(PedalError, match="different keys"):
        resolve_keys(config(capture_key="KEY_B", control_key="KEY_B"))


def test_missing_evdev_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "evdev", None)  # import evdev now raises ImportError
    with pytest.raises(PedalError, match=r"python-evdev: pip install 'her2scope\[pedal\]'"):
        FootPedal(config(), lambda kind: None).start()
    with pytest.raises(PedalError, match="python-evdev"):
        open_evdev_device(Path("/dev/input/event0"))


def test_missing_device_names_the_path_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "no-such-pedal"
    with pytest.raises(PedalError) as raised:
        open_evdev_device(path)
    message = str(raised.value)
    assert str(path) in message
    assert "ls -l /dev/input/by-id/" in message
    assert "config/99-her2scope-pedal.rules" in message


def test_unreadable_device_suggests_the_udev_rule(tmp_path: Path) -> None:
    path = tmp_path / "not-an-input-device"
    path.write_bytes(b"")
    with pytest.raises(PedalError, match=r"cannot open foot pedal|no permission"):
        open_evdev_device(path)  # a regular file: the EVIOCGVERSION ioctl fails (or, as non-root, open does)


# ------------------------------------------------------------------------------------------------ the thread


def test_presses_become_triggers_and_stop_releases_the_grab(triggers: queue.SimpleQueue[TriggerKind]) -> None:
    device = PipeDevice()
    statuses: list[PedalStatus] = []
    pedal = FootPedal(config(), triggers.put, opener=Opener(device), on_status=statuses.append)
    with pedal:
        wait_for(lambda: pedal.status.state is PedalState.CONNECTED, "the pedal to connect")
        assert pedal.status.grabbed
        assert device.calls == ["grab"]
        device.push(key(ecodes.KEY_B, 1), key(ecodes.KEY_B, 0))
        assert triggers.get(timeout=TIMEOUT_S) is TriggerKind.FOV
        device.push(key(ecodes.KEY_B, 2), key(ecodes.KEY_C, 1), key(ecodes.KEY_C, 0))
        assert triggers.get(timeout=TIMEOUT_S) is TriggerKind.CONTROL
        wait_for(lambda: pedal.status.triggers == 2, "two triggers counted")
    assert device.calls == ["grab", "ungrab", "close"]
    assert pedal.status.state is PedalState.STOPPED
    assert not pedal.status.grabbed
    assert triggers.empty()
    assert [s.state for s in statuses] == [PedalState.CONNECTING, PedalState.CONNECTED, PedalState.STOPPED]
    pedal.stop()  # twice is fine


def test_no_grab_when_not_configured(triggers: queue.SimpleQueue[TriggerKind]) -> None:
    device = PipeDevice()
    with FootPedal(config(grab=False), triggers.put, opener=Opener(device)) as pedal:
        wait_for(lambda: pedal.status.state is PedalState.CONNECTED, "the pedal to connect")
        assert not pedal.status.grabbed
    assert device.calls == ["close"]


def test_a_failing_callback_does_not_kill_the_thread() -> None:
    device = PipeDevice()
    delivered: queue.SimpleQueue[TriggerKind] = queue.SimpleQueue()

    def on_trigger(kind: TriggerKind) -> None:
        delivered.put(kind)
        if delivered.qsize() == 1:
            raise RuntimeError("the capture queue is broken")

    with capture_logs() as logs, FootPedal(config(), on_trigger, opener=Opener(device)) as pedal:
        wait_for(lambda: pedal.status.state is PedalState.CONNECTED, "the pedal to connect")
        device.push(key(ecodes.KEY_B, 1))
        assert delivered.get(timeout=TIMEOUT_S) is TriggerKind.FOV
        device.push(key(ecodes.KEY_B, 1))
        assert delivered.get(timeout=TIMEOUT_S) is TriggerKind.FOV
        assert pedal.status.state is PedalState.CONNECTED
    assert any(entry["event"] == "pedal_on_trigger_failed" for entry in logs)


def test_unplug_is_reported_and_the_pedal_reopened(triggers: queue.SimpleQueue[TriggerKind]) -> None:
    first, second = PipeDevice(), PipeDevice()
    missing = PedalError("foot pedal /dev/input/test-pedal not found")
    opener = Opener(first, missing, second)
    with FootPedal(config(), triggers.put, opener=opener, retry_interval_s=0.02) as pedal:
        wait_for(lambda: pedal.status.state is PedalState.CONNECTED, "the pedal to connect")
        first.unplug()
        wait_for(lambda: pedal.status.reconnects == 1, "the pedal to reconnect")
        assert first.calls == ["grab", "ungrab", "close"]  # ungrab fails with ENODEV: ignored, still closed
        assert pedal.status.state is PedalState.CONNECTED
        assert pedal.status.last_error is not None and "not found" in pedal.status.last_error
        second.push(key(ecodes.KEY_B, 1))
        assert triggers.get(timeout=TIMEOUT_S) is TriggerKind.FOV
    assert len(opener.paths) == 3
    assert second.closed.is_set()


def test_missing_device_is_retried_until_stopped(tmp_path: Path) -> None:
    path = tmp_path / "pedal"
    attempts: list[Path] = []

    def opener(path: Path) -> PedalDevice:
        attempts.append(path)
        return open_evdev_device(path)  # the real opener, on a node that does not exist

    with (
        capture_logs() as logs,
        FootPedal(PedalConfig(device=path), lambda kind: None, opener=opener, retry_interval_s=0.01) as pedal,
    ):
        wait_for(lambda: len(attempts) >= 3, "three attempts to open the pedal")
        assert pedal.status.state is PedalState.DISCONNECTED
        error = pedal.status.last_error
        assert error is not None and str(path) in error and "/dev/input/by-id/" in error
    assert pedal.status.state is PedalState.STOPPED  # type: ignore[comparison-overlap]  # changed by stop()
    warnings = [entry for entry in logs if entry["event"] == "pedal_disconnected"]
    assert len(warnings) == 1  # logged once, not on every retry


def test_busy_grab_is_reported(triggers: queue.SimpleQueue[TriggerKind]) -> None:
    class BusyDevice(PipeDevice):
        def grab(self) -> None:
            raise OSError(errno.EBUSY, "Device or resource busy")

    device = BusyDevice()
    with FootPedal(config(), triggers.put, opener=Opener(device), retry_interval_s=0.01) as pedal:
        wait_for(lambda: pedal.status.state is PedalState.DISCONNECTED, "the grab to fail")
        assert "another program has grabbed it" in (pedal.status.last_error or "")
    assert device.closed.is_set()


def test_start_twice_raises() -> None:
    with FootPedal(config(), lambda kind: None, opener=Opener(PipeDevice())) as pedal, pytest.raises(RuntimeError):
        pedal.start()


# ------------------------------------------------------------------------------------------------ real hardware


@pytest.mark.skipif(not UINPUT_USABLE, reason="/dev/uinput is missing or not writable (no uinput in this kernel)")
def test_virtual_keyboard_through_uinput(triggers: queue.SimpleQueue[TriggerKind]) -> None:
    with evdev.UInput({ecodes.EV_KEY: [ecodes.KEY_B, ecodes.KEY_C]}, name="her2scope-test-pedal") as keyboard:
        wait_for(lambda: Path(keyboard.device.path).exists(), "the virtual keyboard's node")
        with FootPedal(PedalConfig(device=Path(keyboard.device.path)), triggers.put) as pedal:
            wait_for(lambda: pedal.status.state is PedalState.CONNECTED, "the pedal to connect")
            assert pedal.status.grabbed
            for code in (ecodes.KEY_B, ecodes.KEY_C):
                keyboard.write(ecodes.EV_KEY, code, 1)
                keyboard.write(ecodes.EV_KEY, code, 0)
                keyboard.syn()
            assert triggers.get(timeout=TIMEOUT_S) is TriggerKind.FOV
            assert triggers.get(timeout=TIMEOUT_S) is TriggerKind.CONTROL
