"""syncctl for scripts (issue 12, item 5): --json anywhere on the line, errors as JSON with a
stable code, the same documented exit status in both modes, tables never cut, --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from syncd.ctl import EXIT

from .rig import syncctl

pytestmark = pytest.mark.system
MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(small_lab):
    return small_lab


ctl = syncctl


def test_json_anywhere_on_the_line(lab):
    sock = lab["nodes"]["A"]["admin_socket"]
    before = ctl("--json", "--socket", sock, "showrcopy")
    after = ctl("showrcopy", "--socket", sock, "--json")
    mixed = ctl("--socket", sock, "showrcopy", "--json")
    assert before.returncode == after.returncode == mixed.returncode == 0
    shapes = [json.loads(p.stdout) for p in (before, after, mixed)]
    assert all(s["node"] == "A" and s["groups"][0]["name"] == "rcg1" for s in shapes)


@pytest.mark.parametrize("case,args,code", [
    ("not found", ["showrcopy", "groups", "nosuch"], "not_found"),
    ("not found (volume)", ["checkrcopyvv", "vv9"], "not_found"),
    ("refused", ["removercopygroup", "rcg1"], "refused"),  # a started group with volumes
    ("usage", ["setrcopygroup", "pol", "rcg1"], "usage"),
    ("usage (argparse)", ["nosuchverb"], "usage"),
])
def test_exit_status_and_json_errors_per_case(lab, case, args, code):
    sock = lab["nodes"]["A"]["admin_socket"]
    plain = ctl("--socket", sock, *args)
    js = ctl("--socket", sock, *args, "--json")
    assert plain.returncode == js.returncode == EXIT[code], (case, plain, js)
    err = json.loads(js.stdout)
    assert err["ok"] is False and err["code"] == code and err["exit"] == EXIT[code] and err["error"]
    assert "error:" in plain.stderr and plain.stdout == ""


def test_unreachable_node(tmp_path):
    for extra in ([], ["--json"]):
        p = ctl("--socket", str(tmp_path / "no.sock"), "showrcopy", *extra)
        assert p.returncode == EXIT["unreachable"]
        if extra:
            assert json.loads(p.stdout)["code"] == "unreachable"


def test_replicas_differ_has_its_own_status_in_both_modes(lab):
    sock = lab["nodes"]["A"]["admin_socket"]
    assert ctl("--socket", sock, "checkrcopyvv", "vv1", "--json").returncode == 0
    fd = os.open(lab["nodes"]["B"]["volumes"]["vv1"]["path"], os.O_WRONLY)
    try:
        old = os.pread(os.open(lab["nodes"]["B"]["volumes"]["vv1"]["path"], os.O_RDONLY), 512, 3 * MiB)
        os.pwrite(fd, bytes(b ^ 0xFF for b in old), 3 * MiB)  # bit rot behind syncd's back
        os.fsync(fd)
        plain = ctl("--socket", sock, "checkrcopyvv", "vv1")
        js = ctl("--socket", sock, "checkrcopyvv", "vv1", "--json")
        assert plain.returncode == js.returncode == EXIT["replicas_differ"]
        assert "DIFFER" in plain.stdout and json.loads(js.stdout)["differing_regions"] == 1
    finally:
        os.pwrite(fd, old, 3 * MiB)
        os.fsync(fd)
        os.close(fd)
    assert ctl("--socket", sock, "checkrcopyvv", "vv1").returncode == 0


def test_tables_are_never_cut_in_a_pipe(lab):
    sock = lab["nodes"]["A"]["admin_socket"]
    out = ctl("--socket", sock, "showrcopy").stdout
    assert "…" not in out and "primary" in out
    st = json.loads(ctl("--socket", sock, "showrcopy", "--json").stdout)
    for p in st["link"]["paths"]:
        assert p["peer"] in out  # full addresses, not 127.0.0…
    out = ctl("--socket", sock, "showpaths").stdout
    assert "…" not in out


def test_version():
    for prog in (["-m", "syncd.ctl"], ["-m", "syncd"]):
        p = subprocess.run([sys.executable, *prog, "--version"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.split()[1][0].isdigit(), p


def test_shim_status_errors_have_the_same_codes(tmp_path):
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[host]\nname = "h"\nsocket = "{tmp_path / "s.sock"}"\nadmin_socket = "{tmp_path / "a.sock"}"\n'
                   '[[array]]\nname = "A"\npaths = ["nbd://127.0.0.1:1"]\n')
    for extra in ([], ["--json"]):
        p = subprocess.run([sys.executable, "-m", "syncd", "host", "--config", str(cfg), "--status", *extra],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == EXIT["unreachable"], p  # no shim runs with that admin socket
        if extra:
            assert json.loads(p.stdout)["code"] == "unreachable"
