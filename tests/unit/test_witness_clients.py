"""What the node's witness clients (built-in and etcd) keep about reaching the witness, in
virtual time: one owner (``reach.WitnessReach``) of when it last answered, the last error, and
the connected/lost edges the node is told of."""

from __future__ import annotations

import trio

from syncd.witness.reach import UNHEARD_INTERVALS, WitnessReach


async def test_the_node_hears_each_edge_once_and_reachability_lapses_after_unheard_intervals(autojump_clock):
    edges: list[bool | None] = []
    r = WitnessReach(0.5, edges.append)
    assert (r.connected, r.reachable, r.last_heard_s_ago(), r.lost_for()) == (None, False, None, float("inf"))
    r._ok()
    r._ok()
    assert edges == [True] and r.reachable and r.last_heard_s_ago() == 0.0
    await trio.sleep(UNHEARD_INTERVALS * 0.5 + 0.01)
    assert not r.reachable and r.connected  # silent: not reachable, though nothing failed yet
    r._failed(OSError("connection refused"))
    r._failed(trio.TooSlowError())
    assert edges == [True, False] and r.last_error == "TooSlowError"  # an error without text is named
    r._ok()
    assert edges == [True, False, True] and r.last_error == "" and r.reachable
