"""Benchmark: how replicated I/O scales with node instances (workers) and the cores they may use.

syncd uses more cores by running more node instances per array, each owning its own replication
groups (docs/design.md section 10): every instance is a process with its own event loop, link,
write-intent log and NBD port, and the one owner of the ordering of its groups' writes. This
benchmark measures what that buys on this machine, in one run:

  for each number of workers W (--workers 1,2,4): W independent pairs of syncd nodes (the lab's
  A and B, one replicated volume each, prefilled with the same random data), and for each number
  of CPUs k (--cpus 1,2) the nodes' threads pinned to the first k CPUs of this process's affinity
  (fio itself is not pinned unless --fio-cpus says so), one fio run with one job per pair (each
  job at the workload's own queue depth, at site A of its pair), summed.

The report gives each result as a ratio to one worker on the same CPUs, the CPU time the nodes
used (cores busy, and microseconds of node CPU per I/O), and checks every pair's replicas are
identical at the end. It writes beside its JSON a Markdown report (DATE-scale.md) and a chart
(DATE-scale.png).

Usage: .venv/bin/python bench/scale.py [--workers 1,2,4] [--cpus 1,2] [--runtime 8] [--size 256MiB]
                                       [--jobs randwrite-4k-qd16,seqwrite-1m-qd4] [--fio-cpus 1]
                                       [--out bench/results/DATE-scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import benchkit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# fio options per workload (the same as bench/jobs/*.fio, one job per pair instead of one in all)
JOBS = {
    "randwrite-4k-qd16": {"rw": "randwrite", "bs": "4k", "iodepth": "16"},
    "randwrite-4k-qd1": {"rw": "randwrite", "bs": "4k", "iodepth": "1"},
    "randread-4k-qd16": {"rw": "randread", "bs": "4k", "iodepth": "16"},
    "seqwrite-1m-qd4": {"rw": "write", "bs": "1m", "iodepth": "4"},
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def parse_list(s: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"scale: --{what} {s!r} is not a list of numbers (e.g. 1,2,4)") from None
    if not out or any(x < 1 for x in out):
        raise SystemExit(f"scale: --{what} needs positive numbers")
    return out


def fio_file(job: str, uris: list[str], size: int, runtime: int) -> str:
    """One fio job file: a job per pair (its own NBD connection and queue depth), reported as one
    group (summed)."""
    opts = JOBS[job]
    lines = ["[global]", "ioengine=nbd", f"size={size}", "time_based=1", f"runtime={runtime}", "ramp_time=2",
             "group_reporting=1", "lat_percentiles=1"] + [f"{k}={v}" for k, v in opts.items()]
    for i, uri in enumerate(uris):
        lines += ["", f"[{job}-pair{i}]", f"uri={uri}"]
    return "\n".join(lines) + "\n"


def run_fio(text: str, d: Path, runtime: int, fio_cpus: list[int] | None) -> dict:
    f = d / "job.fio"
    f.write_text(text)
    cmd = ["fio", "--output-format=json", str(f)]
    if fio_cpus:
        cmd = ["taskset", "-c", benchkit.cpu_list(fio_cpus)] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
    start = p.stdout.find("{")
    if p.returncode != 0 or start < 0:
        raise BenchError(f"fio failed (status {p.returncode}): {(p.stderr + p.stdout)[-600:]}")
    j = json.loads(p.stdout[start:])["jobs"][0]
    if j["error"]:
        raise BenchError(f"fio: I/O error {j['error']}")
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    pct = side.get("lat_ns", {}).get("percentile", {})
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6, "ios": side["total_ios"],
            "lat_p50_us": pct.get("50.000000", 0) / 1000, "lat_p99_us": pct.get("99.000000", 0) / 1000}


def threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pids: list[int], cpus: list[int]) -> None:
    """Every thread of each process onto ``cpus`` (threads started later inherit it)."""
    for pid in pids:
        for tid in threads(pid):
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that just ended
                pass


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return total / CLK_TCK


@contextmanager
def pairs(d: Path, n: int, size: int, seed: Path):
    """``n`` independent syncd pairs (lab A and B), each with one volume vv1 prefilled from
    ``seed``; yields [(uri at A, [pids], [replica paths])]."""
    import run  # bench/run.py: its backing files and port waits

    from syncd.lab.rig import lab_down, lab_up

    out, dirs = [], []
    try:
        for i in range(n):
            ld = d / f"pair{i}"
            ld.mkdir(parents=True)
            vols = {s: run.backing(ld / f"{s}.img", seed) for s in ("A", "B")}
            dirs.append(ld / "lab")
            lab = lab_up(str(ld / "lab"), size=f"{size >> 20}MiB", nvolumes=1, npaths=2, relay=False,
                         timeout=600, volume_paths={s: [str(p)] for s, p in vols.items()})
            for s in ("A", "B"):
                run.wait_port(int(lab["nodes"][s]["nbd"].rsplit(":", 1)[1]))
            out.append((lab["nodes"]["A"]["volumes"]["vv1"]["uri"], [lab["nodes"][s]["pid"] for s in ("A", "B")],
                        [vols["A"], vols["B"]]))
        yield out
    finally:
        for ld in dirs:
            if (ld / "lab.json").exists():
                lab_down(str(ld))


def measure(ns, d: Path) -> dict:
    import run

    allowed = sorted(os.sched_getaffinity(0))
    cpus = [k for k in ns.cpus if k <= len(allowed)]
    if not cpus:
        raise SystemExit(f"scale: --cpus {ns.cpus}: this process may use only {len(allowed)} CPU(s)")
    fio_cpus = allowed[-ns.fio_cpus:] if ns.fio_cpus else None
    seed = d / "seed.img"
    run.make_seed(seed, ns.size)
    results: dict = {}
    checks: dict = {}
    for w in ns.workers:
        print(f"scale: {w} worker(s): starting {w} pair(s) ...", file=sys.stderr, flush=True)
        wd = d / f"w{w}"
        with ExitStack() as stack:
            ps = stack.enter_context(pairs(wd, w, ns.size, seed))
            pids = [p for _, pp, _ in ps for p in pp]
            for k in cpus:
                pin(pids, allowed[:k])
                for job in ns.jobs:
                    print(f"scale: {w} worker(s) on {k} CPU(s): {job} ...", file=sys.stderr, flush=True)
                    text = fio_file(job, [u for u, _, _ in ps], ns.size, ns.runtime)
                    t0, c0 = time.monotonic(), cpu_seconds(pids)
                    try:
                        r = run_fio(text, wd, ns.runtime, fio_cpus)
                    except (BenchError, subprocess.TimeoutExpired) as e:
                        results.setdefault(job, {}).setdefault(str(k), {})[str(w)] = {"error": str(e)}
                        print(f"scale: {e}", file=sys.stderr)
                        continue
                    wall, cpu = time.monotonic() - t0, cpu_seconds(pids) - c0
                    # fio counts I/O after its 2 s ramp; the nodes' CPU covers the whole run
                    ios_all = r["ios"] * wall / max(wall - 2, 1e-9)
                    r["node_cores"] = cpu / wall
                    r["node_cpu_us_per_io"] = cpu / ios_all * 1e6 if ios_all else None
                    results.setdefault(job, {}).setdefault(str(k), {})[str(w)] = r
            pin(pids, allowed)
        checks[str(w)] = all(run.same_content(a, b) for _, _, (a, b) in ps)
    return {"results": results, "replicas_identical": checks, "cpus": cpus,
            "allowed": benchkit.cpu_list(allowed),
            "fio_cpus": benchkit.cpu_list(fio_cpus) if fio_cpus else None}


def render_markdown(doc: dict) -> str:
    out = [f"# bench/scale.py, {doc['date']}", "",
           f"Workers are independent syncd node pairs (the lab's A and B, one {doc['size_mib']} MiB volume each); "
           f"fio runs one job per pair at site A, {doc['runtime']} s after a 2 s ramp, summed; the nodes' "
           f"threads are pinned to the first k CPUs of {doc['allowed']}; fio "
           + (f"runs on CPUs {doc['fio_cpus']}." if doc.get("fio_cpus") else "is not pinned (it shares the CPUs).")
           + f" Command: `{doc['command']}`", "", "Machine:", ""] + benchkit.machine_lines(doc.get("machine", {}))
    for job, by_cpu in doc["results"].items():
        metric = benchkit.metric_of(job)
        unit = "MB/s" if metric == "mbps" else "IOPS"
        rows = []
        for k, by_w in by_cpu.items():
            one = by_w.get("1", {}).get(metric)
            for w, r in by_w.items():
                if "error" in r:
                    rows.append([w, k, "failed: " + r["error"][:80], "", "", "", "", ""])
                    continue
                rows.append([w, k, f"{r[metric]:.0f}", benchkit.fmt_ratio(benchkit.ratio(r[metric], one)),
                             f"{r['lat_p50_us']:.0f}", f"{r['lat_p99_us']:.0f}", f"{r['node_cores']:.2f}",
                             benchkit._num(r.get("node_cpu_us_per_io"), "{:.1f}")])
        out += ["", f"## {benchkit.WORKLOAD_NAMES.get(job, job)} per pair", ""]
        out += benchkit._table(["workers", "node CPUs", unit, "× 1 worker", "lat p50 µs", "lat p99 µs",
                                "node CPU, cores busy", "node CPU µs per I/O"], rows)
    ok = doc.get("replicas_identical", {})
    out += ["", "Replicas identical after the run: "
            + ", ".join(f"{w} worker(s) {'yes' if v else 'NO'}" for w, v in ok.items())]
    return "\n".join(out) + "\n"


def render_chart(doc: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = list(doc["results"])
    if not jobs:
        return False
    fig, axes = plt.subplots(1, len(jobs), figsize=(5 * len(jobs), 4), squeeze=False)
    for ax, job in zip(axes[0], jobs, strict=True):
        metric = benchkit.metric_of(job)
        for k, by_w in doc["results"][job].items():
            pts = sorted((int(w), r[metric]) for w, r in by_w.items() if "error" not in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"nodes on {k} CPU(s)")
        ax.set_xlabel("workers (node pairs)")
        ax.set_ylabel("MB/s" if metric == "mbps" else "IOPS")
        ax.set_title(benchkit.WORKLOAD_NAMES.get(job, job), fontsize=10)
        ax.set_xticks(sorted({int(w) for by_w in doc["results"][job].values() for w in by_w}))
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main() -> int:
    import run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--cpus", default="1,2")
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", default="256MiB", help="each pair's volume")
    ap.add_argument("--jobs", default="randwrite-4k-qd16,seqwrite-1m-qd4")
    ap.add_argument("--fio-cpus", type=int, default=0, help="pin fio to the last N CPUs (default: not pinned)")
    ap.add_argument("--dir", help="working directory (default: a temporary one, removed)")
    ap.add_argument("--out", help="JSON result (default bench/results/DATE-scale.json)")
    ns = ap.parse_args()
    ns.workers, ns.cpus = parse_list(ns.workers, "workers"), parse_list(ns.cpus, "cpus")
    ns.jobs = [j.strip() for j in ns.jobs.split(",") if j.strip()]
    unknown = [j for j in ns.jobs if j not in JOBS]
    if unknown:
        raise SystemExit(f"scale: unknown job(s) {', '.join(unknown)} (use {', '.join(JOBS)})")
    ns.size = run.parse_size(ns.size)
    try:
        run.need("fio")
    except run.BenchError as e:
        raise SystemExit(f"scale: {e}") from None
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with ExitStack() as stack:
        d = Path(ns.dir) if ns.dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="syncd-scale-")))
        d.mkdir(parents=True, exist_ok=True)
        doc = {"date": date, "runtime": ns.runtime, "size_mib": ns.size >> 20,
               "command": "bench/scale.py " + " ".join(sys.argv[1:]),
               "machine": benchkit.machine_record(ROOT), **measure(ns, d)}
    out = Path(ns.out) if ns.out else ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(render_markdown(doc))
    png = out.with_suffix(".png")
    render_chart(doc, png)
    print(md.read_text())
    print(f"scale: wrote {out}, {md}, {png}", file=sys.stderr)
    return 0 if all(doc["replicas_identical"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
