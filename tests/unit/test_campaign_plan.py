"""The campaign's plan: every fault kind is played once before any repeats, bad requests are
refused by name before anything starts, and a power cut is played only where power-cut disks
can be made."""

from __future__ import annotations

import random

import pytest

from syncd.lab import campaign
from syncd.lab.campaign import FAULT_KINDS, available_kinds, plan_round, run_campaign
from syncd.lab.rig import LabError


def test_the_first_draws_cover_every_kind_before_any_repeats():
    kinds = ("link", "isolate", "primary", "secondary", "witness", "flap", "switchover")
    for seed in range(20):
        rng, deck, drawn = random.Random(seed), [], []
        while len(drawn) < len(kinds):
            drawn += [f.kind for f in plan_round(rng, kinds, deck)]
        assert set(drawn[:len(kinds)]) == set(kinds)
        for f in plan_round(rng, kinds, deck):
            assert 0.5 <= f.hold <= 4.0 and (f.site in ("A", "B")) == (f.kind in ("isolate", "power"))


def test_power_cut_is_played_only_where_power_cut_disks_can_be_made(monkeypatch):
    monkeypatch.setattr(campaign.os, "geteuid", lambda: 1000)
    assert "power" not in available_kinds() and set(available_kinds()) == set(FAULT_KINDS) - {"power"}
    assert campaign.power_cut_problem() == "power-cut disks need root"
    monkeypatch.setattr(campaign.os, "geteuid", lambda: 0)
    monkeypatch.setattr(campaign.shutil, "which", lambda t: f"/usr/bin/{t}")
    monkeypatch.setattr(campaign.os.path, "exists", lambda p: p == "/dev/fuse" or p.startswith("/usr/bin"))
    assert "power" in available_kinds()


@pytest.mark.parametrize("rounds,kinds,message", [
    (0, None, "--rounds must be at least 1"),
    (3, ("link", "meteor"), "unknown fault kind"),
])
def test_a_bad_campaign_is_refused_by_name_and_starts_nothing(tmp_path, rounds, kinds, message):
    d = tmp_path / "lab"
    with pytest.raises(LabError, match=message):
        run_campaign(str(d), rounds, kinds=kinds)
    assert not d.exists()


def test_a_power_cut_asked_for_where_it_cannot_be_played_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(campaign.os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="power cuts cannot be played here: power-cut disks need root"):
        run_campaign(str(tmp_path / "lab"), 1, kinds=("power",))
    assert not (tmp_path / "lab").exists()


def test_a_power_cut_makes_unknown_only_the_unflushed_writes_acknowledged_alone_there():
    """The 30-round power campaign (seed 7) counted as stale reads a write sent without FUA,
    acknowledged by primary A while it went on alone, and lost with A's power 80 ms later, as a
    disk's volatile cache loses it. Such a write's outcome is unknown; one acknowledged while A
    mirrored (on both arrays), one with FUA, or one A had resynced before the cut stays checked."""
    from syncd.lab.campaign import writes_a_power_cut_may_take
    from syncd.lab.history import Event, Op, Outcome

    s = 1_000_000_000
    nodes = [(0, "A", "node A ready: nbd [...]"), (1 * s, "A", "group rcg1: in sync"),
             (10 * s, "A", "group rcg1: peer lost (replication link down); waiting"),
             (11 * s, "A", "group rcg1: peer fenced off; going on alone, tracking written regions (witness agreed)"),
             (20 * s, "A", "group rcg1: peer back; resynchronizing"), (21 * s, "A", "group rcg1: in sync"),
             (30 * s, "A", "group rcg1: peer fenced off; going on alone, tracking written regions"),
             (0, "B", "node B ready: nbd [...]"), (2 * s, "B", "group rcg1: witness: B was not in sync")]

    def w(done: float, outcome: Outcome = Outcome.OK) -> Event:
        return Event(1, "A", Op.WRITE, 1, int(done * 10), int(done * s) - 1000, int(done * s), outcome)

    events = [w(5), w(12), w(12.5), w(13), w(22), w(31), w(32, Outcome.ERROR),
              Event(2, "A", Op.READ, 1, 0, 12 * s, 12 * s + 5, Outcome.OK)]
    fua = {3}  # the write done at 13 s had FUA
    assert writes_a_power_cut_may_take(events, fua, nodes, []) == []
    # Cut during the first alone stretch: its unflushed writes (12 s, 12.5 s) only.
    assert writes_a_power_cut_may_take(events, fua, nodes, [(15 * s, "A")]) == [1, 2]
    # Cut after A was in sync again: those are on B; the second stretch's (31 s) is not.
    assert writes_a_power_cut_may_take(events, fua, nodes, [(25 * s, "A")]) == []
    assert writes_a_power_cut_may_take(events, fua, nodes, [(40 * s, "A")]) == [5]
    # A power cut at the other site takes nothing A acknowledged.
    assert writes_a_power_cut_may_take(events, fua, nodes, [(15 * s, "B")]) == []
