"""The write-intent log: which regions of a volume may have been written without both replicas
knowing, kept on disk so that a crash (kill -9, power cut) costs a comparison of those regions
only, not of the whole volume.

Before any write is applied to a region, the region's bit must be set *durably* (pwrite +
fdatasync of the bitmap file); writes to a region whose bit is already durable cost nothing
more than a bit test. The log is kept as an *activity log* (the idea of DRBD's al-extents):

* Marks are made in extents of several regions (``extent``, 4 MiB: 16 regions of 256 KiB): the
  first write to an extent sets every region bit of it, so the next writes anywhere in it find
  their bits durable. The file stays a bitmap of regions (a set bit: compare that region after a
  crash), so crash recovery reads it as before.
* Concurrent marks share one metadata transaction: whoever takes the lock writes the bitmap
  pages (4 KiB) changed since the last write, marks of all waiters included, and syncs once.
* A cold extent is marked with the rest of its aligned group (``ahead``, 16 MiB: 4 extents),
  in the same transaction at no extra sync, while that leaves the hot set an eighth below its
  budget. Random writes spread over a large volume then find most extents marked after a
  quarter of the transactions (a 10 GiB volume written at 4 KiB QD16: 156-180 metadata
  syncs instead of 615-621, and no slow first seconds), a sequential writer one in four; the
  price is up to 12 MiB more to compare after a crash for each extent written alone in its
  16 MiB, within the same budget. Once the set nears the budget, marks are one extent again.
* Extents written since they were marked, and those marked with them, form the *hot set*
  (``last``: extent -> time of its last write or mark). They are not cleared because they went
  idle for ``hold``; they stay marked while the set is within its budget (``hot`` bytes, 16 GiB:
  what a crash then costs is comparing that much by digest at most) and leave it when it is over
  budget, least recently written first, in batches that bring it an eighth below the budget (the
  pass runs every second; a new mark never waits for it: the set exceeds the budget only by
  extents written within ``hold``, which no rule could clear), or after ``idle`` seconds without
  a write (300 s: a quiet volume keeps little to compare). Set bits outside the hot set (found
  at start, marked by ``set_sync``, kept regions of an evicted extent) are cleared as soon as
  the rules below allow.

A bit is cleared only once the data it covers is durable on this array: a bit cleared while the
region's data is still only in the page cache (or a disk's write cache) would let a power cut
leave the replicas different with nothing left to compare. A pass of ``clear_idle`` (every
second) keeps this order:

1. Candidates: extents chosen above with no write marked or touched for longer than any write
   can be held (``hold``, the arrays' ``max_request_hold``), so every write to them has been
   applied, and of them the regions not kept by the caller (on a primary: dirty, the peer lacks
   it; on a secondary after a crash: not yet reported to the primary).
2. The volume's data is made durable: every write to a candidate was applied by its last mark
   or touch + ``hold``, so a volume flush that began after that covers it. Candidates that
   the volume's latest completed flush (a host's FLUSH, usually) covers are cleared at once;
   the others wait up to ``flush_wait`` seconds for a host flush, then the pass makes one
   itself (``Volume.flush``: fdatasync in a worker thread) for all of them. A host that
   flushes at least that often never costs an extra sync; one that never flushes costs one
   per ``flush_wait`` seconds at most, and only while extents leave the hot set. A flush covers
   every write applied before it began, however it was applied: buffered pwrite (host,
   mirrored, forwarded and resync writes), fallocate (zeroes, trims), O_DIRECT and RWF_DSYNC
   writes (an fdatasync also flushes the device's write cache).
3. Only candidates still idle (no write marked or touched since step 1: such a write may have
   been applied after the sync began) are cleared, and of them only regions still not kept.
4. The bitmap pages with those bits cleared are written without a sync: they can reach the disk
   only after step 2 returned, when the data they stop covering is already durable; if a crash
   comes first, the stale set bit only costs a digest comparison.

Writes never wait for a clear pass (``mark`` and ``clear_idle`` share a lock only around bitmap
file writes). After a failed volume flush no bit is cleared until the node restarts: Linux may
report a later fdatasync as successful although the data was lost.

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
import threading
import time

import trio

from ..config import intent_headroom
from .state import StateError

_CHUNK, _SUB = 4096, 64  # bitmap bytes compared at once: all-zero runs are skipped at memcmp speed
_ZERO = bytes(_CHUNK)
_PAGE = 4096  # bitmap bytes written at once by a transaction: a file system page
_PAGE_REGIONS = _PAGE * 8


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
    def __init__(self, path: str, size: int, region: int, *, volume, flush_wait: float = 5.0,
                 extent: int = 4 << 20, hot: int = 16 << 30, idle: float = 300.0, ahead: int = 16 << 20):
        """``volume``: the ``Volume`` whose regions this log covers (its ``flush``,
        ``flushed_from`` and ``flush_failed``); ``flush_wait``: how long idle extents wait for
        a host's flush before a clear pass flushes the volume itself; ``extent``: bytes marked
        at once (whole regions, at least one); ``hot``: bytes of extents kept marked while
        written (the LRU budget); ``idle``: seconds without a write after which an extent is
        cleared even within the budget; ``ahead``: bytes around a cold extent (the aligned group
        of extents holding it) marked with it while that leaves the hot set an eighth below its
        budget (where the LRU's batches bring it)."""
        self.path = path
        self.volume = volume
        self.flush_wait = flush_wait
        self.region = region
        self.nregions = (size + region - 1) // region
        self.ext = max(1, extent // region)  # regions per extent
        self.nextents = (self.nregions + self.ext - 1) // self.ext
        self.budget = max(1, hot // (self.ext * region))  # hot extents kept marked
        # Extents marked in one go (an aligned group) while the budget has room.
        self.ahead = max(1, ahead // (self.ext * region))
        self.headroom = intent_headroom(self.budget)  # an eviction batch brings the set this far below
        self.idle = idle
        nbytes = (self.nregions + 7) // 8
        self.bits = bytearray(nbytes)  # what we want set (memory)
        self.durable = bytearray(nbytes)  # what is set on disk and synced
        # The hot set: monotonic time of the last write to each extent written since it was
        # marked, or of its mark for an extent marked ahead (absent: long ago). Only extents
        # written or marked with one are in it, so it stays about as small as the working set,
        # and its size is what the budget bounds.
        self.last: dict[int, float] = {}
        # Set bits may lie outside the hot set (loaded at start, set_sync, kept regions of an
        # evicted extent): the next pass scans the bitmap for them.
        self._loose = True
        self.trusted = False  # the file existed and matched: ``loaded`` holds its bits
        self.loaded = bytearray(nbytes)
        self.problem = ""
        self.on_error = None  # callback(OSError) when the file cannot be written (the node stops)
        # Counters (showrcopy, metrics): volume flushes made by clear passes (not by hosts),
        # extents marked, metadata transactions (fdatasyncs of the bitmap), extents evicted by
        # the budget and cleared after ``idle``.
        self.data_syncs = self.marks = self.meta_syncs = self.evictions = self.idle_clears = 0
        self.marked_ahead = 0  # of ``marks``: extents marked with a cold neighbour, not written
        self._lock = trio.Lock()  # one metadata transaction at a time; concurrent marks share it
        # Bitmap pages (_PAGE bytes) changed in memory since written, and written but not synced:
        # a transaction writes only those, not the whole bitmap (2 MiB for 4 TiB).
        self._dirty: set[int] = set()
        self._unsynced: set[int] = set()
        # File writes from worker threads and set_sync's on the event loop's thread take the
        # bitmap's bytes under this lock, so an older copy never lands after a newer one.
        self._io = threading.Lock()
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
        self._write_sync_all()

    def _write_sync_all(self) -> None:
        """The whole bitmap, written and synced on the calling thread (rare events)."""
        try:
            with self._io:
                os.pwrite(self.fd, bytes(self.bits), _HEAD.size)
                os.fdatasync(self.fd)
        except OSError as e:
            self._failed(e)
            raise
        self.meta_syncs += 1
        self.durable[:] = self.bits
        self._dirty.clear()
        self._unsynced.clear()
        self._loose = True

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
        self._write_sync_all()

    # -- the write path --------------------------------------------------------------------------
    def ready(self, offset: int, length: int) -> bool:
        """True (and the extents touched) when every region of the range is durably marked: a
        write may go ahead without waiting. The fast paths take the slow path otherwise."""
        region = self.region
        r0 = offset // region
        r1 = (offset + length - 1) // region if length > 1 else r0
        d = self.durable
        if r0 == r1:  # most writes: one region, one extent
            if not d[r0 >> 3] & (1 << (r0 & 7)):
                return False
            self.last[r0 // self.ext] = time.monotonic()
            return True
        for r in range(r0, r1 + 1):
            if not d[r >> 3] & (1 << (r & 7)):
                return False
        now = time.monotonic()
        ext = self.ext
        for e in range(r0 // ext, r1 // ext + 1):
            self.last[e] = now
        return True

    def touch(self, offset: int, length: int) -> None:
        now = time.monotonic()
        ext = self.ext
        for e in range(offset // self.region // ext, (offset + max(length, 1) - 1) // self.region // ext + 1):
            self.last[e] = now

    async def mark(self, offset: int, length: int) -> None:
        """Set the range's extents durably: every region of each, so that later writes anywhere
        in them cost a bit test (one fdatasync, shared by concurrent markers)."""
        if self.ready(offset, length):
            return
        ext = self.ext
        e0 = offset // self.region // ext
        e1 = (offset + max(length, 1) - 1) // self.region // ext
        last, ahead = self.last, self.ahead
        now = time.monotonic()
        for e in range(e0, e1 + 1):
            if self._set_extent(e) and ahead > 1 and len(last) + ahead <= self.budget - self.headroom:
                # Its neighbours in the same transaction, at no extra sync: kept hot as if
                # written (cleared after ``idle`` or by the LRU like any other). Extents of
                # the write itself are the loop's own, not marks ahead.
                g0 = e - e % ahead
                for x in range(g0, min(g0 + ahead, self.nextents)):
                    if not e0 <= x <= e1 and self._set_extent(x):
                        self.marked_ahead += 1
                        last.setdefault(x, now)
        self.touch(offset, length)
        while not self.ready(offset, length):
            async with self._lock:  # whoever writes, writes and syncs every pending mark
                if self.ready(offset, length):
                    break
                await self._write(sync=True)

    def _set_extent(self, e: int) -> bool:
        """Set every region bit of extent ``e`` in memory (the next transaction writes the
        page); False when they were all set already (its transaction may still run)."""
        bits, ext = self.bits, self.ext
        end = min((e + 1) * ext, self.nregions)
        if all(bits[r >> 3] & (1 << (r & 7)) for r in range(e * ext, end)):
            return False
        self.marks += 1
        for r in range(e * ext, end):
            bits[r >> 3] |= 1 << (r & 7)
        self._dirty.update(range(e * ext // _PAGE_REGIONS, (end - 1) // _PAGE_REGIONS + 1))
        return True

    async def _write(self, sync: bool) -> None:
        """Write the changed bitmap pages (and, with ``sync``, those written unsynced before),
        then fdatasync when ``sync``. Under ``_lock``."""
        pages = self._dirty | self._unsynced if sync else set(self._dirty)
        self._dirty.clear()
        if sync:
            self._unsynced.clear()
        else:
            self._unsynced |= pages
        if not pages and not sync:
            return
        fd, bits = self.fd, self.bits

        def write() -> dict[int, bytes]:
            snaps = {}
            with self._io:
                for p in sorted(pages):
                    snaps[p] = data = bytes(bits[p * _PAGE:(p + 1) * _PAGE])
                    os.pwrite(fd, data, _HEAD.size + p * _PAGE)
                if sync:
                    os.fdatasync(fd)
            return snaps

        try:
            snaps = await trio.to_thread.run_sync(write)
        except OSError as e:
            self._failed(e)
            raise
        if sync:
            self.meta_syncs += 1
            # Synced now: what the copies had set and is still wanted (a bit cleared meanwhile
            # is written as 0 by that clear's own write, after this one).
            # Page-wide, as integers (a byte at a time in Python held the loop ~0.3 ms a page).
            durable = self.durable
            for p, snap in snaps.items():
                page = slice(p * _PAGE, (p + 1) * _PAGE)
                if not any(snap):
                    continue
                now_set = int.from_bytes(snap, "little") & int.from_bytes(bits[page], "little")
                merged = int.from_bytes(durable[page], "little") | now_set
                durable[page] = merged.to_bytes(len(snap), "little")

    async def clear_idle(self, hold: float, keep) -> int:
        """Clear extents that leave the hot set (LRU beyond the budget, ``idle`` without a
        write) and set bits outside it, unless ``keep(r)``, once their data is durable (the
        module's steps 1-4). Returns how many regions were cleared."""
        vol = self.volume
        if vol.flush_failed:
            return 0
        now = time.monotonic()
        cutoff = now - hold
        last = self.last
        bits = self.bits
        ext = self.ext

        def clearable(e: int) -> bool:
            for r in range(e * ext, min((e + 1) * ext, self.nregions)):
                if bits[r >> 3] & (1 << (r & 7)) and not keep(r):
                    return True
            return False

        # Step 1, candidates: extents idle for ``idle``; beyond the budget, the least recently
        # written down to ``headroom`` below it (none written within ``hold``); set bits of
        # extents not in the hot set.
        stale = now - self.idle
        cand = {e: "idle" for e, t in last.items() if t < stale and clearable(e)}
        over = len(last) - len(cand) - self.budget
        if over > 0:
            want = over + self.headroom
            for _, e in sorted((t, e) for e, t in last.items() if t < cutoff and e not in cand):
                if want <= 0:
                    break
                if clearable(e):
                    cand[e] = "lru"
                    want -= 1
        if self._loose:
            loose = False
            for r in set_bits(bits, self.nregions):
                e = r // ext
                if e in last or e in cand:
                    continue
                loose = True
                if not keep(r):
                    cand[e] = "loose"
            self._loose = loose
        if not cand:
            return 0
        # Step 2: their data made durable, by a host's flush or one of the pass's own.
        covered = vol.flushed_from - hold  # extents last written before this are durable
        waiting = [last.get(e, 0.0) for e in cand if last.get(e, 0.0) > covered]
        if waiting and min(waiting) < cutoff - self.flush_wait:
            await vol.flush()
            self.data_syncs += 1
        elif waiting:
            cand = {e: why for e, why in cand.items() if last.get(e, 0.0) <= covered}
        # Step 3: only extents still idle (no write marked or touched since step 1), and of
        # them only regions still not kept.
        n = 0
        for e, why in cand.items():
            if last.get(e, 0.0) >= cutoff:
                continue
            kept = False
            for r in range(e * ext, min((e + 1) * ext, self.nregions)):
                if bits[r >> 3] & (1 << (r & 7)):
                    if keep(r):
                        kept = True
                    else:
                        bits[r >> 3] &= ~(1 << (r & 7))
                        self.durable[r >> 3] &= ~(1 << (r & 7))
                        self._dirty.add(r // _PAGE_REGIONS)
                        n += 1
            if kept:
                self._loose = True
            if last.pop(e, None) is not None:
                if why == "lru":
                    self.evictions += 1
                elif why == "idle":
                    self.idle_clears += 1
        # Step 4: the bitmap written without a sync.
        if n:
            async with self._lock:
                await self._write(sync=False)
        return n

    def stats(self) -> dict:
        """What showrcopy and the metrics show of the log."""
        return {"marked_regions": self.count(), "hot_extents": len(self.last), "hot_extents_max": self.budget,
                "extent_bytes": self.ext * self.region, "marks": self.marks, "metadata_syncs": self.meta_syncs,
                "evictions": self.evictions, "idle_clears": self.idle_clears, "data_syncs": self.data_syncs,
                "marked_ahead": self.marked_ahead}

    def hot_extents(self) -> int:
        """Extents in the hot set (written since marked or marked ahead, not yet evicted or
        idle-cleared)."""
        return len(self.last)

    def count(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()
