"""The pure parts of bench/run.py: the machine record, the ratios of the issue's targets, the
Markdown report and the PNG chart of one run's JSON document. No fio, no servers here, so
tests/unit/test_bench_report.py can check them from literals."""

from __future__ import annotations

import collections
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

BASELINE, PEER = "nbdkit", "qemu-quorum"
WORKLOAD_NAMES = {
    "randwrite-4k-qd1": "4K randwrite QD1",
    "randwrite-4k-qd16": "4K randwrite QD16",
    "randread-4k-qd16": "4K randread QD16",
    "seqwrite-1m-qd4": "1M seqwrite QD4",
    "seqread-1m-qd4": "1M seqread QD4",
    "randwrite-4k-qd16-mc4": "4K randwrite QD16, 4 conns",
    "randread-4k-qd16-mc4": "4K randread QD16, 4 conns",
    "randwrite-4k-qd64": "4K randwrite QD64",
}
MULTICONN = {"randwrite-4k-qd16-mc4": "randwrite-4k-qd16", "randread-4k-qd16-mc4": "randread-4k-qd16"}
KM_PER_MS_RTT = 100  # the seed's rule: 1 ms of round trip per 100 km of fibre
QD64 = 64
MEMORY_BUDGET_MB = 256


# ---------------------------------------------------------------------------------------------
# the machine

def cpu_model(cpuinfo: str) -> str:
    """The first 'model name' of /proc/cpuinfo (x86), else 'Model'/'Hardware' (arm), else '?'."""
    for key in ("model name", "Model", "Hardware"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            return m.group(1).strip()
    return "?"


def first_version(text: str) -> str:
    """'fio-3.33' / 'nbdkit 1.32.5' / 'qemu-storage-daemon version 7.2.19 (Debian ...)' -> the
    version number (the whole first line when none is found)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"(\d+\.\d+(?:\.\d+)*)", line)
    return m.group(1) if m else (line or "?")


def affinity_note(cpus: int, allowed: list[int] | None) -> str:
    """'2' or, when the runner is restricted (taskset), '2 (affinity 0-1 of 4)'."""
    if allowed is None or len(allowed) == cpus:
        return str(cpus)
    return f"{len(allowed)} (affinity {cpu_list(allowed)} of {cpus})"


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (taskset's notation)."""
    out, cpus = [], sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def _run(args: list[str]) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return p.stdout or p.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_record(root: Path) -> dict:
    """Where a run was measured: CPUs (and the runner's affinity), CPU model, kernel, Debian,
    Python and the versions of the tools and libraries that make the numbers."""
    from importlib import metadata

    cpus = os.cpu_count() or 0
    try:
        allowed: list[int] | None = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None

    def pkg(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    commit = _run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"]).strip() or "?"
    if _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"]).strip():
        commit += "+dirty"
    return {
        "cpus": cpus, "affinity": cpu_list(allowed) if allowed is not None else None,
        "cpus_used": affinity_note(cpus, allowed),
        "cpu_model": cpu_model(_read("/proc/cpuinfo")),
        "kernel": platform.release(),
        # Under a hypervisor the kernel's parameters and idle driver say how the vCPUs sleep and
        # wake (round 19 in bench/README.md: nested PVM, no cpuidle driver); a VM's tool
        # arguments after " -- " are not the kernel's.
        "kernel_args": _read("/proc/cmdline").split(" -- ", 1)[0].strip() or "-",
        "cpuidle": _read("/sys/devices/system/cpu/cpuidle/current_driver").strip() or "-",
        "debian": _read("/etc/debian_version").strip() or "-",
        "python": platform.python_version(),
        "versions": {
            "fio": first_version(_run(["fio", "--version"])),
            "nbdkit": first_version(_run(["nbdkit", "--version"])),
            "qemu": first_version(_run(["qemu-storage-daemon", "--version"])),
            "trio": pkg("trio"), "construct": pkg("construct"), "xxhash": pkg("xxhash"),
            "syncd": f"{pkg('syncd')} (git {commit})",
        },
    }


def machine_lines(m: dict) -> list[str]:
    """The machine record as Markdown list items."""
    if not m:
        return []
    v = m.get("versions", {})
    return [
        f"- CPUs: {m.get('cpus_used', m.get('cpus'))}, {m.get('cpu_model', '?')}",
        f"- kernel {m.get('kernel', '?')}, Debian {m.get('debian', '?')}, Python {m.get('python', '?')}",
        *([f"- kernel parameters `{m['kernel_args']}`, cpuidle driver {m.get('cpuidle', '?')}"]
          if "kernel_args" in m else []),
        "- " + ", ".join(f"{k} {v[k]}" for k in ("fio", "nbdkit", "qemu", "trio", "construct", "xxhash", "syncd")
                         if k in v),
    ]


# ---------------------------------------------------------------------------------------------
# ratios

def metric_of(job: str) -> str:
    """The number a workload is judged by: MB/s for sequential jobs, IOPS otherwise."""
    return "mbps" if job.startswith("seq") else "iops"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def paired_ratio(res: dict | None, base: dict | None, metric: str, paired: bool) -> float | None:
    """``res`` against ``base`` on one workload. Runs interleaved (``paired``: round k of every
    target ran within minutes of each other) give the median of the rounds' ratios (the lower of
    an even count; a round either failed counts for neither), so a slow spell of the machine
    divides out; otherwise, or with no round both ran, the ratio of the two median runs."""
    if res is None or base is None:
        return None
    a, b = res.get("runs"), base.get("runs")
    if paired and a and b and len(a) == len(b):
        each = [x / y for x, y in zip(a, b, strict=True) if x is not None and y]
        if each:
            return statistics.median_low(each)  # as pick_median: the lower of an even count
    return ratio(res[metric], base[metric])


def spread(res: dict, metric: str) -> str:
    """The range of a row's rounds (``runs``), or '' for a single run."""
    runs = [x for x in res.get("runs") or [] if x is not None]
    if len(runs) < 2:
        return ""
    fmt = "{:.0f}" if metric == "iops" else "{:.1f}"
    return f"{fmt.format(min(runs))}-{fmt.format(max(runs))}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def qd1_bound_us(p50_no_delay_us: float, rtt_ms: float) -> float:
    """The issue's target for QD1 with an added round trip: p50 <= (p50 without delay + the
    added round trip) + 10 %."""
    return (p50_no_delay_us + rtt_ms * 1000) * 1.1


def qd64_bound_iops(iops_no_delay: float, rtt_ms: float) -> float:
    """min(the no-delay IOPS, 64 / RTT): what QD64 could reach with that round trip; the target
    is >= 0.8 x this."""
    if rtt_ms <= 0:
        return iops_no_delay
    return min(iops_no_delay, QD64 / (rtt_ms / 1000))


def multiconn_rows(results: dict, rows: list[str]) -> list[tuple[str, str, float, float, float | None]]:
    """(target, workload, IOPS over 1 connection, IOPS over 4, ratio) for every target that ran both."""
    out = []
    for mc, one in MULTICONN.items():
        for r in rows:
            a, b = results.get(r, {}).get(one), results.get(r, {}).get(mc)
            if a and b:
                out.append((r, WORKLOAD_NAMES[one], a["iops"], b["iops"], ratio(b["iops"], a["iops"])))
    return out


def distance_rows(dist: dict) -> list[dict]:
    """One row per added round trip: the QD1 result, the distance by the seed's rule and the
    target's bound against the 0 ms run through the relay (the same hops, no delay)."""
    runs = dist.get("relay", {})
    base = runs.get("0", runs.get("0.0", {})).get("qd1")
    out = []
    for key in sorted(runs, key=float):
        res = runs[key].get("qd1")
        rtt = float(key)
        row = {"rtt_ms": rtt, "km": rtt * KM_PER_MS_RTT, "res": res, "bound_us": None, "ratio": None}
        if res and base:
            row["bound_us"] = qd1_bound_us(base["lat_p50_us"], rtt)
            row["ratio"] = res["lat_p50_us"] / row["bound_us"]
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown

def _num(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def rounds(rows: list[str], repeat: int) -> list[list[str]]:
    """The order of the rows in each round of one job (``--order interleaved``): round k starts
    k rows further on, so no row always runs first (behind the last job's writeback) or last."""
    n = len(rows)
    return [rows[k % n:] + rows[:k % n] for k in range(repeat)] if n else []


def pick_median(job: str, runs: list[dict | None]) -> dict | None:
    """The median run of ``runs`` (by the job's metric; the lower one of an even count), with
    ``runs``: every run's metric in the order they ran (None for a run that failed)."""
    metric = metric_of(job)
    ok = sorted((x for x in runs if x is not None), key=lambda x: x[metric])
    if not ok:
        return None
    best = ok[(len(ok) - 1) // 2]
    return dict(best, runs=[x and x[metric] for x in runs]) if len(runs) > 1 else best


def target_table(doc: dict) -> tuple[list[str], list[list[list[str]]]]:
    """The targets table of a run (the Markdown's and the terminal's): its head, and its rows
    job by job."""
    results, rows, jobs = doc.get("results", {}), doc.get("rows", list(doc.get("results", {}))), doc.get("jobs", [])
    lk = doc.get("latency", "lat")
    paired = doc.get("order") == "interleaved"
    rounds = doc.get("repeat", 1) > 1
    head = (["target", "workload", "IOPS", "MB/s"] + (["range (IOPS; MB/s for 1M)"] if rounds else [])
            + [f"{lk} p50 µs", f"{lk} p99 µs", f"× {BASELINE}", f"× {PEER}"])
    by_job = []
    for job in jobs:
        m = metric_of(job)
        base, peer = results.get(BASELINE, {}).get(job), results.get(PEER, {}).get(job)
        body = []
        for r in rows:
            res = results.get(r, {}).get(job)
            name = WORKLOAD_NAMES.get(job, job)
            if res is None:
                body.append([r, name, "failed"] + [""] * (len(head) - 3))
                continue
            body.append([r, name, f"{res['iops']:.0f}", f"{res['mbps']:.1f}"]
                        + ([spread(res, m)] if rounds else [])
                        + [f"{res[lk + '_p50_us']:.0f}", f"{res[lk + '_p99_us']:.0f}",
                           fmt_ratio(paired_ratio(res, base, m, paired)),
                           fmt_ratio(paired_ratio(res, peer, m, paired))])
        by_job.append(body)
    return head, by_job


def main_table(doc: dict) -> list[str]:
    head, by_job = target_table(doc)
    body = [row for rows in by_job for row in rows]
    return _table(head, body) if body else []


def render_markdown(doc: dict) -> str:
    """One run as Markdown: what ran where, then a table per kind of measurement present."""
    out = [f"# bench/run.py, {doc.get('date', '?')}", ""]
    rep = ""
    if doc.get("repeat", 1) > 1:
        rep = (f", median of {doc['repeat']} rounds, the targets taking turns in each (× {BASELINE} and × the "
               "C peer: the median of the rounds' ratios)" if doc.get("order") == "interleaved"
               else f", median of {doc['repeat']} runs")
    out.append(f"fio nbd engine, {doc.get('runtime_s', '?')} s per job after a {doc.get('ramp_s', 2)} s ramp{rep}, "
               f"{doc.get('size', 0) >> 20} MiB volumes; command: `{doc.get('command', 'bench/run.py')}`")
    out += ["", "Machine:", ""] + machine_lines(doc.get("machine", {}))
    t = main_table(doc)
    if t:
        out += ["", "## Targets", ""] + t + [
            "", f"Ratios: IOPS (MB/s for the 1 MiB jobs) divided by {BASELINE}'s / the C peer's ({PEER}) on the "
                "same workload; latency is fio's total latency (submit + completion)."]
    mc = multiconn_rows(doc.get("results", {}), doc.get("rows", []))
    if mc:
        out += ["", "## Multi-conn: 4 NBD connections (4 jobs × QD4) against 1 connection (QD16)", ""]
        out += _table(["target", "workload", "1 conn IOPS", "4 conns IOPS", "× 1 conn (target ≥ 1.5)"],
                      [[r, w, f"{a:.0f}", f"{b:.0f}", fmt_ratio(x)] for r, w, a, b, x in mc])
    cold = doc.get("cold_log")
    if cold:
        out += ["", f"## Cold write-intent log: 4K randwrite QD16 over {cold['size'] >> 30} GiB against its "
                    f"first {cold['warm_span'] >> 20} MiB", ""]
        body = []
        for r, v in cold.get("results", {}).items():
            w, c = v.get("warm"), v.get("cold")
            body.append([r, _num(w and w["iops"]), _num(c and c["iops"]), _num(c and c["lat_p99_us"]),
                         fmt_ratio(ratio(c and c["iops"], w and w["iops"]))])
        out += _table(["target", "warm IOPS", "cold IOPS", "cold p99 µs", "cold × warm (target ≥ 0.8)"], body)
    dist = doc.get("distance")
    if dist:
        out += distance_markdown(dist)
    mem = doc.get("memory")
    if mem:
        out += ["", f"## Memory: peak RSS (VmHWM, MiB) of each node under {mem.get('load', 'fio')}", ""]
        body = []
        for site, ph in mem.get("phases", {}).items():
            pk = ph.get("peak_MB", {})
            body.append([f"fio at {site}", _num(ph.get("mbps")), _num(pk.get("A")), _num(pk.get("B")),
                         fmt_ratio(ratio(max(pk.values()) if pk else None, MEMORY_BUDGET_MB))])
        out += _table(["phase", "MB/s", "A peak MiB", "B peak MiB", f"max × {MEMORY_BUDGET_MB} MiB budget (≤ 1)"], body)
    checks = {g: i for g, i in doc.get("checks", {}).items() if i}
    if checks:
        out += ["", "Checks: " + "; ".join(f"{g}: " + ", ".join(f"{k}={v}" for k, v in i.items())
                                           for g, i in checks.items())]
    for k, v in doc.get("errors", {}).items():
        out.append(f"\n**error** {k}: {v.splitlines()[0] if v else ''}")
    return "\n".join(out) + "\n"


def distance_markdown(dist: dict) -> list[str]:
    out = ["", "## Latency versus distance: 4K randwrite QD1 at site A, round trip added by the lab's relay", ""]
    body = []
    for row in distance_rows(dist):
        res = row["res"]
        body.append([f"{row['rtt_ms']:g}", f"{row['km']:.0f}", _num(res and res["iops"]),
                     _num(res and res["lat_p50_us"]), _num(res and res["lat_p99_us"]),
                     _num(row["bound_us"]), fmt_ratio(row["ratio"])])
    out += _table(["added RTT ms", "≈ km (1 ms per 100 km)", "IOPS", "p50 µs", "p99 µs",
                   "bound µs: (p50 at 0 + RTT) × 1.1", "p50 × bound (target ≤ 1)"], body)
    direct = dist.get("direct", {})
    if direct.get("qd1"):
        out.append(f"\nBaseline: the table's bounds use the 0 ms run through the relay (the same Python hop as "
                   f"the delayed runs). Without the relay (nodes linked directly) QD1 p50 was "
                   f"{direct['qd1']['lat_p50_us']:.0f} µs, {direct['qd1']['iops']:.0f} IOPS.")
    q = dist.get("qd64", {})
    rtt = dist.get("qd64_rtt_ms", 5.0)
    base, at = q.get("0"), q.get(f"{rtt:g}")
    if base and at:
        bound = qd64_bound_iops(base["iops"], rtt)
        out.append("")
        out += _table(["4K randwrite QD64 at A (relay)", "IOPS", "p50 µs", "× min(no-delay IOPS, 64 / RTT) "
                       "(target ≥ 0.8)"],
                      [["no delay", f"{base['iops']:.0f}", f"{base['lat_p50_us']:.0f}", "1.00"],
                       [f"+{rtt:g} ms", f"{at['iops']:.0f}", f"{at['lat_p50_us']:.0f}",
                        fmt_ratio(ratio(at["iops"], bound))]])
        out.append(f"\nmin(no-delay IOPS {base['iops']:.0f}, 64 / {rtt:g} ms = {QD64 / (rtt / 1000):.0f}) = "
                   f"{bound:.0f} IOPS.")
    q16 = dist.get("qd16", {})
    base, at = q16.get("0"), q16.get(f"{rtt:g}")
    if base and at:
        out.append("")
        out += _table(["4K randwrite QD16 at A (relay; no target)", "IOPS", "p50 µs", "p50 − added RTT µs"],
                      [["no delay", f"{base['iops']:.0f}", f"{base['lat_p50_us']:.0f}", f"{base['lat_p50_us']:.0f}"],
                       [f"+{rtt:g} ms", f"{at['iops']:.0f}", f"{at['lat_p50_us']:.0f}",
                        f"{at['lat_p50_us'] - rtt * 1000:.0f}"]])
    return out


# ---------------------------------------------------------------------------------------------
# PNG

def ratio_panels(doc: dict) -> list[tuple[str, dict[str, dict[str, float | None]]]]:
    """The chart's bars: per reference (nbdkit, the C peer) that any row has a ratio to,
    job -> row -> ratio, as the Markdown table gives them."""
    results, rows, jobs = doc.get("results", {}), doc.get("rows", []), doc.get("jobs", [])
    paired = doc.get("order") == "interleaved"
    panels = []
    for ref in (BASELINE, PEER):
        data = {}
        for job in jobs:
            m = metric_of(job)
            refres = results.get(ref, {}).get(job)
            data[job] = {r: paired_ratio(results.get(r, {}).get(job), refres, m, paired) for r in rows}
        if any(v is not None for d in data.values() for v in d.values()):
            panels.append((ref, data))
    return panels


def render_chart(doc: dict, path: Path) -> bool:
    """Bar groups per workload, a bar per target: its ratio to nbdkit (top) and to the C peer
    (bottom), each bar labelled; with a distance run, QD1 p50 against the added round trip.
    False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, jobs = doc.get("rows", []), doc.get("jobs", [])
    panels = ratio_panels(doc)
    drows = distance_rows(doc.get("distance") or {})
    n = len(panels) + (1 if drows else 0)
    if n == 0:
        return False
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 1.6 * len(jobs) + 3), 4 * n), squeeze=False)
    for ax, (ref, data) in zip(axes[:, 0], panels, strict=False):
        width = 0.8 / max(1, len(rows))
        for i, r in enumerate(rows):
            xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(jobs))]
            ys = [data[j][r] or 0 for j in jobs]
            bars = ax.bar(xs, ys, width, label=r)
            for b, y in zip(bars, ys, strict=True):
                if y:
                    ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                                fontsize=7, rotation=90 if len(rows) > 4 else 0)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(jobs)), [WORKLOAD_NAMES.get(j, j).replace(", ", "\n") for j in jobs], fontsize=8)
        ax.set_ylabel(f"× {ref}")
        ax.set_title(f"IOPS (MB/s for 1M) as a ratio to {ref}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.margins(y=0.15)
    if drows:
        ax = axes[-1, 0]
        pts = [(r["rtt_ms"], r["res"]["lat_p50_us"] / 1000) for r in drows if r["res"]]
        bnd = [(r["rtt_ms"], r["bound_us"] / 1000) for r in drows if r["bound_us"]]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, "o-", label="QD1 p50 (ms)")
        if bnd:
            ax.plot([b[0] for b in bnd], [b[1] for b in bnd], "--", color="grey",
                    label="target: (p50 at 0 + RTT) × 1.1")
        ax.set_xlabel("added round trip, ms (× 100 km by the seed's rule)")
        ax.set_ylabel("p50 ms")
        ax.set_title("4K randwrite QD1 at site A against an added link round trip", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench/run.py {doc.get('date', '')}: {doc.get('machine', {}).get('cpus_used', '?')} CPUs, "
                 f"{doc.get('machine', {}).get('cpu_model', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# where the kernel ran fio (bench/cpu_per_io.py --sched)

# One line of ``perf sched timehist`` (a task's run ended): time, [cpu], task[tid] or
# task[tid/pid] (or <idle>; a task's name may hold spaces), wait time, scheduling delay, run time (ms).
_TIMEHIST = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(\S.*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
_TID = re.compile(r"\[(\d+)(?:/(\d+))?\]$")


def fio_placement(timehist: str, serving: int, other: int) -> dict:
    """Where the kernel ran fio, from ``perf sched timehist``'s output: for each run of fio's
    busiest thread, whose run on that CPU ended last before it: "serving node" (process or
    thread id ``serving``: the node fio talks to), "other node" (``other``), "idle" or "other".
    Per case: the share of fio's runs, the mean time from a run's start to the next run's start
    (under 1 ms apart: a request at a time) and the mean scheduling delay, in µs; most frequent
    first. Empty when fio never ran."""
    runs = []  # (start s, cpu, task, scheduling delay µs)
    for line in timehist.splitlines():
        m = _TIMEHIST.match(line)
        if m is not None:
            runs.append((float(m.group(1)) - float(m.group(6)) / 1e3, m.group(2), m.group(3), float(m.group(5)) * 1e3))
    busiest = collections.Counter(task for _, _, task, _ in runs if task.startswith("fio[")).most_common(1)
    if not busiest:
        return {}
    fio = busiest[0][0]

    def whose(task: str) -> str:
        m = _TID.search(task)
        ids = {int(x) for x in m.groups() if x} if m else set()
        return ("serving node" if serving in ids else "other node" if other in ids else
                "idle" if task == "<idle>" else "other")

    before: dict[str, str] = {}  # per CPU, the task whose run there ended last
    cases: dict[str, list[tuple[float, float]]] = {}
    last = None
    for start, cpu, task, delay in sorted(runs):
        if task == fio:
            if last is not None and start - last < 1e-3:
                cases.setdefault(whose(before.get(cpu, "<idle>")), []).append(((start - last) * 1e6, delay))
            last = start
        before[cpu] = task
    n = sum(len(v) for v in cases.values())
    return {case: {"share": round(len(v) / n, 2), "cycle_us": round(statistics.fmean(c for c, _ in v), 1),
                   "sched_delay_us": round(statistics.fmean(d for _, d in v), 1)}
            for case, v in sorted(cases.items(), key=lambda kv: -len(kv[1]))}
