"""Planned and operator-driven role changes of a group: ``setrcopygroup switchover | failover |
recover | restore | reverse | override``.

Each command checks that the group's state allows it and refuses with Remote Copy's vocabulary
(operation only on primary side, group not started, group busy, target not ready...) before it
changes anything.

Switchover (planned, no host I/O error): both arrays enter *transitioning* (ALUA 15; host I/O
waits instead of failing), the secondary drains the writes it forwarded, the primary drains its
own by taking every volume's whole range lock, ownership moves to epoch+1 (through the witness
when one is configured: HANDOVER), the old primary becomes secondary and the peer is told to
become primary. The replicas are identical at that point, so nothing is resynced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging

import trio

from .group import ATTACHED, DETACHED, FENCING, SYNCING, Group
from .errors import NodeError
from ..repl.proto import MsgType

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("syncd.operations")

WRITE_TYPES = (MsgType.WRITE, MsgType.ZEROES, MsgType.TRIM, MsgType.FLUSH)


def _busy(g: Group) -> None:
    if g.transitioning is not None:
        raise NodeError(f"group {g.name} busy: a switchover is in progress")


def _need_primary(node: Node, g: Group, op: str) -> None:
    if g.role != "primary":
        raise NodeError(f"{op}: operation only on primary side; group {g.name} is secondary on "
                        f"{node.cfg.name}: run it on {g.st.peer}")


def _need_started(g: Group, op: str) -> None:
    if not g.st.started:
        raise NodeError(f"{op}: group {g.name} not started: run startrcopygroup {g.name} first")


def _need_link(node: Node, op: str) -> None:
    if node.link is None or not node.link.up:
        raise NodeError(f"{op}: target {node.cfg.link.peer if node.cfg.link else '?'} not ready: "
                        "the replication link is down")


def _on_running_primary(node: Node, g: Group, op: str) -> None:
    """The common refusals of operations run on the primary of a started, idle group whose
    peer is reachable."""
    _need_primary(node, g, op)
    _need_started(g, op)
    _busy(g)
    _need_link(node, op)


async def _drain_forwarded(node: Node, g: Group, timeout: float) -> bool:
    """Secondary: wait until no write it forwarded to the primary is still unanswered."""
    with trio.move_on_after(timeout):
        while any(p.frame.group == g.st.gid and p.frame.type in WRITE_TYPES
                  for p in list(node.link._pending.values())):
            await trio.sleep(0.001)
        return True
    return False


async def switchover(node: Node, g: Group) -> dict:
    op = "switchover"
    _on_running_primary(node, g, op)
    if g.recovering or g.peer_mode != ATTACHED or any(m.dirty.count for m in g.members.values()):
        st = {m.st.local: m.sync_status()[0] for m in g.members.values()}
        raise NodeError(f"{op}: target {g.st.peer} not ready: group {g.name} is not synced ({st})")
    wc = node.witness
    if wc is not None and not wc.reachable:
        raise NodeError(f"{op}: the quorum witness is unreachable; a switchover moves ownership "
                        "through it: retry when showrcopy -qw says it is reachable")
    timeout = node.cfg.link.transition_timeout
    t0 = trio.current_time()
    old_epoch = g.epoch
    ev = g.begin_transition(f"switchover to {g.st.peer}")
    try:
        await node.control({"op": "switchover_prepare", "group": g.name, "epoch": old_epoch})
        toks = []
        try:
            with trio.move_on_after(timeout) as cs:
                for m in g.members.values():
                    toks.append((m, await m.lock.acquire(0, m.vol.size)))
            if cs.cancelled_caught:
                raise NodeError(f"{op}: writes in flight did not drain within {timeout}s; nothing changed")
            if g.peer_mode != ATTACHED or g.epoch != old_epoch or g.role != "primary":
                raise NodeError(f"{op}: the group changed state during the switchover ({g.peer_mode}); nothing changed")
            new_epoch = old_epoch + 1
            if wc is not None:
                from ..witness.proto import WType

                d = await wc.decide(WType.HANDOVER, g.name, old_epoch)
                if d is None:
                    raise NodeError(f"{op}: the quorum witness did not answer; nothing changed")
                if not d.granted:
                    raise NodeError(f"{op}: the quorum witness refused: {d.reason}; nothing changed")
                new_epoch = d.epoch
            # Point of no return: the peer owns new_epoch.
            g.swap_in_sync("secondary", new_epoch)
        finally:
            for m, tok in toks:
                m.lock.release(tok)
        await _commit(node, g, new_epoch)
    except NodeError:
        if g.role == "primary":
            try:
                await node.control({"op": "switchover_abort", "group": g.name, "epoch": old_epoch})
            except NodeError as e:
                log.warning("switchover abort not confirmed by the peer: %s", e)
        raise
    finally:
        g.end_transition(ev, "switchover")
    return {"group": g.name, "role": g.role, "epoch": g.epoch, "primary": g.st.peer,
            "duration_ms": round((trio.current_time() - t0) * 1000, 1)}


async def _commit(node: Node, g: Group, epoch: int) -> None:
    """Tell the peer it is primary at ``epoch``; retried in the background if the link fails
    now (the witness also gives it the group when it claims: the record is already there)."""
    try:
        await node.control({"op": "switchover_commit", "group": g.name, "epoch": epoch})
        return
    except NodeError as e:
        g.note(f"switchover commit not confirmed yet ({e}); retrying")

    async def retry():
        while g.role == "secondary" and g.epoch == epoch:
            await trio.sleep(0.5)
            try:
                await node.control({"op": "switchover_commit", "group": g.name, "epoch": epoch})
                g.note(f"switchover commit confirmed by {g.st.peer}")
                return
            except NodeError as e:
                log.debug("switchover commit retry: %s", e)

    node.spawn(retry)


async def peer_switchover(node: Node, body: dict) -> None:
    """The secondary's side of switchover_prepare/commit/abort."""
    g = node.group(body["group"])
    op, epoch = body["op"], body["epoch"]
    timeout = node.cfg.link.transition_timeout
    if op == "switchover_prepare":
        if g.role != "secondary" or g.epoch != epoch:
            raise NodeError(f"group {g.name} is {g.role} at epoch {g.epoch} on {node.cfg.name}: cannot switch over from epoch {epoch}")
        _busy(g)
        ev = g.begin_transition(f"switchover from {g.st.peer}")

        async def expire():  # the primary vanished half-way: resume as we were
            await trio.sleep(timeout * 2)
            g.end_transition(ev, "switchover not completed in time")

        node.spawn(expire)
        if not await _drain_forwarded(node, g, timeout):
            g.end_transition(ev, "forwarded writes did not drain")
            raise NodeError(f"writes forwarded by {node.cfg.name} did not drain within {timeout}s")
        return
    if op == "switchover_commit":
        if g.role == "primary" and g.epoch >= epoch:
            return  # already done (a retried commit, or the witness gave it to us meanwhile)
        if g.role != "secondary" or g.epoch > epoch:
            raise NodeError(f"group {g.name} is {g.role} at epoch {g.epoch}: commit of epoch {epoch} refused")
        g.swap_in_sync("primary", epoch)
        if g.transitioning is not None:
            g.end_transition(g.transitioning, "switchover")
        return
    if op == "switchover_abort":
        if g.transitioning is not None:
            g.end_transition(g.transitioning, "switchover aborted by the primary")
        return
    raise NodeError(f"unknown switchover operation {op!r}")


async def failover(node: Node, g: Group) -> dict:
    """On the secondary, with the primary unreachable: take the group (through the witness when
    one is configured)."""
    op = "failover"
    if g.role != "secondary":
        raise NodeError(f"{op}: operation only on secondary side; {node.cfg.name} is already primary of {g.name}")
    _need_started(g, op)
    _busy(g)
    if node.link is not None and node.link.up:
        raise NodeError(f"{op}: target {g.st.peer} is reachable; use setrcopygroup switchover for a planned change of roles")
    left = g.lease_until - trio.current_time()
    if left > 0:
        await trio.sleep(left)  # never serve as primary while the old lease could still run
    wc = node.witness
    if wc is not None:
        from ..witness.proto import WType

        d = await wc.decide(WType.CLAIM, g.name, g.epoch)
        if d is None:
            raise NodeError(f"{op}: the quorum witness is unreachable; if you are sure {g.st.peer} is down, "
                            f"use setrcopygroup override {g.name}")
        if not (d.granted and d.owner == node.cfg.name):
            raise NodeError(f"{op}: the quorum witness refused: {d.reason}")
        epoch = d.epoch
    else:
        epoch = g.epoch + 1
    g.promote(epoch)
    g.note(f"failover by the operator to epoch {epoch}")
    return {"group": g.name, "role": g.role, "epoch": g.epoch}


async def recover(node: Node, g: Group) -> dict:
    op = "recover"
    _on_running_primary(node, g, op)
    if g.peer_mode == ATTACHED:
        raise NodeError(f"{op}: group {g.name} is already synced with {g.st.peer}")
    if g.recovering or g.peer_mode in (SYNCING, FENCING):
        raise NodeError(f"{op}: group {g.name} busy: {g.peer_mode}")
    g.maybe_recover(operator=True)
    return {"group": g.name, "recovering": True}


async def restore(node: Node, g: Group) -> dict:
    if not g.reversed:
        raise NodeError(f"restore: group {g.name} is not reversed: its natural primary is already primary")
    _need_primary(node, g, "restore")
    return await switchover(node, g)


async def reverse(node: Node, g: Group) -> dict:
    """Make the current direction the natural one (after a failover that is to stay)."""
    _need_primary(node, g, "reverse")
    _busy(g)
    if not g.reversed:
        raise NodeError(f"reverse: group {g.name} is in its natural direction already")
    _need_link(node, "reverse")
    await node.control({"op": "set_home", "group": g.name, "home": node.cfg.name})
    g.st.home = node.cfg.name
    node.save()
    g.note(f"natural direction is now {node.cfg.name} -> {g.st.peer}")
    return {"group": g.name, "home": node.cfg.name}


async def override(node: Node, g: Group) -> dict:
    """Leave failsafe (or, on an unserving secondary cut from everything, take the group) on the
    operator's word. With a reachable witness the witness decides; without, the operator does,
    and a later split brain is theirs (detected on reconnect, issue 5)."""
    from ..witness.proto import WType

    wc = node.witness
    _busy(g)
    if g.role == "primary":
        if not g.st.failsafe:
            raise NodeError(f"override: group {g.name} is not in failsafe on {node.cfg.name}")
        if wc is not None:
            d = await wc.decide(WType.KEEP, g.name, g.epoch)
            if d is not None and not d.granted:
                raise NodeError(f"override: the quorum witness says {d.owner} owns {g.name} at epoch {d.epoch}; "
                                f"{node.cfg.name} rejoins as secondary when the link returns ({d.reason})")
            why = "witness agreed" if d is not None else "witness unreachable: operator's decision"
        else:
            why = "no witness: operator's decision"
        g.st.failsafe = False
        g.alone_ok = True
        g.peer_mode = DETACHED
        g.new_generation("failsafe overridden: writing without the peer")
        node.save()
        g.note(f"failsafe overridden ({why})")
        g.maybe_recover()
        return {"group": g.name, "failsafe": False, "why": why}
    if node.link is not None and node.link.up:
        raise NodeError(f"override: group {g.name} is secondary and {g.st.peer} is reachable: nothing to override")
    if wc is not None and wc.reachable:
        raise NodeError(f"override: the quorum witness is reachable: use setrcopygroup failover {g.name}")
    left = g.lease_until - trio.current_time()
    if left > 0:
        await trio.sleep(left)
    g.promote(g.epoch + 1)
    if wc is not None:
        g.st.witness_behind = True  # reported to the witness once the peer accepts this epoch
        node.save()
    g.note("override: the operator made this array primary without the witness")
    return {"group": g.name, "role": g.role, "epoch": g.epoch}


async def discard(node: Node, g: Group) -> dict:
    """Resolve a split brain: this array's writes since the split are thrown away. It becomes
    the secondary of the peer (the surviving side), which compares every region and copies
    what differs; nothing is resynced before the operator says which side loses."""
    if not g.st.split_brain:
        raise NodeError(f"discard: group {g.name} is not in split brain on {node.cfg.name}: nothing to discard")
    _busy(g)
    if node.link is None or not node.link.up:
        raise NodeError(f"discard: {g.st.peer} must be reachable: it becomes the surviving side")
    mine = g.st.gen
    if g.role == "primary":
        # Serve nothing of our own any more before the peer starts copying.
        g.demote(g.epoch, why="the operator discarded this array's side of the split brain")
    g.st.split_brain = ""
    try:
        ans = await node.control({"op": "split_brain_resolved", "group": g.name, "discarded_by": node.cfg.name,
                                  "epoch": g.epoch})
    except NodeError:
        g.st.split_brain = "split brain: resolution interrupted (the peer did not answer); run discard again"
        node.save()
        raise
    # Our data now counts as the survivor's generation, to be resynced in full: if the survivor
    # goes on alone meanwhile, this side is behind it, not diverged again.
    g.st.epoch = ans["epoch"]
    g.st.gen, g.st.gen_history = ans["gen"], list(ans["gen_history"])
    node.save()
    g.note(f"split brain resolved by the operator: generation {mine} of this array discarded; "
           f"{g.st.peer} (generation {ans['gen']}) resyncs it")
    await node.control({"op": "resync_me", "group": g.name})
    return {"group": g.name, "role": g.role, "epoch": g.epoch, "discarded_generation": mine, "survivor": g.st.peer}


ACTIONS = {
    "discard": discard,
    "switchover": switchover,
    "failover": failover,
    "recover": recover,
    "restore": restore,
    "reverse": reverse,
    "override": override,
}


# -- backing device failure ------------------------------------------------------------------------

async def after_disk_failure(node: Node, g: Group) -> None:
    """This array's disk for ``g`` failed. A primary gives the group to its in-sync peer
    (through the witness when configured); a secondary tells the primary to go on alone."""
    from .group import ATTACHED as _ATT

    link = node.link
    if g.role == "secondary":
        if link is not None and link.up:
            try:
                await node.control({"op": "peer_disk_failed", "group": g.name, "epoch": g.epoch})
            except NodeError as e:
                log.warning("group %s: could not tell the primary about the failed disk: %s", g.name, e)
        return
    if not (link is not None and link.up and g.peer_mode == _ATT):
        g.note("no in-sync peer to take over: the group is down until the disk is repaired")
        return
    old = g.epoch
    new = old + 1
    wc = node.witness
    if wc is not None:
        from ..witness.proto import WType

        d = await wc.decide(WType.HANDOVER, g.name, old)
        if d is None or not d.granted:
            g.note(f"handover refused by the witness ({d.reason if d else 'unreachable'}); group down here")
            return
        new = d.epoch
    g.st.role = "secondary"
    g.st.epoch = new
    g.peer_mode = DETACHED
    g.lease_until = 0.0
    node.save()
    g.note(f"handed the group to {g.st.peer} at epoch {new} (backing device failed)")
    try:
        await node.control({"op": "takeover", "group": g.name, "epoch": new, "reason": g.disk_error})
    except NodeError as e:
        g.note(f"takeover not confirmed yet by {g.st.peer} ({e}); it claims the group from the witness")


async def peer_disk_event(node: Node, body: dict) -> None:
    """The peer's side of takeover (we become primary: its disk failed) and peer_disk_failed
    (the secondary's disk failed: go on without it)."""
    g = node.group(body["group"])
    if body["op"] == "takeover":
        if g.role == "primary" and g.epoch >= body["epoch"]:
            return
        if g.role != "secondary" or g.epoch >= body["epoch"]:
            raise NodeError(f"group {g.name} is {g.role} at epoch {g.epoch}: takeover at {body['epoch']} refused")
        g.promote(body["epoch"])  # full verify when the failed array returns
        g.peer_failed = True
        g.note(f"took over: {g.st.peer}'s backing device failed ({body.get('reason', '')})")
        return
    if g.role == "primary":
        g.peer_failed = True
        # Whatever the peer held in its cache may not have reached its disk: when it returns,
        # every region is compared by digest.
        for m in g.members.values():
            m.compare_all()
        g.lose_peer(f"{g.st.peer}'s backing device failed")
        node.save_soon()
