"""Benchmark: fio's nbd engine against syncd and its baselines, in one run, as ratios.

Targets (each on backing files of the same size, prefilled with the same data, same filesystem):
  syncd-repl-A   syncd lab (two nodes, linked directly), volume at the primary site
  syncd-repl-B   the same volume at the secondary site (writes forwarded to the primary)
  syncd-single   one unreplicated syncd NBD server (python -m syncd.nbd.server)
  nbdkit         nbdkit's file plugin: the unreplicated limit
  qemu-quorum    qemu-storage-daemon exporting a quorum of a local file and an NBD child
                 (qemu-nbd on a second file): a replicated C peer

Usage: .venv/bin/python bench/run.py [--runtime 10] [--size 1GiB] [--targets a,b] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from syncd.config import parse_size  # noqa: E402
from syncd.lab import free_port, lab_down, lab_up  # noqa: E402

JOBS = ["randwrite-4k-qd1", "randwrite-4k-qd16", "randread-4k-qd16", "seqwrite-1m-qd4"]
TARGETS = ["syncd-repl-A", "syncd-repl-B", "syncd-single", "nbdkit", "qemu-quorum"]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout}s")


def prefill(path: Path, size: int, seed_file: Path) -> None:
    shutil.copyfile(seed_file, path)
    assert path.stat().st_size == size


@contextmanager
def procs():
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@contextmanager
def target(name: str, d: Path, size: int, seed: Path):
    """Start one target; yield its NBD URI."""
    d.mkdir(parents=True, exist_ok=True)
    log = open(d / f"{name}.log", "wb")
    with procs() as ps:
        if name.startswith("syncd-repl"):
            lab_dir = d / "lab"
            if not (lab_dir / "lab.json").exists():
                raise RuntimeError("lab not started")
            lab = json.loads((lab_dir / "lab.json").read_text())
            site = name[-1]
            yield lab["nodes"][site]["volumes"]["vv1"]["uri"]
        elif name == "syncd-single":
            f = d / "single.img"
            prefill(f, size, seed)
            port = free_port()
            p = subprocess.Popen([sys.executable, "-m", "syncd.nbd.server", "--port", str(port),
                                  "--export", f"vv1={f}"], stdout=log, stderr=log, cwd=ROOT)
            ps.append(p)
            wait_port(port, p)
            yield f"nbd://127.0.0.1:{port}/vv1"
        elif name == "nbdkit":
            f = d / "nbdkit.img"
            prefill(f, size, seed)
            port = free_port()
            p = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "vv1",
                                  "file", str(f)], stdout=log, stderr=log)
            ps.append(p)
            wait_port(port, p)
            yield f"nbd://127.0.0.1:{port}/vv1"
        elif name == "qemu-quorum":
            f1, f2 = d / "quorum-local.img", d / "quorum-remote.img"
            prefill(f1, size, seed)
            prefill(f2, size, seed)
            rport, port = free_port(), free_port()
            r = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "vv1", "-b", "127.0.0.1", "-p", str(rport),
                                  "-t", "--cache=writeback", str(f2)], stdout=log, stderr=log)
            ps.append(r)
            wait_port(rport, r)
            q = subprocess.Popen([
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=lf,filename={f1}",
                "--blockdev", "driver=raw,node-name=local,file=lf",
                "--blockdev", f"driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,server.port={rport},export=vv1",
                "--blockdev", "driver=quorum,node-name=q,vote-threshold=1,children.0=local,children.1=remote,read-pattern=fifo",
                "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                "--export", "type=nbd,id=e0,node-name=q,writable=on,name=vv1",
            ], stdout=log, stderr=log)
            ps.append(q)
            wait_port(port, q)
            yield f"nbd://127.0.0.1:{port}/vv1"
        else:
            raise ValueError(f"unknown target {name}")


def run_fio(job: str, uri: str, size: int, runtime: int) -> dict:
    env = dict(os.environ, URI=uri, SIZE=str(size), RUNTIME=str(runtime))
    p = subprocess.run(["fio", "--output-format=json", str(ROOT / "bench" / "jobs" / f"{job}.fio")],
                       capture_output=True, text=True, env=env, timeout=runtime + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio {job} against {uri} failed: {p.stderr.strip()[-500:]}")
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "errors": j["error"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--dir", default="/tmp/syncd-bench")
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    for tool in ("fio", "nbdkit", "qemu-nbd", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (./scripts/setup installs it)", file=sys.stderr)
            return 2
    size = parse_size(ns.size, "--size")
    targets = [t for t in ns.targets.split(",") if t]
    jobs = [j for j in ns.jobs.split(",") if j]
    d = Path(ns.dir)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    seed = d / "seed.img"
    with open(seed, "wb") as f:  # the same incompressible data behind every target
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))

    results: dict[str, dict[str, dict]] = {}
    lab_dir = d / "lab"
    repl = [t for t in targets if t.startswith("syncd-repl")]
    if repl:
        (d / "labvols").mkdir()
        vols = {}
        for site in ("A", "B"):
            v = d / "labvols" / f"{site}-vv1.img"
            prefill(v, size, seed)
            vols[site] = [str(v)]
        lab_up(str(lab_dir), volume_paths=vols, npaths=2, relay=False, timeout=600)
    try:
        for t in targets:
            results[t] = {}
            with target(t, d, size, seed) as uri:
                for job in jobs:
                    print(f"bench: {t} {job} ...", file=sys.stderr, flush=True)
                    results[t][job] = run_fio(job, uri, size, ns.runtime)
    finally:
        if repl:
            lab_down(str(lab_dir))

    report(results, jobs, ns)
    out = Path(ns.out) if ns.out else ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runtime": ns.runtime, "size": size, "cpus": os.cpu_count(),
                               "results": results}, indent=1))
    print(f"raw results: {out}")
    return 0


def report(results: dict, jobs: list[str], ns) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fio nbd engine, {ns.runtime}s per job, {ns.size} volumes, {os.cpu_count()} CPUs")
    for c in ("target", "workload", "IOPS", "MB/s", "p50 µs", "p99 µs", "× nbdkit", "× qemu-quorum"):
        t.add_column(c, justify="right" if c not in ("target", "workload") else "left")
    for job in jobs:
        base = results.get("nbdkit", {}).get(job)
        peer = results.get("qemu-quorum", {}).get(job)
        for tgt, rs in results.items():
            r = rs.get(job)
            if r is None:
                continue
            metric = "mbps" if job.startswith("seq") else "iops"
            rn = f"{r[metric] / base[metric]:.2f}" if base else "-"
            rp = f"{r[metric] / peer[metric]:.2f}" if peer else "-"
            t.add_row(tgt, job, f"{r['iops']:.0f}", f"{r['mbps']:.1f}", f"{r['p50_us']:.0f}",
                      f"{r['p99_us']:.0f}", rn, rp)
        t.add_section()
    Console(width=140).print(t)


if __name__ == "__main__":
    raise SystemExit(main())
