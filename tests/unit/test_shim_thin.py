"""The host shim keeps thin-volume semantics: base:allocation asked of the array of the path a
read would take, its reply validated (untrusted bytes: anything malformed is answered as all
data, never an error to the host), write-zeroes flags passed through, and a fast zero an array
refuses returned ENOTSUP without failing the path or zeroing slowly elsewhere.

Arrays here are the real NBD server over a real file (``FileExport``), or, for malformed
replies, a hostile server whose bytes hypothesis writes."""

from __future__ import annotations

import errno
import os
import struct

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.config import NbdLimits
from syncd.host import HostConfig, Path, Shim, ShimVolume
from syncd.nbd import proto as p
from syncd.nbd.client import NBDClient, NBDDisconnected, NBDError, _Buf, open_nbd
from syncd.nbd.export import BlockError, FileExport, StaticCatalog
from syncd.nbd.extents import scan, validate
from syncd.nbd.server import NBDServer

MiB = 1 << 20
AO, ANO, U = 0, 1, 3
HOLE, DATA = 3, 0


# -- extent validation ----------------------------------------------------------------------------

descriptors = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=12)


@given(descriptors, st.integers(1, 2**32 - 1))
def test_validate_keeps_only_replies_that_keep_the_rules(raw, length):
    out = validate(raw, length)
    if not raw or any(n == 0 for n, _ in raw) or sum(n for n, _ in raw) > length:
        assert out is None
    else:  # unknown status bits are ignored, as the protocol tells clients
        assert out == [(n, f & 3) for n, f in raw]


@st.composite
def well_formed(draw):
    length = draw(st.integers(1, 1 << 40))
    cuts = sorted(set(draw(st.lists(st.integers(1, length), max_size=10))))
    ends = cuts if cuts else [length]
    pos, raw = 0, []
    for e in ends:
        if e > pos:
            raw.append((e - pos, draw(st.sampled_from([0, 1, 2, 3]))))
            pos = e
    return raw, length


@given(well_formed())
def test_validate_accepts_every_well_formed_reply_including_a_short_one(case):
    raw, length = case
    assert validate(raw, length) == raw


# -- a real array behind the shim -----------------------------------------------------------------

def seek_map(path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return scan(fd, 0, os.fstat(fd).st_size, 1 << 20)
    finally:
        os.close(fd)


def shim_volume(size: int, **cfg) -> ShimVolume:
    shim = Shim(HostConfig("h", "s", (), "a", **cfg))
    v = ShimVolume(shim, "vv1", "naa.1", size)
    shim.volumes["vv1"] = v
    return v


@pytest.fixture
async def array(tmp_path):
    img = tmp_path / "A.img"
    img.write_bytes(b"")
    os.truncate(img, 4 * MiB)
    exp = FileExport("vv1", str(img), description="syncd volume vv1 wwn=naa.1")
    sock = str(tmp_path / "a.sock")
    async with trio.open_nursery() as n:
        await n.start(NBDServer(StaticCatalog({"vv1": exp})).serve_unix, sock)
        yield img, f"nbd+unix:///vv1?socket={sock}"
        n.cancel_scope.cancel()
    exp.close()


async def test_structured_path_client_reads_writes_and_reports_the_arrays_holes(array):
    img, uri = array
    async with open_nbd(uri, structured=True) as c:
        assert c.structured and c.allocation_context is not None and c.flags & p.TFLAG_SEND_FAST_ZERO
        await c.write(MiB, b"\x5a" * MiB)
        assert await c.read(MiB - 4096, 8192) == bytes(4096) + b"\x5a" * 4096
        assert await c.block_status(0, 4 * MiB) == [(MiB, HOLE), (MiB, DATA), (2 * MiB, HOLE)]
        assert await c.block_status(0, 4 * MiB, req_one=True) == [(MiB, HOLE)]
        with pytest.raises(NBDError) as ei:
            await c.read(4 * MiB, 4096)  # an error chunk
        assert ei.value.errno == errno.EINVAL


async def test_host_block_status_through_the_shim_follows_the_servers_rules(array, tmp_path):
    """A host's BLOCK_STATUS through the shim's own NBD server: the array's holes, REQ_ONE one
    extent, at most the shim's block_status_max_extents, each reply starting at the offset."""
    img, uri = array
    v = shim_volume(4 * MiB, limits=NbdLimits(block_status_max_extents=2))
    sock = str(tmp_path / "shim.sock")
    async with open_nbd(uri, structured=True) as path_client, trio.open_nursery() as n:
        v.paths.append(Path("A", uri, state=AO, epoch=1, client=path_client))
        v.note_change()
        v.fast_zero_offered = bool(path_client.flags & p.TFLAG_SEND_FAST_ZERO)
        await n.start(NBDServer(v.shim, limits=v.shim.cfg.limits).serve_unix, sock)
        host = f"nbd+unix:///vv1?socket={sock}"
        async with open_nbd(host, structured=True) as h:
            assert h.flags & p.TFLAG_SEND_FAST_ZERO
            await h.write(MiB, b"\x11" * MiB)
            await h.write(3 * MiB, b"\x22" * 4096)
            assert await h.block_status(0, 4 * MiB) == [(MiB, HOLE), (MiB, DATA)]  # bounded at 2
            assert await h.block_status(2 * MiB, 2 * MiB) == [(MiB, HOLE), (4096, DATA)]
            assert await h.block_status(3 * MiB + 4096, MiB - 4096) == [(MiB - 4096, HOLE)]
            assert await h.block_status(MiB + 512, 4096, req_one=True) == [(4096, DATA)]
            # NO_HOLE reaches the array: the range stays allocated; without it, a hole.
            await h.zero(MiB, 4096, no_hole=True)
            await h.zero(MiB + 4096, 4096)
            assert seek_map(img)[:3] == [(MiB, HOLE), (4096, DATA), (4096, HOLE)]
            assert await h.read(MiB, 8192) == bytes(8192)
            # FAST_ZERO passes through (a file on this file system can punch: done).
            await h.zero(MiB + 8192, MiB - 8192, fast=True)
            assert await h.block_status(0, 4 * MiB) == [(MiB, HOLE), (4096, DATA)]
            assert await h.block_status(MiB + 4096, 3 * MiB - 4096) == [(2 * MiB - 4096, HOLE), (4096, DATA)]
        n.cancel_scope.cancel()


async def test_no_usable_path_answers_all_data_and_logs_once(caplog):
    v = shim_volume(4 * MiB)
    v.paths.append(Path("A", "nbd://x:1/vv1", state=U, epoch=1))
    v.note_change()
    assert await v.allocation(0, 4 * MiB) == [(4 * MiB, DATA)]
    assert await v.allocation(MiB, 4096) == [(4096, DATA)]
    assert v.stats["allocation_as_data"] == 2
    assert sum("block status answered as all data" in r.message for r in caplog.records) == 1


# -- fast zero: ENOTSUP is an answer, not a path failure -------------------------------------------

class Refusing:
    """An array connection answering a fast zero with ``err`` (ENOTSUP: its store cannot zero
    without writing, as a ramfs replica answers in tests/system/test_thin.py; 0: done), and
    recording what it was sent."""

    closed = False

    def __init__(self, log, err=errno.ENOTSUP):
        self.log, self.err = log, err

    async def zero(self, offset, length, fua=False, no_hole=False, fast=False):
        self.log.append((self, "zero", offset, length, fua, no_hole, fast))
        if fast and self.err:
            raise NBDError(self.err, "cannot")

    def abort_on_close(self):
        self.closed = True


async def test_fast_zero_enotsup_goes_back_to_the_host_and_the_path_stays():
    v = shim_volume(4 * MiB)
    log: list = []
    a, b = Refusing(log), Refusing(log)
    v.paths += [Path("A", "nbd://x:1/vv1", state=AO, epoch=1, client=a),
                Path("B", "nbd://x:2/vv1", state=ANO, epoch=1, client=b)]
    v.note_change()
    with pytest.raises(BlockError) as ei:
        await v.write_zeroes(0, 4096, True, True, fast=True)
    assert ei.value.errno == errno.ENOTSUP
    assert log == [(a, "zero", 0, 4096, True, True, True)]  # once, flags as the host sent them
    assert v.paths[0].client is a and v.paths[0].state == AO and v.paths[0].errors == 0
    assert v.stats["failed"] == v.stats["reissued"] == 0
    await v.write_zeroes(0, 4096, False, True)  # a plain one is done
    assert log[-1] == (a, "zero", 0, 4096, False, True, False)


async def test_fast_zero_eshutdown_is_reissued_on_the_other_path():
    v = shim_volume(4 * MiB)
    log: list = []
    a, b = Refusing(log, errno.ESHUTDOWN), Refusing(log, 0)
    v.paths += [Path("A", "nbd://x:1/vv1", state=AO, epoch=1, client=a),
                Path("B", "nbd://x:2/vv1", state=ANO, epoch=1, client=b)]
    v.note_change()
    await v.write_zeroes(0, 4096, False, False, fast=True)
    assert [x[0] for x in log] == [a, b] and log[-1][-1] is True and v.paths[0].state == U


# -- a hostile array: malformed replies are answered as all data -----------------------------------

CTX = 7
REQ_LEN = 4 * MiB


def chunk(handle, rtype, body, done=True):
    return p.SHDR.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE if done else 0, rtype, handle, len(body)) + body


def status_body(ctx, descs):
    return p.U32.pack(ctx) + b"".join(struct.pack(">II", n, f) for n, f in descs)


@st.composite
def hostile_reply(draw):
    """(a function of the request's handle giving the array's reply bytes, the descriptors
    when the reply is well framed and carries exactly one base:allocation chunk)."""
    kind = draw(st.sampled_from(["status", "two", "other_ctx", "error", "simple", "garbage", "short", "none"]))
    descs = draw(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 4, 2**31])),
                          max_size=6))
    err = draw(st.integers(0, 2**32 - 1))
    junk = draw(st.binary(max_size=64))
    rtype = draw(st.integers(0, 0xFFFF))
    if kind == "status":
        return (lambda h, *_: chunk(h, p.REPLY_TYPE_BLOCK_STATUS, status_body(CTX, descs))), descs
    if kind == "two":
        return (lambda h, *_: chunk(h, p.REPLY_TYPE_BLOCK_STATUS, status_body(CTX, descs), False)
                + chunk(h, p.REPLY_TYPE_BLOCK_STATUS, status_body(CTX, descs))), None
    if kind == "other_ctx":
        return (lambda h, *_: chunk(h, p.REPLY_TYPE_BLOCK_STATUS, status_body(CTX + 1, descs))), None
    if kind == "error":
        return (lambda h, *_: chunk(h, p.REPLY_TYPE_ERROR, struct.pack(">IH", err, len(junk) + rtype % 3) + junk)), None
    if kind == "simple":
        return (lambda h, *_: p.SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, err, h)), None
    if kind == "garbage":
        return (lambda h, *_: chunk(h, rtype, junk, bool(rtype & 1))), None
    if kind == "short":
        return (lambda h, *_: chunk(h, p.REPLY_TYPE_BLOCK_STATUS, status_body(CTX, descs))[: len(junk) % 40]), None
    return (lambda h, *_: chunk(h, p.REPLY_TYPE_NONE, b"")), None


async def hostile_array(stream, reply) -> None:
    """Options as a real array answers them, then one reply written by hypothesis; then EOF."""
    buf = bytearray()

    async def need(n):
        while len(buf) < n:
            d = await stream.receive_some(65536)
            if not d:
                raise trio.EndOfChannel
            buf.extend(d)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    try:
        while True:
            _, opt, ln = p.OPT_HDR.unpack(await need(16))
            await need(ln)
            if opt == p.OPT_SET_META_CONTEXT:
                q = b"base:allocation"
                await stream.send_all(p.OPT_REPLY.pack(p.OPT_REPLY_MAGIC, opt, p.REP_META_CONTEXT, 4 + len(q))
                                      + p.U32.pack(CTX) + q)
            if opt == p.OPT_GO:
                info = p.ServerConnection.info_export(REQ_LEN, p.TFLAG_HAS_FLAGS)
                await stream.send_all(p.OPT_REPLY.pack(p.OPT_REPLY_MAGIC, opt, p.REP_INFO, len(info)) + info)
            await stream.send_all(p.OPT_REPLY.pack(p.OPT_REPLY_MAGIC, opt, p.REP_ACK, 0))
            if opt == p.OPT_GO:
                break
        _, _, _, handle, offset, length = p.REQ.unpack(await need(p.REQ.size))
        await stream.send_all(reply(handle, offset, length))
    except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_reply(), st.integers(1, REQ_LEN))
def test_a_hostile_arrays_block_status_never_reaches_the_host_as_an_error(case, length):
    reply, descs = case

    async def main():
        v = shim_volume(REQ_LEN, io_timeout=5.0)
        mine, theirs = trio.testing.memory_stream_pair()
        c = NBDClient(mine, "vv1", _Buf(mine), structured=True)
        async with trio.open_nursery() as n:
            n.start_soon(hostile_array, theirs, reply)
            await c._handshake()
            assert c.allocation_context == CTX
            await n.start(c._receiver)
            v.paths.append(Path("A", "nbd://x:1/vv1", state=AO, epoch=1, client=c))
            v.note_change()
            with trio.fail_after(4):  # the array closes after its reply: nothing may hang
                out = await v.allocation(0, length)
            n.cancel_scope.cancel()
        return out

    out = trio.run(main)
    assert out and all(n > 0 and f & ~3 == 0 for n, f in out) and sum(n for n, _ in out) <= length
    good = validate(descs, length) if descs is not None else None
    assert out == (good if good is not None else [(length, DATA)])


def data_chunk(h, off, data, done=False):
    return chunk(h, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(off) + data, done)


def hole_chunk(h, off, n, done=False):
    return chunk(h, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE_BODY.build({"offset": off, "length": n}), done)


READS = {  # the array's reply to a read of 3 x 4096 bytes at 8192 -> the bytes, or None: hard disconnect
    "one chunk": (lambda h, o, n: data_chunk(h, o, b"a" * n, True), b"a" * 12288),
    "out of order with a hole": (lambda h, o, n: data_chunk(h, o + 8192, b"c" * 4096) + hole_chunk(h, o + 4096, 4096)
                                 + data_chunk(h, o, b"a" * 4096) + chunk(h, p.REPLY_TYPE_NONE, b""),
                                 b"a" * 4096 + bytes(4096) + b"c" * 4096),
    "overlapping": (lambda h, o, n: data_chunk(h, o, b"a" * 8192) + data_chunk(h, o + 4096, b"b" * 8192, True), None),
    "a gap before DONE": (lambda h, o, n: data_chunk(h, o, b"a" * 4096) + chunk(h, p.REPLY_TYPE_NONE, b""), None),
    "outside the request": (lambda h, o, n: data_chunk(h, o + 4096, b"a" * n, True), None),
    "an empty hole": (lambda h, o, n: hole_chunk(h, o, 0, True), None),
    "a simple reply with data": (lambda h, o, n: p.SIMPLE.pack(p.SIMPLE_REPLY_MAGIC, 0, h) + b"a" * n, None),
    "status chunk to a read": (lambda h, o, n: chunk(h, p.REPLY_TYPE_BLOCK_STATUS, status_body(CTX, [(n, 0)])), None),
    "NONE without DONE": (lambda h, o, n: chunk(h, p.REPLY_TYPE_NONE, b"", False), None),
    "an unknown reply type": (lambda h, o, n: chunk(h, 77, b"", True), None),
    "a reply to another request": (lambda h, o, n: data_chunk(h + 1, o, b"a" * n, True), None),
    "error chunk then data": (lambda h, o, n: chunk(h, p.REPLY_TYPE_ERROR, struct.pack(">IH", 5, 2) + b"io", False)
                              + data_chunk(h, o, b"a" * n, True), errno.EIO),
}


@pytest.mark.parametrize("case", sorted(READS))
async def test_structured_reads_are_reassembled_and_broken_ones_end_the_connection(case):
    """The shim's paths now read with structured replies: chunks in any order and holes are
    put together; a reply that breaks the protocol's rules ends the connection (the shim then
    fails the path and re-issues the read elsewhere), never returns wrong bytes."""
    reply, want = READS[case]
    mine, theirs = trio.testing.memory_stream_pair()
    c = NBDClient(mine, "vv1", _Buf(mine), structured=True)
    async with trio.open_nursery() as n:
        n.start_soon(hostile_array, theirs, reply)
        await c._handshake()
        await n.start(c._receiver)
        with trio.fail_after(5):
            if isinstance(want, bytes):
                assert await c.read(8192, 12288) == want
            elif want is None:
                with pytest.raises(NBDDisconnected):
                    await c.read(8192, 12288)
                assert c.closed
            else:
                with pytest.raises(NBDError) as ei:
                    await c.read(8192, 12288)
                assert ei.value.errno == want and "io" in str(ei.value)
        n.cancel_scope.cancel()
