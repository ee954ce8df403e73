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
import threading
import time

import trio

from .ctl import call
from .host import host_status
from .lab import LabError, lab_down, lab_fail, lab_heal, lab_up
from .workload import History, check_file, run_writer

# name -> (fault, site, needs loop devices)
SCENARIOS = {
    "primary-failure": ("primary", None, False),
    "secondary-failure": ("secondary", None, False),
    "link-failure": ("link", None, False),
    "disk-failure": ("disk", "A", True),
    "primary-reboot": ("primary-reboot", None, False),
    "data-center-failure": ("site", "A", False),
    "witness-failure": ("witness", None, False),
    "isolated-primary": ("isolate", "A", False),
    "isolated-secondary": ("isolate", "B", False),
    "switchover": ("switchover", None, False),
}
SHORT = {"active/optimized": "AO", "active/non-optimized": "ANO", "transitioning": "T",
         "unavailable": "U", "standby": "S", "unreachable": "-"}
FAST = {"ping_interval": 0.1, "path_timeout": 0.6, "io_timeout": 2.0, "lease": 1.0, "lease_margin": 0.2}
WITNESS = {"interval": 0.2, "owner_lease": 1.0, "grace": 2.0, "margin": 0.2}


def run_scenario(d: str, name: str, topology: str = "uniform", hold: float = 5.0) -> dict:
    if name not in SCENARIOS:
        raise LabError(f"unknown scenario {name!r}; scenarios: {', '.join(SCENARIOS)}")
    fault, site, loop = SCENARIOS[name]
    if loop and os.geteuid() != 0:
        raise LabError(f"scenario {name} fails a real disk (loop device): run it as root")
    lab = lab_up(d, size="16MiB", nvolumes=1, npaths=2, link_opts=FAST, witness=WITNESS, loop=loop,
                 topology=topology, timeout=60)
    try:
        time.sleep(1.0)  # the witness has heard that B is in sync
        return _play(lab, name, fault, site, topology, hold)
    finally:
        lab_down(d)


def _play(lab: dict, name: str, fault: str, site: str | None, topology: str, hold: float) -> dict:
    d = lab["dir"]
    hosts = lab["hosts"]
    hist = {s: History() for s in hosts}
    timeline: dict[str, list] = {s: [] for s in hosts}
    sampling = {"on": True}

    def sample():
        while sampling["on"]:
            for s, h in hosts.items():
                try:
                    st = host_status(h["admin_socket"])
                    states = tuple((p["array"], SHORT.get(p["alua"], p["alua"]), p["epoch"]) for p in st["volumes"][0]["paths"])
                except OSError:
                    states = None
                if not timeline[s] or timeline[s][-1][1] != states:
                    timeline[s].append((time.monotonic(), states))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    t = {}

    def inject():
        t["fault"] = time.monotonic()
        if fault == "switchover":
            call(lab["nodes"]["A"]["admin_socket"], "setrcopygroup", {"action": "switchover", "group": lab["group"]}, timeout=30)
        elif fault == "primary-reboot":
            import signal

            from .lab import lab_kill

            lab_kill(d, "A", signal.SIGTERM)
        else:
            lab_fail(d, fault, site)
        time.sleep(hold)
        t["heal"] = time.monotonic()
        if fault == "primary-reboot":
            lab_heal(d, "primary", "A")
        elif fault != "switchover":
            lab_heal(d, fault, site)

    async def main():
        async with trio.open_nursery() as n:
            for i, (s, h) in enumerate(hosts.items()):
                lo = i * 1024
                n.start_soon(lambda s=s, u=h["volumes"]["vv1"], lo=lo, w=i + 1: run_writer(
                    u, hist[s], writer=w, blocks=range(lo, lo + 1024), duration=hold + 8.0, qd=4))
            await trio.sleep(2.0)
            await trio.to_thread.run_sync(inject)

    trio.run(main)
    # Recovery: whichever array is primary ends attached and in sync.
    deadline = time.monotonic() + 60
    while True:
        try:
            gs = {s: call(n["admin_socket"], "showrcopy", {"group": lab["group"]})["groups"][0] for s, n in lab["nodes"].items()}
            prim = [g for g in gs.values() if g["role"] == "primary"]
            if len(prim) == 1 and prim[0]["peer_mode"] == "attached" and all(v["sync_status"] == "synced" for v in prim[0]["volumes"]):
                break
        except Exception:  # noqa: BLE001 - a node restarting
            pass
        if time.monotonic() > deadline:
            raise LabError(f"scenario {name}: the group did not get back in sync within 60s")
        time.sleep(0.2)
    sampling["on"] = False
    rows = []
    paths = {s: lab["nodes"][s]["volumes"]["vv1"]["path"] for s in lab["nodes"]}
    for i, (s, h) in enumerate(hosts.items()):
        lost = sum(len(check_file(paths[r], hist[s], writer=i + 1)) for r in paths)
        t0 = t["fault"]
        tl = []
        for ts, states in timeline[s]:
            label = "shim down" if states is None else " ".join(f"{a}:{st}@{ep}" for a, st, ep in states)
            tl.append((round(ts - t0, 2), label))
        rows.append({"host": h["name"], "site": s, "arrays": "+".join(h["arrays"]), "alua": tl,
                     "longest_pause_s": round(hist[s].longest_pause(), 2), "io_errors": len(hist[s].errors),
                     "acked": hist[s].acked_count(), "acked_lost": lost})
    with open(paths["A"], "rb") as fa, open(paths["B"], "rb") as fb:
        identical = fa.read() == fb.read()
    return {"scenario": name, "topology": topology, "hosts": rows, "replicas_identical": identical,
            "fault_at": "t=0", "heal_at_s": round(t["heal"] - t["fault"], 2)}


def print_result(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=None if os.isatty(1) else 200)
    tb = Table(title=f"scenario {r['scenario']} ({r['topology']}); fault at t=0, heal at t={r['heal_at_s']}s")
    for col in ("host", "arrays", "path states seen (t s: array:state@epoch)", "longest pause s", "I/O errors",
                "acked", "acked lost"):
        tb.add_column(col)
    for h in r["hosts"]:
        tl = "\n".join(f"{t:>6}: {lbl}" for t, lbl in h["alua"])
        tb.add_row(h["host"], h["arrays"], tl, str(h["longest_pause_s"]), str(h["io_errors"]), str(h["acked"]),
                   str(h["acked_lost"]))
    c.print(tb)
    c.print("replicas identical after recovery: " + ("[green]yes[/green]" if r["replicas_identical"] else "[red]NO[/red]"))
