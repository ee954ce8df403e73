"""The node's admin API: newline-delimited JSON over a unix socket, one request per line.

Request: {"cmd": "admitrcopyvv", "args": {...}}. Answer: {"ok": true, "result": ...} or
{"ok": false, "error": "..."}. Every command validates fully before changing anything; changes
that involve the peer are agreed with it first and recorded locally only if it accepted.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING

import trio

from .. import netio
from ..nbd.export import ALUA_NAMES
from . import admin_hosts
from .errors import NodeError, NotFound
from .events import SNAPSHOT_END
from .group import Group
from .resync import resync_progress
from .roles import Started, Stopped
from .state import FIXED_POLICIES, FIXED_REASON, POLICIES, GroupState, MemberState, StateError

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
                    events = _events_request(line)
                    if events is not None:  # the connection becomes the event stream
                        await self.stream_events(stream, events)
                        return
                    ans = await self.dispatch(line)
                    await stream.send_all(json.dumps(ans).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def stream_events(self, stream: trio.SocketStream, args: dict) -> None:
        """The ``events`` request: every current object as an ``exists`` line, a
        ``snapshot-end`` line, then every event as it happens (``now``: the snapshot only), one
        JSON object per line, until the client closes the connection or stops reading (its
        backlog overflows: an ``overflow`` line, then the end)."""
        now_only = args.get("now", False)
        if not isinstance(now_only, bool) or set(args) - {"now"}:
            await stream.send_all(json.dumps({"ok": False, "error": "events: the only argument is now (true or "
                                                                    "false)", "code": "bad_request"}).encode() + b"\n")
            return
        bus = self.node.events
        snap, sub = bus.subscribe()
        try:
            lines = [e.to_json() for e in snap] + [bus.marker(SNAPSHOT_END).to_json()]
            with trio.move_on_after(EVENT_SEND_TIMEOUT):
                await stream.send_all(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
            if now_only:
                return
            async with trio.open_nursery() as n:
                n.start_soon(_until_closed, stream, n.cancel_scope)
                async for ev in sub.receive:
                    batch = [ev]
                    while len(batch) < 256:
                        try:
                            batch.append(sub.receive.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    with trio.move_on_after(EVENT_SEND_TIMEOUT) as cs:
                        try:
                            await stream.send_all(b"".join(json.dumps(e.to_json()).encode() + b"\n" for e in batch))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            # The subscriber went away (``syncctl events | head -1``). Raised in
                            # this nursery, it would leave as an exception group, which the
                            # connection's handler does not catch: it stopped the node (CI).
                            break
                    if cs.cancelled_caught:
                        log.warning("events subscriber read nothing for %ss: disconnected", EVENT_SEND_TIMEOUT)
                        break
                n.cancel_scope.cancel()
        finally:
            bus.unsubscribe(sub)

    async def dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected {\"cmd\": ..., \"args\": {...}}")
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
        except ValueError as e:
            return {"ok": False, "error": f"bad request: {e}", "code": "bad_request"}
        fn = COMMANDS.get(req["cmd"])
        if fn is None:
            known = ", ".join(sorted([*COMMANDS, "events"]))
            return {"ok": False, "error": f"unknown command {req['cmd']!r}; known: {known}", "code": "bad_request"}
        try:
            return {"ok": True, "result": await fn(self.node, **args)}
        except NotFound as e:
            return {"ok": False, "error": str(e), "code": "not_found"}
        except (NodeError, StateError) as e:  # StateError: metadata not written (the node stops)
            return {"ok": False, "error": str(e), "code": "refused"}
        except TypeError as e:
            return {"ok": False, "error": f"{req['cmd']}: bad arguments ({e})", "code": "bad_request"}
        except Exception as e:  # an admin request must never take the node down
            log.exception("admin command %s failed", req["cmd"])
            return {"ok": False, "error": f"{req['cmd']} failed: {e}", "code": "failed"}


# -- helpers -----------------------------------------------------------------------------------

EVENT_SEND_TIMEOUT = 30.0  # s an events subscriber may stop reading before it is disconnected


def _events_request(line: bytes) -> dict | None:
    """The arguments of an ``events`` request (None: another request, or not valid JSON)."""
    try:
        req = json.loads(line)
    except ValueError:
        return None
    if not isinstance(req, dict) or req.get("cmd") != "events":
        return None
    args = req.get("args") or {}
    return args if isinstance(args, dict) else {"args": args}


async def _until_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    """An events subscriber sends nothing more: whatever it sends is ignored, its end of
    the connection ends the stream."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


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
    fixed = [p for p in FIXED_POLICIES if out.get(p) is False]
    if fixed:
        raise NodeError(f"policy {' and '.join(fixed)} cannot be turned off: {FIXED_REASON}")
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
    g = node.add_group(gs)
    node.save()
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
    node.remove_group(group)
    node.save()
    return {"group": group, "removed": True}


async def admitrcopyvv(node: Node, volume: str, group: str, target_volume: str | None = None) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "admitrcopyvv")
    vol = node.volumes.get(volume)
    if vol is None:
        raise NotFound(f"volume {volume} does not exist on {node.cfg.name} "
                        f"(volumes: {', '.join(sorted(node.volumes)) or 'none'})")
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
    g.policies_changed()
    return {"group": group, "policies": g.st.policies}


async def startrcopygroup(node: Node, group: str) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "startrcopygroup")
    if g.st.started:
        raise NodeError(f"group {group} is already started")
    if not g.members:
        raise NodeError(f"group {group} has no volumes: admit one with admitrcopyvv first")
    await node.control({"op": "start", "group": group})
    g.handle(Started(trio.current_time()))
    g.note("started")
    return {"group": group, "started": True}


async def stoprcopygroup(node: Node, group: str) -> dict:
    g = _group(node, group)
    _primary_only(node, g, "stoprcopygroup")
    if not g.st.started:
        raise NodeError(f"group {group} is already stopped")
    g.handle(Stopped(trio.current_time()))
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
            {"name": v.name, "path": v.path, "size": v.size,
             "group": node.member_of[v.name].group.name if v.name in node.member_of else None,
             # Whether this array zeroes the volume without writing (true, false, null: not known
             # until tried), deallocating ("punch") or keeping it allocated ("no_hole").
             "fast_zero": {"punch": v.fast_zero_ok[False], "no_hole": v.fast_zero_ok[True]}}
            for v in node.volumes.values()
        ],
        "resync_bytes": node.stats["resync_bytes"],
        "resync_hole_bytes": node.stats["resync_hole_bytes"],  # of those, sent as holes (TRIM)
        "compared_bytes": node.stats["compared_bytes"],
        "pulled_bytes": node.stats["pulled_bytes"],
        # The event loop polling for input before it sleeps ([node] busy_poll_us).
        "busy_poll": netio.poller.stats(),
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
            "transitioning": g.transitioning(),
            "confirmed": g.state.confirmed,
            "disk_error": g.io.disk_error or None,
            "policies": g.st.policies,
            "serving": g.may_serve(),
            "alua": ALUA_NAMES[g.alua(None).state],
            "events": [{"t": t, "msg": m} for t, m in g.events[-10:]],
        }
        if g.role == "primary":
            gd["peer_mode"] = g.mode.value
            gd["alone"] = g.state.alone
            if g.mode.value == "detached" and g.state.fence_reason:
                gd["peer_lost_reason"] = g.state.fence_reason
        else:
            gd["mode"] = g.mode.value
            # Back from an unclean stop, not resynced by its primary yet: no failover meanwhile.
            gd["may_lack_acknowledged_writes"] = g.state.peer_newer
            left = g.state.lease_until - trio.current_time()
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
                "intent": m.intent.stats(),
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
                         owner_lease: float | None = None, grace: float | None = None,
                         name: str | None = None, key_file: str | None = None, tls_certificate: str | None = None,
                         tls_key: str | None = None, tls_ca: str | None = None, insecure: bool | None = None) -> dict:
    """setrcopytarget witness create ADDRESS (KEY | KEY_FILE | TLS files | insecure) [name]
    [timings] | remove | check. The witness is a setting of each array: run it on both (the key
    is never sent over the replication link). Files are named by absolute paths."""
    from ..config import ConfigError, parse_witness_client

    if what != "witness":
        raise NodeError(f"setrcopytarget: unknown object {what!r} (known: witness)")
    if action == "check":
        if node.witness is None:
            raise NotFound(f"no quorum witness is configured on {node.cfg.name}")
        return node.witness.info()
    if action == "remove":
        if node.witness is None:
            raise NotFound(f"setrcopytarget witness remove: no quorum witness is configured on {node.cfg.name}")
        busy = [g.name for g in node.groups.values() if g.transitioning() or g.mode.value in ("fencing", "deciding")]
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
    settings: dict = {"address": address}
    for k, v in (("key", key), ("interval", interval), ("owner_lease", owner_lease), ("grace", grace),
                 ("name", name), ("key_file", key_file), ("tls_certificate", tls_certificate), ("tls_key", tls_key),
                 ("tls_ca", tls_ca), ("insecure", insecure)):
        if v is not None:
            settings[k] = v
    try:
        if address is None:
            raise ConfigError("witness: ADDRESS is required")
        for k in ("key_file", "tls_certificate", "tls_key", "tls_ca"):
            if k in settings and not (isinstance(settings[k], str) and os.path.isabs(settings[k])):
                raise ConfigError(f"witness.{k}: {settings[k]!r} is not an absolute path")
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
        raise NotFound(f"checkrcopyvv: no volume {volume!r} on {node.cfg.name} "
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
