"""Benchmark: CPU time the two nodes spend per host request (and IOPS), on the syncd lab.

fio's nbd engine (one job, BS random writes at iodepth QD) against site A, then site B, for
RUNTIME seconds each; the nodes' CPU time (user + system, from /proc) over the run divided by the
requests fio completed, and the kernel's share of each node's (sys_share_A/B). On a shared
machine IOPS swing with the neighbours' load while CPU per request hardly moves, so this is the
number to compare two versions of the hot path with.
Links are dialled directly (no relay), volumes are prefilled (no allocation on first write) and
written back before the runs (os.sync, as bench/run.py), as are the freed blocks after them.

With --profile DIR, py-spy (pip install py-spy: a tool, not a dependency) samples both nodes
through each run: DIR/at-SITE-NODE.txt are collapsed stacks (for any flame graph tool), and the
functions with the most samples of their own are printed per node.

With --conns N, fio runs N jobs (N NBD connections) of QD/N requests each: the multi-conn jobs'
shape (bench/jobs/*-mc4.fio are --qd 16 --conns 4); the counts are over all of them.

With --syscalls, perf stat counts each node's sendmsg, recvfrom and epoll_wait calls during
each run (kernel tracepoints, a count per call), given per request: how many sends and wake-ups
a request costs each node, which a batching change should move.

With --sched, ``perf sched record`` follows every CPU for SCHED_SECONDS in the middle of each run
and gives where the kernel ran fio's job: for each time fio ran, the task it took the CPU from
(the node fio talks to, the other node, an idle CPU, anything else), with the share of fio's runs
and the mean time from one run of fio to the next (a request's cycle at QD1) in each case. fio,
both nodes and nothing else share this machine's CPUs, where a host and its array would not:
this says what that sharing costs a site. The recording itself slows every process: compare its
cycles with each other, not with runs without it.

With --callgrind, both nodes run under valgrind's callgrind (bench/cghook/sitecustomize.py, put
on their PYTHONPATH; no change to syncd's code), counting only while fio runs: the user-space
instructions each node executed per request (instr_per_io_A/B), less what it executes idle
(its heartbeats and timers, measured for RUNTIME seconds before the first run; idle_instr_per_s).
Unlike CPU seconds, instructions do not move with the machine's load or its kernel, so two
versions of the hot path compare across sessions and machines. The nodes run some 80 times
slower and never poll before they sleep, so IOPS and latencies of such a run mean nothing.

With --timeline (QD1 only), both nodes record a timestamp at each socket receive and send and
each local write (bench/tracehook/sitecustomize.py, put on the nodes' PYTHONPATH; no change to
syncd's code) and bench/timeline.py gives each site's typical request hop by hop, with where its
time went, and what the slow requests (over 3 x the median: the p99 target) spent their extra
time on (a garbage collector's pass, or their longest quiet gap): printed, and written to
bench/results/timeline-*.md (--timeline-out to choose). The
recording costs about a microsecond per event (some 15 per request): compare timelines with
timelines, IOPS with runs without it.

Usage: .venv/bin/python bench/cpu_per_io.py [--runtime 10] [--repeat 3] [--bs 4k] [--qd 16]
       .venv/bin/python bench/cpu_per_io.py --repeat 1 --qd 1 --profile /tmp/prof [--link-security insecure]
       .venv/bin/python bench/cpu_per_io.py --repeat 1 --qd 1 --runtime 5 --timeline
       .venv/bin/python bench/cpu_per_io.py --repeat 3 --qd 1 --syscalls    # needs perf
       .venv/bin/python bench/cpu_per_io.py --repeat 3 --qd 1 --sched    # needs perf, root
       .venv/bin/python bench/cpu_per_io.py --repeat 1 --qd 1 --runtime 20 --callgrind    # needs valgrind
       .venv/bin/python bench/cpu_per_io.py --repeat 1 --rw randread --qd 16 --conns 4 --syscalls
Runs against whatever syncd the interpreter imports (an older checkout: run it from there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, os.getcwd())

from syncd.lab.rig import lab_down, lab_up  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import benchkit  # noqa: E402
import timeline  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's CPU time so far: (user, system) seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime


SYSCALLS = ("sendmsg", "recvfrom", "epoll_wait")


def perf_tool(option: str) -> str:
    """The path of ``perf``, which ``option`` needs."""
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit(f"{option} needs perf (Debian: linux-perf)")
    return perf


def start_syscall_counts(pids: list[int]) -> list:
    """``perf stat`` counting each node's entries into SYSCALLS (kernel tracepoints: a count
    per call, no slowdown worth the name) until ``syscall_counts``: [perf process]."""
    perf = perf_tool("--syscalls")
    events = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
    return [subprocess.Popen([perf, "stat", "-x", ",", "-e", events, "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for pid in pids]


def syscall_counts(proc: subprocess.Popen) -> dict[str, int]:
    """Stop one ``perf stat -x ,`` and return what it counted: {syscall: calls}."""
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    out = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_"):
            out[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0]) if fields[0].isdigit() else 0
    if set(out) != set(SYSCALLS):
        raise SystemExit(f"perf stat counted {sorted(out)}, not {list(SYSCALLS)}: {err.strip()[-300:]}")
    return out


SCHED_SECONDS = 2.0


def start_sched(path: Path, after: float) -> subprocess.Popen:
    """``perf sched record`` of every CPU for SCHED_SECONDS, ``after`` seconds from now."""
    perf = perf_tool("--sched")
    return subprocess.Popen(["sh", "-c", f'sleep {after}; exec "$0" sched record -a -o "$1" -- sleep {SCHED_SECONDS}',
                             perf, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def placement(proc: subprocess.Popen, path: Path, serving: int, other: int) -> dict:
    """Wait for ``start_sched``'s recording and read it (benchkit.fio_placement)."""
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"perf sched record failed: {err.strip()[-300:]}")
    hist = subprocess.run([perf_tool("--sched"), "sched", "timehist", "-i", str(path)], capture_output=True, text=True)
    path.unlink(missing_ok=True)
    found = benchkit.fio_placement(hist.stdout, serving, other)
    if not found:
        raise SystemExit(f"perf sched saw no fio run in {SCHED_SECONDS:g} s: {hist.stderr.strip()[-300:]}")
    return found


def callgrind_window(pids: list[int], cg_dir: Path, action):
    """Turn callgrind's counting on in both nodes, run ``action()``, turn it off and dump:
    (what ``action`` returned, the instructions each node executed meanwhile, the seconds it
    counted for)."""
    def control(*args: str) -> None:
        for pid in pids:
            subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)

    before = {pid: set(cg_dir.glob(f"cg.{pid}.*")) for pid in pids}
    control("-i", "on")
    t0 = time.monotonic()
    try:
        result = action()
    finally:
        secs = time.monotonic() - t0
        control("-i", "off")
        control("-d")
    out = []
    for pid in pids:
        new = set(cg_dir.glob(f"cg.{pid}.*")) - before[pid]
        if len(new) != 1:
            raise SystemExit(f"callgrind in node {pid} dumped {len(new)} files, not one, in {cg_dir}")
        totals = [ln for ln in new.pop().read_text().splitlines() if ln.startswith("totals:")]
        out.append(int(totals[0].split()[1]))
    return result, out, secs


def start_profiles(d: str, site: str, pids: list[int], seconds: int) -> list:
    """py-spy on both nodes for ``seconds``: [(process, output path)]."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    Path(d).mkdir(parents=True, exist_ok=True)
    out = []
    for node, pid in zip("AB", pids, strict=True):
        path = Path(d) / f"at-{site}-{node}.txt"
        out.append((subprocess.Popen([spy, "record", "-p", str(pid), "-o", str(path), "-f", "raw", "-r", "200",
                                      "-d", str(seconds), "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path))
    return out


def top_self(path: Path, n: int = 12) -> list[str]:
    """The ``n`` frames with the most samples of their own, as shares of all samples."""
    own: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ["(no profile)"]
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
    return [f"{100 * c / total:5.1f}% {f}" for f, c in sorted(own.items(), key=lambda kv: -kv[1])[:n]]


def report_timeline(trace_dir: Path, lab: dict, pids: list[int], windows: dict, a: argparse.Namespace) -> None:
    """Each site's typical QD1 request hop by hop (bench/timeline.py), from the first fio run
    there; printed and written as Markdown."""
    recs = {}
    for node, pid in zip("AB", pids, strict=True):
        f = trace_dir / f"{pid}.events"
        if not f.exists():
            raise SystemExit(f"node {node} (pid {pid}) left no recording in {trace_dir}: did it exit cleanly?")
        recs[node] = timeline.read_recording(f)
    host_port = {n: int(lab["nodes"][n]["nbd"].rsplit(":", 1)[1]) for n in "AB"}
    results, slow = {}, {}
    for site in a.sites:
        events, wakes = timeline.labelled(recs, host_port, *windows[site][0])
        results[site] = timeline.analyse(events, site, wakes)
        slow[site] = timeline.slow_cycles(events, site, timeline.gc_passes(recs, *windows[site][0]))
    dropped = sum(r.dropped for r in recs.values())
    # A full recording stops: does that cut into the runs analysed?
    full_at = min((r.events[-1][0] for r in recs.values() if r.dropped and r.events), default=None)
    cut = full_at is not None and any(full_at < windows[s][0][1] for s in a.sites)
    note = (f"`bench/cpu_per_io.py --qd 1 --bs {a.bs} --runtime {a.runtime} --link-security {a.link_security} "
            f"--timeline`, {time.strftime('%Y-%m-%d %H:%M')}, tree {os.getcwd()}; the first run at each site. "
            "Times include the recording's own cost (about 1 µs per event).")
    if cut:
        note += (f" **The recording filled up during the runs analysed ({dropped} events not recorded): their "
                 "later cycles are missing.**")
    elif dropped:
        note += f" ({dropped} events after the runs analysed were not recorded: the recording was full.)"
    md = timeline.markdown(results, note, slow)
    out = Path(a.timeline_out) if a.timeline_out else BENCH / "results" / time.strftime("timeline-%Y%m%d-%H%M%S.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    print(md)
    print(f"timeline written to {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="MiB")
    ap.add_argument("--dir", default=None, help="work directory, kept afterwards (default: a temporary one)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sites", default="AB", choices=["AB", "A", "B"], help="where fio runs (default A, then B)")
    ap.add_argument("--rw", default="randwrite", help="fio's rw (default randwrite)")
    ap.add_argument("--conns", type=int, default=1,
                    help="NBD connections (fio jobs), QD/CONNS requests in flight on each (multi-conn)")
    ap.add_argument("--profile", default=None, metavar="DIR", help="py-spy both nodes; stacks into DIR")
    ap.add_argument("--link-security", choices=["key", "insecure", "tls"], default="key",
                    help="the link's security mode (default key, the lab's)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count each node's sendmsg, recvfrom and epoll_wait calls per request (perf stat)")
    ap.add_argument("--sched", action="store_true",
                    help="where the kernel ran fio: whose CPU it took, and a request's cycle in each case (perf sched)")
    ap.add_argument("--callgrind", action="store_true",
                    help="count each node's instructions per request under valgrind (slow; no IOPS)")
    ap.add_argument("--timeline", action="store_true",
                    help="record both nodes' receives, sends and writes; each site's request hop by hop (QD1)")
    ap.add_argument("--timeline-out", default=None, metavar="FILE",
                    help="the timeline's Markdown (default bench/results/timeline-DATE.md)")
    a = ap.parse_args()
    if a.conns < 1 or a.qd % a.conns:
        ap.error(f"--conns must divide --qd ({a.qd}) into whole queue depths, not {a.conns}")
    if a.timeline and a.qd != 1:
        ap.error(f"--timeline needs --qd 1 (one request at a time is what it follows), not {a.qd}")
    if a.callgrind and (a.timeline or a.profile or a.sched):
        ap.error("--callgrind runs the nodes under valgrind: not with --timeline, --profile or --sched")
    if a.sched and a.runtime <= SCHED_SECONDS:
        ap.error(f"--sched records {SCHED_SECONDS:g} s in the middle of each run: --runtime must be longer")
    if a.callgrind and not shutil.which("callgrind_control"):
        raise SystemExit("--callgrind needs valgrind (Debian: valgrind)")
    d = Path(a.dir or tempfile.mkdtemp(prefix="syncd-cpu-"))
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    seed = d / "seed.img"
    with open(seed, "wb") as f:
        for _ in range(a.size):
            f.write(os.urandom(1 << 20))
    vols = {s: d / f"{s}.img" for s in ("A", "B")}
    for p in vols.values():
        shutil.copyfile(seed, p)
    trace_dir = d / "timeline"
    cg_dir = d / "callgrind"
    saved = {k: os.environ.get(k) for k in ("SYNCD_TIMELINE", "SYNCD_CALLGRIND", "PYTHONPATH")}
    # The nodes started now inherit these: a hook (sitecustomize) on their path that records in
    # them (--timeline) or runs them under callgrind (--callgrind); at most one of the two.
    for wanted, var, out, hook in ((a.timeline, "SYNCD_TIMELINE", trace_dir, "tracehook"),
                                   (a.callgrind, "SYNCD_CALLGRIND", cg_dir, "cghook")):
        if wanted:
            out.mkdir()
            os.environ[var] = str(out)
            os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (saved["PYTHONPATH"], str(BENCH / hook)) if x)
    try:
        lab = lab_up(str(d / "lab"), size=f"{a.size}MiB", nvolumes=1, npaths=2, relay=False, timeout=300,
                     start_timeout=300 if a.callgrind else 20,
                     **({"link_opts": {"insecure": True}} if a.link_security == "insecure" else
                        {"tls": "link"} if a.link_security == "tls" else {}),
                     volume_paths={s: [str(p)] for s, p in vols.items()})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    windows: dict = {"A": [], "B": []}  # (start, end) ns of each fio run, for the timeline
    # The volumes just written (3 x size) are written back now, not during the runs (as bench/run.py).
    os.sync()
    pids = [lab["nodes"][s]["pid"] for s in ("A", "B")]
    runs: dict = {"A": [], "B": []}
    idle = [0.0, 0.0]  # instructions per second each node executes with no request (--callgrind)
    try:
        if a.callgrind:
            _, counts, secs = callgrind_window(pids, cg_dir, partial(time.sleep, a.runtime))
            idle = [c / secs for c in counts]
            print(f"idle: instructions per second A {idle[0]:,.0f}, B {idle[1]:,.0f}", flush=True)
        for _ in range(a.repeat):
            for site in a.sites:
                uri = lab["nodes"][site]["volumes"]["vv1"]["uri"]
                spies = start_profiles(a.profile, site, pids, a.runtime + 2) if a.profile else []
                counters = start_syscall_counts(pids) if a.syscalls else []
                sched_file = d / f"sched-{site}.data"
                sched = start_sched(sched_file, max(0.0, (a.runtime - SCHED_SECONDS) / 2)) if a.sched else None
                c0 = [cpu_seconds(p) for p in pids]
                w0 = time.monotonic_ns()
                fio = ["fio", "--name=cpu", "--ioengine=nbd", f"--uri={uri}", f"--rw={a.rw}", f"--bs={a.bs}",
                       f"--iodepth={a.qd // a.conns}", f"--numjobs={a.conns}", "--group_reporting",
                       "--time_based", f"--runtime={a.runtime}", f"--size={a.size}M",
                       "--lat_percentiles=1", "--output-format=json"]
                run_fio = partial(subprocess.run, fio, capture_output=True, text=True)
                if a.callgrind:
                    p, instr, secs = callgrind_window(pids, cg_dir, run_fio)
                else:
                    p = run_fio()
                c1 = [cpu_seconds(p) for p in pids]
                windows[site].append((w0, time.monotonic_ns()))
                for spy, path in spies:
                    spy.wait()
                    print(f"py-spy, fio at {site}, node {path.stem[-1]}: most samples of their own")
                    for line in top_self(path):
                        print("   ", line)
                job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
                kind = "read" if "read" in a.rw and "write" not in a.rw else "write"
                ios = job[kind]["total_ios"]
                cpu = [sum(b) - sum(a_) for a_, b in zip(c0, c1, strict=True)]
                kernel = [b[1] - a_[1] for a_, b in zip(c0, c1, strict=True)]
                pct = job[kind]["lat_ns"].get("percentile", {})  # total latency, submit + completion
                # None where this fio gave no such percentile (not a 0 µs latency)
                lat = {f"lat_p{q}_us": round(pct[f"{q}.000000"] / 1000) if f"{q}.000000" in pct else None
                       for q in (50, 99)}
                runs[site].append({"iops": round(job[kind]["iops"]), "ios": ios, "error": job["error"], **lat,
                                   "cpu_us_per_io_A": round(cpu[0] / ios * 1e6, 1),
                                   "cpu_us_per_io_B": round(cpu[1] / ios * 1e6, 1),
                                   "cpu_us_per_io": round(sum(cpu) / ios * 1e6, 1),
                                   # the kernel's part (system time) of each node's CPU
                                   "sys_share_A": round(kernel[0] / cpu[0], 2) if cpu[0] else 0.0,
                                   "sys_share_B": round(kernel[1] / cpu[1], 2) if cpu[1] else 0.0})
                if a.callgrind:  # less what the node would have executed idle over the run
                    for node, n, rate in zip("AB", instr, idle, strict=True):
                        runs[site][-1][f"instr_per_io_{node}"] = round((n - rate * secs) / ios)
                    runs[site][-1]["idle_instr_per_s"] = [round(r) for r in idle]
                for node, proc in zip("AB", counters, strict=False):  # (none without --syscalls)
                    for call, n in syscall_counts(proc).items():  # over fio's run, its start-up included
                        runs[site][-1][f"{call}_per_io_{node}"] = round(n / ios, 2)
                if sched is not None:
                    here, there = (pids[0], pids[1]) if site == "A" else (pids[1], pids[0])
                    runs[site][-1]["placement"] = placement(sched, sched_file, here, there)
                print(f"fio at {site}: {runs[site][-1]}", flush=True)
    finally:
        lab_down(str(d / "lab"))  # the nodes write their recordings as they exit
    if a.timeline:
        report_timeline(trace_dir, lab, pids, windows, a)
    keys: tuple[str, ...] = ("iops", "cpu_us_per_io_A", "cpu_us_per_io_B", "cpu_us_per_io")
    if a.callgrind:
        keys += ("instr_per_io_A", "instr_per_io_B")
    summary = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items() if rs}
    print("median:", json.dumps(summary))
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / time.strftime("cpu-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "tree": os.getcwd(),
                               "machine": benchkit.machine_record(Path(os.getcwd())),
                               "args": vars(a), "runs": runs, "median": summary}, indent=1))
    if not a.dir:  # a directory given is kept: node logs for a run that went wrong
        shutil.rmtree(d, ignore_errors=True)
        os.sync()  # and their blocks freed now, not while a next run measures
    return 0


if __name__ == "__main__":
    sys.exit(main())
