"""The replication link: one or more TCP paths to the peer node, used as one.

A request goes out on the least-loaded live path and is re-sent on another path if its path
dies; the receiver deduplicates by request id within a link session, so a re-sent request is
applied at most once. The link is up while at least one path is up.
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

from .. import netio
from ..config import LinkConfig
from . import proto
from .proto import Frame, FrameDecoder, MsgType, ProtocolError

log = logging.getLogger("syncd.link")

_NS = 1_000_000_000
_DEDUPE_WINDOW = 1 << 16
_IOV_MAX = 512


class LinkDown(Exception):
    """No path to the peer is up (or the request's path died and no other path was up)."""


class LinkTimeout(Exception):
    """The peer did not answer a request within io_timeout."""


class _Pending:
    """A request awaiting its reply: either a task waits on ``event``, or ``cb(pending)`` is
    called from the receiver when it completes (no task per request on the hot path)."""

    __slots__ = ("frame", "bufs", "event", "reply", "error", "path", "deadline", "cb")

    def __init__(self, frame: Frame, bufs: list, deadline: float = 0.0, cb=None) -> None:
        self.deadline = deadline
        self.frame = frame
        self.bufs = bufs
        self.cb = cb
        self.event = None if cb is not None else trio.Event()
        self.reply: Frame | None = None
        self.error: Exception | None = None
        self.path: Path | None = None

    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def finish(self) -> None:
        if self.cb is not None:
            cb, self.cb = self.cb, None
            cb(self)
        else:
            self.event.set()


@dataclass
class Path:
    index: int
    local: tuple[str, int]
    peer: tuple[str, int]
    state: str = "down"  # down | connecting | up
    sock: socket.socket | None = None
    session: int = 0
    rtt_ms: float | None = None
    last_rx: float = 0.0
    since: float = field(default_factory=time.time)
    queue: collections.deque = field(default_factory=collections.deque)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    inflight: dict = field(default_factory=dict)  # req_id -> _Pending sent on this path
    cancel: trio.CancelScope | None = None
    tx_frames: int = 0
    rx_frames: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    last_error: str = ""

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
    ) -> None:
        self.cfg = cfg
        self.node_name = node_name
        self.node_uuid = node_uuid
        self.dialer = node_name < cfg.peer
        self.paths = [Path(i, p.local, p.peer) for i, p in enumerate(cfg.paths)]
        self.on_request = on_request
        self.on_up = on_up
        self.on_down = on_down
        self.session = 0
        # The session the dialer offers while the link is down: shared by all paths dialling
        # at once, renewed each time the whole link goes down.
        self.dial_session = secrets.randbits(63) | 1
        self.peer_uuid: bytes | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._seen: collections.OrderedDict[int, list | None] = collections.OrderedDict()
        self._rr = 0
        self._nursery: trio.Nursery | None = None
        self.up_since: float | None = None
        self.key = cfg.key.encode() if cfg.key else None

    # -- state ---------------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return any(p.state == "up" for p in self.paths)

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
            "paths": [p.info() for p in self.paths],
            "paths_up": len(self.live_paths()),
            "rtt_ms": None if rtt is None else round(rtt, 3),
            "max_rtt_ms": self.cfg.max_rtt_ms,
            "rtt_warning": rtt is not None and rtt > self.cfg.max_rtt_ms,
            "session": self.session,
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
                sock = await netio.connect(p.peer, max(self.cfg.path_timeout, 1.0))
                with trio.fail_after(max(self.cfg.path_timeout, 1.0)):
                    session = self.session if self.up else self.dial_session
                    hello = proto.Frame.hello(
                        node_uuid=self.node_uuid, node_name=self.node_name, path_index=p.index,
                        link_session=session, key=self.key,
                    )
                    await netio.sendmsg_all(sock, proto.encode(hello))
                    dec = FrameDecoder()
                    ack = await _recv_frame(sock, dec)
                    if ack.type == MsgType.GOODBYE:
                        raise ProtocolError(f"peer refused path: {ack.goodbye_reason()}")
                    if ack.type != MsgType.HELLO_ACK:
                        raise ProtocolError(f"expected HELLO_ACK, got {ack.type!r}")
                    h = ack.hello_fields()
                    if h.node_name != self.cfg.peer:
                        raise ProtocolError(
                            f"path {p.index}: peer says it is {h.node_name!r}, expected {self.cfg.peer!r}"
                        )
                    if self.key and not proto.verify_auth(self.key, h):
                        raise ProtocolError(f"path {p.index}: peer failed authentication")
                backoff = 0.1
                await self._run_path(p, sock, dec, session, h.node_uuid)
                sock = None
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
                    sock, _addr = await netio.accept(lsock)
                    nursery.start_soon(self._accept_one, p, sock)
        finally:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()

    async def _accept_one(self, p: Path, sock) -> None:
        dec = FrameDecoder()
        try:
            with trio.fail_after(max(self.cfg.path_timeout, 1.0)):
                hello = await _recv_frame(sock, dec)
                if hello.type != MsgType.HELLO:
                    raise ProtocolError(f"expected HELLO, got {hello.type!r}")
                h = hello.hello_fields()
                problem = None
                if h.node_name != self.cfg.peer:
                    problem = f"this node's peer is {self.cfg.peer!r}, not {h.node_name!r}"
                elif h.path_index != p.index:
                    problem = f"path index {h.path_index} arrived on path {p.index}"
                elif self.key and not proto.verify_auth(self.key, h):
                    problem = "authentication failed"
                else:
                    problem = proto.version_problem(h)
                if problem:
                    await netio.sendmsg_all(sock, proto.encode(Frame.goodbye(problem)))
                    raise ProtocolError(problem)
                ack = Frame.hello_ack(
                    node_uuid=self.node_uuid, node_name=self.node_name, path_index=p.index,
                    link_session=h.link_session, key=self.key,
                )
                await netio.sendmsg_all(sock, proto.encode(ack))
        except (OSError, trio.TooSlowError, ProtocolError, trio.BrokenResourceError) as e:
            p.last_error = str(e) or type(e).__name__
            log.info("path %d: refused a connection: %s", p.index, p.last_error)
            trio.lowlevel.notify_closing(sock)
            sock.close()
            return
        if p.cancel is not None:  # a newer connection replaces the old one on this path
            p.cancel.cancel()
            while p.state == "up":
                await trio.sleep(0.01)
        try:
            await self._run_path(p, sock, dec, h.link_session, h.node_uuid)
        except (OSError, ProtocolError, trio.BrokenResourceError) as e:
            p.last_error = str(e) or type(e).__name__
        p.state = "down"

    async def _run_path(self, p: Path, sock, dec: FrameDecoder, session: int, peer_uuid) -> None:
        if session != self.session:
            if self.up:
                # The peer started a new link session: everything of the old one is gone.
                for other in self.live_paths():
                    if other.cancel is not None:
                        other.cancel.cancel()
                while self.up:
                    await trio.sleep(0.01)
            self.session = session
            self._seen.clear()
        was_up = self.up
        p.sock, p.session, p.state = sock, session, "up"
        p.last_rx = time.monotonic()
        p.since = time.time()
        p.rtt_ms = None
        p.last_error = ""
        self.peer_uuid = peer_uuid
        log.info("path %d up (%s -> %s)", p.index, p.local, p.peer)
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
                    except (OSError, ProtocolError, trio.BrokenResourceError) as e:
                        p.last_error = str(e) or type(e).__name__
                    cs.cancel()
        finally:
            p.cancel = None
            p.state = "down"
            p.sock = None
            p.since = time.time()
            trio.lowlevel.notify_closing(sock)
            netio.abort(sock)
            queued = list(p.queue)
            p.queue.clear()
            log.info("path %d down: %s", p.index, p.last_error or "closed")
            self._path_lost(p, queued)

    def _path_lost(self, p: Path, queued: list) -> None:
        orphans = list(p.inflight.values())
        p.inflight.clear()
        if not self.up:
            self.up_since = None
            self.dial_session = secrets.randbits(63) | 1
            # The owner hears of it first: requests failing now see the link down already.
            self.on_down()
            pending = list(self._pending.values())
            self._pending.clear()
            for pend in pending:
                pend.error = LinkDown("replication link down")
                pend.finish()
            return
        for pend in orphans:  # re-send on another path; the receiver drops duplicates
            if not pend.done():
                self._transmit(pend.bufs, pend)

    async def _sender(self, p: Path, cs: trio.CancelScope) -> None:
        pacer = netio.Pacer()
        try:
            while True:
                if not p.queue:
                    await p.lot.park()
                    continue
                bufs = []
                while p.queue and len(bufs) < _IOV_MAX:
                    bufs.extend(p.queue.popleft())
                p.tx_bytes += await netio.sendmsg_all(p.sock, bufs, pacer)
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
            self._enqueue(p, proto.encode(Frame.ping(time.monotonic_ns())))

    async def _receiver(self, p: Path, dec: FrameDecoder) -> None:
        sock = p.sock
        pacer = netio.Pacer()
        while True:
            data = await netio.recv(sock, 1 << 16, pacer)
            if not data:
                p.last_error = "peer closed the connection"
                return
            p.rx_bytes += len(data)
            p.last_rx = time.monotonic()
            dec.receive_data(data)
            while (f := dec.next_frame()) is not None:
                p.rx_frames += 1
                self._dispatch(p, f)

    def _dispatch(self, p: Path, f: Frame) -> None:
        t = f.type
        if t == MsgType.REPLY:
            pend = self._pending.pop(f.req_id, None)
            if pend is not None:
                if pend.path is not None:
                    pend.path.inflight.pop(f.req_id, None)
                pend.reply = f
                pend.finish()
            return
        if t == MsgType.PING:
            self._enqueue(p, proto.encode(Frame.pong(f.ping_ns())))
            return
        if t == MsgType.PONG:
            rtt = (time.monotonic_ns() - f.ping_ns()) / 1e6
            p.rtt_ms = rtt if p.rtt_ms is None else 0.8 * p.rtt_ms + 0.2 * rtt
            return
        if t == MsgType.GOODBYE:
            p.last_error = f"peer said goodbye: {f.goodbye_reason()}"
            raise trio.BrokenResourceError(p.last_error)
        if t == MsgType.RELEASE:
            self.on_request(self, p, f)
            return
        # A request: drop or answer duplicates of one already seen in this session.
        seen = self._seen
        if f.req_id in seen:
            cached = seen[f.req_id]
            if cached is not None:
                self._enqueue(p, cached)
            return
        seen[f.req_id] = None
        if len(seen) > _DEDUPE_WINDOW:
            seen.popitem(last=False)
        self.on_request(self, p, f)

    # -- sending -------------------------------------------------------------------------------
    def _pick(self) -> Path | None:
        live = [p for p in self.paths if p.state == "up"]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        self._rr += 1
        best = min(live, key=lambda q: (len(q.inflight), (q.index - self._rr) % len(live)))
        return best

    def _enqueue(self, p: Path, bufs: list) -> None:
        p.queue.append(bufs)
        p.tx_frames += 1
        p.lot.unpark()

    def _transmit(self, bufs: list, pend: _Pending | None) -> None:
        p = self._pick()
        if p is None:
            if pend is not None:
                self._pending.pop(pend.frame.req_id, None)
                pend.error = LinkDown("replication link down")
                pend.finish()
            return
        if pend is not None:
            pend.path = p
            p.inflight[pend.frame.req_id] = pend
        self._enqueue(p, bufs)

    def reset(self, reason: str) -> None:
        """Drop every path (a new link session follows): nothing sent before can arrive after."""
        for p in self.live_paths():
            p.last_error = f"reset: {reason}"
            if p.cancel is not None:
                p.cancel.cancel()

    def next_id(self) -> int:
        return next(self._ids)

    def start(self, frame: Frame, timeout: float | None = None, cb=None) -> _Pending:
        """Send a request now; await ``wait(pending)`` for its reply, or pass ``cb`` to be
        called with the pending request when it completes (possibly before this returns)."""
        bufs = proto.encode(frame)
        pend = _Pending(frame, bufs, trio.current_time() + (timeout or self.cfg.io_timeout), cb)
        if not self.up:
            pend.error = LinkDown("replication link down")
            pend.finish()
            return pend
        self._pending[frame.req_id] = pend
        self._transmit(bufs, pend)
        return pend

    async def wait(self, pend: _Pending) -> Frame:
        """The reply; LinkDown when the link went down, LinkTimeout past the deadline (the
        sweeper task fails overdue requests, so no cancel scope is needed per request)."""
        if not pend.done():
            await pend.event.wait()
        if pend.reply is not None:
            return pend.reply
        raise pend.error

    async def request(self, frame: Frame, timeout: float | None = None) -> Frame:
        return await self.wait(self.start(frame, timeout))

    async def _sweeper(self) -> None:
        step = max(0.02, min(self.cfg.io_timeout, self.cfg.ping_interval) / 4)
        while True:
            await trio.sleep(step)
            now = trio.current_time()
            for req_id, pend in list(self._pending.items()):
                if pend.deadline <= now:
                    del self._pending[req_id]
                    if pend.path is not None:
                        pend.path.inflight.pop(req_id, None)
                    pend.error = LinkTimeout(
                        f"peer did not answer {pend.frame.type.name} within {self.cfg.io_timeout}s"
                    )
                    pend.finish()

    def send(self, frame: Frame) -> None:
        """Send a frame that expects no reply (RELEASE) on any live path."""
        if self.up:
            self._transmit(proto.encode(frame), None)

    def reply(self, path: Path, req_id: int, status: int = 0, payload: bytes = b"") -> None:
        bufs = proto.encode(Frame.reply(req_id, status, payload))
        if req_id in self._seen:
            self._seen[req_id] = bufs
        target = path if path.state == "up" else self._pick()
        if target is not None:
            self._enqueue(target, bufs)


async def _recv_frame(sock, dec: FrameDecoder) -> Frame:
    while (f := dec.next_frame()) is None:
        data = await netio.recv(sock, 65536)
        if not data:
            raise ProtocolError("connection closed during handshake")
        dec.receive_data(data)
    return f
