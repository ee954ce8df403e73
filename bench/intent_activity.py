"""What the write-intent log costs random writes, in metadata syncs (issue 13, item 2): the log
alone (``syncd.node.intent.IntentLog`` on a real file, real fdatasyncs), driven in virtual time
by 4 KiB random writes over working sets of several sizes, with a clear pass every virtual
second as the node runs it (hold = max_request_hold + 1 with the default link timings). Counts
the bitmap fdatasyncs per 1,000 writes over the run and after a warm-up, and the time a mark
takes (the real fdatasync, on this machine's disk). Independent of CPU load: the counts are what
changes between versions; run it from another checkout (PYTHONPATH) to compare.

    .venv/bin/python bench/intent_activity.py [--seconds 60] [--iops 1000] [--qd 1,16]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from syncd.node import intent as intent_mod  # noqa: E402
from syncd.node.volume import Volume  # noqa: E402

REGION = 256 << 10
GiB = 1 << 30
SETS = {"256MiB": GiB // 4, "1GiB": GiB, "10GiB": 10 * GiB, "64GiB": 64 * GiB}
HOLD = 13.6


class Clock:
    """time.monotonic for the log and the volume: virtual seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def run(size: int, seconds: int, iops: int, qd: int, tmp: str) -> dict:
    clock = Clock()
    saved = intent_mod.time
    intent_mod.time = clock  # type: ignore[assignment]
    syncs = [0]
    real_fdatasync = os.fdatasync

    def counted(fd: int) -> None:
        syncs[0] += 1
        real_fdatasync(fd)

    vol = Volume("vv1", os.path.join(tmp, "vol"), size=1 << 20)
    path = os.path.join(tmp, f"intent-{size}-{qd}")
    log = intent_mod.IntentLog(path, 64 * GiB, REGION, volume=vol)  # the defaults a node uses
    rng = random.Random(1)
    marks_s: list[float] = []
    per_s: list[int] = []

    async def main() -> None:
        os.fdatasync = counted
        try:
            for _sec in range(seconds):
                before = syncs[0]
                for _ in range(iops // qd):
                    async def one() -> None:
                        off = rng.randrange(size // 4096) * 4096
                        t0 = time.perf_counter()
                        await log.mark(off, 4096)
                        marks_s.append(time.perf_counter() - t0)

                    async with trio.open_nursery() as n:
                        for _ in range(qd):
                            n.start_soon(one)
                    clock.now += qd / iops
                vol.flushed_from = clock.now  # a host that flushes (no pass flush needed)
                await log.clear_idle(HOLD, keep=lambda r: False)
                per_s.append(syncs[0] - before)
        finally:
            os.fdatasync = real_fdatasync

    try:
        trio.run(main)
    finally:
        intent_mod.time = saved
        log.close()
        vol.close()
    marks_s.sort()
    n = len(marks_s)
    warm = per_s[seconds // 2:]
    return {"syncs_per_1000": round(sum(per_s) * 1000 / n, 1),
            "syncs_per_1000_warm": round(sum(warm) * 1000 / (len(warm) * iops), 1),
            "mark_p50_us": round(marks_s[n // 2] * 1e6), "mark_p99_us": round(marks_s[n * 99 // 100] * 1e6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="virtual seconds per case (default 60)")
    ap.add_argument("--iops", type=int, default=1000, help="writes per virtual second (default 1000)")
    ap.add_argument("--qd", default="1,16")
    ap.add_argument("--sets", default=",".join(SETS))
    ns = ap.parse_args()
    print(f"{'set':>8s} {'qd':>3s} {'syncs/1000 writes':>18s} {'after warm-up':>14s} {'mark p50 us':>12s} "
          f"{'mark p99 us':>12s}")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for name in ns.sets.split(","):
            for qd in (int(q) for q in ns.qd.split(",")):
                r = run(SETS[name], ns.seconds, ns.iops, qd, tmp)
                print(f"{name:>8s} {qd:3d} {r['syncs_per_1000']:18.1f} {r['syncs_per_1000_warm']:14.1f} "
                      f"{r['mark_p50_us']:12d} {r['mark_p99_us']:12d}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
