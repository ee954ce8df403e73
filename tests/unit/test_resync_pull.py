"""Regions fetched back from the peer after a power cut end in sync on both sides.

Found by CI (the history campaign, seed 3, round 3: the secondary killed, then a power cut at the
primary): the restarted primary started resynchronizing on the secondary's exchange request and
sent RESYNC_BEGIN with its dirty map, which still held the regions its write-intent log named;
its own exchange then decided to fetch those back from the secondary instead. The fetch made
both replicas equal, but nothing told the secondary, which kept the regions out of sync: it
reported "syncing" for ever and forwarded their reads to the primary.

In process: the primary's resync (real volumes, range lock, bitmaps) and, at the link's other
end, the secondary's real data path applying each frame to its own replica."""

from __future__ import annotations

import types

import trio

from syncd.node.datapath import DataPath
from syncd.node.resync import Resync
from syncd.node.roles import Mode
from syncd.node.volume import Volume
from syncd.repl.proto import Frame, MsgType, Status

from .test_datapath_cancel import REGION, SIZE, Group, Member, Node


class SecondaryEnd:
    """The link; at its other end the secondary's data path and replica, answering digest,
    read and in-sync frames as the secondary does."""

    up = True

    def __init__(self, dp: DataPath, m: Member) -> None:
        self.dp, self.m = dp, m
        self.ids = 0
        self.sent: list[int] = []

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    async def request(self, frame, timeout=None):  # noqa: ASYNC109 (the link's signature)
        self.sent.append(frame.type)
        await trio.lowlevel.checkpoint()
        vol = self.m.vol
        if frame.type == MsgType.DIGESTS:
            ds = vol.digests_sync(frame.offset, frame.length, frame.digest_region())
            return Frame.reply(frame.req_id, Status.OK, Frame.digests_payload(ds))
        if frame.type == MsgType.READ:
            return Frame.reply(frame.req_id, Status.OK, vol.read_sync(frame.offset, frame.length))
        assert frame.type == MsgType.RESYNC_END, frame.type
        self.dp.resync_end(frame, self.m)
        return Frame.reply(frame.req_id, Status.OK)

    def start(self, frame, timeout=None, cb=None, reserved=None):
        return frame

    async def wait(self, frame):
        return await self.request(frame)


async def test_regions_fetched_back_are_in_sync_at_the_peer_that_was_told_it_lacks_them(tmp_path):
    here = Volume("vv1", str(tmp_path / "here.img"), size=SIZE)
    there = Volume("vv1", str(tmp_path / "there.img"), size=SIZE)
    try:
        for v in (here, there):
            v.write_sync(0, b"\x11" * SIZE)
        # The power cut at the primary took its last writes to regions 2 and 3; region 5 was
        # flushed in time. The secondary holds all three.
        for r in (2, 3, 5):
            there.write_sync(r * REGION, bytes([r]) * REGION)
        here.write_sync(5 * REGION, bytes([5]) * REGION)
        async with trio.open_nursery() as nursery:
            # The secondary, told by RESYNC_BEGIN (from the stale dirty map) it lacks 2, 3, 5.
            sg = Group(Node(None, nursery), "secondary")
            sg.publish_volume = lambda m: None
            sdp = DataPath(sg)
            sm = Member(sg, there, None)
            sm.st = types.SimpleNamespace(local="vv1", suspect=False, synced_once=False, last_sync=0.0)
            for r in (2, 3, 5):
                sm.oos.set(r)
            # The primary: those regions are fetched back instead (pull), none is dirty.
            wire = SecondaryEnd(sdp, sm)
            node = Node(wire, nursery)
            node.stats = {"compared_bytes": 0, "pulled_bytes": 0}
            g = Group(node, "primary")
            g.mode = Mode.SYNCING
            m = Member(g, here, None)
            m.st = types.SimpleNamespace(local="vv1")
            m.resync_bytes = 0
            g.members = {1: m}
            for r in (2, 3, 5):
                m.pull.set(r)
            await Resync(node).pull_group(g)
            nursery.cancel_scope.cancel()
        assert not g.lost, g.lost
        assert here.read_sync(0, SIZE) == there.read_sync(0, SIZE)
        assert node.stats["pulled_bytes"] == 2 * REGION  # region 5 was equal: compared, not copied
        assert m.pull.count == 0
        # The secondary hears that every one of them is in sync: it serves them itself again.
        assert sm.oos.count == 0, [r for r in range(sm.oos.nregions) if sm.oos.test(r)]
        assert sm.st.synced_once
    finally:
        here.close()
        there.close()
