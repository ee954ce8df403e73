"""Benchmark: what the event loop's polling (netio.IdlePoller, [node] busy_poll_us) does to a
CPU-bound process on the same CPU, and what that process does to the loop's latency.

A trio loop pinned to one CPU answers input that another process, on another CPU (the first
two this process may use), sends every --interval seconds, each message stamped with its send
time; the loop records how long each took to reach it. A CPU-bound counter pinned to the loop's
CPU runs alongside, or not. Modes:

  sleep     the loop never polls (busy_poll_us = 0)
  poll      the node's poller: a window of --window, yielding the CPU at every pass, pausing
            when a CPU-bound neighbour is found
  no-yield  the same poller with the yield made a no-op (what polling costs a neighbour when
            it does not step aside; the pause may still follow from preemption)

Printed per mode: the loop's latency p50 / p90 / p99 (µs), its CPU time, the neighbour's share
of its CPU (its count against the count it reaches alone), and the poller's stats. Messages sent
in the first 0.3 s after the loop runs are not counted. Needs two CPUs.

Usage: .venv/bin/python bench/poll_neighbour.py [--seconds 3] [--interval 0.0005] [--window 0.002]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
import trio.testing  # noqa: E402

from syncd import netio  # noqa: E402
from syncd.netio import IdlePoller  # noqa: E402

WARMUP = 0.3
_ALLOWED = sorted(os.sched_getaffinity(0))
FEEDER_CPU, LOOP_CPU = (_ALLOWED + _ALLOWED)[:2]  # the first two CPUs this process may use


def hog(q: mp.Queue, seconds: float) -> None:
    os.sched_setaffinity(0, {LOOP_CPU})
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    q.put(n)


def loop(mode: str, seconds: float, interval: float, window: float, q: mp.Queue) -> None:
    os.sched_setaffinity(0, {LOOP_CPU})
    p = IdlePoller(yield_cpu=(lambda: None) if mode == "no-yield" else os.sched_yield)
    netio.poller = p
    a, b = socket.socketpair()
    a.setblocking(False)
    feeder = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, struct, time\n"
        f"os.sched_setaffinity(0, {{{FEEDER_CPU}}})\n"
        f"s = socket.socket(fileno={b.fileno()})\n"
        f"end = time.time() + {seconds}\n"
        "while time.time() < end:\n"
        f"    time.sleep({interval})\n"
        "    s.send(struct.pack('d', time.perf_counter()))\n")], pass_fds=[b.fileno()])
    b.close()
    lat: list[float] = []
    t_start = 0.0

    async def main() -> None:
        nonlocal t_start
        async with trio.open_nursery() as n:
            n.start_soon(p.run, 0.0 if mode == "sleep" else window)
            await trio.testing.wait_all_tasks_blocked()  # the poller is parked: counting starts
            t_start = time.perf_counter()
            buf = b""
            while True:
                try:
                    d = a.recv(4096)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(a)
                    continue
                if not d:
                    break
                now = time.perf_counter()
                buf += d
                while len(buf) >= 8:
                    (sent,) = struct.unpack_from("d", buf)
                    buf = buf[8:]
                    if sent - t_start > WARMUP:
                        lat.append((now - sent) * 1e6)
                netio.batch_end(netio.batch_begin())
            n.cancel_scope.cancel()

    t0 = os.times()
    trio.run(main)
    t1 = os.times()
    feeder.wait()
    pct = statistics.quantiles(lat, n=100)
    q.put({"cpu_s": round(t1.user + t1.system - t0.user - t0.system, 2),
           "p50_us": round(pct[49]), "p90_us": round(pct[89]), "p99_us": round(pct[98]),
           "n": len(lat), "poller": p.stats()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=0.0005, help="s between messages")
    ap.add_argument("--window", type=float, default=0.002, help="the poller's window (s)")
    ns = ap.parse_args()
    if len(_ALLOWED) < 2:
        raise SystemExit("needs two CPUs")
    q: mp.Queue = mp.Queue()
    h = mp.Process(target=hog, args=(q, ns.seconds))
    h.start()
    alone = q.get()
    h.join()
    print(f"{'neighbour':10s} {'mode':9s} {'p50 µs':>7s} {'p90 µs':>7s} {'p99 µs':>7s} {'loop CPU s':>10s} "
          f"{'its share':>9s}  poller")
    for with_hog in (False, True):
        for mode in ("sleep", "poll", "no-yield"):
            lq: mp.Queue = mp.Queue()
            lp = mp.Process(target=loop, args=(mode, ns.seconds + 0.2, ns.interval, ns.window, lq))
            lp.start()
            share = "-"
            if with_hog:
                time.sleep(0.1)
                h = mp.Process(target=hog, args=(q, ns.seconds))
                h.start()
                share = f"{q.get() / alone:.2f}"
                h.join()
            r = lq.get()
            lp.join()
            st = r["poller"]
            print(f"{'CPU-bound' if with_hog else 'none':10s} {mode:9s} {r['p50_us']:7d} {r['p90_us']:7d} "
                  f"{r['p99_us']:7d} {r['cpu_s']:10.2f} {share:>9s}  polls {st['polls']}, caught {st['caught']}, "
                  f"pauses {st['neighbour_pauses']}", flush=True)


if __name__ == "__main__":
    main()
