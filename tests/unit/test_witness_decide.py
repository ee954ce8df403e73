"""The witness's decision rules: one owner per epoch, failover only when it is safe."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.witness.decide import (
    GroupRecord,
    Timing,
    claim,
    handover,
    keep,
    report,
    resolve,
)

T = Timing(owner_lease=3.0, drift=0.05, margin=0.5, grace=4.5)


def group():
    return GroupRecord("rcg1", ("A", "B"), owner="A")


def test_primary_failure_fails_over_after_the_owner_lease():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    report(g, T, 0.1, "B", 1, peer_alive=True, peer_in_sync=False)
    d = claim(g, T, 2.0, "B", 1)  # A heard 2 s ago: it may still serve
    assert not d.granted and "may still serve" in d.reason
    d = claim(g, T, 0.0 + T.owner_gone_after() + 0.01, "B", 1)
    assert d.granted and (d.owner, d.epoch) == ("B", 2)
    # The old owner comes back: it no longer owns anything.
    assert not keep(g, T, 10.0, "A", 1).granted


def test_link_failure_owner_keeps_group_and_secondary_cannot_claim():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    assert keep(g, T, 1.0, "A", 1).granted  # A lost B, goes on alone
    d = claim(g, T, 100.0, "B", 1)
    assert not d.granted and "not in sync" in d.reason


def test_witness_lost_first_then_link_pre_elected_primary_keeps_the_group():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    for now in (2.0, 4.0, 6.0):  # A-W cut: only B reports, and B still reaches A
        report(g, T, now, "B", 1, peer_alive=True, peer_in_sync=False)
    assert g.failover_disabled
    d = claim(g, T, 20.0, "B", 1)  # then the link goes
    assert not d.granted and "keeps the group" in d.reason


def test_a_secondary_that_lost_the_witness_too_cannot_claim_long_after_the_witness_lost_the_primary():
    """Both arrays lose the witness; then the link goes (A, pre-elected, goes on alone); B gets
    the witness back and claims: the witness lost A far more than ``grace`` before B said it lost
    A too, so A may be going on alone: refused (found by the model tests). What B said about A
    before its own long silence does not count: the link may have come back meanwhile."""
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    report(g, T, 0.5, "B", 1, peer_alive=False, peer_in_sync=False)  # a flap, then B is cut off too
    d = claim(g, T, 10.0, "B", 1)
    assert not d.granted and "failover disabled" in d.reason and (g.owner, g.epoch) == ("A", 1)
    # A real failure of A: B says at once that it lost A, and gets the group after the lease.
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5):
        report(g, T, t, "B", 1, peer_alive=t < 1.0, peer_in_sync=False)
    assert claim(g, T, T.owner_gone_after() + 0.1, "B", 1).granted


def test_isolated_primary_loses_the_group():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    report(g, T, 0.5, "B", 1, peer_alive=True, peer_in_sync=False)
    # A is cut from B and W at once: B reports it lost A, then claims.
    report(g, T, 1.5, "B", 1, peer_alive=False, peer_in_sync=False)
    assert not g.failover_disabled
    assert claim(g, T, 4.0, "B", 1).granted
    assert not keep(g, T, 4.1, "A", 1).granted  # if A reaches W again, it must stay failsafe


def test_witness_restart_forgets_liveness_and_refuses_until_the_owner_reports():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    g2 = GroupRecord.restore(g.persistent())
    d = claim(g2, T, 100.0, "B", 1)
    assert not d.granted and "has not heard from A" in d.reason


events = st.lists(
    st.tuples(
        st.sampled_from(["report", "claim", "keep", "handover", "resolve"]),
        st.sampled_from(["A", "B"]),
        st.floats(0.0, 3.0),  # time step
        st.booleans(), st.booleans(),
        st.integers(-1, 2),  # epoch offset the node uses (stale, current, future)
    ),
    max_size=60,
)


@settings(max_examples=400)
@given(events)
def test_one_owner_per_epoch_and_epochs_only_grow(evs):
    g = group()
    now = 0.0
    owners = {1: "A"}
    last_epoch = 1
    for kind, node, dt, alive, insync, off in evs:
        now += dt
        epoch = g.epoch + off
        if kind == "report":
            d = report(g, T, now, node, epoch, peer_alive=alive, peer_in_sync=insync)
        elif kind == "claim":
            d = claim(g, T, now, node, epoch)
        elif kind == "keep":
            d = keep(g, T, now, node, epoch)
        elif kind == "handover":
            d = handover(g, T, now, node, epoch)
        else:
            d = resolve(g, T, now, node, epoch)
        assert g.epoch >= last_epoch
        took_over = g.epoch > last_epoch
        if took_over and kind == "resolve":  # an operator's epoch, adopted as it is
            assert d.granted and g.epoch == epoch and g.owner == node
        elif took_over:
            assert g.epoch == last_epoch + 1 and kind in ("claim", "handover") and d.granted
        last_epoch = g.epoch
        assert owners.setdefault(g.epoch, g.owner) == g.owner  # never two owners in an epoch
        if took_over:  # a takeover leaves failover enabled (the new owner's peer may claim later)
            assert not g.failover_disabled


def test_handover_only_by_the_owner_to_an_in_sync_peer():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=False)
    assert not handover(g, T, 0.1, "A", 1).granted  # B not in sync
    report(g, T, 0.2, "A", 1, peer_alive=True, peer_in_sync=True)
    assert not handover(g, T, 0.3, "B", 1).granted  # not the owner
    assert not handover(g, T, 0.3, "A", 0).granted  # stale epoch
    d = handover(g, T, 0.4, "A", 1)
    assert d.granted and d.owner == "B" and d.epoch == 2
    assert not claim(g, T, 100.0, "A", 2).granted  # A cannot claim back until B reports in sync


def test_a_report_right_after_a_handover_does_not_disable_failover():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    assert handover(g, T, 0.1, "A", 1).granted and g.owner == "B"
    # A (now secondary) reports before B, the new owner, has reported to the witness itself.
    report(g, T, 0.2, "A", 2, peer_alive=True, peer_in_sync=False)
    assert not g.failover_disabled


def test_resolve_adopts_only_a_newer_epoch_of_the_operator():
    g = group()
    report(g, T, 0.0, "A", 1, peer_alive=True, peer_in_sync=True)
    assert not resolve(g, T, 0.1, "B", 1).granted  # A owns epoch 1: B's is no newer
    assert resolve(g, T, 0.1, "A", 1).granted and g.owner == "A"  # already the owner: nothing changes
    d = resolve(g, T, 0.2, "B", 3)  # B overrode (and a split brain was resolved) without the witness
    assert d.granted and (g.owner, g.epoch) == ("B", 3) and not g.secondary_in_sync
    assert not resolve(g, T, 0.3, "A", 2).granted and (g.owner, g.epoch) == ("B", 3)
    assert keep(g, T, 0.4, "B", 3).granted  # the owner can go on alone again
    assert not claim(g, T, 100.0, "A", 3).granted  # A not in sync until B says so
