"""A secondary back from a power cut reports the regions it was writing (``suspect_regions``) in
its answer to the primary's state exchange; the primary compares and copies them, and only then
(``adopt_gen``) may the secondary forget them and take the group over again (``CaughtUp``).

Found by review: both arrays run the exchange when the link comes up. The secondary's own request
makes the primary resync at once (its roles say "secondary": ``PeerState``), before the answer to
the primary's request has brought the suspect regions. Finished first (nothing dirty at the
primary: RESYNC_BEGIN, the peer's FLUSH, ``ResyncDone``), that resync sent ``adopt_gen``: the
secondary cleared its suspect regions and ``peer_newer`` although its copy of them still lacked
writes the primary had acknowledged; the primary, in sync, then set them dirty and resynced
nothing. Even when the answer came in time, the resync's RESYNC_BEGIN (taken before it) did not
name them: the secondary, holding a lease, served its stale copy of them until they were copied.

In process: two real ``Node``s over their data directories, the link between them a pair of
in-process ends that hand each frame to the other node's ``peer.on_request``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from syncd.config import load_node_config
from syncd.lab.rig import node_toml
from syncd.node import peer
from syncd.node.daemon import Node
from syncd.node.roles import Mode
from syncd.node.state import GroupState, MemberState
from syncd.repl.proto import Frame, MsgType

from .test_boot_id import release  # as the process's exit does (the marker stays: a kill or a power cut)

SIZE = 8 << 20
REGION = 256 << 10
LOST = 3  # the region whose last mirrored write B's power cut took


def cfg_of(d: Path, me: str, peer_name: str):
    img = d / "vv1.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.truncate(SIZE)
    c = d / "node.toml"
    c.write_text(node_toml(me, peer_name, d, 1, [(2, 3)], [("vv1", img, SIZE)], boot_id_file=d / "boot_id",
                           extra_link={"insecure": True, "path_timeout": 0.25, "io_timeout": 0.5}))
    return load_node_config(str(c))


def new_dir(d: Path) -> None:
    d.mkdir()
    (d / "boot_id").write_text("boot-1\n")


def after_the_power_cut(tmp: Path, acked: bytes) -> None:
    """A acknowledged a write to region LOST, mirrored to B; B's power cut took it from B's
    cache (B's machine booted again). A stopped cleanly meanwhile."""
    with open(tmp / "A" / "vv1.img", "r+b") as f:
        f.seek(LOST * REGION)
        f.write(acked)
    os.unlink(tmp / "A" / "data" / "running")
    (tmp / "B" / "boot_id").write_text("boot-2\n")


async def until(cond, seconds: float) -> None:
    for _ in range(int(seconds / 0.005)):
        if cond():
            return
        await trio.sleep(0.005)




async def first_run(d: Path, me: str, peer_name: str, role: str, mark: bool) -> None:
    """The pair in sync at epoch 1, generation g1; B was writing region LOST when it lost power."""
    new_dir(d)
    n = Node(cfg_of(d, me, peer_name))
    n.state.groups["rcg1"] = GroupState(
        name="rcg1", gid=1, role=role, peer=peer_name, started=True, epoch=1, gen="g1", gen_shared=True,
        home="A", members=[MemberState("vv1", "vv1", 1, "wwn", SIZE, synced_once=True)])
    n.save()
    release(n)
    os.unlink(d / "data" / "running")  # stopped cleanly
    n = Node(cfg_of(d, me, peer_name))  # running with the group
    if mark:
        await n.groups["rcg1"].members["vv1"].intent.mark(LOST * REGION, 4096)
    release(n)


class End:
    """One node's end of the link: a request is handled by the other node as if received
    (``peer.on_request``); ``hold(frame)`` may hold a reply back (an Event to wait for)."""

    up = True

    def __init__(self, node: Node) -> None:
        self.node = node
        self.other: End
        self.ids = 0
        self.hold = lambda frame: None
        self.resets: list[str] = []

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    async def request(self, frame: Frame, timeout: float | None = None) -> Frame:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        done, box = trio.Event(), []
        peer.on_request(self.other.node, self.other, (done, box), frame)
        await done.wait()
        gate = self.hold(frame)
        if gate is not None:
            await gate.wait()
        return box[0]

    def start(self, frame, timeout=None, cb=None, reserved=None):
        return frame

    async def wait(self, frame):
        return await self.request(frame)

    def reply(self, path, req_id: int, status: int = 0, payload: bytes = b"") -> None:
        done, box = path
        box.append(Frame.reply(req_id, status, payload))
        done.set()

    def send(self, frame) -> None:
        pass

    def reset(self, reason: str) -> None:
        self.resets.append(reason)  # a new session would run the exchange again


async def linked(nursery: trio.Nursery, tmp: Path) -> tuple[Node, Node]:
    """A and B started over their data directories, their groups running, linked by ``End``s."""
    a = Node(cfg_of(tmp / "A", "A", "B"))
    b = Node(cfg_of(tmp / "B", "B", "A"))
    for n in (a, b):
        n._nursery = nursery
        for g in n.groups.values():
            await nursery.start(g.run)
    a.link, b.link = End(a), End(b)
    a.link.other, b.link.other = b.link, a.link
    return a, b


@pytest.mark.parametrize("answer", ["in-time", "late", "never"])
async def test_the_secondarys_suspect_regions_are_resynced_before_it_counts_as_caught_up(tmp_path, answer):
    await first_run(tmp_path / "A", "A", "B", "primary", mark=False)
    await first_run(tmp_path / "B", "B", "A", "secondary", mark=True)
    acked = b"\x5a" * REGION
    after_the_power_cut(tmp_path, acked)
    async with trio.open_nursery() as nursery:
        a = Node(cfg_of(tmp_path / "A", "A", "B"))
        b = Node(cfg_of(tmp_path / "B", "B", "A"))
        try:
            ga, gb = a.groups["rcg1"], b.groups["rcg1"]
            mb = gb.members["vv1"]
            assert b.caches_lost and gb.state.peer_newer and LOST in mb.suspect_regions
            assert not a.unclean and not ga.members["vv1"].dirty.count
            for n in (a, b):
                n._nursery = nursery
            a.link, b.link = End(a), End(b)
            a.link.other, b.link.other = b.link, a.link
            # The answer to A's exchange comes as soon as B sends it; or late (a slow save at B,
            # a path retransmitting): once A is in sync, or after 0.3 s; or never (lost).
            late = trio.Event()
            a.link.hold = lambda f: (late if answer != "in-time" and f.type == MsgType.CONTROL
                                     and b"sync_groups" in bytes(f.payload) else None)
            told = []  # B's out-of-sync map as each RESYNC_BEGIN left it

            def resync_begin(f, m, orig=gb.io.resync_begin):
                st = orig(f, m)
                told.append(m.oos.test(LOST))
                return st

            gb.io.resync_begin = resync_begin
            b._on_link_up()
            a._on_link_up()
            await until(lambda: ga.mode is Mode.ATTACHED, 0.3)
            if answer == "late":
                late.set()
            await until(lambda: (ga.mode is Mode.ATTACHED and not gb.state.peer_newer) or a.link.resets, 3)
            await trio.sleep(0.2)  # whatever else is under way lands
            here = a.volumes["vv1"].read_sync(LOST * REGION, REGION)
            there = b.volumes["vv1"].read_sync(LOST * REGION, REGION)
            assert here == acked
            # Caught up (it may take the group over, and serves it with a lease meanwhile),
            # B's copy must hold every write A acknowledged.
            assert gb.state.peer_newer or there == here, (
                f"B forgot its suspect regions (suspect={sorted(mb.suspect_regions)}, peer_newer="
                f"{gb.state.peer_newer}) while its copy of region {LOST} lacks A's acknowledged write; "
                f"A is {ga.mode.value}, its dirty map {ga.members['vv1'].dirty.count} regions")
            if answer == "never":
                # Not in sync without the peer's word: the link is reset, the exchange runs again.
                assert a.link.resets and "state exchange" in a.link.resets[0], a.link.resets
                assert ga.mode is not Mode.ATTACHED and LOST in mb.suspect_regions
                return
            assert ga.mode is Mode.ATTACHED and not gb.state.peer_newer and not mb.suspect_regions
            # Told it lacks the region when the resync began: its reads went to A until copied.
            assert told and all(told), told
        finally:
            nursery.cancel_scope.cancel()
            for n in (a, b):
                release(n)
