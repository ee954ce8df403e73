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
import math
import os
import socket
import ssl

import trio

from .. import buffers, netio
from ..buffers import PayloadBuffers
from ..config import NbdLimits
from ..metrics.stats import IoStats
from . import extents
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
MAX_OPTIONS = 256
MAX_INFLIGHT = NbdLimits.max_inflight  # bytes all connections may hold (requests and replies), by default
MAX_INFLIGHT_PER_CONNECTION = NbdLimits.max_inflight_per_connection  # ... and one connection
# Errors of accept() and socket() that mean "no file descriptor or memory for one more".
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
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
        if e.can_fast_zero:
            f |= p.TFLAG_SEND_FAST_ZERO
    if e.can_multi_conn:
        f |= p.TFLAG_CAN_MULTI_CONN
    return f


class _Closed(Exception):
    pass


class _Room:
    """Readers waiting for what is held to drop. ``waiting`` counts them as a plain attribute:
    every completed request asks whether anyone waits, and a ``ParkingLot``'s truth value is a
    method call."""

    __slots__ = ("_lot", "waiting")

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()
        self.waiting = 0

    async def park(self) -> None:
        self.waiting += 1
        try:
            await self._lot.park()
        finally:
            self.waiting -= 1

    def unpark_all(self) -> None:
        self._lot.unpark_all()


class NBDConnection:
    def __init__(self, server: "NBDServer", sock, identity: ClientIdentity):
        self.server = server
        self.sock = sock
        self.identity = identity
        self.conn = p.ServerConnection()
        self.export: Export | None = None
        self.stats: IoStats | None = None  # the chosen export's, if it keeps them (metrics)
        self.contexts: dict[int, str] = {}
        self.out: collections.deque = collections.deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.closed = False  # ended: what it held was given back to the server at once
        self.inflight = 0
        self.held = 0  # bytes of requests being run and replies not yet sent (see the module doc)
        self.room = _Room()  # the reader, waiting for held to drop
        self.idle = trio.Event()
        self.flushed: trio.Event | None = None  # set by the sender once every queued reply is sent
        # Replies sent inline at the end of a batch (netio.batch_end): queued for it; bytes the
        # kernel did not take and what they hold (the sender task sends them first); the
        # sender task is mid-send.
        self.flush_queued = False
        self.rest: list = []
        self.rest_held = 0
        self.sending = False
        self.pacer = netio.Pacer()
        self.probe = netio.Probe(sock)  # the requests' receives (_recv) ask before they receive
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
        # In the clear straight from the socket: one coroutine less per request than _read.
        data = await (netio.recv(self.sock, 1 << 16, self.pacer, self.probe) if self.tls is None
                      else self._read(1 << 16))
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
        if not netio.defer(self):
            self.lot.unpark()

    def _next_replies(self) -> tuple[list, int]:
        """Queued replies to send in one go, and what they hold."""
        bufs: list = []
        n = 0
        out = self.out
        while out and len(bufs) < 256:
            bufs.extend(out.popleft())
            n += _REPLY_OVERHEAD
        for b in bufs:
            n += len(b)
        return bufs, n

    def flush_inline(self) -> None:
        """The end of a batch (``netio``): send the queued replies now without blocking; what
        the kernel does not take (and anything over TLS, or while the sender task is mid-send)
        is left to the sender task."""
        if self.tls is not None or self.sending or self.rest or self.closed:
            self.lot.unpark()
            return
        while self.out:
            bufs, n = self._next_replies()
            _, left = netio.send_available(self.sock, bufs)
            if left:
                self.rest, self.rest_held = left, n
                self.lot.unpark()
                return
            self._unhold(n)

    async def _sender(self) -> None:
        pacer = netio.Pacer()
        while True:
            if self.rest:  # what an inline send left: it goes first
                bufs, n = self.rest, self.rest_held
                self.rest, self.rest_held = [], 0
            elif not self.out:
                if self.flushed is not None:
                    self.flushed.set()
                await self.lot.park()
                continue
            else:
                bufs, n = self._next_replies()
            self.sending = True
            with trio.move_on_after(self.server.limits.reply_timeout) as late:
                await self._send(bufs, pacer)
            self.sending = False
            if late.cancelled_caught:
                # What it does not read stays held: a client that stops reading is dropped,
                # not waited for forever.
                log.info("client %s: read none of its replies for %gs; disconnecting it",
                         self.identity.address, self.server.limits.reply_timeout)
                self.scope.cancel()
                return
            self._unhold(n)

    # -- what this connection holds ------------------------------------------------------------
    def _unhold(self, n: int) -> None:
        if self.closed:  # a request that completes after its connection ended
            return
        self.held -= n
        srv = self.server
        srv.held -= n
        if self.room.waiting and self.held < srv.max_inflight_per_connection:
            self.room.unpark_all()
        if srv.room.waiting and srv.held < srv.max_inflight:
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
        if o == p.OPT_ABORT:
            try:
                await self._reply(o, p.REP_ACK)
            except (OSError, trio.BrokenResourceError):
                pass
            return False
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
        # FORCEDTLS (the NBD protocol's TLS section; nbdkit checks the same ahead of its option
        # switch): before TLS nothing else is even parsed, so no export name, description or WWN
        # is ever sent or acted on in clear text.
        if self.tls is None and self.server.tls_required:
            if o == p.OPT_EXPORT_NAME:
                # It has no error reply: the protocol says to end the session.
                log.info("client %s: NBD_OPT_EXPORT_NAME without TLS, which this server requires; "
                         "disconnecting it", self.identity.address)
                return False
            await self._error(o, p.REP_ERR_TLS_REQD, "this server requires TLS: use NBD_OPT_STARTTLS first")
            return None
        exports = self.server.catalog.exports_for(self.identity)
        if o == p.OPT_EXPORT_NAME:
            e = exports.get(data.decode("utf-8", "replace"))
            if e is None:
                return False  # the spec's only answer here is to close the connection
            await self._send([self.conn.export_name_reply(e.size, transmission_flags(e))])
            self.export, self.stats = e, getattr(e, "io_stats", None)
            self.conn.start_transmission()
            return True
        if o == p.OPT_LIST:
            if data:
                await self._error(o, p.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            for name, e in exports.items():
                nb = name.encode()
                await self._reply(o, p.REP_SERVER, p.U32.pack(len(nb)) + nb + e.description.encode())
            await self._reply(o, p.REP_ACK)
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
                self.export, self.stats = e, getattr(e, "io_stats", None)
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
        # The requests one recv brought are a batch (netio): their replies, and the frames they
        # send to the peer, go out when the batch ends, before this loop waits again.
        was = netio.batch_begin()
        try:
            while True:
                if self.held >= srv.max_inflight_per_connection or srv.held >= srv.max_inflight:
                    netio.batch_end(was)
                    try:
                        await self._wait_for_room()
                    finally:
                        was = netio.batch_begin()
                ev = conn.next_event()
                if ev is p.NEED_DATA:
                    netio.batch_end(was)
                    try:
                        await self._recv()
                    finally:
                        was = netio.batch_begin()
                    continue
                # Counted from its header on, before its payload is read: what passed the check
                # above is held before any other connection checks again.
                if isinstance(ev, p.PartialWrite):
                    self._hold(_REQ_OVERHEAD)  # and its payload as it arrives
                    netio.batch_end(was)
                    try:
                        ev = await self._complete_write(ev)
                        if ev.length >= _BIG_WRITE:
                            # Reading, copying and forwarding a large write is a lot of work for
                            # one step: let the other tasks (the replication link's above all)
                            # have a turn.
                            await trio.lowlevel.checkpoint()
                    finally:
                        was = netio.batch_begin()
                else:
                    self._hold(_request_cost(ev))
                if ev.type == p.CMD_DISC:
                    return
                st = self.stats
                t0 = st.begin() if st is not None else 0.0
                if self.server.draining and ev.type != p.CMD_BLOCK_STATUS:
                    self._unhold(_request_cost(ev))
                    self._fail(ev.cookie, p.NBD_ESHUTDOWN, "this array is shutting down: use another path")
                    if st is not None:
                        st.end(ev.type, ev.length, t0, p.NBD_ESHUTDOWN)
                    continue
                if (ev.type == p.CMD_READ or ev.type == p.CMD_WRITE) and not ev.flags and self._fast(ev, t0):
                    continue
                self.inflight += 1
                nursery.start_soon(self._run, ev, t0)
        finally:
            netio.batch_end(was)

    def _fast(self, r: p.Request, t0: float) -> bool:
        """Run a plain read or write without a task when the export can (True if handled; the
        request's cost, held by the caller, is then given back when it completes)."""
        e = self.export
        st = self.stats
        cost = _request_cost(r)
        err = self._check(r)
        if err:
            self._unhold(cost)
            self._fail(r.cookie, err, "")
            if st is not None:
                st.end(r.type, r.length, t0, err)
            return True
        if r.type == p.CMD_READ:
            fr = getattr(e, "fast_read", None)
            if fr is None:
                return False
            try:
                data = fr(r.offset, r.length, self.server.payloads)
            except BlockError as ex:
                self._unhold(cost)
                self._fail(r.cookie, nbd_errno(ex.errno), str(ex))
                if st is not None:
                    st.end(r.type, r.length, t0, nbd_errno(ex.errno))
                return True
            if data is None:
                return False
            self._unhold(cost)
            if self.conn.structured:
                self._queue(self.conn.offset_data_head(r.cookie, r.offset, len(data)), data)
            else:
                self._queue(self.conn.simple_reply(r.cookie), data)
            if st is not None:
                st.end(r.type, r.length, t0, 0)
            return True
        fw = getattr(e, "fast_write", None)
        if fw is None:
            return False
        cookie, length = r.cookie, r.length
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
            if st is not None:
                st.end(p.CMD_WRITE, length, t0, nbd_errno(err) if err else 0)
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
        """Receive the rest of a write's payload. Its bytes are held (see the module doc) as
        they arrive, and no more of them are read than the server has room for; when there is
        none, one connection at a time may receive a whole payload beyond it (the server's
        ``overshoot`` turn), so that writes half received everywhere never wait for each other:
        all connections together hold at most ``max_inflight`` plus two requests. A payload
        that stops arriving for ``payload_timeout`` ends the connection."""
        r = pw.request
        srv = self.server
        buf = srv.payloads.get(r.length)  # large ones reused (syncd.buffers: no page faults)
        view = memoryview(buf)
        got = self.conn.take_into(view)
        self._hold(got)
        srv.receiving += _REQ_OVERHEAD + got
        pending = 0
        timeout = srv.limits.payload_timeout
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout) as deadline:
                while got < r.length:
                    want = r.length - got
                    if srv.overshoot is not self:
                        if srv.held >= srv.max_inflight:
                            deadline.deadline = math.inf  # held back by the server, not late
                            await self._wait_for_payload_room()
                            deadline.deadline = trio.current_time() + timeout
                        if srv.overshoot is not self:
                            want = min(want, srv.max_inflight - srv.held)
                    if self.tls is None:
                        # Counted in the same step as received (no wait in between): other
                        # connections never see room this one has taken.
                        await trio.lowlevel.wait_readable(self.sock)
                        if srv.overshoot is not self:
                            want = min(r.length - got, srv.max_inflight - srv.held)
                            if want <= 0:
                                continue
                        n = netio.recv_into_nowait(self.sock, view[got:got + want])
                        if n is None:
                            continue
                        self._hold(n)
                        srv.receiving += n
                    else:
                        # Decrypted a record at a time: held before the wait, a record's worth.
                        want = pending = min(want, 1 << 16)
                        self._hold(pending)
                        srv.receiving += pending
                        chunk = await self._read(want)
                        pending = 0
                        n = len(chunk)
                        view[got:got + n] = chunk
                        srv.receiving -= want - n
                        self._unhold(want - n)
                    if not n:
                        raise _Closed()
                    got += n
                    deadline.deadline = trio.current_time() + timeout
        finally:
            srv.receiving -= _REQ_OVERHEAD + got + pending
            if srv.overshoot is self:
                srv.overshoot = None
                srv.room.unpark_all()
        if got < r.length:
            raise p.ProtocolError(f"the payload of a {r.length}-byte write stopped arriving for {timeout:g}s "
                                  f"({got} bytes received)")
        return p.Request(r.flags, r.type, r.cookie, r.offset, r.length, buf)

    async def _wait_for_payload_room(self) -> None:
        srv = self.server
        while srv.held >= srv.max_inflight:
            # Nothing but payloads still arriving holds it all (each takes no more than there
            # is room for), so nothing will give room back: one of them receives its whole
            # payload beyond the bound.
            if srv.overshoot is None and srv.held <= srv.receiving:
                srv.overshoot = self
                return
            await srv.room.park()

    def _hold(self, n: int) -> None:
        self.held += n
        self.server.held += n

    def _check(self, r: p.Request) -> int:
        """0 if the request may run, else the NBD error to answer with (the NBD protocol's
        choices, as nbdkit makes them): offsets and lengths are Python integers, so an offset
        near 2**64 or one whose sum with the length passes it is simply beyond the end."""
        e = self.export
        f = r.flags
        if f & ~_KNOWN_CMD_FLAGS:
            return p.NBD_EINVAL
        t = r.type
        if (f & (p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO) and t != p.CMD_WRITE_ZEROES
                or f & p.CMD_FLAG_REQ_ONE and t != p.CMD_BLOCK_STATUS
                or f & p.CMD_FLAG_DF and (t != p.CMD_READ or not self.conn.structured)):
            return p.NBD_EINVAL
        if f & p.CMD_FLAG_FUA and not e.can_fua:
            return p.NBD_EINVAL
        if t == p.CMD_FLUSH:
            return 0 if e.can_flush and not r.offset and not r.length else p.NBD_EINVAL
        if t not in (p.CMD_READ, p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS):
            return p.NBD_EINVAL
        if t != p.CMD_READ and t != p.CMD_BLOCK_STATUS and e.read_only:
            return p.NBD_EPERM
        if not r.length:  # nothing to do is not a request (nbdkit: EINVAL)
            return p.NBD_EINVAL
        if r.offset + r.length > e.size:
            return p.NBD_ENOSPC if t == p.CMD_WRITE or t == p.CMD_WRITE_ZEROES else p.NBD_EINVAL
        if t == p.CMD_READ:
            return p.NBD_EINVAL if r.length > p.MAX_BLOCK else 0
        if t == p.CMD_WRITE:
            return 0
        if f & p.CMD_FLAG_FAST_ZERO and not (e.can_zero and e.can_fast_zero):
            return p.NBD_EINVAL  # not advertised
        if t == p.CMD_TRIM:
            return 0 if e.can_trim else p.NBD_EINVAL
        if t == p.CMD_WRITE_ZEROES:
            return 0 if e.can_zero else p.NBD_EINVAL
        # BLOCK_STATUS
        return 0 if self.contexts and self.conn.structured else p.NBD_EINVAL

    async def _run(self, r: p.Request, t0: float = 0.0) -> None:
        err = p.NBD_ESHUTDOWN  # unless answered: cancelled (the client left, the server stops)
        try:
            checked = self._check(r)
            msg = ""
            if checked:
                err = checked
            else:
                try:
                    await self._execute(r)
                    err = 0
                    return
                except BlockError as e:
                    err, msg = nbd_errno(e.errno), str(e)
                except OSError as e:
                    err, msg = nbd_errno(e.errno or errno.EIO), str(e)
            self._fail(r.cookie, err, msg)
        finally:
            if self.stats is not None:
                self.stats.end(r.type, r.length, t0, err)
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
            await e.write_zeroes(r.offset, r.length, bool(r.flags & p.CMD_FLAG_FUA),
                                 bool(r.flags & p.CMD_FLAG_NO_HOLE), fast=bool(r.flags & p.CMD_FLAG_FAST_ZERO))
        elif t == p.CMD_BLOCK_STATUS:
            await self._block_status(r)
            return
        if self.conn.structured:
            self._queue(self.conn.done_chunk(r.cookie))
        else:
            self._queue(self.conn.simple_reply(r.cookie))

    async def _block_status(self, r: p.Request) -> None:
        e = self.export
        length = r.length  # 1 .. 2**32-1 (checked): every extent's length fits its 32-bit field
        chunks = []
        for cid, name in sorted(self.contexts.items()):
            if name == "base:allocation":
                ext = await e.allocation(r.offset, length)
                flags = extents.bound(ext, length, self.server.limits.block_status_max_extents,
                                      bool(r.flags & p.CMD_FLAG_REQ_ONE))
            else:
                st = e.alua(self.identity)
                flags = [(length, p.alua_word(st.state, st.epoch))]  # one extent
            chunks.append((cid, flags))
        for i, (cid, flags) in enumerate(chunks):
            self._queue(self.conn.block_status_chunk(r.cookie, cid, flags, done=i == len(chunks) - 1))


def _request_cost(r: p.Request) -> int:
    """What a request makes the server hold while it runs: its data (a write's payload, the
    buffer a read fills) and the overhead of a request. A read longer than the maximum is
    refused before it allocates anything: it costs only the overhead."""
    t = r.type
    if t == p.CMD_WRITE or t == p.CMD_READ and r.length <= p.MAX_BLOCK:
        return _REQ_OVERHEAD + r.length
    return _REQ_OVERHEAD


class NBDServer:
    def __init__(self, catalog: ExportCatalog, tls_context: ssl.SSLContext | None = None, tls_required: bool = False,
                 max_inflight: int | None = None, max_inflight_per_connection: int | None = None,
                 limits: NbdLimits | None = None):
        self.catalog = catalog
        self.tls_context = tls_context
        self.payloads = PayloadBuffers()  # large write payloads, reused
        self._trimming = False
        self.tls_required = tls_required and tls_context is not None
        limits = limits or NbdLimits()
        if max_inflight is not None or max_inflight_per_connection is not None:
            limits = dataclasses.replace(limits, max_inflight=max_inflight or limits.max_inflight,
                                         max_inflight_per_connection=max_inflight_per_connection
                                         or limits.max_inflight_per_connection)
        self.limits = limits
        self.max_inflight = limits.max_inflight
        self.max_inflight_per_connection = limits.max_inflight_per_connection
        self.held = 0  # bytes all connections hold (the sum of their ``held``)
        self.room = _Room()  # readers waiting for held to drop
        self.overshoot: NBDConnection | None = None  # may receive its write's payload beyond max_inflight
        self.receiving = 0  # of ``held``: payloads still arriving (with their requests' overhead)
        self.connections = 0
        self.per_address: collections.Counter[str] = collections.Counter()
        self.refused = 0  # connections closed at once: over a limit, or no file descriptor left
        self._refusing = ""  # why the last connection was refused (logged once per episode)
        self.live: set[NBDConnection] = set()
        self.draining = False  # shutting down: new requests are refused ESHUTDOWN, running ones finish
        self.quiet = trio.lowlevel.ParkingLot()  # drain(): a connection has nothing in flight any more
        self.gone = trio.lowlevel.ParkingLot()  # a connection ended (its descriptor is free again)
        self._spare_fd = -1  # one descriptor kept to accept-and-close when there is none left

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

    async def serve_listener(self, lsock: socket.socket) -> None:
        """Serve a listening socket made by the caller (e.g. a unix socket with its permissions)."""
        await self._serve(lsock)

    async def _serve(self, lsock: socket.socket) -> None:
        self._keep_spare_fd()
        try:
            async with trio.open_nursery() as n:
                if not self._trimming:  # one trimmer, whatever the number of listeners
                    self._trimming = True
                    n.start_soon(self._trim_payloads)
                while True:
                    accepted = await self._accept(lsock)
                    if accepted is None:
                        continue
                    sock, addr = accepted
                    ident = ClientIdentity(addr[0], addr[1]) if isinstance(addr, tuple) else ClientIdentity("")
                    why = self._over_limit(ident.address)
                    if why:
                        self._refuse(sock, ident.address, why)
                        continue
                    self._refusing = ""
                    self.connections += 1
                    self.per_address[ident.address] += 1
                    n.start_soon(self._handle_sock, sock, ident, True)
        finally:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
                self._spare_fd = -1

    async def _trim_payloads(self) -> None:
        """Give back, every few seconds, the payload buffers a burst of large writes left."""
        try:
            while True:
                await trio.sleep(buffers.TRIM_EVERY)
                self.payloads.trim()
        finally:
            self._trimming = False

    def _over_limit(self, address: str) -> str:
        lim = self.limits
        if self.connections >= lim.max_connections:
            return f"the server has its maximum of {lim.max_connections} connections (max_connections)"
        if self.per_address[address] >= lim.max_connections_per_address:
            return (f"{address or 'the unix socket'} has its maximum of {lim.max_connections_per_address} "
                    "connections (max_connections_per_address)")
        return ""

    def _refuse(self, sock: socket.socket, address: str, why: str) -> None:
        self.refused += 1
        if why != self._refusing:
            self._refusing = why
            log.warning("refusing NBD connections from %s: %s", address or "the unix socket", why)
        netio.set_abortive_close(sock)
        sock.close()

    def _keep_spare_fd(self) -> None:
        if self._spare_fd < 0:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # none free now: tried again after the next connection ends

    async def _accept(self, lsock: socket.socket) -> tuple[socket.socket, object] | None:
        """The next connection, or None when one was refused (no file descriptor for it).

        Out of descriptors, the connection waiting longest is accepted with the spare one and
        closed at once (the client sees its connection refused, instead of waiting in the
        backlog), and nothing else is taken for a failure: the node goes on serving the
        connections it has. Without the spare, accepting waits until a connection ends."""
        while True:
            try:
                sock, addr = lsock.accept()
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if e.errno not in _EXHAUSTED:
                    raise
                why = f"no file descriptor left for a connection ({os.strerror(e.errno)})"
                if self._spare_fd >= 0:
                    os.close(self._spare_fd)
                    self._spare_fd = -1
                    try:
                        sock, addr = lsock.accept()
                    except BlockingIOError:
                        # Linux takes the descriptor before it looks at the queue: EMFILE says
                        # nothing about a connection waiting. None is: wait for one.
                        self._keep_spare_fd()
                        await trio.lowlevel.wait_readable(lsock)
                        continue
                    except OSError:
                        pass
                    else:
                        self._refuse(sock, addr[0] if isinstance(addr, tuple) else "", why)
                    self._keep_spare_fd()
                    await trio.lowlevel.checkpoint()  # a flood of refusals must not starve the node
                    return None
                if why != self._refusing:
                    self._refusing = why
                    log.warning("not accepting NBD connections: %s", why)
                # A descriptor comes free when a connection ends (or, in a second, elsewhere).
                with trio.move_on_after(1.0):
                    await self.gone.park()
                self._keep_spare_fd()
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    async def _handle_sock(self, sock: socket.socket, ident: ClientIdentity, counted: bool = False) -> None:
        try:
            await self.handle(sock, ident)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            if counted:  # counted by the accept loop, against the connection limits
                self.connections -= 1
                self.per_address[ident.address] -= 1
                if not self.per_address[ident.address]:
                    del self.per_address[ident.address]
            self.gone.unpark_all()

    async def handle(self, sock, ident: ClientIdentity) -> None:
        c = NBDConnection(self, sock, ident)
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
            self.live.discard(c)
            if self.draining:  # what it had in flight no longer holds up drain()
                self.quiet.unpark_all()
            # Replies never sent, and requests the link may still complete, are not the
            # server's to hold any more.
            c.closed = True
            self.held -= c.held
            c.held = 0
            if self.room.waiting and self.held < self.max_inflight:
                self.room.unpark_all()

    async def _session(self, c: NBDConnection) -> None:
        with trio.move_on_after(self.limits.handshake_timeout) as hs:
            ok = await c.handshake()
        if hs.cancelled_caught:
            log.info("client %s: no export chosen within %gs (handshake_timeout); disconnecting it",
                     c.identity.address, self.limits.handshake_timeout)
            return
        if not ok:
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
