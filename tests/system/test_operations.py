"""Planned and operator role changes: switchover (no host I/O error), restore, reverse,
failover, recover, override, and their refusals."""

from __future__ import annotations

import time
import tomllib

import pytest
import trio

from syncd.ctl import CtlError
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_kill, lab_start
from syncd.lab.workload import History, check_file, run_writer

from .rig import assert_replicas_identical
from .test_failover import WITNESS, group, uri, wait_for

pytestmark = pytest.mark.system


def ctl(lab, site, cmd, **args):
    from syncd.ctl import call

    return call(lab["nodes"][site]["admin_socket"], cmd, args, timeout=60)


def _workload_during(lab, action, duration=4.0):
    """Verifying writers at both sites (non-uniform hosts) while ``action`` runs after 1 s."""
    hs = {"A": History(), "B": History()}
    out = {}

    async def main():
        async with trio.open_nursery() as n:
            for i, site in enumerate(("A", "B")):
                lo = i * 1024
                n.start_soon(lambda s=site, lo=lo, w=i + 1: run_writer(
                    uri(lab, s), hs[s], writer=w, blocks=range(lo, lo + 1024), duration=duration, qd=4))
            await trio.sleep(1.0)
            t0 = time.monotonic()
            out["result"] = await trio.to_thread.run_sync(action)
            out["took"] = time.monotonic() - t0

    trio.run(main)
    return hs, out


def _check_both(lab, hs):
    for site in ("A", "B"):
        for w, h in ((1, hs["A"]), (2, hs["B"])):
            assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], h, writer=w) == [], \
                f"replica {site} lost writes of writer {w}"
    assert_replicas_identical(lab, "vv1")


def test_switchover_under_load_swaps_roles_without_host_errors_then_restore(wlab):
    lab = wlab
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
    hs, out = _workload_during(lab, lambda: ctl(lab, "A", "setrcopygroup", action="switchover", group="rcg1"))
    r = out["result"]
    assert r["role"] == "secondary" and r["epoch"] == 2 and r["primary"] == "B"
    for site in ("A", "B"):
        assert hs[site].errors == [], f"host at {site} saw I/O errors: {hs[site].errors[:3]}"
        assert hs[site].acked_count() > 50
    ga, gb = group(lab, "A"), group(lab, "B")
    assert (ga["role"], gb["role"]) == ("secondary", "primary")
    assert (ga["role_label"], gb["role_label"]) == ("secondary-rev", "primary-rev")
    assert ga["epoch"] == gb["epoch"] == 2
    assert gb["peer_mode"] == "attached" and ga["serving"] and gb["serving"]
    _check_both(lab, hs)
    pauses = {s: round(hs[s].longest_pause(), 3) for s in hs}
    print(f"switchover took {out['took']:.3f}s ({r['duration_ms']} ms in the node); longest host pauses {pauses}")

    # Refusals while reversed.
    with pytest.raises(CtlError, match="operation only on primary side"):
        ctl(lab, "A", "setrcopygroup", action="switchover", group="rcg1")
    with pytest.raises(CtlError, match="already synced"):
        ctl(lab, "B", "setrcopygroup", action="recover", group="rcg1")
    with pytest.raises(CtlError, match="is reachable"):
        ctl(lab, "A", "setrcopygroup", action="failover", group="rcg1")
    with pytest.raises(CtlError, match="not in failsafe"):
        ctl(lab, "B", "setrcopygroup", action="override", group="rcg1")

    # restore: back to the natural direction, again without host errors.
    hs, out = _workload_during(lab, lambda: ctl(lab, "B", "setrcopygroup", action="restore", group="rcg1"))
    assert hs["A"].errors == [] and hs["B"].errors == []
    ga = group(lab, "A")
    assert ga["role_label"] == "primary" and ga["epoch"] == 3
    with pytest.raises(CtlError, match="not reversed"):
        ctl(lab, "A", "setrcopygroup", action="restore", group="rcg1")
    with pytest.raises(CtlError, match="natural direction already"):
        ctl(lab, "A", "setrcopygroup", action="reverse", group="rcg1")
    _check_both(lab, hs)


def test_reverse_makes_the_failed_over_direction_natural(wlab):
    lab = wlab
    ctl(lab, "A", "setrcopygroup", action="switchover", group="rcg1")
    assert group(lab, "B")["role_label"] == "primary-rev"
    ctl(lab, "B", "setrcopygroup", action="reverse", group="rcg1")
    assert group(lab, "B")["role_label"] == "primary"
    assert group(lab, "A")["role_label"] == "secondary"


def test_switchover_refused_when_not_synced_or_stopped(wlab):
    lab = wlab
    proxy_command(lab["link"]["control"], "cut", paths=[0, 1])  # the link only, not A's witness
    wait_for(lambda: group(lab, "A")["peer_mode"] == "detached", timeout=15, what="A alone")
    with pytest.raises(CtlError, match="not ready"):
        ctl(lab, "A", "setrcopygroup", action="switchover", group="rcg1")
    with pytest.raises(CtlError, match="not ready"):
        ctl(lab, "A", "setrcopygroup", action="recover", group="rcg1")
    proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", timeout=30, what="resync")
    ctl(lab, "A", "stoprcopygroup", group="rcg1")
    with pytest.raises(CtlError, match="not started"):
        ctl(lab, "A", "setrcopygroup", action="switchover", group="rcg1")
    with pytest.raises(CtlError, match="takes no policies"):
        ctl(lab, "A", "setrcopygroup", action="switchover", group="rcg1", policies="auto_recover")


def test_automatic_failover_then_recover_by_the_operator(wlab):
    """auto_failover is always on (the seed): B takes the group through the witness when A
    dies, and the operator's failover is for when the peer is unreachable (refused while it is
    reachable, nothing changes). Without auto_recover, the returning A waits for the operator's
    recover."""
    lab = wlab
    ctl(lab, "A", "setrcopygroup", action="pol", group="rcg1", policies="no_auto_recover")
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
    with pytest.raises(CtlError, match="is reachable"):
        ctl(lab, "B", "setrcopygroup", action="failover", group="rcg1")
    gb = group(lab, "B")
    assert (gb["role"], gb["epoch"], gb["serving"]) == ("secondary", 1, True)
    lab_kill(lab["dir"], "A")
    wait_for(lambda: group(lab, "B")["role"] == "primary" and group(lab, "B")["serving"], timeout=20,
             what="B takes over through the witness")
    assert group(lab, "B")["epoch"] == 2
    lab_start(lab["dir"], "A")
    wait_for(lambda: group(lab, "A")["role"] == "secondary", timeout=20, what="A rejoins as secondary")
    time.sleep(1.5)
    assert group(lab, "B")["peer_mode"] == "detached"  # no auto_recover: waits for the operator
    ctl(lab, "B", "setrcopygroup", action="recover", group="rcg1")
    wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", timeout=30, what="recovered")
    assert_replicas_identical(lab, "vv1")


def test_an_isolated_primary_steps_down_once_the_witness_says_it_gave_the_group_away(wlab):
    lab = wlab
    wait_for(lambda: group(lab, "A")["alua"] == "active/optimized", what="ready")
    # Isolate A (link and witness): B takes over, A goes failsafe.
    proxy_command(lab["link"]["control"], "cut", paths=[0, 1, lab["link"]["witness_relay"]])
    wait_for(lambda: group(lab, "B")["role"] == "primary", timeout=20, what="B takes over")
    wait_for(lambda: group(lab, "A")["status"] == "failsafe", timeout=20, what="A failsafe")
    # A reaches the witness again (only the replication link stays cut): the witness's record says
    # B owns epoch 2, so A becomes B's secondary at epoch 2 and serves nothing; an override that
    # would make it primary again is refused.
    proxy_command(lab["link"]["control"], "heal", paths=[lab["link"]["witness_relay"]])
    wait_for(lambda: group(lab, "A")["role"] == "secondary", timeout=10, what="A steps down")
    # (A, now a secondary cut from its primary, asks the witness for the group and is refused.)
    wait_for(lambda: group(lab, "A")["alua"] == "unavailable", timeout=10, what="A unavailable")
    ga = group(lab, "A")
    assert ga["epoch"] == 2 and not ga["serving"]
    assert any("the witness gave the group to B at epoch 2" in e["msg"] for e in ga["events"])
    with pytest.raises(CtlError, match="witness is reachable"):
        ctl(lab, "A", "setrcopygroup", action="override", group="rcg1")
    assert group(lab, "A")["role"] == "secondary"
    # The link returns: A is resynced from B, nothing was lost.
    proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
    wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", timeout=30, what="A resynced from B")
    assert_replicas_identical(lab, "vv1")


def test_setrcopytarget_witness_remove_create_check_and_failover_still_works(wlab):
    lab = wlab
    addr = f"127.0.0.1:{lab['witness']['port']}"
    with open(lab["witness"]["config"], "rb") as f:
        key = tomllib.load(f)["witness"]["key"]  # made for this lab
    timing = {"interval": WITNESS["interval"], "owner_lease": WITNESS["owner_lease"], "grace": WITNESS["grace"]}
    for site in ("A", "B"):
        assert ctl(lab, site, "setrcopytarget", what="witness", action="check")["address"]
        with pytest.raises(CtlError, match="already configured"):
            ctl(lab, site, "setrcopytarget", what="witness", action="create", address=addr, key=key)
        ctl(lab, site, "setrcopytarget", what="witness", action="remove")
        with pytest.raises(CtlError, match="no quorum witness"):
            ctl(lab, site, "setrcopytarget", what="witness", action="check")
    for bad, msg in (({"address": addr, "key": "short"}, "at least 16 bytes"),
                     ({"address": "nowhere", "key": key}, "witness.address"),
                     ({"address": addr, "key": key, "interval": 5, "grace": 1}, "grace")):
        with pytest.raises(CtlError, match=msg):
            ctl(lab, "A", "setrcopytarget", what="witness", action="create", **bad)
    assert group(lab, "A")["serving"]
    for site in ("A", "B"):
        ctl(lab, site, "setrcopytarget", what="witness", action="create", address=addr, key=key, **timing)
    wait_for(lambda: all(ctl(lab, s, "showrcopy")["witness"]["reachable"] for s in ("A", "B")),
             what="witness reachable")
    time.sleep(1.0)
    lab_kill(lab["dir"], "A")
    wait_for(lambda: group(lab, "B")["role"] == "primary", timeout=20, what="B takes over via the new witness")
    # The setting survives a restart (it overrides the config's [witness]).
    lab_start(lab["dir"], "A")
    assert ctl(lab, "A", "setrcopytarget", what="witness", action="check")["address"] == addr


def test_lab_fail_and_heal_by_hand(wlab):
    """The faults a user plays with `syncd lab fail/heal` (the matrix runs the same in netns)."""
    import subprocess
    import sys

    from syncd.lab.rig import lab_fail, lab_heal

    lab = wlab
    wait_for(lambda: group(lab, "A")["peer_mode"] == "attached", what="attached")
    time.sleep(1.0)
    out = subprocess.run([sys.executable, "-m", "syncd", "lab", "fail", "witness", "--dir", lab["dir"]],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "witness stopped" in out.stdout, out.stderr
    time.sleep(1.0)
    assert group(lab, "A")["serving"] and group(lab, "B")["serving"]  # nothing changes
    assert "witness started" in lab_heal(lab["dir"], "witness")
    wait_for(lambda: ctl(lab, "B", "showrcopy")["witness"]["reachable"], what="witness back")
    time.sleep(1.0)
    assert "powered off" in lab_fail(lab["dir"], "primary")  # finds the primary itself: A
    wait_for(lambda: group(lab, "B")["role"] == "primary", timeout=20, what="failover")
    assert "array A started" in lab_heal(lab["dir"], "primary")
    wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", timeout=30, what="A resynced")
    out = subprocess.run([sys.executable, "-m", "syncd", "lab", "fail", "disk", "A", "--dir", lab["dir"]],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "--loop" in out.stderr  # file-backed lab: said clearly
    with pytest.raises(Exception, match="needs a SITE"):
        lab_fail(lab["dir"], "isolate")
