"""Two sites in their own network namespaces, joined by two veth paths: cut the real links."""

from __future__ import annotations

import os
import time

import pytest

from syncd.ctl import call
from syncd.lab.workload import check_file

from .matrix import Matrix
from .rig import FAST_LINK, first_difference, require_root, require_tool
from .test_matrix import FAST_WITNESS

pytestmark = [pytest.mark.system, pytest.mark.root]


@pytest.fixture
def rig(tmp_path):
    require_root()
    require_tool("losetup")
    n = (os.getpid() * 7 + 500) % 1000
    m = Matrix(tmp_path, format(n, "x"), n, FAST_LINK, FAST_WITNESS)
    try:
        m.up()
        yield m
    finally:
        m.teardown()


def test_cutting_every_replication_veth_stops_the_secondary_and_heals_with_resync(rig):
    rig.start_host("A")
    time.sleep(1.0)
    rig.set_link("rep0", False)
    time.sleep(1.0)
    one_path_down = rig.group("A")
    link = call(rig.admin("A"), "showrcopy")["link"]
    rig.set_link("rep1", False)
    cut = time.monotonic()
    time.sleep(2.5)
    b_cut = rig.group("B")
    rig.set_link("rep0", True)
    rig.set_link("rep1", True)
    rig.wait(lambda: rig.group("A")["peer_mode"] == "attached", 60, "resync")
    time.sleep(1.0)
    h, _ = rig.stop_host("A")
    assert link["paths_up"] == 1 and one_path_down["peer_mode"] == "attached"
    assert b_cut["serving"] is False
    assert any(t > cut + 1.0 for t in h.acked_times)  # A went on alone after the lease
    assert h.errors == []
    for site in ("A", "B"):
        assert check_file(rig.loops[site], h, writer=1) == [], f"site {site} lost acknowledged writes"
    assert first_difference(rig.loops["A"], rig.loops["B"]) is None
