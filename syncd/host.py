"""The host shim: a multipath NBD initiator with ALUA path selection.

``syncd host --config host.toml`` connects to one or both arrays over any number of paths
(``nbd://``, or ``nbds://`` for TLS with the host's client certificate), finds the exported
volumes, groups the paths of one volume by its WWN (both arrays present the same one), and
re-exports each volume as one NBD export on a local unix socket (and optionally TCP on
loopback) for the host's own tools.

Path selection, as Linux multipath does it with ALUA:
* active/optimized paths first (least outstanding requests among them), active/non-optimized as
  fallback, never standby/unavailable; a path whose epoch is lower than one already seen for the
  volume is never used;
* transitioning: the request waits and is retried (the array itself holds I/O during a role
  change) up to ``transition_timeout``;
* ESHUTDOWN ("this array cannot complete it": no lease, cut from its primary, failsafe, failed
  disk, shutting down): the state of every path is re-read at once and the request re-issued on
  the best path (the array guarantees such a write cannot be applied behind a later one);
* a transport error fails the path (it is reconnected and probed in the background) and the
  request is re-issued on another path;
* with no usable path, requests queue up to ``no_path_retry`` seconds, then fail with EIO.

Re-issuing a write after a transport error is safe for that write (same data, same place), but
the array behind the lost connection may still apply it later, after a *newer* write to the same
blocks went through another path. So the range of such a write is quarantined for
``stale_write_bound`` seconds (longer than an array may hold a received request: its link
``io_timeout`` + lease expiry + ``transition_timeout``): a newer write, trim or zeroing that
overlaps it waits until then, or until the volume's epoch moves past the lost path's (the array
behind it lost the group: what it may still write alone is overwritten when it resyncs). Writes
elsewhere are not delayed.

Every path's state is polled through the ``syncd:alua`` meta context every ``poll_interval``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field

import trio

from .config import (
    NBD_LIMIT_KEYS,
    ConfigError,
    MetricsConfig,
    NbdLimits,
    Problems,
    _no_extra,
    _take,
    check_name,
    load_toml,
    parse_addr,
    parse_metrics,
    parse_nbd_limits,
)
from .metrics.stats import IoStats
from .nbd.client import (
    NBDDisconnected,
    NBDError,
    list_exports,
    open_alua_probe,
    open_nbd,
)
from .nbd.export import (
    ALUA_ACTIVE_NON_OPTIMIZED,
    ALUA_ACTIVE_OPTIMIZED,
    ALUA_NAMES,
    ALUA_TRANSITIONING,
    ALUA_UNAVAILABLE,
    AluaState,
    BlockError,
    ClientIdentity,
)
from .nbd.extents import DATA, validate
from .nbd.proto import TFLAG_SEND_FAST_ZERO

log = logging.getLogger("syncd.host")
_WWN = re.compile(r"\bwwn=(\S+)")
_VOL = re.compile(r"^syncd volume (\S+)")


# -- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArrayPaths:
    name: str
    paths: tuple[str, ...]  # nbd://HOST:PORT URIs, one per path (host port) to that array


@dataclass(frozen=True)
class HostConfig:
    name: str
    socket: str
    arrays: tuple[ArrayPaths, ...]
    admin_socket: str
    tcp: tuple[str, int] | None = None
    source: str | None = None
    poll_interval: float = 1.0
    transition_timeout: float = 10.0
    no_path_retry: float = 30.0
    io_timeout: float = 15.0
    stale_write_bound: float = 15.0  # s an array may still apply a write it received (see below)
    path_selector: str = "least-queue"  # or "round-robin" among the paths of the best state
    tls_ca: str | None = None  # verifies the arrays of nbds:// paths (default: the system's CAs)
    tls_certificate: str | None = None  # our client certificate: names this host to the arrays
    tls_key: str | None = None
    # The volumes the TCP export serves (any local user can connect to it); ("*",) for all.
    tcp_exports: tuple[str, ...] = ()
    socket_group: str | None = None  # the unix socket is 0660 for this group; else 0600 (root only)
    limits: NbdLimits = NbdLimits()
    metrics: MetricsConfig | None = None  # [metrics]: the Prometheus endpoint (off when absent)

    def tls_context(self):
        """The TLS client context for nbds:// paths, or None when no path uses TLS."""
        from .nbd.client import client_tls_context

        if not any(u.startswith("nbds://") for a in self.arrays for u in a.paths):
            return None
        return client_tls_context(self.tls_ca, self.tls_certificate, self.tls_key)


def load_host_config(path: str) -> HostConfig:
    """A host shim's config; one ConfigError with the problems of [host] and of every [[array]]."""
    from pathlib import Path

    p = Path(path)
    raw = load_toml(p)
    base = p.parent
    problems = Problems()
    with problems.part():
        _no_extra(raw, {"host", "array", "metrics"}, "config")
    arrays: list[ArrayPaths] = []
    tables: list = []
    with problems.part():
        tables = _take(raw, "array", "config", list)
    for i, a in enumerate(tables):
        with problems.part():
            arrays.append(_parse_array(a, f"array[{i}]"))
    if not arrays and not problems.found:
        problems.found.append("array: at least one [[array]] with paths")
    cfg = None
    with problems.part():
        cfg = _parse_host(_take(raw, "host", "config", dict), base, tuple(arrays), raw)
    try:
        problems.raise_if_any()
    except ConfigError as e:
        raise e.prefixed(str(p)) from None
    assert cfg is not None
    return cfg


def _parse_array(a: object, where: str) -> ArrayPaths:
    if not isinstance(a, dict):
        raise ConfigError(f"{where}: expected a table")
    _no_extra(a, {"name", "paths"}, where)
    paths = _take(a, "paths", where, list)
    if not paths or not all(isinstance(x, str) and x.startswith(("nbd://", "nbds://")) for x in paths):
        raise ConfigError(f"{where}.paths: a list of nbd://HOST:PORT (or nbds://HOST:PORT for TLS) addresses")
    for x in paths:
        parse_addr(x.split("://", 1)[1].split("/")[0], f"{where}.paths")
    return ArrayPaths(check_name(_take(a, "name", where, str), f"{where}.name"), tuple(paths))


def _parse_host(h: dict, base, arrays: tuple[ArrayPaths, ...], raw: dict) -> HostConfig:
    _no_extra(h, {"name", "socket", "admin_socket", "tcp", "source", "poll_interval", "transition_timeout",
                  "no_path_retry", "io_timeout", "stale_write_bound", "path_selector", "tls_ca",
                  "tls_certificate", "tls_key", "tcp_exports", "socket_group"} | NBD_LIMIT_KEYS, "host")

    def path_of(v: str) -> str:
        return v if os.path.isabs(v) else str((base / v).resolve())

    kw = {}
    for k in ("poll_interval", "transition_timeout", "no_path_retry", "io_timeout", "stale_write_bound"):
        d = getattr(HostConfig, k)
        v = _take(h, k, "host", float, d)
        if v <= 0:
            raise ConfigError(f"host.{k}: must be positive, got {v}")
        kw[k] = v
    sel = _take(h, "path_selector", "host", str, "least-queue")
    if sel not in ("least-queue", "round-robin"):
        raise ConfigError(f"host.path_selector: {sel!r} is not least-queue or round-robin")
    kw["path_selector"] = sel
    tcp = _take(h, "tcp", "host", str, None)
    tls = {k: _take(h, k, "host", str, None) for k in ("tls_ca", "tls_certificate", "tls_key")}
    tls = {k: path_of(v) if v else None for k, v in tls.items()}
    if bool(tls["tls_certificate"]) != bool(tls["tls_key"]):
        raise ConfigError("host.tls_certificate and host.tls_key: give both or neither")
    tcp_addr = parse_addr(tcp, "host.tcp") if tcp else None
    if tcp_addr is not None and not _loopback(tcp_addr[0]):
        raise ConfigError(f"host.tcp: {tcp_addr[0]} is not a loopback address: the shim's TCP export has no "
                          "authentication of its own, so it listens on loopback only (127.0.0.1 or ::1)")
    tcp_exports = _take(h, "tcp_exports", "host", list, None)
    if tcp_addr is not None and tcp_exports is None:
        raise ConfigError('host.tcp_exports: missing: list the volumes the TCP export may serve (every local '
                          'user can connect to it), e.g. tcp_exports = ["vv1"], or ["*"] for all of them')
    if tcp_exports is not None:
        if tcp_addr is None:
            raise ConfigError("host.tcp_exports: set, but host.tcp is not")
        for i, v in enumerate(tcp_exports):
            if v != "*":
                check_name(v, f"host.tcp_exports[{i}]")
    group = _take(h, "socket_group", "host", str, None)
    if group is not None:
        import grp

        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"host.socket_group: no group named {group!r}") from None
    cfg = HostConfig(
        name=check_name(_take(h, "name", "host", str), "host.name"),
        socket=path_of(_take(h, "socket", "host", str)),
        admin_socket=path_of(_take(h, "admin_socket", "host", str)),
        arrays=arrays,
        tcp=tcp_addr,
        tcp_exports=tuple(tcp_exports or ()),
        socket_group=group,
        limits=parse_nbd_limits(h, "host"),
        metrics=parse_metrics(raw),
        source=_take(h, "source", "host", str, None),
        **tls,
        **kw,
    )
    uses_tls = any(u.startswith("nbds://") for a in cfg.arrays for u in a.paths)
    if any(tls.values()) and not uses_tls:
        raise ConfigError("host.tls_*: set, but no array path is nbds:// (TLS)")
    try:
        cfg.tls_context()
    except (OSError, ValueError) as e:
        raise ConfigError(f"host.tls: the CA, certificate or key cannot be loaded: {e}") from None
    return cfg


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_unix(path: str, mode: int, group: str | None = None) -> socket.socket:
    """A listening unix socket at ``path`` that never exists with other permissions than
    ``mode``: bound in a private (0700) directory beside it, given its mode and group there,
    then renamed into place."""
    d = os.path.dirname(os.path.abspath(path))
    tmpdir = tempfile.mkdtemp(prefix=".sock-", dir=d)  # 0700
    tmp = os.path.join(tmpdir, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        if group is not None:
            import grp

            os.chown(tmp, -1, grp.getgrnam(group).gr_gid)
        sock.listen(64)
        sock.setblocking(False)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.rmdir(tmpdir)
    return sock


# -- paths and volumes ---------------------------------------------------------------------------

@dataclass(eq=False)
class Path:
    array: str
    uri: str  # nbd://HOST:PORT/EXPORT or nbds://
    state: int | None = None  # ALUA state; None while unreachable
    epoch: int = 0
    client: object = None
    inflight: int = 0
    ios: int = 0
    errors: int = 0
    latency_ms: float = 0.0  # moving average of completed requests
    last_error: str = ""
    kick: trio.Event = field(default_factory=trio.Event)

    def info(self) -> dict:
        return {"array": self.array, "uri": self.uri, "connected": self.client is not None,
                "alua": ALUA_NAMES.get(self.state, "unreachable") if self.state is not None else "unreachable",
                "epoch": self.epoch, "inflight": self.inflight, "ios": self.ios, "errors": self.errors,
                "latency_ms": round(self.latency_ms, 3), "last_error": self.last_error}


class ShimVolume:
    """One volume (one WWN) and all its paths; implements the NBD server's Export protocol."""

    can_flush = can_fua = can_trim = can_zero = True
    can_multi_conn = True
    read_only = False

    def __init__(self, shim: "Shim", name: str, wwn: str, size: int):
        self.shim = shim
        self.name = name
        self.wwn = wwn
        self.size = size
        self.paths: list[Path] = []
        self.max_epoch = 0
        self.changed = trio.Event()
        self.sized = trio.Event()  # set once the size is known (from the first connection)
        if size:
            self.sized.set()
        self.stats = {"reissued": 0, "queued_no_path": 0, "failed": 0, "quarantine_waits": 0,
                      "allocation_as_data": 0}
        # NBD_FLAG_SEND_FAST_ZERO for the shim's clients: set once an array's export offers it.
        self.fast_zero_offered = False
        self._allocation_logged: set[tuple[str, str]] = set()  # (why, path): logged once each
        self.io_stats = IoStats()  # what the host's tools asked (counted by the NBD server; metrics)
        self._rr = 0
        # (start, end, until on the trio clock, epoch of the lost path)
        self.quarantine: list[tuple[int, int, float, int]] = []

    async def _wait_quarantine(self, start: int, end: int) -> None:
        counted = False
        while True:
            now = trio.current_time()
            # An epoch change ends the doubt at once: the array that may hold the old write lost
            # the group, and everything it wrote alone is overwritten when it resyncs.
            self.quarantine = [q for q in self.quarantine if q[2] > now and q[3] >= self.max_epoch]
            until = max((q[2] for q in self.quarantine if q[0] < end and start < q[1]), default=None)
            if until is None:
                return
            if not counted:
                self.stats["quarantine_waits"] += 1
                counted = True
            with trio.move_on_at(until):
                await self.changed.wait()

    @property
    def description(self) -> str:
        return f"syncd volume {self.name} wwn={self.wwn} via host shim {self.shim.cfg.name}"

    def note_change(self) -> None:
        self.max_epoch = max([self.max_epoch] + [p.epoch for p in self.paths if p.state is not None])
        self.changed.set()
        self.changed = trio.Event()

    def usable(self, p: Path) -> bool:
        return p.client is not None and p.state in (ALUA_ACTIVE_OPTIMIZED, ALUA_ACTIVE_NON_OPTIMIZED) \
            and p.epoch >= self.max_epoch

    def pick(self) -> Path | None:
        for want in (ALUA_ACTIVE_OPTIMIZED, ALUA_ACTIVE_NON_OPTIMIZED):
            best = [p for p in self.paths if self.usable(p) and p.state == want]
            if best:
                if self.shim.cfg.path_selector == "round-robin":
                    self._rr += 1
                    return best[self._rr % len(best)]
                return min(best, key=lambda p: p.inflight)
        return None

    def refresh_all(self) -> None:
        for p in self.paths:
            p.kick.set()

    def _give_up(self, why: str, err: int = errno.EIO) -> BlockError:
        """The error the application gets (logged: an administrator wants to know why)."""
        self.stats["failed"] += 1
        log.warning("host %s: %s: %s", self.shim.cfg.name, self.name, why)
        return BlockError(err, f"{self.name}: {why}")

    async def submit(self, op: str, *args):
        cfg = self.shim.cfg
        span = None
        if op in ("write", "trim", "zero"):
            span = (args[0], args[0] + (len(args[1]) if op == "write" else args[1]))
            await self._wait_quarantine(*span)
        no_path_since = None
        transitioning_since = None
        while True:
            p = self.pick()
            now = trio.current_time()
            if p is None:
                if any(q.state == ALUA_TRANSITIONING and q.client is not None for q in self.paths):
                    transitioning_since = transitioning_since or now
                    if now - transitioning_since > cfg.transition_timeout:
                        raise self._give_up(f"paths transitioning for more than {cfg.transition_timeout}s")
                else:
                    if no_path_since is None:
                        no_path_since = now
                        self.stats["queued_no_path"] += 1
                    if now - no_path_since > cfg.no_path_retry:
                        raise self._give_up(f"no usable path for {cfg.no_path_retry}s")
                with trio.move_on_after(0.1):
                    await self.changed.wait()
                continue
            no_path_since = transitioning_since = None
            p.inflight += 1
            t0 = trio.current_time()
            try:
                with trio.fail_after(cfg.io_timeout):
                    result = await getattr(p.client, op)(*args)
                p.ios += 1
                p.latency_ms = 0.9 * p.latency_ms + 0.1 * (trio.current_time() - t0) * 1000
                return result
            except NBDError as e:
                if e.errno == errno.ENOTSUP and op == "zero":
                    # A fast zero the array cannot do: a definitive answer (nothing changed), not a
                    # path failure; the host decides whether to zero slowly.
                    raise BlockError(errno.ENOTSUP, f"{self.name}: {e}") from None
                p.errors += 1
                p.last_error = str(e)
                if e.errno == errno.ESHUTDOWN:  # the array may not serve: re-read every path
                    p.state = ALUA_UNAVAILABLE
                    self.refresh_all()
                    self.note_change()
                elif e.errno == errno.ENOMEM:  # transitioning: retry shortly
                    p.state = ALUA_TRANSITIONING
                    p.kick.set()
                    await trio.sleep(0.05)
                else:
                    raise self._give_up(f"{op} failed on {p.uri}: {e}", e.errno) from None
            except (NBDDisconnected, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
                p.errors += 1
                p.last_error = f"transport: {e or type(e).__name__}"
                self.shim.fail_path(p)
                self.note_change()
                if span is not None:  # the lost array may still apply it: no newer write here
                    self.quarantine.append((span[0], span[1], trio.current_time() + cfg.stale_write_bound, p.epoch))
            finally:
                p.inflight -= 1
            self.stats["reissued"] += 1

    # Export protocol
    async def read(self, offset: int, length: int):
        return await self.submit("read", offset, length)

    async def write(self, offset: int, data, fua: bool) -> None:
        await self.submit("write", offset, bytes(data), fua)

    async def flush(self) -> None:
        await self.submit("flush")

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self.submit("trim", offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool, fast: bool = False) -> None:
        """The host's flags go to the array as given: NO_HOLE keeps the range allocated on both
        replicas, FAST_ZERO is done without writing or answered ENOTSUP (see ``submit``)."""
        await self.submit("zero", offset, length, fua, no_hole, fast)

    @property
    def can_fast_zero(self) -> bool:
        return self.fast_zero_offered

    async def allocation(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation as the array of the path a read would take reports it (its replica's
        holes). Advisory: when no path can answer, or an array's reply breaks the protocol's
        rules, the answer is data for the whole request (always correct), never an error."""
        tried: set[int] = set()
        while True:
            p = self.pick()
            if p is None or id(p) in tried:
                return self._all_data(length, "no usable path", "")
            tried.add(id(p))
            c = p.client
            if getattr(c, "allocation_context", None) is None:
                return self._all_data(length, "the array does not offer base:allocation", p.uri)
            try:
                with trio.fail_after(self.shim.cfg.io_timeout):
                    raw = await c.block_status(offset, length)
            except NBDError as e:
                if e.errno == errno.ESHUTDOWN:  # as for reads: re-read every path, ask the next
                    p.state = ALUA_UNAVAILABLE
                    self.refresh_all()
                    self.note_change()
                    continue
                return self._all_data(length, f"the array answered {errno.errorcode.get(e.errno, e.errno)}", p.uri)
            except (NBDDisconnected, trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
                p.errors += 1
                p.last_error = f"transport: {e or type(e).__name__}"
                self.shim.fail_path(p)
                self.note_change()
                continue
            ext = validate(raw, length) if raw is not None else None
            if ext is None:
                return self._all_data(length, "malformed base:allocation reply", p.uri)
            return ext

    def _all_data(self, length: int, why: str, uri: str) -> list[tuple[int, int]]:
        self.stats["allocation_as_data"] += 1
        if (why, uri) not in self._allocation_logged:
            self._allocation_logged.add((why, uri))
            log.warning("host %s: %s: block status answered as all data (%s%s); logged once", self.shim.cfg.name,
                        self.name, why, f" from {uri}" if uri else "")
        return [(length, DATA)]

    def alua(self, client: ClientIdentity) -> AluaState:
        """What the shim shows its own clients: the state of the path it would use now;
        transitioning while a role change holds every usable path; else unavailable."""
        p = self.pick()
        if p is not None:
            return AluaState(p.state, p.epoch)
        if any(q.state == ALUA_TRANSITIONING and q.client is not None for q in self.paths):
            return AluaState(ALUA_TRANSITIONING, self.max_epoch)
        return AluaState(ALUA_UNAVAILABLE, self.max_epoch)


class Shim:
    def __init__(self, cfg: HostConfig):
        self.cfg = cfg
        self.volumes: dict[str, ShimVolume] = {}
        self._nursery: trio.Nursery | None = None
        self.started = time.time()
        self.tls = cfg.tls_context()
        self.metrics_port: int | None = None

    def exports_for(self, client: ClientIdentity):
        """The unix socket (its permissions decide who connects) serves every volume; the TCP
        export, which any local user reaches, only those of ``tcp_exports``."""
        if not client.address:
            return self.volumes
        allowed = self.cfg.tcp_exports
        if "*" in allowed:
            return self.volumes
        return {n: v for n, v in self.volumes.items() if n in allowed}

    def fail_path(self, p: Path) -> None:
        c, p.client = p.client, None
        p.state = None
        p.kick.set()
        if c is not None:
            c.abort_on_close()  # the manager task notices and reconnects

    async def discover(self) -> None:
        """List every path's exports; group paths by WWN. Arrays that do not answer now are
        retried by the path managers (their paths join once discovered)."""
        for a in self.cfg.arrays:
            for base in a.paths:
                try:
                    exports = await list_exports(base, source=self.cfg.source, tls=self.tls)
                except (OSError, NBDDisconnected, NBDError, trio.TooSlowError) as e:
                    log.warning("host %s: %s unreachable at start: %s", self.cfg.name, base, e)
                    continue
                for name, desc in exports:
                    m, v = _WWN.search(desc), _VOL.match(desc)
                    if not m:
                        continue
                    wwn = m.group(1)
                    vol = next((x for x in self.volumes.values() if x.wwn == wwn), None)
                    if vol is None:
                        vol = ShimVolume(self, v.group(1) if v else name, wwn, 0)
                        self.volumes[vol.name] = vol
                    uri = base.rstrip("/") + "/" + name
                    if not any(p.uri == uri for p in vol.paths):
                        vol.paths.append(Path(a.name, uri))

    async def _manage(self, vol: ShimVolume, p: Path) -> None:
        """Keep one path connected and its ALUA state fresh."""
        while True:
            try:
                async with open_nbd(p.uri, source=self.cfg.source, tls=self.tls, structured=True) as c, \
                        open_alua_probe(p.uri, source=self.cfg.source, tls=self.tls) as probe:
                    if not vol.size:
                        vol.size = c.size
                        if vol.size:
                            vol.sized.set()
                    if c.flags & TFLAG_SEND_FAST_ZERO:
                        vol.fast_zero_offered = True
                    p.client = c
                    p.last_error = ""
                    while not c.closed and p.client is c:
                        with trio.fail_after(max(self.cfg.poll_interval * 3, 2.0)):
                            st, ep = await probe.query()
                        if (st, ep) != (p.state, p.epoch):
                            log.info("host %s: %s %s: %s epoch %d", self.cfg.name, vol.name, p.uri,
                                     ALUA_NAMES.get(st, st), ep)
                        p.state, p.epoch = st, ep
                        vol.note_change()
                        with trio.move_on_after(self.cfg.poll_interval):
                            await p.kick.wait()
                        p.kick = trio.Event()
            except (OSError, NBDDisconnected, NBDError, trio.TooSlowError, trio.BrokenResourceError,
                    trio.ClosedResourceError) as e:
                p.last_error = f"{type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - a path manager must outlive anything a path does
                log.exception("host %s: %s %s: unexpected error, reconnecting", self.cfg.name, vol.name, p.uri)
                p.last_error = f"{type(e).__name__}: {e}"
            if p.client is not None:
                p.client = None
            p.state = None
            vol.note_change()
            await trio.sleep(0.5)

    def status(self) -> dict:
        return {"host": self.cfg.name, "socket": self.cfg.socket, "uptime_s": round(time.time() - self.started, 1),
                "volumes": [{"name": v.name, "wwn": v.wwn, "size": v.size, "max_epoch": v.max_epoch,
                             "alua": ALUA_NAMES.get(v.alua(ClientIdentity("")).state),
                             "stats": v.stats, "paths": [p.info() for p in v.paths]}
                            for v in self.volumes.values()]}

    async def _admin(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.receive_some(4096)
                await stream.send_all(json.dumps({"ok": True, "result": self.status()}).encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .nbd.server import NBDServer

        await self.discover()
        if not self.volumes:
            raise ConfigError(f"host {self.cfg.name}: no array exports any volume to this host")
        async with trio.open_nursery() as n:
            self._nursery = n
            for v in self.volumes.values():
                for p in v.paths:
                    n.start_soon(self._manage, v, p)
            with trio.move_on_after(5):  # the size comes with the first connection
                for v in self.volumes.values():
                    await v.sized.wait()
            server = NBDServer(self, limits=self.cfg.limits)
            lsock = bind_unix(self.cfg.socket, 0o660 if self.cfg.socket_group else 0o600, self.cfg.socket_group)
            n.start_soon(server.serve_listener, lsock)
            if self.cfg.tcp:
                missing = [v for v in self.cfg.tcp_exports if v != "*" and v not in self.volumes]
                if missing:
                    log.warning("host %s: host.tcp_exports names %s, which no array exports to this host",
                                self.cfg.name, ", ".join(missing))
                await n.start(server.serve_tcp, *self.cfg.tcp)
            sock = trio.socket.from_stdlib_socket(bind_unix(self.cfg.admin_socket, 0o600))
            n.start_soon(trio.serve_listeners, self._admin, [trio.SocketListener(sock)])
            if self.cfg.metrics is not None:
                from .metrics.expose import Endpoint
                from .metrics.host import collect_host

                ep = Endpoint(self.cfg.metrics, lambda fam: collect_host(self, fam))
                self.metrics_port = await n.start(ep.serve, ep.listen())
                log.info("host shim %s: metrics on http://%s:%d/metrics", self.cfg.name, self.cfg.metrics.listen[0],
                         self.metrics_port)
            log.info("host shim %s ready: %s (%s)", self.cfg.name, self.cfg.socket,
                     ", ".join(f"{v.name}: {len(v.paths)} paths" for v in self.volumes.values()))
            task_status.started()


def host_status(admin_socket: str) -> dict:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(admin_socket)
    s.sendall(b'{"cmd": "status"}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(1 << 20)
        if not d:
            break
        buf += d
    s.close()
    return json.loads(buf)["result"]


def serve_host(cfg: HostConfig) -> int:
    from .daemon import run_until_signal

    return run_until_signal(lambda: Shim(cfg), f"host shim {cfg.name}", (ConfigError,),
                            summary=lambda shim: f"host shim {cfg.name}: {len(shim.volumes)} volumes, "
                                                 f"{sum(len(v.paths) for v in shim.volumes.values())} paths")
