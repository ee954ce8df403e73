"""What the NBD server needs from whatever stands behind an export.

The NBD server (``syncd.nbd.server``) knows nothing about volumes, groups or replication: it
asks an ``ExportCatalog`` which exports a connected client may see, and calls the async methods
of an ``Export`` for every request. The storage node implements these on top of its replicated
volumes; tests implement them on a plain file (``FileExport``).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from ..buffers import PayloadBuffers, pread
from .proto import (  # noqa: E402,F401 - the syncd:alua states, declared with the codec
    ALUA_ACTIVE_NON_OPTIMIZED,
    ALUA_ACTIVE_OPTIMIZED,
    ALUA_NAMES,
    ALUA_STANDBY,
    ALUA_TRANSITIONING,
    ALUA_UNAVAILABLE,
)


class BlockError(Exception):
    """A request failed; ``errno`` is what the client is told (mapped to an NBD error)."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or os.strerror(err))
        self.errno = err


@dataclass(frozen=True)
class ClientIdentity:
    """Who is on the other end of an NBD connection, for LUN masking."""

    address: str  # source IP address ("" for a unix socket)
    port: int = 0
    tls_name: str | None = None  # certificate CN or PSK identity, once TLS exists
    iqn: str | None = None  # the iSCSI initiator name of an iSCSI session


@dataclass(frozen=True)
class AluaState:
    state: int  # one of ALUA_*
    epoch: int


class Export(Protocol):
    name: str
    size: int
    description: str  # carries the volume WWN: "syncd volume vv1 wwn=naa.6..."
    read_only: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_zero: bool
    can_multi_conn: bool
    # NBD_FLAG_SEND_FAST_ZERO: write_zeroes(fast=True) raises BlockError(ENOTSUP), having changed
    # nothing, when it cannot zero without writing.
    can_fast_zero: bool

    async def read(self, offset: int, length: int) -> bytes | memoryview: ...

    async def write(self, offset: int, data: memoryview, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool, fast: bool = False) -> None: ...

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents as (length, flags) with NBD_STATE_HOLE=1, NBD_STATE_ZERO=2,
        starting at ``offset``, consecutive, covering at most ``length`` (the server bounds the
        reply again: see ``extents.bound``)."""
        ...

    def alua(self, client: ClientIdentity) -> AluaState: ...


class ExportCatalog(Protocol):
    def exports_for(self, client: ClientIdentity) -> dict[str, Export]:
        """The exports this client may see; an empty dict means it sees nothing (LUN masking)."""
        ...


@dataclass
class FileExport:
    """An unreplicated export of one file or block device; used by tests and the bench baseline."""

    name: str
    path: str
    read_only: bool = False
    description: str = ""
    fd: int = field(init=False, default=-1)
    size: int = field(init=False, default=0)
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_multi_conn: bool = True
    can_fast_zero: bool = True
    max_extents: int = 4096

    def __post_init__(self) -> None:
        self.fd = os.open(self.path, os.O_RDONLY if self.read_only else os.O_RDWR)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def fast_read(self, offset: int, length: int, buffers: PayloadBuffers | None = None) -> bytes | memoryview:
        return pread(self.fd, length, offset, buffers)

    def fast_write(self, offset: int, data, done) -> bool:
        try:
            os.pwrite(self.fd, data, offset)
        except OSError as e:
            done(e.errno or errno.EIO, str(e))
            return True
        done(0, "")
        return True

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        os.pwritev(self.fd, [data], offset, os.RWF_DSYNC if fua else 0)

    async def flush(self) -> None:
        os.fdatasync(self.fd)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        punch_hole(self.fd, offset, length)

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool, fast: bool = False) -> None:
        if fast:
            try:
                fast_zero(self.fd, offset, length, no_hole, stat.S_ISBLK(os.fstat(self.fd).st_mode))
            except OSError as e:
                raise BlockError(e.errno or errno.EIO, str(e)) from None
        else:
            zero_range(self.fd, offset, length, no_hole)
        if fua:
            os.fdatasync(self.fd)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        return allocation_extents(self.fd, offset, length, self.max_extents)

    def alua(self, client: ClientIdentity) -> AluaState:
        return AluaState(ALUA_ACTIVE_OPTIMIZED, 0)


@dataclass
class StaticCatalog:
    exports: dict[str, Export]

    def exports_for(self, client: ClientIdentity) -> dict[str, Export]:
        return self.exports


# --- helpers on file descriptors shared by FileExport and the node's volumes -------------------

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402

from .extents import scan  # noqa: E402

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = bytes(1 << 20)


def _fallocate_or_errno(fd: int, mode: int, offset: int, length: int) -> int:
    if _fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def _write_zero_bytes(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = min(len(_ZERO_CHUNK), end - offset)
        os.pwrite(fd, memoryview(_ZERO_CHUNK)[:n], offset)
        offset += n


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range so it reads back as zeroes (falls back to writing zeroes)."""
    err = _fallocate_or_errno(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if err in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL):
        _write_zero_bytes(fd, offset, length)
    elif err:
        raise OSError(err, os.strerror(err))


def zero_range(fd: int, offset: int, length: int, no_hole: bool) -> None:
    """Make a range read as zeroes; with ``no_hole`` keep it allocated."""
    mode = FALLOC_FL_ZERO_RANGE if no_hole else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    err = _fallocate_or_errno(fd, mode | (FALLOC_FL_KEEP_SIZE if no_hole else 0), offset, length)
    if err in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL):
        _write_zero_bytes(fd, offset, length)
    elif err:
        raise OSError(err, os.strerror(err))


def allocation_extents(fd: int, offset: int, length: int, max_extents: int = 1 << 20) -> list[tuple[int, int]]:
    """Data/hole extents of [offset, offset+length) from SEEK_DATA/SEEK_HOLE (see ``extents.scan``)."""
    return scan(fd, offset, length, max_extents)


# Errors of fallocate meaning "this file or device cannot do that mode" (EINVAL also: a range a
# block device cannot take, e.g. unaligned): nothing was changed.
_CANNOT = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL, errno.ENOSYS)


def fast_zero_mode(is_block: bool, no_hole: bool) -> int | None:
    """The fallocate mode that zeroes a range without writing data, or None when there is none.

    Files: PUNCH_HOLE (deallocates) or, to keep the range allocated (``no_hole``), ZERO_RANGE
    (unwritten extents). Block devices: PUNCH_HOLE, which the kernel turns into a write-zeroes
    (or unmap) request with no fallback: it fails, having written nothing, when the device
    cannot offload it. ZERO_RANGE on a block device falls back to writing zero pages, so a
    block device has no fast zero that keeps the range provisioned."""
    if is_block:
        return None if no_hole else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    return FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE if no_hole else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def fast_zero(fd: int, offset: int, length: int, no_hole: bool, is_block: bool) -> None:
    """Zero a range without writing data, or raise OSError(ENOTSUP) having changed nothing."""
    mode = fast_zero_mode(is_block, no_hole)
    if mode is None:
        raise OSError(errno.ENOTSUP, "a block device cannot zero a range and keep it provisioned without "
                      "writing zeroes (NO_HOLE)")
    err = _fallocate_or_errno(fd, mode, offset, length)
    if err in _CANNOT:
        raise OSError(errno.ENOTSUP, f"the backing store cannot zero without writing ({os.strerror(err)})")
    if err:
        raise OSError(err, os.strerror(err))
