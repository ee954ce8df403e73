"""Online verify (issue 5, item 4): `syncctl checkrcopyvv VOLUME [--fix]` compares both replicas
by digests while a host writes, finds a region that went bad on one replica, and repairs it."""

from __future__ import annotations

import os
import sys
import time

import pytest
import trio

from syncd.ctl import CtlError, call
from syncd.lab.rig import lab_down, lab_up
from syncd.lab.workload import History, check_file, run_writer

from .rig import FAST_LINK, assert_replicas_identical, run

pytestmark = pytest.mark.system
MiB = 1 << 20


@pytest.fixture
def lab(tmp_path):
    lab = lab_up(str(tmp_path / "lab"), size="16MiB", nvolumes=2, npaths=2, link_opts=FAST_LINK, timeout=60)
    yield lab
    lab_down(lab["dir"])


def test_verify_under_load_finds_and_fixes_a_bad_region(lab):
    a = lab["nodes"]["A"]["admin_socket"]
    b_file = lab["nodes"]["B"]["volumes"]["vv1"]["path"]
    h, hb = History(), History()
    found = {}

    def corrupt_and_verify():
        # Bit rot on B's disk, behind syncd's back, outside the range the host writes.
        fd = os.open(b_file, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xba" * 512, 9 * MiB + 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        found["check"] = call(a, "checkrcopyvv", {"volume": "vv1"}, timeout=60)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(lambda: run_writer(lab["nodes"]["A"]["volumes"]["vv1"]["uri"], h, writer=1,
                                            blocks=range(0, 1024), duration=5.0, qd=4))
            n.start_soon(lambda: run_writer(lab["nodes"]["B"]["volumes"]["vv1"]["uri"], hb, writer=2,
                                            blocks=range(1024, 2048), duration=5.0, qd=4))
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(corrupt_and_verify)

    trio.run(main)
    r = found["check"]
    region = r["region_size"]
    assert r["bytes_compared"] == 16 * MiB and r["regions"] == 16 * MiB // region
    assert r["differing"] == [[(9 * MiB + 4096) // region * region, region]], r
    assert h.errors == [] and h.acked_count() > 100 and hb.errors == [] and hb.acked_count() > 100
    # The hosts' writes at both sites (0-8 MiB, compared while they wrote) are no differences.

    # The CLI reports the difference (exit 2) and repairs it from the primary.
    out = run(sys.executable, "-m", "syncd.ctl", "--socket", a, "checkrcopyvv", "vv1", "--fix", check=False)
    assert out.returncode == 2 and "1 regions DIFFER" in out.stdout
    assert "resync of the differing regions started" in out.stdout
    deadline = time.monotonic() + 30
    while call(a, "showrcopy", {"group": "rcg1"})["groups"][0]["peer_mode"] != "attached":
        assert time.monotonic() < deadline, "resync after checkrcopyvv --fix did not finish"
        time.sleep(0.1)
    again = run(sys.executable, "-m", "syncd.ctl", "--socket", a, "checkrcopyvv", "vv1")
    assert "identical" in again.stdout
    assert_replicas_identical(lab, "vv1")
    assert_replicas_identical(lab, "vv2")
    for site in ("A", "B"):
        assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], h, writer=1) == []
        assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], hb, writer=2) == []


@pytest.mark.parametrize("site,args,msg", [
    ("B", {"volume": "vv1"}, "operation only on primary side"),
    ("A", {"volume": "nope"}, "no volume 'nope'"),
    ("A", {"volume": "vv1", "fix": "yes"}, "fix must be true or false"),
    ("A", {"volume": "vv1", "bogus": 1}, "bad arguments"),
])
def test_bad_verify_requests_are_named(lab, site, args, msg):
    with pytest.raises(CtlError, match=msg):
        call(lab["nodes"][site]["admin_socket"], "checkrcopyvv", args)
