"""Reused payload buffers (syncd/buffers.py): a buffer is handed out again only once nothing
refers to it, whoever held it; the replication decoder's and the NBD server's payloads stay
intact while anything still holds them."""

from __future__ import annotations

import gc
import os

import trio

from syncd import buffers
from syncd.buffers import MIN_SIZE, PayloadBuffers
from syncd.nbd.client import open_nbd
from syncd.nbd.export import FileExport, StaticCatalog
from syncd.nbd.server import NBDServer
from syncd.repl.proto import Frame, FrameDecoder, encode_bytes


def test_a_buffer_is_reused_only_once_nothing_refers_to_it():
    pool = PayloadBuffers()
    a = pool.get(1 << 20)
    assert len(a) == 1 << 20
    a[:4] = b"abcd"
    b = pool.get(1 << 20)
    assert pool.stats()["fresh"] == 2 and pool.reused == 0
    slice_of_a = a[100:200]  # a view of a view still refers to the buffer
    del a
    c = pool.get(1 << 20)
    assert pool.reused == 0, "a buffer a view still refers to was handed out again"
    del slice_of_a
    d = pool.get(1 << 20)
    assert pool.reused == 1 and bytes(d[:4]) == b"abcd"  # contents are undefined: the old ones
    assert b is not None and c is not None


def test_sizes_round_up_to_a_power_of_two_and_the_views_are_exact():
    pool = PayloadBuffers()
    v = pool.get(MIN_SIZE + 1)
    assert len(v) == MIN_SIZE + 1 and len(v.obj) == 2 * MIN_SIZE
    del v
    w = pool.get(2 * MIN_SIZE - 5)  # same size class: the same buffer
    assert pool.reused == 1 and len(w) == 2 * MIN_SIZE - 5


def test_unused_buffers_kept_are_bounded():
    pool = PayloadBuffers(keep=4 << 20)
    views = [pool.get(1 << 20) for _ in range(8)]
    del views
    pool.get(1 << 20)  # collects: at most 4 MiB kept
    assert pool.stats()["free_bytes"] <= 4 << 20
    big = pool.get(8 << 20)  # larger than what is kept: its own mapping, never kept
    assert len(big) == 8 << 20
    del big
    pool.get(1 << 20)
    assert pool.stats()["free_bytes"] <= 4 << 20


def test_decoded_frames_keep_their_payloads_while_later_frames_reuse_buffers():
    pool = PayloadBuffers()
    dec = FrameDecoder(pool)

    def frames(n):
        fs = [Frame.write(i, 1, 1, 0, i << 20, os.urandom(300 << 10)) for i in range(n)]
        wire = b"".join(encode_bytes(f) for f in fs)
        for i in range(0, len(wire), 100 << 10):  # payloads span pieces: they fill pooled buffers
            dec.receive_data(wire[i:i + (100 << 10)])
        got = []
        while (f := dec.next_frame()) is not None:
            got.append(f)
        assert [bytes(g.payload) for g in got] == [bytes(f.payload) for f in fs]
        return got

    first = frames(6)
    kept = first[:3]
    expected = [bytes(f.payload) for f in kept]
    del first
    gc.collect()
    later = frames(6)
    assert pool.reused >= 3  # the three frames let go gave their buffers to later ones
    assert [bytes(f.payload) for f in kept] == expected  # the ones still held are untouched
    assert later


async def test_nbd_write_payloads_are_received_into_reused_buffers(tmp_path):
    """Large writes through a real NBD connection: each lands intact, and later ones reuse the
    buffers of earlier ones once those are done."""
    path = tmp_path / "v.img"
    path.write_bytes(b"\0" * (8 << 20))
    exp = FileExport("vv1", str(path))
    server = NBDServer(StaticCatalog({"vv1": exp}))
    sock = str(tmp_path / "nbd.sock")
    blobs = [os.urandom(1 << 20) for _ in range(6)]
    async with trio.open_nursery() as n:
        await n.start(server.serve_unix, sock)
        async with open_nbd(f"nbd+unix:///vv1?socket={sock}") as c:
            for i, blob in enumerate(blobs):
                await c.write(i << 20, blob)
            for i, blob in enumerate(blobs):
                assert await c.read(i << 20, 1 << 20) == blob
        n.cancel_scope.cancel()
    exp.close()
    assert server.payloads.reused >= 4, server.payloads.stats()
    assert path.read_bytes()[: 6 << 20] == b"".join(blobs)


def held(pool: PayloadBuffers) -> int:
    return sum(len(b) for b in pool._lent) + pool.stats()["free_bytes"]


def test_a_trim_after_a_burst_keeps_no_more_than_keep():
    """After a burst of large payloads (16 MiB in flight) completes and no other large payload
    comes, a trim leaves the pool holding at most ``keep`` (found by a review: before ``trim``,
    the whole burst stayed mapped until the next large payload)."""
    pool = PayloadBuffers(keep=4 << 20)
    burst = [pool.get(1 << 20) for _ in range(16)]
    still_sending = burst[0]  # one payload is still in flight: it stays lent, not counted as kept
    del burst
    pool.trim()
    assert pool.stats()["free_bytes"] <= 4 << 20
    assert held(pool) <= (4 << 20) + (1 << 20)
    assert len(still_sending) == 1 << 20


async def test_the_nbd_server_trims_its_payload_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(buffers, "TRIM_EVERY", 0.05)
    path = tmp_path / "v.img"
    path.write_bytes(b"\0" * (8 << 20))
    exp = FileExport("vv1", str(path))
    server = NBDServer(StaticCatalog({"vv1": exp}))
    server.payloads.keep = 1 << 20
    sock = str(tmp_path / "nbd.sock")
    async with trio.open_nursery() as n:
        await n.start(server.serve_unix, sock)
        async with open_nbd(f"nbd+unix:///vv1?socket={sock}") as c:
            for i, size in enumerate((1 << 20, 512 << 10, 256 << 10)):  # a buffer of each size
                await c.write(i << 20, os.urandom(size))
            before = held(server.payloads)
            await trio.sleep(0.5)  # ten trims' time; no other large write comes
        n.cancel_scope.cancel()
    assert before > server.payloads.keep  # what the writes left held more than keep
    assert held(server.payloads) <= server.payloads.keep, server.payloads.stats()
    exp.close()


def test_pread_gives_bytes_for_small_reads_and_reused_buffers_for_large_ones(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    pool = PayloadBuffers()
    fd = os.open(path, os.O_RDONLY)
    try:
        small = buffers.pread(fd, 4096, 8192, pool)
        assert type(small) is bytes and small == data[8192:12288]
        first = buffers.pread(fd, 1 << 20, 0, pool)
        assert isinstance(first, memoryview) and bytes(first) == data[: 1 << 20]
        del first
        again = buffers.pread(fd, 1 << 20, 1 << 20, pool)
        assert pool.reused == 1 and bytes(again) == data[1 << 20: 2 << 20]
        tail = buffers.pread(fd, 1 << 20, (3 << 20) - 1000, pool)  # at the end of the file: what is there
        assert bytes(tail) == data[-1000:]
    finally:
        os.close(fd)


async def test_nbd_reads_in_flight_keep_their_buffers_while_later_reads_reuse_others(tmp_path):
    """Large reads through a real NBD connection, many at once: each reply carries its own
    region's bytes, though the server reads each into a reused buffer."""
    path = tmp_path / "v.img"
    blobs = [os.urandom(1 << 20) for _ in range(8)]
    path.write_bytes(b"".join(blobs))
    exp = FileExport("vv1", str(path))
    server = NBDServer(StaticCatalog({"vv1": exp}))
    sock = str(tmp_path / "nbd.sock")
    wrong: list[int] = []
    async with trio.open_nursery() as n:
        await n.start(server.serve_unix, sock)
        async with open_nbd(f"nbd+unix:///vv1?socket={sock}") as c:

            async def read(i: int) -> None:
                if await c.read(i << 20, 1 << 20) != blobs[i]:
                    wrong.append(i)

            for _ in range(4):
                async with trio.open_nursery() as readers:
                    for i in range(8):
                        readers.start_soon(read, i)
        n.cancel_scope.cancel()
    exp.close()
    assert wrong == []
    assert server.payloads.reused >= 8, server.payloads.stats()
