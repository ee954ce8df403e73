"""Counters the hot paths keep in their owners' objects: plain integers and fixed-bucket
histograms. Converted to Prometheus families only when scraped (``expose.py``), so a request
costs two clock reads, a few integer adds and one bisect.

Operation kinds are the NBD command numbers (``syncd.nbd.proto``: READ 0, WRITE 1, FLUSH 3,
TRIM 4, CACHE 5, WRITE_ZEROES 6, BLOCK_STATUS 7), so the server indexes a list without a lookup.
"""

from __future__ import annotations

import errno
from bisect import bisect_left
from time import monotonic

__all__ = ["LATENCY_BOUNDS", "OP_NAMES", "Histogram", "IoStats", "error_name", "monotonic"]

# Upper bounds (seconds) of the latency buckets: 50 us (a buffered 4K write on the loop) to 10 s
# (a request held through a failover); the last bucket (+Inf) takes the rest.
LATENCY_BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# NBD command number -> the ``op`` label (None: not a data request; never counted).
OP_NAMES: tuple[str | None, ...] = ("read", "write", None, "flush", "trim", "cache", "zeroes", "block_status")
_NOPS = len(OP_NAMES)


def error_name(err: int) -> str:
    """The ``error`` label of an errno (NBD error numbers are Linux errno values)."""
    return errno.errorcode.get(err, str(err))


class Histogram:
    """Observations in fixed buckets: counts per bucket (not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (le, observations <= le), +Inf last."""
        out: list[tuple[str, int]] = []
        acc = 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            acc += c
            out.append((repr(b), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


class IoStats:
    """What the hosts (the NBD clients) of one export asked and how it went, as they saw it:
    from a request's header read to its reply queued."""

    __slots__ = ("requests", "errors", "nbytes", "latency", "inflight", "mirror", "forward")

    def __init__(self) -> None:
        self.requests = [0] * _NOPS  # completed, with or without error, per op
        self.nbytes = [0] * _NOPS  # bytes of the requests that succeeded, per op
        self.errors: dict[tuple[int, int], int] = {}  # (op, errno) -> count
        self.latency = [Histogram() for _ in range(_NOPS)]
        self.inflight = 0
        # Replication round trips (node only): a write mirrored to the peer by the primary, and
        # a write forwarded to the primary by the secondary, from sent to answered.
        self.mirror = Histogram()
        self.forward = Histogram()

    def begin(self) -> float:
        self.inflight += 1
        return monotonic()

    def end(self, op: int, length: int, started: float, err: int) -> None:
        """One request of NBD command ``op`` answered (``err`` 0: success)."""
        self.inflight -= 1
        if op >= _NOPS:
            return
        self.requests[op] += 1
        if err:
            key = (op, err)
            self.errors[key] = self.errors.get(key, 0) + 1
        else:
            self.nbytes[op] += length
        h = self.latency[op]  # Histogram.observe, inlined: this runs for every host request
        took = monotonic() - started
        h.counts[bisect_left(h.bounds, took)] += 1
        h.total += took
