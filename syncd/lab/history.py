"""The history checker: given every read and write that clients at both sites issued on a set of
blocks, with the times each was invoked and completed, and the blocks read back from each replica
afterwards, decide per block whether the system kept its promises. Pure: events in, report out.

Definitions (times are CLOCK_MONOTONIC nanoseconds, one clock for every process of the machine;
a request's real interval at the array lies inside its recorded ``[invoke, complete]``, so every
violation below is a real one, never an artefact of recording):

* A write's value is a stamp no other write carries (> 0). ``INITIAL`` (0) is the value of a
  block no write has reached (zeroes). A read or read-back whose data the recorder could not
  decode (torn, garbage, misplaced) has a value < 0 that identifies its content.
* Write ``w`` *precedes* write ``w'`` when ``w`` was acknowledged before ``w'`` was invoked
  (``w.complete < w'.invoke``). Only acknowledged (``OK``) writes precede anything: a write that
  failed or whose outcome is unknown may or may not have taken effect, at any time after its
  invoke, so reading its value is allowed, and so is never seeing it. ``INITIAL`` precedes every
  write.
* **Stale read**: an OK read ``r`` of block ``b`` returned the value of ``w`` (or ``INITIAL``)
  although some OK write ``w'`` to ``b`` was acknowledged before ``r`` was invoked
  (``w'.complete < r.invoke``) and ``w`` precedes ``w'``: the value had been superseded before
  the read began (design promise 3: "no read returns data older than a write acknowledged
  anywhere before the read began"). This is weaker than linearizability on purpose: two reads
  concurrent with one write may see it in either order (the primary applies a write before its
  peer does).
* **Never written**: a read (or read-back) returned a value that no write to ``b`` issued before
  the read completed: undecodable data (torn between two writes, garbage), another block's
  write, a stamp nobody wrote, or a write invoked only after the read had completed.
* **Lost write**: the final read-back of ``b`` from a replica holds a value that an OK write
  superseded (as for a stale read, with the read-back invoked after everything completed).
* **Replicas differ**: the final read-backs of ``b`` from two replicas differ.

Cost: O(n log n) for n events (per block, acknowledged writes sorted by completion with a
running maximum of their invoke times; each read is one binary search).
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

INITIAL = 0
_BEFORE_ALL = -(1 << 80)  # "precedes everything": the completion time of the initial value
_NEVER = 1 << 80  # "precedes nothing": the completion time of a write not acknowledged
_SITE_COUNTS = ("reads", "reads_failed", "writes_ok", "writes_error", "writes_unknown")


class Op(enum.Enum):
    READ = "read"
    WRITE = "write"


class Outcome(enum.Enum):
    OK = "ok"  # acknowledged without error
    ERROR = "error"  # the array answered with an error
    UNKNOWN = "unknown"  # no answer (connection lost, run ended): may or may not have happened


_WRITE_COUNT = {Outcome.OK: "writes_ok", Outcome.ERROR: "writes_error", Outcome.UNKNOWN: "writes_unknown"}


class Kind(enum.Enum):
    STALE_READ = "stale read"
    NEVER_WRITTEN = "value never written"
    LOST_WRITE = "acknowledged write lost"
    REPLICAS_DIFFER = "replicas differ"


@dataclass(frozen=True, slots=True)
class Event:
    """One request as a client saw it."""

    client: int
    site: str  # where the client sent it, e.g. "A" or "A/shim"
    op: Op
    block: int
    value: int  # write: its unique stamp (> 0); read: what it returned (stamp, INITIAL, < 0 undecodable)
    invoke: int  # ns, CLOCK_MONOTONIC, taken before the request was sent
    complete: int  # ns, taken after its answer arrived (UNKNOWN: when the client gave up)
    outcome: Outcome
    detail: str = ""  # what an undecodable read held, as the recorder saw it


@dataclass(frozen=True, slots=True)
class Violation:
    kind: Kind
    block: int
    where: str  # the read's site, or "replica NAME"
    value: int  # what the read or read-back returned
    at: int  # ns: the read's invoke time (read-backs: the end of the history)
    read: Event | None  # None for a replica read-back
    source: Event | None  # the write whose value was returned, if any
    superseded_by: Event | None  # the acknowledged write that had replaced it (stale, lost)
    text: str


@dataclass(frozen=True, slots=True)
class Episode:
    """Violations of one kind at one place, each within ``EPISODE_GAP`` of the one before: one
    fault window, usually (a restart, a failover), and its first violation as the example."""

    kind: Kind
    where: str
    first: int  # ns
    last: int  # ns
    count: int
    example: Violation


EPISODE_GAP = 1_000_000_000  # ns


@dataclass(frozen=True, slots=True)
class Report:
    """What was checked, what was found, and the first examples of each kind of violation."""

    t0: int  # ns: the first invoke; example times are given relative to it
    reads: int  # OK reads, each checked
    reads_failed: int  # reads with an error or no answer: nothing to check
    writes_ok: int
    writes_error: int
    writes_unknown: int
    blocks: int  # blocks the history touches
    readbacks: int  # (replica, block) read-backs checked
    replicas: tuple[str, ...]
    per_site: Mapping[str, Mapping[str, int]]  # site -> reads, reads failed, writes ok/error/unknown
    violations: Mapping[Kind, int]
    by_site: Mapping[tuple[Kind, str], int]
    examples: tuple[Violation, ...]  # the earliest few of each kind
    episodes: tuple[Episode, ...]  # all of them, in time order

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    @property
    def requests(self) -> int:
        return self.reads + self.reads_failed + self.writes_ok + self.writes_error + self.writes_unknown

    def lines(self) -> list[str]:
        """The report as plain text: counts, then violations by kind and site, then examples."""
        out = [
            f"requests checked: {self.requests} ({self.reads} reads checked, {self.reads_failed} reads failed "
            f"or unanswered; writes: {self.writes_ok} acknowledged, {self.writes_error} failed, "
            f"{self.writes_unknown} unknown) on {self.blocks} blocks",
            f"replica read-backs checked: {self.readbacks} (replicas {', '.join(self.replicas) or 'none'})",
        ]
        for site, c in sorted(self.per_site.items()):
            out.append(f"  at {site}: " + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in c.items()))
        for kind in Kind:
            n = self.violations.get(kind, 0)
            sites = ", ".join(f"{s}: {c}" for (k, s), c in sorted(self.by_site.items(), key=lambda x: x[0][1])
                              if k is kind)
            out.append(f"{kind.value}: {n}" + (f" ({sites})" if n else ""))
        if self.episodes:
            out.append(f"{len(self.episodes)} episode(s) (violations of one kind at one place, "
                       f"less than {EPISODE_GAP / 1e9:.0f}s apart):")
            out += [f"  {seconds(e.first, self.t0)} to {seconds(e.last, self.t0)}: {e.count} x {e.kind.value} "
                    f"at {e.where}" for e in self.episodes]
        if self.examples:
            out.append("first violations of each kind:")
            out += [f"  {v.text}" for v in self.examples]
        return out


def seconds(t: int, t0: int) -> str:
    return f"{(t - t0) / 1e9:.6f}s"


def _default_label(value: int) -> str:
    return f"0x{value:x}"


def check(events: Iterable[Event], replicas: Mapping[str, Mapping[int, int]] | None = None, *,
          examples: int = 5, label: Callable[[int], str] = _default_label) -> Report:
    """Check a history; ``replicas`` maps a replica's name to the value read back from it per
    block (it must cover every block the history writes). Raises ValueError on a history that
    cannot be checked (a write stamp used twice or not > 0, a completion before its invoke)."""
    per_block: dict[int, tuple[list[Event], list[Event]]] = {}
    writers: dict[int, Event] = {}
    t0 = _NEVER
    t_end = _BEFORE_ALL
    counts: dict[tuple[str, str], int] = {}  # (site, what) -> requests
    for e in events:
        if e.complete < e.invoke:
            raise ValueError(f"client {e.client} {e.op.value} of block {e.block}: completed before it was invoked")
        if e.invoke < t0:
            t0 = e.invoke
        if e.complete > t_end:
            t_end = e.complete
        pb = per_block.get(e.block)
        if pb is None:
            pb = per_block[e.block] = ([], [])
        if e.op is Op.WRITE:
            if e.value <= INITIAL:
                raise ValueError(f"client {e.client} wrote block {e.block} with stamp {e.value}: stamps are > 0")
            if e.value in writers:
                other = writers[e.value]
                raise ValueError(f"stamp {label(e.value)} written twice (clients {other.client} and {e.client}, "
                                 f"blocks {other.block} and {e.block}): stamps must be unique")
            writers[e.value] = e
            pb[1].append(e)
            key = (e.site, _WRITE_COUNT[e.outcome])
        elif e.outcome is Outcome.OK:
            pb[0].append(e)
            key = (e.site, "reads")
        else:
            key = (e.site, "reads_failed")
        counts[key] = counts.get(key, 0) + 1
    sites: dict[str, dict[str, int]] = {}
    for (site, what_), cnt in counts.items():
        sites.setdefault(site, {k: 0 for k in _SITE_COUNTS})[what_] = cnt

    def total(what_: str) -> int:
        return sum(c[what_] for c in sites.values())

    if t0 == _NEVER:
        t0 = 0
    found: list[Violation] = []

    def name(w: Event) -> str:
        return (f"write {label(w.value)} by client {w.client} at {w.site} "
                f"[{seconds(w.invoke, t0)}, {seconds(w.complete, t0)}] {w.outcome.value}")

    def what(value: int, detail: str) -> str:
        if value < INITIAL:
            return f"undecodable data ({detail or 'torn or garbage'})"
        if value == INITIAL:
            return "the initial zeroes"
        return f"value {label(value)}"

    nreads = 0
    for block, (reads, writes) in per_block.items():
        nreads += len(reads)
        acked = sorted((w for w in writes if w.outcome is Outcome.OK), key=lambda w: w.complete)
        completes = [w.complete for w in acked]
        latest: list[int] = []  # latest[i]: index in acked of the latest-invoked among acked[:i+1]
        for i, w in enumerate(acked):
            latest.append(i if not latest or w.invoke > acked[latest[-1]].invoke else latest[-1])

        def superseding(value_done: int, before: int, acked: list[Event] = acked, completes: list[int] = completes,
                        latest: list[int] = latest) -> Event | None:
            """An acknowledged write acknowledged before ``before`` and invoked after ``value_done``."""
            k = bisect.bisect_left(completes, before)
            if k == 0:
                return None
            w = acked[latest[k - 1]]
            return w if w.invoke > value_done else None

        def head(r: Event, block: int = block) -> str:
            return (f"block {block}: read by client {r.client} at {r.site} "
                    f"[{seconds(r.invoke, t0)}, {seconds(r.complete, t0)}] returned {what(r.value, r.detail)}")

        for r in reads:
            src, why = _source(r.value, block, r.complete, writers)
            if why:
                found.append(Violation(Kind.NEVER_WRITTEN, block, r.site, r.value, r.invoke, r, src,
                                       None, f"{head(r)}: {why}"))
                continue
            done = _BEFORE_ALL if src is None else (src.complete if src.outcome is Outcome.OK else _NEVER)
            newer = superseding(done, r.invoke)
            if newer is not None:
                by = "" if src is None else f" ({name(src)})"
                found.append(Violation(Kind.STALE_READ, block, r.site, r.value, r.invoke, r, src, newer,
                                       f"{head(r)}{by}, superseded by {name(newer)} before the read began"))

        if replicas:
            for rname, values in replicas.items():
                if block not in values:
                    if writes:
                        raise ValueError(f"replica {rname} was not read back at block {block}, "
                                         "which the history writes")
                    continue
                v = values[block]
                where = f"replica {rname}"
                src, why = _source(v, block, _NEVER, writers)
                held = f"block {block}: {where} holds {what(v, '')}"
                if why:
                    found.append(Violation(Kind.NEVER_WRITTEN, block, where, v, t_end, None, src, None,
                                           f"{held}: {why}"))
                    continue
                done = _BEFORE_ALL if src is None else (src.complete if src.outcome is Outcome.OK else _NEVER)
                newer = superseding(done, _NEVER)
                if newer is not None:
                    by = "" if src is None else f" ({name(src)})"
                    found.append(Violation(Kind.LOST_WRITE, block, where, v, t_end, None, src, newer,
                                           f"{held}{by}, but {name(newer)} superseded it"))

    readbacks = 0
    if replicas:
        names = list(replicas)
        every = set().union(*(set(v) for v in replicas.values()))
        readbacks = sum(len(v) for v in replicas.values())
        for block in sorted(every):
            missing = [n for n in names if block not in replicas[n]]
            if missing:
                raise ValueError(f"block {block} was read back from {', '.join(n for n in names if n not in missing)} "
                                 f"but not from {', '.join(missing)}")
            vals = [replicas[n][block] for n in names]
            if len(set(vals)) > 1:
                each = ", ".join(f"{n}: {what(v, '')}" for n, v in zip(names, vals, strict=True))
                found.append(Violation(Kind.REPLICAS_DIFFER, block, "/".join(names), vals[0], t_end, None, None, None,
                                       f"block {block}: replicas differ ({each})"))
            if block not in per_block:
                # Never touched by the history: it must still hold the initial zeroes.
                for n, v in zip(names, vals, strict=True):
                    if v != INITIAL:
                        found.append(Violation(Kind.NEVER_WRITTEN, block, f"replica {n}", v, t_end, None, None, None,
                                               f"block {block}: replica {n} holds {what(v, '')}, "
                                               "but no write touched it"))

    per_kind: Counter[Kind] = Counter(v.kind for v in found)
    by_site: Counter[tuple[Kind, str]] = Counter((v.kind, v.where) for v in found)
    found.sort(key=lambda v: (v.at, v.block))
    shown: list[Violation] = []
    for kind in Kind:
        shown += [v for v in found if v.kind is kind][:examples]
    open_: dict[tuple[Kind, str], list[Episode]] = {}
    for viol in found:
        eps = open_.setdefault((viol.kind, viol.where), [])
        if eps and viol.at - eps[-1].last <= EPISODE_GAP:
            ep = eps[-1]
            eps[-1] = Episode(ep.kind, ep.where, ep.first, viol.at, ep.count + 1, ep.example)
        else:
            eps.append(Episode(viol.kind, viol.where, viol.at, viol.at, 1, viol))
    episodes = sorted((e for eps in open_.values() for e in eps), key=lambda e: (e.first, e.where))
    return Report(
        t0=t0, reads=nreads, reads_failed=total("reads_failed"), writes_ok=total("writes_ok"),
        writes_error=total("writes_error"), writes_unknown=total("writes_unknown"), blocks=len(per_block),
        readbacks=readbacks, replicas=tuple(replicas or ()), per_site=sites, violations={k: per_kind[k] for k in Kind},
        by_site=dict(by_site), examples=tuple(shown), episodes=tuple(episodes),
    )


def _source(value: int, block: int, read_done: int, writers: Mapping[int, Event]) -> tuple[Event | None, str]:
    """The write whose value a read returned, and why that value cannot have been read ("" if it
    can)."""
    if value == INITIAL:
        return None, ""
    if value < INITIAL:
        return None, "no write issued it"
    w = writers.get(value)
    if w is None:
        return None, "no write issued this stamp"
    if w.block != block:
        return w, f"it is the value of a write to block {w.block} (client {w.client})"
    if w.invoke > read_done:
        return w, f"its write by client {w.client} was invoked only after the read completed"
    return w, ""

