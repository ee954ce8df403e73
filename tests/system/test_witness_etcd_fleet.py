"""Three array pairs (six node processes, three labs) whose quorum witness is kept in one shared
three-member etcd cluster, each pair's records under a prefix of its own. The primary of one
pair killed: that pair fails over on its own (its secondary takes the next epoch) while the
other two keep their primaries and epochs; then a second pair does the same. The cluster holds
nothing but the three pairs' records, each under its own prefix, and the pairs left alone have
records that no decision touched."""

from __future__ import annotations

import base64
import json

import pytest

from syncd.ctl import CtlError
from syncd.lab import etcd as lab_etcd
from syncd.lab.rig import lab_down, lab_kill, lab_up

from .rig import FAST_LINK, WITNESS, require_tool, show, wait_for

pytestmark = pytest.mark.system

PAIRS = (1, 2, 3)


@pytest.fixture
def fleet(tmp_path):
    require_tool("etcd")
    info = lab_etcd.start_cluster(str(tmp_path))
    labs: dict[int, dict] = {}
    try:
        timing = {k: WITNESS[k] for k in ("interval", "owner_lease", "grace")}
        for k in PAIRS:  # one group each, under a prefix of its own; the node names are the same
            witness = dict(timing, backend="etcd", endpoints=info["endpoints"], prefix=f"/syncd/pair{k}")
            labs[k] = lab_up(str(tmp_path / f"pair{k}"), size="4MiB", nvolumes=1, npaths=1, group=f"rcg{k}",
                             link_opts=FAST_LINK, relay=False, timeout=60, witness=witness)
        yield info, labs
    finally:
        for k in labs:
            lab_down(labs[k]["dir"])
        lab_etcd.stop_cluster(str(tmp_path))


def all_keys(info: dict) -> dict[str, dict]:
    """Every key in the cluster (linearizable read at any member that answers): its record."""
    whole = base64.b64encode(b"\0").decode()  # key "\0" to range end "\0": the whole keyspace
    for endpoint in info["endpoints"]:
        try:
            ans = lab_etcd.post(endpoint, "/v3/kv/range", {"key": whole, "range_end": whole})
        except OSError:
            continue
        return {base64.b64decode(kv["key"]).decode(): kv for kv in ans.get("kvs", [])}
    raise AssertionError("no etcd member answered")


def record(info: dict, k: int) -> dict:
    kv = all_keys(info)[f"/syncd/pair{k}/groups/rcg{k}"]
    return dict(json.loads(base64.b64decode(kv["value"])), create_revision=kv["create_revision"])


def state(lab: dict) -> dict[str, tuple[str, int]]:
    """(role, epoch) of the lab's group at each running node."""
    out = {}
    for site in ("A", "B"):
        try:
            g = show(lab, site)["groups"][0]
        except (CtlError, OSError):
            continue  # killed
        out[site] = (g["role"], g["epoch"])
    return out


def decided(rec: dict) -> tuple:
    """What a decision on a group changes in its record."""
    return rec["members"], rec["owner"], rec["epoch"], rec["failover_disabled"], rec["last_decision"], \
        rec["create_revision"]


def test_three_pairs_share_one_etcd_cluster_and_fail_over_independently(fleet):
    info, labs = fleet
    for k in PAIRS:
        wait_for(lambda k=k: (r := record(info, k))["owner"] == "A" and r["secondary_in_sync"],
                 what=f"the witness knows pair {k}'s secondary in sync")
        assert state(labs[k]) == {"A": ("primary", 1), "B": ("secondary", 1)}, k
    before = {k: record(info, k) for k in PAIRS}

    lab_kill(labs[1]["dir"], "A")
    wait_for(lambda: state(labs[1]).get("B") == ("primary", 2), what="pair 1 fails over to B at epoch 2")
    for k in (2, 3):
        assert state(labs[k]) == {"A": ("primary", 1), "B": ("secondary", 1)}, k
        assert decided(record(info, k)) == decided(before[k]), k
    assert (record(info, 1)["owner"], record(info, 1)["epoch"]) == ("B", 2)

    wait_for(lambda: record(info, 2)["secondary_in_sync"], what="pair 2 still in sync")
    lab_kill(labs[2]["dir"], "A")
    wait_for(lambda: state(labs[2]).get("B") == ("primary", 2), what="pair 2 fails over to B at epoch 2")
    assert state(labs[1]) == {"B": ("primary", 2)}
    assert state(labs[3]) == {"A": ("primary", 1), "B": ("secondary", 1)}
    assert decided(record(info, 3)) == decided(before[3])
    assert [(record(info, k)["owner"], record(info, k)["epoch"]) for k in PAIRS] == [("B", 2), ("B", 2), ("A", 1)]

    # Each pair's records are under its own prefix, and nothing else is in the cluster: its
    # group's record and the keys of the arrays whose etcd lease lives (a killed primary's went
    # with its lease).
    keys = sorted(all_keys(info))
    assert keys == sorted([f"/syncd/pair{k}/groups/rcg{k}" for k in PAIRS]
                          + [f"/syncd/pair{k}/alive/{s}" for k, s in ((1, "B"), (2, "B"), (3, "A"), (3, "B"))]), keys
