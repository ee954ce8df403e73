"""The lab's live fuzzer (``syncd lab fuzz``): mutated valid sessions against running daemons.

At the start of every run it records what real clients send on each port of a running lab:
NBD (nbdinfo, nbdsh, nbdcopy, qemu-img through a recording relay), the replication link (a
node redialling its peer through the lab's link relay), the witness (both nodes' sessions,
recorded the same way) and the admin socket (syncctl requests). The recordings are the only
knowledge the mutators have of the link and witness protocols, so they keep working when those
handshakes change. Then it replays mutated sessions (bit flips, insertions, deletions,
truncation at every boundary, splices, duplicated, dropped, reordered and replayed chunks,
boundary values in length-like and NBD header fields, slow senders, floods, half-closed
connections), deterministically from a seed, and checks after every case (a daemon died, a
traceback or an unexpected error in a log, memory) and periodically (the oracle: every daemon
serves a real client, the link and the witness are up, roles and epochs are unchanged, volumes
the fuzzer could not write are byte-identical to before, the fuzz volume's replicas agree).

The NBD cases connect from 127.0.0.2, a host that sees only the fuzz volume (the lab's last
volume); the oracle writes that volume through the lab host (127.0.0.1). Everything else must
stay as it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..ctl import CtlError, call
from .faults import pid_alive

PORTS = ("nbd", "link", "witness", "admin")
FUZZ_HOST = "fuzzer"
FUZZ_SOURCE = "127.0.0.2"  # the fuzzer's NBD connections: a host that sees only the fuzz volume
FLOOD_DEFAULT = 48  # connections per flood when the node's config names no connection limit
RSS_BOUND_MIB = 384  # a node's RSS may grow this much over its baseline (32 MiB per connection is the bound)

# NBD framing from the NBD specification (doc/proto.md); the fuzzer knows the spec, not our code.
NBD_REQUEST_MAGIC = struct.pack(">I", 0x25609513)
NBD_IHAVEOPT = struct.pack(">Q", 0x49484156454F5054)
NBD_OPT_REPLY_MAGIC = struct.pack(">Q", 0x3E889045565A9)
NBD_SIMPLE_REPLY_MAGIC = struct.pack(">I", 0x67446698)
NBD_STRUCTURED_REPLY_MAGIC = struct.pack(">I", 0x668E33EF)

# Values that break arithmetic on a field of that width: 0, max, max-1, the sign bit, its neighbours.
SPECIALS = {
    2: [0, 1, 0xFFFF, 0xFFFE, 0x8000, 0x7FFF],
    4: [0, 1, 0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 0x01000000, 0x02000001],
    8: [0, 1, 2**64 - 1, 2**64 - 2, 2**63, 2**63 - 1, 2**32, 2**32 - 1, 2**62 + 4096, 2**64 - 512],
}

BAD_LOG = re.compile(r"Traceback|\bCRITICAL\b|\bERROR\b|request failed|Too many open files|MemoryError")


class FuzzError(Exception):
    pass


# -- recorded sessions -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Session:
    """One recorded connection: the chunks each side sent, in the order the relay saw them
    ("c" from the client, "s" from the server)."""

    port: str
    name: str
    events: tuple[tuple[str, bytes], ...]
    target: int | None = None  # where it was recorded (a link path), if that matters

    @property
    def chunks(self) -> list[bytes]:
        return [b for side, b in self.events if side == "c"]

    @property
    def waits(self) -> frozenset[int]:
        """Indexes of client chunks after which the server answered before the client went on."""
        out, i = set(), -1
        for side, _ in self.events:
            if side == "c":
                i += 1
            elif i >= 0:
                out.add(i)
        return frozenset(out)

    def to_json(self) -> dict:
        return {"port": self.port, "name": self.name, "target": self.target,
                "events": [[s, base64.b64encode(b).decode()] for s, b in self.events]}

    @staticmethod
    def from_json(d: dict) -> Session:
        return Session(d["port"], d["name"], tuple((s, base64.b64decode(b)) for s, b in d["events"]), d.get("target"))


class _Recorder:
    """A recording TCP or unix-socket relay run in threads: clients connect to ``address``;
    each connection is relayed to ``target`` (from ``source`` if given) and recorded."""

    def __init__(self, target, source: str | None = None, unix_path: str | None = None):
        self.target, self.source = target, source
        self.sessions: list[list[tuple[str, bytes]]] = []
        self.lock = threading.Lock()
        if unix_path:
            self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.exists(unix_path):
                os.unlink(unix_path)
            self.lsock.bind(unix_path)
            self.address = unix_path
        else:
            self.lsock = socket.socket()
            self.lsock.bind(("127.0.0.1", 0))
            self.address = self.lsock.getsockname()
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._relay, args=(c,), daemon=True).start()

    def _relay(self, c: socket.socket) -> None:
        rec: list[tuple[str, bytes]] = []
        with self.lock:
            self.sessions.append(rec)
        try:
            if isinstance(self.target, str):
                u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            else:
                u = socket.socket()
                if self.source:
                    u.bind((self.source, 0))
            u.connect(self.target)
        except OSError:
            c.close()
            return
        ends = {c: (u, "c"), u: (c, "s")}
        open_ = {c, u}
        try:
            while open_:
                r, _, _ = select.select(list(open_), [], [], 30)
                if not r:
                    break
                for s in r:
                    try:
                        data = s.recv(1 << 16)
                    except OSError:
                        data = b""
                    dst, side = ends[s]
                    if not data:
                        open_.discard(s)
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            open_.discard(dst)
                        continue
                    rec.append((side, data))
                    try:
                        dst.sendall(data)
                    except OSError:
                        open_.clear()
        finally:
            c.close()
            u.close()

    def take(self) -> list[list[tuple[str, bytes]]]:
        with self.lock:
            out, self.sessions = self.sessions, []
        return out

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.lsock.close()


NBDSH_RW = """
h.add_meta_context("base:allocation")
h.add_meta_context("syncd:alua")
h.connect_uri(URI)
h.pwrite(b"\\xa5" * 4096, 0)
if h.can_fua():
    h.pwrite(b"\\x5a" * 8192, 65536, nbd.CMD_FLAG_FUA)
h.pread(4096, 0)
h.pread(65536, 1 << 20)
if h.can_flush():
    h.flush()
if h.can_trim():
    h.trim(65536, 2 << 20)
if h.can_zero():
    h.zero(131072, 3 << 20)
if h.can_meta_context("base:allocation") or h.can_meta_context("syncd:alua"):
    h.block_status(1 << 20, 0, lambda *a: 0)
h.shutdown()
"""

NBDSH_OLD = """
h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
h.set_request_structured_replies(False)
h.connect_uri(URI)
h.pread(512, 0)
h.pwrite(b"\\x11" * 512, 4096)
h.shutdown()
"""


def _nbdsh() -> list[str]:
    """nbdsh (``python3 -m nbd``) run by the system's python3, which has libnbd's module
    (python3-libnbd), whichever python3 comes first on PATH."""
    return ["/usr/bin/python3", "-m", "nbd"] if os.path.exists("/usr/bin/python3") else ["nbdsh"]


def _run_client(args: list[str], timeout: float = 60) -> str:
    if args[0] == "nbdsh":
        args = _nbdsh() + args[1:]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{args[0]}: {e}"
    return "" if p.returncode == 0 else f"{' '.join(args[:2])}: exit {p.returncode}: {p.stderr.strip()[-300:]}"


def record_nbd(addr: tuple[str, int], volume: str, problems: list[str]) -> list[Session]:
    """Real NBD clients' sessions, through a relay that connects from the fuzz host's address."""
    rec = _Recorder(addr, source=FUZZ_SOURCE)
    host, port = rec.address
    uri = f"nbd://{host}:{port}/{volume}"
    clients = [
        ("nbdinfo", ["nbdinfo", uri]),
        ("nbdinfo --list", ["nbdinfo", "--list", f"nbd://{host}:{port}"]),
        ("nbdinfo --map", ["nbdinfo", "--map", uri]),
        ("nbdinfo --map=syncd:alua", ["nbdinfo", "--map=syncd:alua", uri]),
        ("nbdsh rw", ["nbdsh", "-c", f"URI = {uri!r}\n" + NBDSH_RW]),
        ("nbdsh oldstyle", ["nbdsh", "-c", f"URI = {uri!r}\n" + NBDSH_OLD]),
        ("nbdcopy", ["nbdcopy", "--requests=4", uri, "null:"]),
        ("qemu-img info", ["qemu-img", "info", "-f", "raw", uri]),
    ]
    out: list[Session] = []
    try:
        for name, args in clients:
            err = _run_client(args)
            if err:
                problems.append(f"recording NBD with {name}: {err}")
            time.sleep(0.05)  # the relay has seen the last bytes
            for i, ev in enumerate(rec.take()):
                if any(s == "c" for s, _ in ev):
                    out.append(Session("nbd", f"{name} #{i}" if i else name, tuple(ev)))
    finally:
        rec.close()
    return out


def record_admin(sock: str, d: Path, problems: list[str]) -> list[Session]:
    """syncctl's read-only requests (and one refusal) through a recording unix-socket relay."""
    rec = _Recorder(sock, unix_path=str(d / "fuzz-admin-rec.sock"))
    reqs = [("showrcopy", {}), ("showrcopy", {"group": "rcg1"}), ("showhost", {}), ("showvlun", {}),
            ("showpaths", {}), ("showpaths", {"host": "lab"}), ("showrcopy", {"group": "no-such-group"})]
    out: list[Session] = []
    try:
        for cmd, args in reqs:
            try:
                call(rec.address, cmd, args, timeout=10)
            except CtlError as e:
                if "no-such-group" not in str(args):
                    problems.append(f"recording admin {cmd}: {e}")
            time.sleep(0.02)
            for ev in rec.take():
                out.append(Session("admin", f"{cmd} {json.dumps(args)}", tuple(ev)))
    finally:
        rec.close()
        try:
            os.unlink(rec.address)
        except OSError:
            pass
    return out


def record_via_relay(lab: dict, relay_index: int, name: str, port: str, ready: Callable[[], bool],
                     problems: list[str], during: Callable[[], None] | None = None,
                     target: int | None = None) -> list[Session]:
    """A node's real session through the lab's link relay: recording on, the relayed connection
    dropped (the node redials), recorded until the node is connected again and a little more."""
    from .relay import proxy_command

    ctl = lab["link"]["control"]
    proxy_command(ctl, "record", paths=[relay_index], limit=1 << 16)
    proxy_command(ctl, "heal", paths=[relay_index])  # a heal drops the relayed connections
    deadline = time.monotonic() + 15
    time.sleep(0.3)
    while time.monotonic() < deadline and not ready():
        time.sleep(0.1)
    if during:
        during()
    time.sleep(1.5)  # keepalives, state and lease traffic after the handshake
    got = proxy_command(ctl, "recorded", paths=[relay_index])["recorded"][0]
    out = []
    for i, conn in enumerate(got):
        ev = tuple((s, base64.b64decode(b)) for s, b in conn)
        if any(s == "c" for s, _ in ev):
            out.append(Session(port, f"{name} #{i}" if i else name, ev, target))
    if not out:
        problems.append(f"recording {name}: the node did not reconnect through the relay")
    return out


# -- cases -------------------------------------------------------------------------------------
@dataclass(slots=True)
class Plan:
    """What one connection sends: chunks, the chunks after which it waits for an answer."""

    chunks: list[bytes]
    waits: frozenset[int] = frozenset()


@dataclass(slots=True)
class Case:
    cid: str
    port: str
    desc: str
    target: int
    mode: str  # normal | halfclose | slow | flood
    plans: list[Plan]

    def dump(self) -> dict:
        return {"case": self.cid, "desc": self.desc, "mode": self.mode, "target": self.target,
                "connections": [[base64.b64encode(c).decode() for c in p.chunks] for p in self.plans]}


def _pick_chunk(rng: random.Random, chunks: list[bytes]) -> int:
    """A chunk index, weighted by size (empty chunks are never picked if others exist)."""
    sizes = [len(c) for c in chunks]
    if not any(sizes):
        return rng.randrange(len(chunks))
    return rng.choices(range(len(chunks)), weights=sizes)[0]


def _length_like(c: bytes) -> list[tuple[int, int]]:
    """(position, width) of big-endian fields whose value is the size of what follows them or of
    the chunk: how most length prefixes look, whatever the protocol."""
    out = []
    for w, fmt in ((2, ">H"), (4, ">I"), (8, ">Q")):
        for pos in range(0, len(c) - w + 1):
            v = struct.unpack_from(fmt, c, pos)[0]
            rest = len(c) - pos - w
            if v > 0 and v in (rest, len(c), rest - 1, rest + 1) and v >= 2:
                out.append((pos, w))
    return out


def _nbd_fields(chunks: list[bytes]) -> list[tuple[int, int, int, str]]:
    """(chunk, position, width, name) of NBD request and option header fields (NBD spec)."""
    out = []
    for ci, c in enumerate(chunks):
        for m in re.finditer(re.escape(NBD_REQUEST_MAGIC), c):
            p = m.start()
            if p + 28 <= len(c):
                out += [(ci, p + 4, 2, "flags"), (ci, p + 6, 2, "type"), (ci, p + 16, 8, "offset"),
                        (ci, p + 24, 4, "length")]
        for m in re.finditer(re.escape(NBD_IHAVEOPT), c):
            p = m.start()
            if p + 16 <= len(c):
                out += [(ci, p + 8, 4, "option"), (ci, p + 12, 4, "option length")]
    return out


def mutate(rng: random.Random, port: str, chunks: list[bytes], others: list[Session]) -> tuple[list[bytes], str]:
    """One random mutation of a session's chunks; returns the new chunks and what was done."""
    chunks = list(chunks)
    kinds = ["bitflip", "insert", "delete", "field", "length", "dup", "drop", "reorder", "replay", "splice"]
    if port == "nbd":
        kinds += ["nbd-field", "nbd-field"]
    kind = rng.choice(kinds)
    if not chunks:
        chunks = [b""]
    i = _pick_chunk(rng, chunks)
    c = bytearray(chunks[i])
    if kind == "bitflip" and c:
        bits = sorted(rng.randrange(len(c) * 8) for _ in range(rng.choice([1, 1, 2, 4, 8])))
        for b in bits:
            c[b // 8] ^= 1 << (b % 8)
        chunks[i] = bytes(c)
        return chunks, f"bitflip chunk {i} bits {bits}"
    if kind == "insert":
        pos = rng.randint(0, len(c))
        what = rng.choice(["random", "ff", "00", "self"])
        n = rng.choice([1, 2, 4, 8, 16, 64, 1024])
        ins = {"random": bytes(rng.getrandbits(8) for _ in range(min(n, 64))),
               "ff": b"\xff" * n, "00": b"\0" * n, "self": bytes(c[pos:pos + n])}[what]
        c[pos:pos] = ins
        chunks[i] = bytes(c)
        return chunks, f"insert {len(ins)} bytes ({what}) in chunk {i} at {pos}"
    if kind == "delete" and c:
        pos = rng.randrange(len(c))
        n = rng.choice([1, 2, 4, 8, 32])
        del c[pos:pos + n]
        chunks[i] = bytes(c)
        return chunks, f"delete {n} bytes of chunk {i} at {pos}"
    if kind in ("field", "length") and len(c) >= 2:
        cands = _length_like(bytes(c)) if kind == "length" else []
        if cands:
            pos, w = rng.choice(cands)
        else:
            w = rng.choice([w for w in (2, 4, 8) if w <= len(c)])
            pos = rng.randrange(0, len(c) - w + 1, w if len(c) >= 2 * w else 1)
        v = rng.choice(SPECIALS[w])
        c[pos:pos + w] = v.to_bytes(w, "big")
        chunks[i] = bytes(c)
        return chunks, f"{kind} chunk {i} at {pos} ({w} bytes) = {v:#x}"
    if kind == "nbd-field":
        fields = _nbd_fields(chunks)
        if fields:
            ci, pos, w, name = rng.choice(fields)
            vals = SPECIALS[w]
            if name == "offset":
                vals = vals + [rng.getrandbits(64), 1 << 40]
            if name == "length":
                vals = vals + [(32 << 20) + 1, 64 << 20, 4096 * 1025]
            v = rng.choice(vals)
            c = bytearray(chunks[ci])
            c[pos:pos + w] = v.to_bytes(w, "big")
            chunks[ci] = bytes(c)
            return chunks, f"nbd {name} in chunk {ci} at {pos} = {v:#x}"
    if kind == "dup":
        n = rng.choice([1, 2, 8])
        chunks[i + 1:i + 1] = [chunks[i]] * n
        return chunks, f"chunk {i} repeated {n} more times"
    if kind == "drop" and len(chunks) > 1:
        del chunks[i]
        return chunks, f"chunk {i} dropped"
    if kind == "reorder" and len(chunks) > 1:
        j = rng.randrange(len(chunks))
        chunks[i], chunks[j] = chunks[j], chunks[i]
        return chunks, f"chunks {i} and {j} swapped"
    if kind == "replay":
        k = rng.randrange(len(chunks))
        return chunks + chunks[k:], f"chunks {k}.. sent again after the end"
    if kind == "splice" and others:
        o = rng.choice(others)
        oc = o.chunks or [b""]
        j = rng.randrange(len(oc))
        if rng.random() < 0.5:
            return chunks[:i + 1] + oc[j:], f"chunks ..{i} then chunks {j}.. of {o.name!r}"
        cut, ocut = rng.randint(0, len(c)), rng.randint(0, len(oc[j]))
        return chunks[:i] + [bytes(c[:cut]) + oc[j][ocut:]] + oc[j + 1:], \
            f"chunk {i} cut at {cut}, then {o.name!r} from chunk {j} byte {ocut}"
    return mutate(rng, port, chunks, others)  # that mutation did not apply: draw another


def truncations(sessions: list[Session]) -> list[tuple[int, int]]:
    """(session, byte count) cuts at every chunk boundary of every session, and a byte either side."""
    out = []
    for si, s in enumerate(sessions):
        total, pos = sum(len(c) for c in s.chunks), 0
        for c in s.chunks[:64]:
            for cut in (pos + 1, pos + len(c) // 2, pos + len(c) - 1, pos + len(c)):
                if 0 < cut < total and (si, cut) not in out:
                    out.append((si, cut))
            pos += len(c)
    return out


def _truncate(chunks: list[bytes], n: int) -> list[bytes]:
    out, left = [], n
    for c in chunks:
        if left <= 0:
            break
        out.append(c[:left])
        left -= len(out[-1])
    return out


def make_case(seed: int, port: str, index: int, sessions: list[Session], ntargets: int,
              flood: int) -> Case:
    """Case ``port:index`` of this seed: the same recordings give the same bytes."""
    rng = random.Random(f"{seed}/{port}/{index}")
    cid = f"{port}:{index}"
    target = rng.randrange(ntargets)
    cuts = truncations(sessions)
    if index % 3 == 0 and cuts:
        si, n = cuts[(index // 3) % len(cuts)]
        s = sessions[si]
        mode = "halfclose" if (index // 3) % 2 else "normal"
        if s.target is not None and s.target < ntargets:
            target = s.target
        return Case(cid, port, f"{s.name!r} truncated after {n} bytes", target, mode,
                    [Plan(_truncate(s.chunks, n), s.waits)])
    s = rng.choice(sessions)
    if s.target is not None and s.target < ntargets and rng.random() < 0.8:
        target = s.target  # mostly where it was recorded: past the checks a mismatch would meet
    others = [o for o in sessions if o is not s]
    chunks, descs = s.chunks, []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        chunks, d = mutate(rng, port, chunks, others)
        descs.append(d)
    r = rng.random()
    mode = "halfclose" if r < 0.1 else "slow" if r < 0.14 else "flood" if r < 0.18 else "normal"
    if rng.random() < 0.1:  # a verbatim replay of the recorded session
        chunks, descs = s.chunks, ["verbatim replay"]
    plans = [Plan(chunks, s.waits)]
    if mode == "flood":
        n = flood
        plans = [Plan(_truncate(chunks, rng.randint(0, sum(map(len, chunks)))), frozenset()) for _ in range(n)]
        descs.append(f"{n} connections at once, each a random prefix")
    return Case(cid, port, f"{s.name!r}: " + "; ".join(descs), target, mode, plans)


# -- running a case ----------------------------------------------------------------------------
@dataclass
class PortStats:
    cases: int = 0
    connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    closed_by_peer: int = 0
    refusals: int = 0
    stalled: int = 0  # the daemon stopped reading (back-pressure) before the case was sent


@dataclass
class Finding:
    kind: str
    case: str
    detail: str

    def line(self) -> str:
        return f"[{self.kind}] after {self.case}: {self.detail}"


def _connect(target) -> socket.socket:
    if isinstance(target, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect(target)
    else:
        addr, source = target
        s = socket.socket()
        s.settimeout(3)
        if source:
            s.bind((source, 0))
        s.connect(addr)
    s.setblocking(False)
    return s


class _Conn:
    def __init__(self, target):
        self.s = _connect(target)
        self.recv = bytearray()
        self.eof = False
        self.sent = 0

    def drain(self, wait: float) -> None:
        """Read what has arrived; wait up to ``wait`` s for the first bytes."""
        deadline = time.monotonic() + wait
        while not self.eof:
            left = max(0.0, deadline - time.monotonic())
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                return
            try:
                d = self.s.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                self.eof = True
                return
            if not d:
                self.eof = True
                return
            if len(self.recv) < 1 << 20:
                self.recv += d
            deadline = time.monotonic()  # got some: take what else is there, don't wait on

    def send(self, data: bytes, timeout: float = 2.0) -> bool:
        """False when the peer closed, or stopped reading for ``timeout`` s."""
        view, deadline = memoryview(data), time.monotonic() + timeout
        while view:
            _, w, _ = select.select([], [self.s], [], max(0.0, deadline - time.monotonic()))
            if not w:
                return False
            try:
                n = self.s.send(view)
            except BlockingIOError:
                continue
            except OSError:
                self.eof = True
                return False
            view = view[n:]
            self.sent += n
            self.drain(0)  # keep the peer's replies from filling both windows
        return True

    def close(self, reset: bool = False) -> None:
        if reset:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.s.close()


def _refusals(port: str, data: bytes) -> int:
    """Errors the daemon answered with, counted from its replies (NBD spec, admin JSON)."""
    n = 0
    if port == "nbd":
        for m in re.finditer(re.escape(NBD_OPT_REPLY_MAGIC), data):
            p = m.end()
            if p + 8 <= len(data) and struct.unpack_from(">I", data, p + 4)[0] & 0x80000000:
                n += 1
        for m in re.finditer(re.escape(NBD_SIMPLE_REPLY_MAGIC), data):
            if m.end() + 4 <= len(data) and struct.unpack_from(">I", data, m.end())[0]:
                n += 1
        for m in re.finditer(re.escape(NBD_STRUCTURED_REPLY_MAGIC), data):
            if m.end() + 4 <= len(data) and struct.unpack_from(">H", data, m.end() + 2)[0] & 0x8000:
                n += 1
    elif port == "admin":
        n = data.count(b'"ok": false') + data.count(b'"ok":false')
    return n


def run_case(case: Case, target, probe: Callable[[], str], st: PortStats) -> list[str]:
    """Send a case; returns problems seen while it ran (a probe that failed during a flood or a
    slow sender)."""
    problems = []
    conns: list[_Conn] = []
    try:
        for plan in case.plans:
            try:
                conns.append(_Conn(target))
            except OSError as e:
                if case.mode != "flood":
                    problems.append(f"cannot connect to {target}: {e}")
                st.refusals += 1
                continue
            st.connections += 1
            conn = conns[-1]
            if case.mode == "flood":
                conn.send(b"".join(plan.chunks), timeout=0.5)
                continue
            ok, waiting = True, True
            for i, ch in enumerate(plan.chunks):
                if case.mode == "slow":
                    rng = random.Random(case.cid)
                    for b in ch[:40]:  # a few seconds at most: one byte at a time
                        if not conn.send(bytes([b]), 1.0):
                            ok = False
                            break
                        time.sleep(rng.uniform(0.02, 0.1))
                    if ok and not conn.send(ch[40:]):
                        ok = False
                elif not conn.send(ch):
                    ok = False
                if not ok:
                    if not conn.eof:
                        st.stalled += 1
                    break
                if i in plan.waits and waiting:
                    before = len(conn.recv)
                    conn.drain(0.2)
                    waiting = len(conn.recv) > before  # silence: the conversation is off script, stop waiting
                else:
                    conn.drain(0)
            if case.mode == "slow":
                err = probe()
                if err:
                    problems.append(f"while a slow client was connected: {err}")
            if case.mode == "halfclose":
                try:
                    conn.s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                conn.drain(2.0)
            else:
                conn.drain(0.15)
        if case.mode == "flood":
            err = probe()
            if err:
                problems.append(f"with {len(conns)} connections open: {err}")
            for c in conns:
                c.drain(0)
    finally:
        for k, c in enumerate(conns):
            st.bytes_sent += c.sent
            st.bytes_received += len(c.recv)
            st.closed_by_peer += c.eof
            st.refusals += _refusals(case.port, bytes(c.recv))
            c.close(reset=bool(k % 2))
    st.cases += 1
    return problems


# -- the lab, its baseline and the oracle ------------------------------------------------------
def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _differences(a: str, b: str, limit: int = 6) -> list[str]:
    """The first ranges (4 KiB granules) where two replicas differ, as 'offset+length'."""
    out: list[str] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off, start = 0, None
        while len(out) < limit:
            x, y = fa.read(4096), fb.read(4096)
            if not x and not y:
                break
            if x != y and start is None:
                start = off
            elif x == y and start is not None:
                out.append(f"{start:#x}+{off - start:#x}")
                start = None
            off += 4096
        if start is not None and len(out) < limit:
            out.append(f"{start:#x}+{off - start:#x}")
    return out


def _groups(sock: str) -> dict[str, tuple]:
    return {g["name"]: (g["role"], g["epoch"], g["status"]) for g in call(sock, "showrcopy", timeout=10)["groups"]}


NBDSH_CHECK = """
import os
a = nbd.NBD(); a.connect_uri(URI_W)
b = nbd.NBD(); b.connect_uri(URI_R)
data = os.urandom(65536)
a.pwrite(data, OFF, nbd.CMD_FLAG_FUA if a.can_fua() else 0)
got = b.pread(65536, OFF)
assert got == data, "a write at one node does not read back at the other"
for uri in URIS_RO:
    c = nbd.NBD(); c.connect_uri(uri); c.pread(4096, 0); c.shutdown()
a.shutdown(); b.shutdown()
"""


@dataclass
class FuzzResult:
    seed: int
    seconds: float
    ports: tuple[str, ...]
    stats: dict[str, PortStats] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    oracles: int = 0
    recorded: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the run itself could not do something
    elapsed: float = 0.0
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings and not self.problems


class Lab:
    """What the fuzzer needs of a running lab, and the oracle over it."""

    def __init__(self, lab: dict, fuzz_volume: str):
        self.lab = lab
        self.d = Path(lab["dir"])
        self.vol = fuzz_volume
        self.nodes = lab["nodes"]
        self.socks = {n: v["admin_socket"] for n, v in self.nodes.items()}
        self.log_pos: dict[str, int] = {}
        self.baseline: dict = {}
        cfgs = {n: tomllib.loads(Path(v["config"]).read_text()) for n, v in self.nodes.items()}
        listener = max(cfgs)  # the node whose name sorts lower dials; the other listens
        self.link_addrs = [_hostport(p["local"]) for p in cfgs[listener]["link"]["paths"]]
        self.listener = listener
        limits = [v for k, v in cfgs[listener].get("nbd", {}).items()
                  if "connections" in k and isinstance(v, int) and v > 0]
        self.flood = max(4, min([FLOOD_DEFAULT] + [v // 2 for v in limits]))
        self.npaths = len(self.link_addrs)

    def processes(self) -> dict[str, int]:
        lab = json.loads((self.d / "lab.json").read_text())
        out = {f"node {n}": v["pid"] for n, v in lab["nodes"].items()}
        if lab.get("witness"):
            out["witness"] = lab["witness"]["pid"]
        if lab.get("link"):
            out["link relay"] = lab["link"]["pid"]
        return out

    def logs(self) -> list[Path]:
        return sorted(self.d.glob("*.log"))

    def targets(self, port: str) -> list:
        if port == "nbd":
            return [(_hostport(v["nbd"]), FUZZ_SOURCE) for v in self.nodes.values()]
        if port == "link":
            return [(a, None) for a in self.link_addrs]
        if port == "witness":
            return [(("127.0.0.1", self.lab["witness"]["port"]), None)]
        return list(self.socks.values())

    def setup_fuzz_host(self) -> None:
        """Host ``fuzzer`` (127.0.0.2) sees the fuzz volume only, on both arrays."""
        for sock in self.socks.values():
            hosts = {h["name"] for h in call(sock, "showhost")["hosts"]}
            if FUZZ_HOST not in hosts:
                call(sock, "createhost", {"name": FUZZ_HOST, "addresses": [FUZZ_SOURCE]})
                call(sock, "createvlun", {"volume": self.vol, "host": FUZZ_HOST, "lun": 0})
                call(sock, "admitrcopyhost", {"host": FUZZ_HOST, "group": self.lab["group"], "proximity": "all"})

    def skip_logs(self) -> None:
        for f in self.logs():
            self.log_pos[str(f)] = f.stat().st_size

    def new_log_problems(self) -> list[str]:
        out = []
        for f in self.logs():
            pos = self.log_pos.get(str(f), 0)
            with open(f, "rb") as fh:
                fh.seek(pos)
                text = fh.read().decode(errors="replace")
            self.log_pos[str(f)] = pos + len(text.encode(errors="replace"))
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if BAD_LOG.search(line):
                    ctx = "\n".join(lines[i:i + 12]) if "Traceback" in line else line
                    out.append(f"{f.name}: {ctx[:2000]}")
        return out

    def show(self, node: str) -> dict:
        return call(self.socks[node], "showrcopy", timeout=10)

    def take_baseline(self) -> None:
        self.baseline = {
            "groups": {n: _groups(s) for n, s in self.socks.items()},
            "digests": {n: {v: _digest(i["path"]) for v, i in self.nodes[n]["volumes"].items() if v != self.vol}
                        for n in self.nodes},
            "rss": {n: _rss_kib(v["pid"]) or 0 for n, v in self.nodes.items()},
        }
        self.rss_max = dict(self.baseline["rss"])

    def quick(self) -> list[tuple[str, str]]:
        """After every case: processes alive, logs clean, memory bounded."""
        out = []
        for what, pid in self.processes().items():
            if not pid_alive(pid):
                out.append(("crash", f"{what} (pid {pid}) is gone"))
        for p in self.new_log_problems():
            out.append(("log", p))
        for n, v in self.nodes.items():
            rss = _rss_kib(v["pid"]) or 0
            self.rss_max[n] = max(self.rss_max[n], rss)
            if rss > self.baseline["rss"][n] + RSS_BOUND_MIB * 1024:
                out.append(("memory", f"node {n} RSS {rss // 1024} MiB (baseline "
                                      f"{self.baseline['rss'][n] // 1024} MiB, bound +{RSS_BOUND_MIB} MiB)"))
        return out

    def oracle(self) -> list[tuple[str, str]]:
        """Every daemon serves; nothing the fuzzer could not write changed."""
        out = self.quick()
        if any(k == "crash" for k, _ in out):
            return out
        for n in self.socks:
            try:
                g = _groups(self.socks[n])
            except CtlError as e:
                out.append(("stuck", f"syncctl showrcopy at {n}: {e}"))
                continue
            if g != self.baseline["groups"][n]:
                out.append(("state", f"node {n} groups (role, epoch, status) {g}, before {self.baseline['groups'][n]}"))
        problems = self._wait_served()
        out += [("service", p) for p in problems]
        err = self._nbd_check()
        if err:
            out.append(("service", err))
        for n in self.nodes:
            for v, i in self.nodes[n]["volumes"].items():
                if v != self.vol and _digest(i["path"]) != self.baseline["digests"][n][v]:
                    out.append(("replica", f"volume {v} at node {n} changed (the fuzzer cannot write it)"))
        diff = self._fuzz_volume_differs()
        if diff:
            out.append(("replica", diff))
        return out

    def _wait_served(self, timeout: float = 20.0) -> list[str]:
        """Link paths all up at both nodes and the witness reachable from both (they may be
        reconnecting after a case): the last state seen if not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            problems = []
            for n in self.socks:
                try:
                    r = self.show(n)
                except CtlError as e:
                    problems.append(f"syncctl at {n}: {e}")
                    continue
                if r["link"]["paths_up"] != self.npaths:
                    problems.append(f"node {n}: {r['link']['paths_up']}/{self.npaths} link paths up "
                                    f"({[p['last_error'] for p in r['link']['paths']]})")
                if self.lab.get("witness") and not (r.get("witness") or {}).get("reachable"):
                    problems.append(f"node {n}: the witness does not answer ({(r.get('witness') or {})})")
                for g in r["groups"]:
                    if not g["serving"]:
                        problems.append(f"node {n}: group {g['name']} does not serve ({g.get('peer_mode')})")
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.2)

    def _nbd_check(self) -> str:
        """A real NBD client (libnbd) writes at each node and reads it back at the other, and
        reads every other volume at both."""
        rng = random.Random()
        names = list(self.nodes)
        for w, r in ((names[0], names[1]), (names[1], names[0])):
            script = (f"URI_W = {self.nodes[w]['volumes'][self.vol]['uri']!r}\n"
                      f"URI_R = {self.nodes[r]['volumes'][self.vol]['uri']!r}\n"
                      f"OFF = {rng.randrange(0, 64) * 65536}\n"
                      f"URIS_RO = {[i['uri'] for n in names for v, i in self.nodes[n]['volumes'].items()]!r}\n"
                      + NBDSH_CHECK)
            err = _run_client(["nbdsh", "-c", script], timeout=60)
            if err:
                return f"a real NBD client writing at {w} and reading at {r}: {err}"
        return ""

    def _fuzz_volume_differs(self, timeout: float = 30.0) -> str:
        """The fuzz volume's replicas are identical once the group is in sync."""
        from .rig import lab_in_sync

        deadline = time.monotonic() + timeout
        a, b = (self.nodes[n]["volumes"][self.vol]["path"] for n in self.nodes)
        while True:
            try:
                synced = lab_in_sync(self.lab)
            except CtlError:
                synced = False
            if synced and _digest(a) == _digest(b):
                return ""
            if time.monotonic() > deadline:
                return (f"replicas of {self.vol} differ at {', '.join(_differences(a, b))} ({a} vs {b}) "
                        f"while the group says it is in sync" if synced else
                        f"group {self.lab['group']} not in sync within {timeout:.0f}s after the fuzz cases")
            time.sleep(0.3)

    def probe(self, port: str, target) -> Callable[[], str]:
        """A legitimate client's quick look at the daemon under fuzz (during floods and slow senders)."""
        def nbd() -> str:
            addr = target[0]
            try:
                with socket.create_connection(addr, timeout=5) as s:  # from the lab host, not the fuzzer
                    got = b""
                    while len(got) < 16:
                        d = s.recv(16 - len(got))
                        if not d:
                            break
                        got += d
                if not got.startswith(b"NBDMAGIC"):
                    return f"a new NBD client at {addr[0]}:{addr[1]} got {got!r} instead of the greeting"
            except OSError as e:
                return f"a new NBD client at {addr[0]}:{addr[1]}: {e}"
            return ""

        def admin() -> str:
            try:
                call(target, "showrcopy", timeout=10)
            except CtlError as e:
                return f"syncctl: {e}"
            return ""

        return {"nbd": nbd, "admin": admin}.get(port, lambda: "")


def _hostport(s: str) -> tuple[str, int]:
    h, _, p = s.rpartition(":")
    return h.strip("[]"), int(p)


def record_all(lab: Lab, ports: tuple[str, ...], problems: list[str]) -> dict[str, list[Session]]:
    """Record every port's sessions against the running daemons (they match the protocol of now)."""
    out: dict[str, list[Session]] = {}
    first = next(iter(lab.nodes))
    if "nbd" in ports:
        out["nbd"] = record_nbd(_hostport(lab.nodes[first]["nbd"]), lab.vol, problems)
    if "admin" in ports:
        out["admin"] = record_admin(lab.socks[first], lab.d, problems)
    dialer = min(lab.nodes)
    if "link" in ports:
        if not lab.lab.get("link"):
            raise FuzzError("the link port needs a lab with the link relay (not --no-relay)")

        def writes() -> None:  # data frames on the link too
            _run_client(["nbdsh", "-u", lab.nodes[dialer]["volumes"][lab.vol]["uri"], "-c",
                         "for i in range(16): h.pwrite(bytes([i]) * 4096, i * 65536)"])

        out["link"] = []
        for i in range(lab.npaths):
            def up(i=i) -> bool:
                return lab.show(dialer)["link"]["paths"][i]["state"] == "up"
            out["link"] += record_via_relay(lab.lab, i, f"node {dialer} link path {i}", "link", up, problems,
                                            during=writes, target=i)
            lab._wait_served()
    if "witness" in ports:
        if not lab.lab.get("witness"):
            raise FuzzError("the witness port needs a lab with a witness")
        out["witness"] = []
        for n, idxs in (lab.lab["link"].get("witness_relays") or {}).items():
            def reach(n=n) -> bool:
                return bool(lab.show(n)["witness"]["reachable"])
            out["witness"] += record_via_relay(lab.lab, idxs[0], f"node {n} to the witness", "witness", reach,
                                               problems)
        lab._wait_served()
    for p in ports:
        if not out.get(p):
            problems.append(f"nothing recorded on the {p} port: it cannot be fuzzed")
    return out


def fuzz_lab(lab_info: dict, seconds: float, seed: int, ports: tuple[str, ...] = PORTS, case: str | None = None,
             oracle_every: float = 20.0, recordings: str | None = None,
             progress: Callable[[str], None] = lambda s: None) -> FuzzResult:
    """Fuzz a running lab (with a witness and the link relay) for ``seconds``; its last volume
    is the fuzz volume. ``case`` ("nbd:17") runs that case alone."""
    t0 = time.monotonic()
    if case:
        cport = case.split(":")[0]
        if cport not in PORTS or not case.split(":")[-1].isdigit():
            raise FuzzError(f"--case {case!r}: expected PORT:INDEX, PORT one of {', '.join(PORTS)}")
        ports = (cport,)
    for p in ports:
        if p not in PORTS:
            raise FuzzError(f"unknown port {p!r} (ports: {', '.join(PORTS)})")
    vol = list(lab_info["nodes"]["A"]["volumes"])[-1]
    lab = Lab(lab_info, vol)
    res = FuzzResult(seed, seconds, ports, {p: PortStats() for p in ports})
    lab.setup_fuzz_host()
    if recordings and os.path.exists(recordings):
        raw = json.loads(Path(recordings).read_text())
        sessions = {p: [Session.from_json(s) for s in raw.get(p, [])] for p in ports}
    else:
        progress("recording real sessions: " + ", ".join(ports))
        sessions = record_all(lab, ports, res.problems)
        if recordings:
            Path(recordings).write_text(json.dumps({p: [s.to_json() for s in v] for p, v in sessions.items()}))
    res.recorded = {p: [f"{s.name} ({sum(map(len, s.chunks))} bytes in {len(s.chunks)} chunks)"
                        for s in sessions.get(p, [])] for p in ports}
    ports = tuple(p for p in ports if sessions.get(p))
    # Recording dropped link and witness connections: wait until all is back, then the baseline.
    lab._wait_served()
    lab._fuzz_volume_differs()
    lab.take_baseline()
    lab.skip_logs()
    first = lab.oracle()
    if first:
        res.problems += [f"before fuzzing: [{k}] {d}" for k, d in first]
        res.elapsed = time.monotonic() - t0
        return res
    res.oracles += 1
    logf = open(lab.d / "fuzz-cases.jsonl", "a")
    res.log = str(lab.d / "fuzz-cases.jsonl")
    pending: deque[Case] = deque(maxlen=50)  # the cases since the last oracle (the last 50 of them)
    counters = dict.fromkeys(ports, 0)
    if case:
        counters[ports[0]] = int(case.split(":")[1])
    start = time.monotonic()
    last_oracle = start

    def report(kind: str, detail: str, cases: list[Case]) -> None:
        where = cases[-1].cid if len(cases) == 1 else f"cases {cases[0].cid} .. {cases[-1].cid}" if cases else "-"
        res.findings.append(Finding(kind, where, detail))
        progress(f"FINDING [{kind}] after {where}: {detail}")
        with open(lab.d / "fuzz-findings.jsonl", "a") as f:
            f.write(json.dumps({"seed": seed, "kind": kind, "after": where, "detail": detail,
                                "cases": [c.dump() for c in cases]}) + "\n")

    k = 0
    try:
        while True:
            port = ports[k % len(ports)]
            k += 1
            idx = counters[port]
            counters[port] += 1
            targets = lab.targets(port)
            c = make_case(seed, port, idx, sessions[port], len(targets), lab.flood)
            pending.append(c)
            st = res.stats[port]
            sent0, refused0, t1 = st.bytes_sent, st.refusals, time.monotonic()
            try:
                probs = run_case(c, targets[c.target], lab.probe(port, targets[c.target]), st)
            except OSError as e:
                probs = [f"{type(e).__name__}: {e}"]
            logf.write(json.dumps({"seed": seed, "case": c.cid, "mode": c.mode, "target": c.target,
                                   "desc": c.desc, "connections": len(c.plans), "sent": st.bytes_sent - sent0,
                                   "refusals": st.refusals - refused0,
                                   "seconds": round(time.monotonic() - t1, 2)}) + "\n")
            logf.flush()
            for p in probs:
                report("stuck", p, [c])
            for kind, d in lab.quick():
                report(kind, d, [c])
            if any(f.kind == "crash" for f in res.findings):
                break
            now = time.monotonic()
            if case or now - start >= seconds or now - last_oracle >= oracle_every:
                progress(f"{now - start:5.0f}s: {sum(s.cases for s in res.stats.values())} cases; oracle")
                for kind, d in lab.oracle():
                    report(kind, d, list(pending))
                res.oracles += 1
                last_oracle = time.monotonic()
                pending.clear()
                if case or time.monotonic() - start >= seconds or any(f.kind == "crash" for f in res.findings):
                    break
    finally:
        logf.close()
    res.elapsed = time.monotonic() - t0
    return res


def run_fuzz(d: str, seconds: float, seed: int, ports: tuple[str, ...] = PORTS, case: str | None = None,
             keep: bool = False, progress: Callable[[str], None] = lambda s: None,
             oracle_every: float = 20.0, recordings: str | None = None) -> FuzzResult:
    """Start a lab (two nodes, witness, link relay, three volumes: the last one the fuzzer's),
    fuzz it, and take it down again (unless ``keep``)."""
    import shutil

    from .rig import lab_down, lab_up, load_lab

    root = Path(d)
    if (root / "lab.json").exists():  # an earlier fuzz lab: start afresh (a running one is refused)
        if not any(pid_alive(n["pid"]) for n in load_lab(d)["nodes"].values()):
            for sub in ("A", "B", "W"):
                shutil.rmtree(root / sub, ignore_errors=True)
            for f in [*root.glob("*.log"), *root.glob("fuzz-*.jsonl"), root / "lab.json"]:
                f.unlink()
    progress(f"starting a lab in {d}")
    lab = lab_up(d, size="16MiB", nvolumes=3, npaths=2, witness={}, timeout=120)
    try:
        return fuzz_lab(lab, seconds, seed, ports, case, oracle_every, recordings, progress)
    finally:
        if not keep:
            lab_down(d)


def print_fuzz(res: FuzzResult, out=sys.stdout) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(file=out, width=None if out.isatty() else 160)
    for p, names in res.recorded.items():
        c.print(f"recorded on {p}: " + "; ".join(names))
    t = Table(title=f"syncd lab fuzz: seed {res.seed}, {res.elapsed:.0f} s, {res.oracles} oracle checks")
    for col in ("port", "cases", "connections", "bytes sent", "bytes received", "closed by peer", "refusals",
                "stalled"):
        t.add_column(col, justify="right")
    for p, s in res.stats.items():
        t.add_row(p, str(s.cases), str(s.connections), str(s.bytes_sent), str(s.bytes_received),
                  str(s.closed_by_peer), str(s.refusals), str(s.stalled))
    c.print(t)
    for pr in res.problems:
        c.print(f"[red]problem:[/red] {pr}")
    if res.findings:
        c.print(f"[red]{len(res.findings)} findings[/red] (re-run one: syncd lab fuzz --seed {res.seed} "
                f"--case PORT:INDEX; the cases' bytes are in fuzz-findings.jsonl):")
        for f in res.findings:
            c.print(f"  {f.line()}")
    else:
        c.print("no findings")
    if res.log:
        c.print(f"cases: {res.log}")
