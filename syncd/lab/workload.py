"""A verifying write workload and the acknowledged-write checker.

Every block written carries a self-describing pattern (writer, block, sequence number, repeated
across the block). The workload records every write it issued and whether the server
acknowledged it. The checker then reads a replica and proves, for each block, that it holds the
last acknowledged write to it or a later one that was in flight (never older data, never a torn
or misplaced block).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from itertools import pairwise

import trio

from ..nbd.client import NBDDisconnected, NBDError, open_nbd

MAGIC = b"SYNCDWL1"
_HDR = struct.Struct(">8sIIQQ")  # magic, writer, pad, block, seq  (32 bytes)
BLOCK = 4096

ACKED, FAILED, UNKNOWN = "acked", "failed", "unknown"


def pattern(writer: int, block: int, seq: int, size: int = BLOCK) -> bytes:
    return _HDR.pack(MAGIC, writer, 0, block, seq) * (size // _HDR.size)


def decode(data: bytes) -> tuple[int, int, int] | None | str:
    """(writer, block, seq) for a pattern block, None for never-written zeroes, 'torn' else."""
    if not any(data):
        return None
    head = data[: _HDR.size]
    if head * (len(data) // _HDR.size) != data:
        return "torn"
    magic, writer, _, block, seq = _HDR.unpack(head)
    if magic != MAGIC:
        return "torn"
    return writer, block, seq


@dataclass
class History:
    """Every write issued: per block, [(seq, outcome)] in issue order."""

    writes: dict[int, list[list]] = field(default_factory=dict)
    acked_times: list[float] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    slowest: float = 0.0  # the longest a single write took (acknowledged, or still waiting at the end) (s)
    inflight: dict[int, float] = field(default_factory=dict)  # seq -> issue time of writes not answered yet

    stop_at: float = 0.0  # when the workload meant to stop issuing writes (monotonic), if it had a duration
    # Seqs of writes known durable: acknowledged with FUA, or acknowledged before a flush (on
    # the same connection) that was acknowledged. A power cut may lose any other write.
    durable: set[int] = field(default_factory=set)

    def finish(self) -> None:
        """The run is over: writes still waiting count with the time they have waited. A run
        that stopped at its planned time with nothing waiting ends there, not when its
        connections were closed (that is no pause)."""
        if not self.ended:
            now = time.monotonic()
            if self.stop_at and not self.inflight:
                self.ended = min(now, max([self.stop_at] + self.acked_times[-1:]))
            else:
                self.ended = now
        if self.inflight:
            self.slowest = max(self.slowest, self.ended - min(self.inflight.values()))
            self.inflight.clear()

    def issue(self, block: int, seq: int) -> list:
        rec = [seq, UNKNOWN]
        self.writes.setdefault(block, []).append(rec)
        return rec

    def acked_count(self) -> int:
        return sum(1 for recs in self.writes.values() for _, o in recs if o == ACKED)

    def longest_pause(self, since: float | None = None) -> float:
        """Longest gap between consecutive acknowledgements (or start/end), from ``since`` (a
        fault, say) if given, else from the start."""
        t0 = self.started if since is None else since
        ts = [t0] + sorted(x for x in self.acked_times if x >= t0) + [self.ended or time.monotonic()]
        return max((b - a for a, b in pairwise(ts)), default=0.0)

    def to_json(self) -> dict:
        return {"writes": {str(k): v for k, v in self.writes.items()}, "errors": self.errors,
                "acked": self.acked_count(), "durable": sorted(self.durable),
                "longest_pause_s": self.longest_pause(), "slowest_write_s": self.slowest}


def check_replica(read_block, history: History, writer: int, nblocks: int | None = None,
                  durable_only: bool = False) -> list[str]:
    """Problems found in one replica; ``read_block(i)`` returns block i's bytes. With
    ``durable_only`` (after a power cut) a block may hold any write from its last durable one
    on (``History.durable``), not necessarily the last acknowledged one."""
    problems = []
    for block, recs in sorted(history.writes.items()):
        data = read_block(block)
        got = decode(data)
        if durable_only:
            last_acked = max((i for i, (s, _) in enumerate(recs) if s in history.durable), default=-1)
        else:
            last_acked = max((i for i, (_, o) in enumerate(recs) if o == ACKED), default=-1)
        allowed = {recs[i][0] for i in range(max(last_acked, 0), len(recs))}
        if last_acked == -1:
            allowed.add(None)
        if got == "torn":
            problems.append(f"block {block}: torn or foreign data")
        elif got is None:
            if None not in allowed:
                problems.append(f"block {block}: zeroes, but write seq {recs[last_acked][0]} was acknowledged"
                                + (" and flushed" if durable_only else ""))
        else:
            w, b, seq = got
            if w != writer or b != block:
                problems.append(f"block {block}: holds writer {w} block {b} (misplaced)")
            elif seq not in allowed and last_acked == -1:
                problems.append(f"block {block}: holds seq {seq}, which is none of the writes to it")
            elif seq not in allowed:
                problems.append(
                    f"block {block}: holds seq {seq}, but seq {recs[last_acked][0]} was acknowledged"
                    + (" and flushed" if durable_only else "") + (" (older data)" if seq < recs[last_acked][0] else "")
                )
    return problems


def check_file(path: str, history: History, writer: int, offset_blocks: int = 0,
               durable_only: bool = False) -> list[str]:
    with open(path, "rb") as f:
        def rb(i: int) -> bytes:
            f.seek((i + offset_blocks) * BLOCK)
            return f.read(BLOCK)
        return check_replica(rb, history, writer, durable_only=durable_only)


async def run_writer(
    uri: str, history: History, *, writer: int, blocks: range, duration: float, qd: int = 4,
    reconnect: bool = True, seed: int = 1, retry_interval: float = 0.2, fua_every: int = 0,
    source: str | None = None, flush_every: int = 0, rate: float = 0.0,
    acked: trio.Event | None = None,
) -> None:
    """Write patterned blocks at random within ``blocks`` for ``duration`` s with ``qd`` in flight.

    Blocks are split among the ``qd`` lanes so one block never has two writes in flight: the
    issue order of a block's writes is then also the order the server saw them. Every
    ``fua_every``-th write is sent with FUA; with ``flush_every``, each lane sends a flush after
    that many acknowledged writes; both are recorded in ``history.durable``. With ``rate``, the
    writes are paced to at most that many per second in all (0: as fast as they complete).
    ``acked`` is set at the first acknowledged write.
    """
    import random

    rng = random.Random(seed)
    history.started = history.started or time.monotonic()
    history.stop_at = time.monotonic() + duration
    deadline = trio.current_time() + duration
    # Seqs go on from the history's (several runs may record into one history).
    seqs = {"n": max((rec[0] for recs in history.writes.values() for rec in recs), default=0)}
    lanes = [blocks[i::qd] for i in range(qd)]
    gap = qd / rate if rate > 0 else 0.0  # each lane's share of the pace

    async def lane(lb: range) -> None:
        unflushed: list[int] = []  # seqs acknowledged on this lane since its last flush was sent
        due = trio.current_time()
        while trio.current_time() < deadline:
            try:
                async with open_nbd(uri, source=source) as c:
                    unflushed.clear()  # a flush covers the writes of its own connection
                    while trio.current_time() < deadline:
                        if flush_every and len(unflushed) >= flush_every:
                            covered, unflushed[:] = list(unflushed), []
                            try:
                                await c.flush()
                            except NBDError as e:
                                history.errors.append((time.monotonic(), f"flush: {e}"))
                            else:
                                history.durable.update(covered)
                            continue
                        if gap:
                            due = max(due + gap, trio.current_time())  # no burst to catch up
                            await trio.sleep_until(due)
                        b = lb[rng.randrange(len(lb))]
                        seqs["n"] += 1
                        seq = seqs["n"]
                        rec = history.issue(b, seq)
                        fua = bool(fua_every and seq % fua_every == 0)
                        try:
                            t0 = history.inflight[seq] = time.monotonic()
                            await c.write(b * BLOCK, pattern(writer, b, seq), fua=fua)
                            del history.inflight[seq]
                            rec[1] = ACKED
                            if acked is not None:
                                acked.set()
                            if fua:
                                history.durable.add(seq)
                            elif flush_every:
                                unflushed.append(seq)
                            t1 = time.monotonic()
                            history.acked_times.append(t1)
                            history.slowest = max(history.slowest, t1 - t0)
                        except NBDError as e:
                            history.inflight.pop(seq, None)
                            rec[1] = FAILED
                            history.errors.append((time.monotonic(), str(e)))
                            await trio.sleep(retry_interval)
                        except NBDDisconnected as e:
                            history.inflight.pop(seq, None)
                            history.errors.append((time.monotonic(), f"disconnected: {e}"))
                            break
            except (OSError, NBDDisconnected, NBDError, trio.TooSlowError) as e:
                history.errors.append((time.monotonic(), f"connect: {e}"))
            if not reconnect:
                return
            await trio.sleep(retry_interval)

    async with trio.open_nursery() as n:
        for lb in lanes:
            if len(lb):
                n.start_soon(lane, lb)
    history.finish()


async def sample_alua(uri: str, samples: list, *, interval: float = 0.2, source: str | None = None,
                      sampled: trio.Event | None = None) -> None:
    """Poll the path state the array shows this host, as a multipath initiator does: appends
    (monotonic time, state, epoch) and (time, None, error) when the array cannot be asked."""
    from ..nbd.client import open_alua_probe

    while True:
        try:
            async with open_alua_probe(uri, connect_timeout=max(interval * 5, 1.0), source=source) as p:
                while True:
                    with trio.fail_after(max(interval * 5, 1.0)):
                        st, ep = await p.query()
                    samples.append((time.monotonic(), st, ep))
                    if sampled is not None:
                        sampled.set()
                    await trio.sleep(interval)
        except (OSError, NBDDisconnected, NBDError, trio.TooSlowError, trio.BrokenResourceError) as e:
            samples.append((time.monotonic(), None, type(e).__name__))
            await trio.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="syncd-workload", description="verifying write workload over NBD")
    p.add_argument("uri")
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--writer", type=int, default=1)
    p.add_argument("--blocks", default="0:4096", help="FIRST:COUNT blocks of 4 KiB")
    p.add_argument("--qd", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.0, help="at most this many writes per second (0: no limit)")
    p.add_argument("--ready", help="create this file once a write is acknowledged (and, with "
                                   "--alua-interval, a path state sampled)")
    p.add_argument("--out", help="write the history as JSON here")
    p.add_argument("--source", help="local address to connect from (the array tells hosts apart by it)")
    p.add_argument("--alua-interval", type=float, default=0.0,
                   help="also sample the syncd:alua path state every N s (recorded in --out)")
    ns = p.parse_args(argv)
    first, count = (int(x) for x in ns.blocks.split(":"))
    h = History()
    alua: list = []

    async def run() -> None:
        # SIGTERM/SIGINT stop the host at once (as a crashed server would), keeping the record.
        import signal

        acked, sampled = trio.Event(), trio.Event()
        if ns.alua_interval <= 0:
            sampled.set()

        async with trio.open_nursery() as n:
            async def writer():
                await run_writer(ns.uri, h, writer=ns.writer, blocks=range(first, first + count),
                                 duration=ns.duration, qd=ns.qd, source=ns.source, rate=ns.rate, acked=acked)
                n.cancel_scope.cancel()

            async def ready(path: str) -> None:
                await acked.wait()
                await sampled.wait()
                await trio.Path(path).touch()

            async def signals():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        n.cancel_scope.cancel()
                        return

            n.start_soon(writer)
            n.start_soon(signals)
            if ns.ready:
                n.start_soon(ready, ns.ready)
            if ns.alua_interval > 0:
                n.start_soon(lambda: sample_alua(ns.uri, alua, interval=ns.alua_interval, source=ns.source,
                                                 sampled=sampled))
        h.finish()

    trio.run(run)
    summary = {"acked": h.acked_count(), "errors": len(h.errors), "longest_pause_s": round(h.longest_pause(), 3),
               "slowest_write_s": round(h.slowest, 3)}
    print(json.dumps(summary))
    if ns.out:
        out = h.to_json()
        out.update(acked_times=h.acked_times, started=h.started, ended=h.ended, alua=alua)
        with open(ns.out + ".tmp", "w") as f:
            json.dump(out, f)
        import os

        os.replace(ns.out + ".tmp", ns.out)
    return 0


def load_history(path: str) -> tuple["History", list]:
    """A History (and the ALUA samples) written by ``--out``."""
    with open(path) as f:
        d = json.load(f)
    h = History(writes={int(k): v for k, v in d["writes"].items()}, acked_times=d.get("acked_times", []),
                durable=set(d.get("durable", [])),
                errors=[tuple(e) for e in d["errors"]], started=d.get("started", 0.0), ended=d.get("ended", 0.0),
                slowest=d.get("slowest_write_s", 0.0))
    return h, [tuple(x) for x in d.get("alua", [])]


if __name__ == "__main__":
    raise SystemExit(main())
