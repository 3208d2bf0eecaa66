"""The layers: ``common/`` is a leaf library that imports no role folder and no application code;
each role imports ``common/`` and itself only; the application (``p2pm/``) may import everything.
Every import counts, also those inside function bodies."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("coordinator", "peer_node", "dso_service", "tso_service")


@cache
def _imports(folder: str) -> dict[str, set[str]]:
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_common_imports_no_role_and_no_application():
    bad = {f: sorted(n & {*ROLES, "p2pm"}) for f, n in _imports("common").items() if n & {*ROLES, "p2pm"}}
    assert not bad, f"common/ must not import role folders or the application: {bad}"


@pytest.mark.parametrize("role", ROLES)
def test_roles_import_common_and_themselves_only(role):
    others = {*ROLES, "p2pm"} - {role}
    bad = {f: sorted(n & others) for f, n in _imports(role).items() if n & others}
    assert not bad, f"{role}/ must import only common/ and itself: {bad}"


def test_peer_processes_stay_light():
    """A peer process (the peer engine, its main and the fork server) never imports the heavy
    packages the services need."""
    heavy = {"pandas", "pandapower", "cvxpy", "matplotlib"}
    files = {f: n for f, n in _imports("peer_node").items()}
    for lib in ("common/engine.py", "common/shell.py", "common/secagg.py", "common/admm.py", "common/community.py",
                "common/models.py", "common/codec.py", "common/transport.py"):
        files[lib] = _imports(str(Path(lib).parent))[lib]
    bad = {f: sorted(n & heavy) for f, n in files.items() if n & heavy}
    assert not bad, bad
