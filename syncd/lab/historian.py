"""The history recorder for the checker (``syncd/lab/history.py``): concurrent writers and readers
on NBD URIs (arrays directly, or host shims), each request's invoke and completion time recorded.

It is an independent client: it speaks NBD through libnbd (Debian's python3-libnbd, built for
/usr/bin/python3) and imports nothing but the standard library and ``nbd``, so run it with that
interpreter, as a file or a module:

    /usr/bin/python3 syncd/lab/historian.py --out h.hist --duration 20 \\
        --client A=nbd://127.0.0.1:20001/vv1 --client B=nbd://127.0.0.1:20002/vv1

Every write carries a stamp no other write carries (client << 40 | sequence) in a 4 KiB block
that is a deterministic function of (stamp, block, flags): each 512-byte sector holds the header
(magic, the recorder's run id, stamp, block, sector index, flags, CRC-32 of the header)
sixteen times. A read is decoded
by rebuilding the block its first sector names and comparing all 4096 bytes, so a block torn
between two writes at any byte, misplaced or corrupted never passes for a write; such a read is
recorded with a negative value that identifies its content and a description of each sector.
Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for every process of the machine,
across network namespaces too), taken just before a request is handed to libnbd and in its
completion callback. The module's format functions (``make_block``, ``decode_block``,
``read_history``) use only the standard library, so the checker's side imports them as well.

File format (``--out``): the line ``SYNCD-HISTORY 1``, then frames: ``J`` + u32 length + a JSON
object (a client, an undecodable read's description, the summary), or ``E`` + u32 count + that
many 40-byte records ``<IBBBxQqqq``: client, op (0 read, 1 write), outcome (0 ok, 1 error,
2 unknown), flags (1 FUA), block, value, invoke ns, complete ns.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import hashlib
import json
import os
import random
import signal
import struct
import sys
import threading
import time
import zlib

BLOCK = 4096
SECTOR = 512
MAGIC = b"SYH1"
_HEAD = struct.Struct(">4sIQQHH")  # magic, run, stamp, block, sector, flags; then the CRC-32 of these 28 bytes
HEADER = _HEAD.size + 4
SEQ_BITS = 40
FUA = 1
READ, WRITE = 0, 1
OK, ERROR, UNKNOWN = 0, 1, 2
RECORD = struct.Struct("<IBBBxQqqq")
FILE_MAGIC = b"SYNCD-HISTORY 1\n"
_FRAME = struct.Struct("<cI")
ZERO = bytes(BLOCK)
# The connection, not the array, failed: a write may or may not have been applied.
_LOST = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT}


def stamp_of(client: int, seq: int) -> int:
    return (client << SEQ_BITS) | seq


def label(stamp: int) -> str:
    """A stamp as people read it: client:sequence."""
    return f"{stamp >> SEQ_BITS}:{stamp & ((1 << SEQ_BITS) - 1)}"


def _sector(run: int, stamp: int, block: int, sector: int, flags: int) -> bytes:
    h = _HEAD.pack(MAGIC, run, stamp, block, sector, flags)
    return (h + zlib.crc32(h).to_bytes(4, "big")) * (SECTOR // HEADER)


def make_block(run: int, stamp: int, block: int, flags: int = 0) -> bytes:
    return b"".join(_sector(run, stamp, block, s, flags) for s in range(BLOCK // SECTOR))


def content_id(data: bytes) -> int:
    """A negative value naming undecodable content (equal contents, equal ids)."""
    return -1 - int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "big")


def _describe_sector(sec: bytes, index: int, run: int) -> str:
    if not any(sec):
        return "zeroes"
    magic, r, stamp, block, s, flags = _HEAD.unpack_from(sec)
    h = sec[:_HEAD.size]
    if magic != MAGIC or zlib.crc32(h).to_bytes(4, "big") != sec[_HEAD.size:HEADER]:
        return "garbage"
    what = f"write {label(stamp)}{' FUA' if flags & FUA else ''}" + ("" if r == run else f" of run {r:#x}")
    if sec != _sector(r, stamp, block, s, flags):
        return f"damaged {what}"
    return f"{what} (block {block}{f' sector {s}' if s != index else ''})"


def describe(data: bytes, run: int) -> str:
    """What each sector of an undecodable block holds, runs of equal sectors merged."""
    parts: list[tuple[int, int, str]] = []
    for i in range(len(data) // SECTOR):
        d = _describe_sector(data[i * SECTOR:(i + 1) * SECTOR], i, run)
        if parts and parts[-1][2] == d:
            parts[-1] = (parts[-1][0], i, d)
        else:
            parts.append((i, i, d))
    return ", ".join(f"sector{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}: {d}" for a, b, d in parts)


def decode_block(data: bytes, block: int, run: int) -> tuple[int, str]:
    """(value, description): the stamp of the write of run ``run`` this block holds intact
    (possibly one meant for another block: the checker tells), 0 for zeroes, or a negative
    content id and what each sector holds."""
    if data == ZERO:
        return 0, ""
    if len(data) == BLOCK:
        magic, r, stamp, blk, s, flags = _HEAD.unpack_from(data)
        if magic == MAGIC and r == run and s == 0 and stamp > 0 and data == make_block(run, stamp, blk, flags):
            return stamp, ""
    return content_id(data), describe(data, run)


# ---- the recorder ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What every worker does: which blocks, how many in flight, how often FUA."""

    run: int  # every block written carries it: data of another run is never taken for this one's
    hot: range  # blocks every client shares
    cold: range | None  # further blocks, chosen uniformly (1 - hot_share of the requests)
    hot_share: float
    depth: int  # requests in flight per connection
    fua: float  # share of writes with FUA
    retry: float  # s between reconnects, and after an error
    drain: float  # s to wait for requests in flight at the end

    def pick(self, rng: random.Random) -> int:
        if self.cold is None or (len(self.hot) and rng.random() < self.hot_share):
            return self.hot[rng.randrange(len(self.hot))]
        return self.cold[rng.randrange(len(self.cold))]


class Worker(threading.Thread):
    """One NBD connection (reconnected whenever it is lost) keeping ``depth`` requests in flight,
    all reads or all writes; records one event per request."""

    def __init__(self, client: int, site: str, uri: str, writer: bool, plan: Plan, seed: int,
                 stop: threading.Event, out: collections.deque):
        super().__init__(name=f"client-{client}", daemon=True)
        self.client, self.site, self.uri, self.writer, self.plan = client, site, uri, writer, plan
        self.rng = random.Random(seed)
        self.stop, self.out = stop, out
        self.seq = 0
        self.inflight: dict[int, tuple] = {}
        self.token = 0
        self.pause_until = 0.0
        self.connects = 0
        self.connect_errors = 0
        self.errors: collections.Counter = collections.Counter()
        self.last_error = ""

    def run(self) -> None:
        import nbd

        while not self.stop.is_set():
            h = self._connect(nbd)
            if h is None:
                self.stop.wait(self.plan.retry)
                continue
            try:
                self._drive(nbd, h)
            finally:
                self._give_up()
                try:
                    h.close()
                except Exception:  # noqa: BLE001 - closing a dead handle
                    pass
            if not self.stop.is_set():
                self.stop.wait(self.plan.retry)

    def _connect(self, nbd):
        h = nbd.NBD()
        try:
            h.aio_connect_uri(self.uri)
            deadline = time.monotonic() + 5.0
            while not h.aio_is_ready():
                if h.aio_is_dead() or h.aio_is_closed() or time.monotonic() > deadline or self.stop.is_set():
                    raise nbd.Error("connection not established", errno.ETIMEDOUT)
                h.poll(100)
            self.connects += 1
            return h
        except nbd.Error as e:
            self.connect_errors += 1
            self.last_error = str(e)
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass
            return None

    def _drive(self, nbd, h) -> None:
        plan = self.plan
        drain_until = None
        while True:
            stopping = self.stop.is_set()
            if stopping and drain_until is None:
                drain_until = time.monotonic() + plan.drain
            if not stopping and time.monotonic() >= self.pause_until:
                while len(self.inflight) < plan.depth:
                    if not self._issue(nbd, h):
                        return
            if stopping and (not self.inflight or time.monotonic() > drain_until):
                return
            try:
                h.poll(100 if self.inflight else 20)
            except nbd.Error as e:
                self.last_error = str(e)
                return
            if h.aio_is_dead() or h.aio_is_closed():
                return

    def _issue(self, nbd, h) -> bool:
        block = self.plan.pick(self.rng)
        self.token += 1
        tok = self.token
        done = lambda err, tok=tok: self._done(tok, err)  # noqa: E731
        try:
            if self.writer:
                self.seq += 1
                flags = FUA if self.rng.random() < self.plan.fua else 0
                stamp = stamp_of(self.client, self.seq)
                buf = nbd.Buffer.from_buffer(bytearray(make_block(self.plan.run, stamp, block, flags)))
                self.inflight[tok] = (WRITE, block, stamp, time.monotonic_ns(), None, flags, buf)
                h.aio_pwrite(buf, block * BLOCK, completion=done, flags=nbd.CMD_FLAG_FUA if flags & FUA else 0)
            else:
                ba = bytearray(BLOCK)
                buf = nbd.Buffer.from_buffer(ba)
                self.inflight[tok] = (READ, block, 0, time.monotonic_ns(), ba, 0, buf)
                h.aio_pread(buf, block * BLOCK, completion=done)
        except nbd.Error as e:  # never sent (the connection is gone): not a request
            del self.inflight[tok]
            self.last_error = str(e)
            return False
        return True

    def _done(self, tok: int, err) -> int:
        t = time.monotonic_ns()
        rec = self.inflight.pop(tok, None)
        if rec is None:
            return 1
        op, block, value, inv, ba, flags, _buf = rec
        e = err.value
        detail = ""
        if e == 0:
            outcome = OK
            if op == READ:
                value, detail = decode_block(bytes(ba), block, self.plan.run)
        else:
            outcome = UNKNOWN if e in _LOST else ERROR
            self.last_error = errno.errorcode.get(e, str(e))
            self.errors[self.last_error] += 1
            self.pause_until = time.monotonic() + self.plan.retry
        self.out.append((self.client, op, outcome, flags, block, value, inv, t, detail))
        return 1

    def _give_up(self) -> None:
        """Requests still in flight on a lost connection (or at the end): their outcome is unknown."""
        t = time.monotonic_ns()
        for op, block, value, inv, _ba, flags, _buf in self.inflight.values():
            self.out.append((self.client, op, UNKNOWN, flags, block, value if op == WRITE else 0, inv, t, ""))
        self.inflight.clear()
        self.pause_until = 0.0


class Writer:
    """Appends frames to the history file as events arrive."""

    def __init__(self, path: str):
        self.f = open(path, "wb")
        self.f.write(FILE_MAGIC)
        self.counts = collections.Counter()

    def meta(self, obj: dict) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.f.write(_FRAME.pack(b"J", len(data)) + data)

    def events(self, batch: list) -> None:
        if not batch:
            return
        recs = []
        for client, op, outcome, flags, block, value, inv, comp, detail in batch:
            if detail:
                self.meta({"value": value, "detail": detail})
            recs.append(RECORD.pack(client, op, outcome, flags, block, value, inv, comp))
            self.counts[(op, outcome)] += 1
        self.f.write(_FRAME.pack(b"E", len(recs)) + b"".join(recs))

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def read_history(path: str) -> tuple[list[tuple[int, int, int, int, int, int, int, int]], dict]:
    """(records, meta): records as (client, op, outcome, flags, block, value, invoke, complete);
    meta = {"run": id, "clients": {id: {...}}, "details": {value: text}, "summary": {...}}. A file cut
    short (the recorder was killed) yields what it holds."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(FILE_MAGIC):
        raise ValueError(f"{path} is not a history file (it does not start with {FILE_MAGIC!r})")
    records: list = []
    meta: dict = {"clients": {}, "details": {}, "summary": {}, "run": None}
    pos = len(FILE_MAGIC)
    while pos + _FRAME.size <= len(data):
        kind, n = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        if kind == b"E":
            end = pos + n * RECORD.size
            if end > len(data):
                break
            records.extend(RECORD.iter_unpack(data[pos:end]))
            pos = end
        elif kind == b"J":
            if pos + n > len(data):
                break
            obj = json.loads(data[pos:pos + n])
            pos += n
            if "client" in obj:
                meta["clients"][obj["client"]] = obj
            elif "detail" in obj:
                meta["details"][obj["value"]] = obj["detail"]
            elif "summary" in obj:
                meta["summary"] = obj["summary"]
            elif "run" in obj:
                meta["run"] = obj["run"]
        else:
            raise ValueError(f"{path}: unknown frame {kind!r} at byte {pos - _FRAME.size}")
    return records, meta


def _blocks(text: str, what: str) -> range:
    try:
        first, count = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"historian: {what} takes FIRST:COUNT (blocks of 4 KiB), not {text!r}") from None
    if first < 0 or count < 1:
        raise SystemExit(f"historian: {what} {text}: FIRST must be >= 0 and COUNT >= 1")
    return range(first, first + count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="historian", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the history file to write")
    p.add_argument("--client", action="append", default=[], metavar="SITE=URI",
                   help="an NBD URI and the site name to record it under (repeatable)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until SIGTERM/SIGINT)")
    p.add_argument("--writers", type=int, default=2, help="writing connections per URI")
    p.add_argument("--readers", type=int, default=2, help="reading connections per URI")
    p.add_argument("--depth", type=int, default=4, help="requests in flight per connection")
    p.add_argument("--hot", default="0:4", help="FIRST:COUNT blocks every client shares (contention)")
    p.add_argument("--range", dest="cold", help="FIRST:COUNT further blocks, chosen uniformly")
    p.add_argument("--hot-share", type=float, default=0.8,
                   help="share of requests on the hot blocks when --range is given")
    p.add_argument("--fua", type=float, default=0.5, help="share of writes sent with FUA")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--run-id", type=lambda x: int(x, 0), help="the run id every block carries (default: random)")
    p.add_argument("--first-client", type=int, default=1, help="client ids start here (unique across recorders)")
    p.add_argument("--retry", type=float, default=0.02, help="seconds between reconnects, and after an error")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for requests in flight at the end")
    ns = p.parse_args(argv)
    if not ns.client:
        p.error("give at least one --client SITE=URI")
    clients = []
    for c in ns.client:
        site, sep, uri = c.partition("=")
        if not sep or not site or "://" not in uri:
            p.error(f"--client takes SITE=URI (e.g. A=nbd://127.0.0.1:10809/vv1), not {c!r}")
        clients.append((site, uri))
    if not 0 <= ns.fua <= 1 or not 0 <= ns.hot_share <= 1:
        p.error("--fua and --hot-share are shares between 0 and 1")
    if ns.depth < 1 or ns.writers < 0 or ns.readers < 0 or ns.writers + ns.readers == 0:
        p.error("--depth must be >= 1, and --writers + --readers >= 1")
    if not 1 <= ns.first_client < 1 << 31:
        p.error("--first-client must be between 1 and 2**31-1")
    try:
        import nbd  # noqa: F401
    except ImportError:
        print(f"historian: python module nbd (Debian package python3-libnbd) is missing for {sys.executable}",
              file=sys.stderr)
        return 2
    run = ns.run_id if ns.run_id is not None else random.SystemRandom().getrandbits(32)
    if not 0 <= run < 1 << 32:
        p.error("--run-id must fit in 32 bits")
    plan = Plan(run, _blocks(ns.hot, "--hot"), _blocks(ns.cold, "--range") if ns.cold else None, ns.hot_share,
                ns.depth, ns.fua, ns.retry, ns.drain)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    out: collections.deque = collections.deque()
    w = Writer(ns.out)
    w.meta({"run": run, "argv": sys.argv[1:] if argv is None else argv})
    workers = []
    cid = ns.first_client
    for site, uri in clients:
        for role in [True] * ns.writers + [False] * ns.readers:
            w.meta({"client": cid, "site": site, "uri": uri, "role": "writer" if role else "reader"})
            workers.append(Worker(cid, site, uri, role, plan, ns.seed * 1000003 + cid, stop, out))
            cid += 1
    t0 = time.monotonic()
    for wk in workers:
        wk.start()
    end = t0 + ns.duration if ns.duration > 0 else None

    def drain_out() -> None:
        batch = []
        while out:
            batch.append(out.popleft())
        w.events(batch)

    while not stop.is_set():
        stop.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic())))
        drain_out()
        if end is not None and time.monotonic() >= end:
            stop.set()
    for wk in workers:
        wk.join()
    drain_out()
    elapsed = time.monotonic() - t0
    c = w.counts
    summary = {
        "seconds": round(elapsed, 3),
        "requests": sum(c.values()),
        "per_second": round(sum(c.values()) / elapsed, 1) if elapsed else 0.0,
        "reads_ok": c[(READ, OK)], "reads_failed": c[(READ, ERROR)] + c[(READ, UNKNOWN)],
        "writes_ok": c[(WRITE, OK)], "writes_error": c[(WRITE, ERROR)], "writes_unknown": c[(WRITE, UNKNOWN)],
        "connects": sum(x.connects for x in workers), "connect_errors": sum(x.connect_errors for x in workers),
        "errors": dict(sum((x.errors for x in workers), collections.Counter())),
    }
    w.meta({"summary": summary})
    w.close()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
