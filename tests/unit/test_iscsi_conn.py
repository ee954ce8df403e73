"""One iSCSI connection, sans-IO: numbering, NOP, text and SendTargets, logout, rejects."""

from __future__ import annotations

import pytest

from syncd.iscsi import conn as c
from syncd.iscsi import pdu as p
from syncd.iscsi import text as t
from syncd.iscsi.login import Portal, Target

TNAME = "iqn.2026-12.org.syncd:vol1"
INAME = "iqn.2026-12.org.syncd:host1"
ISID = bytes.fromhex("400001370000")


def wire(header, data=b"", hd=False, dd=False):
    return b"".join(bytes(b) for b in p.frame(header, data, header_digest=hd, data_digest=dd))


def login_pdu(pairs, cmdsn=10):
    data = t.encode(pairs)
    return wire(p.LOGIN_REQUEST.build({"op": 0x43, "flags": p.TRANSIT | (1 << 2) | 3, "version_max": 0,
                                       "version_min": 0, "ahs_words": 0, "dsl": len(data), "isid": ISID,
                                       "tsih": 0, "itt": 1, "cid": 0, "cmdsn": cmdsn, "expstatsn": 0}), data)


def text_pdu(pairs=None, itt=2, cmdsn=10, ttt=p.RESERVED_TAG, cont=False, data=None, hd=False):
    data = t.encode(pairs or []) if data is None else data
    return wire(p.TEXT_REQUEST.build({"op": p.Op.TEXT_REQUEST, "flags": (p.CONTINUE if cont else p.F_BIT),
                                      "ahs_words": 0, "dsl": len(data), "lun": 0, "itt": itt, "ttt": ttt,
                                      "cmdsn": cmdsn, "expstatsn": 0}), data, hd=hd)


def nop_out(itt=3, cmdsn=10, ttt=p.RESERVED_TAG, immediate=False, data=b""):
    return wire(p.NOP_OUT.build({"op": p.Op.NOP_OUT | (p.IMMEDIATE if immediate else 0), "flags": p.F_BIT,
                                 "ahs_words": 0, "dsl": len(data), "lun": 0, "itt": itt, "ttt": ttt,
                                 "cmdsn": cmdsn, "expstatsn": 0}), data)


def logout(reason=p.LOGOUT_CLOSE_SESSION, cmdsn=10, cid=0):
    return wire(p.LOGOUT_REQUEST.build({"op": p.Op.LOGOUT_REQUEST | p.IMMEDIATE, "flags": p.F_BIT | reason,
                                        "ahs_words": 0, "dsl": 0, "itt": 4, "cid": cid, "cmdsn": cmdsn,
                                        "expstatsn": 0}))


def scsi(cmdsn, itt=5, immediate=False):
    return wire(p.H_SCSI_COMMAND.pack(p.Op.SCSI_COMMAND | (p.IMMEDIATE if immediate else 0), p.F_BIT, 0, 0, itt,
                                      0, cmdsn, 0, bytes([0]) + bytes(15)))


def sent(events):
    """The target PDUs the events send: (declaration fields, data)."""
    out = []
    for ev in events:
        if isinstance(ev, c.Send):
            b = b"".join(bytes(x) for x in ev.buffers)
            r = p.PduReader(1 << 24)
            r.receive_data(b)
            raw = r.next_pdu()
            out.append((p.DECLARATIONS[p.Op(raw.opcode)].parse(raw.bhs), raw.data))
    return out


def connected(discovery=False, limits=None, allowed=lambda i, n: True):
    portal = Portal(targets={TNAME: Target(TNAME), "iqn.2026-12.org.syncd:vol2": Target("iqn.2026-12.org.syncd:vol2")},
                    portal_group_tag=1, authorize=allowed, **({"limits": limits} if limits else {}))
    conn = c.Connection(portal, tsih=7, addresses=lambda n: [c.Address("10.0.0.1", 3260, 1),
                                                             c.Address("fd00::1", 3260, 2)])
    keys = [("InitiatorName", INAME)] + ([("SessionType", "Discovery")] if discovery else [("TargetName", TNAME)])
    ev = conn.receive_data(login_pdu(keys + [("MaxRecvDataSegmentLength", "512")]))
    assert isinstance(ev[-1], c.LoggedIn), ev
    return conn


def test_serial_number_arithmetic_wraps():
    assert c.sn_lt(1, 2) and c.sn_lt(0xFFFFFFFF, 0) and not c.sn_lt(0, 0xFFFFFFFF)
    assert c.sn_in_window(0, 0xFFFFFFF0, 0x10) and not c.sn_in_window(0x11, 0xFFFFFFF0, 0x10)


def test_nop_out_ping_is_answered_with_its_data_and_advances_numbers():
    conn = connected()
    [(nop, data)] = sent(conn.receive_data(nop_out(data=b"ping")))
    assert nop.op == p.Op.NOP_IN and nop.itt == 3 and nop.ttt == p.RESERVED_TAG and data == b"ping"
    assert nop.statsn == 1 and nop.expcmdsn == 11 and nop.maxcmdsn == 11 + 63
    ev = conn.receive_data(nop_out(itt=p.RESERVED_TAG, ttt=42, immediate=True, cmdsn=11))
    assert ev == [c.Ping(42)]


def test_our_ping_carries_a_target_transfer_tag():
    conn = connected()
    [(nop, _)] = sent([conn.ping()])
    assert nop.itt == p.RESERVED_TAG and nop.ttt != p.RESERVED_TAG and nop.statsn == conn.statsn


def test_commands_outside_the_window_are_dropped_and_a_gap_ends_the_session():
    conn = connected()
    assert conn.receive_data(scsi(cmdsn=9)) == []  # already seen: dropped
    assert conn.receive_data(scsi(cmdsn=10 + 64)) == []  # beyond MaxCmdSN: dropped
    assert conn.expcmdsn == 10
    [ev] = conn.receive_data(scsi(cmdsn=10))
    assert isinstance(ev, c.Command) and conn.expcmdsn == 11
    [ev] = conn.receive_data(scsi(cmdsn=11, immediate=True))
    assert isinstance(ev, c.Command) and conn.expcmdsn == 11  # immediate: not advanced
    [ev] = conn.receive_data(scsi(cmdsn=13))
    assert isinstance(ev, c.Close) and "skips ahead" in ev.reason and conn.closed
    assert conn.receive_data(scsi(cmdsn=11)) == []


def test_send_targets_in_discovery_lists_what_this_initiator_may_see():
    conn = connected(discovery=True, allowed=lambda i, n: n == TNAME)
    [(rsp, data)] = sent(conn.receive_data(text_pdu([("SendTargets", "All")])))
    assert rsp.op == p.Op.TEXT_RESPONSE and rsp.flags == p.F_BIT and rsp.ttt == p.RESERVED_TAG
    assert t.parse(data) == [("TargetName", TNAME), ("TargetAddress", "10.0.0.1:3260,1"),
                             ("TargetAddress", "[fd00::1]:3260,2")]


def test_send_targets_in_a_normal_session_names_its_own_target():
    conn = connected()
    [(_, data)] = sent(conn.receive_data(text_pdu([("SendTargets", "")])))
    assert t.parse(data)[0] == ("TargetName", TNAME)
    [(_, data)] = sent(conn.receive_data(text_pdu([("SendTargets", "All")], itt=3, cmdsn=11)))
    assert data == b""  # All belongs to discovery sessions


def test_a_long_answer_is_split_by_the_initiators_segment_size_and_continued():
    names = {f"iqn.2026-12.org.syncd:volume-{i:03d}": Target(f"iqn.2026-12.org.syncd:volume-{i:03d}")
             for i in range(20)}
    portal = Portal(targets=names, portal_group_tag=1, authorize=lambda i, n: True)
    conn = c.Connection(portal, tsih=7, addresses=lambda n: [c.Address("10.0.0.1", 3260, 1)])
    conn.receive_data(login_pdu([("InitiatorName", INAME), ("SessionType", "Discovery"),
                                 ("MaxRecvDataSegmentLength", "512")]))
    [(rsp, data)] = sent(conn.receive_data(text_pdu([("SendTargets", "All")])))
    got = data
    cmdsn = 11
    while rsp.flags & p.CONTINUE:
        assert len(data) == 512 and rsp.ttt != p.RESERVED_TAG and not rsp.flags & p.F_BIT
        [(rsp, data)] = sent(conn.receive_data(text_pdu(ttt=rsp.ttt, cmdsn=cmdsn)))
        got += data
        cmdsn += 1
    assert rsp.flags & p.F_BIT and len(t.parse(got)) == 40
    [(rej, _)] = sent(conn.receive_data(text_pdu(ttt=0x1234, cmdsn=cmdsn)))  # a TTT we never gave
    assert rej.op == p.Op.REJECT and rej.reason == p.RejectReason.INVALID_PDU_FIELD


def test_discovery_sessions_take_no_scsi_commands():
    conn = connected(discovery=True)
    ev = conn.receive_data(scsi(cmdsn=10))
    [(rej, data)] = sent(ev)
    assert rej.reason == p.RejectReason.PROTOCOL_ERROR and data[0] == p.Op.SCSI_COMMAND
    assert isinstance(ev[-1], c.Close) and conn.closed


def test_logout_answers_then_closes():
    conn = connected()
    ev = conn.receive_data(logout())
    [(rsp, _)] = sent(ev)
    assert rsp.op == p.Op.LOGOUT_RESPONSE and rsp.response == p.LOGOUT_OK and ev[-1] == c.Close("logout")
    conn = connected()
    [(rsp, _)] = sent(conn.receive_data(logout(reason=p.LOGOUT_REMOVE_FOR_RECOVERY)))
    assert rsp.response == p.LOGOUT_RECOVERY_NOT_SUPPORTED and not conn.closed


def test_anything_but_login_before_login_ends_the_connection():
    portal = Portal(targets={TNAME: Target(TNAME)}, portal_group_tag=1, authorize=lambda i, n: True)
    conn = c.Connection(portal, tsih=1, addresses=lambda n: [])
    [ev] = conn.receive_data(nop_out())
    assert isinstance(ev, c.Close) and "before the login completed" in ev.reason


def test_a_failed_login_sends_its_status_then_closes():
    portal = Portal(targets={TNAME: Target(TNAME)}, portal_group_tag=1, authorize=lambda i, n: False)
    conn = c.Connection(portal, tsih=1, addresses=lambda n: [])
    ev = conn.receive_data(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)]))
    [(rsp, _)] = sent(ev)
    assert rsp.status_class == 2 and rsp.status_detail == 2 and isinstance(ev[-1], c.Close) and conn.closed


@pytest.mark.parametrize("digests", ["CRC32C", "None"])
def test_digests_apply_from_the_first_pdu_after_login(digests):
    portal = Portal(targets={TNAME: Target(TNAME)}, portal_group_tag=1, authorize=lambda i, n: True)
    conn = c.Connection(portal, tsih=1, addresses=lambda n: [])
    ev = conn.receive_data(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME), ("HeaderDigest", digests),
                                      ("DataDigest", digests)]))
    [(rsp, data)] = sent(ev)  # the login response itself has no digests
    assert dict(t.parse(data))["HeaderDigest"] == digests
    on = digests == "CRC32C"
    ev = conn.receive_data(wire(p.NOP_OUT.build({"op": 0, "flags": 0x80, "ahs_words": 0, "dsl": 4, "lun": 0,
                                                 "itt": 9, "ttt": p.RESERVED_TAG, "cmdsn": 10, "expstatsn": 0}),
                                b"abcd", hd=on, dd=on))
    [send] = ev
    b = b"".join(bytes(x) for x in send.buffers)
    assert len(b) == 48 + 4 + (8 if on else 0)
    if on:
        assert b[48:52] == p.digest_bytes(b[:48]) and b[56:60] == p.digest_bytes(b"abcd")


def test_a_data_digest_error_is_rejected_and_the_session_goes_on():
    portal = Portal(targets={TNAME: Target(TNAME)}, portal_group_tag=1, authorize=lambda i, n: True)
    conn = c.Connection(portal, tsih=1, addresses=lambda n: [])
    conn.receive_data(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME), ("DataDigest", "CRC32C")]))
    bad = bytearray(nop_out(data=b"abcd") + p.digest_bytes(b"abcd"))
    bad[49] ^= 0xFF
    [(rej, data)] = sent(conn.receive_data(bytes(bad)))
    assert rej.op == p.Op.REJECT and rej.reason == p.RejectReason.DIGEST_ERROR and data[:1] == b"\x00"
    assert not conn.closed and conn.expcmdsn == 10  # the rejected NOP did not count


def write_cmd(itt, edtl, data=b"", cmdsn=10):
    cdb = bytes([0x2A]) + bytes(15)
    return wire(p.H_SCSI_COMMAND.pack(p.Op.SCSI_COMMAND, p.F_BIT | p.CMD_WRITE, len(data), 0, itt, edtl, cmdsn, 0,
                                      cdb), data)


def data_out(itt, ttt, offset, data, datasn, final):
    return wire(p.H_DATA_OUT.pack(p.Op.DATA_OUT, p.F_BIT if final else 0, len(data), 0, itt, ttt, 0, datasn,
                                  offset), data)


def logged_in_with(keys):
    portal = Portal(targets={TNAME: Target(TNAME)}, portal_group_tag=1, authorize=lambda i, n: True,
                    limits=t.TargetLimits(max_burst=4096, first_burst=1024))
    conn = c.Connection(portal, tsih=1, addresses=lambda n: [])
    ev = conn.receive_data(login_pdu([("InitiatorName", INAME), ("TargetName", TNAME)] + keys))
    assert isinstance(ev[-1], c.LoggedIn)
    return conn


def test_immediate_data_then_r2t_bursts_gather_a_write():
    conn = logged_in_with([("MaxBurstLength", "4096"), ("FirstBurstLength", "1024")])
    payload = bytes(range(256)) * 40  # 10240 bytes
    [ev] = conn.receive_data(write_cmd(7, len(payload), payload[:1024]))
    assert isinstance(ev, c.Command) and ev.cmd.data == payload[:1024]
    [(r2t, _)] = sent(conn.request_data(ev.cmd, len(payload)))
    assert r2t.op == p.Op.R2T and (r2t.offset, r2t.length, r2t.r2tsn) == (1024, 4096, 0)
    assert conn.receive_data(data_out(7, r2t.ttt, 1024, payload[1024:3072], 0, False)) == []
    [(r2t2, _)] = sent(conn.receive_data(data_out(7, r2t.ttt, 3072, payload[3072:5120], 1, True)))
    assert (r2t2.offset, r2t2.length, r2t2.r2tsn) == (5120, 4096, 1) and r2t2.ttt != r2t.ttt
    [(r2t3, _)] = sent(conn.receive_data(data_out(7, r2t2.ttt, 5120, payload[5120:9216], 0, True)))
    assert (r2t3.offset, r2t3.length) == (9216, 1024)
    [done] = conn.receive_data(data_out(7, r2t3.ttt, 9216, payload[9216:], 0, True))
    assert isinstance(done, c.WriteData) and bytes(done.data) == payload and conn.transfers == 0


def test_immediate_data_covering_the_write_needs_no_r2t():
    conn = logged_in_with([])
    [ev] = conn.receive_data(write_cmd(8, 512, b"x" * 512))
    assert conn.request_data(ev.cmd, 512) == [c.WriteData(8, b"x" * 512)]


@pytest.mark.parametrize("change", ["datasn", "offset", "ttt", "early_final", "no_final"])
def test_data_out_out_of_step_ends_the_session(change):
    conn = logged_in_with([])
    [ev] = conn.receive_data(write_cmd(9, 2048))
    [(r2t, _)] = sent(conn.request_data(ev.cmd, 2048))
    chunks = [(0, 0, False), (1024, 1, True)]
    if change == "datasn":
        chunks = [(0, 1, False)]
    elif change == "offset":
        chunks = [(512, 0, False)]
    elif change == "early_final":
        chunks = [(0, 0, True)]
    elif change == "no_final":
        chunks = [(0, 0, False), (1024, 1, False)]
    out = []
    for off, sn, fin in chunks:
        out += conn.receive_data(data_out(9, r2t.ttt + (1 if change == "ttt" else 0), off, bytes(1024), sn, fin))
    assert isinstance(out[-1], c.Close) and conn.closed


def test_unsolicited_data_out_is_a_protocol_error():
    conn = logged_in_with([])
    conn.receive_data(write_cmd(9, 2048))
    [ev] = conn.receive_data(data_out(9, p.RESERVED_TAG, 0, bytes(512), 0, False))
    assert isinstance(ev, c.Close) and "no R2T asked for" in ev.reason


def test_immediate_data_beyond_first_burst_is_a_protocol_error():
    conn = logged_in_with([("FirstBurstLength", "512")])
    [ev] = conn.receive_data(write_cmd(9, 2048, bytes(1024)))
    assert isinstance(ev, c.Close)


def test_data_in_is_cut_to_the_initiators_segment_size_with_status_on_the_last():
    conn = connected()  # the initiator declared MaxRecvDataSegmentLength=512
    [ev] = conn.receive_data(scsi(cmdsn=10))
    cmd = ev.cmd
    cmd = type(cmd)(**{**{f: getattr(cmd, f) for f in cmd.__dataclass_fields__}, "edtl": 1500, "read": True})
    pdus = sent(conn.data_in(cmd, bytes(range(256)) * 5))  # 1280 bytes for an EDTL of 1500
    assert [len(d) for _, d in pdus] == [512, 512, 256]
    assert [h.datasn for h, _ in pdus] == [0, 1, 2] and [h.offset for h, _ in pdus] == [0, 512, 1024]
    last = pdus[-1][0]
    assert last.flags == p.F_BIT | p.DATA_STATUS | p.DATA_UNDERFLOW and last.residual == 220
    assert pdus[0][0].flags == 0 and last.statsn == 1
    over = type(cmd)(**{**{f: getattr(cmd, f) for f in cmd.__dataclass_fields__}, "edtl": 100, "itt": 6})
    [(h, d)] = sent(conn.data_in(over, bytes(300)))
    assert len(d) == 100 and h.flags & p.DATA_OVERFLOW and h.residual == 200
