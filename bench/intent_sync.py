"""What the write-intent log costs under steady fio write loads at site A (issues 10 and 13): per
load and array, the clear passes' own volume fdatasyncs (an extent is cleared only once a volume
flush covers it, a host's or, after 5 s more without one, the pass's own), the log's metadata
fdatasyncs (one per transaction of marks) and the extents marked and evicted, with fio's
throughput and latency beside them. The log is an activity log (``syncd/node/intent.py``):
extents stay marked while written, within the ``[intent] hot`` budget, so on a 1 GiB volume a
load costs metadata syncs only while it first reaches each 4 MiB extent and clear passes clear
nothing (extents leave after ``[intent] idle``, 300 s); ``--hot 64MiB`` shows the LRU at work.

    .venv/bin/python bench/intent_sync.py                  # 1 GiB volume, 45 s per load
    .venv/bin/python bench/intent_sync.py --runtime 20 --loads hot,spread

Loads (fio's nbd engine, on the syncd lab: two nodes on loopback, file-backed volumes, default
link timings, so an extent must be idle for max_request_hold + 1 = 13.25 s before it is cleared):
  hot      4 KiB random writes, QD16, on an 8 MiB hot set (regions never go idle)
  spread   4 KiB random writes, QD4, 200 IOPS, over the whole volume (regions go idle one by one)
  spread-flush  the same, with a host flush every 400 writes (2 s)
  stream   1 MiB sequential writes, QD4, 20 MB/s, over the whole volume (a moving front)
  burst    4 KiB random writes, QD16, unlimited, over the whole volume for the first third of the
           run, then nothing (the idle regions are cleared in a few passes)
  stream-max  1 MiB sequential writes, QD4, unlimited (with a volume larger than 13.25 s of
           writes, the regions behind the front go idle while it writes at full speed: a data
           sync every second competes with the writes; the worst case)

Needs fio. Timings never decide a test; they are reported here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import BenchError, parse_size  # noqa: E402
from syncd.ctl import call  # noqa: E402
from syncd.lab.rig import lab_down, lab_up  # noqa: E402

LOADS = {
    "hot": ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8m"],
    "spread": ["--rw=randwrite", "--bs=4k", "--iodepth=4", "--rate_iops=200"],
    "spread-flush": ["--rw=randwrite", "--bs=4k", "--iodepth=4", "--rate_iops=200", "--fsync=400"],
    "stream": ["--rw=write", "--bs=1m", "--iodepth=4", "--rate=20m"],
    "burst": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "stream-max": ["--rw=write", "--bs=1m", "--iodepth=4"],
}


def volume_intent(lab: dict, site: str) -> dict:
    r = call(lab["nodes"][site]["admin_socket"], "showrcopy", {"group": lab["group"]})
    return r["groups"][0]["volumes"][0].get("intent", {})


def fio(uri: str, size: int, runtime: int, args: list[str]) -> dict:
    p = subprocess.run(["fio", "--output-format=json", "--name=load", "--ioengine=nbd", f"--uri={uri}",
                        f"--size={size}", "--time_based=1", f"--runtime={runtime}", "--lat_percentiles=1", *args],
                       capture_output=True, text=True, timeout=runtime + 120)
    start = p.stdout.find("{")
    if p.returncode != 0 or start < 0:
        raise BenchError(f"fio failed: {(p.stderr + p.stdout)[-400:]}")
    w = json.loads(p.stdout[start:])["jobs"][0]["write"]
    pct = w.get("lat_ns", {}).get("percentile", {})
    return {"iops": w["iops"], "mbps": w["bw_bytes"] / 1e6, "lat_p50_us": pct.get("50.000000", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000}


def run_load(lab: dict, name: str, size: int, runtime: int) -> dict:
    uri = lab["nodes"]["A"]["volumes"]["vv1"]["uri"]
    before = {s: volume_intent(lab, s) for s in ("A", "B")}
    args = LOADS[name]
    if name == "burst":
        r = fio(uri, size, runtime // 3, args)
        time.sleep(runtime - runtime // 3)
    else:
        r = fio(uri, size, runtime, args)
    after = {s: volume_intent(lab, s) for s in ("A", "B")}
    for s in ("A", "B"):
        if "data_syncs" in after[s]:
            n = after[s]["data_syncs"] - before[s].get("data_syncs", 0)
            r[f"syncs_{s}"] = n
            r[f"syncs_per_min_{s}"] = round(n * 60 / runtime, 1)
        for k in ("metadata_syncs", "marks", "evictions"):
            if k in after[s]:
                r[f"{k}_{s}"] = after[s][k] - before[s].get(k, 0)
        r[f"marked_at_end_{s}"] = after[s].get("marked_regions")
        r[f"hot_extents_at_end_{s}"] = after[s].get("hot_extents")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runtime", type=int, default=45, help="seconds per load (default 45)")
    ap.add_argument("--loads", default=",".join(LOADS))
    ap.add_argument("--dir", default="/tmp/syncd-bench-intent")
    ap.add_argument("--hot", default=None, help="[intent] hot of the nodes (default: the node's, 16GiB)")
    ns = ap.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("bench: fio is missing (./scripts/setup installs it)")
    size = parse_size(ns.size)
    loads = [x for x in ns.loads.split(",") if x]
    for x in loads:
        if x not in LOADS:
            raise SystemExit(f"bench: unknown load {x!r} (loads: {', '.join(LOADS)})")
    shutil.rmtree(ns.dir, ignore_errors=True)
    lab = lab_up(ns.dir, size=ns.size, nvolumes=1, npaths=2, relay=False, timeout=600,
                 intent={"hot": ns.hot} if ns.hot else None)
    results = {}
    try:
        for name in loads:
            # Loads follow each other on the same logs: extents a load left marked stay warm.
            results[name] = r = run_load(lab, name, size, ns.runtime)
            print(f"{name:12s} {r['iops']:8.0f} IOPS {r['mbps']:7.1f} MB/s  p50 {r['lat_p50_us']:7.0f} us  "
                  f"p99 {r['lat_p99_us']:7.0f} us  intent data syncs A {r.get('syncs_A', 'n/a')} "
                  f"B {r.get('syncs_B', 'n/a')}, metadata syncs A {r.get('metadata_syncs_A', 'n/a')} "
                  f"B {r.get('metadata_syncs_B', 'n/a')}, evictions A {r.get('evictions_A', 'n/a')} in {ns.runtime} s",
                  flush=True)
    finally:
        lab_down(ns.dir)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
