"""The write-intent log: which regions of a volume may have been written without both replicas
knowing, kept on disk so that a crash (kill -9, power cut) costs a comparison of those regions
only, not of the whole volume.

Before any write is applied to a region, the region's bit must be set *durably* (pwrite +
fdatasync of the bitmap file); writes to a region whose bit is already durable cost nothing
more than a bit test. A bit is cleared lazily, and only once the data it covers is durable on
this array: a bit cleared while the region's data is still only in the page cache (or a disk's
write cache) would let a power cut leave the replicas different with nothing left to compare.
A pass of ``clear_idle`` (every second) keeps this order:

1. Candidates: set bits of regions with no write marked or touched for longer than any write
   can be held (``hold``, the arrays' ``max_request_hold``), so every write to them has been
   applied, and not kept by the caller (on a primary: dirty, the peer lacks it; on a secondary
   after a crash: not yet reported to the primary).
2. The volume's data is made durable: every write to a candidate was applied by its last mark
   or touch + ``hold``, so a volume flush that began after that covers it. Candidates that
   the volume's latest completed flush (a host's FLUSH, usually) covers are cleared at once;
   the others wait up to ``flush_wait`` seconds for a host flush, then the pass makes one
   itself (``Volume.flush``: fdatasync in a worker thread) for all of them. A host that
   flushes at least that often never costs an extra sync; one that never flushes costs one
   per ``flush_wait`` seconds at most, and only while regions go idle. A flush covers every
   write applied before it began, however it was applied: buffered pwrite (host, mirrored,
   forwarded and resync writes), fallocate (zeroes, trims), O_DIRECT and RWF_DSYNC writes (an
   fdatasync also flushes the device's write cache).
3. Only candidates still idle (no write marked or touched since step 1: such a write may have
   been applied after the sync began) and still not kept are cleared.
4. The bitmap with those bits cleared is written without a sync: it can reach the disk only
   after step 2 returned, when the data it stops covering is already durable; if a crash comes
   first, the stale set bit only costs a digest comparison.

Writes never wait for a clear pass (``mark`` and ``clear_idle`` share a lock only around bitmap
file writes) and cost no more than before. After a failed volume flush no bit is cleared until
the node restarts: Linux may report a later fdatasync as successful although the data was lost.

File: ``intent-<gid>-<vol_id>`` in the node's data directory::

    magic "SYNCDIL1" | u32 format version | u32 region size | u64 number of regions | bitmap

A file whose header does not match the volume (another region size or size) or that cannot be
read is not trusted: the caller then compares every region (and the file is started afresh). A
file of a newer format version (written by a newer syncd) is neither trusted nor overwritten:
the node refuses to start (StateError) rather than lose what a downgrade cannot read.
"""

from __future__ import annotations

import os
import struct
import time

import trio

from .state import StateError

_CHUNK, _SUB = 4096, 64  # bitmap bytes compared at once: all-zero runs are skipped at memcmp speed
_ZERO = bytes(_CHUNK)


def set_bits(buf, limit: int):
    """Indexes of the bits set in ``buf`` below ``limit``, in order. A 4 TiB volume in 256 KiB
    regions has a 2 MiB bitmap, mostly zero: all-zero chunks and runs are skipped by comparison
    (memcmp), and only the set bits of the other runs are visited."""
    for base in range(0, len(buf), _CHUNK):
        chunk = buf[base:base + _CHUNK]
        if chunk == _ZERO[:len(chunk)]:
            continue
        for sub in range(0, len(chunk), _SUB):
            v = int.from_bytes(chunk[sub:sub + _SUB], "little")  # bit k: region (base+sub)*8 + k
            while v:
                low = v & -v
                r = (base + sub) * 8 + low.bit_length() - 1
                if r >= limit:
                    return
                yield r
                v ^= low


MAGIC = b"SYNCDIL1"
VERSION = 1
_HEAD = struct.Struct(">8sIIQ")


class IntentLog:
    def __init__(self, path: str, size: int, region: int, *, volume, flush_wait: float = 5.0):
        """``volume``: the ``Volume`` whose regions this log covers (its ``flush``,
        ``flushed_from`` and ``flush_failed``); ``flush_wait``: how long idle regions wait for
        a host's flush before a clear pass flushes the volume itself."""
        self.path = path
        self.volume = volume
        self.flush_wait = flush_wait
        self.data_syncs = 0  # volume flushes made by clear passes (not by hosts)
        self.region = region
        self.nregions = (size + region - 1) // region
        nbytes = (self.nregions + 7) // 8
        self.bits = bytearray(nbytes)  # what we want set (memory)
        self.durable = bytearray(nbytes)  # what is set on disk and synced
        # Monotonic time of the last write to each marked region (absent: long ago). Only marked
        # regions are in it, so it stays as small as the set of regions being written.
        self.last: dict[int, float] = {}
        self.trusted = False  # the file existed and matched: ``loaded`` holds its bits
        self.loaded = bytearray(nbytes)
        self.problem = ""
        self.on_error = None  # callback(OSError) when the file cannot be written (the node stops)
        self._lock = trio.Lock()
        self.fd = -1
        self._open()

    # -- file ------------------------------------------------------------------------------------
    def _open(self) -> None:
        nbytes = len(self.bits)
        head = _HEAD.pack(MAGIC, VERSION, self.region, self.nregions)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            if data[:8] == MAGIC and len(data) >= _HEAD.size and _HEAD.unpack_from(data)[1] > VERSION:
                raise StateError(
                    f"{self.path} is a write-intent log of format {_HEAD.unpack_from(data)[1]}, newer than this "
                    f"syncd reads ({VERSION}): refusing to start and leaving it as it is (run the newer "
                    "syncd, or remove the file to make the peers compare the whole volume)")
            if data[:_HEAD.size] != head:
                self.problem = f"{self.path} does not match this volume (header {data[:_HEAD.size]!r})"
            elif len(data) != _HEAD.size + nbytes:
                self.problem = f"{self.path} is {len(data)} bytes, expected {_HEAD.size + nbytes}"
            else:
                self.loaded[:] = data[_HEAD.size:]
                self.trusted = True
        except FileNotFoundError:
            self.problem = f"{self.path} is missing"
        except OSError as e:
            self.problem = f"{self.path} cannot be read: {e}"
        # Start from what was on disk; the caller resets it once it has used ``loaded``.
        self.bits[:] = self.loaded
        self.durable[:] = self.loaded
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, head + bytes(self.loaded))
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def loaded_regions(self) -> list[int]:
        """The regions set in the file as found at start."""
        return list(set_bits(self.loaded, self.nregions))

    def marked_regions(self) -> list[int]:
        """The regions set now."""
        return list(set_bits(self.bits, self.nregions))

    def reset_sync(self, keep) -> None:
        """At start, once ``loaded`` was used: only the regions ``keep(r)`` stay set, synced."""
        for r in range(self.nregions):
            if keep(r):
                self.bits[r >> 3] |= 1 << (r & 7)
            else:
                self.bits[r >> 3] &= ~(1 << (r & 7))
        self._write_sync(bytes(self.bits))
        self.durable[:] = self.bits

    def _write_sync(self, data: bytes) -> None:
        try:
            os.pwrite(self.fd, data, _HEAD.size)
            os.fdatasync(self.fd)
        except OSError as e:
            self._failed(e)
            raise

    def _failed(self, e: OSError) -> None:
        if self.on_error is not None:
            self.on_error(e)

    def set_sync(self, regions=None) -> None:
        """Mark ``regions`` (all when None) durably, now (rare events: a full compare decided,
        a peer's crash reported): a crash before they are resynced must not forget them."""
        if regions is None:
            for i in range(len(self.bits)):
                self.bits[i] = 0xFF
        else:
            for r in regions:
                self.bits[r >> 3] |= 1 << (r & 7)
        self._write_sync(bytes(self.bits))
        self.durable[:] = self.bits

    # -- the write path --------------------------------------------------------------------------
    def ready(self, offset: int, length: int) -> bool:
        """True (and the regions touched) when every region of the range is durably marked: a
        write may go ahead without waiting. The fast paths take the slow path otherwise."""
        r0 = offset // self.region
        r1 = (offset + max(length, 1) - 1) // self.region
        d = self.durable
        for r in range(r0, r1 + 1):
            if not d[r >> 3] & (1 << (r & 7)):
                return False
        now = time.monotonic()
        for r in range(r0, r1 + 1):
            self.last[r] = now
        return True

    def touch(self, offset: int, length: int) -> None:
        now = time.monotonic()
        for r in range(offset // self.region, (offset + max(length, 1) - 1) // self.region + 1):
            self.last[r] = now

    async def mark(self, offset: int, length: int) -> None:
        """Set the range's regions durably (one fdatasync, shared by concurrent markers)."""
        if self.ready(offset, length):
            return
        r0 = offset // self.region
        r1 = (offset + max(length, 1) - 1) // self.region
        for r in range(r0, r1 + 1):
            self.bits[r >> 3] |= 1 << (r & 7)
        self.touch(offset, length)
        while not self.ready(offset, length):
            async with self._lock:  # whoever flushes, flushes every pending mark
                if self.ready(offset, length):
                    break
                snap = bytes(self.bits)
                await self._flush(sync=True, snap=snap)
                # Synced now: what the snapshot set and is still wanted (a bit cleared meanwhile
                # is written as 0 by that clear's own flush, after this one).
                for i, b in enumerate(snap):
                    if b:
                        self.durable[i] |= b & self.bits[i]

    async def _flush(self, sync: bool, snap: bytes | None = None) -> None:
        data = bytes(self.bits) if snap is None else snap
        fd = self.fd

        def write() -> None:
            os.pwrite(fd, data, _HEAD.size)
            if sync:
                os.fdatasync(fd)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as e:
            self._failed(e)
            raise

    async def clear_idle(self, hold: float, keep) -> int:
        """Clear regions with no write for ``hold`` seconds unless ``keep(r)``, once their data is
        durable (the module's steps 1-4). Returns how many were cleared."""
        vol = self.volume
        if vol.flush_failed:
            return 0
        cutoff = time.monotonic() - hold
        last = self.last
        candidates = [r for r in set_bits(self.bits, self.nregions) if last.get(r, 0.0) < cutoff and not keep(r)]
        if not candidates:
            return 0
        covered = vol.flushed_from - hold  # regions last written before this are durable
        waiting = [last.get(r, 0.0) for r in candidates if last.get(r, 0.0) > covered]
        if waiting and min(waiting) < cutoff - self.flush_wait:
            await vol.flush()
            self.data_syncs += 1
        elif waiting:
            candidates = [r for r in candidates if last.get(r, 0.0) <= covered]
        n = 0
        for r in candidates:
            if last.get(r, 0.0) < cutoff and not keep(r):
                self.bits[r >> 3] &= ~(1 << (r & 7))
                self.durable[r >> 3] &= ~(1 << (r & 7))
                last.pop(r, None)
                n += 1
        if n:
            async with self._lock:
                await self._flush(sync=False)
        return n

    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()
