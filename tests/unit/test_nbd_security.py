"""Issue 11 on the NBD port and the host shim, in process: TLS before any option, connection
limits, payload and handshake deadlines, payload memory held as it arrives, and the spec's
answer to every length/offset edge on exports of awkward sizes."""

from __future__ import annotations

import os
import socket
import stat
import struct

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.config import ConfigError, NbdLimits, ensure_fd_limit, parse_nbd_limits
from syncd.host import bind_unix, load_host_config
from syncd.nbd import proto as p
from syncd.nbd.export import ClientIdentity, FileExport, StaticCatalog
from syncd.nbd.server import NBDServer

from .test_nbd_codec import RawClient, go

MiB = 1 << 20
ALL_OPTIONS = [p.OPT_LIST, p.OPT_INFO, p.OPT_GO, p.OPT_STRUCTURED_REPLY, p.OPT_LIST_META_CONTEXT,
               p.OPT_SET_META_CONTEXT, 4, 11, 0xFFFF]


def tls_server(tmp_path, size=1 << 20, **kw):
    import ssl

    import trustme

    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    img = tmp_path / "d.img"
    img.write_bytes(b"\x5a" * size)
    exp = FileExport("secret-vol", str(img), description="syncd volume secret-vol wwn=naa.6secret")
    return NBDServer(StaticCatalog({"secret-vol": exp}), ctx, True, **kw), exp, img


def attach(srv, nursery, address="") -> RawClient:
    a, b = socket.socketpair()
    a.setblocking(False)
    nursery.start_soon(srv._handle_sock, a, ClientIdentity(address))
    return RawClient(trio.socket.from_stdlib_socket(b))


async def read_all(c) -> bytes:
    out = c.buf
    while d := await c.s.recv(65536):
        out += d
    return out


# -- row 3: TLS required means nothing before TLS ---------------------------------------------------

@pytest.mark.parametrize("option", ALL_OPTIONS)
async def test_tls_required_refuses_every_option_before_looking_at_it(tmp_path, option):
    srv, exp, _ = tls_server(tmp_path)
    body = struct.pack(">I", 10) + b"secret-vol" + struct.pack(">H", 0)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            c = attach(srv, n)
            await c.handshake()
            await c.opt(option, body)
            o, t, data = await c.reply()
            assert (o, t) == (option, p.REP_ERR_TLS_REQD)
            assert b"secret" not in data and b"naa." not in data
            await c.opt(p.OPT_ABORT)
            assert (await c.reply())[1] == p.REP_ACK
            rest = await read_all(c)
            assert b"secret" not in rest
    exp.close()


async def test_tls_required_export_name_in_clear_closes_and_a_write_changes_nothing(tmp_path):
    srv, exp, img = tls_server(tmp_path)
    before = img.read_bytes()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            c = attach(srv, n)
            await c.handshake()
            # EXPORT_NAME, then (as an attacker would, without waiting) a write request.
            await c.s.send(struct.pack(">QII", p.IHAVEOPT, p.OPT_EXPORT_NAME, 10) + b"secret-vol"
                           + p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 4096) + b"\xee" * 4096)
            try:
                rest = await read_all(c)
            except ConnectionResetError:
                rest = b""
    assert rest == b""  # no export reply, no size, no write reply: the session was ended
    assert not srv.live and srv.held == 0
    assert img.read_bytes() == before
    exp.close()


# -- connection limits ------------------------------------------------------------------------------

async def test_connections_beyond_the_limits_are_closed_at_once_and_others_served(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    exp = FileExport("vv1", str(img))
    lim = NbdLimits(max_connections=6, max_connections_per_address=3, handshake_timeout=60)
    srv = NBDServer(StaticCatalog({"vv1": exp}), limits=lim)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            port = await n.start(srv.serve_tcp, "127.0.0.1", 0)

            async def connect(src):
                s = trio.socket.socket()
                await s.bind((src, 0))
                await s.connect(("127.0.0.1", port))
                return RawClient(s)

            async def refused(src) -> bool:
                """Closed at once (reset): no greeting, not even a byte."""
                try:
                    c = await connect(src)
                    return await read_all(c) == b""
                except ConnectionResetError:
                    return True

            held = [await connect("127.0.0.1") for _ in range(3)]
            for c in held:
                await c.recv(18)  # greeted: admitted
            assert await refused("127.0.0.1")  # beyond 3 from one address
            others = [await connect("127.0.0.2") for _ in range(3)]
            for c in others:
                await c.recv(18)
            assert await refused("127.0.0.3")  # beyond 6 in all
            assert srv.refused == 2
            # An admitted client is served meanwhile.
            await others[0].s.send(struct.pack(">I", 3))
            c = others[0]
            await c.opt(p.OPT_GO, struct.pack(">I", 3) + b"vv1" + struct.pack(">H", 0))
            assert (await c.reply())[1] == p.REP_INFO
            assert (await c.reply())[1] == p.REP_ACK
            for c in held:
                c.s.close()
            await trio.testing.wait_all_tasks_blocked()
            again = await connect("127.0.0.1")
            await again.recv(18)  # room again once they left
            n.cancel_scope.cancel()
    exp.close()


async def test_handshake_deadline_drops_a_silent_client():
    srv = NBDServer(StaticCatalog({}), limits=NbdLimits(handshake_timeout=0.2))
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            c = attach(srv, n)
            await c.recv(18)
            assert await read_all(c) == b""  # nothing but the greeting, then closed
    assert not srv.live


# -- rows 5: payloads are held (and allocated) as they arrive, with a deadline -------------------

async def test_write_headers_without_payload_hold_nothing_and_end_at_the_payload_deadline(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * MiB))
    exp = FileExport("vv1", str(img))
    srv = NBDServer(StaticCatalog({"vv1": exp}), limits=NbdLimits(payload_timeout=1.0))
    before = img.read_bytes()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            attackers = [attach(srv, n) for _ in range(32)]
            for c in attackers:
                await go(c)
                await c.s.send(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 32 * MiB) + b"\x01" * 100)
            await trio.testing.wait_all_tasks_blocked()
            assert srv.held <= 32 * (4096 + 100)  # what arrived, not what was announced
            # Another client is served while they wait.
            c = attach(srv, n)
            await go(c)
            await c.s.send(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 7, MiB, 4096) + b"\x02" * 4096)
            _, _, typ, cookie, _ = p.SHDR.unpack(await c.recv(20))
            assert (typ, cookie) == (p.REPLY_TYPE_NONE, 7)
            for a in attackers:  # each dropped at the payload deadline, nothing written
                assert await read_all(a) == b""
            c.s.close()
    assert not srv.live and srv.held == 0 and srv.receiving == 0
    after = img.read_bytes()
    assert after[:MiB] == before[:MiB] and after[MiB:MiB + 4096] == b"\x02" * 4096
    exp.close()


# -- row 7 and the spec's answers: a bytes-level table ---------------------------------------------

SIZES = [1 << 20, (4 << 30) + 4096, (4 << 30) + 512, 5000, 4095]
R, W, T, Z, B, F = p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS, p.CMD_FLUSH


def table(size):
    end = size
    return [  # (type, flags, offset, length, expected NBD error)
        (B, 0, 0, 0, p.NBD_EINVAL),  # row 7: BLOCK_STATUS of length 0
        (B, 0, 0, min(size, 0xFFFFFFFF), 0),
        (B, 0, end - 1, 1, 0),
        (B, 0, end, 1, p.NBD_EINVAL),
        (B, 0, 2**64 - 1, 0xFFFFFFFF, p.NBD_EINVAL),
        (B, p.CMD_FLAG_REQ_ONE, 0, 4096 if size >= 4096 else size, 0),
        (R, 0, 0, 0, p.NBD_EINVAL),
        (R, 0, end - 1, 1, 0),
        (R, 0, end - 1, 2, p.NBD_EINVAL),
        (R, 0, 2**64 - 1, 1, p.NBD_EINVAL),
        (R, 0, 2**64 - 4096, 8192, p.NBD_EINVAL),  # offset + length wraps past 2**64
        (R, 0, 0, p.MAX_BLOCK + 1, p.NBD_EINVAL),
        (R, 0, 0, 0xFFFFFFFF, p.NBD_EINVAL),
        (R, p.CMD_FLAG_REQ_ONE, 0, 1, p.NBD_EINVAL),  # flag of another command
        (W, 0, end, 1, p.NBD_ENOSPC),
        (W, 0, 2**64 - 1, 1, p.NBD_ENOSPC),
        (W, 0, end - 1, 1, 0),
        (W, 0, 0, 0, p.NBD_EINVAL),
        (W, p.CMD_FLAG_NO_HOLE, 0, 1, p.NBD_EINVAL),
        (T, 0, end - 1, 2, p.NBD_EINVAL),
        (T, 0, 2**64 - 512, 1024, p.NBD_EINVAL),
        (Z, 0, end - 1, 2, p.NBD_ENOSPC),
        (Z, 0, 2**64 - 1, 0xFFFFFFFF, p.NBD_ENOSPC),
        (Z, 0, 0, 0, p.NBD_EINVAL),
        (F, 0, 0, 0, 0),
        (F, 0, 1, 0, p.NBD_EINVAL),
        (F, 0, 0, 1, p.NBD_EINVAL),
        (99, 0, 0, 1, p.NBD_EINVAL),
        (p.CMD_CACHE, 0, 0, 1, p.NBD_EINVAL),
        (R, 1 << 15, 0, 1, p.NBD_EINVAL),  # unknown flag
        (Z, p.CMD_FLAG_FAST_ZERO, end - 1, 1, 0),  # advertised: a file punches the range
        (Z, p.CMD_FLAG_FAST_ZERO, end, 1, p.NBD_ENOSPC),
        (T, p.CMD_FLAG_FAST_ZERO, 0, 1, p.NBD_EINVAL),  # a flag of write-zeroes only
        (R, p.CMD_FLAG_FAST_ZERO, 0, 1, p.NBD_EINVAL),
    ]


async def test_block_status_replies_are_bounded_and_start_at_the_offset(tmp_path):
    """base:allocation of a file with 8 data blocks between holes, served with
    block_status_max_extents = 3: each reply has at most 3 extents, from the request's offset;
    a client asking on from where each ends gets the file's whole map."""
    img = tmp_path / "holes.img"
    _sparse(img, 1 << 20)
    fd = os.open(img, os.O_WRONLY)
    for i in range(8):
        os.pwrite(fd, b"d" * 4096, (2 * i + 1) * 65536)
    os.close(fd)
    exp = FileExport("vv1", str(img))
    srv = NBDServer(StaticCatalog({"vv1": exp}), limits=NbdLimits(block_status_max_extents=3))

    async def status(c, offset, length, flags=0):
        await c.s.send(p.REQ.pack(p.REQUEST_MAGIC, flags, B, 1, offset, length))
        magic, fl, rtype, ck, ln = p.SHDR.unpack(await c.recv(20))
        body = await c.recv(ln)
        assert rtype == p.REPLY_TYPE_BLOCK_STATUS and fl & p.REPLY_FLAG_DONE
        return [struct.unpack(">II", body[4 + 8 * i:12 + 8 * i]) for i in range((ln - 4) // 8)]

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                c = attach(srv, n)
                await go(c, contexts=("base:allocation",))
                seen, pos = [], 0
                while pos < 1 << 20:
                    ext = await status(c, pos, (1 << 20) - pos)
                    assert 1 <= len(ext) <= 3 and all(ln > 0 for ln, _ in ext)
                    seen += ext
                    pos += sum(ln for ln, _ in ext)
                assert pos == 1 << 20
                merged = []
                for ln, st_ in seen:
                    if merged and merged[-1][1] == st_:
                        merged[-1] = (merged[-1][0] + ln, st_)
                    else:
                        merged.append((ln, st_))
                want = []
                for i in range(8):
                    want += [(65536 if i == 0 else 131072 - 4096, 3), (4096, 0)]
                want.append(((1 << 20) - (15 * 65536 + 4096), 3))
                assert merged == want
                assert await status(c, 65536 + 100, 10000, p.CMD_FLAG_REQ_ONE) == [(4096 - 100, 0)]
                c.s.close()
    finally:
        exp.close()


async def exchange(c, typ, flags, offset, length, cookie):
    """Send one request; (error, payload bytes) of its structured reply (all chunks)."""
    data = b"\x77" * length if typ == W else b""
    await c.s.send(p.REQ.pack(p.REQUEST_MAGIC, flags, typ, cookie, offset, length) + data)
    err, got = 0, 0
    while True:
        magic, fl, rtype, ck, ln = p.SHDR.unpack(await c.recv(20))
        assert magic == p.STRUCTURED_REPLY_MAGIC and ck == cookie
        body = await c.recv(ln)
        if rtype == p.REPLY_TYPE_ERROR:
            err = struct.unpack(">I", body[:4])[0]
        elif rtype == p.REPLY_TYPE_OFFSET_DATA:
            got += ln - 8
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            descs = [struct.unpack(">II", body[4 + 8 * i:12 + 8 * i]) for i in range((ln - 4) // 8)]
            assert descs and sum(d[0] for d in descs) <= length
        if fl & p.REPLY_FLAG_DONE:
            return err, got


def _sparse(path, size: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


async def served(tmp_path, size, fn):
    img = tmp_path / f"e{size}.img"
    _sparse(img, size)
    exp = FileExport("vv1", str(img))
    srv = NBDServer(StaticCatalog({"vv1": exp}))
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                c = attach(srv, n)
                other = attach(srv, n)
                await go(c, contexts=("base:allocation", "syncd:alua"))
                await go(other)
                await fn(c, other)
                c.s.close()
                other.s.close()
    finally:
        exp.close()
        img.unlink()


@pytest.mark.parametrize("size", SIZES)
async def test_every_length_and_offset_edge_gets_the_spec_answer(tmp_path, size):
    async def fn(c, other):
        for i, (typ, flags, off, ln, want) in enumerate(table(size)):
            err, got = await exchange(c, typ, flags, off, ln, i)
            assert err == want, (typ, flags, off, ln)
            if typ == R and not want:
                assert got == ln
            # The connection and the other client go on.
            assert await exchange(other, R, 0, 0, 1, 1000 + i) == (0, 1)

    await served(tmp_path, size, fn)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_request_on_any_export_size_is_answered_and_the_connection_survives(tmp_path_factory, data):
    size = data.draw(st.sampled_from(SIZES + [512, 1, 4097]))
    reqs = data.draw(st.lists(st.tuples(
        st.sampled_from([R, W, T, Z, B, F]),
        st.sampled_from([0, p.CMD_FLAG_FUA, p.CMD_FLAG_REQ_ONE, p.CMD_FLAG_NO_HOLE, p.CMD_FLAG_DF]),
        st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, size - 1, size, size + 1, 2**64 - 1, 2**63])),
        st.one_of(st.integers(0, 8192), st.sampled_from([0, 1, 0xFFFFFFFF, p.MAX_BLOCK + 1, 2**31]))),
        min_size=1, max_size=8))
    tmp = tmp_path_factory.mktemp("h")

    async def fn(c, other):
        for i, (typ, flags, off, ln) in enumerate(reqs):
            if typ == W:
                ln = min(ln, 8192)  # a payload is sent in full
            err, got = await exchange(c, typ, flags, off, ln, i)
            in_range = 0 < ln and off + ln <= size
            if not in_range:
                assert err in (p.NBD_EINVAL, p.NBD_ENOSPC) or typ == F
            if typ == R and not err:
                assert got == ln
        assert await exchange(other, R, 0, 0, 1, 999) == (0, 1)

    trio.run(served, tmp, size, fn)


# -- limits in config, file descriptors --------------------------------------------------------------

@pytest.mark.parametrize("table_,msg", [
    ({"max_connections": 0}, "nbd.max_connections: must be at least 1"),
    ({"max_connections": 4, "max_connections_per_address": 8}, "larger than nbd.max_connections"),
    ({"handshake_timeout": 0}, "nbd.handshake_timeout: must be between"),
    ({"payload_timeout": "x"}, "nbd.payload_timeout: expected float"),
    ({"reply_timeout": -1}, "nbd.reply_timeout"),
    ({"block_status_max_extents": 0}, "nbd.block_status_max_extents: must be between 1 and 1048576"),
    ({"block_status_max_extents": (1 << 20) + 1}, "nbd.block_status_max_extents: must be between"),
    ({"block_status_max_extents": "many"}, "nbd.block_status_max_extents: expected int"),
])
def test_bad_limits_are_named(table_, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_nbd_limits(table_, "nbd")


def test_limits_that_cannot_fit_the_descriptor_limit_are_refused_at_start():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.fail("RLIMIT_NOFILE has no hard limit here")
    with pytest.raises(ConfigError, match=r"nbd.max_connections: .* may need \d+ file descriptors"):
        ensure_fd_limit(hard + 1, "this node", "nbd.max_connections")


# -- row 9: the host shim's sockets and TCP export ---------------------------------------------------

def shim_cfg(tmp_path, extra):
    f = tmp_path / "h.toml"
    f.write_text(f'[host]\nname = "h"\nsocket = "s"\nadmin_socket = "a"\n{extra}'
                 '[[array]]\nname = "A"\npaths = ["nbd://127.0.0.1:1"]\n')
    return str(f)


@pytest.mark.parametrize("extra,msg", [
    ('tcp = "0.0.0.0:10900"\ntcp_exports = ["vv1"]\n', "not a loopback address"),
    ('tcp = "192.0.2.1:10900"\ntcp_exports = ["vv1"]\n', "not a loopback address"),
    ('tcp = "127.0.0.1:10900"\n', "host.tcp_exports: missing"),
    ('tcp_exports = ["vv1"]\n', "host.tcp is not"),
    ('tcp = "127.0.0.1:10900"\ntcp_exports = ["bad name"]\n', r"tcp_exports\[0\]"),
    ('socket_group = "no-such-group-xyz"\n', "no group named"),
    ('max_connections = 0\n', "host.max_connections"),
])
def test_bad_shim_export_config_is_named(tmp_path, extra, msg):
    with pytest.raises(ConfigError, match=msg):
        load_host_config(shim_cfg(tmp_path, extra))


def test_shim_tcp_export_serves_only_the_listed_volumes(tmp_path):
    from syncd.host import Shim, ShimVolume

    cfg = load_host_config(shim_cfg(tmp_path, 'tcp = "127.0.0.1:10900"\ntcp_exports = ["vv2"]\n'))
    assert cfg.tcp == ("127.0.0.1", 10900) and cfg.tcp_exports == ("vv2",)
    shim = Shim(cfg)
    for v in ("vv1", "vv2", "vv3"):
        shim.volumes[v] = ShimVolume(shim, v, "naa." + v, MiB)
    assert list(shim.exports_for(ClientIdentity("127.0.0.1", 5000))) == ["vv2"]
    assert sorted(shim.exports_for(ClientIdentity(""))) == ["vv1", "vv2", "vv3"]  # the unix socket


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_shim_sockets_never_exist_with_default_permissions(tmp_path, mode):
    path = str(tmp_path / "nbd.sock")
    (tmp_path / "nbd.sock").write_text("stale")
    old = os.umask(0)  # the most permissive umask: the socket must not depend on it
    try:
        s = bind_unix(path, mode)
    finally:
        os.umask(old)
    try:
        st_ = os.stat(path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == mode
        assert os.listdir(tmp_path) == ["nbd.sock"]  # the private directory is gone
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        c.close()
    finally:
        s.close()
