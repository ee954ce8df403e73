"""A TCP relay standing in for the inter-site network in the lab: it can cut a path silently
(packets vanish, nothing is reset, as when a fibre is cut), heal it, and add one-way latency
(this kernel has no netem). Controlled over a unix socket with JSON lines. It can also record
the connections it relays (``record`` / ``recorded``), so the lab's fuzzer replays what a real
node sends, whatever the protocol is today."""

from __future__ import annotations

import base64
import collections
import ctypes
import json
import logging
import os
import time

import trio

log = logging.getLogger("syncd.linkproxy")


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("interval_s", ctypes.c_long), ("interval_ns", ctypes.c_long),
                ("value_s", ctypes.c_long), ("value_ns", ctypes.c_long)]


_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1
_TFD_NONBLOCK, _TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _timerfd_create, _timerfd_settime = _libc.timerfd_create, _libc.timerfd_settime
except (OSError, AttributeError):  # not Linux: the coarse trio.sleep_until below
    _timerfd_create = _timerfd_settime = None


class DelayClock:
    """Sleeps until a time.monotonic() deadline to within tens of microseconds. trio.sleep_until
    cannot: trio waits in epoll with a float timeout that CPython rounds UP to whole milliseconds,
    so a 0.25 ms sleep took 1.15 ms and every delayed chunk arrived up to 1 ms late (+0.5 ms round
    trip measured 2.3 ms). A timerfd armed at the deadline wakes epoll on time instead.

    Waking a process that slept takes time of its own, on a virtual machine up to half a
    millisecond: a 4 KiB ping-pong through the relay took 0.2 ms more than the added round trip
    at 0.5 ms, growing to 0.5-0.7 ms at 10 ms. So the last ``spin`` seconds before the deadline
    can be spent polling instead (a checkpoint at a time: the relay's other connections go on
    meanwhile): the same ping-pong then took 0.13-0.4 ms more (bench/README.md, round 13)."""

    def __init__(self) -> None:
        self.fd = -1
        if _timerfd_create is not None:
            self.fd = _timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        self._spec = _ITimerSpec()

    async def sleep_until(self, deadline: float, spin: float = 0.0) -> None:
        """``deadline`` on time.monotonic()'s clock (CLOCK_MONOTONIC); the last ``spin`` seconds
        polling."""
        if self.fd < 0:
            await trio.sleep(max(0.0, deadline - time.monotonic()))
            return
        wake = deadline - spin
        while time.monotonic() < wake:
            sec = int(wake)
            self._spec.value_s, self._spec.value_ns = sec, max(1, int((wake - sec) * 1e9))
            if _timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
                await trio.sleep(max(0.0, deadline - time.monotonic()))
                return
            await trio.lowlevel.wait_readable(self.fd)
            try:
                os.read(self.fd, 8)  # the expiry count; the loop re-checks the clock (a stale expiry)
            except BlockingIOError:
                pass
        while time.monotonic() < deadline:
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1


# A chunk alone in every delay line of the process (a request at a time: the latency the
# distance table measures) is awaited polling for its last SPIN seconds (DelayClock). Others are
# not: chunks queued behind one another, or while other lines hold chunks (a queue of requests in
# flight), would each poll while the relay's CPU is wanted elsewhere. Polling for every chunk
# with none queued behind it in its own line (the rule before) cost the relay at QD64 with 5 ms
# added 48-51 µs of CPU per write, against 38-43 µs now; with 1 ms added 37-44 against 26-31 µs,
# and QD64 ran at 10,267-12,582 IOPS against 12,827-15,624 now (bench/README.md, round 14).
SPIN = 0.0003


class _Line:
    """One direction of one relayed connection, as the other lines see it."""

    __slots__ = ("q", "holding")

    def __init__(self) -> None:
        self.q: collections.deque = collections.deque()
        self.holding = False  # its sender task holds a chunk (waiting out its delay, or sending it)


_LINES: set[_Line] = set()  # every delay line of this process


def _alone(line: _Line) -> bool:
    """``line``'s held chunk is the only chunk any line of the process holds or queues."""
    return not line.q and all(other is line or (not other.q and not other.holding) for other in _LINES)


class Relay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], source: str | None = None):
        self.listen = listen
        self.target = target
        self.source = source  # the address it dials from (the lab's hosts: the arrays tell them apart by it)
        self.cut = False
        self.delay = 0.0
        self.conns: set[trio.CancelScope] = set()
        self.bytes = 0
        # Recorded connections (when recording): per connection, the chunks in the order they
        # were relayed, each ("c", bytes) from the dialer or ("s", bytes) from the target.
        self.recording: list[list[tuple[str, bytes]]] | None = None
        self.record_limit = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        except OSError as e:  # say which relay: the lab picked the port, another process took it
            raise OSError(e.errno, f"relay {self.listen[0]}:{self.listen[1]}: {e.strerror}") from None
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, down: trio.SocketStream) -> None:
        with trio.CancelScope() as cs:
            self.conns.add(cs)
            try:
                if self.cut:  # a cut path accepts nothing onward: the dialer just times out
                    await trio.sleep_forever()  # until do_heal() drops the connection
                up = await trio.open_tcp_stream(*self.target, local_address=self.source)
                rec: list[tuple[str, bytes]] | None = None
                if self.recording is not None:
                    rec = []
                    self.recording.append(rec)
                async with down, up, trio.open_nursery() as n:
                    n.start_soon(self._pump, down, up, cs, rec, "c")
                    n.start_soon(self._pump, up, down, cs, rec, "s")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.conns.discard(cs)

    async def _pump(self, src, dst, cs: trio.CancelScope, rec: list | None = None, side: str = "c") -> None:
        """One direction of a connection: a delay line. Each chunk is stamped when it arrives and
        sent at its arrival + the delay of the moment; the receiver keeps reading meanwhile, so
        chunks in flight are pipelined (the delay is added once per chunk, not once per chunk
        ahead of it) and a sender waits only for its own chunk's time. With no delay and no
        chunk ahead of it, a chunk is sent by the receiving task itself: a pass through the
        sender task cost a round trip through the relay 40-70 µs of the 80-110 it added on the
        test VM."""
        line = _Line()
        q = line.q
        more = trio.Event()
        clock = DelayClock()

        async def sender():
            nonlocal more
            while True:
                while not q:
                    await more.wait()
                    more = trio.Event()
                t, data = q.popleft()
                line.holding = True
                if data is None:  # the source ended its side, after all it had sent
                    if self.cut:
                        await trio.sleep_forever()  # a cut path carries no end of stream either
                    await dst.send_eof()
                    return
                if self.delay:
                    await clock.sleep_until(t + self.delay, SPIN if _alone(line) else 0.0)
                    # coalesce what became due meanwhile: one send, as a link would deliver it
                    # (not the end of stream: it goes after, by itself)
                    now = time.monotonic()
                    while q and q[0][1] is not None and q[0][0] + self.delay <= now:
                        data += q.popleft()[1]
                if self.cut:
                    await trio.sleep_forever()  # until do_heal() drops the connection
                await dst.send_all(data)
                line.holding = False
                self.bytes += len(data)

        ended = False
        _LINES.add(line)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(sender)
                while True:
                    data = await src.receive_some(1 << 18)
                    if not data:
                        break
                    if self.cut:
                        continue  # silently dropped
                    if rec is not None and sum(len(b) for _, b in rec) < self.record_limit:
                        rec.append((side, data))
                    if not self.delay and not q and not line.holding:
                        # Nothing to wait for and nothing ahead of it: sent from here, without
                        # a pass through the sender task (reading waits meanwhile, as TCP would).
                        await dst.send_all(data)
                        self.bytes += len(data)
                        continue
                    q.append((time.monotonic(), data))
                    more.set()
                # The source closed its side: what it sent before still goes through, then the
                # end of stream, as TCP would carry it (a peer's last answer before it closes,
                # e.g. a refusal, must not be lost); the other direction goes on until it ends too.
                q.append((time.monotonic(), None))
                more.set()
            ended = True
        finally:
            _LINES.discard(line)
            clock.close()
            if not ended:  # a reset or a failed send ends the whole connection
                cs.cancel()

    def do_cut(self) -> None:
        self.cut = True

    def do_heal(self) -> None:
        self.cut = False
        for cs in list(self.conns):  # the old connections are dead to both ends: drop them
            cs.cancel()


COMMANDS = ("status", "cut", "heal", "delay", "record", "recorded")
MAX_DELAY_MS = 60_000.0  # an added round trip beyond a minute is a mistake, not a distance
MAX_RECORD = 64 << 20  # bytes recorded per connection at most
MAX_REQUEST = 1 << 16  # bytes of one control request


def delay_ok(ms: object) -> bool:
    """``ms`` is a round trip the relay may add: a number from 0 to MAX_DELAY_MS. (A comparison,
    not math.isfinite, which raises OverflowError on a huge integer; NaN and infinities fail
    the comparison too.)"""
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 <= ms <= MAX_DELAY_MS


def parse_request(raw: bytes, nrelays: int) -> tuple[str, list[int], dict]:
    """One control request (a JSON object on a line): the command, the indexes of the relays it
    applies to (``paths``; all when absent) and its checked arguments (``ms`` for delay,
    ``limit`` for record). Raises ValueError naming what is wrong; nothing has changed then."""
    if len(raw) > MAX_REQUEST:
        raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    try:
        req = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise ValueError(f"request is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise ValueError("request must be a JSON object")
    cmd = req.get("cmd")
    if cmd not in COMMANDS:
        raise ValueError(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    paths = req.get("paths", list(range(nrelays)))
    if not isinstance(paths, list) or not all(type(i) is int for i in paths):
        raise ValueError(f"paths must be a list of path numbers, got {paths!r}")
    bad = [i for i in paths if not 0 <= i < nrelays]
    if bad:
        raise ValueError(f"no path {bad[0]}: this relay has paths 0 to {nrelays - 1}")
    args: dict = {}
    if cmd == "delay":
        ms = req.get("ms")
        if not delay_ok(ms):
            raise ValueError(f"ms must be a round trip in milliseconds from 0 to {MAX_DELAY_MS:g}, got {ms!r}")
        args["ms"] = abs(float(ms))  # (-0.0 is 0)
    elif cmd == "record":
        limit = req.get("limit", 1 << 16)
        if type(limit) is not int or not 0 < limit <= MAX_RECORD:
            raise ValueError(f"limit must be a number of bytes from 1 to {MAX_RECORD}, got {limit!r}")
        args["limit"] = limit
    return cmd, paths, args


async def run_proxy(relays: list[Relay], control: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as n:
        for r in relays:
            await n.start(r.serve)
        try:
            os.unlink(control)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(control)
        sock.listen(8)

        async def handle(stream):
            try:
                await answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left without its answer: what it asked for stands, the relay goes on

        async def answer(stream):
            async with stream:
                buf = b""
                while b"\n" not in buf:
                    d = await stream.receive_some(4096)
                    if not d:
                        return
                    buf += d
                    if len(buf) > MAX_REQUEST:
                        break
                try:
                    cmd, idx, args = parse_request(buf, len(relays))
                except ValueError as e:  # nothing changed; the relay goes on serving
                    await stream.send_all(json.dumps({"ok": False, "error": str(e)}).encode() + b"\n")
                    return
                sel = [relays[i] for i in idx]
                if cmd == "cut":
                    for r in sel:
                        r.do_cut()
                elif cmd == "heal":
                    for r in sel:
                        r.do_heal()
                elif cmd == "record":  # from now on, record new connections (up to limit bytes each)
                    for r in sel:
                        r.recording, r.record_limit = [], args["limit"]
                elif cmd == "recorded":  # what was recorded; recording stops
                    out = [[[[side, base64.b64encode(b).decode()] for side, b in conn] for conn in (r.recording or [])]
                           for r in sel]
                    for r in sel:
                        r.recording = None
                    await stream.send_all(json.dumps({"ok": True, "recorded": out}).encode() + b"\n")
                    return
                elif cmd == "delay":
                    for r in sel:
                        r.delay = args["ms"] / 2000.0  # the round trip gets ms
                st = [{"listen": list(r.listen), "target": list(r.target), "cut": r.cut,
                       "rtt_added_ms": r.delay * 2000, "bytes": r.bytes, "conns": len(r.conns)} for r in relays]
                await stream.send_all(json.dumps({"ok": True, "paths": st}).encode() + b"\n")

        n.start_soon(trio.serve_listeners, handle, [trio.SocketListener(sock)])
        task_status.started()


class RelayError(RuntimeError):
    """The relay refused a control request (the message says why); nothing changed."""


def proxy_line(control: str, line: bytes) -> dict:
    """Send one request line to the relay's control socket; its answer, whatever it says."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(control)
    s.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    return dict(json.loads(buf))


def proxy_command(control: str, cmd: str, **kw) -> dict:
    ans = proxy_line(control, json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
    if not ans.get("ok"):
        raise RelayError(f"the link relay refused {cmd!r}: {ans.get('error')}")
    return ans
