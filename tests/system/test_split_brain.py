"""Split brain (issue 5, item 2): both arrays acknowledge writes while apart (the link is cut,
there is no witness, the operator overrides on the secondary). On reconnect the data
generations show it: the group stops resyncing on both arrays and says so, with both
generations; nothing is overwritten until the operator discards one side."""

from __future__ import annotations

import time

import pytest
import trio

from syncd.ctl import CtlError, call
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_down, lab_up
from syncd.nbd.client import open_nbd

from .rig import FAST_LINK, assert_replicas_identical

pytestmark = pytest.mark.system
MiB = 1 << 20


def group(lab, site):
    return call(lab["nodes"][site]["admin_socket"], "showrcopy", {"group": "rcg1"})["groups"][0]


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def write(lab, site, offset, byte):
    async def go():
        async with open_nbd(lab["nodes"][site]["volumes"]["vv1"]["uri"]) as c:
            await c.write(offset, bytes([byte]) * 65536)
    trio.run(go)


def read_file(lab, site, offset):
    with open(lab["nodes"][site]["volumes"]["vv1"]["path"], "rb") as f:
        f.seek(offset)
        return f.read(65536)


@pytest.fixture
def lab(tmp_path):
    lab = lab_up(str(tmp_path / "lab"), size="8MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, timeout=60)
    yield lab
    lab_down(lab["dir"])


def test_writes_on_both_sides_apart_stop_the_group_until_the_operator_discards_one(lab):
    a, b = (lab["nodes"][s]["admin_socket"] for s in ("A", "B"))
    write(lab, "A", 0, 0x11)
    gen0 = group(lab, "A")["generation"]
    wait_for(lambda: group(lab, "B")["generation"] == gen0, 10, "B to hold A's generation once in sync")
    assert gen0

    # Apart: A goes on alone (no witness: after B's lease), the operator makes B primary too.
    proxy_command(lab["link"]["control"], "cut", paths=[0, 1])
    wait_for(lambda: group(lab, "A")["peer_mode"] == "detached", 10, "A to go on alone")
    write(lab, "A", 1 * MiB, 0xAA)
    wait_for(lambda: not group(lab, "B")["serving"], 10, "B's lease to run out")
    call(b, "setrcopygroup", {"action": "override", "group": "rcg1"}, timeout=30)
    write(lab, "B", 2 * MiB, 0xBB)
    ga, gb = group(lab, "A"), group(lab, "B")
    assert ga["generation"] != gen0 and gb["generation"] != gen0 and ga["generation"] != gb["generation"]
    assert gen0 in ga["generation_history"] and gen0 in gb["generation_history"]

    # Reconnect: both say split brain, showing both generations; nothing is copied either way.
    proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
    wait_for(lambda: group(lab, "A")["split_brain"] and group(lab, "B")["split_brain"], 15, "split brain reported")
    time.sleep(3)
    ga, gb = group(lab, "A"), group(lab, "B")
    for g, other in ((ga, gb), (gb, ga)):
        assert g["status"] == "split-brain" and g["role"] == "primary"
        assert g["generation"] in g["split_brain"] and other["generation"] in g["split_brain"]
        assert "setrcopygroup discard rcg1" in g["split_brain"]
    assert read_file(lab, "A", 1 * MiB) == b"\xaa" * 65536 and read_file(lab, "B", 1 * MiB) != b"\xaa" * 65536
    assert read_file(lab, "B", 2 * MiB) == b"\xbb" * 65536 and read_file(lab, "A", 2 * MiB) != b"\xbb" * 65536

    # The operator keeps B's data: A discards its writes since the split and is resynced from B.
    r = call(a, "setrcopygroup", {"action": "discard", "group": "rcg1"}, timeout=30)
    assert r["survivor"] == "B" and r["discarded_generation"] == ga["generation"]
    wait_for(lambda: group(lab, "B")["peer_mode"] == "attached"
             and all(v["sync_status"] == "synced" for v in group(lab, "B")["volumes"]), 30, "resync from B")
    assert group(lab, "A")["role"] == "secondary" and not group(lab, "A")["split_brain"]
    wait_for(lambda: group(lab, "A")["generation"] == gb["generation"], 10, "A to adopt B's generation")
    assert_replicas_identical(lab, "vv1")
    assert read_file(lab, "A", 2 * MiB) == b"\xbb" * 65536 and read_file(lab, "A", 0) == b"\x11" * 65536
    assert read_file(lab, "A", 1 * MiB) != b"\xaa" * 65536  # discarded, as the operator chose


def test_discard_without_split_brain_is_refused(lab):
    with pytest.raises(CtlError, match="not in split brain"):
        call(lab["nodes"]["A"]["admin_socket"], "setrcopygroup", {"action": "discard", "group": "rcg1"})


def test_a_failover_is_no_split_brain(lab):
    """The old primary wrote nothing alone (it was killed): it is behind, not diverged."""
    from syncd.lab.rig import lab_kill, lab_start

    b = lab["nodes"]["B"]["admin_socket"]
    lab_kill(lab["dir"], "A")
    wait_for(lambda: not group(lab, "B")["serving"], 10, "B's lease to run out")
    call(b, "setrcopygroup", {"action": "override", "group": "rcg1"}, timeout=30)
    write(lab, "B", 3 * MiB, 0xCC)
    lab_start(lab["dir"], "A")
    wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", 30, "A resynced from B")
    assert not group(lab, "A")["split_brain"] and not group(lab, "B")["split_brain"]
    assert group(lab, "A")["role"] == "secondary"
    assert_replicas_identical(lab, "vv1")


def test_split_brain_with_a_witness_that_holds_the_discarded_side_as_owner(tmp_path):
    """Both arrays lose the link and the witness; the operator overrides on both and both write.
    The witness still records A (epoch 1) as owner when the operator discards A's side: the
    resolution starts an epoch above both, and the survivor B brings the witness up to date
    (RESOLVE) once A mirrors it, so a later link loss leaves B serving, not in failsafe."""
    import json
    from pathlib import Path

    from syncd.lab.rig import lab_fail, lab_heal

    from .test_failover import WITNESS

    lab = lab_up(str(tmp_path / "lab"), size="8MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK,
                 witness=WITNESS, timeout=60)
    try:
        a, b = (lab["nodes"][s]["admin_socket"] for s in ("A", "B"))
        wfile = Path(lab["dir"]) / "W" / "state" / "witness.json"

        def witness_record():
            return json.loads(wfile.read_text())["groups"]["rcg1"]

        write(lab, "A", 0, 0x11)
        wait_for(lambda: wfile.exists() and witness_record()["secondary_in_sync"], 15,
                 "the witness to hear from A that B is in sync")
        # The witness and the link go: A (primary) enters failsafe, B's lease runs out.
        proxy_command(lab["link"]["control"], "cut", paths=[0, 1])
        lab_fail(lab["dir"], "witness")
        wait_for(lambda: group(lab, "A")["status"] == "failsafe", 15, f"A in failsafe {group(lab, 'A')['events']}")
        wait_for(lambda: not group(lab, "B")["serving"], 15, "B not serving")
        # The operator overrides on both sides; both acknowledge writes.
        r = call(a, "setrcopygroup", {"action": "override", "group": "rcg1"}, timeout=30)
        assert "operator" in r["why"]
        write(lab, "A", 1 * MiB, 0xAA)
        call(b, "setrcopygroup", {"action": "override", "group": "rcg1"}, timeout=30)
        assert group(lab, "B")["witness_behind"] and group(lab, "B")["epoch"] == 2
        write(lab, "B", 2 * MiB, 0xBB)

        lab_heal(lab["dir"], "witness")
        proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
        wait_for(lambda: group(lab, "A")["split_brain"] and group(lab, "B")["split_brain"], 15, "split brain")
        time.sleep(1.0)
        rec = witness_record()
        assert (rec["owner"], rec["epoch"]) == ("A", 1)  # the witness never heard of B's override

        # The operator discards A's side, the one the witness holds as owner.
        r = call(a, "setrcopygroup", {"action": "discard", "group": "rcg1"}, timeout=30)
        assert r["survivor"] == "B" and r["epoch"] == 3  # above both sides' epochs (1 and 2)
        wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", 30, "A resynced from B")
        wait_for(lambda: not group(lab, "B")["witness_behind"], 10, "B to bring the witness up to date")
        rec = witness_record()
        assert (rec["owner"], rec["epoch"]) == ("B", 3), rec
        assert "resolved" in rec["last_decision"]
        assert_replicas_identical(lab, "vv1")
        assert read_file(lab, "A", 2 * MiB) == b"\xbb" * 65536

        # The witness is trusted again: with the link cut, B goes on alone (KEEP granted) and
        # A, out of sync, cannot take the group.
        time.sleep(1.0)
        proxy_command(lab["link"]["control"], "cut", paths=[0, 1])
        wait_for(lambda: group(lab, "B")["peer_mode"] == "detached", 15, "B going on alone")
        gb = group(lab, "B")
        assert gb["status"] == "started" and gb["serving"] and gb["role"] == "primary", gb
        write(lab, "B", 3 * MiB, 0xCC)
        time.sleep(2.0)
        assert group(lab, "A")["role"] == "secondary" and not group(lab, "A")["serving"]
        proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
        wait_for(lambda: group(lab, "B")["peer_mode"] == "attached", 30, "A resynced again")
        assert_replicas_identical(lab, "vv1")
    finally:
        lab_down(lab["dir"])
