"""A frame nobody waits for at once (a secondary's RELEASE of OK, after its copy of a forwarded
write) is put off (``Link.send_soon``, ``netio.later``): it goes in the same send as the next
frame the link sends, or alone when the loop runs out of work (the idle poller's window passed
without input, or the poller stopped), or at the end of a batch once ``LATER_MAX`` passed while
input keeps the loop busy. Frames put off keep their order ahead of later ones; a link that went
down meanwhile sends none of them; a loop that does not poll sends them with their own batch. A
RELEASE that reports a failed local write is never put off: the primary must mark the range and
fence this array off at once."""

from __future__ import annotations

import contextlib
import errno
import socket
import types

import pytest
import trio
import trio.testing

from syncd import netio
from syncd.config import LinkConfig, LinkPath
from syncd.netio import LATER_MAX, IdlePoller
from syncd.node.datapath import DataPath
from syncd.node.intent import IntentLog
from syncd.node.volume import Volume
from syncd.repl.link import Link
from syncd.repl.proto import Frame, FrameDecoder, MsgType, Status

from .test_busy_poll import StepClock, settled
from .test_datapath_cancel import REGION, SIZE, Group, Member, Node, Wire


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingSock:
    """A socket whose sends are counted (what the kernel got in one call)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends = 0

    def sendmsg(self, bufs):
        self.sends += 1
        return self.sock.sendmsg(bufs)

    def fileno(self) -> int:
        return self.sock.fileno()


@pytest.fixture(autouse=True)
def fresh_batch(monkeypatch):
    """No test sees what another put off (netio's batch state is the process's)."""
    monkeypatch.setattr(netio, "_batch", netio._Batch())


@pytest.fixture
def poller(monkeypatch):
    p = IdlePoller(ManualClock())
    p.running = True  # as when the node's poll task runs (it is not started here)
    monkeypatch.setattr(netio, "poller", p)
    return p


@pytest.fixture
def link():
    cfg = LinkConfig(peer="B", paths=(LinkPath(("127.0.0.1", 1), ("127.0.0.1", 2)),))
    lk = Link(cfg, "A", b"u" * 16, lambda *a: None, lambda: None, lambda: None)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    p = lk.paths[0]
    p.state, p.sock = "up", CountingSock(a)
    lk.peer_end = b  # what the peer reads
    yield lk
    a.close()
    b.close()


def received(lk: Link) -> list[tuple[str, int]]:
    dec = FrameDecoder()
    while True:
        try:
            data = lk.peer_end.recv(1 << 16)
        except BlockingIOError:
            break
        dec.receive_data(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append((MsgType(f.type).name, f.req_id))
    return out


def batch(fn=lambda: None) -> None:
    """What a loop reading input does with what it read: ``fn``, then the batch's sends."""
    was = netio.batch_begin()
    try:
        fn()
    finally:
        netio.batch_end(was)


def release(req_id: int, status: int = 0) -> Frame:
    return Frame.release(req_id, 1, 1, status)


def test_a_frame_put_off_goes_in_front_of_the_next_frame_in_the_same_send(poller, link):
    batch(lambda: link.send_soon(release(7)))
    assert received(link) == [] and link.paths[0].sock.sends == 0
    batch(lambda: link.reply(link.paths[0], 9, Status.OK))
    assert received(link) == [("RELEASE", 7), ("REPLY", 9)]
    assert link.paths[0].sock.sends == 1
    assert link.paths[0].tx_frames == 2


def test_frames_put_off_keep_their_order_ahead_of_later_ones(poller, link):
    def two() -> None:
        link.send_soon(release(1))
        link.send_soon(release(2))

    batch(two)
    batch(lambda: link.send_soon(release(3)))
    batch(lambda: link.send(release(4)))
    assert received(link) == [("RELEASE", 1), ("RELEASE", 2), ("RELEASE", 3), ("RELEASE", 4)]


def test_input_that_keeps_the_loop_busy_sends_it_once_LATER_MAX_passed(poller, link):
    batch(lambda: link.send_soon(release(7)))
    poller.clock.now = LATER_MAX / 2
    batch()  # other input, nothing for the link
    assert received(link) == []
    poller.clock.now = LATER_MAX * 1.01
    batch()
    assert received(link) == [("RELEASE", 7)]
    assert not link._soon and not netio._batch.later


def test_a_link_that_went_down_sends_nothing_put_off_before(poller, link):
    batch(lambda: link.send_soon(release(7)))
    link.paths[0].state = "down"
    poller.clock.now = LATER_MAX * 2
    batch()
    assert received(link) == [] and not link._soon
    link.paths[0].state = "up"
    batch(lambda: link.reply(link.paths[0], 9, Status.OK))
    assert received(link) == [("REPLY", 9)]  # not the old session's RELEASE


def test_a_frame_put_off_before_the_link_went_down_is_not_sent_on_the_next_session(poller, link):
    batch(lambda: link.send_soon(release(7)))
    p = link.paths[0]
    p.state = "down"
    link._path_lost(p)
    assert not link.up
    p.state = "up"  # a new connection, before the loop ran out of work (review)
    batch(lambda: link.reply(p, 9, Status.OK))
    assert received(link) == [("REPLY", 9)]


def test_a_frame_taken_along_lets_the_next_one_wait_its_own_time(poller, link):
    batch(lambda: link.send_soon(release(1)))
    batch(lambda: link.reply(link.paths[0], 9, Status.OK))  # takes 1 along
    assert received(link) == [("RELEASE", 1), ("REPLY", 9)]
    poller.clock.now = LATER_MAX * 0.9
    batch(lambda: link.send_soon(release(2)))
    poller.clock.now = LATER_MAX * 1.01  # 0.11 of its wait: not yet (review)
    batch()
    assert received(link) == []
    poller.clock.now = LATER_MAX * 1.91
    batch()
    assert received(link) == [("RELEASE", 2)]


async def test_the_links_sweeper_sends_what_nothing_else_did(poller, link, autojump_clock):
    batch(lambda: link.send_soon(release(7)))  # and then no batch, no idle poller
    async with trio.open_nursery() as n:
        n.start_soon(link._sweeper)
        await trio.sleep(1.0)
        n.cancel_scope.cancel()
    assert received(link) == [("RELEASE", 7)]


def test_a_put_off_send_that_raises_leaves_the_others_put_off(poller):
    ran: list[str] = []

    def bad() -> None:
        raise RuntimeError("a bug")

    batch(lambda: (netio.later(bad), netio.later(lambda: ran.append("second"))))
    with pytest.raises(RuntimeError):
        netio.run_later()
    assert ran == [] and len(netio._batch.later) == 1
    netio.run_later()
    assert ran == ["second"]


def test_where_the_loop_does_not_poll_it_goes_with_its_own_batch(poller, link):
    poller.running = False  # busy_poll_us = 0: nothing would notice the loop ran out of work
    batch(lambda: link.send_soon(release(7)))
    assert received(link) == [("RELEASE", 7)] and not netio._batch.later


def test_outside_a_batch_it_is_sent_as_send_sends(poller, link):
    link.send_soon(release(7))  # (a task's work): its sender task sends it
    assert link.paths[0].sendq.ctl and not link._soon and not netio._batch.later


@contextlib.asynccontextmanager
async def polling(monkeypatch, link):
    """A running poller (a window of 100 passes of a 1 µs step clock) that parked after the
    loop's start, then a batch that puts a RELEASE off."""
    p = IdlePoller(StepClock())
    monkeypatch.setattr(netio, "poller", p)
    async with trio.open_nursery() as n:
        n.start_soon(p.run, 100e-6)
        await settled()
        batch(lambda: link.send_soon(release(7)))
        assert received(link) == []
        yield p, n


async def test_it_goes_alone_when_the_loop_runs_out_of_work(monkeypatch, link):
    async with polling(monkeypatch, link) as (p, n):
        await settled()  # the window passed without input
        assert received(link) == [("RELEASE", 7)]
        assert p.parked and p.polls == 1
        n.cancel_scope.cancel()


async def test_a_poller_that_stops_sends_what_was_put_off(monkeypatch, link):
    async with polling(monkeypatch, link) as (p, n):
        n.cancel_scope.cancel()  # before its window: the node is stopping
    assert received(link) == [("RELEASE", 7)]
    assert not p.running and not netio._batch.later


class SoonWire(Wire):
    """The fake link, telling frames sent now from frames put off."""

    def __init__(self, peer: Volume) -> None:
        super().__init__(peer)
        self.soon: list[tuple[int, int]] = []

    def send_soon(self, frame) -> None:
        assert frame.type == MsgType.RELEASE
        self.soon.append((frame.req_id, frame.release_status()))


async def test_a_secondary_puts_off_its_release_of_ok_but_not_one_of_a_failed_write(tmp_path):
    here = Volume("vv3", str(tmp_path / "here.img"), size=SIZE)
    peer = Volume("vv3", str(tmp_path / "peer.img"), size=SIZE)
    intent = IntentLog(str(tmp_path / "intent"), SIZE, REGION, volume=here)
    answers: list[tuple[int, str]] = []
    try:
        wire = SoonWire(peer)
        async with trio.open_nursery() as nursery:
            dp = DataPath(Group(Node(wire, nursery), "secondary"))
            m = Member(dp.g, here, intent)

            def granted(req_id: int, offset: int, data: bytes) -> None:
                dp.forwarding += 1  # as fast_write counts it when it forwards
                pend = types.SimpleNamespace(reply=types.SimpleNamespace(status=Status.OK), error=None,
                                             frame=types.SimpleNamespace(req_id=req_id, epoch=1))
                dp._granted(pend, m, offset, data, lambda e, msg: answers.append((e, msg)), 0.0)

            granted(5, 0, b"a" * 4096)
            assert wire.soon == [(5, 0)] and wire.releases == []
            assert answers == [(0, "")] and here.read_sync(0, 4096) == b"a" * 4096

            def broken(offset, data):
                raise OSError(errno.EIO, "injected")

            here.write_sync = broken
            granted(6, 4096, b"b" * 4096)
            assert wire.releases == [(6, errno.EIO)], "a failed copy must reach the primary at once"
            assert wire.soon == [(5, 0)]
            assert answers[1][0] == errno.EIO
            nursery.cancel_scope.cancel()
    finally:
        intent.close()
        here.close()
        peer.close()
