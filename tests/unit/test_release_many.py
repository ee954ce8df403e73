"""The primary's side of a RELEASE that names several forwarded writes (FEAT_RELEASE_MANY):
each one named gives back its range, as that many single RELEASEs would; a malformed one is a
protocol error that gives back none. In process: one array's data path (real volume, range
lock, write-intent log) taking writes its secondary forwarded."""

from __future__ import annotations

import pytest
import trio

from syncd.node.datapath import DataPath
from syncd.node.roles import Mode
from syncd.node.volume import Volume
from syncd.repl.proto import Frame, MsgType, ProtocolError

from .test_datapath_cancel import SIZE, Member, Node, Wire
from .test_durable_before_alone import Durable, replicas  # noqa: F401 (a fixture)


class Replies:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    def reply(self, path, req_id: int, status: int = 0, *rest) -> None:
        self.statuses.append(status)


def held(m: Member, offset: int) -> bool:
    tok = m.lock.try_acquire(offset, 4096)
    if tok is None:
        return True
    m.lock.release(tok)
    return False


async def test_one_release_naming_several_forwarded_writes_gives_back_each_range(replicas):  # noqa: F811
    here, peer, intent = replicas(Volume)
    async with trio.open_nursery() as nursery:
        g = Durable(Node(Wire(peer), nursery))
        g.mode = Mode.ATTACHED
        g.changed(peer_has_all=True, started=True, peer_ready=True)
        dp = DataPath(g)
        m = Member(g, here, intent)
        await intent.mark(0, SIZE)
        link = Replies()
        offsets = {10: 0, 11: 8192, 12: 65536}
        for req_id, off in offsets.items():
            assert dp.forwarded_fast(link, None, Frame.write(req_id, 1, 1, 1, off, b"\x11" * 4096, forwarded=True), m)
        assert link.statuses == [0, 0, 0] and all(held(m, off) for off in offsets.values())
        # Malformed (a status and 7 bytes): a protocol error, and every range stays held.
        bad = Frame(MsgType.RELEASE, 0, 10, 1, 1, payload=bytes(4) + bytes(7))
        with pytest.raises(ProtocolError):
            dp.handle_release(bad)
        assert all(held(m, off) for off in offsets.values()) and set(dp.forwarded) == set(offsets)
        # One frame names 10 and 12 (and 99, which this array never took: ignored).
        dp.handle_release(Frame.release(10, 1, 1, 0, [99, 12]))
        assert not held(m, 0) and held(m, 8192) and not held(m, 65536)
        assert set(dp.forwarded) == {11} and g.mirroring
        dp.handle_release(Frame.release(11, 1, 1))  # a version-1 RELEASE
        assert not held(m, 8192) and not dp.forwarded
        assert here.read_sync(65536, 4096) == b"\x11" * 4096
        nursery.cancel_scope.cancel()
