"""The lab relay's delay line: a chunk never leaves before its arrival + the delay, chunks are
relayed in order and whole, and a connection's timer survives cancellation (no stale expiry
releases a later chunk early), and a lone chunk's last moments are polled, not slept. How late it
leaves is measured in bench/ (--distance), not here."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from syncd.lab import relay as relay_mod
from syncd.lab.relay import DelayClock, Relay


async def test_delay_clock_never_wakes_before_its_deadline() -> None:
    clock = DelayClock()
    try:
        for step in (0.0003, -0.001, 0.001, 0.0, 0.002):
            deadline = time.monotonic() + step
            await clock.sleep_until(deadline)
            assert time.monotonic() >= deadline
        # cancelled while the timer is armed: the timer fires later, unread; the next sleep must
        # not take that stale expiry for its own
        with trio.move_on_after(0.001):
            await clock.sleep_until(time.monotonic() + 0.003)
        await trio.sleep(0.005)
        deadline = time.monotonic() + 0.004
        await clock.sleep_until(deadline)
        assert time.monotonic() >= deadline
        # polling the last part, or all of it (a spin longer than the wait), or a deadline passed
        for step, spin in ((0.003, 0.001), (0.001, 0.01), (-0.001, 0.001)):
            deadline = time.monotonic() + step
            await clock.sleep_until(deadline, spin)
            assert time.monotonic() >= deadline
    finally:
        clock.close()


class IoWaits(trio.abc.Instrument):
    """The timeouts trio's loop waits for I/O with (0: a poll; more: a sleep)."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def before_io_wait(self, timeout: float) -> None:
        self.timeouts.append(timeout)


async def test_the_clock_polls_the_last_spin_seconds_and_sleeps_before() -> None:
    """With a spin as long as the wait, the loop only polls (every wait for I/O has timeout 0,
    so the relay's other tasks run between); without one, it sleeps in epoll until the timer."""
    clock = DelayClock()
    waits = IoWaits()
    trio.lowlevel.add_instrument(waits)
    try:
        deadline = time.monotonic() + 0.02
        await clock.sleep_until(deadline, spin=0.02)
        assert time.monotonic() >= deadline
        polled, waits.timeouts = waits.timeouts, []
        deadline = time.monotonic() + 0.02
        await clock.sleep_until(deadline, spin=0.005)
        assert time.monotonic() >= deadline
        mixed, waits.timeouts = waits.timeouts, []
        await clock.sleep_until(time.monotonic() + 0.02)
        slept = waits.timeouts
    finally:
        trio.lowlevel.remove_instrument(waits)
        clock.close()
    assert len(polled) > 10 and max(polled) == 0
    assert max(mixed) > 0 and mixed.count(0) > 5  # slept to 5 ms before, then polled
    assert max(slept) > 0 and slept.count(0) < 3  # slept to the deadline


def recording_clock(spins: list, tag: int | None = None) -> type:
    """A DelayClock that notes the spin of every wait in ``spins`` (as ``(tag, spin)`` with a tag)."""

    class Recording(DelayClock):
        async def sleep_until(self, deadline: float, spin: float = 0.0) -> None:
            spins.append(spin if tag is None else (tag, spin))
            await super().sleep_until(deadline, spin)

    return Recording


async def test_only_a_chunk_with_none_queued_behind_it_is_awaited_polling(monkeypatch) -> None:
    """Three chunks 1 ms apart on a 50 ms delay: the first is alone when its wait begins, the
    second has the third behind it, the third is alone again."""
    spins: list = []
    monkeypatch.setattr(relay_mod, "DelayClock", recording_clock(spins))
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    relay.delay = 0.05
    src, src_relay = trio.testing.memory_stream_pair()
    dst_relay, dst = trio.testing.memory_stream_pair()
    buf = b""
    async with trio.open_nursery() as n:
        n.start_soon(relay._pump, src_relay, dst_relay, trio.CancelScope())
        for i in range(3):
            await src.send_all(bytes([i]) * 10)
            await trio.sleep(0.001)
        with trio.fail_after(10):
            while len(buf) < 30:
                buf += await dst.receive_some()
        n.cancel_scope.cancel()
    assert buf == bytes(10) + bytes([1]) * 10 + bytes([2]) * 10
    assert spins == [relay_mod.SPIN, 0.0, relay_mod.SPIN]


async def test_a_chunk_is_not_polled_for_while_another_line_holds_one(monkeypatch) -> None:
    """Two connections' lines (a queue of requests in flight: one line holds a request while the
    other holds an answer): neither polls, though each chunk is alone in its own line; once the
    first line is empty again, the second line's next chunk is alone everywhere and polls."""
    spins: list = []

    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    relay.delay = 0.05
    ends = []
    async with trio.open_nursery() as n:
        for tag in (1, 2):
            monkeypatch.setattr(relay_mod, "DelayClock", recording_clock(spins, tag))
            src, src_relay = trio.testing.memory_stream_pair()
            dst_relay, dst = trio.testing.memory_stream_pair()
            n.start_soon(relay._pump, src_relay, dst_relay, trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()  # its clock made before the next patch
            ends.append((src, dst))
        (src1, dst1), (src2, dst2) = ends
        await src1.send_all(b"a")
        await trio.sleep(0.002)
        await src2.send_all(b"b")  # while line 1 holds "a"
        with trio.fail_after(10):
            assert await dst1.receive_some() == b"a"
            assert await dst2.receive_some() == b"b"
        await src2.send_all(b"c")  # nothing else anywhere
        with trio.fail_after(10):
            assert await dst2.receive_some() == b"c"
        n.cancel_scope.cancel()
    assert spins == [(1, relay_mod.SPIN), (2, 0.0), (2, relay_mod.SPIN)]
    assert not relay_mod._LINES  # the lines left with their connections


async def test_delayed_relay_forwards_every_chunk_in_order_and_not_before_its_time() -> None:
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    relay.delay = 0.002  # one way: a 4 ms round trip
    src_client, src_relay = trio.testing.memory_stream_pair()
    dst_relay, dst_server = trio.testing.memory_stream_pair()
    sent_at: list[float] = []
    got: list[tuple[float, bytes]] = []
    done = trio.Event()
    async with trio.open_nursery() as n:
        cs = trio.CancelScope()
        n.start_soon(relay._pump, src_relay, dst_relay, cs)

        async def reader() -> None:
            buf = b""
            while len(buf) < 10 * 100:
                data = await dst_server.receive_some()
                buf += data
                got.append((time.monotonic(), data))
            assert buf == b"".join(bytes([i]) * 100 for i in range(10))
            done.set()

        n.start_soon(reader)
        for i in range(10):
            sent_at.append(time.monotonic())
            await src_client.send_all(bytes([i]) * 100)
            await trio.sleep(0.0005)
        with trio.fail_after(10):
            await done.wait()
        n.cancel_scope.cancel()
    # the first byte of each chunk leaves at its arrival + the delay, not before
    arrivals: list[float] = []
    for t, data in got:
        arrivals += [t] * len(data)
    for i, t0 in enumerate(sent_at):
        assert arrivals[i * 100] >= t0 + relay.delay
    assert relay.bytes == 1000


@pytest.mark.parametrize("delay", [0.0, 0.01])
async def test_what_a_side_sent_before_it_closed_goes_through_then_the_end_of_stream(delay: float,
                                                                                    monkeypatch) -> None:
    """A peer's last answer before it closes (the link's security refusal, sent just before
    its end of stream) is relayed whole, then the end of stream; the connection's other
    direction is not torn down with it. (CI: the relay dropped queued bytes when the end of
    stream came with them, so a dialer saw a reset instead of the refusal. With a delay, the
    review of round 13: when the sender woke late for the last chunk, the end of stream was due
    too and was coalesced into it, a TypeError ended the connection and the refusal was lost.)"""

    class LateClock(DelayClock):  # wakes 5 ms after the deadline, as a busy machine may
        async def sleep_until(self, deadline: float, spin: float = 0.0) -> None:
            await super().sleep_until(deadline + 0.005, spin)

    monkeypatch.setattr(relay_mod, "DelayClock", LateClock)
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    relay.delay = delay
    closing, closing_relay = trio.testing.memory_stream_pair()
    other_relay, other = trio.testing.memory_stream_pair()
    cs = trio.CancelScope()
    got = b""
    async with trio.open_nursery() as n:
        n.start_soon(relay._pump, closing_relay, other_relay, cs)
        await closing.send_all(b"SYNCDNO!authentication failed\n")
        await closing.send_eof()
        with trio.fail_after(5):
            while data := await other.receive_some():
                got += data
    assert got == b"SYNCDNO!authentication failed\n" and relay.bytes == len(got)
    assert not cs.cancel_called  # the other direction goes on until it ends too


async def test_a_failed_direction_ends_the_whole_connection() -> None:
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    src, src_relay = trio.testing.memory_stream_pair()
    dst_relay, dst = trio.testing.memory_stream_pair()
    cs = trio.CancelScope()
    await dst.aclose()  # the far end is gone: sending to it fails
    failed = []

    async def pump() -> None:
        try:
            await relay._pump(src_relay, dst_relay, cs)
        except* trio.BrokenResourceError:  # raised on to the connection, which closes both ends
            failed.append(True)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(pump)
            await src.send_all(b"x")
    assert failed and cs.cancel_called


class Senders(trio.abc.SendStream):
    """A send stream that notes which task sent each chunk."""

    def __init__(self, inner: trio.abc.SendStream) -> None:
        self.inner, self.by = inner, []

    async def send_all(self, data) -> None:
        self.by.append(trio.lowlevel.current_task().name.rsplit(".", 1)[-1])
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_without_delay_chunks_go_straight_through_but_never_ahead_of_one_held() -> None:
    """A chunk waiting out a delay that is then set to 0 still leaves before the chunks that
    come after it (which no longer wait, and go from the receiving task once nothing is held);
    with nothing held, chunks are sent by the task that received them."""
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    relay.delay = 0.05
    src, src_relay = trio.testing.memory_stream_pair()
    inner, dst = trio.testing.memory_stream_pair()
    dst_relay = Senders(inner)

    async def take(n: int) -> bytes:
        buf = b""
        with trio.fail_after(10):
            while len(buf) < n:
                buf += await dst.receive_some()
        return buf

    async with trio.open_nursery() as n:
        n.start_soon(relay._pump, src_relay, dst_relay, trio.CancelScope())
        await src.send_all(b"held")
        await trio.testing.wait_all_tasks_blocked()  # the sender holds it, waiting out 50 ms
        relay.delay = 0.0
        await src.send_all(b"next")
        assert await take(8) == b"heldnext"
        await trio.testing.wait_all_tasks_blocked()
        for word in (b"straight", b"through!"):
            await src.send_all(word)
            assert await take(8) == word
        n.cancel_scope.cancel()
    assert relay.bytes == 24
    # "held" waited in the sender, "next" queued behind it; then the receiving task (_pump) sends
    assert dst_relay.by[:1] == ["sender"] and dst_relay.by[-2:] == ["_pump", "_pump"]
