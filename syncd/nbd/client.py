"""A small async NBD client (fixed newstyle, p.OPT_GO, simple replies) with pipelining, over TCP
or a unix socket, optionally upgraded to TLS with NBD_OPT_STARTTLS.

Used by the host shim (its paths and ALUA probes), the workload/checker tools and the tests.
"""

from __future__ import annotations

import errno
import itertools
import ssl
import struct
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from . import proto as p

NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL, 28: errno.ENOSPC,
             75: errno.EOVERFLOW, 95: errno.ENOTSUP, 108: errno.ESHUTDOWN}


class NBDError(Exception):
    def __init__(self, err: int, what: str):
        super().__init__(f"{what}: NBD error {err}")
        self.nbd_errno = err
        self.errno = NBD_ERRNO.get(err, errno.EIO)


class NBDDisconnected(Exception):
    pass


class _Buf:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = await self.stream.receive_some(max(65536, n - len(self.buf)))
            if not d:
                raise NBDDisconnected("server closed the connection")
            self.buf += d
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class NBDClient:
    def __init__(self, stream: trio.abc.Stream, name: str, rx: "_Buf"):
        self.stream = stream
        self.name = name
        self.size = 0
        self.flags = 0
        self._rx = rx
        self._handles = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list, int]] = {}
        self._send_lock = trio.Lock()
        self.closed = False

    async def _handshake(self) -> None:
        rx = self._rx
        name = self.name.encode()
        data = p.U32.pack(len(name)) + name + p.U16.pack(0)
        await self.stream.send_all(p.OPT_HDR.pack(p.IHAVEOPT, p.OPT_GO, len(data)) + data)
        while True:
            magic, opt, rtype, ln = p.OPT_REPLY.unpack(await rx.exactly(20))
            body = await rx.exactly(ln)
            if magic != p.OPT_REPLY_MAGIC:
                raise NBDDisconnected("bad option reply magic")
            if rtype & 0x80000000:
                why = body[4:].decode(errors="replace") if len(body) > 4 else ""
                raise NBDError(rtype & 0x7FFFFFFF, f"export {self.name!r} refused ({why})")
            if rtype == p.REP_INFO and p.U16.unpack_from(body)[0] == p.INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", body[2:12])
            elif rtype == p.REP_ACK:
                return

    async def _receiver(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        rx = self._rx
        try:
            while True:
                magic, err, handle = p.SIMPLE.unpack(await rx.exactly(16))
                if magic != p.SIMPLE_REPLY_MAGIC:
                    raise NBDDisconnected(f"bad reply magic {magic:#x}")
                ev, slot, rlen = self._waiting.pop(handle)
                slot.append(err)
                if rlen and not err:
                    slot.append(await rx.exactly(rlen))
                ev.set()
        except (NBDDisconnected, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.closed = True
            for ev, slot, _ in self._waiting.values():
                slot.append(e)
                ev.set()
            self._waiting.clear()

    async def _cmd(self, cmd: int, offset: int, length: int, flags: int = 0, data=None, rlen: int = 0):
        if self.closed:
            raise NBDDisconnected("connection closed")
        h = next(self._handles)
        ev, slot = trio.Event(), []
        self._waiting[h] = (ev, slot, rlen)
        async with self._send_lock:
            hdr = p.REQ.pack(p.REQUEST_MAGIC, flags, cmd, h, offset, length)
            await self.stream.send_all(hdr + bytes(data) if data is not None else hdr)
        await ev.wait()
        if isinstance(slot[0], Exception):
            raise NBDDisconnected(str(slot[0]))
        if slot[0]:
            raise NBDError(slot[0], f"command {cmd} at {offset}+{length}")
        return slot[1] if rlen else None

    async def read(self, offset: int, length: int) -> bytes:
        return await self._cmd(p.CMD_READ, offset, length, rlen=length)

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._cmd(p.CMD_WRITE, offset, len(data), p.CMD_FLAG_FUA if fua else 0, data)

    async def flush(self) -> None:
        await self._cmd(p.CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._cmd(p.CMD_TRIM, offset, length)

    async def zero(self, offset: int, length: int) -> None:
        await self._cmd(p.CMD_WRITE_ZEROES, offset, length)

    def abort_on_close(self) -> None:
        """Make closing this connection a reset: requests still queued in our kernel are
        dropped, never delivered later (the host re-issues them on another path)."""
        from ..netio import set_abortive_close

        s = getattr(self.stream, "transport_stream", self.stream)
        if getattr(s, "socket", None) is not None:
            set_abortive_close(s.socket)
        self.closed = True

    async def disconnect(self) -> None:
        if not self.closed:
            try:
                async with self._send_lock:
                    await self.stream.send_all(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self.closed = True
        await self.stream.aclose()


@dataclass(frozen=True)
class NbdUri:
    """An NBD URI (the NBD project's URI format): ``nbd://HOST[:PORT]/EXPORT`` over TCP,
    ``nbd+unix:///EXPORT?socket=PATH`` over a unix socket, ``nbds``/``nbds+unix`` for TLS."""

    name: str
    host: str = "127.0.0.1"
    port: int = 10809
    socket: str | None = None
    tls: bool = False

    def __str__(self) -> str:
        s, name = "nbds" if self.tls else "nbd", urllib.parse.quote(self.name)
        if self.socket:
            return f"{s}+unix:///{name}?socket={urllib.parse.quote(self.socket)}"
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{s}://{h}:{self.port}/{name}"

    def export(self, name: str) -> "NbdUri":
        return replace(self, name=name)


def parse_uri(uri: str) -> NbdUri:
    """Parse an NBD URI; ValueError names what is wrong."""
    u = urllib.parse.urlsplit(uri)
    schemes = {"nbd": (False, False), "nbds": (True, False), "nbd+unix": (False, True), "nbds+unix": (True, True)}
    if u.scheme not in schemes:
        raise ValueError(f"{uri}: not an NBD URI (nbd://HOST:PORT/NAME, nbds://..., nbd+unix:///NAME?socket=PATH)")
    tls, unix = schemes[u.scheme]
    name = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    query = urllib.parse.parse_qs(u.query)
    if unix:
        sock = query.get("socket", [None])[0]
        if not sock or u.netloc:
            raise ValueError(f"{uri}: a unix NBD URI has no host and needs ?socket=PATH")
        return NbdUri(name, socket=sock, tls=tls)
    try:
        port = u.port or 10809
    except ValueError:
        raise ValueError(f"{uri}: bad port") from None
    return NbdUri(name, host=u.hostname or "127.0.0.1", port=port, tls=tls)


async def _connect(uri: str | NbdUri, connect_timeout: float, source: str | None,
                   tls: ssl.SSLContext | None) -> tuple[trio.abc.Stream, "_Buf", NbdUri]:
    """Open the transport, take the fixed-newstyle greeting and, for an nbds URI, upgrade the
    connection with NBD_OPT_STARTTLS. Returns the stream ready for options."""
    u = uri if isinstance(uri, NbdUri) else parse_uri(uri)
    with trio.fail_after(connect_timeout):
        if u.socket:
            stream = await trio.open_unix_socket(u.socket)
        else:
            stream = await trio.open_tcp_stream(u.host, u.port, local_address=source)
        try:
            rx = _Buf(stream)
            head = await rx.exactly(18)
            if p.U64.unpack_from(head)[0] != p.NBDMAGIC or p.U64.unpack_from(head, 8)[0] != p.IHAVEOPT:
                raise NBDDisconnected("not a fixed-newstyle NBD server")
            await stream.send_all(p.U32.pack(p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
            if u.tls:
                await stream.send_all(p.OPT_HDR.pack(p.IHAVEOPT, p.OPT_STARTTLS, 0))
                magic, opt, rtype, ln = p.OPT_REPLY.unpack(await rx.exactly(20))
                body = await rx.exactly(ln)
                if magic != p.OPT_REPLY_MAGIC or opt != p.OPT_STARTTLS:
                    raise NBDDisconnected("bad reply to NBD_OPT_STARTTLS")
                if rtype != p.REP_ACK:
                    raise NBDError(rtype & 0x7FFFFFFF, f"{u}: the server refused TLS ({body.decode(errors='replace')})")
                ctx = tls or ssl.create_default_context()
                stream = trio.SSLStream(stream, ctx, server_hostname=None if u.socket else u.host)
                await stream.do_handshake()
                rx = _Buf(stream)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream, rx, u


def client_tls_context(ca: str | None = None, certificate: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client context: arrays verified against ``ca`` (else the system's CAs), and our
    own certificate (which names the host to the array) when given."""
    ctx = ssl.create_default_context(cafile=ca)
    if certificate:
        ctx.load_cert_chain(certificate, key)
    return ctx


@asynccontextmanager
async def open_nbd(uri: str | NbdUri, connect_timeout: float = 5.0, source: str | None = None,
                   tls: ssl.SSLContext | None = None):
    """Connect and enter transmission; ``source`` binds the local address (the array tells hosts
    apart by it), ``tls`` is the client context for nbds URIs."""
    stream, rx, u = await _connect(uri, connect_timeout, source, tls)
    c = NBDClient(stream, u.name, rx)
    try:
        with trio.fail_after(connect_timeout):
            await c._handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    try:
        async with trio.open_nursery() as n:
            await n.start(c._receiver)
            try:
                yield c
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(2):
                        await c.disconnect()
                n.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        # The receiver handles its own errors, so a group holds what the caller's block raised:
        # give the caller back its own exception, not a group it does not expect.
        if len(eg.exceptions) == 1:
            raise eg.exceptions[0] from eg.exceptions[0].__cause__
        raise


class AluaProbe:
    """A connection that reads the ``syncd:alua`` meta context of one export, the way a
    multipath initiator polls REPORT TARGET PORT GROUPS: structured replies and the meta context
    are negotiated, then each ``query()`` is one NBD_CMD_BLOCK_STATUS. Requests are sequential."""

    def __init__(self, stream: trio.abc.Stream, name: str, rx: "_Buf"):
        self.stream = stream
        self.name = name
        self._rx = rx
        self.size = 0
        self.context = None
        self._handles = itertools.count(1)

    async def _option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        await self.stream.send_all(p.OPT_HDR.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, ln = p.OPT_REPLY.unpack(await self._rx.exactly(20))
            body = await self._rx.exactly(ln)
            if magic != p.OPT_REPLY_MAGIC or o != opt:
                raise NBDDisconnected("bad option reply")
            if rtype & 0x80000000:
                raise NBDError(rtype & 0x7FFFFFFF, f"option {opt} refused: {body.decode(errors='replace')}")
            if rtype == p.REP_ACK:
                return replies
            replies.append((rtype, body))

    async def list_exports(self) -> list[tuple[str, str]]:
        """NBD_OPT_LIST: (name, description) of every export this client may see."""
        out = []
        for rtype, body in await self._option(p.OPT_LIST, b""):
            if rtype == p.REP_SERVER and len(body) >= 4:
                n = p.U32.unpack_from(body)[0]
                out.append((body[4:4 + n].decode(errors="replace"), body[4 + n:].decode(errors="replace")))
        return out

    async def handshake(self) -> None:
        await self._option(p.OPT_STRUCTURED_REPLY, b"")
        name = self.name.encode()
        query = b"syncd:alua"
        meta = p.U32.pack(len(name)) + name + struct.pack(">II", 1, len(query)) + query
        for rtype, body in await self._option(p.OPT_SET_META_CONTEXT, meta):
            if rtype == p.REP_META_CONTEXT and body[4:] == query:
                self.context = p.U32.unpack_from(body)[0]
        if self.context is None:
            raise NBDError(95, "the server does not offer the syncd:alua meta context")
        go = p.U32.pack(len(name)) + name + p.U16.pack(0)
        for rtype, body in await self._option(p.OPT_GO, go):
            if rtype == p.REP_INFO and p.U16.unpack_from(body)[0] == p.INFO_EXPORT:
                self.size = p.U64.unpack_from(body, 2)[0]

    async def query(self) -> tuple[int, int]:
        """(ALUA state, epoch) as this array presents them to this connection."""
        h = next(self._handles)
        length = min(self.size, 0xFFFFFFFF) or 1
        await self.stream.send_all(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, h, 0, length))
        state = None
        while True:
            magic, flags, rtype, handle, ln = p.SHDR.unpack(await self._rx.exactly(20))
            body = await self._rx.exactly(ln)
            if magic != p.STRUCTURED_REPLY_MAGIC or handle != h:
                raise NBDDisconnected("unexpected reply to BLOCK_STATUS")
            if rtype == p.REPLY_TYPE_BLOCK_STATUS and p.U32.unpack_from(body)[0] == self.context:
                state = p.alua_unpack(p.U32.unpack_from(body, 8)[0])
            elif rtype & 0x8000:
                raise NBDError(p.U32.unpack_from(body)[0], "BLOCK_STATUS")
            if flags & p.REPLY_FLAG_DONE:
                break
        if state is None:
            raise NBDDisconnected("no syncd:alua extent in the reply")
        return state


@asynccontextmanager
async def open_alua_probe(uri: str | NbdUri, connect_timeout: float = 5.0, source: str | None = None,
                          tls: ssl.SSLContext | None = None):
    stream, rx, u = await _connect(uri, connect_timeout, source, tls)
    try:
        probe = AluaProbe(stream, u.name, rx)
        with trio.fail_after(connect_timeout):
            await probe.handshake()
        yield probe
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def list_exports(uri: str | NbdUri, connect_timeout: float = 5.0, source: str | None = None,
                       tls: ssl.SSLContext | None = None) -> list[tuple[str, str]]:
    """The (name, description) pairs a server lists to this client (the URI's export is ignored)."""
    stream, rx, _ = await _connect(uri, connect_timeout, source, tls)
    try:
        with trio.fail_after(connect_timeout):
            out = await AluaProbe(stream, "", rx).list_exports()
            await stream.send_all(p.OPT_HDR.pack(p.IHAVEOPT, p.OPT_ABORT, 0))
        return out
    finally:
        await trio.aclose_forcefully(stream)
