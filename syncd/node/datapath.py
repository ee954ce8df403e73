"""The host data path of one replication group, at both ends of the link.

Host side: reads and writes from hosts at this array (mirroring at the primary, forwarding at
the secondary). Peer side: what the peer sends (mirrored writes applied at the secondary,
forwarded writes ordered and applied at the primary, RELEASE, reads of regions not yet in sync).

Ordering rule: the primary orders every write of a group. A write is applied under a range lock
held until both replicas applied it (for a write forwarded by the secondary, until the secondary
sends RELEASE), so overlapping writes land in the same order on both disks.

Read rule: a read never runs while a write to its range is being applied on this array (range
lock, shared), so it returns each block as some single write left it.

Staleness rule: whether this array may serve, and whether a primary may acknowledge a write its
peer does not get, is the role machine's answer (``roles.serving``, ``RoleState.alone``): the
secondary serves under a lease; a primary going on alone waits until every lease it granted has
expired. A read is returned only if the array still served when it completed.

Host-facing errors. ESHUTDOWN means "this array cannot complete the request: use another path":
an array not (or no longer) serving, in failsafe, or with a failed backing device. A write
answered so was either never applied by a serving replica or ordered there before anything a
host sends afterwards (replication paths are reset when they go down, so no frame arrives late;
see proto/nbd-extensions.md), so a multipath host may re-issue it elsewhere at once. EIO stays
for errors of the request; EAGAIN (NBD ENOMEM: retry) for a role change that did not end in time.
"""

from __future__ import annotations

import errno
import logging
import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable

import trio

from .. import netio
from ..buffers import PayloadBuffers
from ..nbd.export import BlockError
from ..nbd.extents import DATA, cover_with_data
from ..repl.link import LinkDown, LinkTimeout
from ..repl.proto import FEAT_FAST_ZERO, Frame, Status
from .roles import FENCED_OFF, Mode
from .volume import Volume

if TYPE_CHECKING:
    from ..ranges import Bitmap
    from .group import Group, Member

log = logging.getLogger("syncd.node")

WRITE, ZEROES, TRIM = "write", "zeroes", "trim"
# Replies to a forwarded write meaning "not applied: I do not (or no longer) own the group":
# the forwarding secondary waits to be given the group, else answers the host ESHUTDOWN.
NOT_OWNER = (Status.NOT_SERVING, Status.NOT_PRIMARY, Status.STALE_EPOCH)

Done = Callable[[int, str], None]
# A fast-path write at the primary at most this large is written here after its frame left.
_WRITE_AFTER_SEND_MAX = 64 << 10


async def apply_local(vol: Volume, kind: str, offset: int, length: int, data: Any, fua: bool,
                      no_hole: bool, fast: bool = False) -> None:
    """Apply one write-type op to the local disk (raises OSError). ``fast`` (ZEROES only):
    zero without writing data or raise OSError(ENOTSUP) having changed nothing."""
    vol.check_range(offset, length)
    if kind == WRITE:
        if fua or vol.direct:
            await vol.write(offset, data, fua)
        else:
            vol.write_sync(offset, data)
    elif kind == ZEROES:
        await vol.zero(offset, length, no_hole, fua, fast)
    else:
        await vol.trim(offset, length, fua)


def _runs_inline(vol: Volume, kind: str, fua: bool) -> bool:
    """A write that completes on the event loop (no worker thread): reads cannot see it half
    applied, so it needs no range lock at the secondary."""
    return kind == WRITE and not fua and not vol.direct


class PeerRefused(Exception):
    """The peer answered a read of its copy with ``status``, not the data."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the peer refused the read: {status}")
        self.status = status


class _FastWrite:
    """A plain write the primary mirrors without a task: sent to the peer, then written here;
    answered (and its range released) once both copies are done, in whichever order."""

    __slots__ = ("io", "m", "tok", "offset", "data", "done", "t0", "pend", "written", "error")

    def __init__(self, io: "DataPath", m: "Member", tok: int, offset: int, data: Any, done: Done) -> None:
        self.io, self.m, self.tok, self.offset, self.data, self.done = io, m, tok, offset, data, done
        self.t0 = monotonic()
        self.pend: Any = None  # the peer's answer, once it came
        self.written = False
        self.error: OSError | None = None  # the local write's

    def write_here(self) -> None:
        try:
            self.m.vol.write_sync(self.offset, self.data)
        except OSError as e:
            self.error = e
            # As the task path: the peer may have applied what failed here; resynced later.
            self.m.dirty.set_range(self.offset, len(self.data))
        self.written = True
        if self.pend is not None:
            self.io._mirrored(self.pend, self)

    def mirrored(self, pend: Any) -> None:
        self.pend = pend
        if self.written:
            self.io._mirrored(pend, self)


class DataPath:
    def __init__(self, group: "Group") -> None:
        self.g = group
        # Forwarded writes applied here, held until the secondary's RELEASE:
        # req_id -> (member, lock token, offset, length, when acknowledged)
        self.forwarded: dict[int, tuple["Member", int, int, int, float]] = {}
        self.last_host_io = 0.0
        self.disk_error = ""  # a backing device of this group failed here: serve nothing
        # Secondary: requests forwarded to the primary and not answered yet (a switchover waits
        # for them to drain).
        self.forwarding = 0
        self._drained = trio.lowlevel.ParkingLot()
        # Primary: forwarded writes waiting for their range here -> given up by the secondary
        self._waiting: dict[int, bool] = {}

    # -- errors ---------------------------------------------------------------------------------
    def local_error(self, e: OSError) -> BlockError:
        """The host's answer to a local I/O error. Once a backing device failed, this array
        serves nothing of the group: ESHUTDOWN (path unavailable) sends the host's multipath to
        the peer, which has every acknowledged write; other errors keep their errno."""
        g = self.g
        if self.disk_error:
            return BlockError(errno.ESHUTDOWN, f"group {g.name}: backing device failed on this array "
                              f"({self.disk_error}); use a path to the peer")
        return BlockError(e.errno or errno.EIO, str(e))

    def local_io_error(self, m: "Member", e: OSError) -> None:
        """A backing device of this group failed (the seed's "RAID set or metadata failure"):
        this array stops serving the group (ALUA unavailable); a primary hands the group to its
        in-sync peer, a secondary tells the primary to go on without it."""
        from .roles import DiskFailed

        g = self.g
        if self.disk_error:
            return
        self.disk_error = f"{m.st.local} on {m.vol.path}: {e.strerror or e}"
        m.st.suspect = True  # persisted: the peer is told on reconnect to compare every region
        try:
            g.node.save()
        except OSError as se:
            g.note(f"cannot record the failed device: {se}")
        g.handle(DiskFailed(trio.current_time(), self.disk_error))

    def _check_serving(self) -> None:
        g = self.g
        if not g.may_serve():
            why = ("in failsafe" if g.state.failsafe else "not confirmed since it started" if not g.state.confirmed
                   else "secondary without lease" if g.role == "secondary" else f"{g.mode.value}")
            raise BlockError(errno.ESHUTDOWN, f"group {g.name} is not serving on this array ({why})")

    # -- waiting for the control state -------------------------------------------------------
    async def _ride_transition(self) -> None:
        """Host I/O that arrives while roles change waits for the change (no error for the host)
        up to ``transition_timeout``; then it fails with EAGAIN (NBD ENOMEM: retry). A secondary
        whose primary vanished and that is asking the witness for the group holds host I/O the
        same way: granted, it serves as primary; refused, the I/O fails (ESHUTDOWN)."""
        g = self.g
        if not g.transitioning():
            return
        deadline = trio.current_time() + g.node.cfg.link.transition_timeout
        while g.transitioning() and trio.current_time() < deadline:
            await g.wait_change(deadline)
        if g.mode in (Mode.HANDING_OVER, Mode.SWITCHING):
            raise BlockError(errno.EAGAIN, f"group {g.name} is transitioning (role change)")

    async def _fence_over(self) -> None:
        """Primary: wait while the peer is being fenced off (its lease running out, the witness
        being asked)."""
        g = self.g
        while g.role == "primary" and g.mode in FENCED_OFF:
            await g.wait_change(trio.current_time() + 3600)

    async def _durable_before_alone(self) -> None:
        """Primary about to acknowledge a write its peer will not have: wait until the writes it
        applied while the peer held them all are durable here (``RoleState.flush_pending``)."""
        g = self.g
        if not g.state.flush_pending:
            return
        deadline = trio.current_time() + g.node.cfg.link.transition_timeout
        while g.state.flush_pending:
            if trio.current_time() >= deadline:
                # A flush that failed (the volume reports its device) or is still writing back
                # gigabytes: the host is told to retry, not kept waiting without end.
                raise BlockError(errno.EAGAIN, f"group {g.name}: this array's volumes are not yet durable "
                                 "after it stopped mirroring; retry")
            await g.wait_change(deadline)

    async def _durable_since(self, m: "Member", applied: float) -> None:
        """A mirrored write applied here without FUA (done at ``applied``), about to be
        acknowledged: if the peer no longer holds every write (``peer_has_all`` cleared), it is
        durable here first. Also when that changed while the write ran: its local apply (in a
        worker thread: O_DIRECT, a zeroing) may have ended after the flush that followed the
        change had begun, which then does not cover it (found by review). Raises BlockError."""
        if self.g.state.peer_has_all or m.vol.flushed_from >= applied:
            return
        try:
            await m.vol.durable()
        except OSError as e:
            raise self.local_error(e) from None

    def _durable_here(self) -> bool:
        """Primary mirroring to a peer that lacks regions (resynchronizing it): writes are
        made durable here before they are acknowledged (``Volume.durable``: concurrent writes
        share a flush; no fast path). A power cut here then takes none of them, and the regions
        this array was writing can be copied to the peer after it, as they are: its copy holds
        every write acknowledged in them."""
        return not self.g.state.peer_has_all

    async def _became_primary(self) -> bool:
        """A forwarded write was refused NOT_SERVING or lost with the link: the primary may be
        handing the group to us, or we may be about to claim it. Wait for that, up to the
        transition timeout or our lease's end."""
        g = self.g
        deadline = trio.current_time() + g.node.cfg.link.transition_timeout
        while trio.current_time() < deadline:
            if g.role == "primary":
                return True
            if self.disk_error:
                return False
            if (trio.current_time() > g.state.lease_until and g.mode is not Mode.CLAIMING
                    and not g.failover_possible()):
                return False
            await g.wait_change(deadline)
        return g.role == "primary"

    def _forward_done(self) -> None:
        self.forwarding -= 1
        if not self.forwarding:
            self._drained.unpark_all()

    async def drain_forwarded(self) -> None:
        """Secondary: wait until no request it forwarded to the primary is unanswered."""
        while self.forwarding:
            await self._drained.park()

    # -- host reads ------------------------------------------------------------------------------
    def _undecided(self, m: "Member", offset: int, length: int) -> bool:
        """Primary after an unclean stop whose peer held every write it acknowledged: a region
        it was writing when it stopped (``crash_regions``) may hold older data here than at the
        peer (a power cut took the last writes) until the state exchange decides whether it is
        fetched back (``pull``) or copied (``Group.decide_crash_regions``)."""
        crash, g = m.crash_regions, self.g
        return bool(crash) and g.role == "primary" and g.state.peer_newer and \
            any(r in crash for r in m.dirty.regions_of(offset, length))

    async def host_read(self, m: "Member", offset: int, length: int) -> Any:
        g = self.g
        await self._ride_transition()
        self._check_serving()
        if self._undecided(m, offset, length):
            # Read here before the decision, it could return data older than a write the peer acknowledged
            # (found by the history campaign: a host read such a region in the 10 ms between
            # the restarted primary serving again and its state exchange).
            if not await g.node.resync.crash_regions_decided(g):
                raise BlockError(errno.ESHUTDOWN, "the region may be newer at the peer, which did not say so "
                                 "in time; try another path")
            self._check_serving()
        m.stats["reads"] += 1
        m.stats["bytes_read"] += length
        far = m.oos if g.role == "secondary" else m.pull if g.role == "primary" else None
        try:
            if far is not None and far.any_in(offset, length):
                # Not in sync here (secondary), or newer at the peer (primary after a power
                # cut): those regions from the peer, the others from here.
                data = await self.split_read(m, offset, length, far)
            else:
                data = await self.local_read(m, offset, length)
        except (LinkDown, LinkTimeout) as e:
            raise BlockError(errno.ESHUTDOWN, f"read of out-of-sync region failed: {e}") from None
        except PeerRefused as e:
            if e.status == Status.NOT_SERVING:
                raise BlockError(errno.ESHUTDOWN,
                                 "the primary cannot serve this region yet: try another path") from None
            raise BlockError(errno.EIO, f"primary refused read: {e.status}") from None
        except OSError as e:
            raise self.local_error(e) from None
        # A read is returned only if this array still served when it completed: a primary going
        # on alone waits for the lease to expire, so no write it acknowledged alone is older.
        self._check_serving()
        return data

    def fast_read(self, m: "Member", offset: int, length: int, buffers: PayloadBuffers | None = None) -> Any:
        """The data (a large read into one of ``buffers`` when given), or None to take the task
        path (a role change, a region not in sync here, a write being applied to the range)."""
        g = self.g
        # Not serving, or roles changing: the task path says why or waits for the change.
        if m.vol.direct or not g.steady() or m.lock.busy(offset, length) or (
            not g.roles.is_primary and m.oos.count and m.oos.any_in(offset, length)
        ) or (m.pull.count and m.pull.any_in(offset, length)) or (m.crash_regions and g.state.peer_newer):
            return None
        m.stats["reads"] += 1
        m.stats["bytes_read"] += length
        try:
            return m.vol.read_sync(offset, length, buffers)
        except OSError as e:
            raise self.local_error(e) from None

    # -- base:allocation ---------------------------------------------------------------------------
    def host_allocation(self, m: "Member", offset: int, length: int, max_extents: int) -> list[tuple[int, int]]:
        """The local replica's holes, where it is known to hold the final bytes; data elsewhere
        (always a correct answer). Not serving (a secondary without lease may be stale, with no
        map of what it lacks yet), regions not in sync here (secondary: ``oos``, being resynced)
        or newer at the peer (primary after a power cut: ``pull``), a failed device: data. Decided
        on the event loop with no wait in between, as a read would be."""
        g = self.g
        if self.disk_error or m.vol.is_block or not g.may_serve() or self._undecided(m, offset, length):
            return [(length, DATA)]
        ext = m.vol.allocation(offset, length, max_extents)
        stale: list[tuple[int, int]] = []
        for bits, applies in ((m.oos, g.role == "secondary"), (m.pull, True)):
            if applies and bits.count:
                stale.extend((r * bits.region, bits.region) for r in bits.regions_of(offset, length) if bits.test(r))
        return cover_with_data(ext, offset, stale)

    # -- host writes -----------------------------------------------------------------------------
    async def host_write(self, m: "Member", kind: str, offset: int, length: int, data: Any, fua: bool,
                         no_hole: bool = False, fast: bool = False) -> None:
        g = self.g
        await self._ride_transition()
        self._check_serving()
        if fast:
            self._fast_zero_possible(m, no_hole)
        self.last_host_io = trio.current_time()
        m.stats["writes"] += 1
        m.stats["bytes_written"] += length
        write = self._write_at_primary if g.role == "primary" else self._write_at_secondary
        await self._carried_through(write, m, kind, offset, length, data, fua, no_hole, fast)

    # -- fast zero (NBD_CMD_FLAG_FAST_ZERO) ------------------------------------------------------
    # Done only when both replicas can zero without writing data; else ENOTSUP with nothing
    # changed on either. What this array can do is known in advance (``Volume.fast_zero_ok``);
    # the peer is sent the op first (ZEROES with FAST_ZERO, only to a peer that announced
    # FEAT_FAST_ZERO) and answers ENOTSUP having changed nothing when it cannot; only then is
    # the range zeroed here. Should this array find only then that it cannot after all (a mode
    # never tried before), it zeroes the range by writing, so the replicas stay alike.

    def _fast_zero_possible(self, m: "Member", no_hole: bool) -> None:
        """Raise ENOTSUP now when this array, or a peer that would have to zero too, cannot."""
        g = self.g
        if m.vol.fast_zero_ok[no_hole] is False:
            raise BlockError(errno.ENOTSUP, f"volume {m.st.local}: the backing store here cannot zero without "
                             "writing data; nothing changed")
        link = g.node.link
        if (g.role == "secondary" or g.mirroring) and link is not None and link.up \
                and not link.features & FEAT_FAST_ZERO:
            raise BlockError(errno.ENOTSUP, "the peer's syncd does not support fast zero; nothing changed")

    async def _peer_zeroed_fast(self, pend: Any) -> None:
        """Wait for the peer's answer to a fast zero sent to it: ENOTSUP ends the request (nothing
        changed anywhere); any other outcome (done, failed, link lost) is the caller's to handle
        as for any mirrored op, once the range is zeroed here too."""
        try:
            reply = await self.g.node.link.wait(pend)
        except (LinkDown, LinkTimeout):
            return
        if reply.status == Status.ENOTSUP:
            raise BlockError(errno.ENOTSUP, "the peer's backing store cannot zero without writing data; "
                             "nothing changed")

    async def _zero_here_after_peer(self, m: "Member", offset: int, length: int, fua: bool, no_hole: bool) -> None:
        """The local half of a fast zero the peer may have done already (raises OSError)."""
        try:
            await apply_local(m.vol, ZEROES, offset, length, None, fua, no_hole, True)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            log.warning("group %s: volume %s cannot zero without writing after all (%s); zeroing by writing, "
                        "as the peer zeroed the range already", self.g.name, m.st.local, e)
            await apply_local(m.vol, ZEROES, offset, length, None, fua, no_hole)

    async def _carried_through(self, write: Callable[..., Any], *args: Any) -> None:
        """Run a host write in a task of the node, not in the caller's. Once begun, a write goes
        to the peer before it is applied here (primary: mirrored; secondary: forwarded, then
        applied and RELEASEd), so cancelling it halfway would leave it on one replica only,
        with nothing marked for resync and the group in sync: the NBD server cancels a client's
        requests when the client breaks the protocol or leaves (the live fuzzer's seed 2, case
        nbd:293: a FUA write, then a bad request header). The caller's cancellation gives up
        only its wait for the outcome; the node's (it stops) still ends the write."""
        finished = trio.Event()
        outcome: list[BaseException | None] = []
        abandoned = False

        async def run() -> None:
            try:
                await write(*args)
                outcome.append(None)
            except Exception as e:  # the caller's to raise (a BlockError is the host's answer)
                outcome.append(e)
                if abandoned and not isinstance(e, BlockError):
                    log.warning("group %s: a write its host gave up failed: %r", self.g.name, e)
            finally:
                finished.set()

        self.g.node.spawn(run)
        try:
            await finished.wait()
        except BaseException:
            abandoned = True
            raise
        if not outcome:
            raise BlockError(errno.ESHUTDOWN, f"group {self.g.name}: this array is stopping")
        if outcome[0] is not None:
            raise outcome[0]

    # Fast paths, completed by callbacks with no task per request. They take the common case only
    # (buffered, non-FUA, no lock conflict, mirroring in steady state) and return False for
    # anything else, which the caller then runs as a task through host_write. ``done(err, msg)``
    # is called exactly once, err 0 on success.

    def fast_write(self, m: "Member", offset: int, data: Any, done: Done) -> bool:
        g = self.g
        n = len(data)
        if m.vol.direct or not g.steady() or not m.intent.ready(offset, n):
            return False
        link = g.node.link
        if g.roles.is_primary:
            # No credit on the link: the task path waits for it before taking the range.
            if not (g.mirroring and g.state.peer_has_all and link.up and link.has_credit(n)):
                return False
            tok = m.lock.try_acquire(offset, n)
            if tok is None:
                return False
            try:
                m.vol.check_range(offset, n)
            except OSError as e:
                m.lock.release(tok)
                err = self.local_error(e)
                done(err.errno, str(err))
                return True
            self._count_write(m, n)
            w = _FastWrite(self, m, tok, offset, data, done)
            link.start(Frame.write(link.next_id(), g.st.gid, g.epoch, m.vol_id, offset, data), cb=w.mirrored)
            # A small write as the task path: the peer's copy first, then this array's while
            # the peer makes its own, once the batch's frames went to the kernel (netio) and
            # before anything the peer answers is handled. A large one is written here first:
            # its frame rarely fits the socket's buffer at once, and what the kernel leaves
            # waits for the sender task (more CPU per byte, measured: round 10 in bench/).
            if n > _WRITE_AFTER_SEND_MAX or not netio.after_sends(w.write_here):
                w.write_here()
            return True
        if not link.up:
            return False
        self._count_write(m, n)
        m.stats["forwarded"] += 1
        frame = Frame.write(link.next_id(), g.st.gid, g.epoch, m.vol_id, offset, data, forwarded=True)
        self.forwarding += 1
        t0 = monotonic()
        link.start(frame, cb=lambda pend: self._granted(pend, m, offset, data, done, t0))
        return True

    def _count_write(self, m: "Member", n: int) -> None:
        self.last_host_io = trio.current_time()
        m.stats["writes"] += 1
        m.stats["bytes_written"] += n

    def _mirrored(self, pend: Any, w: "_FastWrite") -> None:
        """Both copies of a fast-path write are done (the peer's: ``pend``)."""
        m, tok, done = w.m, w.tok, w.done
        if pend.reply is not None and pend.reply.status == Status.OK:
            m.lock.release(tok)
            if w.error is None:
                m.vol.io_stats.mirror.observe(monotonic() - w.t0)
            self._answer(w)
            return
        reason = str(pend.error) if pend.error else f"peer refused a write ({pend.reply.status})"
        # Marked before anything else can happen: a resync that starts once the peer is back
        # must count this region among those the peer lacks.
        m.dirty.set_range(w.offset, len(w.data))

        async def fence_then_ack() -> None:
            # The local write is done; it is acknowledged only once the peer is fenced off (the
            # range stays locked until then).
            try:
                await self._after_mirror_failure(reason)
            except BlockError as e:
                m.lock.release(tok)
                done(e.errno, str(e))
                return
            m.lock.release(tok)
            self._answer(w)

        self.g.node.spawn(fence_then_ack)

    def _answer(self, w: "_FastWrite") -> None:
        """The host's answer to a fast-path write whose peer applied it or was fenced off."""
        if w.error is None:
            w.done(0, "")
        else:
            err = self.local_error(w.error)
            w.done(err.errno, str(err))

    def _granted(self, pend: Any, m: "Member", offset: int, data: Any, done: Done, t0: float) -> None:
        g = self.g
        self._forward_done()
        reply = pend.reply
        st = None if reply is None else reply.status
        if st == Status.OK:
            m.vol.io_stats.forward.observe(monotonic() - t0)
        if reply is None:
            # Given up (timeout, or the link went): tell the primary, which then neither applies
            # it late nor waits for a RELEASE that would never come.
            g.node.link.send(Frame.release(pend.frame.req_id, g.st.gid, pend.frame.epoch, errno.ETIMEDOUT))
        if reply is None and not g.failover_possible():
            done(errno.ESHUTDOWN, f"write not acknowledged by the primary: {pend.error}")
            return
        if st is None or st in NOT_OWNER:
            # The primary is handing the group over or is gone: the write is redone here if
            # this array gets the group (the old primary is then resynced from this one).

            async def redo() -> None:
                if not await self._became_primary():
                    done(errno.ESHUTDOWN, "the primary did not take the write and this array did not get the group")
                    return
                try:
                    await self._write_at_primary(m, WRITE, offset, len(data), data, False, False)
                except BlockError as e:
                    done(e.errno, str(e))
                    return
                done(0, "")

            g.node.spawn(redo)
            return
        if st == Status.BUSY:
            done(errno.EAGAIN, "the primary could not order the write in time; not applied: retry")
            return
        if st != Status.OK:
            done(errno.EIO, f"primary refused the write ({st})")
            return
        status = 0
        try:
            m.vol.write_sync(offset, data)
        except OSError as e:
            status = e.errno or errno.EIO
            err = self.local_error(e)
        release = Frame.release(pend.frame.req_id, g.st.gid, g.epoch, status)
        if status:
            g.node.link.send(release)  # the primary must mark the range and fence us off now
            done(err.errno, f"local write failed after the primary applied it: {err}")
            return
        # Nobody waits for an OK: it goes with the next frame to the primary (the next forwarded
        # write, at QD1 about 40 µs later), or when the loop runs out of work. Sent alone, it
        # cost this array a sendmsg and the primary a wake-up per write (QD1 at site B, medians
        # of eight rounds: 5,117 IOPS, against 5,572 put off; bench/README.md, round 15).
        g.node.link.send_soon(release)
        done(0, "")

    def _frame(self, m: "Member", kind: str, req_id: int, offset: int, length: int, data: Any, fua: bool,
               no_hole: bool, forwarded: bool = False, fast: bool = False) -> Frame:
        g = self.g
        gid, e, v = g.st.gid, g.epoch, m.vol_id
        if kind == WRITE:
            return Frame.write(req_id, gid, e, v, offset, data, fua=fua, forwarded=forwarded)
        if kind == ZEROES:
            return Frame.zeroes(req_id, gid, e, v, offset, length, fua=fua, no_hole=no_hole, forwarded=forwarded,
                                fast=fast)
        return Frame.trim(req_id, gid, e, v, offset, length, fua=fua, forwarded=forwarded)

    async def _write_at_primary(self, m: "Member", kind: str, offset: int, length: int, data: Any, fua: bool,
                                no_hole: bool, fast: bool = False) -> None:
        g = self.g
        await m.intent.mark(offset, length)
        link = g.node.link
        # Room on the link before the range: a write must not hold its range while it waits for
        # credit (overlapping writes, forwarded ones whose time runs, would wait behind it).
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
            await self._fence_over()
            if not g.mirroring:
                await self._durable_before_alone()
            self._check_serving()
            if g.role != "primary":
                raise BlockError(errno.ESHUTDOWN, f"group {g.name}: this array is no longer primary")
            if g.mirroring:
                t0 = monotonic()
                if fast:
                    self._fast_zero_possible(m, no_hole)  # the peer may have come back meanwhile
                pend = link.start(self._frame(m, kind, link.next_id(), offset, length, data, fua, no_hole,
                                              fast=fast), reserved=room)
                room = None
                try:
                    if fast:
                        await self._peer_zeroed_fast(pend)
                        await self._zero_here_after_peer(m, offset, length, fua, no_hole)
                    else:
                        await apply_local(m.vol, kind, offset, length, data, fua, no_hole)
                    applied = monotonic()
                    if not fua and self._durable_here():
                        await m.vol.durable()  # while the peer applies it (shared flushes)
                except OSError as e:
                    m.dirty.set_range(offset, length)
                    await self._mirror_result(pend, m, offset, length)
                    raise self.local_error(e) from None
                await self._mirror_result(pend, m, offset, length)
                if not fua:
                    await self._durable_since(m, applied)
                if pend.reply is not None and pend.reply.status == Status.OK:
                    m.vol.io_stats.mirror.observe(monotonic() - t0)
            else:
                if not g.state.alone:
                    raise BlockError(errno.ESHUTDOWN, f"group {g.name}: peer not mirroring and this array "
                                     "may not go on alone (the witness has not agreed)")
                if fast and m.vol.fast_zero_ok[no_hole] is False:
                    raise BlockError(errno.ENOTSUP, f"volume {m.st.local}: the backing store here cannot zero "
                                     "without writing data; nothing changed")
                # Mark before writing: a resync that starts meanwhile must see this region.
                m.dirty.set_range(offset, length)
                try:
                    await apply_local(m.vol, kind, offset, length, data, fua, no_hole, fast)
                except OSError as e:
                    raise self.local_error(e) from None
                m.vol.unmirrored_at = monotonic()  # acknowledged alone: maybe not durable (resync)
        finally:
            m.lock.release(tok)
            if room is not None:
                link.unreserve(room)

    async def _mirror_result(self, pend: Any, m: "Member | None" = None, offset: int = 0, length: int = 0) -> None:
        """Return when the peer applied the op, or once it was fenced off instead and this array
        may go on alone (the op's region, if any, is then marked for resync: at once, so a
        resync that starts when the peer is back counts it); raise ESHUTDOWN when it may not."""
        g = self.g
        try:
            reply = await g.node.link.wait(pend)
            if reply.status == Status.OK:
                return
            name = Status(reply.status).name if reply.status in Status._value2member_map_ else reply.status
            reason = f"peer refused a write: {name}"
        except (LinkDown, LinkTimeout) as e:
            reason = str(e)
        if m is not None:
            m.dirty.set_range(offset, length)
        await self._after_mirror_failure(reason)

    async def _after_mirror_failure(self, reason: str) -> None:
        """The peer did not apply a write this array applied: fence it off; return when this
        array may acknowledge the write alone, raise ESHUTDOWN when it may not (failsafe,
        demoted, the witness did not agree)."""
        g = self.g
        g.lose_peer(reason)
        await self._fence_over()
        await self._durable_before_alone()
        s = g.state
        if s.role.value != "primary" or s.failsafe or not (s.alone or g.mirroring):
            why = "failsafe" if s.failsafe else "no longer primary" if s.role.value != "primary" else \
                "may not go on alone"
            raise BlockError(errno.ESHUTDOWN, f"group {g.name}: the peer did not apply the write and this "
                             f"array {why} ({s.fence_reason})")

    async def _write_at_secondary(self, m: "Member", kind: str, offset: int, length: int, data: Any, fua: bool,
                                  no_hole: bool, fast: bool = False) -> None:
        g = self.g
        await m.intent.mark(offset, length)  # applied here too, once the primary has it
        link = g.node.link
        req_id = link.next_id()
        m.stats["forwarded"] += 1
        self.forwarding += 1
        t0 = monotonic()
        try:
            reply = await link.request(self._frame(m, kind, req_id, offset, length, data, fua, no_hole, forwarded=True,
                                                   fast=fast))
        except (LinkDown, LinkTimeout) as e:
            self._forward_done()
            # The primary may have applied it and be holding the range for our RELEASE: say we
            # did not apply it (it marks the range dirty and fences us off, so the replicas
            # cannot differ unseen). Lost with the link, the primary's own bound does the same.
            link.send(Frame.release(req_id, g.st.gid, g.epoch, errno.ETIMEDOUT))
            if await self._became_primary():
                await self._write_at_primary(m, kind, offset, length, data, fua, no_hole, fast)
                return
            raise BlockError(errno.ESHUTDOWN, f"write not acknowledged by the primary: {e}") from None
        self._forward_done()
        if reply.status in NOT_OWNER:
            if await self._became_primary():
                await self._write_at_primary(m, kind, offset, length, data, fua, no_hole, fast)
                return
            raise BlockError(errno.ESHUTDOWN,
                             f"primary refused the write ({reply.status}) and this array did not get the group")
        if reply.status == Status.BUSY:
            raise BlockError(errno.EAGAIN, "the primary could not order the write in time; not applied: retry")
        if reply.status == Status.ENOTSUP and fast:
            raise BlockError(errno.ENOTSUP, "the primary's backing store cannot zero without writing data; "
                             "nothing changed")
        if reply.status != Status.OK:
            raise BlockError(errno.EIO, f"primary refused the write ({reply.status})")
        m.vol.io_stats.forward.observe(monotonic() - t0)
        status = 0
        tok = None if _runs_inline(m.vol, kind, fua) else await m.lock.acquire(offset, length)
        try:
            if fast:
                await self._zero_here_after_peer(m, offset, length, fua, no_hole)
            else:
                await apply_local(m.vol, kind, offset, length, data, fua, no_hole)
        except OSError as e:
            status = e.errno or errno.EIO
            raise self.local_error(e) from None
        finally:
            if tok is not None:
                m.lock.release(tok)
            # The primary holds the range until this arrives, so nothing overlapping can be
            # ordered in between on either replica.
            link.send(Frame.release(req_id, g.st.gid, g.epoch, status))

    async def host_flush(self, m: "Member") -> None:
        g = self.g
        await self._ride_transition()
        self._check_serving()
        try:
            await m.vol.flush()
        except OSError as e:
            raise self.local_error(e) from None
        if g.role == "primary" and not g.mirroring:
            return
        link = g.node.link
        pend = link.start(Frame.flush(link.next_id(), g.st.gid, g.epoch, m.vol_id))
        if g.role == "primary":
            await self._mirror_result(pend)
            return
        self.forwarding += 1
        try:
            reply = await link.wait(pend)
        except (LinkDown, LinkTimeout) as e:
            raise BlockError(errno.ESHUTDOWN, f"flush not confirmed by the primary: {e}") from None
        finally:
            self._forward_done()
        if reply.status in NOT_OWNER:
            raise BlockError(errno.ESHUTDOWN,
                             f"the primary did not take the flush ({reply.status}): group changing hands")
        if reply.status != Status.OK:
            raise BlockError(errno.EIO, f"primary flush failed ({reply.status})")

    # -- peer side: the primary ----------------------------------------------------------------
    def _may_take_forwarded(self) -> bool:
        g = self.g
        s = g.state
        return s.started and g.mirroring and s.peer_ready and not self.disk_error

    async def handle_forwarded(self, link: Any, path: Any, f: Frame, m: "Member", kind: str) -> None:
        """Primary side of a write that arrived at the secondary. It is applied only while the
        secondary still waits for it: within half its io_timeout of arriving here and before a
        RELEASE that gives it up; else the answer is BUSY (not applied), so a write the
        secondary already failed to its host (which may have re-issued it, and written newer
        data since) can never land late over newer acknowledged data."""
        if not self._may_take_forwarded():
            link.reply(path, f.req_id, Status.NOT_SERVING)
            return
        arrived = trio.current_time()
        self.last_host_io = arrived
        self._waiting[f.req_id] = False
        try:
            await m.intent.mark(f.offset, f.length)
            tok = await m.lock.acquire(f.offset, f.length)
        finally:
            given_up = self._waiting.pop(f.req_id)
        m.intent.touch(f.offset, f.length)
        if not self._may_take_forwarded():
            m.lock.release(tok)
            link.reply(path, f.req_id, Status.NOT_SERVING)
            return
        if given_up or trio.current_time() - arrived > self.g.node.cfg.link.io_timeout / 2:
            m.lock.release(tok)
            link.reply(path, f.req_id, Status.BUSY)
            return
        try:
            await apply_local(m.vol, kind, f.offset, f.length, f.payload, f.fua, f.no_hole,
                              kind == ZEROES and f.fast_zero)
            if not f.fua and not self.g.state.peer_has_all:  # see _durable_since
                await m.vol.durable()
        except OSError as e:
            m.lock.release(tok)
            # Our disk failed: NOT_SERVING tells the secondary to wait for the group instead.
            link.reply(path, f.req_id, Status.NOT_SERVING if self.disk_error else (e.errno or errno.EIO))
            return
        self.forwarded[f.req_id] = (m, tok, f.offset, f.length, trio.current_time())
        link.reply(path, f.req_id, Status.OK)

    def forwarded_fast(self, link: Any, path: Any, f: Frame, m: "Member") -> bool:
        """handle_forwarded for a plain buffered write whose range is free: inline, no task."""
        if m.vol.direct or not self._may_take_forwarded() or not m.intent.ready(f.offset, f.length) \
                or self._durable_here():
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
        if not late or not self.g.mirroring:
            return
        for m, off, ln in late:
            m.dirty.set_range(off, ln)
        self.g.lose_peer(f"the peer did not confirm {len(late)} forwarded write(s) within {bound:.1f}s")

    def handle_release(self, f: Frame) -> None:
        entry = self.forwarded.pop(f.req_id, None)
        if entry is None:
            if f.req_id in self._waiting:  # the secondary gave it up before we got to it
                self._waiting[f.req_id] = True
            return
        m, tok, off, ln, _ = entry
        if f.release_status():
            # The secondary could not apply what we applied: the replicas differ there.
            m.dirty.set_range(off, ln)
            self.g.lose_peer(f"peer failed to apply a write ({f.release_status()})")
        m.lock.release(tok)

    def fence_over(self) -> None:
        """The peer is fenced off: forwarded writes it never released may differ there; their
        ranges are marked for resync and released."""
        for m, tok, off, ln, _ in self.forwarded.values():
            m.dirty.set_range(off, ln)
            m.lock.release(tok)
        self.forwarded.clear()

    # -- peer side: the secondary ----------------------------------------------------------------
    def mirrored_fast(self, link: Any, path: Any, f: Frame, m: "Member") -> bool:
        """A mirrored plain write, applied inline in arrival order: no task per request."""
        data = f.payload
        n = len(data)
        if m.vol.direct or f.fua or not m.intent.ready(f.offset, n):
            return False
        try:
            m.vol.check_range(f.offset, n)
            m.vol.write_sync(f.offset, data)
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return True
        if f.resync:
            self.resynced(m, f.offset, n)
        link.reply(path, f.req_id, Status.OK)
        return True

    async def apply_mirrored(self, link: Any, path: Any, f: Frame, m: "Member", kind: str) -> None:
        data = f.payload if kind == WRITE else None
        length = len(f.payload) if kind == WRITE else f.length
        try:
            await m.intent.mark(f.offset, length)
            tok = None if _runs_inline(m.vol, kind, f.fua) else await m.lock.acquire(f.offset, length)
            try:
                await apply_local(m.vol, kind, f.offset, length, data, f.fua, f.no_hole,
                                  kind == ZEROES and f.fast_zero)
            finally:
                if tok is not None:
                    m.lock.release(tok)
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        if f.resync:
            self.resynced(m, f.offset, length)
        link.reply(path, f.req_id, Status.OK)

    def resync_begin(self, f: Frame, m: "Member") -> int:
        """The primary says which regions this replica lacks: reads of them are forwarded."""
        if self.disk_error:
            return Status.NOT_SERVING
        region, bits = f.resync_bitmap()
        if region != m.oos.region or len(bits) != len(m.oos.bits):
            return Status.EINVAL
        m.oos.bits[:] = bits
        m.oos.count = sum(bin(b).count("1") for b in bits)
        self.g.publish_volume(m)
        return Status.OK

    def resync_end(self, f: Frame, m: "Member") -> None:
        self.resynced(m, f.offset, f.length)
        if not m.oos.count:
            m.st.synced_once = True
            m.st.last_sync = time.time()
            if m.st.suspect:
                m.st.suspect = False
                self.g.node.save_soon()

    def resynced(self, m: "Member", offset: int, length: int) -> None:
        region = m.oos.region
        first = -(-offset // region)
        last = (offset + length) // region  # exclusive: only fully covered regions
        if offset + length >= m.vol.size:
            last = m.oos.nregions
        for r in range(first, last):
            m.oos.clear(r)
        if not m.oos.count:
            m.st.last_sync = time.time()
            m.st.synced_once = True
            self.g.publish_volume(m)

    # -- peer side: both -------------------------------------------------------------------------
    async def handle_flush(self, link: Any, path: Any, f: Frame) -> None:
        g = self.g
        vols = list(g.members.values()) if f.vol == 0xFFFFFFFF else [g.by_id[f.vol]] if f.vol in g.by_id else []
        try:
            for m in vols:
                await m.vol.flush()
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        link.reply(path, f.req_id, Status.OK)

    async def peer_read(self, m: "Member", offset: int, length: int) -> Frame:
        """The peer's copy of a range of ``m`` (its reply frame): for a range this array lacks
        or holds older (LinkDown, LinkTimeout when the link cannot bring it)."""
        g, link = self.g, self.g.node.link
        return await link.request(Frame.read(link.next_id(), g.st.gid, g.epoch, m.vol_id, offset, length))

    async def local_read(self, m: "Member", offset: int, length: int, thread: bool = False) -> Any:
        """This array's copy of a range of ``m``, under the range lock (shared); in a worker
        thread when the volume is opened O_DIRECT or ``thread`` (raises OSError)."""
        m.vol.check_range(offset, length)
        tok = await m.lock.acquire(offset, length, shared=True)
        try:
            return await m.vol.read(offset, length) if m.vol.direct or thread else m.vol.read_sync(offset, length)
        finally:
            m.lock.release(tok)

    async def split_read(self, m: "Member", offset: int, length: int, far: "Bitmap", thread: bool = False) -> Any:
        """A range of ``m`` read region by region from where each is current: the regions set
        in ``far`` (this array lacks them, or holds them older) from the peer, the others from
        here. Read whole from either copy, a range spanning both kinds returned part of it
        older than an acknowledged write (found by review: a region being fetched back after a
        power cut beside one the secondary lacks). Raises OSError (here), PeerRefused, LinkDown
        or LinkTimeout (there)."""
        parts: list[Any] = []
        for there, off, ln in far.runs(offset, length):
            if there:
                rep = await self.peer_read(m, off, ln)
                if rep.status != Status.OK:
                    raise PeerRefused(rep.status)
                parts.append(rep.payload)
            else:
                parts.append(await self.local_read(m, off, ln, thread))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def handle_read(self, link: Any, path: Any, f: Frame, m: "Member") -> None:
        g = self.g
        far = None
        if g.role == "primary" and (self._undecided(m, f.offset, f.length) or
                                    (m.pull.count and m.pull.any_in(f.offset, f.length))):
            # The secondary reads a region it was told it lacks (one it was writing itself when
            # it stopped) that may be older here than at the secondary itself: read as a host
            # read here is, from the peer, once the exchange has decided (found by review).
            if not await g.node.resync.crash_regions_decided(g):
                link.reply(path, f.req_id, Status.NOT_SERVING)
                return
            if m.pull.any_in(f.offset, f.length):
                far = m.pull
        try:
            if far is not None:
                data = await self.split_read(m, f.offset, f.length, far, thread=True)
            else:
                data = await self.local_read(m, f.offset, f.length, thread=True)
        except (LinkDown, LinkTimeout):
            return  # the link is gone: so is the request it answers
        except PeerRefused as e:
            link.reply(path, f.req_id, e.status)
            return
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        link.reply(path, f.req_id, Status.OK, data)

    async def handle_digests(self, link: Any, path: Any, f: Frame, m: "Member") -> None:
        try:
            m.vol.check_range(f.offset, f.length)
            ds = await m.vol.digests(f.offset, f.length, f.digest_region())
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        link.reply(path, f.req_id, Status.OK, Frame.digests_payload(ds))
