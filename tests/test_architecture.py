"""The package's structure, read from the source: what may import what (docs/architecture.md), no import cycles, a
pure scoring package, one import root, and one place that writes protocol frames."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The folders that install as her2scope.<name>.
PACKAGES = ("config", "scoring", "synthetic", "daemon", "clients")
#: Which of her2scope's packages each package may import ("her2scope" is the root package: logging).
ALLOWED = {
    "config": {"config"},
    "scoring": {"config", "scoring"},
    "synthetic": {"config", "scoring", "synthetic"},
    "daemon": {"config", "scoring", "synthetic", "daemon", "her2scope"},
    "clients": {"config", "scoring", "clients", "daemon", "her2scope"},
    "her2scope": {"clients", "her2scope"},
}
#: The daemon's modules that clients may import: the wire protocol and the CURVE keys are its public interface.
DAEMON_PUBLIC = {"her2scope.daemon.protocol", "her2scope.daemon.curve"}
#: The command line starts the daemon itself (``her2scope daemon``).
DAEMON_ENTRY = {"her2scope.clients.cli": {"her2scope.daemon.service", "her2scope.daemon.frames"}}
#: Scoring is arrays in, results out: no sockets, logging, processes or command line.
IMPURE = {"zmq", "structlog", "typer", "logging", "socket", "subprocess", "multiprocessing"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "her2scope" else ["her2scope", *parts])


@cache
def modules() -> dict[str, Path]:
    """Every module of the package, by its import name."""
    found = {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    found.update({_module_name(path): path for path in (ROOT / "her2scope").glob("*.py")})
    return found


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """The absolute modules ``path`` imports (at any depth of the code), with their line numbers."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            known = modules()
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            # "from package import module" imports the module, not the package's other modules
            yield from ((name, node.lineno) for name in submodules if name in known)
            if not all(name in known for name in submodules):
                yield node.module, node.lineno


@cache
def graph() -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    known = modules()
    return {name: {target for target, _ in imports(path) if target in known} for name, path in known.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "her2scope"


def test_the_source_tree_is_read() -> None:
    names = modules()
    assert {"her2scope.scoring.pipeline", "her2scope.daemon.service", "her2scope.clients.cli"} <= set(names)
    assert "her2scope.daemon.protocol" in graph()["her2scope.clients.control"]


def test_each_package_imports_only_what_it_may() -> None:
    wrong = []
    for module, path in modules().items():
        package = _package(module)
        for target, line in imports(path):
            if not target.startswith("her2scope"):
                continue
            target_package = _package(target)
            allowed = target_package in ALLOWED[package]
            if package == "clients" and target_package == "daemon":
                allowed = target in DAEMON_PUBLIC or target in DAEMON_ENTRY.get(module, set())
            if not allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_scoring_does_no_io() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in modules().items()
        if _package(module) == "scoring"
        for name, line in imports(path)
        if name.split(".")[0] in IMPURE
    ]
    assert not wrong, "\n".join(wrong)


def test_there_are_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert not cycles


def test_only_the_protocol_module_writes_request_frames() -> None:
    writers = [
        str(path.relative_to(ROOT))
        for package in ("clients", "daemon")
        for path in (ROOT / package).rglob("*.py")
        if '"v": 1' in path.read_text(encoding="utf-8") and path.name != "protocol.py"
    ]
    assert not writers


@pytest.mark.parametrize("code", ["import her2scope.scoring, her2scope.daemon, her2scope.clients.cli"])
@pytest.mark.e2e
def test_one_import_root(tmp_path: Path, code: str) -> None:
    """Installed, the package is her2scope and nothing else: no top-level daemon, config, scoring or clients (run
    outside the source tree, where the folders themselves are not on the path)."""
    check = (
        f"{code}\nimport importlib.util as u\n"
        "print([n for n in ('daemon', 'config', 'scoring', 'clients', 'synthetic') if u.find_spec(n)])"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
