"""The write-intent log: durable marks before writes, an activity log of extents kept marked while
written (LRU beyond a budget, cleared after a long idle time), clearing only of data made durable,
what a restart finds. The rules of clearing are shown on one-region extents cleared after a long
idle time, the activity log on 4 MiB extents."""

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


IDLE = 50.0  # the logs of the clearing rules' tests: an extent idle for longer is cleared


def open_log(path, disk: Disk, size: int = SIZE, **kw) -> IntentLog:
    """A log of one-region extents cleared after IDLE seconds, each marked alone (unless ``kw``
    says otherwise)."""
    kw = {"extent": REGION, "idle": IDLE, "ahead": REGION, **kw}
    return IntentLog(str(path), size, REGION, volume=disk, **kw)


def activity_log(path, disk: Disk, hot_extents: int = 64, size: int = SIZE) -> IntentLog:
    """A log with the default extents (4 MiB: 16 regions) and a budget of ``hot_extents``, each
    extent marked alone (the marks ahead have tests of their own)."""
    return IntentLog(str(path), size, REGION, volume=disk, hot=hot_extents * EXTENT, ahead=EXTENT)


EXTENT = 4 << 20


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


async def test_evicted_regions_wait_a_while_for_a_host_flush_before_the_pass_flushes_itself(tmp_path, disk):
    """Beyond the budget and idle just past hold (12 s, hold 10), an extent waits up to
    flush_wait (5 s) for a host's flush: cleared without an extra sync once one comes; flushed
    by the pass once it waited longer."""
    log = open_log(tmp_path / "i", disk, hot=REGION)  # a budget of one extent
    for r in (1, 2):
        await log.mark(r * REGION, 4096)
        log.last[r] -= 12
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0
    assert disk.flushes == 0 and log.marked_regions() == [1, 2]
    await disk.flush()  # the host flushes
    assert await log.clear_idle(10.0, keep=lambda r: False) == 2  # down to the budget less headroom
    assert disk.flushes == 1 and log.data_syncs == 0 and log.evictions == 2
    # Regions 3 and 4 written 14 s ago; the host's last flush was 100 s ago, and none comes: the
    # pass flushes once they waited 5 s past hold.
    for r in (3, 4):
        await log.mark(r * REGION, 4096)
        log.last[r] -= 14
    disk.flushed_from -= 100
    assert await log.clear_idle(10.0, keep=lambda r: False) == 0 and log.data_syncs == 0
    for r in (3, 4):
        log.last[r] -= 2
    assert await log.clear_idle(10.0, keep=lambda r: False) == 2 and log.data_syncs == 1


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
    with pytest.raises(OSError, match="a flush failed"):
        await disk.flush()  # one would succeed, but proves nothing any more: refused
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


# -- the activity log: extents, the hot set, transactions ------------------------------------------

async def test_the_first_write_to_an_extent_marks_all_its_regions_durably(tmp_path, disk):
    p = str(tmp_path / "i")
    log = activity_log(p, disk)
    await log.mark(REGION * 3 + 100, 4096)  # region 3: extent 0, regions 0-15
    assert log.marks == 1 and log.meta_syncs == 1 and log.hot_extents() == 1
    assert all(log.ready(r * REGION, 4096) for r in range(16)) and not log.ready(16 * REGION, 1)
    await log.mark(REGION * 15, 2 * REGION)  # regions 15-16: extent 1 is marked, extent 0 already is
    assert log.marks == 2 and log.meta_syncs == 2
    # A crash now: the next start finds the whole extents, in the file format as before.
    assert open_log(p, disk).loaded_regions() == list(range(32))


async def test_a_working_set_within_the_budget_costs_no_metadata_sync_after_warm_up(tmp_path, disk):
    log = activity_log(tmp_path / "i", disk, hot_extents=8)
    for e in range(8):
        await log.mark(e * EXTENT + 4096, 4096)
    syncs = log.meta_syncs
    assert syncs == 8
    for _ in range(5):  # writes go on over the working set, long past hold
        for e in range(8):
            await log.mark(e * EXTENT + 65536, 4096)
            log.last[e] -= 30
        assert await log.clear_idle(10.0, keep=lambda r: False) == 0
    assert log.meta_syncs == syncs and log.marks == 8 and log.evictions == 0 and disk.flushes == 0
    assert log.hot_extents() == 8 and log.count() == 8 * 16


async def test_beyond_the_budget_the_least_recently_written_extents_are_evicted(tmp_path, disk):
    """Trimmed to the budget less a headroom (an eighth, at least one extent) in one batch and
    one volume flush: the next cold marks find room without waiting for a pass."""
    p = tmp_path / "i"
    log = activity_log(p, disk, hot_extents=8)
    for e in range(10):
        await log.mark(e * EXTENT, 4096)
        log.last[e] -= 100 - e  # extent 0 written longest ago
    assert await log.clear_idle(10.0, keep=lambda r: False) == 3 * 16
    assert log.evictions == 3 and disk.flushes == 1 and log.hot_extents() == 7
    assert sorted(log.last) == list(range(3, 10))
    assert open_log(p, disk).loaded_regions() == list(range(3 * 16, 10 * 16))
    await log.mark(0, 4096)  # back in: marked again
    assert log.ready(0, 1) and log.marks == 11


async def test_eviction_never_clears_an_extent_written_within_hold(tmp_path, disk):
    log = activity_log(tmp_path / "i", disk, hot_extents=2)
    for e in range(4):
        await log.mark(e * EXTENT, 4096)
    log.last[0] -= 100
    log.last[1] -= 5  # within hold (10 s): a write to it may still be applied
    assert await log.clear_idle(10.0, keep=lambda r: False) == 16  # only extent 0
    assert sorted(log.last) == [1, 2, 3] and log.hot_extents() == 3  # over the budget, for now
    assert log.count() == 3 * 16


async def test_eviction_clears_neither_kept_regions_nor_data_not_yet_durable(tmp_path, disk):
    p = tmp_path / "i"
    log = activity_log(p, disk, hot_extents=2)  # evicted down to one: extents 0 and 1 go
    for e in range(3):
        await log.mark(e * EXTENT, 4096)
        log.last[e] -= 100 - e
    dirty = {5}  # region 5 of extent 0: the peer lacks it
    seen = []  # region 17 of extent 1 becomes dirty while the volume syncs
    disk.during = lambda: (dirty.add(17), seen.append(on_disk(p)))
    assert await log.clear_idle(10.0, keep=dirty.__contains__) == 2 * 16 - 2
    assert seen == [list(range(48))]  # the file had every bit while the data was made durable
    assert log.marked_regions() == [5, 17, *range(32, 48)] and on_disk(p) == log.marked_regions()
    # The kept regions left the hot set but stay marked until no longer kept, then go.
    assert sorted(log.last) == [2]
    dirty.clear()
    assert await log.clear_idle(10.0, keep=dirty.__contains__) == 2
    assert log.marked_regions() == list(range(32, 48))


async def test_concurrent_cold_marks_share_one_or_two_metadata_syncs(tmp_path, disk):
    """A burst of 16 writes to 16 cold extents (QD16): one transaction for the first, one for
    all that arrived while it synced, not one each."""
    log = activity_log(tmp_path / "i", disk)
    async with trio.open_nursery() as n:
        for e in range(16):
            n.start_soon(log.mark, e * EXTENT + 8192, 4096)
    assert log.marks == 16 and log.meta_syncs <= 2
    assert all(log.ready(e * EXTENT, 1) for e in range(16))
    assert open_log(tmp_path / "i", disk).loaded_regions() == list(range(16 * 16))


async def test_extents_idle_for_long_are_cleared_within_the_budget(tmp_path, disk):
    log = activity_log(tmp_path / "i", disk)  # 64 extents: far from full
    for e in range(3):
        await log.mark(e * EXTENT, 4096)
    log.last[0] -= log.idle + 1
    log.last[1] -= log.idle - 60  # idle for minutes, not yet long enough
    assert await log.clear_idle(10.0, keep=lambda r: False) == 16
    assert log.idle_clears == 1 and sorted(log.last) == [1, 2] and disk.flushes == 1


async def test_bits_found_at_start_outside_the_hot_set_are_cleared_once_not_kept(tmp_path, disk):
    p = str(tmp_path / "i")
    activity_log(p, disk).set_sync([3, 40])
    log = activity_log(p, disk)
    assert log.loaded_regions() == [3, 40]
    assert await log.clear_idle(10.0, keep=lambda r: r == 40) == 1
    assert log.marked_regions() == [40] and log.hot_extents() == 0


async def test_a_transaction_writes_only_the_changed_pages_of_a_large_bitmap(tmp_path, disk, monkeypatch):
    import os

    p = str(tmp_path / "big")
    log = activity_log(p, disk, size=4 << 40)  # a 2 MiB bitmap
    written = []
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: written.append(len(data)) or real(fd, data, off))
    far = log.nregions - 1
    async with trio.open_nursery() as n:
        n.start_soon(log.mark, 0, 4096)
        n.start_soon(log.mark, far * REGION, 4096)
    assert sum(written) <= 2 * 4096
    monkeypatch.undo()
    assert open_log(p, disk, size=4 << 40).loaded_regions() == [*range(16), *range(far - 15, far + 1)]


# -- marks ahead: a cold extent's aligned group marked in the same transaction -------------------

def ahead_log(path, disk: Disk, hot_extents: int = 64, size: int = SIZE, ahead: int = 4) -> IntentLog:
    """The default extents, a budget of ``hot_extents``, groups of ``ahead`` extents."""
    return IntentLog(str(path), size, REGION, volume=disk, hot=hot_extents * EXTENT, ahead=ahead * EXTENT)


async def test_a_cold_write_marks_its_group_of_extents_in_one_sync(tmp_path, disk):
    p = str(tmp_path / "i")
    log = ahead_log(p, disk)
    await log.mark(5 * EXTENT + 4096, 4096)  # extent 5: group 4-7
    assert log.meta_syncs == 1 and log.marks == 4 and log.marked_ahead == 3
    assert sorted(log.last) == [4, 5, 6, 7]  # kept hot as if written
    assert all(log.ready(r * REGION, 4096) for r in range(4 * 16, 8 * 16))
    assert not log.ready(4 * 16 * REGION - 1, 1) and not log.ready(8 * EXTENT, 1)
    # Writes anywhere in the group now cost a bit test; the next group costs one sync again.
    for e in (4, 6, 7):
        await log.mark(e * EXTENT + 65536, 8192)
    assert log.meta_syncs == 1
    await log.mark(9 * EXTENT, 4096)
    assert log.meta_syncs == 2 and log.marks == 8 and log.marked_ahead == 6
    # What a crash now finds: both groups, durable.
    assert on_disk(p) == list(range(4 * 16, 12 * 16))
    assert open_log(p, disk).loaded_regions() == list(range(4 * 16, 12 * 16))


async def test_a_group_marks_only_its_cold_extents_and_ends_with_the_volume(tmp_path, disk):
    log = ahead_log(tmp_path / "i", disk, size=10 * EXTENT)  # groups 0-3, 4-7, 8-9
    await log.mark(6 * EXTENT, 4096)
    assert log.marks == 4
    await log.mark(3 * EXTENT + 4096, 4096)  # group 0-3: all cold
    assert log.marks == 8 and log.marked_ahead == 6
    log.last.clear()  # (as if cleared from the hot set but the bits left set: kept regions)
    await log.mark(9 * EXTENT, 4096)  # group 8-9: the last, short
    assert log.marks == 10 and sorted(log.last) == [8, 9] and log.count() == 10 * 16
    await log.mark(0, 4096)  # set already: nothing to mark, no sync
    assert log.marks == 10 and log.meta_syncs == 3


async def test_no_marks_ahead_where_they_would_crowd_the_budget(tmp_path, disk):
    """The hot set's budget bounds what a crash compares: marks ahead stop where the group would
    take the set past the level the LRU's batches bring it to (an eighth below the budget), and
    the cold extent is then marked alone."""
    log = ahead_log(tmp_path / "i", disk, hot_extents=16, size=64 * EXTENT)  # headroom 2: up to 14
    for g in range(3):
        await log.mark(g * 4 * EXTENT, 4096)
    assert log.hot_extents() == 12 and log.marked_ahead == 9
    await log.mark(20 * EXTENT, 4096)  # 12 + 4 > 14: alone
    assert log.hot_extents() == 13 and log.marked_ahead == 9 and not log.ready(21 * EXTENT, 1)
    assert log.evictions == 0


async def test_extents_marked_ahead_and_never_written_leave_the_hot_set_like_any_other(tmp_path, disk):
    log = ahead_log(tmp_path / "i", disk)
    await log.mark(EXTENT, 4096)  # extents 0-3 marked, 1 written
    for e in (0, 2, 3):
        log.last[e] -= log.idle + 1  # never written since: idle once the idle time passed
    log.last[1] -= 60
    assert await log.clear_idle(10.0, keep=lambda r: False) == 3 * 16
    assert sorted(log.last) == [1] and log.idle_clears == 3 and disk.flushes == 1
    assert log.marked_regions() == list(range(16, 32))


async def test_marks_ahead_can_be_turned_off(tmp_path, disk):
    log = ahead_log(tmp_path / "i", disk, ahead=1)
    await log.mark(5 * EXTENT, 4096)
    assert log.marks == 1 and log.marked_ahead == 0 and sorted(log.last) == [5]


async def test_a_neighbour_marked_ahead_is_not_ready_before_its_sync(tmp_path, disk, monkeypatch):
    """A write to a neighbour may take the fast path only once the transaction that marks it is
    on disk, as for the cold extent itself."""
    import os

    log = ahead_log(tmp_path / "i", disk)
    seen = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: seen.append(log.ready(6 * EXTENT, 4096)) or real(fd))
    await log.mark(5 * EXTENT, 4096)
    assert seen == [False] and log.ready(6 * EXTENT, 4096)


async def test_a_group_across_two_bitmap_pages_is_made_durable_on_both(tmp_path, disk):
    p = str(tmp_path / "i")
    log = ahead_log(p, disk, hot_extents=4096, size=16 << 30, ahead=3)  # a page: 2,048 extents
    with trio.fail_after(5):
        await log.mark(2046 * EXTENT, 4096)  # group 2046-2048
        assert log.meta_syncs == 1 and log.ready(2048 * EXTENT, 4096)
        await log.mark(2048 * EXTENT + 4096, 4096)
    assert log.meta_syncs == 1
    assert on_disk(p) == list(range(2046 * 16, 2049 * 16))


async def test_neighbours_marked_ahead_stay_marked_through_clear_passes_within_idle(tmp_path, disk):
    log = ahead_log(tmp_path / "i", disk)
    await log.mark(5 * EXTENT, 4096)
    for _ in range(3):
        assert await log.clear_idle(0.0, keep=lambda r: False) == 0
    assert sorted(log.last) == [4, 5, 6, 7] and log.count() == 4 * 16


async def test_extents_of_the_write_itself_are_not_counted_as_marked_ahead(tmp_path, disk):
    log = ahead_log(tmp_path / "i", disk)
    await log.mark(4 * EXTENT, 4 * EXTENT)  # a whole group written
    assert log.marks == 4 and log.marked_ahead == 0
    await log.mark(9 * EXTENT - 4096, 8192)  # extents 8 and 9: groups 4-7 (set) and 8-11
    assert log.marks == 8 and log.marked_ahead == 2
