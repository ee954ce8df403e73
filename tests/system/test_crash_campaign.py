"""Crash campaign (issue 5): rounds of `kill -9` of the primary, the secondary, both arrays at
once (a power cut of both sites) or the witness while hosts write through their shims (uniform
lab, quorum witness); the victims are restarted and the group must come back in sync every round
with no acknowledged write missing, identical replicas, no false split brain, and a resync that
copies and compares what was written while degraded or in flight, not the volume.

SYNCD_CRASH_ROUNDS sets the number of rounds (default 4: each kind once; more rounds add random ones),
SYNCD_CRASH_SEED the random victims' order.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import trio

from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_fail, lab_heal, lab_in_sync, lab_kill, lab_start, lab_up, load_lab
from syncd.lab.workload import History, check_file, run_writer

from .rig import FAST_LINK, assert_replicas_identical, wait_witness_knows_in_sync
from .test_failover import WITNESS

pytestmark = pytest.mark.system
MiB = 1 << 20
SIZE = 64 * MiB
HOT = 8 * MiB  # the hosts write only here: a resync of more would be a copy of the volume


def showrcopy(lab, site):
    return call(lab["nodes"][site]["admin_socket"], "showrcopy", {"group": "rcg1"}, timeout=5)


def in_sync(lab) -> bool:
    return lab_in_sync(lab)


def resync_counters(lab) -> dict:
    """Per array: (pid, bytes sent by resync, bytes compared by digest) since that process started."""
    lab = load_lab(lab["dir"])
    out = {}
    for s in ("A", "B"):
        try:
            r = showrcopy(lab, s)
            out[s] = (lab["nodes"][s]["pid"], r["resync_bytes"], r["compared_bytes"])
        except Exception:  # noqa: BLE001
            out[s] = (lab["nodes"][s]["pid"], 0, 0)
    return out


def since(before: dict, after: dict, i: int) -> int:
    """Counter ``i`` summed over both arrays since ``before`` (a restarted array starts from 0)."""
    return sum(a[i] - (before[s][i] if before[s][0] == a[0] else 0) for s, a in after.items())


def uniform_lab(d: str) -> dict:
    """Arrays A and B with a quorum witness and a host shim per site (uniform hosts)."""
    return lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                  topology="uniform", timeout=60)


def start_hot_writers(nursery, lab, hist: dict, duration: float, seed: int | None = None) -> None:
    """Each host writes (writer i+1) to its half of the hot area through its shim (random
    sequence ``seed``, or the writer number)."""
    n = HOT // 2 // 4096
    for i, (s, h) in enumerate(lab["hosts"].items()):
        nursery.start_soon(lambda h=h, s=s, lo=i * n, w=i + 1: run_writer(
            h["volumes"]["vv1"], hist[s], writer=w, blocks=range(lo, lo + n), duration=duration, qd=4,
            seed=w if seed is None else seed))


def assert_hosts_writes_on_both_replicas(lab, hist: dict, what: str = "") -> None:
    """Every write any host had acknowledged is on both replicas, and they are identical."""
    paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in ("A", "B")}
    for i, s in enumerate(lab["hosts"]):
        for r in paths.values():
            assert check_file(r, hist[s], writer=i + 1) == [], f"{what}acknowledged writes of host {s} missing on {r}"
    assert_replicas_identical(lab, "vv1")


def test_kill_9_campaign_loses_nothing_and_resyncs_only_what_changed(tmp_path):
    rounds = int(os.environ.get("SYNCD_CRASH_ROUNDS", "4"))
    rng = random.Random(int(os.environ.get("SYNCD_CRASH_SEED", "7")))
    d = str(tmp_path / "lab")
    lab = uniform_lab(d)
    report = []
    try:
        wait_witness_knows_in_sync(lab)
        victims = ["primary", "secondary", "both", "witness"]
        for rnd in range(rounds):
            victim = victims[rnd] if rnd < len(victims) else rng.choice(victims)
            gs = {s: showrcopy(lab, s)["groups"][0] for s in ("A", "B")}
            sites = {"witness": [], "both": ["A", "B"]}.get(victim)
            if sites is None:
                sites = [next(s for s, g in gs.items() if g["role"] == victim)]
            before = resync_counters(lab)
            hist = {s: History() for s in lab["hosts"]}
            t = {}

            def crash_and_restart(sites=sites, t=t):
                t["kill"] = time.monotonic()
                if not sites:
                    lab_fail(d, "witness")  # kill -9 of the witness
                for site in sites:
                    lab_kill(d, site)
                time.sleep(2.0)
                if not sites:
                    lab_heal(d, "witness")
                for site in sites:
                    lab_start(d, site)

            async def main(hist=hist, rnd=rnd, crash_and_restart=crash_and_restart):
                async with trio.open_nursery() as n:
                    start_hot_writers(n, lab, hist, 5.0, seed=rnd)
                    await trio.sleep(1.0)
                    await trio.to_thread.run_sync(crash_and_restart)

            trio.run(main)
            deadline = time.monotonic() + 60
            while not in_sync(lab):
                assert time.monotonic() < deadline, f"round {rnd}: not back in sync after killing {victim}"
                time.sleep(0.1)
            after = resync_counters(lab)
            resynced, compared = since(before, after, 1), since(before, after, 2)
            written = sum(h.acked_count() for h in hist.values()) * 4096
            gs = {s: showrcopy(lab, s)["groups"][0] for s in ("A", "B")}
            assert not any(g["split_brain"] for g in gs.values()), f"round {rnd}: false split brain {gs}"
            for s, h in hist.items():
                assert h.errors == [], f"round {rnd} ({victim}): host {s} saw I/O errors {h.errors[:3]}"
            assert_hosts_writes_on_both_replicas(lab, hist, f"round {rnd}: ")
            assert resynced <= HOT, f"round {rnd} ({victim}): resynced {resynced} bytes, more than the {HOT} written to"
            assert compared <= 2 * HOT, f"round {rnd} ({victim}): compared {compared} bytes of a {SIZE}-byte volume"
            report.append((rnd, victim, "+".join(sites) or "W", written, resynced, compared,
                           {s: g["epoch"] for s, g in gs.items()}))
    finally:
        lab_down(d)
        print(f"crash campaign on a {SIZE / MiB:.0f} MiB volume (hosts write to {HOT / MiB:.0f} MiB of it)")
        for row in report:
            print("round %d: killed %s (%s); host writes %.1f MiB; resynced %.1f MiB; compared %.1f MiB; epochs %s"
                  % (row[0], row[1], row[2], row[3] / MiB, row[4] / MiB, row[5] / MiB, row[6]))
    assert len(report) == rounds
