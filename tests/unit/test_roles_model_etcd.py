"""The role model (``roles_sim.Sim``, see ``test_roles_model.py``) with the witness kept in etcd
(``SimConfig.witness_backend = "etcd"``): the same promises (``Sim.check``) with
``etcd_backend``'s rules on a model of etcd (``roles_sim.EtcdModel``): each array's key on its
leases; each request a decision (one call reads the record and the keys, the rule is applied to
what it read, a second call writes the record if it changed, by a compare-and-set on the
revision read; a lost race reads again), and after a report the array's sign of life: a grant
(if its lease is ``renew`` old) and a compare-and-set moving the key onto it, which also
requires the record to be as the array's last request left it. A write (grant, compare-and-set)
that reaches etcd without a quorum is lost or committed once the quorum is back, its compares
evaluated then, its answer lost (the client gave up). Each array counts, on its own clock, how
long it has not seen the other's key move (``Seen.owner_quiet``). A lease lives its TTL from its grant on etcd's clock,
its key goes ``etcd_expiry_lag`` after; a leader change gives every lease not yet revoked
election timeout + TTL from then; without a quorum (W "crashed") nothing is processed and
nothing revoked, and the quorum's return elects a leader. The arrays count ``owner_heard_for``
as the daemon does (``EtcdWitnessConfig``).

The random schedules make at most one leader change (the quorum's return counts as one) per
``owner_heard_for`` window, as the product assumes.

Until stop 51 a decision was one step at etcd, and a write without a quorum was always lost:
the read and the compare-and-set apart, and a compare-and-set committed after its client gave
up, were not modelled.

Found with it (stop 48), against the design before (the key being there was the sign of life,
renewed before each request): a lost etcd quorum whose return revives every lease let B take
the group while A, pre-elected, went on alone
(``test_a_lost_etcd_quorum_does_not_let_the_peer_take_a_pre_elected_primarys_group``).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

from syncd.node import roles
from tests.unit import test_roles_model as base
from tests.unit.roles_sim import AB, AW, BW, A, B, Sim, SimConfig, W

ETCD = SimConfig(witness_backend="etcd")
EXAMPLES = int(os.environ.get("SYNCD_MODEL_ETCD_EXAMPLES", "300"))


class EtcdSchedule(base.Schedule):
    """``test_roles_model.Schedule`` with the witness in etcd, leader changes and a random
    expiry lag in [0, 1 s]."""

    cfg = ETCD
    stats = base.Stats()

    @initialize(seed=base.SEED, ra=base.drift_rate(ETCD), rb=base.drift_rate(ETCD), rw=base.drift_rate(ETCD),
                warm=st.sampled_from([0.0, 3.0, 6.0]), load=st.sampled_from([0.0, 0.3, 1.0]),
                lag=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    def start(self, seed: int, ra: float, rb: float, rw: float, warm: float, load: float,  # type: ignore[override]
              lag: float = 1.0) -> None:
        self.cfg = replace(ETCD, etcd_expiry_lag=lag)
        self.last_change = -float("inf")
        super().start(seed, ra, rb, rw, warm, load)

    def _may_change_leader(self) -> bool:
        window = self.s.timing.witness.owner_heard_for  # type: ignore[union-attr]
        return self.s.local(W) - self.last_change > window

    @rule(dt=base.PAUSE, seed=base.SEED)
    def leader_change(self, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        if self._may_change_leader():
            self.s.etcd_leader_change()
            self.last_change = self.s.local(W)
        self.s.run_until(self.s.now + dt)

    @rule(node=st.sampled_from([A, B, W]), dt=base.PAUSE, seed=base.SEED)
    def restart(self, node: str, dt: float, seed: int) -> None:
        self.s.rng.seed(seed)
        if node == W:
            et = self.s.etcd
            assert et is not None
            if et.up or not self._may_change_leader():
                self.s.run_until(self.s.now + dt)
                return  # the quorum's return elects a leader: one per window
            self.last_change = self.s.local(W)
        self.s.restart(node)
        self.s.run_until(self.s.now + dt)


def test_two_arrays_and_a_witness_in_etcd_keep_every_promise_in_random_schedules(
        model_summary: list[str]) -> None:
    base.run_schedules(EtcdSchedule, EXAMPLES, model_summary, "A, B and the witness in etcd")


# -- schedules written out ----------------------------------------------------------------------

def scenario(**changes: object) -> Sim:
    return base.scenario(**{"witness_backend": "etcd", **changes})


def witness_lost_first_then_link(sim: Sim, after: float) -> None:
    """A loses etcd; the link goes ``after`` s later (A notices as late as it may, B at once);
    then both arrays take writes."""
    base.settle(sim)
    sim.set_cut(AW, True)
    sim.run_until(sim.now + after)
    sim.set_cut(AB, True, notice={A: sim.cfg.path_timeout, B: 0.0})
    base.writes_for(sim, 12.0)


@pytest.mark.parametrize("after", [8.0, 14.0, 19.5, 22.0])
def test_a_primary_that_lost_etcd_first_goes_on_alone_only_once_its_peer_cannot_take_the_group(
        after: float) -> None:
    sim = scenario()
    witness_lost_first_then_link(sim, after)
    a, b = sim.arrays[A], sim.arrays[B]
    assert b.s.role is roles.Role.SECONDARY  # B reported A alive while etcd lost A: failover disabled
    assert sim.etcd is not None and sim.etcd.rec.failover_disabled
    # A goes on alone only past ``lost_first_after`` (20.2 s with etcd); before, it stays fenced.
    assert a.s.alone is (after + sim.cfg.path_timeout > sim.timing.witness.lost_first_after())  # type: ignore[union-attr]


def primary_isolated(sim: Sim) -> None:
    base.settle(sim)
    sim.set_cut(AW, True)
    sim.set_cut(AB, True)
    base.writes_for(sim, 15.0)


def test_a_primary_cut_off_from_etcd_and_its_peer_loses_the_group_to_it() -> None:
    sim = scenario()
    primary_isolated(sim)
    a, b = sim.arrays[A], sim.arrays[B]
    assert (b.s.role, b.s.epoch) == (roles.Role.PRIMARY, 2) and b.s.alone
    assert not a.m.serving(a.clock.local(sim.now))


def late_requests_from_the_primary(sim: Sim) -> None:
    """A's requests reach etcd late (up to 2.5 s: past its calls' deadline) and some answers too:
    grants and attaches land after A gave them up; then the link goes."""
    base.settle(sim)
    sim.set_net(A, W, 2.5, 0.0)
    sim.set_net(W, A, 0.9, 0.3)
    sim.run_until(sim.now + 6.0)
    sim.set_cut(AB, True, notice={A: sim.cfg.path_timeout, B: 0.0})
    base.writes_for(sim, 10.0)
    sim.set_net(A, W, 0.05, 0.0)
    sim.set_net(W, A, 0.05, 0.0)
    base.writes_for(sim, 10.0)


@pytest.mark.parametrize("seed", range(6))
def test_a_grant_or_decision_heard_late_by_etcd_does_not_keep_the_primary_alive_there(seed: int) -> None:
    late_requests_from_the_primary(scenario(seed=seed))


def leader_change_before_the_key_expires_then_link_cut(sim: Sim) -> None:
    """A loses etcd; just before its key would go (TTL + lag after its last grant), etcd changes
    leader: the key lives election timeout + TTL (+ lag) more. B sees it at its last report
    before B loses etcd too; the link goes as early as A may go on alone (A notices late, B at
    once), and B reaches etcd again as it notices."""
    base.settle(sim)
    sim.set_cut(AW, True)
    et = sim.etcd
    assert et is not None
    a = sim.arrays[A]
    iv = sim.timing.witness.interval  # type: ignore[union-attr]
    t0 = a.clock.real_at(max(a.s.witness_heard, a.s.witness_sent - iv))  # whence A counts
    lease = et.keys[A][0]
    expiry = et.leases[lease][0] + et.lag  # W's clock: the key's removal
    w = sim.witness
    assert w is not None
    sim.run_until(w.clock.real_at(expiry - 0.05))
    assert A in et.keys
    sim.etcd_leader_change()
    # B's last report that sees A's key: just before it goes.
    sim.run_until(w.clock.real_at(et.leases[lease][0] + et.lag - 0.1))
    assert A in et.keys
    sim.set_cut(BW, True)
    lost_first = sim.timing.witness.lost_first_after()  # type: ignore[union-attr]
    sim.run_until(t0 + lost_first - sim.cfg.path_timeout + 0.05)
    sim.set_cut(AB, True, notice={A: sim.cfg.path_timeout, B: 0.0})
    sim.run_until(sim.now + 0.001)  # B noticed: its next report says it lost A
    sim.set_cut(BW, False)
    base.writes_for(sim, 12.0)


def test_a_leader_change_that_extends_the_primarys_key_cannot_let_its_peer_take_a_pre_elected_primarys_group(
) -> None:
    sim = scenario()
    leader_change_before_the_key_expires_then_link_cut(sim)
    a, b = sim.arrays[A], sim.arrays[B]
    assert a.s.alone and b.s.role is roles.Role.SECONDARY


def quorum_lost_then_link_then_primary_cut_off(sim: Sim) -> None:
    """etcd loses its quorum (W down) for longer than A's 'witness lost first' count; the link
    goes meanwhile and A, pre-elected, goes on alone; A is cut off from etcd; the quorum returns
    (one leader change) and B claims."""
    base.settle(sim)
    sim.crash(W)  # no quorum: nothing is processed, no lease is revoked
    sim.run_until(sim.now + 22.0)  # > lost_first_after (20.2 s)
    sim.set_cut(AB, True, notice={A: 0.0, B: 0.0})
    sim.run_until(sim.now + 5.0)
    assert sim.arrays[A].s.alone  # pre-elected: the witness was lost first
    sim.set_cut(AW, True)
    sim.run_until(sim.now + 2.0)
    sim.restart(W)  # the quorum is back: a leader, which gives every lease its TTL again
    base.writes_for(sim, 12.0)


def test_a_lost_etcd_quorum_does_not_let_the_peer_take_a_pre_elected_primarys_group() -> None:
    """A lost quorum stops lease expiry, and its return (``lessor.Promote``) gives both arrays'
    keys their TTL again. Before, B took A's revived key for a sign of life and its word that it
    lost A for in time, and was granted the group once the key expired, while A, pre-elected,
    was alone (promise b). Now A's key has not moved since before the outage: B's word is late."""
    sim = scenario()
    quorum_lost_then_link_then_primary_cut_off(sim)
    a, b = sim.arrays[A], sim.arrays[B]
    assert a.s.alone and b.s.role is roles.Role.SECONDARY


def claim_committed_after_its_client_gave_up(sim: Sim) -> None:
    """A dies. B claims the group once A's key is gone; etcd loses its quorum right after
    answering the claim's read, and its leader had logged the compare-and-set that follows:
    it commits when the quorum is back (some 18 s later), long after B's call gave up. Nobody
    is told."""
    base.settle(sim)
    et = sim.etcd
    assert et is not None
    sim.etcd_logs = True
    went: list[float] = []

    def quorum_goes(src: str, dst: str, what: str) -> bool:
        if (src, dst, what) == (B, W, "CLAIM write") and not went:  # its read said granted
            went.append(sim.now)
            sim.crash(W)
        return False

    sim.drop_if = quorum_goes
    sim.crash(A)
    base.writes_for(sim, 20.0)
    sim.drop_if = None
    assert not et.up and went, "B's claim was read, and the quorum went"
    assert (et.rec.owner, et.rec.epoch) == (A, 1) and et.held
    sim.run_until(sim.now + 3.0)
    sim.restart(W)


def test_a_claim_that_commits_after_its_client_gave_up_gives_the_group_once_and_to_the_claimant() -> None:
    """The compare-and-set of B's claim commits after B gave up on it: etcd's record says B owns
    epoch 2 while B, unanswered, is still the secondary. B asks again and is given what the
    record says (the same decision, asked again); A comes back as its secondary. Every promise
    holds throughout (``Sim.check`` after each write of the record)."""
    sim = scenario()
    claim_committed_after_its_client_gave_up(sim)
    et = sim.etcd
    assert et is not None and (et.rec.owner, et.rec.epoch) == (B, 2)
    b = sim.arrays[B]
    assert b.s.role is roles.Role.SECONDARY  # its call gave up: it was told nothing
    base.writes_for(sim, 15.0)
    assert (b.s.role, b.s.epoch) == (roles.Role.PRIMARY, 2)
    sim.restart(A)
    base.writes_for(sim, 15.0)
    a = sim.arrays[A]
    assert (a.s.role, a.s.epoch) == (roles.Role.SECONDARY, 2)


def primary_key_moved_by_a_write_logged_before_the_quorum_went(sim: Sim) -> None:
    """etcd loses its quorum just as A's key move (the sign of life after a report) reaches it;
    the leader had logged it. The link goes 21.5 s later (past A's 'witness lost first' count:
    A, pre-elected, goes on alone) and A is cut off from etcd; the quorum comes back 25 s after
    it went and commits the move: A's key moves then, long after A last heard etcd."""
    base.settle(sim)
    sim.etcd_logs = True
    went: list[float] = []

    def quorum_goes(src: str, dst: str, what: str) -> bool:
        if (src, dst, what) == (A, W, "REPORT attach") and not went:
            went.append(sim.now)
            sim.crash(W)
        return False

    sim.drop_if = quorum_goes
    while not went:
        sim.run_until(sim.now + 0.1)
    sim.drop_if = None
    sim.run_until(went[0] + 21.5)
    sim.set_cut(AB, True, notice={A: 0.0, B: 0.0})
    sim.set_cut(AW, True)
    sim.run_until(went[0] + 25.0)
    et = sim.etcd
    assert et is not None
    rev = et.key_rev(A)
    sim.restart(W)
    assert et.key_rev(A) > rev, "A's logged key move committed as the quorum came back"


def test_a_key_move_committed_after_a_lost_quorum_is_not_a_sign_of_life_to_the_peer() -> None:
    """B never read between A's key as it was before the outage and A's key moved by the late
    commit, so it counts the key quiet since its last read before the outage (an upper bound):
    its word that it lost A is late, and A, pre-elected, keeps the group alone."""
    sim = scenario()
    primary_key_moved_by_a_write_logged_before_the_quorum_went(sim)
    base.writes_for(sim, 20.0)
    a, b = sim.arrays[A], sim.arrays[B]
    assert a.s.alone and (b.s.role, b.s.epoch) == (roles.Role.SECONDARY, 1)
