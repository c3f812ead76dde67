"""Who may see and who may control the browser viewer: the address it listens on, TLS, and the control token.

The page shows patient tissue and the case's score, and with ``--control`` it can change a case. So it listens on
the loopback interface unless told otherwise; beyond it, it needs TLS (a token sent over plain HTTP can be read
by anyone on the network path) or an explicit ``--insecure-remote``. Control needs a token, compared in constant
time.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import ssl
from pathlib import Path

#: The environment variable that may hold the control token (instead of ``--token-file``).
TOKEN_ENV = "HER2SCOPE_WEB_TOKEN"
MIN_TOKEN_CHARS = 16
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class AccessError(ValueError):
    """An option of ``her2scope web`` that cannot be used; the message says what to do instead."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface only."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to an address others reach


def check_binding(host: str, tls: bool, insecure_remote: bool) -> None:
    """Refuse to listen beyond loopback without TLS, unless ``insecure_remote`` says so explicitly."""
    if not is_loopback(host) and not tls and not insecure_remote:
        raise AccessError(
            f"--host {host} is reachable from other machines: give --tls-cert and --tls-key to serve over HTTPS, "
            "or --insecure-remote to serve patient images and the control token unencrypted (see docs/web.md)"
        )


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's TLS context from a certificate chain and its key (PEM), or None without them."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise AccessError("TLS needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise AccessError(f"cannot use the TLS certificate {cert} with key {key}: {error}") from None
    return context


def control_token(control: bool, token_file: Path | None, env_token: str | None) -> tuple[str | None, bool]:
    """The control token and whether it was made here (then it is shown once, to be copied into the URL).

    Without ``control`` there is none (read-only). ``token_file`` wins over ``env_token``; without either a random
    token is made.
    """
    if not control:
        if token_file is not None:
            raise AccessError("--token-file is only used with --control")
        return None, False
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise AccessError(f"cannot read the token file {token_file}: {error}") from None
        source = str(token_file)
    elif env_token:
        token, source = env_token.strip(), TOKEN_ENV
    else:
        return secrets.token_urlsafe(24), True
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise AccessError(
            f"the control token in {source} must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
            "spaces (make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    return token, False


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries the control token (``Bearer <token>``), in constant time."""
    if token is None or header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8"))
