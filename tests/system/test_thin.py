"""Thin volumes with real clients: base:allocation shows each replica's holes (nbdinfo, qemu-img,
nbdcopy), trims and resync keep both replicas' allocation alike, fast zero (libnbd) is done on
both replicas or refused ENOTSUP with nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from syncd.host import host_status
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_down, lab_up
from syncd.nbd.extents import scan

from .rig import FAST_LINK, assert_replicas_identical, file_digest, require_root, require_tool, run, show, wait_for

pytestmark = pytest.mark.system
MiB = 1 << 20
HOLE, DATA = 3, 0


def uri(lab, site, vol="vv1"):
    return lab["nodes"][site]["volumes"][vol]["uri"]


def path(lab, site, vol="vv1"):
    return lab["nodes"][site]["volumes"][vol]["path"]


def nbd_map(u: str) -> list[tuple[int, int, int]]:
    """nbdinfo --map: (offset, length, type) of every extent."""
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(run("nbdinfo", "--map", "--json", u).stdout)]


def seek_map(p: str) -> list[tuple[int, int]]:
    fd = os.open(p, os.O_RDONLY)
    try:
        return scan(fd, 0, os.fstat(fd).st_size, 1 << 20)
    finally:
        os.close(fd)


def as_map(ext: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    for n, f in ext:
        out.append((pos, n, f))
        pos += n
    return out


def nbdsh(u: str, script: str) -> str:
    """A script for libnbd's Python bindings (system python3: python3-libnbd), ``h`` connected."""
    return run("/usr/bin/python3", "-m", "nbd", "-u", u, "-c", script).stdout.strip()


FAST_ZERO = """
try:
    h.zero({length}, {offset}, flags=nbd.CMD_FLAG_FAST_ZERO{extra})
    print("ok")
except nbd.Error as e:
    print("errno", e.errno)
"""


def fast_zero(u: str, offset: int, length: int, no_hole: bool = False) -> str:
    return nbdsh(u, FAST_ZERO.format(offset=offset, length=length, extra=" | nbd.CMD_FLAG_NO_HOLE" if no_hole else ""))


def allocated(p: str) -> int:
    """Bytes of the file's allocated blocks."""
    return os.stat(p).st_blocks * 512


def shim_uri(lab, site: str, vol: str = "vv1") -> str:
    """The volume on the unix socket of the host shim at ``site`` (it reaches both arrays)."""
    return f"nbd+unix:///{vol}?socket={lab['hosts'][site]['socket']}"


def synced(lab) -> bool:
    g = show(lab, "A")["groups"][0]
    return g["peer_mode"] == "attached" and all(v["sync_status"] == "synced" for v in g["volumes"])


def test_both_sites_show_the_holes_of_a_thin_volume_after_writes_trims_and_fast_zeroes(lab, tmp_path):
    require_tool("nbdinfo", "qemu-io", "qemu-img", "nbdcopy")
    size = 32 * MiB
    for site in ("A", "B"):  # fresh: all hole, read as zeroes
        assert nbd_map(uri(lab, site)) == [(0, size, HOLE)]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 4M", "-c", "write -P 0x5b 20M 1M", uri(lab, "B"))
    run("qemu-io", "-f", "raw", "-c", "discard 5M 1M", uri(lab, "A"))  # a trim at the primary
    expected = [(0, 4 * MiB, HOLE), (4 * MiB, MiB, DATA), (5 * MiB, MiB, HOLE), (6 * MiB, 2 * MiB, DATA),
                (8 * MiB, 12 * MiB, HOLE), (20 * MiB, MiB, DATA), (21 * MiB, 11 * MiB, HOLE)]
    for site in ("A", "B"):
        assert nbd_map(uri(lab, site)) == expected, site
        assert as_map(seek_map(path(lab, site))) == expected, site

    # Fast zero (libnbd, NBD_CMD_FLAG_FAST_ZERO) at each site: done on both replicas, as holes.
    assert "can_fast_zero: true" in run("nbdinfo", uri(lab, "A")).stdout
    assert fast_zero(uri(lab, "A"), 6 * MiB, MiB) == "ok"
    assert fast_zero(uri(lab, "B"), 20 * MiB, MiB) == "ok"  # forwarded by the secondary
    expected = [(0, 4 * MiB, HOLE), (4 * MiB, MiB, DATA), (5 * MiB, 2 * MiB, HOLE), (7 * MiB, MiB, DATA),
                (8 * MiB, 24 * MiB, HOLE)]
    for site in ("A", "B"):
        assert nbd_map(uri(lab, site)) == expected, site
        assert as_map(seek_map(path(lab, site))) == expected, site
    assert_replicas_identical(lab, "vv1")

    # What backup tools see: qemu-img map, and nbdcopy writing a sparse copy.
    qmap = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri(lab, "B")).stdout)
    assert [(e["start"], e["length"], e["data"]) for e in qmap] == [
        (o, n, t == DATA) for o, n, t in expected]
    out = tmp_path / "copy.img"
    run("nbdcopy", uri(lab, "A"), str(out))
    assert file_digest(str(out)) == file_digest(path(lab, "A"))
    assert os.stat(out).st_blocks * 512 <= 2 * MiB + 64 * 1024  # the 2 MiB of data, not 32 MiB


def test_resync_copies_holes_as_holes_and_a_stale_secondary_reports_data(lab):
    require_tool("nbdinfo", "qemu-io")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", uri(lab, "A"))
    proxy_command(lab["link"]["control"], "cut")
    wait_for(lambda: not show(lab, "B")["groups"][0]["serving"], timeout=10, what="B stops serving")
    # B's replica has holes, but may be stale (A goes on alone): it reports data, which is
    # always correct, until it is in sync again.
    assert seek_map(path(lab, "B")) != [(32 * MiB, DATA)]
    assert nbd_map(uri(lab, "B")) == [(0, 32 * MiB, DATA)]
    # At the primary alone: trims (whole regions and parts of them), a write-zeroes that may
    # punch, new data.
    run("qemu-io", "-f", "raw", "-c", "discard 1M 2M", "-c", "write -z -u 5M 512k", "-c", "write -P 0x44 20M 1M",
        "-c", "discard 6M 4k", uri(lab, "A"))
    before = seek_map(path(lab, "A"))
    assert (MiB, 2 * MiB) in [(o, n) for o, n, t in as_map(before) if t == HOLE]
    proxy_command(lab["link"]["control"], "heal")
    wait_for(lambda: synced(lab), timeout=60, what="resync after heal")
    assert_replicas_identical(lab, "vv1")
    assert seek_map(path(lab, "A")) == before
    assert seek_map(path(lab, "B")) == before
    a = show(lab, "A")
    assert 0 < a["resync_hole_bytes"] <= a["resync_bytes"] < 32 * MiB
    # In sync is not yet serving: B says data until it serves the volume again (its lease).
    wait_for(lambda: show(lab, "B")["groups"][0]["serving"], timeout=10, what="B serves again")
    assert nbd_map(uri(lab, "B")) == as_map(before)


def test_fast_zero_is_refused_with_nothing_changed_where_one_replica_cannot_do_it(tmp_path):
    """Array B's volume is on ramfs, which cannot deallocate or zero a range without writing
    (no fallocate): a fast zero is refused ENOTSUP at either site, nothing written on either
    replica; a plain write-zeroes still works."""
    require_root()
    require_tool("qemu-io")
    ram = tmp_path / "ramfs"
    ram.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ram)], check=True)
    d = tmp_path / "lab"
    lab = None
    try:
        imgs = {"A": tmp_path / "A-vv1.img", "B": ram / "vv1.img"}
        for img in imgs.values():
            with open(img, "wb") as f:
                f.truncate(16 * MiB)
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK,
                     volume_paths={s: [str(p)] for s, p in imgs.items()}, topology="uniform", timeout=60)
        wait_for(lambda: synced(lab), timeout=30, what="synced")
        assert show(lab, "B")["volumes"][0]["fast_zero"] == {"punch": False, "no_hole": False}
        assert show(lab, "A")["volumes"][0]["fast_zero"]["punch"] is True
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 8M", uri(lab, "A"))
        digests = {s: file_digest(str(p)) for s, p in imgs.items()}
        maps = {s: seek_map(str(p)) for s, p in imgs.items()}
        groups = {s: {k: show(lab, s)["groups"][0][k] for k in ("role", "epoch", "serving")} for s in imgs}
        for site in ("A", "B"):
            for no_hole in (False, True):
                assert fast_zero(uri(lab, site), MiB, 2 * MiB, no_hole) == "errno ENOTSUP", (site, no_hole)
                # Through the host shim: the array's answer, not a path failure nor a slow zero.
                assert fast_zero(shim_uri(lab, site), MiB, 2 * MiB, no_hole) == "errno ENOTSUP", (site, no_hole)
        for site in ("A", "B"):
            st = host_status(lab["hosts"][site]["admin_socket"])["volumes"][0]
            assert st["stats"]["failed"] == st["stats"]["reissued"] == 0, st
            assert all(p["errors"] == 0 and p["alua"].startswith("active") for p in st["paths"]), st
        assert {s: file_digest(str(p)) for s, p in imgs.items()} == digests
        assert {s: seek_map(str(p)) for s, p in imgs.items()} == maps
        assert {s: {k: show(lab, s)["groups"][0][k] for k in ("role", "epoch", "serving")} for s in imgs} == groups
        # Without the flag the zeroes are written (slowly) on both.
        run("qemu-io", "-f", "raw", "-c", "write -z 1M 2M", shim_uri(lab, "B"))
        assert_replicas_identical(lab, "vv1")
        with open(imgs["A"], "rb") as f:
            f.seek(MiB)
            assert f.read(2 * MiB) == bytes(2 * MiB)
    finally:
        if lab is not None:
            lab_down(str(d))
        for _ in range(20):  # the daemons are gone; their descriptors may take a moment
            if subprocess.run(["umount", str(ram)]).returncode == 0:
                break
            time.sleep(0.2)


def test_block_device_volumes_report_data_and_zero_fast_only_without_no_hole(tmp_path):
    """Loop devices as volumes: base:allocation is all data (the kernel does not say what a
    device has provisioned); a fast zero uses the device's write-zeroes (a loop device passes it
    to its backing file) and is done; with NO_HOLE it is refused ENOTSUP with nothing changed
    (the kernel's zeroing that keeps blocks provisioned falls back to writing)."""
    require_root()
    require_tool("nbdinfo", "qemu-io")
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, loop=True, timeout=60)
    try:
        wait_for(lambda: synced(lab), timeout=30, what="synced")
        assert show(lab, "A")["volumes"][0]["fast_zero"] == {"punch": True, "no_hole": False}
        run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4M", uri(lab, "A"))
        for site in ("A", "B"):
            assert nbd_map(uri(lab, site)) == [(0, 16 * MiB, DATA)]
        assert fast_zero(uri(lab, "B"), MiB, MiB, no_hole=True) == "errno ENOTSUP"
        assert_replicas_identical(lab, "vv1")
        with open(path(lab, "A"), "rb") as f:
            assert f.read(4 * MiB) == b"\x66" * (4 * MiB)
        assert fast_zero(uri(lab, "B"), MiB, MiB) == "ok"
        assert_replicas_identical(lab, "vv1")
        for site in ("A", "B"):
            with open(path(lab, site), "rb") as f:
                f.seek(MiB)
                assert f.read(MiB) == bytes(MiB), site
    finally:
        lab_down(str(d))


NO_HOLE_ZERO = """
h.zero({length}, {offset}, flags=nbd.CMD_FLAG_NO_HOLE)
h.zero({length}, {offset2})
print("ok")
"""


def test_the_host_shim_shows_the_arrays_holes_copies_sparse_keeps_no_hole_and_zeroes_fast(tmp_path):
    """Through a real host shim (uniform: it reaches both arrays, reads go to the optimized
    one), a host gets what a direct client gets: the replicas' holes in base:allocation
    (nbdinfo --map), a sparse nbdcopy, NO_HOLE kept (both replicas keep the range allocated,
    without it both punch a hole), and fast zero."""
    require_tool("nbdinfo", "nbdcopy", "qemu-io")
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, topology="uniform", timeout=60)
    try:
        wait_for(lambda: synced(lab), timeout=30, what="synced")
        s = shim_uri(lab, "A")
        assert nbd_map(s) == [(0, 16 * MiB, HOLE)]
        run("qemu-io", "-f", "raw", "-c", "write -P 0x31 1M 3M", "-c", "write -P 0x32 8M 1M", s)
        expected = [(0, MiB, HOLE), (MiB, 3 * MiB, DATA), (4 * MiB, 4 * MiB, HOLE), (8 * MiB, MiB, DATA),
                    (9 * MiB, 7 * MiB, HOLE)]
        for site in ("A", "B"):
            assert as_map(seek_map(path(lab, site))) == expected, site
        assert nbd_map(s) == expected
        assert nbd_map(shim_uri(lab, "B")) == expected  # host b: its own site's array

        out = tmp_path / "copy.img"
        run("nbdcopy", s, str(out))
        assert file_digest(str(out)) == file_digest(path(lab, "A"))
        assert os.stat(out).st_blocks * 512 <= 4 * MiB + 64 * 1024  # the 4 MiB of data, not 16 MiB

        # NO_HOLE over [1M, 2M) keeps it allocated on both replicas; a plain zero of [2M, 3M)
        # deallocates it on both. Allocation is counted in blocks: ext4's SEEK_DATA shows a range
        # zeroed with ZERO_RANGE (allocated, unwritten) as a hole, or as data while its pages are
        # cached, so the replicas' maps of such a range may differ (docs/design.md, promise 13).
        blocks = {site: allocated(path(lab, site)) for site in ("A", "B")}
        assert nbdsh(s, NO_HOLE_ZERO.format(length=MiB, offset=MiB, offset2=2 * MiB)) == "ok"
        for site in ("A", "B"):
            assert allocated(path(lab, site)) == blocks[site] - MiB, site
        run("qemu-io", "-f", "raw", "-c", "read -P 0 1M 2M", "-c", "read -P 0x31 3M 1M", s)

        # Fast zero: offered by the shim, done on both replicas (as holes).
        assert "can_fast_zero: true" in run("nbdinfo", s).stdout
        assert fast_zero(s, 8 * MiB, MiB) == "ok"
        tail = [(4 * MiB, 12 * MiB, HOLE)]
        for site in ("A", "B"):
            assert allocated(path(lab, site)) == blocks[site] - 2 * MiB, site
            assert [e for e in as_map(seek_map(path(lab, site))) if e[0] >= 4 * MiB] == tail, site
        assert [e for e in nbd_map(s) if e[0] >= 4 * MiB] == tail
        assert_replicas_identical(lab, "vv1")
        st = host_status(lab["hosts"]["A"]["admin_socket"])["volumes"][0]
        assert st["stats"]["allocation_as_data"] == 0 and st["stats"]["failed"] == 0, st
    finally:
        lab_down(str(d))
