"""Turning the daemons' own numbers into Prometheus metric families, at scrape time.

A daemon registers one collector (``collect() -> iterable of families``) in a registry of its
own; ``Endpoint`` renders it with ``prometheus_client.generate_latest`` when ``GET /metrics``
comes (``http.py``), in the daemon's event loop. Nothing is kept between scrapes: every value is
read from the object that owns it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import trio
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from ..config import MetricsConfig
from .http import MetricsHTTP
from .stats import OP_NAMES, Histogram, IoStats, error_name

__all__ = ["Endpoint", "Families", "io_families", "CounterMetricFamily", "GaugeMetricFamily"]

# The NBD commands whose requests are counted and timed (NBD_CMD_CACHE is never advertised).
_IO_OPS = ("read", "write", "trim", "zeroes", "flush", "block_status")
_BYTES_OPS = ("read", "write", "trim", "zeroes")
_OP_INDEX = {n: i for i, n in enumerate(OP_NAMES) if n is not None}
# The classic text format, which every Prometheus (and anything that scrapes like it) reads. The
# names and labels here are all plain ASCII, so the page is the same in the newer 1.0.0 format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
F = TypeVar("F", GaugeMetricFamily, CounterMetricFamily, HistogramMetricFamily)


class Families:
    """Metric families being built for one scrape, by name; labels fixed per family."""

    def __init__(self) -> None:
        self._f: dict[str, Metric] = {}

    def _family(self, cls: type[F], name: str, doc: str, labels: Sequence[str]) -> F:
        f = self._f.get(name)
        if f is None:
            f = self._f[name] = cls(name, doc, labels=list(labels))
        assert isinstance(f, cls), f"{name} is a {type(f).__name__}, not a {cls.__name__}"
        return f

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
        return self._family(GaugeMetricFamily, name, doc, labels)

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
        return self._family(CounterMetricFamily, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
        return self._family(HistogramMetricFamily, name, doc, labels)

    def enum(self, name: str, doc: str, labels: Sequence[str], values: Sequence[str], key: Sequence[str],
             current: str) -> None:
        """The state-set pattern: one series per possible state of ``key``, 1 for the current."""
        g = self.gauge(name, doc, [*labels, "state"])
        for v in values:
            g.add_metric([*key, v], 1.0 if v == current else 0.0)
        if current not in values:  # a state this exporter does not know yet: still shown
            g.add_metric([*key, current], 1.0)

    def observe(self, name: str, doc: str, labels: Sequence[str], key: Sequence[str], h: Histogram) -> None:
        self.histogram(name, doc, labels).add_metric(list(key), h.cumulative(), h.total)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._f.values())


def io_families(fam: Families, prefix: str, labels: Sequence[str], key: Sequence[str], st: IoStats,
                what: str) -> None:
    """The requests of one export as its clients saw them (``what``: who they are)."""
    req = fam.counter(f"{prefix}_requests", f"Requests {what} completed (with or without error), by op",
                      [*labels, "op"])
    nbytes = fam.counter(f"{prefix}_bytes", f"Bytes of the requests {what} that succeeded, by op",
                         [*labels, "op"])
    for op in _IO_OPS:
        i = _OP_INDEX[op]
        req.add_metric([*key, op], st.requests[i])
        if op in _BYTES_OPS:
            nbytes.add_metric([*key, op], st.nbytes[i])
        fam.observe(f"{prefix}_request_duration_seconds",
                    f"Time from a request's header read to its reply queued ({what}), by op",
                    [*labels, "op"], [*key, op], st.latency[i])
    errs = fam.counter(f"{prefix}_request_errors", f"Requests {what} answered with an error, by op and errno",
                       [*labels, "op", "error"])
    for (i, err), n in sorted(st.errors.items()):
        errs.add_metric([*key, OP_NAMES[i] or str(i), error_name(err)], n)
    fam.gauge(f"{prefix}_inflight_requests", f"Requests {what} received and not yet answered",
              labels).add_metric(list(key), st.inflight)


class _Collector:
    def __init__(self, collect: Callable[[Families], None]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        fam = Families()
        self._collect(fam)
        return list(fam)


class Endpoint:
    """A daemon's /metrics: its collector in a registry of its own, served by ``MetricsHTTP``."""

    def __init__(self, cfg: MetricsConfig, collect: Callable[[Families], None]) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=False)
        self.http = MetricsHTTP(cfg, self.render)
        self._collect = collect
        self.registry.register(_Collector(self._all))  # type: ignore[arg-type]

    def _all(self, fam: Families) -> None:
        self._collect(fam)
        h = self.http
        fam.counter("syncd_metrics_scrapes", "Metrics pages served", []).add_metric([], h.served)
        fam.counter("syncd_metrics_refused_connections",
                    "Metrics connections closed at once (metrics.max_connections reached)",
                    []).add_metric([], h.refused)
        fam.counter("syncd_metrics_rejected_requests",
                    "Metrics requests refused: malformed, too large, not GET /metrics", []).add_metric([], h.rejected)
        fam.counter("syncd_metrics_timed_out_connections",
                    "Metrics connections dropped at metrics.request_timeout", []).add_metric([], h.timed_out)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE

    def listen(self) -> socket.socket:
        """Bind now (a port in use is a start-up error, before anything else runs)."""
        from .. import netio

        return netio.listen_tcp(self.cfg.listen, backlog=max(self.cfg.max_connections, 16))

    async def serve(self, lsock: socket.socket | None = None, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await self.http.serve(lsock if lsock is not None else self.listen(), task_status=task_status)
