"""The write-intent log: durable marks before writes, lazy clearing, what a restart finds."""

from __future__ import annotations

import trio

from syncd.node.intent import IntentLog

REGION = 256 << 10
SIZE = 64 << 20


async def test_marks_are_durable_and_survive_a_crash(tmp_path):
    p = str(tmp_path / "intent-1-1")
    log = IntentLog(p, SIZE, REGION)
    assert not log.trusted and "missing" in log.problem  # first start: nothing to trust yet
    assert not log.ready(0, 4096)
    await log.mark(REGION * 3 + 100, 2 * REGION)  # spans regions 3-5
    assert log.ready(REGION * 3, 4096) and log.ready(REGION * 5, 4096) and not log.ready(REGION * 6, 1)
    # A crash now (no close, no clear): the next start finds exactly those regions.
    again = IntentLog(p, SIZE, REGION)
    assert again.trusted and again.loaded_regions() == [3, 4, 5]


async def test_concurrent_marks_share_syncs_and_all_become_durable(tmp_path):
    log = IntentLog(str(tmp_path / "i"), SIZE, REGION)
    async with trio.open_nursery() as n:
        for r in range(0, 64, 3):
            n.start_soon(log.mark, r * REGION, 4096)
    assert all(log.ready(r * REGION, 1) for r in range(0, 64, 3))
    assert IntentLog(str(tmp_path / "i"), SIZE, REGION).loaded_regions() == list(range(0, 64, 3))


async def test_idle_regions_are_cleared_unless_kept(tmp_path):
    log = IntentLog(str(tmp_path / "i"), SIZE, REGION)
    for r in (1, 2, 3):
        await log.mark(r * REGION, 1)
    log.last[1] -= 100  # idle for long
    log.last[2] -= 100  # idle, but kept (dirty: the peer lacks it)
    assert await log.clear_idle(10.0, keep=lambda r: r == 2) == 1
    assert not log.ready(REGION, 1) and log.ready(2 * REGION, 1) and log.ready(3 * REGION, 1)
    assert IntentLog(str(tmp_path / "i"), SIZE, REGION).loaded_regions() == [2, 3]


def test_a_log_of_another_volume_is_not_trusted(tmp_path):
    p = str(tmp_path / "i")
    IntentLog(p, SIZE, REGION).set_sync([7])
    other = IntentLog(p, SIZE * 2, REGION)  # the volume grew: the bitmap does not describe it
    assert not other.trusted and "does not match" in other.problem
    with open(p, "r+b") as f:  # a torn or foreign file
        f.truncate(10)
    assert not IntentLog(p, SIZE * 2, REGION).trusted


def test_reset_keeps_only_what_is_asked(tmp_path):
    p = str(tmp_path / "i")
    log = IntentLog(p, SIZE, REGION)
    log.set_sync([1, 2, 3, 4])
    log.reset_sync(lambda r: r in (2, 4))
    assert IntentLog(p, SIZE, REGION).loaded_regions() == [2, 4]


def test_a_log_of_a_newer_format_is_refused_and_left_alone(tmp_path):
    import struct

    import pytest

    from syncd.node.intent import MAGIC, VERSION
    from syncd.node.state import StateError

    p = tmp_path / "intent-1-1"
    newer = struct.pack(">8sIIQ", MAGIC, VERSION + 1, REGION, SIZE // REGION) + b"\xff" * 100
    p.write_bytes(newer)
    with pytest.raises(StateError, match=f"format {VERSION + 1}, newer than this syncd reads"):
        IntentLog(str(p), SIZE, REGION)
    assert p.read_bytes() == newer


def test_set_bits_finds_every_bit_below_the_limit():
    from hypothesis import given
    from hypothesis import strategies as st

    from syncd.node.intent import set_bits

    @given(st.sets(st.integers(0, 80_000), max_size=40), st.integers(0, 80_001))
    def check(bits, limit):
        buf = bytearray(10_001)
        for r in bits:
            buf[r >> 3] |= 1 << (r & 7)
        assert list(set_bits(buf, limit)) == sorted(r for r in bits if r < limit)

    check()


async def test_a_multi_tib_log_keeps_per_region_state_only_for_marked_regions(tmp_path):
    """4 TiB in 256 KiB regions: a 2 MiB bitmap, but no per-region table of that size."""
    log = IntentLog(str(tmp_path / "big"), 4 << 40, REGION)
    assert log.nregions == 16 << 20
    for r in (0, 5_000_000, log.nregions - 1):
        await log.mark(r * REGION, 4096)
    assert log.marked_regions() == [0, 5_000_000, log.nregions - 1] and log.count() == 3
    assert len(log.last) == 3
    log.last[5_000_000] -= 100
    assert await log.clear_idle(10.0, keep=lambda r: False) == 1
    assert log.marked_regions() == [0, log.nregions - 1] and len(log.last) == 2
