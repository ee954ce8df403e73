"""Local volume I/O on a file or block device.

Buffered I/O runs inline on the event loop (it lands in the page cache in microseconds and a
thread hop would cost more than the copy); anything that waits for the disk (O_DIRECT, FUA,
fdatasync) runs in a worker thread so the node keeps serving meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import mmap
import os
import stat
import time

import trio
import xxhash

from ..buffers import PayloadBuffers, pread
from ..metrics.stats import IoStats
from ..nbd.export import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    _fallocate_or_errno,
    fast_zero,
    fast_zero_mode,
    punch_hole,
    zero_range,
)
from ..nbd.extents import DATA, scan

BLKGETSIZE64 = 0x80081272
ALIGN = 4096


class VolumeError(Exception):
    pass


def device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf)
        return int.from_bytes(buf, "little")
    return st.st_size


def _sysfs_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def probe_fast_zero(fd: int, path: str, size: int, is_block: bool) -> dict[bool, bool | None]:
    """What ``fast_zero`` can do here, found without changing a byte of the volume.

    Block device: no fast zero that keeps the range provisioned; without NO_HOLE, the kernel's
    no-fallback zeroing works where the device offloads write-zeroes (sysfs
    ``queue/write_zeroes_max_bytes`` > 0). File: each mode is tried on an unnamed temporary file
    (O_TMPFILE) in the same directory, if that is on the same file system; where none can be made,
    PUNCH_HOLE is tried beyond the end of the volume (KEEP_SIZE: nothing changes) and
    ZERO_RANGE stays unknown until the first request (a failed fallocate changes nothing)."""
    if is_block:
        st = os.fstat(fd)
        wz = _sysfs_int(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/queue/write_zeroes_max_bytes")
        if wz is None:  # a partition: its queue is its disk's
            wz = _sysfs_int(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/../queue/"
                            "write_zeroes_max_bytes")
        return {True: False, False: None if wz is None else wz > 0}
    found: dict[bool, bool | None] = {True: None, False: None}
    try:
        tfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        tfd = -1
    if tfd >= 0 and os.fstat(tfd).st_dev != os.fstat(fd).st_dev:  # the volume is a file mounted over another
        os.close(tfd)
        tfd = -1
    if tfd < 0:
        err = _fallocate_or_errno(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size + ALIGN, ALIGN)
        found[False] = not err if err in (0, errno.EOPNOTSUPP) else None
        return found
    try:
        os.ftruncate(tfd, 4 * ALIGN)
        for no_hole in (False, True):
            mode = fast_zero_mode(False, no_hole)
            assert mode is not None
            found[no_hole] = _fallocate_or_errno(tfd, mode, 0, 2 * ALIGN) == 0
    except OSError:
        return {True: None, False: None}
    finally:
        os.close(tfd)
    return found


def make_wwn(node_uuid: str, volume: str) -> str:
    """An NAA-6 style identifier, stable for (node, volume); the group adopts the primary's."""
    h = hashlib.sha256(f"{node_uuid}/{volume}".encode()).hexdigest()
    return "naa.6" + "0002ac" + h[:25]


class Volume:
    """One local backing store. Raises OSError on I/O failure; callers map it to a host error."""

    def __init__(self, name: str, path: str, *, size: int | None = None, direct: bool = False):
        self.name = name
        self.path = path
        self.direct = direct
        self.errors = 0  # device errors seen
        # What hosts asked of this volume at this array and the replication round trips of its
        # writes (the NBD server and the data path add to it; read when metrics are scraped).
        self.io_stats = IoStats()
        self.on_error = None  # callback(volume, OSError) on a device error (set by the node)
        # Every write applied before this monotonic time is durable: the start of the latest
        # completed flush. Frozen after a failed flush (a later fdatasync may then report
        # success for data the kernel already dropped).
        self.flushed_from = float("-inf")
        self.flush_failed = False
        self._flushing: trio.Event | None = None  # set when the running flush ends
        # Monotonic time the latest write applied here ended: every write is durable once
        # ``flushed_from`` passed it (data a resync sends to the peer is durable here first).
        self.written_at = float("-inf")
        # Monotonic time the latest write acknowledged alone (the peer not mirroring, no flush
        # before its acknowledgement) was applied here: a resync run that began before it must
        # flush again before it sends anything (set by the data path).
        self.unmirrored_at = float("-inf")
        if size is not None and not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise VolumeError(f"volume {name}: cannot open {path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise VolumeError(
                f"volume {name}: {path} is in use by another process (locked)"
            ) from None
        self.size = device_size(self.fd)
        if self.size == 0:
            os.close(self.fd)
            raise VolumeError(f"volume {name}: {path} has size 0")
        if size is not None and self.size != size:
            os.close(self.fd)
            raise VolumeError(
                f"volume {name}: {path} is {self.size} bytes but the config says {size}"
            )
        self.is_block = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        # Whether a range can be zeroed without writing data, per NO_HOLE: True, False, or None
        # (not known until tried; a failed try changes nothing). See ``fast_zero``.
        self.fast_zero_ok: dict[bool, bool | None] = probe_fast_zero(self.fd, path, self.size, self.is_block)
        self.dfd = -1
        # FUA writes that are not O_DIRECT go through a descriptor of their own. Linux reports a
        # writeback error once per open file: a sync on ``fd`` racing with one that failed could
        # return 0 and be taken for durable (found by review). Only ``flush``, one at a time,
        # syncs ``fd``; an RWF_DSYNC write syncing ``sfd`` (or ``dfd``) takes no error from it.
        try:
            self.sfd = os.open(path, os.O_RDWR)
        except OSError as e:
            os.close(self.fd)
            raise VolumeError(f"volume {name}: cannot open {path}: {e.strerror}") from None
        if direct:
            try:
                self.dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError as e:
                os.close(self.fd)
                os.close(self.sfd)
                raise VolumeError(f"volume {name}: O_DIRECT not possible on {path}: {e.strerror}") from None
            self._abuf = mmap.mmap(-1, 32 << 20)

    # -- backing device failures -----------------------------------------------------------------
    # Errors that mean the device (RAID set, disk, LUN) failed, as opposed to a bad request.
    DEVICE_ERRNOS = frozenset({errno.EIO, errno.ENOSPC, errno.ENXIO, errno.ENODEV, errno.EROFS,
                               errno.EREMOTEIO, errno.EDQUOT, errno.EBADF})

    def _failed(self, e: OSError) -> None:
        """Called on the Trio thread for every I/O error; tells the owner once per error."""
        if e.errno in self.DEVICE_ERRNOS:
            self.errors += 1
            if self.on_error is not None:
                self.on_error(self, e)

    def close(self) -> None:
        for fd in (self.fd, self.sfd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.sfd = self.dfd = -1

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range {offset}+{length} beyond {self.name} ({self.size})")

    def _aligned(self, offset: int, length: int) -> bool:
        return self.dfd >= 0 and offset % ALIGN == 0 and length % ALIGN == 0

    # -- reads ---------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        if self._aligned(offset, length):
            try:
                return await trio.to_thread.run_sync(self._read_direct, offset, length)
            except OSError as e:
                self._failed(e)
                raise
        return self.read_sync(offset, length)

    def read_sync(self, offset: int, length: int, buffers: PayloadBuffers | None = None) -> bytes | memoryview:
        """The bytes at ``offset``; a large read into one of ``buffers`` when given (the caller
        sends it and lets it go: see ``syncd.buffers``)."""
        try:
            data = pread(self.fd, length, offset, buffers)
            if len(data) != length:  # the device shrank or went away under us
                raise OSError(errno.EIO, f"short read on {self.name} at {offset}")
        except OSError as e:
            self._failed(e)
            raise
        return data

    def _read_direct(self, offset: int, length: int) -> bytes:
        buf = mmap.mmap(-1, length)
        n = os.preadv(self.dfd, [buf], offset)
        if n != length:
            raise OSError(errno.EIO, f"short read on {self.name} at {offset}")
        return bytes(buf)

    # -- writes --------------------------------------------------------------------------------
    async def write(self, offset: int, data, fua: bool = False) -> None:
        if fua or self._aligned(offset, len(data)):
            try:
                await trio.to_thread.run_sync(self._write_blocking, offset, data, fua)
            except OSError as e:
                self._failed(e)
                raise
            self.written_at = time.monotonic()
        else:
            self.write_sync(offset, data)

    def write_sync(self, offset: int, data) -> None:
        try:
            n = os.pwrite(self.fd, data, offset)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write on {self.name} at {offset}")
        except OSError as e:
            self._failed(e)
            raise
        self.written_at = time.monotonic()

    def _write_blocking(self, offset: int, data, fua: bool) -> None:
        if self._aligned(offset, len(data)):
            buf = mmap.mmap(-1, len(data))
            buf[:] = data
            n = os.pwritev(self.dfd, [buf], offset, os.RWF_DSYNC if fua else 0)
        else:
            n = os.pwritev(self.sfd if fua else self.fd, [data], offset, os.RWF_DSYNC if fua else 0)
        if n != len(data):
            raise OSError(errno.ENOSPC, f"short write on {self.name} at {offset}")

    async def zero(self, offset: int, length: int, no_hole: bool, fua: bool, fast: bool = False) -> None:
        if fast:
            self.fast_zero_sync(offset, length, no_hole)
        else:
            try:
                zero_range(self.fd, offset, length, no_hole or self.is_block)
            except OSError as e:
                self._failed(e)
                raise
        self.written_at = time.monotonic()
        if fua:
            await self.flush()

    def fast_zero_sync(self, offset: int, length: int, no_hole: bool) -> None:
        """Zero without writing data, or raise OSError(ENOTSUP) having changed nothing."""
        if self.fast_zero_ok[no_hole] is False:
            raise OSError(errno.ENOTSUP, f"{self.name}: {self.path} cannot zero without writing"
                          f"{' and keep the range allocated' if no_hole else ''}")
        try:
            fast_zero(self.fd, offset, length, no_hole, self.is_block)
        except OSError as e:
            if e.errno == errno.ENOTSUP:
                self.fast_zero_ok[no_hole] = False
            else:
                self._failed(e)
            raise
        self.written_at = time.monotonic()
        self.fast_zero_ok[no_hole] = True

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        try:
            if self.is_block:
                # Discard on a block device may not read back as zeroes; replicas must agree,
                # so a trim is applied as zeroing on both sides.
                zero_range(self.fd, offset, length, True)
            else:
                punch_hole(self.fd, offset, length)
        except OSError as e:
            self._failed(e)
            raise
        self.written_at = time.monotonic()
        if fua:
            await self.flush()

    async def flush(self) -> None:
        """Make every write applied so far durable, whichever way it was applied (buffered,
        fallocate, O_DIRECT through ``dfd``: one inode; on a block device the device's write
        cache is flushed too): ``durable``."""
        await self.durable()

    async def durable(self) -> None:
        """Return once every write applied before this call is durable: a flush begun after the
        call has ended. One flush of the volume runs at a time, and the callers waiting share
        them (group commit): a caller that finds one running waits for it, then for the next,
        which serves every caller waiting by then. Never two at once: of two fdatasyncs racing
        on one open file, Linux may report a writeback error to one only, and the other's 0
        would count writes durable that the failed writeback lost (found by review). Raises
        OSError when a flush failed (then or before): nothing is durable after that."""
        want = time.monotonic()
        while self.flushed_from < want:
            if self.flush_failed:
                raise OSError(errno.EIO, f"volume {self.name}: a flush failed; writes since may not be durable")
            running = self._flushing
            if running is not None:
                await running.wait()
                continue
            ev = self._flushing = trio.Event()
            try:
                await self._fdatasync()
            finally:
                self._flushing = None
                ev.set()

    async def _fdatasync(self) -> None:
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)
        except OSError as e:
            self.flush_failed = True
            self._failed(e)
            raise
        if not self.flush_failed:
            self.flushed_from = max(self.flushed_from, t0)

    def sync_blocking(self) -> None:
        """``flush`` on the calling thread, at shutdown (when nothing else runs and nobody is
        left to tell of a device failure: the caller reports it). After a failed flush it
        fails too: this descriptor may report success for what the failed writeback lost."""
        if self.flush_failed:
            raise OSError(errno.EIO, f"volume {self.name}: a flush failed before")
        os.fdatasync(self.fd)

    def allocation(self, offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """Holes (HOLE|ZERO) and data of the range, from SEEK_DATA/SEEK_HOLE. A block device is
        all data: the kernel does not say which of its blocks are provisioned (a loop device's
        backing file is not asked; see docs/design.md, "Thin volumes")."""
        if self.is_block:
            return [(length, DATA)]
        return scan(self.fd, offset, length, max_extents)

    # -- digests -------------------------------------------------------------------------------
    def digests_sync(self, offset: int, length: int, region: int) -> list[int]:
        """xxh3 of each ``region``-sized piece of the range. A piece that is all hole in a file
        (SEEK_DATA finds no data in it) reads as zeroes and is not read: a thin volume's
        initial sync compares its unwritten space without reading it."""
        out = []
        end = offset + length
        data_at = -1  # the next offset SEEK_DATA reported, at or after ``offset``
        while offset < end:
            n = min(region, end - offset)
            if not self.is_block and data_at < offset:
                try:
                    data_at = os.lseek(self.fd, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:  # ENXIO: no data from here to the end
                        raise
                    data_at = self.size
            if not self.is_block and data_at >= offset + n:
                out.append(_zero_digest(n))
                offset += n
                continue
            data = os.pread(self.fd, n, offset)
            if len(data) != n:
                raise OSError(errno.EIO, f"short read on {self.name} at {offset}")
            out.append(xxhash.xxh3_64_intdigest(data))
            offset += n
        return out

    async def digests(self, offset: int, length: int, region: int) -> list[int]:
        try:
            return await trio.to_thread.run_sync(self.digests_sync, offset, length, region)
        except OSError as e:
            self._failed(e)
            raise


@functools.lru_cache(maxsize=8)
def _zero_digest(n: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(n))
