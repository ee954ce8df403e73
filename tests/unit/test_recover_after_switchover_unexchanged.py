"""Review of bbdd57a: ``Node.exchanged`` is set only by this node's own state exchange of the
link session. A node that is secondary when the link comes up needs nothing from that
exchange, and nothing runs it again when a switchover makes it primary in the same session;
if its exchange failed (not answered within io_timeout: the link stayed up), the pair is in sync
after the switchover, and the first resync the new primary starts (online verify's fix, a
volume admitted) waits 2 x io_timeout for an answer that never comes, then loses the in-sync
peer and resets the healthy link.

In process, two real Nodes as in test_secondary_suspect_before_in_sync."""

from __future__ import annotations

import trio

from syncd.node import operations
from syncd.node.roles import Mode
from syncd.repl.link import LinkTimeout
from syncd.repl.proto import MsgType

from .test_secondary_suspect_before_in_sync import first_run, linked, release, until


async def test_a_resync_after_a_switchover_does_not_wait_for_an_exchange_nobody_runs(tmp_path):
    await first_run(tmp_path / "A", "A", "B", "primary", mark=False)
    await first_run(tmp_path / "B", "B", "A", "secondary", mark=False)
    async with trio.open_nursery() as nursery:
        a, b = await linked(nursery, tmp_path)
        try:
            ga, gb = a.groups["rcg1"], b.groups["rcg1"]
            # B's own exchange (it is secondary: nothing in it matters to it now) is not answered
            # within io_timeout (a slow save at A, a path retransmitting): the link stays up.
            orig, failed = b.link.request, []

            async def request(frame, timeout=None):  # noqa: ASYNC109 (the link's signature)
                if not failed and frame.type == MsgType.CONTROL and b"sync_groups" in bytes(frame.payload):
                    failed.append(frame)
                    await trio.sleep(b.cfg.link.io_timeout)
                    raise LinkTimeout("peer did not answer CONTROL within 0.5s")
                return await orig(frame, timeout)

            b.link.request = request
            b._on_link_up()
            a._on_link_up()
            await until(lambda: ga.mode is Mode.ATTACHED and not ga.state.recovering, 3.0)
            assert ga.mode is Mode.ATTACHED and failed and not b.exchanged.is_set()
            await trio.sleep(0.1)
            await operations.switchover(a, ga)
            await until(lambda: gb.role == "primary" and gb.mode is Mode.ATTACHED, 3.0)
            assert gb.role == "primary" and gb.mode is Mode.ATTACHED, gb.state
            # Online verify at B found region 0 different and fixes it (verify.fix_regions).
            mb = gb.members["vv1"]
            gb.resync_regions(mb, [0])
            await until(lambda: gb.mode is Mode.ATTACHED or b.link.resets, 3.0)
            assert not b.link.resets, f"the healthy in-sync session was reset: {b.link.resets}"
            assert gb.mode is Mode.ATTACHED and not mb.dirty.count, gb.state
        finally:
            nursery.cancel_scope.cancel()
            for n in (a, b):
                release(n)
