"""Labs built differently: loop devices as disks, a peer volume of the wrong size."""

from __future__ import annotations

import os
import subprocess

import pytest

from syncd.ctl import CtlError, call
from syncd.lab.rig import lab_down, lab_up

from .rig import FAST_LINK, assert_replicas_identical, require_root, require_tool, run

pytestmark = pytest.mark.system


@pytest.fixture
def loopdevs(tmp_path):
    require_root()
    require_tool("losetup")
    devs = []
    try:
        for i in range(2):
            img = tmp_path / f"disk{i}.img"
            with open(img, "wb") as f:
                f.truncate(16 << 20)
            dev = run("losetup", "--find", "--show", str(img)).stdout.strip()
            devs.append(dev)
        yield devs
    finally:
        for d in devs:
            subprocess.run(["losetup", "-d", d], check=False)


def test_loop_devices_as_backing_store(tmp_path, loopdevs):
    require_tool("qemu-io", "qemu-img")
    d = tmp_path / "lab"
    lab = lab_up(str(d), volume_paths={"A": [loopdevs[0]], "B": [loopdevs[1]]}, npaths=1,
                 link_opts=FAST_LINK, timeout=60)
    try:
        ua = lab["nodes"]["A"]["volumes"]["vv1"]["uri"]
        ub = lab["nodes"]["B"]["volumes"]["vv1"]["uri"]
        info = __import__("json").loads(run("nbdinfo", "--json", ua).stdout)
        assert info["exports"][0]["export-size"] == 16 << 20
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", "-c", "write -z 4M 1M", ua)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x22 2M 2M", "-c", "discard 6M 64k", ub)
        run("qemu-io", "-f", "raw", "-c", "read -P 0x22 2M 2M", "-c", "read -P 0 4M 1M", ua)
    finally:
        lab_down(str(d))
    assert_replicas_identical(lab, "vv1")


def test_admitting_a_volume_of_another_size_is_refused(tmp_path):
    d = tmp_path / "lab"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = {s: [tmp_path / f"{s.lower()}/vv1.img", tmp_path / f"{s.lower()}/vv2.img"] for s in ("A", "B")}
    sizes = {"A": [8 << 20, 8 << 20], "B": [8 << 20, 4 << 20]}
    for site in paths:
        for p, s in zip(paths[site], sizes[site], strict=True):
            with open(p, "wb") as f:
                f.truncate(s)
    with pytest.raises(CtlError, match=r"vv2 on B is 4194304 bytes but vv2 is 8388608 bytes"):
        lab_up(str(d), volume_paths={k: [str(p) for p in v] for k, v in paths.items()}, link_opts=FAST_LINK)
    # The failed lab was stopped again; what both nodes recorded: vv1 was admitted before, vv2
    # was refused on both sides and is in no group.
    import json

    for site in ("A", "B"):
        st = json.loads((d / site / "data" / "state.json").read_text())
        assert [m["local"] for m in st["groups"]["rcg1"]["members"]] == ["vv1"], st["groups"]


def test_initial_sync_sends_only_the_regions_that_differ(tmp_path):
    """Admitting volumes compares per-region xxh3 digests: identical regions are not sent."""
    region = 256 << 10
    vols = {}
    for site in ("A", "B"):
        (tmp_path / site).mkdir()
        p = tmp_path / site / "vv1.img"
        with open(p, "wb") as f:
            f.truncate(16 << 20)
        vols[site] = [str(p)]
    common = os.urandom(region)
    for site in ("A", "B"):  # both replicas already hold the same data here
        with open(vols[site][0], "r+b") as f:
            f.seek(10 * region)
            f.write(common)
    with open(vols["A"][0], "r+b") as f:  # three regions differ
        for r in (0, 5, 63):
            f.seek(r * region + 100)
            f.write(b"only on A")
    d = tmp_path / "lab"
    lab = lab_up(str(d), volume_paths=vols, npaths=1, link_opts=FAST_LINK, timeout=60)
    try:
        a = call(lab["nodes"]["A"]["admin_socket"], "showrcopy")
        assert a["groups"][0]["volumes"][0]["sync_status"] == "synced"
        assert a["resync_bytes"] == 3 * region
    finally:
        lab_down(str(d))
    assert_replicas_identical(lab, "vv1")


def test_round_trip_above_the_synchronous_limit_is_warned(tmp_path):
    import time

    from syncd.lab.relay import proxy_command

    d = tmp_path / "lab"
    lab = lab_up(str(d), size="4MiB", nvolumes=1, npaths=1, link_opts=dict(FAST_LINK, max_rtt_ms=5), timeout=60)
    try:
        # Without added delay the warning clears (a loaded machine can hold it up for a while).
        deadline = time.monotonic() + 60
        while call(lab["nodes"]["A"]["admin_socket"], "showrcopy")["link"]["rtt_warning"]:
            assert time.monotonic() < deadline, "loopback round trip stays above 5 ms"
            time.sleep(0.2)
        proxy_command(lab["link"]["control"], "delay", ms=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            a = call(lab["nodes"]["A"]["admin_socket"], "showrcopy")
            if a["link"]["rtt_warning"] and a["link"]["rtt_ms"] > 15:
                break
            time.sleep(0.2)
        assert a["link"]["rtt_warning"] and a["link"]["rtt_ms"] > 15
        out = run(".venv/bin/syncctl", "--lab", lab["dir"], "--node", "A", "showrcopy").stdout
        assert "WARNING" in out and "exceeds 5" in out
    finally:
        lab_down(str(d))


def test_link_with_a_wrong_key_never_comes_up(tmp_path):
    """Paths authenticate with the shared key: a node with another key is refused."""
    import time

    from syncd.lab.rig import lab_kill, lab_start

    d = tmp_path / "lab"
    lab = lab_up(str(d), size="4MiB", nvolumes=1, npaths=1,
                 link_opts=dict(FAST_LINK, key="the-right-shared-key"), timeout=60)
    try:
        assert call(lab["nodes"]["A"]["admin_socket"], "showrcopy")["link"]["state"] == "up"
        lab_kill(str(d), "B")
        cfg = d / "B" / "node.toml"
        cfg.write_text(cfg.read_text().replace("the-right-shared-key", "some-other-key-entirely"))
        lab_start(str(d), "B")
        errors = set()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # the link never comes up, and A says why
            a = call(lab["nodes"]["A"]["admin_socket"], "showrcopy")
            assert a["link"]["state"] == "down"
            errors |= {p["last_error"] for p in a["link"]["paths"]}
            time.sleep(0.05)
        # A (the dialer) proves first; B, with another key, finds the proof wrong and refuses it.
        assert any("refused this end's authentication" in e for e in errors), errors
        log_b = (d / "B.log").read_text()
        assert "refused a connection from 127.0.0.1" in log_b and "failed to prove the shared key" in log_b
        assert a["groups"][0]["peer_mode"] == "detached"
    finally:
        lab_down(str(d))


def test_a_lab_that_cannot_come_up_leaves_nothing_running(tmp_path):
    """A node that cannot start (its admin socket path is longer than a unix socket allows):
    lab up fails naming the problem, and the witness, relay and other node it had started are
    stopped again."""
    from syncd.lab.rig import LabError

    deep = tmp_path / ("d" * 60) / ("e" * 40)
    with pytest.raises(LabError, match="path too long"):
        lab_up(str(deep), size="4MiB", nvolumes=1, npaths=1, link_opts=FAST_LINK,
               witness={"interval": 0.2, "owner_lease": 1.0, "grace": 2.0}, timeout=20)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(deep) not in ps, [line for line in ps.splitlines() if str(deep) in line]


def test_waitsync_shows_progress_until_the_initial_sync_ends(tmp_path):
    """syncctl waitsync (and startrcopygroup --wait) follow the sync with a progress bar per
    volume, here on a terminal (script(1) gives syncctl a pseudo-terminal)."""
    import sys

    require_tool("script")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    with open(a, "wb") as f:  # data that differs from B's (zeros): the initial sync has work to do
        for _ in range(16):
            f.write(os.urandom(16 << 20))
    with open(b, "wb") as f:
        f.truncate(256 << 20)
    lab = lab_up(str(tmp_path / "lab"), nvolumes=1, npaths=1, link_opts=FAST_LINK, wait=False,
                 volume_paths={"A": [str(a)], "B": [str(b)]})
    try:
        cmd = f"{sys.executable} -m syncd.ctl --socket {lab['nodes']['A']['admin_socket']} waitsync rcg1 --timeout 120"
        out = run("script", "-qec", cmd, "/dev/null", timeout=180).stdout
        assert "rcg1/vv1" in out and "%" in out and "waitsync: ok" in out
        g = call(lab["nodes"]["A"]["admin_socket"], "showrcopy", {"group": "rcg1"})["groups"][0]
        assert g["volumes"][0]["sync_status"] == "synced"
        assert_replicas_identical(lab, "vv1")
    finally:
        lab_down(lab["dir"])
