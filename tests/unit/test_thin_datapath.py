"""The data path's thin-volume rules, in process: one array's data path (real volumes, write-intent
log, range lock, bitmaps) and a link whose other end is the peer's replica, a real file that
applies each frame as the peer would (``apply_local``) and answers with its outcome.

base:allocation reports a hole only where this replica holds the final bytes; a fast zero is done
on both replicas or refused ENOTSUP with nothing changed on either."""

from __future__ import annotations

import errno
import os
import tempfile
import types
from pathlib import Path

import pytest
import trio

from syncd.nbd.export import BlockError, zero_range
from syncd.nbd.extents import DATA, HOLE
from syncd.node.datapath import ZEROES, DataPath
from syncd.node.intent import IntentLog
from syncd.node.volume import Volume
from syncd.repl.proto import FEAT_FAST_ZERO, FEATURES, MsgType, Status

from .test_datapath_cancel import REGION, SIZE, Group, Member, Node, Wire, _Pending

MiB = 1 << 20


class PeerWire(Wire):
    """The link to a peer running ``features``: each ZEROES is applied to the peer's replica as
    the peer applies a mirrored or forwarded op, and answered with what happened."""

    def __init__(self, peer: Volume, features: int = FEATURES) -> None:
        super().__init__(peer)
        self.features = features
        self.frames: list = []

    def start(self, frame, timeout=None, cb=None, reserved=None) -> _Pending:
        assert frame.type == MsgType.ZEROES
        self.frames.append(frame)
        pend = _Pending(frame, cb)
        status = Status.OK
        try:
            if frame.fast_zero and self.features & FEAT_FAST_ZERO:  # an older peer ignores the flag
                self.peer.fast_zero_sync(frame.offset, frame.length, frame.no_hole)
            else:
                zero_range(self.peer.fd, frame.offset, frame.length, frame.no_hole)
        except OSError as e:
            status = e.errno
        pend.reply = types.SimpleNamespace(status=status)
        pend.finish()
        return pend


UNKNOWN = "unknown"  # as the probe leaves a mode it could not try


async def _zero(tmp_path, role: str, *, peer_features: int = FEATURES, here_can=None, peer_can=None,
                no_hole: bool = False, here_dir=None):
    """A fast zero of [1 MiB, 2 MiB) at this array (``role``), both replicas full of data before.
    Returns (the error or None, this replica's bytes, the peer's, the frames sent)."""
    here = Volume("vv1", str((here_dir or tmp_path) / "here.img"), size=SIZE)
    peer = Volume("vv1", str(tmp_path / "peer.img"), size=SIZE)
    intent = IntentLog(str(tmp_path / "intent"), SIZE, REGION, volume=here)
    try:
        for v, can in ((here, here_can), (peer, peer_can)):
            v.write_sync(0, b"\xaa" * SIZE)
            if can is not None:
                v.fast_zero_ok[no_hole] = None if can is UNKNOWN else can
        wire = PeerWire(peer, peer_features)
        err = None
        async with trio.open_nursery() as nursery:
            g = Group(Node(wire, nursery), role)
            dp = DataPath(g)
            m = Member(g, here, intent)
            m.st = types.SimpleNamespace(local="vv1")
            try:
                await dp.host_write(m, ZEROES, MiB, MiB, None, False, no_hole, True)
            except BlockError as e:
                err = e
            nursery.cancel_scope.cancel()
        return err, here.read_sync(0, SIZE), peer.read_sync(0, SIZE), wire.frames
    finally:
        intent.close()
        here.close()
        peer.close()
        if here_dir is not None:
            os.unlink(here.path)


FULL = b"\xaa" * SIZE
ZEROED = b"\xaa" * MiB + bytes(MiB) + b"\xaa" * (SIZE - 2 * MiB)


@pytest.mark.parametrize("role", ["primary", "secondary"])
async def test_fast_zero_is_done_on_both_replicas(tmp_path, role):
    err, here, peer, frames = await _zero(tmp_path, role)
    assert err is None
    assert here == peer == ZEROED
    assert [f.fast_zero for f in frames] == [True]
    assert frames[0].forwarded == (role == "secondary")


@pytest.mark.parametrize("role", ["primary", "secondary"])
async def test_a_peer_without_fast_zero_gets_no_request_and_nothing_changes(tmp_path, role):
    err, here, peer, frames = await _zero(tmp_path, role, peer_features=FEATURES & ~FEAT_FAST_ZERO)
    assert err is not None and err.errno == errno.ENOTSUP
    assert here == peer == FULL
    assert frames == []  # an older peer would have written the zeroes slowly


@pytest.mark.parametrize("role", ["primary", "secondary"])
async def test_a_peer_that_cannot_zero_fast_refuses_and_nothing_changes(tmp_path, role):
    err, here, peer, frames = await _zero(tmp_path, role, peer_can=False)
    assert err is not None and err.errno == errno.ENOTSUP
    assert here == peer == FULL
    assert len(frames) == 1


@pytest.mark.parametrize("role", ["primary", "secondary"])
async def test_an_array_that_cannot_zero_fast_refuses_before_asking_its_peer(tmp_path, role):
    err, here, peer, frames = await _zero(tmp_path, role, here_can=False, no_hole=True)
    assert err is not None and err.errno == errno.ENOTSUP
    assert here == peer == FULL
    assert frames == []


@pytest.fixture
def shm_dir():
    """A directory on tmpfs (/dev/shm), which cannot ZERO_RANGE."""
    with open("/proc/mounts") as f:
        assert any(line.split()[1:3] == ["/dev/shm", "tmpfs"] for line in f), "/dev/shm is not a tmpfs"
    d = Path(tempfile.mkdtemp(dir="/dev/shm"))
    yield d
    d.rmdir()


async def test_an_array_that_finds_too_late_it_cannot_zero_fast_writes_the_zeroes(tmp_path, shm_dir):
    """The peer zeroed; this array's fallocate then fails (a mode its probe could not try, as
    where no temporary file can be made next to the volume: here ZERO_RANGE on tmpfs): the range
    is zeroed by writing, so the replicas never differ."""
    err, here, peer, frames = await _zero(tmp_path, "primary", here_can=UNKNOWN, no_hole=True, here_dir=shm_dir)
    assert err is None
    assert here == peer == ZEROED
    assert len(frames) == 1 and frames[0].fast_zero


def _member(tmp_path, role: str, nursery) -> tuple[DataPath, Member, Volume]:
    vol = Volume("vv1", str(tmp_path / "v.img"), size=SIZE)
    vol.write_sync(REGION, b"d" * REGION)  # data in region 1; holes elsewhere
    g = Group(Node(Wire(vol), nursery), role)
    dp = DataPath(g)
    return dp, Member(g, vol, None), vol


async def test_allocation_reports_holes_only_where_this_replica_holds_the_final_bytes(tmp_path):
    async with trio.open_nursery() as nursery:
        dp, m, vol = _member(tmp_path, "secondary", nursery)
        try:
            four = 4 * REGION
            assert dp.host_allocation(m, 0, four, 100) == [(REGION, HOLE), (REGION, DATA), (2 * REGION, HOLE)]
            # Region 3 not received by resync yet (its reads go to the primary): data.
            m.oos.set(3)
            assert dp.host_allocation(m, 0, four, 100) == [(REGION, HOLE), (REGION, DATA), (REGION, HOLE),
                                                           (REGION, DATA)]
            # An unaligned request that starts inside a stale region.
            assert dp.host_allocation(m, 3 * REGION + 512, REGION, 100) == [(REGION - 512, DATA), (512, HOLE)]
            # Not serving (a secondary without lease may be stale, and knows nothing of it): data.
            dp.g.may_serve = lambda: False
            assert dp.host_allocation(m, 0, four, 100) == [(four, DATA)]
            dp.g.may_serve = lambda: True
            # The primary's own regions the peer lacks (dirty) are final here: holes. Regions it
            # must fetch back from its peer (pull, after a power cut) are not.
            dp.g.role = "primary"
            m.dirty.set(0)
            assert dp.host_allocation(m, 0, four, 100) == [(REGION, HOLE), (REGION, DATA), (2 * REGION, HOLE)]
            m.pull.set(2)
            assert dp.host_allocation(m, 0, four, 100) == [(REGION, HOLE), (2 * REGION, DATA), (REGION, HOLE)]
            # A failed backing device: data.
            dp.disk_error = "EIO"
            assert dp.host_allocation(m, 0, four, 100) == [(four, DATA)]
            # Bounded: the extents stop at the limit, from the start of the range.
            dp.disk_error = ""
            assert dp.host_allocation(m, 0, four, 1) == [(REGION, HOLE)]
        finally:
            vol.close()
            nursery.cancel_scope.cancel()
