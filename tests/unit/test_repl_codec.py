"""The replication codec against its spec's golden frames, its construct declarations, and bad
input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.repl import proto
from syncd.repl.proto import (
    HEADER,
    ChecksumError,
    Frame,
    FrameDecoder,
    MsgType,
    ProtocolError,
    encode,
    encode_bytes,
)

from .repl_vectors import DIR, VECTORS


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_golden_vectors_encode_and_decode(name):
    golden = bytes.fromhex((DIR / f"{name}.hex").read_text().strip())
    assert encode_bytes(VECTORS[name]) == golden
    d = FrameDecoder()
    d.receive_data(golden)
    assert d.next_frame() == VECTORS[name]
    assert d.next_frame() is None


def test_every_vector_in_the_spec_exists():
    spec = (DIR.parent.parent / "replication.md").read_text()
    for name in VECTORS:
        assert f"`{name}`" in spec, f"proto/replication.md does not list vector {name}"


u = st.integers
header_fields = st.fixed_dictionaries({
    "magic": st.just(proto.MAGIC), "type": st.sampled_from([int(t) for t in MsgType]),
    "flags": u(0, 255), "reserved": st.just(0), "req_id": u(0, 2**64 - 1), "group": u(0, 2**32 - 1),
    "epoch": u(0, 2**64 - 1), "vol": u(0, 2**32 - 1), "offset": u(0, 2**64 - 1),
    "length": u(0, 2**32 - 1), "payload_len": st.just(0), "checksum": st.just(0),
})


@given(header_fields)
def test_hot_path_struct_equals_construct_declaration(fields):
    names = [sc.name for sc in HEADER.subcons]
    values = [fields[n] for n in names]
    built = HEADER.build(fields)
    assert built == proto._HDR.pack(*values)
    parsed = HEADER.parse(built)
    assert tuple(parsed[n] for n in names) == proto._HDR.unpack(built) == tuple(values)


@given(st.sampled_from([int(t) for t in MsgType]), u(0, 15), u(0, 2**64 - 1), u(0, 2**32 - 1),
       u(0, 2**64 - 1), u(0, 2**32 - 1), u(0, 2**64 - 1), u(0, 2**32 - 1), st.binary(max_size=300))
def test_any_frame_round_trips(t, flags, req_id, group, epoch, vol, offset, length, payload):
    f = Frame(MsgType(t), flags, req_id, group, epoch, vol, offset, length, payload)
    d = FrameDecoder()
    d.receive_data(encode_bytes(f))
    assert d.next_frame() == f


def test_frames_split_at_every_byte_and_batched():
    frames = [VECTORS[n] for n in sorted(VECTORS)]
    wire = b"".join(encode_bytes(f) for f in frames)
    d = FrameDecoder()
    out = []
    for i in range(len(wire)):
        d.receive_data(wire[i : i + 1])
        while (f := d.next_frame()) is not None:
            out.append(f)
    assert out == frames
    d2 = FrameDecoder()
    d2.receive_data(wire)
    assert [d2.next_frame() for _ in frames] == frames


def test_payload_is_not_copied_by_encode():
    data = bytearray(b"x" * 4096)
    bufs = encode(Frame.write(1, 1, 1, 1, 0, data))
    assert bufs[1] is data


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda b: b"XXXX" + b[4:], "bad frame magic"),
        (lambda b: b[:4] + bytes([77]) + b[5:], "unknown frame type 77"),
        (lambda b: b[:6] + b"\x00\x01" + b[8:], "reserved"),
        (lambda b: b[:44] + (1 << 30).to_bytes(4, "big") + b[48:], "exceeds the maximum"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch on WRITE req_id 7"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(mutate, fragment):
    d = FrameDecoder()
    d.receive_data(mutate(encode_bytes(VECTORS["write"])))
    with pytest.raises(ProtocolError, match=fragment):
        d.next_frame()


def test_checksum_error_is_a_link_fault_and_never_yields_the_frame():
    wire = bytearray(encode_bytes(VECTORS["write"]))
    wire[-2] ^= 0xFF
    d = FrameDecoder()
    d.receive_data(bytes(wire))
    with pytest.raises(ChecksumError):
        d.next_frame()


def test_hello_fields_and_version_checks():
    h = VECTORS["hello_ack"].hello_fields()
    assert (h.node_name, h.path_index, h.link_session) == ("B", 1, 0x1122334455667788)
    assert h.reserved == bytes(32)
    assert proto.version_problem(h) is None
    old = proto.Hello(0, 0, 0, h.node_uuid, "B", 0, 1, bytes(32))
    assert "do not overlap" in proto.version_problem(old)
    bad = Frame(MsgType.HELLO, payload=b"\x00\x01")
    with pytest.raises(proto.HandshakeError):
        bad.hello_fields()


def test_payload_helpers():
    assert VECTORS["reply_lease"].lease_ms() == 2000
    assert VECTORS["digests_reply"].digest_list() == [0x0123456789ABCDEF, 0xFEDCBA9876543210]
    assert VECTORS["digests_request"].digest_region() == 262144
    assert VECTORS["resync_begin"].resync_bitmap() == (262144, bytes([5, 0, 0x80]))
    assert VECTORS["control"].control_json() == {"op": "start", "group": "rcg1"}
    with pytest.raises(ProtocolError):
        Frame.control(1, {}).__class__(MsgType.CONTROL, payload=b"[1]").control_json()
    with pytest.raises(ProtocolError):
        Frame(MsgType.CONTROL, payload=b"\xff").control_json()
