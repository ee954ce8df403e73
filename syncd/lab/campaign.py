"""`syncd lab campaign --rounds N`: random fault sequences under recorded I/O, judged by the
history checker.

A lab with a quorum witness and a host shim per site (uniform hosts) is started; the recorder
(``historian.py``, libnbd) writes and reads at both sites, directly at each array and through
each site's shim, on four blocks every client shares and a larger range, for the whole run.
Each round plays a random sequence of faults (each held a random time, then healed) and then
waits until the group is back in sync. At the end the recorder stops, both replicas are read
back, and the checker (``history.py``) decides: no stale read, no value never written, no
acknowledged write lost, identical replicas. The building blocks are the rig's (``lab_fail``,
``lab_heal``, ``lab_kill``, ``lab_start``) and the link relay's.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..ctl import CtlError, call
from .historian import BLOCK, FUA, decode_block, label, read_history
from .history import Event, Kind, Op, Outcome, Report, check
from .relay import proxy_command
from .rig import (
    LabError,
    group_states,
    lab_down,
    lab_fail,
    lab_heal,
    lab_kill,
    lab_start,
    lab_up,
    wait_in_sync,
)
from .scenario import FAST, WITNESS

HOT = range(0, 4)  # every client reads and writes these: contention finds tears and stale reads
COLD = range(256, 256 + 2048)  # 8 MiB at 1 MiB: enough blocks for a resync to get wrong
SIZE = "64MiB"
VOLUME = "vv1"
SYNC_TIMEOUT = 90.0
_OPS = (Op.READ, Op.WRITE)
_OUTCOMES = (Outcome.OK, Outcome.ERROR, Outcome.UNKNOWN)

# Power cut (a crash that also loses what the array had not made durable): played when the lab's
# volumes sit on power-cut disks (faults.PowerCutDisk: nbdkit's cache filter in writeback mode
# behind nbdfuse; root, /dev/fuse, nbdkit and nbdfuse), which the campaign uses whenever it can.
FAULT_KINDS = ("link", "isolate", "primary", "secondary", "witness", "flap", "switchover", "power")


def power_cut_problem() -> str:
    """Why power cuts cannot be played here ("" when they can)."""
    if os.geteuid() != 0:
        return "power-cut disks need root"
    if not os.path.exists("/dev/fuse"):
        return "power-cut disks need /dev/fuse"
    missing = [t for t in ("nbdkit", "nbdfuse") if shutil.which(t) is None]
    return f"power-cut disks need {', '.join(missing)}" if missing else ""


def available_kinds() -> tuple[str, ...]:
    return tuple(k for k in FAULT_KINDS if k != "power" or not power_cut_problem())


# ---- the recorder -------------------------------------------------------------------------------

def libnbd_python() -> str:
    """The interpreter the recorder runs under: Debian's python3 has python3-libnbd's ``nbd``."""
    py = os.environ.get("SYNCD_LIBNBD_PYTHON", "/usr/bin/python3")
    if not shutil.which(py) and not os.path.exists(py):
        raise LabError(f"{py} not found: the history recorder needs Debian's python3 with python3-libnbd "
                       "(./scripts/setup installs it; SYNCD_LIBNBD_PYTHON names another interpreter)")
    p = subprocess.run([py, "-c", "import nbd"], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"{py} cannot import nbd (python3-libnbd): {p.stderr.strip().splitlines()[-1:]} "
                       "(./scripts/setup installs it)")
    return py


def lab_clients(lab: dict, volume: str = VOLUME, shims: bool = True) -> list[tuple[str, str]]:
    """(site label, NBD URI) for each array directly and, with ``shims``, each site's host shim."""
    out = [(s, n["volumes"][volume]["uri"]) for s, n in lab["nodes"].items()]
    if shims:
        out += [(f"{s}/shim", h["volumes"][volume]) for s, h in (lab.get("hosts") or {}).items()]
    return out


@dataclass
class Recorder:
    """A running historian process."""

    proc: subprocess.Popen
    out: str
    log: str

    @classmethod
    def start(cls, out: str, clients: list[tuple[str, str]], *, writers: int = 1, readers: int = 1,
              depth: int = 4, hot: range = HOT, cold: range | None = COLD, hot_share: float = 0.5,
              fua: float = 0.5, seed: int = 1, duration: float = 0.0, run_id: int | None = None) -> Recorder:
        py = libnbd_python()
        args = [py, str(Path(__file__).with_name("historian.py")), "--out", out, "--duration", str(duration),
                "--writers", str(writers), "--readers", str(readers), "--depth", str(depth),
                "--hot", f"{hot.start}:{len(hot)}", "--hot-share", str(hot_share), "--fua", str(fua),
                "--seed", str(seed)]
        if cold is not None:
            args += ["--range", f"{cold.start}:{len(cold)}"]
        if run_id is not None:
            args += ["--run-id", str(run_id)]
        for site, uri in clients:
            args += ["--client", f"{site}={uri}"]
        log = out + ".log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return cls(proc, out, log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> dict:
        """Stop it (it drains what is in flight) and return its summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise LabError(f"the history recorder did not stop within {timeout:.0f}s (log: {self.log})") from None
        text = Path(self.log).read_text(errors="replace")
        if self.proc.returncode != 0:
            raise LabError(f"the history recorder failed ({self.proc.returncode}); its log ends with:\n{text[-2000:]}")
        for line in reversed(text.splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}


def load_events(path: str) -> tuple[list[Event], dict]:
    """The checker's events from a recorder's history file, and the file's meta data (with
    ``fua``: the indexes of the writes sent with FUA)."""
    records, meta = read_history(path)
    sites = {int(k): v["site"] for k, v in meta["clients"].items()}
    details = {int(k): v for k, v in meta["details"].items()}
    events = [Event(c, sites.get(c, f"client {c}"), _OPS[op], block, value, inv, comp, _OUTCOMES[outcome],
                    details.get(value, "") if value < 0 else "")
              for c, op, outcome, _flags, block, value, inv, comp in records]
    meta["fua"] = {i for i, rec in enumerate(records) if rec[3] & FUA}
    return events, meta


# What a node's log says about whether its primary mirrors (first match wins): a write it
# acknowledges while "alone" is on that array only until it is next in sync.
_MODE_NOTES = (
    ("switchover: now primary", "mirroring"), ("peer back; resynchronizing", "mirroring"), (": in sync", "mirroring"),
    ("not going on alone", "fencing"), ("going on alone", "alone"), ("failover: now primary", "alone"),
    ("by the operator: now primary", "alone"), ("the operator made this array primary", "alone"),
    ("took over at epoch", "alone"), ("failsafe overridden", "alone"), ("now secondary", "secondary"),
    ("handed the group", "secondary"), ("peer lost", "fencing"), (" ready: ", "starting"),
)


def writes_a_power_cut_may_take(events: list[Event], fua: set[int], nodes: list[tuple[int, str, str]],
                                cuts: list[tuple[int, str]]) -> list[int]:
    """The indexes of the acknowledged writes whose outcome a power cut made unknown: sent
    without FUA, acknowledged while the primary at the cut site went on alone (no peer had them)
    and cut before that array was next in sync. NBD's write cache is volatile until a flush, so
    such a write may be gone, as a disk's would be (the power-cut tests count only flushed ones
    then). A write acknowledged while the primary mirrored is on both arrays: a power cut of one
    may not take it, and stays checked (what the fetch-back after a power cut keeps)."""
    if not cuts:
        return []
    spans: dict[str, list[tuple[int, int]]] = {}  # site -> [(start, end)) of its alone stretches
    mode: dict[str, tuple[str, int]] = {}
    for t, site, msg in nodes:
        new = next((m for note, m in _MODE_NOTES if note in msg), None)
        if new is None:
            continue
        old, since = mode.get(site, ("starting", 0))
        if old == "alone" and new != "alone":
            spans.setdefault(site, []).append((since, t))
        if new != old:
            mode[site] = (new, t)
    for site, (m, since) in mode.items():
        if m == "alone":
            spans.setdefault(site, []).append((since, 1 << 80))
    synced = {site: sorted(t for t, s, msg in nodes if s == site and msg.endswith(": in sync")) for site in spans}
    out = []
    for i, e in enumerate(events):
        if e.op is not Op.WRITE or e.outcome is not Outcome.OK or i in fua:
            continue
        for t_cut, site in cuts:
            if t_cut <= e.complete or not any(a <= e.complete < b for a, b in spans.get(site, ())):
                continue
            k = bisect.bisect_right(synced[site], e.complete)
            if k == len(synced[site]) or synced[site][k] > t_cut:  # not in sync again before the cut
                out.append(i)
                break
    return out


def read_back(lab: dict, run: int, volume: str = VOLUME) -> tuple[dict[str, dict[int, int]], dict[int, str]]:
    """Every block of each replica of ``volume`` decoded (the arrays must be idle); and what
    each undecodable one held."""
    out: dict[str, dict[int, int]] = {}
    details: dict[int, str] = {}
    for site, n in lab["nodes"].items():
        values: dict[int, int] = {}
        with open(n["volumes"][volume]["path"], "rb") as f:
            i = 0
            while chunk := f.read(1 << 20):
                for off in range(0, len(chunk), BLOCK):
                    v, d = decode_block(chunk[off:off + BLOCK], i, run)
                    values[i] = v
                    if d:
                        details[v] = d
                    i += 1
        out[site] = values
    return out, details


_POWER_CUT = re.compile(r"power cut at site (\w+):")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ (syncd\.group|syncd\.node): (.*)$")


def node_events(lab: dict) -> list[tuple[int, str, str]]:
    """(monotonic ns, site, message) of what the nodes logged about their groups, readiness and
    link, in time order. Logs carry wall-clock milliseconds; they are mapped onto the monotonic
    clock of the history with this machine's current offset between the two."""
    offset = time.time_ns() - time.monotonic_ns()
    out = []
    for site, n in lab["nodes"].items():
        try:
            lines = Path(n["log"]).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = _LOG_LINE.match(line)
            if m:
                wall = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) * 1e9 + int(m.group(2)) * 1e6
                out.append((int(wall) - offset, site, m.group(4)))
    return sorted(out)


def around(events: list[tuple[int, str, str]], t: int, before: float = 1.5,
           after: float = 0.5) -> list[tuple[int, str, str]]:
    """The node events from ``before`` s before ``t`` to ``after`` s after it."""
    return [e for e in events if t - before * 1e9 <= e[0] <= t + after * 1e9]


# ---- faults ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    kind: str
    site: str | None
    hold: float  # seconds between the fault and its heal (flap: how long the network flaps)

    def __str__(self) -> str:
        return self.kind + (f" {self.site}" if self.site else "") + f" for {self.hold:.1f}s"


def plan_round(rng: random.Random, kinds: tuple[str, ...], deck: list[str]) -> list[Fault]:
    """A random sequence of one to three faults, drawn from ``deck`` (refilled with every kind in
    a random order when empty), so that a short campaign still plays every kind once."""
    out = []
    for _ in range(rng.randint(1, 3)):
        if not deck:
            deck.extend(rng.sample(kinds, len(kinds)))
        kind = deck.pop()
        site = rng.choice(["A", "B"]) if kind in ("isolate", "power") else None
        out.append(Fault(kind, site, round(rng.uniform(0.5, 4.0), 1)))
    return out


def _role_site(lab: dict, role: str) -> str | None:
    """The site that is ``role`` now: of two arrays calling themselves primary (one cut off and
    not told yet), the one at the higher epoch is."""
    gs = group_states(lab)
    prim = max((g["epoch"], s) for s, g in gs.items() if g["role"] == "primary") if any(
        g["role"] == "primary" for g in gs.values()) else None
    if role == "primary":
        return prim[1] if prim else None
    sec = [s for s, g in gs.items() if g["role"] == "secondary"]
    return sec[0] if sec else (next(s for s in lab["nodes"] if s != prim[1]) if prim else None)


def _flap(lab: dict, rng: random.Random, seconds: float, log: Callable[[str], None]) -> None:
    """Replication paths and witness links cut and healed at random, for short and long spells."""
    ctl, npaths = lab["link"]["control"], lab["link"]["npaths"]
    wrelays = lab["link"]["witness_relays"]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        what = rng.choice(["all", "one", "one", "witness", "isolate"])
        if what == "all":
            paths = list(range(npaths))
        elif what == "one":
            paths = [rng.randrange(npaths)]
        elif what == "witness":
            paths = list(wrelays[rng.choice(["A", "B"])])
        else:
            paths = list(range(npaths)) + wrelays[rng.choice(["A", "B"])]
        spell = rng.choice([0.05, 0.2, 0.5, 1.0])
        proxy_command(ctl, "cut", paths=paths)
        log(f"  flap: cut {what} (relays {paths}) for {spell}s")
        time.sleep(spell)
        proxy_command(ctl, "heal", paths=paths)
        time.sleep(rng.choice([0.05, 0.3, 1.0]))


def play(lab: dict, fault: Fault, rng: random.Random, log: Callable[[str], None]) -> str:
    """Inject ``fault``, hold it, heal it; returns what was done (or why it was not played)."""
    d = lab["dir"]
    if fault.kind == "switchover":
        try:
            wait_in_sync(lab, SYNC_TIMEOUT)  # refused otherwise: a switchover is planned, not a fault
        except LabError as e:
            return f"switchover not played: {e}"
        prim = _role_site(lab, "primary")
        if prim is None:
            return "switchover not played: no primary answers"
        try:
            call(lab["nodes"][prim]["admin_socket"], "setrcopygroup", {"action": "switchover", "group": lab["group"]},
                 timeout=30)
        except CtlError as e:
            return f"switchover at {prim} refused: {e}"
        log(f"  switchover at {prim}")
        return f"switchover (primary was {prim})"
    if fault.kind == "flap":
        _flap(lab, rng, fault.hold, log)
        return f"network flapped for {fault.hold:.1f}s"
    if fault.kind in ("primary", "secondary"):
        site = _role_site(lab, fault.kind)
        if site is None:
            return f"{fault.kind} kill not played: no node shows a {fault.kind}"
        lab_kill(d, site)
        log(f"  killed {fault.kind} {site} (kill -9)")
        time.sleep(fault.hold)
        lab_start(d, site)
        log(f"  restarted {site}")
        return f"{fault.kind} {site} killed and restarted"
    if fault.kind == "power":
        site = fault.site or "A"
        log("  " + lab_fail(d, "power", site))
        time.sleep(fault.hold)
        log("  " + lab_heal(d, "power", site))
        return f"power cut at {site}"
    what = {"link": "link", "isolate": "isolate", "witness": "witness"}[fault.kind]
    log("  " + lab_fail(d, what, fault.site))
    time.sleep(fault.hold)
    log("  " + lab_heal(d, what, fault.site))
    return str(fault)


# ---- the campaign ---------------------------------------------------------------------------------

@dataclass
class CampaignResult:
    rounds: int
    seed: int
    faults: Counter = field(default_factory=Counter)
    timeline: list[tuple[int, str]] = field(default_factory=list)  # (monotonic ns, what happened)
    problems: list[str] = field(default_factory=list)  # the run itself went wrong (not back in sync...)
    report: Report | None = None
    recorder: dict = field(default_factory=dict)
    seconds: float = 0.0
    node_events: list[tuple[int, str, str]] = field(default_factory=list)  # what the nodes logged
    unflushed: list[int] = field(default_factory=list)  # writes_a_power_cut_may_take: outcome unknown

    @property
    def ok(self) -> bool:
        return not self.problems and self.report is not None and self.report.ok


def run_campaign(d: str, rounds: int, seed: int = 1, *, kinds: tuple[str, ...] | None = None,
                 progress: Callable[[str], None] = print, writers: int = 1, readers: int = 1,
                 keep: bool = False, witness: str = "builtin") -> CampaignResult:
    """Start a lab in ``d``, play ``rounds`` random fault sequences under recorded I/O, check the
    history and the replicas. ``keep`` leaves the lab running afterwards. ``witness`` is the
    witness's backend: the built-in process or a three-member etcd cluster ("etcd"), whose
    members the witness faults kill and cut off as they do the process."""
    if rounds < 1:
        raise LabError(f"--rounds must be at least 1, not {rounds}")
    if witness not in ("builtin", "etcd"):
        raise LabError(f"--witness must be builtin or etcd, not {witness!r}")
    kinds = kinds or available_kinds()
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad:
        raise LabError(f"unknown fault kind(s) {', '.join(bad)}; kinds: {', '.join(FAULT_KINDS)}")
    if "power" in kinds and power_cut_problem():
        raise LabError(f"power cuts cannot be played here: {power_cut_problem()}")
    libnbd_python()  # refuse before starting anything
    rng = random.Random(seed)
    res = CampaignResult(rounds, seed)
    t_start = time.monotonic()

    def log(what: str) -> None:
        res.timeline.append((time.monotonic_ns(), what.strip()))
        progress(what)

    wit = dict(WITNESS, backend="etcd") if witness == "etcd" else WITNESS
    lab = lab_up(d, size=SIZE, nvolumes=1, npaths=2, link_opts=FAST, witness=wit, topology="uniform", timeout=60,
                 power_cut="power" in kinds)
    rec = None
    try:
        time.sleep(1.0)  # the witness has heard that B is in sync
        hist = str(Path(d) / "campaign.hist")
        rec = Recorder.start(hist, lab_clients(lab), writers=writers, readers=readers, seed=seed)
        time.sleep(1.0)
        deck: list[str] = []
        for rnd in range(rounds):
            seq = plan_round(rng, kinds, deck)
            log(f"round {rnd + 1}/{rounds}: " + ", then ".join(map(str, seq)))
            for f in seq:
                done = play(lab, f, rng, log)
                played = "not played" not in done and "refused" not in done
                res.faults[f.kind if played else f"{f.kind} (not played)"] += 1
                time.sleep(rng.choice([0.0, 0.3, 1.0]))
            if not rec.alive():
                res.problems.append(f"round {rnd + 1}: the history recorder died (log: {rec.log})")
                break
            try:
                wait_in_sync(lab, SYNC_TIMEOUT)
            except LabError as e:
                res.problems.append(f"round {rnd + 1}: {e}")
                break
            log(f"round {rnd + 1}: back in sync")
        res.recorder = rec.stop()
        rec = None
        log(f"recorder stopped: {res.recorder.get('requests', 0)} requests, "
            f"{res.recorder.get('per_second', 0)}/s")
        try:
            wait_in_sync(lab, SYNC_TIMEOUT)
        except LabError as e:
            res.problems.append(f"after the last round: {e}")
        events, meta = load_events(hist)
        replicas, details = read_back(lab, meta["run"])
        res.node_events = node_events(lab)
        cuts = [(t, m.group(1)) for t, what in res.timeline if (m := _POWER_CUT.match(what))]
        res.unflushed = writes_a_power_cut_may_take(events, meta["fua"], res.node_events, cuts)
        for i in res.unflushed:
            events[i] = replace(events[i], outcome=Outcome.UNKNOWN)
        res.report = check(events, replicas, label=label)
        for v, what in sorted(details.items())[:20]:
            res.timeline.append((time.monotonic_ns(), f"replica block {v} undecodable: {what}"))
    finally:
        if rec is not None:
            try:
                rec.stop()
            except LabError:
                pass
        if not keep:
            lab_down(d)
        res.seconds = time.monotonic() - t_start
    return res


def print_campaign(res: CampaignResult) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=None if os.isatty(1) else 160)
    r = res.report
    t = Table(title=f"syncd lab campaign: {res.rounds} rounds, seed {res.seed}, {res.seconds:.0f}s")
    t.add_column("checked")
    t.add_column("count", justify="right")
    t.add_row("rounds", str(res.rounds))
    for kind, n in sorted(res.faults.items()):
        t.add_row(f"fault: {kind}", str(n))
    if "power" not in available_kinds():
        t.add_row(f"fault: power (not played: {power_cut_problem()})", "0")
    if r is not None:
        t.add_row("reads checked", str(r.reads))
        t.add_row("reads failed or unanswered (not checked)", str(r.reads_failed))
        t.add_row("writes acknowledged", str(r.writes_ok))
        t.add_row("writes failed / outcome unknown", f"{r.writes_error} / {r.writes_unknown}")
        t.add_row("  of which unknown: acknowledged alone without FUA, then a power cut there", str(len(res.unflushed)))
        t.add_row("blocks in the history", str(r.blocks))
        t.add_row("replica read-backs", f"{r.readbacks} ({', '.join(r.replicas)})")
        for site, cnt in sorted(r.per_site.items()):
            t.add_row(f"  at {site}", ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in cnt.items()))
        if res.recorder:
            t.add_row("recorder requests per second", str(res.recorder.get("per_second")))
        for kind in Kind:
            n = r.violations.get(kind, 0)
            t.add_row(f"violations: {kind.value}", f"[red]{n}[/red]" if n else "0")
    c.print(t)
    for p in res.problems:
        c.print(f"[red]problem:[/red] {p}")
    if r is not None and not r.ok:
        t0 = r.t0
        c.print("what the campaign did (times from the first request):")
        for ts, what in res.timeline:
            c.print(f"  {(ts - t0) / 1e9:9.3f}s  {what}", markup=False, highlight=False)
        c.print("first violations of each kind:")
        for v in r.examples:
            c.print(f"  {v.text}", markup=False, highlight=False)
        c.print(f"{len(r.episodes)} episode(s) of violations (one kind at one place, less than 1 s apart):")
        for ep in r.episodes[:20]:
            c.print(f"  {(ep.first - t0) / 1e9:.3f}s to {(ep.last - t0) / 1e9:.3f}s: {ep.count} x {ep.kind.value} "
                    f"at {ep.where}; first: {ep.example.text}", markup=False, highlight=False)
            for ts, site, msg in around(res.node_events, ep.first, after=min((ep.last - ep.first) / 1e9, 3.0) + 0.5):
                c.print(f"      {(ts - t0) / 1e9:9.3f}s  {site}: {msg}", markup=False, highlight=False)
    c.print("[green]no violation[/green]" if res.ok else "[red]VIOLATIONS OR PROBLEMS FOUND[/red]")
