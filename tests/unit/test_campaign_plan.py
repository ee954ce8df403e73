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
