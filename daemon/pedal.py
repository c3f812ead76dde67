"""The foot pedal: a USB HID keyboard read with python-evdev on its own thread, its keys turned into capture triggers.

The pedal is grabbed (``EVIOCGRAB``) so that its key never reaches the focused window. Only key-down events count
(value 1); auto-repeats (2) and releases (0) are ignored. An unplugged pedal is reported and reopened every
``retry_interval_s`` until ``stop()``; nothing the device or the ``on_trigger`` callback does ends the thread.

State diagram (``PedalState``)::

    CONNECTING --opened (and grabbed)--> CONNECTED --unplugged, read error--> DISCONNECTED
        |                                                                        |   ^
        \\--not found, no permission, grabbed by another program---------------/   |
                                                                                     |
    DISCONNECTED --every retry_interval_s: open--> CONNECTED (reconnects += 1) or DISCONNECTED
    any state --stop(): ungrab, close--> STOPPED

python-evdev is an optional extra (``pip install 'her2scope[pedal]'``), imported only when a pedal is started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Final, Protocol, Self

import structlog

from her2scope.config.daemon import PedalConfig

__all__ = [
    "FootPedal",
    "KeyEvent",
    "PedalDevice",
    "PedalError",
    "PedalState",
    "PedalStatus",
    "TriggerKind",
    "open_evdev_device",
    "resolve_keys",
]

log = structlog.get_logger(__name__)

EV_KEY: Final = 1
"""The Linux input event type of key events (``linux/input-event-codes.h``; ``evdev.ecodes.EV_KEY``)."""
KEY_DOWN: Final = 1
"""Key event value of a press; 0 is a release, 2 an auto-repeat."""
INSTALL_HINT: Final = "the foot pedal needs python-evdev: pip install 'her2scope[pedal]'"
UDEV_RULE: Final = "config/99-her2scope-pedal.rules"


class PedalError(RuntimeError):
    """The pedal cannot be used (evdev missing, unknown key, device missing or busy); the message says what to do."""


class TriggerKind(StrEnum):
    """What a pedal key asks for."""

    FOV = "fov"
    """Capture the current field of view."""
    CONTROL = "control"
    """Capture the positive control."""


class PedalState(StrEnum):
    """The pedal thread's view of the device."""

    CONNECTING = "connecting"
    """Started; the device is being opened for the first time."""
    CONNECTED = "connected"
    """Open (and grabbed when configured); key presses become triggers."""
    DISCONNECTED = "disconnected"
    """Not found, not readable, busy or unplugged; reopened every ``retry_interval_s``."""
    STOPPED = "stopped"
    """``stop()`` was called (or the pedal was never started); the device is released."""


@dataclass(frozen=True, slots=True)
class PedalStatus:
    """A snapshot of the pedal, for the status topic.

    Attributes
    ----------
    state : the current state
    device : the device node
    grabbed : the device is grabbed (its keys reach no other program)
    triggers : triggers fired since start
    reconnects : times the pedal came back after being DISCONNECTED
    last_error : why the pedal was last disconnected or could not be opened; None if it never was
    """

    state: PedalState
    device: str
    grabbed: bool
    triggers: int
    reconnects: int
    last_error: str | None


class KeyEvent(Protocol):
    """An input event as python-evdev delivers it (``evdev.InputEvent``)."""

    @property
    def type(self) -> int: ...

    @property
    def code(self) -> int: ...

    @property
    def value(self) -> int: ...


class PedalDevice(Protocol):
    """The part of ``evdev.InputDevice`` the pedal uses; tests substitute a device built on a pipe."""

    @property
    def fd(self) -> int:
        """A file descriptor that select() reports readable when events (or an error) are pending."""
        ...

    def read(self) -> Iterable[KeyEvent]:
        """The pending events; BlockingIOError when none, OSError (ENODEV) when the device is gone."""
        ...

    def grab(self) -> None:
        """Take the device exclusively (its events reach no other reader)."""
        ...

    def ungrab(self) -> None:
        """Release an exclusive grab."""
        ...

    def close(self) -> None:
        """Close the device."""
        ...


def _import_evdev() -> ModuleType:
    try:
        import evdev
    except ImportError as error:
        raise PedalError(INSTALL_HINT) from error
    module: ModuleType = evdev
    return module


def resolve_keys(config: PedalConfig) -> dict[int, TriggerKind]:
    """Map the configured key names (``KEY_B``) to their evdev key codes.

    Raises
    ------
    PedalError
        python-evdev is not installed, a name is not an evdev key name, or both triggers use the same key.
    """
    ecodes = _import_evdev().ecodes
    names: Mapping[str, int] = ecodes.ecodes
    wanted = [(config.capture_key, TriggerKind.FOV)]
    if config.control_key is not None:
        wanted.append((config.control_key, TriggerKind.CONTROL))
    keys: dict[int, TriggerKind] = {}
    for name, kind in wanted:
        code = names.get(name) if name.startswith(("KEY_", "BTN_")) else None
        if code is None:
            examples = ", ".join(["KEY_B", "KEY_C", "KEY_F13", "KEY_PAGEDOWN", "KEY_ENTER", "BTN_LEFT"])
            raise PedalError(
                f"unknown pedal key {name!r} for the {kind.value} trigger: use an evdev key name such as {examples} "
                "(run `python -m evdev.evtest` and press the pedal to see its key)"
            )
        if code in keys:
            raise PedalError(f"pedal keys capture_key and control_key are both {name!r}: give them different keys")
        keys[code] = kind
    return keys


def open_evdev_device(path: Path) -> PedalDevice:
    """Open an evdev device node, with errors that say how to fix them.

    Raises
    ------
    PedalError
        evdev is missing, the node does not exist or cannot be read.
    """
    evdev = _import_evdev()
    try:
        device: PedalDevice = evdev.InputDevice(str(path))
    except FileNotFoundError as error:
        raise PedalError(
            f"foot pedal {path} not found: is it plugged in? List input devices with `ls -l /dev/input/by-id/` and "
            f"set pedal.device to the pedal's *-event-kbd entry, or install {UDEV_RULE} for a stable "
            "/dev/input/her2scope-pedal"
        ) from error
    except PermissionError as error:
        raise PedalError(
            f"no permission to read foot pedal {path}: add the service user to the 'input' group or install "
            f"{UDEV_RULE} (GROUP and MODE), then replug the pedal"
        ) from error
    except OSError as error:
        raise PedalError(f"cannot open foot pedal {path}: {error.strerror or error}") from error
    return device


class FootPedal:
    """Reads a foot pedal on a background thread and calls ``on_trigger`` for each configured key press.

    ``on_trigger`` and ``on_status`` are called on the pedal thread; an exception they raise is logged and ignored.
    The device is used from the pedal thread only, including ``ungrab`` and ``close``.

    Parameters
    ----------
    config : device node, keys and whether to grab
    on_trigger : called with FOV or CONTROL on each key press; should return quickly (hand work to a queue)
    on_status : optional, called with a ``PedalStatus`` on every state change
    opener : opens the device node; ``open_evdev_device`` by default, a fake in tests
    retry_interval_s : wait between attempts to open a missing or unplugged pedal
    """

    def __init__(
        self,
        config: PedalConfig,
        on_trigger: Callable[[TriggerKind], None],
        *,
        on_status: Callable[[PedalStatus], None] | None = None,
        opener: Callable[[Path], PedalDevice] = open_evdev_device,
        retry_interval_s: float = 1.0,
    ) -> None:
        if not retry_interval_s > 0:
            raise ValueError(f"retry_interval_s must be positive, got {retry_interval_s!r}")
        self._config = config
        self._on_trigger = on_trigger
        self._on_status = on_status
        self._opener = opener
        self._retry_interval_s = retry_interval_s
        self._keys: dict[int, TriggerKind] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # a pipe that wakes the thread's select() on stop()
        self._lock = threading.Lock()
        self._status = PedalStatus(PedalState.STOPPED, str(config.device), False, 0, 0, None)
        self._been_connected = False

    # -- public API ------------------------------------------------------------------------------------------------

    @property
    def status(self) -> PedalStatus:
        """The current status snapshot."""
        with self._lock:
            return self._status

    def start(self) -> None:
        """Check the configuration and start the pedal thread.

        A missing or unplugged device is not an error here: it is reported in ``status`` and retried.

        Raises
        ------
        PedalError
            python-evdev is missing or a key name is unknown.
        RuntimeError
            Already started.
        """
        if self._thread is not None:
            raise RuntimeError("the foot pedal is already started")
        self._keys = resolve_keys(self._config)
        self._stopping.clear()
        self._wake = os.pipe()
        self._set(state=PedalState.CONNECTING, last_error=None)
        self._thread = threading.Thread(target=self._run, name="her2scope-pedal", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread, ungrab and close the device; safe to call twice or before ``start``."""
        thread, wake = self._thread, self._wake
        if thread is None or wake is None:
            return
        self._stopping.set()
        os.write(wake[1], b"x")
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("pedal_stop_timeout", device=str(self._config.device), timeout_s=timeout_s)
            return  # the thread still owns the pipe; it is a daemon thread and ends with the process
        for fd in wake:
            os.close(fd)
        self._thread = self._wake = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- the pedal thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        path = self._config.device
        while not self._stopping.is_set():
            try:
                device = self._opener(path)
            except PedalError as error:
                self._disconnected(str(error))
            except Exception as error:  # a broken opener must not end the thread
                log.exception("pedal_open_failed", device=str(path))
                self._disconnected(f"cannot open foot pedal {path}: {error!r}")
            else:
                self._serve(device)
            self._stopping.wait(self._retry_interval_s)
        self._set(state=PedalState.STOPPED, grabbed=False)

    def _serve(self, device: PedalDevice) -> None:
        """Grab, read events until stop() or an error, then always ungrab and close."""
        path = self._config.device
        grabbed = False
        try:
            if self._config.grab:
                try:
                    device.grab()
                except OSError as error:
                    reason = "another program has grabbed it" if error.errno == errno.EBUSY else error.strerror
                    self._disconnected(f"cannot grab foot pedal {path}: {reason or error}")
                    return
                grabbed = True
            reconnect = self._been_connected
            self._been_connected = True
            with self._lock:
                reconnects = self._status.reconnects + int(reconnect)
            self._set(state=PedalState.CONNECTED, grabbed=grabbed, reconnects=reconnects)
            log.info("pedal_connected", device=str(path), grabbed=grabbed, reconnect=reconnect)
            self._read_until_stopped(device)
        except (OSError, ValueError) as error:  # ENODEV when unplugged; ValueError for a closed fd
            message = f"foot pedal {path} lost: {getattr(error, 'strerror', None) or error}"
            self._disconnected(message)
        except Exception as error:
            log.exception("pedal_read_failed", device=str(path))
            self._disconnected(f"foot pedal {path} failed: {error!r}")
        finally:
            self._release(device, grabbed)

    def _read_until_stopped(self, device: PedalDevice) -> None:
        assert self._wake is not None
        wake = self._wake[0]
        while not self._stopping.is_set():
            readable, _, _ = select.select([device.fd, wake], [], [])
            if wake in readable:
                return
            try:
                events = list(device.read())
            except BlockingIOError:
                continue
            self._handle_events(events)

    def _handle_events(self, events: Iterable[KeyEvent]) -> int:
        """Fire a trigger for each key-down of a configured key; return how many fired."""
        fired = 0
        for event in events:
            if event.type != EV_KEY or event.value != KEY_DOWN:
                continue
            kind = self._keys.get(event.code)
            if kind is None:
                continue
            fired += 1
            with self._lock:
                self._status = dataclasses.replace(self._status, triggers=self._status.triggers + 1)
            log.info("pedal_trigger", kind=kind.value, device=str(self._config.device))
            try:
                self._on_trigger(kind)
            except Exception:
                log.exception("pedal_on_trigger_failed", kind=kind.value)
        return fired

    def _release(self, device: PedalDevice, grabbed: bool) -> None:
        if grabbed:
            with contextlib.suppress(OSError):  # unplugged: the grab went with the device
                device.ungrab()
        try:
            device.close()
        except Exception:
            log.exception("pedal_close_failed", device=str(self._config.device))
        with self._lock:
            self._status = dataclasses.replace(self._status, grabbed=False)

    def _disconnected(self, message: str) -> None:
        with self._lock:
            repeated = self._status.state is PedalState.DISCONNECTED and self._status.last_error == message
        if not repeated:  # a missing pedal is logged once, not every retry
            log.warning("pedal_disconnected", device=str(self._config.device), error=message)
        self._set(state=PedalState.DISCONNECTED, grabbed=False, last_error=message)

    def _set(self, **changes: object) -> None:
        with self._lock:
            previous = self._status
            self._status = status = dataclasses.replace(previous, **changes)  # type: ignore[arg-type]
        if self._on_status is not None and (status.state, status.last_error) != (previous.state, previous.last_error):
            try:
                self._on_status(status)
            except Exception:
                log.exception("pedal_on_status_failed", state=status.state.value)
