"""The replication link: one or more TCP paths to the peer node, used as one.

A request goes out on the least-loaded live path and is re-sent on another path if its path
dies; the receiver deduplicates by request id within a link session, so a re-sent request is
applied at most once. The link is up while at least one path is up.

Flow control (``flow.py``): control frames go before bulk data on every path, and the bytes of
data requests in flight are bounded by ``link.max_inflight``; a request beyond it waits (no task,
no deadline running) until replies make room, and fails with the link if the link goes down.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from .. import buffers, netio, secure
from ..buffers import PayloadBuffers
from ..config import LinkConfig
from . import proto
from .flow import (
    BULK_BATCH,
    BULK_PAYLOAD,
    DATA_TYPES,
    Credit,
    SendQueue,
    is_bulk,
    request_cost,
)
from .proto import Frame, FrameDecoder, MsgType, ProtocolError

log = logging.getLogger("syncd.link")

_NS = 1_000_000_000
_DEDUPE_WINDOW = 1 << 16
# Unsent bytes the kernel may hold per path socket: a control frame handed to the kernel waits
# behind at most this much (plus what is in flight on the wire), not behind megabytes.
_NOTSENT_LOWAT = 256 << 10
_RECV_BUF = 256 << 10  # one recv
_READ_AHEAD = 4 << 20  # read at most this much before applying some of the data ops read
# Data ops read ahead and not yet applied, at most (the peer's own credit normally keeps it far
# lower); beyond, reading waits and TCP holds the peer back.
_RX_QUEUE_MAX = 32 << 20
# Requests holding at most this much credit (a 16 KiB write, a read of as much) go on one
# preferred path while fewer than PREFER_INFLIGHT requests are in flight on it (Link._pick).
PREFER_MAX_COST = proto.HEADER_SIZE + (16 << 10)
PREFER_INFLIGHT = 32
RTT_SETTLE = 8  # keepalive round trips measured on a new path before its round trip is judged
RTT_CLEAR = 0.8  # a high round trip warning ends when the smoothed RTT is below this share of the limit


class LinkDown(Exception):
    """No path to the peer is up (or the request's path died and no other path was up)."""


class LinkTimeout(Exception):
    """The peer did not answer a request within io_timeout."""


class _Pending:
    """A request awaiting its reply: either a task waits on ``event``, or ``cb(pending)`` is
    called from the receiver when it completes (no task per request on the hot path). Its
    deadline runs from when it is first handed to a path (not while it waits for credit);
    ``cost`` is the credit it holds until it completes."""

    __slots__ = ("frame", "bufs", "event", "reply", "error", "path", "deadline", "timeout", "cb",
                 "cost", "bulk", "since")

    def __init__(self, frame: Frame, bufs: list, timeout: float, cb=None) -> None:
        self.deadline = 0.0  # set when handed to a path
        self.timeout = timeout
        self.frame = frame
        self.bufs = bufs
        self.cb = cb
        self.event = None if cb is not None else trio.Event()
        self.reply: Frame | None = None
        self.error: Exception | None = None
        self.path: Path | None = None
        self.cost = 0
        self.bulk = False
        self.since = 0.0  # when it began waiting for credit

    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def finish(self) -> None:
        if self.cb is not None:
            cb, self.cb = self.cb, None
            cb(self)
        else:
            self.event.set()


class _Room:
    """Credit reserved ahead of a data request (``Link.reserve``)."""

    __slots__ = ("cost", "granted", "event", "since")

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self.granted = False
        self.event: trio.Event | None = None
        self.since = 0.0


@dataclass
class Path:
    index: int
    local: tuple[str, int]
    peer: tuple[str, int]
    state: str = "down"  # down | connecting | up
    sock: socket.socket | None = None
    chan: secure.Channel = field(default_factory=secure.PlainChannel)  # wraps what goes on sock
    session: int = 0
    rtt_ms: float | None = None
    last_rx: float = 0.0
    since: float = field(default_factory=time.time)
    sendq: SendQueue = field(default_factory=SendQueue)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    inflight: dict = field(default_factory=dict)  # req_id -> _Pending sent on this path
    cancel: trio.CancelScope | None = None
    tx_frames: int = 0
    rx_frames: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    last_error: str = ""
    protection: str = ""  # what protects the path's bytes (secure.Channel.protection)
    ctl_since: float = 0.0  # when the oldest control frame now queued was queued
    ctl_wait_max: float = 0.0  # s, the longest a control frame waited to reach the kernel
    rtt_max_ms: float = 0.0  # the slowest keepalive round trip (both sides' queues included)
    resets: int = 0  # times this path went down after being up (a connection lost or reset)
    # The smoothed round trip is above link.max_rtt_ms (set above it, cleared below
    # RTT_CLEAR of it: one warning per episode, not one per keepalive).
    rtt_high: bool = False
    rtt_samples: int = 0  # keepalive round trips measured since the path came up
    # Inline sending at the end of a batch (netio.batch_end): queued for it; wire bytes the
    # kernel did not take (the sender task sends them first); the sender task is mid-send.
    flush_queued: bool = False
    rest: list = field(default_factory=list)
    sending: bool = False

    def flush_inline(self) -> None:
        """Send what is queued now, without blocking (the end of a batch, ``netio``); what the
        kernel does not take, or anything while the sender task is mid-send, is left to it."""
        sock = self.sock
        q = self.sendq
        if self.sending or self.rest or sock is None:
            self.lot.unpark()
            return
        while q.ctl or q.bulk:
            since = self.ctl_since if q.ctl else 0.0
            try:
                wire = self.chan.wrap(q.next_batch())
            except OSError as e:
                # A TLS channel that failed (its receiver met a bad record in this round): the
                # path is done for. Not raised into the loop whose batch this is (a host's
                # connection, another path's receiver); the path goes down, and the requests
                # it carried are re-sent or failed as for any lost path.
                self.last_error = str(e) or type(e).__name__
                if self.cancel is not None:
                    self.cancel.cancel()  # as its sender task does on a send error
                return
            n, left = netio.send_available(sock, wire)
            self.tx_bytes += n
            if since:
                waited = time.monotonic() - since
                if waited > self.ctl_wait_max:
                    self.ctl_wait_max = waited
            if left:
                self.rest = left
                self.lot.unpark()
                return

    def info(self) -> dict:
        return {
            "index": self.index,
            "local": "%s:%d" % self.local,
            "peer": "%s:%d" % self.peer,
            "state": self.state,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "since": self.since,
            "tx_frames": self.tx_frames,
            "rx_frames": self.rx_frames,
            "tx_bytes": self.tx_bytes,
            "rx_bytes": self.rx_bytes,
            "last_error": self.last_error,
            "protection": self.protection,
            "queued_frames": len(self.sendq),
            "ctl_wait_max_ms": round(self.ctl_wait_max * 1000, 3),
            "rtt_max_ms": round(self.rtt_max_ms, 3),
            "rtt_warning": self.rtt_high,
        }


class Link:
    """Owns the paths to the peer. ``on_request(link, path, frame)`` handles inbound requests;
    ``on_up()`` / ``on_down()`` are called when the link (any path) comes up or goes down."""

    def __init__(
        self,
        cfg: LinkConfig,
        node_name: str,
        node_uuid: bytes,
        on_request: Callable[["Link", Path, Frame], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        on_path: Callable[[Path], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_name = node_name
        self.node_uuid = node_uuid
        self.dialer = node_name < cfg.peer
        self.paths = [Path(i, p.local, p.peer) for i, p in enumerate(cfg.paths)]
        self.on_request = on_request
        self.on_up = on_up
        self.on_down = on_down
        self.on_path = on_path  # a path went up or down, or its round trip crossed the limit
        self.session = 0
        # The session the dialer offers while the link is down: shared by all paths dialling
        # at once, renewed each time the whole link goes down.
        self.dial_session = secrets.randbits(63) | 1
        self.peer_uuid: bytes | None = None
        self.features = 0  # features in use with the peer (both ends' HELLO), while up
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}  # handed to a path, awaiting the reply
        self._soon: list[list] = []  # frames put off by send_soon, encoded
        self.payloads = PayloadBuffers()  # the large payloads the peer sends, reused
        self.credit = Credit(cfg.max_inflight)
        self.credit_wait_max = 0.0  # s, the longest a request waited for credit
        self._seen: collections.OrderedDict[int, list | None] = collections.OrderedDict()
        self._rr = 0
        self._nursery: trio.Nursery | None = None
        self.up_since: float | None = None
        self.security = cfg.security
        self.refusals = RefusalLog(log)
        self._handshaking: collections.Counter[str] = collections.Counter()  # per source address
        self._path_down = trio.lowlevel.ParkingLot()  # tasks waiting for a path (or all) to go down

    # -- state ---------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        for p in self.paths:  # a loop, not any(): asked several times per host write
            if p.state == "up":
                return True
        return False

    def live_paths(self) -> list[Path]:
        return [p for p in self.paths if p.state == "up"]

    def rtt_ms(self) -> float | None:
        rtts = [p.rtt_ms for p in self.live_paths() if p.rtt_ms is not None]
        return min(rtts) if rtts else None

    def info(self) -> dict:
        rtt = self.rtt_ms()
        return {
            "peer": self.cfg.peer,
            "state": "up" if self.up else "down",
            "security": self.security.mode,
            "paths": [p.info() for p in self.paths],
            "paths_up": len(self.live_paths()),
            "rtt_ms": None if rtt is None else round(rtt, 3),
            "max_rtt_ms": self.cfg.max_rtt_ms,
            "rtt_warning": rtt is not None and rtt > self.cfg.max_rtt_ms,
            "session": self.session,
            "max_inflight": self.credit.limit,
            "inflight_bytes": self.credit.used,
            "waiting_for_credit": len(self.credit.waiting),
            "credit_waits": self.credit.waits,
            "credit_wait_max_ms": round(self.credit_wait_max * 1000, 3),
        }

    # -- running -------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sweeper)
            for p in self.paths:
                if self.dialer:
                    nursery.start_soon(self._dial_loop, p)
                else:
                    await nursery.start(self._listen, p)
            task_status.started()

    async def _dial_loop(self, p: Path) -> None:
        backoff = 0.1
        while True:
            p.state = "connecting"
            sock = None
            try:
                with trio.fail_after(max(self.cfg.path_timeout, 1.0)):
                    sock = await netio.connect(p.peer)
                hs = secure.Handshake(self.security, secure.Role.DIALER, self.node_name, self.cfg.peer)
                chan, first = await netio.establish(sock, hs, max(self.cfg.path_timeout, 1.0))
                p.protection = chan.protection
                with trio.fail_after(max(self.cfg.path_timeout, 1.0)):
                    dec = FrameDecoder(self.payloads)
                    if first:
                        dec.receive_data(first)
                    session = self.session if self.up else self.dial_session
                    hello = proto.Frame.hello(
                        node_uuid=self.node_uuid, node_name=self.node_name, path_index=p.index,
                        link_session=session,
                    )
                    await netio.sendmsg_all(sock, chan.wrap(proto.encode(hello)))
                    ack = await _recv_frame(sock, dec, chan)
                    if ack.type == MsgType.GOODBYE:
                        raise ProtocolError(f"peer refused path: {ack.goodbye_reason()}")
                    if ack.type != MsgType.HELLO_ACK:
                        raise ProtocolError(f"expected HELLO_ACK, got {ack.type!r}")
                    h = ack.hello_fields()
                    if h.node_name != self.cfg.peer:
                        raise ProtocolError(
                            f"path {p.index}: peer says it is {h.node_name!r}, expected {self.cfg.peer!r}"
                        )
                backoff = 0.1
                await self._run_path(p, sock, dec, chan, session, h.node_uuid, h.features)
                sock = None
            except secure.AuthError as e:
                p.last_error = f"authentication: {e}"
                self.refusals.note(p.peer[0], f"path {p.index}: dialled {p.peer[0]}:{p.peer[1]}: {e}")
            except (OSError, trio.TooSlowError, ProtocolError) as e:
                p.last_error = str(e) or type(e).__name__
                log.debug("path %d dial: %s", p.index, p.last_error)
            except trio.BrokenResourceError as e:
                p.last_error = str(e) or "connection broken"
            finally:
                if sock is not None and sock.fileno() >= 0:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
            p.state = "down"
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _listen(self, p: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        lsock = netio.listen_tcp(p.local, 8)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    sock, addr = await netio.accept(lsock)
                    source = addr[0] if isinstance(addr, tuple) else str(addr)
                    busy = self._handshaking
                    # The configured peer's own address is bounded per source only: connections
                    # from many other addresses cannot keep the real peer from reconnecting (its
                    # address cannot be borrowed without being on its path).
                    crowd = sum(n for src, n in busy.items() if src != p.peer[0])
                    if (source != p.peer[0] and crowd >= self.cfg.max_handshakes) or \
                            busy[source] >= self.cfg.max_handshakes_per_source:
                        # Only the peer has business here, one connection per path at a time:
                        # a crowd of half-open connections is refused at once, not queued.
                        self.refusals.note(source, f"path {p.index}: too many connections in handshake")
                        netio.abort(sock)
                        continue
                    busy[source] += 1
                    nursery.start_soon(self._accept_one, p, sock, source)
        finally:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()

    async def _accept_one(self, p: Path, sock, source: str) -> None:
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._handshaking[source] -= 1
                if self._handshaking[source] <= 0:
                    del self._handshaking[source]

        try:
            await self._accept_path(p, sock, source, release)
        finally:
            release()

    async def _accept_path(self, p: Path, sock, source: str, release: Callable[[], None]) -> None:
        """Handshake, HELLO, then the path runs; ``release`` gives back the connection's
        handshake slot (once the peer has proved who it is, it no longer counts as half-open)."""
        dec = FrameDecoder(self.payloads)
        try:
            hs = secure.Handshake(self.security, secure.Role.LISTENER, self.node_name, self.cfg.peer)
            chan, first = await netio.establish(sock, hs, max(self.cfg.path_timeout, 1.0))
            p.protection = chan.protection
            with trio.fail_after(max(self.cfg.path_timeout, 1.0)):
                if first:
                    dec.receive_data(first)
                hello = await _recv_frame(sock, dec, chan)
                if hello.type != MsgType.HELLO:
                    raise ProtocolError(f"expected HELLO, got {hello.type!r}")
                h = hello.hello_fields()
                problem = None
                if h.node_name != self.cfg.peer:
                    problem = f"this node's peer is {self.cfg.peer!r}, not {h.node_name!r}"
                elif h.path_index != p.index:
                    problem = f"path index {h.path_index} arrived on path {p.index}"
                else:
                    problem = proto.version_problem(h)
                if problem:
                    await netio.sendmsg_all(sock, chan.wrap(proto.encode(Frame.goodbye(problem))))
                    raise ProtocolError(problem)
                ack = Frame.hello_ack(
                    node_uuid=self.node_uuid, node_name=self.node_name, path_index=p.index,
                    link_session=h.link_session,
                )
                await netio.sendmsg_all(sock, chan.wrap(proto.encode(ack)))
            release()
        except secure.AuthError as e:
            # Whoever it is did not prove to be the peer: it got secure.REFUSAL (delivered before
            # the close by netio.establish) and nothing else.
            p.last_error = f"refused a connection from {source}: {e}"
            self.refusals.note(source, f"path {p.index}: {e}")
            trio.lowlevel.notify_closing(sock)
            netio.abort(sock)
            return
        except (OSError, trio.TooSlowError, ProtocolError, trio.BrokenResourceError) as e:
            p.last_error = str(e) or type(e).__name__
            log.info("path %d: refused a connection: %s", p.index, p.last_error)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            return
        if p.cancel is not None:  # a newer connection replaces the old one on this path
            p.cancel.cancel()
            while p.state == "up":
                await self._path_down.park()
        try:
            await self._run_path(p, sock, dec, chan, h.link_session, h.node_uuid, h.features)
        except (OSError, ProtocolError, trio.BrokenResourceError, secure.AuthError) as e:
            p.last_error = str(e) or type(e).__name__
        p.state = "down"

    async def _run_path(self, p: Path, sock, dec: FrameDecoder, chan: secure.Channel, session: int,
                        peer_uuid, peer_features: int = 0) -> None:
        if session != self.session:
            if self.up:
                # The peer started a new link session: everything of the old one is gone.
                for other in self.live_paths():
                    if other.cancel is not None:
                        other.cancel.cancel()
                while self.up:
                    await self._path_down.park()
            self.session = session
            self._seen.clear()
        was_up = self.up
        netio.set_notsent_lowat(sock, _NOTSENT_LOWAT)
        if isinstance(chan, secure.GcmChannel | secure.MacChannel):
            chan.buffers = self.payloads  # records completed without page faults
        p.sock, p.chan, p.session, p.state = sock, chan, session, "up"
        p.last_rx = time.monotonic()
        p.since = time.time()
        p.rtt_ms = None
        p.rtt_max_ms = p.ctl_wait_max = 0.0
        p.rtt_high = False
        p.rtt_samples = 0
        p.last_error = ""
        self.peer_uuid = peer_uuid
        # What both ends speak (proto/replication.md 4.1): the peer's HELLO of the latest path.
        self.features = proto.FEATURES & peer_features
        log.info("path %d up (%s -> %s)", p.index, p.local, p.peer)
        self._path_changed(p)
        if not was_up:
            self.up_since = time.time()
            self.on_up()
        try:
            with trio.CancelScope() as cs:
                p.cancel = cs
                async with trio.open_nursery() as n:
                    n.start_soon(self._sender, p, cs)
                    n.start_soon(self._pinger, p, cs)
                    try:
                        await self._receiver(p, dec)
                    except (OSError, ProtocolError, trio.BrokenResourceError, secure.AuthError) as e:
                        p.last_error = str(e) or type(e).__name__
                    cs.cancel()
        finally:
            p.cancel = None
            p.state = "down"
            p.resets += 1
            self._path_down.unpark_all()
            p.sock = None
            p.since = time.time()
            trio.lowlevel.notify_closing(sock)
            netio.abort(sock)
            p.sendq.clear()
            # What an inline send left unsent was this connection's (wrapped with its keys):
            # the next connection must not send it after the reset.
            p.rest = []
            p.sending = False
            log.info("path %d down: %s", p.index, p.last_error or "closed")
            p.rtt_high = False
            self._path_changed(p)
            self._path_lost(p)

    def _path_changed(self, p: Path) -> None:
        if self.on_path is not None:
            self.on_path(p)

    def _path_lost(self, p: Path) -> None:
        orphans = list(p.inflight.values())
        p.inflight.clear()
        if not self.up:
            self.up_since = None
            self.dial_session = secrets.randbits(63) | 1
            self._soon.clear()  # the session's: never sent on the next one (as queued frames)
            # The owner hears of it first: requests failing now see the link down already.
            self.on_down()
            sent = list(self._pending.values())
            self._pending.clear()
            waiting = []
            for item in self.credit.drop():
                if isinstance(item, _Room):
                    item.event.set()  # not granted: reserve() returns None
                else:
                    item.cost = 0  # never taken
                    waiting.append(item)
            for pend in sent + waiting:
                pend.error = LinkDown("replication link down")
                self._settle(pend)
            return
        for pend in orphans:  # re-send on another path; the receiver drops duplicates
            if not pend.done():
                self._transmit(pend.bufs, pend)

    async def _sender(self, p: Path, cs: trio.CancelScope) -> None:
        pacer = netio.Pacer()
        q = p.sendq
        try:
            while True:
                if p.rest:  # what an inline send (end of a batch) left
                    rest, p.rest = p.rest, []
                    p.sending = True
                    p.tx_bytes += await netio.sendmsg_all(p.sock, rest, pacer)
                    p.sending = False
                    continue
                if not q.ctl and not q.bulk:
                    await p.lot.park()
                    continue
                since = p.ctl_since if q.ctl else 0.0
                p.sending = True
                p.tx_bytes += await netio.sendmsg_all(p.sock, p.chan.wrap(q.next_batch()), pacer)
                p.sending = False
                if since:
                    waited = time.monotonic() - since
                    if waited > p.ctl_wait_max:
                        p.ctl_wait_max = waited
        except (OSError, trio.BrokenResourceError) as e:
            p.last_error = str(e) or type(e).__name__
            cs.cancel()

    async def _pinger(self, p: Path, cs: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.cfg.ping_interval)
            if time.monotonic() - p.last_rx > self.cfg.path_timeout:
                p.last_error = f"no frame for {self.cfg.path_timeout}s (path timeout)"
                cs.cancel()
                return
            self._enqueue(p, proto.encode(Frame.ping(time.monotonic_ns())), False)

    async def _receiver(self, p: Path, dec: FrameDecoder) -> None:
        """Read what has arrived (up to ``_READ_AHEAD`` at a time), handle every frame but data
        ops at once, and apply data ops about ``BULK_BATCH`` bytes per round: so a reply, a
        lease or a keepalive that arrives behind megabytes of the peer's data does not wait for
        that data to be written here. (Nothing in the protocol orders frames of different
        requests: any two may travel on different paths.)"""
        sock = p.sock
        chan = p.chan
        buf = bytearray(_RECV_BUF)
        view = memoryview(buf)
        data_ops: collections.deque[Frame] = collections.deque()
        queued = 0  # payload bytes in data_ops
        pacer = netio.Pacer()
        probe = netio.Probe(sock)
        while True:
            got = 0
            budget = BULK_BATCH
            # What this round's frames make this node send (replies, mirrored writes, host
            # replies) goes out when the round ends, one sendmsg per socket (netio's batches).
            was = netio.batch_begin()
            try:
                while got < _READ_AHEAD and queued < _RX_QUEUE_MAX:
                    # The rest of a large record goes straight into its own buffer (one copy).
                    into = chan.recv_space()
                    target = view if into is None else into
                    n = None if probe.empty() else netio.recv_into_nowait(sock, target)
                    if n is None:  # nothing more has arrived
                        if got or data_ops:
                            break
                        netio.batch_end(was)
                        try:
                            await trio.lowlevel.wait_readable(sock)
                        finally:
                            was = netio.batch_begin()
                        probe.drained = False  # something came: receive without asking
                        pacer.reset()
                        continue
                    if not n:
                        p.last_error = "peer closed the connection"
                        return
                    got += n
                    plain = chan.unwrap(view[:n]) if into is None else chan.received(n)
                    dec.receive_data(plain, chan.owned)
                    while (f := dec.next_frame()) is not None:
                        p.rx_frames += 1
                        if f.type in DATA_TYPES:
                            data_ops.append(f)
                            queued += len(f.payload)
                        else:
                            self._dispatch(p, f)
                    probe.drained = n < len(target)
                    if probe.drained:  # very likely: spare a recv (the next round asks first)
                        break
                if got:
                    p.rx_bytes += got
                    p.last_rx = time.monotonic()
                while data_ops and budget > 0:
                    f = data_ops.popleft()
                    n = len(f.payload)
                    queued -= n
                    budget -= n + proto.HEADER_SIZE
                    self._dispatch(p, f)
            finally:
                netio.batch_end(was)
            if budget <= 0:
                await trio.lowlevel.checkpoint()  # a batch of writes was applied: others' turn
                pacer.reset()
            elif pacer.due(False):
                await trio.lowlevel.checkpoint()

    def _dispatch(self, p: Path, f: Frame) -> None:
        t = f.type
        if t == MsgType.REPLY:
            pend = self._pending.pop(f.req_id, None)
            if pend is not None:
                if pend.path is not None:
                    pend.path.inflight.pop(f.req_id, None)
                pend.reply = f
                if pend.cost:
                    self._give(pend.cost)
                    pend.cost = 0
                pend.finish()
            return
        if t == MsgType.PING:
            self._enqueue(p, proto.encode(Frame.pong(f.ping_ns())), False)
            return
        if t == MsgType.PONG:
            rtt = (time.monotonic_ns() - f.ping_ns()) / 1e6
            p.rtt_ms = rtt if p.rtt_ms is None else 0.8 * p.rtt_ms + 0.2 * rtt
            if rtt > p.rtt_max_ms:
                p.rtt_max_ms = rtt
            p.rtt_samples += 1
            limit = self.cfg.max_rtt_ms
            # Judged once the average has settled: the first round trips of a new connection
            # (handshakes, the first resync, slow start) say little about the link.
            if p.rtt_samples >= RTT_SETTLE and p.rtt_high != (p.rtt_ms > (limit * RTT_CLEAR if p.rtt_high else limit)):
                p.rtt_high = not p.rtt_high
                if p.rtt_high:
                    log.warning("path %d: round trip %.2f ms exceeds %s ms, the most synchronous mirroring "
                                "supports", p.index, p.rtt_ms, limit)
                else:
                    log.info("path %d: round trip back to %.2f ms (limit %s ms)", p.index, p.rtt_ms, limit)
                self._path_changed(p)
            return
        if t == MsgType.GOODBYE:
            p.last_error = f"peer said goodbye: {f.goodbye_reason()}"
            raise trio.BrokenResourceError(p.last_error)
        if t == MsgType.RELEASE:
            self.on_request(self, p, f)
            return
        if t == MsgType.READ:
            # Reads change nothing: a re-sent one is simply read again, so its reply (up to
            # 32 MiB of data) is never kept for deduplication.
            self.on_request(self, p, f)
            return
        # A request: drop or answer duplicates of one already seen in this session.
        seen = self._seen
        if f.req_id in seen:
            cached = seen[f.req_id]
            if cached is not None:
                self._enqueue(p, cached, len(cached[-1]) > BULK_PAYLOAD)
            return
        seen[f.req_id] = None
        if len(seen) > _DEDUPE_WINDOW:
            seen.popitem(last=False)
        self.on_request(self, p, f)

    # -- sending -------------------------------------------------------------------------------
    def _pick(self, small: bool = True) -> Path | None:
        if small:
            # Small requests stay on one path while it keeps up (its first live path, not one
            # whose round trip is over the limit): requests that arrive together then leave in
            # one send, arrive in one receive and are answered in one send, and their replies
            # reach the hosts together. Spread over the paths in turn, each batch cost a send,
            # a receive and a wake-up per path at both arrays, and the host's replies one send
            # per path: 4 KiB writes at QD16 ran at 15,000-19,500 IOPS over two paths against
            # 21,000-23,000 over one (bench/README.md). Past PREFER_INFLIGHT requests in flight
            # there (a slow or lossy path keeps more) they spread as large ones do. One pass,
            # no lists: this runs for every write.
            first = None
            for p in self.paths:
                if p.state == "up":
                    if not p.rtt_high:
                        first = p
                        break
                    if first is None:
                        first = p  # every live path over the limit: the first of them
            if first is None:
                return None
            if len(first.inflight) < PREFER_INFLIGHT:
                return first
        live = [p for p in self.paths if p.state == "up"]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        # The path with the fewest requests in flight; ties taken in turn (large requests:
        # bandwidth from every path).
        self._rr += 1
        rr, n = self._rr, len(live)
        best = live[0]
        best_key = (len(best.inflight), (best.index - rr) % n)
        for q in live[1:]:
            key = (len(q.inflight), (q.index - rr) % n)
            if key < best_key:
                best, best_key = q, key
        return best

    def _enqueue(self, p: Path, bufs: list, bulk: bool) -> None:
        q = p.sendq
        if self._soon:  # frames put off (send_soon) go first, with this one
            self._move_soon(p)
        if bulk:
            q.bulk.append(bufs)
        else:
            if not q.ctl:
                p.ctl_since = time.monotonic()
            q.ctl.append(bufs)
        p.tx_frames += 1
        if not netio.defer(p):
            p.lot.unpark()

    def _transmit(self, bufs: list, pend: _Pending | None) -> None:
        p = self._pick(pend is None or pend.cost <= PREFER_MAX_COST)
        if p is None:
            if pend is not None:
                self._pending.pop(pend.frame.req_id, None)
                pend.error = LinkDown("replication link down")
                self._settle(pend)
            return
        if pend is None:
            self._enqueue(p, bufs, False)
            return
        pend.path = p
        p.inflight[pend.frame.req_id] = pend
        if not pend.deadline:  # io_timeout runs from the first hand-off (not again on a re-send)
            pend.deadline = trio.current_time() + pend.timeout
        self._enqueue(p, bufs, pend.bulk)

    def _settle(self, pend: _Pending) -> None:
        """``pend`` is complete (reply, error or timeout): give back its credit, let waiting
        requests through (ahead of whatever the completion starts), then tell its owner."""
        if pend.cost:
            self._give(pend.cost)
            pend.cost = 0
        pend.finish()

    def _give(self, cost: int) -> None:
        self.credit.give(cost)
        if self.credit.waiting and self.up:
            self._admit()

    def _admit(self) -> None:
        now = trio.current_time()
        for item in self.credit.admit():
            waited = now - item.since
            if waited > self.credit_wait_max:
                self.credit_wait_max = waited
            if isinstance(item, _Room):
                item.granted = True
                item.event.set()
                continue
            self._pending[item.frame.req_id] = item
            self._transmit(item.bufs, item)

    def reset(self, reason: str) -> None:
        """Drop every path (a new link session follows): nothing sent before can arrive after."""
        for p in self.live_paths():
            p.last_error = f"reset: {reason}"
            if p.cancel is not None:
                p.cancel.cancel()

    def next_id(self) -> int:
        return next(self._ids)

    def start(self, frame: Frame, timeout: float | None = None, cb=None,
              reserved: _Room | None = None) -> _Pending:
        """Send a request; await ``wait(pending)`` for its reply, or pass ``cb`` to be called
        with the pending request when it completes (possibly before this returns). A data
        request that does not fit in the link's credit waits for room first (no task: it is
        sent from the completion of an earlier request), unless room was ``reserved`` for it;
        ``timeout`` runs from when it is sent."""
        bufs = proto.encode(frame)
        pend = _Pending(frame, bufs, timeout or self.cfg.io_timeout, cb)
        if not self.up:
            self.unreserve(reserved)
            pend.error = LinkDown("replication link down")
            pend.finish()
            return pend
        t = frame.type
        if t in DATA_TYPES:  # request_cost() and is_bulk(), inline: this is the hot path
            pend.bulk = True
            cost = proto.HEADER_SIZE + len(frame.payload)
        else:
            pend.bulk = is_bulk(frame)
            cost = request_cost(frame)
        if reserved is not None and reserved.granted:
            reserved.granted = False
            pend.cost = cost
            if cost > reserved.cost:
                self.credit.used += cost - reserved.cost
            elif cost < reserved.cost:  # normally equal: the room was made for this request
                self._give(reserved.cost - cost)
        elif cost:
            pend.cost = cost
            if frame.flags & proto.FLAG_RESYNC:
                # A resync copy is sent under its region's range lock: it must not wait for
                # credit (writes that reserved credit may be waiting for that lock). Resync
                # keeps only a few regions in flight; they count against the hosts' writes.
                self.credit.used += cost
            elif not self.credit.take(cost):
                pend.since = trio.current_time()
                self.credit.queue(pend)
                return pend
        self._pending[frame.req_id] = pend
        self._transmit(bufs, pend)
        return pend

    async def reserve(self, nbytes: int) -> _Room | None:
        """Wait for credit for a data request carrying ``nbytes`` of payload and take it: for a
        caller that must not hold something (a range lock) while its request waits for the
        link. Pass the result to ``start(reserved=...)``, or give it back with ``unreserve``.
        None when the link is (or goes) down: ``start`` then fails the request as usual."""
        if not self.up:
            return None
        room = _Room(proto.HEADER_SIZE + nbytes)
        if self.credit.take(room.cost):
            room.granted = True
            return room
        room.since = trio.current_time()
        room.event = trio.Event()
        self.credit.queue(room)
        try:
            await room.event.wait()
        except BaseException:
            if room.granted:
                self.unreserve(room)
            else:
                self.credit.cancel(room)
            raise
        return room if room.granted else None

    def unreserve(self, room: _Room | None) -> None:
        """Give back credit reserved and not used (None and used rooms are ignored)."""
        if room is not None and room.granted:
            room.granted = False
            self._give(room.cost)

    def has_credit(self, nbytes: int) -> bool:
        """Whether a data request of ``nbytes`` would be sent at once (no wait for credit)."""
        c = self.credit
        return not c.waiting and (not c.used or c.used + proto.HEADER_SIZE + nbytes <= c.limit)

    async def wait(self, pend: _Pending) -> Frame:
        """The reply; LinkDown when the link went down, LinkTimeout past the deadline (the
        sweeper task fails overdue requests, so no cancel scope is needed per request)."""
        if not pend.done():
            await pend.event.wait()
        if pend.reply is not None:
            return pend.reply
        raise pend.error

    # ``timeout`` is the request's deadline on the link, as in start(): the sweeper fails it with
    # LinkTimeout and gives its credit back. A cancel scope in the caller would do neither.
    async def request(self, frame: Frame, timeout: float | None = None) -> Frame:  # noqa: ASYNC109
        return await self.wait(self.start(frame, timeout))

    async def _sweeper(self) -> None:
        step = max(0.02, min(self.cfg.io_timeout, self.cfg.ping_interval) / 4)
        trimmed = trio.current_time()
        while True:
            await trio.sleep(step)
            if self._soon:  # (netio.later sends them much sooner: a bound whatever happens)
                self._flush_soon()
            now = trio.current_time()
            if now - trimmed >= buffers.TRIM_EVERY:  # what a burst of large frames left
                self.payloads.trim()
                trimmed = now
            for req_id, pend in list(self._pending.items()):
                if pend.deadline <= now:
                    del self._pending[req_id]
                    if pend.path is not None:
                        pend.path.inflight.pop(req_id, None)
                    pend.error = LinkTimeout(
                        f"peer did not answer {MsgType(pend.frame.type).name} within {pend.timeout}s"
                    )
                    self._settle(pend)

    def send(self, frame: Frame) -> None:
        """Send a frame that expects no reply (RELEASE) on any live path, as a control frame."""
        if self.up:
            self._transmit(proto.encode(frame), None)

    def send_soon(self, frame: Frame) -> None:
        """``send``, put off until the next frame goes to the peer or the loop runs out of work
        (``netio.later``), whichever comes first: for a frame nobody waits for at once (a
        RELEASE of OK, which only lets the primary free a range). Sent now when the loop does
        not poll or no batch is running. Frames put off keep their order, ahead of what is
        sent after them."""
        if not self.up:
            return
        if not self._soon and not netio.later(self._flush_soon):
            self._transmit(proto.encode(frame), None)
            return
        self._soon.append(proto.encode(frame))

    def _flush_soon(self) -> None:
        """Send the frames put off, if nothing took them along meanwhile (run outside any batch:
        by the idle poller, at a batch's end, or by the sweeper)."""
        if not self._soon:
            return
        p = self._pick() if self.up else None
        if p is None:  # the link is down: lost with it, as frames the kernel held would be
            self._soon.clear()
            return
        self._move_soon(p)
        p.flush_inline()

    def _move_soon(self, p: Path) -> None:
        netio.unlater(self._flush_soon)  # nothing left for it (a wait begins with the next one)
        q = p.sendq
        if not q.ctl:
            p.ctl_since = time.monotonic()
        q.ctl.extend(self._soon)
        p.tx_frames += len(self._soon)
        self._soon.clear()

    def reply(self, path: Path, req_id: int, status: int = 0, payload: bytes = b"") -> None:
        """Answer a request; a reply carrying data (a READ's) is bulk, any other is control."""
        bufs = proto.encode(Frame.reply(req_id, status, payload))
        if req_id in self._seen:
            self._seen[req_id] = bufs
        target = path if path.state == "up" else self._pick()
        if target is not None:
            self._enqueue(target, bufs, len(payload) > BULK_PAYLOAD)


async def _recv_frame(sock, dec: FrameDecoder, chan: secure.Channel) -> Frame:
    while (f := dec.next_frame()) is None:
        data = await netio.recv(sock, 65536)
        if not data:
            raise ProtocolError("connection closed during handshake")
        dec.receive_data(chan.unwrap(data))
    return f


class RefusalLog:
    """Logs refused connections with their source address: the first from a source at WARNING,
    then at most one line per source every ``every`` seconds with the count in between (a
    flood of refused connections must not flood the log)."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.log = logger
        self.every = every
        self.total = 0
        self._last: dict[str, tuple[float, int]] = {}  # source -> (last logged, suppressed since)

    def note(self, source: str, why: str) -> None:
        self.total += 1
        now = time.monotonic()
        last, quiet = self._last.get(source, (-1e18, 0))
        if now - last < self.every:
            self._last[source] = (last, quiet + 1)
            return
        more = f" ({quiet} more refused since the last report)" if quiet else ""
        self.log.warning("refused a connection from %s: %s%s", source, why, more)
        if len(self._last) > 1024:  # bounded: forget the oldest sources
            self._last.pop(next(iter(self._last)))
        self._last[source] = (now, 0)
