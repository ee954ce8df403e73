"""Found by stop 31's second review of 342bbab: ``Group._lacks`` (RESYNC_BEGIN, sent before the state exchange
decided) leaves out every undecided crash region on the assumption that the peer's copy of it is
the newer one. A region the primary knows the peer holds WRONG (``peer_wrong``) is then copied,
not fetched back (``decide_crash_regions``), but nothing tells the peer it lacks it: the secondary
serves its hosts' reads of that region from the copy verify found wrong until the run reaches it."""

from __future__ import annotations

import trio

from syncd.node import group as node_group

from .test_resync_pull import _pair


async def test_resync_begin_names_the_regions_the_peer_holds_wrong(tmp_path):
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)  # crash regions 2, 3, 5, undecided
        try:
            m.peer_wrong.set(3)
            lacks = node_group.Group._lacks(g, m)  # what RESYNC_BEGIN tells the secondary now
            told = [r for r in range(m.dirty.nregions) if lacks[r >> 3] >> (r & 7) & 1]
            g.decide_crash_regions(split_brain=False)
            copied = [r for r in range(m.dirty.nregions) if m.dirty.test(r)]
            assert copied == [3]
            assert 3 in told, f"RESYNC_BEGIN names {told}: the peer serves region 3 from its wrong copy"
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()
