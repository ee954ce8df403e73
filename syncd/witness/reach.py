"""Whether the node reaches its quorum witness: the bookkeeping both backends' clients share
(``client.WitnessClient`` for the built-in witness, ``etcd_node.EtcdWitnessClient`` for etcd).

It keeps when the witness last answered, the last error, and the connected/lost state whose
changes are reported to the node (``on_change``: the witness object's events and its log line).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

# What both clients take from the node: its groups to report, as (name, members, owner, epoch,
# report flags); the witness's record of a group after each report (group, when the report was
# sent, owner, epoch); and the connected/lost changes.
GroupsFn = Callable[[], list[tuple[str, tuple[str, str], str, int, int]]]
OnReport = Callable[[str, float, str, int], None]
OnChange = Callable[[bool | None], None]
# A request went to the witness on a connection at this time (trio's clock): whatever comes of
# it, the witness may have heard the node then (the role machine's ``WitnessSent``). The
# built-in witness's client says so; etcd's does not (see ``Node._witness_client``).
OnSent = Callable[[str, float], None]

# A witness not heard for this many report intervals is unreachable (showrcopy says so).
UNHEARD_INTERVALS = 3


# One group's epoch and report flags as they are now (None: the group is gone).
ReportFn = Callable[[str], tuple[int, int] | None]


def report_now(groups_fn: GroupsFn, name: str) -> tuple[int, int] | None:
    """``ReportFn`` read from ``groups_fn`` (a client the node gave no ``report_fn``)."""
    for group, _members, _owner, epoch, flags in groups_fn():
        if group == name:
            return epoch, flags
    return None


class WitnessReach:
    """The one owner of a witness client's reachability state; the client tells it of every
    answer (``_ok``) and every failure (``_failed``)."""

    def __init__(self, interval: float, on_change: OnChange | None) -> None:
        self._interval = interval
        self.on_change = on_change  # (connected): the witness came up or was lost
        self.last_ok: float | None = None  # trio time of the last answered request
        self.last_error = ""
        self.connected: bool | None = None  # None until the first attempt ended
        self.on_sent: OnSent | None = None  # set by the node
        # Set by the node: one group's report without building every group's (``_report_now``).
        self.report_fn: ReportFn | None = None

    def _set_connected(self, up: bool) -> None:
        if self.connected is not up:
            self.connected = up
            if self.on_change is not None:
                self.on_change(up)

    def _report_now(self, groups_fn: GroupsFn, name: str) -> tuple[int, int] | None:
        """Group ``name``'s epoch and report flags, read once its report holds the witness (its
        connection, its turn), not at the start of the round: a KEEP sent meanwhile for the same
        group (the link lost while the round reported other groups) must not be followed by flags
        read before it, which still said the peer was in sync. The witness would then take the
        peer for in sync again and could give it the group while this array goes on alone (found
        by the role model's random schedules)."""
        return self.report_fn(name) if self.report_fn is not None else report_now(groups_fn, name)

    def _sent(self, group: str, when: float) -> None:
        """A request about ``group`` went out on a connection at ``when``: the witness may hear
        it, answered or not (a request that could not even be put on a connection is not one)."""
        if self.on_sent is not None:
            self.on_sent(group, when)

    def _ok(self) -> None:
        """The witness answered a request (now)."""
        self.last_ok = trio.current_time()
        self.last_error = ""
        self._set_connected(True)

    def _failed(self, error: BaseException | str) -> None:
        """The witness could not be asked; ``error`` says why (kept for showrcopy)."""
        self.last_error = error if isinstance(error, str) else (str(error) or type(error).__name__)
        self._set_connected(False)

    @property
    def reachable(self) -> bool:
        return self.last_ok is not None and trio.current_time() - self.last_ok < UNHEARD_INTERVALS * self._interval

    def lost_for(self) -> float:
        """Seconds since the witness was last heard (inf if never)."""
        return float("inf") if self.last_ok is None else trio.current_time() - self.last_ok

    def last_heard_s_ago(self) -> float | None:
        return None if self.last_ok is None else round(self.lost_for(), 2)
