"""The control state of one replication group on this array, as a pure state machine.

A group's role, epoch, how its peer is attached (mode), failsafe, leases and transitions live
here and nowhere else. The machine does no I/O and reads no clock: every event carries the time
(the daemon's monotonic clock) and the machine answers with the actions the daemon carries out
(send a lease request, ask the witness, start a resync, persist, reset the link...). Whether the
array may serve the group and its ALUA state are derived from the state by pure functions.

Every legal move is a row of ``TABLE``: (role, modes, event type) -> handler. An event that no
row admits in the current state is refused (``RoleError``) and changes nothing.

The promises the rows keep (checked by ``tests/unit/test_roles_model.py`` in virtual time):

* epochs never go backwards, and a role change to primary always takes a higher epoch;
* persisted fields (role, epoch, started, failsafe, witness_behind, peer_has_all as
  ``persisted_has_all``, peer_newer) change only together with ``Persist``;
* an array that (re)starts serves nothing until its role at its epoch is confirmed: by the peer
  (lease grant, or the peer reporting itself secondary at our epoch) or by the witness;
* a primary acknowledges a write its peer does not get only after every lease it granted has
  expired (``lease_deadline``), and, with a witness, only once the witness agreed or was lost
  before the peer (pre-elected primary);
* a secondary serves only while it holds a lease; a primary without its peer serves only while
  the witness cannot have given the group away (``witness_until``);
* a primary that restarted after an unclean stop while its peer held every write it had
  acknowledged (``peer_newer``: a power cut may have taken from it writes the peer has) never
  serves without its peer: not alone, not while fencing, until what it lacks is fetched back,
  the peer takes the group, or the operator overrides;
* a secondary that restarted after an unclean stop while it was writing (``peer_newer``: a power
  cut may have taken mirrored writes its primary acknowledged) never takes the group over by
  itself until its primary has resynced those regions (``CaughtUp``): only the operator's
  failover or override does;
* a primary that stops holding only writes its peer has too, or takes the group over, first
  makes the writes it holds durable (``FlushVolumes``; ``flush_pending`` until ``Flushed``):
  the data path acknowledges nothing alone meanwhile, and ``peer_has_all`` stays set on disk.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Union

from ..nbd.proto import (
    ALUA_ACTIVE_NON_OPTIMIZED,
    ALUA_ACTIVE_OPTIMIZED,
    ALUA_TRANSITIONING,
    ALUA_UNAVAILABLE,
)
from ..witness.decide import may_grant_later

NEVER = -math.inf


class Role(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class Mode(enum.Enum):
    """What a group is doing on this array, per role."""

    # primary
    STARTING = "starting"  # (re)started: the previous run's lease may still run; unconfirmed
    FENCING = "fencing"  # peer lost: waiting until every lease granted has expired
    DECIDING = "deciding"  # leases expired: asking the witness whether to go on alone
    DETACHED = "detached"  # peer not mirroring; alone or not, see ``alone``
    SYNCING = "syncing"  # peer mirroring new writes while regions are copied to it
    ATTACHED = "attached"  # peer mirroring and in sync
    HANDING_OVER = "handing-over"  # planned switchover: host I/O waits, roles about to swap
    # secondary
    FOLLOWING = "following"  # serves while it holds a lease from the primary
    CLAIMING = "claiming"  # primary gone, lease over: asking the witness for the group
    SWITCHING = "switching"  # planned switchover under way (to or from this array): host I/O waits
    # both
    DISK_FAILED = "disk-failed"  # a backing device of the group failed here: serve nothing


MIRRORING = frozenset({Mode.SYNCING, Mode.ATTACHED, Mode.HANDING_OVER})
FENCED_OFF = frozenset({Mode.STARTING, Mode.FENCING, Mode.DECIDING})


class WitnessAsk(enum.Enum):
    KEEP = "keep"
    CLAIM = "claim"
    RESOLVE = "resolve"


class RoleError(Exception):
    """An event the state does not admit (an operator verb in the wrong state, an epoch that
    would go backwards, a frame from a peer that contradicts this array's role)."""


# -- timing ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WitnessTiming:
    interval: float = 0.5  # s between reports
    owner_lease: float = 3.0  # the witness gives the group away this long after hearing the owner
    grace: float = 4.5  # the witness missing the owner this long disables failover
    drift: float = 0.05  # clock rate bound of every node (the witness's too)
    link_notice: float = 1.5  # the arrays notice a dead link at most this far apart (path_timeout)
    request_timeout: float = 1.0  # the witness client gives a request up after this
    # etcd: how long after this array's last answered request etcd may still hold its key, so
    # that the witness counts it alive (``EtcdWitnessConfig.owner_heard_for``: its lease, etcd's
    # expiry check, one leader change). 0: the built-in witness, which counts ``grace`` itself.
    owner_heard_for: float = 0.0

    def reachable_for(self) -> float:
        return 3 * self.interval

    def claim_after_link_loss(self) -> float:
        """The primary notices a dead link up to ``link_notice`` after the secondary does, and
        serves as if mirroring until then: no claim before this long (the secondary's clock)."""
        return self.link_notice * (1 + self.drift) / (1 - self.drift)

    def lost_first_after(self) -> float:
        """Witness silent this long (here) before the peer went: the peer cannot have told the
        witness it lost us within ``grace`` (its clock) of the witness losing us, so the witness
        refuses it the group. The peer may notice the link dead ``link_notice`` before we do, and
        the witness may still have heard our last request up to ``request_timeout`` after we
        last heard it. A witness kept in etcd disables failover once etcd has dropped our key
        (``owner_heard_for``), not after ``grace``."""
        disabled_after = self.owner_heard_for or self.grace
        return ((1 + self.drift) * (disabled_after / (1 - self.drift) + self.link_notice)
                + self.interval + self.request_timeout)


@dataclass(frozen=True, slots=True)
class Timing:
    lease: float = 2.0
    lease_drift: float = 0.05
    lease_margin: float = 0.5
    transition_timeout: float = 5.0
    witness: WitnessTiming | None = None

    def lease_expiry(self) -> float:
        """How long after granting a lease the primary treats it as possibly still running."""
        return self.lease * (1 + self.lease_drift) + self.lease_margin

    def renew_every(self) -> float:
        return self.lease / 4

    def lease_request_timeout(self) -> float:
        return self.lease / 2


# -- state -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RoleState:
    """One group's control state on this array. Persisted: role, epoch, started, failsafe,
    witness_behind (``Persist`` says when they changed); the rest is rebuilt at start."""

    me: str
    peer_name: str
    role: Role
    epoch: int
    started: bool = False
    failsafe: bool = False  # serves nothing until the witness, the peer or the operator says so
    witness_behind: bool = False  # this epoch was made without the witness: tell it (RESOLVE)
    # Primary: the peer holds every write this array acknowledged (in sync, and nothing
    # acknowledged alone since). Persisted: after a power cut the peer's copy of what this array
    # was writing is then the newer one, and is fetched back (``Pull``).
    peer_has_all: bool = False
    # Primary restarted after an unclean stop while ``peer_has_all`` held: the peer may hold
    # newer data than this array where it was writing (a power cut took the last writes here).
    # Persisted, and unlike ``peer_has_all`` kept when the peer is lost: this array then serves
    # nothing without its peer (its copy is older than writes hosts were told were done) until
    # those regions are fetched back (``CaughtUp``), the peer takes the group, or the operator
    # overrides (``OverrideFailsafe``).
    # Secondary restarted after an unclean stop with regions it was writing (mirrored writes a
    # power cut may have taken after its primary acknowledged them): persisted, and it claims
    # nothing from the witness until its primary has resynced them (``CaughtUp``); only the
    # operator promotes it meanwhile.
    peer_newer: bool = False
    # Primary: writes it applied while the peer held every one (and, after a failover, those
    # the old primary acknowledged) may be only in this array's page cache or disk cache, and
    # it no longer holds only writes its peer has (``peer_has_all`` cleared): they are being
    # made durable (``FlushVolumes``, then ``Flushed``). Until then nothing is acknowledged
    # alone, and ``peer_has_all`` stays set on disk (``persisted_has_all``), so a power cut
    # meanwhile makes the restart fetch them back from the peer instead of copying over it
    # the copy the cut left here.
    flush_pending: bool = False
    auto_failover: bool = True
    auto_recover: bool = True
    mode: Mode = Mode.DETACHED
    confirmed: bool = False  # role at this epoch confirmed since start (peer or witness)
    alone: bool = False  # primary: may acknowledge writes its peer does not get
    peer_ready: bool = False  # primary: the peer holds the regions it lacks; leases may be granted
    peer_follows: bool = False  # primary: in this link session the peer said it is our secondary
    recovering: bool = False  # primary: a resync was asked for and has not ended
    recover_after: float = NEVER  # primary: no automatic resync starts before then
    peer_failed: bool = False  # primary: the peer's disk failed; no resync until a new link session
    split_brain: bool = False  # both sides wrote apart: no resync until the operator resolves it
    link_up: bool = False
    link_lost_at: float = NEVER  # secondary: when it last noticed the link dead (or started)
    lease_until: float = NEVER  # secondary: may serve until then
    lease_deadline: float = NEVER  # primary: the peer may be serving until then
    lease_asked: float | None = None  # secondary: a lease request in flight, sent then
    next_renewal: float = NEVER  # secondary: when to ask for the lease again
    witness_heard: float = NEVER  # when the witness last answered this array
    # When this array last sent the witness a request that may have reached it (sent on a
    # connection; its answer may have been lost): the witness may have heard it then.
    witness_sent: float = NEVER
    witness_until: float = NEVER  # primary: the witness cannot give the group away before then
    witness_lost_first: bool = False  # primary: the witness was gone before the peer (pre-elected)
    witness_in_doubt: bool = False  # primary: a HANDOVER went unanswered; not pre-elected until it answers
    witness_asking: WitnessAsk | None = None  # a request to the witness in flight
    next_witness_retry: float = NEVER
    claim_refused: str = ""  # secondary: the witness refused for good (until the link returns)
    last_refusal: str = ""  # the witness's last refusal, noted once
    transition_until: float = NEVER  # SWITCHING: the primary vanished half-way after this
    leaving: bool = False  # this array is shutting down: no more leases
    disk_peer_in_sync: bool = False  # disk failed here while the peer was attached: it has it all
    fence_reason: str = ""


# -- events ------------------------------------------------------------------------------------
# Every event carries ``now``: the daemon's monotonic clock when it happened.

@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: timers due at or before ``now`` fire."""
    now: float


@dataclass(frozen=True, slots=True)
class LinkUp:
    now: float


@dataclass(frozen=True, slots=True)
class LinkDown:
    now: float


@dataclass(frozen=True, slots=True)
class PeerLost:
    """Primary: the peer failed, refused or did not answer a replicated request."""
    now: float
    reason: str


@dataclass(frozen=True, slots=True)
class PeerState:
    """The peer's role and epoch for this group, as it said over the link (state exchange)."""
    now: float
    role: Role
    epoch: int
    started: bool | None = None  # the primary's setting (a secondary adopts it)
    disk_failed: bool = False  # the peer's backing device for the group failed
    claiming: bool = False  # the peer (secondary) is asking the witness for the group: not following


@dataclass(frozen=True, slots=True)
class LeaseRequested:
    """Primary: the secondary asks for its serve lease (frame at this epoch)."""
    now: float


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """Secondary: the primary answered the lease request sent at ``sent``."""
    now: float
    sent: float
    ms: int


@dataclass(frozen=True, slots=True)
class LeaseFailed:
    now: float


@dataclass(frozen=True, slots=True)
class WitnessReport:
    """The witness answered a periodic report sent at ``sent``: its record for the group."""
    now: float
    sent: float
    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class WitnessSent:
    """A request to the witness went out at ``sent`` on a connection (whatever comes of it):
    the witness may have heard this array then, even if no answer ever comes back."""
    now: float
    sent: float


@dataclass(frozen=True, slots=True)
class WitnessAnswer:
    """The witness decided on a KEEP, CLAIM or RESOLVE sent at ``sent``; ``granted`` None =
    unreachable (no answer)."""
    now: float
    sent: float
    ask: WitnessAsk
    granted: bool | None
    owner: str = ""
    epoch: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ResyncBegun:
    """Primary: the peer accepted the regions it lacks (RESYNC_BEGIN): it may serve again."""
    now: float


@dataclass(frozen=True, slots=True)
class ResyncDone:
    now: float


@dataclass(frozen=True, slots=True)
class ResyncEnded:
    """Primary: the resync task ended (done, failed or cut short)."""
    now: float


@dataclass(frozen=True, slots=True)
class UncleanStop:
    """Either role, as it starts: its last run stopped uncleanly (crash, kill -9, power cut) while
    it was writing some regions (its write-intent log names them)."""
    now: float


@dataclass(frozen=True, slots=True)
class Flushed:
    """Primary: the volumes were flushed after ``FlushVolumes`` (every write applied before it
    is durable)."""
    now: float


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """Primary: what the peer may hold newer (``peer_newer``) is here again: fetched back, or the
    state exchange found the peer does not hold it newer (it stopped uncleanly too). Secondary:
    the primary resynced the regions it reported after its unclean stop (``adopt_gen``)."""
    now: float


@dataclass(frozen=True, slots=True)
class NeedSync:
    """Primary: regions of a volume must be copied again (a volume admitted to a running group,
    online verify found a difference)."""
    now: float


@dataclass(frozen=True, slots=True)
class Recover:
    """The operator asks for a resync of the returned peer (``auto_recover`` off)."""
    now: float


@dataclass(frozen=True, slots=True)
class Started:
    now: float


@dataclass(frozen=True, slots=True)
class Stopped:
    now: float


@dataclass(frozen=True, slots=True)
class Policies:
    now: float
    auto_failover: bool
    auto_recover: bool


@dataclass(frozen=True, slots=True)
class ShuttingDown:
    """This array is being shut down: a secondary stops serving and asks for no more leases
    (the primary is told it may go on at once)."""
    now: float


@dataclass(frozen=True, slots=True)
class PeerLeaving:
    """Primary: the secondary is shutting down and gave its lease back."""
    now: float


@dataclass(frozen=True, slots=True)
class PeerDiskFailed:
    """Primary: the secondary's backing device failed."""
    now: float


@dataclass(frozen=True, slots=True)
class DiskFailed:
    """A backing device of this group failed on this array."""
    now: float
    reason: str


@dataclass(frozen=True, slots=True)
class HandedOver:
    """This primary gave the group to its peer at ``epoch`` (through the witness when there is
    one): planned switchover (``in_sync``: the replicas are identical) or a failed disk."""
    now: float
    epoch: int
    in_sync: bool


@dataclass(frozen=True, slots=True)
class SwitchoverBegin:
    now: float


@dataclass(frozen=True, slots=True)
class SwitchoverEnd:
    """The switchover is over on this side (done or abandoned). ``in_doubt``: abandoned with the
    witness's answer to HANDOVER lost: it may have given the group to the peer."""
    now: float
    in_doubt: bool = False


@dataclass(frozen=True, slots=True)
class PeerSwitchoverPrepare:
    now: float
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerSwitchoverCommit:
    """The old primary handed the group to this array at ``epoch`` with identical replicas."""
    now: float
    epoch: int


@dataclass(frozen=True, slots=True)
class PeerSwitchoverAbort:
    now: float


@dataclass(frozen=True, slots=True)
class PeerTakeover:
    """The primary's disk failed and it handed the group to this array at ``epoch``."""
    now: float
    epoch: int


@dataclass(frozen=True, slots=True)
class Promote:
    """The operator made this secondary primary at ``epoch`` (failover granted by the witness,
    or an override without it: ``witness_behind``)."""
    now: float
    epoch: int
    why: str
    witness_behind: bool = False


@dataclass(frozen=True, slots=True)
class OverrideFailsafe:
    """The operator lets this primary leave failsafe and go on alone."""
    now: float
    why: str


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """Both sides wrote apart (data generations): no resync until the operator resolves it."""
    now: float


@dataclass(frozen=True, slots=True)
class Discard:
    """Split brain: the operator throws this array's side away; it becomes the peer's
    secondary."""
    now: float


@dataclass(frozen=True, slots=True)
class SplitBrainResolved:
    """Split brain resolved: as the surviving side (``survivor``) this array takes an epoch above
    both sides'; as the discarded side it takes the survivor's ``epoch``."""
    now: float
    survivor: bool
    epoch: int


Event = Union[
    Tick, LinkUp, LinkDown, PeerLost, PeerState, LeaseRequested, LeaseReply, LeaseFailed,
    WitnessReport, WitnessSent, WitnessAnswer, ResyncBegun, ResyncDone, ResyncEnded, UncleanStop, CaughtUp, Flushed,
    NeedSync,
    Recover, Started, Stopped,
    Policies, ShuttingDown, PeerLeaving, PeerDiskFailed, DiskFailed, HandedOver, SwitchoverBegin, SwitchoverEnd,
    PeerSwitchoverPrepare, PeerSwitchoverCommit, PeerSwitchoverAbort, PeerTakeover, Promote,
    OverrideFailsafe, SplitBrain, Discard, SplitBrainResolved,
]


# -- actions -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Persist:
    """A persisted field changed: write it before acting on it."""


@dataclass(frozen=True, slots=True)
class Note:
    msg: str


@dataclass(frozen=True, slots=True)
class RequestLease:
    timeout: float


@dataclass(frozen=True, slots=True)
class GrantLease:
    ms: int  # 0: the secondary may not serve


@dataclass(frozen=True, slots=True)
class AskWitness:
    ask: WitnessAsk


@dataclass(frozen=True, slots=True)
class ResetLink:
    """Drop every path: nothing sent in the old link session can arrive after this."""
    reason: str


@dataclass(frozen=True, slots=True)
class FenceOver:
    """The peer is fenced off: forwarded writes it never released are marked for resync and
    their ranges released; writes waiting for the fence go on (alone) or are refused."""


@dataclass(frozen=True, slots=True)
class FlushVolumes:
    """Flush every volume of the group, then feed ``Flushed`` (``RoleState.flush_pending``)."""


@dataclass(frozen=True, slots=True)
class StartResync:
    """Begin copying what the peer lacks: RESYNC_BEGIN per volume, then the copy."""


@dataclass(frozen=True, slots=True)
class NewGeneration:
    """This array starts acknowledging writes its peer will not have."""
    why: str


@dataclass(frozen=True, slots=True)
class BecamePrimary:
    """Took the group over: what may differ on the old primary is what this array's
    write-intent log marks and what the old one reports; compare those."""


@dataclass(frozen=True, slots=True)
class BecameSecondary:
    """Lost the group to the peer: every region is to be resynced from it; what this array was
    writing (its write-intent log) is reported to it so it compares those regions."""


@dataclass(frozen=True, slots=True)
class SwappedInSync:
    """Planned role change between identical replicas: nothing to resync."""


@dataclass(frozen=True, slots=True)
class DiskFailure:
    """Hand the group over (primary with an in-sync peer) or tell the primary (secondary)."""
    peer_in_sync: bool  # primary: the peer was attached and in sync when the disk failed


@dataclass(frozen=True, slots=True)
class TellPeer:
    """Run the state exchange with the peer again (this array's role changed while linked)."""


@dataclass(frozen=True, slots=True)
class AdoptGeneration:
    """The peer is in sync: tell it our data generation is now its own."""


Action = Union[
    Persist, Note, RequestLease, GrantLease, AskWitness, ResetLink, FenceOver, StartResync, FlushVolumes,
    NewGeneration, BecamePrimary, BecameSecondary, SwappedInSync, DiskFailure, AdoptGeneration, TellPeer,
]
Result = tuple[RoleState, list[Action]]
Handler = Callable[[RoleState, Timing, "Event"], Result]


# -- derived state -----------------------------------------------------------------------------

def witness_reachable(s: RoleState, t: Timing, now: float) -> bool:
    return t.witness is not None and now - s.witness_heard < t.witness.reachable_for()


def serving(s: RoleState, t: Timing, now: float) -> bool:
    """Whether this array may answer host I/O for the group now."""
    return now < serving_until(s, t)


def serving_until(s: RoleState, t: Timing) -> float:
    """Until when this array may answer host I/O for the group if the state does not change
    (``serving``; NEVER: not now, inf: for as long as the state holds)."""
    if not s.confirmed or s.failsafe or s.mode is Mode.DISK_FAILED:
        return NEVER
    if s.role is Role.SECONDARY:
        return s.lease_until if s.started and not s.leaving else NEVER
    if s.mode in MIRRORING or s.alone:
        return math.inf
    if s.mode in (Mode.FENCING, Mode.DECIDING):
        if s.peer_newer:
            return NEVER  # its copy may be older than acknowledged writes: nothing without the peer
        # Peer lost, not yet allowed to go on alone: reads are served while the witness
        # cannot have given the group away (writes wait for the fence).
        return math.inf if t.witness is None or s.witness_lost_first else s.witness_until
    return NEVER


def steady_until(s: RoleState, t: Timing) -> float:
    """Until when host I/O may take the fast path without asking again: ``now < steady_until``
    exactly when the array serves (``serving``) and roles are not changing (``transitioning``).
    Computed once per state change (``GroupRoles``), compared once per request."""
    if s.mode in (Mode.HANDING_OVER, Mode.SWITCHING, Mode.CLAIMING):
        return NEVER
    # Elsewhere ``transitioning`` is true only where ``serving`` is false.
    return serving_until(s, t)


def failover_possible(s: RoleState, t: Timing, now: float) -> bool:
    """Secondary cut from its primary, with a reachable witness that may give it the group."""
    return (s.role is Role.SECONDARY and s.started and s.auto_failover and not s.link_up and not s.peer_newer
            and not s.claim_refused and s.mode is Mode.FOLLOWING and witness_reachable(s, t, now))


def transitioning(s: RoleState, t: Timing, now: float) -> bool:
    """Roles are changing: host I/O waits (ALUA transitioning) instead of failing. So it does
    while a confirmed primary that lost its peer waits for the fence and the witness's answer
    (it serves or enters failsafe within a lease period)."""
    if s.mode in (Mode.HANDING_OVER, Mode.SWITCHING, Mode.CLAIMING):
        return True
    if s.role is Role.PRIMARY and s.confirmed and s.mode in (Mode.FENCING, Mode.DECIDING):
        return not serving(s, t, now)
    return failover_possible(s, t, now) and not serving(s, t, now)


def peer_in_sync(s: RoleState) -> bool:
    """Primary: the peer holds every write this array acknowledged (what its reports tell the
    witness: the peer may then be given the group)."""
    if s.role is not Role.PRIMARY or s.failsafe:
        return False
    return s.mode in (Mode.ATTACHED, Mode.HANDING_OVER) or (s.mode is Mode.DISK_FAILED and s.disk_peer_in_sync)


def path_state(*, serving: bool, role: Role, proximity: str | None = "all", transitioning: bool = False) -> int:
    """The ALUA state of one (host, volume) path: active/optimized when the host is proximal to
    this array's role (or 'all') and the array serves; active/non-optimized when it serves but is
    not proximal; transitioning during a role change; unavailable when it may not serve.

    ``proximity`` None: the host has no proximity for the group yet. The seed ("Host array
    proximity"): when ``active_active`` is first applied, every host path to the primary array
    is active/optimized and every path to the secondary active/non-optimized, until the
    administrator sets the host's proximity (admitrcopyhost). So an unset proximity is near
    the primary."""
    if transitioning:
        return ALUA_TRANSITIONING
    if not serving:
        return ALUA_UNAVAILABLE
    if proximity is None:
        proximity = Role.PRIMARY.value
    if proximity in ("all", role.value):
        return ALUA_ACTIVE_OPTIMIZED
    return ALUA_ACTIVE_NON_OPTIMIZED


def alua(s: RoleState, t: Timing, now: float, proximity: str | None = "all") -> int:
    return path_state(serving=serving(s, t, now), role=s.role, proximity=proximity,
                      transitioning=transitioning(s, t, now))


def next_timer(s: RoleState, t: Timing, now: float) -> float:
    """The earliest time after ``now`` at which a ``Tick`` can change something or the derived
    state (serving, ALUA) changes by itself; inf when nothing is pending. Deadlines already
    passed are not counted: the ``Tick`` at ``now`` has seen them."""
    due: list[float] = []
    if s.role is Role.PRIMARY:
        if s.mode in (Mode.STARTING, Mode.FENCING):
            due.append(s.lease_deadline)
        if _wants_keep_retry(s, t) or _wants_resolve(s, t):
            due.append(s.next_witness_retry)
        if s.mode in (Mode.FENCING, Mode.DECIDING) and t.witness is not None:
            due.append(s.witness_until)  # reads stop being served then
        if _may_recover(s) and s.auto_recover:
            due.append(s.recover_after)
    else:
        if s.mode is Mode.SWITCHING:
            due.append(s.transition_until)
        if s.mode is Mode.FOLLOWING and s.started and not s.leaving:
            if s.link_up and s.lease_asked is None:
                due.append(s.next_renewal)
            due.append(s.lease_until)  # serving stops; a claim may be due
            if not s.link_up and t.witness is not None:
                due.append(s.next_witness_retry)
                due.append(s.witness_heard + t.witness.reachable_for())  # ALUA may change then
                due.append(s.link_lost_at + t.witness.claim_after_link_loss())
    later = [d for d in due if d > now]
    return min(later) if later else math.inf


# -- helpers used by the rows ------------------------------------------------------------------

def _note(msg: str) -> Note:
    return Note(msg)


def _lose_peer(s: RoleState, t: Timing, now: float, reason: str, reset: bool = True) -> Result:
    """Primary: the peer stops mirroring. It may be serving under its lease until
    ``lease_deadline``; nothing unmirrored is acknowledged before then."""
    # Counted from what the witness may last have heard from us, not only from its last answer:
    # ``lost_first_after`` allows for one report after that answer (``interval``), but requests
    # sent on connections whose answers were lost may have reached it later and refreshed us
    # there (the role model found a primary that thought itself pre-elected while the witness,
    # which had heard it 3.9 s before, gave the peer the group: answers lost on the way back).
    lost_first = (t.witness is not None and not s.witness_in_doubt
                  and now - max(s.witness_heard, s.witness_sent - t.witness.interval)
                  > t.witness.lost_first_after())
    s2 = replace(s, mode=Mode.FENCING, peer_ready=False, alone=False, fence_reason=reason,
                 witness_lost_first=lost_first, recovering=False, peer_has_all=False)
    acts: list[Action] = [_note(f"peer lost ({reason}); waiting for its serve lease to expire")]
    if s.peer_has_all:
        acts.append(Persist())  # before anything is acknowledged alone
    if reset and s.link_up:
        # The peer failed a request while the link stayed up: a new link session, so nothing
        # of the old one can be applied after this array goes on alone.
        acts.append(ResetLink(reason))
    return s2, acts


PEER_NEWER = ("this array restarted after an unclean stop while its peer held every write it had "
              "acknowledged: the peer may hold writes this array lost, so it serves nothing without the "
              "peer until they are fetched back (setrcopygroup override accepts losing them)")


def _go_alone(s: RoleState, now: float, why: str, note: str) -> Result:
    s2 = replace(s, mode=Mode.DETACHED, alone=True, confirmed=True, failsafe=False,
                 witness_asking=None, last_refusal="", peer_has_all=False)
    acts: list[Action] = [FenceOver()]
    if s.failsafe:
        acts.append(_note(f"failsafe left: {why}"))
    acts += [NewGeneration("going on without the peer"), Persist(), _note(note)]
    return _maybe_recover(s2, acts, now)


def _not_alone(s: RoleState, now: float, why: str) -> Result:
    """The fence is over but this primary may not go on alone."""
    s2 = replace(s, mode=Mode.DETACHED, alone=False, witness_asking=None)
    if s.link_up:
        # The peer is reachable again: no failsafe, but no writing alone either until it
        # mirrors again (resync) or demotes this array.
        return _maybe_recover(s2, [FenceOver(), _note(f"not going on alone ({why}); waiting for the peer to resync")],
                              now)
    s2 = replace(s2, failsafe=True, fence_reason=why)
    return s2, [FenceOver(), _note(f"FAILSAFE: {why}"), Persist()]


def _may_recover(s: RoleState) -> bool:
    return (s.role is Role.PRIMARY and s.started and s.link_up and s.confirmed and s.peer_follows
            and s.mode is Mode.DETACHED and not s.recovering and not s.split_brain
            and not s.peer_failed)


RECOVER_SPACING = 1.0  # s between the starts of two resyncs: a peer that keeps failing is not hammered


def _maybe_recover(s: RoleState, acts: list[Action], now: float, operator: bool = False) -> Result:
    """Start mirroring to the returned peer and copying what it lacks, if the state allows and
    (unless the operator asks) the policy wants it and the last attempt is not too recent (a
    ``Tick`` tries again then)."""
    if _may_recover(s) and (operator or (s.auto_recover and now >= s.recover_after)):
        s = replace(s, mode=Mode.SYNCING, peer_ready=False, alone=False, recovering=True,
                    recover_after=now + RECOVER_SPACING)
        acts = acts + [_note("peer back; resynchronizing"), StartResync()]
    return s, acts


def _check_epoch(s: RoleState, epoch: int, what: str, strictly: bool) -> None:
    if epoch < s.epoch or (strictly and epoch == s.epoch):
        raise RoleError(f"{what} at epoch {epoch} refused: the group is at epoch {s.epoch} on "
                        f"{s.me} and epochs never go back")


def _promote(s: RoleState, now: float, epoch: int, msg: str) -> Result:
    _check_epoch(s, epoch, "taking the group over", strictly=True)
    s2 = replace(s, role=Role.PRIMARY, epoch=epoch, failsafe=False, witness_behind=False, peer_has_all=False,
                 peer_newer=False, mode=Mode.DETACHED, alone=True, confirmed=True, peer_ready=False, recovering=False,
                 lease_until=NEVER, lease_deadline=NEVER, lease_asked=None, witness_asking=None,
                 claim_refused="", last_refusal="")
    acts: list[Action] = [BecamePrimary(), _note(msg), NewGeneration(f"took the group over at epoch {epoch}"),
                          Persist()]
    return _maybe_recover(s2, acts, now)


def _demote(s: RoleState, epoch: int, why: str) -> Result:
    _check_epoch(s, epoch, "stepping down", strictly=False)
    s2 = replace(s, role=Role.SECONDARY, epoch=epoch, failsafe=False, witness_behind=False, peer_has_all=False,
                 peer_newer=False, mode=Mode.DISK_FAILED if s.mode is Mode.DISK_FAILED else Mode.FOLLOWING,
                 alone=False, confirmed=False, peer_ready=False,
                 recovering=False, lease_until=NEVER, lease_asked=None, next_renewal=NEVER,
                 witness_asking=None, claim_refused="", last_refusal="")
    acts: list[Action] = [FenceOver()] if s.role is Role.PRIMARY else []  # forwarded holds go
    return s2, acts + [BecameSecondary(), _note(f"{why}: now secondary"), Persist()]


def _refusal(s: RoleState, reason: str, prefix: str) -> tuple[RoleState, list[Action]]:
    if reason == s.last_refusal:
        return s, []
    return replace(s, last_refusal=reason), [_note(f"{prefix}: {reason}")]


def _wants_keep_retry(s: RoleState, t: Timing) -> bool:
    return (t.witness is not None and s.role is Role.PRIMARY and s.failsafe and s.started
            and not s.link_up and s.mode is Mode.DETACHED and s.witness_asking is None and not s.peer_newer)


def _wants_resolve(s: RoleState, t: Timing) -> bool:
    return (t.witness is not None and s.role is Role.PRIMARY and s.witness_behind
            and not s.split_brain and s.mode in MIRRORING and s.witness_asking is None)


# -- the rows ----------------------------------------------------------------------------------

def _tick(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, Tick)
    now = e.now
    acts: list[Action] = []
    if s.role is Role.PRIMARY:
        if s.mode in (Mode.STARTING, Mode.FENCING) and now >= s.lease_deadline:
            # Every lease this array (or its previous run) granted has expired.
            if s.peer_newer:
                # Nothing to ask the witness: whatever it answers, this array may not go on alone.
                return _not_alone(s, now, PEER_NEWER)
            if t.witness is None:
                return _go_alone(s, now, "no witness: this array goes on alone",
                                 "peer fenced off; going on alone, tracking written regions")
            s = replace(s, mode=Mode.DECIDING, witness_asking=WitnessAsk.KEEP)
            return s, [AskWitness(WitnessAsk.KEEP)]
        if _may_recover(s) and s.auto_recover and now >= s.recover_after:
            return _maybe_recover(s, [], now)
        if _wants_keep_retry(s, t) and witness_reachable(s, t, now) and now >= s.next_witness_retry:
            assert t.witness is not None
            s = replace(s, witness_asking=WitnessAsk.KEEP, next_witness_retry=now + t.witness.interval)
            return s, [AskWitness(WitnessAsk.KEEP)]
        if _wants_resolve(s, t) and witness_reachable(s, t, now) and now >= s.next_witness_retry:
            assert t.witness is not None
            s = replace(s, witness_asking=WitnessAsk.RESOLVE, next_witness_retry=now + t.witness.interval)
            return s, [AskWitness(WitnessAsk.RESOLVE)]
        return s, acts
    if s.mode is Mode.SWITCHING and now >= s.transition_until:
        return replace(s, mode=Mode.FOLLOWING), [_note("transition over: switchover not completed in time")]
    if s.mode is not Mode.FOLLOWING or not s.started:
        return s, acts
    if s.link_up:
        if s.lease_asked is None and now >= s.next_renewal and not s.leaving:
            s = replace(s, lease_asked=now)
            acts.append(RequestLease(t.lease_request_timeout()))
        return s, acts
    if (t.witness is not None and s.auto_failover and not s.claim_refused and not s.peer_newer
            and now >= s.lease_until and now >= s.next_witness_retry and s.witness_asking is None
            and now >= s.link_lost_at + t.witness.claim_after_link_loss()):
        s = replace(s, next_witness_retry=now + t.witness.interval)
        if witness_reachable(s, t, now):
            # Host I/O waits (transitioning) for the witness's answer.
            s = replace(s, mode=Mode.CLAIMING, witness_asking=WitnessAsk.CLAIM)
            acts.append(AskWitness(WitnessAsk.CLAIM))
    return s, acts


def _link_up(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, LinkUp)
    s = replace(s, link_up=True, claim_refused="", peer_follows=False)
    if s.role is Role.SECONDARY:
        s = replace(s, next_renewal=e.now, lease_asked=None)
    return s, []


def _link_down(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, LinkDown)
    s = replace(s, link_up=False, lease_asked=None, peer_follows=False, claim_refused="", link_lost_at=e.now)
    if s.role is Role.PRIMARY and s.mode in MIRRORING:
        return _lose_peer(s, t, e.now, "replication link down", reset=False)
    if (s.role is Role.PRIMARY and s.mode is Mode.DETACHED and s.started and not s.alone and not s.failsafe
            and not s.split_brain):
        # It waited, not alone, for the peer to resync it (``_not_alone`` with the link up): the
        # peer gone, that is failsafe, which the witness, the peer's return or the operator ends
        # (before, it stayed there with the override refused: found by review).
        why = PEER_NEWER if s.peer_newer else "the peer went before it resynchronized this array"
        return replace(s, failsafe=True, fence_reason=why), [_note(f"FAILSAFE: {why}"), Persist()]
    return s, []


def _peer_lost(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, PeerLost)
    if s.mode in MIRRORING:
        return _lose_peer(s, t, e.now, e.reason, reset=e.reason != "group stopped")
    return s, []


def _peer_state(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, PeerState)
    if s.role is Role.PRIMARY:
        if e.role is Role.PRIMARY and e.epoch > s.epoch:
            return _demote(s, e.epoch, f"the peer owns the group at epoch {e.epoch}")
        if e.role is Role.SECONDARY and e.epoch == s.epoch and e.claiming:
            # Its claim may yet be granted (a higher epoch): it follows only once it says so
            # again after the claim is over.
            return replace(s, peer_follows=False), [
                _note(f"{s.peer_name} is claiming the group from the witness: not following yet")]
        if e.role is Role.SECONDARY and e.epoch == s.epoch:
            acts: list[Action] = []
            if not s.confirmed:
                acts.append(_note(f"{s.peer_name} confirms this array as primary at epoch {s.epoch}"))
            s = replace(s, confirmed=True, peer_failed=e.disk_failed, peer_follows=True)
            if s.mode is Mode.STARTING:
                # Restarted and the peer is here: mirror at once (the peer's old lease does not
                # matter once it gets every write); if no resync may start, the fence runs on.
                if _may_recover(replace(s, mode=Mode.DETACHED)) and s.auto_recover:
                    return _maybe_recover(replace(s, mode=Mode.DETACHED), acts, e.now)
                return s, acts
            return _maybe_recover(s, acts, e.now)
        if e.role is Role.PRIMARY and e.epoch == s.epoch:
            return s, [_note(f"{s.peer_name} also claims to be primary at epoch {e.epoch}: roles conflict; "
                             "this array serves nothing it has not confirmed")]
        return s, []
    # secondary: the primary's epoch and settings
    if e.role is Role.PRIMARY:
        if e.epoch < s.epoch:
            return s, [_note(f"{s.peer_name} says it is primary at epoch {e.epoch}, below ours ({s.epoch})")]
        acts = []
        if e.epoch > s.epoch:
            s = replace(s, epoch=e.epoch, confirmed=False, lease_until=NEVER)
            acts.append(Persist())
        if e.started is not None and e.started != s.started:
            s = replace(s, started=e.started)
            if not e.started:
                s = replace(s, lease_until=NEVER)
            acts.append(Persist())
        return s, acts
    return s, []


def _lease_requested(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, LeaseRequested)
    # A primary whose disk failed while its peer was in sync lets the peer serve on (it has
    # every acknowledged write) while the group is handed to it.
    mirrored = (s.mode in MIRRORING and s.peer_ready) or (s.mode is Mode.DISK_FAILED and s.disk_peer_in_sync)
    if s.started and s.confirmed and mirrored:
        s = replace(s, lease_deadline=max(s.lease_deadline, e.now + t.lease_expiry()))
        return s, [GrantLease(int(t.lease * 1000))]
    return s, [GrantLease(0)]


def _lease_reply(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, LeaseReply)
    s = replace(s, lease_asked=None, next_renewal=e.now + t.renew_every())
    if e.ms <= 0:
        return replace(s, lease_until=NEVER), []
    # The lease runs from when the request was sent, so it ends before the primary's deadline.
    acts: list[Action] = []
    if not s.confirmed:
        acts.append(_note(f"{s.peer_name} confirms this array as secondary at epoch {s.epoch}"))
    return replace(s, confirmed=True, lease_until=max(s.lease_until, e.sent + e.ms / 1000)), acts


def _lease_failed(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, LeaseFailed)
    return replace(s, lease_asked=None, next_renewal=e.now + t.renew_every()), []


def _lease_stale(s: RoleState, t: Timing, e: Event) -> Result:
    return replace(s, lease_asked=None), []


def _witness_report(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, WitnessReport)
    if t.witness is None:
        return s, []  # the witness was removed while this report was under way
    s = replace(s, witness_heard=e.now, witness_in_doubt=False)
    if e.owner == s.me and e.epoch == s.epoch and s.role is Role.PRIMARY:
        # The witness owes this array its group until owner_lease after it received this report
        # (sent before it was received).
        return replace(s, witness_until=max(s.witness_until, e.sent + t.witness.owner_lease)), []
    if s.role is Role.PRIMARY and e.epoch > s.epoch and e.owner != s.me and s.mode is not Mode.HANDING_OVER:
        # The witness gave the group away (this array was cut off, or restarted after it had
        # been replaced): never serve at an epoch it moved past. (While handing over, the
        # witness already names the peer: the switchover decides.)
        return _demote(s, e.epoch, f"the witness gave the group to {e.owner} at epoch {e.epoch}")
    return s, []


def _witness_sent(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, WitnessSent)
    return (replace(s, witness_sent=e.sent), []) if e.sent > s.witness_sent else (s, [])


def _witness_answer(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, WitnessAnswer)
    if e.ask is not s.witness_asking:
        return s, []  # an answer to a question this state no longer asks
    s = replace(s, witness_asking=None)
    if e.granted is not None:
        s = replace(s, witness_heard=e.now, witness_in_doubt=False)
    mine = e.granted is True and e.owner == s.me
    if e.ask is WitnessAsk.KEEP and e.granted is False and e.epoch > s.epoch and e.owner != s.me:
        # The witness gave the group away meanwhile: never serve at an epoch it moved past.
        return _demote(s, e.epoch, f"the witness gave the group to {e.owner} at epoch {e.epoch}")
    if e.ask is WitnessAsk.KEEP:
        if s.mode is Mode.DECIDING:
            if mine and e.epoch == s.epoch:
                return _go_alone(s, e.now, "witness agreed", "peer fenced off; going on alone, tracking written "
                                 "regions (witness agreed)")
            if e.granted is None and s.witness_lost_first:
                return _go_alone(s, e.now, "witness was lost before the peer: pre-elected primary goes on",
                                 "peer fenced off; going on alone, tracking written regions (the witness was "
                                 "lost before the peer: pre-elected primary goes on)")
            if e.granted is None:
                why = ("lost the peer and the witness together: this array may be isolated, so it "
                       "serves nothing until the witness or the peer answers")
            else:
                why = f"witness: {e.reason}"
            return _not_alone(s, e.now, why)
        # failsafe retry: only a positive decision lets this array out
        if mine and e.epoch == s.epoch and s.failsafe and not s.link_up:
            return _go_alone(s, e.now, "witness agreed", "going on alone, tracking written regions")
        if e.granted is False:
            return _refusal(s, f"witness: {e.reason}", "still in failsafe")
        return s, []
    if e.ask is WitnessAsk.CLAIM:
        s = replace(s, mode=Mode.FOLLOWING)
        if mine and e.granted:
            return _promote(s, e.now, e.epoch, f"failover: now primary at epoch {e.epoch}")
        acts: list[Action] = []
        if e.granted is False:
            s, acts = _refusal(s, e.reason, "failover refused by the witness")
            if not may_grant_later(e.reason) and not s.link_up:
                # Stands while cut off; moot if the link came back while asking.
                s = replace(s, claim_refused=e.reason)
        if s.link_up:
            acts = acts + [TellPeer()]  # the primary heard "claiming" meanwhile: we follow it now
        return s, acts
    # RESOLVE
    if mine and e.epoch == s.epoch:
        return (replace(s, witness_behind=False),
                [Persist(), _note(f"the quorum witness knows this array's epoch {s.epoch} now ({e.reason})")])
    if e.granted is False:
        return _refusal(s, e.reason, f"the quorum witness refused epoch {s.epoch}")
    return s, []


def _resync_begun(s: RoleState, t: Timing, e: Event) -> Result:
    return replace(s, peer_ready=True), []


def _resync_done(s: RoleState, t: Timing, e: Event) -> Result:
    acts: list[Action] = []
    s2 = replace(s, mode=Mode.ATTACHED, peer_ready=True, peer_has_all=True, peer_newer=False)
    if s.failsafe:  # the peer took this array's data at this epoch
        s2 = replace(s2, failsafe=False)
        acts += [_note("failsafe left: the peer mirrors this array again")]
    return s2, acts + [Persist(), _note("in sync"), AdoptGeneration()]


SECONDARY_BEHIND = ("this array restarted after an unclean stop while it was writing: a power cut may have "
                    "taken mirrored writes {peer} acknowledged, so it does not take the group over until {peer} "
                    "has resynced those regions (setrcopygroup failover or override accepts losing them)")


def _unclean_stop(s: RoleState, t: Timing, e: Event) -> Result:
    if s.role is Role.SECONDARY:
        if s.peer_newer:
            return s, []
        return replace(s, peer_newer=True), [Persist(), _note(SECONDARY_BEHIND.format(peer=s.peer_name))]
    if not s.peer_has_all or s.peer_newer:
        return s, []  # it acknowledged writes alone since they were last in sync: its copy is the newer
    return replace(s, peer_newer=True), [
        Persist(), _note(f"{s.peer_name} may hold writes this array lost when it stopped: it serves nothing "
                         f"without {s.peer_name} until they are fetched back")]


def persisted_has_all(s: RoleState) -> bool:
    """``peer_has_all`` as written to disk: still set while the writes the peer holds too are
    being made durable here (``flush_pending``)."""
    return s.peer_has_all or s.flush_pending


def _flushed(s: RoleState, t: Timing, e: Event) -> Result:
    if not s.flush_pending:
        return s, []
    s2 = replace(s, flush_pending=False)
    return s2, [Persist()] if persisted_has_all(s2) != persisted_has_all(s) else []


def _caught_up(s: RoleState, t: Timing, e: Event) -> Result:
    if not s.peer_newer:
        return s, []
    if s.role is Role.SECONDARY:
        return replace(s, peer_newer=False), [
            Persist(), _note(f"{s.peer_name} resynced what the unclean stop may have taken: failover possible again")]
    return replace(s, peer_newer=False), [Persist()]


def _resync_ended(s: RoleState, t: Timing, e: Event) -> Result:
    s = replace(s, recovering=False)
    # The peer may have been lost and fenced off while the resync was winding down: go again.
    return _maybe_recover(s, [], e.now)


def _need_sync(s: RoleState, t: Timing, e: Event) -> Result:
    # The peer lacks regions now (a volume admitted, a difference found): after a power cut
    # here, its copy of them is not the newer one, and they must not be fetched back from it
    # (found by review: an admitted volume's only good copy was overwritten by the peer's blank
    # one). In sync again, ``ResyncDone`` sets it.
    acts: list[Action] = [Persist()] if s.peer_has_all else []
    s = replace(s, peer_has_all=False)
    if s.mode is Mode.ATTACHED:
        s = replace(s, mode=Mode.SYNCING)
        if s.recovering:
            return s, acts
        return replace(s, recovering=True), acts + [StartResync()]
    if s.mode is Mode.SYNCING:
        return s, acts
    return _maybe_recover(s, acts, e.now)


def _recover(s: RoleState, t: Timing, e: Event) -> Result:
    return _maybe_recover(s, [], e.now, operator=True)


def _started(s: RoleState, t: Timing, e: Event) -> Result:
    if s.started:
        return s, []
    s = replace(s, started=True)
    if s.role is Role.SECONDARY:
        return replace(s, next_renewal=e.now), [Persist()]
    return _maybe_recover(s, [Persist()], e.now, operator=True)


def _stopped(s: RoleState, t: Timing, e: Event) -> Result:
    if not s.started:
        return s, []
    s = replace(s, started=False)
    if s.role is Role.SECONDARY:
        return replace(s, lease_until=NEVER), [Persist()]
    if s.mode in MIRRORING:
        s, acts = _lose_peer(s, t, e.now, "group stopped", reset=False)
        return s, [Persist()] + acts
    return s, [Persist()]


def _policies(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, Policies)
    s = replace(s, auto_failover=e.auto_failover, auto_recover=e.auto_recover)
    return _maybe_recover(s, [], e.now) if s.role is Role.PRIMARY else (s, [])


def _shutting_down(s: RoleState, t: Timing, e: Event) -> Result:
    return replace(s, leaving=True, lease_until=NEVER), [_note("shutting down: serving nothing more")]


def _peer_leaving(s: RoleState, t: Timing, e: Event) -> Result:
    # The secondary stopped serving and gave its lease back: no need to wait for it.
    s = replace(s, lease_deadline=e.now)
    if s.mode in MIRRORING:
        return _lose_peer(s, t, e.now, f"{s.peer_name} shut down", reset=False)
    return s, []


def _peer_disk_failed(s: RoleState, t: Timing, e: Event) -> Result:
    s = replace(s, peer_failed=True)
    if s.mode in MIRRORING:
        return _lose_peer(s, t, e.now, f"{s.peer_name}'s backing device failed")
    return s, []


def _disk_failed(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, DiskFailed)
    in_sync = s.role is Role.PRIMARY and s.mode is Mode.ATTACHED and s.link_up
    s2 = replace(s, mode=Mode.DISK_FAILED, alone=False, peer_ready=False, recovering=False,
                 witness_asking=None, disk_peer_in_sync=in_sync)
    return s2, [_note(f"BACKING DEVICE FAILURE: {e.reason}; group stops on this array"), DiskFailure(in_sync)]


def _handed_over(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, HandedOver)
    _check_epoch(s, e.epoch, "handing the group over", strictly=True)
    if e.in_sync:
        # Planned switchover between identical replicas: the new secondary may serve at once
        # (the new primary starts with a granted lease, see _peer_commit).
        # Host I/O keeps waiting (SWITCHING) until the peer confirmed it is primary.
        s2 = replace(s, role=Role.SECONDARY, epoch=e.epoch, failsafe=False, mode=Mode.SWITCHING,
                     peer_has_all=False, peer_newer=False,
                     alone=False, confirmed=True, peer_ready=False, lease_until=e.now + t.lease,
                     lease_asked=None, next_renewal=e.now + t.renew_every(), witness_asking=None,
                     transition_until=e.now + 2 * t.transition_timeout)
        return s2, [SwappedInSync(), _note(f"switchover: now secondary at epoch {e.epoch}"), Persist()]
    s2 = replace(s, role=Role.SECONDARY, epoch=e.epoch, failsafe=False, alone=False, confirmed=False,
                 peer_has_all=False, peer_newer=False,
                 peer_ready=False, lease_until=NEVER, lease_asked=None, witness_asking=None)
    return s2, [_note(f"handed the group to {s.peer_name} at epoch {e.epoch} (backing device failed)"), Persist()]


def _switchover_begin(s: RoleState, t: Timing, e: Event) -> Result:
    if not (s.started and s.link_up and not s.recovering):
        raise RoleError("the group is not started, synced and linked to its peer")
    return replace(s, mode=Mode.HANDING_OVER), [_note(f"transitioning: switchover to {s.peer_name}")]


def _switchover_end(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, SwitchoverEnd)
    if s.mode in (Mode.HANDING_OVER, Mode.SWITCHING):
        mode = Mode.ATTACHED if s.role is Role.PRIMARY else Mode.FOLLOWING
        # In doubt (the witness's answer to HANDOVER was lost), its record may name the peer:
        # until the witness answers again this array must not go on alone on the strength of
        # having lost it first.
        doubt = s.witness_in_doubt or (e.in_doubt and s.role is Role.PRIMARY)
        return replace(s, mode=mode, witness_in_doubt=doubt), [_note("transition over: switchover")]
    return s, []


def _peer_prepare(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, PeerSwitchoverPrepare)
    if e.epoch != s.epoch:
        raise RoleError(f"cannot switch over from epoch {e.epoch}: the group is at epoch {s.epoch}")
    return (replace(s, mode=Mode.SWITCHING, transition_until=e.now + 2 * t.transition_timeout),
            [_note(f"transitioning: switchover from {s.peer_name}")])


def _peer_commit(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, PeerSwitchoverCommit)
    if s.role is Role.PRIMARY:
        if s.epoch >= e.epoch:
            return s, []  # already done (a retried commit, or the witness gave it to us meanwhile)
        raise RoleError(f"commit of epoch {e.epoch} refused: this array is primary at epoch {s.epoch}")
    _check_epoch(s, e.epoch, "switchover commit", strictly=True)
    s2 = replace(s, role=Role.PRIMARY, epoch=e.epoch, failsafe=False, witness_behind=False, peer_has_all=True,
                 peer_newer=False, mode=Mode.ATTACHED, alone=False, confirmed=True, peer_ready=True, recovering=False,
                 lease_until=NEVER, lease_deadline=e.now + t.lease_expiry(), lease_asked=None,
                 witness_asking=None, claim_refused="")
    return s2, [SwappedInSync(), _note(f"switchover: now primary at epoch {e.epoch}"), Persist()]


def _peer_abort(s: RoleState, t: Timing, e: Event) -> Result:
    if s.mode is Mode.SWITCHING:
        return replace(s, mode=Mode.FOLLOWING), [_note("transition over: switchover aborted by the primary")]
    return s, []


def _peer_takeover(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, PeerTakeover)
    if s.role is Role.PRIMARY:
        if s.epoch >= e.epoch:
            return s, []
        raise RoleError(f"takeover at epoch {e.epoch} refused: this array is primary at epoch {s.epoch}")
    # The old primary's disk failed: no resync until it says it is back (state exchange).
    return _promote(replace(s, mode=Mode.FOLLOWING, peer_failed=True), e.now, e.epoch,
                    f"took over at epoch {e.epoch}: {s.peer_name}'s backing device failed")


def _operator_promote(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, Promote)
    s, acts = _promote(replace(s, mode=Mode.FOLLOWING), e.now, e.epoch, e.why)
    if e.witness_behind:
        s = replace(s, witness_behind=True)
    return s, acts


def _override(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, OverrideFailsafe)
    if not s.failsafe:
        raise RoleError("the group is not in failsafe")
    s2 = replace(s, failsafe=False, alone=True, confirmed=True, mode=Mode.DETACHED, witness_asking=None,
                 peer_has_all=False, peer_newer=False)
    acts: list[Action] = [NewGeneration("failsafe overridden: writing without the peer"), Persist(),
                          _note(f"failsafe overridden ({e.why})")]
    return _maybe_recover(s2, acts, e.now)


def _split_brain(s: RoleState, t: Timing, e: Event) -> Result:
    return replace(s, split_brain=True), []


def _discard(s: RoleState, t: Timing, e: Event) -> Result:
    if not s.split_brain:
        raise RoleError("the group is not in split brain")
    if s.role is Role.PRIMARY:
        # Serve nothing of our own any more before the peer starts copying.
        s, acts = _demote(s, s.epoch, "the operator discarded this array's side of the split brain")
        return replace(s, split_brain=False), acts
    return replace(s, split_brain=False), []


def _resolved(s: RoleState, t: Timing, e: Event) -> Result:
    assert isinstance(e, SplitBrainResolved)
    if e.survivor:
        if s.role is not Role.PRIMARY:
            raise RoleError("this array is not primary: it cannot be the surviving side")
        # A new epoch above both sides' (each served alone at its own): one primary per epoch.
        epoch = max(s.epoch, e.epoch) + 1
        # The discarded side says when it has taken the new epoch (resync_me): no resync before.
        return (replace(s, split_brain=False, epoch=epoch, witness_behind=t.witness is not None, peer_follows=False),
                [Persist()])
    _check_epoch(s, e.epoch, "adopting the survivor's epoch", strictly=False)
    return replace(s, epoch=e.epoch), [Persist()]


def _ignore(s: RoleState, t: Timing, e: Event) -> Result:
    return s, []


# -- the table ---------------------------------------------------------------------------------

P, S = Role.PRIMARY, Role.SECONDARY
ALL_P = frozenset({Mode.STARTING, Mode.FENCING, Mode.DECIDING, Mode.DETACHED, Mode.SYNCING,
                   Mode.ATTACHED, Mode.HANDING_OVER, Mode.DISK_FAILED})
ALL_S = frozenset({Mode.FOLLOWING, Mode.CLAIMING, Mode.SWITCHING, Mode.DISK_FAILED})
UP_P = ALL_P - {Mode.DISK_FAILED}
UP_S = ALL_S - {Mode.DISK_FAILED}


@dataclass(frozen=True, slots=True)
class Row:
    role: Role
    modes: frozenset[Mode]
    event: type
    handler: Handler
    doc: str = field(default="", compare=False)


TABLE_ROWS: tuple[Row, ...] = (
    # time and the link
    Row(P, ALL_P, Tick, _tick, "leases run out: fence over, ask the witness, retry failsafe"),
    Row(S, ALL_S, Tick, _tick, "renew the lease; claim the group when the primary is gone"),
    Row(P, ALL_P, LinkUp, _link_up), Row(S, ALL_S, LinkUp, _link_up),
    Row(P, ALL_P, LinkDown, _link_down, "a mirroring primary loses its peer"),
    Row(S, ALL_S, LinkDown, _link_down, "the lease just runs out"),
    Row(P, ALL_P, PeerLost, _peer_lost, "a replicated request failed: fence the peer off"),
    Row(P, ALL_P, PeerState, _peer_state, "the peer confirms this primary, or owns a higher epoch"),
    Row(S, ALL_S, PeerState, _peer_state, "the primary's epoch and settings"),
    # leases
    Row(P, ALL_P, LeaseRequested, _lease_requested, "granted only while mirroring to a ready peer"),
    Row(S, ALL_S, LeaseReply, _lease_reply, "a grant confirms this secondary"),
    Row(S, ALL_S, LeaseFailed, _lease_failed),
    Row(P, ALL_P, LeaseReply, _lease_stale, "a reply from before this array became primary"),
    Row(P, ALL_P, LeaseFailed, _lease_stale),
    # the witness
    Row(P, ALL_P, WitnessReport, _witness_report, "the witness owes us the group; or it moved on"),
    Row(S, ALL_S, WitnessReport, _witness_report),
    Row(P, ALL_P, WitnessSent, _witness_sent, "the witness may have heard us then"),
    Row(S, ALL_S, WitnessSent, _witness_sent),
    Row(P, ALL_P, WitnessAnswer, _witness_answer, "KEEP after the fence or in failsafe; RESOLVE"),
    Row(S, ALL_S, WitnessAnswer, _witness_answer, "CLAIM granted: take the group over"),
    # resync (primary)
    Row(P, frozenset({Mode.SYNCING}), ResyncBegun, _resync_begun),
    Row(P, ALL_P - {Mode.SYNCING}, ResyncBegun, _ignore, "a resync cut short by a lost peer"),
    Row(P, frozenset({Mode.SYNCING}), ResyncDone, _resync_done),
    Row(P, ALL_P - {Mode.SYNCING}, ResyncDone, _ignore),
    Row(P, ALL_P, ResyncEnded, _resync_ended),
    Row(P, frozenset({Mode.STARTING}), UncleanStop, _unclean_stop, "the peer may hold writes this array lost"),
    Row(P, ALL_P, CaughtUp, _caught_up, "what the peer held newer is here again"),
    Row(P, ALL_P, Flushed, _flushed, "what the peer holds too is durable here"),
    Row(S, ALL_S, Flushed, _flushed, "demoted meanwhile"),
    Row(S, ALL_S, CaughtUp, _caught_up, "the primary resynced what an unclean stop may have taken here"),
    Row(S, frozenset({Mode.FOLLOWING}), UncleanStop, _unclean_stop, "mirrored writes may be lost here"),
    Row(S, ALL_S, ResyncEnded, _ignore, "demoted while a resync was winding down"),
    Row(P, UP_P, NeedSync, _need_sync),
    Row(P, frozenset({Mode.DETACHED}), Recover, _recover),
    # operator verbs and the peer's control requests
    Row(P, UP_P, Started, _started), Row(S, UP_S, Started, _started),
    Row(P, ALL_P, Stopped, _stopped), Row(S, ALL_S, Stopped, _stopped),
    Row(P, ALL_P, Policies, _policies), Row(S, ALL_S, Policies, _policies),
    Row(S, ALL_S, ShuttingDown, _shutting_down), Row(P, ALL_P, ShuttingDown, _ignore),
    Row(P, ALL_P, PeerLeaving, _peer_leaving),
    Row(P, ALL_P, PeerDiskFailed, _peer_disk_failed),
    Row(P, UP_P, DiskFailed, _disk_failed), Row(S, UP_S, DiskFailed, _disk_failed),
    Row(P, frozenset({Mode.ATTACHED}), SwitchoverBegin, _switchover_begin),
    Row(P, ALL_P, SwitchoverEnd, _switchover_end), Row(S, ALL_S, SwitchoverEnd, _switchover_end),
    Row(P, frozenset({Mode.HANDING_OVER}), HandedOver, _handed_over, "planned switchover"),
    Row(P, frozenset({Mode.DISK_FAILED}), HandedOver, _handed_over, "the disk failed"),
    Row(S, frozenset({Mode.FOLLOWING}), PeerSwitchoverPrepare, _peer_prepare),
    Row(S, frozenset({Mode.FOLLOWING, Mode.SWITCHING}), PeerSwitchoverCommit, _peer_commit),
    Row(P, UP_P, PeerSwitchoverCommit, _peer_commit, "a retried commit"),
    Row(S, ALL_S, PeerSwitchoverAbort, _peer_abort), Row(P, ALL_P, PeerSwitchoverAbort, _ignore),
    Row(S, frozenset({Mode.FOLLOWING, Mode.SWITCHING}), PeerTakeover, _peer_takeover),
    Row(P, UP_P, PeerTakeover, _peer_takeover, "a retried takeover"),
    Row(S, frozenset({Mode.FOLLOWING, Mode.CLAIMING}), Promote, _operator_promote,
        "failover or override by the operator"),
    Row(P, frozenset({Mode.DETACHED}), OverrideFailsafe, _override),
    Row(P, ALL_P, SplitBrain, _split_brain), Row(S, ALL_S, SplitBrain, _split_brain),
    Row(P, ALL_P, Discard, _discard), Row(S, ALL_S, Discard, _discard),
    Row(P, ALL_P, SplitBrainResolved, _resolved), Row(S, ALL_S, SplitBrainResolved, _resolved),
)


def _build_table(rows: tuple[Row, ...]) -> dict[tuple[Role, Mode, type], Handler]:
    table: dict[tuple[Role, Mode, type], Handler] = {}
    for r in rows:
        for m in r.modes:
            key = (r.role, m, r.event)
            if key in table:
                raise AssertionError(f"two rows for {key}")
            table[key] = r.handler
    return table


TABLE = _build_table(TABLE_ROWS)


# -- the owner ---------------------------------------------------------------------------------

class GroupRoles:
    """The only writer of a group's control state: ``handle(event)`` returns the actions."""

    def __init__(self, state: RoleState, timing: Timing) -> None:
        self._timing = timing
        self._set(state)

    @property
    def timing(self) -> Timing:
        return self._timing

    @timing.setter
    def timing(self, timing: Timing) -> None:  # the witness was reconfigured
        self._timing = timing
        self._set(self._state)

    def _set(self, state: RoleState) -> None:
        self._state = state
        # What the per-request fast paths read (see ``steady_until``), derived here, where the
        # state changes, instead of from the state and the clock for every request.
        self.steady_until = steady_until(state, self._timing)
        self.is_primary = state.role is Role.PRIMARY
        self.mirroring = state.mode in MIRRORING

    @classmethod
    def at_start(cls, *, me: str, peer: str, role: Role, epoch: int, started: bool, failsafe: bool,
                 witness_behind: bool, auto_failover: bool, auto_recover: bool, timing: Timing,
                 now: float, peer_has_all: bool = False, peer_newer: bool = False) -> "GroupRoles":
        """A group as this array (re)starts: nothing is confirmed. A primary cannot know whether
        its previous run granted a lease that still runs: it fences its peer off first. After an
        unclean stop the daemon says so next (``UncleanStop``); ``peer_newer`` is as persisted,
        for either role."""
        mode = Mode.STARTING if role is Role.PRIMARY else Mode.FOLLOWING
        primary = role is Role.PRIMARY
        st = RoleState(me=me, peer_name=peer, role=role, epoch=epoch, started=started, failsafe=failsafe,
                       witness_behind=witness_behind, auto_failover=auto_failover, auto_recover=auto_recover,
                       peer_has_all=peer_has_all and primary,
                       peer_newer=peer_newer,
                       mode=mode, lease_deadline=now + timing.lease_expiry() if role is Role.PRIMARY else NEVER,
                       link_lost_at=now,
                       # The witness may have heard the previous run up to now (review: a restarted
                       # primary that never reached it again counted itself pre-elected).
                       witness_sent=now,
                       fence_reason="node start" if role is Role.PRIMARY else "")
        return cls(st, timing)

    @classmethod
    def created(cls, *, me: str, peer: str, role: Role, epoch: int, auto_failover: bool, auto_recover: bool,
                timing: Timing, link_up: bool) -> "GroupRoles":
        """A group created now, both arrays agreeing on who is primary (the peer accepted it over
        the link): confirmed. Its primary serves alone until the group is started and synced."""
        primary = role is Role.PRIMARY
        st = RoleState(me=me, peer_name=peer, role=role, epoch=epoch, auto_failover=auto_failover,
                       auto_recover=auto_recover, mode=Mode.DETACHED if primary else Mode.FOLLOWING,
                       confirmed=primary, alone=primary, link_up=link_up, peer_follows=primary and link_up)
        return cls(st, timing)

    @property
    def state(self) -> RoleState:
        return self._state

    def handle(self, event: Event) -> list[Action]:
        s = self._state
        handler = TABLE.get((s.role, s.mode, type(event)))
        if handler is None:
            raise RoleError(f"{type(event).__name__} is not possible while {s.role.value} is {s.mode.value}")
        new, actions = handler(s, self.timing, event)
        if new.epoch < s.epoch:  # the one promise no row may break
            raise RoleError(f"epoch would go back from {s.epoch} to {new.epoch}")
        if new.role is Role.PRIMARY and not new.peer_has_all and not isinstance(event, Flushed) and (
                s.peer_has_all or s.role is not Role.PRIMARY):
            # It stops holding only writes its peer has too (the peer lost, a resync needed),
            # or it takes the group over with writes the old primary acknowledged: those are
            # made durable here before anything is acknowledged alone (``flush_pending``).
            new = replace(new, flush_pending=True)
            actions = actions + [FlushVolumes()]
        elif new.role is not Role.PRIMARY and new.flush_pending:
            new = replace(new, flush_pending=False)
        self._set(new)
        return actions

    # derived
    def serving(self, now: float) -> bool:
        return serving(self._state, self.timing, now)

    def transitioning(self, now: float) -> bool:
        return transitioning(self._state, self.timing, now)

    def failover_possible(self, now: float) -> bool:
        return failover_possible(self._state, self.timing, now)

    def witness_reachable(self, now: float) -> bool:
        return witness_reachable(self._state, self.timing, now)

    def alua(self, now: float, proximity: str | None = "all") -> int:
        return alua(self._state, self.timing, now, proximity)

    def next_timer(self, now: float) -> float:
        return next_timer(self._state, self.timing, now)
