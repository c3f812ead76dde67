"""``her2scope ctl``: talk to a running daemon from the shell.

Exit codes, for scripts: 0 done; 1 the daemon refused (its error is printed); 2 bad usage or configuration;
3 no daemon answered.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from her2scope.clients.options import ConfigOption, DaemonStateOption, KeyOption
from her2scope.daemon.protocol import COMMANDS, CaseSummary, Command

ctl_app = typer.Typer(
    name="ctl", help="Control a running daemon: capture, control, case start/close, status.", no_args_is_help=True
)

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

JsonOption = Annotated[bool, typer.Option("--json", help="Print the daemon's reply as JSON.")]
TimeoutOption = Annotated[float, typer.Option("--timeout-ms", help="How long to wait for the daemon.")]

_key_file: list[Path] = []  # --key, given before the command (her2scope ctl --key FILE status)


@ctl_app.callback()
def _options(key: KeyOption = None) -> None:
    """Control a running daemon: capture, control, case start/close, status."""
    _key_file[:] = [key] if key is not None else []


def _call(
    command: str, config: Path | None, state: Path | None, timeout_ms: float, as_json: bool, **args: Any
) -> dict[str, Any]:
    from her2scope.clients.control import ControlClient, ControlError, daemon_curve, daemon_endpoints
    from her2scope.config.app import ConfigError
    from her2scope.daemon.curve import CurveError

    try:
        endpoints = daemon_endpoints(config, state)
        curve = daemon_curve(config, state, _key_file[0] if _key_file else None)
    except (ConfigError, CurveError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except ControlError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    with ControlClient(endpoints["control"], timeout_ms=timeout_ms, curve=curve) as client:
        try:
            reply, _ = client.request(command, **args)
        except ControlError as error:
            typer.echo(f"error: {error} ({endpoints['control']}); is the daemon running?", err=True)
            raise typer.Exit(EXIT_UNREACHABLE) from None
    if not reply.ok:
        typer.echo(f"error: the daemon refused {command}: {reply.error}", err=True)
        raise typer.Exit(EXIT_REFUSED)
    if as_json:
        json.dump(reply.data, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    return reply.data


@ctl_app.command(help=COMMANDS[Command.CAPTURE].summary)
def capture(
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    timeout_ms: TimeoutOption = 5000.0,
    as_json: JsonOption = False,
) -> None:
    data = _call("capture", config, daemon_state, timeout_ms, as_json)
    if not as_json:
        typer.echo(f"captured {data['fov_id']}; its result follows on the daemon's result topic")


@ctl_app.command(help=COMMANDS[Command.CAPTURE_CONTROL].summary)
def control(
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    timeout_ms: TimeoutOption = 5000.0,
    as_json: JsonOption = False,
) -> None:
    data = _call("capture-control", config, daemon_state, timeout_ms, as_json)
    if not as_json:
        typer.echo(f"captured the positive control as {data['fov_id']}")


@ctl_app.command(help=COMMANDS[Command.SET_OBJECTIVE].summary)
def objective(
    name: Annotated[str, typer.Argument(help="The objective now in use, as named in the configuration (e.g. 20x).")],
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    timeout_ms: TimeoutOption = 5000.0,
    as_json: JsonOption = False,
) -> None:
    data = _call("set-objective", config, daemon_state, timeout_ms, as_json, objective=name)
    if not as_json:
        typer.echo(f"objective {data['objective']}: {data['pixel_size_um']} µm per pixel")


case_app = typer.Typer(name="case", help="Start or close a case.", no_args_is_help=True)
ctl_app.add_typer(case_app)


@case_app.command("start", help=COMMANDS[Command.START_CASE].summary)
def case_start(
    case_id: Annotated[str | None, typer.Option("--case-id", help="Case id (default: case-DATE-TIME).")] = None,
    operator: Annotated[str | None, typer.Option("--operator", help="Who is scoring.")] = None,
    guideline: Annotated[
        str | None,
        typer.Option("--guideline", help="breast or gastric (default: the daemon's configuration's case_rule)."),
    ] = None,
    specimen: Annotated[
        str | None, typer.Option("--specimen", help="resection or biopsy (default: the configuration's).")
    ] = None,
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    timeout_ms: TimeoutOption = 5000.0,
    as_json: JsonOption = False,
) -> None:
    chosen = (("case_id", case_id), ("operator", operator), ("guideline", guideline), ("specimen", specimen))
    args = {k: v for k, v in chosen if v is not None}
    data = _call("start-case", config, daemon_state, timeout_ms, as_json, **args)
    if not as_json:
        typer.echo(f"started case {data['case_id']} ({data.get('guideline', '?')}, {data.get('specimen', '?')})")


@case_app.command("close", help=COMMANDS[Command.CLOSE_CASE].summary)
def case_close(
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    timeout_ms: TimeoutOption = 30000.0,
    as_json: JsonOption = False,
) -> None:
    data = _call("close-case", config, daemon_state, timeout_ms, as_json)
    if not as_json:
        typer.echo(f"closed case {data['case_id']}")
        typer.echo(format_case(CaseSummary.model_validate(data["summary"])))


@ctl_app.command(help=COMMANDS[Command.SNAPSHOT].summary)
def status(
    config: ConfigOption = None,
    daemon_state: DaemonStateOption = None,
    timeout_ms: TimeoutOption = 5000.0,
    as_json: JsonOption = False,
) -> None:
    if as_json:
        _call("snapshot", config, daemon_state, timeout_ms, True)
        return
    data = _call("snapshot", config, daemon_state, timeout_ms, False)
    state = data["status"]
    camera = state["camera"]
    typer.echo(
        f"daemon {state['daemon']}, camera {camera['state']} ({camera['source']}, {camera['fps']:.1f} fps), "
        f"stability {state['stability']}, auto-capture {'on' if state['auto_capture'] else 'off'}, "
        f"worker {state['worker']} (queue {state['queue']}), objective {state['objective']} "
        f"({state['pixel_size_um']} µm/px)"
    )
    if camera.get("last_error"):
        typer.echo(f"camera: {camera['last_error']}")
    typer.echo(format_case(CaseSummary.model_validate(data["case"])))


def format_case(summary: CaseSummary) -> str:
    """A few readable lines about a case summary (see docs/protocol.md, the case summary)."""
    if not summary.case_id:
        return "no case is open"
    lines = [f"case {summary.case_id}" + (" (closed)" if not summary.open else "")]
    if summary.guideline:
        lines[0] += f", scored by the {summary.guideline} guideline ({summary.specimen or 'resection'})"
    for fov in summary.fovs:
        marks = " excluded" if fov.excluded else ""
        score = fov.score or "-"
        lines.append(f"  {fov.fov_id:<12} {fov.status:<8} cells {fov.total:>5}  score {score}" + marks)
    case = summary.case
    if case is None:
        return "\n".join(lines)
    extra = [str(case.zero_subtype)] if case.zero_subtype else []
    if case.her2_low:
        extra.append("HER2-low" if case.score == "1+" else "HER2-low if ISH is negative")
    score_text = case.score or "not assessable"
    lines.append(f"CASE HER2 IHC {score_text}: {case.status}" + (f" ({', '.join(extra)})" if extra else ""))
    if case.reason:
        lines.append(f"  {case.reason}")
    lines.extend(f"  warning: {w}" for w in case.warnings)
    return "\n".join(lines)
