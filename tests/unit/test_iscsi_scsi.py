"""The SCSI command set, sans-IO: CDBs in, answers, I/O or sense out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.iscsi import scsi as s

WWN = "naa.60002ac0123456789abcdef012345678"
SIZE = 64 << 20


def unit(state=s.Alua.ACTIVE_OPTIMIZED, **facts):
    groups = [s.PortGroup(1, state, 1, preferred=True), s.PortGroup(2, s.Alua.ACTIVE_NON_OPTIMIZED, 2)]
    return s.Unit(s.LuFacts(SIZE, WWN, **facts), lambda: groups, lambda: [0, 3, 300])


def run(cdb, u=None, nexus=None):
    return (u or unit()).command(bytes(cdb), nexus or s.Nexus([]))


def cdb10(op, lba, blocks, flags=0):
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def cdb16(op, lba, blocks, flags=0):
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def test_sense_fixed_format():
    b = s.Sense(s.ILLEGAL_REQUEST, 0x24, 0, field_pointer=1, bit_pointer=7).fixed()
    assert len(b) == 18 and b[0] == 0x70 and b[2] == 5 and b[7] == 10 and (b[12], b[13]) == (0x24, 0)
    assert b[15] == 0x80 | 0x40 | 0x08 | 7 and b[16:18] == b"\x00\x01"
    b = s.miscompare(1234).sense.fixed()
    assert b[0] == 0xF0 and int.from_bytes(b[3:7], "big") == 1234 and b[2] == s.MISCOMPARE


def test_standard_inquiry_says_implicit_alua_multiport_and_queueing():
    d = run([0x12, 0, 0, 0, 255, 0]).data
    assert len(d) == 96 and d[4] == 91 and d[0] == 0
    assert d[5] & 0x30 == 0x10 and d[6] & 0x10 and d[7] & 0x02 and d[3] == 0x12
    assert d[8:16] == b"SYNCD   " and d[16:32] == b"syncd volume    "
    assert run([0x12, 0, 0, 0, 36, 0]).data == d[:36]  # cut to the allocation length
    assert run([0x12, 0, 0x80, 0, 255, 0]).sense == s.invalid_field(2)  # a page without EVPD


def test_vpd_pages():
    assert run([0x12, 1, 0x00, 0, 255, 0]).data == bytes([0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    serial = run([0x12, 1, 0x80, 0, 255, 0]).data
    assert serial[4:] == b"60002ac0123456789abcdef012345678"
    ident = run([0x12, 1, 0x83, 0, 255, 0]).data[4:]
    assert ident[:4] == bytes([0x01, 0x03, 0, 16]) and ident[4:20].hex() == "60002ac0123456789abcdef012345678"
    assert ident[20:28] == bytes([0x51, 0x94, 0, 4, 0, 0, 0, 1])  # relative target port 1
    assert ident[28:36] == bytes([0x51, 0x95, 0, 4, 0, 0, 0, 1])  # target port group 1
    limits = run([0x12, 1, 0xB0, 0, 255, 0]).data
    assert limits[3] == 0x3C and limits[4] & 1 and limits[5] == 255
    assert struct.unpack_from(">I", limits, 8)[0] == (32 << 20) // 512
    assert struct.unpack_from(">I", limits, 20)[0] == (512 << 20) // 512
    assert run([0x12, 1, 0xB1, 0, 255, 0]).data[4:6] == b"\x00\x01"
    assert run([0x12, 1, 0xB2, 0, 255, 0]).data[5] == 0xE4
    assert run([0x12, 1, 0xB3, 0, 255, 0]).sense == s.invalid_field(2)


def test_read_capacity():
    assert run([0x25] + [0] * 9).data == struct.pack(">II", SIZE // 512 - 1, 512)
    d = run([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]).data
    assert struct.unpack_from(">QI", d) == (SIZE // 512 - 1, 512) and d[13] == 3 and d[14] == 0xC0
    assert isinstance(run([0x9E, 0x11] + [0] * 14), s.Check)


def test_report_luns_and_target_port_groups():
    d = run([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).data
    assert struct.unpack_from(">I", d)[0] == 24
    assert d[8:16] == bytes(8) and d[16:18] == b"\x00\x03" and d[24:26] == bytes([0x41, 0x2C])
    assert run([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0]).sense == s.invalid_field(6)
    d = run([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).data
    assert struct.unpack_from(">I", d)[0] == 24
    assert d[4] == 0x80 | 0 and d[6:8] == b"\x00\x01" and d[4 + 12] == 0x01 and d[4 + 14:4 + 16] == b"\x00\x02"
    assert d[4 + 7] == 1 and d[4 + 10:4 + 12] == b"\x00\x01"  # one port, relative port 1
    ext = run([0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).data
    assert ext[4] == 0x10 and ext[8:] == d[4:]


@pytest.mark.parametrize("state,sense", [
    (s.Alua.STANDBY, s.ALUA_STANDBY_STATE),
    (s.Alua.UNAVAILABLE, s.ALUA_UNAVAILABLE_STATE),
    (s.Alua.TRANSITIONING, s.ALUA_TRANSITION),
])
def test_non_active_states_refuse_io_but_answer_inquiries(state, sense):
    u = unit(state)
    assert run(cdb10(0x28, 0, 1), u).sense == sense
    assert run(cdb10(0x2A, 0, 1), u).sense == sense
    assert isinstance(run([0x12, 0, 0, 0, 36, 0], u), s.Done)
    assert isinstance(run([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], u), s.Done)
    assert isinstance(run([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], u), s.Done)
    tur = run([0, 0, 0, 0, 0, 0], u)
    assert tur.sense == sense


def test_active_non_optimized_serves_io():
    assert isinstance(run(cdb10(0x28, 0, 1), unit(s.Alua.ACTIVE_NON_OPTIMIZED)), s.Io)


def test_unit_attention_is_reported_once_and_spares_inquiry():
    nx = s.Nexus()
    assert isinstance(run([0x12, 0, 0, 0, 36, 0], nexus=nx), s.Done)
    assert run([0, 0, 0, 0, 0, 0], nexus=nx).sense == s.POWER_ON_RESET
    nx.raise_attention(s.ALUA_STATE_CHANGED)
    nx.raise_attention(s.ALUA_STATE_CHANGED)  # not queued twice
    assert run(cdb10(0x28, 0, 1), nexus=nx).sense == s.ALUA_STATE_CHANGED
    assert isinstance(run(cdb10(0x28, 0, 1), nexus=nx), s.Io)


def test_reads_and_writes_become_io_with_fua():
    io = run(cdb10(0x2A, 8, 16, flags=0x08))
    assert io == s.Io(s.IoKind.WRITE, 4096, 8192, fua=True, data_out=8192)
    assert run(cdb16(0x88, 1, 1)) == s.Io(s.IoKind.READ, 512, 512)
    assert run([0x08, 0, 0, 2, 0, 0]) == s.Io(s.IoKind.READ, 1024, 256 * 512)  # READ(6): 0 is 256 blocks
    assert run(struct.pack(">BBIIBB", 0xA8, 0, 4, 2, 0, 0)) == s.Io(s.IoKind.READ, 2048, 1024)


@pytest.mark.parametrize("cdb,sense", [
    (cdb10(0x28, SIZE // 512, 1), s.LBA_OUT_OF_RANGE),
    (cdb16(0x8A, SIZE // 512 - 1, 2), s.LBA_OUT_OF_RANGE),
    (cdb16(0x8A, 2 ** 64 - 1, 1), s.LBA_OUT_OF_RANGE),
    (cdb10(0x28, 0, 1, flags=0x20), s.invalid_field(1, 7)),  # RDPROTECT
    (cdb10(0x28, 0, 1)[:9] + b"\x04", s.invalid_field(9, 2)),  # NACA
    (bytes([0xC0, 0, 0, 0, 0, 0]), s.INVALID_OPCODE),
    (bytes([0x28, 0, 0]), s.invalid_field(0)),  # shorter than its group's length
])
def test_refusals(cdb, sense):
    assert run(cdb).sense == sense


def test_large_transfers_are_refused_beyond_the_block_limit():
    assert run(cdb16(0x8A, 0, 65536 + 1), unit(max_transfer=32 << 20)).sense == s.invalid_field(10)


def test_read_only_units_refuse_writes():
    u = unit(read_only=True)
    assert run(cdb10(0x2A, 0, 1), u).sense == s.WRITE_PROTECTED
    assert run(cdb16(0x93, 0, 1), u).sense == s.WRITE_PROTECTED
    assert run([0x1A, 0, 0x08, 0, 255, 0], u).data[2] & 0x80


def test_mode_sense_pages():
    d = run([0x1A, 0, 0x3F, 0, 255, 0]).data
    assert d[0] == len(d) - 1 and d[3] == 8 and d[2] == 0x10
    body = d[4 + 8:]
    assert body[0] == 0x08 and body[2] & 0x04  # caching: WCE
    assert body[20] == 0x0A and body[32] == 0x1C
    changeable = run([0x1A, 0, 0x40 | 0x08, 0, 255, 0]).data
    assert changeable[4 + 8 + 2] == 0
    ten = run([0x5A, 0x08, 0x0A, 0, 0, 0, 0, 0, 255, 0]).data
    assert struct.unpack_from(">H", ten)[0] == len(ten) - 2 and ten[8] == 0x0A
    assert run([0x1A, 0, 0xC8, 0, 255, 0]).sense == s.SAVING_PARAMETERS_NOT_SUPPORTED
    assert run([0x1A, 0, 0x19, 0, 255, 0]).sense == s.invalid_field(2, 5)


def test_write_same_and_unmap():
    assert run(cdb16(0x93, 8, 8, flags=0x08)) == s.Io(s.IoKind.WRITE_SAME, 4096, 4096, data_out=512, unmap=True)
    assert run(cdb16(0x93, 8, 8, flags=0x01)).ndob
    assert run(cdb16(0x93, 8, 0)).sense == s.invalid_field(10)  # WSNZ
    assert run(cdb16(0x93, 8, 8, flags=0x10)).sense == s.invalid_field(1, 4)  # ANCHOR
    need = run([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0])
    assert need == s.NeedData(24)
    params = struct.pack(">HHI", 22, 16, 0) + struct.pack(">QII", 16, 8, 0)
    assert unit().unmap_parameters(params) == s.Io(s.IoKind.UNMAP, 0, 0, ranges=((8192, 4096),))
    beyond = struct.pack(">HHI", 22, 16, 0) + struct.pack(">QII", SIZE // 512, 1, 0)
    assert unit().unmap_parameters(beyond).sense == s.LBA_OUT_OF_RANGE
    assert unit().unmap_parameters(struct.pack(">HHI", 22, 17, 0) + bytes(16)).sense == \
        s.PARAMETER_LIST_LENGTH_ERROR
    assert isinstance(run([0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0]), s.Done)  # nothing to unmap


def test_compare_and_write():
    cdb = struct.pack(">BBQ3xBBB", 0x89, 0x08, 10, 2, 0, 0)
    assert run(cdb) == s.Io(s.IoKind.COMPARE_AND_WRITE, 5120, 1024, fua=True, data_out=2048)
    assert run(struct.pack(">BBQ3xBBB", 0x89, 0, 10, 2, 0, 0), unit(max_compare_and_write_blocks=1)).sense \
        == s.invalid_field(13)


def test_report_supported_opcodes():
    all_ = run([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]).data
    n = struct.unpack_from(">I", all_)[0] // 8
    ops = {all_[4 + 8 * i] for i in range(n)}
    assert {0x28, 0x2A, 0x89, 0x93, 0x42, 0xA0, 0x12} <= ops
    one = run([0xA3, 0x0C, 1, 0x2A, 0, 0, 0, 0, 1, 0, 0, 0]).data
    assert one[1] & 0x07 == 3 and one[2:4] == b"\x00\x0a" and one[4] == 0x2A
    assert run([0xA3, 0x0C, 1, 0xC0, 0, 0, 0, 0, 1, 0, 0, 0]).data[1] & 0x07 == 1  # not supported
    assert run([0xA3, 0x0C, 1, 0x9E, 0, 0, 0, 0, 1, 0, 0, 0]).sense == s.invalid_field(2)  # has actions
    rc16 = run([0xA3, 0x0C, 2, 0x9E, 0, 0x10, 0, 0, 1, 0, 0, 0]).data
    assert rc16[1] & 0x07 == 3 and rc16[4:6] == b"\x9e\x10"
    timeouts = run([0xA3, 0x0C, 0x81, 0x28, 0, 0, 0, 0, 1, 0, 0, 0]).data
    assert timeouts[1] & 0x80 and len(timeouts) == 4 + 10 + 12


def test_lba_status_descriptors():
    u = unit()
    io = run(cdb16(0x9E, 16, 0, flags=0x12)[:10] + struct.pack(">I", 200) + b"\x00\x00")
    assert io.kind is s.IoKind.LBA_STATUS and io.offset == 8192 and io.allocation == 200
    d = u.lba_status(8192, [(4096, 3), (1 << 20, 0)], 200).data
    assert struct.unpack_from(">I", d)[0] == 4 + 32
    assert struct.unpack_from(">QIB", d, 8) == (16, 8, 1) and struct.unpack_from(">QIB", d, 24) == (24, 2048, 0)


@given(st.binary(min_size=0, max_size=20))
def test_any_cdb_gives_an_outcome_never_an_exception(cdb):
    out = run(cdb, nexus=s.Nexus([]))
    assert isinstance(out, s.Io | s.Done | s.Check | s.NeedData)
