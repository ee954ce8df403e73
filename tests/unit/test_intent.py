"""The write-intent log: durable marks before writes, lazy clearing, what a restart finds."""

from __future__ import annotations

import trio

from syncd.intent import IntentLog

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

    from syncd.intent import MAGIC, VERSION
    from syncd.state import StateError

    p = tmp_path / "intent-1-1"
    newer = struct.pack(">8sIIQ", MAGIC, VERSION + 1, REGION, SIZE // REGION) + b"\xff" * 100
    p.write_bytes(newer)
    with pytest.raises(StateError, match=f"format {VERSION + 1}, newer than this syncd reads"):
        IntentLog(str(p), SIZE, REGION)
    assert p.read_bytes() == newer
