"""Found by stop 31's second review of 342bbab: ``verify.fix_regions`` saves ``peer_wrong`` through ``Node.save``
BEFORE ``Group.resync_regions`` marks the regions dirty. ``Node.save`` keeps ``peer_wrong`` only
for regions still dirty/pull (``m.peer_wrong.intersect(saved.bits)``); in ATTACHED nothing is
dirty, so the save wipes the bits just set, in memory and on disk. A power cut in the
flush_pending window then fetches the regions back from the peer's wrong copy: the defect the
commit says it fixed. (The commit's own test replaces ``node.save`` by a recorder, so it never
runs the real intersection.)"""

from __future__ import annotations

import types

import trio

from syncd.node import verify
from syncd.node.daemon import Node as RealNode
from syncd.node.state import decode_bits
from syncd.node.volume import Volume
from syncd.ranges import Bitmap

from .test_datapath_cancel import REGION, SIZE, Member
from .test_datapath_cancel import Node as FakeNode
from .test_resync_pull import RestartedPrimary


def _bits_of(s: str, n: int) -> list[int]:
    b = decode_bits(s)
    return [r for r in range(n) if b and b[r >> 3] >> (r & 7) & 1]


async def test_fix_regions_really_persists_the_regions_the_peer_holds_wrong(tmp_path):
    vol = Volume("vv1", str(tmp_path / "vv1.img"), size=SIZE)
    try:
        m = Member(types.SimpleNamespace(), vol, None)
        m.st = types.SimpleNamespace(local="vv1", dirty="", peer_wrong="")
        on_disk: list[str] = []

        class G:  # an attached primary whose persisted peer_has_all is set (as in ATTACHED)
            role = "primary"
            name = "rcg1"
            members = {"vv1": m}
            st = types.SimpleNamespace(peer="B", peer_has_all=True)

            def resync_regions(self, mm, regions):  # as Group.resync_regions: mark, then
                for r in regions:                   # NeedSync's Persist saves again
                    mm.dirty.set(r)
                node.save()

        g = G()
        node = types.SimpleNamespace(groups={"rcg1": g}, state="state",
                                     store=types.SimpleNamespace(save=lambda st: on_disk.append(m.st.peer_wrong)))
        node.save = lambda: RealNode.save(node)
        await verify.fix_regions(node, g, m, [3, 6])
        saved = _bits_of(on_disk[-1], m.dirty.nregions)
        # After a power cut now (peer_has_all still set on disk), the restart decides with what
        # was saved: with nothing saved it fetches regions 3 and 6 back from the wrong copy.
        async with trio.open_nursery() as nursery:
            rp = RestartedPrimary(FakeNode(None, nursery))
            m2 = Member(rp, vol, None)
            m2.st = types.SimpleNamespace(local="vv1", synced_once=True)
            m2.peer_wrong = Bitmap(SIZE, REGION, decode_bits(on_disk[-1]))
            m2.crash_regions = [3, 6]
            for r in (3, 6):
                m2.dirty.set(r)
            rp.members = {1: m2}
            rp.decide_crash_regions(split_brain=False)
            fetched = [r for r in (3, 6) if m2.pull.test(r)]
            nursery.cancel_scope.cancel()
        assert saved == [3, 6] and fetched == [], (
            f"persisted peer_wrong={saved}, "
            f"in memory={[r for r in range(m.peer_wrong.nregions) if m.peer_wrong.test(r)]}; "
            f"after a power cut the restart fetches back {fetched} from the peer's copy verify found wrong")
    finally:
        vol.close()
