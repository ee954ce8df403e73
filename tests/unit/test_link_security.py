"""The replication link proves who is at the other end before it reads a frame (secure.py), in
process: shared key and mutual TLS links come up and carry requests; a wrong key, a recorded
session replayed, a certificate for another name, never reach the peer's request handler."""

from __future__ import annotations

import socket
import uuid

import pytest
import trio
import trustme

from syncd import netio, secure
from syncd.config import LinkConfig, LinkPath
from syncd.repl import proto
from syncd.repl.link import Link
from syncd.repl.proto import Frame, MsgType


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configs(sec_a: secure.Security, sec_b: secure.Security, via: int | None = None):
    """A dials B (``via``: a port in between, e.g. a recording proxy)."""
    pa, pb = free_port(), free_port()
    t = dict(ping_interval=0.1, path_timeout=1.0, io_timeout=3.0)
    a = LinkConfig(peer="B", paths=(LinkPath(("127.0.0.1", pa), ("127.0.0.1", via or pb)),), security=sec_a, **t)
    b = LinkConfig(peer="A", paths=(LinkPath(("127.0.0.1", pb), ("127.0.0.1", pa)),), security=sec_b, **t)
    return a, b


class Peer:
    def __init__(self) -> None:
        self.got: list[Frame] = []

    def on_request(self, link, path, f) -> None:
        self.got.append(f)
        link.reply(path, f.req_id, 0, b'{"ok": true}' if f.type == MsgType.CONTROL else b"")


KEY = secure.Security("key", key=b"the-link-key-0123456789")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, issuer in (("A", ca), ("B", ca), ("C", ca), ("B-other", other)):
        cert = issuer.issue_cert(name.split("-")[0])
        cert.private_key_and_cert_chain_pem.write_to_path(str(d / f"{name}.pem"))

    def sec(name: str) -> secure.Security:
        p = str(d / f"{name}.pem")
        return secure.Security("tls", tls_certificate=p, tls_key=p, tls_ca=str(d / "ca.pem"))

    return sec


async def run_pair(sec_a, sec_b, body, via=None):
    ca, cb = configs(sec_a, sec_b, via)
    peer = Peer()
    up_a, up_b = trio.Event(), trio.Event()
    a = Link(ca, "A", uuid.uuid4().bytes, lambda *x: None, up_a.set, lambda: None)
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, up_b.set, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        await n.start(a.run)
        await body(a, b, peer, up_a, up_b, cb)
        n.cancel_scope.cancel()


async def until(cond) -> None:
    """Wait for a condition on counters the link owns and does not signal (a test observer)."""
    with trio.fail_after(10):  # a safety net: the condition decides
        while not cond():  # noqa: ASYNC110
            await trio.sleep(0.02)


@pytest.mark.parametrize("mode", ["key", "tls"])
async def test_authenticated_link_carries_requests(mode, pki):
    sec_a, sec_b = (KEY, KEY) if mode == "key" else (pki("A"), pki("B"))

    async def body(a, b, peer, up_a, up_b, cb):
        with trio.fail_after(10):
            await up_a.wait()
        reply = await a.request(Frame.control(a.next_id(), {"op": "ping"}))
        assert reply.type == MsgType.REPLY and reply.status == 0
        data = bytes(range(256)) * 4096 * 3  # 3 MiB: several records / TLS records
        w = Frame.write(a.next_id(), 1, 1, 1, 0, data)
        reply = await a.request(w)
        assert reply.status == 0
        assert [f.type for f in peer.got] == [MsgType.CONTROL, MsgType.WRITE] and peer.got[1].payload == data
        assert b.refusals.total == 0

    await run_pair(sec_a, sec_b, body)


@pytest.mark.parametrize("case", ["wrong-key", "other-ca", "wrong-name", "mode-mismatch"])
async def test_unauthenticated_dialer_never_reaches_the_peer(case, pki):
    sec_a, sec_b = {
        "wrong-key": (secure.Security("key", key=b"not-the-link-key-0123"), KEY),
        "other-ca": (pki("A"), pki("B-other")),  # B's certificate is from a CA A does not trust
        "wrong-name": (pki("C"), pki("B")),  # A presents C's certificate
        "mode-mismatch": (KEY, pki("B")),
    }[case]

    async def body(a, b, peer, up_a, up_b, cb):
        await until(lambda: b.refusals.total >= 2 or a.refusals.total >= 2)
        assert not up_a.is_set() and not up_b.is_set() and not a.up and not b.up
        assert peer.got == []

    await run_pair(sec_a, sec_b, body)


async def _recording_proxy(listen: socket.socket, target: tuple[str, int], record: list[bytes],
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Forwards one connection at a time, recording what the dialer sent on each."""
    task_status.started()
    while True:
        inner, _ = await netio.accept(listen)
        outer = await netio.connect(target)
        chunks: list[bytes] = []
        record.append(chunks)

        async def pump(src, dst, keep):
            try:
                while data := await netio.recv(src, 65536):
                    if keep is not None:
                        keep.append(data)
                    await netio.sendall(dst, data)
            except OSError:
                pass

        async with trio.open_nursery() as n:
            n.start_soon(pump, inner, outer, chunks)
            n.start_soon(pump, outer, inner, None)
            await trio.sleep(1.5)  # long enough for a handshake and a few requests
            n.cancel_scope.cancel()
        inner.close()
        outer.close()


async def test_recorded_session_replayed_is_refused():
    """A recorded dialer session (handshake, HELLO, a CONTROL and a WRITE) played again on new
    connections, whole or cut, never reaches the peer: B's nonce is new every time."""
    lsock = netio.listen_tcp(("127.0.0.1", 0))
    via = lsock.getsockname()[1]
    record: list[list[bytes]] = []
    ca, cb = configs(KEY, KEY, via)
    peer = Peer()
    up_a = trio.Event()
    a = Link(ca, "A", uuid.uuid4().bytes, lambda *x: None, up_a.set, lambda: None)
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        await n.start(_recording_proxy, lsock, cb.paths[0].local, record)
        await n.start(a.run)
        with trio.fail_after(10):
            await up_a.wait()
        await a.request(Frame.control(a.next_id(), {"op": "ping"}))
        await a.request(Frame.write(a.next_id(), 1, 1, 1, 0, b"x" * 4096))
        await until(lambda: len(record) >= 1 and sum(map(len, record[0])) > 300)
        session = b"".join(record[0])
        seen = len(peer.got)
        refused = b.refusals.total
        for cut in (len(session), 45, 77, 200, len(session) - 1):
            s = await netio.connect(cb.paths[0].local)
            await netio.sendall(s, session[:cut])
            got = b""
            with trio.fail_after(10):
                while data := await netio.recv(s, 65536):
                    got += data
            s.close()
            assert got.endswith(secure.REFUSAL), got[-40:]
        await until(lambda: b.refusals.total >= refused + 4)
        assert len(peer.got) == seen  # nothing replayed reached B's request handler
        n.cancel_scope.cancel()


async def test_refusal_is_the_same_whatever_was_asked():
    """Row 8: an unauthenticated frame for a group that exists and one for a group that does
    not get byte-identical answers (the listener's preface, which depends on nothing sent, then
    the refusal)."""
    ca, cb = configs(KEY, KEY)
    peer = Peer()
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    answers = []
    async with trio.open_nursery() as n:
        await n.start(b.run)
        for group in (1, 999):
            s = await netio.connect(cb.paths[0].local)
            hs = secure.Handshake(secure.Security("insecure"), secure.Role.DIALER, "A", "B")
            frames = proto.encode_bytes(Frame.hello(node_uuid=bytes(16), node_name="A", path_index=0,
                                                    link_session=1))
            frames += proto.encode_bytes(Frame.write(1, group, 1, 1, 0, b"y" * 512))
            await netio.sendall(s, hs.take_output() + frames)
            got = b""
            with trio.fail_after(10):
                while data := await netio.recv(s, 65536):
                    got += data
            s.close()
            pre = secure.parse_preface(got)
            assert pre is not None and pre[0].name == "B"
            answers.append(got[pre[1]:])
        assert answers[0] == answers[1] == secure.REFUSAL
        assert peer.got == []
        n.cancel_scope.cancel()


async def test_half_open_connections_beyond_the_limit_are_refused_at_once():
    ca, cb = configs(KEY, KEY)
    peer = Peer()
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        held = [await netio.connect(cb.paths[0].local) for _ in range(cb.max_handshakes_per_source)]
        await until(lambda: sum(b._handshaking.values()) == cb.max_handshakes_per_source)
        got = b""
        try:
            extra = await netio.connect(cb.paths[0].local)
            with trio.fail_after(10):
                while data := await netio.recv(extra, 65536):
                    got += data
            extra.close()
        except ConnectionResetError:  # reset at once, possibly before connect() returned
            pass
        assert got == b""  # closed before anything was said: not even a preface
        assert b.refusals.total == 1 and peer.got == []
        for s in held:
            s.close()
        n.cancel_scope.cancel()


async def test_a_crowd_from_other_addresses_does_not_keep_the_peer_out():
    """max_handshakes bounds what other addresses hold; the configured peer's address is
    bounded per source only, so it still gets in while the crowd holds every slot."""
    ca, cb = configs(KEY, KEY)
    peer = Peer()
    up = trio.Event()
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    a = Link(ca, "A", uuid.uuid4().bytes, lambda *x: None, up.set, lambda: None)
    crowd = []
    async with trio.open_nursery() as n:
        await n.start(b.run)
        per = cb.max_handshakes_per_source
        for i in range(cb.max_handshakes // per + 1):  # one address more than the slots allow
            for _ in range(per):
                s = trio.socket.socket()
                await s.bind((f"127.0.0.{i + 2}", 0))
                crowd.append(s)
                try:
                    await s.connect(cb.paths[0].local)
                except ConnectionResetError:  # beyond max_handshakes: refused at once
                    pass
        await until(lambda: sum(b._handshaking.values()) == cb.max_handshakes)
        await n.start(a.run)
        with trio.fail_after(10):
            await up.wait()
        assert sum(b._handshaking.values()) == cb.max_handshakes  # the crowd still holds its slots
        reply = await a.request(Frame.control(a.next_id(), {"op": "ping"}))
        assert reply.status == 0
        for s in crowd:
            s.close()
        n.cancel_scope.cancel()


async def test_a_tls_client_without_a_certificate_is_refused(pki):
    """Mutual TLS: a client that presents no certificate at all (but trusts the CA and says the
    right preface) never gets a frame read."""
    import ssl

    ca, cb = configs(pki("A"), pki("B"))
    peer = Peer()
    b = Link(cb, "B", uuid.uuid4().bytes, peer.on_request, lambda: None, lambda: None)
    async with trio.open_nursery() as n:
        await n.start(b.run)
        s = await netio.connect(cb.paths[0].local)
        await netio.sendall(s, secure.build_preface("tls", secure.Role.DIALER, bytes(32), "A"))
        got = b""
        while (pre := secure.parse_preface(got)) is None:
            got += await netio.recv(s, 65536)
        ctx = ssl.create_default_context(cafile=pki("A").tls_ca)
        ctx.check_hostname = False
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname="B")
        inc.write(got[pre[1]:])
        received = b""
        with trio.fail_after(10):
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await netio.sendall(s, out.read())
                    data = await netio.recv(s, 65536)
                    if not data:
                        break
                    received += data
                    inc.write(data)
                except ssl.SSLError:
                    break
            if out.pending:
                await netio.sendall(s, out.read())
            hello = proto.encode_bytes(Frame.hello(node_uuid=bytes(16), node_name="A", path_index=0, link_session=1))
            try:
                obj.write(hello + proto.encode_bytes(Frame.write(1, 1, 1, 1, 0, b"z" * 512)))
                await netio.sendall(s, out.read())
            except (ssl.SSLError, OSError):
                pass
            try:
                while data := await netio.recv(s, 65536):
                    received += data
            except ConnectionResetError:
                pass
        s.close()
        await until(lambda: b.refusals.total >= 1)
        assert peer.got == [] and not b.up
        assert received.endswith(secure.REFUSAL)
        n.cancel_scope.cancel()
