"""Review of bbdd57a: ``Group._recover`` waits up to 2 x io_timeout for ``Node.exchanged`` as it
was when the wait began. When that link session ends before its exchange is answered (the link
drops: the answer never comes), the old ``_recover`` keeps waiting on the old session's event,
which nothing sets any more; meanwhile the next session's exchange is answered, its own resync
runs and the pair is in sync. When the old wait runs out, the old ``_recover`` calls
``lose_peer``: the in-sync pair is fenced and the healthy link reset.

In process, two real Nodes as in test_secondary_suspect_before_in_sync."""

from __future__ import annotations

import trio

from syncd.node.roles import Mode
from syncd.repl.proto import MsgType

from . import test_secondary_suspect_before_in_sync as base
from .test_secondary_suspect_before_in_sync import first_run, linked, release, until


async def test_a_resync_of_an_ended_link_session_does_not_fence_the_next_ones(tmp_path, monkeypatch):
    orig = base.node_toml

    def toml(*a, **k):
        # io_timeout 2 s: the old session's wait (4 s) outlives the start fence (lease 2 s)
        k["extra_link"] = {"insecure": True, "path_timeout": 0.25, "io_timeout": 2.0}
        return orig(*a, **k)
    monkeypatch.setattr(base, "node_toml", toml)
    await first_run(tmp_path / "A", "A", "B", "primary", mark=False)
    await first_run(tmp_path / "B", "B", "A", "secondary", mark=False)
    async with trio.open_nursery() as nursery:
        a, b = await linked(nursery, tmp_path)
        try:
            ga = a.groups["rcg1"]
            # Session 1: the answer to A's exchange is lost with the link.
            lost = trio.Event()  # never set
            a.link.hold = lambda f: lost if f.type == MsgType.CONTROL and b"sync_groups" in bytes(f.payload) else None
            b._on_link_up()
            a._on_link_up()
            await until(lambda: ga.mode is Mode.SYNCING, 1.0)
            assert ga.mode is Mode.SYNCING and not a.exchanged.is_set()
            started = trio.current_time()
            # The link drops and comes back: session 2, whose exchange is answered.
            for n in (a, b):
                n._on_link_down()
            a.link.hold = lambda f: None
            await trio.sleep(0.1)
            b._on_link_up()
            a._on_link_up()
            await until(lambda: ga.mode is Mode.ATTACHED, 4.0)
            assert ga.mode is Mode.ATTACHED, ga.state
            assert a.exchanged.is_set()
            # Past the old session's wait (2 x io_timeout after it began).
            await until(lambda: a.link.resets, max(0.0, started + 5.0 - trio.current_time()))
            assert not a.link.resets, f"the healthy session was reset: {a.link.resets}"
            assert ga.mode is Mode.ATTACHED, ga.state
        finally:
            nursery.cancel_scope.cancel()
            for n in (a, b):
                release(n)
