"""Where one QD1 request's time goes, hop by hop, from the events the timeline hook recorded in
both nodes (``bench/tracehook/sitecustomize.py``; run by ``bench/cpu_per_io.py --timeline``).

Pure: reads the hook's files and turns them into tables; no fio, no servers here, so
tests/unit/test_bench_timeline.py can check it from literals.

At QD1 the host has one request outstanding, so everything the two nodes do between one request
arriving and the next is that request's work. A *cycle* runs from the host's request arriving at
the node it uses (its first receive after the node's last reply to the host) to the next one.
Its events (receives, sends, local writes; wake-ups from a sleeping ``epoll_wait`` are counted
apart), labelled by node and socket, make a sequence; the most frequent sequence is the typical
cycle, and each of its steps is given as the median over the cycles that follow it. Each gap
between two events is put in one of these classes:

- *node X: Python*: node X's own work between two of its events (parsing, framing, tags,
  bookkeeping; a local write's ``pwrite`` is the gap before its event);
- *sendmsg*: inside a send (on loopback TCP this includes the kernel delivering to the receiver
  and waking it);
- *to the other node*: from one node's send to the other's receive (its wake-up or the end of
  its poll, and the scheduler);
- *the host*: from the nodes' last event to the host's next request (the client's wake-up,
  its completion and submission; fio here). Work the nodes do once the host has its reply (a
  RELEASE at site B) is marked *after the reply*: the host's own work runs meanwhile.
"""

from __future__ import annotations

import collections
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path

KINDS = ("rx", "send", "sent", "pwrite", "wake")  # bench/tracehook/sitecustomize.py's codes
RX, SEND, SENT, PWRITE, WAKE = range(5)


@dataclass
class Recording:
    """One process's events: (monotonic ns, kind code, local port) and its sockets' other ends."""

    events: list[tuple[int, int, int]]
    peer_port: dict[int, int]
    dropped: int = 0


def read_recording(events_path: Path) -> Recording:
    """The hook's ``<pid>.events`` (and the ``<pid>.ports`` beside it)."""
    import array

    with open(events_path, "rb") as f:
        n, dropped = struct.unpack("<qq", f.read(16))
        ts, kinds, ports = array.array("q"), array.array("b"), array.array("i")
        ts.fromfile(f, n)
        kinds.fromfile(f, n)
        ports.fromfile(f, n)
    peers: dict[int, int] = {}
    ports_path = events_path.with_suffix(".ports")
    if ports_path.exists():
        for line in ports_path.read_text().split("\n"):
            if line.strip():
                a, b = line.split()
                peers[int(a)] = int(b)
    return Recording(list(zip(ts, kinds, ports, strict=True)), peers, dropped)


def link_ports(here: Recording, there: Recording) -> set[int]:
    """Local ports of ``here``'s connections to ``there`` (each end's local port is the other's
    peer port)."""
    return {p for p, q in here.peer_port.items() if there.peer_port.get(q) == p}


def labelled(recs: dict[str, Recording], host_port: dict[str, int], t0: int, t1: int) -> tuple[list, dict]:
    """Both nodes' events between ``t0`` and ``t1`` (ns), merged in time order as
    (ns, node, kind, what) with what in host / link / other / ''; and the wake-ups per node."""
    a, b = sorted(recs)
    links = {a: link_ports(recs[a], recs[b]), b: link_ports(recs[b], recs[a])}
    out = []
    wakes = collections.Counter()
    for node, rec in recs.items():
        for t, k, port in rec.events:
            if not t0 <= t <= t1:
                continue
            if k == WAKE:
                wakes[node] += 1
                continue
            if k in (RX, SEND, SENT):
                what = "host" if port == host_port[node] else "link" if port in links[node] else "other"
            else:
                what = ""
            out.append((t, node, k, what))
    out.sort()
    return out, dict(wakes)


def cycles(events: list, site: str) -> list[list]:
    """The events of each whole cycle at ``site`` (the node the host uses), the next cycle's
    first event last: a cycle starts at the first receive from the host after a reply to it."""
    starts = []
    replied = True
    for i, (_, node, k, what) in enumerate(events):
        if node != site or what != "host":
            continue
        if k == RX and replied:
            starts.append(i)
            replied = False
        elif k == SENT:
            replied = True
    return [events[i:j + 1] for i, j in zip(starts, starts[1:], strict=False)]


def step_name(node: str, k: int, what: str) -> str:
    return f"{node} {KINDS[k]}" + (f" ({what})" if what else "")


def gap_class(prev: tuple, cur: tuple, last: bool, after_reply: bool) -> str:
    """What the time between two consecutive events of a cycle was spent on: ``last`` when
    ``cur`` is the next cycle's request, ``after_reply`` when the host has had its reply (the
    nodes' work from then on overlaps the host's)."""
    _, pn, pk, _ = prev
    _, cn, ck, _ = cur
    if last:
        return "the host"
    if pn != cn:
        cls = "to the other node"
    elif pk == SEND and ck == SENT:
        cls = "sendmsg"
    else:
        cls = f"node {cn}: Python"
    return cls + (", after the reply" if after_reply else "")


@dataclass
class Analysis:
    cycles: int  # whole cycles in the window
    typical: int  # of them, with the most frequent sequence
    cycle_p50_us: float
    cycle_p90_us: float
    steps: list[tuple[str, float, float, str]]  # (event, at µs, + µs, class of the gap before it)
    classes: dict[str, float]  # µs per cycle (typical cycles' medians) by class
    wakes_per_cycle: dict[str, float]


def analyse(events: list, site: str, wakes: dict[str, int] | None = None) -> Analysis | None:
    """The typical cycle at ``site``: its steps (median offsets) and where its time went."""
    cs = cycles(events, site)
    if len(cs) < 2:
        return None
    lengths = [(c[-1][0] - c[0][0]) / 1000 for c in cs]
    q = statistics.quantiles(lengths, n=10)
    groups: dict[tuple, list[list]] = collections.defaultdict(list)
    for c in cs:
        groups[tuple((n, k, w) for _, n, k, w in c[:-1])].append(c)
    seq, typical = max(groups.items(), key=lambda kv: len(kv[1]))
    at = [statistics.median((c[i][0] - c[0][0]) / 1000 for c in typical) for i in range(len(seq) + 1)]
    steps: list[tuple[str, float, float, str]] = [(step_name(*seq[0]), 0.0, 0.0, "")]
    classes: dict[str, float] = collections.defaultdict(float)
    proto = typical[0]
    after_reply = False
    for i in range(1, len(seq) + 1):
        name = step_name(*seq[i]) if i < len(seq) else "next request " + step_name(*seq[0])
        cls = gap_class(proto[i - 1], proto[i], i == len(seq), after_reply)
        if i < len(seq) and seq[i] == (site, SENT, "host"):
            after_reply = True  # the host has its reply from here on
        steps.append((name, at[i], at[i] - at[i - 1], cls))
        classes[cls] += at[i] - at[i - 1]
    return Analysis(len(cs), len(typical), statistics.median(lengths), q[-1], steps, dict(classes),
                    {n: round(w / len(cs), 2) for n, w in (wakes or {}).items()})


def markdown(results: dict[str, Analysis | None], note: str = "") -> str:
    """One section per site: the typical cycle's steps, then its time by class."""
    lines = ["# Where a QD1 request's time goes, hop by hop", ""]
    if note:
        lines += [note, ""]
    for site, an in results.items():
        lines.append(f"## fio at {site}")
        lines.append("")
        if an is None:
            lines += ["No whole cycles were recorded.", ""]
            continue
        wakes = ", ".join(f"{n} {w}" for n, w in sorted(an.wakes_per_cycle.items())) or "none"
        lines.append(f"{an.cycles} cycles; the typical sequence is {an.typical} of them "
                     f"({100 * an.typical / an.cycles:.0f} %). Cycle p50 {an.cycle_p50_us:.1f} µs, "
                     f"p90 {an.cycle_p90_us:.1f} µs (all cycles). Wake-ups from a sleeping loop per "
                     f"cycle: {wakes}.")
        lines += ["", "| step | at (µs) | + (µs) | spent on |", "|---|---|---|---|"]
        for name, t, d, cls in an.steps:
            lines.append(f"| {name} | {t:.1f} | {d:.1f} | {cls} |")
        total = sum(an.classes.values())
        lines += ["", "| spent on | µs per cycle | share |", "|---|---|---|"]
        for cls, us in sorted(an.classes.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {cls} | {us:.1f} | {100 * us / total:.0f} % |")
        lines.append("")
    return "\n".join(lines)
