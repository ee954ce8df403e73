"""Two arrays' role machines and the quorum witness, driven in virtual time.

A deterministic discrete-event simulator of the I/O shell around ``syncd.node.roles`` (one
replication group on arrays A and B) and ``syncd.witness.decide`` (the witness W): message
delays and loss, partitions of the A-B, A-W and B-W links, per-node clocks that drift within
the configured bound, crashes and restarts. It does with each action exactly what the daemon
does (see ``Sim._act``) and nothing cleverer, and checks the machines' promises after every
event it delivers (``Sim.check``). No Trio, no sleeps, no wall clock: a run is a function of
its configuration, its random source and the calls made on it.

Data is modelled as the set of writes each array holds on disk (each write its own block, so a
"version" per block): a write acknowledged while mirroring is on both arrays, one acknowledged
alone only on its array; at any instant an array serves, a read there must see every write
acknowledged before. A write an array applies is volatile there (page cache, the disk's write
cache) until a flush begun after it ends (``FlushVolumes`` then ``Flushed``; a primary's
acknowledgement of a mirrored write while its peer lacks regions, or alone after its mirror
failed, which the data path makes durable first) or the kernel wrote it back (``writeback``
seconds later). A power cut takes from an array's disk its volatile writes that its peer also
holds (a write only one array holds is not modelled as lost: that would be a loss no design can
mend), and what the array then copies to its peer overwrites the peer's newer copy of them (the
regions it was writing are copied unless it fetches them back); every crash is an unclean stop,
a ``stop`` a clean one. A primary acknowledges nothing alone while its writes are being made
durable (``flush_pending``), as the data path waits for ``Flushed``. A primary restarted with
``peer_newer`` fetches back from its peer what it lacks when it resynchronizes it (``_pull``,
after RESYNC_BEGIN), and until then reads the peer (``Sim.readable``)."""

from __future__ import annotations

import copy
import heapq
import inspect
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, NoReturn

from syncd.node import roles as r
from syncd.witness import decide as d
from syncd.witness import etcd_backend as eb

if TYPE_CHECKING:
    from syncd.witness.etcd_node import EtcdWitnessConfig

A, B, W = "A", "B", "W"
AB, AW, BW = "A-B", "A-W", "B-W"
LINKS = (AB, AW, BW)
GROUP = "g"
TRACE = 80  # events shown with a violation
RESYNC_SENDS_DURABLE = True  # the data path's rule (a test takes it away to see the model find it)
RESYNC_FLUSHES_PEER = True  # the data path's rule: the copy is durable at the peer before the pair is in sync


Answer = tuple[object, ...]


class Violation(AssertionError):
    """A promise of the role machine (or the witness) does not hold in this schedule:
    ``promise`` names it (see ``Sim.check``)."""

    def __init__(self, promise: str, msg: str) -> None:
        super().__init__(f"({promise}) {msg}")
        self.promise = promise


# The daemon tells a power cut from a kill -9 by the machine's boot id (False: every unclean
# stop counts as a power cut, as before it did).
BOOT_ID = True

# -- configuration -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SimConfig:
    # The arrays' timing; None: roles.py's defaults (made when the Sim is, from the roles module
    # the simulator uses then, so that a scratch copy of roles.py gets its own defaults).
    timing: r.Timing | None = None
    witness: d.Timing | None = d.Timing()
    drift: float = 0.05  # every clock runs at a rate within [1 - drift, 1 + drift]
    path_timeout: float = 1.5  # each side notices a dead link within this (independently)
    reset_notice: float = 0.2  # the other side of a link reset notices within this
    reconnect: tuple[float, float] = (0.1, 1.0)  # a new link session after this long
    io_timeout: float = 2.0  # a mirrored or forwarded write unanswered this long fails
    witness_timeout: float = 1.0  # a witness request unanswered this long: unreachable
    copy_time: float = 1.5  # a resync copies for up to this long
    # An unflushed write is on the disk this long after it was applied (the kernel's default
    # dirty_expire is 30 s; 5 s is enough for the schedules to find what it takes).
    writeback: float = 5.0
    max_delay: float = 0.05  # default one-way delay bound of every link
    poll: float = 0.05  # how often the shell ticks if next_timer() stays due after all (see _future_timer)
    # Where the witness is kept: "builtin" (``decide.py`` in a process of its own) or "etcd"
    # (``etcd_backend``'s rules on a model of etcd: ``EtcdModel``, ``Sim._e_send``).
    witness_backend: str = "builtin"
    # The clients send a report right before each CLAIM (REPORT_LOST_ANEW); False: they claim at
    # once, as before (written-out schedules that time a claim to the moment use it).
    report_before_claim: bool = True
    etcd_election: float = 1.0  # s: etcd's election timeout (a leader change extends every lease by it)
    etcd_expiry_lag: float = 1.0  # s from a lease's expiry to its key's removal (at most EXPIRY_LAG)


# -- clocks ------------------------------------------------------------------------------------

class Clock:
    """A node's monotonic clock: piecewise linear in real time, rate within the bound. It keeps
    running while the node's process is down (CLOCK_MONOTONIC counts from boot)."""

    __slots__ = ("rate", "base_real", "base_local")

    def __init__(self, rate: float, offset: float) -> None:
        self.rate = rate
        self.base_real = 0.0
        self.base_local = offset

    def local(self, real: float) -> float:
        return self.base_local + self.rate * (real - self.base_real)

    def real_at(self, local: float) -> float:
        """The first real time at which this clock reads ``local`` or more."""
        t = self.base_real + (local - self.base_local) / self.rate
        while self.local(t) < local:
            t = math.nextafter(t, math.inf)
        return t

    def set_rate(self, real: float, rate: float) -> None:
        self.base_local = self.local(real)
        self.base_real = real
        self.rate = rate


# -- nodes -------------------------------------------------------------------------------------

@dataclass
class Pending:
    """A request this array's shell waits on."""
    kind: str
    sent: float  # local time it went out
    data: Answer = ()


@dataclass
class Disk:
    """What survives a crash: the persisted fields and the data."""
    role: r.Role
    epoch: int
    started: bool = True
    failsafe: bool = False
    witness_behind: bool = False
    peer_has_all: bool = False
    peer_newer: bool = False
    data: set[int] = field(default_factory=set)
    added: dict[int, float] = field(default_factory=dict)  # volatile host write -> real time it got here
    cut_lost: set[int] = field(default_factory=set)  # what power cuts took that the peer still holds
    cut_at: float = -math.inf  # real time of the last power cut


def persisted(s: r.RoleState) -> tuple[r.Role, int, bool, bool, bool, bool, bool]:
    # getattr: roles.py before it persisted these
    has_all = r.persisted_has_all(s) if hasattr(r, "persisted_has_all") else getattr(s, "peer_has_all", False)
    return (s.role, s.epoch, s.started, s.failsafe, s.witness_behind, has_all, getattr(s, "peer_newer", False))


class Array:
    def __init__(self, name: str, peer: str, disk: Disk, clock: Clock) -> None:
        self.name = name
        self.peer = peer
        self.disk = disk
        self.clock = clock
        self.alive = False
        self.roles: r.GroupRoles | None = None
        self.inc = 0  # incarnation: events of an older process are dropped
        self.session: int | None = None  # the link session this side believes up
        self.pending: dict[int, Pending] = {}
        # Writes waiting for the fence: (write, applied here already, reply to the forwarding peer).
        self.held: list[tuple[int, bool, Reply | None]] = []
        # Writes to acknowledge alone once the flush ends (``flush_pending``): (write, reply, applied
        # here while mirroring).
        self.flush_wait: list[tuple[int, Reply | None, bool]] = []
        self.last_tick = -math.inf  # local time of the last Tick (a timer not after it is stale)
        self.unconfirmed = False  # restarted, and nothing has confirmed its role since
        self.clean = True  # its last stop was clean (the first start counts as one)
        self.caches_lost = False  # its last stop was a power cut (a new boot of its machine)
        self.started_at = -math.inf  # local time of the last restart
        self.epoch_seen = disk.epoch  # the highest epoch this array ever held (memory or disk)
        self.switching = False  # a switchover this array started is under way
        # Witness client: the newest answer's stamp (witness time) heard on its connection, which
        # its next request echoes (the real witness knows it: its last answer on the session).
        self.w_echo: float | None = None
        # Witness client: one TCP connection. A request unanswered within witness_timeout drops it,
        # and a new one needs the witness's challenge to get through (both directions work).
        self.w_conn = False
        # What TCP keeps on that connection: frames arrive in the order they were sent, and once
        # one is lost in a direction nothing after it gets through (``Sim._w_carry``).
        self.w_conn_id = 0
        # Requests waiting for their turn (kind, epoch), and the one on the connection now.
        self.w_queue: deque[tuple[str, int]] = deque()
        self.w_busy: int | None = None
        # etcd client (``EtcdWitness``), one per process: the lease its key is on, when its grant
        # was asked, the key's mod_revision as it last left it, and whether nothing of it is on
        # record under its current lease (``_fresh``).
        self.e_lease = 0
        self.e_lease_sent = -math.inf
        self.e_alive_rev = 0
        self.e_fresh = True
        # The other array's key as this client saw it at its reads (``EtcdWitness._observe``,
        # local times); and the record as its last request left it, if it owns the group: (the
        # record's revision, epoch, peer in sync) (``EtcdWitness._owned``).
        self.e_moves: dict[str, eb.Motion] = {}
        self.e_owned: tuple[int, int, bool] | None = None
        # Link sessions this process has seen, at its last report sent and at the last one the
        # witness answered (``Node._report_flags``: REPORT_LOST_ANEW).
        self.episode = 0
        self.episode_sent = 0
        self.episode_reported = -1
        self.timer_state: r.RoleState | None = None  # next_timer() cache: the state it is for,
        self.timer_tick = -math.inf  # the last Tick then,
        self.timer = math.inf  # and when the shell ticks next (local)

    @property
    def m(self) -> r.GroupRoles:
        assert self.roles is not None, f"{self.name} is down"
        return self.roles

    @property
    def s(self) -> r.RoleState:
        return self.m.state


class Witness:
    def __init__(self, rec: d.GroupRecord, clock: Clock) -> None:
        self.disk = rec.persistent()
        self.rec: d.GroupRecord | None = rec
        self.clock = clock
        self.inc = 0
        self.epoch_seen = rec.epoch

    @property
    def alive(self) -> bool:
        return self.rec is not None


class EtcdModel:
    """The witness kept in etcd (``SimConfig.witness_backend = "etcd"``), as seen through
    ``etcd_backend``: the group's record, each array's key ``P/alive/NODE`` on one of its
    leases, and the leases, each with its TTL and its expiry on W's clock (etcd's leader's).

    A lease's key is removed ``lag`` after its expiry (etcd's leader checks for expired leases,
    then commits the revocation; ``EXPIRY_LAG`` bounds it). A leader change (and the quorum
    coming back after it was lost) gives every lease not yet revoked the expiry now + election
    timeout + TTL (``lessor.Promote``); while there is no quorum nothing is processed and
    nothing is revoked (``lessor.Demote``), and a write that arrives may be logged and then
    committed when the quorum is back (``held``). Revocations are worked out when they matter
    (``gc``): before every request processed, at a leader change, at a loss of quorum."""

    def __init__(self, rec: eb.Record, election: float, lag: float) -> None:
        self.rec = rec
        self.election = election
        self.lag = lag
        self.up = True  # etcd has a quorum
        self.rev = 1  # etcd's revision (the keys' mod_revision)
        self.next_id = 0
        self.leases: dict[int, list[float]] = {}  # id -> [expiry (W's clock), TTL]
        self.keys: dict[str, tuple[int, int]] = {}  # node -> (lease, mod_revision)
        self.rec_rev = 1  # the record's mod_revision
        # Writes the leader logged while it had no quorum, committed in order when it is back.
        self.held: list[tuple[str, Callable[[], Answer | None]]] = []

    def gc(self, now: float) -> None:
        if not self.up:
            return
        gone = [lid for lid, (exp, _) in self.leases.items() if now >= exp + self.lag]
        for lid in gone:
            del self.leases[lid]
        if gone:
            for node, (lid, _) in list(self.keys.items()):
                if lid not in self.leases:
                    del self.keys[node]
                    self.rev += 1

    def grant(self, now: float, ttl: int) -> int:
        self.next_id += 1
        self.leases[self.next_id] = [now + ttl, ttl]
        return self.next_id

    def key_rev(self, node: str) -> int:
        k = self.keys.get(node)
        return 0 if k is None else k[1]

    def promote(self, now: float) -> None:
        for lv in self.leases.values():
            lv[0] = now + self.election + lv[1]

    def __repr__(self) -> str:
        return (f"etcd({'up' if self.up else 'no quorum'}; keys {self.keys}; leases "
                f"{ {k: (round(v[0], 3), v[1]) for k, v in self.leases.items()} }; {self.rec})")


@dataclass
class EReq:
    """One request of an array's etcd client (``EtcdWitnessClient``): a report or a decision
    (the record and the keys read, the rule applied, the record written if it changed: two
    calls, ``Sim._e_decision``); after a report, the array's sign of life
    (``EtcdWitness.renew``): a lease grant (if the array's lease is ``renew`` old) and the
    compare-and-set moving the key onto it, which also requires the record to be as the
    array's last request left it (retried on a changed key)."""
    rid: int
    kind: str
    epoch: int
    flags: tuple[bool, bool, bool]
    sent: float  # local time the request began
    leg: int = 0  # the call under way (each has its own deadline, as each etcd call has)
    leg_sent: float = 0.0  # local time the call under way was sent
    done: bool = False
    lease: int = 0
    lease_sent: float = 0.0  # local time the grant was asked
    tries: int = 0  # the sign of life's moves of the key tried (``RETRIES``)
    races: int = 0  # the decision's compare-and-sets lost to a changed record (``RETRIES``)
    dec: d.Decision | None = None  # a report's decision, fed once the sign of life is done


# -- the simulator -----------------------------------------------------------------------------

Callback = Callable[[], None]
Reply = Callable[[Answer], None]
# The events the shell must always be able to deliver: the table refusing one is a gap (by name,
# so that a scratch copy of roles.py with a line removed can stand in for it: see the tests).
CORE_EVENTS = frozenset({"Tick", "LinkUp", "LinkDown", "PeerLost", "PeerState", "LeaseRequested", "LeaseReply",
                         "LeaseFailed", "WitnessReport", "WitnessAnswer", "ResyncBegun", "ResyncDone",
                         "ResyncEnded", "PeerSwitchoverAbort", "SwitchoverEnd"})


class Sim:
    """Arrays A (the first primary) and B, witness W (unless ``cfg.witness`` is None)."""

    def __init__(self, cfg: SimConfig, rng: random.Random, rates: dict[str, float] | None = None,
                 offsets: dict[str, float] | None = None) -> None:
        self.cfg = cfg
        self.etcd: EtcdModel | None = None
        if cfg.witness_backend == "etcd":
            assert cfg.witness is not None, "the etcd backend is a witness"
            heard_for = self.etcd_config().owner_heard_for()
            self.timing = cfg.timing or r.Timing(witness=r.WitnessTiming(owner_heard_for=heard_for))
        else:
            self.timing = cfg.timing or r.Timing(witness=r.WitnessTiming() if cfg.witness is not None else None)
        # What the roles.py and decide.py in use take (they changed under this simulator):
        self.timer_takes_now = len(inspect.signature(r.next_timer).parameters) == 3
        # The witness refuses a request heard late after the answer it echoes (STALE; the
        # client asks again at once).
        self.witness_checks_fresh = hasattr(d, "fresh")
        # A report says whether the link came up since the last answered one (REPORT_LOST_ANEW),
        # and the clients report before they claim.
        self.report_takes_anew = "lost_anew" in inspect.signature(d.report).parameters
        self.claims_after_a_report = self.report_takes_anew and cfg.report_before_claim
        self.end_takes_doubt = "in_doubt" in r.SwitchoverEnd.__dataclass_fields__
        self.state_says_claiming = "claiming" in r.PeerState.__dataclass_fields__
        self.rng = rng
        # Frames modelled after the written-out schedules were (``adopt_gen``) draw their delays
        # and losses from a stream of their own, seeded without drawing from ``rng``: the
        # schedules' own delays stay as they were written against.
        self.later_rng = random.Random(repr(rng.getstate()[1][:8]))
        self.now = 0.0
        self.seq = 0
        self.queue: list[tuple[float, int, str, Callback]] = []
        rates = rates or {}
        offsets = offsets or {}
        clock = {n: Clock(self._rate(rates.get(n, 1.0)), offsets.get(n, 0.0)) for n in (A, B, W)}
        self.arrays = {A: Array(A, B, Disk(r.Role.PRIMARY, 1), clock[A]),
                       B: Array(B, A, Disk(r.Role.SECONDARY, 1), clock[B])}
        self.witness: Witness | None = None
        if cfg.witness is not None and self.etcd_mode:
            rec = eb.Record(GROUP, (A, B), A, 1, last_decision="registered by A")
            self.witness = Witness(rec, clock[W])
            self.etcd = EtcdModel(rec, cfg.etcd_election, cfg.etcd_expiry_lag)
        elif cfg.witness is not None:
            self.witness = Witness(d.GroupRecord(GROUP, (A, B), A, 1, last_decision="registered by A"),
                                   clock[W])
        self.cut = {ln: False for ln in LINKS}
        # One-way delay bound and loss rate of each direction of each link, e.g. ("A", "W").
        self.delay = {(a, b): cfg.max_delay for a in (A, B, W) for b in (A, B, W) if a != b}
        self.loss = {(a, b): 0.0 for a in (A, B, W) for b in (A, B, W) if a != b}
        self.load = 0.0  # a host write every this long on average (0: only those asked for)
        self.next_delays: dict[tuple[str, str], list[float]] = {}  # scenarios: the next messages' delays
        self.drop_if: Callable[[str, str, str], bool] | None = None  # scenarios: (src, dst, what) lost?
        # scenarios: whether etcd's leader logs a write it gets without a quorum (None: at random)
        self.etcd_logs: bool | None = None
        self.session: int | None = None  # the live A-B link session
        self.sessions = 0
        self.connecting = False
        self.req = 0
        self.wid = 0
        self.acked: set[int] = set()
        self.writers: dict[int, set[str]] = {}  # epoch -> arrays seen acknowledging writes at it
        self.override = False  # an operator override happened: two writers at once may be legal
        self.trace: deque[tuple[float, str, object]] = deque(maxlen=TRACE)
        # Witness connections (Array.w_conn_id) and direction ("up" to the witness, "down"):
        # when the last frame arrives, and those where a frame was lost.
        self.w_last: dict[tuple[int, str], float] = {}
        self.w_broken: set[tuple[int, str]] = set()
        # For tests of the simulator itself: whether the first request the witness heard on each
        # connection was refused as heard late, and how often a client gave a connection up
        # because its retry was refused too.
        self.w_first_refused: dict[int, bool] = {}
        self.w_gave_up = 0
        self.events = 0
        self.stale_timers = 0  # next_timer() still due right after a Tick at or after it
        self.stale_example: str = ""
        self.gaps: list[str] = []  # core events the table refused
        for name in (A, B):
            self.restart(name)

    # -- plumbing ---------------------------------------------------------------------------
    def _rate(self, rate: float) -> float:
        lo, hi = 1 - self.cfg.drift, 1 + self.cfg.drift
        if not lo <= rate <= hi:
            raise ValueError(f"clock rate {rate} is outside the drift bound [{lo}, {hi}]")
        return rate

    def at(self, t: float, label: str, fn: Callback) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (max(t, self.now), self.seq, label, fn))

    def soon(self, label: str, fn: Callback) -> None:
        self.at(self.now, label, fn)

    def local(self, name: str) -> float:
        if name == W:
            assert self.witness is not None
            return self.witness.clock.local(self.now)
        return self.arrays[name].clock.local(self.now)

    def note(self, who: str, what: object) -> None:
        self.trace.append((self.now, who, what))

    def fail(self, promise: str, msg: str) -> NoReturn:
        lines = [f"{t:9.4f} {who}: {what}" for t, who, what in self.trace]
        state = []
        for x in self.arrays.values():
            if x.roles is None:
                state.append(f"{x.name}: down (disk {x.disk})")
            else:
                state.append(f"{x.name} @local {self.local(x.name):.4f}: {x.s}")
        if self.etcd is not None:
            state.append(f"W @local {self.local(W):.4f}: {self.etcd}")
        elif self.witness is not None:
            state.append(f"W: {self.witness.rec}")
        raise Violation(promise, f"at real time {self.now:.4f}: {msg}\n-- last events:\n" + "\n".join(lines)
                        + "\n-- state:\n" + "\n".join(state))

    def live(self, name: str, inc: int) -> Array | None:
        x = self.arrays[name]
        return x if x.alive and x.inc == inc else None

    # -- running ----------------------------------------------------------------------------
    def _next_timer(self) -> tuple[float, Array | None]:
        best, who = math.inf, None
        for x in self.arrays.values():
            if x.roles is None:
                continue
            st = x.roles.state
            if x.timer_state is not st or x.timer_tick != x.last_tick:
                x.timer_state, x.timer_tick, x.timer = st, x.last_tick, self._timer(x, st)
            if x.timer == math.inf:
                continue
            t = x.clock.real_at(x.timer)
            if t < best:
                best, who = t, x
        return best, who

    def _timer(self, x: Array, s: r.RoleState) -> float:
        """When the shell ticks this array next (local time)."""
        if self.timer_takes_now:
            # next_timer(state, timing, now): the deadlines after the last Tick's time.
            return r.next_timer(s, self.timing, x.last_tick)
        nt = r.next_timer(s, self.timing)  # type: ignore[call-arg]
        if nt == math.inf or nt > x.last_tick:
            return nt
        # Ticked at or after this time already and still due: a shell sleeping until
        # next_timer() would spin, i.e. tick all the time. Counted; the simulated shell ticks
        # when the next timer that is not already past comes due, which comes to the same.
        self.stale_timers += 1
        if not self.stale_example:
            self.stale_example = (f"{x.name} at local {x.clock.local(self.now):.3f}: next_timer() = {nt:.3f} "
                                  f"after Tick({x.last_tick:.3f}) in {s}")
        past = {f: r.NEVER for f in TIMER_FIELDS if getattr(s, f) <= x.last_tick}
        nt = r.next_timer(replace(s, **past), self.timing)  # type: ignore[arg-type, call-arg]
        return nt if nt > x.last_tick else x.last_tick + self.cfg.poll

    def run_until(self, t_end: float) -> None:
        while True:
            tq = self.queue[0][0] if self.queue else math.inf
            tt, x = self._next_timer()
            t = min(tq, tt)
            if t > t_end:
                break
            self.now = max(self.now, t)
            self.events += 1
            if tq <= tt:
                _, _, label, fn = heapq.heappop(self.queue)
                fn()
            else:
                assert x is not None
                self.feed(x, r.Tick(x.clock.local(self.now)))
        self.now = max(self.now, t_end)
        self.check()

    # -- feeding the machines ---------------------------------------------------------------
    def feed(self, x: Array, ev: r.Event) -> list[r.Action] | None:
        """Deliver one event, then a Tick, carrying out the actions of each; check the promises.
        Returns the event's actions, or None when the table refused it (RoleError)."""
        self.note(x.name, ev)
        self._oracle(x, ev)
        before = x.m.state
        try:
            acts = self._handle(x, ev)
        except r.RoleError as e:
            if type(ev).__name__ in CORE_EVENTS:
                self.gaps.append(f"{x.name} {ev} refused in {x.s.role.value}/{x.s.mode.value}: {e}")
            self.note(x.name, f"refused: {e}")
            self.check()
            return None
        if not isinstance(ev, r.Tick):
            self._handle(x, r.Tick(ev.now))
        if x.roles is not None and x.roles.state is not before:
            # Nothing else can make a promise false: with the states unchanged, time passing only
            # ends serving, and writes are checked when acknowledged (_ack).
            self.check()
        return acts

    def _handle(self, x: Array, ev: r.Event) -> list[r.Action]:
        m = x.m
        before = m.state
        acts = m.handle(ev)
        if isinstance(ev, r.Tick):
            x.last_tick = max(x.last_tick, ev.now)
        if acts:
            self.note(x.name, acts)
        s = m.state
        has_persist = any(isinstance(a, r.Persist) for a in acts)
        if persisted(s) != persisted(before) and not has_persist:
            self.fail("a", f"{x.name}: persisted fields changed {persisted(before)} -> {persisted(s)} without "
                      f"Persist on {ev}")
        if has_persist:
            (x.disk.role, x.disk.epoch, x.disk.started, x.disk.failsafe, x.disk.witness_behind, x.disk.peer_has_all,
             x.disk.peer_newer) = persisted(s)
        self._act(x, acts)
        return acts

    def _oracle(self, x: Array, ev: r.Event) -> None:
        """Independently of the machine: does this event confirm the array's role since start?"""
        s = x.s
        if isinstance(ev, r.LeaseReply) and ev.ms > 0 and s.role is r.Role.SECONDARY:
            x.unconfirmed = False
        elif (isinstance(ev, r.PeerState) and s.role is r.Role.PRIMARY and ev.role is r.Role.SECONDARY
              and ev.epoch == s.epoch):
            x.unconfirmed = False
        elif isinstance(ev, r.WitnessAnswer) and ev.granted is True and ev.owner == x.name:
            x.unconfirmed = False
        elif isinstance(ev, (r.HandedOver, r.PeerSwitchoverCommit)):
            x.unconfirmed = False  # the witness (or, without one, the peer) moved the group
        elif (self.witness is None and s.role is r.Role.PRIMARY
              and ev.now >= x.started_at + self.timing.lease_expiry()):
            # Without a witness the first primary is pre-elected (docs/design.md §4): once every
            # lease its previous run may have granted is over, it may go on by itself.
            x.unconfirmed = False

    # -- the shell: actions -----------------------------------------------------------------
    def _act(self, x: Array, acts: Iterable[r.Action]) -> None:
        for a in acts:
            if isinstance(a, r.RequestLease):
                self._request_lease(x, a.timeout)
            elif isinstance(a, r.AskWitness):
                self._ask_witness(x, a.ask.name, a.ask)
            elif isinstance(a, r.ResetLink):
                self._reset_link(x)
            elif isinstance(a, r.FenceOver):
                self._fence_over(x)
            elif isinstance(a, r.StartResync):
                self._start_resync(x)
            elif isinstance(a, getattr(r, "FlushVolumes", ())):
                self._flush(x)
            elif isinstance(a, r.AdoptGeneration):
                self._adopt(x)
            # Persist is done in _handle (first); GrantLease is answered by the caller; the rest
            # is data-plane bookkeeping with no control effect.

    def _new_req(self) -> int:
        self.req += 1
        return self.req

    # A-B link: requests within a session ------------------------------------------------------
    def _send_ab(self, x: Array, label: str, deliver: Callable[[Array], None],
                 rng: random.Random | None = None) -> bool:
        """Send a frame on x's link session; ``deliver(peer)`` runs at the peer if the session
        still lives there when it arrives. False if x has no session."""
        sid = x.session
        if sid is None:
            return False
        if self._lost(x.name, x.peer, label, rng):
            self.note(x.name, f"lost: {label}")
            return True
        peer = self.arrays[x.peer]
        pinc = peer.inc

        def arrive() -> None:
            y = self.live(peer.name, pinc)
            if y is None or self.session != sid or y.session != sid:
                return
            self.note(y.name, f"<- {label}")
            deliver(y)

        self.at(self.now + self._delay(x.name, x.peer, rng), label, arrive)
        return True

    def _request(self, x: Array, kind: str, timeout: float, data: Answer,
                 deliver: Callable[[Array, Reply], None]) -> int:
        """A request from x to its peer; the peer's ``deliver(peer, reply)`` answers it. The reply
        or the failure (timeout, link down) goes to ``_on_reply``/``_on_failure``."""
        rid = self._new_req()
        x.pending[rid] = Pending(kind, x.clock.local(self.now), data)
        inc, sid = x.inc, x.session

        def reply_fn(peer: Array) -> Reply:
            def reply(answer: Answer) -> None:
                def back(y: Array) -> None:
                    if y.inc == inc and y.session == sid:
                        p = y.pending.pop(rid, None)
                        if p is not None:
                            self._on_reply(y, p, answer)
                self._send_ab(peer, f"reply {kind} {answer}", back)
            return reply

        if not self._send_ab(x, f"{kind} {data}", lambda y: deliver(y, reply_fn(y))):
            self.soon(f"{kind} failed: no link", lambda: self._expire(x.name, inc, rid))
            return rid
        deadline = x.clock.real_at(x.clock.local(self.now) + timeout)
        self.at(deadline, f"{kind} timeout", lambda: self._expire(x.name, inc, rid))
        return rid

    def _witness_timeout(self, name: str, inc: int, rid: int, kind: str) -> None:
        """No answer in time: the client drops its connection (as WitnessClient.request does)."""
        x = self.live(name, inc)
        if x is None:
            return
        busy = x.w_busy == rid  # on the connection and not answered: the next one's turn
        if rid not in x.pending and not busy:
            return
        if busy:  # (a request never sent had no connection to give up)
            x.w_conn = False
            x.w_busy = None
        if kind == "REPORT":
            x.pending.pop(rid, None)
        else:
            self._expire(name, inc, rid)
        if busy and self.live(name, inc) is not None:
            self._w_next(x)

    def _expire(self, name: str, inc: int, rid: int) -> None:
        x = self.live(name, inc)
        if x is None:
            return
        p = x.pending.pop(rid, None)
        if p is not None:
            self._on_failure(x, p)

    def _on_reply(self, x: Array, p: Pending, ans: Answer) -> None:
        now = x.clock.local(self.now)
        k = p.kind
        if k == "lease":
            status, ms = ans
            assert isinstance(ms, int)
            self.feed(x, r.LeaseReply(now, p.sent, ms if status == "OK" else 0))
        elif k == "state":
            role, epoch, claiming = ans
            assert isinstance(role, r.Role) and isinstance(epoch, int)
            kw = {"claiming": bool(claiming)} if self.state_says_claiming else {}
            self.feed(x, r.PeerState(now, role, epoch, **kw))
        elif k == "follow":
            pass
        elif k == "mirror":
            wid, fwd = p.data
            assert isinstance(wid, int) and (fwd is None or callable(fwd))
            if ans[0] == "OK":
                if not getattr(x.s, "peer_has_all", True):
                    # The peer lacks regions: the data path makes it durable here before its
                    # acknowledgement (DataPath._durable_here, _durable_since).
                    x.disk.added.pop(wid, None)
                self._acked(x, wid, fwd)
            else:
                self._mirror_failed(x, wid, fwd, f"peer refused a mirrored write ({ans[0]})")
        elif k == "fwd":
            (wid,) = p.data
            assert isinstance(wid, int)
            if ans[0] == "OK":
                self._ack(x, wid)
        elif k == "resync_begin":
            if ans[0] == "OK":
                inc, rs = x.inc, p.data[0]
                self.feed(x, r.ResyncBegun(now))
                if self.live(x.name, inc) is None:
                    return
                if getattr(x.s, "peer_newer", False):
                    self._pull(x, rs)  # then the copy
                else:
                    x.disk.cut_lost.clear()  # overwritten at the peer: gone
                    self._copy(x, rs)
            else:
                self._resync_failed(x, f"peer refused RESYNC_BEGIN ({ans[0]})")
        elif k == "pull":
            if ans[0] == "OK":
                theirs, lost_there = ans[1], ans[2]
                assert isinstance(theirs, frozenset) and isinstance(lost_there, frozenset)
                x.disk.data -= lost_there
                x.disk.data |= theirs  # fetched back
                x.disk.cut_lost.clear()
                inc = x.inc
                self.feed(x, r.CaughtUp(now))
                if self.live(x.name, inc) is not None:
                    self._copy(x, p.data[0])
            else:
                self._resync_failed(x, f"peer refused to send regions back ({ans[0]})")
        elif k == "resync_end":
            if ans[0] == "OK":
                self.feed(x, r.ResyncDone(now))
                self.feed(x, r.ResyncEnded(x.clock.local(self.now)))
            else:
                self._resync_failed(x, f"peer refused the resync ({ans[0]})")
        elif k == "prepare":
            if ans[0] == "OK":
                self._handover(x)
            else:
                self._switchover_over(x, abort=False)
        elif k == "commit":
            self._switchover_over(x, abort=False)

    def _on_failure(self, x: Array, p: Pending) -> None:
        now = x.clock.local(self.now)
        k = p.kind
        self.note(x.name, f"{k} failed")
        if k == "lease":
            self.feed(x, r.LeaseFailed(now))
        elif k == "mirror":
            wid, fwd = p.data
            assert isinstance(wid, int) and (fwd is None or callable(fwd))
            self._mirror_failed(x, wid, fwd, "peer did not answer a mirrored write")
        elif k in ("resync_begin", "pull", "resync_end"):
            self._resync_failed(x, "resync failed: the peer did not answer")
        elif k == "prepare":
            self._switchover_over(x, abort=True)
        elif k == "commit":
            self._switchover_over(x, abort=False)
        elif k in ("KEEP", "CLAIM", "RESOLVE"):
            self.feed(x, r.WitnessAnswer(now, p.sent, r.WitnessAsk[k], None))
        elif k == "HANDOVER":
            self._switchover_over(x, abort=True, in_doubt=True)
        # fwd: the host write fails; report: nothing; state: no answer, nothing to feed

    # leases ------------------------------------------------------------------------------------
    def _request_lease(self, x: Array, timeout: float) -> None:
        epoch = x.s.epoch

        def at_peer(y: Array, reply: Reply) -> None:
            if y.s.epoch != epoch:
                reply(("STALE_EPOCH", 0))
            elif y.s.role is not r.Role.PRIMARY:
                reply(("NOT_PRIMARY", 0))
            else:
                acts = self.feed(y, r.LeaseRequested(y.clock.local(self.now))) or []
                ms = next((a.ms for a in acts if isinstance(a, r.GrantLease)), 0)
                reply(("OK", ms) if ms else ("NOT_SERVING", 0))

        self._request(x, "lease", timeout, (epoch,), at_peer)

    # the link ----------------------------------------------------------------------------------
    def run_while(self, busy: Callable[[], bool], limit: float, step: float = 0.001) -> None:
        """Scenarios: let time pass in small steps while ``busy()`` (at most ``limit`` seconds)."""
        end = self.now + limit
        while busy():
            if self.now >= end:
                raise AssertionError(f"scenario: still waiting after {limit}s")
            self.run_until(self.now + step)

    def _end_session(self, notice: dict[str, float], exact: dict[str, float] | None = None) -> None:
        """The live session dies; each side notices within its bound (or after ``exact``)."""
        sid = self.session
        if sid is None:
            return
        self.session = None
        for name, within in notice.items():
            x = self.arrays[name]
            if x.alive and x.session == sid:
                after = exact[name] if exact is not None else self.rng.uniform(0, within)
                self.at(self.now + after, f"{name} notices link down", self._notice_down(name, x.inc, sid))
        self._maybe_connect()

    def _notice_down(self, name: str, inc: int, sid: int) -> Callback:
        return lambda: self._see_down(name, inc, sid)

    def _see_down(self, name: str, inc: int, sid: int) -> None:
        x = self.live(name, inc)
        if x is None or x.session != sid:
            return
        x.session = None
        failed = sorted((rid, p) for rid, p in x.pending.items() if p.kind not in WITNESS_KINDS)
        for rid, _ in failed:
            del x.pending[rid]
        # The requests waiting on the dead link and the link monitor wake in either order.
        first_down = self.rng.random() < 0.5
        if first_down:
            self.feed(x, r.LinkDown(x.clock.local(self.now)))
        for _, p in failed:
            if self.live(name, inc) is None:
                return
            self._on_failure(x, p)
        if not first_down and self.live(name, inc) is not None:
            self.feed(x, r.LinkDown(x.clock.local(self.now)))
        self._maybe_connect()

    def _maybe_connect(self) -> None:
        if self.connecting or self.session is not None or self.cut[AB]:
            return
        if not all(x.alive for x in self.arrays.values()):
            return
        self.connecting = True
        self.at(self.now + self.rng.uniform(*self.cfg.reconnect), "link connects", self._connect)

    def _connect(self) -> None:
        self.connecting = False
        if self.session is not None or self.cut[AB] or not all(x.alive for x in self.arrays.values()):
            return
        # A side still holding an old session sees it drop first (the new session replaces it).
        for x in self.arrays.values():
            if x.session is not None:
                self._see_down(x.name, x.inc, x.session)
        if self.session is not None or not all(x.alive for x in self.arrays.values()):
            return
        self.sessions += 1
        sid = self.session = self.sessions
        order = [A, B] if self.rng.random() < 0.5 else [B, A]
        for name in order:
            self.arrays[name].session = sid
            self.arrays[name].episode += 1
        for name in order:
            x = self.arrays[name]
            if x.alive and x.session == sid:
                self.feed(x, r.LinkUp(x.clock.local(self.now)))
                if x.alive and x.session == sid and x.s.role is r.Role.PRIMARY:
                    self._send_state(x)

    def _send_state(self, x: Array) -> None:
        epoch, started = x.s.epoch, x.s.started

        def at_peer(y: Array, reply: Reply) -> None:
            self.feed(y, r.PeerState(y.clock.local(self.now), r.Role.PRIMARY, epoch, started))
            reply((y.s.role, y.s.epoch, y.s.mode is r.Mode.CLAIMING))

        self._request(x, "state", self.cfg.io_timeout, (epoch, started), at_peer)

    def _claim_over(self, x: Array) -> None:
        """The claim is over while linked (roles.py that says "claiming" in the state exchange):
        the peer hears our state again, as primary or as its secondary."""
        if x.roles is None or x.session is None:
            return
        if x.s.role is r.Role.PRIMARY:
            self._send_state(x)
            return
        epoch = x.s.epoch

        def at_peer(y: Array, reply: Reply) -> None:
            if y.s.role is r.Role.PRIMARY and y.s.epoch == epoch:
                self.feed(y, r.PeerState(y.clock.local(self.now), r.Role.SECONDARY, epoch))
            reply(("OK",))

        self._request(x, "follow", self.cfg.io_timeout, (epoch,), at_peer)

    def _reset_link(self, x: Array) -> None:
        if x.session is None or x.session != self.session:
            return
        sid, inc = x.session, x.inc
        self._end_session({x.peer: self.cfg.reset_notice})
        self.soon(f"{x.name} drops the link", lambda: self._see_down(x.name, inc, sid))

    # host I/O and the data -------------------------------------------------------------------
    def acknowledges_writes(self, x: Array) -> bool:
        if x.roles is None:
            return False
        s = x.roles.state
        return (s.role is r.Role.PRIMARY and (s.mode in r.MIRRORING or s.alone)
                and x.roles.serving(x.clock.local(self.now)))

    def host_write(self, name: str) -> None:
        """A host writes a new block at this array."""
        x = self.arrays[name]
        if x.roles is None:
            return
        self.wid += 1
        wid = self.wid
        self.note(name, f"host write w{wid}")
        if x.s.role is r.Role.SECONDARY:
            if not x.m.serving(x.clock.local(self.now)):
                return
            epoch = x.s.epoch

            def at_primary(y: Array, reply: Reply) -> None:
                if y.s.epoch != epoch:
                    reply(("STALE_EPOCH",))
                elif y.s.role is not r.Role.PRIMARY:
                    reply(("NOT_PRIMARY",))
                else:
                    self._primary_write(y, wid, reply)

            self._request(x, "fwd", self.cfg.io_timeout, (wid,), at_primary)
            return
        self._primary_write(x, wid, None)

    def _primary_write(self, x: Array, wid: int, fwd: Reply | None) -> None:
        """A write at the primary, from a host or forwarded by the secondary (``fwd``)."""
        s = x.s
        if not x.m.serving(x.clock.local(self.now)) or s.mode is r.Mode.HANDING_OVER:
            # Refused (or, while handing over, held until the switchover is over: not modelled).
            if fwd is not None:
                fwd(("NOT_SERVING",))
            return
        if s.mode in r.MIRRORING:
            x.disk.data.add(wid)
            x.disk.added[wid] = self.now
            epoch = s.epoch

            def at_secondary(y: Array, reply: Reply) -> None:
                if y.s.epoch != epoch:
                    reply(("STALE_EPOCH",))
                elif y.s.role is not r.Role.SECONDARY:
                    reply(("NOT_PRIMARY",))
                else:
                    y.disk.data.add(wid)
                    y.disk.added[wid] = self.now
                    reply(("OK",))

            self._request(x, "mirror", self.cfg.io_timeout, (wid, fwd), at_secondary)
        elif s.alone:
            self._alone(x, wid, fwd)
        elif s.mode in (r.Mode.FENCING, r.Mode.DECIDING):
            x.held.append((wid, False, fwd))  # writes wait for the fence
        elif fwd is not None:
            fwd(("NOT_SERVING",))

    def _alone(self, x: Array, wid: int, fwd: Reply | None, mirrored: bool = False) -> None:
        """A write acknowledged alone: once what the peer holds too is durable here
        (``DataPath._durable_before_alone``). A write this array applied while mirroring, whose
        mirror then failed (``mirrored``), is durable here when acknowledged: the flush that
        ``flush_pending`` waited for began after it, and ``DataPath._durable_since`` flushes
        otherwise (the peer no longer holds every write)."""
        if getattr(x.s, "flush_pending", False):
            x.flush_wait.append((wid, fwd, mirrored))
            return
        x.disk.data.add(wid)
        if mirrored:
            x.disk.added.pop(wid, None)
        else:
            x.disk.added[wid] = self.now  # volatile, as any write without FUA
        self._acked(x, wid, fwd)

    def _acked(self, x: Array, wid: int, fwd: Reply | None) -> None:
        if fwd is None:
            self._ack(x, wid)
        else:
            fwd(("OK",))  # the forwarding secondary acknowledges it when this arrives

    def _ack(self, x: Array, wid: int) -> None:
        self.note(x.name, f"ack w{wid}")
        self.acked.add(wid)
        self.check()

    def _mirror_failed(self, x: Array, wid: int, fwd: Reply | None, why: str) -> None:
        # The write waits for the fence: it goes on alone or is refused (FenceOver).
        x.held.append((wid, True, fwd))
        self.feed(x, r.PeerLost(x.clock.local(self.now), why))

    def _fence_over(self, x: Array) -> None:
        held, x.held = x.held, []
        alone = x.s.alone
        for wid, mirrored, fwd in held:
            if alone:
                self._alone(x, wid, fwd, mirrored)
            elif fwd is not None:
                fwd(("NOT_SERVING",))

    # resync ----------------------------------------------------------------------------------
    def _start_resync(self, x: Array) -> None:
        epoch = x.s.epoch
        snapshot = frozenset(x.disk.data)
        if RESYNC_SENDS_DURABLE:
            # What a resync sends is durable here first (``Resync._send_region``).
            x.disk.added.clear()
        # What power cuts took here that the peer holds: overwritten there by the copy, unless
        # this array fetches it back first (``peer_newer``).
        pulls = getattr(x.s, "peer_newer", False)
        cut_lost = frozenset() if pulls else frozenset(x.disk.cut_lost - x.disk.data)
        rs = self._new_req()

        def at_peer(y: Array, reply: Reply) -> None:
            if y.s.epoch != epoch:
                reply(("STALE_EPOCH",))
            else:
                # The peer learns what it lacks: from now on it has it (or reads it from us),
                # as this array holds it: the copies of writes a power cut took from this array
                # are overwritten (``_pull`` first fetched back what it could). Regions this
                # array fetches back are not named: those the peer's own power cut emptied
                # (the last written, so those this array was writing too) stay as they are
                # there, and ``_pull`` brings them here.
                y.disk.data -= cut_lost
                copied = snapshot - (y.disk.cut_lost if pulls else frozenset())
                for w in copied - y.disk.data:
                    y.disk.added[w] = self.now  # volatile there, as any write it applies
                y.disk.data |= copied
                reply(("OK",))

        self._request(x, "resync_begin", self.cfg.io_timeout, (rs,), at_peer)

    def _flush(self, x: Array) -> None:
        """The volumes flushed (``FlushVolumes``): a few ms later, ``Flushed``; the writes applied
        before are durable then, and writes waiting to be acknowledged alone go on."""
        inc = x.inc
        covered = set(x.disk.added)

        def flushed() -> None:
            y = self.live(x.name, inc)
            if y is not None:
                for w in covered:
                    y.disk.added.pop(w, None)
                self.feed(y, r.Flushed(y.clock.local(self.now)))
                if self.live(x.name, inc) is None or getattr(y.s, "flush_pending", False):
                    return
                waiting, y.flush_wait = y.flush_wait, []
                for wid, fwd, mirrored in waiting:
                    if y.s.alone:
                        self._alone(y, wid, fwd, mirrored)
                    elif fwd is not None:
                        fwd(("NOT_SERVING",))

        self.at(self.now + self.rng.uniform(0.001, 0.02), "flushed", flushed)

    def _pull(self, x: Array, rs: object) -> None:
        """A primary restarted with ``peer_newer`` fetches back what its peer holds that it lacks
        (Resync.pull_group, after RESYNC_BEGIN), reading those regions from the peer meanwhile."""
        epoch = x.s.epoch

        def at_peer(y: Array, reply: Reply) -> None:
            # The peer's copies of those regions replace this array's: writes a power cut took
            # from the peer's copies are then gone here too.
            reply(("OK", frozenset(y.disk.data), frozenset(y.disk.cut_lost - y.disk.data))
                  if y.s.epoch == epoch else ("STALE_EPOCH",))

        self._request(x, "pull", self.cfg.io_timeout, (rs,), at_peer)

    def _copy(self, x: Array, rs: object) -> None:
        inc = x.inc
        done = x.clock.real_at(x.clock.local(self.now) + self.rng.uniform(0, self.cfg.copy_time))
        self.at(done, "resync copied", lambda: self._resync_copied(x.name, inc, rs))

    def _resync_copied(self, name: str, inc: int, rs: object) -> None:
        x = self.live(name, inc)
        if x is None:
            return
        epoch = x.s.epoch

        def at_peer(y: Array, reply: Reply) -> None:
            if y.s.epoch != epoch:
                reply(("STALE_EPOCH",))
                return
            if RESYNC_FLUSHES_PEER:
                # What the resync copied is durable there before the pair is in sync
                # (``Resync.run_group``'s FLUSH): a flush makes every write applied before it
                # durable. (The real flush takes a few ms; the answer waits for it.)
                y.disk.added.clear()
            reply(("OK",))

        self._request(x, "resync_end", self.cfg.io_timeout, (rs,), at_peer)

    def _adopt(self, x: Array) -> None:
        """In sync (``AdoptGeneration``): the peer adopts this array's generation (``adopt_gen``),
        its suspect regions resynced: a secondary back from an unclean stop is ``CaughtUp``.
        Unanswered within a second, sent again while this array stays in sync at this epoch
        (``Group._adopt_generation``)."""
        epoch, inc = x.s.epoch, x.inc
        answered = [False]

        def deliver(y: Array) -> None:
            if y.s.role is r.Role.SECONDARY and y.s.epoch == epoch:
                self.feed(y, r.CaughtUp(y.clock.local(self.now)))

                def back(z: Array) -> None:
                    answered[0] = True

                self._send_ab(y, "adopt_gen answer", back, self.later_rng)

        def again() -> None:
            z = self.live(x.name, inc)
            if (z is not None and not answered[0] and z.s.role is r.Role.PRIMARY and z.s.epoch == epoch
                    and z.s.mode is r.Mode.ATTACHED):
                self._adopt(z)

        self._send_ab(x, "adopt_gen", deliver, self.later_rng)
        self.at(x.clock.real_at(x.clock.local(self.now) + 1.0), "adopt_gen again", again)

    def _resync_failed(self, x: Array, why: str) -> None:
        inc = x.inc
        self.feed(x, r.PeerLost(x.clock.local(self.now), why))
        if self.live(x.name, inc) is not None:
            self.feed(x, r.ResyncEnded(x.clock.local(self.now)))

    # the witness -------------------------------------------------------------------------------
    def _wlink(self, name: str) -> str:
        return AW if name == A else BW

    def _witness_request(self, x: Array, kind: str, epoch: int) -> None:
        """KEEP, CLAIM, RESOLVE, HANDOVER or a REPORT to the witness, in turn: the client sends
        one request at a time (WitnessClient's lock), the next once the one before was answered
        or given up; a REPORT's epoch and flags are read when its turn comes."""
        x.w_queue.append((kind, epoch))
        self._w_next(x)

    def _w_next(self, x: Array) -> None:
        while x.w_busy is None and x.w_queue and x.roles is not None:
            self._w_turn(x, *x.w_queue.popleft())

    def _w_turn(self, x: Array, kind: str, epoch: int, rng: random.Random | None = None) -> None:
        """Send a request whose turn came: a REPORT says what is true now (its epoch, its flags)."""
        if kind == "REPORT":
            x.episode_sent = x.episode
            self._w_send(x, kind, x.s.epoch, self._report_flags(x), rng)
        else:
            self._w_send(x, kind, epoch, rng=rng)

    def _w_done(self, x: Array, rid: int) -> None:
        """Request ``rid`` was answered or given up: the next one's turn."""
        if x.w_busy == rid:
            x.w_busy = None
            self._w_next(x)

    def _w_send(self, x: Array, kind: str, epoch: int, flags: tuple[bool, bool, bool] = (False, False, False),
                rng: random.Random | None = None) -> None:
        """Send one request now; an answer later than ``witness_timeout`` is dropped (the
        request failed then). ``rng``: where its delays and losses are drawn from; given for
        a retry after STALE (a stream of its own: the written-out schedules predate it)."""
        if self.etcd is not None:
            self._e_send(x, kind, epoch, flags)
            return
        retry = rng is not None
        sent = x.clock.local(self.now)
        inc, ln = x.inc, self._wlink(x.name)
        rid = self._new_req()
        deadline = x.clock.real_at(sent + self.cfg.witness_timeout)
        if kind != "REPORT":
            x.pending[rid] = Pending(kind, sent, (epoch,))
        else:
            x.pending[rid] = Pending("REPORT-timer", sent, (epoch,))
        self.at(deadline, f"{kind} timeout", lambda: self._witness_timeout(x.name, inc, rid, kind))
        wit = self.witness
        if not x.w_conn:
            # (Re)connecting takes the witness's challenge and our hello: both directions.
            # (A witness process that is down refuses the connection.)
            if (wit is None or wit.rec is None or self.cut[ln] or self._lost(W, x.name, "CHALLENGE")
                    or self._lost(x.name, W, "HELLO")):
                self.note(x.name, f"witness unreachable: {kind} not sent")
                return
            x.w_conn = True
            x.w_conn_id = self._new_req()
            x.w_echo = None  # a new session: the witness has answered nothing on it yet
        conn, echo = x.w_conn_id, x.w_echo
        x.w_busy = rid
        # Sent on a connection: whatever comes of it, the witness may hear it (the client says so).
        self.feed(x, r.WitnessSent(sent, sent))
        if wit is None or self.cut[ln] or self._w_lost(conn, "up", x.name, W, kind, rng):
            self.note(x.name, f"lost: {kind} to W")
            return
        winc = wit.inc

        def at_witness() -> None:
            if wit.rec is None or wit.inc != winc or self.cut[ln]:
                return
            dec = self._decide(wit, wit.rec, kind, x.name, epoch, flags, echo)  # None: STALE
            self.w_first_refused.setdefault(conn, dec is None)
            stamp = wit.clock.local(self.now)
            if self.cut[ln] or self._w_lost(conn, "down", W, x.name, kind, rng):
                return

            def back() -> None:
                y = self.live(x.name, inc)
                if y is None or self.cut[ln]:
                    return
                now = y.clock.local(self.now)
                on_time = now - sent <= self.cfg.witness_timeout and y.w_conn and y.w_conn_id == conn
                if on_time and (y.w_echo is None or stamp > y.w_echo):
                    y.w_echo = stamp
                if dec is None:
                    # Refused as heard late: nothing changed. The client asks again at once on
                    # the same connection, before any other request, the role machine none the
                    # wiser (WitnessClient); too late, the request fails at its timeout. A retry
                    # refused too: the client gives the connection up, the request failed.
                    if on_time and retry:
                        self.note(y.name, f"<- W {kind}: stale again, giving the connection up")
                        self.w_gave_up += 1
                        self._witness_timeout(y.name, inc, rid, kind)
                    elif on_time and y.pending.pop(rid, None) is not None:
                        self.note(y.name, f"<- W {kind}: stale, asking again")
                        if y.w_busy == rid:
                            y.w_busy = None
                        self._w_turn(y, kind, epoch, self.later_rng)
                        self._w_next(y)
                    return
                try:
                    self._answered(y, kind, rid, now, sent, dec)
                finally:
                    self._w_done(y, rid)

            self.at(self._w_carry(conn, "down", W, x.name, rng), f"W answers {x.name}", back)

        self.at(self._w_carry(conn, "up", x.name, W, rng), f"{x.name} {kind} to W", at_witness)

    def _answered(self, y: Array, kind: str, rid: int, now: float, sent: float, dec: d.Decision) -> None:
        """The witness's answer to request ``rid``, heard at ``now`` (local)."""
        if kind == "REPORT":
            if y.pending.pop(rid, None) is not None and now - sent <= self.cfg.witness_timeout:
                self.note(y.name, f"<- W {kind}: {dec}")
                y.episode_reported = y.episode_sent
                self.feed(y, r.WitnessReport(now, sent, dec.owner, dec.epoch))
            return
        if y.pending.pop(rid, None) is None:
            return
        self.note(y.name, f"<- W {kind}: {dec}")
        if kind == "HANDOVER":
            self._handed_over(y, dec)
        else:
            self.feed(y, r.WitnessAnswer(now, sent, r.WitnessAsk[kind], dec.granted, dec.owner,
                                         dec.epoch, dec.reason))
            if kind == "CLAIM" and self.state_says_claiming:
                self._claim_over(y)

    def _w_carry(self, conn: int, way: str, src: str, dst: str, rng: random.Random | None = None) -> float:
        """When a frame sent now on witness connection ``conn`` arrives: its delay, but never
        before a frame sent on it earlier in the same direction (TCP delivers in order; the
        client sends a request only after the one before it was answered or given up, and then on
        a new connection: found by the random schedules, where a REPORT saying the peer was in
        sync overtook the KEEP sent after it and the witness gave the peer the group)."""
        at = max(self.now + self._delay(src, dst, rng), self.w_last.get((conn, way), -math.inf))
        self.w_last[(conn, way)] = at
        return at

    def _w_lost(self, conn: int, way: str, src: str, dst: str, what: str, rng: random.Random | None = None) -> bool:
        """A frame on witness connection ``conn`` is lost: by chance, or because one before it was
        (TCP gets nothing after a gap through; the client gives the connection up). A frame a
        schedule removes (``drop_if``) is as if never sent: the connection goes on."""
        if (conn, way) in self.w_broken:
            return True
        if self.drop_if is not None and self.drop_if(src, dst, what):
            return True
        if self._lost(src, dst, what, rng):
            self.w_broken.add((conn, way))
            return True
        return False

    def _decide(self, wit: Witness, rec: d.GroupRecord, kind: str, node: str, epoch: int,
                flags: tuple[bool, bool, bool], echo: float | None) -> d.Decision | None:
        """The witness's answer; None when it refuses the request as heard too late after the
        answer it echoes (``decide.fresh``: STALE, nothing changed)."""
        t = self.cfg.witness
        assert t is not None
        now = wit.clock.local(self.now)
        if self.witness_checks_fresh and not d.fresh(t, now, echo, self.cfg.witness_timeout):
            self.note(W, f"{kind} from {node} at epoch {epoch}: stale (echo {echo})")
            return None
        if kind == "REPORT":
            dec = d.report(rec, t, now, node, epoch, peer_alive=flags[0], peer_in_sync=flags[1],
                           **({"lost_anew": flags[2]} if self.report_takes_anew else {}))
        elif kind == "KEEP":
            dec = d.keep(rec, t, now, node, epoch)
        elif kind == "CLAIM":
            dec = d.claim(rec, t, now, node, epoch)
        elif kind == "RESOLVE":
            dec = d.resolve(rec, t, now, node, epoch)
        else:
            dec = d.handover(rec, t, now, node, epoch)
        wit.disk = rec.persistent()  # durable before anyone hears of it
        self.note(W, f"{kind} from {node} at epoch {epoch} {flags if kind == 'REPORT' else ''}-> {dec}")
        self.check()
        return dec

    # the witness kept in etcd ---------------------------------------------------------------------
    @property
    def etcd_mode(self) -> bool:
        return self.cfg.witness_backend == "etcd"

    def etcd_config(self) -> "EtcdWitnessConfig":
        """The nodes' ``[witness]`` settings for the model's etcd (its TTL, ``owner_heard_for``)."""
        from syncd.witness.etcd import EtcdConfig
        from syncd.witness.etcd_node import EtcdWitnessConfig

        t = self.cfg.witness or d.Timing()
        wt = self.cfg.timing.witness if self.cfg.timing is not None and self.cfg.timing.witness else r.WitnessTiming()
        return EtcdWitnessConfig(EtcdConfig(("http://etcd:2379",), timeout=self.cfg.witness_timeout), "P",
                                 interval=wt.interval, owner_lease=t.owner_lease, grace=t.grace, drift=t.drift,
                                 margin=t.margin, election_timeout=self.cfg.etcd_election)

    def etcd_leader_change(self) -> None:
        """etcd elects a new leader: every lease not yet revoked lives election timeout + TTL
        from now (``lessor.Promote``)."""
        et = self.etcd
        if et is None or not et.up:
            return
        now = self.local(W)
        et.gc(now)
        et.promote(now)
        self.note(W, f"etcd leader change: {et}")

    def _e_send(self, x: Array, kind: str, epoch: int, flags: tuple[bool, bool, bool]) -> None:
        """A request of x's etcd client: the decision; after a report, the sign of life."""
        sent = x.clock.local(self.now)
        rid = self._new_req()
        x.pending[rid] = Pending(kind if kind != "REPORT" else "REPORT-timer", sent, (epoch,))
        x.w_busy = rid
        self._e_decision(x, EReq(rid, kind, epoch, flags, sent))

    def _e_call(self, x: Array, req: EReq, what: str, at_etcd: Callable[[], Answer | None],
                on_answer: Callable[[Array, Answer], None], write: bool = False,
                rng: random.Random | None = None) -> None:
        """One etcd call of ``req``: ``at_etcd`` runs where it arrives, if etcd has a quorum
        then and the link holds, and returns the answer; ``on_answer`` gets it at x if it comes
        within the call's deadline (the etcd client's timeout); past the deadline the request
        failed. Without a quorum a read is not processed, and a ``write`` (a lease grant, a
        compare-and-set) is either lost or logged by the leader and committed once the quorum
        is back, its compares evaluated then (``EtcdModel.held``); its answer is lost. ``rng``:
        where the call's delays and losses come from (``later_rng`` for calls added after the
        written-out schedules, so that theirs stay as written)."""
        et = self.etcd
        assert et is not None
        req.leg += 1
        leg = req.leg
        inc, ln, name = x.inc, self._wlink(x.name), x.name
        sent = req.leg_sent = x.clock.local(self.now)
        label = f"{req.kind} {what}"
        self.at(x.clock.real_at(sent + self.cfg.witness_timeout), f"{label} timeout",
                lambda: self._e_timeout(name, inc, req, leg))
        if self.cut[ln] or self._lost(name, W, label, rng):
            self.note(name, f"lost: {label} to etcd")
            return

        def arrive() -> None:
            if self.cut[ln]:
                return
            if not et.up:
                if write and (self.later_rng.random() < 0.5 if self.etcd_logs is None else self.etcd_logs):
                    et.held.append((f"{name}'s {label}", at_etcd))
                    self.note(W, f"etcd: {name}'s {label} logged without a quorum")
                return
            et.gc(self.local(W))
            ans = at_etcd()
            if ans is None or self.cut[ln] or self._lost(W, name, f"{label} answer", rng):
                return

            def back() -> None:
                y = self.live(name, inc)
                if y is None or self.cut[ln] or req.done or req.leg != leg:
                    return
                if y.clock.local(self.now) - sent > self.cfg.witness_timeout:
                    return  # the call was given up (its timeout fires now)
                on_answer(y, ans)

            self.at(self.now + self._delay(W, name, rng), f"etcd answers {name}: {label}", back)

        self.at(self.now + self._delay(name, W, rng), f"{name} {label} to etcd", arrive)

    def _e_timeout(self, name: str, inc: int, req: EReq, leg: int) -> None:
        x = self.live(name, inc)
        if x is not None and not req.done and req.leg == leg:
            self._e_failed(x, req, "no answer in time")

    def _e_failed(self, x: Array, req: EReq, why: str) -> None:
        """The request failed (``EtcdUnreachable``, ``EtcdError``): a report feeds nothing, a
        decision is unanswered."""
        req.done = True
        self.note(x.name, f"etcd {req.kind} failed: {why}")
        if x.w_busy == req.rid:
            x.w_busy = None
        inc = x.inc
        if req.kind == "REPORT":
            x.pending.pop(req.rid, None)
        else:
            self._expire(x.name, inc, req.rid)
        if self.live(x.name, inc) is not None:
            self._w_next(x)

    def _e_renew(self, x: Array, req: EReq) -> None:
        """After a report: the array's key onto a new lease (``EtcdWitness.renew``), if its lease
        is ``renew`` old and the record says what the array would report now; then the report
        is fed (``EtcdWitnessClient._round``)."""
        renew = self.timing.witness.interval / 2 if self.timing.witness is not None else 0.0
        now = x.clock.local(self.now)
        if x.e_lease and now - x.e_lease_sent < renew:
            self._e_report_done(x, req)
            return
        if x.e_owned is not None and x.e_owned[1:] != (x.s.epoch, self._report_flags(x)[1]):
            self.note(x.name, f"etcd: not renewed: the record says {x.e_owned[1:]}")
            self._e_report_done(x, req)
            return
        req.lease_sent = now
        self._e_grant(x, req)

    def _e_report_done(self, y: Array, req: EReq) -> None:
        dec = req.dec
        assert dec is not None
        req.done = True
        now = y.clock.local(self.now)
        try:
            if y.pending.pop(req.rid, None) is not None:
                self.note(y.name, f"<- etcd REPORT: {dec}")
                y.episode_reported = y.episode_sent
                self.feed(y, r.WitnessReport(now, min(req.sent, y.e_lease_sent), dec.owner, dec.epoch))
        finally:
            if self.live(y.name, y.inc) is not None:
                self._w_done(y, req.rid)

    def _e_grant(self, x: Array, req: EReq) -> None:
        et = self.etcd
        assert et is not None
        name = x.name
        ttl = self.etcd_config().lease_ttl()

        def at_etcd() -> Answer:
            lid = et.grant(self.local(W), ttl)
            self.note(W, f"etcd: lease {lid} ({ttl} s) granted to {name}")
            return (lid,)

        def answered(y: Array, ans: Answer) -> None:
            lid = ans[0]
            assert isinstance(lid, int)
            now = y.clock.local(self.now)
            # ``EtcdWitnessClient._granted``: etcd may hold this array alive from now on.
            self.feed(y, r.WitnessSent(now, now))
            if self.live(name, y.inc) is None or req.done:
                return
            req.lease = lid
            self._e_attach(y, req)

        self._e_call(x, req, "grant", at_etcd, answered, write=True)

    def _e_attach(self, x: Array, req: EReq) -> None:
        """Move the key onto ``req.lease`` if it is as this array last left it and the record is
        as its last request left it (compare-and-set on both mod_revisions); a changed key is
        read back and the move tried again, a changed record leaves it for the next round."""
        et = self.etcd
        assert et is not None
        name, lid, rev = x.name, req.lease, x.e_alive_rev
        guard = x.e_owned[0] if x.e_owned is not None else None

        def at_etcd() -> Answer:
            cur = et.key_rev(name)
            if cur != rev:
                return ("CHANGED", cur)
            if guard is not None and et.rec_rev != guard:
                return ("RECORD",)
            lv = et.leases.get(lid)
            if lv is None or self.local(W) >= lv[0] + et.lag:
                self.note(W, f"etcd: {name}'s put on lease {lid}: no such lease")
                return ("NO_LEASE",)
            et.rev += 1
            et.keys[name] = (lid, et.rev)
            self.note(W, f"etcd: {name}'s key on lease {lid} (rev {et.rev})")
            return ("OK", et.rev)

        def answered(y: Array, ans: Answer) -> None:
            if ans[0] == "OK":
                assert isinstance(ans[1], int)
                y.e_alive_rev, y.e_lease, y.e_lease_sent = ans[1], lid, req.lease_sent
                self._e_report_done(y, req)
            elif ans[0] == "CHANGED":
                assert isinstance(ans[1], int)
                y.e_alive_rev = ans[1]
                if not ans[1]:  # the key is gone: said at once (after review)
                    y.e_fresh = True
                req.tries += 1
                if req.tries >= eb.RETRIES:
                    self._e_failed(y, req, "the key kept changing")
                else:
                    self._e_attach(y, req)
            elif ans[0] == "RECORD":
                self.note(y.name, "etcd: not renewed: the record changed since the report")
                self._e_report_done(y, req)
            else:
                self._e_failed(y, req, "lease not found")

        self._e_call(x, req, "attach", at_etcd, answered, write=True)

    def _e_observe(self, x: Array, other: str, rev: int, sent: float) -> float | None:
        """``EtcdWitness._observe`` and ``owner_quiet``: x's read sent at ``sent`` found
        ``other``'s key at ``rev`` (0: gone); how long it has not moved, as x counts (now)."""
        m = x.e_moves.get(other)
        if m is None:
            m = x.e_moves[other] = eb.Motion(rev, sent)
        else:
            m.see(rev, sent)
        return m.quiet(x.clock.local(self.now))

    def _e_decision(self, x: Array, req: EReq) -> None:
        """The decision (``EtcdWitness._decide``) as the client makes it: one call reads the
        record and the keys, the rule is applied to what it read, and a second call writes the
        record if it changed, by a compare-and-set on the revision it read (and, for a claim
        granted, on the owner's key still being gone). A lost race reads again (``RETRIES``).
        Between the two the other array's requests, the keys' moves and expiries go on; a
        compare-and-set that the leader logged without a quorum may commit when the quorum is
        back (``_e_call``). What the read shows is what the client sees."""
        et = self.etcd
        assert et is not None
        name, kind, epoch, flags = x.name, req.kind, req.epoch, req.flags
        ttl = self.etcd_config().lease_ttl()
        grace = (self.cfg.witness or d.Timing()).grace
        inc = x.inc

        def read_at_etcd() -> Answer:
            y = self.live(name, inc)
            if y is None:
                return None
            rec = copy.deepcopy(et.rec)
            quiet = self._e_observe(y, rec.other(name), et.key_rev(rec.other(name)), req.leg_sent)
            if name not in et.keys:
                y.e_fresh = True  # its key had gone: nothing is known of it meanwhile
            seen = eb.Seen(owner_alive=rec.owner in et.keys, fresh=y.e_fresh,
                           owner_quiet=None if rec.owner == name else quiet)
            before, owner = rec.to_json(), rec.owner
            if kind == "REPORT":
                dec = eb.rule_report(rec, GROUP, name, epoch, seen, peer_alive=flags[0], peer_in_sync=flags[1],
                                     grace=grace, lost_anew=flags[2])
            elif kind == "KEEP":
                dec = eb.rule_keep(rec, GROUP, name, epoch)
            elif kind == "CLAIM":
                dec = eb.rule_claim(rec, GROUP, name, epoch, seen, ttl, grace)
            elif kind == "RESOLVE":
                dec = eb.rule_resolve(rec, GROUP, name, epoch)
            else:
                dec = eb.rule_handover(rec, GROUP, name, epoch)
            self.note(W, f"etcd: {kind} from {name} at epoch {epoch} {flags if kind == 'REPORT' else ''}"
                         f"{seen} read at rev {et.rec_rev} -> {dec}")
            return (dec, rec, rec.to_json() != before, et.rec_rev, owner)

        def owned(rec: eb.Record, rev: int) -> tuple[int, int, bool] | None:
            return (rev, rec.epoch, rec.secondary_in_sync) if rec.owner == name else None

        def decided(y: Array, dec: d.Decision, own: object) -> None:
            y.e_fresh = False
            y.e_owned = own  # type: ignore[assignment]
            if kind == "REPORT":
                req.dec = dec
                self._e_renew(y, req)
                return
            req.done = True
            now = y.clock.local(self.now)
            try:
                self._answered(y, kind, req.rid, now, req.sent, dec)
            finally:
                if self.live(name, y.inc) is not None:
                    self._w_done(y, req.rid)

        def read(y: Array, ans: Answer) -> None:
            dec, new, changed, rev, owner = ans
            assert isinstance(dec, d.Decision) and isinstance(new, eb.Record)
            assert isinstance(rev, int) and isinstance(owner, str)
            if not changed:  # nothing to write: the record is as read, at the revision read
                decided(y, dec, owned(new, rev))
                return
            needs_gone = kind == "CLAIM" and dec.granted

            def cas_at_etcd() -> Answer:
                if et.rec_rev != rev or (needs_gone and owner in et.keys):
                    self.note(W, f"etcd: {kind} from {name}: compare-and-set at rev {rev} fails (now {et.rec_rev})")
                    return ("RACE",)
                vars(et.rec).update(vars(copy.deepcopy(new)))
                et.rev += 1
                et.rec_rev = et.rev
                self.note(W, f"etcd: {kind} from {name} written at rev {et.rev}: {et.rec}; watch {et.rec.watch}")
                self.check()
                return ("OK", owned(et.rec, et.rec_rev))

            def cas_answered(z: Array, cas: Answer) -> None:
                if cas[0] == "OK":
                    decided(z, dec, cas[1])
                    return
                req.races += 1
                if req.races >= eb.RETRIES:
                    self._e_failed(z, req, f"the record kept changing under {eb.RETRIES} attempts")
                else:
                    self._e_call(z, req, "decision", read_at_etcd, read)

            self._e_call(y, req, "write", cas_at_etcd, cas_answered, write=True, rng=self.later_rng)

        self._e_call(x, req, "decision", read_at_etcd, read)

    def _ask_witness(self, x: Array, kind: str, ask: r.WitnessAsk) -> None:
        if kind == "CLAIM" and self.claims_after_a_report:
            # The clients report first: the witness has the array's word on the link as it is.
            self._witness_request(x, "REPORT", x.s.epoch)
        self._witness_request(x, kind, x.s.epoch)

    def _report_flags(self, x: Array) -> tuple[bool, bool, bool]:
        """(peer alive, peer in sync, the link came up since the last answered report): what a
        report says, read when it is sent."""
        s = x.s
        if hasattr(r, "peer_in_sync"):
            in_sync = r.peer_in_sync(s)
        else:  # roles.py before it said itself what its reports tell the witness
            in_sync = s.role is r.Role.PRIMARY and s.mode is r.Mode.ATTACHED and not s.failsafe
        return x.session is not None, in_sync, x.episode != x.episode_reported

    def _report(self, name: str, inc: int) -> None:
        x = self.live(name, inc)
        if x is None or self.cfg.witness is None or self.timing.witness is None:
            return
        # A round of reports starts once the one before it is over (WitnessClient.run).
        busy = x.pending.get(x.w_busy) if x.w_busy is not None else None
        if not ((busy is not None and busy.kind == "REPORT-timer") or any(k == "REPORT" for k, _ in x.w_queue)):
            self._witness_request(x, "REPORT", x.s.epoch)
        nxt = x.clock.real_at(x.clock.local(self.now) + self.timing.witness.interval)
        self.at(nxt, f"{name} reports", lambda: self._report(name, inc))

    # switchover --------------------------------------------------------------------------------
    def switchover(self, name: str) -> None:
        """The operator asks this array (if primary) to hand the group to its peer."""
        x = self.arrays[name]
        if x.roles is None or x.s.role is not r.Role.PRIMARY or x.switching:
            return
        if self.feed(x, r.SwitchoverBegin(x.clock.local(self.now))) is None:
            return
        x.switching = True
        epoch = x.s.epoch

        def at_peer(y: Array, reply: Reply) -> None:
            ok = self.feed(y, r.PeerSwitchoverPrepare(y.clock.local(self.now), epoch)) is not None
            reply(("OK",) if ok else ("REFUSED",))

        self._request(x, "prepare", self.cfg.io_timeout, (epoch,), at_peer)

    def _handover(self, x: Array) -> None:
        if self.witness is None:
            self._handed_over(x, d.Decision(True, x.peer, x.s.epoch + 1, "no witness"))
        else:
            self._witness_request(x, "HANDOVER", x.s.epoch)

    def _handed_over(self, x: Array, dec: d.Decision) -> None:
        if not (dec.granted and dec.owner == x.peer):
            self._switchover_over(x, abort=True)
            return
        if self.feed(x, r.HandedOver(x.clock.local(self.now), dec.epoch, True)) is None:
            self._switchover_over(x, abort=True)
            return
        epoch = dec.epoch

        def at_peer(y: Array, reply: Reply) -> None:
            ok = self.feed(y, r.PeerSwitchoverCommit(y.clock.local(self.now), epoch)) is not None
            reply(("OK",) if ok else ("REFUSED",))

        self._request(x, "commit", self.cfg.io_timeout, (epoch,), at_peer)

    def _switchover_over(self, x: Array, abort: bool, in_doubt: bool = False) -> None:
        """The switchover ends here; ``in_doubt``: the witness did not answer the HANDOVER (it may
        have given the group to the peer), which the shell says when roles.py can hear it."""
        x.switching = False
        inc = x.inc
        doubt = {"in_doubt": True} if in_doubt and self.end_takes_doubt else {}
        self.feed(x, r.SwitchoverEnd(x.clock.local(self.now), **doubt))
        if abort and self.live(x.name, inc) is not None:
            self._send_ab(x, "switchover abort", lambda y: self._peer_abort(y))

    def _peer_abort(self, y: Array) -> None:
        self.feed(y, r.PeerSwitchoverAbort(y.clock.local(self.now)))

    # faults --------------------------------------------------------------------------------------
    def crash(self, name: str, how: str = "kill") -> None:
        """kill -9 of an array or of the witness (``how``: "kill"); for an array, a power cut
        ("power": it loses its volatile writes that its peer holds)
        or a clean stop ("stop": it restarts knowing it stopped cleanly)."""
        if name == W and self.etcd is not None:
            if self.etcd.up:  # etcd loses its quorum: nothing is processed, nothing revoked
                self.etcd.gc(self.local(W))
                self.etcd.up = False
                self.note(W, "etcd quorum lost")
            return
        if name == W:
            wit = self.witness
            if wit is not None and wit.rec is not None:
                self.note(W, "crash")
                wit.rec = None
                wit.inc += 1
                for y in self.arrays.values():
                    y.w_conn = False  # its sessions die with it: the next request makes a new one
            return
        x = self.arrays[name]
        if not x.alive:
            return
        self.note(name, "crash" if how == "kill" else how)
        if how == "power":
            peer = self.arrays[x.peer].disk.data
            volatile = {w for w, t in x.disk.added.items() if t >= self.now - self.cfg.writeback}
            first_cut, x.disk.cut_at = self.arrays[x.peer].disk.cut_at, self.now
            # Both arrays lost power, this one within the other's writeback: a write that this
            # cut takes (not on this disk yet, and the other's cut came first) may be lost, as on
            # any block device that loses power with writes no host flush covered; (e) stops
            # counting it. A write this disk holds stays counted, whatever the first cut took
            # (narrowed by review: not every write volatile at either cut). The model's hosts
            # never flush; the system tests check flushed writes through such cuts.
            both = volatile & self.acked if self.now - first_cut <= self.cfg.writeback else set()
            if both:
                self.acked -= both
                self.note(name, f"both arrays lost power with {sorted(both)} unflushed: no longer counted")
            lost = {w for w in volatile if w in peer}
            x.disk.data -= lost
            x.disk.cut_lost |= lost
            if lost:
                self.note(name, f"the power cut took {sorted(lost)}")
        x.disk.added.clear()
        x.clean = how == "stop"
        x.caches_lost = how == "power"
        x.alive = False
        x.roles = None
        x.inc += 1
        x.pending.clear()
        x.held.clear()
        x.flush_wait.clear()
        x.w_echo = None
        x.w_conn = False  # a new process has no witness connection
        x.w_queue.clear()
        x.w_busy = None
        x.switching = False
        x.e_lease, x.e_lease_sent, x.e_alive_rev, x.e_fresh = 0, -math.inf, 0, True  # a new etcd client
        x.e_moves, x.e_owned = {}, None
        x.episode, x.episode_sent, x.episode_reported = 0, 0, -1
        if x.session is not None and x.session == self.session:
            x.session = None
            self._end_session({x.peer: self.cfg.path_timeout})
        x.session = None

    def restart(self, name: str) -> None:
        if name == W and self.etcd is not None:
            if not self.etcd.up:  # the quorum is back: a leader is elected (``lessor.Promote``)
                et = self.etcd
                et.up = True
                et.promote(self.local(W))
                self.note(W, f"etcd quorum back: {et}")
                held, et.held = et.held, []
                for what, commit in held:  # answered to no one: their clients gave up
                    et.gc(self.local(W))
                    self.note(W, f"etcd commits {what}, logged before the quorum went")
                    commit()
            return
        if name == W:
            wit = self.witness
            if wit is not None and wit.rec is None:
                self.note(W, "restart")
                wit.rec = d.GroupRecord.restore(wit.disk)
                wit.inc += 1
                self._check_witness_epoch()
            return
        x = self.arrays[name]
        if x.alive:
            return
        x.alive = True
        x.inc += 1
        now = x.clock.local(self.now)
        dk = x.disk
        more = ({"peer_has_all": dk.peer_has_all, "peer_newer": dk.peer_newer}
                if "peer_newer" in inspect.signature(r.GroupRoles.at_start).parameters else {})
        x.roles = r.GroupRoles.at_start(me=name, peer=x.peer, role=dk.role, epoch=dk.epoch, started=dk.started,
                                        failsafe=dk.failsafe, witness_behind=dk.witness_behind,
                                        auto_failover=True, auto_recover=True, timing=self.timing, now=now,
                                        **more)
        x.last_tick = -math.inf
        x.unconfirmed = True
        x.started_at = now
        if not x.clean and (x.caches_lost or not BOOT_ID) and hasattr(r, "UncleanStop"):
            # The daemon says so once it has read the write-intent log (some regions, here) and
            # found the machine restarted since (its boot id): after a kill -9 its page cache
            # kept every write. A roles.py with no row for a secondary refuses it (noted).
            self.feed(x, r.UncleanStop(now))
        self.note(name, f"restart: {x.s}")
        if self.cfg.witness is not None:
            inc = x.inc
            self.soon(f"{name} reports", lambda: self._report(name, inc))
        self._maybe_connect()
        self.check()

    def set_cut(self, link: str, cut: bool, notice: dict[str, float] | None = None) -> None:
        """Cut or heal a link; A and B notice a cut A-B link within ``path_timeout`` each (or,
        for a scenario, after ``notice``)."""
        if self.cut[link] == cut:
            return
        self.note("net", f"{link} {'cut' if cut else 'healed'}")
        self.cut[link] = cut
        if link == AB:
            if cut:
                self._end_session({A: self.cfg.path_timeout, B: self.cfg.path_timeout}, notice)
            else:
                self._maybe_connect()

    def flap(self) -> None:
        """The A-B session breaks (every path at once) and reconnects."""
        self.note("net", "A-B session broken")
        self._end_session({A: self.cfg.path_timeout, B: self.cfg.path_timeout})

    def set_net(self, src: str, dst: str, max_delay: float, loss: float) -> None:
        """Messages from src to dst now take up to ``max_delay`` and are lost at rate ``loss``."""
        self.note("net", f"{src}->{dst}: delay up to {max_delay:.3f}s, loss {loss:.2f}")
        self.delay[(src, dst)] = max_delay
        self.loss[(src, dst)] = loss

    def _delay(self, src: str, dst: str, rng: random.Random | None = None) -> float:
        fixed = self.next_delays.get((src, dst))
        if fixed and rng is None:
            return fixed.pop(0)
        bound = self.delay[(src, dst)]
        if not bound:
            return 0.0
        rng = rng or self.rng
        # Often near the bound: the edge cases are what matters.
        return bound * (rng.uniform(0.9, 1.0) if rng.random() < 0.3 else rng.random())

    def _lost(self, src: str, dst: str, what: str, rng: random.Random | None = None) -> bool:
        if self.drop_if is not None and self.drop_if(src, dst, what):
            return True
        loss = self.loss[(src, dst)]
        return loss > 0 and (rng or self.rng).random() < loss

    def set_load(self, every: float) -> None:
        """Hosts write at a random array about every ``every`` seconds (0: stop)."""
        self.load = every
        if every:
            self.at(self.now + self.rng.uniform(0, every), "host load", self._load)

    def _load(self) -> None:
        if not self.load:
            return
        self.host_write(A if self.rng.random() < 0.5 else B)
        self.at(self.now + self.rng.uniform(0.5, 1.5) * self.load, "host load", self._load)

    def set_rate(self, name: str, rate: float) -> None:
        if name == W:
            if self.witness is not None:
                self.witness.clock.set_rate(self.now, self._rate(rate))
            return
        self.arrays[name].clock.set_rate(self.now, self._rate(rate))

    # -- the promises ---------------------------------------------------------------------------
    def _check_witness_epoch(self) -> None:
        wit = self.witness
        if wit is None or wit.rec is None:
            return
        if wit.rec.epoch < wit.epoch_seen:
            self.fail("a", f"the witness's epoch went back from {wit.epoch_seen} to {wit.rec.epoch}")
        wit.epoch_seen = wit.rec.epoch

    def readable(self, x: Array) -> set[int]:
        """What a read at ``x`` can return: its disk, and, for a primary that may lack writes its
        peer holds (``peer_newer``) while the peer mirrors, the peer's (such regions are read
        from the peer until fetched back)."""
        s = x.m.state
        if getattr(s, "peer_newer", False) and s.mode in r.MIRRORING:
            return x.disk.data | self.arrays[x.peer].disk.data
        return x.disk.data

    def check(self) -> None:
        """Every promise, at this instant (and, from ``_handle``, at every Persist):

        (a) epochs only rise, on each array (across restarts: only persisted fields survive, and
            they change only with Persist) and at the witness (across its restarts);
        (b) at most one array acknowledges writes per epoch, and, with a witness and no operator
            override, never both at once ("acknowledges writes": primary, serving, and mirroring
            or alone);
        (c) an array never serves while its peer is primary alone (may acknowledge writes the
            array does not get): a secondary, and a primary that lost the group but does not
            know it yet;
        (d) an array that restarted serves nothing until its role is confirmed (a lease granted
            to it, its peer saying it is our secondary at our epoch, a witness grant, a
            switchover; without a witness, a primary whose previous run's leases are all over);
        (e) a read served anywhere returns every write acknowledged before it;
        (f) not a promise but what the data path relies on to keep them: the view its fast paths
            read (``GroupRoles.steady_until``, ``is_primary``, ``mirroring``) is the state's."""
        self._check_witness_epoch()
        writers = []
        for x in self.arrays.values():
            if x.roles is None:
                continue
            s = x.roles.state
            now = x.clock.local(self.now)
            # (a) epochs only rise, across restarts too
            if s.epoch < x.epoch_seen:
                self.fail("a", f"{x.name}'s epoch went back from {x.epoch_seen} to {s.epoch}")
            x.epoch_seen = s.epoch
            serving = x.roles.serving(now)
            # (f) the fast paths' view, derived once per state change, is the state's own
            if (now < x.roles.steady_until) != (serving and not x.roles.transitioning(now)) or (
                    x.roles.is_primary != (s.role is r.Role.PRIMARY)) or x.roles.mirroring != (s.mode in r.MIRRORING):
                self.fail("f", f"{x.name}'s fast-path view (steady until {x.roles.steady_until}, primary "
                          f"{x.roles.is_primary}, mirroring {x.roles.mirroring}) disagrees with its state at {now}")
            # (d) a restarted array serves nothing until its role is confirmed
            if serving and x.unconfirmed:
                self.fail("d", f"{x.name} restarted and serves (as {s.role.value}, {s.mode.value}) before anything "
                          f"confirmed its role at epoch {s.epoch}")
            # (e) a read here now returns every write acknowledged before
            if serving and not self.acked <= self.readable(x):
                missing = sorted(self.acked - self.readable(x))
                self.fail("e", f"a read at {x.name} ({s.role.value}, {s.mode.value}) would miss acknowledged "
                          f"writes {missing}")
            if self.acknowledges_writes(x):
                writers.append(x)
                seen = self.writers.setdefault(s.epoch, set())
                seen.add(x.name)
                # (b) one writer per epoch
                if len(seen) > 1:
                    self.fail("b", f"both arrays acknowledged writes at epoch {s.epoch}")
            # (c) nothing serves at the peer while the primary may go on alone
            if s.role is r.Role.PRIMARY and s.alone:
                y = self.arrays[x.peer]
                if y.roles is not None and y.roles.serving(y.clock.local(self.now)):
                    ys = y.roles.state
                    self.fail("c", f"{y.name} serves (as {ys.role.value} at epoch {ys.epoch}, {ys.mode.value}) while "
                                   f"{x.name} is primary alone at epoch {s.epoch}")
        # (b) with a witness and no operator override: never two writers at once
        if len(writers) == 2 and self.witness is not None and not self.override:
            self.fail("b", "both arrays acknowledge writes at the same instant "
                      f"(epochs {writers[0].s.epoch} and {writers[1].s.epoch})")


TIMER_FIELDS = ("lease_until", "lease_deadline", "next_renewal", "witness_until", "next_witness_retry",
                "transition_until")
WITNESS_KINDS = frozenset({"REPORT", "REPORT-timer", "KEEP", "CLAIM", "RESOLVE", "HANDOVER"})
