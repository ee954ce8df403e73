"""`syncd lab up --tls` (issue 11, item 6): every connection of the lab over TLS, and the
nbdinfo / qemu-img commands it prints reach the exports over nbds://."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from syncd.ctl import call
from syncd.lab.rig import lab_down

from .rig import require_tool, run

pytestmark = pytest.mark.system


def test_lab_up_tls_prints_commands_that_reach_the_exports_over_nbds(tmp_path):
    require_tool("nbdinfo", "qemu-img")
    d = tmp_path / "lab"
    syncd = [sys.executable, "-m", "syncd"]
    try:
        out = run(*syncd, "lab", "up", "--tls", "--witness", "--topology", "uniform", "--dir", str(d),
                  "--size", "16MiB", "--volumes", "1", timeout=180).stdout
        lab = json.loads((d / "lab.json").read_text())
        commands = [shlex.split(line, comments=True) for line in out.splitlines()
                    if line.startswith(("  nbdinfo ", "  qemu-img "))]
        assert [c[0] for c in commands] == ["nbdinfo", "qemu-img", "qemu-img"] * 2, out
        src, copy = tmp_path / "src.img", tmp_path / "copy.img"
        src.write_bytes(os.urandom(4 << 20))
        for c in commands:  # A: nbdinfo, info, write FILE; B: nbdinfo, info, read into COPY
            c = [str(src) if a == "FILE" else str(copy) if a == "COPY" else a for a in c]
            r = run(*c)
            if c[0] == "nbdinfo":
                assert "with TLS" in r.stdout and 'export="vv1"' in r.stdout
        assert copy.read_bytes()[:4 << 20] == src.read_bytes()

        # Clear text reaches nothing, not even the export list.
        for site in ("A", "B"):
            port = lab["nodes"][site]["nbd"].rsplit(":", 1)[1]
            assert run("nbdinfo", f"nbd://127.0.0.1:{port}/vv1", check=False).returncode != 0
            assert run("nbdinfo", "--list", f"nbd://127.0.0.1:{port}/", check=False).returncode != 0
        # The link is mutual TLS; the host shims' paths are nbds:// and up (lab up waited for them).
        for site in ("A", "B"):
            st = call(lab["nodes"][site]["admin_socket"], "showrcopy")
            assert st["link"]["security"] == "tls" and st["link"]["paths_up"] == 2
            assert all(p["protection"].startswith("TLSv1.") for p in st["link"]["paths"]), st["link"]["paths"]
            assert st["witness"]["reachable"]
            host = Path(lab["hosts"][site]["config"]).read_text()
            assert "nbds://" in host and "nbd://" not in host and "tls_certificate" in host
        # The witness: mutual TLS too, and the nodes name it (no other certificate of the CA passes).
        wtoml = Path(lab["witness"]["config"]).read_text()
        assert lab["tls"]["witness"] == "mutual TLS" and "tls_certificate" in wtoml and "\nkey = " not in wtoml
        for site in ("A", "B"):
            node = Path(lab["nodes"][site]["config"]).read_text()
            assert 'name = "W"' in node.split("[witness]")[1]
        key_files = list((d / "tls").rglob("*-key.pem"))
        assert key_files and all(f.stat().st_mode & 0o077 == 0 for f in key_files)
        assert not any("ca-key" in f.name for f in (d / "tls").rglob("*"))
    finally:
        if (d / "lab.json").exists():
            lab_down(str(d))
