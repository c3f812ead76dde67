"""Command-line options that several ``her2scope`` commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")]
DaemonStateOption = Annotated[
    Path | None,
    typer.Option("--daemon-state", help="The daemon's state folder with its endpoints.json [default: the config's]."),
]
JsonLogsOption = Annotated[
    bool | None, typer.Option("--json-logs/--pretty-logs", help="Log format [default: JSON unless a terminal].")
]
KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="This client's CurveZMQ secret key file (NAME.key_secret, from `her2scope keys client NAME`), for a "
        "daemon that uses CURVE [default: the config's daemon.zmq.client_key].",
    ),
]
