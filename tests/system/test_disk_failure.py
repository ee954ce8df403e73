"""Backing-device failures (the seed's "RAID set or metadata failure"): loop devices shrunk under
the node, EIO from a FUSE-backed disk, a full volume filesystem, a full data directory."""

from __future__ import annotations

import os

import pytest

from syncd.lab.rig import lab_down, lab_fail, lab_heal, lab_kill, lab_start, lab_up

from ..guard import unavailable
from .rig import FAST_LINK, require_root, require_tool, wait_witness_knows_in_sync
from .test_failover import WITNESS, group, wait_for
from .test_operations import _check_both, _workload_during

pytestmark = [pytest.mark.system, pytest.mark.root]


@pytest.mark.parametrize("failed", ["A", "B"])
def test_disk_failure_stops_that_array_and_the_peer_serves_on(looplab, failed):
    lab = looplab
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
    wait_witness_knows_in_sync(lab)
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
    _check_both(lab, hs)


def test_disk_full_under_the_primary_volume_is_a_device_failure_and_the_peer_takes_over(tmp_path):
    """Array A's volume is a sparse file on a filesystem with room for 2 MiB of its 16 MiB: host
    writes fill it, the kernel answers ENOSPC. A stops the group and says why, hands it to B;
    no acknowledged write is lost. Once space is freed and A restarted, it resyncs from B."""
    import subprocess

    require_root()
    fsdir = tmp_path / "small-fs"
    fsdir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fsdir)], check=True)
    d = tmp_path / "lab"
    lab = None
    try:
        for img in (fsdir / "vv1.img", tmp_path / "B-vv1.img"):
            with open(img, "wb") as f:
                f.truncate(16 << 20)  # sparse: blocks are taken as they are written
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                     volume_paths={"A": [str(fsdir / "vv1.img")], "B": [str(tmp_path / "B-vv1.img")]},
                     timeout=60)
        wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
        wait_witness_knows_in_sync(lab)
        hs, _ = _workload_during(lab, lambda: wait_for(lambda: group(lab, "B")["role"] == "primary", timeout=20,
                                                       what="B to take over"), duration=6.0)
        ga, gb = group(lab, "A"), group(lab, "B")
        assert "No space left on device" in ga["disk_error"], ga["disk_error"]
        assert not ga["serving"] and ga["alua"] == "unavailable"
        assert gb["role"] == "primary" and gb["serving"] and gb["epoch"] == 2
        assert hs["B"].errors == [], hs["B"].errors[:3]
        assert hs["A"].errors  # the host at the full array's site lost access
        # Room again (the administrator grew the filesystem); A is restarted and resynced.
        subprocess.run(["mount", "-o", "remount,size=64m", str(fsdir)], check=True)
        lab_kill(lab["dir"], "A")
        lab_start(lab["dir"], "A")
        wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", timeout=60, what="resync after space was freed")
        assert group(lab, "A")["disk_error"] is None
        _check_both(lab, hs)
    finally:
        if lab is not None:
            lab_down(str(d))
        subprocess.run(["umount", str(fsdir)])


def test_full_data_directory_stops_the_node_with_a_clear_error_and_the_peer_takes_over(tmp_path):
    """Array A's data directory (state.json, write-intent logs) is on a small filesystem that
    fills up. The next metadata write fails: A stops, saying why, rather than act on state it
    could not record; B takes the group over through the witness and its host goes on. With
    room again, A starts, rejoins as secondary and is resynced; nothing acknowledged is lost."""
    import subprocess

    from syncd.ctl import CtlError, call

    require_root()
    d = tmp_path / "lab"
    ddir = d / "A" / "data"
    ddir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ddir)], check=True)
    lab = None
    try:
        for s in ("A", "B"):
            with open(tmp_path / f"{s}-vv1.img", "wb") as f:
                f.truncate(16 << 20)
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                     volume_paths={s: [str(tmp_path / f"{s}-vv1.img")] for s in ("A", "B")}, timeout=60)
        wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
        wait_witness_knows_in_sync(lab)
        state = (ddir / "state.json").read_bytes()

        def fill_and_change():
            with open(ddir / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            with pytest.raises((CtlError, OSError)):
                call(lab["nodes"]["A"]["admin_socket"], "createhost", {"name": "h9", "addresses": ["10.9.9.9"]},
                     timeout=10)
            wait_for(lambda: group(lab, "B")["role"] == "primary", timeout=20, what="B to take over")

        hs, _ = _workload_during(lab, fill_and_change, duration=6.0)
        log = (d / "A.log").read_text()
        assert "cannot write node metadata" in log and "No space left on device" in log, log[-2000:]
        assert "Traceback" not in log
        assert (ddir / "state.json").read_bytes() == state  # the old metadata, whole
        assert (ddir / "running").exists()  # not a clean stop: the restart compares what may differ
        assert hs["B"].errors == [], hs["B"].errors[:3]
        gb = group(lab, "B")
        assert gb["role"] == "primary" and gb["serving"] and gb["epoch"] == 2
        # Room again: A starts from the metadata it had, rejoins and is resynced.
        (ddir / "filler").unlink()
        lab_start(lab["dir"], "A")
        wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", timeout=60, what="A resynced")
        assert group(lab, "A")["role"] == "secondary"
        _check_both(lab, hs)
    finally:
        if lab is not None:
            lab_down(str(d))
        subprocess.run(["umount", str(ddir)])


def test_eio_from_the_primary_device_hands_the_group_over_and_loses_nothing(tmp_path):
    """Array A's volume is a FUSE file (nbdfuse over nbdkit's error filter) whose reads and
    writes start failing with EIO from the kernel under host writes: A stops the group and
    hands it to B; B's host goes on without an error. With the device healthy again and A
    restarted, it is resynced; every acknowledged write is on both replicas."""
    from syncd.lab.faults import FailingFile

    require_root()
    require_tool("nbdfuse", "nbdkit")
    if not os.path.exists("/dev/fuse"):
        unavailable("/dev/fuse is missing: FUSE-backed failing disks need it")
    with open(tmp_path / "B-vv1.img", "wb") as f:
        f.truncate(16 << 20)
    disk = FailingFile(str(tmp_path / "A-vv1.img"), str(tmp_path / "A-backing.img"), 16 << 20)
    d = tmp_path / "lab"
    lab = None
    try:
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                     volume_paths={"A": [disk.path], "B": [str(tmp_path / "B-vv1.img")]}, timeout=60)
        wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
        wait_witness_knows_in_sync(lab)
        hs, _ = _workload_during(lab, disk.fail, duration=6.0)
        ga, gb = group(lab, "A"), group(lab, "B")
        assert "Input/output error" in ga["disk_error"], ga["disk_error"]
        assert not ga["serving"] and ga["alua"] == "unavailable"
        assert gb["role"] == "primary" and gb["serving"] and gb["epoch"] == 2
        assert hs["B"].errors == [], hs["B"].errors[:3]
        assert hs["A"].errors
        assert "Traceback" not in (d / "A.log").read_text()
        disk.heal()
        lab_kill(lab["dir"], "A")
        lab_start(lab["dir"], "A")
        wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", timeout=60, what="resync after repair")
        _check_both(lab, hs)
    finally:
        if lab is not None:
            lab_down(str(d))
        disk.stop()
