"""Socket I/O for the hot paths: plain non-blocking socket calls that park on the Trio loop only
when the kernel says EAGAIN.

``trio.socket`` wraps every call in two scheduler checkpoints; at tens of thousands of requests
a second that is a large share of the CPU. Fairness is kept by an explicit checkpoint every few
calls that did not block (``Pacer``).
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import struct
import time
from typing import Callable, Protocol

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

IOV_MAX = 512


class Pacer:
    """Yield to the scheduler after ``every`` consecutive operations that did not block."""

    __slots__ = ("n", "every")

    def __init__(self, every: int = 16) -> None:
        self.n = 0
        self.every = every

    def reset(self) -> None:
        """The caller just blocked or yielded: start counting again."""
        self.n = 0

    def due(self, blocked: bool) -> bool:
        """Count one operation; True when the caller should yield now (``await checkpoint()``):
        a plain call, so the common case costs no coroutine."""
        if blocked:
            self.n = 0
            return False
        self.n += 1
        if self.n >= self.every:
            self.n = 0
            return True
        return False


class Probe:
    """Whether a socket has anything to read, asked without a receive that fails.

    A loop that reads what has arrived and then waits used to find the socket empty by a
    receive raising ``BlockingIOError``, on every wake-up: about 8,400 instructions, most of them
    the exception (bench/README.md, round 20). A receive that brought less than it asked for very
    likely drained the socket (``drained``); the next one first asks ``poll`` with no timeout
    (about 1,800 instructions) and, when nothing is there, waits for input at once. A receive
    that filled its buffer, or a socket that says it has something (data, the peer's close, an
    error: ``poll`` reports those whatever it is asked), is received from as before."""

    __slots__ = ("_poll", "drained")

    def __init__(self, sock: socket.socket) -> None:
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.drained = False

    def empty(self) -> bool:
        """True when the last receive drained the socket and nothing arrived since."""
        return self.drained and not self._poll.poll(0)


# -- output sent at the end of an input batch ----------------------------------------------------
# A loop that reads requests (the NBD server's, the replication link's receiver) handles every
# request one recv brought before it waits again: a *batch*. What the batch queues for sending
# (replies, frames to the peer) is sent by the loop itself when the batch ends, in one sendmsg
# per socket, instead of by each socket's sender task a scheduler round later: one task switch
# and one epoll round less per hop, and the bytes leave sooner. A sender task stays for what
# the kernel does not take at once (EAGAIN, a partial send) and for output queued outside a
# batch (timers, other tasks), which wakes it as before.


class Outbox(Protocol):
    """What a socket's sender owns, seen by the batch: ``flush_inline`` (send what is queued
    now without blocking, or hand the rest to the sender task) and ``flush_queued``."""

    flush_queued: bool

    def flush_inline(self) -> None: ...


class _Batch:
    __slots__ = ("active", "pending", "after", "later", "later_since")

    def __init__(self) -> None:
        self.active = False
        self.pending: list[Outbox] = []
        self.after: Callable[[], None] | None = None  # the batch's work after its sends (one)
        self.later: list[Callable[[], None]] = []  # sends put off (``later``), any batch's
        self.later_since = 0.0  # the poller's clock when the oldest of them was put off


_batch = _Batch()


# -- polling before the loop sleeps ------------------------------------------------------------
# A replicated write wakes four processes in turn (the host's client, this array, its peer, this
# array again). A process that sleeps in epoll_wait leaves its CPU idle, and on a virtual machine
# waking an idle CPU costs tens of microseconds more than the work itself: a bare ping-pong over
# loopback TCP takes 80 µs per round trip on the 2-vCPU test VM, 24 µs when the answering side
# polls for 50 µs before it sleeps. So after a burst of input, the loop keeps polling (epoll with
# timeout 0, through plain scheduler checkpoints) for up to a window before it may sleep; input
# that comes within it is handled at once. The window adapts as QEMU's event loop polling does
# (its poll-max-ns): it grows (doubling, up to ``max_window``) when the loop slept for less than
# ``max_window`` (a longer window would have caught what woke it), and it halves when the loop
# slept longer (polling there only burns CPU), so a trickle of I/O costs no polling.
#
# Each pass of a window also yields the CPU (sched_yield): a process ready to run on this CPU
# (the host's client, the peer array on a small machine) runs first instead of waiting until the
# scheduler preempts the poller. On the 2-vCPU test VM, where the host's client and both arrays
# share two CPUs, this gave QD1 writes about 10-18 % more IOPS and QD16 writes at site B about
# 4 % more. Two yields within 50 ms that each return only after another process ran for
# over a millisecond (``_LONG_YIELD``) mean a busy neighbour: a CPU-bound process on this CPU
# (one alone happens now and then when the peer or the client has a lot to do). A polling loop then
# waits behind it for a time slice whenever it yields, while a sleeping one is woken ahead of it
# when input comes; so the loop stops polling (``backoff``, from 0.1 s, doubling while the
# neighbour stays busy, up to 5 s) and sleeps. Measured with a CPU-bound process on the same CPU
# and input every 0.5 ms: polling without yielding left the neighbour half its CPU and answered
# at p50 44 µs, p90 3.3 ms; yielding at every pass without the pause left it 0.90 but answered at
# p50 753 µs; with the pause 0.86, p50 34 µs, p90 59 µs; a loop that never polls, p50 32 µs.

class IdlePoller:
    """Polls the event loop for up to a window when it runs out of work (see above). One per
    process: ``run`` is the task that polls; ``batch_begin`` tells it input arrived."""

    __slots__ = ("clock", "yield_cpu", "max_window", "window", "input", "parked", "slept_at", "_lot",
                 "running", "polls", "caught", "cut", "polling_s", "backoff", "resume_at", "backoffs", "long_at")

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 yield_cpu: Callable[[], None] = os.sched_yield) -> None:
        self.clock = clock
        self.yield_cpu = yield_cpu  # after each pass of a window: other processes ready to run go first
        self.max_window = 0.0  # s: 0 polls never
        self.window = 0.0  # s: what the loop polls after its next burst
        self.input = False  # a loop reading input began a batch since the last look
        self.parked = False  # the poll task waits for input
        self.slept_at = 0.0  # clock reading when the loop last ran out of work
        self._lot = trio.lowlevel.ParkingLot()
        self.running = False
        self.polls = 0  # windows polled
        self.caught = 0  # of them, ended by input
        self.cut = 0  # of them, ended because another process held the CPU for a time slice
        self.polling_s = 0.0  # time spent polling (CPU that would have been idle)
        self.backoff = 0.0  # s: the last pause of polling for a busy neighbour (0: none yet)
        self.resume_at = 0.0  # clock reading before which the loop does not poll
        self.backoffs = 0  # pauses for a busy neighbour
        self.long_at = -math.inf  # clock reading of the last long yield

    def woke(self) -> None:
        """Input arrived while the poll task was parked: adapt the window to how long the loop
        was idle (the window it polled in vain, then its sleep)."""
        self.parked = False
        slept = self.clock() - self.slept_at
        if slept <= self.max_window:
            self.window = min(self.max_window, max(2 * self.window, _MIN_WINDOW))
        else:
            self.window = self.window / 2 if self.window > 2 * _MIN_WINDOW else 0.0
        self._lot.unpark_all()

    async def run(self, max_window: float) -> None:
        """Poll for up to ``max_window`` seconds each time the loop runs out of work, until
        cancelled. A second call while one runs returns at once (the loop is polled already)."""
        if max_window <= 0 or self.running:
            return
        from trio.testing import wait_all_tasks_blocked  # trio's own idle test (not a mock)

        clock, yield_cpu = self.clock, self.yield_cpu
        threads = trio.to_thread.current_default_thread_limiter()  # what every to_thread call borrows
        self.running, self.max_window, self.window = True, max_window, max_window
        self.slept_at = clock()
        try:
            while True:
                self.parked = True
                await self._lot.park()  # until input comes (``woke``)
                while True:
                    await wait_all_tasks_blocked()  # every task waits: the loop would sleep now
                    self.input = False
                    start = clock()
                    end = start + self.window if start >= self.resume_at else start
                    now = start
                    others = 0.0  # time other processes ran on this CPU when the loop yielded
                    # Not while a worker thread runs (a local sync, an O_DIRECT write): it needs
                    # the GIL to finish, and a loop that only lets go of it for an epoll_wait(0)
                    # keeps it from the thread for up to the switch interval (5 ms) at a time.
                    while not self.input and now < end and not threads.borrowed_tokens:
                        await checkpoint()  # one pass of the loop: epoll_wait with timeout 0
                        before = clock()
                        yield_cpu()
                        now = clock()
                        if now - before > _YIELD_RAN:
                            others += now - before
                            if now - before > _LONG_YIELD:
                                self._long_yield(now)
                                if not self.input:
                                    self.cut += 1
                                break
                    if end > start:  # (a window shrunk to nothing only notes when the loop slept)
                        self.polls += 1
                        self.polling_s += now - start - others
                    if not self.input:
                        self.slept_at = start  # idle since the window began
                        if _batch.later:
                            run_later()  # before the loop sleeps
                        break  # nothing came: the loop may sleep
                    self.caught += 1
        finally:
            self.running = self.parked = False
            if _batch.later:
                run_later()  # nothing would run them any more

    def _long_yield(self, now: float) -> None:
        """A yield returned only after another process ran for ``_LONG_YIELD``. Once in a while
        that is a process that had a lot to do at once; a second time within ``_LONG_AGAIN`` it
        is a busy neighbour: no polling for ``backoff``, doubled when the last pause ended less
        than its length ago."""
        last, self.long_at = self.long_at, now
        if now - last > _LONG_AGAIN:
            return
        if self.backoff and now < self.resume_at + self.backoff:
            self.backoff = min(_MAX_BACKOFF, 2 * self.backoff)
        else:
            self.backoff = _MIN_BACKOFF
        self.resume_at = now + self.backoff
        self.backoffs += 1

    def stats(self) -> dict[str, float | int]:
        return {"max_window_us": round(self.max_window * 1e6), "window_us": round(self.window * 1e6),
                "polls": self.polls, "caught": self.caught, "cut_short": self.cut,
                "polling_s": round(self.polling_s, 3),
                "neighbour_pauses": self.backoffs,
                "paused_s": round(max(0.0, self.resume_at - self.clock()), 3)}


_MIN_WINDOW = 4e-6
_YIELD_RAN = 10e-6  # a yield that took longer than this let another process run
_LONG_YIELD = 1e-3  # one that took longer than this: another process ran a time slice (0.75-3 ms)
_LONG_AGAIN = 0.05  # s: a second one within this: a busy neighbour
_MIN_BACKOFF, _MAX_BACKOFF = 0.1, 5.0
poller = IdlePoller()


def batch_begin() -> bool:
    """Start a batch (nested calls are part of the outer one); returns what ``batch_end`` needs."""
    poller.input = True
    if poller.parked:
        poller.woke()
    was = _batch.active
    _batch.active = True
    return was


def batch_end(was: bool) -> None:
    """End a batch begun by ``batch_begin`` (call it before the caller's next await, and in a
    ``finally``): every outbox the batch queued to is flushed now."""
    if was:
        return
    _batch.active = False
    pending = _batch.pending
    try:
        while pending:
            ob = pending.pop()
            ob.flush_queued = False
            ob.flush_inline()
    finally:
        after = _batch.after
        if after is not None:  # also when a flush raised: it may hold a range and owe a host an answer
            _batch.after = None
            after()
        if _batch.later and poller.clock() - _batch.later_since > LATER_MAX:
            run_later()  # input keeps coming, and none of it sent what waits


# A send that may wait (``later``) waits at most this long while input keeps the loop busy.
LATER_MAX = 200e-6


def later(fn: Callable[[], None]) -> bool:
    """Run ``fn`` (a send nobody waits for, such as a RELEASE) when the loop runs out of work,
    so that until then whatever the loop sends anyway can take it along (``fn`` then finds
    nothing left to do); at the end of a batch once ``LATER_MAX`` passed, if input keeps the
    loop busy. False when no batch is running or the loop does not poll (the idle poller is
    what notices that the loop ran out of work): the caller sends now.

    The poller runs ``fn`` when a window passes without input, before the loop sleeps, and when
    it stops. A secondary's RELEASE after its copy of a forwarded write, sent this way, goes
    with the next forwarded write instead of in a send of its own, and the primary handles both
    in one wake-up (bench/README.md, round 15)."""
    if not _batch.active or not poller.running:
        return False
    if not _batch.later:
        _batch.later_since = poller.clock()
    _batch.later.append(fn)
    return True


def unlater(fn: Callable[[], None]) -> None:
    """Forget ``fn`` put off by ``later`` (what it would send went with another send); the
    wait of the next function put off then starts when it is."""
    try:
        _batch.later.remove(fn)
    except ValueError:
        pass  # run already, or running now


def run_later() -> None:
    """Run (and forget) every function ``later`` put off, oldest first. Should one raise, the
    others stay put off."""
    fns = _batch.later
    _batch.later = []
    for i, fn in enumerate(fns):
        try:
            fn()
        except BaseException:
            _batch.later[:0] = fns[i + 1:]
            raise


def after_sends(fn: Callable[[], None]) -> bool:
    """Run ``fn`` when the current batch ends, once its output went to the kernel (work the
    peer need not wait for, such as the local copy of a write already on its way to it); False
    when no batch is running or the batch already has such work (the caller then runs it now).
    ``fn`` runs before the loop waits again, so before any task handles what the batch's output
    brings back; what it queues for sending goes by the sender tasks.

    One per batch: a lone request's latency gains its work's time, while in a batch of many
    the peer, answering sooner, answers in smaller batches (measured at 4 KiB QD16: 8 µs more
    CPU per write at the primary; round 10 in bench/README.md)."""
    if not _batch.active or _batch.after is not None:
        return False
    _batch.after = fn
    return True


def defer(ob: Outbox) -> bool:
    """Queue ``ob`` for the flush at the end of the current batch; False when no batch is
    running (the caller then wakes its sender task)."""
    if not _batch.active:
        return False
    if not ob.flush_queued:
        ob.flush_queued = True
        _batch.pending.append(ob)
    return True


def send_available(sock: socket.socket, bufs: list) -> tuple[int, list]:
    """Send what the kernel takes now of ``bufs`` (vectored, never blocking): the bytes sent
    and what is left of them (memoryviews; [] when everything went). A socket error leaves
    everything unsent from that point, for a sender task to meet again and end the connection."""
    if len(bufs) <= IOV_MAX:  # the common case: one call, the list as it is
        return _send_once(sock, bufs)
    total = 0
    for at in range(0, len(bufs), IOV_MAX):  # one sendmsg per IOV_MAX buffers, until one falls short
        n, left = _send_once(sock, bufs[at:at + IOV_MAX])
        total += n
        if left:
            return total, left + _views(bufs[at + IOV_MAX:])
    return total, []


def _send_once(sock: socket.socket, bufs: list) -> tuple[int, list]:
    """One ``sendmsg`` of at most IOV_MAX buffers as they are (no views made of those that go:
    measured, 2 µs less per call than views of every one); the bytes sent and what is left, as
    views. A socket error (EAGAIN, or one a sender task will meet again) sends nothing."""
    want = 0
    for b in bufs:
        want += b.nbytes if type(b) is memoryview else len(b)
    if not want:
        return 0, []
    try:
        n = sock.sendmsg(bufs)
    except OSError:
        return 0, _views(bufs)
    return n, ([] if n == want else _unsent(_views(bufs), n))


def _views(bufs: list) -> list:
    """``bufs`` (bytes, bytearray, memoryview) as byte views, the empty ones left out."""
    return [b if isinstance(b, memoryview) else memoryview(b) for b in bufs if len(b)]


def _unsent(views: list, n: int) -> list:
    """What is left of ``views`` once ``n`` bytes of them went out."""
    i = 0
    while n and i < len(views):
        v = views[i]
        if n >= v.nbytes:
            n -= v.nbytes
            i += 1
        else:
            return [v.cast("B")[n:]] + views[i + 1:]
    return views[i:]


async def recv(sock: socket.socket, n: int, pacer: Pacer | None = None, probe: Probe | None = None) -> bytes:
    blocked = False
    if probe is not None and probe.empty():
        blocked = True
        await wait_readable(sock)
    while True:
        try:
            data = sock.recv(n)
            break
        except BlockingIOError:
            blocked = True
            await wait_readable(sock)
    if probe is not None:
        probe.drained = len(data) < n
    if pacer is not None and pacer.due(blocked):
        await checkpoint()
    return data


def recv_into_nowait(sock: socket.socket, view) -> int | None:
    """Bytes received into ``view`` (0: the peer closed), or None when nothing is there."""
    try:
        return sock.recv_into(view)
    except BlockingIOError:
        return None


async def recv_into(sock: socket.socket, view) -> int:
    while True:
        try:
            return sock.recv_into(view)
        except BlockingIOError:
            await wait_readable(sock)


async def sendmsg_all(sock: socket.socket, bufs: list, pacer: Pacer | None = None) -> int:
    """Send every buffer, vectored; returns the byte count."""
    blocked = False
    if len(bufs) <= IOV_MAX:  # a first call as send_available: views only of what it left
        total, views = _send_once(sock, bufs)  # (a socket error is met again below)
    else:
        total, views = 0, _views(bufs)
    while views:
        try:
            n = sock.sendmsg(views[:IOV_MAX])
        except BlockingIOError:
            blocked = True
            await wait_writable(sock)
            continue
        total += n
        if n == sum(len(v) for v in views[:IOV_MAX]) and len(views) <= IOV_MAX:
            break
        while n and views:
            first = views[0]
            if n >= first.nbytes:
                n -= first.nbytes
                views.pop(0)
            else:
                views[0] = first.cast("B")[n:]
                n = 0
    if pacer is not None and pacer.due(blocked):
        await checkpoint()
    return total


async def sendall(sock: socket.socket, data: bytes) -> None:
    await sendmsg_all(sock, [data])


async def connect(addr: tuple[str, int]) -> socket.socket:
    """A connected non-blocking TCP socket; the caller bounds the wait with a cancel scope."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        err = sock.connect_ex(addr)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {addr[0]}:{addr[1]}: {errno.errorcode.get(err, err)}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


def listen_tcp(addr: tuple[str, int], backlog: int = 64) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {addr[0]}:{addr[1]}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


async def accept(lsock: socket.socket) -> tuple[socket.socket, object]:
    while True:
        try:
            conn, addr = lsock.accept()
        except BlockingIOError:
            await wait_readable(lsock)
            continue
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EMFILE, errno.ENFILE):
                await trio.sleep(0.01)
                continue
            raise
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


# Linux value; Python's socket module names it only on some builds.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def set_notsent_lowat(sock, nbytes: int) -> None:
    """Let the kernel hold at most about ``nbytes`` of not yet sent data for ``sock`` (beyond
    that, sends return EAGAIN): what the process still holds can be reordered (control before
    bulk), what the kernel holds cannot. Ignored where the option does not exist."""
    if sock.fileno() >= 0 and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, nbytes)
        except OSError:
            pass


_LINGER_ABORT = struct.pack("ii", 1, 0)


def set_abortive_close(sock) -> None:
    """Make closing ``sock`` a reset (SO_LINGER 0): whatever is still queued in the kernel is
    dropped rather than delivered later, when the network comes back (a lost replication or
    host path must not deliver stale requests after the sender gave up on them). Works on
    plain and Trio sockets; a closed socket is left alone."""
    if sock.fileno() >= 0 and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        except OSError:
            pass


def abort(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (see set_abortive_close)."""
    set_abortive_close(sock)
    sock.close()


# The deadline is handled inside, not by the caller's cancel scope: a peer that runs out of time
# must still be sent the refusal.
async def establish(sock: socket.socket, hs, timeout: float) -> tuple[object, object]:  # noqa: ASYNC109
    """Run the security handshake ``hs`` (``secure.Handshake``) over ``sock`` within
    ``timeout`` seconds. Returns (channel, plaintext that came with the handshake's end). A
    peer that fails it (secure.AuthError), says nothing in time or closes midway gets
    ``secure.REFUSAL`` (the same bytes whatever went wrong) and this raises AuthError."""
    from . import secure

    problem = f"no security handshake within {timeout}s"
    with trio.move_on_after(timeout):
        try:
            out = hs.take_output()
            if out:
                await sendall(sock, out)
            while not hs.done:
                data = await recv(sock, 65536)
                if not data:
                    raise secure.AuthError("the peer closed the connection during the security handshake")
                hs.receive(data)
                out = hs.take_output()
                if out:
                    await sendall(sock, out)
            return hs.channel, hs.first_plaintext()
        except secure.AuthError as e:
            problem = str(e)
    await refuse(sock, secure.REFUSAL)
    raise secure.AuthError(problem)


async def refuse(sock: socket.socket, answer: bytes, linger: float = 1.0, drain: int = 256 << 10) -> None:
    """Send ``answer`` and end our side so that it arrives: a close with unread bytes in the
    receive buffer would reset the connection and drop the answer, so what the peer still sends
    is read and discarded, for at most ``linger`` seconds and ``drain`` bytes."""
    try:
        await sendall(sock, answer)
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(linger):
            while drain > 0:
                data = await recv(sock, 65536)
                if not data:
                    break
                drain -= len(data)
    except OSError:
        pass
