"""A client that sends a whole FUA write and then breaks the protocol (the next request header
has a bad magic) gets its connection closed, and the server cancels its requests; the write it
sent in full must then be on both replicas or on neither, never on the peer only while the group
says it is in sync. The live fuzzer found that (seed 2, case nbd:293) at the primary."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time

import pytest

from syncd.lab.rig import lab_in_sync

pytestmark = pytest.mark.system

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
OPT_GO, REP_ACK = 7, 1
CMD_WRITE, FLAG_FUA = 1, 1


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += got
    return buf


def _go(addr: tuple[str, int], name: str) -> socket.socket:
    """Fixed newstyle handshake up to transmission on export ``name`` (simple replies)."""
    s = socket.create_connection(addr, timeout=10)
    _recv_exactly(s, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    nb = name.encode()
    data = struct.pack(">I", len(nb)) + nb + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        magic, _, rtype, ln = struct.unpack(">QIII", _recv_exactly(s, 20))
        assert magic == OPT_REPLY_MAGIC
        _recv_exactly(s, ln)
        if rtype == REP_ACK:
            return s
        assert rtype < 0x80000000, f"NBD_OPT_GO refused ({rtype:#x})"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _uri_parts(uri: str) -> tuple[tuple[str, int], str]:
    hp, _, name = uri[len("nbd://"):].partition("/")
    h, _, p = hp.rpartition(":")
    return (h, int(p)), name


def test_a_fua_write_then_a_bad_header_reaches_both_replicas_or_neither(lab):
    vol = lab["nodes"]["A"]["volumes"]["vv1"]
    addr, name = _uri_parts(vol["uri"])
    paths = [lab["nodes"][n]["volumes"]["vv1"]["path"] for n in ("A", "B")]
    off, payload = 1 << 20, os.urandom(8192)
    s = _go(addr, name)  # at A, the primary
    try:
        head = struct.pack(">IHHQQI", REQUEST_MAGIC, FLAG_FUA, CMD_WRITE, 1, off, len(payload))
        # One send: the bad header is in the server's buffer as soon as the payload is read, so
        # the connection ends (and its requests are cancelled) before the write's task first runs.
        s.sendall(head + payload + b"\x5a" * 28)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    finally:
        s.close()
    log = open(os.path.join(lab["dir"], "A.log")).read()
    assert "bad request magic" in log  # the server saw the broken request and closed

    # Until the group is in sync and the replicas agree, or a bound that a correct pair never
    # needs: the verdict is on the bytes, not on how long it took.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if lab_in_sync(lab) and _digest(paths[0]) == _digest(paths[1]):
            break
        time.sleep(0.2)
    assert lab_in_sync(lab)
    held = []
    for p in paths:
        with open(p, "rb") as f:
            f.seek(off)
            held.append(f.read(len(payload)))
    assert held[0] == held[1], "the replicas differ at the write while the group says it is in sync"
    assert held[0] == payload  # a write read in full is applied (both replicas), not dropped
    assert _digest(paths[0]) == _digest(paths[1])
