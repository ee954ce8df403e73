"""Found by stop 31's second review of 398daf4: after a failed flush every later ``Volume.flush`` raises OSError.
``Resync._pull_batch`` calls ``m.vol.flush()`` unguarded and ``pull_group`` catches only
ResyncFailed/LinkDown/LinkTimeout: the OSError leaves ``Group._recover``, a task of the node's
nursery, and takes the whole node down (every group, the NBD/iSCSI servers) instead of losing
the peer / failing the resync as ``_send_region`` does (it maps the same error to ResyncFailed)."""

from __future__ import annotations

import types

import trio

from syncd.node.datapath import DataPath
from syncd.node.resync import Resync
from syncd.node.volume import Volume

from .test_datapath_cancel import REGION, SIZE, Group, Member, Node
from .test_resync_pull import SecondaryEnd, pulling_primary


async def test_a_failed_flush_during_a_pull_does_not_escape_the_resync(tmp_path):
    here = Volume("vv1", str(tmp_path / "here.img"), size=SIZE)
    there = Volume("vv1", str(tmp_path / "there.img"), size=SIZE)
    escaped = None
    try:
        there.write_sync(2 * REGION, b"\x02" * REGION)  # newer at the peer: fetched back
        async with trio.open_nursery() as nursery:
            sg = Group(Node(None, nursery), "secondary")
            sg.publish_volume = lambda m: None
            sm = Member(sg, there, None)
            sm.st = types.SimpleNamespace(local="vv1", suspect=False, synced_once=False, last_sync=0.0)
            node = Node(SecondaryEnd(DataPath(sg), sm), nursery)
            g, m = pulling_primary(node, here, (2,))
            here.flush_failed = True  # a host FLUSH (or FlushVolumes) failed a moment ago
            try:
                await Resync(node).pull_group(g)
            except OSError as e:
                escaped = e
            nursery.cancel_scope.cancel()
        assert escaped is None, f"pull_group raised {escaped!r}: the node's nursery dies with it"
        assert g.lost, "the resync should end by losing the peer"
    finally:
        here.close()
        there.close()
