"""The storage node daemon: volumes, groups, the replication link, the NBD service and the
admin API, all in one nursery. Shutdown is cancellation."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid

import trio

from ..config import NodeConfig
from .errors import NodeError
from .hosts import HostTable
from .group import DETACHED, TRIM, WRITE, ZEROES, Group, Member
from ..nbd.export import AluaState, BlockError, ClientIdentity, ALUA_ACTIVE_OPTIMIZED
from ..repl.link import Link, Path
from ..repl.proto import Frame, MsgType, Status
from .resync import Resync
from .state import StateError, StateStore, encode_bits
from .volume import Volume, VolumeError, make_wwn

log = logging.getLogger("syncd.node")


class VolumeExport:
    """The NBD face of a volume: replicated through its group, or local when in no group."""

    can_flush = can_fua = can_trim = can_zero = True
    can_multi_conn = True  # every connection shares one fd and flush syncs both replicas
    read_only = False

    def __init__(self, node: "Node", vol: Volume):
        self.node = node
        self.vol = vol
        self.name = vol.name
        self.size = vol.size

    @property
    def member(self) -> Member | None:
        return self.node.member_of.get(self.vol.name)

    @property
    def description(self) -> str:
        m = self.member
        wwn = m.st.wwn if m else self.node.local_wwn(self.vol.name)
        group = f" group={m.group.name} role={m.group.role}" if m else ""
        return f"syncd volume {self.vol.name} wwn={wwn}{group}"

    def fast_read(self, offset: int, length: int):
        m = self.member
        if m is not None:
            return m.group.fast_read(m, offset, length)
        if self.vol.direct:
            return None
        try:
            return self.vol.read_sync(offset, length)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    def fast_write(self, offset: int, data, done) -> bool:
        m = self.member
        if m is not None:
            return m.group.fast_write(m, offset, data, done)
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
            return await m.group.host_read(m, offset, length)
        try:
            return self.vol.read_sync(offset, length)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    async def _op(self, kind, offset, length, data, fua, no_hole=False):
        m = self.member
        if m is not None:
            await m.group.host_write(m, kind, offset, length, data, fua, no_hole)
            return
        from .group import apply_local

        try:
            await apply_local(self.vol, kind, offset, length, data, fua, no_hole)
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    async def write(self, offset: int, data, fua: bool) -> None:
        await self._op(WRITE, offset, len(data), data, fua)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._op(TRIM, offset, length, None, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool) -> None:
        await self._op(ZEROES, offset, length, None, fua, no_hole)

    async def flush(self) -> None:
        m = self.member
        if m is not None:
            await m.group.host_flush(m)
            return
        try:
            await self.vol.flush()
        except OSError as e:
            raise BlockError(e.errno or errno.EIO, str(e)) from None

    async def allocation(self, offset: int, length: int):
        return [(length, 0)] if self.member is not None else self.vol.allocation(offset, length)

    def alua(self, client: ClientIdentity) -> AluaState:
        m = self.member
        if m is None:
            return AluaState(ALUA_ACTIVE_OPTIMIZED, 0)
        return m.group.alua(self.node.hosts.host_for(client))


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.store = StateStore(cfg.data_dir, cfg.name)
        self.state = self.store.load()
        self.uuid = uuid.UUID(self.state.node_uuid)
        self.region_size = cfg.link.region_size if cfg.link else 256 << 10
        self.volumes: dict[str, Volume] = {}
        self.exports: dict[str, VolumeExport] = {}
        self.groups: dict[str, Group] = {}
        self.member_of: dict[str, Member] = {}
        self.stats = {"resync_bytes": 0, "compared_bytes": 0}  # sent as resync / compared by digest
        self.started_at = time.time()
        self._nursery: trio.Nursery | None = None
        self._save_pending = False
        self.fatal = ""  # set when this node's metadata can no longer be written: it stops
        self.nbd_ports: list[tuple[str, int]] = []
        self.nbd = None  # the NBD server, once running
        self.hosts = HostTable(self.state)
        try:
            for vc in cfg.volumes:
                v = Volume(vc.name, vc.path, size=vc.size, direct=vc.direct)
                self.volumes[vc.name] = v
                self.exports[vc.name] = VolumeExport(self, v)
        except VolumeError:
            self.close()
            raise
        for gs in self.state.groups.values():
            g = Group(self, gs)
            self.groups[gs.name] = g
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
            from ..witness.client import WitnessClient

            self.witness = WitnessClient(wcfg, cfg.name, self._witness_groups)
        self.link: Link | None = None
        if cfg.link:
            self.link = Link(
                cfg.link, cfg.name, self.uuid.bytes, self._on_request, self._on_link_up, self._on_link_down
            )
        # After an unclean stop (crash, kill -9, power cut) the regions that may differ are
        # those of the write-intent logs (every region written or being written whose peer may
        # lack it, and every dirty one): a primary compares them by digest; a secondary reports
        # them to its primary. Without a trustworthy intent log, every region.
        self.unclean = self.state_dirty_flag()
        for g in self.groups.values():
            for m in g.members.values():
                if self.unclean:
                    regions = m.intent.loaded_regions() if m.intent.trusted else range(m.dirty.nregions)
                    if not m.intent.trusted:
                        log.warning("group %s: %s: every region will be compared", g.name, m.intent.problem)
                    if g.role == "primary":
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
        self.set_clean_flag(False)

    # -- clean/unclean marker ------------------------------------------------------------------
    def _marker(self) -> str:
        return os.path.join(self.cfg.data_dir, "running")

    def state_dirty_flag(self) -> bool:
        return os.path.exists(self._marker())

    def set_clean_flag(self, clean: bool) -> None:
        if clean:
            try:
                os.unlink(self._marker())
            except FileNotFoundError:
                pass
        else:
            with open(self._marker(), "w") as f:
                f.write(f"{os.getpid()}\n")
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
                m.st.dirty = encode_bits(m.dirty.bits) if g.role == "primary" else ""
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
        self.fatal = (f"cannot write node metadata {path or self.store.path}: {e.strerror or e}; node "
                      f"{self.cfg.name} stops (its volumes are untouched, the peer takes its groups over). "
                      "Free space on, or repair, the data directory's disk and start the node again")
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

    def disk_failed(self, g: Group) -> None:
        """A backing device of ``g`` failed here: hand the group over or tell the primary."""
        from .operations import after_disk_failure

        self.spawn(after_disk_failure, self, g)

    def spawn(self, fn, *args) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- running -------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from .admin import AdminServer
        from ..nbd.server import NBDServer

        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.witness is not None:
                    nursery.start_soon(self._run_witness, self.witness)
                for g in self.groups.values():
                    g.fence_at_start()
                if self.link:
                    await nursery.start(self.link.run)
                    for g in self.groups.values():
                        nursery.start_soon(self._lease_loop, g)
                    nursery.start_soon(self._intent_loop)
                tls = self.cfg.nbd_tls
                limits = dict(max_inflight=self.cfg.nbd_max_inflight,
                              max_inflight_per_connection=self.cfg.nbd_max_inflight_per_connection)
                if tls is not None:
                    from ..config import server_tls_context

                    nbd = self.nbd = NBDServer(self, server_tls_context(tls), tls.mode == "require", **limits)
                else:
                    nbd = self.nbd = NBDServer(self, **limits)
                for host, port in self.cfg.nbd_listen:
                    actual = await nursery.start(nbd.serve_tcp, host, port)
                    self.nbd_ports.append((host, actual if isinstance(actual, int) else port))
                await nursery.start(AdminServer(self).serve, self.cfg.admin_socket)
                log.info("node %s ready: nbd %s admin %s", self.cfg.name, self.nbd_ports, self.cfg.admin_socket)
                task_status.started()
            if self.fatal:
                raise StateError(self.fatal)
        finally:
            with trio.CancelScope(shield=True):
                if not self.fatal:  # a node that could not write its metadata did not stop cleanly
                    try:
                        self.save()
                        self.set_clean_flag(True)
                    except StateError:
                        pass
                self.close()

    async def hand_over_for_shutdown(self) -> None:
        """A primary that is shut down (SIGTERM: reboot, maintenance) first switches its groups
        over to the in-sync peer, so hosts at the peer see a pause, not a failover."""
        from .group import ATTACHED
        from .operations import switchover

        if self.link is None or self.cfg.link is None:
            return
        for g in list(self.groups.values()):
            if not (g.role == "primary" and g.st.started and g.peer_mode == ATTACHED and self.link.up
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
                g.lease_until = 0.0
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
            await nbd.drain(self.cfg.link.max_request_hold() if self.cfg.link else 5.0)

    # -- the quorum witness ----------------------------------------------------------------------
    async def _run_witness(self, wc) -> None:
        with trio.CancelScope() as wc.scope:
            async with trio.open_nursery() as n:
                n.start_soon(wc.run)
                n.start_soon(self._witness_catch_up, wc)

    async def _witness_catch_up(self, wc) -> None:
        """Tell the witness about epochs the operator made without it (RESOLVE), once the peer
        has accepted this array as primary of that epoch (it mirrors our writes); until then
        the witness would refuse our KEEP on the next link loss."""
        from .group import ATTACHED, SYNCING
        from ..witness.proto import WType

        while True:
            await trio.sleep(wc.cfg.interval)
            for g in list(self.groups.values()):
                if not (g.st.witness_behind and g.role == "primary" and not g.st.split_brain
                        and g.peer_mode in (SYNCING, ATTACHED) and wc.reachable):
                    continue
                d = await wc.decide(WType.RESOLVE, g.name, g.epoch)
                if d is None:
                    continue
                if d.granted and d.owner == self.cfg.name and d.epoch == g.epoch:
                    g.st.witness_behind = False
                    self.save()
                    g.note(f"the quorum witness knows this array's epoch {g.epoch} now ({d.reason})")
                elif d.reason != g._resolve_refusal:
                    g._resolve_refusal = d.reason
                    g.note(f"the quorum witness refused epoch {g.epoch}: {d.reason}")

    def set_witness(self, settings: dict | None) -> None:
        """Use another witness (or none) from now on; ``settings`` as in the [witness] table,
        already validated. Persisted: it overrides [witness] in the config from now on."""
        from ..config import parse_witness_client
        from ..witness.client import WitnessClient

        old = self.witness
        if old is not None and getattr(old, "scope", None) is not None:
            old.scope.cancel()
        self.witness = None
        if settings is not None:
            self.witness = WitnessClient(parse_witness_client(settings, "witness"), self.cfg.name, self._witness_groups)
            self.spawn(self._run_witness, self.witness)
        self.state.witness = settings
        self.save()

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

    def group(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            known = ", ".join(sorted(self.groups)) or "none"
            raise NodeError(f"group {name} does not exist on {self.cfg.name} (groups: {known})")
        return g

    # -- link events ---------------------------------------------------------------------------
    def _on_link_up(self) -> None:
        log.info("replication link to %s up", self.cfg.link.peer)
        for g in self.groups.values():
            g.peer_failed = False  # a new session: the peer may have been repaired
        self.spawn(self._exchange_state)

    async def _exchange_state(self) -> None:
        mine = [self.group_summary(g) for g in self.groups.values() if g.role == "primary"]
        try:
            ans = await self.control({"op": "sync_groups", "groups": mine})
        except NodeError as e:
            log.warning("state exchange with %s failed: %s", self.cfg.link.peer, e)
            ans = {}
        for name in ans.get("split_brain", []):
            g = self.groups.get(name)
            peer = ans.get("gens", {}).get(name, {})
            if g is not None:
                g.mark_split_brain(peer.get("gen", ""), peer.get("gen_history", []))
        for entry in ans.get("suspect_regions", []):
            # The peer crashed: these regions may hold writes we do not have (or lack ours).
            g = self.groups.get(entry["group"])
            m = g.by_id.get(entry["vol_id"]) if g is not None and g.role == "primary" else None
            if m is not None:
                for r in entry["regions"]:
                    m.dirty.set(r)
                m.intent.set_sync(entry["regions"])
                m.verify = True
                g.note(f"{g.st.peer} restarted uncleanly: {len(entry['regions'])} regions of {m.st.local} compared")
        for entry in ans.get("suspect", []):
            # The peer's device failed since it last synced: whatever it holds is suspect.
            g = self.groups.get(entry["group"])
            if g is None or g.role != "primary":
                continue
            for vid in entry["vol_ids"]:
                m = g.by_id.get(vid)
                if m is not None:
                    m.compare_all()
                    g.note(f"{g.st.peer}'s copy of {m.st.local} is suspect (its device failed): full compare")
        for g in self.groups.values():
            g.maybe_recover()

    def _on_link_down(self) -> None:
        log.warning("replication link to %s down (all paths)", self.cfg.link.peer)
        for g in self.groups.values():
            g.lose_peer("replication link down")

    def _witness_groups(self):
        """What the witness client reports: (group, members, owner, epoch, flags) per group."""
        from .group import ATTACHED
        from ..witness.proto import REPORT_PEER_ALIVE, REPORT_PEER_IN_SYNC

        out = []
        for g in self.groups.values():
            me, peer = self.cfg.name, g.st.peer
            owner = me if g.role == "primary" else peer
            flags = REPORT_PEER_ALIVE if self.link is not None and self.link.up else 0
            if g.role == "primary" and g.peer_mode == ATTACHED and not g.st.failsafe:
                flags |= REPORT_PEER_IN_SYNC
            out.append((g.name, tuple(sorted((me, peer))), owner, g.epoch, flags))
        return out

    async def _try_claim(self, g: Group) -> None:
        """Secondary that lost its primary: ask the witness for the group."""
        from ..witness.proto import WType

        from ..witness.decide import may_grant_later

        if g.failover_pending is None and not g.claim_refused and self.witness.reachable:
            g.failover_pending = trio.Event()  # host I/O waits for the answer (transitioning)
        d = await self.witness.decide(WType.CLAIM, g.name, g.epoch)
        if d is not None and d.granted and d.owner == self.cfg.name and g.role == "secondary":
            g.promote(d.epoch)
        elif d is not None and not d.granted and d.reason != getattr(g, "_last_claim_reason", None):
            g._last_claim_reason = d.reason
            g.note(f"failover refused by the witness: {d.reason}")
        if d is None or d.granted or not may_grant_later(d.reason):
            g.claim_refused = d is not None and not d.granted
            self._end_failover_wait(g)

    def _end_failover_wait(self, g: Group) -> None:
        ev, g.failover_pending = g.failover_pending, None
        if ev is not None:
            ev.set()

    async def _intent_loop(self) -> None:
        """Every second: clear write-intent bits of regions no write can still be applied to
        (idle longer than ``max_request_hold``) that are not dirty (primary) or still to be
        reported (secondary after a crash); on a primary, give up on forwarded writes whose
        RELEASE never came (``Group.expire_forwarded``)."""
        hold = self.cfg.link.max_request_hold() + 1.0
        lk = self.cfg.link
        release_bound = lk.io_timeout + lk.path_timeout  # the secondary gave up on it by then
        while True:
            await trio.sleep(1.0)
            for g in list(self.groups.values()):
                if g.role == "primary":
                    g.expire_forwarded(release_bound)
                for m in list(g.members.values()):
                    keep = m.dirty.test if g.role == "primary" else m.suspect_regions.__contains__
                    try:
                        await m.intent.clear_idle(hold, keep)
                    except OSError as e:
                        log.warning("group %s: write-intent log of %s: %s", g.name, m.st.local, e)

    async def _lease_loop(self, g: Group) -> None:
        lk = self.cfg.link
        while True:
            if (
                g.role == "secondary" and g.st.started and self.witness is not None
                and not self.link.up and trio.current_time() > g.lease_until
                and g.st.policies.get("auto_failover", True)
            ):
                await self._try_claim(g)
                await trio.sleep(self.witness.cfg.interval)
                continue
            if (
                g.role == "primary" and g.st.failsafe and g.st.started and self.witness is not None
                and not self.link.up and self.witness.reachable and not g.disk_error
                and g.peer_mode == DETACHED
            ):
                await g.retry_failsafe()
                await trio.sleep(self.witness.cfg.interval)
                continue
            if g.failover_pending is not None:
                self._end_failover_wait(g)
            if self.link.up:
                g.claim_refused = False
            if g.role == "secondary" and g.st.started and self.link.up:
                t0 = trio.current_time()
                try:
                    reply = await self.link.request(
                        Frame.lease(self.link.next_id(), g.st.gid, g.epoch), timeout=lk.lease / 2
                    )
                    ms = reply.lease_ms() if reply.status == Status.OK else 0
                except Exception as e:  # link down or timeout: the lease just runs out
                    log.debug("lease request for %s failed: %s", g.name, e)
                    ms = None
                if ms == 0:
                    g.lease_until = 0.0
                elif ms:
                    g.lease_until = max(g.lease_until, t0 + ms / 1000)
                await trio.sleep(lk.lease / 4)
            else:
                await trio.sleep(lk.ping_interval)

    # -- peer requests -------------------------------------------------------------------------
    def _on_request(self, link: Link, path: Path, f: Frame) -> None:
        t = f.type
        if t == MsgType.CONTROL:
            self.spawn(self._handle_control, link, path, f)
            return
        g = self._group_by_id(f.group)
        if g is None:
            if t != MsgType.RELEASE:
                link.reply(path, f.req_id, Status.UNKNOWN_GROUP)
            return
        if f.epoch != g.epoch:
            if t != MsgType.RELEASE:
                link.reply(path, f.req_id, Status.STALE_EPOCH)
            return
        if t == MsgType.RELEASE:
            g.handle_release(f)
            return
        if t == MsgType.LEASE:
            if g.role != "primary":
                link.reply(path, f.req_id, Status.NOT_PRIMARY)
            else:
                ms = g.grant_lease()
                link.reply(path, f.req_id, Status.OK if ms else Status.NOT_SERVING, Frame.lease_payload(ms))
            return
        if t == MsgType.FLUSH:
            self.spawn(self._handle_flush, link, path, f, g)
            return
        m = g.by_id.get(f.vol)
        if m is None:
            link.reply(path, f.req_id, Status.UNKNOWN_VOLUME)
            return
        if t in (MsgType.WRITE, MsgType.ZEROES, MsgType.TRIM):
            kind = {MsgType.WRITE: WRITE, MsgType.ZEROES: ZEROES, MsgType.TRIM: TRIM}[t]
            if f.forwarded:
                if g.role != "primary":
                    link.reply(path, f.req_id, Status.NOT_PRIMARY)
                    return
                if not (kind == WRITE and not f.fua and g.forwarded_fast(link, path, f, m)):
                    self.spawn(g.handle_forwarded, link, path, f, m, kind)
                return
            if g.role != "secondary":
                link.reply(path, f.req_id, Status.NOT_PRIMARY)
                return
            if kind == WRITE and not f.fua and not m.vol.direct and m.intent.ready(f.offset, len(f.payload)):
                # Mirrored writes are applied in arrival order, inline: no task per request.
                try:
                    m.vol.check_range(f.offset, len(f.payload))
                    m.vol.write_sync(f.offset, f.payload)
                except OSError as e:
                    link.reply(path, f.req_id, e.errno or errno.EIO)
                    return
                if f.resync:
                    self._resynced(m, f.offset, len(f.payload))
                link.reply(path, f.req_id, Status.OK)
                return
            self.spawn(self._apply_mirrored, link, path, f, m, kind)
            return
        if t == MsgType.READ:
            self.spawn(self._handle_read, link, path, f, m)
            return
        if t == MsgType.DIGESTS:
            self.spawn(self._handle_digests, link, path, f, m)
            return
        if t == MsgType.RESYNC_BEGIN:
            if g.disk_error:
                link.reply(path, f.req_id, Status.NOT_SERVING)
                return
            region, bits = f.resync_bitmap()
            if region != m.oos.region or len(bits) != len(m.oos.bits):
                link.reply(path, f.req_id, Status.EINVAL)
                return
            m.oos.bits[:] = bits
            m.oos.count = sum(bin(b).count("1") for b in bits)
            link.reply(path, f.req_id, Status.OK)
            return
        if t == MsgType.RESYNC_END:
            self._resynced(m, f.offset, f.length)
            if not m.oos.count:
                m.st.synced_once = True
                m.st.last_sync = time.time()
                if m.st.suspect:
                    m.st.suspect = False
                    self.save_soon()
            link.reply(path, f.req_id, Status.OK)
            return
        link.reply(path, f.req_id, Status.BAD_REQUEST)

    def _resynced(self, m: Member, offset: int, length: int) -> None:
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

    def _group_by_id(self, gid: int) -> Group | None:
        for g in self.groups.values():
            if g.st.gid == gid:
                return g
        return None

    async def _apply_mirrored(self, link, path, f: Frame, m: Member, kind: str) -> None:
        from .group import apply_local

        data = f.payload if kind == WRITE else None
        length = len(f.payload) if kind == WRITE else f.length
        try:
            await m.intent.mark(f.offset, length)
            await apply_local(m.vol, kind, f.offset, length, data, f.fua, f.no_hole)
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        if f.resync:
            self._resynced(m, f.offset, length)
        link.reply(path, f.req_id, Status.OK)

    async def _handle_flush(self, link, path, f: Frame, g: Group) -> None:
        vols = list(g.members.values()) if f.vol == 0xFFFFFFFF else [g.by_id[f.vol]] if f.vol in g.by_id else []
        try:
            for m in vols:
                await m.vol.flush()
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        link.reply(path, f.req_id, Status.OK)

    async def _handle_read(self, link, path, f: Frame, m: Member) -> None:
        try:
            m.vol.check_range(f.offset, f.length)
            data = await m.vol.read(f.offset, f.length)
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        link.reply(path, f.req_id, Status.OK, data)

    async def _handle_digests(self, link, path, f: Frame, m: Member) -> None:
        try:
            m.vol.check_range(f.offset, f.length)
            ds = await m.vol.digests(f.offset, f.length, f.digest_region())
        except OSError as e:
            link.reply(path, f.req_id, e.errno or errno.EIO)
            return
        link.reply(path, f.req_id, Status.OK, Frame.digests_payload(ds))

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

    async def _handle_control(self, link, path, f: Frame) -> None:
        from .admin import handle_peer_control

        try:
            body = f.control_json()
            result = await handle_peer_control(self, body)
            ans = {"ok": True, **(result or {})}
        except NodeError as e:
            ans = {"ok": False, "error": str(e)}
        except Exception as e:  # never let a peer's request take the node down
            log.exception("control request failed")
            ans = {"ok": False, "error": f"internal error: {e}"}
        link.reply(path, f.req_id, Status.OK, json.dumps(ans).encode())

    # -- views ---------------------------------------------------------------------------------
    def group_summary(self, g: Group) -> dict:
        return {
            "name": g.name,
            "gid": g.st.gid,
            "epoch": g.epoch,
            "started": g.st.started,
            "policies": g.st.policies,
            "gen": g.st.gen,
            "gen_history": g.st.gen_history,
            "members": [
                {"vol_id": m.vol_id, "local": m.st.local, "remote": m.st.remote, "wwn": m.st.wwn, "size": m.st.size}
                for m in g.members.values()
            ],
        }


def serve_node(cfg: NodeConfig) -> int:
    """Run a node until SIGTERM/SIGINT (a primary hands its groups over first)."""
    from ..daemon import run_until_signal

    return run_until_signal(lambda: Node(cfg), f"node {cfg.name}", (StateError, VolumeError, NodeError),
                            before_stop=lambda node: node.hand_over_for_shutdown())
