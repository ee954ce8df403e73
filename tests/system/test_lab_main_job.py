"""The main job shows the product (issue 12, item 9): `syncd lab up` runs both arrays and the
quorum witness by default (`--no-witness` leaves it out), and its host topologies set proximity
as the seed does: uniform (Active Peer Persistence) by site, so each host sees its local array
active/optimized and the other active/non-optimized; non-uniform (Active Sync) proximity "all",
with an empty host definition on the array a host is not cabled to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from syncd.ctl import call
from syncd.host import host_status
from syncd.lab.rig import lab_down

from .rig import run, wait_for

pytestmark = pytest.mark.system
SYNCD = [sys.executable, "-m", "syncd"]


def _paths(lab: dict, site: str) -> dict[str, str]:
    st = host_status(lab["hosts"][site]["admin_socket"])
    return {p["array"]: p["alua"] for v in st["volumes"] for p in v["paths"]}


def _shown(lab: dict, array: str) -> dict[str, tuple]:
    rows = call(lab["nodes"][array]["admin_socket"], "showpaths", {})["paths"]
    return {r["host"]: (r["proximity"], r["state"]) for r in rows}


@pytest.fixture
def lab_dir(tmp_path):
    d = tmp_path / "lab"
    yield d
    if (d / "lab.json").exists():
        lab_down(str(d))


def test_lab_up_runs_the_witness_and_uniform_hosts_see_optimized_and_non_optimized_paths(lab_dir):
    out = run(*SYNCD, "lab", "up", "--dir", str(lab_dir), "--size", "8MiB", "--volumes", "1",
              "--topology", "uniform", timeout=180).stdout
    lab = json.loads((lab_dir / "lab.json").read_text())
    assert lab["witness"] and "witness (site W)" in out
    for s in ("A", "B"):
        w = call(lab["nodes"][s]["admin_socket"], "showrcopy", {})["witness"]
        assert w["reachable"], w
    # Host a (site A) and host b (site B), each through its shim with a path to both arrays.
    assert _paths(lab, "A") == {"A": "active/optimized", "B": "active/non-optimized"}
    assert _paths(lab, "B") == {"A": "active/non-optimized", "B": "active/optimized"}
    # What each array shows: proximity by site (A is the natural primary).
    assert _shown(lab, "A") == {"ha": ("primary", "active/optimized"), "hb": ("secondary", "active/non-optimized"),
                                "lab": ("all", "active/optimized")}
    assert _shown(lab, "B") == {"ha": ("primary", "active/non-optimized"), "hb": ("secondary", "active/optimized"),
                                "lab": ("all", "active/optimized")}
    hosts = {h["name"]: h for h in call(lab["nodes"]["B"]["admin_socket"], "showhost", {})["hosts"]}
    assert hosts["ha"]["connections"] >= 1 and hosts["hb"]["connections"] >= 1  # told apart by address
    # Proximity names the site, not the role: after a switchover (B primary, the group reversed)
    # each host keeps its optimized path to its own site's array, which serves too.
    # (Refused, changing nothing, until the witness has heard from A that B is in sync: retried.)
    wait_for(lambda: run(sys.executable, "-m", "syncd.ctl", "--lab", str(lab_dir), "--node", "A", "setrcopygroup",
                         "switchover", lab["group"], timeout=60, check=False).returncode == 0,
             timeout=30, what="switchover accepted")
    wait_for(lambda: call(lab["nodes"]["B"]["admin_socket"], "showrcopy", {})["groups"][0]["role_label"]
             == "primary-rev" and _paths(lab, "A") == {"A": "active/optimized", "B": "active/non-optimized"}
             and _paths(lab, "B") == {"A": "active/non-optimized", "B": "active/optimized"},
             timeout=30, what="switchover done, each host optimized to its own site")
    assert _shown(lab, "A") == {"ha": ("primary", "active/optimized"), "hb": ("secondary", "active/non-optimized"),
                                "lab": ("all", "active/optimized")}
    assert _shown(lab, "B") == {"ha": ("primary", "active/non-optimized"), "hb": ("secondary", "active/optimized"),
                                "lab": ("all", "active/optimized")}


def test_lab_up_no_witness_and_non_uniform_hosts(lab_dir):
    out = run(*SYNCD, "lab", "up", "--no-witness", "--dir", str(lab_dir), "--size", "8MiB", "--volumes", "1",
              "--topology", "non-uniform", timeout=180).stdout
    lab = json.loads((lab_dir / "lab.json").read_text())
    assert lab.get("witness") is None and "no quorum witness" in out
    assert all(call(lab["nodes"][s]["admin_socket"], "showrcopy", {})["witness"] is None for s in ("A", "B"))
    bad = run(*SYNCD, "lab", "fail", "witness", "--dir", str(lab_dir), check=False)
    assert bad.returncode != 0 and "no witness" in bad.stderr + bad.stdout
    assert _paths(lab, "A") == {"A": "active/optimized"} and _paths(lab, "B") == {"B": "active/optimized"}
    # The seed: a host not attached to a site has an empty definition there (no initiators).
    for array, absent in (("A", "hb"), ("B", "ha")):
        hosts = {h["name"]: h for h in call(lab["nodes"][array]["admin_socket"], "showhost", {})["hosts"]}
        assert (hosts[absent]["addresses"], hosts[absent]["tls_names"], hosts[absent]["connections"]) == ([], [], 0)
        assert _shown(lab, array)[absent] == ("all", "active/optimized")
    assert "--witness" in run(*SYNCD, "lab", "up", "--help").stdout
    assert Path(lab["nodes"]["A"]["config"]).read_text().count("[witness]") == 0
