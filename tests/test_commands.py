"""One command table: every command has its arguments model, its summary and its handler, and docs/protocol.md's
command table lists exactly the arguments each model takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from her2scope.daemon.protocol import COMMANDS, Command, ProtocolError, Request, command_args
from her2scope.daemon.service import COMMAND_HANDLERS

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
ROW = re.compile(r"^\| `(?P<commands>[a-z-]+)`(?: / `(?P<other>[a-z-]+)`)? \| (?P<args>[^|]*) \|", re.MULTILINE)


def test_every_command_has_arguments_a_summary_and_a_handler() -> None:
    assert set(COMMANDS) == set(Command) == set(COMMAND_HANDLERS)
    assert all(info.summary.endswith(".") and len(info.summary) < 90 for info in COMMANDS.values())


def test_the_protocol_document_lists_each_commands_arguments() -> None:
    documented: dict[str, set[str]] = {}
    for row in ROW.finditer(DOC.read_text(encoding="utf-8")):
        names = set(re.findall(r"`([a-z_]+)`", row["args"]))
        for command in filter(None, (row["commands"], row["other"])):
            documented[command] = names
    for command, info in COMMANDS.items():
        assert documented.get(command.value) == set(info.args.model_fields), command.value


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("rescore", {"fov": "fov-001"}, "unknown argument(s) fov for rescore; it takes: fov_id"),
        ("capture", {"kind": "control"}, "unknown argument(s) kind for capture; it takes: none"),
        ("exclude", {}, "'fov_id' must be a non-empty string"),
        ("exclude", {"fov_id": ""}, "'fov_id' must be a non-empty string"),
        ("replay", {"since_seq": -1}, "replay needs 'since_seq', a non-negative integer"),
        ("replay", {"since_seq": True}, "replay needs 'since_seq', a non-negative integer"),
        ("auto-capture", {"enabled": 1}, "auto-capture needs 'enabled': true or false"),
        ("start-case", {"guideline": ""}, "'guideline' must be a non-empty string when given"),
    ],
)
def test_bad_arguments_are_refused_in_the_documents_words(command: str, args: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        command_args(Request(command=Command(command), args=args))
    assert str(refused.value) == message
