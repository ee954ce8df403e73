"""The seed's rules on Active Sync groups (issue 12, item 10): auto_failover and path_management
cannot be turned off, at creation or later; the refusal quotes the seed, exits "refused" in
both output modes, and changes nothing on either array."""

from __future__ import annotations

import json

import pytest

from syncd.ctl import EXIT, call

from .rig import syncctl

pytestmark = pytest.mark.system
REASON = "set for an Active Sync group by default and cannot be modified"


@pytest.fixture(scope="module")
def lab(small_lab):
    return small_lab


ctl = syncctl


def snapshot(lab) -> dict:
    """What a refusal must not change: every group's role, epoch and policies on both arrays,
    as they answer and as their metadata holds them."""
    out = {}
    for s in ("A", "B"):
        groups = call(lab["nodes"][s]["admin_socket"], "showrcopy", {})["groups"]
        with open(f"{lab['dir']}/{s}/data/state.json") as f:
            meta = json.load(f)
        out[s] = ({g["name"]: (g["role"], g["epoch"], g["policies"]) for g in groups},
                  {n: (g["role"], g["epoch"], g["policies"]) for n, g in meta["groups"].items()})
    return out


@pytest.mark.parametrize("args", [
    ["setrcopygroup", "pol", "no_auto_failover", "rcg1"],
    ["setrcopygroup", "pol", "no_path_management", "rcg1"],
    ["setrcopygroup", "pol", "no_auto_recover,no_auto_failover", "rcg1"],  # the allowed part is not applied
    ["creatercopygroup", "rcg2", "B", "-pol", "no_path_management"],
    ["creatercopygroup", "rcg2", "B", "-pol", "auto_recover,no_auto_failover,no_path_management"],
])
def test_fixed_policies_cannot_be_turned_off(lab, args):
    sock = lab["nodes"]["A"]["admin_socket"]
    before = snapshot(lab)
    plain = ctl("--socket", sock, *args)
    js = ctl("--socket", sock, *args, "--json")
    assert plain.returncode == js.returncode == EXIT["refused"], (plain, js)
    said = " ".join(plain.stderr.split())  # wrapped to the terminal's width
    assert REASON in said and "cannot be turned off" in said
    err = json.loads(js.stdout)
    assert err["code"] == "refused" and REASON in err["error"]
    assert snapshot(lab) == before
    assert all(set(groups[0]) == {"rcg1"} for groups in before.values())


def test_fixed_policies_may_be_named_on_and_others_still_change(lab):
    sock = lab["nodes"]["A"]["admin_socket"]
    assert ctl("--socket", sock, "setrcopygroup", "pol", "auto_failover,path_management,no_auto_recover",
               "rcg1").returncode == EXIT["ok"]
    pol = call(sock, "showrcopy", {})["groups"][0]["policies"]
    assert pol["auto_failover"] is True and pol["path_management"] is True and pol["auto_recover"] is False
    assert ctl("--socket", sock, "setrcopygroup", "pol", "auto_recover", "rcg1").returncode == EXIT["ok"]
