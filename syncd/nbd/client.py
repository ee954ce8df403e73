"""A small async NBD client (fixed newstyle, p.OPT_GO, simple or structured replies) with pipelining, over TCP
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


# The largest structured reply chunk accepted for each kind of request; a bigger one ends the
# connection before its bytes are buffered.
MAX_DESCRIPTORS = 1 << 20  # base:allocation extents in one chunk (the arrays send at most 1048576)
_MAX_ERROR_CHUNK = 6 + 4096 + 8


class _Pending:
    """One request waiting for its reply; structured chunks accumulate here until DONE."""

    __slots__ = ("ev", "cmd", "offset", "length", "error", "message", "exc", "result", "chunks", "extents",
                 "bad_status")

    def __init__(self, cmd: int, offset: int, length: int):
        self.ev = trio.Event()
        self.cmd, self.offset, self.length = cmd, offset, length
        self.error = 0
        self.message = ""
        self.exc: BaseException | None = None
        self.result = None
        self.chunks: list[tuple[int, int, bytes | None]] = []  # read: (offset, length, data; None = hole)
        self.extents: list[tuple[int, int]] | None = None
        self.bad_status = False  # the base:allocation chunk broke the protocol (its framing did not)

    def content(self, off: int, n: int, data: bytes | None) -> None:
        if self.cmd != p.CMD_READ:
            raise NBDDisconnected("read data in the reply to another command")
        if n <= 0 or off < self.offset or off + n > self.offset + self.length:
            raise NBDDisconnected(f"read chunk {off}+{n} outside the request {self.offset}+{self.length}")
        self.chunks.append((off, n, data))

    def finish(self) -> None:
        """DONE: check that a successful read's chunks tile the request exactly, and assemble it."""
        if self.error or self.cmd != p.CMD_READ:
            return
        chunks = sorted(self.chunks, key=lambda c: c[0])
        pos = self.offset
        for off, n, _ in chunks:
            if off != pos:
                raise NBDDisconnected("read chunks overlap or leave a gap before claiming success")
            pos += n
        if pos != self.offset + self.length:
            raise NBDDisconnected("read reply does not cover the request")
        if len(chunks) == 1 and chunks[0][2] is not None:
            self.result = chunks[0][2]
            return
        buf = bytearray(self.length)  # holes stay zero
        for off, n, data in chunks:
            if data is not None:
                buf[off - self.offset : off - self.offset + n] = data
        self.result = bytes(buf)


class NBDClient:
    def __init__(self, stream: trio.abc.Stream, name: str, rx: "_Buf", structured: bool = False):
        self.stream = stream
        self.name = name
        self.size = 0
        self.flags = 0
        self._rx = rx
        self._handles = itertools.count(1)
        self._waiting: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self.closed = False
        self._want_structured = structured
        self.structured = False  # negotiated: replies may be structured
        self.allocation_context: int | None = None  # base:allocation's id, when the server offers it

    async def _option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send one option; its replies up to the final ACK. An error reply raises NBDError."""
        rx = self._rx
        await self.stream.send_all(p.OPT_HDR.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, ln = p.OPT_REPLY.unpack(await rx.exactly(20))
            if magic != p.OPT_REPLY_MAGIC or o != opt:
                raise NBDDisconnected("bad option reply")
            if ln > p.MAX_OPTION_DATA:
                raise NBDDisconnected(f"option reply of {ln} bytes")
            body = await rx.exactly(ln)
            if rtype & 0x80000000:
                why = body.decode(errors="replace")
                raise NBDError(rtype & 0x7FFFFFFF, f"export {self.name!r}: option {opt} refused ({why})")
            if rtype == p.REP_ACK:
                return replies
            replies.append((rtype, body))

    async def _handshake(self) -> None:
        name = self.name.encode()
        if self._want_structured:
            # Structured replies and base:allocation when the server has them; else simple
            # replies (BLOCK_STATUS is then not available: see ``block_status``).
            try:
                await self._option(p.OPT_STRUCTURED_REPLY, b"")
                self.structured = True
            except NBDError:
                pass
            if self.structured:
                query = b"base:allocation"
                meta = p.U32.pack(len(name)) + name + struct.pack(">II", 1, len(query)) + query
                try:
                    for rtype, body in await self._option(p.OPT_SET_META_CONTEXT, meta):
                        if rtype == p.REP_META_CONTEXT and len(body) > 4 and body[4:] == query:
                            self.allocation_context = p.U32.unpack_from(body)[0]
                except NBDError:
                    pass
        data = p.U32.pack(len(name)) + name + p.U16.pack(0)
        for rtype, body in await self._option(p.OPT_GO, data):
            if rtype == p.REP_INFO and len(body) >= 12 and p.U16.unpack_from(body)[0] == p.INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", body[2:12])

    async def _receiver(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        rx = self._rx
        try:
            while True:
                head = await rx.exactly(16)
                magic, err, handle = p.SIMPLE.unpack(head)
                # A request leaves _waiting only once its reply is known good: when the reply
                # breaks the protocol, it fails with the connection below.
                if magic == p.SIMPLE_REPLY_MAGIC:
                    r = self._waiting.get(handle)
                    if r is None:
                        raise NBDDisconnected(f"reply to a request never sent ({handle})")
                    r.error = err
                    if r.cmd == p.CMD_READ and not err:
                        if self.structured:
                            raise NBDDisconnected("a simple reply to a read after structured replies were negotiated")
                        r.result = await rx.exactly(r.length)
                    del self._waiting[handle]
                    r.ev.set()
                elif magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
                    head += await rx.exactly(4)
                    _, flags, rtype, handle, ln = p.SHDR.unpack(head)
                    r = self._waiting.get(handle)
                    if r is None:
                        raise NBDDisconnected(f"reply to a request never sent ({handle})")
                    await self._chunk(r, rtype, ln)
                    if flags & p.REPLY_FLAG_DONE:
                        r.finish()
                        del self._waiting[handle]
                        r.ev.set()
                    elif rtype == p.REPLY_TYPE_NONE:
                        raise NBDDisconnected("NBD_REPLY_TYPE_NONE without the DONE flag")
                else:
                    raise NBDDisconnected(f"bad reply magic {magic:#x}")
        except (NBDDisconnected, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.closed = True
            for r in self._waiting.values():
                r.exc = e
                r.ev.set()
            self._waiting.clear()

    async def _chunk(self, r: _Pending, rtype: int, ln: int) -> None:
        """Take one structured reply chunk of ``ln`` bytes for ``r``. Bytes that break the
        framing raise NBDDisconnected (the connection cannot be trusted further); a
        base:allocation chunk that is well framed but wrong only marks the reply."""
        rx = self._rx
        if rtype == p.REPLY_TYPE_NONE:
            if ln:
                raise NBDDisconnected("NBD_REPLY_TYPE_NONE with a payload")
        elif rtype == p.REPLY_TYPE_OFFSET_DATA:
            if ln < 9 or ln - 8 > r.length:
                raise NBDDisconnected(f"read chunk of {ln} bytes for a request of {r.length}")
            (off,) = p.U64.unpack(await rx.exactly(8))
            r.content(off, ln - 8, await rx.exactly(ln - 8))
        elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
            if ln != 12:
                raise NBDDisconnected("NBD_REPLY_TYPE_OFFSET_HOLE of the wrong size")
            h = p.OFFSET_HOLE_BODY.parse(await rx.exactly(12))
            r.content(h.offset, h.length, None)
        elif rtype == p.REPLY_TYPE_BLOCK_STATUS:
            if r.cmd != p.CMD_BLOCK_STATUS or ln < 4 or (ln - 4) % 8 or ln > 4 + 8 * MAX_DESCRIPTORS:
                raise NBDDisconnected(f"block status chunk of {ln} bytes")
            body = await rx.exactly(ln)
            if p.U32.unpack_from(body)[0] != self.allocation_context:
                return  # a context we did not select: not ours to read
            if r.extents is not None:
                r.bad_status = True  # a context must appear once per reply
            r.extents = [d for d in p.DESCRIPTOR.iter_unpack(memoryview(body)[4:])]
        elif rtype & 0x8000:  # an error chunk (of a type we may not know: the reply is errored)
            if ln < 6 or ln > _MAX_ERROR_CHUNK:
                raise NBDDisconnected(f"error chunk of {ln} bytes")
            body = await rx.exactly(ln)
            err, mlen = struct.unpack_from(">IH", body)
            if mlen > ln - 6:
                raise NBDDisconnected("error chunk message longer than the chunk")
            r.error = r.error or err or p.NBD_EIO
            r.message = r.message or body[6 : 6 + mlen].decode(errors="replace")
        else:
            raise NBDDisconnected(f"unknown structured reply type {rtype}")

    async def _cmd(self, cmd: int, offset: int, length: int, flags: int = 0, data=None):
        if self.closed:
            raise NBDDisconnected("connection closed")
        h = next(self._handles)
        r = _Pending(cmd, offset, length)
        self._waiting[h] = r
        try:
            async with self._send_lock:
                hdr = p.REQ.pack(p.REQUEST_MAGIC, flags, cmd, h, offset, length)
                await self.stream.send_all(hdr + bytes(data) if data is not None else hdr)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            # Another task may close the connection while this one waits to send (the host
            # shim fails a path on one request's error): the caller sees the disconnection
            # it already handles, never the stream's own exception.
            self.closed = True
            self._waiting.pop(h, None)
            raise NBDDisconnected(f"connection closed: {e or type(e).__name__}") from None
        await r.ev.wait()
        if r.exc is not None:
            raise NBDDisconnected(str(r.exc))
        if r.error:
            raise NBDError(r.error, f"command {cmd} at {offset}+{length}" + (f": {r.message}" if r.message else ""))
        return r

    async def read(self, offset: int, length: int) -> bytes:
        return (await self._cmd(p.CMD_READ, offset, length)).result

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._cmd(p.CMD_WRITE, offset, len(data), p.CMD_FLAG_FUA if fua else 0, data)

    async def flush(self) -> None:
        await self._cmd(p.CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._cmd(p.CMD_TRIM, offset, length, p.CMD_FLAG_FUA if fua else 0)

    async def zero(self, offset: int, length: int, fua: bool = False, no_hole: bool = False,
                   fast: bool = False) -> None:
        """WRITE_ZEROES; ``no_hole`` keeps the range allocated; ``fast`` (FAST_ZERO): done only
        if the server can zero without writing, else NBDError(ENOTSUP) with nothing changed,
        raised here without asking a server that does not offer it."""
        if fast and not self.flags & p.TFLAG_SEND_FAST_ZERO:
            raise NBDError(p.NBD_ENOTSUP, f"export {self.name!r} does not offer fast zero")
        flags = (p.CMD_FLAG_FUA if fua else 0) | (p.CMD_FLAG_NO_HOLE if no_hole else 0) \
            | (p.CMD_FLAG_FAST_ZERO if fast else 0)
        await self._cmd(p.CMD_WRITE_ZEROES, offset, length, flags)

    async def block_status(self, offset: int, length: int, req_one: bool = False) -> list[tuple[int, int]] | None:
        """The server's base:allocation descriptors (length, flags) from ``offset``, as sent
        (untrusted: see ``extents.validate``), or None when its reply carried them wrongly.
        NBDError(ENOTSUP) when base:allocation was not negotiated."""
        if self.allocation_context is None:
            raise NBDError(p.NBD_ENOTSUP, f"export {self.name!r}: base:allocation not negotiated")
        r = await self._cmd(p.CMD_BLOCK_STATUS, offset, length, p.CMD_FLAG_REQ_ONE if req_one else 0)
        return None if r.bad_status else r.extents

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
                   tls: ssl.SSLContext | None = None, structured: bool = False):
    """Connect and enter transmission; ``source`` binds the local address (the array tells hosts
    apart by it), ``tls`` is the client context for nbds URIs; ``structured`` negotiates
    structured replies and base:allocation when the server has them (``block_status``)."""
    stream, rx, u = await _connect(uri, connect_timeout, source, tls)
    c = NBDClient(stream, u.name, rx, structured)
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
