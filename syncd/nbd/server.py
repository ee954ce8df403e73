"""The NBD service: owns the sockets, negotiates options, and runs requests against exports.

One task receives a connection's requests; each request runs in its own task of the
connection's nursery (clients pipeline, replicated writes wait on the network); replies go to
one sender task that batches whatever is ready into a single vectored send. A client that
breaks the protocol is disconnected alone; nothing it sends can take the server down.

What clients may make the server hold is bounded: the bytes of requests received and not yet
answered plus replies not yet sent, per connection and over all connections. At the bound a
connection reads no further request until some complete, so a saturated replication link slows
the hosts (TCP back-pressure) instead of growing the server's memory.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import socket
import ssl

import trio

from .. import netio
from . import proto as p
from .export import BlockError, ClientIdentity, Export, ExportCatalog

log = logging.getLogger("syncd.nbd")

META_CONTEXTS = {"base:allocation": 1, "syncd:alua": 2}
_ERRNO_TO_NBD = {
    errno.EPERM: p.NBD_EPERM,
    errno.EIO: p.NBD_EIO,
    errno.ENOMEM: p.NBD_ENOMEM,
    errno.EAGAIN: p.NBD_ENOMEM,  # transitioning: the spec lets clients retry ENOMEM
    errno.EINVAL: p.NBD_EINVAL,
    errno.ENOSPC: p.NBD_ENOSPC,
    errno.EDQUOT: p.NBD_ENOSPC,
    errno.EFBIG: p.NBD_EINVAL,
    errno.EOVERFLOW: p.NBD_EOVERFLOW,
    errno.ENOTSUP: p.NBD_ENOTSUP,
    errno.ESHUTDOWN: p.NBD_ESHUTDOWN,
}
HANDSHAKE_TIMEOUT = 30.0
MAX_OPTIONS = 256
MAX_INFLIGHT = 128 << 20  # bytes all connections may hold (requests and replies), by default
MAX_INFLIGHT_PER_CONNECTION = 32 << 20  # ... and one connection
# What a request or a queued reply costs beyond its data bytes (objects, a task), so a flood of
# tiny requests is bounded as well.
_REQ_OVERHEAD = 4096
_BIG_WRITE = 128 << 10
_REPLY_OVERHEAD = 64
_KNOWN_CMD_FLAGS = p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_DF | p.CMD_FLAG_REQ_ONE | p.CMD_FLAG_FAST_ZERO


def cert_name(cert: dict | None) -> str | None:
    """The host name a client certificate carries: its subject CN, else its first DNS SAN."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    for k, v in cert.get("subjectAltName", ()):
        if k == "DNS":
            return v
    return None


def nbd_errno(err: int) -> int:
    return _ERRNO_TO_NBD.get(err, p.NBD_EIO)


def transmission_flags(e: Export) -> int:
    f = p.TFLAG_HAS_FLAGS
    if e.read_only:
        f |= p.TFLAG_READ_ONLY
    if e.can_flush:
        f |= p.TFLAG_SEND_FLUSH
    if e.can_fua:
        f |= p.TFLAG_SEND_FUA
    if e.can_trim and not e.read_only:
        f |= p.TFLAG_SEND_TRIM
    if e.can_zero and not e.read_only:
        f |= p.TFLAG_SEND_WRITE_ZEROES
    if e.can_multi_conn:
        f |= p.TFLAG_CAN_MULTI_CONN
    return f


class _Closed(Exception):
    pass


class NBDConnection:
    def __init__(self, server: "NBDServer", sock, identity: ClientIdentity):
        self.server = server
        self.sock = sock
        self.identity = identity
        self.conn = p.ServerConnection()
        self.export: Export | None = None
        self.contexts: dict[int, str] = {}
        self.out: collections.deque = collections.deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.closed = False  # ended: what it held was given back to the server at once
        self.inflight = 0
        self.held = 0  # bytes of requests being run and replies not yet sent (see the module doc)
        self.room = trio.lowlevel.ParkingLot()  # the reader, waiting for held to drop
        self.idle = trio.Event()
        self.flushed: trio.Event | None = None  # set by the sender once every queued reply is sent
        self.pacer = netio.Pacer()
        self.scope = trio.CancelScope()  # cancelled to disconnect this client (unexported)
        self.tls: ssl.SSLObject | None = None
        self._tls_in = self._tls_out = None

    # -- I/O -----------------------------------------------------------------------------------
    # Every byte goes through these three: in the clear, or through the TLS object (memory BIOs:
    # TLS stays sans-IO and the socket keeps its non-blocking fast path) once STARTTLS is done.
    async def _read(self, n: int) -> bytes:
        if self.tls is None:
            return await netio.recv(self.sock, n, self.pacer)
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""
            await self._flush_tls()
            data = await netio.recv(self.sock, 1 << 16, self.pacer)
            if not data:
                return b""
            self._tls_in.write(data)

    async def _send(self, bufs: list, pacer=None) -> None:
        if self.tls is None:
            await netio.sendmsg_all(self.sock, bufs, pacer)
            return
        for b in bufs:
            self.tls.write(b)
        await self._flush_tls()

    async def _flush_tls(self) -> None:
        data = self._tls_out.read()
        if data:
            await netio.sendall(self.sock, data)

    async def _start_tls(self) -> None:
        """Server side of the TLS handshake after NBD_OPT_STARTTLS; the host is then known by
        its certificate when it presented one the configured CA signed."""
        ctx = self.server.tls_context
        self._tls_in, self._tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(self._tls_in, self._tls_out, server_side=True)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = self._tls_out.read()
                if data:
                    await netio.sendall(self.sock, data)
                data = await netio.recv(self.sock, 1 << 16)
                if not data:
                    raise _Closed() from None
                self._tls_in.write(data)
        data = self._tls_out.read()
        if data:
            await netio.sendall(self.sock, data)
        self.tls = obj
        name = cert_name(obj.getpeercert())
        self.identity = dataclasses.replace(self.identity, tls_name=name)
        log.info("client %s: TLS %s%s", self.identity.address, obj.version(),
                 f", certificate {name!r}" if name else ", no client certificate")

    async def _recv(self) -> None:
        data = await self._read(1 << 16)
        if not data:
            raise _Closed()
        self.conn.receive_data(data)

    def _queue(self, *bufs) -> None:
        n = _REPLY_OVERHEAD
        for b in bufs:
            n += len(b)
        if not self.closed:
            self.held += n
            self.server.held += n
        self.out.append(bufs)
        self.lot.unpark()

    async def _sender(self) -> None:
        pacer = netio.Pacer()
        while True:
            if not self.out:
                if self.flushed is not None:
                    self.flushed.set()
                await self.lot.park()
                continue
            bufs = []
            n = 0
            while self.out and len(bufs) < 256:
                bufs.extend(self.out.popleft())
                n += _REPLY_OVERHEAD
            for b in bufs:
                n += len(b)
            await self._send(bufs, pacer)
            self._unhold(n)

    # -- what this connection holds ------------------------------------------------------------
    def _unhold(self, n: int) -> None:
        if self.closed:  # a request that completes after its connection ended
            return
        self.held -= n
        srv = self.server
        srv.held -= n
        if self.room and self.held < srv.max_inflight_per_connection:
            self.room.unpark_all()
        if srv.room and srv.held < srv.max_inflight:
            srv.room.unpark_all()

    async def _wait_for_room(self) -> None:
        """Read no further request while this connection or the server holds its maximum."""
        srv = self.server
        while True:
            if self.held >= srv.max_inflight_per_connection:
                await self.room.park()
            elif srv.held >= srv.max_inflight:
                await srv.room.park()
            else:
                return

    # -- handshake -----------------------------------------------------------------------------
    async def _next(self):
        while (ev := self.conn.next_event()) is p.NEED_DATA:
            await self._recv()
        return ev

    async def handshake(self) -> bool:
        """Negotiate options; True once in transmission, False if the client left."""
        await self._send([self.conn.greeting()])
        await self._next()  # client flags (validated by the codec)
        for _ in range(MAX_OPTIONS):
            opt = await self._next()
            done = await self._option(opt)
            if done is not None:
                return done
        raise p.ProtocolError(f"more than {MAX_OPTIONS} options without entering transmission")

    async def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        await self._send([self.conn.option_reply(option, rtype, data)])

    async def _error(self, option: int, rtype: int, message: str) -> None:
        await self._reply(option, rtype, message.encode())

    async def _option(self, ev: p.Option) -> bool | None:
        o, data = ev.option, ev.data
        exports = self.server.catalog.exports_for(self.identity)
        if o == p.OPT_EXPORT_NAME:
            e = exports.get(data.decode("utf-8", "replace"))
            if e is None:
                return False  # the spec's only answer here is to close the connection
            await self._send([self.conn.export_name_reply(e.size, transmission_flags(e))])
            self.export = e
            self.conn.start_transmission()
            return True
        if o == p.OPT_ABORT:
            try:
                await self._reply(o, p.REP_ACK)
            except (OSError, trio.BrokenResourceError):
                pass
            return False
        if o == p.OPT_LIST:
            if data:
                await self._error(o, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for name, e in exports.items():
                nb = name.encode()
                await self._reply(o, p.REP_SERVER, p.U32.pack(len(nb)) + nb + e.description.encode())
            await self._reply(o, p.REP_ACK)
            return None
        if o == p.OPT_STARTTLS:
            if self.server.tls_context is None:
                await self._error(o, p.REP_ERR_UNSUP, "TLS is not configured on this server")
                return None
            if self.tls is not None or data:
                await self._error(o, p.REP_ERR_INVALID,
                                  "TLS is already on" if self.tls else "NBD_OPT_STARTTLS takes no data")
                return None
            if self.conn.buffered():
                raise p.ProtocolError("client sent data after NBD_OPT_STARTTLS before the reply")
            await self._reply(o, p.REP_ACK)
            await self._start_tls()
            return None
        if self.tls is None and self.server.tls_required and o != p.OPT_ABORT:
            if o == p.OPT_EXPORT_NAME:
                return False
            await self._error(o, p.REP_ERR_TLS_REQD, "this server requires TLS: use NBD_OPT_STARTTLS first")
            return None
        if o in (p.OPT_INFO, p.OPT_GO):
            try:
                name, infos = p.parse_go(data)
            except (ValueError, UnicodeDecodeError) as e:
                await self._error(o, p.REP_ERR_INVALID, f"malformed request: {e}")
                return None
            e = exports.get(name)
            if e is None:
                await self._error(o, p.REP_ERR_UNKNOWN, f"no export named {name!r} for this client")
                return None
            tflags = transmission_flags(e)
            await self._reply(o, p.REP_INFO, self.conn.info_export(e.size, tflags))
            if p.INFO_NAME in infos:
                await self._reply(o, p.REP_INFO, p.U16.pack(p.INFO_NAME) + name.encode())
            if p.INFO_DESCRIPTION in infos:
                await self._reply(o, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION) + e.description.encode())
            if p.INFO_BLOCK_SIZE in infos:
                await self._reply(o, p.REP_INFO, self.conn.info_block_size(p.MIN_BLOCK, p.PREF_BLOCK, p.MAX_BLOCK))
            await self._reply(o, p.REP_ACK)
            if o == p.OPT_GO:
                self.export = e
                self.conn.start_transmission()
                return True
            return None
        if o == p.OPT_STRUCTURED_REPLY:
            if data:
                await self._error(o, p.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.conn.structured = True
            await self._reply(o, p.REP_ACK)
            return None
        if o in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            if o == p.OPT_SET_META_CONTEXT and not self.conn.structured:
                await self._error(o, p.REP_ERR_INVALID, "negotiate structured replies first")
                return None
            try:
                name, queries = p.parse_meta_query(data)
            except (ValueError, UnicodeDecodeError) as e:
                await self._error(o, p.REP_ERR_INVALID, f"malformed request: {e}")
                return None
            if name not in exports:
                await self._error(o, p.REP_ERR_UNKNOWN, f"no export named {name!r} for this client")
                return None
            chosen: dict[int, str] = {}
            if not queries and o == p.OPT_LIST_META_CONTEXT:
                chosen = {i: n for n, i in META_CONTEXTS.items()}
            for q in queries:
                for n, i in META_CONTEXTS.items():
                    ns = n.split(":")[0] + ":"
                    if q == n or (o == p.OPT_LIST_META_CONTEXT and q == ns):
                        chosen[i] = n
            for i, n in sorted(chosen.items()):
                await self._reply(o, p.REP_META_CONTEXT, p.U32.pack(i) + n.encode())
            if o == p.OPT_SET_META_CONTEXT:
                self.contexts = chosen
            await self._reply(o, p.REP_ACK)
            return None
        await self._error(o, p.REP_ERR_UNSUP, f"option {o} is not supported")
        return None

    # -- transmission --------------------------------------------------------------------------
    async def transmission(self, nursery: trio.Nursery) -> None:
        conn = self.conn
        srv = self.server
        while True:
            if self.held >= srv.max_inflight_per_connection or srv.held >= srv.max_inflight:
                await self._wait_for_room()
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                await self._recv()
                continue
            # Counted from its header on, before its payload is read: what passed the check
            # above is held before any other connection checks again.
            if isinstance(ev, p.PartialWrite):
                cost = _REQ_OVERHEAD + ev.request.length
                self.held += cost
                srv.held += cost
                ev = await self._complete_write(ev)
                if ev.length >= _BIG_WRITE:
                    # Reading, copying and forwarding a large write is a lot of work for one
                    # step: let the other tasks (the replication link's above all) have a turn.
                    await trio.lowlevel.checkpoint()
            else:
                cost = _REQ_OVERHEAD + ev.length if ev.type == p.CMD_WRITE or ev.type == p.CMD_READ else _REQ_OVERHEAD
                self.held += cost
                srv.held += cost
            if ev.type == p.CMD_DISC:
                return
            if self.server.draining and ev.type != p.CMD_BLOCK_STATUS:
                self._unhold(_request_cost(ev))
                self._fail(ev.cookie, p.NBD_ESHUTDOWN, "this array is shutting down: use another path")
                continue
            if (ev.type == p.CMD_READ or ev.type == p.CMD_WRITE) and not ev.flags and self._fast(ev):
                continue
            self.inflight += 1
            nursery.start_soon(self._run, ev)

    def _fast(self, r: p.Request) -> bool:
        """Run a plain read or write without a task when the export can (True if handled; the
        request's cost, held by the caller, is then given back when it completes)."""
        e = self.export
        cost = _REQ_OVERHEAD + r.length
        err = self._check(r)
        if err:
            self._unhold(cost)
            self._fail(r.cookie, err, "")
            return True
        if r.type == p.CMD_READ:
            fr = getattr(e, "fast_read", None)
            if fr is None:
                return False
            try:
                data = fr(r.offset, r.length)
            except BlockError as ex:
                self._unhold(cost)
                self._fail(r.cookie, nbd_errno(ex.errno), str(ex))
                return True
            if data is None:
                return False
            self._unhold(cost)
            if self.conn.structured:
                self._queue(self.conn.offset_data_head(r.cookie, r.offset, len(data)), data)
            else:
                self._queue(self.conn.simple_reply(r.cookie), data)
            return True
        fw = getattr(e, "fast_write", None)
        if fw is None:
            return False
        cookie = r.cookie
        self.inflight += 1

        def done(err: int, msg: str) -> None:
            self.inflight -= 1
            self._unhold(cost)
            if err:
                self._fail(cookie, nbd_errno(err), msg)
            elif self.conn.structured:
                self._queue(self.conn.done_chunk(cookie))
            else:
                self._queue(self.conn.simple_reply(cookie))
            if not self.inflight:
                self.idle.set()
                if self.server.draining:
                    self.server.quiet.unpark_all()

        try:
            if fw(r.offset, memoryview(r.data), done):
                return True
        except BlockError as ex:
            done(ex.errno, str(ex))
            return True
        self.inflight -= 1
        return False

    def _fail(self, cookie: int, err: int, msg: str) -> None:
        if self.conn.structured:
            self._queue(self.conn.error_chunk(cookie, err, msg))
        else:
            self._queue(self.conn.simple_reply(cookie, err))

    async def _complete_write(self, pw: p.PartialWrite) -> p.Request:
        r = pw.request
        buf = bytearray(r.length)
        view = memoryview(buf)
        got = self.conn.take_into(view)
        while got < r.length:
            if self.tls is None:
                n = await netio.recv_into(self.sock, view[got:])
            else:
                chunk = await self._read(r.length - got)
                n = len(chunk)
                view[got:got + n] = chunk
            if not n:
                raise _Closed()
            got += n
        return p.Request(r.flags, r.type, r.cookie, r.offset, r.length, buf)

    def _check(self, r: p.Request) -> int:
        """0 if the request may run, else the NBD error to answer with."""
        e = self.export
        if r.flags & ~_KNOWN_CMD_FLAGS:
            return p.NBD_EINVAL
        t = r.type
        if t in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            if e.read_only:
                return p.NBD_EPERM
            if r.offset + r.length > e.size:
                return p.NBD_ENOSPC
            if r.flags & p.CMD_FLAG_FAST_ZERO:
                return p.NBD_EINVAL  # not advertised
            if t == p.CMD_TRIM and not e.can_trim or t == p.CMD_WRITE_ZEROES and not e.can_zero:
                return p.NBD_EINVAL
            if r.flags & p.CMD_FLAG_FUA and not e.can_fua:
                return p.NBD_EINVAL
            return 0
        if t == p.CMD_READ:
            if r.length > p.MAX_BLOCK or r.offset + r.length > e.size:
                return p.NBD_EINVAL
            return 0
        if t == p.CMD_FLUSH:
            return 0 if e.can_flush else p.NBD_EINVAL
        if t == p.CMD_BLOCK_STATUS:
            if not self.contexts or r.offset + r.length > e.size or not self.conn.structured:
                return p.NBD_EINVAL
            return 0
        return p.NBD_EINVAL

    async def _run(self, r: p.Request) -> None:
        try:
            err = self._check(r)
            msg = ""
            if not err:
                try:
                    await self._execute(r)
                    return
                except BlockError as e:
                    err, msg = nbd_errno(e.errno), str(e)
                except OSError as e:
                    err, msg = nbd_errno(e.errno or errno.EIO), str(e)
            self._fail(r.cookie, err, msg)
        finally:
            self.inflight -= 1
            self._unhold(_request_cost(r))
            if not self.inflight:
                self.idle.set()
                if self.server.draining:
                    self.server.quiet.unpark_all()

    async def _execute(self, r: p.Request) -> None:
        e = self.export
        t = r.type
        if t == p.CMD_READ:
            data = await e.read(r.offset, r.length) if r.length else b""
            if self.conn.structured:
                self._queue(self.conn.offset_data_head(r.cookie, r.offset, len(data)), data)
            else:
                self._queue(self.conn.simple_reply(r.cookie), data)
            return
        if t == p.CMD_WRITE:
            await e.write(r.offset, memoryview(r.data), bool(r.flags & p.CMD_FLAG_FUA))
        elif t == p.CMD_FLUSH:
            await e.flush()
        elif t == p.CMD_TRIM:
            await e.trim(r.offset, r.length, bool(r.flags & p.CMD_FLAG_FUA))
        elif t == p.CMD_WRITE_ZEROES:
            await e.write_zeroes(r.offset, r.length, bool(r.flags & p.CMD_FLAG_FUA), bool(r.flags & p.CMD_FLAG_NO_HOLE))
        elif t == p.CMD_BLOCK_STATUS:
            await self._block_status(r)
            return
        if self.conn.structured:
            self._queue(self.conn.done_chunk(r.cookie))
        else:
            self._queue(self.conn.simple_reply(r.cookie))

    async def _block_status(self, r: p.Request) -> None:
        e = self.export
        length = r.length or (e.size - r.offset)
        chunks = []
        for cid, name in sorted(self.contexts.items()):
            if name == "base:allocation":
                ext = await e.allocation(r.offset, length)
                flags = [(ln, st) for ln, st in ext if ln]
                if r.flags & p.CMD_FLAG_REQ_ONE:
                    flags = flags[:1]
            else:
                st = e.alua(self.identity)
                flags = [(min(length, 0xFFFFFFFF), p.alua_word(st.state, st.epoch))]  # one extent
            chunks.append((cid, flags))
        for i, (cid, flags) in enumerate(chunks):
            self._queue(self.conn.block_status_chunk(r.cookie, cid, flags, done=i == len(chunks) - 1))


def _request_cost(r: p.Request) -> int:
    """What a request makes the server hold while it runs: its data (a write's payload, the
    buffer a read fills) and the overhead of a request."""
    t = r.type
    return _REQ_OVERHEAD + r.length if t == p.CMD_WRITE or t == p.CMD_READ else _REQ_OVERHEAD


class NBDServer:
    def __init__(self, catalog: ExportCatalog, tls_context: ssl.SSLContext | None = None, tls_required: bool = False,
                 max_inflight: int = MAX_INFLIGHT, max_inflight_per_connection: int = MAX_INFLIGHT_PER_CONNECTION):
        self.catalog = catalog
        self.tls_context = tls_context
        self.tls_required = tls_required and tls_context is not None
        self.max_inflight = max_inflight
        self.max_inflight_per_connection = max_inflight_per_connection
        self.held = 0  # bytes all connections hold (the sum of their ``held``)
        self.room = trio.lowlevel.ParkingLot()  # readers waiting for held to drop
        self.connections = 0
        self.live: set[NBDConnection] = set()
        self.draining = False  # shutting down: new requests are refused ESHUTDOWN, running ones finish
        self.quiet = trio.lowlevel.ParkingLot()  # drain(): a connection has nothing in flight any more

    async def drain(self) -> None:
        """Refuse new requests (ESHUTDOWN: the host's multipath moves to another path) and wait
        for the ones already received to finish, before connections close (the caller bounds
        the wait)."""
        self.draining = True
        while any(c.inflight for c in self.live):
            await self.quiet.park()

    def drop(self, pred) -> int:
        """Disconnect every connection for which ``pred(conn)`` holds (e.g. its export was
        unexported from its host); returns how many."""
        n = 0
        for c in list(self.live):
            if pred(c):
                c.scope.cancel()
                n += 1
        return n

    async def serve_tcp(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lsock = netio.listen_tcp((host, port))
        task_status.started(lsock.getsockname()[1])
        await self._serve(lsock)

    async def serve_unix(self, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(64)
        lsock.setblocking(False)
        task_status.started(path)
        await self._serve(lsock)

    async def _serve(self, lsock: socket.socket) -> None:
        try:
            async with trio.open_nursery() as n:
                while True:
                    sock, addr = await netio.accept(lsock)
                    ident = ClientIdentity(addr[0], addr[1]) if isinstance(addr, tuple) else ClientIdentity("")
                    n.start_soon(self._handle_sock, sock, ident)
        finally:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()

    async def _handle_sock(self, sock: socket.socket, ident: ClientIdentity) -> None:
        try:
            await self.handle(sock, ident)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def handle(self, sock, ident: ClientIdentity) -> None:
        c = NBDConnection(self, sock, ident)
        self.connections += 1
        self.live.add(c)
        try:
            with c.scope:
                await self._session(c)
        except (_Closed, p.ProtocolError, OSError, trio.BrokenResourceError, UnicodeDecodeError) as e:
            if not isinstance(e, _Closed):
                log.info("client %s: %s; disconnecting it", ident.address, e)
        except BaseExceptionGroup as eg:  # a request task failed unexpectedly: this client only
            cancelled, failed = eg.split(trio.Cancelled)
            # A client that goes away while its replies are sent is no failure of ours.
            gone, failed = failed.split((_Closed, OSError, trio.BrokenResourceError)) if failed else (None, None)
            if gone is not None:
                log.info("client %s: connection lost: %s; disconnecting it", ident.address, gone.exceptions[0])
            if failed is not None:
                log.warning("client %s: request failed: %r; disconnecting it", ident.address, failed)
            if cancelled is not None:  # the server is stopping: that must go on up
                raise cancelled from None
        finally:
            self.connections -= 1
            self.live.discard(c)
            if self.draining:  # what it had in flight no longer holds up drain()
                self.quiet.unpark_all()
            # Replies never sent, and requests the link may still complete, are not the
            # server's to hold any more.
            c.closed = True
            self.held -= c.held
            c.held = 0
            if self.room and self.held < self.max_inflight:
                self.room.unpark_all()

    async def _session(self, c: NBDConnection) -> None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as hs:
            ok = await c.handshake()
        if hs.cancelled_caught or not ok:
            return
        async with trio.open_nursery() as n:
            n.start_soon(c._sender)
            try:
                await c.transmission(n)
            except (_Closed, p.ProtocolError, OSError, trio.BrokenResourceError) as e:
                if not isinstance(e, _Closed):
                    log.info("client %s: %s; disconnecting it", c.identity.address, e)
                n.cancel_scope.cancel()
                return
            # NBD_CMD_DISC: answer what is in flight, then close.
            if c.inflight:
                c.idle = trio.Event()
                await c.idle.wait()
            # ... and sent: a reply the sender has taken may still be on its way into the socket.
            c.flushed = trio.Event()
            c.lot.unpark()  # an idle sender looks again and sets it at once
            await c.flushed.wait()
            n.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Serve files unreplicated: ``python -m syncd.nbd.server --port P --export NAME=PATH``."""
    import argparse

    from .export import FileExport, StaticCatalog

    ap = argparse.ArgumentParser(prog="python -m syncd.nbd.server", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=10809)
    ap.add_argument("--export", action="append", required=True, help="NAME=PATH (repeatable)")
    ns = ap.parse_args(argv)
    exports = {}
    for spec in ns.export:
        name, _, path = spec.partition("=")
        exports[name] = FileExport(name, path, description=f"syncd single-node export of {path}")
    logging.basicConfig(level=logging.INFO)

    async def run():
        await NBDServer(StaticCatalog(exports)).serve_tcp(ns.host, ns.port)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
