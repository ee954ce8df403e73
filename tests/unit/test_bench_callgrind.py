"""bench/cghook/sitecustomize.py (``bench/cpu_per_io.py --callgrind``): a node process replaces
itself by the same command under callgrind, counting off until the benchmark turns it on, and
never polls there; every other process is left alone. valgrind is stood in for by a script that
records how it was called, so the test needs no valgrind."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import syncd.config

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "bench" / "cghook" / "sitecustomize.py"
NODE = [sys.executable, "-m", "syncd", "node", "--help"]  # a node's command line that exits at once


def _fake_valgrind(tmp_path: Path) -> Path:
    """A 'valgrind' that writes its arguments, then runs the command after them (as valgrind
    would, with the environment it was given)."""
    fake = tmp_path / "valgrind"
    fake.write_text(f"#!{sys.executable}\n"
                    "import os, sys\n"
                    f"open({str(tmp_path / 'argv')!r}, 'w').write('\\n'.join(sys.argv[1:]))\n"
                    "cmd = sys.argv[next(i for i, a in enumerate(sys.argv) if i and not a.startswith('--')):]\n"
                    "os.execv(cmd[0], cmd)\n")
    fake.chmod(0o755)
    return fake


def _run(cmd: list[str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HOOK.parent)]),
               SYNCD_VALGRIND=str(_fake_valgrind(tmp_path)), **extra)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p


def test_a_node_runs_under_callgrind_with_counting_off(tmp_path: Path) -> None:
    _run(NODE, tmp_path, SYNCD_CALLGRIND=str(tmp_path / "cg"))
    args = (tmp_path / "argv").read_text().splitlines()
    assert args == ["--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp_path}/cg/cg.%p",
                    "--dump-instr=no", *NODE]


@pytest.mark.parametrize("cmd, env", [
    ([sys.executable, "-m", "syncd", "witness", "--help"], {"SYNCD_CALLGRIND": "x"}),  # not a node
    (NODE, {}),  # no variable
])
def test_other_processes_are_left_alone(tmp_path: Path, cmd: list[str], env: dict[str, str]) -> None:
    _run(cmd, tmp_path, **env)
    assert not (tmp_path / "argv").exists()  # valgrind was never called


def test_under_callgrind_a_node_never_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("cghook_site", HOOK)
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)  # this process has no SYNCD_CALLGRIND: importing does nothing
    assert syncd.config.BUSY_POLL_US == 500
    execs: list[object] = []
    monkeypatch.setattr(os, "execvp", lambda *a: execs.append(a))
    monkeypatch.setattr(syncd.config, "BUSY_POLL_US", 500)
    env = {"SYNCD_CALLGRIND": "/x", "SYNCD_CALLGRIND_ACTIVE": "1"}
    hook._main(["py", "-m", "syncd", "witness"], env)
    assert syncd.config.BUSY_POLL_US == 500
    hook._main(["py", "-m", "syncd", "node", "--config", "c.toml"], env)
    assert syncd.config.BUSY_POLL_US == 0 and execs == []  # the default the node's config takes
