"""``checkrcopyvv --fix`` and a power cut of the primary right after it.

Found by stop 30's review: the fix marks the differing regions for resync (``NeedSync``), but the
primary keeps ``peer_has_all`` set on disk until the writes it applied before are durable
(``RoleState.flush_pending``). A power cut in that window made the restart fetch back the
regions its write-intent log names, the verify's among them, from the peer's copy just found
wrong: both replicas then held the wrong data. Now the fix makes this array's copy durable,
saves the regions as ones the peer holds wrong (``MemberState.peer_wrong``) and only then marks
them; after an unclean stop they are copied, never fetched back."""

from __future__ import annotations

import time
import types

import pytest
import trio
import trio.testing

from syncd.node import verify
from syncd.node.daemon import Node as RealNode
from syncd.node.resync import Resync
from syncd.node.roles import CaughtUp, NeedSync
from syncd.node.state import MemberState, NodeState, decode_bits, encode_bits
from syncd.node.volume import Volume
from syncd.ranges import Bitmap

from .test_datapath_cancel import REGION, SIZE, Member
from .test_resync_pull import _pair


def _bits(b: Bitmap) -> list[int]:
    return [r for r in range(b.nregions) if b.test(r)]


async def test_regions_the_peer_holds_wrong_are_copied_not_fetched_back_after_a_power_cut(tmp_path):
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)  # crash regions 2, 3, 5
        m.peer_wrong.set(3)  # verify found the peer's copy of region 3 different
        mine = here.read_sync(3 * REGION, REGION)
        try:
            g.decide_crash_regions(split_brain=False)
            assert _bits(m.pull) == [2, 5] and _bits(m.dirty) == [3]  # 3 is copied to the peer
            # ... so the peer lacks a region: writes are durable here before their acknowledgement
            # from now on (a second power cut would copy region 3 again: found by review).
            assert [type(e) for e in g.events] == [NeedSync], g.events
            assert any("online verify" in n and "copied" in n for n in g.notes), g.notes
            await Resync(g.node).pull_group(g)
            assert here.read_sync(2 * REGION, REGION) == bytes([2]) * REGION  # the peer's newer copy
            assert here.read_sync(3 * REGION, REGION) == mine  # not the peer's wrong one
            # Every region this array was writing is one the peer holds wrong: nothing to fetch
            # back, and nothing newer to wait for.
            g2 = type(g)(g.node)
            g2.members = {1: m}
            m.crash_regions = [3]
            m.dirty.set(3)
            g2.decide_crash_regions(split_brain=False)
            assert m.pull.count == 0 and m.dirty.test(3)
            assert [type(e) for e in g2.events] == [NeedSync, CaughtUp] and not g2.state.peer_newer
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


class FixGroup:
    """What ``verify.fix_regions`` needs of a group, recording what it did in order."""

    def __init__(self, m: Member, log: list) -> None:
        self.role = "primary"
        self.name = "rcg1"
        self.st = types.SimpleNamespace(peer="B")
        self.m, self.log = m, log

    def resync_regions(self, m: Member, regions: list[int]) -> None:
        self.log.append(("mark", list(regions)))


def _fixture(tmp_path):
    vol = Volume("vv1", str(tmp_path / "vv1.img"), size=SIZE)
    log: list = []
    m = Member(types.SimpleNamespace(), vol, None)
    m.st = types.SimpleNamespace(local="vv1")
    g = FixGroup(m, log)
    node = types.SimpleNamespace(save=lambda: log.append(("save", _bits(m.peer_wrong), vol.flushed_from)))
    return vol, m, g, node, log


async def test_the_fix_makes_this_copy_durable_then_saves_the_regions_then_marks_them(tmp_path):
    vol, m, g, node, log = _fixture(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            # A host write in flight holds its range: the fix waits until it was applied here.
            tok = await m.lock.acquire(3 * REGION, 4096)
            nursery.start_soon(verify.fix_regions, node, g, m, [3, 6])
            await trio.testing.wait_all_tasks_blocked()
            assert log == [] and m.peer_wrong.count == 0
            vol.write_sync(3 * REGION, b"\x77" * 4096)  # applied without FUA, then acknowledged
            applied = time.monotonic()
            m.lock.release(tok)
        assert [e[0] for e in log] == ["save", "mark"], log
        _, saved_wrong, flushed_from = log[0]
        assert saved_wrong == [3, 6]
        assert flushed_from >= applied  # a flush begun after the write ended before the save
        assert m.lock.try_acquire(0, SIZE) is not None  # the volume's writes are let go
    finally:
        vol.close()


async def test_a_fix_whose_copy_cannot_be_made_durable_is_refused_and_changes_nothing(tmp_path):
    vol, m, g, node, log = _fixture(tmp_path)
    try:
        vol.flush_failed = True  # an earlier flush failed: nothing here counts as durable
        with pytest.raises(verify.VerifyError, match="cannot be made durable"):
            await verify.fix_regions(node, g, m, [3])
        assert log == [] and m.peer_wrong.count == 0
        g.role = "secondary"
        vol.flush_failed = False
        with pytest.raises(verify.VerifyError, match="no longer primary"):
            await verify.fix_regions(node, g, m, [3])
        assert log == [] and m.peer_wrong.count == 0
        assert m.lock.try_acquire(0, SIZE) is not None
    finally:
        vol.close()


def _saved(role: str, peer_has_all: bool, wrong: list[int], dirty: list[int]) -> tuple[list[int], str]:
    m = types.SimpleNamespace(dirty=Bitmap(8 * REGION, REGION), pull=Bitmap(8 * REGION, REGION),
                              peer_wrong=Bitmap(8 * REGION, REGION), st=types.SimpleNamespace(dirty=""),
                              vol=types.SimpleNamespace(size=8 * REGION))
    for r in wrong:
        m.peer_wrong.set(r)
    for r in dirty:
        m.dirty.set(r)
    g = types.SimpleNamespace(members={"vv1": m}, role=role, st=types.SimpleNamespace(peer_has_all=peer_has_all))
    node = types.SimpleNamespace(groups={"rcg1": g}, state="state", store=types.SimpleNamespace(save=lambda st: None))
    RealNode.save(node)
    return _bits(m.peer_wrong), m.st.peer_wrong


@pytest.mark.parametrize(("role", "peer_has_all", "dirty", "kept"), [
    ("primary", True, [2, 5], [2, 5]),  # the fix's window: kept
    ("primary", True, [5], [5]),  # region 2 was copied to the peer since: right there now
    ("primary", False, [2, 5], []),  # a restart copies every region anyway
    ("secondary", True, [2, 5], []),
])
def test_the_regions_the_peer_holds_wrong_are_kept_only_while_a_restart_could_fetch_them_back(
        role, peer_has_all, dirty, kept):
    in_memory, saved = _saved(role, peer_has_all, [2, 5], dirty)
    assert in_memory == kept
    bits = decode_bits(saved)
    assert ([r for r in range(8) if bits[r >> 3] >> (r & 7) & 1] if bits else []) == kept


def test_metadata_without_the_field_loads_and_the_field_round_trips():
    ms = MemberState(local="vv1", remote="vv1", vol_id=1, wwn="w", size=SIZE)
    d = NodeState(node="A", node_uuid="u").to_json()
    d["groups"] = {"rcg1": {"name": "rcg1", "gid": 1, "role": "primary", "peer": "B",
                            "members": [{k: v for k, v in vars(ms).items() if k != "peer_wrong"}]}}
    old = NodeState.from_json(d)  # written by a syncd from before the field
    assert old.groups["rcg1"].members[0].peer_wrong == ""
    ms.peer_wrong = encode_bits(bytes([0b1000]))
    d["groups"]["rcg1"]["members"] = [vars(ms)]
    assert NodeState.from_json(d).groups["rcg1"].members[0].peer_wrong == ms.peer_wrong
