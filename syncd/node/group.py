"""A replication group at run time: the I/O shell of its role machine, and its volumes.

The group's control state (role, epoch, how the peer is attached, failsafe, leases, transitions)
is owned by ``roles.GroupRoles``; this module feeds it events and carries out the actions it
returns: lease requests, questions to the witness, resyncs, link resets, persistence. ``handle``
is the only place that copies the machine's persisted fields into the group's metadata. The host
data path (both ends of mirroring and forwarding) is ``datapath.DataPath``.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import trio

from ..nbd.export import AluaState
from ..ranges import Bitmap, RangeLock
from ..repl.link import LinkDown, LinkTimeout
from ..repl.proto import Frame, Status
from .datapath import DataPath
from .intent import IntentLog, set_bits
from .iscsi import reservation_states
from .roles import (
    MIRRORING,
    AdoptGeneration,
    AskWitness,
    BecamePrimary,
    BecameSecondary,
    CaughtUp,
    DiskFailure,
    Event,
    FenceOver,
    Flushed,
    FlushVolumes,
    GroupRoles,
    LeaseFailed,
    LeaseReply,
    Mode,
    NeedSync,
    NewGeneration,
    Note,
    PeerDiskFailed,
    PeerLost,
    Persist,
    Policies,
    RequestLease,
    ResetLink,
    ResyncBegun,
    ResyncEnded,
    Role,
    RoleError,
    RoleState,
    SplitBrain,
    StartResync,
    SwappedInSync,
    TellPeer,
    Tick,
    WitnessAnswer,
    WitnessAsk,
    WitnessReport,
    WitnessSent,
    persisted_has_all,
)
from .state import GroupState, MemberState, decode_bits
from .volume import Volume

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("syncd.group")

GEN_HISTORY = 16  # earlier data generations kept per group


class Member:
    """One volume of a group on this node."""

    def __init__(self, group: "Group", st: MemberState, vol: Volume, region: int):
        self.group = group
        self.st = st
        self.vol = vol
        self.lock = RangeLock()
        # Primary: regions that may differ on the peer. Secondary: regions not yet in sync here
        # (reads of those are forwarded to the primary).
        self.dirty = Bitmap(vol.size, region, decode_bits(st.dirty))
        self.oos = Bitmap(vol.size, region)
        self.oos.set_all()
        self.verify = not st.synced_once  # compare digests before copying (initial/full sync)
        self.resync_total = 0
        self.resync_bytes = 0
        self.resync_started: float | None = None
        self.stats = {"reads": 0, "writes": 0, "forwarded": 0, "bytes_read": 0, "bytes_written": 0}
        self.intent: IntentLog  # set by Group.add_member
        self.suspect_regions: set[int] = set()  # secondary: regions to report to the primary
        # Primary restarted after an unclean stop: the regions it was writing (write-intent log).
        # Decided at the state exchange: fetched back from a peer that has every acknowledged
        # write (``pull``), else compared and copied to the peer (``dirty``).
        self.crash_regions: list[int] = []
        # Primary: regions whose newest acknowledged data is the peer's (lost here in a power
        # cut): reads of them go to the peer until they are fetched back (resync, first).
        self.pull = Bitmap(vol.size, region)
        # Primary: regions the peer's copy is known to be wrong in (``MemberState.peer_wrong``).
        self.peer_wrong = Bitmap(vol.size, region, decode_bits(st.peer_wrong))

    def compare_all(self) -> None:
        """Primary: every region may differ on the peer; compare them all by digest (recorded
        in the write-intent log, so a crash before the comparison does not forget it)."""
        self.dirty.set_all()
        self.verify = True
        intent = getattr(self, "intent", None)
        if intent is not None:
            intent.set_sync()

    @property
    def vol_id(self) -> int:
        return self.st.vol_id

    def facts(self) -> dict:
        """What the event bus shows of this volume."""
        status, _ = self.sync_status()
        return {"group": self.group.name, "volume": self.st.local, "peer_volume": self.st.remote,
                "size": self.vol.size, "sync": status}

    def sync_status(self) -> tuple[str, float]:
        g = self.group
        if not g.st.started:
            return "stopped", 0.0
        if g.role == "primary":
            if g.mode is Mode.ATTACHED and not self.dirty.count:
                return "synced", 100.0
            pct = 100.0 * (1 - self.dirty.count / max(self.dirty.nregions, 1))
            if g.mode is Mode.SYNCING:
                return "syncing", pct
            return "not-synced", pct
        pct = 100.0 * (1 - self.oos.count / max(self.oos.nregions, 1))
        if not g.may_serve():
            return "not-synced" if self.oos.count else "stopped", pct
        return ("synced", 100.0) if not self.oos.count else ("syncing", pct)


def role_change_cause(before: RoleState, after: RoleState) -> str:
    """Why the role changed: a planned switchover, or a failover (taken over / replaced)."""
    if before.mode in (Mode.SWITCHING, Mode.HANDING_OVER):
        return "switchover"
    return "failover" if after.role is Role.PRIMARY else "replaced"


def transition_level(before: RoleState, after: RoleState) -> int:
    """How loud a step of the role machine is in the log: entering split brain is an error;
    a failover (taking the group over, or losing it to the peer) and entering failsafe are
    warnings; the rest is routine."""
    if after.split_brain and not before.split_brain:
        return logging.ERROR
    if after.failsafe and not before.failsafe:
        return logging.WARNING
    if before.role is not after.role and role_change_cause(before, after) != "switchover":
        return logging.WARNING
    return logging.INFO


_ASK_TYPE = {WitnessAsk.KEEP: "KEEP", WitnessAsk.CLAIM: "CLAIM", WitnessAsk.RESOLVE: "RESOLVE"}


class Group:
    def __init__(self, node: "Node", st: GroupState, created: bool = False):
        self.node = node
        self.st = st
        # The node's link session (``Node.exchanged``) at this group's last report sent, and at
        # the last one the witness answered (``Node._report_flags``: REPORT_LOST_ANEW).
        self.session_sent: trio.Event | None = None
        self.session_reported: trio.Event | None = None
        self.members: dict[str, Member] = {}
        self.by_id: dict[int, Member] = {}
        now = trio.current_time()
        pol = st.policies
        if created:
            self.roles = GroupRoles.created(
                me=node.cfg.name, peer=st.peer, role=Role(st.role), epoch=st.epoch,
                auto_failover=pol.get("auto_failover", True), auto_recover=pol.get("auto_recover", True),
                timing=node.role_timing(), link_up=node.link is not None and node.link.up)
        else:
            self.roles = GroupRoles.at_start(
                me=node.cfg.name, peer=st.peer, role=Role(st.role), epoch=st.epoch, started=st.started,
                failsafe=st.failsafe, witness_behind=st.witness_behind,
                auto_failover=pol.get("auto_failover", True), auto_recover=pol.get("auto_recover", True),
                timing=node.role_timing(), now=now, peer_has_all=st.peer_has_all, peer_newer=st.peer_newer)
        if st.split_brain:
            self.roles.handle(SplitBrain(now))
        self.io = DataPath(self)
        self.events: list[tuple[float, str]] = []
        self.last_recover = -1e9
        self._changed = trio.lowlevel.ParkingLot()  # parked: whoever waits for the state to change
        # Set once the state exchange has decided what happens to the regions this array was
        # writing when it stopped (``decide_crash_regions``): a resync waits for it.
        self.crash_decided = trio.Event()
        self._note_level = logging.INFO
        self._scope: trio.CancelScope | None = None
        self._flushing = self._flush_again = False  # FlushVolumes: a flush runs, another is owed

    # -- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.st.name

    @property
    def state(self) -> RoleState:
        return self.roles.state

    @property
    def role(self) -> str:
        return self.roles.state.role.value

    @property
    def epoch(self) -> int:
        return self.roles.state.epoch

    @property
    def mode(self) -> Mode:
        return self.roles.state.mode

    @property
    def mirroring(self) -> bool:
        return self.roles.mirroring

    @property
    def reversed(self) -> bool:
        """Roles are the other way round from the natural direction (after a failover)."""
        me = self.node.cfg.name
        home = self.st.home or (me if self.role == "primary" else self.st.peer)
        return (self.role == "primary") != (home == me)

    @property
    def role_label(self) -> str:
        return self.role + ("-rev" if self.reversed else "")

    def note(self, msg: str, level: int = logging.INFO) -> None:
        log.log(level, "group %s: %s", self.name, msg)
        self.events.append((time.time(), msg))
        del self.events[:-50]

    def add_member(self, ms: MemberState, vol: Volume) -> Member:
        m = Member(self, ms, vol, self.node.region_size)
        ic = self.node.cfg.intent
        m.intent = IntentLog(os.path.join(self.node.cfg.data_dir, f"intent-{self.st.gid}-{ms.vol_id}"),
                             vol.size, self.node.region_size, volume=vol, extent=ic.extent, hot=ic.hot,
                             idle=ic.idle, ahead=ic.ahead)
        # The log is node metadata: when it cannot be written, the node stops.
        m.intent.on_error = lambda e, p=m.intent.path: self.node.metadata_failed(e, p)
        vol.on_error = lambda v, e, m=m: self.io.local_io_error(m, e)
        self.members[ms.local] = m
        self.by_id[ms.vol_id] = m
        bus = getattr(self.node, "events", None)
        if bus is not None and bus.facts("group", {"group": self.name}) is not None:  # admitted while running
            bus.update("volume", m.facts())
            self.node.publish_alua(self)
        return m

    def remove_member(self, local: str) -> Member:
        m = self.members.pop(local)
        m.vol.on_error = None
        m.intent.remove()
        del self.by_id[m.vol_id]
        bus = getattr(self.node, "events", None)
        if bus is not None:
            bus.remove("verify", {"group": self.name, "volume": local})
            bus.remove("volume", {"group": self.name, "volume": local})
            self.node.publish_alua(self)
        return m

    # -- the role machine ------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Any]:
        """Feed the role machine an event of the daemon's own (time, the link, the peer's
        replies, the witness) and carry out what it says. One the machine refuses changes
        nothing and is logged: it means a reply came after the state it answered had moved on."""
        try:
            return self.command(event)
        except RoleError as e:
            log.warning("group %s: %s ignored: %s", self.name, type(event).__name__, e)
            return []

    def command(self, event: Event) -> list[Any]:
        """Feed the role machine an event and carry out what it says; RoleError when refused
        (nothing changed): an operator's verb or a peer's request the state does not allow.
        The only writer of the group's persisted role fields."""
        before = self.roles.state
        actions = self.roles.handle(event)
        after = self.roles.state
        # What the machine says about this step is logged at the weight of the change it made
        # (restored after: an action may feed the machine a nested event).
        outer_level, self._note_level = self._note_level, transition_level(before, after)
        try:
            # Bookkeeping of the data first, so what is persisted next includes it.
            for a in actions:
                if isinstance(a, (BecamePrimary, BecameSecondary, SwappedInSync, NewGeneration)):
                    self._carry_out(a)
            if any(isinstance(a, Persist) for a in actions):
                self.st.role = after.role.value
                self.st.epoch = after.epoch
                self.st.started = after.started
                self.st.failsafe = after.failsafe
                self.st.witness_behind = after.witness_behind
                self.st.peer_has_all = persisted_has_all(after)
                self.st.peer_newer = after.peer_newer
                self.node.save()
            for a in actions:
                if not isinstance(a, (BecamePrimary, BecameSecondary, SwappedInSync, NewGeneration, Persist)):
                    self._carry_out(a)
        finally:
            self._note_level = outer_level
        if after.role is Role.PRIMARY and not after.peer_newer and after.mode not in MIRRORING and (
                before.mode in MIRRORING or before.peer_newer):
            # Mirroring stopped, or the operator let this array go on without what its peer holds
            # newer: its own copy of those regions is what there is now.
            self._pulls_to_push(undecided_too=before.peer_newer)
        if after is not before:
            self._changed.unpark_all()
        # Derived here, the one writer: every change of role, epoch, peer mode, failsafe,
        # serving, ALUA or resync is published once, comparing with what was published last.
        self.publish(before)
        return actions

    def _pulls_to_push(self, undecided_too: bool) -> None:
        """This array goes on without the regions its peer holds newer (the operator overrode
        ``peer_newer``): its copy is all there is now (what the unclean stop took from it is
        lost); they are copied to the peer when it returns, with those not decided about yet
        (``undecided_too``)."""
        for m in self.members.values():
            undecided = m.crash_regions if undecided_too else []
            if undecided_too:
                m.crash_regions = []
            if m.pull.count or undecided:
                regions = set(set_bits(m.pull.bits, m.pull.nregions)) | set(undecided)
                for r in regions:
                    m.pull.clear(r)
                    m.dirty.set(r)
                m.verify = True
                self.note(f"{len(regions)} regions of {m.st.local} were not fetched back from "
                          f"{self.st.peer}: writes acknowledged before the unclean stop may be lost there",
                          logging.WARNING)
        if undecided_too:
            self.crash_decided.set()

    def _lacks(self, m: Member) -> bytes:
        """What RESYNC_BEGIN tells the peer it lacks: the dirty map, but for the regions this
        array was writing when it stopped while the peer held every write (``peer_newer``):
        they are fetched back from the peer, whose copy is the newer. Told it lacks them, the
        peer would forward their reads here, to this array's older copy (found by review)."""
        if not (self.state.peer_newer and m.crash_regions):
            return bytes(m.dirty.bits)
        lacks = Bitmap(m.vol.size, m.dirty.region, m.dirty.bits)
        for r in m.crash_regions:
            if not m.peer_wrong.test(r):  # those are copied whatever the exchange decides
                lacks.clear(r)
        return bytes(lacks.bits)

    async def _make_durable(self) -> None:
        """``FlushVolumes``: every member volume flushed, then ``Flushed``. A failed flush
        leaves ``flush_pending`` set: nothing is acknowledged alone from a copy that may have
        lost writes (the volume reports its device failure)."""
        try:
            while True:
                self._flush_again = False
                for m in list(self.members.values()):
                    await m.vol.flush()
                    if m.vol.flush_failed:  # an earlier flush failed: what it held may be gone
                        raise OSError(errno.EIO, f"{m.st.local}: a flush failed before")
                if not self._flush_again:
                    break
        except OSError as e:
            self.note(f"flushing the volumes failed ({e}): this array acknowledges nothing its peer lacks",
                      logging.ERROR)
            return
        finally:
            self._flushing = False
        self.handle(Flushed(trio.current_time()))

    def decide_crash_regions(self, split_brain: bool, suspect: Collection[int] = ()) -> None:
        """Primary after an unclean stop, at the state exchange: the regions it was writing are
        fetched back from a peer that held every write this array acknowledged (``peer_newer``):
        a power cut here may have taken writes from them that the peer has. So they are even if
        the peer stopped uncleanly too: it got every acknowledged write before this array
        acknowledged it, so its copy holds all of them (killed, or still up) or, if it lost power
        as well, every flushed one, as this array's does. (Copying ours, as when the peer said it
        had stopped uncleanly, overwrote the newer data of a peer that was only killed: found by
        review.) Otherwise (this array acknowledged writes alone since, or both wrote apart)
        they are copied to the peer. So are those of a volume never in sync at the peer (admitted
        to the group since: its ``NeedSync`` may not be on disk as ``peer_has_all`` cleared yet,
        see ``RoleState.flush_pending``), and those of a volume whose copy the peer reports
        ``suspect`` (its device failed since it last synced, by volume id): what that device
        holds is no better than ours, and fetching it back would overwrite every write this
        array still has there with whatever the failed or replaced device returns (found by
        review); the writes the power cut took from it are lost with the peer's device. Regions
        whose copy at the peer online verify found wrong (``peer_wrong``) are copied as well:
        this array's copy of them was made durable before they were marked (``verify.fix_regions``)."""
        pull = self.state.peer_newer and not split_brain and self.role == "primary"
        copied = False  # some regions stay to be copied although the peer held every write
        for m in self.members.values():
            if not m.crash_regions:
                continue
            if pull and not m.st.synced_once:
                # Admitted to the group and not synced yet: the peer's copy is not this volume's.
                copied = True
                self.note(f"{len(m.crash_regions)} regions of {m.st.local} are copied to {self.st.peer}, "
                          "not fetched back: the volume was never in sync there")
            elif pull and m.vol_id in suspect:
                copied = True
                self.note(f"{len(m.crash_regions)} regions of {m.st.local} are copied to {self.st.peer}, "
                          "not fetched back: its copy is suspect (its device failed); writes this array "
                          "lost when it stopped there are lost", logging.WARNING)
            elif pull:
                wrong = 0
                for r in m.crash_regions:
                    if m.peer_wrong.test(r):
                        wrong += 1
                    else:
                        m.dirty.clear(r)
                        m.pull.set(r)
                if len(m.crash_regions) > wrong:
                    self.note(f"{len(m.crash_regions) - wrong} regions of {m.st.local} are fetched back from "
                              f"{self.st.peer}, which holds every write this array acknowledged")
                if wrong:
                    # Online verify found the peer's copy of these wrong and made ours durable
                    # first (``verify.fix_regions``): fetching them back would undo its fix.
                    copied = True
                    self.note(f"{wrong} regions of {m.st.local} are copied to {self.st.peer}, not "
                              "fetched back: online verify found its copy of them different")
            m.crash_regions = []
        if copied and self.state.peer_has_all:
            # The peer lacks regions it is to get from here: writes are made durable here before
            # they are acknowledged from now on, or a second power cut would copy what it left
            # of them over the peer's copies (found by review).
            self.handle(NeedSync(trio.current_time()))
        self.crash_decided.set()
        if self.state.peer_newer and not any(m.pull.count for m in self.members.values()):
            # Both wrote apart (nothing is resynced until the operator chooses a side), or
            # nothing here is to be fetched back: no copy the peer holds is newer than ours.
            self.handle(CaughtUp(trio.current_time()))

    def _carry_out(self, a: Any) -> None:
        node = self.node
        if isinstance(a, Note):
            self.note(a.msg, self._note_level)
        elif isinstance(a, RequestLease):
            node.spawn(self._request_lease, a.timeout, self.epoch, self.state.lease_asked)
        elif isinstance(a, AskWitness):
            node.spawn(self._ask_witness, a.ask, self.epoch)
        elif isinstance(a, ResetLink):
            if node.link is not None and node.link.up:
                node.link.reset(f"group {self.name}: {a.reason}")
        elif isinstance(a, FenceOver):
            self.io.fence_over()
        elif isinstance(a, FlushVolumes):
            if self._flushing:
                self._flush_again = True  # writes applied since the running flush began
            else:
                self._flushing = True
                node.spawn(self._make_durable)
        elif isinstance(a, StartResync):
            # Snapshots of the dirty maps in the same step as mirroring starts: a write that
            # marked a region before the switch is in them, later ones are mirrored.
            snaps = {m.vol_id: self._lacks(m) for m in self.members.values()}
            node.spawn(self._recover, snaps)
        elif isinstance(a, NewGeneration):
            self.new_generation(a.why)
        elif isinstance(a, BecamePrimary):
            # What may differ on the old primary when it returns: the regions this array was
            # writing (its write-intent log) and those it was writing (reported when it steps
            # down); both are compared by digest, the rest is identical.
            for m in self.members.values():
                for r in m.intent.marked_regions():
                    m.dirty.set(r)
                m.verify = True
                m.suspect_regions.clear()
        elif isinstance(a, BecameSecondary):
            for m in self.members.values():
                # What this array was writing may differ from the new primary: reported to it,
                # with the regions a restart after an unclean stop meant to fetch back from the
                # peer (``pull``) or had not decided about yet (``crash_regions``). They are the
                # new primary's to copy now. Kept here, they would be fetched back from the peer
                # the next time this array is primary, over whatever it wrote as primary
                # meanwhile (the history campaign, seed 11: a power cut at A, A back as secondary
                # and resynced, B killed, A primary at the next epoch; when B returned, A fetched
                # 32 regions back from it and served B's older data).
                regions = set(m.intent.marked_regions()) | set(m.crash_regions)
                regions.update(set_bits(m.pull.bits, m.pull.nregions))
                m.dirty = Bitmap(m.vol.size, m.dirty.region)
                m.pull = Bitmap(m.vol.size, m.pull.region)
                m.crash_regions = []
                m.oos.set_all()
                m.suspect_regions = regions
            self.crash_decided.set()  # nothing left to decide: a read waiting for it goes on
        elif isinstance(a, SwappedInSync):
            for m in self.members.values():
                m.dirty = Bitmap(m.vol.size, m.dirty.region)
                m.oos = Bitmap(m.vol.size, m.oos.region)
                m.verify = False
            if self.role == "primary" and not node.exchanged.is_set():
                # Primary now, in a link session whose exchange this node (secondary then) may
                # not have had answered: a resync waits for one (``_recover``), so ask again.
                node.tell_peer()
        elif isinstance(a, DiskFailure):
            node.disk_failed(self, a.peer_in_sync)
        elif isinstance(a, AdoptGeneration):
            node.spawn(self._adopt_generation)
        elif isinstance(a, TellPeer):
            node.tell_peer()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The group's timers: whenever the machine's next deadline passes or its state changes,
        it sees the time (lease renewals, fence ends, claims, retries)."""
        with trio.CancelScope() as self._scope:
            task_status.started()
            while True:
                now = trio.current_time()
                self.handle(Tick(now))
                with trio.move_on_at(self.roles.next_timer(now)):
                    await self._changed.park()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def wait_change(self, deadline: float) -> None:
        """Until the control state changes, the machine's next timer, or ``deadline``."""
        with trio.move_on_at(min(deadline, self.roles.next_timer(trio.current_time()))):
            await self._changed.park()

    # -- published state (the event bus) -----------------------------------------------------------
    def facts(self) -> dict:
        s = self.roles.state
        return {"group": self.name, "peer": self.st.peer, "role": s.role.value, "epoch": s.epoch,
                "mode": s.mode.value, "started": s.started, "serving": self.may_serve(), "failsafe": s.failsafe,
                "split_brain": s.split_brain}

    def publish(self, before: RoleState | None = None) -> None:
        """Tell the node's event bus what this group, its volumes, their path states and its
        resync are now (it emits only what changed)."""
        bus = getattr(self.node, "events", None)
        if bus is None:
            return
        after = self.roles.state
        extra = {}
        if before is not None and before.role is not after.role:
            extra["cause"] = role_change_cause(before, after)
        bus.update("group", self.facts(), **extra)
        for m in self.members.values():
            bus.update("volume", m.facts())
        self.node.publish_alua(self)
        running = bus.facts("resync", {"group": self.name}) is not None
        if after.mode is Mode.SYNCING and not running:
            bus.update("resync", {"group": self.name, "peer": self.st.peer, "volume": None, "percent": 0.0,
                                  "bytes_sent": 0})
        elif after.mode is not Mode.SYNCING and running:
            if after.mode is Mode.ATTACHED and after.role is Role.PRIMARY:
                bus.remove("resync", {"group": self.name}, result="done", percent=100.0)
            else:
                bus.remove("resync", {"group": self.name}, result="interrupted")

    def publish_volume(self, m: Member) -> None:
        """A volume's sync state changed outside the role machine (secondary: resync began, or
        the last region it lacked arrived)."""
        bus = getattr(self.node, "events", None)
        if bus is not None:
            bus.update("volume", m.facts())

    # -- derived -------------------------------------------------------------------------------
    def may_serve(self) -> bool:
        return self.roles.serving(trio.current_time())

    def transitioning(self) -> bool:
        return self.roles.transitioning(trio.current_time())

    def steady(self) -> bool:
        """Serving and roles not changing: the per-request test of the data path's fast paths
        (one comparison; ``GroupRoles.steady_until`` is derived when the state changes)."""
        return trio.current_time() < self.roles.steady_until

    def failover_possible(self) -> bool:
        return self.roles.failover_possible(trio.current_time())

    def alua(self, host: str | None) -> AluaState:
        """The path state this array shows ``host`` for the group's volumes. A known host with no
        proximity for the group sees the seed's initial states (roles.path_state); a connection
        that is no defined host (an array without host definitions exports to everyone) has
        no proximity to set and is near both arrays."""
        prox = self.st.proximity.get(host) if host is not None else "all"
        if prox in ("primary", "secondary") and self.reversed:
            # Proximity names a site by the natural direction (the array the group was created
            # on, or made natural by `reverse`, is "primary"): after a failover or switchover a
            # host keeps its optimized paths to the array of its own site, which serves too.
            prox = "secondary" if prox == "primary" else "primary"
        return AluaState(self.roles.alua(trio.current_time(), prox), self.epoch)

    def policies_changed(self) -> None:
        p = self.st.policies
        self.handle(Policies(trio.current_time(), p.get("auto_failover", True), p.get("auto_recover", True)))

    def lose_peer(self, reason: str) -> None:
        self.handle(PeerLost(trio.current_time(), reason))

    # -- actions that talk to someone ------------------------------------------------------------
    # ``timeout``: the role machine's deadline for the request on the link (LinkTimeout), not a cancel scope.
    async def _request_lease(self, timeout: float, epoch: int, sent: float | None) -> None:  # noqa: ASYNC109
        link = self.node.link
        assert link is not None and sent is not None
        try:
            reply = await link.request(Frame.lease(link.next_id(), self.st.gid, epoch), timeout=timeout)
        except (LinkDown, LinkTimeout) as e:
            log.debug("lease request for %s failed: %s", self.name, e)
            self.handle(LeaseFailed(trio.current_time()))
            return
        ms = reply.lease_ms() if reply.status == Status.OK else 0
        self.handle(LeaseReply(trio.current_time(), sent, ms))

    async def _ask_witness(self, ask: WitnessAsk, epoch: int) -> None:
        from ..witness.proto import WType

        wc = self.node.witness
        sent = trio.current_time()
        d = None
        if wc is not None:
            d, sent = await wc.decide(WType[_ASK_TYPE[ask]], self.name, epoch)
        now = trio.current_time()
        if d is None:
            self.handle(WitnessAnswer(now, sent, ask, None))
        else:
            self.handle(WitnessAnswer(now, sent, ask, d.granted, d.owner, d.epoch, d.reason))

    def witness_report(self, sent: float, owner: str, epoch: int) -> None:
        self.handle(WitnessReport(trio.current_time(), sent, owner, epoch))

    def witness_sent(self, sent: float) -> None:
        self.handle(WitnessSent(trio.current_time(), sent))

    async def _recover(self, snaps: dict[int, bytes]) -> None:
        """Bring the returned peer back: tell it which regions it lacks (RESYNC_BEGIN per
        volume), then copy them while new writes are mirrored."""
        session = self.node.exchanged  # the link session this resync began in
        stale = False
        try:
            since = trio.current_time() - self.last_recover
            if since < 1.0:
                await trio.sleep(1.0 - since)  # a peer that keeps failing is not hammered
            self.last_recover = trio.current_time()
            # What the peer may lack that only it knows (a secondary back from a power cut: the
            # regions it was writing) comes in the answer to this link session's state exchange.
            # The peer's own exchange request can start this resync first: it must not tell the
            # peer what it lacks, nor end in sync (``adopt_gen``: the peer forgets those regions
            # and may take the group over) before they are in the dirty maps (found by review).
            if self.node.exchanged is session:
                with trio.move_on_after(2 * self.node.cfg.link.io_timeout):
                    await session.wait()
            if self.node.exchanged is not session:
                # Its link session ended (the peer was lost with it): a later session's resync,
                # maybe running now, is not this one's to fence off or to end.
                stale = True
                return
            if not session.is_set():
                self.lose_peer("the state exchange did not say which regions the peer may lack")
                return
            link = self.node.link
            assert link is not None
            for m in list(self.members.values()):
                if self.mode is not Mode.SYNCING:
                    return
                # The snapshot taken as mirroring began, and what the exchange has added since.
                bits = self._lacks(m)
                if m.vol_id in snaps:
                    bits = bytes(a | b for a, b in zip(snaps[m.vol_id], bits, strict=True))
                frame = Frame.resync_begin(link.next_id(), self.st.gid, self.epoch, m.vol_id, m.dirty.region, bits)
                try:
                    reply = await link.request(frame)
                except (LinkDown, LinkTimeout) as e:
                    self.lose_peer(str(e))
                    return
                if reply.status != Status.OK:
                    if reply.status == Status.NOT_SERVING:
                        self.handle(PeerDiskFailed(trio.current_time()))  # no retries until it returns
                    else:
                        self.lose_peer(f"peer refused resync of {m.st.local}: {reply.status}")
                    return
            if self.mode is not Mode.SYNCING:
                return
            self.handle(ResyncBegun(trio.current_time()))
            await self.node.resync.pull_group(self)
            await self.node.resync.run_group(self)
        finally:
            if not stale:
                self.handle(ResyncEnded(trio.current_time()))

    def start_member_sync(self, m: Member) -> None:
        """A volume admitted to a running group: full sync by digest comparison."""
        m.compare_all()
        self._sync_member(m)

    def resync_regions(self, m: Member, regions: list[int]) -> None:
        """Copy these regions of ``m`` to the peer again (online verify found them different):
        the peer forwards reads of them to us until they are copied."""
        for r in regions:
            m.dirty.set(r)
        m.intent.set_sync(regions)
        self._sync_member(m)

    def _sync_member(self, m: Member) -> None:
        running = self.state.recovering and self.mode is Mode.SYNCING
        actions = self.handle(NeedSync(trio.current_time()))
        if running and not any(isinstance(a, StartResync) for a in actions):
            # A resync is already running: tell the peer what this volume lacks; the running
            # resync copies it.
            self.node.spawn(self._begin_member, m)

    async def _begin_member(self, m: Member) -> None:
        link = self.node.link
        assert link is not None
        try:
            reply = await link.request(
                Frame.resync_begin(link.next_id(), self.st.gid, self.epoch, m.vol_id, m.dirty.region,
                                   bytes(m.dirty.bits)))
        except (LinkDown, LinkTimeout) as e:
            self.lose_peer(str(e))
            return
        if reply.status != Status.OK:
            self.lose_peer(f"peer refused resync of {m.st.local}: {reply.status}")

    async def _adopt_generation(self) -> None:
        """The peer's data is now this generation, and what it reported suspect is resynced
        (it may take the group over again after a power cut: ``CaughtUp`` there). Sent again
        every second while in sync at this epoch and generation until the peer takes it: lost,
        a secondary back from a power cut would refuse every failover for as long as the pair
        stays in sync (found by review). A resync after a new link session sends it anyway."""
        gen, epoch = self.st.gen, self.epoch
        while True:
            try:
                await self.node.control({"op": "adopt_gen", "group": self.name, "gen": gen,
                                         "gen_history": self.st.gen_history,
                                         "reservations": reservation_states(self.node, self)})
                if self.st.gen == gen:
                    self.st.gen_shared = True
                    self.node.save_soon()
                return
            except Exception as e:  # noqa: BLE001 - NodeError or a lost link: tried again below
                log.warning("group %s: the peer did not take generation %s: %s", self.name, gen, e)
            await trio.sleep(1.0)
            if (self.role != "primary" or self.epoch != epoch or self.st.gen != gen
                    or self.mode is not Mode.ATTACHED):
                return

    # -- data generations ----------------------------------------------------------------------
    def new_generation(self, why: str) -> None:
        """This array starts acknowledging writes its peer will not have: a new generation,
        unless the peer never took the current one (it is behind it anyway)."""
        if self.st.gen and not self.st.gen_shared:
            self.note(f"data generation {self.st.gen} goes on ({why}; {self.st.peer} never took it)")
            return
        if self.st.gen:
            self.st.gen_history = (self.st.gen_history + [self.st.gen])[-GEN_HISTORY:]
        self.st.gen = secrets.token_hex(8)
        self.st.gen_shared = False
        self.note(f"data generation {self.st.gen} ({why})")

    def gen_relation(self, gen: str, history: list[str]) -> str:
        """How the peer's data (``gen``, ``history``) relates to ours: same, behind (the peer
        lacks writes we have), ahead (we lack the peer's), diverged (both wrote apart), or
        unknown (a side without generations)."""
        mine = self.st.gen
        if not mine or not gen:
            return "unknown"
        if gen == mine:
            return "same"
        if gen in self.st.gen_history:
            return "behind"
        if mine in history:
            return "ahead"
        return "diverged"

    def mark_split_brain(self, peer_gen: str, peer_history: list[str]) -> None:
        if self.st.split_brain:
            return
        self.st.split_brain = (
            f"split brain: this array ({self.node.cfg.name}) holds data generation {self.st.gen} "
            f"(after {', '.join(self.st.gen_history[-3:]) or 'none'}), {self.st.peer} holds {peer_gen} "
            f"(after {', '.join(peer_history[-3:]) or 'none'}): both acknowledged writes while apart. "
            f"Nothing is resynced until the operator runs 'setrcopygroup discard {self.name}' on the "
            f"array whose writes since the split are to be thrown away")
        self.note(self.st.split_brain.upper().split(":")[0] + ":" + self.st.split_brain.split(":", 1)[1],
                  logging.ERROR)
        self.handle(SplitBrain(trio.current_time()))
        self.node.save()
