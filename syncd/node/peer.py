"""What the peer asks of this node over the replication link: replicated requests (dispatched to
the group's data path), lease requests (answered by the role machine), and control RPCs (the
state exchange when the link comes up, and the peer's side of operator verbs).

Every request names a group and carries its epoch; a request at another epoch is refused
(STALE_EPOCH) before it is looked at, so a frame from a peer that lost the group changes nothing.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from ..iscsi import pr
from ..nbd.export import BlockError
from ..repl.proto import Frame, MsgType, Status
from .datapath import TRIM, WRITE, ZEROES
from .errors import NodeError
from .iscsi import adopt_reservations, peer_reservations, reservation_states, reserve_out_here
from .roles import (
    CaughtUp,
    GrantLease,
    LeaseRequested,
    PeerLeaving,
    PeerState,
    Recover,
    Role,
    RoleError,
    SplitBrainResolved,
    Started,
    Stopped,
)
from .state import FIXED_POLICIES, FIXED_REASON, GroupState, MemberState

if TYPE_CHECKING:
    from ..repl.link import Link, Path
    from .daemon import Node
    from .group import Group

log = logging.getLogger("syncd.peer")

_KINDS = {MsgType.WRITE: WRITE, MsgType.ZEROES: ZEROES, MsgType.TRIM: TRIM}


def on_request(node: "Node", link: "Link", path: "Path", f: Frame) -> None:
    """Dispatch one request from the peer (called from the link's receive loop: no task unless
    the request must wait)."""
    t = f.type
    if t == MsgType.CONTROL:
        node.spawn(handle_control, node, link, path, f)
        return
    g = node.group_by_id(f.group)
    if g is None:
        if t != MsgType.RELEASE:
            link.reply(path, f.req_id, Status.UNKNOWN_GROUP)
        return
    if f.epoch != g.epoch:
        if t != MsgType.RELEASE:
            link.reply(path, f.req_id, Status.STALE_EPOCH)
        return
    io = g.io
    if t == MsgType.RELEASE:
        io.handle_release(f)
        return
    if t == MsgType.LEASE:
        if g.role != "primary":
            link.reply(path, f.req_id, Status.NOT_PRIMARY)
            return
        ms = next((a.ms for a in g.handle(LeaseRequested(trio.current_time())) if isinstance(a, GrantLease)), 0)
        link.reply(path, f.req_id, Status.OK if ms else Status.NOT_SERVING, Frame.lease_payload(ms))
        return
    if t == MsgType.FLUSH:
        node.spawn(io.handle_flush, link, path, f)
        return
    m = g.by_id.get(f.vol)
    if m is None:
        link.reply(path, f.req_id, Status.UNKNOWN_VOLUME)
        return
    kind = _KINDS.get(t)
    if kind is not None:
        if f.forwarded:
            if g.role != "primary":
                link.reply(path, f.req_id, Status.NOT_PRIMARY)
                return
            if not (kind == WRITE and not f.fua and io.forwarded_fast(link, path, f, m)):
                node.spawn(io.handle_forwarded, link, path, f, m, kind)
            return
        if g.role != "secondary":
            link.reply(path, f.req_id, Status.NOT_PRIMARY)
            return
        if not (kind == WRITE and io.mirrored_fast(link, path, f, m)):
            node.spawn(io.apply_mirrored, link, path, f, m, kind)
        return
    if t == MsgType.READ:
        node.spawn(io.handle_read, link, path, f, m)
    elif t == MsgType.DIGESTS:
        node.spawn(io.handle_digests, link, path, f, m)
    elif t == MsgType.RESYNC_BEGIN:
        link.reply(path, f.req_id, io.resync_begin(f, m))
    elif t == MsgType.RESYNC_END:
        io.resync_end(f, m)
        link.reply(path, f.req_id, Status.OK)
    else:
        link.reply(path, f.req_id, Status.BAD_REQUEST)


async def handle_control(node: "Node", link: "Link", path: "Path", f: Frame) -> None:
    try:
        body = f.control_json()
        result = await handle_peer_control(node, body)
        ans = {"ok": True, **(result or {})}
    except (NodeError, RoleError) as e:
        ans = {"ok": False, "error": str(e)}
    except Exception as e:  # never let a peer's request take the node down
        log.exception("control request failed")
        ans = {"ok": False, "error": f"internal error: {e}"}
    link.reply(path, f.req_id, Status.OK, json.dumps(ans).encode())


# -- the state exchange when the link comes up ----------------------------------------------------

def group_summary(g: "Group") -> dict[str, Any]:
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
        # SCSI persistent reservations, keyed by the peer's volume names: the primary's are the LU's.
        "reservations": reservation_states(g.node, g),
    }


async def exchange_state(node: "Node") -> None:
    """The link came up: tell the peer about the groups this array is primary of, learn its
    role and epoch for every group (which confirms or demotes this array), what it may have
    written that we lack, and whether both sides wrote apart (split brain)."""
    mine = [group_summary(g) for g in node.groups.values() if g.role == "primary"]
    exchanged = node.exchanged  # this link session's
    try:
        ans = await node.control({"op": "sync_groups", "groups": mine,
                                  # every group's role, not only those it is secondary of: the
                                  # latest numbered snapshot wins, so each one must be complete
                                  "roles": roles_snapshot(node),
                                  "roles_seq": next_roles_seq(node)})
    except NodeError as e:
        log.warning("state exchange with %s failed: %s", node.cfg.link.peer, e)
        return
    now = trio.current_time()
    suspect = {e["group"]: set(e["vol_ids"]) for e in ans.get("suspect", [])}
    for g in node.groups.values():
        if g.role == "primary" and any(m.crash_regions for m in g.members.values()):
            # Before the peer's state is fed in: a resync it starts must know what to fetch,
            # and from which of the peer's copies (not one its failed device holds).
            g.decide_crash_regions(split_brain=g.name in ans.get("split_brain", []),
                                   suspect=suspect.get(g.name, ()))
    for name in ans.get("split_brain", []):
        g = node.groups.get(name)
        peer = ans.get("gens", {}).get(name, {})
        if g is not None:
            g.mark_split_brain(peer.get("gen", ""), peer.get("gen_history", []))
    for entry in ans.get("suspect_regions", []):
        # The peer crashed or stepped down: these regions may hold writes we do not have (or
        # lack ours).
        g = node.groups.get(entry["group"])
        m = g.by_id.get(entry["vol_id"]) if g is not None and g.role == "primary" else None
        if m is not None:
            for r in entry["regions"]:
                m.dirty.set(r)
            m.intent.set_sync(entry["regions"])
            m.verify = True
            g.note(f"{g.st.peer} may differ in {len(entry['regions'])} regions of {m.st.local}: compared")
    for entry in ans.get("suspect", []):
        # The peer's device failed since it last synced: whatever it holds is suspect.
        g = node.groups.get(entry["group"])
        if g is None or g.role != "primary":
            continue
        for vid in entry["vol_ids"]:
            m = g.by_id.get(vid)
            if m is not None:
                m.compare_all()
                g.note(f"{g.st.peer}'s copy of {m.st.local} is suspect (its device failed): full compare")
    exchanged.set()  # a resync may tell the peer what it lacks and end in sync now (Group._recover)
    roles = ans.get("roles")
    if roles is None:  # a peer from before the role machine: it does not say; assume it follows
        roles = {g.name: {"role": "secondary", "epoch": g.epoch} for g in node.groups.values() if g.role == "primary"}
    peer_roles(node, roles, ans.get("roles_seq"), now)


def sync_groups(node: "Node", body: dict[str, Any]) -> dict[str, Any]:
    """The peer's side of the state exchange: ``body`` lists the groups it is primary of."""
    now = trio.current_time()
    suspect, split, suspect_regions = [], [], []
    for s in body["groups"]:
        g = node.groups.get(s["name"])
        if g is None:
            log.warning("peer is primary of group %s, which this node does not hold", s["name"])
            continue
        rel = g.gen_relation(s.get("gen", ""), s.get("gen_history", []))
        # Would this side be resynced from the peer (secondary, or a primary the peer's higher
        # epoch demotes), it must not hold writes the peer lacks; would it be the source, the
        # peer must not hold writes this side lacks.
        becomes_target = g.role == "secondary" or s["epoch"] > g.epoch
        if g.st.split_brain or rel == "diverged" or rel == ("behind" if becomes_target else "ahead"):
            # Both acknowledged writes apart: whichever way a resync went, one side's would be
            # lost. Stop here and let the operator choose (setrcopygroup discard).
            g.mark_split_brain(s.get("gen", ""), s.get("gen_history", []))
            split.append(g.name)
            continue
        g.handle(PeerState(now, Role.PRIMARY, s["epoch"], started=s["started"]))
        if g.role == "primary":
            continue  # the peer is behind us: it steps down when it hears our summary
        theirs = dict(s["policies"], **dict.fromkeys(FIXED_POLICIES, True))  # always on (the seed)
        if g.st.policies != theirs:
            g.st.policies = theirs
            g.policies_changed()
        adopt_reservations(node, g, s.get("reservations"))
        mine = {m.vol_id for m in g.members.values()}
        theirs = {m["vol_id"] for m in s["members"]}
        if mine != theirs:
            log.warning("group %s: volume sets differ from the primary's (%s vs %s)",
                        g.name, sorted(mine), sorted(theirs))
    for g in node.groups.values():
        if g.role != "secondary" or g.st.split_brain:
            continue
        bad = [m.vol_id for m in g.members.values() if m.st.suspect]
        if bad:
            suspect.append({"group": g.name, "vol_ids": bad})
        for m in g.members.values():
            if m.suspect_regions:  # reported until the primary has resynced us
                suspect_regions.append({"group": g.name, "vol_id": m.vol_id, "regions": sorted(m.suspect_regions)})
    node.save()
    peer_roles(node, body.get("roles"), body.get("roles_seq"), now)
    return {"suspect": suspect, "suspect_regions": suspect_regions, "split_brain": split,
            "gens": {g.name: {"gen": g.st.gen, "gen_history": g.st.gen_history} for g in node.groups.values()},
            "roles": roles_snapshot(node), "roles_seq": next_roles_seq(node)}


def roles_snapshot(node: "Node") -> dict[str, dict[str, Any]]:
    return {g.name: {"role": g.role, "epoch": g.epoch, "disk_failed": bool(g.io.disk_error),
                     "claiming": g.mode.value == "claiming"}
            for g in node.groups.values()}


def next_roles_seq(node: "Node") -> int:
    """Every snapshot of this node's roles is numbered, so the peer can tell a stale one (an
    answer overtaken by a later request on another path) from the latest."""
    node.roles_seq += 1
    return node.roles_seq


def peer_roles(node: "Node", roles: Any, seq: Any, now: float) -> None:
    """The peer's role in each group, from a snapshot it numbered ``seq`` (older snapshots
    than one already seen change nothing). A secondary that stopped claiming says so this way:
    a primary that heard "claiming" must hear that it is over, or it never mirrors again."""
    if not isinstance(roles, dict):
        return
    if isinstance(seq, int):
        if seq <= node.peer_roles_seq:
            return
        node.peer_roles_seq = seq
    for name, r in roles.items():
        g = node.groups.get(name)
        if g is None or g.st.split_brain or not isinstance(r, dict):
            continue
        try:
            g.handle(PeerState(now, Role(r["role"]), int(r["epoch"]), disk_failed=bool(r.get("disk_failed")),
                               claiming=bool(r.get("claiming"))))
        except (RoleError, ValueError, KeyError) as e:
            log.warning("group %s: the peer's state %s: %s", name, r, e)


# -- control RPCs: the peer's side of operator verbs -------------------------------------------

async def handle_peer_control(node: "Node", body: dict[str, Any]) -> dict[str, Any] | None:
    op = body.get("op")
    now = trio.current_time()
    if op in ("create_group", "policy"):
        # A peer of an older version may still ask for these off: refused here as on the primary.
        off = [p for p in FIXED_POLICIES if body["policies"].get(p) is False]
        if off:
            raise NodeError(f"policy {' and '.join(off)} cannot be turned off: {FIXED_REASON}")
    if op == "create_group":
        name = body["name"]
        if name in node.groups:
            raise NodeError(f"group {name} already exists on {node.cfg.name}")
        if body["primary"] != node.cfg.link.peer:
            raise NodeError(f"{body['primary']} is not this node's replication target")
        gs = GroupState(name=name, gid=body["gid"], role="secondary", peer=body["primary"],
                        policies=body["policies"], home=body["primary"], gen=body.get("gen", ""))
        node.state.groups[name] = gs
        g = node.add_group(gs)
        node.save()
        g.note(f"created as secondary of {body['primary']}")
        return None
    if op == "sync_groups":
        return sync_groups(node, body)
    if op == "adopt_gen":
        # The primary finished resyncing us: our data is now its generation.
        g = node.group(body["group"])
        if g.role == "secondary" and not g.st.split_brain:
            g.st.gen, g.st.gen_history = body["gen"], list(body["gen_history"])
            g.st.gen_shared = True
            for m in g.members.values():
                m.suspect_regions.clear()  # compared and resynced: nothing left to report
            adopt_reservations(node, g, body.get("reservations"))
            node.save()
            g.handle(CaughtUp(trio.current_time()))  # it may take the group over again
        return None
    if op == "split_brain_resolved":
        # The operator discarded the peer's side: we are the survivor. Compare everything.
        g = node.group(body["group"])
        if g.role != "primary":
            raise NodeError(f"group {g.name} is not primary on {node.cfg.name}: it cannot be the surviving side")
        g.st.split_brain = ""
        g.st.gen_shared = True  # the discarded side takes this generation now
        g.command(SplitBrainResolved(now, survivor=True, epoch=body["epoch"]))
        for m in g.members.values():
            m.compare_all()
        node.save()
        g.note(f"split brain resolved: {body['discarded_by']} discarded its writes; full compare and resync from here")
        return {"epoch": g.epoch, "gen": g.st.gen, "gen_history": g.st.gen_history}
    if op == "resync_me":
        # The secondary took our epoch (split brain resolved on its side): resync it now.
        g = node.group(body["group"])
        if g.role == "primary":
            g.handle(PeerState(now, Role.SECONDARY, g.epoch))
            if g.mode.value == "detached":
                g.handle(Recover(now))
        return None
    if op == "leaving":
        g = node.group(body["group"])
        if g.role == "primary" and g.epoch == body["epoch"]:
            # The secondary stopped serving and gave its lease back: no need to wait for it.
            g.handle(PeerLeaving(now))
        return None
    if op == "compare_and_write":
        # An iSCSI host's COMPARE AND WRITE at the peer, run here, at the primary.
        from .iscsi import compare_and_write_here

        try:
            bad = await compare_and_write_here(node, str(body["volume"]), int(body["offset"]),
                                               bytes.fromhex(body["verify"]), bytes.fromhex(body["data"]),
                                               bool(body.get("fua", False)))
        except BlockError as e:
            raise NodeError(str(e)) from None
        return {"miscompare": bad}
    if op == "pr_out":
        # An iSCSI host's PERSISTENT RESERVE OUT at the peer, run here, at the primary.
        try:
            nexus = pr.nexus_from_json(body.get("nexus"))
            out = await reserve_out_here(node, str(body["volume"]), nexus, bytes.fromhex(body["cdb"]),
                                         bytes.fromhex(body["params"]))
        except (BlockError, pr.BadState, ValueError, TypeError) as e:
            raise NodeError(str(e)) from None
        return {"conflict": out.conflict, "sense": None if out.sense is None else pr.sense_to_json(out.sense)}
    if op == "pr_state":
        peer_reservations(node, body)
        return None
    if op == "lu_reset":
        # A host reset an iSCSI LU at the peer: our sessions of the same LU get the unit attention.
        if getattr(node, "iscsi", None) is not None:
            node.iscsi.peer_reset(str(body.get("volume", "")))
        return None
    if op in ("takeover", "peer_disk_failed"):
        from .operations import peer_disk_event

        await peer_disk_event(node, body)
        return None
    if op in ("switchover_prepare", "switchover_commit", "switchover_abort"):
        from .operations import peer_switchover

        await peer_switchover(node, body)
        return None
    g = node.group(body.get("group") or body.get("name", "?"))
    if op == "set_home":
        g.st.home = body["home"]
        node.save()
        g.note(f"natural direction is now {body['home']} -> {node.cfg.name}")
        return None
    if g.role != "secondary":
        raise NodeError(f"group {g.name} is primary on {node.cfg.name} too: roles conflict")
    if op == "admit":
        local = body["local"]
        vol = node.volumes.get(local)
        if vol is None:
            raise NodeError(f"volume {local} does not exist on {node.cfg.name}")
        if local in node.member_of:
            raise NodeError(f"volume {local} on {node.cfg.name} is already in group {node.member_of[local].group.name}")
        if vol.size != body["size"]:
            raise NodeError(
                f"volume {local} on {node.cfg.name} is {vol.size} bytes but {body['remote']} is "
                f"{body['size']} bytes: sizes must match"
            )
        ms = MemberState(local=local, remote=body["remote"], vol_id=body["vol_id"], wwn=body["wwn"], size=vol.size)
        g.st.members.append(ms)
        g.st.next_vol_id = max(g.st.next_vol_id, ms.vol_id + 1)
        node.member_of[local] = g.add_member(ms, vol)
        node.save()
        g.note(f"admitted {local} (primary volume {body['remote']})")
        return None
    if op == "dismiss":
        m = g.by_id.get(body["vol_id"])
        if m is None:
            raise NodeError(f"group {g.name} on {node.cfg.name} has no volume id {body['vol_id']}")
        g.remove_member(m.st.local)
        g.st.members.remove(m.st)
        node.member_of.pop(m.st.local, None)
        node.save()
        return None
    if op == "policy":
        g.st.policies.update(body["policies"])
        node.save()
        g.policies_changed()
        return None
    if op == "start":
        g.handle(Started(now))
        g.note("started by primary")
        return None
    if op == "stop":
        g.handle(Stopped(now))
        g.note("stopped by primary")
        return None
    if op == "remove_group":
        if g.members:
            raise NodeError(f"group {g.name} on {node.cfg.name} still holds volumes")
        node.remove_group(g.name)
        node.save()
        return None
    raise NodeError(f"unknown control operation {op!r}")
