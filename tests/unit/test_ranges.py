from unittest.mock import patch

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import ranges
from syncd.ranges import Bitmap, RangeLock


async def test_overlapping_ranges_are_serialized_and_disjoint_ones_are_not():
    lock = RangeLock()
    order = []

    async def holder(name, start, length, hold):
        tok = await lock.acquire(start, length)
        order.append(("in", name))
        await trio.sleep(hold)
        order.append(("out", name))
        lock.release(tok)

    async with trio.open_nursery() as n:
        n.start_soon(holder, "a", 0, 4096, 0.05)
        await trio.sleep(0.01)
        n.start_soon(holder, "b", 2048, 4096, 0.0)  # overlaps a: must wait
        n.start_soon(holder, "c", 8192, 4096, 0.0)  # disjoint: goes at once
    assert order.index(("in", "c")) < order.index(("out", "a"))
    assert order.index(("in", "b")) > order.index(("out", "a"))
    assert lock.held() == 0


def test_bitmap_tracks_regions():
    b = Bitmap(10 * 65536 + 1, 65536)
    assert b.nregions == 11
    b.set_range(65535, 2)  # spans regions 0 and 1
    assert b.count == 2 and b.test(0) and b.test(1) and not b.test(2)
    assert b.any_in(70000, 10) and not b.any_in(3 * 65536, 65536)
    b.clear(0)
    assert b.first_set() == 1
    b.set_all()
    assert b.count == 11
    c = Bitmap(10 * 65536 + 1, 65536, bytes(b.bits))
    assert c.count == 11


async def test_overlapping_waiters_are_granted_in_arrival_order():
    """A hot block cannot starve a waiter: whoever asked first for an overlapping range goes
    first, even when the later one could squeeze in between."""
    lock = RangeLock()
    order = []
    first = await lock.acquire(0, 4096)

    async def writer(name, start, length):
        tok = await lock.acquire(start, length)
        order.append(name)
        await trio.sleep(0.01)
        lock.release(tok)

    async with trio.open_nursery() as n:
        n.start_soon(writer, "w1", 0, 8192)  # waits for `first`
        await trio.sleep(0.01)
        n.start_soon(writer, "w2", 4096, 4096)  # free of `first`, but w1 asked first for it
        await trio.sleep(0.01)
        assert lock.try_acquire(4096, 512) is None  # nor may a fast path jump the queue
        lock.release(first)
    assert order == ["w1", "w2"]
    assert lock.held() == 0


async def test_readers_share_a_range_and_wait_for_a_writer():
    lock = RangeLock()
    r1 = await lock.acquire(0, 4096, shared=True)
    r2 = lock.try_acquire(0, 4096, shared=True)
    assert r2 is not None and lock.try_acquire(0, 4096) is None
    assert lock.busy(0, 4096) is False  # only readers: an inline read may run
    lock.release(r1)
    lock.release(r2)
    w = await lock.acquire(0, 4096)
    assert lock.busy(2048, 10) and lock.try_acquire(0, 10, shared=True) is None
    lock.release(w)
    assert not lock.busy(0, 4096)


@settings(max_examples=300, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=1, max_size=12), data=st.data())
def test_runs_cut_a_range_where_the_bits_change_and_cover_it(bits, data):
    region = 4096
    size = len(bits) * region - data.draw(st.integers(0, region - 1))  # the last region may be short
    b = Bitmap(size, region)
    for r, on in enumerate(bits):
        if on:
            b.set(r)
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - offset))
    runs = b.runs(offset, length)
    pos = offset
    for i, (bit, off, ln) in enumerate(runs):
        assert off == pos and ln > 0
        assert all(b.test(r) == bit for r in b.regions_of(off, ln))
        if i:
            assert runs[i - 1][0] != bit  # cut only where the bits change
        pos += ln
    assert pos == offset + length


def test_runs_of_a_range_within_one_region_are_that_range():
    b = Bitmap(8 * 4096, 4096)
    b.set(2)
    assert b.runs(2 * 4096 + 512, 1024) == [(True, 2 * 4096 + 512, 1024)]
    assert b.runs(4096 + 4000, 200) == [(False, 4096 + 4000, 96), (True, 2 * 4096, 104)]


@given(a=st.sets(st.integers(0, 40)), b=st.sets(st.integers(0, 40)))
def test_intersect_keeps_the_bits_set_in_both_and_clear_all_clears_them(a, b):
    x, y = Bitmap(41 * 4096, 4096), Bitmap(41 * 4096, 4096)
    for r in a:
        x.set(r)
    for r in b:
        y.set(r)
    x.intersect(y.bits)
    assert {r for r in range(41) if x.test(r)} == a & b and x.count == len(a & b)
    x.clear_all()
    assert x.count == 0 and not any(x.bits)


class _Scan:
    """The range lock's rule with no index: every holder is looked at (the reference)."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[int, int, bool]] = {}
        self.next = 0

    def blocked(self, start: int, length: int, shared: bool) -> bool:
        end = start + max(length, 1)
        return any(a < end and start < b and not (shared and sh) for a, b, sh in self.held.values())

    def try_acquire(self, start: int, length: int, shared: bool) -> int | None:
        if self.blocked(start, length, shared):
            return None
        self.next += 1
        self.held[self.next] = (start, start + max(length, 1), shared)
        return self.next


_MIB = 1 << 20
# Places within 48 MiB, often on a bucket's edge or a block; lengths from nothing through a block
# and a bucket to ranges wider than the index files by place (over 16 MiB).
_PLACE = st.one_of(st.integers(0, 48 * _MIB), st.integers(0, 48).map(lambda m: m * _MIB),
                   st.integers(0, 48 * 256).map(lambda b: b * 4096))
_LENGTH = st.one_of(st.sampled_from([0, 1, 4096, 65536, _MIB, _MIB + 1, 16 * _MIB, 17 * _MIB, 40 * _MIB]),
                    st.integers(0, 40 * _MIB))
_OP = st.one_of(
    st.tuples(st.just("take"), _PLACE, _LENGTH, st.booleans()),
    st.tuples(st.just("give"), st.integers(0, 1000)),
    st.tuples(st.just("busy"), _PLACE, _LENGTH),
)


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(_OP, max_size=60), index_at=st.sampled_from([2, 3, 8, ranges._INDEX_AT]))
def test_the_index_by_place_grants_and_refuses_exactly_what_scanning_every_holder_does(ops, index_at):
    """Whether the lock files its holders by place (from ``index_at`` holders on, and again
    after it dropped the index below half of that) or scans them all."""
    with patch.object(ranges, "_INDEX_AT", index_at):
        _follow(ops)


def _follow(ops) -> None:
    lock, ref = RangeLock(), _Scan()
    mine: dict[int, int] = {}  # the reference's token -> the lock's
    for op in ops:
        if op[0] == "take":
            _, start, length, shared = op
            want = ref.try_acquire(start, length, shared)
            got = lock.try_acquire(start, length, shared)
            assert (got is None) == (want is None), op
            if want is not None:
                mine[want] = got
        elif op[0] == "give" and ref.held:
            tok = sorted(ref.held)[op[1] % len(ref.held)]
            del ref.held[tok]
            lock.release(mine.pop(tok))
        elif op[0] == "busy":
            _, start, length = op
            assert lock.busy(start, length) == (bool(ref.held) and ref.blocked(start, length, True)), op
        assert lock.held() == len(ref.held)
    for tok in list(mine.values()):
        lock.release(tok)
    assert lock.held() == 0 and not lock._buckets and not lock._wide  # nothing left filed anywhere
