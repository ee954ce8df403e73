"""Reused buffers for large payloads (host writes and reads, replicated frames over 64 KiB).

A fresh anonymous mapping costs a page fault for every 4 KiB the first time it is written: on a
2-vCPU VM about 0.9 ms per MiB, as much as the rest of a replicated 1 MiB write. A buffer that
held an earlier payload is written without faults. ``PayloadBuffers.get(n)`` hands out a view of
``n`` bytes of such a buffer.

A buffer is reused only once nothing refers to it any more: no request, frame, queue or
memoryview (each view of it holds a reference to it, which its reference count shows). So a
payload still being sent, written or retried is never overwritten, whoever holds it and for how
long; nobody has to give buffers back. Buffers come in power-of-two sizes; those kept unused are
bounded by ``keep`` bytes once the owner has trimmed (``trim``, every ``TRIM_EVERY`` seconds),
so the pool adds at most that to what the payloads in flight hold.
"""

from __future__ import annotations

import mmap
import os
import sys

SMALL = 64 << 10  # payloads up to this size get a plain bytearray: pooling them gains nothing
MIN_SIZE = 128 << 10
TRIM_EVERY = 2.0  # s: how often an owner trims its pool


def _counts_in_a_scan(bufs: list[mmap.mmap]) -> list[int]:
    counts = []
    for buf in bufs:  # as PayloadBuffers.trim scans
        counts.append(sys.getrefcount(buf))
    return counts


# What a buffer nothing else refers to counts while a list holding it is scanned (its list, the
# loop variable, getrefcount's argument: 3 on CPython 3.11; measured, as interpreters differ).
_UNREFERENCED = _counts_in_a_scan([mmap.mmap(-1, mmap.PAGESIZE)])[0]


def _size_class(n: int) -> int:
    return max(MIN_SIZE, 1 << (n - 1).bit_length())


class PayloadBuffers:
    """Payload buffers of one owner (an NBD server, a replication link), on its event loop."""

    __slots__ = ("keep", "_lent", "_free", "_free_bytes", "fresh", "reused")

    def __init__(self, keep: int = 8 << 20) -> None:
        self.keep = keep  # bytes of unused buffers kept for reuse
        self._lent: list[mmap.mmap] = []  # handed out; free again once nothing refers to them
        self._free: dict[int, list[mmap.mmap]] = {}  # size -> buffers nothing refers to
        self._free_bytes = 0
        self.fresh = 0  # buffers mapped
        self.reused = 0  # payloads that got a buffer mapped before

    def get(self, n: int) -> bytearray | memoryview:
        """``n`` writable bytes for the caller to fill: a new bytearray up to ``SMALL``, else a
        view of a reused buffer (contents undefined). A buffer mapped fresh commits its pages
        only as bytes land in them: a payload announced but not sent costs no more than arrived."""
        return bytearray(n) if n <= SMALL else self._reused(n)

    def _reused(self, n: int) -> memoryview:
        size = _size_class(n)
        if size > self.keep:  # never kept: mapped for this payload alone
            self.fresh += 1
            return memoryview(mmap.mmap(-1, n))
        free = self._free.get(size)
        if not free:
            self.trim()
            free = self._free.get(size)
        if free:
            buf = free.pop()
            self._free_bytes -= size
            self.reused += 1
        else:
            buf = mmap.mmap(-1, size)
            self.fresh += 1
        self._lent.append(buf)
        return memoryview(buf)[:n]

    def trim(self) -> None:
        """Move the lent buffers nothing refers to any more to the free lists (up to ``keep``
        bytes; the rest are let go). ``get`` does it when it finds no free buffer; the owner
        calls it now and then (every ``TRIM_EVERY`` seconds), so that after a burst of large
        payloads the pool holds no more than ``keep`` once they are done, even if no other
        large payload comes."""
        still: list[mmap.mmap] = []
        for buf in self._lent:
            # Any reference beyond the scan's own is a request, frame or view still using it.
            if sys.getrefcount(buf) > _UNREFERENCED:
                still.append(buf)
                continue
            size = len(buf)
            if self._free_bytes + size <= self.keep:
                self._free.setdefault(size, []).append(buf)
                self._free_bytes += size
        self._lent = still

    def stats(self) -> dict[str, int]:
        return {"fresh": self.fresh, "reused": self.reused, "lent": len(self._lent),
                "free_bytes": self._free_bytes}


def pread(fd: int, n: int, offset: int, pool: PayloadBuffers | None = None) -> bytes | memoryview:
    """Up to ``n`` bytes of ``fd`` at ``offset`` (fewer at its end): ``bytes`` without a pool or
    up to ``SMALL``, else a view of one of ``pool``'s reused buffers (as ``get`` gives), which a
    large read fills without page faults."""
    if pool is None or n <= SMALL:
        return os.pread(fd, n, offset)
    buf = pool._reused(n)
    got = os.preadv(fd, [buf], offset)
    return buf if got == n else buf[:got]
