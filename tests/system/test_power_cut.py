"""Power cuts (issue 10, item 5): a power cut loses what was only in the page cache and the
disks' write caches, not just the node process. Volumes sit on power-cut disks
(``syncd.lab.faults.PowerCutDisk``: nbdkit's cache filter in writeback mode exposed through
nbdfuse; a cut is kill -9 of nbdkit, so every write not flushed is gone). Hosts write, some
writes flushed or FUA; the regions written first go idle long enough for their write-intent bits
to be cleared (the hot set of the log is one extent: writes elsewhere evict them), then the
primary, the secondary or both lose power while hosts write elsewhere.
Powered on and restarted, the group must come back in sync with replicas identical byte for byte,
``checkrcopyvv`` finding no difference, and no acknowledged-and-flushed write missing; after a
power cut of one site, no acknowledged write at all (the other site had every one: a primary
that comes back as primary fetches back from its peer what the cut took from it). At the
end both arrays stop cleanly and then lose power: their media (the disks' backing files) must be
identical and hold every flushed write (a clean stop syncs the volumes before it marks the node
clean, which makes the next start compare nothing).

SYNCD_POWER_CUT_ROUNDS sets the number of rounds (default 3: primary, secondary, both; then
random victims, SYNCD_POWER_CUT_SEED their order).
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import struct
import time

import pytest
import trio

from syncd.ctl import call
from syncd.lab.faults import PowerCutDisk
from syncd.lab.rig import lab_down, lab_fail, lab_heal, lab_kill, lab_start, lab_up
from syncd.lab.workload import History, check_file, run_writer
from syncd.nbd.export import punch_hole

from ..guard import unavailable
from .rig import (
    FAST_LINK,
    WITNESS,
    assert_replicas_identical,
    first_difference,
    require_root,
    require_tool,
    wait_for,
)
from .test_crash_campaign import in_sync, resync_counters, showrcopy, since

pytestmark = [pytest.mark.system, pytest.mark.root]
MiB = 1 << 20
BLOCK = 4096
SIZE = 32 * MiB
REGION = 256 << 10
OLD = range(0, 4 * MiB // BLOCK)  # written first, then idle until its intent bits are cleared
NEW = range(8 * MiB // BLOCK, 12 * MiB // BLOCK)  # written until the power goes
# A short transition timeout keeps max_request_hold (a region idle this long + 1 s is a
# candidate for clearing) at 4.25 s instead of 8.25; with no host flush the clear pass then
# waits 5 s more before its own fdatasync: a round takes ~15 s.
LINK = dict(FAST_LINK, transition_timeout=1.0)
# The write-intent log keeps one 4 MiB extent marked while written: once NEW's extent is written,
# OLD's (idle past max_request_hold) is evicted, by the rules a bigger hot set follows too.
INTENT = {"extent": "4MiB", "hot": "4MiB"}


def require_power_cut_disks() -> None:
    require_root()
    require_tool("nbdfuse", "nbdkit")
    if not os.path.exists("/dev/fuse"):
        unavailable("/dev/fuse is missing: power-cut disks (nbdfuse) need it")


def test_a_power_cut_loses_what_the_disk_did_not_flush_and_keeps_what_it_did(tmp_path):
    """The emulator itself: a write followed by fdatasync, and an RWF_DSYNC write, survive a
    cut; a write (or a zeroing) never flushed is gone, though the disk served it while powered."""
    require_power_cut_disks()
    disk = PowerCutDisk(str(tmp_path / "vol.img"), str(tmp_path / "vol.disk"), 4 * MiB)
    disk.power_on()
    try:
        fd = os.open(disk.path, os.O_RDWR)
        try:
            flushed, fua, lost, zeroed = b"F" * BLOCK, b"D" * BLOCK, b"U" * BLOCK, b"Z" * BLOCK
            os.pwrite(fd, flushed, 0)
            os.pwrite(fd, zeroed, 1 * MiB)
            os.fdatasync(fd)
            os.pwritev(fd, [fua], 2 * MiB, os.RWF_DSYNC)
            os.pwrite(fd, lost, 3 * MiB)
            punch_hole(fd, 1 * MiB, BLOCK)  # trims are refused: written as zeroes, through the cache
            assert os.pread(fd, BLOCK, 3 * MiB) == lost and os.pread(fd, BLOCK, 1 * MiB) == bytes(BLOCK)
        finally:
            os.close(fd)
        disk.cut()
        assert not disk.powered and not os.path.ismount(disk.path)
        with open(disk.backing, "rb") as f:
            medium = f.read()
        assert medium[:BLOCK] == flushed and medium[2 * MiB:2 * MiB + BLOCK] == fua
        assert medium[3 * MiB:3 * MiB + BLOCK] == bytes(BLOCK), "an unflushed write survived the cut"
        assert medium[1 * MiB:1 * MiB + BLOCK] == zeroed, "an unflushed zeroing survived the cut"
        disk.power_on()
        with open(disk.path, "rb") as f:
            assert f.read() == medium  # powered on again: the disk serves its medium
    finally:
        disk.cut()


def intent_regions(lab: dict, site: str) -> set[int]:
    """The regions whose write-intent bit is set in ``site``'s log file now (as written, synced or not)."""
    (path,) = glob.glob(os.path.join(os.path.dirname(lab["nodes"][site]["config"]), "data", "intent-*"))
    with open(path, "rb") as f:
        data = f.read()
    _, _, _, n = struct.unpack_from(">8sIIQ", data)
    bits = data[24:]
    return {r for r in range(n) if bits[r >> 3] >> (r & 7) & 1}


def old_regions() -> set[int]:
    return set(range(OLD.start * BLOCK // REGION, (OLD.stop * BLOCK - 1) // REGION + 1))


def start_writers(nursery, lab, hist: dict, area: range, duration: float, seed: int, **kw) -> None:
    """A host at each site writes (writer = site's number) to its half of ``area``."""
    half = len(area) // 2
    for i, s in enumerate(("A", "B")):
        nursery.start_soon(lambda s=s, i=i: run_writer(
            lab["nodes"][s]["volumes"]["vv1"]["uri"], hist[s], writer=i + 1,
            blocks=range(area.start + i * half, area.start + (i + 1) * half), duration=duration, qd=4,
            seed=seed * 10 + i, retry_interval=0.05, **kw))


def assert_flushed_writes_on(paths: dict, hist: dict, what: str, durable_only: bool = True) -> None:
    kind = "flushed writes" if durable_only else "acknowledged writes"
    for i, s in enumerate(("A", "B")):
        for site, path in paths.items():
            problems = check_file(path, hist[s], writer=i + 1, durable_only=durable_only)
            assert problems == [], f"{what}: {kind} of host {s} missing on {site} ({path}): {problems[:3]}"


def test_after_a_power_cut_the_replicas_are_identical_and_no_flushed_write_is_lost(tmp_path):
    require_power_cut_disks()
    rounds = int(os.environ.get("SYNCD_POWER_CUT_ROUNDS", "3"))
    rng = random.Random(int(os.environ.get("SYNCD_POWER_CUT_SEED", "5")))
    d = str(tmp_path / "lab")
    lab = lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=LINK, power_cut=True, timeout=60,
                 intent=INTENT)
    report = []
    # One history per host for the whole run: a block may hold what an earlier round made
    # durable when this round's writes to it were lost with the power.
    hist = {s: History() for s in ("A", "B")}
    both_cut = False  # once both sites lost power, unflushed writes may be gone for good
    try:
        for rnd in range(rounds):
            victim = ["primary", "secondary", "both"][rnd] if rnd < 3 else rng.choice(["primary", "secondary", "both"])
            gs = {s: showrcopy(lab, s)["groups"][0] for s in ("A", "B")}
            sites = ["A", "B"] if victim == "both" else [next(s for s, g in gs.items() if g["role"] == victim)]
            before = resync_counters(lab)
            t: dict = {}

            async def main(rnd=rnd, t=t, victim=victim, sites=sites):
                # Flushed and FUA writes, then writes never flushed, to OLD; OLD then stays idle.
                async with trio.open_nursery() as n:
                    start_writers(n, lab, hist, OLD, 1.0, rnd, flush_every=8, fua_every=5)
                async with trio.open_nursery() as n:
                    start_writers(n, lab, hist, OLD, 0.5, rnd + 100)
                t["old_done"] = time.monotonic()
                async with trio.open_nursery() as n:
                    start_writers(n, lab, hist, NEW, 120.0, rnd + 200)
                    # Until both arrays have cleared OLD's intent bits (idle past max_request_hold,
                    # evicted by NEW's extent).
                    deadline = time.monotonic() + 30
                    while any(intent_regions(lab, s) & old_regions() for s in ("A", "B")):
                        assert time.monotonic() < deadline, "the intent bits of idle regions were never cleared"
                        await trio.sleep(0.1)
                    t["cleared"] = time.monotonic()
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(lab_fail, d, "power", None if victim == "both" else sites[0])
                    t["cut"] = time.monotonic()
                    n.cancel_scope.cancel()

            trio.run(main)
            time.sleep(0.5)
            lab_heal(d, "power", None if victim == "both" else sites[0])
            t["on"] = time.monotonic()
            deadline = time.monotonic() + 60
            while not in_sync(lab):
                assert time.monotonic() < deadline, f"round {rnd}: not back in sync after the power cut of {victim}"
                time.sleep(0.1)
            t["synced"] = time.monotonic()
            after = resync_counters(lab)
            prim = next(s for s in ("A", "B") if showrcopy(lab, s)["groups"][0]["role"] == "primary")
            check = call(lab["nodes"][prim]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
            events = [e["msg"] for s in ("A", "B") for e in showrcopy(lab, s)["groups"][0]["events"]
                      if "unclean" in e["msg"]]
            pulled = sum(showrcopy(lab, s).get("pulled_bytes", 0) for s in ("A", "B"))
            events += [f"fetched back {pulled / MiB:.2f} MiB"]
            report.append((rnd, victim, "+".join(sites), since(before, after, 2), since(before, after, 1),
                           t["synced"] - t["on"], t["cleared"] - t["old_done"], check["differing_regions"], events))
            assert check["differing_regions"] == 0, (
                f"round {rnd} (power cut of {victim} {'+'.join(sites)}): in sync, but checkrcopyvv finds "
                f"{check['differing_regions']} regions differing: {check['differing']}; events: {events}")
            assert_replicas_identical(lab, "vv1")
            paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in ("A", "B")}
            assert_flushed_writes_on(paths, hist, f"round {rnd} ({victim})")
            both_cut = both_cut or victim == "both"
            if not both_cut:
                assert_flushed_writes_on(paths, hist, f"round {rnd} ({victim})", durable_only=False)
        # A clean stop writes everything back before it marks the node clean: then a power cut
        # of both sites loses nothing, and the media (backing files) are identical.
        for s in ("B", "A"):  # the secondary first: the primary then stops without a switchover
            lab_kill(d, s, signal.SIGTERM)
        lab_fail(d, "power")
        media = {s: lab["nodes"][s]["volumes"]["vv1"]["backing"] for s in ("A", "B")}
        diff = first_difference(media["A"], media["B"])
        assert diff is None, f"after a clean stop and a power cut the media differ first at byte {diff}"
        assert_flushed_writes_on(media, hist, "after a clean stop and a power cut")
    finally:
        lab_down(d)
        print(f"power cuts on a {SIZE / MiB:.0f} MiB volume (hosts write {len(OLD) * BLOCK / MiB:.0f} MiB, "
              f"go idle, write {len(NEW) * BLOCK / MiB:.0f} MiB elsewhere until the cut)")
        for r in report:
            print("round %d: power cut of %s (%s): compared %.2f MiB, resynced %.2f MiB, in sync %.1f s after "
                  "power-on; idle regions' bits cleared %.1f s after their last write; checkrcopyvv: %d regions "
                  "differ; %s" % (r[0], r[1], r[2], r[3] / MiB, r[4] / MiB, r[5], r[6], r[7], "; ".join(r[8])))
    assert len(report) == rounds


@pytest.mark.parametrize("witness", [False, True], ids=["no witness", "witness"])
def test_a_primary_cut_off_from_its_peer_as_it_returns_from_a_power_cut_waits_for_it(tmp_path, witness):
    """The etcd history campaign (seed 32): a power cut at the primary took writes that only its
    peer still held, and the replication link went down as it restarted. With the witness's
    agreement it went on alone, served its older copy of those regions and later copied it over
    the peer's newer one. Now it stays in failsafe, serving nothing, until the link returns and
    it has fetched them back; then every acknowledged write is on both arrays. Without a witness
    the pre-elected primary went on alone at the fence's end; with one, the secondary is cut from
    the witness first, so it cannot take the group over meanwhile."""
    require_power_cut_disks()
    d = str(tmp_path / "lab")
    lab = lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=LINK, power_cut=True, timeout=60,
                 intent=INTENT, witness=WITNESS if witness else None)
    hist = {s: History() for s in ("A", "B")}
    try:
        prim = next(s for s in ("A", "B") if showrcopy(lab, s)["groups"][0]["role"] == "primary")
        sec = "B" if prim == "A" else "A"
        if witness:
            lab_fail(d, "witness-link", sec)

        async def main() -> None:
            async with trio.open_nursery() as n:
                start_writers(n, lab, hist, NEW, 120.0, 7)  # never flushed: in the cache when the power goes
                await trio.sleep(2.0)
                await trio.to_thread.run_sync(lab_fail, d, "power", prim)
                n.cancel_scope.cancel()

        trio.run(main)
        lab_fail(d, "link")
        lab_heal(d, "power", prim)  # back, and cut off from its peer
        deadline = time.monotonic() + 30
        while showrcopy(lab, prim)["groups"][0]["status"] != "failsafe":
            assert time.monotonic() < deadline, f"{prim} did not enter failsafe: {showrcopy(lab, prim)['groups'][0]}"
            time.sleep(0.1)
        time.sleep(4.0)  # longer than a failsafe retry's period and the witness's owner lease
        g = showrcopy(lab, prim)["groups"][0]
        msgs = [e["msg"] for e in g["events"]]
        assert g["role"] == "primary" and g["status"] == "failsafe", g
        assert any("may hold writes this array lost" in m for m in msgs), msgs
        assert not any("going on alone" in m or "going on without" in m for m in msgs), msgs
        lab_heal(d, "link")
        if witness:
            lab_heal(d, "witness-link", sec)
        deadline = time.monotonic() + 60
        while not in_sync(lab):
            assert time.monotonic() < deadline, "not back in sync after the link returned"
            time.sleep(0.1)
        pulled = showrcopy(lab, prim).get("pulled_bytes", 0)
        check = call(lab["nodes"][prim]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
        assert check["differing_regions"] == 0, check
        assert_replicas_identical(lab, "vv1")
        paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in ("A", "B")}
        assert_flushed_writes_on(paths, hist, "power cut, then the link down", durable_only=False)
        print(f"power cut at {prim}, link down as it restarted: failsafe until the link returned; "
              f"{pulled / MiB:.2f} MiB fetched back; {sum(len(h.acked_times) for h in hist.values())} acknowledged "
              "writes all on both arrays")
    finally:
        lab_down(d)


@pytest.mark.parametrize("gap", ["in sync again", "alone"])
def test_writes_acknowledged_while_mirroring_survive_a_later_power_cut_of_the_primary(tmp_path, gap):
    """Found by review (stop 30): hosts write, never flushing, while the arrays mirror; the link
    goes and the primary goes on alone, acknowledging nothing (no host writes meanwhile). Then
    it loses power ("alone"), which takes every write its disk had not flushed, some of them
    acknowledged while mirroring. Restarted, it copied the regions its write-intent log named to
    the peer, over the peer's copies of those writes (449 blocks older than acknowledged). Now
    it flushes its volumes before it may acknowledge anything alone. "in sync again": the link
    returns first, the arrays are in sync again and hosts write on (mirrored), then the power
    cut: the restart fetches back. Every write acknowledged must be on both after the resync.
    (A power cut while the resync runs is covered in process: ``test_durable_before_alone``.)"""
    require_power_cut_disks()
    d = str(tmp_path / "lab")
    lab = lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=LINK, power_cut=True, timeout=60,
                 intent=INTENT)
    hist = {s: History() for s in ("A", "B")}
    try:
        prim = next(s for s in ("A", "B") if showrcopy(lab, s)["groups"][0]["role"] == "primary")

        def events() -> list[str]:
            return [e["msg"] for e in showrcopy(lab, prim)["groups"][0]["events"]]

        async def write(seconds: float, seed: int) -> None:
            async with trio.open_nursery() as n:
                start_writers(n, lab, hist, NEW, seconds, seed)  # never flushed

        trio.run(write, 2.0, 11)
        lab_fail(d, "link")
        deadline = time.monotonic() + 30
        while not any("going on alone" in m for m in events()):
            assert time.monotonic() < deadline, f"{prim} did not go on alone: {events()}"
            time.sleep(0.1)
        if gap == "in sync again":
            # Its peer lacks nothing (nothing was written alone): in sync at once; hosts write on.
            lab_heal(d, "link")
            trio.run(write, 1.0, 12)
        lab_fail(d, "power", prim)
        lab_heal(d, "link")
        lab_heal(d, "power", prim)
        deadline = time.monotonic() + 60
        while not in_sync(lab):
            assert time.monotonic() < deadline, "not back in sync after the power cut"
            time.sleep(0.1)
        check = call(lab["nodes"][prim]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
        assert check["differing_regions"] == 0, check
        assert_replicas_identical(lab, "vv1")
        paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in ("A", "B")}
        # Nothing was acknowledged alone: every acknowledged write was mirrored.
        assert_flushed_writes_on(paths, hist, f"power cut of the primary after {gap}", durable_only=False)
    finally:
        lab_down(d)


def test_a_secondary_back_from_a_power_cut_does_not_take_over_without_what_it_lost(tmp_path):
    """Finding 12 of the role model: the secondary loses power with mirrored writes its disk had
    not flushed (acknowledged to hosts: the primary held them), and the primary is killed (its
    data intact). Back alone, the secondary took the group over through the witness and served
    without those writes; when the old primary returned, the new one copied its regions over
    the old primary's newer copies, and the writes were gone from both. Now a secondary back
    from an unclean stop while it was writing claims nothing until its primary has resynced
    those regions; then every acknowledged write is on both arrays, and failover works again."""
    require_power_cut_disks()
    d = str(tmp_path / "lab")
    lab = lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=LINK, power_cut=True, timeout=60,
                 intent=INTENT, witness=WITNESS)
    hist = {s: History() for s in ("A", "B")}
    try:
        prim = next(s for s in ("A", "B") if showrcopy(lab, s)["groups"][0]["role"] == "primary")
        sec = "B" if prim == "A" else "A"

        async def main() -> None:
            async with trio.open_nursery() as n:
                start_writers(n, lab, hist, NEW, 120.0, 11)  # never flushed: in the cache when the power goes
                await trio.sleep(2.0)

                def both() -> None:
                    # Together, before the primary can tell the witness the secondary is gone.
                    lab_kill(d, prim)
                    lab_fail(d, "power", sec)

                await trio.to_thread.run_sync(both)
                n.cancel_scope.cancel()

        trio.run(main)
        acked = sum(len(h.acked_times) for h in hist.values())
        lab_heal(d, "power", sec)  # back alone: the witness would grant it the group
        time.sleep(6.0)  # several times the witness's owner lease and grace, and its retry period
        g = showrcopy(lab, sec)["groups"][0]
        msgs = [e["msg"] for e in g["events"]]
        assert g["role"] == "secondary" and g["may_lack_acknowledged_writes"], g
        assert any("does not take the group over until" in m for m in msgs), msgs
        # Stopped cleanly and started again before its primary is back: it still reports the
        # regions it was writing, and still waits.
        lab_kill(d, sec, signal.SIGTERM)
        lab_start(d, sec)
        time.sleep(4.0)
        g = showrcopy(lab, sec)["groups"][0]
        assert g["role"] == "secondary" and g["may_lack_acknowledged_writes"], g
        lab_start(d, prim)
        wait_for(lambda: in_sync(lab), 60, "in sync after the primary returned")
        wait_for(lambda: not showrcopy(lab, sec)["groups"][0]["may_lack_acknowledged_writes"], 10,
                 f"{sec} to learn it was resynced (adopt_gen)")
        check = call(lab["nodes"][prim]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
        assert check["differing_regions"] == 0, check
        assert_replicas_identical(lab, "vv1")
        paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in ("A", "B")}
        assert_flushed_writes_on(paths, hist, "secondary power cut, primary killed", durable_only=False)
        # In sync again: the secondary takes the group over when the primary goes (once the
        # primary's reports have told the witness so).
        time.sleep(5 * WITNESS["interval"])
        lab_kill(d, prim)
        deadline = time.monotonic() + 30
        while showrcopy(lab, sec)["groups"][0]["role"] != "primary":
            assert time.monotonic() < deadline, json.dumps(showrcopy(lab, sec)["groups"][0], indent=1)
            time.sleep(0.1)
        print(f"power cut at the secondary {sec}, primary {prim} killed: {sec} waited for {prim}; "
              f"{acked} acknowledged writes all on both arrays; failover to {sec} afterwards")
    finally:
        lab_down(d)


def test_what_a_resync_copied_survives_a_power_cut_of_both_sites(tmp_path):
    """Finding 13 of the role model (a doubt of stop 32's review): the secondary is down while a
    host writes and flushes at the primary; the secondary returns and the resync copies those
    writes to it, into its caches only; the pair is in sync, the host writes the same regions
    again (not flushed), and both sites lose power at once. The primary's peer held every write,
    so its restart fetched back the regions it was writing from the secondary: a copy the
    power cut had emptied of the resync's data. Flushed writes were gone from both arrays. Now
    the secondary makes the resync's copy durable before the pair is in sync."""
    require_power_cut_disks()
    d = str(tmp_path / "lab")
    lab = lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=LINK, power_cut=True, timeout=60,
                 intent=INTENT)
    hist = History()
    try:
        prim = next(s for s in ("A", "B") if showrcopy(lab, s)["groups"][0]["role"] == "primary")
        sec = "B" if prim == "A" else "A"
        uri = lab["nodes"][prim]["volumes"]["vv1"]["uri"]

        async def write(seconds: float, seed: int, flush_every: int) -> None:
            await run_writer(uri, hist, writer=1, blocks=OLD, duration=seconds, qd=4, seed=seed,
                             retry_interval=0.05, flush_every=flush_every)

        lab_kill(d, sec)
        trio.run(write, 3.0, 21, 4)  # alone, flushed: durable at the primary
        flushed = len(hist.durable)
        lab_start(d, sec)
        wait_for(lambda: in_sync(lab), 60, "in sync after the secondary returned")
        copied = showrcopy(lab, prim)["resync_bytes"]
        # Within seconds, before the secondary's own write-intent pass would flush its volume:
        # the same regions written again, never flushed, as both sites lose power.
        trio.run(write, 1.0, 22, 0)
        lab_fail(d, "power", None)
        lab_heal(d, "power", None)
        wait_for(lambda: in_sync(lab), 60, "in sync after both sites lost power")
        check = call(lab["nodes"][prim]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
        assert check["differing_regions"] == 0, check
        assert_replicas_identical(lab, "vv1")
        for site in ("A", "B"):
            path = lab["nodes"][site]["volumes"]["vv1"]["path"]
            problems = check_file(path, hist, writer=1, durable_only=True)
            assert problems == [], f"flushed writes missing on {site} after the power cut of both sites: {problems[:3]}"
        print(f"resync of {copied / MiB:.1f} MiB to {sec}, then a power cut of both sites: all {flushed} "
              "writes flushed at the primary are on both arrays")
    finally:
        lab_down(d)
