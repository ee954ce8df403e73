"""Benchmark: what handing one write from a process to another costs (docs/design.md section 10).

A worker process that does not own a volume's write order would have to pass each write (a
4 KiB payload and its header) to the owner and wait for a short answer. This measures that bare
round trip over a Unix socket pair, with blocking calls and no event loop (the cheapest form it
could take), with both processes on one CPU and on two different CPUs.

Usage: .venv/bin/python bench/handoff.py [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

PAYLOAD = 4096 + 32  # a 4 KiB write and a header
REPLY = 16


def round_trip_us(owner_cpu: int, worker_cpu: int, count: int) -> float:
    worker, owner = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the owner: answers every write
        try:
            os.sched_setaffinity(0, {owner_cpu})
            worker.close()
            for _ in range(count):
                need = PAYLOAD
                while need:
                    need -= len(owner.recv(need))
                owner.sendall(b"r" * REPLY)
        finally:
            os._exit(0)
    owner.close()
    os.sched_setaffinity(0, {worker_cpu})
    msg = b"w" * PAYLOAD
    t0 = time.perf_counter()
    for _ in range(count):
        worker.sendall(msg)
        need = REPLY
        while need:
            need -= len(worker.recv(need))
    dt = time.perf_counter() - t0
    os.waitpid(pid, 0)
    worker.close()
    return dt / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20000)
    ns = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    print(f"same CPU ({cpus[0]}): {round_trip_us(cpus[0], cpus[0], ns.count):.1f} µs per hand-off")
    if len(cpus) > 1:
        print(f"two CPUs ({cpus[0]}, {cpus[1]}): {round_trip_us(cpus[1], cpus[0], ns.count):.1f} µs per hand-off")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
