"""CurveZMQ keys: authentication and encryption of the daemon's sockets (docs/protocol.md, "Security").

The daemon holds a key pair (``server.key`` public, ``server.key_secret`` secret) and an allow-list: the public keys
of the clients it accepts, one ``NAME.key`` file each in ``clients/``. A client holds its own pair and the server's
public key. The daemon's ZAP handler (pyzmq's ThreadAuthenticator) refuses the handshake of any other key, so an
unknown client gets no message, on the publisher or on the control endpoint.

Layout of the key folder (``[daemon.zmq] curve_directory``, default ``<state directory>/curve``)::

    server.key            the daemon's public key: give it to every client
    server.key_secret     the daemon's secret key: never leaves the daemon's PC
    clients/NAME.key      the public key of client NAME (the allow-list)
    clients/NAME.key_secret   client NAME's secret key, made here by `her2scope keys client NAME`: copy it to
                              that client's PC, then delete it here
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from her2scope.config.daemon import ZmqConfig

SERVER = "server"
CLIENTS = "clients"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CurveError(ValueError):
    """Keys that are missing, unreadable or not CurveZMQ keys; the message says which and what to do."""


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """The daemon's key pair and the folder of the public keys it accepts."""

    public: bytes
    secret: bytes
    allowed: Path


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """A client's key pair and the public key of the daemon it talks to."""

    public: bytes
    secret: bytes
    server_public: bytes


def _private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_pair(directory: Path, name: str) -> tuple[Path, Path]:
    if not _NAME.match(name):
        raise CurveError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    _private(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise CurveError(f"{public} already exists; delete it (and {secret.name}) first to make a new pair")
    previous = os.umask(0o077)  # the secret key is never readable by others, not even for an instant
    try:
        zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(previous)
    for path in (public, secret):
        path.chmod(0o600)
    return public, secret


def create_server_keys(directory: Path) -> tuple[Path, Path]:
    """Make the daemon's key pair in ``directory`` (and its empty allow-list folder); (public, secret) files."""
    directory = directory.expanduser()
    pair = _write_pair(directory, SERVER)
    _private(directory / CLIENTS)
    return pair


def create_client_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Make client ``name``'s key pair in ``directory``; (public, secret) files."""
    return _write_pair(directory.expanduser(), name)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise CurveError(f"{path}: cannot read a CurveZMQ key ({error})") from None
    if secret and secret_key is None:
        raise CurveError(f"{path} holds no secret key: give the .key_secret file")
    return public, secret_key


def load_server_keys(directory: Path) -> ServerKeys:
    """The daemon's keys from ``directory``; CurveError (saying how to make them) when they are missing."""
    directory = directory.expanduser()
    secret_file = directory / f"{SERVER}.key_secret"
    if not secret_file.is_file():
        raise CurveError(
            f"no CurveZMQ server key {secret_file}: make the keys with `her2scope keys server` and "
            "`her2scope keys client NAME` (docs/protocol.md, section 11)"
        )
    public, secret = _load(secret_file, secret=True)
    allowed = directory / CLIENTS
    if not any(allowed.glob("*.key")):
        raise CurveError(f"no client may connect: {allowed} holds no NAME.key; add one with `her2scope keys client`")
    assert secret is not None
    return ServerKeys(public, secret, allowed)


def load_client_keys(key_file: Path, server_key_file: Path) -> ClientKeys:
    """A client's keys: its secret key file (NAME.key_secret) and the daemon's public key file (server.key)."""
    public, secret = _load(key_file.expanduser(), secret=True)
    server_public, _ = _load(server_key_file.expanduser(), secret=False)
    assert secret is not None
    return ClientKeys(public, secret, server_public)


def secure_client(socket: zmq.Socket[Any], keys: ClientKeys | None) -> None:
    """Make ``socket`` (before it connects) a CURVE client of the daemon; nothing without keys."""
    if keys is None:
        return
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    socket.curve_serverkey = keys.server_public


def secure_server(socket: zmq.Socket[Any], keys: ServerKeys) -> None:
    """Make ``socket`` (before it binds) a CURVE server: encrypted, and clients authenticated by the ZAP handler."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def curve_directory(zmq_config: ZmqConfig, state_directory: Path) -> Path:
    """The key folder of a configuration: ``curve_directory``, else ``<state directory>/curve``."""
    return (zmq_config.curve_directory or state_directory / "curve").expanduser()


def client_keys(zmq_config: ZmqConfig, state_directory: Path, key_file: Path | None = None) -> ClientKeys | None:
    """A client's keys from ``key_file`` (--key) or the configuration's ``client_key``, with the daemon's public key
    (``server_key``, else the one in the key folder); None when neither names a key (no CURVE)."""
    key = key_file or zmq_config.client_key
    if key is None:
        return None
    server = zmq_config.server_key or curve_directory(zmq_config, state_directory) / f"{SERVER}.key"
    return load_client_keys(key, server)
