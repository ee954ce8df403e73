"""The lab relay's delay line: a chunk never leaves before its arrival + the delay, chunks are
relayed in order and whole, and a connection's timer survives cancellation (no stale expiry
releases a later chunk early), and a lone chunk's last moments are polled, not slept. How late it
leaves is measured in bench/ (--distance), not here."""

from __future__ import annotations

import time

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


async def test_while_the_clock_polls_the_relays_other_tasks_go_on() -> None:
    clock = DelayClock()
    passes = 0
    polled = trio.Event()

    async def other() -> None:
        nonlocal passes
        while not polled.is_set():
            passes += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(other)
            deadline = time.monotonic() + 0.02
            await clock.sleep_until(deadline, spin=0.02)  # polls the whole time
            assert time.monotonic() >= deadline
            polled.set()
    finally:
        clock.close()
    assert passes > 10


async def test_only_a_chunk_with_none_queued_behind_it_is_awaited_polling(monkeypatch) -> None:
    """Three chunks 1 ms apart on a 50 ms delay: the first is alone when its wait begins, the
    second has the third behind it, the third is alone again."""
    spins: list[float] = []

    class Recording(DelayClock):
        async def sleep_until(self, deadline: float, spin: float = 0.0) -> None:
            spins.append(spin)
            await super().sleep_until(deadline, spin)

    monkeypatch.setattr(relay_mod, "DelayClock", Recording)
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


async def test_what_a_side_sent_before_it_closed_goes_through_then_the_end_of_stream() -> None:
    """A peer's last answer before it closes (the link's security refusal, sent just before
    its end of stream) is relayed whole, then the end of stream; the connection's other
    direction is not torn down with it. (CI: the relay dropped queued bytes when the end of
    stream came with them, so a dialer saw a reset instead of the refusal.)"""
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
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
    assert got == b"SYNCDNO!authentication failed\n"
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


async def test_without_delay_chunks_go_straight_through_but_never_ahead_of_one_held() -> None:
    """A chunk waiting out a delay that is then set to 0 still leaves before the chunks that
    come after it (which no longer wait); with nothing held, chunks are sent as they come."""
    relay = Relay(("127.0.0.1", 0), ("127.0.0.1", 0))
    relay.delay = 0.05
    src, src_relay = trio.testing.memory_stream_pair()
    dst_relay, dst = trio.testing.memory_stream_pair()

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
        t0 = time.monotonic()
        await src.send_all(b"straight")
        assert await take(8) == b"straight"
        assert time.monotonic() - t0 < 0.05
        n.cancel_scope.cancel()
    assert relay.bytes == 16
