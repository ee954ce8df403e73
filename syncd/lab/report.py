"""`syncd lab scenario all`: every failure scenario of the seed's two lists, in both host
topologies, and a report an administrator can read to choose between them.

For each topology (uniform: every host reaches both arrays through its shim, the seed's Active
Peer Persistence; non-uniform: each host reaches only its local array, Active Sync) and each
scenario, ``run_scenario`` builds a fresh lab, runs the verifying workload through the host
shims, injects and heals the fault and checks the replicas. This module writes

* ``report.md``: a summary table (application I/O errors, longest pause, slowest write,
  acknowledged writes lost, replica comparison) per scenario and topology, what each host
  experienced, and the per-host path-state timelines;
* ``<scenario>-<topology>.png``: per host, acknowledged writes per second over time with the
  fault and the heal marked, and one band per path showing its ALUA state;
* ``results.json``: everything measured, for other tools.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from itertools import pairwise
from pathlib import Path

from .scenario import SCENARIOS, run_scenario

TOPOLOGY_NAMES = {"uniform": "uniform (Active Peer Persistence)", "non-uniform": "non-uniform (Active Sync)"}
STATE_COLOURS = {"AO": "#2e7d32", "ANO": "#9ccc65", "T": "#ffa726", "U": "#e53935", "S": "#90a4ae",
                 "-": "#d0d0d0", "down": "#000000"}
STATE_NAMES = {"AO": "active/optimized", "ANO": "active/non-optimized", "T": "transitioning",
               "U": "unavailable", "S": "standby", "-": "unreachable", "down": "shim down"}


def run_all(d: str, out: str, *, topologies=("uniform", "non-uniform"), names=None, hold: float = 5.0,
            progress=None) -> list[dict]:
    """Run ``names`` (default: every scenario) in each topology; write the report to ``out``."""
    names = list(names or SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; scenarios: {', '.join(SCENARIOS)}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    results = []
    for topology in topologies:
        for i, name in enumerate(names):
            if progress:
                progress(f"{name} ({topology})")
            if SCENARIOS[name].needs_root and os.geteuid() != 0:
                results.append({"scenario": name, "topology": topology, "skipped": "needs root (loop devices)"})
                continue
            # Short lab directories: the nodes' admin sockets live there (unix path limit).
            r = run_scenario(os.path.join(d, f"{topology[0]}{i:02d}"), name, topology, hold)
            r["plot"] = plot(r, outdir / f"{name}-{topology}.png")
            results.append(r)
    (outdir / "results.json").write_text(json.dumps([_compact(r) for r in results], indent=1))
    (outdir / "report.md").write_text(markdown(results, hold))
    return results


def _compact(r: dict) -> dict:
    """A result for results.json: acknowledgements as counts per 100 ms from the fault, not
    every timestamp (tens of thousands per run)."""
    if "hosts" not in r:
        return r
    out = dict(r, hosts=[])
    for h in r["hosts"]:
        acked = h["series"]["acked"]
        first = int(min(acked, default=0) // 0.1)
        counts = [0] * (int(max(acked, default=0) // 0.1) - first + 1) if acked else []
        for t in acked:
            counts[int(t // 0.1) - first] += 1
        series = dict(h["series"], acked=None, acked_per_100ms={"from_s": round(first * 0.1, 1), "counts": counts})
        out["hosts"].append(dict(h, series=series))
    return out


# -- classification --------------------------------------------------------------------------------

def outcome(r: dict, h: dict) -> str:
    """What the host's applications experienced, in the seed's words."""
    if h.get("failed"):
        return "server failed (its VMs restart elsewhere)"
    if h["io_errors"]:
        return f"lost access: {h['io_errors']} I/O errors"
    if not h["acked_in_fault"]:
        if h.get("held_by_fencing"):
            return (f"ran on (longest pause {h['longest_pause_s']} s: its writes waited behind ones re-issued "
                    "after the lost path, stale_write_bound)")
        return f"lost access until the heal (no write completed for {h['longest_pause_s']} s)"
    return f"ran on (longest pause {h['longest_pause_s']} s)"


def transparent(r: dict) -> bool:
    """No surviving host saw an I/O error or lost access."""
    return all(outcome(r, h).startswith(("ran on", "server failed")) for h in r["hosts"])


def print_results(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    tb = Table(title="failure scenarios (see report.md for timelines and plots)")
    for col in ("scenario", "topology", "host", "outcome", "I/O errors", "longest pause s", "slowest write s",
                "acked lost", "replicas identical"):
        tb.add_column(col)
    for r in results:
        if "skipped" in r:
            tb.add_row(r["scenario"], r["topology"], "", r["skipped"], "", "", "", "", "")
            continue
        for i, h in enumerate(r["hosts"]):
            tb.add_row(r["scenario"] if i == 0 else "", r["topology"] if i == 0 else "", h["host"], outcome(r, h),
                       str(h["io_errors"]), str(h["longest_pause_s"]), str(h["slowest_write_s"]), str(h["acked_lost"]),
                       ("yes" if r["replicas_identical"] else "NO") if i == 0 else "")
    Console(width=None if os.isatty(1) else 180).print(tb)


# -- plots -----------------------------------------------------------------------------------------

def plot(r: dict, path: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the scenario report's plots need matplotlib: pip install 'syncd[lab]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    hosts = r["hosts"]
    end = max([r["heal_at_s"] + 1] + [t for h in hosts for t in h["series"]["acked"][-1:]])
    start = min([-1.0] + [t for h in hosts for t in h["series"]["acked"][:1]])
    ratios = []
    for h in hosts:
        ratios += [3, 0.45 * max(1, len(h["arrays"]))]
    fig, axes = plt.subplots(len(ratios), 1, sharex=True, figsize=(10, 1.2 + 1.1 * sum(ratios)),
                             gridspec_kw={"height_ratios": ratios})
    bin_s = 0.1
    for i, h in enumerate(hosts):
        ax, band = axes[2 * i], axes[2 * i + 1]
        s = h["series"]
        nb = int((end - start) / bin_s) + 1
        counts = [0] * nb
        for t in s["acked"]:
            k = int((t - start) / bin_s)
            if 0 <= k < nb:
                counts[k] += 1
        xs = [start + k * bin_s for k in range(nb)]
        ax.plot(xs, [c / bin_s for c in counts], lw=0.8, color="#1565c0")
        for t in s["errors"]:
            ax.axvline(t, color="#e53935", lw=0.6, alpha=0.6)
        ax.set_ylabel("writes/s")
        ax.set_title(f"host {h['host']} (site {h['site']}, paths to {', '.join(h['arrays'])}): {outcome(r, h)}",
                     fontsize=9, loc="left")
        for a in (ax, band):
            a.axvline(0, color="black", ls="--", lw=0.8)
            a.axvline(r["heal_at_s"], color="black", ls=":", lw=0.8)
        # One band per array path: its ALUA state over time.
        arrays = h["arrays"]
        for row, array in enumerate(arrays):
            spans: dict[str, list] = {}
            tl = s["paths"] + [[end, None]]
            for (t0, st), (t1, _) in pairwise(tl):
                if st is None:
                    key = "down"
                else:
                    key = next((x for a, x, _ in st if a == array), "-")
                spans.setdefault(key, []).append((t0, t1 - t0))
            for key, bars in spans.items():
                band.broken_barh(bars, (row + 0.1, 0.8), color=STATE_COLOURS.get(key, "#cccccc"))
        band.set_yticks([k + 0.5 for k in range(len(arrays))], [f"to {a}" for a in arrays], fontsize=8)
        band.set_ylim(0, len(arrays))
    axes[-1].set_xlabel("seconds after the fault (dashed: fault, dotted: heal)")
    axes[-1].set_xlim(start, end)
    fig.legend(handles=[Patch(color=c, label=STATE_NAMES[k]) for k, c in STATE_COLOURS.items()],
               loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.suptitle(f"{r['scenario']}, {TOPOLOGY_NAMES[r['topology']]}", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path.name


# -- Markdown --------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pair(r: dict, key: str) -> str:
    return " / ".join(str(h[key]) for h in r["hosts"])


def markdown(results: list[dict], hold: float) -> str:
    by = {(r["topology"], r["scenario"]): r for r in results}
    names = list(dict.fromkeys(r["scenario"] for r in results))
    tops = list(dict.fromkeys(r["topology"] for r in results))
    ran = [r for r in results if "skipped" not in r]
    out = [
        "# syncd failure scenarios: uniform vs non-uniform host connectivity",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `syncd lab scenario all` (commit {_commit()}, "
        f"{platform.node()}, {os.cpu_count()} CPUs). Each scenario ran in a fresh local lab: arrays A "
        "(natural primary) and B, a quorum witness, one host per site running a verifying write workload "
        "(4 KiB random writes, queue depth 4) through its host shim; the fault was injected 2 s into the "
        f"run, held {hold:g} s, healed, and the group was waited back in sync. Fast test timings "
        "(lease 1 s, witness owner lease 1 s), so pauses are shorter than with the defaults.",
        "",
        "* **uniform** (the seed's Active Peer Persistence): each host has a path to both arrays, proximity "
        "by site (host a `primary`, host b `secondary`): its paths to the array whose role its proximity "
        "names are active/optimized (AO), the others active/non-optimized (ANO).",
        "* **non-uniform** (Active Sync): each host has a path to its local array only, proximity `all` "
        "(the seed's rule), and an empty host definition (no initiators) on the other array.",
        "",
        "## Summary",
        "",
        "| scenario | " + " | ".join(f"{t}: host a / host b" for t in tops)
        + " | acked writes lost | replicas identical |",
        "|---|" + "---|" * len(tops) + "---|---|",
    ]
    for n in names:
        cells, lost, ident = [], 0, True
        for t in tops:
            r = by.get((t, n))
            if r is None or "skipped" in r:
                cells.append(r["skipped"] if r else "not run")
                continue
            cells.append("<br>".join(f"{h['host']}: {outcome(r, h)}" for h in r["hosts"]))
            lost += sum(h["acked_lost"] for h in r["hosts"])
            ident = ident and r["replicas_identical"]
        out.append(f"| {n} | " + " | ".join(cells) + f" | {lost} | {'yes' if ident else '**NO**'} |")
    out += ["", "## Choosing a topology", ""]
    for t in tops:
        rs = [r for r in ran if r["topology"] == t]
        ok = [r["scenario"] for r in rs if transparent(r)]
        bad = [r["scenario"] for r in rs if not transparent(r)]
        seed = [r["scenario"] for r in rs if r.get("paths_as_seed")]
        wrong = [r["scenario"] for r in rs if not r.get("paths_as_seed")]
        out.append(f"* **{TOPOLOGY_NAMES[t]}**: {len(ok)} of {len(rs)} scenarios ran on without an "
                   f"application I/O error or loss of access at any surviving host"
                   + (f"; hosts lost access in: {', '.join(bad)}" if bad else "")
                   + f". Every path showed the seed's state before the fault and after recovery in {len(seed)} "
                   f"of {len(rs)}" + (f" (not in: {', '.join(wrong)})" if wrong else "") + ".")
    lost = sum(h["acked_lost"] for r in ran for h in r["hosts"])
    out += [
        f"* Acknowledged writes lost over all {len(ran)} runs: **{lost}** (RPO 0 in both topologies).",
        "",
        "Uniform connectivity turns every failure that does not hit the host itself into a pause: "
        "the shim moves I/O to the other array's paths and re-issues what was in flight. With "
        "non-uniform connectivity the hosts of a failed (or isolated, or cut-off) array lose access "
        "and their applications must be restarted at the other site. Choose uniform wherever the "
        "hosts can be cabled to both arrays.",
        "",
        "Columns below: *longest pause* is the longest time no write of the host completed; "
        "*slowest write* the longest a single write took (a write that overlaps one re-issued after "
        "a lost path waits until the array behind that path can no longer apply the old copy, "
        "`stale_write_bound`, or until the epoch moves on). A host that kept a usable path but whose "
        "every writer drew such a block (each rewrites blocks of its own) completes no write until then: "
        "it ran on, with that pause, and did not lose access.",
        "",
        "## Scenarios",
    ]
    for n in names:
        out += ["", f"### {n}", ""]
        for t in tops:
            r = by.get((t, n))
            if r is None or "skipped" in r:
                continue
            seen = "; ".join(f"{h['host']} " + " ".join(f"{a}:{st}" for a, st in h["paths_before"].items())
                             + " → " + " ".join(f"{a}:{st}" for a, st in h["paths_after"]["want"].items())
                             for h in r["hosts"] if "paths_before" in h)
            out += [f"**{TOPOLOGY_NAMES[t]}**: fault at t=0, heal at t={r['heal_at_s']} s; "
                    f"replicas identical after recovery: {'yes' if r['replicas_identical'] else '**NO**'}; "
                    f"paths as the seed says before the fault and after recovery "
                    f"({seen}): {'yes' if r.get('paths_as_seed') else '**NO**'}.", "",
                    f"![{n}, {t}]({r['plot']})", "",
                    "| host | paths to | I/O errors | longest pause (s) | slowest write (s) | acked | acked lost "
                    "| path states seen (t: array:state@epoch) |",
                    "|---|---|---|---|---|---|---|---|"]
            for h in r["hosts"]:
                tl = "<br>".join(f"{tt:g}: {lbl}" for tt, lbl in h["alua"])
                out.append(f"| {h['host']} | {', '.join(h['arrays'])} | {h['io_errors']} | {h['longest_pause_s']} | "
                           f"{h['slowest_write_s']} | {h['acked']} | {h['acked_lost']} | {tl} |")
            out.append("")
    out += ["", "Path states: " + ", ".join(f"{k} {v}" for k, v in STATE_NAMES.items() if k != "down") + "."]
    return "\n".join(out) + "\n"
