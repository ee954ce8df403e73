"""base:allocation extents: a file's holes read back, stale regions reported as data, replies
bounded by the protocol's rules; fast zero on files changes nothing when it cannot be fast."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.nbd import extents as x
from syncd.nbd.export import fast_zero, punch_hole
from syncd.node.volume import Volume, probe_fast_zero

K = 4096


def covers(ext, length):
    return sum(n for n, _ in ext) == length and all(n > 0 for n, _ in ext)


@pytest.fixture
def sparse(tmp_path):
    """A 1 MiB file: data at [64K, 128K) and [512K, 516K), holes elsewhere."""
    p = tmp_path / "vol.img"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 1 << 20)
    os.pwrite(fd, b"a" * (64 << 10), 64 << 10)
    os.pwrite(fd, b"b" * K, 512 << 10)
    os.fsync(fd)
    yield fd, str(p)
    os.close(fd)


def test_scan_reports_the_files_holes_and_data(sparse):
    fd, _ = sparse
    assert x.scan(fd, 0, 1 << 20, 100) == [(64 << 10, x.HOLE), (64 << 10, x.DATA), (384 << 10, x.HOLE),
                                            (K, x.DATA), ((1 << 20) - (516 << 10), x.HOLE)]
    # A range starting inside data, ending inside a hole: clipped to the request.
    assert x.scan(fd, 100 << 10, 100 << 10, 100) == [(28 << 10, x.DATA), (72 << 10, x.HOLE)]


def test_scan_stops_at_the_extent_limit_covering_the_start(sparse):
    fd, _ = sparse
    ext = x.scan(fd, 0, 1 << 20, 2)
    assert ext == [(64 << 10, x.HOLE), (64 << 10, x.DATA)]
    assert x.scan(fd, 64 << 10, (1 << 20) - (64 << 10), 1)[0] == (64 << 10, x.DATA)


def test_trim_makes_a_hole_that_reads_as_zero(sparse):
    fd, _ = sparse
    punch_hole(fd, 64 << 10, 64 << 10)
    assert x.scan(fd, 0, 512 << 10, 100) == [(512 << 10, x.HOLE)]
    assert os.pread(fd, 64 << 10, 64 << 10) == bytes(64 << 10)


def test_regions_not_in_sync_are_reported_as_data():
    ext = [(1 << 20, x.HOLE)]
    # A stale region in the middle splits the hole; one overlapping the start and the end too.
    assert x.cover_with_data(ext, 0, [(256 << 10, 256 << 10)]) == [(256 << 10, x.HOLE), (256 << 10, x.DATA),
                                                                   (512 << 10, x.HOLE)]
    assert x.cover_with_data(ext, 1 << 20, [(0, 1 << 20)]) == ext  # outside the range: nothing changes
    three = [(K, x.HOLE), (K, x.DATA), (K, x.HOLE)]  # at 8K
    assert x.cover_with_data(three, 8 * K, [(7 * K, 2 * K)]) == [(2 * K, x.DATA), (K, x.HOLE)]
    assert x.cover_with_data(three, 8 * K, [(10 * K, 5 * K), (7 * K, 2 * K)]) == [(3 * K, x.DATA)]


@given(st.lists(st.tuples(st.integers(1, 5), st.sampled_from([x.DATA, x.HOLE])), min_size=1, max_size=12),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10)), max_size=5), st.integers(0, 7))
def test_cover_with_data_keeps_the_byte_map_except_stale_bytes(ext, stale, offset):
    ext = [(n * 512, f) for n, f in ext]
    stale = [(offset * 512 + s * 512, n * 512) for s, n in stale]
    out = x.cover_with_data(ext, offset * 512, stale)
    length = sum(n for n, _ in ext)
    assert covers(out, length)
    assert all(a[1] != b[1] for a, b in zip(out, out[1:], strict=False))  # merged

    def bytemap(e):
        m = []
        for n, f in e:
            m += [f] * (n // 512)
        return m

    before, after = bytemap(ext), bytemap(out)
    for i, (f0, f1) in enumerate(zip(before, after, strict=True)):
        pos = offset * 512 + i * 512
        in_stale = any(s <= pos < s + n for s, n in stale)
        assert f1 == (x.DATA if in_stale else f0)


@given(st.lists(st.tuples(st.integers(0, 1 << 33), st.sampled_from([x.DATA, x.HOLE])), max_size=10),
       st.integers(1, (1 << 32) - 1), st.integers(1, 5), st.booleans())
def test_bound_keeps_the_protocols_rules(ext, length, limit, req_one):
    out = x.bound(ext, length, limit, req_one)
    assert 1 <= len(out) <= (1 if req_one else limit)
    assert all(0 < n <= 0xFFFFFFFF for n, _ in out)
    assert sum(n for n, _ in out) <= length
    nonempty = [(n, f) for n, f in ext if n > 0]
    if nonempty:
        assert out[0][1] == nonempty[0][1]  # covers the start of the range, as the export said
    else:
        assert out == [(length, x.DATA)]


def test_fast_zero_on_a_file_punches_or_zeroes_in_place(sparse):
    fd, _ = sparse
    fast_zero(fd, 64 << 10, 32 << 10, no_hole=False, is_block=False)
    assert x.scan(fd, 64 << 10, 64 << 10, 10) == [(32 << 10, x.HOLE), (32 << 10, x.DATA)]
    assert os.pread(fd, 32 << 10, 64 << 10) == bytes(32 << 10)
    assert os.pread(fd, 32 << 10, 96 << 10) == b"a" * (32 << 10)


def test_volume_probe_finds_fast_zero_on_this_file_system_without_changing_the_volume(sparse):
    fd, path = sparse
    before = os.pread(fd, 1 << 20, 0), x.scan(fd, 0, 1 << 20, 100), os.fstat(fd).st_size
    found = probe_fast_zero(fd, path, 1 << 20, False)
    assert found[False] is True  # the test file system punches holes (ext4, xfs, btrfs, tmpfs)
    assert (os.pread(fd, 1 << 20, 0), x.scan(fd, 0, 1 << 20, 100), os.fstat(fd).st_size) == before
    assert sorted(os.listdir(os.path.dirname(path))) == ["vol.img"]  # the probe left no file


def test_volume_refuses_fast_zero_it_cannot_do_and_changes_nothing(tmp_path):
    v = Volume("vv1", str(tmp_path / "v.img"), size=1 << 20)
    try:
        v.write_sync(0, b"z" * (1 << 20))
        v.fast_zero_ok[True] = False  # as found on a file system without ZERO_RANGE (tmpfs)
        with pytest.raises(OSError) as e:
            v.fast_zero_sync(0, 1 << 20, no_hole=True)
        assert e.value.errno == errno.ENOTSUP
        assert v.read_sync(0, 1 << 20) == b"z" * (1 << 20)
        v.fast_zero_sync(0, K, no_hole=False)
        assert v.read_sync(0, 2 * K) == bytes(K) + b"z" * K
        assert v.allocation(0, 2 * K, 10) == [(K, x.HOLE), (K, x.DATA)]
    finally:
        v.close()
