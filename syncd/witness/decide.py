"""The witness's decisions for one replication group, as a pure state machine.

No sockets, files or clocks: callers pass ``now`` (the witness's monotonic clock) and persist
``GroupRecord`` (everything but ``last_seen``) before answering. The rules are those of
docs/failover-plan.md:

* only the witness advances a group's epoch, and each epoch has exactly one owner;
* the secondary is granted the group only when the owner has been silent at the witness for
  longer than the owner's witness lease (with drift and margin), the owner's last word was that
  the secondary is in sync, and the witness did not lose the owner *before* the secondary did
  (then the owner, pre-elected, keeps the group: failover is disabled);
* an owner going on alone first revokes the secondary's eligibility here (``keep``);
* an owner may hand the group to its in-sync peer (``handover``: planned switchover, or a
  primary whose disk failed), which is the only other way an epoch advances;
* an epoch the operator made without the witness (an override while the witness could not be
  reached, the resolution of a split brain) is adopted only when its owner reports it, the
  arrays agree on it (``resolve``) and it is above every epoch the witness has known, so the
  witness's record never goes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Timing:
    owner_lease: float = 3.0  # s an owner may serve alone after the witness last heard it
    drift: float = 0.05
    margin: float = 0.5
    grace: float = 4.5  # s the witness may miss the owner before it disables failover

    def owner_gone_after(self) -> float:
        return self.owner_lease * (1 + self.drift) + self.margin

    def fresh_within(self, limit: float = 0.0) -> float:
        """Witness seconds within which a request must follow the answer before it (``limit``,
        by default FRESH_FOR): shorter by the drift both clocks may have, so a request taken is
        never older, by its client's clock, than the time the client waits for an answer."""
        return (limit or FRESH_FOR) * (1 - self.drift) / (1 + self.drift)


# s: how long a client waits for an answer before it gives the request up (client.py's
# REQUEST_TIMEOUT): the witness takes a request only within this of the answer it followed.
FRESH_FOR = 1.0


def fresh(t: Timing, now: float, echo: float | None, limit: float = 0.0) -> bool:
    """Whether a request may be taken: ``echo`` is when the witness had ready the answer the
    client heard before sending it (None: none on this session yet). A request heard later
    than ``t.fresh_within(limit)`` after it may have been sent before its client gave it up, so
    the witness must not take it (docs/failover-plan.md rule 4): it answers STALE, changing
    nothing, and the client asks again at once."""
    return echo is not None and now - echo <= t.fresh_within(limit)


@dataclass
class GroupRecord:
    name: str
    members: tuple[str, str]
    owner: str
    epoch: int = 1
    secondary_in_sync: bool = False
    failover_disabled: bool = False
    last_decision: str = "created"
    last_seen: dict[str, float] = field(default_factory=dict)  # not persisted: monotonic
    # not persisted: when the other member first said (report, claim) it had lost the owner
    lost_owner: dict[str, float] = field(default_factory=dict)

    def other(self, node: str) -> str:
        a, b = self.members
        return b if node == a else a

    def persistent(self) -> dict[str, Any]:
        return {"name": self.name, "members": list(self.members), "owner": self.owner,
                "epoch": self.epoch, "secondary_in_sync": self.secondary_in_sync,
                "failover_disabled": self.failover_disabled, "last_decision": self.last_decision}

    @classmethod
    def restore(cls, d: dict[str, Any]) -> "GroupRecord":
        # After a witness restart nothing was seen: no failover until the owner reports again.
        a, b = d["members"]
        return cls(d["name"], (a, b), d["owner"], d["epoch"], d["secondary_in_sync"],
                   d["failover_disabled"], d["last_decision"])


@dataclass(frozen=True)
class Decision:
    granted: bool
    owner: str
    epoch: int
    reason: str


WAIT_MARK = "it may still serve for"


def may_grant_later(reason: str) -> bool:
    """Whether a refused CLAIM is only early (the owner's lease has not run out yet), so asking
    again soon may be granted; every other refusal stands until something changes."""
    return WAIT_MARK in reason


class WitnessError(Exception):
    """A request the witness cannot even consider (unknown node or group)."""


def _heard(rec: GroupRecord, node: str, now: float) -> None:
    """Every request: the sender must be a member, and it is alive now."""
    if node not in rec.members:
        raise WitnessError(f"node {node!r} is not a member of group {rec.name} ({', '.join(rec.members)})")
    rec.last_seen[node] = now


def _note_loss(rec: GroupRecord, t: Timing, now: float, node: str, lost: bool, anew: bool = False) -> None:
    """The other member says it lost (or reaches) the owner. The loss counts from the first such
    word; after a silence of the member longer than ``owner_lease`` the witness cannot tell what
    happened meanwhile (the link may have come back and gone again), so it counts from now, and
    so it does when the member says the link came back since its previous word (``anew``)."""
    if node == rec.owner:
        return
    if not lost:
        rec.lost_owner.pop(node, None)
        return
    prev = rec.last_seen.get(node)
    if node not in rec.lost_owner or prev is None or now - prev > t.owner_lease or anew:
        rec.lost_owner[node] = now


def report(rec: GroupRecord, t: Timing, now: float, node: str, epoch: int, *,
           peer_alive: bool, peer_in_sync: bool, lost_anew: bool = False) -> Decision:
    """A periodic report. The owner says whether its peer is in sync; the other member says
    whether it still reaches the owner over the replication link, and whether it reached it
    again since its previous report (``lost_anew``: a loss it states is a new one)."""
    prev_seen_owner = rec.last_seen.get(rec.owner)
    _note_loss(rec, t, now, node, lost=not peer_alive, anew=lost_anew)
    _heard(rec, node, now)
    if epoch == rec.epoch and node == rec.owner:
        rec.secondary_in_sync = peer_in_sync
        rec.failover_disabled = False
    elif node != rec.owner and peer_alive:
        # The secondary reaches the owner, the witness does not: the witness lost the owner
        # first. If the link goes later, the owner keeps the group (pre-elected).
        silent = prev_seen_owner is None or now - prev_seen_owner > t.grace
        if silent and not rec.failover_disabled:
            rec.failover_disabled = True
            rec.last_decision = f"failover disabled: {rec.owner} unreachable from the witness"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def claim_settled(rec: GroupRecord, node: str, epoch: int) -> Decision | None:
    """What a CLAIM gets whatever the times say (the claimant owns it already, a stale epoch,
    failover disabled, the claimant not in sync), or None: the times decide."""
    if node == rec.owner:
        return Decision(True, rec.owner, rec.epoch, f"{node} already owns epoch {rec.epoch}")
    if epoch != rec.epoch:
        return Decision(False, rec.owner, rec.epoch,
                        f"stale epoch {epoch}: the group is at epoch {rec.epoch}, owned by {rec.owner}")
    if rec.failover_disabled:
        return Decision(False, rec.owner, rec.epoch, f"failover disabled: the witness lost {rec.owner} before "
                                                     f"{node} did; {rec.owner} keeps the group")
    if not rec.secondary_in_sync:
        return Decision(False, rec.owner, rec.epoch, f"{node} was not in sync when {rec.owner} last reported")
    return None


def claim(rec: GroupRecord, t: Timing, now: float, node: str, epoch: int) -> Decision:
    """The secondary asks for the group after losing the owner."""
    if node != rec.owner:
        _note_loss(rec, t, now, node, lost=True)
    _heard(rec, node, now)

    def deny(reason: str) -> Decision:
        return Decision(False, rec.owner, rec.epoch, reason)

    settled = claim_settled(rec, node, epoch)
    if settled is not None:
        return settled
    seen = rec.last_seen.get(rec.owner)
    if seen is None:
        return deny(f"the witness has not heard from {rec.owner} since it started")
    lost = rec.lost_owner[node]
    if lost - seen > t.grace:
        # The witness lost the owner more than ``grace`` before the claimant could tell it that
        # it lost the owner too (it could not reach the witness meanwhile): to the owner the
        # witness was lost first, and it may be going on alone as the pre-elected side.
        return deny(f"failover disabled: the witness lost {rec.owner} {lost - seen:.1f}s before {node} "
                    f"said it lost {rec.owner} too; {rec.owner} keeps the group")
    quiet = now - seen
    if quiet <= t.owner_gone_after():
        return deny(f"{rec.owner} was heard {quiet:.1f}s ago; {WAIT_MARK} "
                    f"{t.owner_gone_after() - quiet:.1f}s")
    old = rec.owner
    rec.owner = node
    rec.epoch += 1
    rec.secondary_in_sync = False
    rec.lost_owner.clear()
    rec.last_decision = f"failover: {node} owns epoch {rec.epoch} ({old} silent for {quiet:.1f}s)"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def keep(rec: GroupRecord, t: Timing, now: float, node: str, epoch: int) -> Decision:
    """The owner lost its peer and will go on alone: the peer is no longer eligible."""
    _heard(rec, node, now)
    if node != rec.owner or epoch != rec.epoch:
        return Decision(False, rec.owner, rec.epoch,
                        f"group {rec.name} is owned by {rec.owner} at epoch {rec.epoch}: "
                        f"{node} must stop serving (failsafe)")
    rec.secondary_in_sync = False
    rec.failover_disabled = False
    rec.last_decision = f"{node} goes on alone at epoch {rec.epoch}; {rec.other(node)} out of sync"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def handover(rec: GroupRecord, t: Timing, now: float, node: str, epoch: int) -> Decision:
    """The owner gives the group to its peer at epoch+1 (planned switchover, or it cannot serve
    its disk any more). Only the owner of the current epoch may, and only to a peer it last
    reported in sync."""
    _heard(rec, node, now)
    if node != rec.owner or epoch != rec.epoch:
        return Decision(False, rec.owner, rec.epoch,
                        f"group {rec.name} is owned by {rec.owner} at epoch {rec.epoch}: "
                        f"{node} at epoch {epoch} cannot hand it over")
    if not rec.secondary_in_sync:
        return Decision(False, rec.owner, rec.epoch,
                        f"{rec.other(node)} was not in sync at {node}'s last report: no handover")
    rec.owner = rec.other(node)
    rec.lost_owner.clear()
    rec.epoch += 1
    rec.secondary_in_sync = False  # until the new owner reports its peer in sync
    rec.failover_disabled = False
    # The old owner vouches that the new one is alive and in sync right now: count it as heard,
    # so the old owner's next report does not take the witness's silence from the new owner
    # (it may not have reported yet) for "unreachable" and disable failover.
    rec.last_seen[rec.owner] = now
    rec.last_decision = f"handover: {rec.owner} owns epoch {rec.epoch} (given by {node})"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def resolve(rec: GroupRecord, t: Timing, now: float, node: str, epoch: int) -> Decision:
    """The owner of an epoch the operator made while the witness could not be asked (override,
    split-brain resolution) brings the witness's record up to date; it asks only once its peer
    has accepted it as primary. The witness takes it only if that epoch is above its own."""
    _heard(rec, node, now)
    if node == rec.owner and epoch == rec.epoch:
        return Decision(True, rec.owner, rec.epoch, f"{node} already owns epoch {rec.epoch}")
    if epoch <= rec.epoch:
        return Decision(False, rec.owner, rec.epoch,
                        f"the witness knows {rec.owner} as owner of epoch {rec.epoch}: {node}'s epoch {epoch} "
                        "is not newer")
    old, old_epoch = rec.owner, rec.epoch
    rec.owner = node
    rec.lost_owner.clear()
    rec.epoch = epoch
    rec.secondary_in_sync = False  # until the owner reports its peer in sync
    rec.failover_disabled = False
    rec.last_seen[node] = now
    rec.last_decision = (f"resolved: {node} owns epoch {epoch}, set by the operator without the witness "
                         f"(the witness had {old} at epoch {old_epoch})")
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)
