"""`syncd lab scenario NAME --topology uniform|non-uniform`: one failure scenario of the seed's
lists, end to end, in the local lab, with a verifying workload on every host (through its shim).

It builds a lab with a quorum witness and one host shim per site, runs the workload, injects the
fault with ``lab fail``, holds it, heals it with ``lab heal``, waits for the group to be in sync,
then prints per host: the ALUA states its shim saw on each path over time, the longest I/O pause,
the I/O errors the application saw, acknowledged writes lost (must be 0) and the replica
comparison.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import trio

from ..ctl import call
from ..host import host_status
from .rig import LabError, lab_down, lab_fail, lab_heal, lab_kill, lab_start, lab_up, site_proximity
from .workload import History, check_file, run_writer


@dataclass(frozen=True)
class Play:
    """One scenario: ``lab fail FAULT [SITE]``, held, then ``lab heal`` (or the special cases)."""

    fault: str
    site: str | None = None
    needs_root: bool = False
    host_fails: bool = False  # the host at SITE is part of what fails (its applications stop)
    seed: str = ""


# The seed's two lists (Active Peer Persistence, Active Sync) and the witness cases.
SCENARIOS = {
    "primary-failure": Play("primary", seed="primary array failure"),
    "secondary-failure": Play("secondary", seed="secondary array failure"),
    "link-failure": Play("link", seed="replication link failure"),
    "disk-failure": Play("disk", "A", needs_root=True, seed="RAID set or metadata failure (primary)"),
    "host-disconnect": Play("host-link", "A", seed="host disconnect (host a loses its paths to array A)"),
    "primary-reboot": Play("primary-reboot", "A", seed="primary array reboot/shutdown"),
    "secondary-reboot": Play("secondary-reboot", "B", seed="secondary array reboot/shutdown"),
    "cluster-server-failure": Play("host", "A", host_fails=True, seed="cluster server failure (host a)"),
    "data-center-failure": Play("site", "A", host_fails=True, seed="data center failure (site A)"),
    "witness-failure": Play("witness", seed="quorum witness failure"),
    "isolated-primary": Play("isolate", "A", seed="primary cut from its peer and the witness"),
    "isolated-secondary": Play("isolate", "B", seed="secondary cut from its peer and the witness"),
    "switchover": Play("switchover", seed="planned switchover under load"),
}
SHORT = {"active/optimized": "AO", "active/non-optimized": "ANO", "transitioning": "T",
         "unavailable": "U", "standby": "S", "unreachable": "-"}
QD = 4  # writes each host's workload keeps in flight: one per writer, each on blocks of its own
FAST = {"ping_interval": 0.1, "path_timeout": 0.6, "io_timeout": 2.0, "lease": 1.0, "lease_margin": 0.2}
WITNESS = {"interval": 0.2, "owner_lease": 1.0, "grace": 2.0, "margin": 0.2}


def seed_paths(topology: str, site: str, arrays: list[str], roles: dict[str, str]) -> dict[str, str]:
    """The path states the seed gives the host at ``site`` when both arrays serve: active/
    optimized to the arrays its proximity names (uniform: its own site's, the proximity being
    its local array's role in the group's natural direction; non-uniform: "all"), active/
    non-optimized to the other. ``roles``: each array's role in the natural direction."""
    prox = site_proximity(topology, site)
    return {a: "AO" if prox in ("all", roles[a]) else "ANO" for a in arrays}


def _usable(states) -> bool:
    """A path the shim sends writes on: active (optimized or not) at the highest epoch shown."""
    if not states:
        return False
    top = max(ep for _, _, ep in states)
    return any(st in ("AO", "ANO") and ep == top for _, st, ep in states)


def held_by_fencing(timeline: list, waits: list, since: float, lo: float, hi: float, writers: int = QD) -> bool:
    """Whether no write of a host completing from ``lo`` to ``hi`` was the shim's rule for
    writes it re-issued after losing a path, not a loss of access: a newer write to the same
    blocks waits until the lost array can no longer apply the old copy (``stale_write_bound``;
    docs/failure-matrix.md). So: a usable path all along, and since the fault (``since``) at
    least one wait of that kind per writer of the workload (``waits``: the shim's
    ``quarantine_waits``, sampled as (time, count) when it changes). Each writer keeps
    rewriting blocks of its own, so once each has drawn a block it had in flight to the lost
    array, the host writes nothing until the bound passes."""
    def at(series: list, ts: float):
        return ([v for t, v in series if t <= ts] or [None])[-1]

    states = [at(timeline, lo)] + [st for t, st in timeline if lo < t < hi]
    before, after = at(waits, since), at(waits, hi)
    return (all(_usable(st) for st in states) and before is not None and after is not None
            and after - before >= writers)


def _latest(timeline: list) -> dict[str, str] | None:
    if not timeline or timeline[-1][1] is None:
        return None
    return {a: st for a, st, _ in timeline[-1][1]}


def _wait_paths(timeline: dict, want: dict, deadline: float) -> bool:
    """Until every host's latest sample shows the wanted states, or the deadline."""
    while time.monotonic() < deadline:
        if all(_latest(timeline[s]) == w for s, w in want.items()):
            return True
        time.sleep(0.1)
    return all(_latest(timeline[s]) == w for s, w in want.items())


def run_scenario(d: str, name: str, topology: str = "uniform", hold: float = 5.0) -> dict:
    if name not in SCENARIOS:
        raise LabError(f"unknown scenario {name!r}; scenarios: {', '.join(SCENARIOS)}")
    play = SCENARIOS[name]
    if play.needs_root and os.geteuid() != 0:
        raise LabError(f"scenario {name} fails a real disk (loop device): run it as root")
    lab = lab_up(d, size="16MiB", nvolumes=1, npaths=2, link_opts=FAST, witness=WITNESS, loop=play.needs_root,
                 topology=topology, timeout=60)
    try:
        time.sleep(1.0)  # the witness has heard that B is in sync
        return _play(lab, name, play, topology, hold)
    finally:
        lab_down(d)


def _inject(lab: dict, play: Play) -> None:
    d = lab["dir"]
    if play.fault == "switchover":
        call(lab["nodes"]["A"]["admin_socket"], "setrcopygroup", {"action": "switchover", "group": lab["group"]},
             timeout=30)
    elif play.fault.endswith("-reboot"):
        lab_kill(d, play.site, signal.SIGTERM)  # a clean shutdown: the node hands its role over first
    else:
        lab_fail(d, play.fault, play.site)


def _heal(lab: dict, play: Play) -> None:
    d = lab["dir"]
    if play.fault == "switchover":
        return
    if play.fault.endswith("-reboot"):
        lab_start(d, play.site)
    else:
        lab_heal(d, play.fault, play.site)


def _play(lab: dict, name: str, play: Play, topology: str, hold: float) -> dict:
    hosts = lab["hosts"]
    hist = {s: History() for s in hosts}
    timeline: dict[str, list] = {s: [] for s in hosts}
    waits: dict[str, list] = {s: [] for s in hosts}  # (t, the shim's quarantine_waits) when it changes
    sampling = {"on": True}

    def sample():
        while sampling["on"]:
            for s, h in hosts.items():
                try:
                    st = host_status(h["admin_socket"])
                    states = tuple((p["array"], SHORT.get(p["alua"], p["alua"]), p["epoch"])
                                   for p in st["volumes"][0]["paths"])
                    n = st["volumes"][0]["stats"]["quarantine_waits"]
                    if not waits[s] or waits[s][-1][1] != n:
                        waits[s].append((time.monotonic(), n))
                except (OSError, KeyError, IndexError, ValueError):
                    states = None
                if not timeline[s] or timeline[s][-1][1] != states:
                    timeline[s].append((time.monotonic(), states))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    start_roles = {"A": "primary", "B": "secondary"}
    want_before = {s: seed_paths(topology, s, h["arrays"], start_roles) for s, h in hosts.items()}
    if not _wait_paths(timeline, want_before, time.monotonic() + 20):
        raise LabError(f"scenario {name}: before the fault the hosts' paths were "
                       f"{ {s: _latest(timeline[s]) for s in hosts} }, not the seed's {want_before}")
    t = {}
    scopes = {s: trio.CancelScope() for s in hosts}
    failed_host = play.site if play.host_fails else None

    def inject():
        t["fault"] = time.monotonic()
        if failed_host in scopes:  # the server dies: its applications stop with it
            trio.from_thread.run_sync(scopes[failed_host].cancel)
        _inject(lab, play)
        time.sleep(hold)
        t["heal"] = time.monotonic()
        _heal(lab, play)

    async def writer(s, uri, lo, w):
        with scopes[s]:
            await run_writer(uri, hist[s], writer=w, blocks=range(lo, lo + 1024), duration=hold + 8.0, qd=QD)
        hist[s].finish()

    async def main():
        async with trio.open_nursery() as n:
            for i, (s, h) in enumerate(hosts.items()):
                n.start_soon(writer, s, h["volumes"]["vv1"], i * 1024, i + 1)
            await trio.sleep(2.0)
            await trio.to_thread.run_sync(inject)

    trio.run(main)
    # Recovery: whichever array is primary ends attached and in sync.
    deadline = time.monotonic() + 60
    while True:
        try:
            gs = {s: call(n["admin_socket"], "showrcopy", {"group": lab["group"]})["groups"][0]
                  for s, n in lab["nodes"].items()}
            prim = [g for g in gs.values() if g["role"] == "primary"]
            if (len(prim) == 1 and prim[0]["peer_mode"] == "attached"
                    and all(v["sync_status"] == "synced" for v in prim[0]["volumes"])):
                break
        except Exception:  # noqa: BLE001 - a node restarting
            pass
        if time.monotonic() > deadline:
            raise LabError(f"scenario {name}: the group did not get back in sync within 60s")
        time.sleep(0.2)
    # Once recovered, every path is back to the seed's state. Proximity names the site by the
    # group's natural direction, so a uniform host's optimized array is its own site's whatever
    # roles the arrays now hold (a reversed group's primary is its natural secondary).
    flip = {"primary": "secondary", "secondary": "primary"}
    roles = {s: flip[g["role"]] if g["role_label"].endswith("-rev") else g["role"] for s, g in gs.items()}
    want_after = {s: seed_paths(topology, s, h["arrays"], roles) for s, h in hosts.items()}
    paths_after_ok = _wait_paths(timeline, want_after, time.monotonic() + 20)
    sampling["on"] = False
    rows = []
    paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in lab["nodes"]}
    t0 = t["fault"]
    for i, (s, h) in enumerate(hosts.items()):
        hs = hist[s]
        lost = sum(len(check_file(paths[r], hs, writer=i + 1)) for r in paths)
        tl = []
        for ts, states in timeline[s]:
            label = "shim down" if states is None else " ".join(f"{a}:{st}@{ep}" for a, st, ep in states)
            tl.append((round(ts - t0, 2), label))
        rows.append({"host": h["name"], "site": s, "arrays": h["arrays"], "alua": tl, "failed": s == failed_host,
                     "proximity": site_proximity(topology, s), "paths_before": want_before[s],
                     "paths_after": {"want": want_after[s], "seen": _latest(timeline[s])},
                     "longest_pause_s": round(hs.longest_pause(since=t0), 2), "slowest_write_s": round(hs.slowest, 2),
                     "io_errors": len(hs.errors), "acked": hs.acked_count(), "acked_lost": lost,
                     # writes completed while the fault held (after the first 1.5 s): none = lost access
                     "acked_in_fault": sum(1 for x in hs.acked_times if t0 + 1.5 < x < t["heal"]),
                     # ... unless every writer waited behind a write re-issued after the lost path
                     "held_by_fencing": held_by_fencing(timeline[s], waits[s], t0, t0 + 1.5, t["heal"]),
                     "series": {"acked": [round(x - t0, 4) for x in hs.acked_times],
                                "errors": [round(e[0] - t0, 4) for e in hs.errors],
                                "paths": [[round(ts - t0, 3), list(map(list, st)) if st is not None else None]
                                          for ts, st in timeline[s]]}})
    with open(paths["A"], "rb") as fa, open(paths["B"], "rb") as fb:
        identical = fa.read() == fb.read()
    return {"scenario": name, "seed": play.seed, "topology": topology, "hosts": rows, "replicas_identical": identical,
            "paths_as_seed": paths_after_ok, "roles_after": roles,
            "fault_at": "t=0", "heal_at_s": round(t["heal"] - t0, 2)}


def print_result(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=None if os.isatty(1) else 200)
    tb = Table(title=f"scenario {r['scenario']} ({r['topology']}); fault at t=0, heal at t={r['heal_at_s']}s")
    for col in ("host", "arrays", "path states seen (t s: array:state@epoch)", "longest pause s", "slowest write s",
                "I/O errors", "acked", "acked lost"):
        tb.add_column(col)
    for h in r["hosts"]:
        tl = "\n".join(f"{t:>6}: {lbl}" for t, lbl in h["alua"])
        tb.add_row(h["host"] + (" (failed)" if h["failed"] else ""), "+".join(h["arrays"]), tl,
                   str(h["longest_pause_s"]), str(h["slowest_write_s"]), str(h["io_errors"]), str(h["acked"]),
                   str(h["acked_lost"]))
    c.print(tb)
    c.print("replicas identical after recovery: "
            + ("[green]yes[/green]" if r["replicas_identical"] else "[red]NO[/red]"))
    c.print("paths as the seed says before the fault and after recovery: "
            + ("[green]yes[/green]" if r["paths_as_seed"] else "[red]NO[/red]")
            + "; " + ", ".join(f"{h['host']} (proximity {h['proximity']}): "
                               + " ".join(f"{a}:{st}" for a, st in h["paths_after"]["want"].items())
                               for h in r["hosts"]))
