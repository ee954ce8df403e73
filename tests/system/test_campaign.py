"""The campaign (``syncd lab campaign``) in CI's budget: a few rounds of random fault sequences
(link cut and heal, isolation of either site, primary and secondary kill -9 and restart, witness
loss, flapping, switchover) under reads and writes recorded at both sites, directly and through
the host shims; the history checker must find no violation and the replicas must be identical.

It runs once with each witness backend: the built-in witness process, and the witness kept in a
three-member etcd cluster (whose members the witness faults kill and cut off).

SYNCD_CAMPAIGN_ROUNDS sets the rounds (default 5), SYNCD_CAMPAIGN_SEED the sequence (default 3).
By hand, longer: ``syncd lab campaign --rounds 50 [--witness etcd]``.
"""

from __future__ import annotations

import os

import pytest

from syncd.lab.campaign import available_kinds, print_campaign, run_campaign
from syncd.lab.history import Kind

pytestmark = pytest.mark.system


@pytest.mark.parametrize("witness", ["builtin", "etcd"])
def test_random_fault_sequences_keep_every_promise_the_checker_knows(tmp_path, witness):
    rounds = int(os.environ.get("SYNCD_CAMPAIGN_ROUNDS", "5"))
    seed = int(os.environ.get("SYNCD_CAMPAIGN_SEED", "3"))
    res = run_campaign(str(tmp_path / "lab"), rounds, seed, witness=witness)
    print_campaign(res)
    r = res.report
    assert r is not None, res.problems
    assert sum(n for k, n in res.faults.items() if "not played" not in k) >= rounds, res.faults
    # Every kind is drawn once before any repeats: four rounds play (nearly) all of them.
    assert set(k for k in res.faults if "not played" not in k) <= set(available_kinds())
    for site in ("A", "B", "A/shim", "B/shim"):
        assert r.per_site[site]["reads"] > 100 and r.per_site[site]["writes_ok"] > 50, r.per_site
    assert res.problems == []
    assert {k: r.violations[k] for k in Kind} == {k: 0 for k in Kind}, "\n".join(r.lines())
