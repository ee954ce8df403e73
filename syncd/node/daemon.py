"""The storage node daemon: volumes, groups, the replication link, the witness client, the NBD
service and the admin API, all in one nursery (``Node.run``). Shutdown is cancellation."""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid

import trio

from .. import netio
from ..buffers import PayloadBuffers
from ..config import NodeConfig
from ..iscsi import pr
from ..nbd.export import ALUA_ACTIVE_OPTIMIZED, AluaState, BlockError, ClientIdentity
from ..ranges import Bitmap
from ..repl.link import Link
from ..repl.proto import Frame, Status
from . import peer
from .datapath import TRIM, WRITE, ZEROES, apply_local
from .errors import NodeError, NotFound
from .events import EventBus
from .group import Group, Member
from .hosts import HostTable
from .intent import set_bits
from .resync import Resync
from .roles import (
    CaughtUp,
    LinkDown,
    LinkUp,
    Mode,
    Role,
    ShuttingDown,
    Timing,
    UncleanStop,
    WitnessTiming,
    peer_in_sync,
)
from .state import StateError, StateStore, encode_bits
from .volume import Volume, VolumeError, make_wwn

log = logging.getLogger("syncd.node")


class VolumeExport:
    """The NBD face of a volume: replicated through its group, or local when in no group."""

    can_flush = can_fua = can_trim = can_zero = True
    # Advertised always: a request is done when both replicas can zero without writing, else
    # refused ENOTSUP at once with nothing changed (the NBD protocol allows either).
    can_fast_zero = True
    can_multi_conn = True  # every connection shares one fd and flush syncs both replicas
    read_only = False

    def __init__(self, node: "Node", vol: Volume):
        self.node = node
        self.vol = vol
        self.name = vol.name
        self.size = vol.size
        self.io_stats = vol.io_stats  # the NBD server counts each request here

    @property
    def member(self) -> Member | None:
        return self.node.member_of.get(self.vol.name)

    @property
    def description(self) -> str:
        m = self.member
        wwn = m.st.wwn if m else self.node.local_wwn(self.vol.name)
        group = f" group={m.group.name} role={m.group.role}" if m else ""
        return f"syncd volume {self.vol.name} wwn={wwn}{group}"

    def fast_read(self, offset: int, length: int, buffers: PayloadBuffers | None = None):
        m = self.member
        if m is not None:
            return m.group.io.fast_read(m, offset, length, buffers)
        if self.vol.direct:
            return None
        try:
            return self.vol.read_sync(offset, length, buffers)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    def fast_write(self, offset: int, data, done) -> bool:
        m = self.member
        if m is not None:
            return m.group.io.fast_write(m, offset, data, done)
        if self.vol.direct:
            return False
        try:
            self.vol.write_sync(offset, data)
        except OSError as e:
            done(e.errno or errno.EIO, str(e))
            return True
        done(0, "")
        return True

    async def read(self, offset: int, length: int):
        m = self.member
        if m is not None:
            return await m.group.io.host_read(m, offset, length)
        try:
            return self.vol.read_sync(offset, length)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    async def _op(self, kind, offset, length, data, fua, no_hole=False, fast=False):
        m = self.member
        if m is not None:
            await m.group.io.host_write(m, kind, offset, length, data, fua, no_hole, fast)
            return
        try:
            await apply_local(self.vol, kind, offset, length, data, fua, no_hole, fast)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    async def write(self, offset: int, data, fua: bool) -> None:
        await self._op(WRITE, offset, len(data), data, fua)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._op(TRIM, offset, length, None, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool, fast: bool = False) -> None:
        await self._op(ZEROES, offset, length, None, fua, no_hole, fast)

    async def flush(self) -> None:
        m = self.member
        if m is not None:
            await m.group.io.host_flush(m)
            return
        try:
            await self.vol.flush()
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    async def allocation(self, offset: int, length: int):
        limit = self.node.cfg.nbd_limits.block_status_max_extents
        m = self.member
        if m is not None:
            return m.group.io.host_allocation(m, offset, length, limit)
        return self.vol.allocation(offset, length, limit)

    def alua(self, client: ClientIdentity) -> AluaState:
        m = self.member
        if m is None:
            return AluaState(ALUA_ACTIVE_OPTIMIZED, 0)
        return m.group.alua(self.node.hosts.host_for(client))


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        # First: a node that cannot tell a power cut from a kill -9 touches nothing.
        self.boot_id = self._read_boot_id()
        self.store = StateStore(cfg.data_dir, cfg.name)
        self.state = self.store.load()
        self.uuid = uuid.UUID(self.state.node_uuid)
        self.region_size = cfg.link.region_size if cfg.link else 256 << 10
        self.volumes: dict[str, Volume] = {}
        self.exports: dict[str, VolumeExport] = {}
        self.groups: dict[str, Group] = {}
        self.member_of: dict[str, Member] = {}
        # Bytes sent as resync, compared by digest, fetched back from the peer after a power cut.
        self.stats = {"resync_bytes": 0, "resync_hole_bytes": 0, "compared_bytes": 0, "pulled_bytes": 0}
        self.started_at = time.time()
        # The link's state exchange numbers this node's role snapshots (roles_seq) and keeps the
        # number of the peer's latest, so an older snapshot changes nothing (peer.peer_roles).
        self.roles_seq = 0
        self.peer_roles_seq = 0
        # Set once this link session's state exchange has been answered: the regions the peer
        # reported it may lack (``suspect_regions``) are in the dirty maps then (Group._recover).
        # (A new one per link session: the session's mark, as resyncs and reports take it.)
        self.exchanged = trio.Event()
        # iSCSI: COMPARE AND WRITE and PERSISTENT RESERVE OUT each take one lock per volume
        # here (node.iscsi); the reservations are this array's copy, kept in state.json.
        self.caw_locks: dict[str, trio.Lock] = {}
        self.pr_locks: dict[str, trio.Lock] = {}
        self.reservations = pr.Registry({v: pr.state_from_json(d) for v, d in self.state.reservations.items()},
                                        persist=True)
        self._nursery: trio.Nursery | None = None
        self._save_pending = False
        self.fatal = ""  # set when this node's metadata can no longer be written: it stops
        self.nbd_ports: list[tuple[str, int]] = []
        self.nbd = None  # the NBD server, once running
        self.iscsi = None  # the iSCSI target ([iscsi]), once running
        self.metrics_port: int | None = None  # the Prometheus endpoint's port, once listening ([metrics])
        self.hosts = HostTable(self.state)
        # Every change of state, as it happens (syncctl events, the hooks); filled by the
        # owners of the states (Group.command, the link, the witness client, resync, verify).
        self.events = EventBus(cfg.name, cfg.events.backlog)
        self.hooks = None
        if cfg.hooks.commands:
            from .hooks import HookRunner

            self.hooks = HookRunner(cfg.name, cfg.hooks, self.events)
            self.events.add_listener(self.hooks.on_event)
        try:
            for vc in cfg.volumes:
                v = Volume(vc.name, vc.path, size=vc.size, direct=vc.direct)
                self.volumes[vc.name] = v
                self.exports[vc.name] = VolumeExport(self, v)
        except VolumeError:
            self.close()
            raise
        self.witness = None
        wcfg = cfg.witness
        if self.state.witness is not None:  # set by setrcopytarget witness: overrides the config
            from ..config import ConfigError, parse_witness_client

            try:
                wcfg = parse_witness_client(self.state.witness, "state.witness")
            except ConfigError as e:
                self.close()
                raise NodeError(f"the witness recorded in {self.store.path} is invalid: {e}") from None
        if wcfg is not None:
            self.witness = self._witness_client(wcfg)
        for gs in self.state.groups.values():
            g = self.add_group(gs, run=False)
            for ms in gs.members:
                vol = self.volumes.get(ms.local)
                if vol is None:
                    self.close()
                    raise NodeError(
                        f"group {gs.name} holds volume {ms.local}, which the config no longer "
                        f"defines; restore it in {cfg.source or 'the config'} or dismiss it"
                    )
                if vol.size != ms.size:
                    self.close()
                    raise NodeError(
                        f"volume {ms.local} of group {gs.name} is now {vol.size} bytes, "
                        f"but was admitted with {ms.size}; refusing to start"
                    )
                self.member_of[ms.local] = g.add_member(ms, vol)
        self.resync = Resync(self)
        self.link: Link | None = None
        if cfg.link:
            self.link = Link(
                cfg.link, cfg.name, self.uuid.bytes, lambda link, path, f: peer.on_request(self, link, path, f),
                self._on_link_up, self._on_link_down, self._on_path
            )
        # After an unclean stop (crash, kill -9, power cut) the regions that may differ are
        # those of the write-intent logs (every region written or being written whose peer may
        # lack it, and every dirty one): a primary compares them by digest; a secondary reports
        # them to its primary. Without a trustworthy intent log, every region.
        self.unclean = self.state_dirty_flag()
        # After an unclean stop: did the machine restart since (its caches lost, as in a power
        # cut or a kernel crash), or did only the daemon die (kill -9, a crash of the process:
        # its page cache and its disks kept every write it made)? Only the first may have
        # taken writes the peer holds, so only then does this array wait for its peer.
        self.caches_lost = self.unclean and self._marker_boot_id() != self.boot_id
        if self.unclean:
            log.warning("unclean stop: %s", "the machine restarted since (or the last run was of a syncd that "
                        "did not record it): writes not flushed may be lost here" if self.caches_lost else
                        "only the daemon stopped (same boot of the machine): every write it made is here")
        for g in self.groups.values():
            for m in g.members.values():
                if g.state.peer_newer and not self.unclean:
                    if g.role != "primary":
                        # Stopped cleanly before its primary resynced what an unclean stop before
                        # may have taken: its write-intent log kept those regions; reported again
                        # (every region if the log cannot be trusted now: found by review).
                        m.suspect_regions = set(m.intent.loaded_regions() if m.intent.trusted
                                                else range(m.dirty.nregions))
                    else:
                        # Stopped cleanly while it waited for its peer after an unclean stop: what
                        # it was to fetch back is in its dirty map (nothing acknowledged alone since).
                        m.crash_regions = list(set_bits(m.dirty.bits, m.dirty.nregions))
                        if m.crash_regions:
                            m.verify = True
                            g.note(f"{len(m.crash_regions)} regions of {m.st.local} may be newer at "
                                   f"{g.st.peer} (an unclean stop before the last one)")
                elif self.unclean:
                    regions = m.intent.loaded_regions() if m.intent.trusted else range(m.dirty.nregions)
                    if not m.intent.trusted:
                        log.warning("group %s: %s: every region will be compared", g.name, m.intent.problem)
                    if g.role == "primary":
                        # Copied to the peer unless the state exchange finds the peer has them
                        # newer (Group.decide_crash_regions).
                        m.crash_regions = list(regions)
                        for r in regions:
                            m.dirty.set(r)
                        if m.dirty.count:
                            m.verify = True
                    else:
                        m.suspect_regions = set(regions)
                    g.note(f"unclean restart: {len(regions)} regions of {m.st.local} may differ from "
                           f"{g.st.peer} (write-intent log)")
                keep = m.dirty.test if g.role == "primary" else m.suspect_regions.__contains__
                m.intent.reset_sync(keep)
            if any(m.crash_regions if g.role == "primary" else m.suspect_regions for m in g.members.values()):
                if self.caches_lost:
                    # The power cut may have taken writes there that the peer holds (a primary
                    # fetches them back; a secondary takes nothing over until resynced).
                    g.handle(UncleanStop(trio.current_time()))
            elif g.state.peer_newer:
                g.handle(CaughtUp(trio.current_time()))  # it was writing nothing: nothing to fetch back
        self.set_clean_flag(False)
        self._publish_start()

    # -- clean/unclean marker ------------------------------------------------------------------
    def _marker(self) -> str:
        return os.path.join(self.cfg.data_dir, "running")

    def state_dirty_flag(self) -> bool:
        return os.path.exists(self._marker())

    def _read_boot_id(self) -> str:
        """The machine's boot id. Unknown, neither answer is safe after an unclean stop (taken
        for a power cut, a primary only killed would fetch back its peer's copies over its own:
        found by review), so the node refuses to start."""
        try:
            with open(self.cfg.boot_id_file) as f:
                boot = f.read().strip()
        except OSError as e:
            raise NodeError(f"node.boot_id_file {self.cfg.boot_id_file}: {e.strerror or e}: the node tells a "
                            "power cut from a stop of the daemon alone by it; refusing to start") from e
        if not boot:
            raise NodeError(f"node.boot_id_file {self.cfg.boot_id_file} is empty: the node tells a power cut "
                            "from a stop of the daemon alone by it; refusing to start")
        return boot

    def _marker_boot_id(self) -> str:
        """The boot id the marker of the last run recorded ("" from a syncd before it did)."""
        try:
            with open(self._marker()) as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        return lines[1].strip() if len(lines) > 1 else ""

    def set_clean_flag(self, clean: bool) -> None:
        if clean:
            try:
                os.unlink(self._marker())
            except FileNotFoundError:
                pass
        else:
            with open(self._marker(), "w") as f:
                f.write(f"{os.getpid()}\n{self.boot_id}\n")
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        for v in self.volumes.values():
            v.close()

    def local_wwn(self, vol: str) -> str:
        return make_wwn(self.state.node_uuid, vol)

    # -- persistence ---------------------------------------------------------------------------
    def save(self) -> None:
        for g in self.groups.values():
            for m in g.members.values():
                # With the regions still to be fetched back from the peer (``pull``, which only a
                # primary waiting for them has): a clean restart takes them from here.
                saved = m.dirty
                if m.pull.count:
                    saved = Bitmap(m.vol.size, m.dirty.region, m.dirty.bits)
                    saved.merge(m.pull.bits)
                m.st.dirty = encode_bits(saved.bits) if g.role == "primary" else ""
                if g.role != "primary" or not g.st.peer_has_all:
                    # A restart copies every region this array was writing (it fetches nothing
                    # back): which of them the peer holds wrong need not be kept.
                    m.peer_wrong.clear_all()
                else:
                    m.peer_wrong.intersect(saved.bits)  # those copied since are right there
                m.st.peer_wrong = encode_bits(m.peer_wrong.bits)
        try:
            self.store.save(self.state)
        except OSError as e:
            self.metadata_failed(e)
            raise StateError(self.fatal) from None

    def metadata_failed(self, e: OSError, path: str = "") -> None:
        """The data directory cannot be written (disk full, failing disk): this node cannot keep
        its promises (epochs, dirty regions, generations must be durable before it acts on
        them), so it stops, as a power cut would stop it, and says why; volumes are untouched
        and the peer takes its groups over through the witness."""
        if self.fatal:
            return
        # Descriptors are kept in reserve for these writes (files.reserve_fds) and connections
        # are limited well below RLIMIT_NOFILE: running out here means something else leaks them.
        fix = ("Find what holds this process's file descriptors (ls /proc/PID/fd), raise LimitNOFILE "
               "or lower nbd.max_connections, and start the node again" if e.errno in (errno.EMFILE, errno.ENFILE)
               else "Free space on, or repair, the data directory's disk and start the node again")
        self.fatal = (f"cannot write node metadata {path or self.store.path}: {e.strerror or e}; node "
                      f"{self.cfg.name} stops (its volumes are untouched, the peer takes its groups over). {fix}")
        log.critical("%s", self.fatal)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def save_soon(self) -> None:
        if not self._save_pending and self._nursery is not None:
            self._save_pending = True

            async def _later():
                await trio.sleep(0.05)
                self._save_pending = False
                # On the loop, not in a thread: every save must see a state nobody is changing,
                # and saves must not race each other on the temporary file.
                self.save()

            self._nursery.start_soon(_later)

    def disk_failed(self, g: Group, peer_in_sync: bool) -> None:
        """A backing device of ``g`` failed here: hand the group over or tell the primary."""
        from .operations import after_disk_failure

        self.spawn(after_disk_failure, self, g, peer_in_sync)

    # -- groups ----------------------------------------------------------------------------------
    def role_timing(self) -> Timing:
        lk = self.cfg.link
        wc = self.witness.cfg if getattr(self, "witness", None) is not None else None
        wt = None
        if wc is not None:
            heard_for = wc.owner_heard_for() if getattr(wc, "backend", "builtin") == "etcd" else 0.0
            wt = WitnessTiming(wc.interval, wc.owner_lease, wc.grace, drift=lk.clock_drift if lk else 0.05,
                               link_notice=lk.path_timeout if lk else 1.5, owner_heard_for=heard_for)
        if lk is None:
            return Timing(witness=wt)
        return Timing(lease=lk.lease, lease_drift=lk.clock_drift, lease_margin=lk.lease_margin,
                      transition_timeout=lk.transition_timeout, witness=wt)

    def add_group(self, gs, run: bool = True) -> Group:
        """A group this node holds from now on (``run``: created now, with the peer's agreement);
        its timers run in the node's nursery."""
        g = Group(self, gs, created=run)
        self.groups[gs.name] = g
        if run:
            g.publish()
            assert self._nursery is not None
            self._nursery.start_soon(g.run)
        return g

    def remove_group(self, name: str) -> None:
        self.groups.pop(name).stop()
        del self.state.groups[name]
        self.events.retain("alua", lambda f: f["group"] != name)
        self.events.retain("verify", lambda f: f["group"] != name)
        self.events.remove("resync", {"group": name}, result="interrupted")
        self.events.remove("group", {"group": name})

    def group_by_id(self, gid: int) -> Group | None:
        for g in self.groups.values():
            if g.st.gid == gid:
                return g
        return None

    def spawn(self, fn, *args) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- running -------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from ..nbd.server import NBDServer
        from .admin import AdminServer

        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.hooks is not None:
                    await nursery.start(self.hooks.run)
                for g in self.groups.values():  # each group's role machine and its timers
                    await nursery.start(g.run)
                if self.witness is not None:
                    nursery.start_soon(self._run_witness, self.witness)
                if self.link:
                    await nursery.start(self.link.run)
                    nursery.start_soon(self._intent_loop)
                # The loop polls for all its input (NBD, iSCSI, the link), with a link or not.
                nursery.start_soon(netio.poller.run, self.cfg.busy_poll_us / 1e6)
                tls = self.cfg.nbd_tls
                limits = self.cfg.nbd_limits
                if tls is not None:
                    from ..config import server_tls_context

                    nbd = self.nbd = NBDServer(self, server_tls_context(tls), tls.mode == "require", limits=limits)
                else:
                    nbd = self.nbd = NBDServer(self, limits=limits)
                for host, port in self.cfg.nbd_listen:
                    actual = await nursery.start(nbd.serve_tcp, host, port)
                    self.nbd_ports.append((host, actual if isinstance(actual, int) else port))
                if self.cfg.iscsi is not None:
                    from .iscsi import NodeIscsi

                    self.iscsi = NodeIscsi(self, self.cfg.iscsi)
                    await nursery.start(self.iscsi.serve)
                await nursery.start(AdminServer(self).serve, self.cfg.admin_socket)
                if self.cfg.metrics is not None:
                    from ..metrics.expose import Endpoint
                    from ..metrics.node import collect_node

                    ep = Endpoint(self.cfg.metrics, lambda fam: collect_node(self, fam))
                    self.metrics_port = await nursery.start(ep.serve, ep.listen())
                    log.info("node %s: metrics on http://%s:%d/metrics", self.cfg.name, self.cfg.metrics.listen[0],
                             self.metrics_port)
                log.info("node %s ready: nbd %s admin %s", self.cfg.name, self.nbd_ports, self.cfg.admin_socket)
                task_status.started()
            if self.fatal:
                raise StateError(self.fatal)
        finally:
            # All blocking (no checkpoint): a cancelled stop cannot interrupt it.
            if not self.fatal:  # a node that could not write its metadata did not stop cleanly
                try:
                    self.save()
                    # Clean means nothing to compare at the next start: the volumes' data
                    # must be durable first (a power cut may follow the stop).
                    for v in self.volumes.values():
                        v.sync_blocking()
                    self.set_clean_flag(True)
                except StateError:
                    pass
                except OSError as e:
                    log.error("node %s: a volume could not be synced (%s): not marked as stopped "
                              "cleanly, the next start compares what may differ", self.cfg.name, e)
            self.close()

    async def hand_over_for_shutdown(self) -> None:
        """A primary that is shut down (SIGTERM: reboot, maintenance) first switches its groups
        over to the in-sync peer, so hosts at the peer see a pause, not a failover."""
        from .operations import switchover

        if self.link is None or self.cfg.link is None:
            return
        for g in list(self.groups.values()):
            if not (g.role == "primary" and g.st.started and g.mode is Mode.ATTACHED and self.link.up
                    and g.st.policies.get("auto_failover", True)):
                continue
            with trio.move_on_after(self.cfg.link.transition_timeout + 2):
                try:
                    r = await switchover(self, g)
                    log.info("group %s handed over to %s for shutdown (%s ms)", g.name, g.st.peer, r["duration_ms"])
                except NodeError as e:
                    log.warning("group %s: no handover before shutdown: %s", g.name, e)
        # As a secondary we give our lease back, so the primary goes on at once instead of
        # waiting for it to run out.
        for g in list(self.groups.values()):
            if g.role == "secondary" and self.link.up:
                g.handle(ShuttingDown(trio.current_time()))
                with trio.move_on_after(1.0):
                    try:
                        await self.control({"op": "leaving", "group": g.name, "epoch": g.epoch})
                    except NodeError as e:
                        log.warning("group %s: primary not told of the shutdown: %s", g.name, e)
        await self._drain_host_io()

    async def _drain_host_io(self) -> None:
        """Let host requests already received finish before the connections close; new ones
        are refused ESHUTDOWN, so a host's multipath moves them to the peer without having to
        re-issue anything that was in flight here."""
        nbd = getattr(self, "nbd", None)
        if nbd is not None:
            with trio.move_on_after(self.cfg.link.max_request_hold() if self.cfg.link else 5.0):
                await nbd.drain()

    # -- the quorum witness ----------------------------------------------------------------------
    def _witness_client(self, wcfg):
        """The client of the configured backend: the built-in witness, or etcd."""
        if getattr(wcfg, "backend", "builtin") == "etcd":
            from ..witness.etcd_node import EtcdWitnessClient

            ec = EtcdWitnessClient(wcfg, self.cfg.name, self._witness_groups, self._witness_report,
                                   self._witness_changed)
            ec.report_fn = self._witness_report_now
            # Each lease etcd grants this array (answered, so committed by a quorum): etcd may
            # hold the array alive from then whatever becomes of the requests after it.
            ec.on_sent = self._witness_sent
            return ec
        from ..witness.client import WitnessClient

        wc = WitnessClient(wcfg, self.cfg.name, self._witness_groups, self._witness_report, self._witness_changed)
        # What the built-in witness may have heard (the role machine's WitnessSent). For etcd
        # only granted leases count, not requests sent: a request reaches a member that may
        # have no quorum (nothing commits there), and a pre-elected primary must go on when the
        # etcd quorum is lost (failure matrix).
        wc.on_sent = self._witness_sent
        wc.report_fn = self._witness_report_now  # one group's report, not every group's
        return wc

    def _witness_sent(self, name: str, sent: float) -> None:
        """A request about group ``name`` went to the witness on a connection: the witness may
        have heard this node then (it notes the sender per group)."""
        g = self.groups.get(name)
        if g is not None:
            g.witness_sent(sent)

    async def _run_witness(self, wc) -> None:
        with trio.CancelScope() as wc.scope:
            await wc.run()

    def set_witness(self, settings: dict | None) -> None:
        """Use another witness (or none) from now on; ``settings`` as in the [witness] table,
        already validated. Persisted: it overrides [witness] in the config from now on."""
        from ..config import parse_witness_client

        old = self.witness
        if old is not None and getattr(old, "scope", None) is not None:
            old.scope.cancel()
        self.witness = None
        if settings is not None:
            self.witness = self._witness_client(parse_witness_client(settings, "witness"))
            self.spawn(self._run_witness, self.witness)
        for g in self.groups.values():
            g.roles.timing = self.role_timing()
        self.state.witness = settings
        self.save()
        self.events.retain("witness", lambda f: False)
        if self.witness is not None:
            self._witness_changed(None)

    # -- NBD catalog: LUN masking ---------------------------------------------------------------
    def exports_for(self, client: ClientIdentity):
        vols = self.hosts.volumes_for(self.hosts.host_for(client))
        return {v: self.exports[v] for v in vols if v in self.exports}

    def hosts_changed(self) -> None:
        """Hosts, sets or VLUNs changed: persist, re-index, and disconnect every NBD connection
        that is attached to an export its host may no longer see."""
        self.save()
        self.hosts = HostTable(self.state)
        if self.nbd is not None:
            self.nbd.drop(lambda c: c.export is not None and c.export.name not in self.exports_for(c.identity))
        if self.iscsi is not None:
            self.iscsi.hosts_changed()
        self.publish_alua()

    def group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            known = ", ".join(sorted(self.groups)) or "none"
            raise NotFound(f"group {name} does not exist on {self.cfg.name} (groups: {known})")
        return g

    # -- link events ---------------------------------------------------------------------------
    def _on_link_up(self) -> None:
        log.info("replication link to %s up", self.cfg.link.peer)
        self.events.update("link", {"peer": self.cfg.link.peer, "state": "up"})
        self.peer_roles_seq = 0  # the peer may have restarted: its numbering starts again
        self.exchanged = trio.Event()  # a new session: what the peer may lack is asked again
        now = trio.current_time()
        for g in list(self.groups.values()):
            g.handle(LinkUp(now))
        self.tell_peer()

    def tell_peer(self) -> None:
        """Run the state exchange with the peer (the link came up, or a role changed while up)."""
        if self.link is not None and self.link.up:
            self.spawn(peer.exchange_state, self)

    def _on_link_down(self) -> None:
        log.warning("replication link to %s down (all paths)", self.cfg.link.peer)
        self.events.update("link", {"peer": self.cfg.link.peer, "state": "down"})
        now = trio.current_time()
        for g in list(self.groups.values()):
            g.handle(LinkDown(now))

    def _on_path(self, p) -> None:
        """A link path went up or down, or its round trip crossed ``link.max_rtt_ms``."""
        extra = {}
        if p.rtt_ms is not None:
            extra["rtt_ms"] = round(p.rtt_ms, 3)
        self.events.update("path", self._path_facts(p), **extra)

    def _path_facts(self, p) -> dict:
        return {"peer": self.cfg.link.peer, "path": p.index, "local": "%s:%d" % p.local, "remote": "%s:%d" % p.peer,
                "state": "up" if p.state == "up" else "down", "rtt_warning": p.rtt_high,
                "max_rtt_ms": self.cfg.link.max_rtt_ms}

    def _witness_changed(self, connected: bool | None) -> None:
        wc = self.witness
        if wc is None:
            return
        if connected is False:
            log.warning("quorum witness at %s unreachable: %s", wc.info()["address"], wc.last_error or "no answer")
        state = {True: "reachable", False: "unreachable", None: "unknown"}[wc.connected]
        self.events.update("witness", {"address": wc.info()["address"], "name": wc.witness_name or None,
                                       "state": state})

    # -- the event bus: objects that are not a group's ------------------------------------------
    def _publish_start(self) -> None:
        """The objects this node holds when it starts (``create`` events nobody hears yet:
        the first subscriber sees them as ``exists``)."""
        self.events.update("node", {"node": self.cfg.name, "uuid": str(self.uuid), "pid": os.getpid()})
        if self.link is not None:
            self.events.update("link", {"peer": self.cfg.link.peer, "state": "down"})
            for p in self.link.paths:
                self.events.update("path", self._path_facts(p))
        if self.witness is not None:
            self._witness_changed(None)
        for g in self.groups.values():
            g.publish()

    def publish_alua(self, only: Group | None = None) -> None:
        """The ALUA state of every (host, volume) of ``only`` (or of every group) that a host
        may see: derived, recomputed whenever what it derives from may have changed (role,
        serving, proximity, hosts, VLUNs, members)."""
        if getattr(self, "iscsi", None) is not None:
            self.iscsi.alua_changed()
        bus = getattr(self, "events", None)
        if bus is None:
            return
        from ..nbd.export import ALUA_NAMES

        seen: set[tuple[str, str, str]] = set()
        for h in sorted(self.state.hosts):
            for vol in self.hosts.volumes_for(h):
                m = self.member_of.get(vol)
                if m is None or (only is not None and m.group is not only):
                    continue
                g = m.group
                a = g.alua(h)
                seen.add((g.name, vol, h))
                bus.update("alua", {"group": g.name, "volume": vol, "host": h, "state": ALUA_NAMES[a.state],
                                    "epoch": a.epoch, "proximity": g.st.proximity.get(h, "all")})
        bus.retain("alua", lambda f: (only is not None and f["group"] != only.name)
                   or (f["group"], f["volume"], f["host"]) in seen)

    def _witness_groups(self):
        """What the witness client reports: (group, members, owner, epoch, flags) per group."""
        out = []
        for g in self.groups.values():
            me, other = self.cfg.name, g.st.peer
            owner = me if g.state.role is Role.PRIMARY else other
            out.append((g.name, tuple(sorted((me, other))), owner, g.epoch, self._report_flags(g)))
        return out

    def _witness_report_now(self, name: str) -> tuple[int, int] | None:
        """One group's epoch and report flags as they are now (the clients' ``report_fn``, called
        as a report is sent)."""
        g = self.groups.get(name)
        if g is None:
            return None
        g.session_sent = self.exchanged
        return g.epoch, self._report_flags(g)

    def _report_flags(self, g: Group) -> int:
        from ..witness.proto import REPORT_LOST_ANEW, REPORT_PEER_ALIVE, REPORT_PEER_IN_SYNC

        flags = REPORT_PEER_ALIVE if self.link is not None and self.link.up else 0
        if self.exchanged is not g.session_reported:
            flags |= REPORT_LOST_ANEW  # the link came up since the last report the witness answered
        return flags | REPORT_PEER_IN_SYNC if peer_in_sync(g.state) else flags

    def _witness_report(self, name: str, sent: float, owner: str, epoch: int) -> None:
        """The witness answered a report: its record of the group (who owns which epoch)."""
        g = self.groups.get(name)
        if g is not None:
            g.session_reported = g.session_sent
            g.witness_report(sent, owner, epoch)

    async def _intent_loop(self) -> None:
        """Every second: clear write-intent bits of regions no write can still be applied to
        (idle longer than ``max_request_hold``) that are not dirty (primary) or still to be
        reported (secondary after a crash); on a primary, give up on forwarded writes whose
        RELEASE never came (``DataPath.expire_forwarded``)."""
        hold = self.cfg.link.max_request_hold() + 1.0
        lk = self.cfg.link
        release_bound = lk.io_timeout + lk.path_timeout  # the secondary gave up on it by then
        while True:
            await trio.sleep(1.0)
            for g in list(self.groups.values()):
                if g.role == "primary":
                    g.io.expire_forwarded(release_bound)
                for m in list(g.members.values()):
                    # Asked again after the pass's data sync: the role may have changed meanwhile.
                    def keep(r: int, g: Group = g, m: Member = m) -> bool:
                        if g.role == "primary":
                            return m.dirty.test(r) or m.pull.test(r)
                        return r in m.suspect_regions

                    try:
                        await m.intent.clear_idle(hold, keep)
                    except OSError as e:
                        log.warning("group %s: write-intent log of %s: %s", g.name, m.st.local, e)

    # -- control RPCs --------------------------------------------------------------------------
    async def control(self, body: dict) -> dict:
        """Send an administrative RPC to the peer; raises NodeError with the peer's refusal."""
        if self.link is None:
            raise NodeError("this node has no replication link configured ([link] in its config)")
        if not self.link.up:
            raise NodeError(f"target {self.cfg.link.peer} is not ready: the replication link is down")
        try:
            reply = await self.link.request(Frame.control(self.link.next_id(), body))
        except Exception as e:
            raise NodeError(f"target {self.cfg.link.peer} did not answer: {e}") from None
        ans = reply.control_json() if reply.payload else {}
        if reply.status != Status.OK or not ans.get("ok", False):
            raise NodeError(f"target {self.cfg.link.peer} refused: {ans.get('error', reply.status)}")
        return ans


def serve_node(cfg: NodeConfig) -> int:
    """Run a node until SIGTERM/SIGINT (a primary hands its groups over first)."""
    from ..daemon import run_until_signal

    return run_until_signal(lambda: Node(cfg), f"node {cfg.name}", (StateError, VolumeError, NodeError),
                            before_stop=lambda node: node.hand_over_for_shutdown(),
                            summary=lambda node: f"node {cfg.name}: {len(node.volumes)} volumes, {len(node.groups)} "
                                                 f"groups, nbd {', '.join(f'{h}:{p}' for h, p in node.nbd_ports)}")
