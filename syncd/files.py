"""Small file helpers shared by the daemons: crash-safe replacement of a metadata file, an
exclusive lock on a data directory, and descriptors kept in reserve for metadata writes."""

from __future__ import annotations

import errno
import fcntl
import os

# Descriptors held open (on /dev/null) so that a metadata write finds one even when clients
# have taken every other: a node that cannot write its metadata must stop, and running out of
# descriptors is not a reason to stop.
_reserve: list[int] = []
_reserve_wanted = 0
RESERVE = 2


def reserve_fds(n: int = RESERVE) -> None:
    """Hold up to ``n`` descriptors in reserve (as many as can be opened now; topped up again
    after every metadata write)."""
    global _reserve_wanted
    _reserve_wanted = max(_reserve_wanted, n)
    while len(_reserve) < n:
        try:
            _reserve.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return


def open_fd(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open``, falling back on a reserved descriptor when none is left (EMFILE, ENFILE)."""
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE) or not _reserve:
            raise
    os.close(_reserve.pop())
    return os.open(path, flags | os.O_CLOEXEC, mode)


def lock_dir(d: str) -> int | None:
    """Create ``d`` and hold its exclusive lock for this process's life (None if taken)."""
    os.makedirs(d, exist_ok=True)
    fd = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a mix:
    write a temporary file, fsync it, rename it over, fsync the directory."""
    tmp = path + ".tmp"
    try:
        fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = open_fd(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if _reserve_wanted:
            reserve_fds(_reserve_wanted)
