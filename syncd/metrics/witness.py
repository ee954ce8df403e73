"""The quorum witness's metrics, read from the witness's own objects when scraped."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .expose import Families

if TYPE_CHECKING:
    from ..witness.server import Witness


def collect_witness(wit: "Witness", fam: Families) -> None:
    name = wit.cfg.name
    fam.gauge("syncd_witness_info", "This quorum witness (value 1)", ["witness"]).add_metric([name], 1)
    dec = fam.counter("syncd_witness_decisions", "Requests the witness answered, by group, request and outcome "
                      "(granted, refused, error, stale: heard too late, nothing changed; group empty for groups it "
                      "does not hold)",
                      ["witness", "group", "request", "outcome"])
    for (group, request, outcome), n in sorted(wit.decisions.items()):
        dec.add_metric([name, group, request, outcome], n)
    ses = fam.gauge("syncd_witness_sessions", "Authenticated sessions open, by array", ["witness", "node"])
    for node in sorted(set(wit.cfg.nodes) | set(wit.sessions)):
        ses.add_metric([name, node], wit.sessions.get(node, 0))
    fam.gauge("syncd_witness_connections", "Connections open (authenticated or not)", ["witness"]).add_metric(
        [name], wit.connections)
    fam.counter("syncd_witness_refused_handshakes", "Peers that failed the security handshake",
                ["witness"]).add_metric([name], wit.refused_handshakes)
    fam.counter("syncd_witness_refused_connections", "Connections closed at once (connection limits reached)",
                ["witness"]).add_metric([name], wit.refused_connections)
    for g in sorted(wit.state.groups.values(), key=lambda r: r.name):
        key = [name, g.name]
        fam.gauge("syncd_witness_group_epoch", "Epoch the witness holds for the group",
                  ["witness", "group"]).add_metric(key, g.epoch)
        owner = fam.gauge("syncd_witness_group_owner", "Owner the witness holds for the group (1 for it)",
                          ["witness", "group", "node"])
        for m in g.members:
            owner.add_metric([*key, m], 1 if m == g.owner else 0)
        fam.gauge("syncd_witness_group_failover_disabled",
                  "1 while failover is disabled for the group: the witness lost the owner while the peer "
                  "still reached it "
                  "(the owner is pre-elected)",
                  ["witness", "group"]).add_metric(key, 1 if g.failover_disabled else 0)
