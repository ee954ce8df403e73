"""Range locks: the primary orders overlapping writes by holding the range until both replicas
have applied it, so overlapping writes reach the two disks in the same order."""

from __future__ import annotations

import trio


class RangeLock:
    """Exclusive locks on byte ranges of one volume; non-overlapping ranges never wait."""

    __slots__ = ("_held", "_next")

    def __init__(self) -> None:
        # token -> [start, end, Event or None]; the event is made only when someone waits.
        self._held: dict[int, list] = {}
        self._next = 0

    def _conflict(self, start: int, end: int) -> list | None:
        for h in self._held.values():
            if h[0] < end and start < h[1]:
                return h
        return None

    def try_acquire(self, start: int, length: int) -> int | None:
        """A token, or None when an overlapping range is held (nothing waits)."""
        end = start + max(length, 1)
        if self._held and self._conflict(start, end) is not None:
            return None
        self._next += 1
        self._held[self._next] = [start, end, None]
        return self._next

    async def acquire(self, start: int, length: int) -> int:
        end = start + max(length, 1)
        while (h := self._conflict(start, end)) is not None:
            if h[2] is None:
                h[2] = trio.Event()
            await h[2].wait()
        self._next += 1
        self._held[self._next] = [start, end, None]
        return self._next

    def release(self, token: int) -> None:
        ev = self._held.pop(token)[2]
        if ev is not None:
            ev.set()

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

    def set_all(self) -> None:
        for r in range(self.nregions):
            self.set(r)

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
