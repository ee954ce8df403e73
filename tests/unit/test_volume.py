"""Local volume I/O: files and O_DIRECT, size checks, exclusive use."""


import errno
import os

import pytest

from syncd.node.volume import Volume, VolumeError

from ..guard import unavailable


async def test_direct_io_volume_reads_back_aligned_and_unaligned_writes(tmp_path):
    p = tmp_path / "d.img"
    try:
        v = Volume("vv1", str(p), size=1 << 20, direct=True)
    except VolumeError as e:
        unavailable(f"filesystem of {tmp_path} has no O_DIRECT: {e}")
    try:
        await v.write(0, b"a" * 4096)  # aligned: through the O_DIRECT descriptor
        await v.write(4096 + 10, b"b" * 100)  # unaligned: buffered descriptor
        await v.write(8192, b"c" * 4096, fua=True)
        assert await v.read(0, 4096) == b"a" * 4096
        assert v.read_sync(4096 + 10, 100) == b"b" * 100
        assert await v.read(8192, 4096) == b"c" * 4096
        await v.flush()
    finally:
        v.close()


def test_size_mismatch_and_second_user_are_refused(tmp_path):
    p = tmp_path / "v.img"
    v = Volume("vv1", str(p), size=1 << 20)
    try:
        with pytest.raises(VolumeError, match="in use by another process"):
            Volume("vv1", str(p))
    finally:
        v.close()
    with pytest.raises(VolumeError, match="is 1048576 bytes but the config says 2097152"):
        Volume("vv1", str(p), size=2 << 20)
    with pytest.raises(VolumeError, match="cannot open"):
        Volume("vv2", str(tmp_path / "missing.img"))


def test_digests_cover_each_region(tmp_path):
    p = tmp_path / "v.img"
    v = Volume("vv1", str(p), size=1 << 20)
    try:
        v.write_sync(300000, b"x")
        ds = v.digests_sync(0, 1 << 20, 262144)
        assert len(ds) == 4 and ds[0] == ds[2] == ds[3] != ds[1]
    finally:
        v.close()


def test_digests_of_holes_equal_digests_of_the_zeroes_they_read_as(tmp_path):
    """Regions SEEK_DATA finds no data in are not read; their digests are those of the zeroes
    read() returns, whatever the mix of holes, written zeroes, data and a short last region."""
    import xxhash

    size = 5 * 65536 + 4096
    v = Volume("vv1", str(tmp_path / "v.img"), size=size)
    try:
        v.write_sync(65536 + 10, b"data")  # region 1: data
        v.write_sync(3 * 65536, bytes(65536))  # region 3: written zeroes (allocated)
        v.write_sync(5 * 65536, b"end")  # the short last region
        want = [xxhash.xxh3_64_intdigest(os.pread(v.fd, min(65536, size - o), o)) for o in range(0, size, 65536)]
        assert v.digests_sync(0, size, 65536) == want
        assert v.digests_sync(65536 * 2, size - 65536 * 2, 65536) == want[2:]
        reads = []
        real = os.pread
        try:
            os.pread = lambda fd, n, off: reads.append(off) or real(fd, n, off)
            v.digests_sync(0, size, 65536)
        finally:
            os.pread = real
        assert 0 not in reads and 2 * 65536 not in reads and 4 * 65536 not in reads  # holes: not read
    finally:
        v.close()


async def test_durable_shares_flushes_among_concurrent_writers_and_covers_each(tmp_path, monkeypatch):
    """Group commit (``Volume.durable``): 16 writers that each wait for their write to be
    durable share a few flushes, and each returns only after a flush begun after its call."""
    import time

    import trio

    v = Volume("vv1", str(tmp_path / "v.img"), size=1 << 20)
    syncs = []
    real = os.fdatasync

    def fdatasync(fd):
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    done: list[tuple[float, float]] = []
    try:
        async def writer(i: int) -> None:
            v.write_sync(i * 4096, bytes([i]) * 4096)
            t = time.monotonic()
            await v.durable()
            done.append((t, v.flushed_from))

        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(writer, i)
        assert len(done) == 16 and all(flushed >= t for t, flushed in done)
        assert 1 <= len(syncs) <= 3, syncs  # shared, not one per writer
        # A flush that failed: every later wait says so, none returns as if durable.
        v.flush_failed = True
        with pytest.raises(OSError, match="a flush failed"):
            await v.durable()
    finally:
        v.close()


async def test_flushes_of_a_volume_never_run_at_once_and_a_failed_one_fails_every_caller(tmp_path, monkeypatch):
    """Found by review: Linux reports a writeback error once per open file, so of two fdatasyncs
    racing on it one may return 0 for writes the failed writeback lost; a ``durable`` flush ran
    beside a host's or ``FlushVolumes``' and could count them durable. Flushes of a volume now
    run one at a time, and when one fails, every caller waiting fails too."""
    import threading
    import time

    import trio

    v = Volume("vv1", str(tmp_path / "v.img"), size=1 << 20)
    v.on_error = lambda vol, e: None
    lock = threading.Lock()
    running, most, calls = [0], [0], []

    def fdatasync(fd):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            calls.append(fd)
        try:
            time.sleep(0.02)
            if len(calls) == 1:
                raise OSError(errno.EIO, "writeback failed")
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    errors: list[str] = []
    try:
        v.write_sync(0, b"\x01" * 4096)

        async def caller(how: str) -> None:
            try:
                await (v.flush() if how == "flush" else v.durable())
                errors.append(f"{how}: returned")
            except OSError as e:
                errors.append(f"{how}: {e.strerror}")

        async with trio.open_nursery() as n:
            for how in ("flush", "durable", "flush", "durable"):
                n.start_soon(caller, how)
                await trio.sleep(0.005)
        assert most[0] == 1 and calls == [v.fd], (most, calls)
        assert not any(e.endswith("returned") for e in errors) and len(errors) == 4, errors
        assert v.flush_failed and v.flushed_from == float("-inf")
    finally:
        v.close()


async def test_a_fua_write_syncs_a_descriptor_of_its_own(tmp_path, monkeypatch):
    """An RWF_DSYNC write syncs the file too: on the descriptor ``flush`` uses it could take the
    writeback error that flush must report. It goes through another one."""
    v = Volume("vv1", str(tmp_path / "v.img"), size=1 << 20)
    seen: list[tuple[int, int]] = []
    real = os.pwritev

    def pwritev(fd, bufs, offset, flags=0):
        seen.append((fd, flags))
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    try:
        await v.write(0, b"\x02" * 100, fua=True)
        assert seen and all(fd not in (v.fd, -1) and flags & os.RWF_DSYNC for fd, flags in seen), seen
        assert os.pread(v.fd, 100, 0) == b"\x02" * 100
        assert v.written_at >= v.flushed_from  # applied after the latest flush (none yet)
        await v.durable()
        assert v.flushed_from > v.written_at
    finally:
        v.close()
