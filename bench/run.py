"""Benchmark: fio's nbd engine against syncd and its baselines, in one run, as ratios.

Targets (letters as in bench/README.md; each on backing files of the same size, written once
with the same random data, in the same directory):
  a  syncd-repl-A   syncd lab (two nodes on loopback, linked directly), volume vv1 at site A
     syncd-repl-B   the same volume at site B (secondary: its writes are forwarded to A)
  b  syncd-single   one unreplicated syncd NBD server (python -m syncd.nbd.server)
  c  nbdkit         nbdkit's file plugin: the unreplicated limit
  d  qemu-quorum    qemu-storage-daemon exporting a quorum node of a local file and an NBD child
                    (a second server on a second file): a replicated peer written in C

The jobs include the QD16 write and read jobs over 4 NBD connections (multi-conn); after the
targets, the cold write-intent log job (--cold-log: 4K random writes QD16 over a sparse 10 GiB
volume against the same job over its first 256 MiB).

With --link-security insecure,key,tls the replicated target (a, site A) runs once per mode of
the link's security (proto/security.md), in the same run, and a second table gives each mode as
a ratio to insecure: what authenticating (key: HMAC records) or encrypting (tls) the link costs.
With --distance 0,0.5,1,2,5,10: QD1 writes at site A with each round trip added by the lab's
relay, and QD64 at 5 ms. With --memory: each node's peak RSS under 8 jobs x QD64 x 1 MiB writes.

Every run writes beside its JSON a Markdown report (DATE.md) and a chart (DATE.png), with the
machine it ran on (bench/benchkit.py).

Usage: .venv/bin/python bench/run.py [--runtime 10] [--size 1GiB] [--targets a,b,c,d] [--out FILE]
       .venv/bin/python bench/run.py --link-security insecure,key,tls [--jobs randwrite-4k-qd16,seqwrite-1m-qd4]
       .venv/bin/python bench/run.py --distance 0,0.5,1,2,5,10
       .venv/bin/python bench/run.py --memory
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import benchkit

ROOT = Path(__file__).resolve().parent.parent
JOBDIR = ROOT / "bench" / "jobs"

JOBS = ["randwrite-4k-qd1", "randwrite-4k-qd16", "randread-4k-qd16", "seqwrite-1m-qd4", "seqread-1m-qd4",
        "randwrite-4k-qd16-mc4", "randread-4k-qd16-mc4"]
COLD_JOB = "cold-randwrite-4k-qd16"  # no ramp: the first writes to each extent count
DISTANCE_QD1, DISTANCE_QD64, MEMORY_JOB = "randwrite-4k-qd1", "randwrite-4k-qd64", "randwrite-1m-qd64-8jobs"
DISTANCE_QD16 = "randwrite-4k-qd16"  # no target: what a moderate queue costs at --qd64-rtt
TARGETS = ["syncd-repl-A", "syncd-repl-B", "syncd-single", "nbdkit", "qemu-quorum"]
ALIASES = {"a": ["syncd-repl-A", "syncd-repl-B"], "b": ["syncd-single"], "c": ["nbdkit"],
           "d": ["qemu-quorum"], "syncd-repl": ["syncd-repl-A", "syncd-repl-B"]}
BASELINE, PEER = "nbdkit", "qemu-quorum"
LINK_MODES = ("insecure", "key", "tls")
LINK_JOBS = ["randwrite-4k-qd16", "seqwrite-1m-qd4"]


class BenchError(Exception):
    """A target could not be started or measured; the run goes on with the other targets."""


# ---------------------------------------------------------------------------------------------
# helpers

def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", s, re.I)
    if not m:
        raise SystemExit(f"bench: --size {s!r} is not a size (use e.g. 256MiB, 1GiB)")
    n = int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))
    if n < (1 << 20) or n % (1 << 20):
        raise SystemExit("bench: --size must be a positive multiple of 1 MiB")
    return n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return ("\n    " + "\n    ".join(lines)) if lines else ""


def wait_port(port: int, proc: subprocess.Popen | None = None, log: Path | None = None,
              timeout: float = 30) -> None:
    """Wait until 127.0.0.1:port accepts a TCP connection (fail early if proc exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{Path(proc.args[0]).name} exited with status {proc.returncode} "
                             f"before port {port} opened{tail(log) if log else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"port {port} did not accept connections within {timeout:.0f}s"
                     f"{tail(log) if log else ''}")


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tool(s): {', '.join(missing)} (Debian: apt-get install "
                         "fio nbdkit qemu-utils qemu-system-common libnbd-bin)")


def make_seed(path: Path, size: int) -> None:
    """The same incompressible data behind every target, written once."""
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))


def backing(path: Path, seed: Path | int) -> Path:
    """A backing file: a full (non-sparse, non-reflinked) copy of the seed; when ``seed`` is a
    size instead, a sparse file of that size (the cold write-intent log's 10 GiB volumes)."""
    if isinstance(seed, int):
        with open(path, "wb") as f:
            f.truncate(seed)
        return path
    shutil.copyfile(seed, path)  # sendfile(2) on Linux: real blocks, never a reflink
    return path


def same_content(p1: Path, p2: Path) -> bool:
    with open(p1, "rb") as f1, open(p2, "rb") as f2:
        while True:
            b1, b2 = f1.read(8 << 20), f2.read(8 << 20)
            if b1 != b2:
                return False
            if not b1:
                return True


def compare_replicas(info: dict, files: list[Path]) -> None:
    """``info["replicas_identical"]`` for a replicated target's files, once its servers stopped
    (also after an interrupt or a failed run: every write that was made must be on both); an
    empty list: the target never served, nothing to compare."""
    if not files:
        return
    try:
        info["replicas_identical"] = same_content(*files)
    except OSError as e:
        info["replicas_identical"] = f"not compared: {e}"


class Procs:
    """Processes started for one target; all are stopped (TERM, then KILL) on exit."""

    def __init__(self, d: Path):
        self.d, self.ps = d, []

    def start(self, name: str, args: list[str], **kw) -> tuple[subprocess.Popen, Path]:
        log = self.d / f"{name}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        self.ps.append(p)
        return p, log

    def stop(self) -> None:
        for p in self.ps:
            if p.poll() is None:
                p.terminate()
        for p in self.ps:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ps.clear()


# ---------------------------------------------------------------------------------------------
# targets: each context manager yields {row name: NBD URI} and records checks in `info`

@contextmanager
def syncd_repl(d: Path, size: int, seed: Path | int, info: dict, security: str | None = None,
               relay: bool = False):
    """(a) the syncd lab: nodes A and B, one replicated volume vv1, links without the relay.
    ``security``: the link's mode (insecure, key, tls; None: the lab's default, a key); the
    rows are then named syncd-repl-A/MODE. ``relay``: through the lab's relay (--distance), whose
    control socket is left in info["_link"]; the node pids are in info["_pids"]."""
    import inspect

    try:
        from syncd.lab.rig import lab_down, lab_up
    except Exception as e:  # the node code may be under construction
        raise BenchError(f"cannot import syncd.lab.rig: {type(e).__name__}: {e}") from None
    lab_dir = d / "lab"
    params = inspect.signature(lab_up).parameters
    vols = None
    kw: dict = {"size": f"{size >> 20}MiB", "nvolumes": 1, "npaths": 2}
    if "volume_paths" in params:  # prefilled files like every other target
        vols = {s: backing(d / f"repl-{s}.img", seed) for s in ("A", "B")}
        kw["volume_paths"] = {s: [str(p)] for s, p in vols.items()}
    else:
        info["note"] = "lab_up has no volume_paths: the lab created its own (unfilled) files"
    if "relay" in params:
        kw["relay"] = relay  # the lab's Python link relay is an extra hop: only to add delay
    if "timeout" in params:
        kw["timeout"] = 600  # initial sync of the prefilled volumes (identical: digests only)
    suffix = ""
    if security is not None:
        suffix = f"/{security}"
        if security == "insecure":
            kw["link_opts"] = {"insecure": True}
        elif security == "tls":
            kw["tls"] = "link"  # the link alone: NBD stays clear, as for the other modes
        info["link_security"] = security
    t0 = time.monotonic()
    served: list[Path] = []  # the replicas, once fio may have written them
    try:
        try:
            lab = lab_up(str(lab_dir), **kw)
        except Exception as e:
            raise BenchError(f"lab_up failed: {type(e).__name__}: {e}"
                             f"{tail(lab_dir / 'A.log', 8)}{tail(lab_dir / 'B.log', 8)}") from None
        info["lab_up_s"] = round(time.monotonic() - t0, 1)
        uris = {f"syncd-repl-{s}{suffix}": lab["nodes"][s]["volumes"]["vv1"]["uri"] for s in ("A", "B")}
        info["_pids"] = {s: lab["nodes"][s]["pid"] for s in ("A", "B")}
        if relay:
            info["_link"] = {"control": lab["link"]["control"], "npaths": lab["link"]["npaths"]}
        if security is not None:
            from syncd.ctl import call

            got = call(lab["nodes"]["A"]["admin_socket"], "showrcopy")["link"].get("security")
            if got != security:
                raise BenchError(f"the link runs in mode {got!r}, not {security!r}")
        for s in ("A", "B"):
            wait_port(int(lab["nodes"][s]["nbd"].rsplit(":", 1)[1]), log=Path(lab["nodes"][s]["log"]))
        served = [Path(lab["nodes"][s]["volumes"]["vv1"]["path"]) for s in ("A", "B")]
        yield uris
    finally:
        try:
            if (lab_dir / "lab.json").exists():
                lab_down(str(lab_dir))
        finally:
            compare_replicas(info, served)


@contextmanager
def syncd_single(d: Path, size: int, seed: Path, info: dict):
    """(b) one unreplicated syncd NBD server."""
    import importlib.util

    try:
        found = importlib.util.find_spec("syncd.nbd.server") is not None
    except Exception as e:
        raise BenchError(f"cannot import syncd.nbd: {type(e).__name__}: {e}") from None
    if not found:
        raise BenchError("syncd/nbd/server.py does not exist yet")
    f = backing(d / "single.img", seed)
    port = free_port()
    procs = Procs(d)
    try:
        p, log = procs.start("syncd-single", [sys.executable, "-m", "syncd.nbd.server", "--host", "127.0.0.1",
                                              "--port", str(port), "--export", f"vv1={f}"], cwd=ROOT)
        wait_port(port, p, log)
        yield {"syncd-single": f"nbd://127.0.0.1:{port}/vv1"}
    finally:
        procs.stop()


@contextmanager
def nbdkit(d: Path, size: int, seed: Path, info: dict):
    """(c) nbdkit's file plugin, default thread count."""
    need("nbdkit")
    f = backing(d / "nbdkit.img", seed)
    port = free_port()
    procs = Procs(d)
    try:
        p, log = procs.start("nbdkit", ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                                        "file", str(f)])
        wait_port(port, p, log)
        yield {"nbdkit": f"nbd://127.0.0.1:{port}/vv1"}
    finally:
        procs.stop()


def remote_server(kind: str, port: int, f: Path) -> list[str]:
    if kind == "nbdkit":
        return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), "-e", "vv1",
                "file", str(f)]
    return ["qemu-nbd", "-f", "raw", "-x", "vv1", "-b", "127.0.0.1", "-p", str(port), "-t",
            "--cache=writeback", str(f)]


@contextmanager
def qemu_quorum(d: Path, size: int, seed: Path, info: dict, remote: str = "nbdkit"):
    """(d) qemu-storage-daemon: quorum(raw(file local), nbd(remote server on a second file))."""
    need("qemu-storage-daemon", "qemu-io", remote if remote == "nbdkit" else "qemu-nbd")
    f1, f2 = backing(d / "quorum-local.img", seed), backing(d / "quorum-remote.img", seed)
    rport, port = free_port(), free_port()
    info["remote_server"] = remote
    procs = Procs(d)
    served = False
    try:
        r, rlog = procs.start("quorum-remote", remote_server(remote, rport, f2))
        wait_port(rport, r, rlog)
        q, qlog = procs.start("qemu-storage-daemon", [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=lf,filename={f1}",
            "--blockdev", "driver=raw,node-name=local,file=lf",
            "--blockdev", "driver=nbd,node-name=remote,server.type=inet,server.host=127.0.0.1,"
                          f"server.port={rport},export=vv1",
            # vote-threshold=2: a write succeeds only when both children wrote it, as a synchronous
            # replicator's must (with 1 the quorum goes on writing the local file alone, unreported,
            # once its NBD child is gone: tried by hand, bench/README.md).
            "--blockdev", "driver=quorum,node-name=q,vote-threshold=2,children.0=local,children.1=remote,"
                          "read-pattern=fifo",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
            "--export", "type=nbd,id=e0,node-name=q,writable=on,name=vv1",
        ])
        wait_port(port, q, qlog)
        uri = f"nbd://127.0.0.1:{port}/vv1"
        # it must really write both files: one write through the export, then read both files
        off, n = size // 2, 64 << 10
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0xa5 {off} {n}", "-c", "flush", uri],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise BenchError(f"qemu-io write through the quorum export failed: {p.stdout}{p.stderr}")
        got = []
        for f in (f1, f2):
            with open(f, "rb") as fh:
                fh.seek(off)
                got.append(fh.read(n) == b"\xa5" * n)
        info["write_reaches_both_files"] = all(got)
        if not all(got):
            raise BenchError(f"a write through the quorum export did not reach both files "
                             f"(local: {got[0]}, remote: {got[1]})")
        served = True
        yield {"qemu-quorum": uri}
    finally:
        try:
            procs.stop()
        finally:
            compare_replicas(info, [f1, f2] if served else [])


GROUPS = {  # group -> (rows it yields, context manager)
    "a": (["syncd-repl-A", "syncd-repl-B"], syncd_repl),
    "b": (["syncd-single"], syncd_single),
    "c": (["nbdkit"], nbdkit),
    "d": (["qemu-quorum"], qemu_quorum),
}


# ---------------------------------------------------------------------------------------------
# fio

def fio_version() -> str:
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def run_fio(job: str, uri: str, size: int, runtime: int) -> dict:
    env = dict(os.environ, URI=uri, SIZE=str(size), RUNTIME=str(runtime))
    try:
        p = subprocess.run(["fio", "--output-format=json", str(JOBDIR / f"{job}.fio")],
                           capture_output=True, text=True, env=env, timeout=runtime + 120)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {job} against {uri} did not finish within {runtime + 120}s") from None
    # fio prints engine errors as text before the JSON document
    start = p.stdout.find("{")
    if p.returncode != 0 or start < 0:
        msg = (p.stderr + p.stdout[: max(start, 0)] if start >= 0 else p.stderr + p.stdout).strip()
        raise BenchError(f"fio {job} against {uri} failed (status {p.returncode}): {msg[-600:]}")
    j = json.loads(p.stdout[start:])["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    r = {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6, "io_bytes": side["io_bytes"],
         "fio_error": j["error"]}
    for kind in ("clat", "lat"):  # microseconds
        st = side.get(f"{kind}_ns", {})
        pct = st.get("percentile", {})
        r[f"{kind}_p50_us"] = pct.get("50.000000", 0) / 1000
        r[f"{kind}_p99_us"] = pct.get("99.000000", 0) / 1000
        r[f"{kind}_mean_us"] = st.get("mean", 0) / 1000
    if j["error"]:
        raise BenchError(f"fio {job} against {uri}: I/O error {j['error']}")
    return r


# ---------------------------------------------------------------------------------------------

def select(spec: str) -> list[str]:
    rows: list[str] = []
    for t in (s.strip() for s in spec.split(",")):
        if not t:
            continue
        names = ALIASES.get(t.lower()) or ([t] if t in TARGETS else None)
        if names is None:
            raise SystemExit(f"bench: unknown target {t!r} (use a,b,c,d or {', '.join(TARGETS)})")
        rows += [n for n in names if n not in rows]
    return rows


def median_run(job: str, uri: str, span: int, ns) -> dict:
    """fio ``job`` --repeat times in a row; the median run (by IOPS, MB/s for sequential jobs)."""
    best = benchkit.pick_median(job, [run_fio(job, uri, span, ns.runtime) for _ in range(ns.repeat)])
    assert best is not None  # run_fio raises rather than return nothing
    return best


class RssSampler:
    """Samples VmRSS of some processes every 0.2 s in a thread and reads their VmHWM (the
    kernel's own peak) at the end; reset() clears the peaks (clear_refs 5) between phases."""

    def __init__(self, pids: dict[str, int]):
        self.pids, self.samples = pids, {s: 0 for s in pids}
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    @staticmethod
    def status(pid: int, key: str) -> int:
        """kB of ``key`` (VmRSS, VmHWM) in /proc/PID/status; 0 if the process is gone."""
        try:
            with open(f"/proc/{pid}/status") as f:
                return next((int(ln.split()[1]) for ln in f if ln.startswith(key + ":")), 0)
        except OSError:
            return 0

    def reset(self) -> bool:
        ok = True
        for pid in self.pids.values():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                ok = False
        self.samples = {s: 0 for s in self.pids}
        return ok

    def __enter__(self) -> RssSampler:
        def loop():
            while not self._stop.wait(0.2):
                for s, pid in self.pids.items():
                    self.samples[s] = max(self.samples[s], self.status(pid, "VmRSS"))
        self._stop.clear()
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t:
            self._t.join()

    def peaks_mb(self) -> dict[str, float]:
        """Per process: the larger of VmHWM and the sampled VmRSS, in MiB (the budget: 256 MB, counted as MiB)."""
        return {s: max(self.status(pid, "VmHWM"), self.samples[s]) / 1024 for s, pid in self.pids.items()}


def settle() -> None:
    """Write back the page cache (the backing files just copied from the seed: 1 GiB each)
    before measuring, so that no target's first job pays for the kernel's writeback of them."""
    t0 = time.monotonic()
    os.sync()
    print(f"bench: page cache written back ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)


def start(g: str, cm, gd: Path, size: int, seed: Path | int, info: dict, ns):
    """Group ``g``'s context manager (its servers, up on entry), with its options from ``ns``."""
    return cm(gd, size, seed, info, **({"remote": ns.quorum_remote} if g == "d" else {}))


def run_interleaved(groups: dict, rows: list[str], jobs: list[str], size: int, seed: Path, d: Path, ns,
                    results: dict, errors: dict, checks: dict) -> None:
    """Every group's servers up at once; then job by job, ``--repeat`` rounds, each round every
    row once (``benchkit.rounds``): a slow spell of the machine falls on the rows of the same round, not
    on one target's jobs, and a row's ratio is taken round by round (benchkit.paired_ratio).
    The idle targets cost the measured one page cache and little CPU (bench/README.md)."""
    gdirs = []
    try:
        with ExitStack() as stack:  # every target stopped (and its replicas compared) however this ends
            uris: dict[str, str] = {}
            for g, (grows, cm) in groups.items():
                want = [r for r in grows if r in rows]
                if not want:
                    continue
                gd = d / g
                gd.mkdir()
                gdirs.append(gd)
                info: dict = {}
                checks[g] = info
                try:
                    got = stack.enter_context(start(g, cm, gd, size, seed, info, ns))
                except BenchError as e:
                    for r in want:
                        errors.setdefault(r, str(e))
                    print(f"bench: {'/'.join(want)}: {e}", file=sys.stderr)
                    continue
                uris.update((r, got[r]) for r in want)
            live = [r for r in rows if r in uris]
            settle()
            for job in jobs:
                runs: dict[str, list[dict | None]] = {r: [] for r in live}
                for k, order in enumerate(benchkit.rounds(live, ns.repeat)):
                    for r in order:
                        print(f"bench: {job}, round {k + 1} of {ns.repeat}: {r} ({uris[r]}) ...", file=sys.stderr,
                              flush=True)
                        try:
                            runs[r].append(run_fio(job, uris[r], size, ns.runtime))
                        except BenchError as e:
                            runs[r].append(None)
                            errors[f"{r} {job}" + (f" (round {k + 1})" if ns.repeat > 1 else "")] = str(e)
                            print(f"bench: {e}", file=sys.stderr)
                for r in live:
                    best = benchkit.pick_median(job, runs[r])
                    if best is not None:
                        results.setdefault(r, {})[job] = best
    finally:
        for gd in gdirs:
            drop_images(gd, ns)


def run_groups(groups: dict, rows: list[str], jobs: list[str], size: int, seed: Path | int, d: Path, ns,
               results: dict, errors: dict, checks: dict, spans: dict[str, int] | None = None,
               prefix: str = "") -> None:
    """Each group's servers up, its rows x jobs measured, its servers down. ``spans``: job
    label -> fio size (the cold-log jobs run one job file over two spans of the same volume)."""
    for g, (grows, cm) in groups.items():
        want = [r for r in grows if r in rows]
        if not want:
            continue
        gd = d / (prefix + g)
        gd.mkdir()
        info: dict = {}
        checks[prefix + g] = info
        try:
            with start(g, cm, gd, size, seed, info, ns) as uris:
                settle()
                for r in want:
                    for label, span in (spans or {j: size for j in jobs}).items():
                        job = COLD_JOB if spans else label
                        print(f"bench: {r} {label} ({uris[r]}) ...", file=sys.stderr, flush=True)
                        try:
                            results.setdefault(r, {})[label] = median_run(job, uris[r], span, ns)
                        except BenchError as e:
                            errors[f"{prefix}{r} {label}"] = str(e)
                            print(f"bench: {e}", file=sys.stderr)
        except BenchError as e:
            for r in want:
                errors.setdefault(prefix + r, str(e))
            print(f"bench: {'/'.join(want)}: {e}", file=sys.stderr)
        finally:
            if not ns.keep:
                for f in gd.glob("*.img"):
                    f.unlink()


def run_distance(rtts: list[float], size: int, seed: Path, d: Path, ns, errors: dict, checks: dict) -> dict:
    """QD1 writes at A per added round trip (the lab's relay), QD64 with none and with
    --qd64-rtt; first both jobs on a lab linked directly, to compare the relay's own cost."""
    from syncd.lab.relay import proxy_command

    dist: dict = {"direct": {}, "relay": {}, "qd64": {}, "qd16": {}, "qd64_rtt_ms": ns.qd64_rtt}
    for mode in ("direct", "relay"):
        gd = d / f"distance-{mode}"
        gd.mkdir()
        info: dict = {}
        checks[f"distance-{mode}"] = info
        try:
            with syncd_repl(gd, size, seed, info, relay=(mode == "relay")) as uris:
                uri = uris["syncd-repl-A"]
                if mode == "direct":
                    for key, job in (("qd1", DISTANCE_QD1), ("qd64", DISTANCE_QD64)):
                        print(f"bench: distance, direct link, {job} ...", file=sys.stderr, flush=True)
                        dist["direct"][key] = median_run(job, uri, size, ns)
                    continue
                link = info["_link"]
                for rtt in sorted(set(rtts) | {0.0, ns.qd64_rtt}):
                    proxy_command(link["control"], "delay", ms=rtt, paths=list(range(link["npaths"])))
                    jobs = [("qd1", DISTANCE_QD1)] if rtt in rtts or rtt == 0 else []
                    if rtt in (0.0, ns.qd64_rtt):
                        jobs += [("qd16", DISTANCE_QD16), ("qd64", DISTANCE_QD64)]
                    for key, job in jobs:
                        print(f"bench: distance, +{rtt:g} ms, {job} ...", file=sys.stderr, flush=True)
                        try:
                            res = median_run(job, uri, size, ns)
                        except BenchError as e:
                            errors[f"distance +{rtt:g} ms {job}"] = str(e)
                            continue
                        if key == "qd1":
                            dist["relay"].setdefault(f"{rtt:g}", {})["qd1"] = res
                        else:
                            dist[key][f"{rtt:g}"] = res
                proxy_command(link["control"], "delay", ms=0, paths=list(range(link["npaths"])))
        except BenchError as e:
            errors[f"distance {mode}"] = str(e)
            print(f"bench: distance {mode}: {e}", file=sys.stderr)
        finally:
            drop_images(gd, ns)
    return dist


def run_memory(size: int, seed: Path, d: Path, ns, errors: dict, checks: dict) -> dict:
    """Peak RSS of each node (VmHWM, reset before each phase, and sampled VmRSS) under 8 jobs x
    QD64 x 1 MiB random writes at A, then at B; the lab's default limits."""
    mem: dict = {"load": "fio 8 jobs × QD64 × 1 MiB randwrite", "budget_MB": benchkit.MEMORY_BUDGET_MB,
                 "phases": {}}
    gd = d / "memory"
    gd.mkdir()
    info: dict = {}
    checks["memory"] = info
    try:
        with syncd_repl(gd, size, seed, info) as uris:
            for site in ("A", "B"):
                sampler = RssSampler(info["_pids"])
                mem["hwm_reset"] = sampler.reset()
                print(f"bench: memory, {MEMORY_JOB} at {site} ...", file=sys.stderr, flush=True)
                try:
                    with sampler:
                        res = run_fio(MEMORY_JOB, uris[f"syncd-repl-{site}"], size, ns.runtime)
                except BenchError as e:
                    errors[f"memory {site}"] = str(e)
                    res = {}
                mem["phases"][site] = {"mbps": res.get("mbps"), "peak_MB": sampler.peaks_mb(),
                                       "sampled_rss_MB": {s: v / 1024 for s, v in sampler.samples.items()}}
    except BenchError as e:
        errors["memory"] = str(e)
        print(f"bench: memory: {e}", file=sys.stderr)
    finally:
        drop_images(gd, ns)
    return mem


def drop_images(d: Path, ns) -> None:
    """Backing files are deleted after their target (page cache freed) unless --keep."""
    if not ns.keep:
        for f in d.glob("*.img"):
            f.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per job after a 2 s ramp (default 10)")
    ap.add_argument("--size", default="1GiB", help="size of every backing file (default 1GiB)")
    ap.add_argument("--targets", default="a,b,c,d", help="a,b,c,d or row names (default all)")
    ap.add_argument("--jobs", default=",".join(JOBS), help=f"fio jobs from bench/jobs (default {','.join(JOBS)})")
    ap.add_argument("--dir", default="/tmp/syncd-bench", help="backing files and logs (emptied first)")
    ap.add_argument("--quorum-remote", choices=["nbdkit", "qemu-nbd"], default="nbdkit",
                    help="server of the quorum's remote child (default nbdkit; see README)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each job N times against each target and keep the median run (default 1)")
    ap.add_argument("--order", choices=["interleaved", "grouped"], default="interleaved",
                    help="interleaved (default): every target up at once, each job run against every target "
                         "in turn, --repeat rounds, ratios taken round by round; grouped: one target after "
                         "the other, all its jobs (and repeats) in a row")
    ap.add_argument("--latency", choices=["lat", "clat"], default="lat",
                    help="latency percentiles shown: total (lat, default) or completion (clat); both are saved")
    ap.add_argument("--keep", action="store_true", help="keep the backing files after each target")
    ap.add_argument("--out", default=None, help="raw results JSON (default bench/results/DATE.json); the "
                                                "Markdown report and the chart go beside it (.md, .png)")
    ap.add_argument("--link-security", default=None,
                    help="insecure,key,tls: the replicated target at site A once per link security mode, "
                         f"reported as ratios to insecure (default jobs then: {','.join(LINK_JOBS)})")
    ap.add_argument("--cold-log", default="a,c",
                    help="targets of the cold write-intent log job (4K randwrite QD16 over --cold-size against "
                         "over --warm-span of the same sparse volume), 'none' to skip (default a,c: syncd at A and B, "
                         "and nbdkit, whose ratio is the filesystem's share: it has no write-intent log)")
    ap.add_argument("--cold-size", default="10GiB", help="volume size of the cold-log job (sparse; default 10GiB)")
    ap.add_argument("--warm-span", default="256MiB", help="span of the warm job (default 256MiB)")
    ap.add_argument("--distance", default=None,
                    help="instead of the targets: added link round trips in ms, e.g. 0,0.5,1,2,5,10: QD1 writes "
                         "at site A through the lab's relay for each, and QD16 and QD64 at --qd64-rtt")
    ap.add_argument("--qd64-rtt", type=float, default=5.0,
                    help="round trip of the QD16 and QD64 jobs of --distance (ms)")
    ap.add_argument("--memory", action="store_true",
                    help="instead of the targets: each node's peak RSS under 8 jobs x QD64 x 1 MiB writes at A, "
                         "then at B")
    ns = ap.parse_args()
    if ns.repeat < 1:
        raise SystemExit(f"bench: --repeat must be at least 1, got {ns.repeat}")
    groups = dict(GROUPS)
    mode = "targets"
    if ns.link_security is not None:
        mode = "link-security"
        modes = [m for m in ns.link_security.split(",") if m]
        bad = [m for m in modes if m not in LINK_MODES]
        if bad or not modes:
            raise SystemExit(f"bench: --link-security takes {','.join(LINK_MODES)}, got {ns.link_security!r}")
        if "--jobs" not in sys.argv:
            ns.jobs = ",".join(LINK_JOBS)
        groups = {f"a-{m}": ([f"syncd-repl-A/{m}"], functools.partial(syncd_repl, security=m)) for m in modes}
    rtts: list[float] = []
    if ns.distance is not None:
        mode = "distance"
        try:
            rtts = sorted({float(x) for x in ns.distance.split(",") if x.strip()})
        except ValueError:
            raise SystemExit(f"bench: --distance takes round trips in ms, not {ns.distance!r}") from None
        if not rtts or min(rtts) < 0:
            raise SystemExit("bench: --distance needs round trips >= 0")
    if ns.memory:
        mode = "memory"
    if ns.distance is not None and ns.memory:
        raise SystemExit("bench: --distance and --memory are separate runs")

    if shutil.which("fio") is None:
        print("bench: fio is not installed (apt-get install fio; fio >= 3.19 has the nbd engine)", file=sys.stderr)
        return 2
    size = parse_size(ns.size)
    cold_size, warm_span = parse_size(ns.cold_size), parse_size(ns.warm_span)
    if mode == "link-security":
        rows = [r for grows, _ in groups.values() for r in grows]
    elif mode == "targets":
        rows = select(ns.targets)
    else:
        rows = []
    cold_rows = select(ns.cold_log) if mode == "targets" and ns.cold_log.lower() != "none" else []
    jobs = [j for j in ns.jobs.split(",") if j] if mode in ("targets", "link-security") else []
    for j in jobs + [DISTANCE_QD1, DISTANCE_QD64, MEMORY_JOB, COLD_JOB]:
        if not (JOBDIR / f"{j}.fio").exists():
            print(f"bench: no job file {JOBDIR / j}.fio", file=sys.stderr)
            return 2
    d = Path(ns.dir).resolve()
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally: below stops its servers
    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    t_start = time.monotonic()
    results: dict[str, dict] = {r: {} for r in rows}
    errors: dict[str, str] = {}
    checks: dict[str, dict] = {}
    doc: dict = {}
    print(f"bench: writing {size >> 20} MiB of seed data in {d}", file=sys.stderr, flush=True)
    seed = d / "seed.img"
    make_seed(seed, size)
    interrupted = False
    try:
        if mode in ("targets", "link-security"):
            run = run_interleaved if ns.order == "interleaved" else run_groups
            run(groups, rows, jobs, size, seed, d, ns, results, errors, checks)
        if cold_rows:
            seed.unlink(missing_ok=True)  # the cold volumes are sparse: no seed
            cold: dict[str, dict] = {}
            run_groups(dict(GROUPS), cold_rows, [], cold_size, cold_size, d, ns, cold, errors, checks,
                       spans={"warm": warm_span, "cold": cold_size}, prefix="cold-")
            doc["cold_log"] = {"size": cold_size, "warm_span": warm_span, "job": COLD_JOB, "results": cold}
        if mode == "distance":
            doc["distance"] = run_distance(rtts, size, seed, d, ns, errors, checks)
        if mode == "memory":
            doc["memory"] = run_memory(size, seed, d, ns, errors, checks)
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; servers stopped", file=sys.stderr)
    finally:
        seed.unlink(missing_ok=True)

    for info in checks.values():  # the pids and control sockets were for the run only
        for k in [k for k in info if k.startswith("_")]:
            del info[k]
    out = Path(ns.out) if ns.out else ROOT / "bench" / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = benchkit.machine_record(ROOT)
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["bench/run.py"] + sys.argv[1:]),
        "mode": mode, "runtime_s": ns.runtime, "ramp_s": 2, "size": size,
        "cpus": os.cpu_count(), "kernel": platform.release(), "fio": fio_version(), "machine": machine,
        "quorum_remote": ns.quorum_remote, "repeat": ns.repeat,
        "order": ns.order if mode in ("targets", "link-security") else "grouped",  # the others: one target
        "latency": ns.latency, "interrupted": interrupted,
        "rows": rows, "jobs": jobs, "results": results, "errors": errors, "checks": checks,
        "elapsed_s": round(time.monotonic() - t_start), **doc,
    }
    out.write_text(json.dumps(doc, indent=1))
    md = out.with_suffix(".md")
    md.write_text(benchkit.render_markdown(doc))
    png = out.with_suffix(".png")
    try:
        drew = benchkit.render_chart(doc, png)
    except ImportError as e:
        drew = False
        print(f"bench: no chart ({e}: install the lab extra, .[lab])", file=sys.stderr)
    if rows:
        report(doc, ns)
    if ns.link_security is not None:
        report_link_security(results, jobs, ns, paired=ns.order == "interleaved")
    # the other tables (multi-conn, cold log, distance, memory) as in the Markdown
    for sec in benchkit.render_markdown(dict(doc, checks={}, errors={})).split("\n## ")[1:]:
        if not sec.startswith("Targets"):
            print("\n## " + sec.rstrip())
    print(f"raw results: {out}\nreport: {md}" + (f"\nchart: {png}" if drew else "")
          + f"\nelapsed: {doc['elapsed_s']} s")
    return 1 if (errors or interrupted) else 0


def report(doc: dict, ns) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    paired = doc.get("order") == "interleaved"
    rep = f", median of {ns.repeat} {'rounds' if paired else 'runs'}" if ns.repeat > 1 else ""
    t = Table(title=f"fio nbd engine: {ns.runtime} s per job (after a 2 s ramp){rep}, {ns.size} volumes, "
                    f"{os.cpu_count()} CPUs")
    lk = ns.latency
    head, by_job = benchkit.target_table(doc)
    for c in head:
        t.add_column(c, justify="left" if c in ("target", "workload") else "right")
    for rows in by_job:
        for row in rows:
            t.add_row(*("[red]failed[/red]" if c == "failed" else c for c in row))
        t.add_section()
    con.print(t)
    con.print("Ratios: this row's IOPS (MB/s for the 1 MiB job) divided by nbdkit's / the qemu quorum "
              "peer's on the same workload; > 1 is faster. Latency: "
              + ("clat = completion latency, from fio's submit to the reply (the nbd engine sends the "
                 "request during submit, so clat leaves the send out)." if lk == "clat" else
                 "lat = total latency (submit + completion), what the host sees; --latency clat for "
                 "fio's completion latency alone."))
    for g, info in doc.get("checks", {}).items():
        if info:
            con.print(f"check {g}: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    for k, v in doc.get("errors", {}).items():
        con.print(f"[red]error[/red] {k}: {v}", markup=True, highlight=False)


def report_link_security(results: dict, jobs: list[str], ns, paired: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    t = Table(title=f"cost of link security: replicated writes at site A, {ns.runtime} s per job, {ns.size} volumes")
    for c in ("link", "workload", "IOPS", "MB/s", "× insecure"):
        t.add_column(c, justify="left" if c in ("link", "workload") else "right")
    for job in jobs:
        metric = "mbps" if job.startswith("seq") else "iops"
        base = results.get("syncd-repl-A/insecure", {}).get(job)
        for r in results:
            res = results[r].get(job)
            if res is None:
                t.add_row(r.split("/")[-1], job, "[red]failed[/red]", "", "")
                continue
            t.add_row(r.split("/")[-1], job, f"{res['iops']:.0f}", f"{res['mbps']:.1f}",
                      benchkit.fmt_ratio(benchkit.paired_ratio(res, base, metric, paired)))
        t.add_section()
    con.print(t)
    con.print("× insecure: this mode's IOPS (MB/s for the 1 MiB job) divided by the insecure link's; key = "
              "AES-GCM-tagged records (authenticated, not encrypted; SYNCD_KEY_RECORDS=1: HMAC-SHA256), "
              "tls = mutual TLS (encrypted).")


if __name__ == "__main__":
    raise SystemExit(main())
