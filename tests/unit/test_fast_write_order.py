"""The primary's fast path sends a small write to its peer before writing its own copy: the
local write runs when the batch ends, once the batch's frames went to the kernel, and the host
is answered only when both copies are done, in whichever order they finish (round 10 of issue
13 in bench/README.md). A large write, and every write of a batch after its first, is written
here before its frame leaves, as before.

In process: the data path of one primary (real volumes, write-intent log, range lock) and a
replication link whose other end applies every frame as it is sent (``Wire``), inside netio's
batches as the NBD server runs them."""

from __future__ import annotations

import contextlib
import errno

import pytest
import trio
import trio.testing

from syncd import netio
from syncd.node.datapath import DataPath
from syncd.node.intent import IntentLog
from syncd.node.roles import Mode
from syncd.node.volume import Volume

from .test_datapath_cancel import REGION, SIZE, Member, Node, Wire
from .test_durable_before_alone import Durable


class Failing(Volume):
    """A replica whose buffered writes fail with EIO (a device error)."""

    def write_sync(self, offset, data, buffers=None):
        e = OSError(errno.EIO, "Input/output error")
        self._failed(e)
        raise e


class Outbox:
    """An outbox the batch flushes: records what the local replica held at the flush."""

    flush_queued = False

    def __init__(self, probe) -> None:
        self.probe = probe
        self.seen: list = []

    def flush_inline(self) -> None:
        self.seen.append(self.probe())


@pytest.fixture
def primary(tmp_path):
    made: list = []

    async def make(cls: type = Volume):
        here = cls("vv1", str(tmp_path / "here.img"), size=SIZE)
        peer = Volume("vv1", str(tmp_path / "peer.img"), size=SIZE)
        intent = IntentLog(str(tmp_path / "intent"), SIZE, REGION, volume=here)
        made.extend((intent, here, peer))
        await intent.mark(0, SIZE)  # marked by earlier writes: the fast path's condition
        return here, peer, intent

    yield make
    for x in made:
        x.close()


@contextlib.contextmanager
def batch():
    """One batch, as the NBD server's loop runs it for what one recv brought."""
    was = netio.batch_begin()
    try:
        yield
    finally:
        netio.batch_end(was)


@contextlib.asynccontextmanager
async def _running(here, peer, intent):
    """A primary in steady state, mirroring to ``peer`` over a ``Wire``: (wire, data path, member)."""
    async with trio.open_nursery() as nursery:
        wire = Wire(peer)
        g = Durable(Node(wire, nursery))
        g.mode = Mode.ATTACHED
        g.mirroring = True
        g.steady = lambda: True
        dp = DataPath(g)
        yield wire, dp, Member(g, here, intent)
        nursery.cancel_scope.cancel()


async def test_a_lone_small_write_leaves_for_the_peer_before_it_is_written_here(primary):
    here, peer, intent = await primary()
    data = b"\x5a" * 4096
    answers: list = []
    async with _running(here, peer, intent) as (wire, dp, m):
        box = Outbox(lambda: here.read_sync(0, 4096) == data)
        with batch():
            assert dp.fast_write(m, 0, memoryview(data), lambda err, msg: answers.append(err))
            assert netio.defer(box)  # the link's outbox: flushed when the batch ends
            assert peer.read_sync(0, 4096) == data and here.read_sync(0, 4096) != data
            assert m.lock.busy(0, 4096)
        assert box.seen == [False]  # the frames went before the local write
        assert here.read_sync(0, 4096) == data and answers == []  # written; the peer has not answered
        wire.answer()
        assert answers == [0] and not m.lock.busy(0, 4096)


async def test_the_host_is_answered_only_once_both_copies_are_done(primary):
    """The peer's answer handled before the local write ran (not possible on the real link,
    whose receiver runs after the batch; the order must not matter)."""
    here, peer, intent = await primary()
    data = b"\x11" * 4096
    answers: list = []
    async with _running(here, peer, intent) as (wire, dp, m):
        with batch():
            assert dp.fast_write(m, 8192, memoryview(data), lambda err, msg: answers.append(err))
            wire.answer()
            assert answers == [] and m.lock.busy(8192, 4096)
        assert answers == [0] and here.read_sync(8192, 4096) == data and not m.lock.busy(8192, 4096)


async def test_only_the_first_write_of_a_batch_and_only_a_small_one_waits_for_the_sends(primary):
    here, peer, intent = await primary()
    a, b, big = b"\x01" * 4096, b"\x02" * 4096, b"\x03" * (128 << 10)
    answers: list = []
    async with _running(here, peer, intent) as (wire, dp, m):
        with batch():
            assert dp.fast_write(m, 0, memoryview(a), lambda err, msg: answers.append(err))
            assert dp.fast_write(m, 4096, memoryview(b), lambda err, msg: answers.append(err))
            assert here.read_sync(0, 4096) != a and here.read_sync(4096, 4096) == b  # the second: at once
        with batch():
            assert dp.fast_write(m, 1 << 20, memoryview(big), lambda err, msg: answers.append(err))
            assert here.read_sync(1 << 20, len(big)) == big  # large: here first, as before
        assert here.read_sync(0, 4096) == a
        # Outside a batch (no sends to wait for): written at once.
        assert dp.fast_write(m, 3 << 20, memoryview(a), lambda err, msg: answers.append(err))
        assert here.read_sync(3 << 20, 4096) == a
        wire.answer()
        assert answers == [0, 0, 0, 0]


async def test_a_local_write_failing_after_its_frame_left_is_answered_with_the_error_once_the_peer_answers(
        primary):
    here, peer, intent = await primary(Failing)
    data = b"\x77" * 4096
    answers: list = []
    async with _running(here, peer, intent) as (wire, dp, m):
        with batch():
            assert dp.fast_write(m, 4 * REGION, memoryview(data), lambda err, msg: answers.append((err, msg)))
        assert peer.read_sync(4 * REGION, 4096) == data  # the peer applied it
        assert m.dirty.test(4) and answers == [] and m.lock.busy(4 * REGION, 4096)  # resynced later
        wire.answer()
        assert answers and answers[0][0] == errno.EIO and "Input/output error" in answers[0][1]
        assert not m.lock.busy(4 * REGION, 4096)


async def test_a_write_neither_replica_applied_is_not_acknowledged(primary):
    """Found by review: the local write failed and the link went; once the peer is fenced off
    the host gets the local error, not success."""
    here, peer, intent = await primary(Failing)
    answers: list = []
    async with _running(here, peer, intent) as (wire, dp, m):
        with batch():
            assert dp.fast_write(m, 2 * REGION, memoryview(b"\x42" * 4096), lambda err, msg: answers.append(err))
        wire.lose()
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [errno.EIO] and m.dirty.test(2) and not m.lock.busy(2 * REGION, 4096)


async def test_a_write_the_peer_did_not_confirm_is_marked_and_keeps_its_range_until_the_peer_is_fenced(primary):
    """Found by review (no test caught dropping the mark or releasing the range early)."""
    here, peer, intent = await primary()
    data = b"\x24" * 4096
    answers: list = []
    async with _running(here, peer, intent) as (wire, dp, m):
        g = dp.g
        with batch():
            assert dp.fast_write(m, 3 * REGION, memoryview(data), lambda err, msg: answers.append(err))
        g.mode = Mode.FENCING  # the peer is being fenced off
        wire.lose()
        assert m.dirty.test(3)  # at once: a resync that starts now counts it
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [] and m.lock.busy(3 * REGION, 4096)
        g.mode = Mode.ATTACHED
        g.changed()
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [0] and not m.lock.busy(3 * REGION, 4096) and here.read_sync(3 * REGION, 4096) == data
        assert g.lost
