"""The storage node's iSCSI target: its replicated volumes as LUNs, hosts by initiator name.

The target's protocol and command set are ``syncd.iscsi``; this module answers what they ask of
the array: which LUNs an initiator sees (the hosts, host sets and VLUNs of ``node.hosts``, the
same LUN masking as NBD), what each volume is (size, the group's WWN), and the access state of
this array's target port group for that host (``Group.alua``, the state the ``syncd:alua`` NBD
context carries). A change of state raises ASYMMETRIC ACCESS STATE CHANGED for every session.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

import trio

from ..config import IscsiConfig
from ..iscsi import conn as c
from ..iscsi import scsi, server
from ..iscsi.login import Portal, Target
from ..iscsi.text import ChapSecret
from ..nbd.export import BlockError, ClientIdentity
from ..netio import listen_tcp
from .errors import NodeError

if TYPE_CHECKING:
    from .daemon import Node, VolumeExport

log = logging.getLogger("syncd.iscsi")


def caw_lock(node: Node, volume: str) -> trio.Lock:
    """The lock every COMPARE AND WRITE of ``volume`` takes at this array."""
    locks: dict[str, trio.Lock] = node.__dict__.setdefault("_caw_locks", {})
    return locks.setdefault(volume, trio.Lock())


async def compare_and_write_here(node: Node, volume: str, offset: int, verify: bytes, new: bytes,
                                 fua: bool) -> int | None:
    """COMPARE AND WRITE at this array, which must be the group's primary (or hold the volume
    alone): the peer's requests come here too."""
    ex = node.exports.get(volume)
    if ex is None:
        raise NodeError(f"no volume {volume} on {node.cfg.name}")
    m = node.member_of.get(volume)
    if m is not None and m.group.role != "primary":
        raise BlockError(errno.EAGAIN, f"{node.cfg.name} is not the primary of {m.group.name}")
    return await server.compare_and_write(ex, caw_lock(node, volume), offset, verify, new, fua)


class NodeIscsi:
    def __init__(self, node: Node, cfg: IscsiConfig) -> None:
        self.node = node
        self.cfg = cfg
        chap = {name: ChapSecret(name, secret) for name, secret in cfg.chap} or None
        mutual = ChapSecret(*cfg.mutual_chap) if cfg.mutual_chap else None
        targets = {cfg.target: Target(cfg.target, alias=f"syncd array {node.cfg.name}", chap=chap, mutual=mutual)}
        # CHAP, when configured, guards discovery too: SendTargets names the arrays' portals.
        portal = Portal(targets, cfg.portal_group, self.authorize, discovery_chap=chap, discovery_mutual=mutual)
        self.target = server.Target(portal, self, self.addresses, others=self.send_targets_peer)
        self.target.on_reset = self.lu_reset
        self.ports: list[tuple[str, int]] = []
        self._states: dict[tuple[str, str], int] = {}  # (host, volume) -> last access state reported

    def authorize(self, initiator: str, target: str) -> bool:
        """Every initiator may log in; what it then sees is masked per host (REPORT LUNS lists
        its LUNs, nothing else answers), as an NBD client that is no host sees no export."""
        return target == self.cfg.target

    def addresses(self, target: str) -> list[c.Address]:
        if target == self.cfg.target:
            return [c.Address(h, p, self.cfg.portal_group) for h, p in self.cfg.advertise]
        return []

    def send_targets_peer(self) -> list[tuple[str, str]]:
        """The other array's target and portals, for SendTargets (configured: [iscsi] peer_*)."""
        if self.cfg.peer_target is None:
            return []
        tag = self.cfg.peer_portal_group or 0
        return [("TargetName", self.cfg.peer_target)] + [
            ("TargetAddress", c.Address(h, p, tag).text()) for h, p in self.cfg.peer_advertise]

    def luns_for(self, initiator: str, address: str, target: str) -> dict[int, server.Lu]:
        ident = ClientIdentity(address, iqn=initiator)
        host = self.node.hosts.host_for(ident)
        vols = self.node.hosts.volumes_for(host)
        out: dict[int, server.Lu] = {}
        for vol, lun in vols.items():
            ex = self.node.exports.get(vol)
            if ex is None:
                continue
            lu = server.Lu(self._unit(ex, ident, lambda v=vols: sorted(v.values())), ex,
                           caw_lock(self.node, vol))
            lu.compare_and_write = lambda off, verify, new, fua, v=vol: self.compare_and_write(v, off, verify, new, fua)
            out[lun] = lu
        return out

    def _unit(self, ex: VolumeExport, ident: ClientIdentity, luns) -> scsi.Unit:
        m = ex.member
        wwn = m.st.wwn if m is not None else self.node.local_wwn(ex.name)
        group = self.cfg.portal_group

        def groups() -> list[scsi.PortGroup]:
            state = scsi.Alua(ex.alua(ident).state)
            return [scsi.PortGroup(group, state, group, preferred=state is scsi.Alua.ACTIVE_OPTIMIZED)]

        return scsi.Unit(scsi.LuFacts(ex.size, wwn, product="syncd volume"), groups, luns)

    # -- changes -------------------------------------------------------------------------------
    def alua_changed(self) -> None:
        """The node recomputed access states: sessions of hosts whose state for a volume moved
        get a unit attention."""
        changed = False
        for r in list(self.target.runners):
            s = r.session
            if s is None:
                continue
            ident = ClientIdentity(r.address, iqn=s.initiator_name)
            host = self.node.hosts.host_for(ident) or ""
            for lu in r.luns.values():
                state = lu.unit.alua()[0].state
                key = (host, lu.export.name)
                if self._states.get(key, state) != state:
                    changed = True
                self._states[key] = state
        if changed:
            self.target.attention(scsi.ALUA_STATE_CHANGED)

    async def compare_and_write(self, volume: str, offset: int, verify: bytes, new: bytes, fua: bool) -> int | None:
        """COMPARE AND WRITE, atomic across both arrays: it runs at the group's primary (here,
        or asked of the peer over the link), where every COMPARE AND WRITE of the volume takes
        one lock; the write then replicates as any other."""
        m = self.node.member_of.get(volume)
        if m is None or m.group.role == "primary":
            return await compare_and_write_here(self.node, volume, offset, verify, new, fua)
        if self.node.link is None or not self.node.link.up:
            raise BlockError(errno.EAGAIN, "COMPARE AND WRITE: the primary cannot be reached")
        try:
            with trio.fail_after(10):
                ans = await self.node.control({"op": "compare_and_write", "volume": m.st.remote, "offset": offset,
                                               "verify": verify.hex(), "data": new.hex(), "fua": fua})
        except (NodeError, trio.TooSlowError) as e:
            raise BlockError(errno.EAGAIN, f"COMPARE AND WRITE at the primary: {e}") from None
        bad = ans.get("miscompare")
        return int(bad) if bad is not None else None

    async def lu_reset(self, lu: server.Lu) -> None:
        """A host reset the LU here: the other array's sessions of the same LU learn it too
        (the LU is one LU reached through both arrays). Best effort within 2 s: a peer that
        cannot be told has no session that could have missed it for long (it is not serving)."""
        m = self.node.member_of.get(lu.export.name)
        if m is None or self.node.link is None or not self.node.link.up:
            return
        with trio.move_on_after(2.0):
            try:
                await self.node.control({"op": "lu_reset", "volume": m.st.remote})
            except Exception as e:  # noqa: BLE001 - reported, the reset itself is done
                log.warning("LU reset of %s not told to the peer: %s", lu.export.name, e)

    def peer_reset(self, volume: str) -> None:
        ex = self.node.exports.get(volume)
        if ex is not None:
            self.target.reset_attention(ex)

    def hosts_changed(self) -> None:
        self.target.refresh()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = []
        for host, port in self.cfg.listen:
            lsock = listen_tcp((host, port))
            listeners.append(lsock)
            self.ports.append((host, lsock.getsockname()[1]))
        log.info("node %s: iSCSI target %s on %s (portal group %d)", self.node.cfg.name, self.cfg.target,
                 ", ".join(f"{h}:{p}" for h, p in self.ports), self.cfg.portal_group)
        await self.target.serve(listeners, task_status=task_status)
