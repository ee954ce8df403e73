"""netio's inline sends: what the kernel does not take is handed back whole and in order, and
output queued in a batch is flushed when the batch ends (nested batches: the outer one)."""

import array
import socket
import ssl

import pytest
import trio

from syncd import netio


def test_send_available_returns_exactly_what_the_kernel_did_not_take():
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = [bytes([i]) * 100_000 for i in range(5)] + [b"", memoryview(b"tail")]
    sent, left = netio.send_available(a, data)
    whole = b"".join(bytes(x) for x in data)
    assert 0 < sent < len(whole) and left
    assert sent + sum(v.nbytes for v in left) == len(whole)
    assert b"".join(bytes(v) for v in left) == whole[sent:]
    a.close()
    b.close()


def test_send_available_many_buffers_and_wide_views():
    """Over IOV_MAX buffers take several calls; a view of 4-byte items counts its bytes."""
    a, b = socket.socketpair()
    a.setblocking(False)
    wide = memoryview(array.array("I", range(1000)))
    data = [bytes([i % 251]) * 7 for i in range(netio.IOV_MAX + 3)] + [wide, b""]
    whole = b"".join(bytes(x) for x in data)
    sent, left = netio.send_available(a, data)
    assert (sent, left) == (len(whole), [])
    got = b""
    while len(got) < len(whole):
        got += b.recv(1 << 20)
    assert got == whole
    assert netio.send_available(a, [b"", b""]) == (0, [])
    a.close()
    b.close()


def test_send_available_on_a_dead_socket_leaves_everything_unsent():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.close()
    a.shutdown(socket.SHUT_WR)
    sent, left = netio.send_available(a, [b"x" * 10, b"y"])
    assert sent == 0 and b"".join(bytes(v) for v in left) == b"x" * 10 + b"y"
    a.close()


class Box:
    def __init__(self):
        self.flush_queued = False
        self.flushes = 0

    def flush_inline(self):
        self.flushes += 1


def test_output_queued_in_a_batch_is_flushed_once_when_the_outer_batch_ends():
    box, other = Box(), Box()
    assert not netio.defer(box)  # no batch: the caller wakes its sender task
    outer = netio.batch_begin()
    try:
        assert netio.defer(box) and netio.defer(box)
        inner = netio.batch_begin()
        assert netio.defer(other)
        netio.batch_end(inner)
        assert box.flushes == other.flushes == 0  # the inner end is not the end of the batch
    finally:
        netio.batch_end(outer)
    assert box.flushes == other.flushes == 1
    assert not box.flush_queued and not netio.defer(box)


def test_work_after_the_sends_runs_once_the_outer_batch_flushed_and_only_once_per_batch(monkeypatch):
    monkeypatch.setattr(netio, "_batch", netio._Batch())
    order: list[str] = []

    class Logged(Box):
        def flush_inline(self):
            super().flush_inline()
            order.append("flush")

    box = Logged()
    assert not netio.after_sends(lambda: order.append("x"))  # no batch: the caller runs it
    outer = netio.batch_begin()
    try:
        assert netio.defer(box)
        inner = netio.batch_begin()
        assert netio.after_sends(lambda: order.append("first"))
        assert not netio.after_sends(lambda: order.append("second"))  # one per batch
        netio.batch_end(inner)
        assert order == []
    finally:
        netio.batch_end(outer)
    assert order == ["flush", "first"]
    outer = netio.batch_begin()  # a new batch may defer again
    assert netio.after_sends(lambda: order.append("next"))
    netio.batch_end(outer)
    assert order == ["flush", "first", "next"]


def test_work_after_the_sends_that_raises_is_reported_and_leaves_the_next_batch_free(monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(netio, "_batch", netio._Batch())

    def bad():
        raise ValueError("boom")

    was = netio.batch_begin()
    assert netio.after_sends(bad)
    try:
        netio.batch_end(was)
    except ValueError as e:
        assert str(e) == "boom"
    else:
        raise AssertionError("the error was swallowed")
    assert netio._batch.after is None and not netio._batch.active
    was = netio.batch_begin()
    assert netio.after_sends(lambda: ran.append("next"))
    netio.batch_end(was)
    assert ran == ["next"]


def test_work_after_the_sends_runs_outside_the_batch(monkeypatch):
    """What it queues goes by the sender tasks (the batch's flush already ran)."""
    monkeypatch.setattr(netio, "_batch", netio._Batch())
    box, seen = Box(), []
    was = netio.batch_begin()
    assert netio.after_sends(lambda: seen.append(netio.defer(box)))
    netio.batch_end(was)
    assert seen == [False] and not box.flush_queued


def test_work_after_the_sends_runs_even_when_a_flush_raises(monkeypatch):
    """Found by review: a flush that raised left the deferred local write (and the range it
    holds) waiting for some later batch."""
    monkeypatch.setattr(netio, "_batch", netio._Batch())

    class Broken(Box):
        def flush_inline(self):
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")

    ran: list[int] = []
    was = netio.batch_begin()
    assert netio.defer(Broken())
    assert netio.after_sends(lambda: ran.append(1))
    with pytest.raises(OSError):
        netio.batch_end(was)
    assert ran == [1] and netio._batch.after is None and not netio._batch.active


def test_pacer_asks_for_a_yield_after_every_run_of_operations_that_did_not_block():
    pacer = netio.Pacer(every=4)
    assert [pacer.due(False) for _ in range(8)] == [False, False, False, True] * 2
    assert [pacer.due(False) for _ in range(2)] == [False, False]
    assert not pacer.due(True)  # blocked: it yielded anyway, the count starts again
    assert [pacer.due(False) for _ in range(4)] == [False, False, False, True]


def test_a_probe_asks_only_after_a_receive_that_drained_the_socket_and_sees_data_and_close():
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        probe = netio.Probe(a)
        assert not probe.empty()  # nothing received yet: receive (and meet EAGAIN) as before
        b.send(b"x" * 10)
        assert a.recv(100) == b"x" * 10
        probe.drained = True  # less than asked for: very likely drained
        assert probe.empty()
        b.send(b"y")
        assert not probe.empty()  # something came: receive it
        assert a.recv(100) == b"y"
        assert probe.empty()
        b.close()
        assert not probe.empty()  # the peer's close is news too: the receive returns b""
        assert a.recv(100) == b""
    finally:
        a.close()
        if b.fileno() >= 0:
            b.close()


def test_recv_with_a_probe_waits_without_a_failing_receive_and_marks_what_it_drained(monkeypatch):
    a, b = socket.socketpair()
    a.setblocking(False)
    calls = []
    real = socket.socket.recv

    class Counting(socket.socket):
        def recv(self, n, *args):
            try:
                data = real(self, n, *args)
            except BlockingIOError:
                calls.append("EAGAIN")
                raise
            calls.append(len(data))
            return data

    s = Counting(fileno=a.detach())
    s.setblocking(False)
    probe = netio.Probe(s)
    got = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            async def later() -> None:
                await trio.sleep(0.05)
                b.send(b"second")

            b.send(b"first")
            got.append(await netio.recv(s, 100, probe=probe))
            assert probe.drained
            n.start_soon(later)
            got.append(await netio.recv(s, 100, probe=probe))  # waits: no failing receive
            b.send(b"z" * 300)
            got.append(await netio.recv(s, 100, probe=probe))  # a full buffer: not drained
            assert not probe.drained
            got.append(await netio.recv(s, 100, probe=probe))

    try:
        trio.run(main)
    finally:
        s.close()
        b.close()
    assert got == [b"first", b"second", b"z" * 100, b"z" * 100]
    assert calls == [5, 6, 100, 100]  # no receive raised EAGAIN: the probe asked instead
