"""The ``her2scope`` command line. Heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="her2scope",
    help="Real-time, explainable HER2 IHC scoring for the microscope camera.",
    no_args_is_help=True,
    add_completion=False,
)


def _register_subcommands() -> None:
    from clients.ctl import ctl_app

    app.add_typer(ctl_app, name="ctl")


_register_subcommands()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"her2scope {version('her2scope')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """her2scope: HER2 IHC scoring by the ASCO/CAP rule, calibrated by the slide's positive control."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def score(
    fovs: Annotated[list[Path], typer.Argument(help="FOV images (PNG, TIFF, JPEG) of one case.", show_default=False)],
    control: Annotated[
        Path | None, typer.Option("--control", help="Positive-control (3+) image of the same staining batch.")
    ] = None,
    pixel_size: Annotated[
        float | None,
        typer.Option("--pixel-size", help="µm per pixel of the images [default: the config's optics.pixel_size_um]."),
    ] = None,
    roi: Annotated[
        Path | None,
        typer.Option("--roi", help='ROI polygon JSON {"polygon": [[row, col], ...]} for every FOV.'),
    ] = None,
    overlay_dir: Annotated[
        Path | None,
        typer.Option("--overlay-dir", help="Write an overlay PNG per FOV (and the control) here."),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
) -> None:
    """Score FOV images offline and print per-FOV counts and the case score."""
    from clients import scoring_report
    from clients.images import InputError, read_roi
    from config.app import ConfigError, load_config

    try:
        app_config = load_config(config)
        polygon = read_roi(roi) if roi is not None else None
        report = scoring_report.score_files(
            fovs,
            control=control,
            pixel_size_um=pixel_size if pixel_size is not None else app_config.optics.pixel_size_um,
            roi_polygon=polygon,
            overlay_dir=overlay_dir,
            params=app_config.scoring,
            rule=app_config.case_rule,
        )
    except (InputError, ConfigError) as error:
        raise _fail(str(error)) from None
    except OSError as error:
        raise _fail(f"{error.filename or ''}: {error.strerror or error}") from None
    if as_json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        typer.echo(scoring_report.format_table(report))


@app.command()
def daemon(
    config: Annotated[Path | None, typer.Option("--config", help="TOML configuration file.")] = None,
    json_logs: Annotated[
        bool | None, typer.Option("--json-logs/--pretty-logs", help="Log format [default: JSON unless a terminal].")
    ] = None,
) -> None:
    """Run the camera daemon: capture stable fields, score them, publish on ZeroMQ (Ctrl-C or SIGTERM stops)."""
    import signal

    from config.app import ConfigError, load_config
    from daemon.frames import SourceError
    from daemon.logs import configure_logging
    from daemon.service import Daemon

    configure_logging(json_logs)
    try:
        app_config = load_config(config)
        service = Daemon(app_config)
    except (ConfigError, SourceError) as error:
        raise _fail(str(error)) from None
    except OSError as error:
        raise _fail(f"{error.filename or ''}: {error.strerror or error}") from None

    def stop(signum: int, _frame: object) -> None:
        service.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        service.run()
    except Exception as error:
        import zmq

        if isinstance(error, zmq.ZMQError):
            raise _fail(f"cannot bind the ZeroMQ endpoints: {error}") from None
        raise


def run() -> Any:
    """Entry point for ``python -m clients.cli``."""
    return app()


if __name__ == "__main__":
    run()
