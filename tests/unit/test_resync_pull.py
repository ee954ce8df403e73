"""Regions fetched back from the peer after a power cut end in sync on both sides.

Found by CI (the history campaign, seed 3, round 3: the secondary killed, then a power cut at the
primary): the restarted primary started resynchronizing on the secondary's exchange request and
sent RESYNC_BEGIN with its dirty map, which still held the regions its write-intent log named;
its own exchange then decided to fetch those back from the secondary instead. The fetch made
both replicas equal, but nothing told the secondary, which kept the regions out of sync: it
reported "syncing" for ever and forwarded their reads to the primary.

Found again by CI in a rarer order: the secondary's exchange request started the resync before
the primary's own exchange had decided; the fetching ran (nothing to fetch yet), the decision then
moved the regions from "copy" to "fetch back", and nobody fetched them: the secondary stayed
"syncing" and the primary forwarded their reads for ever. Copied before the decision, a region
could also have overwritten the secondary's newer copy with what the power cut left. The resync
now waits for the decision.

In process: the primary's resync (real volumes, range lock, bitmaps) and, at the link's other
end, the secondary's real data path applying each frame to its own replica."""

from __future__ import annotations

import errno
import types

import pytest
import trio
import trio.testing

from syncd.nbd.export import BlockError
from syncd.nbd.extents import DATA
from syncd.node import group as node_group
from syncd.node.datapath import DataPath
from syncd.node.intent import IntentLog
from syncd.node.resync import Resync
from syncd.node.roles import BecameSecondary, CaughtUp, Mode, NeedSync
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


def pulling_primary(node: Node, here: Volume, regions: tuple[int, ...]) -> tuple[Group, Member]:
    """The primary restarted after a power cut, resynchronizing: ``regions`` of its volume
    ``here`` are to be fetched back from the peer (pull), none is dirty."""
    node.stats = {"compared_bytes": 0, "pulled_bytes": 0}
    g = Group(node, "primary")
    g.mode = Mode.SYNCING
    m = Member(g, here, None)
    m.st = types.SimpleNamespace(local="vv1")
    m.resync_bytes = 0
    g.members = {1: m}
    for r in regions:
        m.pull.set(r)
    return g, m


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
            node = Node(SecondaryEnd(sdp, sm), nursery)
            g, m = pulling_primary(node, here, (2, 3, 5))
            flushed = here.flushed_from
            await Resync(node).pull_group(g)
            nursery.cancel_scope.cancel()
        assert not g.lost, g.lost
        assert here.read_sync(0, SIZE) == there.read_sync(0, SIZE)
        assert node.stats["pulled_bytes"] == 2 * REGION  # region 5 was equal: compared, not copied
        assert here.flushed_from > flushed  # durable before the marks go (found by review)
        assert m.pull.count == 0
        # The secondary hears that every one of them is in sync: it serves them itself again.
        assert sm.oos.count == 0, [r for r in range(sm.oos.nregions) if sm.oos.test(r)]
        assert sm.st.synced_once
    finally:
        here.close()
        there.close()


class RestartedPrimary(Group):
    """The fake group of a primary that stopped uncleanly, with the real decision."""

    decide_crash_regions = node_group.Group.decide_crash_regions

    def __init__(self, node: Node) -> None:
        super().__init__(node, "primary")
        self.st = types.SimpleNamespace(gid=1, peer="B")
        self.state.peer_has_all = True  # the secondary holds every write this array acknowledged
        self.state.peer_newer = True  # ... and may hold some this array lost (RoleState.peer_newer)
        self.crash_decided = trio.Event()
        self.notes: list[str] = []
        self.events: list[object] = []
        self.mode = Mode.SYNCING

    def note(self, msg: str, level: int = 0) -> None:
        self.notes.append(msg)

    def handle(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, CaughtUp):
            self.state.peer_newer = False


def _pair(tmp_path, nursery):
    here = Volume("vv1", str(tmp_path / "here.img"), size=SIZE)
    there = Volume("vv1", str(tmp_path / "there.img"), size=SIZE)
    for v in (here, there):
        v.write_sync(0, b"\x11" * SIZE)
    for r in (2, 3):  # the power cut at the primary took its last writes there
        there.write_sync(r * REGION, bytes([r]) * REGION)
    sg = Group(Node(None, nursery), "secondary")
    sg.publish_volume = lambda m: None
    sm = Member(sg, there, None)
    sm.st = types.SimpleNamespace(local="vv1", suspect=False, synced_once=False, last_sync=0.0)
    wire = SecondaryEnd(DataPath(sg), sm)
    node = Node(wire, nursery)
    node.stats = {"compared_bytes": 0, "pulled_bytes": 0}
    g = RestartedPrimary(node)
    m = Member(g, here, None)
    m.st = types.SimpleNamespace(local="vv1", synced_once=True)
    m.resync_bytes = 0
    g.members = {1: m}
    # At its start the primary marks the regions its write-intent log names dirty, undecided;
    # the RESYNC_BEGIN the secondary got (the stale dirty map) named them.
    m.crash_regions = [2, 3, 5]
    for r in m.crash_regions:
        m.dirty.set(r)
        sm.oos.set(r)
    return here, there, g, m, sm, wire


async def test_the_resync_waits_for_the_exchange_to_decide_and_then_fetches_back(tmp_path):
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        try:
            done = trio.Event()

            async def resync():
                await Resync(g.node).pull_group(g)
                done.set()

            nursery.start_soon(resync)
            await trio.testing.wait_all_tasks_blocked()
            assert wire.sent == [] and not done.is_set()  # nothing compared or copied yet
            g.decide_crash_regions(split_brain=False)  # the primary's own exchange answers
            await done.wait()
            assert here.read_sync(0, SIZE) == there.read_sync(0, SIZE)  # the secondary's data won
            assert m.pull.count == 0 and m.dirty.count == 0 and m.crash_regions == []
            assert sm.oos.count == 0, [r for r in range(sm.oos.nregions) if sm.oos.test(r)]
            assert any("fetched back" in n for n in g.notes), g.notes
            # Every acknowledged write is here again: the array may go on without its peer.
            assert [type(e) for e in g.events] == [CaughtUp] and not g.state.peer_newer
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


async def test_regions_of_a_volume_whose_peer_copy_is_suspect_are_copied_not_fetched_back(tmp_path):
    """Found by review: a primary back from a power cut whose peer reports the volume's copy
    suspect (its device failed since it last synced, and may have been replaced by a blank one)
    fetched back that device's copy of the regions it was writing, over every write it still
    held there. Such regions are copied to the peer instead (then compared in full, as for any
    suspect copy); nothing here is overwritten, and the array no longer waits for a copy newer
    than its own."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        there.write_sync(0, bytes(SIZE))  # the peer's replaced device: blank
        before = here.read_sync(0, SIZE)
        try:
            g.decide_crash_regions(split_brain=False, suspect={m.vol_id})
            assert m.pull.count == 0 and m.crash_regions == []
            assert [r for r in range(m.dirty.nregions) if m.dirty.test(r)] == [2, 3, 5]  # to copy
            assert any("suspect" in n and "copied" in n for n in g.notes), g.notes
            # Nothing is newer at the peer: the array holds what it can, and need not wait.
            assert [type(e) for e in g.events] == [NeedSync, CaughtUp] and not g.state.peer_newer
            await Resync(g.node).pull_group(g)
            assert wire.sent == [] and here.read_sync(0, SIZE) == before
            # A volume never in sync at the peer (admitted since): copied too.
            g3 = RestartedPrimary(g.node)
            g3.members = {1: m}
            m.st.synced_once = False
            m.crash_regions = [4]
            m.dirty.set(4)  # as the daemon marks them at its start
            g3.decide_crash_regions(split_brain=False)
            assert m.pull.count == 0 and m.dirty.test(4) and not g3.state.peer_newer
            assert any("never in sync" in n for n in g3.notes), g3.notes
            m.st.synced_once = True
            # Another volume's copy being suspect changes nothing for this one: fetched back.
            g2 = RestartedPrimary(g.node)
            g2.members = {1: m}
            m.crash_regions = [2, 3]
            g2.decide_crash_regions(split_brain=False, suspect={m.vol_id + 1})
            assert m.pull.count == 2 and g2.events == [] and g2.state.peer_newer
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


async def test_undecided_for_two_io_timeouts_they_are_copied(tmp_path, autojump_clock):
    """When the peer cannot hold them newer (this array had acknowledged writes alone before it
    stopped: ``peer_newer`` false), undecided regions are copied to it."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        g.state.peer_has_all = g.state.peer_newer = False
        try:
            t0 = trio.current_time()
            await Resync(g.node).pull_group(g)  # no exchange answers
            assert trio.current_time() - t0 >= 2 * g.node.cfg.link.io_timeout
            assert wire.sent == [] and m.pull.count == 0 and m.crash_regions == []
            assert [r for r in range(m.dirty.nregions) if m.dirty.test(r)] == [2, 3, 5]  # left to copy
            assert any("did not decide" in n for n in g.notes), g.notes
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


async def test_regions_the_peer_may_hold_newer_are_never_copied_undecided(tmp_path, autojump_clock):
    """The etcd history campaign (seed 32): a power cut at primary B, and the link cut 5 ms after
    B restarted, so its state exchange failed. Its resync then waited two I/O timeouts and copied
    the regions its write-intent log named to A, over A's newer data. While the peer may hold
    them newer (``peer_newer``), nothing is decided without its word: the resync gives up (the
    next link session runs the exchange again), and nothing is compared, copied or changed."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        before = (here.read_sync(0, SIZE), there.read_sync(0, SIZE))
        try:
            await Resync(g.node).pull_group(g)  # no exchange answers
            assert g.lost and "did not say" in g.lost[0], g.lost
            assert wire.sent == [] and m.crash_regions == [2, 3, 5] and m.pull.count == 0
            assert (here.read_sync(0, SIZE), there.read_sync(0, SIZE)) == before
            assert g.events == [] and g.state.peer_newer and not g.crash_decided.is_set()
            # A host read of such a region is refused, to be read on another path: not served
            # from what the power cut left here.
            g.node.resync = Resync(g.node)
            g.steady = lambda: True
            g.roles = types.SimpleNamespace(is_primary=True)
            with pytest.raises(BlockError) as e:
                await DataPath(g).host_read(m, 2 * REGION, 4096)
            assert e.value.errno == errno.ESHUTDOWN and wire.sent == []
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


async def test_a_host_read_of_an_undecided_region_waits_for_the_decision_and_reads_the_peer(tmp_path):
    """Found by CI (the history campaign, seed 3): the primary, restarted after a power cut that
    took its last write to a block, served a host's read of that block from its own disk in the
    10 ms before its state exchange decided to fetch the region back: the read returned data
    older than a write the peer had acknowledged. A read of a region the write-intent log names
    now waits for the decision (then reads the peer while the region is being fetched back);
    other regions are read at once."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        g.node.resync = Resync(g.node)
        g.steady = lambda: True  # serving, no role change under way
        g.roles = types.SimpleNamespace(is_primary=True)
        dp = DataPath(g)
        try:
            assert dp.fast_read(m, 2 * REGION, 4096) is None  # not on the fast path while undecided
            assert await dp.host_read(m, 7 * REGION, 4096) == b"\x11" * 4096  # not named: at once
            got: list[bytes] = []

            async def read() -> None:
                got.append(bytes(await dp.host_read(m, 2 * REGION, 4096)))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and wire.sent == []  # waits: nothing read here or there yet
            assert dp.host_allocation(m, 2 * REGION, 4096, 8) == [(4096, DATA)]
            g.decide_crash_regions(split_brain=False)  # the exchange: fetched back from the peer
            await trio.testing.wait_all_tasks_blocked()
            assert got == [bytes([2]) * 4096], got  # the peer's newer data, not the power cut's leftover
            assert wire.sent == [MsgType.READ]
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


async def test_regions_to_fetch_back_are_the_new_primarys_once_this_array_is_secondary(tmp_path):
    """Found by a longer history campaign (40 rounds, seed 11): A, restarted after a power cut,
    decided to fetch back from B the regions its write-intent log named, then learned that B
    owned the group at a later epoch and became its secondary; B resynced it. The regions stayed
    marked "fetch back" at A. B was killed, A took the group over at the next epoch and wrote
    them, and when B returned A fetched them back from B: its reads returned B's older data
    (2,455 stale reads, masked by later writes by the end). Becoming secondary now hands those
    regions to the new primary (reported as suspect, as the write-intent log's are) and forgets
    them here."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        m.intent = IntentLog(str(tmp_path / "intent"), SIZE, REGION, volume=here)
        try:
            await m.intent.mark(2 * REGION, 2 * REGION)  # what A was writing: regions 2 and 3
            g.decide_crash_regions(split_brain=False)  # the exchange: fetch 2, 3, 5 back from B
            assert m.pull.count == 3
            # B owns the group at a later epoch: A becomes its secondary.
            g.role = "secondary"
            node_group.Group._carry_out(g, BecameSecondary())
            assert m.pull.count == 0 and m.crash_regions == [] and m.dirty.count == 0
            assert {2, 3, 5} <= m.suspect_regions  # the new primary compares and copies them
            assert m.oos.count == m.oos.nregions  # read from the primary until it resynced A
            assert g.crash_decided.is_set()
            # B resyncs A (its regions 2 and 3), then dies; A is primary at the next epoch and
            # writes region 2.
            for r in (2, 3):
                here.write_sync(r * REGION, there.read_sync(r * REGION, REGION))
            g.role = "primary"
            here.write_sync(2 * REGION, b"\x77" * REGION)
            # B returns: A's resync fetches nothing back from it.
            await Resync(g.node).pull_group(g)
            assert wire.sent == []
            assert here.read_sync(2 * REGION, REGION) == b"\x77" * REGION
        finally:
            nursery.cancel_scope.cancel()
            m.intent.close()
            here.close()
            there.close()


class ReadingPeer(SecondaryEnd):
    """The link as the primary's handle_read sees it: replies to the secondary are kept."""

    def __init__(self, dp: DataPath, m: Member) -> None:
        super().__init__(dp, m)
        self.replies: list[tuple[int, object]] = []

    def reply(self, path, req_id, status, payload=b"") -> None:
        self.replies.append((status, bytes(payload)))


async def test_a_secondary_reading_through_the_primary_gets_what_the_primary_fetches_back(tmp_path):
    """Found by review: the secondary, told by RESYNC_BEGIN that it lacks a region (one it was
    writing itself when it stopped), forwards its hosts' reads of it to the primary; the primary,
    back from a power cut that took its own last writes there, answered from its older copy.
    It now answers as its own hosts' reads are: after the decision, from the peer's copy. And
    RESYNC_BEGIN no longer names the regions the primary fetches back."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        link = ReadingPeer(wire.dp, sm)
        g.node.link = link
        g.node.resync = Resync(g.node)
        dp = DataPath(g)
        try:
            m.dirty.set(7)  # a region the peer does lack
            lacks = node_group.Group._lacks(g, m)
            assert [r for r in range(m.dirty.nregions) if lacks[r >> 3] >> (r & 7) & 1] == [7]
            read = Frame.read(1, 1, 1, 1, 2 * REGION, 4096)
            nursery.start_soon(dp.handle_read, link, None, read, m)
            await trio.testing.wait_all_tasks_blocked()
            assert link.replies == []  # waits for the decision
            g.decide_crash_regions(split_brain=False)
            await trio.testing.wait_all_tasks_blocked()
            assert link.replies == [(Status.OK, bytes([2]) * 4096)], link.replies  # the peer's newer data
            g.state.peer_newer = False
            assert node_group.Group._lacks(g, m) == bytes(m.dirty.bits)
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()


def test_a_save_keeps_the_regions_still_to_fetch_back():
    """Found by review: ``pull`` lived only in memory, and a clean restart took the regions to
    fetch back from the saved dirty map: those still to fetch were forgotten."""
    from syncd.node.daemon import Node as RealNode
    from syncd.node.state import decode_bits
    from syncd.ranges import Bitmap

    m = types.SimpleNamespace(dirty=Bitmap(8 * REGION, REGION), pull=Bitmap(8 * REGION, REGION),
                              peer_wrong=Bitmap(8 * REGION, REGION), st=types.SimpleNamespace(dirty=""),
                              vol=types.SimpleNamespace(size=8 * REGION))
    m.dirty.set(1)
    m.pull.set(4)
    g = types.SimpleNamespace(members={"vv1": m}, role="primary", st=types.SimpleNamespace(peer_has_all=True))
    saved: list[object] = []
    node = types.SimpleNamespace(groups={"rcg1": g}, state="state", store=types.SimpleNamespace(save=saved.append))
    RealNode.save(node)
    bits = decode_bits(m.st.dirty)
    assert saved == ["state"] and bits is not None
    assert [r for r in range(8) if bits[r >> 3] >> (r & 7) & 1] == [1, 4]


class PrimaryEnd:
    """The secondary's link: at its other end the primary's data path answering forwarded reads
    (``handle_read``), as the primary does."""

    up = True

    def __init__(self, dp: DataPath, m) -> None:
        self.dp, self.m = dp, m
        self.ids = 0
        self.forwarded: list[tuple[int, int]] = []

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    def reply(self, path, req_id, status, payload=b""):
        self.answer = Frame.reply(req_id, status, bytes(payload))

    async def request(self, frame, timeout=None):  # noqa: ASYNC109 (the link's signature)
        assert frame.type == MsgType.READ, frame.type
        self.forwarded.append((frame.offset, frame.length))
        await self.dp.handle_read(self, None, frame, self.m)
        return self.answer


async def test_a_read_spanning_a_region_fetched_back_and_one_the_peer_lacks_reads_each_where_it_is_current(tmp_path):
    """Found by stop 29's review: a read spanning a region the restarted primary fetches back
    (newer at the secondary) and one the secondary lacks (newer at the primary) was answered
    whole from one copy: from the secondary's at the primary (a host read, or one the secondary
    forwarded), so the part the secondary lacks was older than an acknowledged write. Each
    region is now read where it is current, at either array, by either path."""
    async with trio.open_nursery() as nursery:
        here, there, g, m, sm, wire = _pair(tmp_path, nursery)
        g.node.resync = Resync(g.node)
        g.steady = lambda: True
        g.roles = types.SimpleNamespace(is_primary=True)
        dp = DataPath(g)
        # Region 1: written here; the secondary lacks it (RESYNC_BEGIN said so).
        here.write_sync(REGION, b"\x99" * REGION)
        m.dirty.set(1)
        sm.oos.set(1)
        try:
            g.decide_crash_regions(split_brain=False)  # 2, 3, 5: fetched back from the secondary
            for r in (2, 3, 5):
                sm.oos.clear(r)  # RESYNC_BEGIN left them out (Group._lacks): current there
            want = b"\x99" * REGION + bytes([2]) * (REGION // 2)
            span = (REGION, REGION + REGION // 2)  # all of region 1, half of region 2
            # A host's read at the primary.
            assert bytes(await dp.host_read(m, *span)) == want
            # The same range, forwarded by a secondary that sends its whole range.
            end = PrimaryEnd(dp, m)
            await dp.handle_read(end, None, Frame.read(1, 1, 1, m.vol_id, *span), m)
            assert (end.answer.status, bytes(end.answer.payload)) == (Status.OK, want)
            # A host's read at the secondary forwards what it lacks (region 1) only.
            sg = sm.group
            sg.node.link = end
            sg.steady = lambda: True
            sg.roles = types.SimpleNamespace(is_primary=False)
            end.forwarded.clear()
            assert bytes(await DataPath(sg).host_read(sm, *span)) == want
            assert end.forwarded == [(REGION, REGION)]
            assert here.read_sync(REGION, REGION) == b"\x99" * REGION  # nothing written anywhere
            assert there.read_sync(2 * REGION, REGION) == bytes([2]) * REGION
        finally:
            nursery.cancel_scope.cancel()
            here.close()
            there.close()
