"""Node metadata as a real daemon sees it (issue 5, items 1 and 6): a second node process on a
data directory in use, metadata it cannot trust (damaged, of a newer format) and a write-intent
log of a newer format each stop the process at start with the reason, exit code 2, and leave
every file as it was; the group is then whole again once the node starts on its own metadata."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_kill, lab_start, lab_up

from .rig import FAST_LINK, assert_replicas_identical
from .test_failover import wait_for

pytestmark = pytest.mark.system


def group(lab, site):
    return call(lab["nodes"][site]["admin_socket"], "showrcopy", {"group": "rcg1"})["groups"][0]


def run_node(lab, site) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncd", "node", "--config", lab["nodes"][site]["config"]],
                          capture_output=True, text=True, timeout=30)


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "lock"}


@pytest.fixture
def lab(tmp_path):
    lab = lab_up(str(tmp_path / "lab"), size="8MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, timeout=60)
    yield lab
    lab_down(lab["dir"])


def test_a_second_node_process_on_the_same_data_directory_is_refused(lab):
    data = Path(lab["dir"]) / "A" / "data"
    before = snapshot(data)
    p = run_node(lab, "A")  # A is running
    assert p.returncode == 2, p.stderr
    assert "in use by another syncd node process" in p.stderr
    assert group(lab, "A")["serving"]
    after = snapshot(data)
    assert after.keys() == before.keys()
    assert after["state.json"] == before["state.json"]


@pytest.mark.parametrize("damage", ["truncated", "newer-format", "newer-intent-log"])
def test_metadata_it_cannot_trust_stops_the_node_and_is_left_alone(lab, damage):
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="in sync")
    lab_kill(lab["dir"], "B", signal.SIGTERM)
    data = Path(lab["dir"]) / "B" / "data"
    state = data / "state.json"
    good = state.read_bytes()
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:100])
        want = "cannot be read"
    elif damage == "newer-format":
        d = json.loads(state.read_text())
        d["version"] = 99
        state.write_text(json.dumps(d))
        want = "format version 99"
    else:
        log = next(data.glob("intent-*"))
        raw = bytearray(log.read_bytes())
        raw[8:12] = (99).to_bytes(4, "big")
        log.write_bytes(bytes(raw))
        want = "of format 99, newer than this syncd reads"
    before = snapshot(data)
    p = run_node(lab, "B")
    assert p.returncode == 2, p.stderr
    assert want in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert snapshot(data) == before  # nothing rewritten, nothing removed
    # The operator puts the metadata right (here: the intact copy) and B rejoins.
    if damage == "newer-intent-log":
        # B stopped cleanly: the log holds nothing needed (after a crash, without it, the
        # whole volume would be compared).
        next(data.glob("intent-*")).unlink()
    else:
        state.write_bytes(good)
    lab_start(lab["dir"], "B")
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", timeout=30, what="B back in sync")
    assert_replicas_identical(lab, "vv1")
