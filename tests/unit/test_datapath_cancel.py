"""A host write the data path has begun is carried through to both replicas even when the task
that asked for it is cancelled: the NBD server cancels a connection's request tasks when the
client breaks the protocol or leaves (live fuzzer, seed 2, case nbd:293: a complete FUA write
followed by a bad request header; the primary sent the write to its peer, then its own apply was
cancelled, and the replicas differed while the group said it was in sync).

In process: the data path of one array (real volume, write-intent log, range lock and bitmaps)
and a replication link whose other end is the peer's replica, a real file too: the peer applies
a data frame as it is sent and answers when the test says."""

from __future__ import annotations

import errno
import types

import trio
import trio.testing

from syncd.node.datapath import WRITE, DataPath
from syncd.node.intent import IntentLog
from syncd.node.roles import Mode
from syncd.node.volume import Volume
from syncd.ranges import Bitmap, RangeLock
from syncd.repl.link import LinkDown
from syncd.repl.proto import MsgType, Status

REGION = 256 << 10
SIZE = 4 << 20


class _Pending:
    def __init__(self, frame, cb) -> None:
        self.frame, self.cb = frame, cb
        self.event = trio.Event()
        self.reply = None
        self.error = None

    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def finish(self) -> None:
        if self.cb is not None:
            cb, self.cb = self.cb, None
            cb(self)
        else:
            self.event.set()


class Wire:
    """The replication link; at its other end the peer's replica, which applies every data frame
    as it arrives (in order, as the real peer does) and answers when ``answer`` is called."""

    up = True

    def __init__(self, peer: Volume) -> None:
        self.peer = peer
        self.ids = 0
        self.unanswered: list[_Pending] = []
        self.releases: list[tuple[int, int]] = []  # (req_id, status)

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    def has_credit(self, n: int) -> bool:
        return True

    async def reserve(self, nbytes: int) -> None:
        return None

    def unreserve(self, room) -> None:
        pass

    def start(self, frame, timeout=None, cb=None, reserved=None) -> _Pending:
        assert frame.type == MsgType.WRITE
        self.peer.write_sync(frame.offset, frame.payload)
        pend = _Pending(frame, cb)
        self.unanswered.append(pend)
        return pend

    async def wait(self, pend: _Pending):
        if not pend.done():
            await pend.event.wait()
        if pend.error is not None:
            raise pend.error
        return pend.reply

    async def request(self, frame, timeout=None):  # noqa: ASYNC109 (the link's signature)
        return await self.wait(self.start(frame))

    def send(self, frame) -> None:
        assert frame.type == MsgType.RELEASE
        self.releases.append((frame.req_id, frame.release_status()))

    def answer(self) -> None:
        for pend in self.unanswered:
            pend.reply = types.SimpleNamespace(status=Status.OK)
            pend.finish()
        self.unanswered.clear()

    def lose(self) -> None:
        """The link goes down before any answer came (the peer applied what it was sent)."""
        for pend in self.unanswered:
            pend.error = LinkDown("replication link down")
            pend.finish()
        self.unanswered.clear()


class Node:
    def __init__(self, link: Wire, nursery: trio.Nursery) -> None:
        self.link = link
        self.nursery = nursery
        self.cfg = types.SimpleNamespace(link=types.SimpleNamespace(transition_timeout=5.0, io_timeout=5.0))

    def spawn(self, fn, *args) -> None:
        self.nursery.start_soon(fn, *args)


class Group:
    """A group in steady state, mirroring: primary ``attached`` or secondary ``following``."""

    name = "rcg1"
    epoch = 1
    st = types.SimpleNamespace(gid=1)

    def __init__(self, node: Node, role: str) -> None:
        self.node = node
        self.role = role
        self.mode = Mode.ATTACHED if role == "primary" else Mode.FOLLOWING
        self.mirroring = role == "primary"
        self.state = types.SimpleNamespace(failsafe=False, confirmed=True, alone=False, fence_reason="",
                                           peer_newer=False, peer_has_all=role == "primary", flush_pending=False,
                                           role=types.SimpleNamespace(value=role), lease_until=float("inf"))
        self.lost: list[str] = []

    def may_serve(self) -> bool:
        return True

    def transitioning(self) -> bool:
        return False

    def failover_possible(self) -> bool:
        return False

    def lose_peer(self, reason: str) -> None:
        self.lost.append(reason)


class Member:
    def __init__(self, group: Group, vol: Volume, intent: IntentLog) -> None:
        self.group = group
        self.vol = vol
        self.vol_id = 1
        self.lock = RangeLock()
        self.dirty = Bitmap(vol.size, REGION)
        self.oos = Bitmap(vol.size, REGION)
        self.pull = Bitmap(vol.size, REGION)
        self.crash_regions: list[int] = []
        self.peer_wrong = Bitmap(vol.size, REGION)
        self.intent = intent
        self.stats = {"reads": 0, "writes": 0, "forwarded": 0, "bytes_read": 0, "bytes_written": 0}


async def _cancelled_write(tmp_path, role: str) -> tuple[bytes, bytes, Wire, DataPath, Member]:
    """A FUA write at this array whose task is cancelled before it first yields, as the NBD
    server's is when the client's next bytes break the protocol; then the peer answers. Returns
    what each replica holds at the write's range once everything settled."""
    here = Volume("vv3", str(tmp_path / "here.img"), size=SIZE)
    peer = Volume("vv3", str(tmp_path / "peer.img"), size=SIZE)
    intent = IntentLog(str(tmp_path / "intent"), SIZE, REGION, volume=here)
    off, data = 0x10000, bytes(range(256)) * 32  # 8 KiB
    try:
        await intent.mark(off, len(data))  # marked by an earlier write: marking does not yield
        wire = Wire(peer)
        async with trio.open_nursery() as nursery:
            g = Group(Node(wire, nursery), role)
            dp = DataPath(g)
            m = Member(g, here, intent)
            with trio.CancelScope() as cs:
                cs.cancel()
                await dp.host_write(m, WRITE, off, len(data), memoryview(data), True)
            assert cs.cancelled_caught  # the host gets no answer: it went away
            await trio.testing.wait_all_tasks_blocked()
            wire.answer()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        return here.read_sync(off, len(data)), peer.read_sync(off, len(data)), wire, dp, m
    finally:
        intent.close()
        here.close()
        peer.close()


async def test_primary_applies_a_mirrored_write_whose_host_task_was_cancelled(tmp_path):
    here, peer, wire, dp, m = await _cancelled_write(tmp_path, "primary")
    assert peer == bytes(range(256)) * 32  # the peer got it before the task was cancelled
    assert here == peer, "the replicas differ while nothing marks the range for resync"
    assert m.lock.held() == 0 and not m.dirty.count and not dp.g.lost


async def test_secondary_applies_and_releases_a_forwarded_write_whose_host_task_was_cancelled(tmp_path):
    here, peer, wire, dp, m = await _cancelled_write(tmp_path, "secondary")
    assert peer == bytes(range(256)) * 32  # the primary applied it and holds the range
    # ... until the secondary applied it too and said so (RELEASE, status 0), never without it.
    assert wire.releases == [(1, 0)]
    assert here == peer
    assert dp.forwarding == 0 and m.lock.held() == 0
    assert errno.ETIMEDOUT not in (s for _, s in wire.releases)
