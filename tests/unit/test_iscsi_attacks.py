"""The iSCSI target under a hostile initiator: garbage and mutated PDUs before and after login,
oversized fields, replays, and a client that sends commands but never reads the answers. Every
refusal ends the connection or rejects the PDU; nothing raises out of the protocol layer and
nothing grows without bound."""

from __future__ import annotations

import os
import socket
import struct

import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.iscsi import conn as c
from syncd.iscsi import pdu as p
from syncd.iscsi import scsi, server
from syncd.iscsi import text as t
from syncd.iscsi.login import Portal, Target
from syncd.iscsi.text import ChapSecret

TNAME = "iqn.2026-12.org.syncd:vol1"
INAME = "iqn.2026-12.org.syncd:host1"
EVENTS = (c.Send, c.Close, c.Command, c.WriteData, c.TaskManagement, c.LoggedIn, c.Ping)


def wire(header, data=b""):
    return b"".join(bytes(b) for b in p.frame(header, data))


def login_pdu(pairs, flags=p.TRANSIT | (1 << 2) | 3, cmdsn=1):
    data = t.encode(pairs)
    return wire(p.LOGIN_REQUEST.build({"op": 0x43, "flags": flags, "version_max": 0, "version_min": 0,
                                       "ahs_words": 0, "dsl": len(data), "isid": bytes(6), "tsih": 0, "itt": 1,
                                       "cid": 0, "cmdsn": cmdsn, "expstatsn": 0}), data)


def connection(chap=None):
    portal = Portal({TNAME: Target(TNAME, chap=chap)}, 1, lambda i, n: True, discovery_chap=chap)
    return c.Connection(portal, tsih=1, addresses=lambda n: [c.Address("10.0.0.1", 3260, 1)])


def logged_in():
    conn = connection()
    ev = conn.receive_data(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)]))
    assert isinstance(ev[-1], c.LoggedIn)
    return conn


def feed(conn, data):
    out = conn.receive_data(data)
    assert all(isinstance(e, EVENTS) for e in out)
    return out


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_garbage_before_login_never_escapes(data):
    feed(connection(), data)


@settings(max_examples=300)
@given(st.data())
def test_mutated_logins_never_escape_and_never_log_in_to_a_chap_target(data):
    good = bytearray(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME), ("AuthMethod", "CHAP,None")]))
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    conn = connection(chap={"host1": ChapSecret("host1", b"host1-secret-123")})
    out = feed(conn, bytes(good))
    assert not any(isinstance(e, c.LoggedIn) for e in out)  # no CHAP response was ever sent


OPS = [p.Op.NOP_OUT, p.Op.SCSI_COMMAND, p.Op.TASK_MGMT_REQUEST, p.Op.LOGIN_REQUEST, p.Op.TEXT_REQUEST,
       p.Op.DATA_OUT, p.Op.LOGOUT_REQUEST, p.Op.SNACK_REQUEST, p.Op.SCSI_RESPONSE, 0x1C]


@settings(max_examples=400)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 255), st.binary(min_size=40, max_size=40),
                          st.binary(max_size=300), st.booleans()), min_size=1, max_size=6))
def test_random_pdus_after_login_never_escape(pdus):
    conn = logged_in()
    for op, flags, rest, data, imm in pdus:
        bhs = bytes([op | (p.IMMEDIATE if imm else 0), flags, rest[0], rest[1], 0]) + len(data).to_bytes(3, "big") \
            + rest[2:42]
        feed(conn, wire(bhs[:48], data))
        if conn.closed:
            break


def test_a_declared_segment_beyond_what_the_target_took_ends_the_connection_unread():
    conn = logged_in()
    assert conn.reader.max_data == t.TargetLimits().max_recv
    header = p.H_SCSI_COMMAND.pack(p.Op.SCSI_COMMAND, p.F_BIT | p.CMD_WRITE, (16 << 20) - 1, 0, 5, 16 << 20, 1, 0,
                                   bytes(16))
    [ev] = conn.receive_data(header)  # only the header: nothing of the segment is held
    assert isinstance(ev, c.Close) and "exceeds MaxRecvDataSegmentLength" in ev.reason
    assert conn.reader.buffered() < 100


def test_a_second_login_on_a_logged_in_connection_ends_it():
    conn = logged_in()
    ev = conn.receive_data(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)]))
    assert isinstance(ev[-1], c.Close) and conn.closed


def test_text_that_never_ends_is_bounded():
    conn = logged_in()
    chunk = b"X=" + b"y" * 8000
    out = []
    for i in range(20):
        hdr = p.TEXT_REQUEST.build({"op": p.Op.TEXT_REQUEST, "flags": p.CONTINUE, "ahs_words": 0, "dsl": len(chunk),
                                    "lun": 0, "itt": 9, "ttt": p.RESERVED_TAG, "cmdsn": 1 + i, "expstatsn": 0})
        out += conn.receive_data(wire(hdr, chunk))
        if conn.closed:
            break
    assert isinstance(out[-1], c.Close) and "64 KiB" in out[-1].reason


def test_the_login_text_is_bounded_too():
    conn = connection()
    out = []
    for _ in range(20):  # login text continued with the C bit, never finished
        out += conn.receive_data(wire(p.LOGIN_REQUEST.build({
            "op": 0x43, "flags": p.CONTINUE, "version_max": 0, "version_min": 0, "ahs_words": 0, "dsl": 8000,
            "isid": bytes(6), "tsih": 0, "itt": 1, "cid": 0, "cmdsn": 1, "expstatsn": 0}), b"A" * 8000))
        if conn.closed:
            break
    assert conn.closed and isinstance(out[-1], c.Close) and "64 KiB" in out[-1].reason


class _Catalog:
    def __init__(self, lu):
        self.lu = lu

    def luns_for(self, initiator, address, target):
        return {0: self.lu}


async def test_a_client_that_never_reads_its_answers_cannot_make_the_target_hold_them(tmp_path):
    """READ commands of 1 MiB, sent without ever reading a response: the target stops reading
    the client once OUT_LIMIT of answers wait, so what it holds stays bounded."""
    from syncd.nbd.export import FileExport

    path = tmp_path / "disk.img"
    path.touch()
    os.truncate(path, 64 << 20)
    ex = FileExport("v", str(path))
    groups = [scsi.PortGroup(1, scsi.Alua.ACTIVE_OPTIMIZED, 1)]
    lu = server.Lu(scsi.Unit(scsi.LuFacts(ex.size, "naa.60002ac0123456789abcdef012345678"), lambda: groups,
                             lambda: [0]), ex)
    target = server.Target(Portal({TNAME: Target(TNAME)}, 1, lambda i, n: True), _Catalog(lu), lambda n: [])
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    async with trio.open_nursery() as n:
        n.start_soon(target.handle, ours)
        theirs.sendall(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)]))
        await trio.sleep(0.2)
        theirs.setblocking(False)
        sent = 0
        for i in range(400):  # 400 MiB of reads asked for
            cdb = struct.pack(">BBIBHB", 0x28, 0, (i % 60) * 2048, 0, 2048, 0).ljust(16, b"\0")
            cmd = p.H_SCSI_COMMAND.pack(p.Op.SCSI_COMMAND, p.F_BIT | p.CMD_READ | 1, 0, 0, 100 + i, 1 << 20,
                                        1 + i, 1, cdb)
            try:
                theirs.send(cmd)
                sent += 1
            except BlockingIOError:
                break
            await trio.lowlevel.checkpoint()
        await trio.sleep(0.5)
        [runner] = target.runners
        held = runner.queued + (server.DATA_BUDGET - runner.budget.free)
        print(f"commands sent {sent}, taken {runner.conn.expcmdsn - 1}, answers queued {runner.queued >> 20} MiB")
        assert held <= server.OUT_LIMIT + server.DATA_BUDGET + (2 << 20), held
        assert runner.conn.expcmdsn - 1 < sent  # it stopped taking commands
        n.cancel_scope.cancel()
    theirs.close()
    os.unlink(path)


async def test_a_connection_reset_mid_session_ends_that_connection_only(tmp_path):
    """An initiator that logs in and then resets the connection (RST), or sends a PDU that
    trips a defect, ends its own connection; the target (inside a node: the node) goes on."""
    from syncd.nbd.export import FileExport

    path = tmp_path / "disk.img"
    path.touch()
    os.truncate(path, 1 << 20)
    ex = FileExport("v", str(path))
    groups = [scsi.PortGroup(1, scsi.Alua.ACTIVE_OPTIMIZED, 1)]
    lu = server.Lu(scsi.Unit(scsi.LuFacts(ex.size, "naa.60002ac0123456789abcdef012345678"), lambda: groups,
                             lambda: [0]), ex)
    target = server.Target(Portal({TNAME: Target(TNAME)}, 1, lambda i, n: True), _Catalog(lu), lambda n: [])
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)
    port = lsock.getsockname()[1]
    async with trio.open_nursery() as n:
        await n.start(target.serve, [lsock])
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)]))
            await trio.sleep(0.1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
            await trio.sleep(0.1)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)]))
        s.settimeout(5)
        got = await trio.to_thread.run_sync(s.recv, 48)
        assert got[0] == p.Op.LOGIN_RESPONSE and got[36] == 0  # still serving, login accepted
        s.close()
        n.cancel_scope.cancel()
