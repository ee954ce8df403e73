"""NBD: bytes in, events out (sans-IO), and the in-process server over a socket pair."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.nbd import proto as p
from syncd.nbd.export import ClientIdentity, FileExport, StaticCatalog
from syncd.nbd.server import NBDServer


def test_hot_path_structs_equal_construct_declarations():
    samples = {
        "REQ": (p.REQUEST_MAGIC, 1, p.CMD_WRITE, 2**64 - 1, 4096, 512),
        "SIMPLE": (p.SIMPLE_REPLY_MAGIC, 22, 77),
        "SHDR": (p.STRUCTURED_REPLY_MAGIC, 1, p.REPLY_TYPE_OFFSET_DATA, 9, 520),
        "OPT_HDR": (p.IHAVEOPT, p.OPT_GO, 10),
        "OPT_REPLY": (p.OPT_REPLY_MAGIC, p.OPT_GO, p.REP_ACK, 0),
        "DESCRIPTOR": (2**32 - 1, p.STATE_HOLE | p.STATE_ZERO),
    }
    for name, (st_, decl) in p.HOT_PATH.items():
        vals = samples[name]
        names = [sc.name for sc in decl.subcons]
        built = decl.build(dict(zip(names, vals, strict=True)))
        assert built == st_.pack(*vals), name
        parsed = decl.parse(built)
        assert tuple(parsed[n] for n in names) == vals


@given(st.integers(0, 255), st.integers(0, 2**24 - 1))
def test_alua_word_equals_its_declaration(state, epoch):
    word = p.alua_word(state, epoch)
    assert p.U32.pack(word) == p.ALUA_STATUS.build({"state": state, "epoch": epoch})
    assert p.alua_unpack(word) == (state, epoch)
    parsed = p.ALUA_STATUS.parse(p.U32.pack(word))
    assert (parsed.state, parsed.epoch) == (state, epoch)


def test_handshake_events():
    c = p.ServerConnection()
    assert c.greeting()[:16] == struct.pack(">QQ", p.NBDMAGIC, p.IHAVEOPT)
    assert c.next_event() is p.NEED_DATA
    c.receive_data(struct.pack(">I", 3))
    assert c.next_event() == p.ClientFlags(3) and c.no_zeroes
    opt = struct.pack(">I", 3) + b"vv1" + struct.pack(">HH", 1, p.INFO_DESCRIPTION)
    wire = struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(opt)) + opt
    c.receive_data(wire[:5])
    assert c.next_event() is p.NEED_DATA
    c.receive_data(wire[5:])
    ev = c.next_event()
    assert ev == p.Option(p.OPT_GO, opt)
    assert p.parse_go(ev.data) == ("vv1", [p.INFO_DESCRIPTION])


@pytest.mark.parametrize("flags", [0, 4, 0x80000001])
def test_bad_client_flags_end_the_connection(flags):
    c = p.ServerConnection()
    c.receive_data(struct.pack(">I", flags))
    with pytest.raises(p.ProtocolError):
        c.next_event()


def test_requests_and_partial_writes():
    c = p.ServerConnection()
    c.start_transmission()
    c.receive_data(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 5, 0, 4096))
    assert c.next_event() == p.Request(0, p.CMD_READ, 5, 0, 4096)
    c.receive_data(p.REQ.pack(p.REQUEST_MAGIC, p.CMD_FLAG_FUA, p.CMD_WRITE, 6, 512, 4) + b"ab")
    ev = c.next_event()
    assert isinstance(ev, p.PartialWrite) and ev.have == 2
    buf = memoryview(bytearray(4))
    assert c.take_into(buf) == 2 and bytes(buf[:2]) == b"ab"
    c.receive_data(b"cd" + p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_FLUSH, 7, 0, 0))
    assert c.take_into(buf[2:]) == 2 and bytes(buf) == b"abcd"
    assert c.next_event() == p.Request(0, p.CMD_FLUSH, 7, 0, 0)
    c2 = p.ServerConnection()
    c2.start_transmission()
    c2.receive_data(b"\0" * 28)
    with pytest.raises(p.ProtocolError, match="bad request magic"):
        c2.next_event()
    c3 = p.ServerConnection()
    c3.start_transmission()
    c3.receive_data(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, (32 << 20) + 1))
    with pytest.raises(p.ProtocolError, match="exceeds"):
        c3.next_event()


@pytest.mark.parametrize("data", [b"", b"\0\0\0\x09vv1\0\0", b"\0\0\0\x03vv1\0\x02\0\x03"])
def test_malformed_go_is_refused(data):
    with pytest.raises(ValueError):
        p.parse_go(data)


def test_meta_context_query_parsing():
    data = (struct.pack(">I", 3) + b"vv1" + struct.pack(">I", 2) + struct.pack(">I", 10) + b"syncd:alua"
            + struct.pack(">I", 5) + b"base:")
    assert p.parse_meta_query(data) == ("vv1", ["syncd:alua", "base:"])
    with pytest.raises(ValueError):
        p.parse_meta_query(data + b"x")


# -- the server, in process, over a socket pair -----------------------------------------------

class RawClient:
    def __init__(self, sock):
        self.s = sock
        self.buf = b""

    async def recv(self, n):
        while len(self.buf) < n:
            d = await self.s.recv(65536)
            if not d:
                raise EOFError
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def opt(self, o, data=b""):
        await self.s.send(struct.pack(">QII", p.IHAVEOPT, o, len(data)) + data)

    async def reply(self):
        magic, o, t, ln = struct.unpack(">QIII", await self.recv(20))
        assert magic == p.OPT_REPLY_MAGIC
        return o, t, await self.recv(ln)

    async def handshake(self):
        await self.recv(18)
        await self.s.send(struct.pack(">I", 3))


async def with_server(tmp_path, fn):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    exp = FileExport("vv1", str(img), description="test wwn=naa.6x")
    server = NBDServer(StaticCatalog({"vv1": exp}))
    a, b = socket.socketpair()
    a.setblocking(False)
    async with trio.open_nursery() as n:
        n.start_soon(server._handle_sock, a, ClientIdentity(""))
        c = RawClient(trio.socket.from_stdlib_socket(b))
        try:
            await fn(c)
        finally:
            c.s.close()
    exp.close()


async def go(c, structured=True, contexts=()):
    await c.handshake()
    if structured:
        await c.opt(p.OPT_STRUCTURED_REPLY)
        assert (await c.reply())[1] == p.REP_ACK
    if contexts:
        body = struct.pack(">I", 3) + b"vv1" + struct.pack(">I", len(contexts))
        for q in contexts:
            body += struct.pack(">I", len(q)) + q.encode()
        await c.opt(p.OPT_SET_META_CONTEXT, body)
        while (r := await c.reply())[1] != p.REP_ACK:
            assert r[1] == p.REP_META_CONTEXT
    await c.opt(p.OPT_GO, struct.pack(">I", 3) + b"vv1" + struct.pack(">H", 0))
    o, t, data = await c.reply()
    assert t == p.REP_INFO
    assert (await c.reply())[1] == p.REP_ACK


async def test_list_unknown_export_and_unsupported_option(tmp_path):
    async def fn(c):
        await c.handshake()
        await c.opt(p.OPT_LIST)
        o, t, data = await c.reply()
        assert t == p.REP_SERVER and data[4:7] == b"vv1" and b"wwn=naa.6x" in data
        assert (await c.reply())[1] == p.REP_ACK
        await c.opt(p.OPT_GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
        o, t, msg = await c.reply()
        assert t == p.REP_ERR_UNKNOWN and b"nope" in msg
        await c.opt(999)
        assert (await c.reply())[1] == p.REP_ERR_UNSUP
        await c.opt(p.OPT_STARTTLS)
        assert (await c.reply())[1] == p.REP_ERR_UNSUP
        await c.opt(p.OPT_ABORT)
        assert (await c.reply())[1] == p.REP_ACK
    await with_server(tmp_path, fn)


async def test_io_errors_and_alua_block_status(tmp_path):
    async def fn(c):
        await go(c, contexts=["syncd:alua"])

        def req(t, h, off, ln, flags=0):
            return p.REQ.pack(p.REQUEST_MAGIC, flags, t, h, off, ln)

        await c.s.send(req(p.CMD_WRITE, 1, 0, 4) + b"abcd")
        mag, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
        assert (typ, h, fl) == (p.REPLY_TYPE_NONE, 1, p.REPLY_FLAG_DONE)
        await c.s.send(req(p.CMD_READ, 2, 0, 4))
        mag, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
        assert typ == p.REPLY_TYPE_OFFSET_DATA and (await c.recv(ln))[8:] == b"abcd"
        await c.s.send(req(p.CMD_READ, 3, (1 << 20) - 2, 4))
        mag, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
        body = await c.recv(ln)
        assert typ == p.REPLY_TYPE_ERROR and struct.unpack(">I", body[:4])[0] == p.NBD_EINVAL
        await c.s.send(req(p.CMD_WRITE, 4, (1 << 20) - 2, 4) + b"wxyz")
        mag, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
        assert struct.unpack(">I", (await c.recv(ln))[:4])[0] == p.NBD_ENOSPC
        await c.s.send(req(p.CMD_BLOCK_STATUS, 5, 0, 4096))
        mag, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
        cid, length, status = struct.unpack(">III", await c.recv(ln))
        assert typ == p.REPLY_TYPE_BLOCK_STATUS and (length, status) == (4096, 0)
        await c.s.send(req(77, 6, 0, 0))
        mag, fl, typ, h, ln = p.SHDR.unpack(await c.recv(20))
        assert struct.unpack(">I", (await c.recv(ln))[:4])[0] == p.NBD_EINVAL
        await c.s.send(req(p.CMD_DISC, 7, 0, 0))
        with pytest.raises(EOFError):
            await c.recv(1)
    await with_server(tmp_path, fn)


async def test_simple_replies_without_structured(tmp_path):
    async def fn(c):
        await go(c, structured=False)
        await c.s.send(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 9, 0, 8))
        magic, err, h = p.SIMPLE.unpack(await c.recv(16))
        assert (magic, err, h) == (p.SIMPLE_REPLY_MAGIC, 0, 9) and await c.recv(8) == b"\0" * 8
        await c.s.send(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, 10, 0, 8))
        assert p.SIMPLE.unpack(await c.recv(16))[1] == p.NBD_EINVAL
        await c.s.send(b"\xde\xad" * 14)  # bad magic: this client is dropped
        with pytest.raises(EOFError):
            await c.recv(1)
    await with_server(tmp_path, fn)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_garbage_never_escapes_the_server(tmp_path_factory, garbage, after_go):
    tmp = tmp_path_factory.mktemp("fuzz")

    async def fn(c):
        if after_go:
            await go(c)
        else:
            await c.recv(18)
        await c.s.send(garbage)
        with trio.move_on_after(0.1):
            while await c.s.recv(65536):
                pass

    trio.run(with_server, tmp, fn)
