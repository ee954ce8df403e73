"""Resync throughput and what it costs host I/O, measured in one run (issue 5).

    .venv/bin/python bench/resync.py                      # 1 GiB volume, all of it dirtied, 15 s fio
    .venv/bin/python bench/resync.py --size 256MiB --dirty 128MiB --runtime 5

On the syncd lab (nodes A and B on loopback, two link paths dialled directly):

1. **host alone**: fio 4 KiB random writes at QD16 on A while the group is in sync: the
   baseline IOPS.
2. **resync alone**: B is killed, A writes ``--dirty`` bytes alone (1 MiB sequential writes),
   B is started; from the moment A starts resyncing until the group is in sync again: MB/s of
   resync (bytes A sent as resync / time).
3. **resync under host load**: the same degradation; fio's 4 KiB QD16 random writes on A start,
   B returns 2 s later and resyncs while fio goes on. fio logs IOPS every 100 ms; the bins inside
   the resync window give the host IOPS during resync (× the baseline), A's showrcopy the resync
   MB/s under load.
   ``link.resync_share`` (default 0.5) is the share of time resync takes while hosts are busy.

Timings never decide a test; they are reported here as ratios to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import BenchError, need, parse_size, run_fio  # noqa: E402
from syncd.ctl import call  # noqa: E402
from syncd.lab.rig import lab_down, lab_kill, lab_start, lab_up  # noqa: E402


def group(lab: dict) -> dict:
    return call(lab["nodes"]["A"]["admin_socket"], "showrcopy", {"group": lab["group"]})


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


def degrade(lab: dict, uri: str, dirty: int) -> None:
    """Kill B, write ``dirty`` bytes at A alone (A marks them for resync)."""
    lab_kill(lab["dir"], "B")
    wait(lambda: group(lab)["groups"][0]["peer_mode"] == "detached", 30, "A to go on alone")
    p = subprocess.run(["fio", "--output-format=json", "--name=dirty", "--ioengine=nbd", f"--uri={uri}",
                        "--rw=write", "--bs=1M", "--iodepth=4", f"--size={dirty}"],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise BenchError(f"fio writing the dirty set failed: {p.stderr[-400:]}")


def watch_resync(lab: dict, out: dict, stop: threading.Event) -> None:
    """From A's showrcopy: when resync started and ended, and the resync bytes it sent."""
    while not stop.is_set():
        try:
            r = group(lab)
        except Exception:  # noqa: BLE001 - a node starting up
            time.sleep(0.02)
            continue
        mode = r["groups"][0]["peer_mode"]
        now = time.monotonic()
        if mode == "syncing" and "start" not in out:
            out["start"], out["bytes0"] = now, r["resync_bytes"]
        if mode == "attached" and "start" in out:
            out["end"], out["bytes1"] = now, r["resync_bytes"]
            return
        time.sleep(0.02)


def fio_with_log(uri: str, size: int, runtime: int, log: Path) -> dict:
    """4 KiB random writes at QD16 for ``runtime`` s, IOPS logged every 100 ms (no ramp: the
    log is matched against the resync's start and end)."""
    p = subprocess.run(["fio", "--output-format=json", "--name=host", "--ioengine=nbd", f"--uri={uri}",
                        "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}", "--time_based=1",
                        f"--runtime={runtime}", f"--write_iops_log={log}", "--log_avg_msec=100"],
                       capture_output=True, text=True, timeout=runtime + 120)
    start = p.stdout.find("{")
    if p.returncode != 0 or start < 0:
        raise BenchError(f"fio during resync failed: {(p.stderr + p.stdout)[-400:]}")
    return json.loads(p.stdout[start:])["jobs"][0]["write"]


def iops_between(log: Path, t0_ms: float, t1_ms: float) -> float | None:
    """Mean IOPS of the 100 ms bins of fio's iops log that fall in [t0_ms, t1_ms]."""
    vals = []
    for line in Path(f"{log}_iops.1.log").read_text().splitlines():
        t, v = (float(x) for x in line.split(",")[:2])
        if t0_ms <= t <= t1_ms:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def resync_run(lab: dict, uri: str, dirty: int, runtime: int, with_host: bool, d: Path) -> dict:
    degrade(lab, uri, dirty)
    out: dict = {}
    stop = threading.Event()
    t = threading.Thread(target=watch_resync, args=(lab, out, stop), daemon=True)
    t.start()
    host = None
    if with_host:
        log = d / "fio-resync"
        box: dict = {}
        f = threading.Thread(target=lambda: box.update(r=fio_with_log(uri, lab["size"], runtime, log)), daemon=True)
        t_fio = time.monotonic()
        f.start()
        time.sleep(2.0)  # the host writes to A alone first, then B returns
        lab_start(lab["dir"], "B")
        f.join(runtime + 180)
        if "r" not in box:
            raise BenchError("fio during resync did not finish")
        t.join(600)
        if "end" not in out:
            raise BenchError("the resync did not finish within 600 s")
        w0, w1 = (out["start"] - t_fio) * 1000, (out["end"] - t_fio) * 1000
        host = {"iops_during_resync": iops_between(log, w0, w1),
                "resync_window_in_run_s": [round(w0 / 1000, 2), round(w1 / 1000, 2)],
                "iops_whole_run": box["r"]["iops"]}
        if w1 > runtime * 1000:
            host["note"] = "the resync outlasted the fio run: host IOPS cover only its first part"
    else:
        lab_start(lab["dir"], "B")
        t.join(600)
    stop.set()
    if "end" not in out:
        raise BenchError("the resync did not finish within 600 s")
    secs = out["end"] - out["start"]
    sent = out["bytes1"] - out["bytes0"]
    return {"resync_s": round(secs, 2), "resync_bytes": sent, "resync_mbps": round(sent / secs / 1e6, 1),
            "host": host}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--dirty", default="1GiB", help="bytes written while B is down (the resync's work)")
    ap.add_argument("--runtime", type=int, default=15, help="seconds of fio per host measurement")
    ap.add_argument("--dir", default="/tmp/syncd-bench-resync")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    need("fio")
    size, dirty = parse_size(ns.size), parse_size(ns.dirty)
    if dirty > size:
        raise SystemExit(f"--dirty {ns.dirty} is larger than --size {ns.size}")
    d = Path(ns.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    lab = lab_up(str(d / "lab"), size=f"{size >> 20}MiB", nvolumes=1, npaths=2, relay=False, timeout=600)
    lab["size"] = size
    uri = lab["nodes"]["A"]["volumes"]["vv1"]["uri"]
    res: dict = {"size": size, "dirty": dirty, "runtime": ns.runtime, "job": "randwrite-4k-qd16",
                 "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        res["host_alone"] = run_fio("randwrite-4k-qd16", uri, size, ns.runtime)
        res["resync_alone"] = resync_run(lab, uri, dirty, ns.runtime, False, d)
        res["resync_under_load"] = resync_run(lab, uri, dirty, ns.runtime, True, d)
    finally:
        lab_down(str(d / "lab"))
    base = res["host_alone"]["iops"]
    during = res["resync_under_load"]["host"]
    res["host_iops_ratio_during_resync"] = (round(during["iops_during_resync"] / base, 2)
                                            if base and during["iops_during_resync"] else None)

    from rich.console import Console
    from rich.table import Table

    tb = Table(title=f"resync of {dirty >> 20} MiB dirtied on a {size >> 20} MiB volume "
                     f"(host: fio 4 KiB random writes QD16 on A)")
    for col in ("measurement", "resync MB/s", "resync s", "host IOPS", "host × in-sync baseline"):
        tb.add_column(col)
    ha, ra, rl = res["host_alone"], res["resync_alone"], res["resync_under_load"]
    tb.add_row("host, group in sync (baseline)", "", "", f"{ha['iops']:.0f}", "1.00")
    tb.add_row("resync alone", str(ra["resync_mbps"]), str(ra["resync_s"]), "", "")
    ratio = res["host_iops_ratio_during_resync"]
    tb.add_row("resync while the host writes", str(rl["resync_mbps"]), str(rl["resync_s"]),
               f"{during['iops_during_resync']:.0f}" if during["iops_during_resync"] else "-",
               f"{ratio:.2f}" if ratio else "-")
    Console().print(tb)
    if during.get("note"):
        print("note: " + during["note"])
    out = Path(ns.out) if ns.out else ROOT / "bench" / "results" / f"resync-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
