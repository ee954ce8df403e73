"""The storage node's metrics, read from the node's own objects when scraped (in its loop).

Where each number comes from (docs/design.md, "Metrics"):
* volume requests, bytes, errors, latency, in flight: ``Volume.io_stats``, added to by the NBD
  server per request (header read -> reply queued), whatever the volume's group or role;
* replication round trips: the same object, added to by the data path (a write mirrored by the
  primary: sent -> the peer's answer; a write forwarded by the secondary: sent -> the primary's);
* link paths: ``repl.link.Path`` (state, keepalive RTT as the link smooths it, bytes, resets);
* groups: the role machine's state (role, epoch, mode, failsafe), the group's persisted status;
* volumes in groups: dirty/out-of-sync bitmaps and the resync's progress (``resync_progress``);
* ALUA per host and volume: what ``showpaths`` shows (``Group.alua``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import __version__, netio
from ..nbd.export import ALUA_ACTIVE_OPTIMIZED, ALUA_NAMES
from .expose import Families, io_families

if TYPE_CHECKING:
    from ..node.daemon import Node

ROLES = ("primary", "secondary")
STATUSES = ("started", "stopped", "failsafe", "split-brain")
SYNC_STATES = ("synced", "syncing", "not-synced", "stopped")
ALUA_STATES = tuple(ALUA_NAMES.values())


def _modes() -> tuple[str, ...]:
    from ..node.roles import Mode

    return tuple(m.value for m in Mode)


def collect_node(node: "Node", fam: Families) -> None:
    from ..node.resync import resync_progress

    n = node.cfg.name
    fam.gauge("syncd_node_info", "This storage node (value 1)", ["node", "version"]).add_metric([n, __version__], 1)
    fam.gauge("syncd_node_start_time_seconds", "When this node started (Unix time)", ["node"]).add_metric(
        [n], node.started_at)
    for k, what in (("resync_bytes", "sent to the peer by resync"),
                    ("compared_bytes", "compared by digest with the peer"),
                    ("pulled_bytes", "fetched back from the peer after a power cut")):
        fam.counter(f"syncd_node_{k.replace('_bytes', '')}_bytes", f"Bytes {what}", ["node"]).add_metric(
            [n], node.stats[k])

    bp = netio.poller
    fam.gauge("syncd_node_busy_poll_window_seconds",
              "How long the event loop now polls for input before it sleeps ([node] busy_poll_us is the most)",
              ["node"]).add_metric([n], bp.window)
    fam.counter("syncd_node_busy_poll_seconds", "Time the event loop spent polling for input instead of sleeping",
                ["node"]).add_metric([n], bp.polling_s)
    fam.counter("syncd_node_busy_polls", "Times the event loop polled for input before sleeping",
                ["node"]).add_metric([n], bp.polls)
    fam.counter("syncd_node_busy_polls_caught", "Of those, times input came while it polled",
                ["node"]).add_metric([n], bp.caught)
    fam.counter("syncd_node_busy_poll_pauses", "Times the event loop stopped polling for a while because a "
                "CPU-bound process shares its CPU", ["node"]).add_metric([n], bp.backoffs)

    # -- witness -----------------------------------------------------------------------------------
    w = node.witness
    fam.gauge("syncd_node_witness_configured", "1 when this node has a quorum witness", ["node"]).add_metric(
        [n], 1 if w is not None else 0)
    if w is not None:
        fam.gauge("syncd_node_witness_reachable", "1 while this node reaches its quorum witness",
                  ["node"]).add_metric([n], 1 if w.reachable else 0)

    # -- link --------------------------------------------------------------------------------------
    link = node.link
    if link is not None:
        peer = link.cfg.peer
        lk = ["node", "peer"]
        fam.gauge("syncd_link_up", "1 while the replication link has a path up", lk).add_metric(
            [n, peer], 1 if link.up else 0)
        fam.gauge("syncd_link_inflight_bytes", "Bytes of data requests in flight to the peer (flow control)",
                  lk).add_metric([n, peer], link.credit.used)
        limit = link.cfg.max_rtt_ms / 1000
        fam.gauge("syncd_link_rtt_supported_max_seconds",
                  "The largest round trip supported (link.max_rtt_ms; the seed's 10 ms)", lk).add_metric(
                      [n, peer], limit)
        pl = ["node", "peer", "path"]
        for p in link.paths:
            key = [n, peer, str(p.index)]
            fam.gauge("syncd_link_path_info", "A replication path (value 1) and its addresses",
                      [*pl, "local", "remote"]).add_metric([*key, "%s:%d" % p.local, "%s:%d" % p.peer], 1)
            fam.gauge("syncd_link_path_up", "1 while this replication path is up", pl).add_metric(
                key, 1 if p.state == "up" else 0)
            rtt = p.rtt_ms if p.state == "up" else None
            if rtt is not None:
                fam.gauge("syncd_link_path_rtt_seconds", "Keepalive round trip of the path (smoothed)",
                          pl).add_metric(key, rtt / 1000)
                fam.gauge("syncd_link_path_rtt_max_seconds", "Slowest keepalive round trip since the path came up",
                          pl).add_metric(key, p.rtt_max_ms / 1000)
            fam.gauge("syncd_link_rtt_above_supported",
                      "1 while the path's round trip exceeds the supported maximum (link.max_rtt_ms, 10 ms); "
                      "the same judgement as the rtt warning event (settled, with hysteresis)",
                      pl).add_metric(key, 1 if rtt is not None and p.rtt_high else 0)
            fam.counter("syncd_link_path_sent_bytes", "Bytes sent on the path", pl).add_metric(key, p.tx_bytes)
            fam.counter("syncd_link_path_received_bytes", "Bytes received on the path", pl).add_metric(key, p.rx_bytes)
            fam.counter("syncd_link_path_resets", "Times the path went down after being up", pl).add_metric(
                key, p.resets)

    # -- volumes: what hosts asked ---------------------------------------------------------------
    vl = ["node", "group", "volume"]
    for v in node.volumes.values():
        m = node.member_of.get(v.name)
        key = [n, m.group.name if m is not None else "", v.name]
        io_families(fam, "syncd_volume", vl, key, v.io_stats, "by hosts")
        for kind, h in (("mirror", v.io_stats.mirror), ("forward", v.io_stats.forward)):
            fam.observe("syncd_volume_replication_duration_seconds",
                        "Peer round trip of a replicated write: mirrored by the primary, forwarded by the secondary",
                        [*vl, "kind"], [*key, kind], h)
        fam.gauge("syncd_volume_size_bytes", "Volume size", vl).add_metric(key, v.size)

    # -- groups ----------------------------------------------------------------------------------
    gl = ["node", "group"]
    modes = _modes()
    for g in node.groups.values():
        key = [n, g.name]
        st = g.st
        fam.enum("syncd_group_role", "Role of the group on this array (1 for the current one)", gl, ROLES, key, g.role)
        fam.gauge("syncd_group_epoch", "Epoch of the group on this array", gl).add_metric(key, g.epoch)
        fam.gauge("syncd_group_failsafe", "1 while the group is in failsafe here (serves nothing)", gl).add_metric(
            key, 1 if st.failsafe else 0)
        fam.gauge("syncd_group_split_brain", "1 while the group is in split brain (operator must discard one side)",
                  gl).add_metric(key, 1 if st.split_brain else 0)
        fam.gauge("syncd_group_serving", "1 while this array serves the group's volumes", gl).add_metric(
            key, 1 if g.may_serve() else 0)
        status = ("split-brain" if st.split_brain else "failsafe" if st.failsafe
                  else "started" if st.started else "stopped")
        fam.enum("syncd_group_status", "Status of the group (as showrcopy)", gl, STATUSES, key, status)
        fam.enum("syncd_group_mode", "What the group is doing on this array (showrcopy peer_mode/mode)", gl, modes,
                 key, g.mode.value)
        ml = ["node", "group", "volume"]
        for m in g.members.values():
            mk = [n, g.name, m.st.local]
            status_, pct = m.sync_status()
            fam.enum("syncd_volume_sync_state", "Sync state of the volume's replicas (as showrcopy)", ml, SYNC_STATES,
                     mk, status_)
            region = m.dirty.region  # counted in whole regions (the last one may be shorter)
            bits = m.dirty if g.role == "primary" else m.oos
            fam.gauge("syncd_volume_dirty_bytes",
                      "Bytes in regions the peer lacks (primary) or this replica lacks (secondary)",
                      ml).add_metric(mk, min(bits.count * region, m.st.size))
            rem, rate = 0, 0.0
            if g.role == "primary":
                rem = min(m.dirty.count * region, m.st.size) if st.started else 0
                prog = resync_progress(m)
                if g.mode.value == "syncing":
                    rate = float(prog["rate_bps"] or 0.0)
            fam.gauge("syncd_volume_resync_remaining_bytes", "Bytes the resync still has to copy (primary)",
                      ml).add_metric(mk, rem)
            fam.gauge("syncd_volume_resync_rate_bytes_per_second",
                      "Average rate of the running resync since it started (primary; 0 when none runs)",
                      ml).add_metric(mk, rate)
            fam.gauge("syncd_volume_sync_ratio", "Share of the volume in sync (showrcopy sync_percent / 100)",
                      ml).add_metric(mk, pct / 100)
            il = m.intent.stats()
            fam.gauge("syncd_volume_intent_hot_extents",
                      "Extents of the write-intent log kept marked while written (the hot set)", ml).add_metric(
                mk, il["hot_extents"])
            fam.gauge("syncd_volume_intent_hot_extents_max",
                      "The hot set's budget ([intent] hot / extent): beyond, least recently written extents are "
                      "cleared", ml).add_metric(mk, il["hot_extents_max"])
            fam.counter("syncd_volume_intent_marks", "Extents marked in the write-intent log (a write to a cold "
                        "extent)", ml).add_metric(mk, il["marks"])
            fam.counter("syncd_volume_intent_marked_ahead", "Of the extents marked, those marked in the same "
                        "transaction as a cold neighbour ([intent] ahead), not for a write of their own",
                        ml).add_metric(mk, il["marked_ahead"])
            fam.counter("syncd_volume_intent_metadata_syncs", "fdatasyncs of the write-intent log (one per "
                        "transaction of marks)", ml).add_metric(mk, il["metadata_syncs"])
            fam.counter("syncd_volume_intent_evictions", "Extents cleared from the hot set by its budget (LRU)",
                        ml).add_metric(mk, il["evictions"])

    # -- ALUA per host and volume ----------------------------------------------------------------
    al = ["node", "host", "group", "volume"]
    for h in sorted(node.state.hosts):
        for vol in sorted(node.hosts.volumes_for(h)):
            m = node.member_of.get(vol)
            if m is None:
                state, gname, epoch = ALUA_NAMES[ALUA_ACTIVE_OPTIMIZED], "", 0
            else:
                a = m.group.alua(h)
                state, gname, epoch = ALUA_NAMES[a.state], m.group.name, a.epoch
            fam.enum("syncd_host_volume_alua_state", "ALUA state this array shows the host for the volume", al,
                     ALUA_STATES, [n, h, gname, vol], state)
            fam.gauge("syncd_host_volume_alua_epoch", "Epoch this array shows the host for the volume",
                      al).add_metric([n, h, gname, vol], epoch)
