"""What a node decides at start after an unclean stop (finding 12, boot id; two cases found by
review of ff76d64): a real ``syncd.node.daemon.Node`` restarted over a prepared data directory
(no link, no run loop)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from syncd.config import load_node_config
from syncd.lab.rig import node_toml
from syncd.node.daemon import Node
from syncd.node.errors import NodeError
from syncd.node.state import GroupState, MemberState

SIZE = 8 << 20


def make_cfg(tmp: Path, boot_id_file: Path) -> object:
    img = tmp / "vv1.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(SIZE)
    cfg = tmp / "node.toml"
    cfg.write_text(node_toml("B", "A", tmp, 1, [(2, 3)], [("vv1", img, SIZE)], extra_link={"insecure": True},
                              boot_id_file=boot_id_file))
    return load_node_config(str(cfg))


def new_node(tmp: Path, boot_id: str | None, role: str = "secondary", **gs) -> Node:
    """A node holding group rcg1 (``role``), first started with ``boot_id``; left running
    (marker present) as a kill -9 or a power cut leaves it."""
    bid = tmp / "boot_id"
    if boot_id is not None:
        bid.write_text(boot_id + "\n")
    cfg = make_cfg(tmp, bid)
    n = Node(cfg)
    n.state.groups["rcg1"] = GroupState(name="rcg1", gid=1, role=role, peer="A", started=True,
                                        members=[MemberState("vv1", "vv1", 1, "wwn", SIZE, synced_once=True)],
                                        **gs)
    n.save()
    release(n)
    return n


def release(n: Node) -> None:
    """As the process's exit does: the volumes closed, the data directory's lock let go."""
    n.close()
    for g in n.groups.values():
        for m in g.members.values():
            m.intent.close()
    os.close(n.store._lockfd)


def restart(tmp: Path) -> Node:
    async def main() -> Node:
        return Node(make_cfg(tmp, tmp / "boot_id"))
    n = trio.run(main)
    release(n)
    return n


def test_clean_restart_of_a_secondary_waiting_for_its_resync_without_a_trusted_intent_log(tmp_path):
    """A secondary back from a power cut sets ``peer_newer`` and reports its regions; stopped
    cleanly before its primary returned, and its write-intent log then gone or not matching
    (the operator removed it, as intent.py says to make the peers compare everything; the
    region size changed), the next start takes ``loaded_regions()`` of the untrusted log (none)
    as the regions to report, finds none, and clears ``peer_newer`` (CaughtUp) without any
    resync: it reports nothing to its primary and may take the group over from the witness."""
    new_node(tmp_path, "boot-1")
    (tmp_path / "boot_id").write_text("boot-2\n")  # the power cut: the machine booted again
    n = restart(tmp_path)  # marker left: unclean, caches lost
    g = n.groups["rcg1"]
    assert n.caches_lost and g.state.peer_newer
    assert all(m.suspect_regions for m in g.members.values())  # untrusted: every region
    # Clean stop (the marker goes), and the write-intent log is removed meanwhile.
    os.unlink(tmp_path / "data" / "running")
    os.unlink(tmp_path / "data" / "intent-1-1")
    n = restart(tmp_path)
    g = n.groups["rcg1"]
    reported = sorted(r for m in g.members.values() for r in m.suspect_regions)
    assert g.state.peer_newer and reported, (
        f"after a clean restart: peer_newer={g.state.peer_newer}, regions reported to the primary: "
        f"{len(reported)}; it never was resynced")


def test_a_node_whose_boot_id_cannot_be_read_refuses_to_start_and_changes_nothing(tmp_path):
    """Found by review: an unreadable boot id counted as a power cut, so a primary only killed
    fetched back from its peer the regions it was writing, over its own newer copies when the
    peer had lost power (finding 12's schedule). Neither guess is safe: the node refuses to
    start, naming the file, and leaves its data directory as it was."""
    new_node(tmp_path, "boot-1", role="primary", peer_has_all=True)  # left running: unclean
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file()}
    for bad, why in ((None, "No such file"), ("", "is empty")):
        (tmp_path / "boot_id").unlink(missing_ok=True)
        if bad is not None:
            (tmp_path / "boot_id").write_text(bad)
        with pytest.raises(NodeError, match=f"node.boot_id_file {tmp_path / 'boot_id'}.*{why}"):
            restart(tmp_path)
        after = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file()}
        assert after == before


def test_a_kill_on_the_same_boot_is_not_a_power_cut_and_a_new_boot_is(tmp_path):
    new_node(tmp_path, "boot-1", role="primary", peer_has_all=True)
    n = restart(tmp_path)  # the marker of boot-1 stays: kill -9 on the same boot
    assert n.unclean and not n.caches_lost
    (tmp_path / "boot_id").write_text("boot-2\n")
    n = restart(tmp_path)
    assert n.unclean and n.caches_lost
    # A marker of a syncd that did not record the boot: counted as a power cut, as it was then.
    (tmp_path / "data" / "running").write_text("123\n")
    n = restart(tmp_path)
    assert n.unclean and n.caches_lost
