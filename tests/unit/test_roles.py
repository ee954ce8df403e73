"""The role machine, event by event (syncd/node/roles.py). The model tests
(test_roles_model.py) drive two machines and the witness through random schedules; these pin
down the moves users reported broken."""

from __future__ import annotations

import pytest

from syncd.node import roles as r
from syncd.node.roles import (
    GroupRoles,
    Mode,
    Role,
    RoleError,
    Timing,
    WitnessAsk,
    WitnessTiming,
)

T = Timing(lease=2.0, lease_drift=0.05, lease_margin=0.5, transition_timeout=5.0,
           witness=WitnessTiming(interval=0.5, owner_lease=3.0, grace=4.5))
EXPIRY = T.lease_expiry()


def restarted(role: Role, epoch: int = 1, now: float = 100.0, timing: Timing = T) -> GroupRoles:
    return GroupRoles.at_start(me="A", peer="B", role=role, epoch=epoch, started=True, failsafe=False,
                               witness_behind=False, auto_failover=True, auto_recover=True, timing=timing, now=now)


def attached_primary(now: float = 100.0) -> GroupRoles:
    g = restarted(Role.PRIMARY, now=now)
    g.handle(r.LinkUp(now))
    acts = g.handle(r.PeerState(now, Role.SECONDARY, 1))
    assert any(isinstance(a, r.StartResync) for a in acts)
    g.handle(r.ResyncBegun(now))
    g.handle(r.ResyncDone(now))
    g.handle(r.ResyncEnded(now))
    assert g.state.mode is Mode.ATTACHED and g.serving(now)
    g.handle(r.WitnessReport(now, now, "A", 1))
    return g


def test_promote_never_takes_an_epoch_at_or_below_the_current_one():
    g = restarted(Role.SECONDARY, epoch=50)
    before = g.state
    for epoch in (1, 49, 50):
        with pytest.raises(RoleError, match="epochs never go back"):
            g.handle(r.Promote(101.0, epoch, "operator"))
        assert g.state is before  # refused: nothing changed
    g.handle(r.Promote(101.0, 51, "operator"))
    assert g.state.role is Role.PRIMARY and g.state.epoch == 51


def test_a_peer_takeover_or_commit_below_the_current_epoch_is_refused():
    g = restarted(Role.SECONDARY, epoch=7)
    for ev in (r.PeerTakeover(101.0, 3), r.PeerSwitchoverCommit(101.0, 7)):
        with pytest.raises(RoleError):
            g.handle(ev)
        assert g.state.role is Role.SECONDARY and g.state.epoch == 7


def test_a_restarted_primary_serves_nothing_until_confirmed():
    g = restarted(Role.PRIMARY, now=100.0)
    assert g.state.mode is Mode.STARTING and not g.serving(100.0)
    g.handle(r.LinkUp(100.1))
    g.handle(r.WitnessReport(100.2, 100.15, "A", 1))  # the witness still names it: not enough
    assert not g.serving(100.3)
    acts = g.handle(r.PeerState(100.4, Role.SECONDARY, 1))  # the peer follows it at its epoch
    assert g.state.confirmed and g.state.mode is Mode.SYNCING and g.serving(100.4)
    assert any(isinstance(a, r.StartResync) for a in acts)


def test_a_restarted_primary_the_peer_replaced_steps_down_without_serving():
    g = restarted(Role.PRIMARY, now=100.0)
    g.handle(r.LinkUp(100.1))
    acts = g.handle(r.PeerState(100.2, Role.PRIMARY, 2))
    assert g.state.role is Role.SECONDARY and g.state.epoch == 2 and not g.serving(100.2)
    assert any(isinstance(a, r.BecameSecondary) for a in acts)


def test_a_restarted_primary_the_witness_replaced_steps_down_before_the_link_returns():
    g = restarted(Role.PRIMARY, now=100.0)
    g.handle(r.WitnessReport(100.3, 100.25, "B", 2))
    assert g.state.role is Role.SECONDARY and g.state.epoch == 2
    assert not any(g.serving(100.0 + i / 10) for i in range(100))


def test_a_restarted_primary_cut_off_asks_the_witness_after_the_old_lease():
    g = restarted(Role.PRIMARY, now=100.0)
    assert g.next_timer(100.0) == pytest.approx(100.0 + EXPIRY)
    assert g.handle(r.Tick(100.0 + EXPIRY - 0.01)) == []
    acts = g.handle(r.Tick(100.0 + EXPIRY))
    assert acts == [r.AskWitness(WitnessAsk.KEEP)] and g.state.mode is Mode.DECIDING
    assert not g.serving(100.0 + EXPIRY)
    g.handle(r.WitnessAnswer(103.0, 102.9, WitnessAsk.KEEP, True, "A", 1, "ok"))
    assert g.state.alone and g.state.confirmed and g.serving(103.0)


def test_a_restarted_primary_that_reaches_nobody_enters_failsafe():
    g = restarted(Role.PRIMARY, now=100.0)
    g.handle(r.Tick(100.0 + EXPIRY))
    acts = g.handle(r.WitnessAnswer(104.0, 103.0, WitnessAsk.KEEP, None))
    assert g.state.failsafe and not g.serving(104.0) and r.Persist() in acts


def test_a_restarted_secondary_serves_only_once_a_lease_is_granted():
    g = restarted(Role.SECONDARY, now=100.0)
    assert not g.serving(100.0)
    g.handle(r.LinkUp(100.0))
    acts = g.handle(r.Tick(100.0))
    assert acts == [r.RequestLease(T.lease_request_timeout())]
    g.handle(r.LeaseReply(100.01, 100.0, 2000))
    assert g.serving(100.5) and not g.serving(102.0)  # the lease runs from when it was asked


def test_a_primary_acknowledges_nothing_alone_before_every_lease_it_granted_has_expired():
    g = attached_primary(100.0)
    g.handle(r.LeaseRequested(101.0))  # the secondary may serve until 101 + lease
    g.handle(r.LinkDown(101.5))
    assert g.state.mode is Mode.FENCING and not g.state.alone
    assert g.serving(101.5)  # reads, while the witness cannot have given the group away
    assert not g.serving(100.0 + T.witness.owner_lease)
    assert g.handle(r.Tick(101.0 + EXPIRY - 0.001)) == []
    assert g.handle(r.Tick(101.0 + EXPIRY)) == [r.AskWitness(WitnessAsk.KEEP)]
    acts = g.handle(r.WitnessAnswer(104.0, 103.9, WitnessAsk.KEEP, True, "A", 1, "ok"))
    assert g.state.alone and r.FenceOver() in acts and any(isinstance(a, r.NewGeneration) for a in acts)


def test_lease_grants_need_a_ready_mirroring_peer():
    g = restarted(Role.PRIMARY, now=100.0)
    assert g.handle(r.LeaseRequested(100.0)) == [r.GrantLease(0)]
    g = attached_primary(100.0)
    assert g.handle(r.LeaseRequested(100.0)) == [r.GrantLease(2000)]


def test_an_event_no_row_admits_is_refused_and_changes_nothing():
    g = restarted(Role.SECONDARY)
    before = g.state
    with pytest.raises(RoleError):
        g.handle(r.SwitchoverBegin(100.0))
    with pytest.raises(RoleError):
        g.handle(r.ResyncDone(100.0))
    assert g.state is before


def test_the_table_has_one_row_per_move():
    keys = [(row.role, m, row.event) for row in r.TABLE_ROWS for m in row.modes]
    assert len(keys) == len(set(keys)) == len(r.TABLE)
    for role, mode, _ in keys:  # modes belong to their role (or both)
        assert mode in (r.ALL_P if role is Role.PRIMARY else r.ALL_S)


def test_alua_is_derived_from_the_state():
    g = attached_primary(100.0)
    assert g.alua(100.0) == r.ALUA_ACTIVE_OPTIMIZED
    assert g.alua(100.0, "secondary") == r.ALUA_ACTIVE_NON_OPTIMIZED
    g.handle(r.SwitchoverBegin(100.0))
    assert g.alua(100.0) == r.ALUA_TRANSITIONING
    s = restarted(Role.SECONDARY)
    assert s.alua(100.0) == r.ALUA_UNAVAILABLE


def test_a_primary_whose_disk_fails_in_sync_still_tells_the_witness_its_peer_is_in_sync():
    """So the witness lets it hand the group over; and the peer may keep serving meanwhile."""
    g = attached_primary(100.0)
    acts = g.handle(r.DiskFailed(101.0, "EIO"))
    assert r.DiskFailure(peer_in_sync=True) in acts and not g.serving(101.0)
    assert r.peer_in_sync(g.state) and g.handle(r.LeaseRequested(101.0)) == [r.GrantLease(2000)]
    g.handle(r.HandedOver(101.5, 2, in_sync=False))
    assert g.state.role is Role.SECONDARY and g.state.epoch == 2 and not g.serving(101.5)


def test_a_claim_refused_after_the_link_came_back_does_not_stand():
    g = restarted(Role.SECONDARY, now=100.0)
    g.handle(r.WitnessReport(100.0, 100.0, "B", 1))
    g.handle(r.LeaseReply(100.0, 100.0, 0))
    at = 100.0 + T.witness.claim_after_link_loss()  # counted from the start: the link was never up
    g.handle(r.WitnessReport(at, at, "B", 1))
    acts = g.handle(r.Tick(at))
    assert acts == [r.AskWitness(WitnessAsk.CLAIM)] and g.state.mode is Mode.CLAIMING
    g.handle(r.LinkUp(at + 0.1))
    acts = g.handle(r.WitnessAnswer(at + 0.2, at, WitnessAsk.CLAIM, False, "B", 1, "A was not in sync"))
    assert r.TellPeer() in acts  # the primary heard "claiming": it is told we follow again
    assert not g.state.claim_refused  # moot: the primary is back
    g.handle(r.LinkDown(105.0))
    later = 105.0 + T.witness.claim_after_link_loss()  # the primary has noticed the loss by then
    g.handle(r.WitnessReport(later - 0.1, later - 0.2, "B", 1))
    assert g.handle(r.Tick(later - 0.01)) == []
    assert g.handle(r.Tick(later)) == [r.AskWitness(WitnessAsk.CLAIM)]


# -- the fast paths' view ----------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TIMES = st.sampled_from([r.NEVER, 90.0, 99.5, 100.0, 100.5, 101.0, 110.0])


@settings(max_examples=1500, deadline=None)
@given(role=st.sampled_from(list(Role)), mode=st.sampled_from(list(Mode)), flags=st.lists(st.booleans(), min_size=10,
       max_size=10), lease_until=_TIMES, witness_until=_TIMES, witness_heard=_TIMES,
       link_lost_at=_TIMES, with_witness=st.booleans(), now=st.floats(95.0, 115.0))
def test_the_fast_paths_view_is_serving_and_not_transitioning(role, mode, flags, lease_until, witness_until,
                                                               witness_heard, link_lost_at, with_witness, now):
    """``GroupRoles.steady_until`` (what every host request compares the clock with) is exactly
    ``serving and not transitioning`` for any state and time, kept when the timing changes."""
    confirmed, failsafe, started, leaving, alone, lost_first, link_up, claim_refused, auto, _ = flags
    g = restarted(role, timing=T if with_witness else replace(T, witness=None))
    s = replace(g.state, mode=mode, confirmed=confirmed, failsafe=failsafe, started=started, leaving=leaving,
                alone=alone, witness_lost_first=lost_first, link_up=link_up, claim_refused=claim_refused,
                auto_failover=auto, lease_until=lease_until, witness_until=witness_until,
                witness_heard=witness_heard, link_lost_at=link_lost_at)
    g = GroupRoles(s, g.timing)
    for timing in (g.timing, replace(T, witness=None) if with_witness else T):
        g.timing = timing
        assert (now < g.steady_until) == (g.serving(now) and not g.transitioning(now))
        assert g.is_primary == (role is Role.PRIMARY) and g.mirroring == (mode in r.MIRRORING)


def test_a_primary_restarted_after_an_unclean_stop_never_serves_without_its_in_sync_peer():
    """The etcd history campaign (seed 32): a power cut at primary B, whose peer held every write
    it had acknowledged, then the link cut as B restarted. B went on alone with the witness's
    agreement, serving its own copy of the regions the power cut had taken writes from, and
    copied them over A's newer copy when the link returned. Now it waits for its peer."""
    g = GroupRoles.at_start(me="A", peer="B", role=Role.PRIMARY, epoch=1, started=True, failsafe=False,
                            witness_behind=False, auto_failover=True, auto_recover=True, timing=T, now=100.0,
                            peer_has_all=True)
    acts = g.handle(r.UncleanStop(100.0))
    assert g.state.peer_newer and any(isinstance(a, r.Persist) for a in acts)
    g.handle(r.LinkUp(100.1))
    g.handle(r.PeerState(100.2, Role.SECONDARY, 1))
    g.handle(r.ResyncBegun(100.3))
    assert g.state.mode is Mode.SYNCING and g.serving(100.3)  # the regions it lacks are read from the peer
    g.handle(r.WitnessReport(100.4, 100.4, "A", 1))
    g.handle(r.LeaseRequested(100.5))  # the peer serves under a lease meanwhile
    g.handle(r.LinkDown(100.6))  # before the regions were fetched back
    assert g.state.mode is Mode.FENCING and g.state.peer_newer and not g.state.peer_has_all
    assert not g.serving(100.7)  # not even reads while the witness owes it the group
    # The fence is over: nothing asked of the witness (it may only say "go on alone").
    acts = g.handle(r.Tick(100.5 + EXPIRY))
    assert g.state.failsafe and not g.state.alone and not g.serving(100.5 + EXPIRY)
    assert any(isinstance(a, r.Persist) for a in acts) and not any(isinstance(a, r.AskWitness) for a in acts)
    assert [a for a in g.handle(r.Tick(110.0)) if isinstance(a, r.AskWitness)] == []  # no failsafe retry
    # The link returns: it resynchronizes, fetches back, and may then go on without the peer.
    g.handle(r.LinkUp(111.0))
    g.handle(r.PeerState(111.1, Role.SECONDARY, 1))
    g.handle(r.ResyncBegun(111.2))
    acts = g.handle(r.CaughtUp(111.3))
    assert not g.state.peer_newer and any(isinstance(a, r.Persist) for a in acts)
    g.handle(r.LinkDown(111.4))
    g.handle(r.Tick(111.4 + EXPIRY))
    assert g.state.mode is Mode.DECIDING and g.state.witness_asking is WitnessAsk.KEEP


def test_the_operator_may_let_a_primary_that_waits_for_its_peer_go_on_alone():
    g = GroupRoles.at_start(me="A", peer="B", role=Role.PRIMARY, epoch=1, started=True, failsafe=False,
                            witness_behind=False, auto_failover=True, auto_recover=True, timing=T, now=100.0,
                            peer_has_all=True)
    g.handle(r.UncleanStop(100.0))
    g.handle(r.Tick(100.0 + EXPIRY))
    assert g.state.failsafe and g.state.peer_newer
    acts = g.handle(r.OverrideFailsafe(105.0, "operator"))
    assert g.state.alone and not g.state.peer_newer and g.serving(105.0)
    assert any(isinstance(a, r.Persist) for a in acts)
    # A clean restart keeps what it persisted: still waiting, whatever the stop.
    again = GroupRoles.at_start(me="A", peer="B", role=Role.PRIMARY, epoch=1, started=True, failsafe=True,
                                witness_behind=False, auto_failover=True, auto_recover=True, timing=T, now=200.0,
                                peer_has_all=False, peer_newer=True)
    assert again.state.peer_newer
    # One that acknowledged writes alone before it stopped holds the newer copy: nothing to wait for.
    alone = restarted(Role.PRIMARY)
    assert alone.handle(r.UncleanStop(100.0)) == [] and not alone.state.peer_newer


def test_a_primary_waiting_for_its_peer_to_resync_it_is_in_failsafe_once_the_peer_goes():
    """Found by review: at the fence's end with the link up it waits, not alone and not in
    failsafe, for the peer to resync it; if the peer then went before that, nothing moved on
    and the operator's override was refused ("not in failsafe")."""
    g = GroupRoles.at_start(me="A", peer="B", role=Role.PRIMARY, epoch=1, started=True, failsafe=False,
                            witness_behind=False, auto_failover=True, auto_recover=True, timing=T, now=100.0,
                            peer_has_all=True)
    g.handle(r.UncleanStop(100.0))  # a primary that may not go on alone
    g.handle(r.LinkUp(100.1))  # the peer's answer to the exchange never comes
    g.handle(r.Tick(100.0 + EXPIRY))
    assert g.state.mode is Mode.DETACHED and not g.state.alone and not g.state.failsafe
    acts = g.handle(r.LinkDown(110.0))
    assert g.state.failsafe and any(isinstance(a, r.Persist) for a in acts)
    g.handle(r.OverrideFailsafe(111.0, "operator"))
    assert g.state.alone and g.serving(111.0)


def test_regions_the_peer_lacks_make_a_power_cut_copy_them_not_fetch_them_back():
    """Found by review: a volume admitted to a synced group (or a difference verify found)
    resynced with ``peer_has_all`` still set; a power cut then made the primary fetch back from
    the peer its blank copy of the admitted volume, over the only good one."""
    g = attached_primary()
    assert g.state.peer_has_all
    acts = g.handle(r.NeedSync(101.0))
    assert g.state.mode is Mode.SYNCING and not g.state.peer_has_all
    assert any(isinstance(a, r.Persist) for a in acts)
    again = GroupRoles.at_start(me="A", peer="B", role=Role.PRIMARY, epoch=1, started=True, failsafe=False,
                                witness_behind=False, auto_failover=True, auto_recover=True, timing=T, now=200.0,
                                peer_has_all=g.state.peer_has_all)
    assert again.handle(r.UncleanStop(200.0)) == [] and not again.state.peer_newer


def test_writes_the_peer_holds_too_are_made_durable_before_a_primary_acknowledges_any_alone():
    """Found by review (stop 30): hosts wrote without flushing while the arrays mirrored; the
    link went, the primary went on alone, then lost power. Its disk had never flushed writes
    acknowledged while mirroring; restarted with ``peer_has_all`` cleared, it copied what the
    cut left over the peer's copies of them. Leaving "the peer holds every write" now flushes
    the volumes first: nothing is acknowledged alone, and ``peer_has_all`` stays set on disk,
    until they are durable."""
    g = attached_primary()
    assert not g.state.flush_pending and r.persisted_has_all(g.state)
    acts = g.handle(r.LinkDown(101.0))
    assert [a for a in acts if isinstance(a, r.FlushVolumes)] == [r.FlushVolumes()]
    assert g.state.flush_pending and not g.state.peer_has_all
    assert r.persisted_has_all(g.state)  # a power cut now: the restart fetches back from the peer
    g.handle(r.Tick(101.0 + EXPIRY))
    g.handle(r.WitnessAnswer(101.1 + EXPIRY, 101.0 + EXPIRY, WitnessAsk.KEEP, True, "A", 1, "ok"))
    assert g.state.alone  # the data path still waits for the flush before it acknowledges alone
    acts = g.handle(r.Flushed(110.0))
    assert not g.state.flush_pending and not r.persisted_has_all(g.state)
    assert any(isinstance(a, r.Persist) for a in acts)
    assert g.handle(r.Flushed(110.1)) == []  # nothing pending: nothing to say
    # A resync needed while in sync (a volume admitted) flushes too: its writes are mirrored,
    # but the regions the power cut would leave here are then copied to the peer.
    g = attached_primary()
    acts = g.handle(r.NeedSync(101.0))
    assert g.state.mode is Mode.SYNCING and g.state.flush_pending
    assert any(isinstance(a, r.FlushVolumes) for a in acts)
    # A secondary taking the group over holds writes the old primary acknowledged, perhaps only
    # in its caches: durable before it acknowledges any alone.
    s = restarted(Role.SECONDARY)
    acts = s.handle(r.Promote(101.0, 2, "operator"))
    assert s.state.role is Role.PRIMARY and s.state.flush_pending
    assert any(isinstance(a, r.FlushVolumes) for a in acts) and r.persisted_has_all(s.state)
    # Demoted while it flushes: nothing pending is left on a secondary.
    g = attached_primary()
    g.handle(r.LinkDown(101.0))
    g.handle(r.LinkUp(101.5))
    g.handle(r.PeerState(101.6, Role.PRIMARY, 2))
    assert g.state.role is Role.SECONDARY and not g.state.flush_pending


def test_a_secondary_back_from_an_unclean_stop_claims_nothing_until_its_primary_resynced_it():
    """Finding 12 of the role model: a power cut may have taken mirrored writes its primary
    acknowledged. It persists that, asks the witness nothing when the primary is gone, and is
    free to again once the primary has resynced it; the operator may promote it meanwhile."""
    g = restarted(Role.SECONDARY, now=100.0)
    acts = g.handle(r.UncleanStop(100.0))
    assert g.state.peer_newer and r.Persist() in acts
    assert any(isinstance(a, r.Note) and "does not take the group over until" in a.msg for a in acts)
    assert g.handle(r.UncleanStop(100.0)) == []  # said once
    at = 100.0 + T.witness.claim_after_link_loss()
    g.handle(r.WitnessReport(at, at, "B", 1))
    assert not g.failover_possible(at)
    assert [a for a in g.handle(r.Tick(at + 10.0)) if isinstance(a, r.AskWitness)] == []
    # A clean restart before the primary came back keeps it.
    again = GroupRoles.at_start(me="A", peer="B", role=Role.SECONDARY, epoch=1, started=True, failsafe=False,
                                witness_behind=False, auto_failover=True, auto_recover=True, timing=T, now=200.0,
                                peer_newer=True)
    assert again.state.peer_newer
    # The primary resynced it (adopt_gen): it may take the group over again.
    acts = g.handle(r.CaughtUp(120.0))
    assert not g.state.peer_newer and r.Persist() in acts
    g.handle(r.WitnessReport(121.0, 121.0, "B", 1))
    assert g.failover_possible(121.0)
    assert g.handle(r.Tick(121.0)) == [r.AskWitness(WitnessAsk.CLAIM)]
    # The operator's failover promotes it meanwhile, accepting what the power cut took.
    op = restarted(Role.SECONDARY, now=100.0)
    op.handle(r.UncleanStop(100.0))
    op.handle(r.Promote(130.0, 2, "failover by the operator"))
    assert op.state.role is Role.PRIMARY and not op.state.peer_newer
