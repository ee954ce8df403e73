"""Resync is resumable (issue 5, item 3): a resync interrupted half-way (the link cut again, the
secondary or the primary killed) goes on from where it was when the arrays meet again; it does
not start over. Bytes sent in all stay those that were dirty (plus the few regions in flight at
the interruption); a primary killed mid-resync compares the regions it had not yet confirmed
and sends only those that still differ."""

from __future__ import annotations

import time

import pytest
import trio

from syncd.ctl import call
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_down, lab_kill, lab_start, lab_up, load_lab
from syncd.nbd.client import open_nbd

from .rig import FAST_LINK, assert_replicas_identical

pytestmark = pytest.mark.system
MiB = 1 << 20
SIZE = 64 * MiB
DIRTY = 48 * MiB
SLACK = 4 * 256 * 1024  # the copy window in flight when the resync was interrupted


def showrcopy(lab, site):
    lab = load_lab(lab["dir"])
    return call(lab["nodes"][site]["admin_socket"], "showrcopy", {"group": "rcg1"}, timeout=5)


def vol(lab, site):
    return showrcopy(lab, site)["groups"][0]["volumes"][0]


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - a node restarting
            pass
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pattern(i: int) -> bytes:
    return bytes([(i % 250) + 1]) * MiB


@pytest.mark.parametrize("interruption", ["link", "secondary", "primary"])
def test_an_interrupted_resync_goes_on_where_it_stopped(tmp_path, interruption):
    d = str(tmp_path / "lab")
    lab = lab_up(d, size=f"{SIZE >> 20}MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, timeout=60)
    ctl = lab["link"]["control"]
    try:
        wait_for(lambda: showrcopy(lab, "A")["groups"][0]["peer_mode"] == "attached", 15, "in sync")
        proxy_command(ctl, "cut", paths=[0, 1])
        wait_for(lambda: showrcopy(lab, "A")["groups"][0]["peer_mode"] == "detached", 15, "A alone")

        async def write_all():
            async with open_nbd(lab["nodes"]["A"]["volumes"]["vv1"]["uri"]) as c:
                for i in range(DIRTY // MiB):
                    await c.write(i * MiB, pattern(i))
        trio.run(write_all)
        assert vol(lab, "A")["sync_percent"] < 30

        # A slow link (40 ms round trip) so the resync takes seconds; interrupted half-way.
        proxy_command(ctl, "delay", ms=40, paths=[0, 1])
        proxy_command(ctl, "heal", paths=[0, 1])
        wait_for(lambda: 30 <= vol(lab, "A")["resync"]["percent"] <= 70, 30, "resync half-way")
        sent_before = showrcopy(lab, "A")["resync_bytes"]
        if interruption == "link":
            proxy_command(ctl, "cut", paths=[0, 1])
            wait_for(lambda: showrcopy(lab, "A")["groups"][0]["peer_mode"] == "detached", 15, "link loss seen")
            left = vol(lab, "A")["sync_percent"]
            time.sleep(0.5)
            proxy_command(ctl, "heal", paths=[0, 1])
        else:
            site = "B" if interruption == "secondary" else "A"
            lab_kill(d, site)
            time.sleep(0.5)
            lab_start(d, site)
        proxy_command(ctl, "delay", ms=0, paths=[0, 1])
        wait_for(lambda: showrcopy(lab, "A")["groups"][0]["peer_mode"] == "attached", 60, "resync finished")
        r = showrcopy(lab, "A")
        sent = r["resync_bytes"] if interruption == "primary" else r["resync_bytes"] - sent_before
        print(f"\ninterrupted by {interruption}: {sent_before / MiB:.1f} MiB sent before, "
              f"{sent / MiB:.1f} MiB after; A compared {r['compared_bytes'] / MiB:.1f} MiB by digest since it started "
              "(initial sync included)")
        assert DIRTY // 4 <= sent_before <= DIRTY * 3 // 4 + SLACK
        # What was already sent is not sent again: before + after stays within the dirty set.
        assert sent_before + sent <= DIRTY + SLACK + (4 * MiB if interruption == "secondary" else 0), \
            f"resync started over: {sent_before} + {sent} bytes sent for {DIRTY} dirty"
        if interruption == "link":
            assert left > 0
        assert_replicas_identical(lab, "vv1")
        for site in ("A", "B"):
            with open(lab["nodes"][site]["volumes"]["vv1"]["path"], "rb") as f:
                for i in range(DIRTY // MiB):
                    assert f.read(MiB) == pattern(i), f"{site}: MiB {i} is not what A acknowledged"
    finally:
        lab_down(d)
