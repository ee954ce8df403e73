"""The quorum witness daemon: authenticates arrays, decides, and persists before it answers."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import netio, secure
from ..config import (
    SECURITY_KEYS,
    ConfigError,
    MetricsConfig,
    check_name,
    load_toml,
    parse_addr,
    parse_metrics,
    parse_security,
)
from ..files import atomic_write, lock_dir
from . import proto as w
from .decide import (
    Decision,
    GroupRecord,
    Timing,
    WitnessError,
    claim,
    fresh,
    handover,
    keep,
    report,
    resolve,
)
from .session import Session, establish

log = logging.getLogger("syncd.witness")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Limits:
    """What the listener lets peers hold (every one a [witness] key)."""

    max_connections: int = 256  # connections at once, authenticated or not
    max_connections_per_address: int = 8  # ... from one source address (an array needs one)
    handshake_timeout: float = 10.0  # s for a new connection to finish authenticating
    idle_timeout: float = 60.0  # s an authenticated session may send nothing (arrays report every 0.5 s)


@dataclass(frozen=True)
class WitnessConfig:
    name: str
    listen: tuple[tuple[str, int], ...]
    state_dir: str
    security: secure.Security
    nodes: tuple[str, ...]
    timing: Timing
    limits: Limits = Limits()
    metrics: MetricsConfig | None = None


def load_witness_config(path: str) -> WitnessConfig:
    p = Path(path)
    raw = load_toml(p)
    try:
        wt = raw.get("witness")
        if not isinstance(wt, dict):
            raise ConfigError("[witness] section missing")
        extra = set(raw) - {"witness", "metrics"}
        if extra:
            raise ConfigError(f"config: unknown section(s) {', '.join(sorted(extra))}")
        metrics = parse_metrics(raw)
        extra = set(wt) - {"name", "listen", "state_dir", "nodes", "owner_lease", "drift", "margin", "grace",
                           *SECURITY_KEYS, *Limits.__dataclass_fields__}
        if extra:
            raise ConfigError(f"witness: unknown key(s) {', '.join(sorted(extra))}")
        name = check_name(wt.get("name", "W"), "witness.name")
        listen = tuple(parse_addr(a, f"witness.listen[{i}]") for i, a in enumerate(wt.get("listen", ["0.0.0.0:7400"])))
        if "state_dir" not in wt:
            raise ConfigError("witness.state_dir: missing")
        state_dir = str((p.parent / wt["state_dir"]).resolve())
        security = parse_security(wt, "witness", p.parent)
        nodes = wt.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise ConfigError("witness.nodes: list the array names admitted, e.g. [\"A\", \"B\"]")
        nodes = tuple(check_name(n, "witness.nodes") for n in nodes)
        d = Timing()
        kw = {}
        for k in ("owner_lease", "drift", "margin", "grace"):
            v = wt.get(k, getattr(d, k))
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"witness.{k}: expected a non-negative number, got {v!r}")
            kw[k] = float(v)
        if kw["drift"] >= 0.5:
            # Clocks off by half their rate are broken clocks; from 1 on no request would ever be
            # fresh enough to take (decide.Timing.fresh_within).
            raise ConfigError(f"witness.drift: expected a fraction below 0.5 (0.05 is 5 %), got {kw['drift']!r}")
        dl = Limits()
        lk: dict = {}
        for k in ("max_connections", "max_connections_per_address"):
            v = wt.get(k, getattr(dl, k))
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"witness.{k}: expected a positive whole number, got {v!r}")
            lk[k] = v
        for k in ("handshake_timeout", "idle_timeout"):
            v = wt.get(k, getattr(dl, k))
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"witness.{k}: expected a positive number of seconds, got {v!r}")
            lk[k] = float(v)
        if lk["max_connections_per_address"] > lk["max_connections"]:
            raise ConfigError("witness.max_connections_per_address: larger than witness.max_connections")
        return WitnessConfig(name, listen, state_dir, security, nodes, Timing(**kw), Limits(**lk), metrics)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


class WarnLimiter:
    """Warnings about refused peers, at most ``burst`` per ``period`` seconds: a flood of bad
    connections must not flood the log. What was held back is counted in the next one."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst = burst
        self.period = period
        self.window_start = -float("inf")
        self.count = 0
        self.suppressed = 0

    def warn(self, msg: str, *args: object) -> None:
        now = trio.current_time()
        if now - self.window_start >= self.period:
            self.window_start, self.count = now, 0
        if self.count >= self.burst:
            self.suppressed += 1
            return
        self.count += 1
        if self.suppressed:
            msg += " (%d similar warnings suppressed)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        log.warning(msg, *args)


class WitnessState:
    """Group records on disk: atomic replace + fsync; a record is saved before it is answered."""

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.path = os.path.join(state_dir, "witness.json")
        self._lock = lock_dir(state_dir)
        if self._lock is None:
            raise ConfigError(f"witness state directory {state_dir} is in use by another witness")
        self.groups: dict[str, GroupRecord] = {}
        if os.path.exists(self.path):
            try:
                d = json.loads(Path(self.path).read_text())
                if d.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format version {d.get('version')}, expected {FORMAT_VERSION}")
                self.groups = {k: GroupRecord.restore(v) for k, v in d["groups"].items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{self.path} cannot be trusted ({e}); refusing to start") from None

    def save(self) -> None:
        data = json.dumps({"version": FORMAT_VERSION, "saved": time.time(),
                           "groups": {k: g.persistent() for k, g in self.groups.items()}}, indent=1)
        atomic_write(self.path, data.encode())


class Witness:
    def __init__(self, cfg: WitnessConfig):
        self.cfg = cfg
        self.state = WitnessState(cfg.state_dir)
        self.ports: list[int] = []
        self.per_address: dict[str, int] = {}  # open connections by source address
        self.connections = 0
        self.refusals = WarnLimiter()
        self.admitted = frozenset(cfg.nodes)
        # Counted for the metrics endpoint (syncd/metrics/witness.py).
        self.sessions: dict[str, int] = {}  # authenticated sessions open, by array
        self.decisions: dict[tuple[str, str, str], int] = {}  # (group, request, outcome) -> count
        self.refused_handshakes = 0  # peers that failed the security handshake
        self.refused_connections = 0  # connections closed at once (max_connections reached)
        self.metrics_port: int | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        socks = [netio.listen_tcp(a) for a in self.cfg.listen]
        self.ports = [s.getsockname()[1] for s in socks]
        ep = None
        if self.cfg.metrics is not None:
            from ..metrics.expose import Endpoint
            from ..metrics.witness import collect_witness

            ep = Endpoint(self.cfg.metrics, lambda fam: collect_witness(self, fam))
            msock = ep.listen()
        async with trio.open_nursery() as n:
            for s in socks:
                n.start_soon(self._accept_loop, s, n)
            if ep is not None:
                self.metrics_port = await n.start(ep.serve, msock)
                log.info("witness %s: metrics on http://%s:%d/metrics", self.cfg.name, self.cfg.metrics.listen[0],
                         self.metrics_port)
            log.info("witness %s listening on %s (%s)", self.cfg.name, self.ports, self.cfg.security.describe())
            task_status.started(self.ports)

    async def _accept_loop(self, lsock, nursery) -> None:
        lim = self.cfg.limits
        while True:
            sock, addr = await netio.accept(lsock)
            host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            from_host = self.per_address.get(host, 0)
            if self.connections >= lim.max_connections or from_host >= lim.max_connections_per_address:
                # Refused before reading a byte: neither authenticated nor not, and nothing changes.
                self.refused_connections += 1
                self.refusals.warn("witness: connection from %s refused: %d connections open (%d from that address)",
                                   host, self.connections, from_host)
                netio.abort(sock)
                continue
            self.connections += 1
            self.per_address[host] = self.per_address.get(host, 0) + 1
            nursery.start_soon(self._conn, sock, addr, host)

    async def _conn(self, sock, addr, host: str) -> None:
        node = None
        try:
            sess = await self._authenticate(sock, host)
            if sess is None:
                return
            node = sess.peer
            self.sessions[node] = self.sessions.get(node, 0) + 1
            log.info("witness: %s connected from %s", node, host)
            idle = self.cfg.limits.idle_timeout
            answered: float | None = None  # when this session's last answer was ready (decided, saved)
            unflagged = False  # a request without FRESH was seen (logged once per session)
            while True:
                f = None
                with trio.move_on_after(idle):
                    f = await sess.next_frame()
                if f is None:
                    log.info("witness: %s (%s) closed: idle for %g s", node, host, idle)
                    with trio.move_on_after(1.0):
                        await sess.send(w.encode(w.WType.GOODBYE, reason=f"idle for {idle:g} s"))
                    return
                now = trio.current_time()
                request = f.type in w.REQUEST_TYPES
                checked = request and bool(f.req_id & w.FRESH)
                if request and not checked and not unflagged:
                    unflagged = True
                    log.warning("witness: %s (%s) does not ask for its requests to be refused when heard late "
                                "(a syncd before it did): such a request is taken as if on time", node, host)
                if checked and not fresh(self.cfg.timing, now, answered):
                    out = self._stale(node, f, now, answered)
                else:
                    out = self._handle(node, f)
                # Stamped once decided (its record saved), before it is sent: the client sends its
                # next request only after it heard this answer, and the time spent deciding does
                # not count against that request.
                answered = trio.current_time()
                with trio.fail_after(idle):  # an array that does not read its answers is dropped
                    await sess.send(out)
        except secure.AuthError as e:
            # An authenticated session whose records stopped verifying: someone in the path.
            self.refusals.warn("witness: session of %s from %s closed: %s", node, host, e)
            self._send_refusal(sock)
        except (w.WitnessProtocolError, OSError, EOFError, trio.TooSlowError) as e:
            if not isinstance(e, EOFError):
                log.info("witness: connection from %s (%s) closed: %s", host, node or "?", e)
        finally:
            if node is not None:
                self.sessions[node] -= 1
            self.connections -= 1
            left = self.per_address[host] - 1
            if left:
                self.per_address[host] = left
            else:
                del self.per_address[host]
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _authenticate(self, sock, host: str) -> Session | None:
        """The session, once the peer proved it is one of ``nodes``; None when it did not
        (REFUSAL sent, a warning logged): nothing it sent was looked at beyond the handshake."""
        hs = secure.Handshake(self.cfg.security, secure.Role.LISTENER, self.cfg.name, self.admitted)
        try:
            return await establish(sock, hs, self.cfg.limits.handshake_timeout)
        except secure.AuthError as e:  # REFUSAL sent (a handshake out of time included)
            self.refused_handshakes += 1
            claims = f" (claims {hs.peer_name!r})" if hs.peer_name else ""
            self.refusals.warn("witness: refused %s: %s%s", host, e, claims)
            return None
        except OSError:
            return None

    @staticmethod
    def _send_refusal(sock) -> None:
        try:
            sock.send(secure.REFUSAL)  # best effort, never waits: the peer may not be reading
        except OSError:
            pass

    def _handle(self, node: str, f: w.WFrame) -> bytes:
        out = self._decide(node, f)
        self._count(f, "error" if out[1] is None else "granted" if out[1].granted else "refused")
        return out[0]

    def _count(self, f: w.WFrame, outcome: str) -> None:
        """One answer, for the metrics endpoint. Counted by group only for groups the witness
        holds: an array cannot add label values by naming groups that do not exist."""
        group = f.group if getattr(f, "group", None) in self.state.groups else ""
        key = (group, str(getattr(f.type, "name", f.type)).lower(), outcome)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def _stale(self, node: str, f: w.WFrame, now: float, answered: float | None) -> bytes:
        """A request heard too long after the answer before it (or first on its session): it
        may have been sent before its client gave it up, so it changes nothing, and the answer
        (STALE) lets the client ask again at once (docs/failover-plan.md rule 4)."""
        why = ("first request of the session" if answered is None
               else f"heard {now - answered:.3f} s after the answer before it")
        self._count(f, "stale")
        # Debug only: a request after an idle pause (an array reporting less often than every
        # FRESH_FOR) is refused so in the normal course; the client warns when its retry, sent
        # at once, is refused too (a network that delays requests that long).
        log.debug("witness: %s's %s of %s not taken: %s", node, f.type.name, f.group, why)
        return w.encode(w.WType.STALE, f.req_id, reason=why)

    def _decide(self, node: str, f: w.WFrame) -> tuple[bytes, Decision | None]:
        t = f.type
        st = self.state
        now = trio.current_time()
        try:
            if t == w.WType.REGISTER:
                members = (f.member1, f.member2)
                if node not in members or f.owner not in members or f.member1 == f.member2:
                    raise WitnessError(f"bad registration of {f.group}: members {members}, owner {f.owner}")
                rec = st.groups.get(f.group)
                if rec is None:
                    rec = GroupRecord(f.group, members, f.owner, f.epoch, last_decision=f"registered by {node}")
                    st.groups[f.group] = rec
                    st.save()
                d = Decision(True, rec.owner, rec.epoch, rec.last_decision)
            elif t in (w.WType.REPORT, w.WType.CLAIM, w.WType.KEEP, w.WType.HANDOVER, w.WType.RESOLVE):
                rec = st.groups.get(f.group)
                if rec is None:
                    raise WitnessError(f"unknown group {f.group!r}: register it first")
                before = rec.persistent()
                if t == w.WType.REPORT:
                    d = report(rec, self.cfg.timing, now, node, f.epoch,
                               peer_alive=bool(f.flags & w.REPORT_PEER_ALIVE),
                               peer_in_sync=bool(f.flags & w.REPORT_PEER_IN_SYNC),
                               lost_anew=bool(f.flags & w.REPORT_LOST_ANEW))
                elif t == w.WType.CLAIM:
                    d = claim(rec, self.cfg.timing, now, node, f.epoch)
                elif t == w.WType.KEEP:
                    d = keep(rec, self.cfg.timing, now, node, f.epoch)
                elif t == w.WType.HANDOVER:
                    d = handover(rec, self.cfg.timing, now, node, f.epoch)
                else:
                    d = resolve(rec, self.cfg.timing, now, node, f.epoch)
                if rec.persistent() != before:
                    st.save()  # durable before anyone hears of it
                    log.info("witness: group %s: %s", rec.name, rec.last_decision)
            else:
                raise WitnessError(f"{t.name} is not a request")
        except WitnessError as e:
            return w.encode(w.WType.ERROR, f.req_id, reason=str(e)), None
        return (w.encode(w.WType.DECISION, f.req_id, granted=d.granted, owner=d.owner, epoch=d.epoch, reason=d.reason),
                d)


def serve_witness(cfg: WitnessConfig) -> int:
    from ..daemon import run_until_signal

    return run_until_signal(lambda: Witness(cfg), f"witness {cfg.name}", (ConfigError,),
                            summary=lambda wt: f"witness {cfg.name}: arrays {', '.join(cfg.nodes)}, "
                                               f"{len(wt.state.groups)} groups")
