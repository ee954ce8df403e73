"""A node killed under writes (kill -9, no chance to save anything) restarts comparing only the
regions of its write-intent log, not the whole volume (issue 5, item 1), and loses nothing."""

from __future__ import annotations

import time

import pytest
import trio

from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_kill, lab_start, lab_up
from syncd.lab.workload import History, check_file, run_writer

from .rig import FAST_LINK, assert_replicas_identical, wait_witness_knows_in_sync

pytestmark = pytest.mark.system
MiB = 1 << 20
SIZE = 128 * MiB
HOT = 4 * MiB  # the host writes only here
# What the write-intent log marks for it: the first write to a cold extent marks the aligned
# group of extents holding it ([intent] ahead, 16 MiB by default).
MARKED = 16 * MiB


def group(lab, site):
    return call(lab["nodes"][site]["admin_socket"], "showrcopy", {"group": "rcg1"}, timeout=5)


@pytest.mark.parametrize("victim", ["A", "B"])
def test_unclean_restart_compares_only_the_intent_regions(tmp_path, victim):
    lab = lab_up(str(tmp_path / "lab"), size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK,
                 timeout=120)
    try:
        h = History()
        uri = lab["nodes"]["A"]["volumes"]["vv1"]["uri"]
        before = group(lab, "A")["compared_bytes"] if victim == "B" else 0  # the initial sync compared all

        def kill():
            lab_kill(lab["dir"], victim)

        async def main():
            async with trio.open_nursery() as n:
                n.start_soon(lambda: run_writer(uri, h, writer=1, blocks=range(0, HOT // 4096), duration=3.0, qd=8))
                await trio.sleep(1.5)
                await trio.to_thread.run_sync(kill)

        # The victim dies mid-write. A killed primary takes the host's connection with it
        # (errors expected for writes in flight); a killed secondary costs the host nothing.
        trio.run(main)
        lab_start(lab["dir"], victim)
        deadline = time.monotonic() + 60
        while True:
            g = group(lab, "A")["groups"][0]
            if g["peer_mode"] == "attached" and all(v["sync_status"] == "synced" for v in g["volumes"]):
                break
            assert time.monotonic() < deadline, f"not in sync after restarting {victim}: {g}"
            time.sleep(0.1)
        compared = group(lab, "A")["compared_bytes"] - before
        events = " ".join(e["msg"] for s in ("A", "B") for e in group(lab, s)["groups"][0]["events"])
        assert "unclean restart" in events and "write-intent log" in events
        # Only the regions marked for the host's writes (plus at most one batch boundary) were read.
        assert compared <= MARKED + 8 * MiB, f"compared {compared} bytes of a {SIZE} byte volume"
        if victim == "B":
            assert h.errors == []
        for site in ("A", "B"):
            assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], h, writer=1) == []
        assert_replicas_identical(lab, "vv1")
        print(f"kill -9 of {victim}: compared {compared / MiB:.1f} MiB of {SIZE / MiB:.0f} MiB")
    finally:
        lab_down(lab["dir"])


def test_after_a_failover_the_returning_primary_is_compared_only_where_it_was_writing(tmp_path):
    """kill -9 of the primary under writes at the secondary: the witness gives the group to B,
    A returns and steps down; B compares only the regions either was writing (both write-intent
    logs), not the whole volume."""
    from .test_failover import WITNESS

    lab = lab_up(str(tmp_path / "lab"), size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK,
                 witness=WITNESS, timeout=120)
    try:
        wait_witness_knows_in_sync(lab)
        hb = History()

        async def main():
            async with trio.open_nursery() as n:
                n.start_soon(lambda: run_writer(lab["nodes"]["B"]["volumes"]["vv1"]["uri"], hb, writer=2,
                                                blocks=range(0, HOT // 4096), duration=4.0, qd=8))
                await trio.sleep(1.0)
                await trio.to_thread.run_sync(lambda: lab_kill(lab["dir"], "A"))

        trio.run(main)
        assert group(lab, "B")["groups"][0]["role"] == "primary" and hb.errors == []
        lab_start(lab["dir"], "A")
        deadline = time.monotonic() + 60
        while True:
            g = group(lab, "B")["groups"][0]
            if g["peer_mode"] == "attached" and all(v["sync_status"] == "synced" for v in g["volumes"]):
                break
            assert time.monotonic() < deadline, f"A not resynced: {g}"
            time.sleep(0.1)
        compared = group(lab, "B")["compared_bytes"]
        assert group(lab, "A")["groups"][0]["role"] == "secondary"
        assert compared <= MARKED + 8 * MiB, f"compared {compared} bytes of a {SIZE} byte volume"
        for site in ("A", "B"):
            assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], hb, writer=2) == []
        assert_replicas_identical(lab, "vv1")
        print(f"failover: compared {compared / MiB:.1f} MiB of {SIZE / MiB:.0f} MiB")
    finally:
        lab_down(lab["dir"])
