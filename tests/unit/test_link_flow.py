"""Flow control of the replication link: control frames never queue behind bulk data, data in
flight is bounded, and a request waiting for room neither burns its io_timeout nor outlives the
link. The queue and credit logic is driven directly (sans-IO); the link itself runs in process
over loopback TCP, its peer a second Link or a raw socket speaking the wire format."""

from __future__ import annotations

import socket
import uuid

import pytest
import trio

from syncd import secure
from syncd.config import LinkConfig, LinkPath
from syncd.repl import proto
from syncd.repl.flow import BULK_BATCH, Credit, SendQueue, is_bulk, request_cost
from syncd.repl.link import Link, LinkDown
from syncd.repl.proto import Frame, FrameDecoder, MsgType

H = proto.HEADER_SIZE


def frames_in(bufs: list) -> list[Frame]:
    dec = FrameDecoder()
    dec.receive_data(b"".join(bytes(b) for b in bufs))
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


def write(req_id: int, n: int) -> Frame:
    return Frame.write(req_id, 1, 1, 0, 0, bytes(n))


# -- sans-IO: the send queue ------------------------------------------------------------------

def test_control_frames_go_before_bulk_queued_earlier():
    q = SendQueue()
    for i in range(1, 5):
        q.bulk.append(proto.encode(write(i, 64 << 10)))
    q.ctl.append(proto.encode(Frame.ping(7)))
    q.ctl.append(proto.encode(Frame.release(3, 1, 1)))
    types = [f.type for f in frames_in(q.next_batch())]
    assert types[:2] == [MsgType.PING, MsgType.RELEASE]
    assert types[2:] == [MsgType.WRITE] * 4  # 4 x 64 KiB: one batch


def test_bulk_goes_in_bounded_batches_so_a_later_control_frame_waits_for_one_batch_only():
    q = SendQueue()
    for i in range(1, 33):
        q.bulk.append(proto.encode(write(i, 32 << 10)))  # 1 MiB queued
    first = frames_in(q.next_batch())
    assert sum(len(f.payload) for f in first) == BULK_BATCH
    q.ctl.append(proto.encode(Frame.pong(1)))  # arrives while the first batch is in the kernel
    second = frames_in(q.next_batch())
    assert second[0].type == MsgType.PONG
    assert [f.req_id for f in first + second[1:]] == list(range(1, 17))  # bulk order kept


def test_a_frame_larger_than_a_batch_goes_whole_and_alone():
    q = SendQueue()
    q.bulk.append(proto.encode(write(1, 4 << 20)))
    q.bulk.append(proto.encode(write(2, 4096)))
    batch = frames_in(q.next_batch())
    assert [(f.req_id, len(f.payload)) for f in batch] == [(1, 4 << 20)]
    assert [f.req_id for f in frames_in(q.next_batch())] == [2]
    assert q.next_batch() == [] and len(q) == 0


def test_what_is_bulk_and_what_it_costs():
    assert is_bulk(write(1, 4096)) and request_cost(write(1, 4096)) == H + 4096
    z = Frame.zeroes(1, 1, 1, 0, 0, 1 << 30)
    assert is_bulk(z) and request_cost(z) == H  # no data on the wire
    r = Frame.read(1, 1, 1, 0, 0, 1 << 20)
    assert not is_bulk(r) and request_cost(r) == H + (1 << 20)  # its reply brings the data
    for f in (Frame.lease(1, 1, 1), Frame.control(1, {"op": "x"}), Frame.flush(1, 1, 1),
              Frame.release(1, 1, 1), Frame.ping(1), Frame.digests(1, 1, 1, 0, 0, 1 << 20, 4096)):
        assert not is_bulk(f) and request_cost(f) == 0
    assert is_bulk(Frame.resync_begin(1, 1, 1, 0, 4096, bytes(1 << 15)))  # a large bitmap


# -- sans-IO: the credit ----------------------------------------------------------------------

class Item:
    def __init__(self, cost):
        self.cost = cost


def test_credit_bounds_bytes_in_flight_and_admits_waiters_in_order():
    c = Credit(100)
    assert c.take(60) and c.take(40) and not c.take(1)
    a, b, d = Item(50), Item(10), Item(60)
    for it in (a, b, d):
        c.queue(it)
    assert not c.take(1)  # nothing overtakes a waiting request, even one that would fit
    c.give(40)
    assert c.admit() == []  # a (50) does not fit yet; b may not pass it
    c.give(60)
    assert c.admit() == [a, b] and c.used == 60
    c.give(50)
    assert c.admit() == [d] and c.used == 70 and not c.waiting
    assert c.waits == 3


def test_a_request_larger_than_the_limit_goes_alone():
    c = Credit(100)
    assert c.take(500) and c.used == 500
    assert not c.take(1)
    c.give(500)
    big = Item(300)
    c.queue(big)
    assert c.admit() == [big]


def test_dropped_and_cancelled_waiters_never_held_credit():
    c = Credit(10)
    assert c.take(10)
    x, y = Item(5), Item(5)
    c.queue(x)
    c.queue(y)
    c.cancel(x)
    c.cancel(x)  # twice is harmless
    assert c.drop() == [y] and c.used == 10 and not c.waiting


# -- the link, in process ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configs(max_inflight: int, **timing) -> tuple[LinkConfig, LinkConfig]:
    pa, pb = free_port(), free_port()
    t = dict(ping_interval=0.1, path_timeout=1.0, io_timeout=3.0) | timing
    a = LinkConfig(peer="B", paths=(LinkPath(("127.0.0.1", pa), ("127.0.0.1", pb)),), max_inflight=max_inflight, **t)
    b = LinkConfig(peer="A", paths=(LinkPath(("127.0.0.1", pb), ("127.0.0.1", pa)),), max_inflight=max_inflight, **t)
    return a, b


class Peer:
    """Node B's side: records the requests it gets; answers them when told to."""

    def __init__(self):
        self.got: list[tuple] = []  # (path, frame)
        self.arrived = trio.Event()

    def on_request(self, link, path, f):
        self.got.append((path, f))
        if f.type == MsgType.CONTROL:
            link.reply(path, f.req_id, 0, b"{}")
        self.arrived.set()

    async def wait_for(self, n: int) -> None:
        while len(self.got) < n:
            self.arrived = trio.Event()
            await self.arrived.wait()

    def answer(self, link, f, status=0) -> None:
        for path, g in self.got:
            if g.req_id == f.req_id:
                link.reply(path, f.req_id, status)
                return
        raise AssertionError(f"peer never got request {f.req_id}")

    def writes(self) -> list[int]:
        return [f.req_id for _, f in self.got if f.type == MsgType.WRITE]


@pytest.fixture
async def pair(request):
    """Links A (dialer) and B (listener), up; A's max_inflight from the test's parameter."""
    max_inflight, timing = getattr(request, "param", (1 << 20, {}))
    ca, cb = configs(max_inflight, **timing)
    peer = Peer()
    up = trio.Event()
    a = Link(ca, "A", uuid.uuid4().bytes, lambda *x: None, up.set, lambda: None)
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        await n.start(a.run)
        with trio.fail_after(5):
            await up.wait()
        yield a, b, peer
        n.cancel_scope.cancel()


async def test_data_requests_beyond_max_inflight_wait_unsent_without_a_deadline(pair):
    a, b, peer = pair
    w = [write(a.next_id(), 600 << 10) for _ in range(3)]
    pends = [a.start(f) for f in w]
    with trio.fail_after(5):
        await peer.wait_for(1)
    await trio.sleep(0.2)
    assert peer.writes() == [w[0].req_id]  # 2 x 600 KiB exceed 1 MiB: the others wait
    assert pends[0].deadline > 0 and pends[1].deadline == 0 and pends[2].deadline == 0
    assert a.info()["waiting_for_credit"] == 2 and a.info()["inflight_bytes"] == H + (600 << 10)
    # A control request is not held up by the credit (nor queued behind the waiting data).
    with trio.fail_after(5):
        rep = await a.request(Frame.control(a.next_id(), {"op": "ping"}))
    assert rep.status == 0
    t_answer = trio.current_time()
    peer.answer(b, w[0])
    with trio.fail_after(5):
        assert (await a.wait(pends[0])).status == 0
        await peer.wait_for(3)  # the control request, then the second write
    assert peer.writes() == [w[0].req_id, w[1].req_id]
    assert pends[1].deadline >= t_answer + a.cfg.io_timeout  # its io_timeout runs from now
    peer.answer(b, w[1])
    with trio.fail_after(5):
        await a.wait(pends[1])
        await peer.wait_for(4)
    peer.answer(b, w[2])
    with trio.fail_after(5):
        await a.wait(pends[2])
    assert a.credit.used == 0 and a.info()["credit_waits"] == 2


@pytest.mark.parametrize("pair", [(1 << 20, dict(io_timeout=1.5, path_timeout=1.0))], indirect=True)
async def test_time_spent_waiting_for_credit_does_not_count_against_io_timeout(pair):
    a, b, peer = pair
    first, second = write(a.next_id(), 900 << 10), write(a.next_id(), 900 << 10)
    p1, p2 = a.start(first), a.start(second)
    with trio.fail_after(5):
        await peer.wait_for(1)
    await trio.sleep(1.2)  # the first is answered just before its io_timeout
    peer.answer(b, first)
    with trio.fail_after(5):
        await peer.wait_for(2)
    await trio.sleep(0.5)  # the second has now existed longer than io_timeout
    peer.answer(b, second)
    with trio.fail_after(5):
        assert (await a.wait(p1)).status == 0
        assert (await a.wait(p2)).status == 0


async def test_requests_waiting_for_credit_fail_with_the_link(pair):
    a, b, peer = pair
    sent = a.start(write(a.next_id(), 1 << 20))
    called = []
    waiting_cb = a.start(write(a.next_id(), 4096), cb=called.append)
    waiting = a.start(write(a.next_id(), 4096))
    rooms = []

    async def reserve():
        rooms.append(await a.reserve(4096))

    async with trio.open_nursery() as n:
        n.start_soon(reserve)
        with trio.fail_after(5):
            await peer.wait_for(1)
        await trio.sleep(0.1)
        assert a.info()["waiting_for_credit"] == 3
        a.reset("test: link lost")
    assert called == [waiting_cb] and isinstance(waiting_cb.error, LinkDown)
    for p in (sent, waiting):
        with pytest.raises(LinkDown):
            await a.wait(p)
    assert rooms == [None]  # the reservation was never granted
    assert a.credit.used == 0 and not a.credit.waiting
    assert peer.writes() == [sent.frame.req_id]  # nothing that waited was ever sent


async def test_reserved_room_is_used_by_start_or_given_back(pair):
    a, b, peer = pair
    big = write(a.next_id(), 1000 << 10)
    p_big = a.start(big)
    got = []

    async def reserve(nbytes):
        got.append(await a.reserve(nbytes))

    async with trio.open_nursery() as n:
        n.start_soon(reserve, 200 << 10)
        await trio.sleep(0.1)
        assert got == [] and a.info()["waiting_for_credit"] == 1
        # A reservation waiting for room is first in line: a data request started now waits too.
        assert not a.has_credit(1)
        with trio.fail_after(5):
            await peer.wait_for(1)
        peer.answer(b, big)
    await a.wait(p_big)
    room = got[0]
    assert room is not None and a.credit.used == H + (200 << 10)
    f = write(a.next_id(), 200 << 10)
    p = a.start(f, reserved=room)
    assert a.credit.used == H + (200 << 10)  # the room became the request's credit
    a.unreserve(room)  # used: ignored
    assert a.credit.used == H + (200 << 10)
    with trio.fail_after(5):
        await peer.wait_for(2)
    peer.answer(b, f)
    await a.wait(p)
    assert a.credit.used == 0
    spare = await a.reserve(4096)
    assert a.credit.used == H + 4096
    a.unreserve(spare)
    assert a.credit.used == 0
    # A reservation whose waiter is cancelled leaves the queue.
    a.start(write(a.next_id(), 1 << 20))
    with trio.move_on_after(0.2):
        await a.reserve(4096)
    assert not a.credit.waiting


async def test_control_frames_overtake_data_ops_read_ahead_of_them():
    """B's receiver: a RELEASE that arrives behind data ops is handled before they are applied."""
    _, cb = configs(32 << 20)
    peer = Peer()
    up = trio.Event()
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, up.set, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        raw = trio.socket.socket()
        await raw.connect(cb.paths[0].local)
        # The link's security handshake first (this link is configured insecure: prefaces only).
        hs = secure.Handshake(secure.Security("insecure"), secure.Role.DIALER, "A", "B")
        await raw.send(hs.take_output())
        while not hs.done:
            hs.receive(await raw.recv(65536))
        hello = Frame.hello(node_uuid=uuid.uuid4().bytes, node_name="A", path_index=0, link_session=99)
        await raw.send(proto.encode_bytes(hello))
        dec = FrameDecoder()
        dec.receive_data(hs.first_plaintext())
        while (ack := dec.next_frame()) is None:
            dec.receive_data(await raw.recv(65536))
        assert ack.type == MsgType.HELLO_ACK
        with trio.fail_after(5):
            await up.wait()
        data = b"".join(proto.encode_bytes(write(i, 4096)) for i in range(1, 9))  # one segment
        data += proto.encode_bytes(Frame.release(100, 1, 1))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        assert await raw.send(data) == len(data)  # all in the kernel before B reads any
        with trio.fail_after(5):
            await peer.wait_for(9)
        order = [f.type for _, f in peer.got]
        assert order[0] == MsgType.RELEASE and order[1:] == [MsgType.WRITE] * 8, order
        raw.close()
        n.cancel_scope.cancel()


async def test_bytes_an_inline_send_left_unsent_die_with_the_connection(pair):
    """What the kernel did not take at the end of a batch (``Path.rest``) belongs to that
    connection: a path that goes down before its sender sent it must not send it on the next
    connection, where it would arrive after the reset (``reset``: nothing sent before can
    arrive after), or as garbage under a new session's keys."""
    a, b, peer = pair
    p = a.paths[0]
    stale = Frame.write(a.next_id(), 1, 1, 0, 0, b"old session")
    p.rest = list(p.chan.wrap(proto.encode(stale)))  # left by an inline send; the sender not woken
    came_back = trio.Event()
    a.on_up = came_back.set
    a.reset("test")
    with trio.fail_after(10):
        await came_back.wait()
    fresh = write(a.next_id(), 4096)
    pend = a.start(fresh)
    with trio.fail_after(5):
        await peer.wait_for(1)
    await trio.sleep(0.2)
    assert stale.req_id not in peer.writes(), "a frame of the connection that died arrived on the next one"
    peer.answer(b, fresh)
    with trio.fail_after(5):
        assert (await a.wait(pend)).status == 0


# -- which path a request takes ---------------------------------------------------------------

@pytest.fixture
async def two_paths():
    """Links A and B over two paths, both up; 64 MiB of credit."""
    ports = [(free_port(), free_port()) for _ in range(2)]
    t = dict(ping_interval=0.1, path_timeout=1.0, io_timeout=3.0, max_inflight=64 << 20)
    ca = LinkConfig(peer="B", paths=tuple(LinkPath(("127.0.0.1", x), ("127.0.0.1", y)) for x, y in ports), **t)
    cb = LinkConfig(peer="A", paths=tuple(LinkPath(("127.0.0.1", y), ("127.0.0.1", x)) for x, y in ports), **t)
    peer = Peer()
    a = Link(ca, "A", uuid.uuid4().bytes, lambda *x: None, lambda: None, lambda: None)
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        await n.start(a.run)
        for _ in range(500):  # both paths connect on their own (dial loops)
            if len(a.live_paths()) == 2 and len(b.live_paths()) == 2:
                break
            await trio.sleep(0.01)
        assert len(a.live_paths()) == 2 and len(b.live_paths()) == 2
        yield a, b, peer
        n.cancel_scope.cancel()


def paths_of(peer: Peer, frames: list[Frame]) -> list[int]:
    at = {f.req_id: p.index for p, f in peer.got}
    return [at[f.req_id] for f in frames]


async def test_small_requests_keep_to_one_path_while_it_keeps_up_and_large_ones_spread(two_paths):
    """Small requests that arrive together leave, arrive and are answered together on one path
    (spread in turn, each batch cost a send, a receive and a wake-up per path at both arrays);
    past PREFER_INFLIGHT in flight there they spread, as large requests always do."""
    from syncd.repl.link import PREFER_INFLIGHT

    a, b, peer = two_paths
    small = [write(a.next_id(), 4096) for _ in range(16)]
    for f in small:
        a.start(f)
    with trio.fail_after(5):
        await peer.wait_for(16)
    assert len(set(paths_of(peer, small))) == 1, paths_of(peer, small)
    first = paths_of(peer, small)[0]
    # More small ones, none answered: beyond PREFER_INFLIGHT on the first path they spread.
    more = [write(a.next_id(), 4096) for _ in range(2 * PREFER_INFLIGHT)]
    for f in more:
        a.start(f)
    with trio.fail_after(5):
        await peer.wait_for(16 + len(more))
    on = paths_of(peer, small + more)
    assert on.count(first) >= PREFER_INFLIGHT and on.count(1 - first) >= PREFER_INFLIGHT // 2, on
    for f in small + more:
        peer.answer(b, f)
    # Large requests (bandwidth) take both paths in turn, however few are in flight.
    large = [write(a.next_id(), 256 << 10) for _ in range(4)]
    for f in large:
        a.start(f)
    with trio.fail_after(5):
        await peer.wait_for(16 + len(more) + 4)
    assert sorted(paths_of(peer, large)) == [0, 0, 1, 1], paths_of(peer, large)
    for f in large:
        peer.answer(b, f)
    # A preferred path whose round trip is over the limit is passed over.
    a.paths[first].rtt_high = True
    late = [write(a.next_id(), 4096) for _ in range(4)]
    for f in late:
        a.start(f)
    with trio.fail_after(5):
        await peer.wait_for(16 + len(more) + 8)
    assert set(paths_of(peer, late)) == {1 - first}, paths_of(peer, late)
