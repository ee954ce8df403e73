"""Flow control of the replication link (sans-IO): what a path sends next, and how many bytes of
bulk requests the link may have in flight.

Two promises keep a busy link alive:

* Control frames (keepalives, leases, RELEASE, replies, CONTROL) never wait behind bulk data
  queued in this process: a path's ``SendQueue`` hands its sender every control frame first, and
  bulk frames only in batches of about ``BULK_BATCH`` bytes, so a control frame queued meanwhile
  waits for at most one batch (plus what the kernel still holds: the link caps that with
  ``TCP_NOTSENT_LOWAT``).
* The bytes of bulk requests in flight on the link (queued, on the wire, at the peer, until
  answered) are bounded (``Credit``): a request beyond the bound waits, in arrival order, before
  it is handed to a path. So whatever queue sits between the two processes (socket buffers, a
  relay, a congested network) holds at most that much ahead of a control frame, and the wait
  ends by itself as replies come back: back-pressure, not timeouts.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

from .proto import HEADER_SIZE, Frame, MsgType

Buffers = list[Any]  # one frame (or a batch) as proto.encode makes it: bytes and memoryviews


class Waiter(Protocol):
    """What waits for credit: a request, or room reserved for one."""

    cost: int

BULK_BATCH = 256 << 10  # bulk bytes handed to the kernel between two looks at the control queue
BULK_PAYLOAD = 16 << 10  # a frame carrying more than this is bulk whatever its type (READ replies)
IOV_MAX = 512

DATA_TYPES = frozenset((MsgType.WRITE, MsgType.ZEROES, MsgType.TRIM))


def request_cost(f: Frame) -> int:
    """Bytes a request holds of the link's credit until it is answered: the frame of a data op
    (WRITE, ZEROES, TRIM), the data a READ brings back; 0 for the rest (control, FLUSH,
    DIGESTS, resync bookkeeping: small, and not to be held up behind data)."""
    t = f.type
    if t in DATA_TYPES:
        return HEADER_SIZE + len(f.payload)
    if t == MsgType.READ:
        return HEADER_SIZE + int(f.length)
    return 0


def is_bulk(f: Frame) -> bool:
    """Whether a request frame goes behind control frames: data ops, and anything large."""
    return f.type in DATA_TYPES or len(f.payload) > BULK_PAYLOAD


class SendQueue:
    """The frames (lists of buffers, as ``proto.encode`` makes them) waiting for a path's
    sender, control before bulk."""

    __slots__ = ("ctl", "bulk")

    def __init__(self) -> None:
        self.ctl: collections.deque[Buffers] = collections.deque()
        self.bulk: collections.deque[Buffers] = collections.deque()

    def __len__(self) -> int:
        return len(self.ctl) + len(self.bulk)

    def next_batch(self) -> Buffers:
        """Buffers to hand to the kernel now: every queued control frame, then whole bulk frames
        up to ``BULK_BATCH`` bytes (at least one frame, however large); [] when empty."""
        out: Buffers = []
        ctl, bulk = self.ctl, self.bulk
        while ctl and len(out) < IOV_MAX:
            out.extend(ctl.popleft())
        budget = BULK_BATCH
        while bulk and budget > 0 and len(out) < IOV_MAX:
            bufs = bulk.popleft()
            out.extend(bufs)
            budget -= len(bufs[-1])  # the payload (or the header alone): close enough
        return out

    def clear(self) -> int:
        n = len(self)
        self.ctl.clear()
        self.bulk.clear()
        return n


class Credit:
    """Bytes of bulk requests in flight, at most ``limit``; requests that do not fit wait in
    ``waiting`` in arrival order (nothing overtakes a waiting request). A request larger than
    the limit goes when nothing else is in flight. Items are anything with a ``cost``."""

    __slots__ = ("limit", "used", "waiting", "waits")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("credit limit must be positive")
        self.limit = limit
        self.used = 0
        self.waiting: collections.deque[Waiter] = collections.deque()
        self.waits = 0  # requests that had to wait, ever

    def take(self, cost: int) -> bool:
        """Take ``cost`` now if it fits and nobody waits ahead; False: queue the request."""
        if self.waiting or (self.used and self.used + cost > self.limit):
            return False
        self.used += cost
        return True

    def queue(self, item: Waiter) -> None:
        self.waiting.append(item)
        self.waits += 1

    def give(self, cost: int) -> None:
        self.used -= cost

    def admit(self) -> list[Waiter]:
        """The waiting requests that fit now, in order, their cost taken."""
        out = []
        waiting = self.waiting
        while waiting:
            cost = waiting[0].cost
            if self.used and self.used + cost > self.limit:
                break
            self.used += cost
            out.append(waiting.popleft())
        return out

    def cancel(self, item: Waiter) -> None:
        """``item`` no longer waits (its waiter was cancelled); its cost was never taken."""
        try:
            self.waiting.remove(item)
        except ValueError:  # already admitted or dropped
            pass

    def drop(self) -> list[Waiter]:
        """Every waiting request (the link went down); their cost was never taken."""
        out = list(self.waiting)
        self.waiting.clear()
        return out
