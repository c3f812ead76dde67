"""The ``her2scope`` command line. Heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from her2scope.clients.options import ConfigOption, DaemonStateOption, JsonLogsOption, KeyOption

app = typer.Typer(
    name="her2scope",
    help="Real-time, explainable HER2 IHC scoring for the microscope camera.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" and "[scoring]" are shown as written
)


def _register_subcommands() -> None:
    from her2scope.clients.ctl import ctl_app

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
        typer.Option("--pixel-size", help="µm per pixel of the images [default: the objective's, below]."),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option("--objective", help="Objective the images were taken with, as named in the config's optics."),
    ] = None,
    roi: Annotated[
        Path | None,
        typer.Option("--roi", help='ROI polygon JSON {"polygon": [[row, col], ...]} for every FOV.'),
    ] = None,
    overlay_dir: Annotated[
        Path | None,
        typer.Option("--overlay-dir", help="Write an overlay PNG per FOV (and the control) here."),
    ] = None,
    guideline: Annotated[
        str | None,
        typer.Option("--guideline", help="breast or gastric [default: the config's case_rule.guideline]."),
    ] = None,
    specimen: Annotated[
        str | None,
        typer.Option("--specimen", help="resection or biopsy [default: the config's case_rule.specimen]."),
    ] = None,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")] = False,
) -> None:
    """Score FOV images offline and print per-FOV counts and the case score."""
    from her2scope.clients import scoring_report
    from her2scope.clients.images import InputError, read_roi
    from her2scope.config.app import ConfigError, load_config

    try:
        app_config = load_config(config)
        polygon = read_roi(roi) if roi is not None else None
        optics = app_config.optics
        if pixel_size is not None and objective is not None:
            raise InputError("give --pixel-size or --objective, not both")
        if objective is not None and objective not in optics.objectives:
            raise InputError(f"--objective {objective!r} is not in the configuration: {', '.join(optics.objectives)}")
        if pixel_size is None:
            pixel_size = optics.objectives[objective] if objective is not None else optics.pixel_size_um
        report = scoring_report.score_files(
            fovs,
            control=control,
            pixel_size_um=pixel_size,
            roi_polygon=polygon,
            overlay_dir=overlay_dir,
            params=app_config.scoring,
            rule=scoring_report.chosen_rule(app_config.case_rule, guideline, specimen),
            max_pixels=app_config.limits.max_image_pixels,
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
    config: ConfigOption = None,
    json_logs: JsonLogsOption = None,
) -> None:
    """Run the camera daemon: capture stable fields, score them, publish on ZeroMQ (Ctrl-C or SIGTERM stops)."""
    import signal

    from her2scope.config.app import ConfigError, load_config
    from her2scope.daemon.frames import SourceError
    from her2scope.daemon.service import Daemon
    from her2scope.logs import configure_logging

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


@app.command()
def record(
    config: ConfigOption = None,
    out: Annotated[Path, typer.Option("--out", help="Folder of the case folders.")] = Path("~/her2scope-cases"),
    daemon_state: DaemonStateOption = None,
    json_logs: JsonLogsOption = None,
    key: KeyOption = None,
    pdf: Annotated[
        bool, typer.Option("--pdf", help="Print each closed case's report to report.pdf too (needs Chromium).")
    ] = False,
) -> None:
    """Record every case of the daemon: event log, lossless images, overlays, QuPath files and an HTML report per
    case."""
    import signal

    from her2scope.clients.control import live_endpoints
    from her2scope.clients.export import ReportPrinter, find_chromium, no_chromium_message
    from her2scope.clients.recorder import Recorder
    from her2scope.config.app import ConfigError, load_config
    from her2scope.daemon.curve import CurveError, client_keys
    from her2scope.logs import configure_logging

    configure_logging(json_logs)
    chromium = find_chromium() if pdf else None
    if pdf and chromium is None:
        raise _fail(no_chromium_message())
    try:
        app_config = load_config(config)
        state = (daemon_state or app_config.daemon.state.directory).expanduser()
        curve = client_keys(app_config.daemon.zmq, state, key)
    except (ConfigError, CurveError) as error:
        raise _fail(str(error)) from None
    zmq_config = app_config.daemon.zmq
    configured = {"publish": zmq_config.publish, "control": zmq_config.control}
    try:
        recorder = Recorder(
            out,
            lambda: live_endpoints(state, configured),
            fallback_params=app_config.scoring,
            fallback_rule=app_config.case_rule,
            pixel_size_um=app_config.optics.pixel_size_um,
            daemon_state=state,
            heartbeat_ms=zmq_config.heartbeat_ms,
            curve=curve,
        )
    except OSError as error:
        raise _fail(f"{error.filename or out}: {error.strerror or error}") from None
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    printer = ReportPrinter(chromium) if chromium is not None else None

    def should_stop() -> bool:
        if printer is not None:  # between turns of the loop: prints the reports of the cases closed so far
            printer.update(recorder.folders.values())
        return bool(stopping)

    try:
        recorder.run(should_stop)
    finally:
        if printer is not None:
            printer.update(recorder.folders.values())
            printer.finish()


@app.command()
def export(
    case_dir: Annotated[Path, typer.Argument(help="A case folder written by `her2scope record`.", show_default=False)],
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="qupath (an OME-TIFF and a GeoJSON per FOV, in qupath/) or csv (cells.csv, fovs.csv); "
            "repeatable [default: both].",
        ),
    ] = None,
    pdf: Annotated[bool, typer.Option("--pdf", help="Print the report to report.pdf too (needs Chromium).")] = False,
) -> None:
    """Write a recorded case's files for QuPath and spreadsheets, and its report as PDF, into its folder."""
    from her2scope.clients.export import FORMATS, ExportError, export_case

    try:
        written, notes = export_case(case_dir, formats or FORMATS, pdf=pdf)
    except ExportError as error:
        raise _fail(str(error)) from None
    except OSError as error:
        raise _fail(f"{error.filename or case_dir}: {error.strerror or error}") from None
    for note in notes:
        typer.echo(f"note: {note}")
    for relative in written:
        typer.echo(f"wrote {case_dir / relative}")


@app.command()
def rescore(
    case_dir: Annotated[Path, typer.Argument(help="A case folder written by `her2scope record`.", show_default=False)],
    config: Annotated[
        Path | None, typer.Option("--config", help="Score with this file's [scoring]/[case_rule] instead.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Change one parameter, e.g. scoring.weak_threshold_od=0.12 (repeatable)."),
    ] = None,
    guideline: Annotated[
        str | None,
        typer.Option("--guideline", help="Re-score by another guideline, breast or gastric [default: the case's]."),
    ] = None,
    specimen: Annotated[
        str | None,
        typer.Option("--specimen", help="Re-score as another specimen, resection or biopsy [default: the case's]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as one JSON document.")] = False,
) -> None:
    """Re-score a recorded case from its log and images; with changed parameters, write a labelled result beside it.

    Exit codes: 0 reproduced / written, 1 the recorded parameters did not reproduce the recorded numbers, 2 bad input.
    """
    from her2scope.clients.rescore import RescoreError, format_comparison, rescore_case

    try:
        comparison = rescore_case(
            case_dir, config_path=config, overrides=overrides or [], guideline=guideline, specimen=specimen
        )
    except RescoreError as error:
        raise _fail(str(error)) from None
    if as_json:
        json.dump(comparison, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        typer.echo(format_comparison(comparison))
    if not comparison["changed"] and not comparison["reproduced"]:
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo's cases, logs and report go.")] = Path(
        "her2scope-demo"
    ),
    fields: Annotated[int, typer.Option("--fields", min=1, max=6, help="Tumour fields to capture.")] = 5,
    window: Annotated[
        bool | None, typer.Option("--window/--no-window", help="Open the viewer [default: when there is a display].")
    ] = None,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="Keep everything running after the case.")
    ] = False,
    web: Annotated[
        bool, typer.Option("--web", help="Also serve the browser viewer (her2scope web) and print its address.")
    ] = False,
    web_port: Annotated[
        int, typer.Option("--web-port", min=0, max=65535, help="The browser viewer's loopback port (0: any free one).")
    ] = 8765,
) -> None:
    """Run the whole system on the simulated microscope: a scripted case, its score and its report."""
    from her2scope.clients.demo import DemoError, run_demo

    try:
        run_demo(out, fields=fields, window=window, keep_running=keep_running, web_port=web_port if web else None)
    except DemoError as error:
        raise _fail(str(error)) from None


@app.command()
def view(
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    headless_frames: Annotated[
        int | None,
        typer.Option("--headless-frames", min=1, help="Render N frames to PNG files (--out) instead of a window."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder of the --headless-frames PNGs.")] = None,
    size: Annotated[str, typer.Option("--size", help="Window size, WIDTHxHEIGHT.")] = "1600x900",
    key: KeyOption = None,
) -> None:
    """Show the live view, the last FOV with its overlays and the case score in a window (keys in its footer)."""
    import time

    from her2scope.clients import viewer
    from her2scope.clients.control import ControlError, daemon_curve
    from her2scope.config.app import ConfigError

    try:
        canvas = viewer.parse_size(size)
        endpoints, endpoints_dir, heartbeat_s = viewer.resolve_endpoints(config, daemon_state)
        curve = daemon_curve(config, daemon_state, key)
    except (ValueError, ConfigError, ControlError) as error:  # CurveError is a ValueError
        raise _fail(str(error)) from None
    if headless_frames is None and not viewer.has_display():
        raise _fail("no display to open a window on: use --headless-frames N --out DIR, or run it on the desktop")
    if headless_frames is not None and out is None:
        raise _fail("--headless-frames needs --out DIR for the PNG frames")
    state = viewer.initial_state(time.monotonic())
    heartbeat_ms = heartbeat_s * 1000.0
    with viewer.DaemonLink(endpoints, endpoints_dir=endpoints_dir, heartbeat_ms=heartbeat_ms, curve=curve) as link:
        try:
            if headless_frames is not None and out is not None:
                state, written = viewer.run_headless(link, state, headless_frames, out, canvas)
                typer.echo(viewer.terminal_summary(state))
                typer.echo(f"{len(written)} frames written to {out}")
            else:
                viewer.run_window(link, state, canvas)
        except KeyboardInterrupt:
            pass
        except OSError as error:
            raise _fail(f"{error.filename or out}: {error.strerror or error}") from None


#: ``her2scope web`` runs at this niceness above its parent's by default: when the daemon or its scoring worker and
#: the web viewer both want a core, the scheduler gives the viewer about a tenth of the daemon's share.
WEB_NICENESS = 10


@app.command()
def web(
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    key: KeyOption = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; beyond loopback it needs TLS or --insecure-remote.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free one).")] = 8765,
    control: Annotated[
        bool, typer.Option("--control", help="Let browsers with the token capture, exclude, draw ROIs, start cases.")
    ] = False,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="File holding the control token [default: $HER2SCOPE_WEB_TOKEN, else one is made and shown once].",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="TLS certificate chain (PEM): serve HTTPS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="The TLS certificate's private key (PEM).")] = None,
    insecure_remote: Annotated[
        bool,
        typer.Option("--insecure-remote", help="Serve beyond loopback without TLS (images and token unencrypted)."),
    ] = False,
    nice: Annotated[
        int,
        typer.Option(
            "--nice",
            min=0,
            max=19,
            help="Lower this process's CPU priority by this much (0 keeps it): on the microscope PC the daemon and "
            "its scoring worker go first.",
        ),
    ] = WEB_NICENESS,
    json_logs: JsonLogsOption = None,
) -> None:
    """Serve the viewer to browsers: live view, last FOV with its layers, case score, FOV table, status (read-only
    unless --control). Prints `serving URL` once listening; Ctrl-C or SIGTERM stops."""
    import asyncio
    import os

    from her2scope.clients import viewer
    from her2scope.clients import web as browser
    from her2scope.clients.control import ControlError, daemon_curve
    from her2scope.config.app import ConfigError
    from her2scope.logs import configure_logging

    try:
        tls = browser.tls_context(tls_cert, tls_key)
        browser.check_binding(host, tls is not None, insecure_remote)
        token, token_made = browser.control_token(control, token_file, os.environ.get("HER2SCOPE_WEB_TOKEN"))
        endpoints, endpoints_dir, heartbeat_s = viewer.resolve_endpoints(config, daemon_state)
        curve = daemon_curve(config, daemon_state, key)
    except (ValueError, ConfigError, ControlError) as error:  # AccessError and CurveError are ValueErrors
        raise _fail(str(error)) from None
    configure_logging(json_logs)
    if not browser.is_loopback(host) and tls is None:
        import structlog

        structlog.get_logger("her2scope.web").warning(
            "web_insecure_remote", host=host, why="patient images and the control token travel unencrypted"
        )
    settings = browser.WebSettings(host=host, port=port, control=control, token=token, tls=tls)
    # a wall screen's viewer must not delay a capture's result: the scheduler runs the daemon first when both wait
    os.nice(nice)

    def open_link() -> viewer.DaemonLink:
        return viewer.DaemonLink(endpoints, endpoints_dir=endpoints_dir, heartbeat_ms=heartbeat_s * 1000.0, curve=curve)

    def say(line: str) -> None:
        typer.echo(line)
        sys.stdout.flush()

    try:
        asyncio.run(browser.serve(settings, open_link, say, token_made))
    except browser.WebError as error:
        raise _fail(str(error)) from None


@app.command()
def keys(
    role: Annotated[str, typer.Argument(help="server (the daemon's pair) or client (a client's pair).")],
    name: Annotated[str | None, typer.Argument(help="The client's name (its key files are NAME.key*).")] = None,
    folder: Annotated[
        Path | None,
        typer.Option("--dir", help="Write the keys here [default: the daemon's key folder, <state>/curve]."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make CurveZMQ keys (files 0600): `keys server` the daemon's pair, `keys client NAME` a client's pair, whose
    public key in the daemon's clients/ folder lets NAME connect (see docs/protocol.md, section 11)."""
    from her2scope.config.app import ConfigError, load_config
    from her2scope.daemon.curve import CLIENTS, CurveError, create_client_keys, create_server_keys, curve_directory

    try:
        app_config = load_config(config)
        directory = folder or curve_directory(app_config.daemon.zmq, app_config.daemon.state.directory)
        if role == "server" and name is None:
            public, secret = create_server_keys(directory)
            typer.echo(f"daemon's secret key: {secret} (stays on this PC)")
            typer.echo(f"daemon's public key: {public} (copy it to every client: --config's daemon.zmq.server_key)")
        elif role == "client" and name is not None:
            public, secret = create_client_keys(directory if folder else directory / CLIENTS, name)
            typer.echo(f"{name}'s public key: {public} (the daemon accepts it once it is in its {CLIENTS}/ folder)")
            typer.echo(f"{name}'s secret key: {secret} (give it to {name}'s client: --key; delete it here after)")
        else:
            raise CurveError("use `her2scope keys server` or `her2scope keys client NAME`")
    except (ConfigError, CurveError) as error:
        raise _fail(str(error)) from None
    except OSError as error:
        raise _fail(f"{error.filename or directory}: {error.strerror or error}") from None


def run() -> Any:
    """Entry point for ``python -m her2scope``."""
    return app()


if __name__ == "__main__":
    run()
