"""The write-intent log: durable marks before writes, lazy clearing only of data made durable,
what a restart finds."""

from __future__ import annotations

import pytest
import trio

from syncd.node.intent import IntentLog, set_bits
from syncd.node.volume import Volume

REGION = 256 << 10
SIZE = 64 << 20


class Disk(Volume):
    """The volume under a log: a real file, flushed for real (fdatasync); ``during`` runs as a
    flush starts (a write arriving meanwhile, a role change...)."""

    during = None
    flushes = 0

    async def flush(self) -> None:
        if self.during is not None:
            self.during()
        await super().flush()
        self.flushes += 1


@pytest.fixture
def disk(tmp_path):
    d = Disk("vv1", str(tmp_path / "vol"), size=1 << 20)
    yield d
    d.close()


def open_log(path, disk: Disk, size: int = SIZE) -> IntentLog:
    return IntentLog(str(path), size, REGION, volume=disk)


def on_disk(path) -> list[int]:
    """The regions set in the log file as it is now (synced or not)."""
    with open(path, "rb") as f:
        data = f.read()
    return list(set_bits(data[24:], (len(data) - 24) * 8))


async def test_marks_are_durable_and_survive_a_crash(tmp_path, disk):
    p = str(tmp_path / "intent-1-1")
    log = open_log(p, disk)
    assert not log.trusted and "missing" in log.problem  # first start: nothing to trust yet
    assert not log.ready(0, 4096)
    await log.mark(REGION * 3 + 100, 2 * REGION)  # spans regions 3-5
    assert log.ready(REGION * 3, 4096) and log.ready(REGION * 5, 4096) and not log.ready(REGION * 6, 1)
    # A crash now (no close, no clear): the next start finds exactly those regions.
    again = open_log(p, disk)
    assert again.trusted and again.loaded_regions() == [3, 4, 5]


async def test_concurrent_marks_share_syncs_and_all_become_durable(tmp_path, disk):
    log = open_log(tmp_path / "i", disk)
    async with trio.open_nursery() as n:
        for r in range(0, 64, 3):
            n.start_soon(log.mark, r * REGION, 4096)
    assert all(log.ready(r * REGION, 1) for r in range(0, 64, 3))
    assert open_log(tmp_path / "i", disk).loaded_regions() == list(range(0, 64, 3))


async def test_idle_regions_are_cleared_unless_kept(tmp_path, disk):
    log = open_log(tmp_path / "i", disk)
    for r in (1, 2, 3):
        await log.mark(r * REGION, 1)
    log.last[1] -= 100  # idle for long
    log.last[2] -= 100  # idle, but kept (dirty: the peer lacks it)
    assert await log.clear_idle(10.0, keep=lambda r: r == 2) == 1
    assert not log.ready(REGION, 1) and log.ready(2 * REGION, 1) and log.ready(3 * REGION, 1)
    assert open_log(tmp_path / "i", disk).loaded_regions() == [2, 3]
    assert disk.flushes == 1


async def test_a_bit_is_cleared_only_once_the_volume_data_it_covers_is_durable(tmp_path, disk):
    """The volume is synced before the cleared bitmap is written: while the sync runs, the log
    file still has the bit set (a power cut then costs a comparison, never a silent difference)."""
    p = tmp_path / "i"
    log = open_log(p, disk)
    for r in (1, 2):
        await log.mark(r * REGION, 4096)
        log.last[r] -= 100
    seen = []
    disk.during = lambda: seen.append((on_disk(p), log.marked_regions()))
    assert await log.clear_idle(10.0, keep=lambda r: False) == 2
    assert seen == [([1, 2], [1, 2])] and disk.flushes == 1
    assert on_disk(p) == [] and open_log(p, disk).loaded_regions() == []


async def test_one_sync_per_pass_and_none_without_idle_regions(tmp_path, disk):
    log = open_log(tmp_path / "i", disk)
    for r in range(8):
        await log.mark(r * REGION, 4096)
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0  # all written just now
    assert disk.flushes == 0
    for r in range(8):
        log.last[r] -= 100
    assert await log.clear_idle(10.0, keep=lambda r: False) == 8
    assert disk.flushes == 1  # one volume sync covers every region cleared in the pass
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0 and disk.flushes == 1


async def test_a_region_written_while_the_volume_syncs_keeps_its_bit(tmp_path, disk):
    """A write that arrives after the sync began may not be covered by it: its region stays
    marked (the next pass clears it once it is idle and synced)."""
    p = tmp_path / "i"
    log = open_log(p, disk)
    for r in (1, 2):
        await log.mark(r * REGION, 4096)
        log.last[r] -= 100
    disk.during = lambda: log.ready(2 * REGION + 512, 4096)  # a write to region 2, bit durable: no mark
    assert await log.clear_idle(10.0, keep=lambda r: False) == 1
    assert log.marked_regions() == [2] and on_disk(p) == [2]


async def test_a_region_kept_while_the_volume_syncs_keeps_its_bit(tmp_path, disk):
    """``keep`` is asked again after the sync: a region that became dirty meanwhile (a role
    change, a peer reported missing it) stays marked."""
    log = open_log(tmp_path / "i", disk)
    await log.mark(REGION, 4096)
    log.last[1] -= 100
    dirty = set()
    disk.during = lambda: dirty.add(1)
    assert await log.clear_idle(10.0, keep=dirty.__contains__) == 0
    assert log.marked_regions() == [1]


async def test_a_host_flush_after_the_last_write_spares_the_clear_pass_its_own(tmp_path, disk):
    """A flush that began once every write to the idle regions was applied (their last write +
    hold) already made them durable: the pass clears them without another fdatasync."""
    log = open_log(tmp_path / "i", disk)
    for r in (1, 2):
        await log.mark(r * REGION, 4096)
        log.last[r] -= 100
    await disk.flush()  # a host's FLUSH, 90 s after the regions' last writes were applied
    assert await log.clear_idle(10.0, keep=lambda r: False) == 2
    assert disk.flushes == 1 and log.data_syncs == 0
    # Region 3 written 95 s ago, the latest flush began 100 s ago: it needs a flush of its own.
    await log.mark(3 * REGION, 4096)
    log.last[3] -= 95
    disk.flushed_from -= 100
    assert await log.clear_idle(10.0, keep=lambda r: False) == 1
    assert disk.flushes == 2 and log.data_syncs == 1


async def test_idle_regions_wait_a_while_for_a_host_flush_before_the_pass_flushes_itself(tmp_path, disk):
    """Idle just past hold (12 s, hold 10), a region waits up to flush_wait (5 s) for a host's
    flush: cleared without an extra sync once one comes; flushed by the pass once it waited
    longer."""
    log = open_log(tmp_path / "i", disk)
    for r in (1, 2):
        await log.mark(r * REGION, 4096)
        log.last[r] -= 12
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0
    assert disk.flushes == 0 and log.marked_regions() == [1, 2]
    await disk.flush()  # the host flushes
    assert await log.clear_idle(10.0, keep=lambda r: False) == 2
    assert disk.flushes == 1 and log.data_syncs == 0
    # Region 3 written 14 s ago; the host's last flush was 100 s ago, and none comes: the pass
    # flushes once the region waited 5 s past hold.
    await log.mark(3 * REGION, 4096)
    log.last[3] -= 14
    disk.flushed_from -= 100
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0 and log.data_syncs == 0
    log.last[3] -= 2
    assert await log.clear_idle(10.0, keep=lambda r: False) == 1 and log.data_syncs == 1


async def test_a_failed_volume_flush_clears_nothing_and_ends_clearing(tmp_path, disk):
    """After a failed fdatasync a later one may wrongly succeed (the kernel reports an error
    once): the log keeps every bit until the node restarts."""
    p = tmp_path / "i"
    log = open_log(p, disk)
    await log.mark(REGION, 4096)
    log.last[1] -= 100
    fd, disk.fd = disk.fd, 999_999  # the device is gone: fdatasync fails (EBADF)
    with pytest.raises(OSError):
        await log.clear_idle(10.0, keep=lambda r: False)
    assert log.marked_regions() == [1] and on_disk(p) == [1] and disk.flush_failed
    disk.fd = fd
    await disk.flush()  # succeeds, but proves nothing any more
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0
    assert on_disk(p) == [1]


def test_a_log_of_another_volume_is_not_trusted(tmp_path, disk):
    p = str(tmp_path / "i")
    open_log(p, disk).set_sync([7])
    other = open_log(p, disk, SIZE * 2)  # the volume grew: the bitmap does not describe it
    assert not other.trusted and "does not match" in other.problem
    with open(p, "r+b") as f:  # a torn or foreign file
        f.truncate(10)
    assert not open_log(p, disk, SIZE * 2).trusted


def test_reset_keeps_only_what_is_asked(tmp_path, disk):
    p = str(tmp_path / "i")
    log = open_log(p, disk)
    log.set_sync([1, 2, 3, 4])
    log.reset_sync(lambda r: r in (2, 4))
    assert open_log(p, disk).loaded_regions() == [2, 4]


def test_a_log_of_a_newer_format_is_refused_and_left_alone(tmp_path, disk):
    import struct

    import pytest

    from syncd.node.intent import MAGIC, VERSION
    from syncd.node.state import StateError

    p = tmp_path / "intent-1-1"
    newer = struct.pack(">8sIIQ", MAGIC, VERSION + 1, REGION, SIZE // REGION) + b"\xff" * 100
    p.write_bytes(newer)
    with pytest.raises(StateError, match=f"format {VERSION + 1}, newer than this syncd reads"):
        open_log(p, disk)
    assert p.read_bytes() == newer


def test_set_bits_finds_every_bit_below_the_limit():
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.sets(st.integers(0, 80_000), max_size=40), st.integers(0, 80_001))
    def check(bits, limit):
        buf = bytearray(10_001)
        for r in bits:
            buf[r >> 3] |= 1 << (r & 7)
        assert list(set_bits(buf, limit)) == sorted(r for r in bits if r < limit)

    check()


async def test_a_multi_tib_log_keeps_per_region_state_only_for_marked_regions(tmp_path, disk):
    """4 TiB in 256 KiB regions: a 2 MiB bitmap, but no per-region table of that size."""
    log = open_log(tmp_path / "big", disk, 4 << 40)
    assert log.nregions == 16 << 20
    for r in (0, 5_000_000, log.nregions - 1):
        await log.mark(r * REGION, 4096)
    assert log.marked_regions() == [0, 5_000_000, log.nregions - 1] and log.count() == 3
    assert len(log.last) == 3
    log.last[5_000_000] -= 100
    assert await log.clear_idle(10.0, keep=lambda r: False) == 1
    assert log.marked_regions() == [0, log.nregions - 1] and len(log.last) == 2
