"""The node's admin API: newline-delimited JSON over a unix socket, one request per line.

Request: {"cmd": "admitrcopyvv", "args": {...}}. Answer: {"ok": true, "result": ...} or
{"ok": false, "error": "..."}. Every command validates fully before changing anything; changes
that involve the peer are agreed with it first and recorded locally only if it accepted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import logging
import os
import secrets
import time

import trio

from . import admin_hosts
from .group import DETACHED, Group
from .errors import NodeError
from ..nbd.export import ALUA_NAMES
from .resync import resync_progress
from .state import POLICIES, GroupState, MemberState, StateError

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("syncd.admin")

MAX_LINE = 1 << 20


class AdminServer:
    def __init__(self, node: Node):
        self.node = node

    async def serve(self, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            try:
                while True:
                    while b"\n" not in buf:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                        if len(buf) > MAX_LINE:
                            await stream.send_all(b'{"ok": false, "error": "request too long"}\n')
                            return
                    line, buf = buf.split(b"\n", 1)
                    ans = await self.dispatch(line)
                    await stream.send_all(json.dumps(ans).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected {\"cmd\": ..., \"args\": {...}}")
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
        except ValueError as e:
            return {"ok": False, "error": f"bad request: {e}"}
        fn = COMMANDS.get(req["cmd"])
        if fn is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r}; known: {', '.join(sorted(COMMANDS))}"}
        try:
            return {"ok": True, "result": await fn(self.node, **args)}
        except (NodeError, StateError) as e:  # StateError: metadata not written (the node stops)
            return {"ok": False, "error": str(e)}
        except TypeError as e:
            return {"ok": False, "error": f"{req['cmd']}: bad arguments ({e})"}
        except Exception as e:  # an admin request must never take the node down
            log.exception("admin command %s failed", req["cmd"])
            return {"ok": False, "error": f"{req['cmd']} failed: {e}"}


# -- helpers -----------------------------------------------------------------------------------

def _group(node: Node, name: str) -> Group:
    return node.group(name)


def _primary_only(node: Node, g: Group, op: str) -> None:
    if g.role != "primary":
        raise NodeError(
            f"{op}: operation only on primary side; group {g.name} is secondary on "
            f"{node.cfg.name}: run it on {g.st.peer}"
        )


def parse_policies(spec: str | list[str]) -> dict[str, bool]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: dict[str, bool] = {}
    for raw in items:
        p = raw.strip()
        if not p:
            continue
        val = True
        if p.startswith("no_"):
            p, val = p[3:], False
        if p not in POLICIES:
            raise NodeError(
                f"unknown policy {raw!r}; policies are {', '.join(POLICIES)} (prefix no_ to turn off)"
            )
        out[p] = val
    if not out:
        raise NodeError("no policy given")
    if out.get("active_active") is False:
        raise NodeError("policy active_active cannot be turned off: groups are active-active")
    return out


# -- commands ----------------------------------------------------------------------------------

async def creatercopygroup(node: Node, group: str, target: str, policies: str | None = None) -> dict:
    from ..config import check_name

    check_name(group, "group name", NodeError)
    if group in node.groups:
        raise NodeError(f"group {group} already exists on {node.cfg.name}")
    if node.link is None:
        raise NodeError(f"no replication target: {node.cfg.name} has no [link] in its config")
    if target != node.cfg.link.peer:
        raise NodeError(f"unknown target {target!r}: this node's replication target is {node.cfg.link.peer}")
    pol = dict(GroupState(group, 0, "primary", target).policies)
    if policies:
        pol.update(parse_policies(policies))
    used = {g.st.gid for g in node.groups.values()}
    gid = secrets.randbits(31) | 1
    while gid in used:
        gid = secrets.randbits(31) | 1
    gen = secrets.token_hex(8)
    await node.control({"op": "create_group", "name": group, "gid": gid, "primary": node.cfg.name, "policies": pol,
                        "gen": gen})
    gs = GroupState(name=group, gid=gid, role="primary", peer=target, policies=pol, home=node.cfg.name, gen=gen)
    node.state.groups[group] = gs
    g = Group(node, gs)
    node.groups[group] = g
    node.save()
    node.spawn(node._lease_loop, g)
    g.note(f"created with target {target}")
    return {"group": group, "gid": gid}


async def removercopygroup(node: Node, group: str) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "removercopygroup")
    if g.st.started:
        raise NodeError(f"group {group} is not stopped: run stoprcopygroup {group} first")
    if g.members:
        raise NodeError(
            f"group {group} still holds volumes ({', '.join(g.members)}): dismiss them first"
        )
    if node.link and node.link.up:
        await node.control({"op": "remove_group", "name": group})
    del node.groups[group]
    del node.state.groups[group]
    node.save()
    return {"group": group, "removed": True}


async def admitrcopyvv(node: Node, volume: str, group: str, target_volume: str | None = None) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "admitrcopyvv")
    vol = node.volumes.get(volume)
    if vol is None:
        raise NodeError(f"volume {volume} does not exist on {node.cfg.name} (volumes: {', '.join(sorted(node.volumes)) or 'none'})")
    if volume in node.member_of:
        raise NodeError(f"volume {volume} is already in group {node.member_of[volume].group.name}")
    remote = target_volume or volume
    if ":" in remote:
        tgt, _, remote = remote.partition(":")
        if tgt != g.st.peer:
            raise NodeError(f"target {tgt!r} is not the target of group {group} ({g.st.peer})")
    vol_id = g.st.next_vol_id
    wwn = node.local_wwn(volume)
    await node.control({
        "op": "admit", "group": group, "vol_id": vol_id, "local": remote, "remote": volume,
        "size": vol.size, "wwn": wwn,
    })
    ms = MemberState(local=volume, remote=remote, vol_id=vol_id, wwn=wwn, size=vol.size)
    g.st.next_vol_id += 1
    g.st.members.append(ms)
    m = g.add_member(ms, vol)
    node.member_of[volume] = m
    node.save()
    if g.st.started and g.st.policies.get("auto_synchronize", True):
        g.start_member_sync(m)
    else:
        m.compare_all()
    g.note(f"admitted {volume} (peer volume {remote})")
    return {"volume": volume, "group": group, "vol_id": vol_id, "wwn": wwn}


async def dismissrcopyvv(node: Node, volume: str, group: str) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "dismissrcopyvv")
    if volume not in g.members:
        raise NodeError(f"volume {volume} is not in group {group}")
    if g.st.started:
        raise NodeError(f"group {group} is not stopped: run stoprcopygroup {group} first")
    if node.link and node.link.up:
        await node.control({"op": "dismiss", "group": group, "vol_id": g.members[volume].vol_id})
    m = g.remove_member(volume)
    g.st.members.remove(m.st)
    node.member_of.pop(volume, None)
    node.save()
    return {"volume": volume, "group": group, "dismissed": True}


async def setrcopygroup(node: Node, action: str, group: str, policies: str | None = None) -> dict:
    from .operations import ACTIONS

    g = _group(node, group)
    if action in ACTIONS:
        if policies:
            raise NodeError(f"setrcopygroup {action} takes no policies")
        return await ACTIONS[action](node, g)
    if action != "pol":
        raise NodeError(f"setrcopygroup: unknown action {action!r} (known: pol, {', '.join(ACTIONS)})")
    _primary_only(node, g, "setrcopygroup pol")
    pol = parse_policies(policies or "")
    await node.control({"op": "policy", "group": group, "policies": pol})
    g.st.policies.update(pol)
    node.save()
    g.note("policies " + ",".join(("" if v else "no_") + k for k, v in pol.items()))
    if pol.get("auto_recover"):
        g.maybe_recover()
    return {"group": group, "policies": g.st.policies}


async def startrcopygroup(node: Node, group: str) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "startrcopygroup")
    if g.st.started:
        raise NodeError(f"group {group} is already started")
    if not g.members:
        raise NodeError(f"group {group} has no volumes: admit one with admitrcopyvv first")
    await node.control({"op": "start", "group": group})
    g.st.started = True
    node.save()
    g.note("started")
    g.maybe_recover(operator=True)
    return {"group": group, "started": True}


async def stoprcopygroup(node: Node, group: str) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "stoprcopygroup")
    if not g.st.started:
        raise NodeError(f"group {group} is already stopped")
    g.st.started = False
    g.lose_peer("group stopped")
    if node.link and node.link.up:
        try:
            await node.control({"op": "stop", "group": group})
        except NodeError as e:
            log.warning("peer did not confirm stop of %s: %s", group, e)
    node.save()
    g.note("stopped")
    return {"group": group, "started": False}


async def showrcopy(node: Node, group: str | None = None) -> dict:
    groups = [_group(node, group)] if group else list(node.groups.values())
    out = {
        "node": node.cfg.name,
        "node_uuid": node.state.node_uuid,
        "version": __import__("syncd").__version__,
        "uptime_s": round(time.time() - node.started_at, 1),
        "link": node.link.info() if node.link else None,
        "nbd": ["%s:%d" % a for a in node.nbd_ports],
        "groups": [],
        "volumes": [
            {"name": v.name, "path": v.path, "size": v.size, "group": node.member_of[v.name].group.name if v.name in node.member_of else None}
            for v in node.volumes.values()
        ],
        "resync_bytes": node.stats["resync_bytes"],
        "compared_bytes": node.stats["compared_bytes"],
        "witness": node.witness.info() if node.witness is not None else None,
    }
    for g in groups:
        gd = {
            "name": g.name,
            "gid": g.st.gid,
            "role": g.role,
            "role_label": g.role_label,
            "target": g.st.peer,
            "epoch": g.epoch,
            "status": ("split-brain" if g.st.split_brain else "failsafe" if g.st.failsafe
                       else "started" if g.st.started else "stopped"),
            "generation": g.st.gen,
            "generation_history": g.st.gen_history[-5:],
            "split_brain": g.st.split_brain or None,
            "witness_behind": g.st.witness_behind,
            "transitioning": g.transitioning is not None,
            "disk_error": g.disk_error or None,
            "policies": g.st.policies,
            "serving": g.may_serve(),
            "alua": ALUA_NAMES[g.alua(None).state],
            "events": [{"t": t, "msg": m} for t, m in g.events[-10:]],
        }
        if g.role == "primary":
            gd["peer_mode"] = g.peer_mode
            if g.peer_mode == DETACHED and g.fence_reason:
                gd["peer_lost_reason"] = g.fence_reason
        else:
            left = g.lease_until - trio.current_time()
            gd["lease_remaining_s"] = round(left, 2) if left > 0 else 0
        gd["volumes"] = []
        for m in g.members.values():
            status, pct = m.sync_status()
            vd = {
                "name": m.st.local,
                "remote": m.st.remote,
                "vol_id": m.vol_id,
                "wwn": m.st.wwn,
                "size": m.st.size,
                "sync_status": status,
                "sync_percent": round(pct, 1),
                "last_sync": m.st.last_sync,
                "stats": m.stats,
                "intent": {"marked_regions": m.intent.count(), "data_syncs": m.intent.data_syncs},
            }
            if g.role == "primary":
                vd["dirty_regions"] = m.dirty.count
                vd["resync"] = resync_progress(m)
            else:
                vd["out_of_sync_regions"] = m.oos.count
            gd["volumes"].append(vd)
        out["groups"].append(gd)
    return out


async def setrcopytarget(node: Node, what: str, action: str, address: str | None = None,
                         key: str | None = None, interval: float | None = None,
                         owner_lease: float | None = None, grace: float | None = None) -> dict:
    """setrcopytarget witness create ADDRESS KEY [timings] | remove | check. The witness is a
    setting of each array: run it on both (the key is never sent over the replication link)."""
    from ..config import ConfigError, parse_witness_client

    if what != "witness":
        raise NodeError(f"setrcopytarget: unknown object {what!r} (known: witness)")
    if action == "check":
        if node.witness is None:
            raise NodeError(f"no quorum witness is configured on {node.cfg.name}")
        return node.witness.info()
    if action == "remove":
        if node.witness is None:
            raise NodeError(f"setrcopytarget witness remove: no quorum witness is configured on {node.cfg.name}")
        busy = [g.name for g in node.groups.values() if g.transitioning is not None or g.peer_mode == "fencing"]
        if busy:
            raise NodeError(f"setrcopytarget witness remove: group(s) {', '.join(busy)} busy: retry when they settle")
        node.set_witness(None)
        return {"witness": None}
    if action != "create":
        raise NodeError(f"setrcopytarget witness: unknown action {action!r} (create, remove, check)")
    if node.link is None:
        raise NodeError("setrcopytarget witness create: a witness needs a replication link ([link])")
    if node.witness is not None:
        raise NodeError(f"setrcopytarget witness create: a witness is already configured "
                        f"({node.witness.info()['address']}): remove it first")
    settings = {"address": address, "key": key}
    for k, v in (("interval", interval), ("owner_lease", owner_lease), ("grace", grace)):
        if v is not None:
            settings[k] = v
    try:
        if address is None or key is None:
            raise ConfigError("witness: ADDRESS and KEY are required")
        parse_witness_client(settings, "witness")
    except ConfigError as e:
        raise NodeError(f"setrcopytarget witness create: {e}") from None
    node.set_witness(settings)
    return {"witness": address}


async def checkrcopyvv(node: Node, volume: str, fix: bool = False) -> dict:
    """Online verify: compare both replicas of ``volume`` by digests while hosts keep going;
    report the regions that differ and, with ``fix``, copy them again from the primary."""
    from .verify import VerifyError, verify_member

    if not isinstance(fix, bool):
        raise NodeError(f"checkrcopyvv: fix must be true or false, got {fix!r}")
    if volume not in node.volumes:
        raise NodeError(f"checkrcopyvv: no volume {volume!r} on {node.cfg.name} "
                        f"(volumes: {', '.join(node.volumes) or 'none'})")
    m = node.member_of.get(volume)
    if m is None:
        raise NodeError(f"checkrcopyvv: volume {volume} is in no replication group: there is no replica to compare")
    _primary_only(node, m.group, "checkrcopyvv")
    try:
        return await verify_member(node, m.group, m, fix)
    except VerifyError as e:
        raise NodeError(str(e)) from None


COMMANDS = {
    "checkrcopyvv": checkrcopyvv,
    "setrcopytarget": setrcopytarget,
    "creatercopygroup": creatercopygroup,
    "removercopygroup": removercopygroup,
    "admitrcopyvv": admitrcopyvv,
    "dismissrcopyvv": dismissrcopyvv,
    "setrcopygroup": setrcopygroup,
    "startrcopygroup": startrcopygroup,
    "stoprcopygroup": stoprcopygroup,
    "showrcopy": showrcopy,
}
COMMANDS.update(admin_hosts.COMMANDS)


# -- the peer's side of control RPCs -----------------------------------------------------------

async def handle_peer_control(node: Node, body: dict) -> dict | None:
    op = body.get("op")
    if op == "create_group":
        name = body["name"]
        if name in node.groups:
            raise NodeError(f"group {name} already exists on {node.cfg.name}")
        if body["primary"] != node.cfg.link.peer:
            raise NodeError(f"{body['primary']} is not this node's replication target")
        gs = GroupState(name=name, gid=body["gid"], role="secondary", peer=body["primary"],
                        policies=body["policies"], home=body["primary"], gen=body.get("gen", ""))
        node.state.groups[name] = gs
        g = Group(node, gs)
        node.groups[name] = g
        node.save()
        node.spawn(node._lease_loop, g)
        g.note(f"created as secondary of {body['primary']}")
        return None
    if op == "sync_groups":
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
            if g.role == "primary":
                if s["epoch"] > g.epoch:
                    g.demote(s["epoch"])  # the witness gave the group to the peer meanwhile
                    # What we were writing (or wrote alone) may differ from the new primary:
                    # our write-intent log says where; it compares those regions.
                    for m in g.members.values():
                        m.suspect_regions = set(m.intent.marked_regions())
                        if m.suspect_regions:
                            suspect_regions.append({"group": g.name, "vol_id": m.vol_id,
                                                    "regions": sorted(m.suspect_regions)})
                else:
                    log.warning("group %s: peer claims it at epoch %s, this node owns epoch %s",
                                s["name"], s["epoch"], g.epoch)
                continue
            if s["epoch"] > g.epoch:
                g.st.epoch = s["epoch"]
            g.st.started = s["started"]
            g.st.policies = s["policies"]
            mine = {m.vol_id for m in g.members.values()}
            theirs = {m["vol_id"] for m in s["members"]}
            if mine != theirs:
                log.warning("group %s: volume sets differ from the primary's (%s vs %s)", g.name, sorted(mine), sorted(theirs))
            bad = [m.vol_id for m in g.members.values() if m.st.suspect]
            if bad:
                suspect.append({"group": g.name, "vol_ids": bad})
            for m in g.members.values():
                if m.suspect_regions:  # reported until the primary has resynced us
                    suspect_regions.append({"group": g.name, "vol_id": m.vol_id, "regions": sorted(m.suspect_regions)})
        node.save()
        return {"suspect": suspect, "suspect_regions": suspect_regions, "split_brain": split,
                "gens": {g.name: {"gen": g.st.gen, "gen_history": g.st.gen_history} for g in node.groups.values()}}
    if op == "adopt_gen":
        # The primary finished resyncing us: our data is now its generation.
        g = _group(node, body["group"])
        if g.role == "secondary" and not g.st.split_brain:
            g.st.gen, g.st.gen_history = body["gen"], list(body["gen_history"])
            for m in g.members.values():
                m.suspect_regions.clear()  # compared and resynced: nothing left to report
            node.save()
        return None
    if op == "split_brain_resolved":
        # The operator discarded the peer's side: we are the survivor. Compare everything.
        g = _group(node, body["group"])
        if g.role != "primary":
            raise NodeError(f"group {g.name} is not primary on {node.cfg.name}: it cannot be the surviving side")
        g.st.split_brain = ""
        # A new epoch above both sides' (each served alone at its own): one primary per epoch,
        # epochs only grow. The witness does not know it yet: reported when the peer is back.
        g.st.epoch = max(g.epoch, body["epoch"]) + 1
        g.st.witness_behind = node.witness is not None
        for m in g.members.values():
            m.compare_all()
        node.save()
        g.note(f"split brain resolved: {body['discarded_by']} discarded its writes; full compare and resync from here")
        return {"epoch": g.epoch, "gen": g.st.gen, "gen_history": g.st.gen_history}
    if op == "resync_me":
        # The secondary is ready (split brain resolved on its side): start the resync now.
        g = _group(node, body["group"])
        if g.role == "primary":
            g.maybe_recover(operator=True)
        return None
    if op == "leaving":
        g = _group(node, body["group"])
        if g.role == "primary" and g.epoch == body["epoch"]:
            # The secondary stopped serving and gave its lease back: no need to wait for it.
            g.lease_deadline = trio.current_time()
            g.lose_peer(f"{g.st.peer} shut down")
        return None
    if op in ("takeover", "peer_disk_failed"):
        from .operations import peer_disk_event

        await peer_disk_event(node, body)
        return None
    if op in ("switchover_prepare", "switchover_commit", "switchover_abort"):
        from .operations import peer_switchover

        await peer_switchover(node, body)
        return None
    g = _group(node, body.get("group") or body.get("name", "?"))
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
                f"volume {local} on {node.cfg.name} is {vol.size} bytes but {body['remote']} is {body['size']} bytes: sizes must match"
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
        return None
    if op == "start":
        g.st.started = True
        node.save()
        g.note("started by primary")
        return None
    if op == "stop":
        g.st.started = False
        g.lease_until = 0.0
        node.save()
        g.note("stopped by primary")
        return None
    if op == "remove_group":
        if g.members:
            raise NodeError(f"group {g.name} on {node.cfg.name} still holds volumes")
        del node.groups[g.name]
        del node.state.groups[g.name]
        node.save()
        return None
    raise NodeError(f"unknown control operation {op!r}")
