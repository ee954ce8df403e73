"""Found by stop 31's review of the durability fix: a write acknowledged alone (no FUA) stays
only in this array's page cache; when the peer returned, the resync copied its region to the
peer from that cache (``Resync._send_region``: ``read_sync``, no flush). The peer then held the
acknowledged write while ``peer_has_all`` was false on disk: a power cut of the primary before
the resync ended made the restart copy the region over the peer again from what the cut left
here, the write gone. What a resync sends is now durable here first.

In process: the primary's data path and resync (real volumes, range lock, bitmaps) and, at the
link's other end, the peer's replica applying what the resync sends."""

from __future__ import annotations

import trio

from syncd.node.datapath import WRITE, DataPath
from syncd.node.resync import Resync
from syncd.node.roles import Mode
from syncd.repl.proto import Frame, MsgType, Status

from . import test_durable_before_alone
from .test_datapath_cancel import REGION, Member, Node
from .test_durable_before_alone import Durable, Spy

replicas = test_durable_before_alone.replicas  # the fixture: this array's volume, the peer's, the log


class PeerEnd:
    """The link as the resync uses it; the peer's replica applies each resync frame."""

    up = True

    def __init__(self, peer) -> None:
        self.peer = peer
        self.ids = 0

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    async def request(self, frame, timeout=None):  # noqa: ASYNC109 (the link's signature)
        await trio.lowlevel.checkpoint()
        if frame.type == MsgType.WRITE:
            self.peer.write_sync(frame.offset, frame.payload)
        elif frame.type == MsgType.TRIM:
            self.peer.write_sync(frame.offset, bytes(frame.length))
        return Frame.reply(frame.req_id, Status.OK)

    async def reserve(self, nbytes: int) -> None:
        return None

    def unreserve(self, room) -> None:
        pass

    def start(self, frame, timeout=None, cb=None, reserved=None):
        return frame

    async def wait(self, frame):
        return await self.request(frame)


def resync_node(peer, nursery) -> Node:
    """The primary's node, its link ending at ``peer``'s replica (``PeerEnd``)."""
    node = Node(PeerEnd(peer), nursery)
    node.stats = {"resync_bytes": 0, "resync_hole_bytes": 0}
    return node


async def test_a_write_acknowledged_alone_is_durable_here_before_a_resync_gives_it_to_the_peer(replicas):
    here, peer, intent = replicas(Spy)
    data = b"\xc3" * 4096
    async with trio.open_nursery() as nursery:
        node = resync_node(peer, nursery)
        g = Durable(node)
        g.mode, g.mirroring = Mode.DETACHED, False  # alone; the flush after the loss has ended
        g.changed(alone=True, peer_has_all=False, flush_pending=False)
        dp, m = DataPath(g), Member(g, here, intent)
        m.resync_bytes = 0
        await intent.mark(0, 2 * REGION)
        await dp.host_write(m, WRITE, 0, len(data), memoryview(data), False)  # acknowledged
        landed = here.landed
        assert m.dirty.test(0) and here.flushed_from < landed  # the peer lacks it; not durable here
        # The peer is back: the resync copies region 0 to it (peer_has_all still false).
        g.mode, g.mirroring = Mode.SYNCING, True
        await Resync(node)._copy_region(g, m, 0)
        assert peer.read_sync(0, len(data)) == data  # the peer holds the acknowledged write
        # A power cut here now loses what is not durable, and the restart (peer_has_all false
        # on disk) copies region 0 over the peer's copy: the write must be durable here by now.
        assert here.flushed_from >= landed
        # A second region copied with nothing written since costs no flush.
        m.dirty.set(1)
        before = here.flushed_from
        await Resync(node)._copy_region(g, m, 1)
        assert here.flushed_from == before
        nursery.cancel_scope.cancel()
