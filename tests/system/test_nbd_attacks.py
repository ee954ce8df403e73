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
