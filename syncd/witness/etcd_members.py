"""The etcd cluster's members as one node sees them, for ``showrcopy witness``.

Each endpoint is asked for its own status (``EtcdClient.member_status``: never passed on to
another member), all at once, each with a short deadline. The witness client gathers them in
a task of its own and keeps the last gathering with its time; the admin answer reads that and
never waits on etcd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .etcd import EtcdError, EtcdUnreachable, MemberStatus


class StatusProbe(Protocol):
    """What the gathering needs of etcd (``etcd.EtcdClient``, or a model in tests)."""

    async def member_status(self, endpoint: str, within: float) -> MemberStatus: ...


@dataclass(frozen=True)
class MemberHealth:
    """One endpoint at one gathering: its status, or why it gave none."""

    endpoint: str
    status: MemberStatus | None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        s = self.status
        if s is None:
            return {"endpoint": self.endpoint, "reachable": False, "id": None, "leader": False, "leader_id": None,
                    "raft_term": None, "raft_index": None, "db_size": None, "version": None, "alarms": [],
                    "error": self.error}
        # Member ids in hex, as etcdctl prints them (and as 64-bit numbers survive any JSON reader).
        return {"endpoint": self.endpoint, "reachable": True, "id": f"{s.member_id:x}", "leader": s.is_leader,
                "leader_id": f"{s.leader:x}" if s.leader else None, "raft_term": s.raft_term,
                "raft_index": s.raft_index, "db_size": s.db_size, "version": s.version, "alarms": list(s.errors),
                "error": ""}


@dataclass(frozen=True)
class Gathering:
    at: float  # trio time at which the last answer (or deadline) came
    members: tuple[MemberHealth, ...]  # in the configured endpoints' order


async def gather(probe: StatusProbe, endpoints: Sequence[str], within: float) -> Gathering:
    """Every endpoint's status, asked concurrently; one that does not answer within ``within``
    seconds (down, partitioned, refusing) is reported with its error, not waited for longer."""
    found: dict[str, MemberHealth] = {}

    async def ask(endpoint: str) -> None:
        # The probe has a deadline of its own; this one is the gathering's promise to its caller.
        found[endpoint] = MemberHealth(endpoint, None, f"no answer within {within:.2f}s")
        with trio.move_on_after(within):
            try:
                found[endpoint] = MemberHealth(endpoint, await probe.member_status(endpoint, within))
            except (EtcdUnreachable, EtcdError, ValueError, TypeError) as e:  # ValueError, TypeError: garbled
                found[endpoint] = MemberHealth(endpoint, None, str(e) or type(e).__name__)

    async with trio.open_nursery() as nursery:
        for endpoint in endpoints:
            nursery.start_soon(ask, endpoint)
    return Gathering(trio.current_time(), tuple(found[e] for e in endpoints))
