"""The shipped systemd units (systemd/): ``systemd-analyze verify`` finds nothing to say about
them, and ``systemd-analyze security --offline`` scores them below the issue's thresholds.
They are verified as shipped, in a temporary root where /opt/syncd/bin/syncd (the path the
README installs to) runs this checkout's syncd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.rig import require_tool

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
BINARY = "/opt/syncd/bin/syncd"
# unit file -> the instance analysed, and its highest acceptable exposure score (issue 12:
# witness and shim below 5; the node as low as its block devices allow, measured 1.5).
EXPECTED = {
    "syncd-node@.service": ("syncd-node@A.service", 2.0),
    "syncd-witness.service": ("syncd-witness.service", 5.0),
    "syncd-host@.service": ("syncd-host@h1.service", 5.0),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    require_tool("systemd-analyze")
    import sys

    r = tmp_path_factory.mktemp("root")
    (r / "opt/syncd/bin").mkdir(parents=True)
    exe = Path(sys.executable).with_name("syncd")
    (r / "opt/syncd/bin/syncd").write_text(f'#!/bin/sh\nexec "{exe}" "$@"\n')
    os.chmod(r / "opt/syncd/bin/syncd", 0o755)
    shutil.copytree("/usr/lib/systemd/system", r / "usr/lib/systemd/system", symlinks=True)
    (r / "etc/systemd/system").mkdir(parents=True)
    for f in UNITS.glob("*.service"):
        shutil.copy(f, r / "etc/systemd/system" / f.name)
    return r


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args, f"--root={root}"], capture_output=True, text=True,
                          timeout=60)


def test_every_shipped_unit_is_analysed():
    assert sorted(p.name for p in UNITS.glob("*.service")) == sorted(EXPECTED)


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_unit_verifies_cleanly_and_runs_the_readme_binary(root, unit):
    text = (UNITS / unit).read_text()
    assert re.search(rf"^ExecStart={re.escape(BINARY)} ", text, re.M), "ExecStart is not the README's path"
    assert re.search(rf"^ExecStartPre={re.escape(BINARY)} .* --check$", text, re.M)
    for key in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "User=syncd"):
        assert re.search(rf"^{key}", text, re.M), key
    p = analyze(root, "verify", "--man=no", str(root / "etc/systemd/system" / unit))
    assert p.returncode == 0 and not (p.stdout + p.stderr).strip(), p.stdout + p.stderr


def test_verify_would_see_a_broken_unit(root):
    """The check above can fail: a unit with an unknown key, a bad value and a missing binary."""
    bad = root / "etc/systemd/system/broken.service"
    text = (UNITS / "syncd-witness.service").read_text()
    bad.write_text(text.replace("NoNewPrivileges=yes", "NoNewPrivileges=yes\nBogusKey=1\nProtectSystem=maybe")
                   .replace(BINARY, "/opt/syncd/bin/nothing"))
    try:
        p = analyze(root, "verify", "--man=no", str(bad))
    finally:
        bad.unlink()
    out = p.stdout + p.stderr
    assert "BogusKey" in out and "protect system" in out.lower() and "not executable" in out, out


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_unit_security_exposure_is_below_the_threshold(root, unit):
    instance, limit = EXPECTED[unit]
    p = analyze(root, "security", "--offline=true", instance)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    score = float(m.group(1))
    print(f"{instance}: {score}")
    assert score < limit, p.stdout
