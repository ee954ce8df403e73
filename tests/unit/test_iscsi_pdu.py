"""iSCSI PDUs: declarations, hot-path structs, framing with digests, decoding (sans-IO)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.iscsi import pdu as p
from tests.unit import iscsi_vectors


def _names(decl):
    return [sc.name for sc in decl.subcons if sc.name]


def test_every_basic_header_segment_is_48_bytes():
    for op, decl in p.DECLARATIONS.items():
        assert decl.sizeof() == p.BHS_LEN, op.name


@settings(max_examples=60)
@given(st.data())
def test_hot_path_structs_equal_construct_declarations(data):
    for name, (codec, decl) in p.HOT_PATH.items():
        fields = {}
        for sc in decl.subcons:
            if not sc.name:
                continue
            if sc.name == "cdb":
                fields[sc.name] = data.draw(st.binary(min_size=16, max_size=16))
            else:
                fields[sc.name] = data.draw(st.integers(0, 2 ** (8 * sc.sizeof()) - 1))
        built = decl.build(fields)
        args, names = [], _names(decl)
        i = 0
        while i < len(names):
            if names[i] == "ahs_words":  # bytes 4-7 travel as one word in the struct codec
                args.append(fields["ahs_words"] << 24 | fields["dsl"])
                i += 2
                continue
            args.append(fields[names[i]])
            i += 1
        assert codec.pack(*args) == built, name
        assert codec.unpack(built) == tuple(args), name


def test_crc32c_matches_the_rfc_3720_appendix_b4_vectors():
    assert p.digest_bytes(bytes(32)).hex() == "aa36918a"
    assert p.digest_bytes(b"\xff" * 32).hex() == "43aba862"
    assert p.digest_bytes(bytes(range(32))).hex() == "4e79dd46"
    assert p.digest_bytes(bytes(range(31, -1, -1))).hex() == "5cdb3f11"
    assert p.digest_bytes(bytes(range(16)), bytes(range(16, 32))).hex() == "4e79dd46"


def _cmd(itt=7, data=b"", write=True, edtl=4096):
    flags = p.F_BIT | (p.CMD_WRITE if write else p.CMD_READ) | 1
    cdb = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0]) + bytes(6)
    return p.H_SCSI_COMMAND.pack(p.Op.SCSI_COMMAND, flags, p.lengths_word(0, len(data)), p.lun_field(3), itt,
                                 edtl, 100, 5, cdb)


def _wire(bhs, data=b"", hd=False, dd=False):
    return b"".join(bytes(b) for b in p.frame(bhs, data, header_digest=hd, data_digest=dd))


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
def test_frame_and_read_back_with_and_without_digests(hd, dd):
    data = b"syncd!"  # 6 bytes: two of padding
    wire = _wire(_cmd(data=data), data, hd, dd)
    assert len(wire) == 48 + 8 + (4 if hd else 0) + (4 if dd else 0)
    r = p.PduReader()
    r.header_digest, r.data_digest = hd, dd
    r.receive_data(wire)
    raw = r.next_pdu()
    assert raw is not p.NEED_DATA and raw.data == data and raw.data_digest_ok
    cmd = p.decode(raw)
    assert isinstance(cmd, p.ScsiCommand)
    assert (cmd.write, cmd.read, cmd.final, cmd.attr, cmd.itt, cmd.edtl, cmd.cmdsn) == (True, False, True, 1, 7,
                                                                                      4096, 100)
    assert p.lun_number(cmd.lun) == 3 and cmd.cdb[0] == 0x2A and cmd.data == data
    assert r.next_pdu() is p.NEED_DATA and r.buffered() == 0


@settings(max_examples=40)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5), st.data())
def test_a_stream_cut_anywhere_gives_the_same_pdus(payloads, data):
    hd, dd = data.draw(st.booleans()), data.draw(st.booleans())
    wire = b"".join(_wire(_cmd(itt=i, data=d), d, hd, dd) for i, d in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    r = p.PduReader()
    r.header_digest, r.data_digest = hd, dd
    got = []
    prev = 0
    for c in [*cuts, len(wire)]:
        r.receive_data(wire[prev:c])
        prev = c
        while (raw := r.next_pdu()) is not p.NEED_DATA:
            got.append((raw.itt, raw.data))
    assert got == list(enumerate(payloads))


def test_a_segment_longer_than_declared_ends_the_connection_before_it_is_held():
    r = p.PduReader(max_data=8192)
    r.receive_data(_cmd(data=bytes(8193))[:48])  # only the header has arrived
    with pytest.raises(p.ProtocolError, match="8193 bytes exceeds MaxRecvDataSegmentLength 8192"):
        r.next_pdu()


def test_a_wrong_header_digest_ends_the_connection():
    wire = bytearray(_wire(_cmd(), hd=True))
    wire[20] ^= 1
    r = p.PduReader()
    r.header_digest = True
    r.receive_data(wire)
    with pytest.raises(p.HeaderDigestError):
        r.next_pdu()


def test_a_wrong_data_digest_is_reported_and_the_data_dropped():
    data = b"abcd" * 4
    wire = bytearray(_wire(_cmd(data=data), data, dd=True) + _wire(_cmd(itt=8)))
    wire[50] ^= 0xFF
    r = p.PduReader()
    r.data_digest = True
    r.receive_data(wire)
    raw = r.next_pdu()
    assert raw is not p.NEED_DATA and not raw.data_digest_ok and raw.data == b""
    nxt = r.next_pdu()  # the stream stays in step: the next PDU decodes
    assert nxt is not p.NEED_DATA and nxt.itt == 8


def test_opcodes_a_target_does_not_take_are_rejected_with_the_right_reason():
    hdr = bytearray(48)
    hdr[0] = 0x1C  # a vendor opcode
    assert p.decode(p.RawPdu(bytes(hdr), b"", b"")).reason == p.RejectReason.COMMAND_NOT_SUPPORTED
    hdr[0] = p.Op.SCSI_RESPONSE  # a target opcode sent by an initiator
    assert p.decode(p.RawPdu(bytes(hdr), b"", b"")).reason == p.RejectReason.PROTOCOL_ERROR


def test_a_logout_with_data_is_a_protocol_error():
    hdr = p.LOGOUT_REQUEST.build({"op": p.Op.LOGOUT_REQUEST | p.IMMEDIATE, "flags": 0x80, "ahs_words": 0,
                                  "dsl": 4, "itt": 1, "cid": 0, "cmdsn": 1, "expstatsn": 1})
    with pytest.raises(p.ProtocolError, match="carries no data segment"):
        p.decode(p.RawPdu(hdr, b"", b"abcd"))


def test_extended_cdb_ahs_is_appended_to_the_cdb():
    extra = bytes(range(16))
    ahs = (len(extra) + 1).to_bytes(2, "big") + bytes([p.AHS_EXTENDED_CDB, 0]) + extra
    cmd = p.decode(p.RawPdu(_cmd(), ahs, b""))
    assert isinstance(cmd, p.ScsiCommand) and cmd.cdb[16:] == extra
    with pytest.raises(p.ProtocolError, match="does not fit"):
        p.decode(p.RawPdu(_cmd(), (200).to_bytes(2, "big") + bytes(6), b""))


def test_login_request_fields():
    hdr = p.LOGIN_REQUEST.build({"op": 0x43, "flags": p.TRANSIT | (1 << 2) | 3, "version_max": 0,
                                 "version_min": 0, "ahs_words": 0, "dsl": 0, "isid": b"\x80\x12\x34\x56\x78\x9a",
                                 "tsih": 0, "itt": 9, "cid": 1, "cmdsn": 5, "expstatsn": 0})
    req = p.decode(p.RawPdu(hdr, b"", b""))
    assert isinstance(req, p.LoginRequest)
    assert (req.transit, req.cont, req.csg, req.nsg, req.cid, req.itt) == (True, False, 1, 3, 1, 9)


def test_data_in_with_status_sets_final_and_status_bits():
    h = p.data_in(itt=1, lun=0, datasn=2, offset=8192, dsl=4096, expcmdsn=3, maxcmdsn=66, status=0, statsn=9,
                  residual_flags=p.DATA_UNDERFLOW, residual=512)
    c = p.DATA_IN.parse(h)
    assert c.flags == p.F_BIT | p.DATA_STATUS | p.DATA_UNDERFLOW and c.statsn == 9 and c.residual == 512
    h = p.data_in(itt=1, lun=0, datasn=0, offset=0, dsl=4096, expcmdsn=3, maxcmdsn=66)
    c = p.DATA_IN.parse(h)
    assert c.flags == 0 and c.statsn == 0 and c.ttt == p.RESERVED_TAG


def test_lun_addressing():
    assert p.lun_field(0) == 0 and p.lun_number(p.lun_field(0)) == 0
    assert p.lun_field(5).to_bytes(8, "big") == bytes([0, 5, 0, 0, 0, 0, 0, 0])
    assert p.lun_field(300).to_bytes(8, "big")[:2] == bytes([0x41, 0x2C])
    assert p.lun_number(p.lun_field(300)) == 300
    assert p.lun_number(int.from_bytes(bytes([0, 1, 0, 0, 0, 0, 0, 1]), "big")) is None  # second level
    assert p.lun_number(int.from_bytes(bytes([0x80, 1]) + bytes(6), "big")) is None  # logical unit method
    with pytest.raises(ValueError):
        p.lun_field(1 << 14)


def test_golden_vectors_match_the_codec():
    index = json.loads((iscsi_vectors.DIR / "index.json").read_text())
    assert set(index) == set(iscsi_vectors.VECTORS)
    for name, wire in iscsi_vectors.VECTORS.items():
        assert (iscsi_vectors.DIR / f"{name}.hex").read_text().strip() == wire.hex(), name
        op = p.Op(wire[0] & p.OPCODE_MASK)
        parsed = p.DECLARATIONS[op].parse(wire[:48])
        assert {k: (v.hex() if isinstance(v, bytes) else v) for k, v in parsed.items() if not k.startswith("_")} \
            == index[name]["fields"], name
