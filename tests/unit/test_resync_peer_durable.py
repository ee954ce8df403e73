"""Role model finding 13 (a doubt of stop 32's review): a resync copied regions into the peer's
page cache and the pair was in sync at once. In sync, this array counts the peer's copy as
holding every flushed write (``Group.decide_crash_regions``): if both arrays then lost power,
the restart here fetched back the regions it was writing from a copy the power cut had taken
the resync's data from, over this array's durable data. The peer now flushes what a run copied
before the run ends in ``ResyncDone``.

In process: the primary's resync (real volumes, bitmaps) and, at the link's other end, the
peer's replica applying each frame and flushing on FLUSH."""

from __future__ import annotations

import types

import pytest
import trio

from syncd.node.resync import Resync
from syncd.node.roles import Mode, ResyncDone
from syncd.repl.proto import Frame, MsgType, Status

from . import test_durable_before_alone
from .test_alone_then_resync import PeerEnd, resync_node
from .test_datapath_cancel import REGION, Member
from .test_durable_before_alone import Durable, Spy

replicas = test_durable_before_alone.replicas


class FlushingPeerEnd(PeerEnd):
    """The peer's replica also answers FLUSH as ``DataPath.handle_flush`` does (or fails it)."""

    def __init__(self, peer, fail: bool = False) -> None:
        super().__init__(peer)
        self.fail = fail
        self.flushes = 0

    async def request(self, frame, timeout=None):  # noqa: ASYNC109 (the link's signature)
        if frame.type != MsgType.FLUSH:
            return await super().request(frame, timeout)
        self.flushes += 1
        if self.fail:
            return Frame.reply(frame.req_id, Status.EIO)
        await self.peer.flush()
        return Frame.reply(frame.req_id, Status.OK)


class Synced(Durable):
    """The group as the resync sees it at the end: ``ResyncDone`` recorded with the peer's state."""

    def __init__(self, node, peer) -> None:
        super().__init__(node)
        self.peer_vol = peer
        self.done_at: list[tuple[float, float]] = []  # (peer's last write landed, its last flush began)

    def handle(self, ev):
        if isinstance(ev, ResyncDone):
            self.done_at.append((self.peer_vol.landed, self.peer_vol.flushed_from))
            self.mode = Mode.ATTACHED
        return []


def _setup(node, g, here, intent) -> Member:
    node.save_soon = lambda: None
    node.events = types.SimpleNamespace(facts=lambda *a: None, update=lambda *a, **k: None)
    node.cfg.events = types.SimpleNamespace(progress_percent=5, progress_interval=5)
    node.cfg.link.resync_share = 1.0  # no pause between batches
    node.stats.update(compared_bytes=0)
    g.io = types.SimpleNamespace(last_host_io=float("-inf"))  # no host I/O to yield to
    g.st = types.SimpleNamespace(gid=1, peer="B")
    g.members = {}
    m = Member(g, here, intent)
    m.verify = False
    m.st = types.SimpleNamespace(local="vv1", synced_once=False, last_sync=0.0)
    m.resync_started = None
    g.members["vv1"] = m
    g.mode, g.mirroring = Mode.SYNCING, True
    g.changed(peer_has_all=False, flush_pending=False)
    return m


@pytest.fixture
def copies(tmp_path, replicas):
    here, _, intent = replicas(Spy)
    peer = Spy("vv1", str(tmp_path / "peer-spy.img"), size=here.size)
    peer.fuas = []
    yield here, peer, intent
    peer.close()


async def test_what_a_resync_copied_is_durable_at_the_peer_before_the_pair_is_in_sync(copies):
    here, peer, intent = copies
    here.write_sync(0, b"\x7e" * REGION)
    here.write_sync(3 * REGION, b"\x81" * REGION)
    async with trio.open_nursery() as nursery:
        node = resync_node(peer, nursery)
        node.link = end = FlushingPeerEnd(peer)
        g = Synced(node, peer)
        m = _setup(node, g, here, intent)
        await intent.mark(0, 4 * REGION)
        m.dirty.set(0)
        m.dirty.set(3)
        await Resync(node).run_group(g)
        assert peer.read_sync(0, REGION) == b"\x7e" * REGION and peer.read_sync(3 * REGION, REGION) == b"\x81" * REGION
        assert len(g.done_at) == 1 and not g.lost, g.lost
        landed, flushed_from = g.done_at[0]
        # Before the fix the pair was in sync with the copy only in the peer's page cache.
        assert flushed_from >= landed, "ResyncDone before the peer made the resync's copy durable"
        assert end.flushes == 1 and m.st.synced_once
        nursery.cancel_scope.cancel()


async def test_a_peer_that_cannot_flush_the_copy_leaves_the_pair_out_of_sync(copies):
    here, peer, intent = copies
    async with trio.open_nursery() as nursery:
        node = resync_node(peer, nursery)
        node.link = FlushingPeerEnd(peer, fail=True)
        g = Synced(node, peer)
        m = _setup(node, g, here, intent)
        await intent.mark(0, REGION)
        m.dirty.set(0)
        await Resync(node).run_group(g)
        assert not g.done_at and not m.st.synced_once  # not in sync: the run failed
        assert g.lost and "could not make the resynced data durable" in g.lost[0], g.lost
        nursery.cancel_scope.cancel()
