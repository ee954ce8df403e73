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
from ..iscsi import pr, scsi, server
from ..iscsi.login import Portal, Target
from ..iscsi.text import ChapSecret
from ..nbd.export import BlockError, ClientIdentity
from ..netio import listen_tcp
from .errors import NodeError

if TYPE_CHECKING:
    from .daemon import Node, VolumeExport
    from .group import Group

log = logging.getLogger("syncd.iscsi")


def caw_lock(node: Node, volume: str) -> trio.Lock:
    """The lock every COMPARE AND WRITE of ``volume`` takes at this array."""
    return node.caw_locks.setdefault(volume, trio.Lock())


# -- persistent reservations: the group primary's, copied to the other array -----------------------
#
# One LU is reached through both arrays, so it has one reservation state: the group primary's.
# A PERSISTENT RESERVE OUT at either array runs at the primary (asked over the link from the
# secondary), under one lock per volume; a change is persisted at the secondary and then here
# before the host hears GOOD, as a write is on both replicas before it is acknowledged. Each
# array answers PERSISTENT RESERVE IN and RESERVATION CONFLICT from its own copy. A primary
# that goes on alone changes only its copy; the peer gets the whole state at the next state
# exchange and again when it is back in sync (adopt_gen). Kept in state.json through restarts.

def set_reservations(node: Node, volume: str, state: pr.PrState,
                     attentions: tuple[tuple[pr.Nexus, scsi.Sense], ...] = ()) -> None:
    """This array's copy of ``volume``'s reservations is ``state``: persisted, and the unit
    attentions of the change raised for this array's sessions of the nexuses they concern."""
    node.reservations.states[volume] = state
    if state == pr.PrState():
        node.state.reservations.pop(volume, None)
    else:
        node.state.reservations[volume] = pr.state_to_json(state)
    node.save()
    ex = node.exports.get(volume)
    if node.iscsi is not None and ex is not None:
        for who, sense in attentions:
            node.iscsi.target.pr_attention(ex, who, sense)


def all_target_ports(node: Node) -> frozenset[int]:
    """The relative target ports of every LU: this array's and the other's (ALL_TG_PT)."""
    cfg = node.cfg.iscsi
    if cfg is None:
        return frozenset({1})
    return frozenset({cfg.portal_group} | ({cfg.peer_portal_group} if cfg.peer_portal_group else set()))


async def reserve_out_here(node: Node, volume: str, nexus: pr.Nexus, cdb: bytes, params: bytes) -> pr.Outcome:
    """PERSISTENT RESERVE OUT at this array, which must be the group's primary (or hold the
    volume alone): the secondary's requests come here too."""
    if volume not in node.exports:
        raise NodeError(f"no volume {volume} on {node.cfg.name}")
    async with node.pr_locks.setdefault(volume, trio.Lock()):
        m = node.member_of.get(volume)
        if m is not None and (m.group.role != "primary" or not m.group.may_serve()):
            raise BlockError(errno.EAGAIN, f"{node.cfg.name} is not the serving primary of {m.group.name}")
        st = node.reservations.get(volume)
        out = pr.reserve_out(st, nexus, cdb, params, all_target_ports(node), persist=True)
        if out.conflict or out.sense is not None or (out.state == st and not out.attentions):
            return out
        if m is not None:
            g = m.group
            body = {"op": "pr_state", "group": g.name, "epoch": g.epoch, "volume": m.st.remote,
                    "state": pr.state_to_json(out.state), "attentions": pr.attentions_to_json(out.attentions)}
            if g.mirroring:
                # The peer holds every acknowledged write: it holds this change too before GOOD.
                try:
                    with trio.fail_after(node.cfg.link.io_timeout if node.cfg.link else 10):
                        await node.control(body)
                except (NodeError, trio.TooSlowError) as e:
                    raise BlockError(errno.EAGAIN, f"the reservation change could not be copied to "
                                                   f"{g.st.peer}: {e}") from None
            elif node.link is not None and node.link.up:
                node.spawn(_tell_peer_reservations, node, body)  # not in sync: best effort
        set_reservations(node, volume, out.state, out.attentions)
        return out


async def _tell_peer_reservations(node: Node, body: dict[str, object]) -> None:
    with trio.move_on_after(5):
        try:
            await node.control(body)
        except NodeError as e:
            log.info("reservations of %s not copied to the peer yet (at the next exchange): %s", body["volume"], e)


def peer_reservations(node: Node, body: dict[str, object]) -> None:
    """The primary's ``pr_state``: its new reservation state of one of our volumes."""
    g = node.group(str(body.get("group")))
    if g.role != "secondary" or body.get("epoch") != g.epoch:
        raise NodeError(f"group {g.name}: reservations from a primary at epoch {body.get('epoch')}, "
                        f"this array is {g.role} at epoch {g.epoch}")
    volume = str(body.get("volume"))
    if not any(m.st.local == volume for m in g.members.values()):
        raise NodeError(f"group {g.name} on {node.cfg.name} has no volume {volume}")
    try:
        state = pr.state_from_json(body.get("state"))
        attentions = pr.attentions_from_json(body.get("attentions", []))
    except pr.BadState as e:
        raise NodeError(f"reservations of {volume}: {e}") from None
    set_reservations(node, volume, state, attentions)


def adopt_reservations(node: Node, g: Group, states: object) -> None:
    """The primary's reservation states of the group's volumes (by our local name), taken at
    the state exchange and when the group is back in sync; a bad one is logged and skipped."""
    if not isinstance(states, dict):
        return
    for m in g.members.values():
        if m.st.local not in states:
            continue
        try:
            state = pr.state_from_json(states[m.st.local])
        except pr.BadState as e:
            log.warning("group %s: the primary's reservations of %s: %s", g.name, m.st.local, e)
            continue
        if state != node.reservations.get(m.st.local):
            set_reservations(node, m.st.local, state)


def reservation_states(node: Node, g: Group) -> dict[str, dict[str, object]]:
    """The group's reservation states keyed by the peer's volume names (what it adopts)."""
    return {m.st.remote: pr.state_to_json(node.reservations.get(m.st.local)) for m in g.members.values()}


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
                           caw_lock(self.node, vol), reservations=self.node.reservations)
            lu.compare_and_write = lambda off, verify, new, fua, v=vol: self.compare_and_write(v, off, verify, new, fua)
            lu.reserve_out = lambda nexus, cdb, params, v=vol: self.reserve_out(v, nexus, cdb, params)
            out[lun] = lu
        return out

    def _unit(self, ex: VolumeExport, ident: ClientIdentity, luns) -> scsi.Unit:
        m = ex.member
        wwn = m.st.wwn if m is not None else self.node.local_wwn(ex.name)
        group = self.cfg.portal_group

        def groups() -> list[scsi.PortGroup]:
            state = scsi.Alua(ex.alua(ident).state)
            return [scsi.PortGroup(group, state, group, preferred=state is scsi.Alua.ACTIVE_OPTIMIZED)]

        return scsi.Unit(scsi.LuFacts(ex.size, wwn, product="syncd volume", reservations=True), groups, luns)

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

    async def reserve_out(self, volume: str, nexus: pr.Nexus, cdb: bytes, params: bytes) -> pr.Outcome:
        """PERSISTENT RESERVE OUT, one state for the LU at both arrays: it runs at the group's
        primary (here, or asked of the peer over the link), which copies the change back here
        before it answers."""
        m = self.node.member_of.get(volume)
        if m is None or m.group.role == "primary":
            return await reserve_out_here(self.node, volume, nexus, cdb, params)
        if self.node.link is None or not self.node.link.up:
            raise BlockError(errno.EAGAIN, "PERSISTENT RESERVE OUT: the primary cannot be reached")
        try:
            with trio.fail_after(10):
                ans = await self.node.control({"op": "pr_out", "volume": m.st.remote, "nexus": pr.nexus_to_json(nexus),
                                               "cdb": cdb.hex(), "params": params.hex()})
            sense = None if ans.get("sense") is None else pr.sense_from_json(ans["sense"])
        except (NodeError, trio.TooSlowError, pr.BadState) as e:
            raise BlockError(errno.EAGAIN, f"PERSISTENT RESERVE OUT at the primary: {e}") from None
        return pr.Outcome(self.node.reservations.get(volume), sense, bool(ans.get("conflict")))

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
