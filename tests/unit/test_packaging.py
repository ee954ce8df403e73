"""Packaging (issue 12, item 8): a storage node, witness or host shim installs and imports only
what it uses; the lab's plots (matplotlib) and test CA (trustme) are the `lab` extra."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB_ONLY = {"matplotlib", "numpy", "PIL", "trustme", "hypothesis", "pytest"}
# rich draws syncctl's tables: a runtime dependency, but no daemon imports it.
NOT_IN_DAEMONS = LAB_ONLY | {"rich"}
# The modules of the daemons and what they use; syncd.lab, syncd.ctl and syncd.cli are not.
DAEMON_MODULES = [p for p in (ROOT / "syncd").rglob("*.py")
                  if p.relative_to(ROOT / "syncd").parts[0] not in ("lab", "ctl.py", "cli.py", "__main__.py")]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_runtime_dependencies_are_what_the_daemons_and_syncctl_use():
    p = _project()
    assert _names(p["dependencies"]) == {"trio", "construct", "xxhash", "rich", "prometheus-client", "h11",
                                             "cryptography", "google-crc32c"}
    extras = {k: _names(v) for k, v in p["optional-dependencies"].items()}
    assert {"matplotlib", "trustme"} <= extras["lab"]
    assert extras["report"] == {"matplotlib"}  # the old name, kept for scripts that use it
    assert {"matplotlib", "trustme", "pytest", "hypothesis"} <= extras["test"]


def test_scripts_lab_installs_the_lab_extra():
    lab = (ROOT / "scripts" / "lab").read_text()
    setup = (ROOT / "scripts" / "setup").read_text()
    assert re.search(r"scripts/setup\s+lab\b", lab), lab
    assert "pip install" in setup and "${EXTRAS}" in setup


@pytest.mark.parametrize("path", DAEMON_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_daemon_module_imports_lab_or_table_packages(path):
    """Every import statement, at module level or inside a function: a lazy import on a rare
    path would still need the package on the storage node."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [("." * node.level) + (node.module or "")]
        else:
            continue
        for m in mods:
            assert m.split(".")[0] not in NOT_IN_DAEMONS, f"{path}:{node.lineno} imports {m}"
            assert not re.match(r"\.+(lab|ctl|cli)\b", m), f"{path}:{node.lineno} imports {m}"


@pytest.mark.parametrize("daemon,module", [
    ("node", "syncd.node.daemon"), ("witness", "syncd.witness.server"), ("host", "syncd.host"),
])
def test_a_daemons_import_graph_has_no_matplotlib(tmp_path, daemon, module):
    """``syncd node|witness|host --check`` in a fresh interpreter (the command line's own
    imports, then the daemon's serving module): no plotting, CA or table package is loaded."""
    code = (
        "import json, sys\n"
        "from syncd.cli import main\n"
        f"rc = main([{daemon!r}, '--config', {str(tmp_path / 'missing.toml')!r}, '--check'])\n"
        f"import {module}\n"
        "print(json.dumps([rc, sorted({m.split('.')[0] for m in sys.modules})]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    rc, loaded = json.loads(out.stdout.splitlines()[-1])
    assert rc == 2  # the missing config is reported, after the daemon's modules were imported
    assert not NOT_IN_DAEMONS & set(loaded), sorted(NOT_IN_DAEMONS & set(loaded))
    assert {"trio", "syncd"} <= set(loaded)
