"""Benchmark: the replication link under heavy host load (issue 10, item 6).

On the syncd lab (two nodes, one 1 GiB volume, two link paths, through the lab's relay unless
--no-relay), fio's nbd engine with JOBS jobs x iodepth QD x BS random writes: at the secondary B
(every write forwarded to the primary), at the primary A, and read+write at both sites at once.
Per phase: MB/s at each site, fio errors, whether a path went down or the peer was lost (node
logs), and what the link reports: the slowest keepalive round trip, the longest a control frame
waited to reach the kernel, how often and how long data requests waited for credit, and the
nodes' peak RSS. The link's maxima are since the path came up (they only grow across phases).

Usage: .venv/bin/python bench/link_load.py [--runtime 20] [--phases B,A,AB] [--max-inflight 32MiB]
       [--timings default|fast] [--no-relay] [--out FILE]
Runs against whatever syncd the interpreter imports, so an older checkout can be measured with its
own venv: cd OLD && .venv/bin/python /path/to/bench/link_load.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from syncd.ctl import call  # noqa: E402
from syncd.lab.rig import lab_down, lab_up  # noqa: E402

FAST_LINK = {"ping_interval": 0.1, "path_timeout": 0.6, "io_timeout": 2.0, "lease": 1.0, "lease_margin": 0.2}
TROUBLE = re.compile(r"path \d+ down|link to \S+ down|peer lost|FAILSAFE|fenced|not confirm")
PHASES = {"B": [("B", "randwrite")], "A": [("A", "randwrite")], "AB": [("A", "randrw"), ("B", "randrw")]}


def fio(uri: str, rw: str, a) -> subprocess.Popen:
    return subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={a.bs}",
         f"--numjobs={a.jobs}", f"--iodepth={a.qd}", "--direct=1", "--time_based",
         f"--runtime={a.runtime}", "--size=1G", "--group_reporting", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    r = {"rc": p.returncode, "io_errors": err.count("io_u error")}
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
        r.update(error=job["error"], write_MBps=round(job["write"]["bw_bytes"] / 1e6, 1),
                 read_MBps=round(job["read"]["bw_bytes"] / 1e6, 1),
                 seconds=round(job["job_runtime"] / 1000, 1))
    except (ValueError, KeyError, IndexError):
        r["unparsed"] = err[-500:]
    return r


def link_numbers(lab: dict) -> dict:
    out = {}
    for s, n in lab["nodes"].items():
        try:
            lk = call(n["admin_socket"], "showrcopy", {}, timeout=10)["link"]
        except Exception as e:  # a node that died is a result too
            out[s] = {"error": str(e)}
            continue
        with open(f"/proc/{n['pid']}/status") as f:
            hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
        paths = lk["paths"]
        out[s] = {
            "rss_peak_MiB": hwm // 1024,
            "paths_up": lk["paths_up"],
            "keepalive_rtt_max_ms": max((p.get("rtt_max_ms", 0) for p in paths), default=None),
            "ctl_wait_max_ms": max((p.get("ctl_wait_max_ms", 0) for p in paths), default=None),
            "credit_waits": lk.get("credit_waits"),
            "credit_wait_max_ms": lk.get("credit_wait_max_ms"),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=20)
    ap.add_argument("--phases", default="B,A,AB")
    ap.add_argument("--bs", default="1M")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--qd", type=int, default=64)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--max-inflight", default=None, help="link.max_inflight (default: the node's)")
    ap.add_argument("--timings", choices=("default", "fast"), default="default")
    ap.add_argument("--no-relay", action="store_true")
    ap.add_argument("--dir", default=None, help="lab directory, kept (default: a temporary one, removed)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    opts = dict(FAST_LINK) if a.timings == "fast" else {}
    if a.max_inflight:
        opts["max_inflight"] = a.max_inflight
    d = Path(a.dir or tempfile.mkdtemp(prefix="syncd-linkload-"))
    lab = lab_up(str(d / "lab"), size=a.size, nvolumes=1, npaths=2, link_opts=opts,
                 relay=not a.no_relay, timeout=300)
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "tree": os.getcwd(), "args": vars(a), "phases": {}}
    try:
        for ph in a.phases.split(","):
            offsets = {s: os.path.getsize(n["log"]) for s, n in lab["nodes"].items()}
            procs = [(s, fio(lab["nodes"][s]["volumes"]["vv1"]["uri"], rw, a)) for s, rw in PHASES[ph]]
            fio_res = {s: result(p) for s, p in procs}
            trouble = []
            for s, n in lab["nodes"].items():
                with open(n["log"]) as f:
                    f.seek(offsets[s])
                    trouble += [f"{s}: {ln.strip()}" for ln in f if TROUBLE.search(ln)]
            report["phases"][ph] = {"fio": fio_res, "link": link_numbers(lab), "trouble": trouble[:20]}
            r = report["phases"][ph]
            print(f"phase {ph}: " + "; ".join(
                f"{s} W {x.get('write_MBps')} R {x.get('read_MBps')} MB/s err {x.get('error')}/{x['io_errors']}"
                for s, x in fio_res.items()) + f"; trouble lines {len(trouble)}")
            for s, x in r["link"].items():
                print(f"   node {s}: {x}")
    finally:
        lab_down(str(d / "lab"))
        if not a.dir:  # a temporary directory: its 1 GiB volumes go (the logs' trouble lines are kept below)
            shutil.rmtree(d, ignore_errors=True)
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / time.strftime("linkload-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
