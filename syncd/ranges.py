"""Range locks: the primary orders overlapping writes by holding the range until both replicas
have applied it, so overlapping writes reach the two disks in the same order; reads never see a
write half applied."""

from __future__ import annotations

import trio

# With many holders (every host's writes in flight are held at the primary: hundreds with many
# hosts), they are also filed by the MiB they touch, so a request looks only at those near it:
# scanning all of them cost each 4 KiB write 2.9 µs at 64 held and 34 µs at 1,024. With few,
# scanning is cheaper than keeping the index (bench/README.md, round 18), so the index is built
# when the holders reach _INDEX_AT and dropped when they fall below half of it.
_SHIFT = 20  # 1 MiB per bucket
_WIDE = 16  # a range over this many buckets (a large trim, a zeroed region) is kept apart instead
_INDEX_AT = 48


class RangeLock:
    """Locks on byte ranges of one volume. A write holds its range exclusively (the primary until
    both replicas applied it); a read that cannot complete inline holds it shared, so it never
    sees a write half applied (a write in a worker thread, FUA or O_DIRECT, copies into the page
    cache while the loop could read it). Non-overlapping ranges never wait; overlapping ones are
    granted in arrival order, so a hot block cannot starve a waiter."""

    __slots__ = ("_held", "_buckets", "_wide", "_next", "_waiting", "_lot")

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, bool]] = {}  # token -> (start, end, shared)
        # The same ranges found by place, while there are many (None: not kept): each narrow one
        # under every bucket it touches, the wide ones (over _WIDE buckets) in ``_wide``, which
        # every request looks at.
        self._buckets: dict[int, dict[int, tuple[int, int, bool]]] | None = None
        self._wide: dict[int, tuple[int, int, bool]] = {}
        self._next = 0
        self._waiting: list[tuple[int, int, bool, int]] = []  # in arrival order; last: a unique id
        self._lot = trio.lowlevel.ParkingLot()

    @staticmethod
    def _clash(a: tuple[int, ...], start: int, end: int, shared: bool) -> bool:
        return a[0] < end and start < a[1] and not (shared and a[2])

    def _blocked(self, start: int, end: int, shared: bool, before: int) -> bool:
        """A holder, or a waiter that came first (the first ``before`` waiters), is in the way."""
        buckets = self._buckets
        if buckets is None or ((end - 1) >> _SHIFT) - (start >> _SHIFT) >= _WIDE:
            for h in self._held.values():  # every holder (_clash, inlined: this runs for every write)
                if h[0] < end and start < h[1] and not (shared and h[2]):
                    return True
        else:
            first, last = start >> _SHIFT, (end - 1) >> _SHIFT
            for b in range(first, last + 1):
                near = buckets.get(b)
                if near:
                    for h in near.values():
                        if h[0] < end and start < h[1] and not (shared and h[2]):
                            return True
            for h in self._wide.values():
                if h[0] < end and start < h[1] and not (shared and h[2]):
                    return True
        for w in self._waiting[:before]:
            if self._clash(w, start, end, shared):
                return True
        return False

    def _grant(self, start: int, end: int, shared: bool) -> int:
        self._next += 1
        tok = self._next
        held = self._held
        r = held[tok] = (start, end, shared)
        buckets = self._buckets
        if buckets is not None:
            self._file(buckets, tok, r)
        elif len(held) >= _INDEX_AT:
            buckets = self._buckets = {}
            for t, h in held.items():
                self._file(buckets, t, h)
        return tok

    def _file(self, buckets: dict[int, dict[int, tuple[int, int, bool]]], tok: int, r: tuple[int, int, bool]) -> None:
        first, last = r[0] >> _SHIFT, (r[1] - 1) >> _SHIFT
        if last - first >= _WIDE:
            self._wide[tok] = r
            return
        for b in range(first, last + 1):
            near = buckets.get(b)
            if near is None:
                buckets[b] = {tok: r}
            else:
                near[tok] = r

    def _unfile(self, buckets: dict[int, dict[int, tuple[int, int, bool]]], tok: int, r: tuple[int, int, bool]) -> None:
        """Undo ``_file``."""
        first, last = r[0] >> _SHIFT, (r[1] - 1) >> _SHIFT
        if last - first >= _WIDE:
            del self._wide[tok]
            return
        for b in range(first, last + 1):
            near = buckets[b]
            del near[tok]
            if not near:
                del buckets[b]

    def busy(self, start: int, length: int) -> bool:
        """Whether a write holds or waits for part of the range (a read must not run inline)."""
        end = start + max(length, 1)
        return bool(self._held or self._waiting) and self._blocked(start, end, True, len(self._waiting))

    def try_acquire(self, start: int, length: int, shared: bool = False) -> int | None:
        """A token, or None when a conflicting range is held or waited for (nothing waits)."""
        end = start + max(length, 1)
        if (self._held or self._waiting) and self._blocked(start, end, shared, len(self._waiting)):
            return None
        return self._grant(start, end, shared)

    async def acquire(self, start: int, length: int, shared: bool = False) -> int:
        end = start + max(length, 1)
        if not self._blocked(start, end, shared, len(self._waiting)):
            return self._grant(start, end, shared)
        self._next += 1
        me = (start, end, shared, self._next)
        self._waiting.append(me)
        try:
            while self._blocked(start, end, shared, self._waiting.index(me)):
                await self._lot.park()
        finally:
            self._waiting.remove(me)
            self._lot.unpark_all()  # whoever queued behind this one looks again
        return self._grant(start, end, shared)

    def release(self, token: int) -> None:
        r = self._held.pop(token)
        buckets = self._buckets
        if buckets is not None:
            if len(self._held) < _INDEX_AT // 2:  # few again: scanning them is cheaper
                self._buckets = None
                self._wide = {}
            else:
                self._unfile(buckets, token, r)
        if self._waiting:
            self._lot.unpark_all()

    def held(self) -> int:
        return len(self._held)


class Bitmap:
    """One bit per region of a volume: set = the region may differ between the replicas."""

    __slots__ = ("region", "nregions", "bits", "count")

    def __init__(self, size: int, region: int, bits: bytes | None = None):
        self.region = region
        self.nregions = (size + region - 1) // region
        nbytes = (self.nregions + 7) // 8
        self.bits = bytearray(bits) if bits is not None else bytearray(nbytes)
        if len(self.bits) != nbytes:
            raise ValueError(f"bitmap has {len(self.bits)} bytes, expected {nbytes}")
        self.count = sum(bin(b).count("1") for b in self.bits)

    def regions_of(self, offset: int, length: int) -> range:
        return range(offset // self.region, (offset + max(length, 1) - 1) // self.region + 1)

    def test(self, r: int) -> bool:
        return bool(self.bits[r >> 3] & (1 << (r & 7)))

    def set(self, r: int) -> None:
        m = 1 << (r & 7)
        if not self.bits[r >> 3] & m:
            self.bits[r >> 3] |= m
            self.count += 1

    def clear(self, r: int) -> None:
        m = 1 << (r & 7)
        if self.bits[r >> 3] & m:
            self.bits[r >> 3] &= ~m
            self.count -= 1

    def set_range(self, offset: int, length: int) -> None:
        for r in self.regions_of(offset, length):
            self.set(r)

    def any_in(self, offset: int, length: int) -> bool:
        if not self.count:
            return False
        return any(self.test(r) for r in self.regions_of(offset, length))

    def runs(self, offset: int, length: int) -> list[tuple[bool, int, int]]:
        """``[offset, offset + length)`` cut where the regions' bits change: ``(set, offset,
        length)`` for each run of regions whose bits are equal, in order, covering the range."""
        out: list[tuple[bool, int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            r = pos // self.region
            bit = self.test(r)
            stop = min(end, (r + 1) * self.region)
            while stop < end and self.test(stop // self.region) == bit:
                stop = min(end, stop + self.region)
            out.append((bit, pos, stop - pos))
            pos = stop
        return out

    def set_all(self) -> None:
        for r in range(self.nregions):
            self.set(r)

    def clear_all(self) -> None:
        if self.count:
            self.bits[:] = bytes(len(self.bits))
            self.count = 0

    def intersect(self, other: bytes) -> None:
        """Keep only the bits also set in ``other`` (a bitmap of the same size)."""
        if self.count:
            for i, b in enumerate(self.bits):
                if b:
                    self.bits[i] = b & other[i]
            self.count = sum(bin(b).count("1") for b in self.bits)

    def merge(self, other: bytes) -> None:
        for i, b in enumerate(other):
            if b:
                for bit in range(8):
                    if b & (1 << bit) and (i * 8 + bit) < self.nregions:
                        self.set(i * 8 + bit)

    def first_set(self, start: int = 0) -> int | None:
        if not self.count:
            return None
        for r in range(start, self.nregions):
            if self.bits[r >> 3] and self.test(r):
                return r
        return None
