"""Backing-device failure (the seed's "RAID set or metadata failure") on real loop devices."""

from __future__ import annotations

import time

import pytest

from syncd.lab import lab_down, lab_fail, lab_heal, lab_up
from syncd.workload import check_file

from .rig import FAST_LINK, assert_replicas_identical, require_root, require_tool
from .test_failover import WITNESS, group, wait_for
from .test_operations import _workload_during

pytestmark = [pytest.mark.system, pytest.mark.root]


@pytest.fixture
def looplab(tmp_path):
    require_root()
    require_tool("losetup")
    d = tmp_path / "lab"
    try:
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                     loop=True, timeout=60)
    except Exception:
        for f in d.glob("*.log"):
            print(f"--- {f}\n{f.read_text()[-3000:]}")
        if (d / "lab.json").exists():
            lab_down(str(d))
        raise
    yield lab
    lab_down(str(d))


@pytest.mark.parametrize("failed", ["A", "B"])
def test_disk_failure_stops_that_array_and_the_peer_serves_on(looplab, failed):
    lab = looplab
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
    time.sleep(1.0)
    survivor = "B" if failed == "A" else "A"
    hs, _ = _workload_during(lab, lambda: lab_fail(lab["dir"], "disk", failed), duration=6.0)
    gf, gs = group(lab, failed), group(lab, survivor)
    assert gf["disk_error"] and not gf["serving"] and gf["alua"] == "unavailable"
    assert gs["role"] == "primary" and gs["serving"] and gs["alua"] == "active/optimized"
    if failed == "A":
        assert gs["epoch"] == 2  # handed over through the witness
    # The survivor's host went on without an error; the failed site's host lost access.
    assert hs[survivor].errors == [], hs[survivor].errors[:3]
    assert hs[failed].errors
    late = [t for t in hs[survivor].acked_times if t > hs[failed].errors[0][0] + 0.5]
    assert len(late) > 50
    lab_heal(lab["dir"], "disk", failed)
    wait_for(lambda: group(lab, survivor)["peer_mode"] == "attached", timeout=60, what="resync after repair")
    for site in ("A", "B"):
        path = lab["nodes"][site]["volumes"]["vv1"]["path"]
        for w, s in ((1, "A"), (2, "B")):
            assert check_file(path, hs[s], writer=w) == [], f"{site} lost acknowledged writes of host {s}"
    assert_replicas_identical(lab, "vv1")
