"""Where one QD1 request's time goes, hop by hop, from the events the timeline hook recorded in
both nodes (``bench/tracehook/sitecustomize.py``; run by ``bench/cpu_per_io.py --timeline``).

Pure: reads the hook's files and turns them into tables; no fio, no servers here, so
tests/unit/test_bench_timeline.py can check it from literals.

At QD1 the host has one request outstanding, so everything the two nodes do between one request
arriving and the next is that request's work. A *cycle* runs from the host's request arriving at
the node it uses (its first receive after the node's last reply to the host) to the next one.
Its events (receives, sends, local writes; wake-ups from a sleeping ``epoll_wait`` are counted
apart), labelled by node and socket, make a sequence; the most frequent sequence is the typical
cycle, and each of its steps is placed at the median of its offsets from the cycle's start over
the cycles that follow it.

The two nodes run at the same time (site A writes its own copy while B receives and writes its
own), so a step's time is counted from the step it waited for: the node's own previous step, or,
for a receive, the other node's last send when that came later (the receiver was idle, polling
or asleep, when the data arrived). Going back from the next request through what each step
waited for gives the *critical path*, whose steps add up to the cycle; the others (site A's own
copy, site B's RELEASE after the host's reply) are listed as off it. Each step on the path is
one of:

- *node X: Python*: node X's own work since its previous step (parsing, framing, tags,
  bookkeeping; a ``pwrite`` is in the step that ends with it);
- *sendmsg*: inside a send (on loopback TCP this includes the kernel delivering to the receiver
  and waking it);
- *hand-over to X*: from the other node's send to X's receive (X's poll or wake-up, and the
  ``recv`` itself);
- *the host*: from the reply leaving the node to the host's next request arriving there (the
  client's wake-up, completion and submission, fio here, and the node's own poll and ``recv``).
"""

from __future__ import annotations

import collections
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path

from tracehook.sitecustomize import GC, GC_DONE, KINDS, RX, SEND, SENT, WAKE  # the event codes the hook writes


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
            if k in (GC, GC_DONE):  # see gc_passes
                continue
            if k in (RX, SEND, SENT):
                what = "host" if port == host_port[node] else "link" if port in links[node] else "other"
            else:
                what = ""
            out.append((t, node, k, what))
    out.sort()
    return out, dict(wakes)


def gc_passes(recs: dict[str, Recording], t0: int, t1: int) -> list[tuple[int, int, str, int]]:
    """The garbage collector's passes in each node that overlap ``t0``..``t1`` (ns), as
    (start ns, end ns, node, generation), in time order."""
    out = []
    for node, rec in recs.items():
        start: tuple[int, int] | None = None
        for t, k, gen in rec.events:
            if k == GC:
                start = (t, gen)
            elif k == GC_DONE and start is not None:
                if start[0] <= t1 and t >= t0:
                    out.append((start[0], t, node, start[1]))
                start = None
    return sorted(out)


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


@dataclass
class Step:
    name: str  # node, event and socket
    at_us: float  # median offset from the cycle's start
    waited_us: float  # since the step it waited for
    after: str  # that step's name
    spent_on: str  # its class, or why it is off the critical path


@dataclass
class Analysis:
    cycles: int  # whole cycles in the window
    typical: int  # of them, with the most frequent sequence
    cycle_p50_us: float
    cycle_p90_us: float
    steps: list[Step]  # the typical cycle's, and the next request last
    classes: dict[str, float]  # µs per cycle on the critical path, by class
    wakes_per_cycle: dict[str, float]


def reply_index(seq: list[tuple[str, int, str]], site: str) -> int | None:
    """Where the reply to the host has left (its last send), if it is in ``seq``."""
    return max((j for j, e in enumerate(seq) if e == (site, SENT, "host")), default=None)


def waited_for(seq: list[tuple[str, int, str]], at: list[float], reply: int | None) -> list[int]:
    """For each step of ``seq`` and the next request after it (index ``len(seq)``), the step it
    waited for (the first: itself): the node's own previous step or, for a receive, the other
    node's last send when that was later. The next request waits for the reply to the host
    (step ``reply``; without one, the last step)."""
    n = len(seq)
    out = [0]
    for i in range(1, n + 1):
        if i == n:
            out.append(n - 1 if reply is None else reply)
            continue
        node, kind, _ = seq[i]
        cands = []
        same = next((j for j in range(i - 1, -1, -1) if seq[j][0] == node), None)
        if same is not None:
            cands.append(same)
        if kind == RX:
            cross = next((j for j in range(i - 1, -1, -1) if seq[j][0] != node and seq[j][1] in (SEND, SENT)), None)
            if cross is not None and (same is None or at[cross] > at[same]):
                cands = [cross]
        out.append(cands[0] if cands else i - 1)
    return out


def step_class(seq: list[tuple[str, int, str]], j: int, i: int) -> str:
    """What the time from step ``j`` to step ``i`` (which waited for it) was spent on."""
    if i == len(seq):
        return "the host"
    (pn, pk, _), (cn, ck, _) = seq[j], seq[i]
    if pn != cn:
        return f"hand-over to {cn}"
    if pk == SEND and ck == SENT:
        return "sendmsg"
    return f"node {cn}: Python"


def analyse(events: list, site: str, wakes: dict[str, int] | None = None) -> Analysis | None:
    """The typical cycle at ``site``: its steps (median offsets), its critical path and where
    that path's time went."""
    cs = cycles(events, site)
    if len(cs) < 2:
        return None
    lengths = [(c[-1][0] - c[0][0]) / 1000 for c in cs]
    q = statistics.quantiles(lengths, n=10)
    groups: dict[tuple, list[list]] = collections.defaultdict(list)
    for c in cs:
        groups[tuple((n, k, w) for _, n, k, w in c[:-1])].append(c)
    key, typical = max(groups.items(), key=lambda kv: len(kv[1]))
    seq = list(key)
    n = len(seq)
    at = [statistics.median((c[i][0] - c[0][0]) / 1000 for c in typical) for i in range(n + 1)]
    reply = reply_index(seq, site)
    pred = waited_for(seq, at, reply)
    on_path = {n}
    i = n
    while i:
        i = pred[i]
        on_path.add(i)
    names = [step_name(*e) for e in seq] + ["next request " + step_name(*seq[0])]
    steps = [Step(names[0], 0.0, 0.0, "", "")]
    classes: dict[str, float] = collections.defaultdict(float)
    for i in range(1, n + 1):
        j = pred[i]
        if i in on_path:
            cls = step_class(seq, j, i)
            classes[cls] += at[i] - at[j]
        else:
            cls = "off the critical path" + (" (after the reply)" if reply is not None and i > reply else "")
        steps.append(Step(names[i], at[i], at[i] - at[j], names[j], cls))
    return Analysis(len(cs), len(typical), statistics.median(lengths), q[-1], steps, dict(classes),
                    {n: round(w / len(cs), 2) for n, w in (wakes or {}).items()})


@dataclass
class Slow:
    """The cycles longer than ``factor`` × the median (the issue's bound for p99) and what each
    spent its extra time on."""

    factor: float
    threshold_us: float
    cycles: int  # all whole cycles
    slow: int  # of them, over the threshold
    p99_us: float
    causes: list[tuple[str, int, float, float]]  # (cause, cycles, median cycle µs, median of its time µs)
    with_gc: float = 0.0  # the share of all cycles that a collector pass overlaps (its base rate)


def gap_class(prev: tuple[int, str, int, str], cur: tuple[int, str, int, str], site: str) -> str:
    """What the quiet time between two consecutive events of the merged timeline went to: the
    node that acted next was working (Python), inside a send, receiving what the other sent, or
    (the host's next request) the host."""
    (_, pn, pk, _), (_, cn, ck, cw) = prev, cur
    if cn == site and ck == RX and cw == "host":
        return "the host"
    if pn == cn and pk == SEND and ck == SENT:
        return f"sendmsg in {cn}"
    if pn != cn and ck == RX:
        return f"hand-over to {cn}"
    return f"node {cn}: Python"


def _overlap(p: tuple[int, int, str, int], t0: int, t1: int) -> int:
    """ns of collector pass ``p`` within ``t0``..``t1``."""
    return max(0, min(p[1], t1) - max(p[0], t0))


def slow_cycles(events: list, site: str, gcs: list[tuple[int, int, str, int]], factor: float = 3.0) -> Slow | None:
    """Each cycle over ``factor`` × the median cycle is put down to what filled its longest
    quiet gap between two consecutive events: a pass of the garbage collector (in either node)
    when one covers at least half of that gap (the cause is the pass covering most of it; its
    time, the pass's length), else the gap's class (``gap_class``; its time, the gap). Also the
    share of all cycles a pass overlaps, to compare the slow cycles' with."""
    cs = cycles(events, site)
    if len(cs) < 2:
        return None
    lengths = [(c[-1][0] - c[0][0]) / 1000 for c in cs]
    threshold = factor * statistics.median(lengths)
    found: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    slow = overlapped = 0
    g = 0
    for c, length in zip(cs, lengths, strict=True):
        c0, c1 = c[0][0], c[-1][0]  # c1: the next cycle's start (a cycle is c0 up to it)
        while g < len(gcs) and gcs[g][1] < c0:  # cycles and passes both go forward in time
            g += 1
        near = []  # the passes that overlap this cycle
        for p in gcs[g:]:
            if p[0] >= c1:
                break
            if p[1] >= c0:
                near.append(p)
        overlapped += bool(near)
        if length <= threshold:
            continue
        slow += 1
        gap, i = max(((c[i][0] - c[i - 1][0]) / 1000, i) for i in range(1, len(c)))
        t0, t1 = c[i - 1][0], c[i][0]
        best = max(near, key=lambda p: _overlap(p, t0, t1), default=None)
        if best is not None and _overlap(best, t0, t1) / 1000 >= gap / 2:
            found[f"GC pass in {best[2]} (generation {best[3]})"].append((length, (best[1] - best[0]) / 1000))
        else:
            found[gap_class(c[i - 1], c[i], site)].append((length, gap))
    causes = sorted(((cause, len(v), statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
                     for cause, v in found.items()), key=lambda r: (-r[1], r[0]))
    p99 = statistics.quantiles(lengths, n=100, method="inclusive")[-1]
    return Slow(factor, threshold, len(cs), slow, p99, causes, overlapped / len(cs))


def markdown(results: dict[str, Analysis | None], note: str = "",
             slow: dict[str, Slow | None] | None = None) -> str:
    """One section per site: the typical cycle's steps, its time by class, then (given) the slow
    cycles and their causes."""
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
        lines += ["", "*at*: the median offset from the request's arrival; *+*: the time since the step it "
                  "waited for (*after*; the difference of their medians). The steps on the critical path "
                  "add up to the cycle.",
                  "", "| step | at (µs) | + (µs) | after | spent on |", "|---|---|---|---|---|"]
        for st in an.steps:
            lines.append(f"| {st.name} | {st.at_us:.1f} | {st.waited_us:.1f} | {st.after} | {st.spent_on} |")
        total = sum(an.classes.values())
        lines += ["", "| on the critical path | µs per cycle | share |", "|---|---|---|"]
        for cls, us in sorted(an.classes.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {cls} | {us:.1f} | {100 * us / total:.0f} % |")
        lines.append("")
        sl = (slow or {}).get(site)
        if sl is not None:
            lines += [f"Slow cycles: {sl.slow} of {sl.cycles} ({100 * sl.slow / sl.cycles:.2f} %) took over "
                      f"{sl.factor:g} × the median ({sl.threshold_us:.0f} µs); the cycles' p99 is "
                      f"{sl.p99_us:.0f} µs. Each is put down to what filled its longest quiet gap between two "
                      "recorded events: a garbage collector's pass covering at least half of it, else the "
                      "gap's class (*its time*: the pass's or the gap's length). A collector pass overlaps "
                      f"{100 * sl.with_gc:.1f} % of all cycles.", ""]
            if sl.causes:
                lines += ["| slow cycles' longest gap | cycles | median cycle (µs) | median of its time (µs) |",
                          "|---|---|---|---|"]
                lines += [f"| {c} | {k} | {m:.0f} | {t:.0f} |" for c, k, m, t in sl.causes]
                lines.append("")
    return "\n".join(lines)
