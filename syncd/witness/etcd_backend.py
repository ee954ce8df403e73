"""The quorum witness kept in etcd: the built-in witness's decisions (``decide.py``) made by the
arrays themselves, against records in etcd changed only by compare-and-set transactions.

Layout under a per-pair prefix P (bytes):

* ``P/groups/NAME``: the group's record (JSON): its format (``RECORD_FORMAT``), members, owner,
  epoch, whether the owner last said its peer is in sync, whether failover is disabled, the last
  decision, and per member what the witness needs to remember of its reports (``watch``). A
  record of a newer format is refused and left as it is (``NewerRecord``): a node rewriting it
  would drop what it does not know. A record without a format is of format 1 (syncd before the
  field); fields a node may drop when it rewrites the record can come without a new format;
* ``P/alive/NODE``: a key on one of NODE's etcd leases, NODE's sign of life. Once a round of
  reports is recorded an array takes a new lease (at most one per ``renew_every`` seconds) and
  moves its key onto it (``renew``), by a transaction that requires the key to be as this array
  last left it and every record it owns to be as its reports of the round left them: the key
  moves only while those records say what the array says now (whether its peer is in sync). The
  lease's TTL is the owner's lease with drift and margin (``Timing.owner_gone_after``, rounded
  up to whole seconds as etcd counts), so "the witness has not heard the owner for longer than
  that" is "``P/alive/OWNER`` is gone", which etcd decides on its own clock.

  A new lease rather than a keepalive, because a lease's life is counted from its grant: a
  request that reaches etcd late (held in the network, or by a member that had lost its quorum
  and regained it) cannot make the key outlive what the array counts from its last answer. A
  keepalive would restart the lease whenever etcd took it, and a transaction moving the key to
  an older lease fails its compare. A grant whose answer was lost gives a lease nothing is ever
  put on. What etcd itself adds is bounded in ``owner_heard_for``: its expiry check and one
  leader change (a new leader gives every lease its whole TTL again, even one whose owner has
  long been cut off).

  So the key being there says little of when its owner was last heard; its *moving* does: the
  other member watches the owner's key at each of its requests and counts, on its own clock,
  how long it has not moved (``Seen.owner_quiet``, an upper bound). That count plays the part
  of the built-in witness's "last heard" (``decide.py``).

The rules, side by side with the built-in witness's:

* a CLAIM is granted only by a transaction that also requires ``P/alive/OWNER`` to be absent, and
  only if the owner last reported its peer in sync and failover is not disabled;
* the witness "lost the owner first" when the other member reports that it still reaches the
  owner while the owner's key is gone or has not moved for ``grace``: failover is disabled (the
  owner, pre-elected, keeps the group);
* the other member's first word that it lost the owner is "in time" if it saw the owner's key
  move within ``grace`` before; otherwise (it never saw it move since it started, or it was cut
  off from etcd meanwhile) it is "late", and its claim is refused as the built-in witness
  refuses a claim more than ``grace`` after it lost the owner;
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
from typing import Any, Protocol, TypeGuard

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


# The format of the group records this node reads and writes. A later syncd whose records an
# older node must not rewrite (it would drop what it does not know) raises it; an older node
# then refuses them (NewerRecord) and leaves them as they are, as with metadata on disk.
RECORD_FORMAT = 1


class BadRecord(ValueError):
    """A record in etcd that is not one syncd wrote; names the problem."""


class NewerRecord(BadRecord):
    """A record of a format newer than this node's ``RECORD_FORMAT``: written by a newer syncd."""


def _positive_int(v: object) -> TypeGuard[int]:
    """A JSON integer of 1 or more (true and false are not integers here)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


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
        return json.dumps({"format": RECORD_FORMAT, "members": list(self.members), "owner": self.owner,
                           "epoch": self.epoch,
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
        fmt = d.get("format", 1)
        if not _positive_int(fmt):
            raise BadRecord(f"format: {fmt!r:.40} is not a positive integer")
        if fmt > RECORD_FORMAT:
            raise NewerRecord(f"it is of format {fmt}, written by a newer syncd; this node reads format "
                              f"{RECORD_FORMAT} and leaves it as it is: upgrade this node")
        members, owner, epoch = d.get("members"), d.get("owner"), d.get("epoch")
        if not (isinstance(members, list) and len(members) == 2 and all(isinstance(m, str) and m for m in members)
                and members[0] != members[1]):
            raise BadRecord(f"members: {members!r:.60} is not two node names")
        if not isinstance(owner, str) or owner not in members:
            raise BadRecord(f"owner: {owner!r:.40} is not a member")
        if not _positive_int(epoch):
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

    owner_alive: bool  # P/alive/OWNER exists: its lease lives (or a new etcd leader revived it)
    fresh: bool  # the requester's own key had gone (or it just started): nothing known of it meanwhile
    # s since the owner's key last moved onto a new lease, as the requester saw it (at least
    # that long); None: it has not seen it move since it started
    owner_quiet: float | None = None


def _heard_within(seen: Seen, grace: float) -> bool:
    return seen.owner_quiet is not None and seen.owner_quiet <= grace


def _member(rec: Record, node: str, group: str) -> None:
    if node not in rec.members:
        raise WitnessError(f"node {node!r} is not a member of group {group} ({', '.join(rec.members)})")


def _note(rec: Record, node: str, seen: Seen, lost: bool, grace: float, anew: bool = False) -> None:
    """The other member's word about the owner (``lost``: it no longer reaches it; ``anew``: it
    reached it again since its previous report, so a loss is a new one)."""
    if node == rec.owner:
        return
    w = rec.watch.setdefault(node, Watch())
    if seen.fresh or anew:
        w.saw_owner, w.lost = False, ""  # its history is unknown, or over: start again from now
    if not lost:
        w.lost = ""
    elif not w.lost:
        w.lost = "ok" if _heard_within(seen, grace) else "late"
    w.saw_owner = seen.owner_alive  # (read by nodes before owner_quiet; kept for them)


def rule_report(rec: Record, group: str, node: str, epoch: int, seen: Seen, *,
                peer_alive: bool, peer_in_sync: bool, grace: float, lost_anew: bool = False) -> Decision:
    _member(rec, node, group)
    _note(rec, node, seen, lost=not peer_alive, grace=grace, anew=lost_anew)
    if epoch == rec.epoch and node == rec.owner:
        rec.secondary_in_sync = peer_in_sync
        rec.failover_disabled = False
    elif (node != rec.owner and peer_alive and not rec.failover_disabled
          and (not seen.owner_alive or (seen.owner_quiet is not None and seen.owner_quiet > grace))):
        # The other member reaches the owner, etcd has not heard it: the witness lost the owner first.
        rec.failover_disabled = True
        rec.last_decision = f"failover disabled: {rec.owner} unreachable from the witness"
    return Decision(True, rec.owner, rec.epoch, rec.last_decision)


def rule_claim(rec: Record, group: str, node: str, epoch: int, seen: Seen, ttl: int, grace: float) -> Decision:
    _member(rec, node, group)
    _note(rec, node, seen, lost=True, grace=grace)

    def deny(reason: str) -> Decision:
        return Decision(False, rec.owner, rec.epoch, reason)

    settled = decide.claim_settled(rec, node, epoch)
    if settled is not None:
        return settled
    if rec.watch[node].lost == "late":
        return deny(f"failover disabled: the witness lost {rec.owner} before {node} said it lost {rec.owner} too "
                    f"({node} had not seen {rec.owner}'s key in etcd move for {grace}s, or was cut off from the "
                    f"witness meanwhile); {rec.owner} keeps the group")
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

@dataclass
class Motion:
    """Another array's key as this array saw it: its revision at this array's last read, when
    that read was sent, and a time before its last move onto a new lease (None: not seen to move
    since this array started). Also the role model's (``tests/unit/roles_sim.py``)."""

    rev: int
    last_read: float
    moved_after: float | None = None

    def see(self, rev: int, sent: float) -> None:
        """A read sent at ``sent`` found the key at ``rev`` (0: gone)."""
        if rev != self.rev and rev:
            # Moved after the read that last saw it as it was; a key that is gone, or that a new
            # etcd leader revived, has not moved.
            self.moved_after = self.last_read
        self.rev, self.last_read = rev, sent

    def quiet(self, now: float) -> float | None:
        """Seconds (at least) since the key last moved; None if not seen to move."""
        return None if self.moved_after is None else now - self.moved_after


class NotRenewed(WitnessError):
    """This array's key was not moved: a record it owns does not say what it says now."""


class EtcdWitness:
    """The decisions of one array (``node``) for the groups under ``prefix``."""

    def __init__(self, kv: Kv, prefix: bytes, node: str, timing: Timing, renew: float = 0.0) -> None:
        self.kv = kv
        self.prefix = prefix.rstrip(b"/")
        self.node = node
        self.timing = timing
        self.ttl = max(1, math.ceil(timing.owner_gone_after()))
        self.renew_every = renew  # s a lease serves this array before it takes another
        self.max_ttl = 0  # the longest TTL the node counts on (0: any); a longer grant is refused
        self.lease = 0  # the lease this array's key is on (0: none yet)
        self.lease_sent = 0.0  # trio time its grant was asked: it lives TTL from after then
        self.alive_rev = 0  # the key's mod_revision as this array last left it (0: absent)
        # Told the trio time of each grant's answer: from then on etcd may hold this array alive
        # for the new lease's TTL, whether or not anything after the grant is answered.
        self.on_grant: Callable[[float], None] | None = None
        self._fresh = True  # no word from this array is on record since its key went (or it started)
        self.refused = ""  # why this array does not use the witness now ("" : it does)
        self._moves: dict[bytes, Motion] = {}  # the other arrays' keys, as seen at each request
        # Per group this array owns: the record's revision after this array's last request
        # about it and what the record said then (epoch, peer in sync), for ``renew``'s guard.
        self._owned: dict[str, tuple[int, int, bool]] = {}

    def group_key(self, group: str) -> bytes:
        return self.prefix + b"/groups/" + group.encode()

    def alive_key(self, node: str) -> bytes:
        return self.prefix + b"/alive/" + node.encode()

    def _observe(self, members: tuple[str, str], found: dict[bytes, int], sent: float) -> None:
        """The other members' keys as a read sent at ``sent`` found them (key -> mod_revision)."""
        for key in (self.alive_key(n) for n in members if n != self.node):
            m = self._moves.get(key)
            if m is None:
                self._moves[key] = Motion(found.get(key, 0), sent)
            else:
                m.see(found.get(key, 0), sent)

    def owner_quiet(self, node: str) -> float | None:
        """Seconds (at least) since ``node``'s key last moved, as this array saw it."""
        m = self._moves.get(self.alive_key(node))
        return None if m is None else m.quiet(trio.current_time())

    async def grant(self) -> int:
        """A new lease for this array's key. One longer than the node counts on means etcd would
        hold this array alive longer than it counts: nothing is put on it (it expires unused),
        and the array does not use the witness (``refused``) until a grant is short enough (the
        node's client asks for one each round meanwhile)."""
        lease, granted = await self.kv.lease_grant(self.ttl)
        if self.max_ttl and granted > self.max_ttl:
            self.refused = (f"etcd granted a lease of {granted} s where {self.ttl} s was asked and at most "
                            f"{self.max_ttl} s is counted: its election timeout is longer than configured "
                            "(etcd raises a TTL to 1.5 election timeouts); set [witness] election_timeout to "
                            "the cluster's --election-timeout, in seconds. Until then this array does not "
                            "use the witness")
            raise WitnessError(self.refused)
        self.refused = ""
        if self.on_grant is not None:
            self.on_grant(trio.current_time())
        return lease

    async def touch(self) -> bool:
        """This array's key onto a new lease with no record to guard (it reports no group):
        True if the key had gone or this process had not moved it yet."""
        return await self.renew({})

    async def renew(self, now: dict[str, tuple[int, bool]]) -> bool:
        """Move this array's key onto a new lease (if the current one is ``renew_every`` old), in
        a transaction that requires every record this array owns to be as its last request left
        it, and to say what ``now`` says (group -> epoch, peer in sync: what this array would
        report now; groups not in ``now`` are not looked at). ``NotRenewed`` if one does not:
        nothing moved. So the key moves only while the records say what this array says.
        True if the key had gone, or this process had not moved it before."""
        if self.lease and trio.current_time() - self.lease_sent < self.renew_every:
            return False
        fresh = not self.lease
        guards = []
        for group, said in sorted(self._owned.items()):
            if group not in now:
                continue  # a group the node no longer has
            rev, epoch, in_sync = said
            if (epoch, in_sync) != now[group]:
                raise NotRenewed(f"group {group}: the record says epoch {epoch}, peer in sync {in_sync}; "
                                 f"{self.node} says {now[group]} now")
            guards.append(cmp_mod(self.group_key(group), rev))
        sent = trio.current_time()
        lease = await self.grant()
        key = self.alive_key(self.node)
        for _ in range(RETRIES):
            res = await self.kv.txn([cmp_mod(key, self.alive_rev), *guards], [put(key, b"1", lease)], [get(key)])
            if res.succeeded:
                break
            # Not as this array left it: gone (its lease expired), or moved by a request of ours
            # whose answer was lost, or left by this array's previous run; or a record changed.
            found = res.ranges[0] if res.ranges else []
            rev = found[0].mod_revision if found else 0
            if rev == self.alive_rev:
                raise NotRenewed(f"a record {self.node} owns changed since its report")
            self.alive_rev = rev
            if not found:
                # Said at once, before anything else is awaited: if the attach that follows is
                # lost, the next one finds the key again (put by it) and must not forget that
                # the witness knows nothing of this array from before (found by review).
                self._fresh = fresh = True
        else:
            raise WitnessError(f"{self.node}'s key in etcd kept changing under {RETRIES} attempts")
        self.alive_rev = res.revision  # the put's: the key's mod_revision now
        self.lease, self.lease_sent = lease, sent
        return fresh

    async def register(self, group: str, members: tuple[str, str], owner: str, epoch: int) -> None:
        """Create the group's record if there is none (the creator's view: owner and epoch)."""
        if self.node not in members or owner not in members:
            raise WitnessError(f"group {group}: {self.node} and the owner {owner} must be among {members}")
        key = self.group_key(group)
        rec = Record(group, members, owner, epoch)
        await self.kv.txn([cmp_mod(key, 0)], [put(key, rec.to_json())])

    async def _decide(self, group: str, apply: Any, needs_owner_gone: bool = False) -> Decision:
        """Read the record and every array's key, apply the rule, write the record if it changed
        (compare-and-set)."""
        if self.refused:
            raise WitnessError(self.refused)
        key = self.group_key(group)
        mine = self.alive_key(self.node)
        for _ in range(RETRIES):
            # One snapshot: the record and every array's key.
            alive = self.prefix + b"/alive/"
            sent = trio.current_time()
            res = await self.kv.txn([], [get(key), get(alive, prefix_end(alive))])
            if len(res.ranges) != 2 or not res.ranges[0]:
                raise WitnessError(f"group {group} is not registered with the witness")
            kv = res.ranges[0][0]
            try:
                rec = Record.from_json(kv.value, group)
            except NewerRecord as e:
                raise WitnessError(f"group {group}: the record in etcd: {e}") from None
            except BadRecord as e:
                raise WitnessError(f"group {group}: the record in etcd is not syncd's: {e}") from None
            found = {x.key: x.mod_revision for x in res.ranges[1]}
            self._observe(rec.members, found, sent)
            if mine not in found:
                self._fresh = True  # this array's key had gone: nothing is known of it meanwhile
            seen = Seen(owner_alive=self.alive_key(rec.owner) in found, fresh=self._fresh,
                        owner_quiet=self.owner_quiet(rec.owner))
            before, owner = rec.to_json(), rec.owner
            d: Decision = apply(rec, seen)
            after = rec.to_json()
            if after == before:
                rev = kv.mod_revision
            else:
                compare = [cmp_mod(key, kv.mod_revision)]
                if needs_owner_gone and d.granted:
                    # The owner's key must still be gone when the record changes hands.
                    compare.append({"key": b64(self.alive_key(owner)), "target": "CREATE",
                                    "result": "EQUAL", "create_revision": "0"})
                done = await self.kv.txn(compare, [put(key, after)])
                if not done.succeeded:
                    continue
                rev = done.revision
            self._fresh = False
            if rec.owner == self.node:
                # What the record says of this array's group now, at this revision (``renew``).
                self._owned[group] = (rev, rec.epoch, rec.secondary_in_sync)
            else:
                self._owned.pop(group, None)
            return d
        raise WitnessError(f"group {group}: the record kept changing under {RETRIES} attempts")

    async def report(self, group: str, epoch: int, *, peer_alive: bool, peer_in_sync: bool,
                     lost_anew: bool = False) -> Decision:
        g = self.timing.grace
        return await self._decide(group, lambda r, s: rule_report(r, group, self.node, epoch, s, peer_alive=peer_alive,
                                                                  peer_in_sync=peer_in_sync, grace=g,
                                                                  lost_anew=lost_anew))

    async def claim(self, group: str, epoch: int) -> Decision:
        g = self.timing.grace
        return await self._decide(group, lambda r, s: rule_claim(r, group, self.node, epoch, s, self.ttl, g),
                                  needs_owner_gone=True)

    async def keep(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_keep(r, group, self.node, epoch))

    async def handover(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_handover(r, group, self.node, epoch))

    async def resolve(self, group: str, epoch: int) -> Decision:
        return await self._decide(group, lambda r, s: rule_resolve(r, group, self.node, epoch))
