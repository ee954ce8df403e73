"""Writes a primary applied while its peer held every one are durable here before it
acknowledges anything its peer lacks (``RoleState.flush_pending``), and writes it mirrors to a
peer it is resynchronizing are made durable here before they are acknowledged.

Found by review (stop 30), reproduced on power-cut disks
(``test_power_cut.py::test_writes_acknowledged_while_mirroring_survive_...``): hosts wrote
without flushing while the arrays mirrored, the link went, the primary went on alone and then
lost power. Restarted, it copied the regions its write-intent log named to the peer, over the
peer's copies of writes acknowledged while mirroring that the cut had taken here (449 blocks
older than acknowledged). The same held for writes mirrored while resynchronizing.

In process: the data path of one array (real volume, write-intent log, range lock, bitmaps)
and a replication link whose other end is the peer's replica."""

from __future__ import annotations

import errno
import time
import types

import pytest
import trio
import trio.testing

from syncd.nbd.export import BlockError
from syncd.node.datapath import WRITE, DataPath
from syncd.node.intent import IntentLog
from syncd.node.roles import Mode
from syncd.node.volume import Volume
from syncd.repl.proto import Frame

from .test_datapath_cancel import REGION, SIZE, Group, Member, Node, Wire


class Durable(Group):
    """A primary group whose state the test sets, waking waiters as the real one does."""

    def __init__(self, node: Node) -> None:
        super().__init__(node, "primary")
        self._changed = trio.lowlevel.ParkingLot()
        self.steady = lambda: False  # the task path: the one that waits
        self.roles = types.SimpleNamespace(is_primary=True)

    async def wait_change(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._changed.park()

    def changed(self, **state) -> None:
        for k, v in state.items():
            setattr(self.state, k, v)
        self._changed.unpark_all()


class Spy(Volume):
    """A real volume that records the FUA flag of every write applied to it, and when the last
    one was applied (``landed``: compare with ``flushed_from``, when the last flush began)."""

    fuas: list[bool]
    landed: float = 0.0

    async def write(self, offset, data, fua=False):
        self.fuas.append(fua)
        await super().write(offset, data, fua)
        self.landed = time.monotonic()

    def write_sync(self, offset, data, buffers=None):
        self.fuas.append(False)
        super().write_sync(offset, data)
        self.landed = time.monotonic()


@pytest.fixture
def replicas(tmp_path):
    """Makes this array's volume (of the class given), the peer's and this array's write-intent
    log; closes them after the test."""
    made: list = []

    def make(cls: type) -> tuple:
        here = cls("vv1", str(tmp_path / "here.img"), size=SIZE)
        here.fuas = []
        peer = Volume("vv1", str(tmp_path / "peer.img"), size=SIZE)
        intent = IntentLog(str(tmp_path / "intent"), SIZE, REGION, volume=here)
        made.extend((intent, here, peer))
        return here, peer, intent

    yield make
    for x in made:
        x.close()


def start_write(nursery: trio.Nursery, dp: DataPath, m: Member, offset: int, data: bytes) -> trio.Event:
    """A host write (no FUA) in a task of its own; the event is set once it is acknowledged."""
    done = trio.Event()

    async def write() -> None:
        await dp.host_write(m, WRITE, offset, len(data), memoryview(data), False)
        done.set()

    nursery.start_soon(write)
    return done


async def in_sync(nursery: trio.Nursery, wire: Wire, here: Volume, intent: IntentLog,
                  cls: type[Durable] = Durable) -> tuple[Durable, DataPath, Member]:
    """A primary mirroring to a peer that holds every write; the volume's regions marked."""
    g = cls(Node(wire, nursery))
    g.mode, g.mirroring = Mode.ATTACHED, True
    g.changed(peer_has_all=True, flush_pending=False)
    await intent.mark(0, SIZE)  # marked by earlier writes: marking does not wait
    return g, DataPath(g), Member(g, here, intent)


async def settle() -> None:
    """Until every task waits (a task waiting for a worker thread counts as blocked: so a few
    rounds, with pauses for the threads)."""
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)


async def test_a_write_alone_waits_until_what_the_peer_holds_too_is_durable_here(replicas):
    here, peer, intent = replicas(Spy)
    data = b"\x5a" * 4096
    async with trio.open_nursery() as nursery:
        g = Durable(Node(Wire(peer), nursery))
        g.mode, g.mirroring = Mode.DETACHED, False  # the peer fenced off; going on alone
        g.changed(alone=True, peer_has_all=False, flush_pending=True)
        dp = DataPath(g)
        m = Member(g, here, intent)
        await intent.mark(0, SIZE)  # marked by earlier writes: marking does not wait
        done = start_write(nursery, dp, m, 0, data)
        await settle()
        assert not done.is_set() and here.fuas == []  # not applied, not acknowledged
        g.changed(flush_pending=False)  # Flushed
        await done.wait()
        assert here.read_sync(0, len(data)) == data and m.dirty.test(0)  # alone: the peer lacks it
        nursery.cancel_scope.cancel()


async def test_writes_mirrored_to_a_peer_being_resynchronized_are_durable_here_before_the_ack(replicas):
    here, peer, intent = replicas(Spy)
    data = b"\xa5" * 4096
    async with trio.open_nursery() as nursery:
        wire = Wire(peer)
        g = Durable(Node(wire, nursery))
        g.mode = Mode.SYNCING
        g.changed(peer_has_all=False)
        dp = DataPath(g)
        m = Member(g, here, intent)
        g.steady = lambda: True
        await intent.mark(0, SIZE)
        assert not dp.fast_write(m, 0, memoryview(data), lambda err, msg: None)  # the task path
        g.steady = lambda: False
        done = start_write(nursery, dp, m, 8192, data)
        await trio.testing.wait_all_tasks_blocked()
        wire.answer()
        await done.wait()
        # Applied, then flushed (a flush begun after it landed) before the acknowledgement.
        assert here.fuas == [False] and here.flushed_from > here.landed
        assert peer.read_sync(8192, len(data)) == data
        # A write the secondary forwards, applied here first: durable here too.
        replies = []
        link = type("L", (), {"reply": lambda self, path, rid, st, *a: replies.append(st)})()
        g.state.started, g.state.peer_ready = True, True
        f = Frame.write(7, 1, 1, 1, 16384, data, forwarded=True)
        assert not dp.forwarded_fast(link, None, f, m)
        await dp.handle_forwarded(link, None, f, m, WRITE)
        assert here.fuas == [False, False] and here.flushed_from > here.landed and replies == [0]
        # In sync again (peer_has_all): the fast path, no flush per write.
        g.changed(peer_has_all=True)
        g.mode = Mode.ATTACHED
        g.steady = lambda: True
        flushed = here.flushed_from
        assert dp.fast_write(m, 32768, memoryview(data), lambda err, msg: None)
        assert here.fuas[-1] is False and here.flushed_from == flushed
        nursery.cancel_scope.cancel()


class Fencing(Durable):
    """A group that, losing its peer, does what ``PeerLost`` does: fences the peer off, which
    no longer holds every write, and makes what it held durable here first (``FlushVolumes``)."""

    def lose_peer(self, reason: str) -> None:
        super().lose_peer(reason)
        self.mode, self.mirroring = Mode.FENCING, False
        self.changed(peer_has_all=False, flush_pending=True)


async def test_a_mirrored_write_whose_answer_was_lost_is_durable_here_before_it_is_acknowledged_alone(replicas):
    """A write applied here and at the peer, whose answer the link lost: the peer is fenced
    off, and the write is acknowledged alone only after a flush begun after it landed here, so
    a power cut here cannot take a write the host was told is written (the role model's
    simulator counts such a write durable: stop 43)."""
    here, peer, intent = replicas(Spy)
    data = b"\x3c" * 4096
    async with trio.open_nursery() as nursery:
        wire = Wire(peer)
        g, dp, m = await in_sync(nursery, wire, here, intent, Fencing)
        acked = start_write(nursery, dp, m, 0, data)
        await settle()
        assert here.read_sync(0, len(data)) == data and peer.read_sync(0, len(data)) == data
        wire.lose()
        await settle()
        assert g.lost and not acked.is_set()  # fencing: nothing acknowledged yet
        g.mode = Mode.DETACHED
        g.changed(alone=True)  # the witness agreed: going on alone, but the flush runs still
        await settle()
        assert not acked.is_set()
        await here.flush()  # FlushVolumes ...
        g.changed(flush_pending=False)  # ... Flushed
        await acked.wait()
        assert here.fuas == [False] and here.flushed_from > here.landed  # durable before its ack
        assert m.dirty.test(0)  # and marked for the resync
        nursery.cancel_scope.cancel()


class Slow(Volume):
    """A volume whose writes complete when the test says (an O_DIRECT write in a worker thread,
    still in the device's queue)."""

    gate: trio.Event
    landed: float = 0.0

    async def write(self, offset, data, fua=False):
        await self.gate.wait()
        await super().write(offset, data, fua)
        self.landed = time.monotonic()


async def test_a_mirrored_write_applied_after_the_flush_began_is_flushed_before_its_ack(replicas):
    """Found by review: a mirrored write whose local apply runs in a worker thread (O_DIRECT)
    was still in flight when the peer was lost; the flush ran, ``Flushed`` cleared
    ``peer_has_all`` on disk, then the apply completed and the write was acknowledged (the
    peer had applied it), durable nowhere here. A power cut then copied what it left over the
    peer's copy. Such a write is now flushed before it is acknowledged."""
    here, peer, intent = replicas(Slow)
    here.gate, here.direct = trio.Event(), True
    data = b"\x77" * 4096
    async with trio.open_nursery() as nursery:
        wire = Wire(peer)
        g, dp, m = await in_sync(nursery, wire, here, intent)
        acked = start_write(nursery, dp, m, 0, data)
        await trio.testing.wait_all_tasks_blocked()
        wire.answer()  # the peer applied it
        # The link is lost: FlushVolumes, the flush, Flushed (peer_has_all False on disk).
        g.mode, g.mirroring = Mode.FENCING, False
        g.changed(peer_has_all=False, flush_pending=True)
        await here.flush()
        g.changed(flush_pending=False)
        flushed_at = here.flushed_from
        here.gate.set()  # the local apply completes
        await acked.wait()
        assert here.landed > flushed_at
        assert here.flushed_from > here.landed  # a flush began after it landed, before its ack
        nursery.cancel_scope.cancel()


async def test_a_write_alone_is_refused_for_a_retry_when_the_flush_does_not_end(replicas, autojump_clock):
    """Found by review: a flush that failed (or takes minutes) kept host writes waiting with no
    end. They now wait up to the transition timeout and are refused EAGAIN (retry), unapplied."""
    here, peer, intent = replicas(Spy)
    async with trio.open_nursery() as nursery:
        g = Durable(Node(Wire(peer), nursery))
        g.mode, g.mirroring = Mode.DETACHED, False
        g.changed(alone=True, peer_has_all=False, flush_pending=True)
        dp, m = DataPath(g), Member(g, here, intent)
        await intent.mark(0, SIZE)
        t0 = trio.current_time()
        with pytest.raises(BlockError) as e:
            await dp.host_write(m, WRITE, 0, 4096, memoryview(b"x" * 4096), False)
        assert e.value.errno == errno.EAGAIN and "not yet durable" in str(e.value)
        assert trio.current_time() - t0 >= g.node.cfg.link.transition_timeout
        assert here.fuas == [] and here.read_sync(0, 4096) == bytes(4096)  # nothing applied
        nursery.cancel_scope.cancel()
