"""Found by stop 31's second review of 86ae7b1: ``Resync._send_region`` skips the flush once one flush begun after
the run's start (``_durable_from``) has ended, trusting that every write applied since was made
durable before its acknowledgement. A run outlives a link drop: ``_lose_peer`` clears
``recovering``, and a run waiting between two batches (``_yield_to_hosts``: it sleeps as long as
the last batch took, and the batch with the run's first flush can take seconds) only looks at
``g.mode`` when it wakes. If the peer was lost and is back (SYNCING again) by then, the run goes
on with its old ``_durable_from`` and copies regions written ALONE meanwhile (no FUA, not durable)
to the peer without a flush. A power cut here before a later flush: the restart (peer_has_all
false on disk) copies what the cut left over the peer's copy of the acknowledged write: the
defect 398daf4 fixed, back through the one-flush-per-run shortcut."""

from __future__ import annotations

import types

import trio
import trio.testing

from syncd.node.datapath import WRITE, DataPath
from syncd.node.resync import Resync
from syncd.node.roles import Mode

from . import test_durable_before_alone
from .test_alone_then_resync import resync_node
from .test_datapath_cancel import REGION, Member
from .test_durable_before_alone import Durable, Spy

replicas = test_durable_before_alone.replicas


async def test_a_run_that_outlived_a_link_drop_sends_writes_made_alone_without_a_flush(replicas):
    here, peer, intent = replicas(Spy)
    data = b"\x3c" * 4096
    async with trio.open_nursery() as nursery:
        node = resync_node(peer, nursery)
        node.save_soon = lambda: None
        node.events = types.SimpleNamespace(facts=lambda *a: None)
        node.cfg.events = types.SimpleNamespace(progress_percent=5, progress_interval=5)
        g = Durable(node)
        g.mode, g.mirroring = Mode.SYNCING, True
        g.changed(peer_has_all=False, flush_pending=False)
        dp, m = DataPath(g), Member(g, here, intent)
        m.verify = False
        m.st = types.SimpleNamespace(local="vv1")
        await intent.mark(0, 8 * REGION)
        m.dirty.set(0)
        rs = Resync(node)
        paused, go_on = trio.Event(), trio.Event()

        async def yield_to_hosts(g_, took):  # the run's sleep between batches
            paused.set()
            await go_on.wait()

        rs._yield_to_hosts = yield_to_hosts
        nursery.start_soon(rs._member, g, m)
        await paused.wait()  # region 0 copied (the run's one flush); the run sleeps
        # The link drops; the peer is fenced off; this array goes on alone (the flush after
        # the loss is long done: peer_has_all was already false) and acknowledges a write.
        g.mode, g.mirroring = Mode.DETACHED, False
        g.changed(alone=True)
        await dp.host_write(m, WRITE, 5 * REGION, len(data), memoryview(data), False)
        landed = here.landed
        assert m.dirty.test(5) and here.flushed_from < landed  # acknowledged, not durable (alone)
        # The peer is back and a new resync session starts mirroring; the old run wakes up.
        g.mode, g.mirroring = Mode.SYNCING, True
        g.changed(alone=False)
        go_on.set()
        with trio.fail_after(5):
            while m.dirty.count:  # noqa: ASYNC110 (the run clears the bitmap; no event to wait on)
                await trio.sleep(0.01)
        assert peer.read_sync(5 * REGION, len(data)) == data  # the peer holds the write now
        # A power cut here now takes it; the restart copies region 5 over the peer's copy.
        assert here.flushed_from >= landed, "region 5 went to the peer from the page cache, not durable here"
        nursery.cancel_scope.cancel()
