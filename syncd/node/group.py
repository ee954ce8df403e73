"""A replication group at run time: its role, how its peer is attached, the serve lease, and the
host data path for its volumes (mirroring at the primary, forwarding at the secondary).

Ordering rule: the primary orders every write of a group. A write is applied under a range lock
held until both replicas applied it (for a write forwarded by the secondary, until the secondary
sends RELEASE), so overlapping writes land in the same order on both disks.

Staleness rule: the secondary serves only while it holds a lease from the primary. When the peer
is lost, the primary stops renewing and waits until every lease it granted has certainly expired
(monotonic clocks, drift factor, margin) before it acknowledges any write that is not mirrored.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from .alua import path_state
from .intent import IntentLog
from ..nbd.export import AluaState, BlockError
from ..ranges import Bitmap, RangeLock
from ..repl.link import LinkDown, LinkTimeout
from ..repl.proto import Frame, Status
from .state import GroupState, MemberState, decode_bits
from .volume import Volume

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("syncd.group")

WRITE, ZEROES, TRIM = "write", "zeroes", "trim"

# Peer attachment as seen by the primary.
DETACHED = "detached"  # peer not mirroring: writes go on alone and mark regions dirty
FENCING = "fencing"  # peer lost: waiting for its lease to expire before going on alone
SYNCING = "syncing"  # peer mirroring new writes while dirty regions are copied
ATTACHED = "attached"  # peer mirroring and in sync
# Replies to a forwarded write meaning "not applied: I do not (or no longer) own the group":
# the forwarding secondary waits to be given the group, else answers the host ESHUTDOWN.
NOT_OWNER = (Status.NOT_SERVING, Status.NOT_PRIMARY, Status.STALE_EPOCH)
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
        self.suspect_regions: set[int] = set()  # secondary after a crash: regions to report to the primary

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

    def sync_status(self) -> tuple[str, float]:
        g = self.group
        if not g.st.started:
            return "stopped", 0.0
        if g.role == "primary":
            if g.peer_mode == ATTACHED and not self.dirty.count:
                return "synced", 100.0
            pct = 100.0 * (1 - self.dirty.count / max(self.dirty.nregions, 1))
            if g.peer_mode == SYNCING:
                return "syncing", pct
            return "not-synced", pct
        pct = 100.0 * (1 - self.oos.count / max(self.oos.nregions, 1))
        if not g.may_serve():
            return "not-synced" if self.oos.count else "stopped", pct
        return ("synced", 100.0) if not self.oos.count else ("syncing", pct)


class Group:
    def __init__(self, node: "Node", st: GroupState):
        self.node = node
        self.st = st
        self.members: dict[str, Member] = {}
        self.by_id: dict[int, Member] = {}
        self.peer_mode = DETACHED
        self.peer_ready = False  # primary: the peer has its out-of-sync maps; leases may be granted
        self.fenced = trio.Event()
        self.fenced.set()
        self.fence_reason = ""
        self.lease_deadline = 0.0  # primary: the secondary may be serving until then (trio clock)
        self.lease_until = 0.0  # secondary: we may serve until then (trio clock)
        # Forwarded writes applied here, held until the secondary's RELEASE:
        # req_id -> (member, lock token, offset, length, when acknowledged)
        self.forwarded: dict[int, tuple[Member, int, int, int, float]] = {}
        self.alone_ok = False  # primary: the witness agreed (or was lost first) that we go on alone
        self.witness_lost_at_peer_loss = float("inf")
        self.recovering = False
        self.last_recover = -1e9
        self.last_host_io = 0.0
        self.transitioning: trio.Event | None = None  # set while roles change (switchover)
        self.disk_error = ""  # a backing device of this group failed here: serve nothing
        self.failover_pending: trio.Event | None = None  # secondary: claiming the group now
        self.claim_refused = False  # secondary: the witness refused for good (until the link returns)
        self._failsafe_refusal = ""  # the witness's last reason for keeping this array in failsafe
        self._resolve_refusal = ""  # the witness's last reason for refusing our RESOLVE
        self._fence_token: object | None = None  # the running fence's; cleared by role changes
        self.peer_failed = False  # primary: the peer said it cannot take writes (its disk failed)
        self.events: list[tuple[float, str]] = []

    # -- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.st.name

    @property
    def role(self) -> str:
        return self.st.role

    @property
    def reversed(self) -> bool:
        """Roles are the other way round from the natural direction (after a failover)."""
        me = self.node.cfg.name
        home = self.st.home or (me if self.role == "primary" else self.st.peer)
        return (self.role == "primary") != (home == me)

    @property
    def role_label(self) -> str:
        return self.role + ("-rev" if self.reversed else "")

    @property
    def epoch(self) -> int:
        return self.st.epoch

    def note(self, msg: str) -> None:
        log.info("group %s: %s", self.name, msg)
        self.events.append((time.time(), msg))
        del self.events[:-50]

    def add_member(self, ms: MemberState, vol: Volume) -> Member:
        m = Member(self, ms, vol, self.node.region_size)
        m.intent = IntentLog(os.path.join(self.node.cfg.data_dir, f"intent-{self.st.gid}-{ms.vol_id}"),
                             vol.size, self.node.region_size)
        # The log is node metadata: when it cannot be written, the node stops.
        m.intent.on_error = lambda e, p=m.intent.path: self.node.metadata_failed(e, p)
        vol.on_error = lambda v, e, m=m: self.local_io_error(m, e)
        self.members[ms.local] = m
        self.by_id[ms.vol_id] = m
        return m

    def remove_member(self, local: str) -> Member:
        m = self.members.pop(local)
        m.vol.on_error = None
        m.intent.remove()
        del self.by_id[m.vol_id]
        return m

    # -- serving -------------------------------------------------------------------------------
    @property
    def mirroring(self) -> bool:
        return self.peer_mode in (SYNCING, ATTACHED)

    def may_serve(self) -> bool:
        if self.st.failsafe or self.disk_error:
            return False
        if self.role == "primary":
            wc = self.node.witness
            if wc is None or self.mirroring or self.alone_ok:
                return True
            if self.witness_lost_at_peer_loss > wc.cfg.grace + 2 * wc.cfg.interval:
                return True  # the witness was lost first: it disabled failover, we are pre-elected
            # Peer lost and the witness has not confirmed us yet: serve only while the witness
            # cannot have given the group away (counted from when our last answered report was
            # sent; the witness waits owner_lease*(1+drift)+margin from when it received it).
            return wc.last_ok_sent is not None and trio.current_time() < wc.last_ok_sent + wc.cfg.owner_lease
        return self.st.started and trio.current_time() < self.lease_until

    def alua(self, host: str | None) -> AluaState:
        """The path state this array shows ``host`` for the group's volumes."""
        prox = self.st.proximity.get(host, "all") if host is not None else "all"
        return AluaState(
            path_state(may_serve=self.may_serve(), role=self.role, proximity=prox,
                       transitioning=self.transitioning is not None or self._awaiting_failover()),
            self.epoch,
        )

    # Host-facing errors. ESHUTDOWN means "this array cannot complete the request: use another
    # path": a path whose array lost its primary (link down, no failover), entered failsafe or
    # lost its backing device. A write answered so was either never applied by a serving
    # replica or ordered there before anything a host sends afterwards (replication paths are
    # reset when they go down, so no frame arrives late; see proto/nbd-extensions.md), so a
    # multipath host may re-issue it elsewhere at once. EIO stays for errors of the request.

    # -- data generations ----------------------------------------------------------------------
    def new_generation(self, why: str) -> None:
        """This array starts acknowledging writes its peer will not have: a new generation."""
        import secrets

        if self.st.gen:
            self.st.gen_history = (self.st.gen_history + [self.st.gen])[-GEN_HISTORY:]
        self.st.gen = secrets.token_hex(8)
        self.note(f"data generation {self.st.gen} ({why})")

    def gen_relation(self, gen: str, history: list) -> str:
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

    def mark_split_brain(self, peer_gen: str, peer_history: list) -> None:
        if self.st.split_brain:
            return
        self.st.split_brain = (
            f"split brain: this array ({self.node.cfg.name}) holds data generation {self.st.gen} "
            f"(after {', '.join(self.st.gen_history[-3:]) or 'none'}), {self.st.peer} holds {peer_gen} "
            f"(after {', '.join(peer_history[-3:]) or 'none'}): both acknowledged writes while apart. "
            f"Nothing is resynced until the operator runs 'setrcopygroup discard {self.name}' on the "
            f"array whose writes since the split are to be thrown away")
        self.note(self.st.split_brain.upper().split(":")[0] + ":" + self.st.split_brain.split(":", 1)[1])
        self.node.save()

    def local_error(self, e: OSError) -> BlockError:
        """The host's answer to a local I/O error. Once a backing device failed, this array
        serves nothing of the group: ESHUTDOWN (path unavailable) sends the host's multipath to
        the peer, which has every acknowledged write; other errors keep their errno."""
        if self.disk_error:
            return BlockError(errno.ESHUTDOWN, f"group {self.name}: backing device failed on this array "
                              f"({self.disk_error}); use a path to the peer")
        return BlockError(e.errno or errno.EIO, str(e))

    def _check_serving(self) -> None:
        if not self.may_serve():
            raise BlockError(
                errno.ESHUTDOWN, f"group {self.name} is not serving on this array (secondary without lease)"
            )

    # -- host I/O ------------------------------------------------------------------------------
    async def _ride_transition(self) -> None:
        """Host I/O that arrives while roles change waits for the change (no error for the host)
        up to ``transition_timeout``; then it fails with EAGAIN (NBD ENOMEM: retry). A secondary
        whose primary vanished and that is asking the witness for the group holds host I/O the
        same way: granted, it serves as primary; refused, the I/O fails (ESHUTDOWN)."""
        if self._awaiting_failover():
            with trio.move_on_after(self.node.cfg.link.transition_timeout):
                while self._awaiting_failover():
                    fp = self.failover_pending
                    if fp is not None:
                        await fp.wait()
                    else:
                        await trio.sleep(0.01)
        ev = self.transitioning
        if ev is None:
            return
        with trio.move_on_after(self.node.cfg.link.transition_timeout):
            await ev.wait()
        if self.transitioning is ev:
            raise BlockError(errno.EAGAIN, f"group {self.name} is transitioning (role change)")

    def begin_transition(self, why: str) -> trio.Event:
        ev = self.transitioning = trio.Event()
        self.note(f"transitioning: {why}")
        return ev

    def end_transition(self, ev: trio.Event, why: str) -> None:
        if self.transitioning is ev:
            self.transitioning = None
            ev.set()
            self.note(f"transition over: {why}")

    async def host_read(self, m: Member, offset: int, length: int):
        await self._ride_transition()
        self._check_serving()
        m.stats["reads"] += 1
        m.stats["bytes_read"] += length
        if self.role == "secondary" and m.oos.any_in(offset, length):
            link = self.node.link
            try:
                reply = await link.request(
                    Frame.read(link.next_id(), self.st.gid, self.epoch, m.vol_id, offset, length)
                )
            except (LinkDown, LinkTimeout) as e:
                raise BlockError(errno.ESHUTDOWN, f"read of out-of-sync region failed: {e}") from None
            if reply.status != Status.OK:
                raise BlockError(errno.EIO, f"primary refused read: {reply.status}")
            data = reply.payload
        else:
            try:
                data = await m.vol.read(offset, length) if m.vol.direct else m.vol.read_sync(offset, length)
            except OSError as e:
                raise self.local_error(e) from None
        # A read is returned only if the lease still held when it completed: a primary going on
        # alone waits for the lease to expire, so no write it acknowledged alone is older than
        # this data.
        self._check_serving()
        return data

    async def host_write(self, m: Member, kind: str, offset: int, length: int, data, fua: bool, no_hole: bool = False) -> None:
        await self._ride_transition()
        self._check_serving()
        self.last_host_io = trio.current_time()
        m.stats["writes"] += 1
        m.stats["bytes_written"] += length
        if self.role == "primary":
            await self._write_at_primary(m, kind, offset, length, data, fua, no_hole)
        else:
            await self._write_at_secondary(m, kind, offset, length, data, fua, no_hole)

    # -- fast paths: completed by callbacks, no task per request ---------------------------------
    # They take the common case only (buffered, non-FUA, no lock conflict, mirroring in steady
    # state) and return False for anything else, which the caller then runs as a task through
    # host_read/host_write. ``done(err, msg)`` is called exactly once, err 0 on success.

    def fast_read(self, m: Member, offset: int, length: int):
        """The data, or None to take the task path."""
        if m.vol.direct or self.transitioning is not None or self.failover_pending is not None or (
            self.role == "secondary" and m.oos.count and m.oos.any_in(offset, length)
        ):
            return None
        self._check_serving()
        m.stats["reads"] += 1
        m.stats["bytes_read"] += length
        try:
            data = m.vol.read_sync(offset, length)
        except OSError as e:
            raise self.local_error(e) from None
        self._check_serving()
        return data

    def fast_write(self, m: Member, offset: int, data, done) -> bool:
        if m.vol.direct or self.transitioning is not None or not self.may_serve() or not m.intent.ready(offset, len(data)):
            return False
        link = self.node.link
        if self.role == "primary":
            # No credit on the link: the task path waits for it before taking the range.
            if not (self.mirroring and link.up and link.has_credit(len(data))):
                return False
            tok = m.lock.try_acquire(offset, len(data))
            if tok is None:
                return False
            try:
                m.vol.check_range(offset, len(data))
                m.vol.write_sync(offset, data)
            except OSError as e:
                m.lock.release(tok)
                err = self.local_error(e)
                done(err.errno, str(err))
                return True
            self._count_write(m, len(data))
            frame = Frame.write(link.next_id(), self.st.gid, self.epoch, m.vol_id, offset, data)
            link.start(frame, cb=lambda pend: self._mirrored(pend, m, tok, offset, len(data), done))
            return True
        if not link.up:
            return False
        self._count_write(m, len(data))
        m.stats["forwarded"] += 1
        req_id = link.next_id()
        frame = Frame.write(req_id, self.st.gid, self.epoch, m.vol_id, offset, data, forwarded=True)
        link.start(frame, cb=lambda pend: self._granted(pend, m, offset, data, done))
        return True

    def _count_write(self, m: Member, n: int) -> None:
        self.last_host_io = trio.current_time()
        m.stats["writes"] += 1
        m.stats["bytes_written"] += n

    def _mirrored(self, pend, m: Member, tok: int, offset: int, length: int, done) -> None:
        if pend.reply is not None and pend.reply.status == Status.OK:
            m.lock.release(tok)
            done(0, "")
            return
        reason = str(pend.error) if pend.error else f"peer refused a write ({pend.reply.status})"

        async def fence_then_ack():
            # The local write is done; it is acknowledged once the peer is fenced off and the
            # region is marked for resync (the range stays locked until then).
            self.lose_peer(reason)
            await self.fenced.wait()
            m.dirty.set_range(offset, length)
            m.lock.release(tok)
            if self.st.failsafe:
                done(errno.ESHUTDOWN, f"group {self.name} entered failsafe")
            else:
                done(0, "")

        self.node.spawn(fence_then_ack)

    async def _became_primary(self) -> bool:
        """A forwarded write was refused NOT_SERVING: the primary may be handing the group to
        us (its disk failed). Wait for that, up to the transition timeout or our lease's end."""
        deadline = trio.current_time() + self.node.cfg.link.transition_timeout
        while trio.current_time() < deadline:
            if self.role == "primary":
                return True
            if self.disk_error:
                return False
            if (trio.current_time() > self.lease_until and self.failover_pending is None
                    and not self.failover_possible()):
                return False
            await trio.sleep(0.005)
        return self.role == "primary"

    def _awaiting_failover(self) -> bool:
        """Secondary without a lease that is (or is about to be) asking the witness for the
        group: its paths are transitioning, not unavailable, and host I/O waits."""
        return (self.role == "secondary" and (self.failover_pending is not None or self.failover_possible())
                and not self.may_serve())

    def failover_possible(self) -> bool:
        """Secondary cut from its primary, with a witness that may give it the group."""
        wc = self.node.witness
        return (self.role == "secondary" and self.st.started and wc is not None and wc.reachable
                and self.st.policies.get("auto_failover", True) and not self.node.link.up
                and not self.claim_refused)

    def _granted(self, pend, m: Member, offset: int, data, done) -> None:
        reply = pend.reply
        if reply is None and not self.failover_possible():
            done(errno.ESHUTDOWN, f"write not acknowledged by the primary: {pend.error}")
            return
        if reply is None or reply.status in NOT_OWNER:
            # The primary is handing the group over or is gone: the write is redone here if
            # this array gets the group (the old primary is then resynced from this one).

            async def redo():
                if not await self._became_primary():
                    done(errno.ESHUTDOWN, "the primary did not take the write and this array did not get the group")
                    return
                try:
                    await self._write_at_primary(m, WRITE, offset, len(data), data, False, False)
                except BlockError as e:
                    done(e.errno, str(e))
                    return
                done(0, "")

            self.node.spawn(redo)
            return
        if reply.status != Status.OK:
            done(errno.EIO, f"primary refused the write ({reply.status})")
            return
        status = 0
        try:
            m.vol.write_sync(offset, data)
        except OSError as e:
            status = e.errno or errno.EIO
            err = self.local_error(e)
        link = self.node.link
        link.send(Frame.release(pend.frame.req_id, self.st.gid, self.epoch, status))
        if status:
            done(err.errno, f"local write failed after the primary applied it: {err}")
        else:
            done(0, "")

    def _frame(self, m: Member, kind: str, req_id: int, offset: int, length: int, data, fua: bool, no_hole: bool, forwarded: bool = False) -> Frame:
        g, e, v = self.st.gid, self.epoch, m.vol_id
        if kind == WRITE:
            return Frame.write(req_id, g, e, v, offset, data, fua=fua, forwarded=forwarded)
        if kind == ZEROES:
            return Frame.zeroes(req_id, g, e, v, offset, length, fua=fua, no_hole=no_hole, forwarded=forwarded)
        return Frame.trim(req_id, g, e, v, offset, length, fua=fua, forwarded=forwarded)

    async def _write_at_primary(self, m, kind, offset, length, data, fua, no_hole) -> None:
        await m.intent.mark(offset, length)
        link = self.node.link
        # Room on the link before the range: a write must not hold its range while it waits for
        # credit (overlapping writes, forwarded ones whose io_timeout runs, would wait behind it).
        # Taken whether or not the peer mirrors now (it may by the time the range is ours);
        # given back unused otherwise.
        room = await link.reserve(length if kind == WRITE else 0) if link is not None else None
        try:
            tok = await m.lock.acquire(offset, length)
        except BaseException:
            if room is not None:
                link.unreserve(room)
            raise
        m.intent.touch(offset, length)
        try:
            while self.peer_mode == FENCING:
                await self.fenced.wait()
            self._check_serving()
            if self.mirroring:
                pend = link.start(self._frame(m, kind, link.next_id(), offset, length, data, fua, no_hole),
                                  reserved=room)
                room = None
                try:
                    await apply_local(m.vol, kind, offset, length, data, fua, no_hole)
                except OSError as e:
                    m.dirty.set_range(offset, length)
                    await self._mirror_result(pend)
                    raise self.local_error(e) from None
                if not await self._mirror_result(pend):
                    m.dirty.set_range(offset, length)
            else:
                if self.node.witness is not None and not self.alone_ok:
                    raise BlockError(errno.ESHUTDOWN, f"group {self.name}: peer not mirroring and "
                                     "the witness has not agreed that this array goes on alone")
                # Mark before writing: a resync that starts meanwhile must see this region.
                m.dirty.set_range(offset, length)
                try:
                    await apply_local(m.vol, kind, offset, length, data, fua, no_hole)
                except OSError as e:
                    raise self.local_error(e) from None
        finally:
            m.lock.release(tok)
            if room is not None:
                link.unreserve(room)

    async def _mirror_result(self, pend) -> bool:
        """True when the peer applied the op; False once the peer was fenced off instead."""
        try:
            reply = await self.node.link.wait(pend)
            if reply.status == Status.OK:
                return True
            reason = f"peer refused a write: {Status(reply.status).name if reply.status in Status._value2member_map_ else reply.status}"
        except (LinkDown, LinkTimeout) as e:
            reason = str(e)
        self.lose_peer(reason)
        await self.fenced.wait()
        if self.st.failsafe:
            raise BlockError(errno.ESHUTDOWN, f"group {self.name} entered failsafe: {self.fence_reason}")
        return False

    async def _write_at_secondary(self, m, kind, offset, length, data, fua, no_hole) -> None:
        await m.intent.mark(offset, length)  # applied here too, once the primary has it
        link = self.node.link
        req_id = link.next_id()
        m.stats["forwarded"] += 1
        try:
            reply = await link.request(self._frame(m, kind, req_id, offset, length, data, fua, no_hole, forwarded=True))
        except (LinkDown, LinkTimeout) as e:
            # The primary may have applied it and be holding the range for our RELEASE: say we
            # did not apply it (it marks the range dirty and fences us off, so the replicas
            # cannot differ unseen). Lost with the link, the primary's own bound does the same.
            link.send(Frame.release(req_id, self.st.gid, self.epoch, errno.ETIMEDOUT))
            if await self._became_primary():
                await self._write_at_primary(m, kind, offset, length, data, fua, no_hole)
                return
            raise BlockError(errno.ESHUTDOWN, f"write not acknowledged by the primary: {e}") from None
        if reply.status in NOT_OWNER:
            if await self._became_primary():
                await self._write_at_primary(m, kind, offset, length, data, fua, no_hole)
                return
            raise BlockError(errno.ESHUTDOWN, f"primary refused the write ({reply.status}) and this array did not get the group")
        if reply.status != Status.OK:
            raise BlockError(errno.EIO, f"primary refused the write ({reply.status})")
        status = 0
        try:
            await apply_local(m.vol, kind, offset, length, data, fua, no_hole)
        except OSError as e:
            status = e.errno or errno.EIO
            raise self.local_error(e) from None
        finally:
            # The primary holds the range until this arrives, so nothing overlapping can be
            # ordered in between on either replica.
            link.send(Frame.release(req_id, self.st.gid, self.epoch, status))

    async def host_flush(self, m: Member) -> None:
        await self._ride_transition()
        self._check_serving()
        try:
            await m.vol.flush()
        except OSError as e:
            raise self.local_error(e) from None
        if self.role == "primary" and not self.mirroring:
            return
        link = self.node.link
        pend = link.start(Frame.flush(link.next_id(), self.st.gid, self.epoch, m.vol_id))
        if self.role == "primary":
            await self._mirror_result(pend)
            return
        try:
            reply = await link.wait(pend)
        except (LinkDown, LinkTimeout) as e:
            raise BlockError(errno.ESHUTDOWN, f"flush not confirmed by the primary: {e}") from None
        if reply.status in NOT_OWNER:
            raise BlockError(errno.ESHUTDOWN, f"the primary did not take the flush ({reply.status}): group changing hands")
        if reply.status != Status.OK:
            raise BlockError(errno.EIO, f"primary flush failed ({reply.status})")

    # -- peer attachment (primary) -------------------------------------------------------------
    def lose_peer(self, reason: str) -> None:
        if self.role != "primary" or self.peer_mode not in (SYNCING, ATTACHED):
            return
        self.peer_mode = FENCING
        self.peer_ready = False
        self.alone_ok = False
        self.fence_reason = reason
        wc = self.node.witness
        self.witness_lost_at_peer_loss = wc.lost_for() if wc is not None else float("inf")
        self.fenced = trio.Event()
        self.note(f"peer lost ({reason}); waiting for its serve lease to expire")
        self.node.spawn(self._fence)
        if self.node.link.up and reason != "group stopped":
            # The peer failed a request while the link stayed up: reset the link so nothing of
            # the old session can be applied after we go on alone.
            self.node.link.reset(f"group {self.name}: {reason}")

    async def _fence(self) -> None:
        token = self._fence_token = object()  # a role change (promote, demote) voids this fence
        await trio.sleep_until(self.lease_deadline)
        ok, why = await self._may_go_alone()
        for m, tok, off, ln, _ in self.forwarded.values():
            m.dirty.set_range(off, ln)
            m.lock.release(tok)
        self.forwarded.clear()
        if self._fence_token is not token or self.role != "primary":
            # Demoted (or promoted anew) while fencing: that decision stands; nothing of this
            # fence applies any more (no failsafe for a secondary, no going on alone).
            self.fenced.set()
            return
        self.peer_mode = DETACHED
        if not ok:
            if self.node.link is not None and self.node.link.up:
                # The peer is reachable again: no failsafe, but no writing alone either until
                # it mirrors again (resync) or the witness agrees.
                self.note(f"not going on alone ({why}); waiting for the peer to resync")
            else:
                self.enter_failsafe(why)
            self.fenced.set()
            self.maybe_recover()
            return
        self._go_on_alone("peer fenced off; going on alone, tracking written regions" + (f" ({why})" if why else ""),
                          why or "this array may go on alone")
        self.fenced.set()

    def _go_on_alone(self, note: str, why: str) -> None:
        """The peer is fenced off and the witness (or its absence) lets this primary serve alone:
        leave failsafe if in it, start a new data generation, track written regions."""
        self.alone_ok = True
        if self.st.failsafe:
            self.leave_failsafe(why)
        self.new_generation("going on without the peer")
        self.node.save()
        self.note(note)
        self.maybe_recover()

    def fence_at_start(self) -> None:
        """A primary that (re)starts cannot know whether its previous incarnation granted a
        lease that still runs: it goes on alone only after a full lease period."""
        if self.role != "primary":
            return
        lk = self.node.cfg.link
        if lk is None:
            self.peer_mode = DETACHED
            return
        self.lease_deadline = trio.current_time() + lk.lease_expiry()
        self.peer_mode = FENCING
        self.fenced = trio.Event()
        self.fence_reason = "node start"
        self.witness_lost_at_peer_loss = 0.0  # unknown: never judge "witness lost first" at start
        self.node.spawn(self._fence)

    async def _may_go_alone(self) -> tuple[bool, str]:
        """Whether the primary may serve without its peer (the witness rules, or True without a
        witness), and why."""
        from ..witness.proto import WType

        wc = self.node.witness
        if wc is None:
            return True, ""
        d = await wc.decide(WType.KEEP, self.name, self.epoch)
        if d is not None:
            if d.granted:
                return True, "witness agreed"
            return False, f"witness: {d.reason}"
        if self.witness_lost_at_peer_loss > wc.cfg.grace + 2 * wc.cfg.interval:
            return True, "witness was lost before the peer: pre-elected primary goes on"
        return False, ("lost the peer and the witness together: this array may be isolated, "
                       "so it serves nothing until the witness or the peer answers")

    def local_io_error(self, m: Member, e: OSError) -> None:
        """A backing device of this group failed (the seed's "RAID set or metadata failure"):
        this array stops serving the group (ALUA unavailable); a primary hands the group to its
        in-sync peer, a secondary tells the primary to go on without it."""
        if self.disk_error:
            return
        self.disk_error = f"{m.st.local} on {m.vol.path}: {e.strerror or e}"
        m.st.suspect = True  # persisted: the peer is told on reconnect to compare every region
        try:
            self.node.save()
        except OSError as se:
            log.error("group %s: cannot record the failed device: %s", self.name, se)
        self.note(f"BACKING DEVICE FAILURE: {self.disk_error}; group stops on this array")
        self.node.disk_failed(self)

    def enter_failsafe(self, why: str) -> None:
        self.st.failsafe = True
        self.fence_reason = why
        self.note(f"FAILSAFE: {why}")
        self.node.save()

    def leave_failsafe(self, why: str) -> None:
        """A positive decision came (DESIGN §5): the witness confirmed this array still owns the
        group, or the peer mirrors it again at this epoch."""
        self.st.failsafe = False
        self.note(f"failsafe left: {why}")
        self.node.save()

    async def retry_failsafe(self) -> None:
        """Primary in failsafe, peer still away, witness reachable again: ask it again. If it
        confirms this array owns the group at this epoch (KEEP granted: the peer can no longer
        claim it), go on alone; if it gave the group away, stay in failsafe (the peer demotes
        this array when the link returns)."""
        ok, why = await self._may_go_alone()
        if not (ok and self.st.failsafe and self.role == "primary" and not self.node.link.up):
            if not ok and why != self._failsafe_refusal:
                self._failsafe_refusal = why
                self.note(f"still in failsafe ({why})")
            return
        self._go_on_alone("going on alone, tracking written regions", why)

    def promote(self, epoch: int) -> None:
        """The witness gave us the group: become primary at ``epoch``. What may differ on the
        old primary when it returns: the regions we were writing (our write-intent log) and
        those it was writing (its log, which it reports when it steps down); both are
        compared by digest, the rest is identical."""
        self.st.role = "primary"
        self.st.epoch = epoch
        self.st.failsafe = False
        self.st.witness_behind = False  # granted by the witness (an override sets it again)
        self._fence_token = None
        for m in self.members.values():
            regions = m.intent.marked_regions()
            for r in regions:
                m.dirty.set(r)
            m.verify = True
        self.peer_mode = DETACHED
        self.alone_ok = True
        self.lease_until = 0.0
        self.lease_deadline = 0.0
        self.note(f"failover: now primary at epoch {epoch}")
        self.new_generation(f"took the group over at epoch {epoch}")
        self.node.save()

    def demote(self, epoch: int, why: str = "") -> None:
        """The peer owns the group at a higher epoch: become its secondary and resync."""
        self.st.role = "secondary"
        self.st.epoch = epoch
        self.st.failsafe = False
        self.st.witness_behind = False  # the peer's epoch now; it tells the witness if need be
        self._fence_token = None
        for m in self.members.values():
            m.dirty = Bitmap(m.vol.size, m.dirty.region)
            m.oos.set_all()
        self.peer_mode = DETACHED
        self.alone_ok = False
        self.lease_until = 0.0
        self.note(f"{why or f'the peer owns the group at epoch {epoch}'}: now secondary")
        self.node.save()

    def swap_in_sync(self, role: str, epoch: int) -> None:
        """Planned role change between replicas known identical (switchover): nothing to resync.
        A new secondary may serve at once (the new primary starts with a granted lease); a new
        primary starts mirroring to its attached peer."""
        lk = self.node.cfg.link
        now = trio.current_time()
        self.st.role = role
        self.st.epoch = epoch
        self.st.failsafe = False
        self._fence_token = None
        self.alone_ok = False
        for m in self.members.values():
            m.dirty = Bitmap(m.vol.size, m.dirty.region)
            m.oos = Bitmap(m.vol.size, m.oos.region)
            m.verify = False
        if role == "primary":
            self.peer_mode = ATTACHED
            self.peer_ready = True
            self.lease_deadline = now + lk.lease_expiry()
            self.lease_until = 0.0
        else:
            self.peer_mode = DETACHED
            self.peer_ready = False
            self.lease_until = now + lk.lease
        self.note(f"switchover: now {role} at epoch {epoch}")
        self.node.save()

    def maybe_recover(self, operator: bool = False) -> None:
        if (
            self.st.split_brain
            or self.role != "primary"
            or not self.st.started
            or self.peer_mode != DETACHED
            or self.recovering
            or not self.node.link.up
        ):
            return
        if not operator and not self.st.policies.get("auto_recover", True):
            return
        if self.peer_failed or self.disk_error:
            return
        self.recovering = True
        self.node.spawn(self._recover)

    async def _recover(self) -> None:
        try:
            since = trio.current_time() - self.last_recover
            if since < 1.0:
                await trio.sleep(1.0 - since)
            self.last_recover = trio.current_time()
            if not (self.st.started and self.node.link.up and self.peer_mode == DETACHED) or self.st.split_brain:
                return
            # From here new writes are mirrored; snapshots of the dirty maps are taken in the
            # same step, so a write that marked a region before the switch is in them.
            self.peer_mode = SYNCING
            self.alone_ok = False
            snaps = {m.vol_id: bytes(m.dirty.bits) for m in self.members.values()}
            self.note("peer back; resynchronizing")
            link = self.node.link
            for m in list(self.members.values()):
                if not self.mirroring:
                    return
                frame = Frame.resync_begin(link.next_id(), self.st.gid, self.epoch, m.vol_id, m.dirty.region, snaps[m.vol_id])
                try:
                    reply = await link.request(frame)
                except (LinkDown, LinkTimeout) as e:
                    self.lose_peer(str(e))
                    return
                if reply.status != Status.OK:
                    if reply.status == Status.NOT_SERVING:
                        self.peer_failed = True  # its disk failed: no retries until it returns
                    self.lose_peer(f"peer refused resync of {m.st.local}: {reply.status}")
                    return
            self.peer_ready = True
            await self.node.resync.run_group(self)
        finally:
            self.recovering = False
            # The peer may have been lost and fenced off while this resync was winding down
            # (a fence ending now asked for a recovery and was told one is running): go again.
            if self.peer_mode == DETACHED and self.node.link.up:
                self.maybe_recover()

    def start_member_sync(self, m: Member) -> None:
        """A volume admitted to a running group: full sync by digest comparison."""
        m.compare_all()
        if self.peer_mode in (SYNCING, ATTACHED):
            self.node.spawn(self._sync_new_member, m)
        else:
            self.maybe_recover()

    def resync_regions(self, m: Member, regions: list[int]) -> None:
        """Copy these regions of ``m`` to the peer again (online verify found them different):
        the peer forwards reads of them to us until they are copied."""
        for r in regions:
            m.dirty.set(r)
        m.intent.set_sync(regions)
        if self.peer_mode in (SYNCING, ATTACHED):
            self.node.spawn(self._sync_new_member, m)
        else:
            self.maybe_recover()

    async def _sync_new_member(self, m: Member) -> None:
        link = self.node.link
        self.peer_mode = SYNCING
        try:
            reply = await link.request(
                Frame.resync_begin(link.next_id(), self.st.gid, self.epoch, m.vol_id, m.dirty.region, bytes(m.dirty.bits))
            )
        except (LinkDown, LinkTimeout) as e:
            self.lose_peer(str(e))
            return
        if reply.status != Status.OK:
            self.lose_peer(f"peer refused resync of {m.st.local}: {reply.status}")
            return
        if not self.recovering:
            self.recovering = True
            try:
                await self.node.resync.run_group(self)
            finally:
                self.recovering = False

    def grant_lease(self) -> int:
        """Primary: lease in ms for the secondary, or 0 when it may not serve."""
        if not (self.st.started and self.mirroring and self.peer_ready):
            return 0
        lk = self.node.cfg.link
        deadline = trio.current_time() + lk.lease_expiry()
        self.lease_deadline = max(self.lease_deadline, deadline)
        return int(lk.lease * 1000)

    # -- peer requests -------------------------------------------------------------------------
    async def handle_forwarded(self, link, path, f: Frame, m: Member, kind: str) -> None:
        """Primary side of a write that arrived at the secondary."""
        if not (self.st.started and self.mirroring and self.peer_ready) or self.disk_error:
            link.reply(path, f.req_id, Status.NOT_SERVING)
            return
        self.last_host_io = trio.current_time()
        await m.intent.mark(f.offset, f.length)
        tok = await m.lock.acquire(f.offset, f.length)
        m.intent.touch(f.offset, f.length)
        if not (self.mirroring and self.peer_ready):
            m.lock.release(tok)
            link.reply(path, f.req_id, Status.NOT_SERVING)
            return
        try:
            await apply_local(m.vol, kind, f.offset, f.length, f.payload, f.fua, f.no_hole)
        except OSError as e:
            m.lock.release(tok)
            # Our disk failed: NOT_SERVING tells the secondary to wait for the group instead.
            link.reply(path, f.req_id, Status.NOT_SERVING if self.disk_error else (e.errno or errno.EIO))
            return
        self.forwarded[f.req_id] = (m, tok, f.offset, f.length, trio.current_time())
        link.reply(path, f.req_id, Status.OK)

    def forwarded_fast(self, link, path, f: Frame, m: Member) -> bool:
        """handle_forwarded for a plain buffered write whose range is free: inline, no task."""
        if m.vol.direct or self.disk_error or not (self.st.started and self.mirroring and self.peer_ready) \
                or not m.intent.ready(f.offset, f.length):
            return False
        tok = m.lock.try_acquire(f.offset, f.length)
        if tok is None:
            return False
        self.last_host_io = trio.current_time()
        try:
            m.vol.check_range(f.offset, len(f.payload))
            m.vol.write_sync(f.offset, f.payload)
        except OSError as e:
            m.lock.release(tok)
            link.reply(path, f.req_id, Status.NOT_SERVING if self.disk_error else (e.errno or errno.EIO))
            return True
        self.forwarded[f.req_id] = (m, tok, f.offset, f.length, trio.current_time())
        link.reply(path, f.req_id, Status.OK)
        return True

    def expire_forwarded(self, bound: float) -> None:
        """A forwarded write this array applied and acknowledged holds its range until the
        secondary says it applied it too (RELEASE). When that word has not come within
        ``bound`` (the secondary gave up on the request, or its RELEASE went with a dying
        path), the replicas may differ there: the range is marked dirty and the peer fenced
        off (it must not serve that range stale); fencing releases the range."""
        now = trio.current_time()
        late = [(m, off, ln) for m, _, off, ln, t in self.forwarded.values() if now - t > bound]
        if not late or self.peer_mode not in (SYNCING, ATTACHED):
            return
        for m, off, ln in late:
            m.dirty.set_range(off, ln)
        self.lose_peer(f"the peer did not confirm {len(late)} forwarded write(s) within {bound:.1f}s")

    def handle_release(self, f: Frame) -> None:
        entry = self.forwarded.pop(f.req_id, None)
        if entry is None:
            return
        m, tok, off, ln, _ = entry
        if f.release_status():
            # The secondary could not apply what we applied: the replicas differ there.
            m.dirty.set_range(off, ln)
            self.lose_peer(f"peer failed to apply a write ({f.release_status()})")
        m.lock.release(tok)


async def apply_local(vol: Volume, kind: str, offset: int, length: int, data, fua: bool, no_hole: bool) -> None:
    """Apply one write-type op to the local disk (raises OSError)."""
    vol.check_range(offset, length)
    if kind == WRITE:
        if fua or vol.direct:
            await vol.write(offset, data, fua)
        else:
            vol.write_sync(offset, data)
    elif kind == ZEROES:
        await vol.zero(offset, length, no_hole, fua)
    else:
        await vol.trim(offset, length, fua)
