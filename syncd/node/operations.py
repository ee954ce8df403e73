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

import logging
from typing import TYPE_CHECKING

import trio

from .errors import NodeError
from .group import Group
from .roles import (
    Discard,
    HandedOver,
    Mode,
    OverrideFailsafe,
    PeerDiskFailed,
    PeerSwitchoverAbort,
    PeerSwitchoverCommit,
    PeerSwitchoverPrepare,
    PeerTakeover,
    Promote,
    Recover,
    RoleError,
    SplitBrain,
    SplitBrainResolved,
    SwitchoverBegin,
    SwitchoverEnd,
)

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("syncd.operations")


def _busy(g: Group) -> None:
    if g.mode in (Mode.HANDING_OVER, Mode.SWITCHING):
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


def _handle(g: Group, event: object, op: str) -> None:
    """Feed the role machine an operator's event; its refusal is the operator's error."""
    try:
        g.command(event)  # type: ignore[arg-type]
    except RoleError as e:
        raise NodeError(f"{op}: group {g.name}: {e}") from None


async def switchover(node: Node, g: Group) -> dict:
    op = "switchover"
    _on_running_primary(node, g, op)
    if g.state.recovering or g.mode is not Mode.ATTACHED or any(m.dirty.count for m in g.members.values()):
        st = {m.st.local: m.sync_status()[0] for m in g.members.values()}
        raise NodeError(f"{op}: target {g.st.peer} not ready: group {g.name} is not synced ({st})")
    wc = node.witness
    if wc is not None and not wc.reachable:
        raise NodeError(f"{op}: the quorum witness is unreachable; a switchover moves ownership "
                        "through it: retry when showrcopy -qw says it is reachable")
    timeout = node.cfg.link.transition_timeout
    t0 = trio.current_time()
    old_epoch = g.epoch
    in_doubt = False  # the witness's answer to HANDOVER was lost: it may have moved the group
    _handle(g, SwitchoverBegin(t0), op)
    try:
        await node.control({"op": "switchover_prepare", "group": g.name, "epoch": old_epoch})
        toks = []
        try:
            with trio.move_on_after(timeout) as cs:
                for m in g.members.values():
                    toks.append((m, await m.lock.acquire(0, m.vol.size)))
            if cs.cancelled_caught:
                raise NodeError(f"{op}: writes in flight did not drain within {timeout}s; nothing changed")
            if g.mode is not Mode.HANDING_OVER or g.epoch != old_epoch:
                raise NodeError(f"{op}: the group changed state during the switchover ({g.mode.value}); "
                                "nothing changed")
            new_epoch = old_epoch + 1
            if wc is not None:
                from ..witness.proto import WType

                d, _ = await wc.decide(WType.HANDOVER, g.name, old_epoch)
                if d is None:
                    in_doubt = True
                    raise NodeError(f"{op}: the quorum witness did not answer; nothing changed here "
                                    "(if the witness did take the handover, the peer claims the group)")
                if not d.granted:
                    raise NodeError(f"{op}: the quorum witness refused: {d.reason}; nothing changed")
                new_epoch = d.epoch
            # Point of no return: the peer owns new_epoch.
            _handle(g, HandedOver(trio.current_time(), new_epoch, in_sync=True), op)
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
        g.handle(SwitchoverEnd(trio.current_time(), in_doubt=in_doubt))
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

    async def retry() -> None:
        while g.role == "secondary" and g.epoch == epoch:
            await trio.sleep(0.5)  # a retry interval, not a wait for a state
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
    now = trio.current_time()
    if op == "switchover_prepare":
        if g.role != "secondary" or g.epoch != epoch:
            raise NodeError(f"group {g.name} is {g.role} at epoch {g.epoch} on {node.cfg.name}: "
                            f"cannot switch over from epoch {epoch}")
        _busy(g)
        _handle(g, PeerSwitchoverPrepare(now, epoch), op)  # gives up by itself if the primary vanishes
        timeout = node.cfg.link.transition_timeout
        with trio.move_on_after(timeout) as drain:
            await g.io.drain_forwarded()
        if drain.cancelled_caught:
            g.handle(PeerSwitchoverAbort(trio.current_time()))
            raise NodeError(f"writes forwarded by {node.cfg.name} did not drain within {timeout}s")
        return
    if op == "switchover_commit":
        _handle(g, PeerSwitchoverCommit(now, epoch), op)
        return
    if op == "switchover_abort":
        g.handle(PeerSwitchoverAbort(now))
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
        raise NodeError(f"{op}: target {g.st.peer} is reachable; "
                        "use setrcopygroup switchover for a planned change of roles")
    # Never serve as primary while the old lease could still run.
    await trio.sleep_until(max(g.state.lease_until, trio.current_time()))
    wc = node.witness
    if wc is not None:
        from ..witness.proto import WType

        d, _ = await wc.decide(WType.CLAIM, g.name, g.epoch)
        if d is None:
            raise NodeError(f"{op}: the quorum witness is unreachable; if you are sure {g.st.peer} is down, "
                            f"use setrcopygroup override {g.name}")
        if not (d.granted and d.owner == node.cfg.name):
            raise NodeError(f"{op}: the quorum witness refused: {d.reason}")
        epoch = d.epoch
    else:
        epoch = g.epoch + 1
    _handle(g, Promote(trio.current_time(), epoch, f"failover by the operator: now primary at epoch {epoch}"), op)
    return {"group": g.name, "role": g.role, "epoch": g.epoch}


async def recover(node: Node, g: Group) -> dict:
    op = "recover"
    _on_running_primary(node, g, op)
    if g.mode is Mode.ATTACHED:
        raise NodeError(f"{op}: group {g.name} is already synced with {g.st.peer}")
    if g.state.recovering or g.mode is not Mode.DETACHED:
        raise NodeError(f"{op}: group {g.name} busy: {g.mode.value}")
    _handle(g, Recover(trio.current_time()), op)
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
    and a later split brain is theirs (detected on reconnect)."""
    from ..witness.proto import WType

    op = "override"
    wc = node.witness
    _busy(g)
    if g.role == "primary":
        if not g.st.failsafe:
            raise NodeError(f"override: group {g.name} is not in failsafe on {node.cfg.name}")
        if wc is not None:
            d, _ = await wc.decide(WType.KEEP, g.name, g.epoch)
            if d is not None and not d.granted:
                raise NodeError(f"override: the quorum witness says {d.owner} owns {g.name} at epoch {d.epoch}; "
                                f"{node.cfg.name} rejoins as secondary when the link returns ({d.reason})")
            why = "witness agreed" if d is not None else "witness unreachable: operator's decision"
        else:
            why = "no witness: operator's decision"
        _handle(g, OverrideFailsafe(trio.current_time(), why), op)
        return {"group": g.name, "failsafe": False, "why": why}
    if node.link is not None and node.link.up:
        raise NodeError(f"override: group {g.name} is secondary and {g.st.peer} is reachable: nothing to override")
    if wc is not None and wc.reachable:
        raise NodeError(f"override: the quorum witness is reachable: use setrcopygroup failover {g.name}")
    await trio.sleep_until(max(g.state.lease_until, trio.current_time()))
    _handle(g, Promote(trio.current_time(), g.epoch + 1, "override: the operator made this array primary "
                       "without the witness", witness_behind=wc is not None), op)
    return {"group": g.name, "role": g.role, "epoch": g.epoch}


async def discard(node: Node, g: Group) -> dict:
    """Resolve a split brain: this array's writes since the split are thrown away. It becomes
    the secondary of the peer (the surviving side), which compares every region and copies
    what differs; nothing is resynced before the operator says which side loses."""
    op = "discard"
    if not g.st.split_brain:
        raise NodeError(f"discard: group {g.name} is not in split brain on {node.cfg.name}: nothing to discard")
    _busy(g)
    if node.link is None or not node.link.up:
        raise NodeError(f"discard: {g.st.peer} must be reachable: it becomes the surviving side")
    mine = g.st.gen
    # Serve nothing of our own any more before the peer starts copying.
    _handle(g, Discard(trio.current_time()), op)
    g.st.split_brain = ""
    try:
        ans = await node.control({"op": "split_brain_resolved", "group": g.name, "discarded_by": node.cfg.name,
                                  "epoch": g.epoch})
    except NodeError:
        g.st.split_brain = "split brain: resolution interrupted (the peer did not answer); run discard again"
        g.handle(SplitBrain(trio.current_time()))
        node.save()
        raise
    # Our data now counts as the survivor's generation, to be resynced in full: if the survivor
    # goes on alone meanwhile, this side is behind it, not diverged again.
    _handle(g, SplitBrainResolved(trio.current_time(), survivor=False, epoch=ans["epoch"]), op)
    g.st.gen, g.st.gen_history = ans["gen"], list(ans["gen_history"])
    g.st.gen_shared = True
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

async def after_disk_failure(node: Node, g: Group, peer_in_sync: bool) -> None:
    """This array's disk for ``g`` failed. A primary gives the group to its in-sync peer
    (through the witness when configured); a secondary tells the primary to go on alone."""
    link = node.link
    if g.role == "secondary":
        if link is not None and link.up:
            try:
                await node.control({"op": "peer_disk_failed", "group": g.name, "epoch": g.epoch})
            except NodeError as e:
                log.warning("group %s: could not tell the primary about the failed disk: %s", g.name, e)
        return
    if not (link is not None and link.up and peer_in_sync):
        g.note("no in-sync peer to take over: the group is down until the disk is repaired")
        return
    old = g.epoch
    new = old + 1
    wc = node.witness
    if wc is not None:
        from ..witness.proto import WType

        d, _ = await wc.decide(WType.HANDOVER, g.name, old)
        if d is None or not d.granted:
            g.note(f"handover refused by the witness ({d.reason if d else 'unreachable'}); group down here")
            return
        new = d.epoch
    g.handle(HandedOver(trio.current_time(), new, in_sync=False))
    try:
        await node.control({"op": "takeover", "group": g.name, "epoch": new, "reason": g.io.disk_error})
    except NodeError as e:
        g.note(f"takeover not confirmed yet by {g.st.peer} ({e}); it claims the group from the witness")


async def peer_disk_event(node: Node, body: dict) -> None:
    """The peer's side of takeover (we become primary: its disk failed) and peer_disk_failed
    (the secondary's disk failed: go on without it)."""
    g = node.group(body["group"])
    if body["op"] == "takeover":
        _handle(g, PeerTakeover(trio.current_time(), body["epoch"]), "takeover")
        return
    if g.role == "primary":
        # Whatever the peer held in its cache may not have reached its disk: when it returns,
        # every region is compared by digest.
        for m in g.members.values():
            m.compare_all()
        g.handle(PeerDiskFailed(trio.current_time()))
        node.save_soon()
