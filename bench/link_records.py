"""Benchmark: CPU cost of the link's key mode records, version 1 (HMAC-SHA256) against version 2
(AES-256-GCM tags), in one process: a sender's ``wrap`` and a receiver's ``unwrap`` of the
buffers the replication link sends (a frame header and its payload), per request.

No network and no disk, so it moves little with the neighbours' load: the number to compare
record versions (or a change to secure.py) with. ``bench/cpu_per_io.py`` (with
``SYNCD_KEY_RECORDS=1`` or unset) gives the same comparison on the running lab.

Usage: .venv/bin/python bench/link_records.py [--seconds 1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.getcwd())

from syncd import secure  # noqa: E402

KEY = secure.Security("key", key=b"link records benchmark key......")
# (name, buffers one wrap call gets): a 1 MiB write; a batch of 16 4 KiB writes.
CASES = {
    "1 MiB write": [os.urandom(40), os.urandom(1 << 20)],
    "16 x 4 KiB writes": [b for _ in range(16) for b in (os.urandom(40), os.urandom(4096))],
}


def channels(records: int) -> tuple[secure.Channel, secure.Channel]:
    if records == 0:
        return secure.PlainChannel(), secure.PlainChannel()
    d = secure.Handshake(KEY, secure.Role.DIALER, "A", "B", records=records)
    lis = secure.Handshake(KEY, secure.Role.LISTENER, "B", "A", records=records)
    while not (d.done and lis.done):
        for src, dst in ((d, lis), (lis, d)):
            out = src.take_output()
            if out:
                dst.receive(out)
    assert d.channel is not None and lis.channel is not None
    return d.channel, lis.channel


RECV = 256 << 10  # the link's receive buffer (syncd/repl/link.py _RECV_BUF)
rx = bytearray(RECV)
rx_view = memoryview(rx)


def per_call_us(records: int, bufs: list[bytes], seconds: float) -> tuple[float, float]:
    """µs per wrap of ``bufs``, and per unwrap of what it made (in 256 KiB receives, each
    result copied as the frame decoder does; the copies of the receive count in every mode)."""
    snd, rcv = channels(records)
    n, t_wrap, t_unwrap = 0, 0.0, 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        wire = snd.wrap(bufs)
        t1 = time.perf_counter()
        data = b"".join(wire)  # what the kernel carries; not counted
        t2 = time.perf_counter()
        for at in range(0, len(data), RECV):  # as the link's receiver gets it, and copies it
            chunk = data[at:at + RECV]
            rx_view[:len(chunk)] = chunk
            bytes(rcv.unwrap(rx_view[:len(chunk)]))
        t3 = time.perf_counter()
        t_wrap += t1 - t0
        t_unwrap += t3 - t2
        n += 1
    return t_wrap / n * 1e6, t_unwrap / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    names = {0: "insecure", 1: "key v1 (HMAC)", 2: "key v2 (GCM)"}
    print("| request | records | wrap µs | unwrap µs | total µs | × v1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, bufs in CASES.items():
        best: dict[int, tuple[float, float]] = {}
        for _ in range(a.repeat):  # interleaved, the best of each: the least disturbed run
            for records in (1, 2, 0):
                w, u = per_call_us(records, bufs, a.seconds)
                if records not in best or w + u < sum(best[records]):
                    best[records] = (w, u)
        v1 = sum(best[1])
        for records in (0, 1, 2):
            w, u = best[records]
            print(f"| {case} | {names[records]} | {w:.1f} | {u:.1f} | {w + u:.1f} | {(w + u) / v1:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
