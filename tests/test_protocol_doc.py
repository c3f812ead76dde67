"""docs/protocol.md stays honest: it names every command, topic and field, and its example client really works.

The example client is the ```python block after the ``<!-- example-client`` marker; it is run as a third party
would run it (a separate process, pyzmq and json only) against a real daemon on the simulated microscope.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from her2scope.daemon.protocol import (
    CaptureBody,
    Command,
    Header,
    OverlayBody,
    Payload,
    PreviewBody,
    Reply,
    Request,
    ResultBody,
    StatusBody,
    Topic,
)
from tests.helpers.daemon import Daemon, running_daemon, wait_for

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
EXAMPLE_MARKER = "<!-- example-client"
CASE_SCORE = re.compile(r"^result (?P<fov>\S+) scored .*case score (?P<score>0|1\+|2\+|3\+|None) ", re.MULTILINE)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def example_client(doc: str) -> str:
    """The code of the example client: the first ```python block after the marker."""
    start = doc.index(EXAMPLE_MARKER)
    match = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE).search(doc, start)
    assert match is not None, "no ```python block after the example-client marker"
    return match.group(1)


@pytest.mark.parametrize("name", [c.value for c in Command])
def test_every_command_is_documented(doc: str, name: str) -> None:
    assert f"`{name}`" in doc


@pytest.mark.parametrize("name", [t.value for t in Topic])
def test_every_topic_is_documented(doc: str, name: str) -> None:
    assert f"`{name}`" in doc


@pytest.mark.parametrize(
    "model", [Header, Payload, Request, Reply, PreviewBody, CaptureBody, ResultBody, OverlayBody, StatusBody]
)
def test_every_field_is_documented(doc: str, model: type[BaseModel]) -> None:
    missing = [name for name in model.model_fields if f"`{name}`" not in doc]
    assert not missing, f"{model.__name__} fields missing from docs/protocol.md: {missing}"
    assert model.__name__ in doc


def test_the_example_client_uses_only_pyzmq_and_json(doc: str) -> None:
    code = example_client(doc)
    compile(code, "example_client.py", "exec")
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.MULTILINE))
    assert imported <= {"json", "sys", "time", "zmq"}, imported


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path) as running:
        yield running


@pytest.mark.e2e
def test_the_example_client_prints_case_scores_and_captures(doc: str, daemon: Daemon, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(example_client(doc), encoding="utf-8")
    wait_for(lambda: daemon.control.call("status")["camera"]["state"] == "live", what="a live camera")
    try:
        run = subprocess.run(
            [sys.executable, str(script), daemon.endpoints["publish"], daemon.endpoints["control"], "60"],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as error:  # run() has killed it
        pytest.fail(f"the example client did not finish in time; its output: {error.stdout!r}")
    assert run.returncode == 0, f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.stdout.startswith("snapshot: ")
    captured = re.search(r"^capture: ok (fov-\d{3})$", run.stdout, re.MULTILINE)
    assert captured is not None, run.stdout
    scores = {m["fov"]: m["score"] for m in CASE_SCORE.finditer(run.stdout)}
    assert captured.group(1) in scores, run.stdout
    assert scores[captured.group(1)] in ("0", "1+", "2+", "3+"), run.stdout
    assert daemon.process.poll() is None
