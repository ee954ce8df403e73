"""Two sites in their own network namespaces, joined by two veth paths: cut the real links."""

from __future__ import annotations

import os
import time

import pytest
import trio

from syncd.ctl import call, wait_synced
from syncd.workload import History, check_file, run_writer

from .netns import Rig
from .rig import FAST_LINK, first_difference, require_root

pytestmark = [pytest.mark.system, pytest.mark.root]


@pytest.fixture
def rig(tmp_path):
    require_root()
    tag = format(os.getpid() % 4096, "x")
    r = Rig(tmp_path, tag, (os.getpid() % 200) + 20)
    try:
        r.build()
        r.start_nodes(16 << 20, FAST_LINK)
        a = r.admin("A")
        deadline = time.monotonic() + 20
        while True:
            try:
                call(a, "creatercopygroup", {"group": "rcg1", "target": "B"})
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        call(a, "admitrcopyvv", {"volume": "vv1", "group": "rcg1"})
        call(a, "startrcopygroup", {"group": "rcg1"})
        r.export_to_site_hosts()
        wait_synced(a, "rcg1", 60, None)
        yield r
    finally:
        r.teardown()


def test_cutting_every_replication_veth_stops_the_secondary_and_heals_with_resync(rig):
    h = History()
    seen = {}

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(lambda: run_writer(rig.uri("A"), h, writer=1, blocks=range(0, 4096), duration=6, qd=8))
            await trio.sleep(1.0)
            rig.set_path(0, False)
            await trio.sleep(1.0)
            seen["one_path_down"] = await trio.to_thread.run_sync(call, rig.admin("A"), "showrcopy")
            rig.set_path(1, False)
            seen["cut"] = time.monotonic()
            await trio.sleep(2.5)
            seen["b_cut"] = await trio.to_thread.run_sync(call, rig.admin("B"), "showrcopy")
            rig.set_path(0, True)
            rig.set_path(1, True)

    trio.run(main)
    one = seen["one_path_down"]
    assert one["link"]["paths_up"] == 1 and one["groups"][0]["peer_mode"] == "attached"
    assert seen["b_cut"]["groups"][0]["serving"] is False
    assert any(t > seen["cut"] + 1.0 for t in h.acked_times)  # A went on alone after the lease
    wait_synced(rig.admin("A"), "rcg1", 60, None)
    for site in ("A", "B"):
        assert check_file(rig.image(site), h, writer=1) == [], f"site {site} lost acknowledged writes"
    assert first_difference(rig.image("A"), rig.image("B")) is None
