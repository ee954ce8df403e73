"""A flapping network (issue 5's "they will cut links"): while hosts write through their shims
(uniform lab, quorum witness), the replication paths are cut and healed at random, one or all
at once, for short and long spells, with added latency now and then, and the witness link of a
random array is cut too, or both at once (that array is isolated: the witness gives the group
to its peer if it was primary). The arrays must neither die nor split: the same processes run at the
end, there is at most one serving primary per epoch, no host sees an I/O error, no
acknowledged write is missing and the replicas end identical.

SYNCD_FLAP_SECONDS sets how long the network flaps (default 15), SYNCD_FLAP_SEED the sequence.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import trio

from syncd.lab.faults import pid_alive
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_down, load_lab
from syncd.lab.workload import History

from .rig import wait_witness_knows_in_sync
from .test_crash_campaign import (
    assert_hosts_writes_on_both_replicas,
    in_sync,
    showrcopy,
    start_hot_writers,
    uniform_lab,
)

pytestmark = pytest.mark.system


def test_a_flapping_network_kills_nothing_splits_nothing_and_loses_nothing(tmp_path):
    seconds = float(os.environ.get("SYNCD_FLAP_SECONDS", "15"))
    rng = random.Random(int(os.environ.get("SYNCD_FLAP_SEED", "11")))
    d = str(tmp_path / "lab")
    lab = uniform_lab(d)
    ctl = lab["link"]["control"]
    npaths = lab["link"]["npaths"]
    wrelays = lab["link"]["witness_relays"]
    pids = {s: lab["nodes"][s]["pid"] for s in ("A", "B")}
    hist = {s: History() for s in lab["hosts"]}
    owners: dict[int, set] = {}
    events = []
    try:
        wait_witness_knows_in_sync(lab)

        def watch_primaries(stop):
            while not stop():
                for s in ("A", "B"):
                    try:
                        g = showrcopy(lab, s)["groups"][0]
                    except Exception:  # noqa: BLE001 - busy or a lost answer
                        continue
                    if g["role"] == "primary" and g["serving"]:
                        owners.setdefault(g["epoch"], set()).add(s)
                time.sleep(0.05)

        def flap():
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                what = rng.choice(["all", "one", "one", "delay", "witness", "isolate"])
                spell = rng.choice([0.05, 0.2, 0.5, 1.0, 2.5])
                if what == "all":
                    paths = list(range(npaths))
                elif what == "one":
                    paths = [rng.randrange(npaths)]
                elif what == "witness":
                    paths = list(wrelays[rng.choice(["A", "B"])])
                elif what == "isolate":  # an array cut from its peer and the witness: a failover
                    paths = list(range(npaths)) + wrelays[rng.choice(["A", "B"])]
                else:
                    paths = list(range(npaths))
                    proxy_command(ctl, "delay", ms=rng.choice([20, 80, 300]), paths=paths)
                if what != "delay":
                    proxy_command(ctl, "cut", paths=paths)
                events.append((round(time.monotonic() - end + seconds, 2), what, paths, spell))
                time.sleep(spell)
                proxy_command(ctl, "heal", paths=paths)
                proxy_command(ctl, "delay", ms=0, paths=paths)
                time.sleep(rng.choice([0.05, 0.3, 1.0]))

        async def main():
            done = False
            async with trio.open_nursery() as n:
                start_hot_writers(n, lab, hist, seconds + 4.0)
                n.start_soon(trio.to_thread.run_sync, watch_primaries, lambda: done)
                await trio.sleep(1.0)
                await trio.to_thread.run_sync(flap)
                await trio.sleep(3.0)
                done = True

        trio.run(main)
        deadline = time.monotonic() + 60
        while not in_sync(lab):
            if time.monotonic() > deadline:
                state = {}
                for site in ("A", "B"):
                    g = showrcopy(lab, site)["groups"][0]
                    state[site] = {k: g.get(k) for k in ("role", "epoch", "status", "peer_mode", "serving", "alua",
                                                         "lease_remaining_s", "transitioning")}
                    state[site]["volumes"] = [{k: v.get(k) for k in ("sync_status", "sync_percent", "dirty_regions",
                                                                     "out_of_sync_regions")} for v in g["volumes"]]
                    state[site]["events"] = [e["msg"] for e in g["events"][-4:]]
                raise AssertionError(f"not back in sync after the network settled: {state}")
            time.sleep(0.1)
        lab = load_lab(d)
        assert {s: lab["nodes"][s]["pid"] for s in ("A", "B")} == pids
        assert all(pid_alive(p) for p in pids.values()), "an array died"
        for s in ("A", "B"):
            assert "Traceback" not in open(lab["nodes"][s]["log"]).read(), f"array {s} logged a traceback"
        assert all(len(v) == 1 for v in owners.values()), f"two serving primaries in one epoch: {owners}"
        gs = {s: showrcopy(lab, s)["groups"][0] for s in ("A", "B")}
        assert not any(g["split_brain"] for g in gs.values())
        for s, h in hist.items():
            assert h.errors == [], f"host {s} saw I/O errors {h.errors[:3]}"
            assert h.acked_count() > 100
        assert_hosts_writes_on_both_replicas(lab, hist)
    finally:
        lab_down(d)
        print(f"\n{len(events)} network events in {seconds:.0f} s; epochs seen with a serving primary: "
              f"{ {e: sorted(v) for e, v in sorted(owners.items())} }; host writes "
              f"{ {s: h.acked_count() for s, h in hist.items()} }; longest pause (s) "
              f"{ {s: round(h.longest_pause(), 2) for s, h in hist.items()} }")
