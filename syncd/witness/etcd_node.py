"""The node's side of the witness when it is kept in etcd (``[witness] backend = "etcd"``).

The same interface as ``client.WitnessClient`` (the node cannot tell the backends apart): a
``run`` loop that reports every group each ``interval`` and hands the witness's record to
``on_report``, and ``decide`` for KEEP, CLAIM, HANDOVER and RESOLVE, which answers None when
the witness cannot be asked within the deadline (no etcd quorum, unreachable), as the node's
role machine expects of an unreachable witness. The decisions are ``etcd_backend``'s. Beside
the reports, a task of its own gathers every member's status for ``showrcopy witness``
(``etcd_members``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import trio

from . import proto as w
from .decide import Decision, Timing, WitnessError
from .etcd import EtcdClient, EtcdConfig, EtcdError, EtcdUnreachable
from .etcd_backend import EtcdWitness, NotRenewed
from .etcd_members import Gathering, gather
from .reach import GroupsFn, OnChange, OnReport, WitnessReach

log = logging.getLogger("syncd.witness.etcd")

MEMBER_ROUNDS = 4  # report intervals between two gatherings of the members' status
MEMBER_DEADLINE = 0.5  # s for one member's status (at most the etcd timeout)
# s from a lease's expiry to its key's removal: etcd's leader looks for expired leases every
# 0.5 s, then commits their revocation.
EXPIRY_LAG = 1.0


@dataclass(frozen=True)
class EtcdWitnessConfig:
    etcd: EtcdConfig
    prefix: str  # this pair's keys: one prefix per array pair sharing the etcd cluster
    interval: float = 0.5
    owner_lease: float = 3.0
    grace: float = 4.5
    drift: float = 0.05
    margin: float = 0.5
    election_timeout: float = 1.0  # s: the etcd cluster's --election-timeout (etcd's default)
    backend: str = "etcd"

    def lease_ttl(self) -> int:
        """The TTL of an array's lease in etcd: the owner's lease with drift and margin, whole
        seconds; etcd raises it to 1.5 election timeouts if that is longer."""
        asked = math.ceil(Timing(owner_lease=self.owner_lease, drift=self.drift, margin=self.margin).owner_gone_after())
        return max(1, asked, math.ceil(1.5 * self.election_timeout))

    def owner_heard_for(self) -> float:
        """How long after an array's last answered grant the witness in etcd may still act as if
        it heard the array (in place of the built-in witness's ``grace``). Its key last moves
        by then, or later by a request that reaches etcd late, but only while the lease it moves
        onto lives: up to its TTL, the expiry check and the revoke's commit (``EXPIRY_LAG``) after
        the grant, and as long again plus an election timeout if a new etcd leader gives the
        lease its TTL again (etcd's ``lessor.Promote``). The peer counts its word that it lost
        the array as in time for ``grace`` (its clock) after it last saw the key move. So
        2 × (TTL + ``EXPIRY_LAG``) + the election timeout + ``grace``. A second leader change
        within that time is not covered."""
        return 2 * (self.lease_ttl() + EXPIRY_LAG) + self.election_timeout + self.grace

    def describe(self) -> str:
        return f"etcd {','.join(self.etcd.endpoints)} prefix {self.prefix}"

    def security(self) -> str:
        parts = []
        if any(e.startswith("https") for e in self.etcd.endpoints):
            parts.append("TLS" + (" with a client certificate" if self.etcd.cert else ""))
        else:
            parts.append("plain HTTP (insecure)")
        if self.etcd.user:
            parts.append(f"etcd user {self.etcd.user}")
        return ", ".join(parts)


class EtcdWitnessClient(WitnessReach):
    def __init__(self, cfg: EtcdWitnessConfig, node_name: str, groups_fn: GroupsFn,
                 on_report: OnReport | None = None, on_change: OnChange | None = None) -> None:
        super().__init__(cfg.interval, on_change)
        self.cfg = cfg
        self.node = node_name
        self.groups_fn = groups_fn
        self.on_report = on_report
        self.kv = EtcdClient(cfg.etcd)
        # The members' status is asked over connections of its own: a member that hangs holds
        # up a status request, never a decision waiting for the same connection.
        self.probe = EtcdClient(cfg.etcd)
        self.members: Gathering | None = None  # the last gathering of the members' status
        timing = Timing(owner_lease=cfg.owner_lease, drift=cfg.drift, margin=cfg.margin, grace=cfg.grace)
        # A new lease at most twice per report interval: one serves a whole round of reports.
        self.witness = EtcdWitness(self.kv, cfg.prefix.encode(), node_name, timing, renew=cfg.interval / 2)
        self.witness.on_grant = self._granted
        self.witness.max_ttl = cfg.lease_ttl()
        self._warned = ""  # the last witness error logged (each is logged once in a row)
        self._not_renewed = ""  # why the last round's sign of life was left out ("": it was not)
        self.scope: trio.CancelScope | None = None
        self.registered: set[str] = set()
        self.witness_name = ""
        self.lock = trio.Lock()  # reports and decisions, one at a time (``_round``)

    def info(self) -> dict[str, Any]:
        g = self.members
        return {"backend": "etcd", "address": ",".join(self.cfg.etcd.endpoints),
                "endpoints": list(self.cfg.etcd.endpoints), "prefix": self.cfg.prefix,
                "reachable": self.reachable, "witness": self.witness_name, "security": self.cfg.security(),
                "answered_by": self.kv.last_endpoint or None,
                "last_error": self.last_error,
                "last_heard_s_ago": self.last_heard_s_ago(),
                "lease_ttl_s": self.cfg.lease_ttl(),
                "peers_key_quiet_s": self.peers_quiet(),
                "members": None if g is None else [m.to_json() for m in g.members],
                "members_age_s": None if g is None else round(trio.current_time() - g.at, 2)}

    def peers_quiet(self) -> dict[str, float | None]:
        """Per other member of this array's groups: seconds since this array last saw its key in
        etcd move (None: not since it started; its word that it lost that member would be late)."""
        out: dict[str, float | None] = {}
        for _name, members, _owner, _epoch, _flags in self.groups_fn():
            for m in members:
                if m != self.node and m not in out:
                    q = self.witness.owner_quiet(m)
                    out[m] = None if q is None else round(q, 2)
        return out

    def _ok(self) -> None:
        super()._ok()
        self.witness_name = "etcd"

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_members)
                while True:
                    try:
                        await self._round()
                    except (EtcdUnreachable, EtcdError, WitnessError) as e:
                        if isinstance(e, WitnessError) and str(e) != self._warned:
                            log.warning("witness on etcd: %s", e)
                            self._warned = str(e)
                        self._failed(e)
                    else:
                        self._warned = ""
                    await trio.sleep(self.cfg.interval)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.kv.aclose()
                await self.probe.aclose()

    def _granted(self, when: float) -> None:
        """etcd granted this array a new lease, answered at ``when``: its key may be moved onto it
        even if no later answer comes, so etcd may hold the array alive until the lease's TTL
        after then. Said for every group (the key is the array's), as the built-in witness's
        client says a request went out: the role machine counts a lost witness from then at
        the earliest. Only answers count here: a request to a member without quorum is not
        one (nothing commits there), so a lost quorum is lost from the last answer."""
        for name, *_ in self.groups_fn():
            self._sent(name, when)

    async def _watch_members(self) -> None:
        """Every ``MEMBER_ROUNDS`` report intervals, each member's status, kept for showrcopy."""
        within = min(self.cfg.etcd.timeout, MEMBER_DEADLINE)
        while True:
            self.members = await gather(self.probe, self.cfg.etcd.endpoints, within)
            await trio.sleep(MEMBER_ROUNDS * self.cfg.interval)

    async def _round(self) -> None:
        groups = self.groups_fn()
        if self.witness.refused:
            await self.witness.grant()  # raises while etcd's leases are still too long (one left unused)
        if not groups:
            await self.witness.touch()  # reachability, and this array's lease
            self._ok()
            return
        answered = []
        for name, members, owner, epoch, _flags in groups:
            if name not in self.registered:
                await self.witness.register(name, members, owner, epoch)
                self.registered.add(name)
            got = await self._report(name)
            if got is not None:
                self._ok()
                answered.append((name, *got))
        # Then this array's sign of life: its key moves onto a new lease only while every record
        # it owns says what it would report now (read now, under the lock, as a report's flags).
        async with self.lock:
            said = {}
            for name, *_ in groups:
                now = self._report_now(self.groups_fn, name)
                if now is not None:
                    said[name] = (now[0], bool(now[1] & w.REPORT_PEER_IN_SYNC))
            try:
                await self.witness.renew(said)
            except NotRenewed as e:
                # A record changed since its report, or says what this array no longer says:
                # the next round's reports write it again. Logged once in a row.
                if str(e) != self._not_renewed:
                    log.info("witness on etcd: this round's sign of life waits for the next: %s", e)
                self._not_renewed = str(e)
            else:
                self._not_renewed = ""
        for name, sent, d in answered:
            if self.on_report is not None:
                # The witness holds this array alive for its lease's TTL from after the grant was
                # asked, which may be before this report (one lease serves a round or more).
                self.on_report(name, min(sent, self.witness.lease_sent), d.owner, d.epoch)

    async def _report(self, name: str) -> tuple[float, Decision] | None:
        """Group ``name``'s report: (when it was sent, the record's answer), or None if the group
        is gone. One request at a time, as the built-in witness's client: the report's flags are
        read once it is its turn, so it never follows a KEEP with flags from before it."""
        async with self.lock:
            now = self._report_now(self.groups_fn, name)
            if now is None:
                return None
            sent = trio.current_time()
            return sent, await self.witness.report(name, now[0], peer_alive=bool(now[1] & w.REPORT_PEER_ALIVE),
                                                   peer_in_sync=bool(now[1] & w.REPORT_PEER_IN_SYNC),
                                                   lost_anew=bool(now[1] & w.REPORT_LOST_ANEW))

    async def decide(self, t: w.WType, group: str, epoch: int) -> tuple[Decision | None, float]:
        """(the decision, or None when etcd cannot be asked; when the request was sent)."""
        ask = {w.WType.CLAIM: self.witness.claim, w.WType.KEEP: self.witness.keep,
               w.WType.HANDOVER: self.witness.handover, w.WType.RESOLVE: self.witness.resolve}.get(t)
        if ask is None:
            raise ValueError(f"not a decision: {t}")
        sent = trio.current_time()
        try:
            if t is w.WType.CLAIM:
                # A report first, so that the record has this array's word about the link as it
                # is now (a loss since the link last came back is a new one) before the claim.
                got = await self._report(group)
                if got is not None and self.on_report is not None:
                    self.on_report(group, min(got[0], self.witness.lease_sent), got[1].owner, got[1].epoch)
            async with self.lock:
                sent = trio.current_time()
                d = await ask(group, epoch)
        except (EtcdUnreachable, EtcdError) as e:
            self._failed(e)
            return None, sent
        except WitnessError as e:
            log.warning("witness on etcd: %s %s: %s", t.name, group, e)
            return None, sent
        self._ok()
        return d, sent
