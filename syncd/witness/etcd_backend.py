"""The quorum witness kept in etcd: the built-in witness's decisions (``decide.py``) made by the
arrays themselves, against records in etcd changed only by compare-and-set transactions.

Layout under a per-pair prefix P (bytes):

* ``P/groups/NAME``: the group's record (JSON): members, owner, epoch, whether the owner last
  said its peer is in sync, whether failover is disabled, the last decision, and per member
  what the witness needs to remember of its reports (``watch``);
* ``P/alive/NODE``: a key on one of NODE's etcd leases. Before its requests an array takes a
  new lease (at most one per ``renew`` seconds) and moves its key onto it, by a transaction that
  requires the key to be as this array last left it. The lease's TTL is the owner's lease with
  drift and margin (``Timing.owner_gone_after``, rounded up to whole seconds as etcd counts), so
  "the witness has not heard the owner for longer than that" is "``P/alive/OWNER`` is gone",
  which etcd decides on its own clock.

  A new lease rather than a keepalive, because a lease's life is counted from its grant: a
  request that reaches etcd late (held in the network, or by a member that had lost its quorum
  and regained it) cannot make the key outlive what the array counts from its last answer. A
  keepalive would restart the lease whenever etcd took it, and a transaction moving the key to
  an older lease fails its compare. A grant whose answer was lost gives a lease nothing is ever
  put on. What etcd itself adds is bounded in ``owner_heard_for``: its expiry check and one
  leader change (a new leader gives every lease its whole TTL again).

The rules, side by side with the built-in witness's:

* a CLAIM is granted only by a transaction that also requires ``P/alive/OWNER`` to be absent, and
  only if the owner last reported its peer in sync and failover is not disabled;
* the witness "lost the owner first" when the other member reports that it still reaches the
  owner while ``P/alive/OWNER`` is gone: failover is disabled (the owner, pre-elected, keeps
  the group);
* the other member's first word that it lost the owner is "in time" if the owner's key was
  still there at that report or at its previous one (made while its own lease lived on): it
  reports every interval, far within ``grace``. Otherwise (it was cut off from etcd too, and its
  lease expired meanwhile, so nothing is known of the time between) it is "late", and its claim
  is refused as the built-in witness refuses a claim more than ``grace`` after it lost the owner;
* KEEP, HANDOVER and RESOLVE are the built-in rules on the record.

Each decision reads the record and the owner's key, applies the rule (pure functions below),
and writes the new record only if the record's revision is unchanged; on a lost race it reads
again. A request that etcd cannot answer within the deadline (no quorum, unreachable) is
"witness unreachable", as with the built-in witness.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from . import decide
from .decide import WAIT_MARK, Decision, GroupRecord, Timing, WitnessError
from .etcd import KeyValue, TxnResult, b64, cmp_mod, get, prefix_end, put

RETRIES = 8  # compare-and-set rounds lost to the other array before giving up (it keeps trying too)


class Kv(Protocol):
    """What the witness needs of etcd (``etcd.EtcdClient``, or a model in tests)."""

    async def range(self, key: bytes, range_end: bytes | None = None) -> tuple[list[KeyValue], int]: ...
    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None) -> TxnResult: ...
    async def lease_grant(self, ttl: int) -> tuple[int, int]: ...


class BadRecord(ValueError):
    """A record in etcd that is not one syncd wrote; names the problem."""


@dataclass
class Watch:
    """What the witness remembers of one member's reports about the owner."""

    saw_owner: bool = False  # the owner's key was there at its last report
    lost: str = ""  # "", or its first word that it lost the owner came "ok" (in time) or "late"

    def to_json(self) -> dict[str, Any]:
        return {"saw_owner": self.saw_owner, "lost": self.lost}


@dataclass
class Record(GroupRecord):
    """The group's record in etcd: the built-in witness's (``GroupRecord``, whose KEEP, HANDOVER
    and RESOLVE rules apply to it as they are) and what the witness remembers of the other
    member's reports (``watch``), where the built-in witness keeps times. ``last_seen`` and
    ``lost_owner`` are not used: etcd's leases say who was heard."""

    watch: dict[str, Watch] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"members": list(self.members), "owner": self.owner, "epoch": self.epoch,
                           "secondary_in_sync": self.secondary_in_sync,
                           "failover_disabled": self.failover_disabled, "last_decision": self.last_decision,
                           "watch": {n: w.to_json() for n, w in sorted(self.watch.items())}},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, name: str = "") -> Record:
        try:
            d = json.loads(raw)
        except ValueError:
            raise BadRecord("not JSON") from None
        if not isinstance(d, dict):
            raise BadRecord("not a JSON object")
        members, owner, epoch = d.get("members"), d.get("owner"), d.get("epoch")
        if not (isinstance(members, list) and len(members) == 2 and all(isinstance(m, str) and m for m in members)
                and members[0] != members[1]):
            raise BadRecord(f"members: {members!r:.60} is not two node names")
        if not isinstance(owner, str) or owner not in members:
            raise BadRecord(f"owner: {owner!r:.40} is not a member")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise BadRecord(f"epoch: {epoch!r:.40} is not a positive integer")
        flags = [d.get(k, False) for k in ("secondary_in_sync", "failover_disabled")]
        if not all(isinstance(f, bool) for f in flags):
            raise BadRecord("secondary_in_sync and failover_disabled must be true or false")
        watch: dict[str, Watch] = {}
        raw_watch = d.get("watch", {})
        if not isinstance(raw_watch, dict):
            raise BadRecord("watch: not an object")
        for n, w in raw_watch.items():
            if n not in members or not isinstance(w, dict) or not isinstance(w.get("saw_owner", False), bool) \
                    or w.get("lost", "") not in ("", "ok", "late"):
                raise BadRecord(f"watch of {n!r:.40}: {w!r:.60}")
            watch[n] = Watch(bool(w.get("saw_owner", False)), str(w.get("lost", "")))
        return cls(name, (members[0], members[1]), owner, epoch, flags[0], flags[1],
                   str(d.get("last_decision", ""))[:500], watch=watch)


# -- the rules, pure: the record, what etcd says now, the request --------------------------------

@dataclass(frozen=True)
class Seen:
    """What the request found in etcd besides the record."""

    owner_alive: bool  # P/alive/OWNER exists: the owner's lease lives
    fresh: bool  # the requester's own lease had expired: nothing is known of it since its last word


def _member(rec: Record, node: str, group: str) -> None:
    if node not in rec.members:
        raise WitnessError(f"node {node!r} is not a member of group {group} ({', '.join(rec.members)})")


def _note(rec: Record, node: str, seen: Seen, lost: bool) -> None:
    """The other member's word about the owner (``lost``: it no longer reaches it)."""
    if node == rec.owner:
        return
    w = rec.watch.setdefault(node, Watch())
    if seen.fresh:
        w.saw_owner, w.lost = False, ""  # its history is unknown: start again from now
    if not lost:
        w.lost = ""
    elif not w.lost:
        w.lost = "ok" if (seen.owner_alive or w.saw_owner) else "late"
    w.saw_owner = seen.owner_alive


def rule_report(rec: Record, group: str, node: str, epoch: int, seen: Seen, *,
                peer_alive: bool, peer_in_sync: bool) -> Decision:
    _member(rec, node, group)
    _note(rec, node, seen, lost=not peer_alive)
    if epoch == rec.epoch and node == rec.owner:
        rec.secondary_in_sync = peer_in_sync
        rec.failover_disabled = False
    elif node != rec.owner and peer_alive and not seen.owner_alive and not rec.failover_disabled:
        # The other member reaches the owner, etcd does not: the witness lost the owner first.
        rec.failover_disabled = True
        rec.last_decision = f"failover disabled: {rec.owner} unreachable from the witness"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def rule_claim(rec: Record, group: str, node: str, epoch: int, seen: Seen, ttl: int) -> Decision:
    _member(rec, node, group)
    _note(rec, node, seen, lost=True)

    def deny(reason: str) -> Decision:
        return Decision(False, rec.owner, rec.epoch, reason)

    settled = decide.claim_settled(rec, node, epoch)
    if settled is not None:
        return settled
    if rec.watch[node].lost == "late":
        return deny(f"failover disabled: the witness lost {rec.owner} before {node} said it lost {rec.owner} too "
                    f"({node} was cut off from the witness meanwhile); {rec.owner} keeps the group")
    if seen.owner_alive:
        return deny(f"{rec.owner} still holds its witness lease; {WAIT_MARK} up to {ttl}s")
    old = rec.owner
    rec.owner = node
    rec.epoch += 1
    rec.secondary_in_sync = False
    rec.watch.clear()
    rec.last_decision = f"failover: {node} owns epoch {rec.epoch} ({old}'s witness lease expired)"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def rule_keep(rec: Record, group: str, node: str, epoch: int) -> Decision:
    return decide.keep(rec, _NO_TIMING, 0.0, node, epoch)


def rule_handover(rec: Record, group: str, node: str, epoch: int) -> Decision:
    d = decide.handover(rec, _NO_TIMING, 0.0, node, epoch)
    if d.granted:
        rec.watch.clear()  # a new owner: what was seen of the old one no longer counts
    return d


def rule_resolve(rec: Record, group: str, node: str, epoch: int) -> Decision:
    before = (rec.owner, rec.epoch)
    d = decide.resolve(rec, _NO_TIMING, 0.0, node, epoch)
    if (rec.owner, rec.epoch) != before:
        rec.watch.clear()
    return d


_NO_TIMING = Timing()  # KEEP, HANDOVER and RESOLVE do not look at time


# -- one array's side ------------------------------------------------------------------------------

class EtcdWitness:
    """The decisions of one array (``node``) for the groups under ``prefix``."""

    def __init__(self, kv: Kv, prefix: bytes, node: str, timing: Timing, renew: float = 0.0) -> None:
        self.kv = kv
        self.prefix = prefix.rstrip(b"/")
        self.node = node
        self.ttl = max(1, math.ceil(timing.owner_gone_after()))
        self.renew = renew  # s a lease serves this array's requests before it takes another
        self.max_ttl = 0  # the longest TTL the node counts on (0: any); a longer grant is refused
        self.lease = 0  # the lease this array's key is on (0: none yet)
        self.lease_sent = 0.0  # trio time its grant was asked: it lives TTL from after then
        self.alive_rev = 0  # the key's mod_revision as this array last left it (0: absent)
        # Told the trio time of each grant's answer: from then on etcd may hold this array alive
        # for the new lease's TTL, whether or not anything after the grant is answered.
        self.on_grant: Callable[[float], None] | None = None
        self._fresh = True  # no word from this array is on record under its current lease

    def group_key(self, group: str) -> bytes:
        return self.prefix + b"/groups/" + group.encode()

    def alive_key(self, node: str) -> bytes:
        return self.prefix + b"/alive/" + node.encode()

    async def touch(self) -> bool:
        """Move this array's key onto a new lease (if the current one is ``renew`` old): True if
        the key had gone (its lease expired) or this process had not touched it yet, so the
        witness knows nothing of this array since its last word."""
        now = trio.current_time()
        if self.lease and now - self.lease_sent < self.renew:
            return False
        lease, granted = await self.kv.lease_grant(self.ttl)
        if self.max_ttl and granted > self.max_ttl:
            # etcd holds this array alive longer than the node counts: it must not use the
            # witness (nothing is put on the lease, which expires unused).
            raise WitnessError(f"etcd granted a lease of {granted} s where {self.ttl} s was asked and at most "
                               f"{self.max_ttl} s is counted: its election timeout is longer than configured "
                               "(etcd raises a TTL to 1.5 election timeouts); set [witness] election_timeout to "
                               "the cluster's --election-timeout, in seconds. Until then this array does not "
                               "use the witness")
        if self.on_grant is not None:
            self.on_grant(trio.current_time())
        key = self.alive_key(self.node)
        fresh = not self.lease
        if fresh:
            self._fresh = True
        for _ in range(RETRIES):
            res = await self.kv.txn([cmp_mod(key, self.alive_rev)], [put(key, b"1", lease)], [get(key)])
            if res.succeeded:
                break
            # Not as this array left it: gone (its lease expired), or moved by a request of ours
            # whose answer was lost, or left by this array's previous run.
            found = res.ranges[0] if res.ranges else []
            self.alive_rev = found[0].mod_revision if found else 0
            if not found:
                # Said at once, before anything else is awaited: if the attach that follows is
                # lost, the next touch finds the key again (put by it) and must not forget that
                # the witness knows nothing of this array from before (found by review).
                fresh = self._fresh = True
        else:
            raise WitnessError(f"{self.node}'s key in etcd kept changing under {RETRIES} attempts")
        self.alive_rev = res.revision  # the put's: the key's mod_revision now
        self.lease, self.lease_sent = lease, now
        return fresh

    async def register(self, group: str, members: tuple[str, str], owner: str, epoch: int) -> None:
        """Create the group's record if there is none (the creator's view: owner and epoch)."""
        if self.node not in members or owner not in members:
            raise WitnessError(f"group {group}: {self.node} and the owner {owner} must be among {members}")
        key = self.group_key(group)
        rec = Record(group, members, owner, epoch)
        await self.kv.txn([cmp_mod(key, 0)], [put(key, rec.to_json())])

    async def _decide(self, group: str, apply: Any, needs_owner_gone: bool = False) -> Decision:
        fresh = await self.touch() or self._fresh
        key = self.group_key(group)
        for _ in range(RETRIES):
            # One snapshot: the record and every array's key.
            alive = self.prefix + b"/alive/"
            res = await self.kv.txn([], [get(key), get(alive, prefix_end(alive))])
            if len(res.ranges) != 2 or not res.ranges[0]:
                raise WitnessError(f"group {group} is not registered with the witness")
            kv = res.ranges[0][0]
            try:
                rec = Record.from_json(kv.value, group)
            except BadRecord as e:
                raise WitnessError(f"group {group}: the record in etcd is not syncd's: {e}") from None
            seen = Seen(owner_alive=any(x.key == self.alive_key(rec.owner) for x in res.ranges[1]), fresh=fresh)
            before, owner = rec.to_json(), rec.owner
            d: Decision = apply(rec, seen)
            after = rec.to_json()
            if after == before:
                self._fresh = False
                return d
            compare = [cmp_mod(key, kv.mod_revision)]
            if needs_owner_gone and d.granted:
                # The owner's key must still be gone when the record changes hands.
                compare.append({"key": b64(self.alive_key(owner)), "target": "CREATE",
                                "result": "EQUAL", "create_revision": "0"})
            if (await self.kv.txn(compare, [put(key, after)])).succeeded:
                self._fresh = False
                return d
        raise WitnessError(f"group {group}: the record kept changing under {RETRIES} attempts")

    async def report(self, group: str, epoch: int, *, peer_alive: bool, peer_in_sync: bool) -> Decision:
        return await self._decide(group, lambda r, s: rule_report(r, group, self.node, epoch, s, peer_alive=peer_alive,
                                                                  peer_in_sync=peer_in_sync))

    async def claim(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_claim(r, group, self.node, epoch, s, self.ttl),
                                  needs_owner_gone=True)

    async def keep(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_keep(r, group, self.node, epoch))

    async def handover(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_handover(r, group, self.node, epoch))

    async def resolve(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_resolve(r, group, self.node, epoch))
