"""The NBD server bounds what hosts make it hold: a connection with its maximum of requests (and
unsent replies) in the server is not read further, nor is any connection while all of them
together hold the server's maximum; reading resumes as requests complete. Replies still come for
every request (TCP back-pressure, no errors)."""

from __future__ import annotations

import math
import socket

import pytest
import trio
import trio.testing

from syncd.nbd import proto as p
from syncd.nbd.export import AluaState, ClientIdentity, StaticCatalog
from syncd.nbd.server import NBDServer

from .test_nbd_codec import RawClient, go

MiB = 1 << 20


class SlowExport:
    """Writes wait until the test lets them finish (as when the replication link is full)."""

    name = "vv1"
    size = 64 * MiB
    description = "slow"
    read_only = False
    can_flush = can_fua = can_trim = can_zero = can_multi_conn = True
    can_fast_zero = False

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started = 0
        self.go = trio.Event()
        self._lot = trio.lowlevel.ParkingLot()  # tasks waiting for writes to start

    async def write(self, offset, data, fua):
        self.running += 1
        self.started += 1
        self._lot.unpark_all()
        self.most = max(self.most, self.running)
        await self.go.wait()
        self.running -= 1

    async def wait_started(self, n: int) -> None:
        while self.started < n:
            await self._lot.park()

    async def read(self, offset, length):
        return bytes(length)

    async def flush(self):
        pass

    async def trim(self, offset, length, fua):
        pass

    async def write_zeroes(self, offset, length, fua, no_hole, fast=False):
        pass

    async def allocation(self, offset, length):
        return [(length, 0)]

    def alua(self, client: ClientIdentity) -> AluaState:
        return AluaState(0, 0)


async def sendall(sock, data) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def client(server, nursery, exp, nreq, replies: trio.MemorySendChannel):
    a, b = socket.socketpair()
    a.setblocking(False)
    nursery.start_soon(server._handle_sock, a, ClientIdentity(""))
    c = RawClient(trio.socket.from_stdlib_socket(b))
    await go(c)

    async def send():
        for i in range(nreq):
            await sendall(c.s, p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, i, i * MiB, MiB) + bytes(MiB))

    async def receive():
        for _ in range(nreq):
            magic, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
            assert typ == p.REPLY_TYPE_NONE  # no error: the host was only slowed down
            replies.send_nowait(h)

    nursery.start_soon(send)
    nursery.start_soon(receive)


async def test_one_connection_is_not_read_beyond_its_maximum():
    exp = SlowExport()
    srv = NBDServer(StaticCatalog({"vv1": exp}), max_inflight=64 * MiB, max_inflight_per_connection=4 * MiB)
    tx, rx = trio.open_memory_channel[int](math.inf)
    async with trio.open_nursery() as n:
        await client(srv, n, exp, 24, tx)
        await trio.sleep(0.5)  # the client would have sent everything by now
        assert exp.started == 4  # 4 x (1 MiB + overhead) reach the bound: the 5th is not read
        assert srv.held <= 4 * MiB + 4 * 4096
        exp.go.set()
        with trio.fail_after(10):
            replies = [await rx.receive() for _ in range(24)]
        n.cancel_scope.cancel()
    assert sorted(replies) == list(range(24))
    assert srv.held == 0


async def test_all_connections_together_are_bounded():
    exp = SlowExport()
    srv = NBDServer(StaticCatalog({"vv1": exp}), max_inflight=6 * MiB, max_inflight_per_connection=4 * MiB)
    tx, rx = trio.open_memory_channel[int](math.inf)
    async with trio.open_nursery() as n:
        for _ in range(3):
            await client(srv, n, exp, 10, tx)
        await trio.sleep(0.5)
        # Writes are held from their header on and their payloads as they arrive, never further
        # than the 6 MiB go (beyond: what each connection has already read from its socket, at
        # most 64 KiB): some run, the payloads of others wait half received, nothing more is read.
        assert 4 <= exp.started <= 6
        assert srv.held <= 6 * MiB + 3 * (64 * 1024 + 4096)
        assert sum(1 for c in srv.live if c.held) >= 2  # not all of it taken by one connection
        exp.go.set()
        with trio.fail_after(10):
            for _ in range(30):
                await rx.receive()
        n.cancel_scope.cancel()
    assert srv.held == 0


async def test_a_client_that_leaves_gives_back_what_it_held():
    exp = SlowExport()
    srv = NBDServer(StaticCatalog({"vv1": exp}), max_inflight=8 * MiB, max_inflight_per_connection=8 * MiB)
    a, b = socket.socketpair()
    a.setblocking(False)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(srv._handle_sock, a, ClientIdentity(""))
            c = RawClient(trio.socket.from_stdlib_socket(b))
            await go(c)
            for i in range(3):
                await sendall(c.s, p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, i, 0, MiB) + bytes(MiB))
            await exp.wait_started(3)
            assert srv.held > 3 * MiB
            c.s.close()
        # The nursery waited for the connection's handler to return: the server let go of it.
    assert not srv.live
    assert srv.held == 0


def raw_client(srv, nursery) -> RawClient:
    a, b = socket.socketpair()
    a.setblocking(False)
    nursery.start_soon(srv._handle_sock, a, ClientIdentity(""))
    return RawClient(trio.socket.from_stdlib_socket(b))


def write_req(cookie: int) -> bytes:
    return p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, cookie, 0, MiB) + bytes(MiB)


async def test_drain_waits_for_the_requests_in_flight_and_no_longer():
    exp = SlowExport()
    srv = NBDServer(StaticCatalog({"vv1": exp}))
    drained = trio.Event()

    async def drain():
        await srv.drain()
        drained.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            c = raw_client(srv, n)
            await go(c)
            await sendall(c.s, write_req(1) + write_req(2))
            await exp.wait_started(2)
            n.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            assert not drained.is_set()  # both writes are still running
            exp.go.set()
            await drained.wait()  # the connection is still open: its requests finished
            assert sorted([p.SHDR.unpack(await c.recv(20))[3] for _ in range(2)]) == [1, 2]
            n.cancel_scope.cancel()



async def test_a_client_that_disconnects_gets_every_reply_before_the_close():
    exp = SlowExport()
    srv = NBDServer(StaticCatalog({"vv1": exp}))
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            c = raw_client(srv, n)
            await go(c)
            # Replies of 4 MiB of reads that the client does not read yet: the server's sender is
            # stuck in the socket with replies still queued behind it when the write completes.
            reads = b"".join(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 10 + i, 0, MiB) for i in range(4))
            await sendall(c.s, reads + write_req(1) + p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 99, 0, 0))
            await exp.wait_started(1)
            await trio.testing.wait_all_tasks_blocked()
            exp.go.set()
            await trio.testing.wait_all_tasks_blocked()
            got = []
            for _ in range(5):
                _, _, typ, cookie, ln = p.SHDR.unpack(await c.recv(20))
                await c.recv(ln)
                got.append(cookie)
            with pytest.raises(EOFError):
                await c.recv(1)
    assert sorted(got) == [1, 10, 11, 12, 13]
