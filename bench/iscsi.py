"""Benchmark: syncd's iSCSI target against tgt (Debian `tgt`, the userspace iSCSI target in C)
serving the same data, in one run, through the same initiator: qemu's iSCSI driver (libiscsi)
driven by `qemu-img bench`.

Targets (each on its own copy of one seed image):
  tgt            tgtd serving the file (LUN 1; rdwr backing store, its default)
  syncd-single   python -m syncd.iscsi.server serving the file, unreplicated
  syncd-repl-A   the lab's node A (`syncd lab up --iscsi`): replicated to B before each ack
  syncd-repl-B   the same volume through site B's target

Jobs (sequential offsets, as `qemu-img bench` issues them): 4 KiB writes at queue depth 1 and
16, 4 KiB reads at queue depth 16, 1 MiB writes at queue depth 4. Each result is IOPS and MB/s
from the command count and the time qemu-img reports, and a ratio to tgt in the same run.
Timings never decide anything: the report is written beside its JSON as Markdown and PNG.

Usage: .venv/bin/python bench/iscsi.py [--size 256MiB] [--scale 1.0] [--out bench/results/DATE-iscsi.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import benchkit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IQN = "iqn.2026-12.org.syncd:bench"
JOBS = {  # name: (qemu-img bench options, commands at --scale 1)
    "write-4k-qd1": (["-w", "-s", "4096", "-d", "1"], 4000),
    "write-4k-qd16": (["-w", "-s", "4096", "-d", "16"], 30000),
    "read-4k-qd16": (["-s", "4096", "-d", "16"], 40000),
    "write-1m-qd4": (["-w", "-s", "1M", "-d", "4"], 400),
}
ROWS = ["tgt", "syncd-single", "syncd-repl-A", "syncd-repl-B"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise SystemExit(f"iscsi bench: {what} did not start listening on {port}") from None
            time.sleep(0.05)


def copy_of(seed: Path, dest: Path) -> Path:
    shutil.copyfile(seed, dest)
    return dest


@contextmanager
def tgt(d: Path, seed: Path):
    img = copy_of(seed, d / "tgt.img")
    port, ctl = free_port(), str(1000 + os.getpid() % 5000)
    log = open(d / "tgtd.log", "w")
    p = subprocess.Popen(["tgtd", "-f", "-C", ctl, "--iscsi", f"portal=127.0.0.1:{port}"], stdout=log,
                         stderr=subprocess.STDOUT)
    try:
        wait_port(port, p, "tgtd")
        adm = ["tgtadm", "-C", ctl, "--lld", "iscsi"]
        subprocess.run([*adm, "--op", "new", "--mode", "target", "--tid", "1", "-T", IQN], check=True)
        subprocess.run([*adm, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(img)],
                       check=True)
        subprocess.run([*adm, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"], check=True)
        yield {"tgt": f"iscsi://127.0.0.1:{port}/{IQN}/1"}
    finally:
        p.terminate()  # tgtd in the foreground may ignore it while targets exist
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        log.close()


@contextmanager
def syncd_single(d: Path, seed: Path):
    img = copy_of(seed, d / "single.img")
    port = free_port()
    log = open(d / "single.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "syncd.iscsi.server", "--port", str(port), "--target", IQN,
                          "--lun", f"0={img}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_port(port, p, "syncd.iscsi.server")
        yield {"syncd-single": f"iscsi://127.0.0.1:{port}/{IQN}/0"}
    finally:
        p.terminate()
        p.wait(10)
        log.close()


@contextmanager
def syncd_repl(d: Path, seed: Path, size: int):
    from syncd.lab.rig import lab_down, lab_up

    lab_dir = d / "lab"
    paths = {}
    for n in ("A", "B"):
        (lab_dir / n).mkdir(parents=True, exist_ok=True)
        paths[n] = [str(copy_of(seed, lab_dir / n / "vv1.img"))]
    lab = lab_up(str(lab_dir), size=str(size), nvolumes=1, npaths=2, volume_paths=paths, relay=False, witness=None,
                 timeout=300, iscsi=True)
    try:
        yield {f"syncd-repl-{n}": lab["nodes"][n]["volumes"]["vv1"]["iscsi"] for n in ("A", "B")}, lab
    finally:
        lab_down(str(lab_dir))


def bench(url: str, job: str, scale: float) -> dict:
    opts, count = JOBS[job]
    count = max(16, int(count * scale))
    size = 1 << 20 if "1M" in opts else 4096
    p = subprocess.run(["qemu-img", "bench", "-f", "raw", "-c", str(count), *opts, url], capture_output=True,
                       text=True, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout)
    if p.returncode != 0 or m is None:
        return {"error": (p.stdout + p.stderr)[-500:]}
    secs = float(m.group(1))
    return {"count": count, "seconds": secs, "iops": count / secs, "mbps": count * size / secs / 1e6}


def report(doc: dict, out: Path) -> None:
    lines = [f"# bench/iscsi.py, {doc['date']}", "", "Where:", *benchkit.machine_lines(doc["machine"]),
             f"- tgt {doc['tgt_version']}, initiator: qemu-img bench (qemu's iSCSI driver, libiscsi)",
             f"- volume {doc['size'] >> 20} MiB per target, the same seed data; `--scale {doc['scale']}`", "",
             "| target | job | IOPS | MB/s | × tgt |", "|---|---|---|---|---|"]
    for job in JOBS:
        base = doc["results"].get("tgt", {}).get(job, {}).get("iops")
        for row in ROWS:
            r = doc["results"].get(row, {}).get(job)
            if r is None or "error" in r:
                lines.append(f"| {row} | {job} | failed | | |")
                continue
            lines.append(f"| {row} | {job} | {r['iops']:.0f} | {r['mbps']:.1f} | "
                         f"{benchkit.fmt_ratio(benchkit.ratio(r['iops'], base))} |")
    lines += ["", f"Replicas of the replicated volume identical after the run: {doc['replicas_identical']}", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for i, row in enumerate(ROWS):
        base = [doc["results"].get("tgt", {}).get(j, {}).get("iops") or 0 for j in JOBS]
        vals = [(doc["results"].get(row, {}).get(j, {}).get("iops") or 0) / b if b else 0
                for j, b in zip(JOBS, base, strict=True)]
        ax.bar([k + i * width for k in range(len(JOBS))], vals, width, label=row)
    ax.set_xticks([k + 1.5 * width for k in range(len(JOBS))], list(JOBS))
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("IOPS × tgt (same run)")
    ax.set_title(f"iSCSI targets through qemu-img bench, {doc['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every job's command count")
    ap.add_argument("--out")
    ns = ap.parse_args()
    for tool in ("tgtd", "tgtadm", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"iscsi bench: {tool} is missing (Debian: tgt, qemu-utils with qemu-block-extra)")
    from syncd.config import parse_size

    size = parse_size(ns.size, "--size")
    date = time.strftime("%Y-%m-%d-%H%M")
    out = Path(ns.out or ROOT / "bench" / "results" / f"{date}-iscsi.json")
    doc: dict = {"date": date, "size": size, "scale": ns.scale, "machine": benchkit.machine_record(ROOT),
                 "tgt_version": benchkit.first_version(subprocess.run(["tgtd", "--version"], capture_output=True,
                                                                      text=True).stdout) or "?",
                 "results": {}}
    with tempfile.TemporaryDirectory(prefix="syncd-iscsi-bench-") as tmp:
        d = Path(tmp)
        seed = d / "seed.img"
        with open(seed, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        with ExitStack() as stack:
            urls = {}
            urls.update(stack.enter_context(tgt(d, seed)))
            urls.update(stack.enter_context(syncd_single(d, seed)))
            repl, lab = stack.enter_context(syncd_repl(d, seed, size))
            urls.update(repl)
            for job in JOBS:
                for row in ROWS:
                    r = bench(urls[row], job, ns.scale)
                    doc["results"].setdefault(row, {})[job] = r
                    print(f"{row:14} {job:14} " + (f"{r['iops']:8.0f} IOPS {r['mbps']:7.1f} MB/s" if "iops" in r
                                                  else f"failed: {r['error'][-200:]}"), flush=True)
            a, b = (lab["nodes"][n]["volumes"]["vv1"]["path"] for n in ("A", "B"))
            subprocess.run(["sync"], check=False)
            doc["replicas_identical"] = subprocess.run(["cmp", "-s", a, b]).returncode == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    report(doc, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
