"""Issue 11, rows 5-7, against running nodes: each attack is refused or bounded, the node goes
on (role, epoch, metadata, replica bytes unchanged) and other clients are served meanwhile."""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import pytest

from syncd.config import NbdLimits
from syncd.lab.rig import lab_down, lab_up
from syncd.nbd import proto as p

from .rig import FAST_LINK, file_digest, show

pytestmark = pytest.mark.system
MiB = 1 << 20


def up(tmp_path, size="32MiB", **nbd):
    d = tmp_path / "lab"
    lab = lab_up(str(d), size=size, nvolumes=1, npaths=1, link_opts=FAST_LINK, nbd_tls=nbd or None, timeout=180)
    return lab


def addr(lab, site):
    h, _, port = lab["nodes"][site]["nbd"].rpartition(":")
    return h, int(port)


def snapshot(lab) -> dict:
    """What no attack may change: role and epoch of each node, its metadata, replica bytes."""
    out = {}
    for s in ("A", "B"):
        sh = show(lab, s)
        g = sh["groups"][0] if "groups" in sh else sh
        meta = json.loads(open(os.path.join(os.path.dirname(lab["nodes"][s]["config"]), "data", "state.json")).read())
        out[s] = {"role": g.get("role"), "epoch": g.get("epoch"), "meta": meta,
                  "vv1": file_digest(lab["nodes"][s]["volumes"]["vv1"]["path"])}
    return out


def vmrss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def handshake(s: socket.socket, name=b"vv1") -> None:
    """Fixed newstyle, structured replies, GO on ``name`` (blocking socket)."""
    buf = b""
    while len(buf) < 18:
        buf += s.recv(18 - len(buf))
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0))
    opt_reply(s)
    s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 4 + len(name) + 2) + struct.pack(">I", len(name)) + name
              + b"\0\0")
    while opt_reply(s) != p.REP_ACK:
        pass


def recvn(s, n) -> bytes:
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            raise EOFError
        b += d
    return b


def opt_reply(s) -> int:
    _, _, t, ln = struct.unpack(">QIII", recvn(s, 20))
    recvn(s, ln)
    return t


def served(lab, site="B", source="127.0.0.1") -> None:
    """Another client (the lab's host: LUN masking knows it by 127.0.0.1) writes and reads back."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(addr(lab, site))
    handshake(s)
    data = os.urandom(4096)
    s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 8 * MiB, 4096) + data)
    assert struct.unpack(">IHHQI", recvn(s, 20))[2] == p.REPLY_TYPE_NONE
    s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 2, 8 * MiB, 4096))
    hdr = struct.unpack(">IHHQI", recvn(s, 20))
    assert hdr[2] == p.REPLY_TYPE_OFFSET_DATA and recvn(s, hdr[4])[8:] == data
    s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 3, 0, 0))
    s.close()


def attack_unchanged(lab, before, after_write=False):
    after = snapshot(lab)
    for s in ("A", "B"):
        assert (after[s]["role"], after[s]["epoch"]) == (before[s]["role"], before[s]["epoch"])
        if not after_write:
            assert after[s]["vv1"] == before[s]["vv1"]
    assert after["A"]["vv1"] == after["B"]["vv1"]


def test_row5_write_headers_without_payload_hold_no_memory(tmp_path):
    lab = up(tmp_path, payload_timeout=5.0)
    try:
        pid = lab["nodes"]["B"]["pid"]
        base = vmrss(pid)
        before = snapshot(lab)
        socks = []
        for _ in range(32):
            s = socket.socket()
            s.settimeout(30)
            s.connect(addr(lab, "B"))
            handshake(s)
            s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 32 * MiB))  # and no payload
            socks.append(s)
        served(lab)  # served while they wait
        peak = vmrss(pid)
        # Bound from the limits: payloads are held only as they arrive (none did), whatever was
        # announced; at most max_inflight + two requests ever, and here nothing like it.
        lim = NbdLimits()
        assert peak - base < lim.max_inflight + 2 * p.MAX_BLOCK
        assert peak - base < 64 * MiB, (base, peak)
        for s in socks:  # each is dropped at the payload deadline
            assert s.recv(1) == b""
            s.close()
        before["A"]["vv1"] = before["B"]["vv1"] = None
        after = snapshot(lab)
        for site in ("A", "B"):
            assert (after[site]["role"], after[site]["epoch"]) == (before[site]["role"], before[site]["epoch"])
            with open(lab["nodes"][site]["volumes"]["vv1"]["path"], "rb") as f:
                assert f.read(MiB) == bytes(MiB)  # the attackers' offset: nothing written
        assert after["A"]["vv1"] == after["B"]["vv1"]
    finally:
        lab_down(lab["dir"])


def test_row6_replies_never_read_do_not_pile_up(tmp_path):
    lab = up(tmp_path, size="64MiB", reply_timeout=600.0)
    try:
        pid = lab["nodes"]["B"]["pid"]
        base = vmrss(pid)
        before = snapshot(lab)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(addr(lab, "B"))
        s.settimeout(30)
        handshake(s)
        s.setblocking(False)
        reqs = b"".join(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, i, 0, 32 * MiB) for i in range(24))
        sent = 0
        deadline = time.monotonic() + 10
        while sent < len(reqs) and time.monotonic() < deadline:  # the server stops reading: fine
            try:
                sent += s.send(reqs[sent:])
            except BlockingIOError:
                time.sleep(0.05)
        served(lab)
        peak = vmrss(pid)
        lim = NbdLimits()
        # One connection holds at most its maximum plus one request; the server's bound is
        # max_inflight plus two requests: far from 24 x 32 MiB.
        assert peak - base < lim.max_inflight_per_connection + 2 * p.MAX_BLOCK + 32 * MiB, (base, peak)
        s.close()
        attack_unchanged(lab, before, after_write=True)
    finally:
        lab_down(lab["dir"])


def test_row7_block_status_of_length_zero_on_a_large_volume(tmp_path):
    lab = up(tmp_path, size=f"{(4 << 30) + 4096}")
    try:
        before = snapshot(lab)
        s = socket.socket()
        s.settimeout(30)
        s.connect(addr(lab, "A"))
        recvn(s, 18)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0))
        opt_reply(s)
        q = b"base:allocation"
        body = struct.pack(">I", 3) + b"vv1" + struct.pack(">II", 1, len(q)) + q
        s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_SET_META_CONTEXT, len(body)) + body)
        while opt_reply(s) != p.REP_ACK:
            pass
        s.sendall(struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 9) + struct.pack(">I", 3) + b"vv1\0\0")
        while opt_reply(s) != p.REP_ACK:
            pass
        for i, (off, ln) in enumerate([(0, 0), ((4 << 30) + 4096, 1), (2**64 - 1, 2), ((4 << 30), 8192)]):
            s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, i, off, ln))
            magic, fl, typ, ck, n = struct.unpack(">IHHQI", recvn(s, 20))
            body = recvn(s, n)
            assert (typ, ck) == (p.REPLY_TYPE_ERROR, i) and struct.unpack(">I", body[:4])[0] == p.NBD_EINVAL
        s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, 9, 4 << 30, 4096))
        magic, fl, typ, ck, n = struct.unpack(">IHHQI", recvn(s, 20))
        assert typ == p.REPLY_TYPE_BLOCK_STATUS and ck == 9  # the same connection goes on
        recvn(s, n)
        s.close()
        served(lab, "A")
        attack_unchanged(lab, before, after_write=True)
    finally:
        lab_down(lab["dir"])


# -- row 4: connections that never finish the handshake, then a link cut ------------------------

ATTACKERS = [f"127.0.0.{i}" for i in range(2, 12)]  # no known host; 105 connections each


def open_silent(target, n: int) -> tuple[list[socket.socket], int]:
    """``n`` connections that read the server's greeting and then say nothing: the held ones
    (the greeting came) and how many were refused (closed at once: EOF or reset, no greeting)."""
    held, refused = [], 0
    for i in range(n):
        s = socket.socket()
        s.bind((ATTACKERS[i % len(ATTACKERS)], 0))
        s.settimeout(60)  # only against a hang: a connection is either greeted or closed
        try:
            s.connect(target)  # (the reset of a refused one may come before connect returns)
            greeting = recvn(s, 8)
        except (EOFError, ConnectionResetError):
            refused += 1
            s.close()
            continue
        assert greeting == p.NBDMAGIC.to_bytes(8, "big")
        held.append(s)
    return held, refused


def open_client(lab, site):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.settimeout(30)
    s.connect(addr(lab, site))
    handshake(s)
    return s


def rw(s, offset, data, cookie=1) -> None:
    """A write and a read back on an open session (the lab's host), both answered OK."""
    s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, cookie, offset, len(data)) + data)
    hdr = struct.unpack(">IHHQI", recvn(s, 20))
    assert hdr[2] == p.REPLY_TYPE_NONE, hdr
    s.sendall(p.REQ.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, cookie + 1, offset, len(data)))
    hdr = struct.unpack(">IHHQI", recvn(s, 20))
    assert hdr[2] == p.REPLY_TYPE_OFFSET_DATA and recvn(s, hdr[4])[8:] == data


def meta(lab, site) -> dict:
    with open(os.path.join(os.path.dirname(lab["nodes"][site]["config"]), "data", "state.json")) as f:
        return json.load(f)["groups"][lab["group"]]


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_of(lab, site) -> dict:
    return show(lab, site)["groups"][0]


@pytest.mark.parametrize("variant", ["max_connections", "descriptors"])
def test_row4_silent_connections_then_a_link_cut(tmp_path, variant):
    """1,050 connections that never finish the handshake against node A (primary) with its
    descriptor limit lowered to 1024, then the replication link is cut: A refuses what it
    cannot hold, goes on serving the session it had, writes its metadata for the cut (the
    peer detached, the write recorded), never stops, and the replicas agree after the heal.

    ``max_connections``: the default limit (512) is below the descriptors: it refuses.
    ``descriptors``: max_connections (2000) above the lowered limit: accept runs out of
    descriptors, refuses with the one it keeps spare, and the metadata writes use the reserve."""
    import resource

    from syncd.lab.relay import proxy_command

    from .rig import assert_replicas_identical, wait_for

    nbd: dict = {"handshake_timeout": 600.0}  # they hold their connections as long as they like
    if variant == "descriptors":
        nbd.update(max_connections=2000, max_connections_per_address=2000)
    lab = up(tmp_path, **nbd)
    try:
        pid = lab["nodes"]["A"]["pid"]
        before = snapshot(lab)
        assert (before["A"]["role"], before["B"]["role"]) == ("primary", "secondary")
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
        host = open_client(lab, "A")  # the lab's host, connected before the attack
        held, refused = open_silent(addr(lab, "A"), 1050)
        if variant == "max_connections":
            # Exactly the limit is held (the host's session is one of them); every other one
            # was closed at once. A kept its descriptors.
            assert (len(held), refused) == (NbdLimits().max_connections - 1, 1050 - 511)
            assert nfds(pid) < 1024 - 64
        else:
            assert refused > 0 and len(held) + refused == 1050
            assert len(held) < 1024
        assert alive(pid)
        rw(host, 1 * MiB, os.urandom(4096))  # the host's session is served meanwhile
        gen = meta(lab, "A")["gen"]
        proxy_command(lab["link"]["control"], "cut", paths=[0])
        # A write at A with the peer gone: A detaches it and records the write in its metadata.
        rw(host, 2 * MiB, os.urandom(4096), cookie=3)
        wait_for(lambda: meta(lab, "A")["gen"] != gen, timeout=30, what="A writes its metadata for the cut")
        log = open(lab["nodes"]["A"]["log"]).read()
        assert "cannot write node metadata" not in log and "stops" not in log, log[-3000:]
        assert alive(pid)
        for s in held:
            s.close()
        wait_for(lambda: group_of(lab, "A")["peer_mode"] == "detached", what="A alone")
        a = group_of(lab, "A")
        assert (a["role"], a["epoch"], a["status"], a["serving"]) == ("primary", 1, "started", True)
        assert meta(lab, "A")["role"] == "primary" and meta(lab, "A")["epoch"] == 1
        wait_for(lambda: served(lab, "A") is None, what="a new client served once the attackers left")
        proxy_command(lab["link"]["control"], "heal", paths=[0])
        wait_for(lambda: group_of(lab, "A")["peer_mode"] == "attached"
                 and all(v["sync_status"] == "synced" for v in group_of(lab, "A")["volumes"]),
                 timeout=60, what="resync after the heal")
        host.close()
        after = snapshot(lab)
        for site in ("A", "B"):
            assert (after[site]["role"], after[site]["epoch"]) == (before[site]["role"], before[site]["epoch"])
        assert_replicas_identical(lab, "vv1")
        assert "Too many open files" not in open(lab["nodes"]["A"]["log"]).read().replace(
            "no file descriptor left for a connection (Too many open files)", "")
    finally:
        lab_down(lab["dir"])


def test_row4_max_connections_beyond_the_descriptor_limit_is_refused_at_start(tmp_path):
    """A node whose hard RLIMIT_NOFILE cannot hold nbd.max_connections does not start, and
    says which key and which limit (nothing is created in its data directory)."""
    import resource
    import subprocess
    import sys

    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\nname = "A"\ndata_dir = "{tmp_path / "data"}"\nadmin_socket = "{tmp_path / "admin.sock"}"\n'
        '[nbd]\nlisten = ["127.0.0.1:0"]\nmax_connections = 2000\nmax_connections_per_address = 2000\n'
        f'[[volume]]\nname = "vv1"\npath = "{tmp_path / "vv1.img"}"\nsize = 1048576\n')

    def low():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    r = subprocess.run([sys.executable, "-m", "syncd", "node", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, preexec_fn=low)
    assert r.returncode != 0
    assert "nbd.max_connections" in r.stderr and "1024" in r.stderr and "RLIMIT_NOFILE" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "admin.sock").exists()
    # The same config with the limit it fits in starts (and is stopped again).
    cfg.write_text(cfg.read_text().replace("max_connections = 2000", "max_connections = 512")
                   .replace("max_connections_per_address = 2000", "max_connections_per_address = 128"))
    p = subprocess.Popen([sys.executable, "-m", "syncd", "node", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, preexec_fn=low)
    try:
        from .rig import wait_for

        wait_for(lambda: (tmp_path / "admin.sock").exists() or p.poll() is not None, what="the node starts")
        assert p.poll() is None
    finally:
        p.terminate()
        p.wait(20)
