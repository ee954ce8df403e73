"""Hypothesis: arbitrary and mutated bytes only ever produce frames or ProtocolError."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.repl.proto import Frame, FrameDecoder, MsgType, ProtocolError, encode_bytes

from .repl_vectors import VECTORS

GOOD = b"".join(encode_bytes(VECTORS[n]) for n in sorted(VECTORS))


def drain(chunks) -> int:
    d = FrameDecoder()
    n = 0
    try:
        for c in chunks:
            d.receive_data(c)
            while d.next_frame() is not None:
                n += 1
    except ProtocolError:
        pass
    return n


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_random_bytes_never_crash_the_decoder(chunks):
    drain(chunks)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(1, 97))
def test_mutated_valid_streams_yield_frames_or_protocol_errors(mutations, chunk):
    wire = bytearray(GOOD)
    for pos, val in mutations:
        wire[pos] = val
    drain([bytes(wire[i : i + chunk]) for i in range(0, len(wire), chunk)])


@given(st.integers(0, len(GOOD)))
def test_truncated_streams_never_yield_partial_frames(cut):
    d = FrameDecoder()
    d.receive_data(GOOD[:cut])
    n = 0
    while d.next_frame() is not None:
        n += 1
    assert n <= len(VECTORS)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 4096, 65536, 1 << 20]), min_size=1, max_size=5),
       cuts=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=30))
def test_payloads_of_any_size_survive_any_chunking(sizes, cuts):
    """Payloads filled in place across pieces (the decoder's one-copy path) arrive whole and
    equal, whatever the pieces' boundaries; a frame whole in one piece is sliced out of it."""
    frames = [Frame.write(i + 1, 7, 3, 0, i << 20, bytes([i + 1]) * n) if n else Frame.ping(i)
              for i, n in enumerate(sizes)]
    wire = b"".join(encode_bytes(f) for f in frames)
    d = FrameDecoder()
    got, pos, k = [], 0, 0
    while pos < len(wire):
        step = cuts[k % len(cuts)]
        k += 1
        d.receive_data(memoryview(wire)[pos:pos + step])
        pos += step
        while (f := d.next_frame()) is not None:
            got.append(f)
    assert [(f.type, f.req_id, bytes(f.payload)) for f in got] == [(f.type, f.req_id, bytes(f.payload)) for f in frames]


def test_frames_before_a_malformed_one_are_handed_out_first():
    good = encode_bytes(Frame.ping(1)) + encode_bytes(Frame.write(2, 1, 1, 0, 0, b"x" * 5000))
    bad = bytearray(encode_bytes(Frame.ping(3)))
    bad[0] ^= 0xFF
    d = FrameDecoder()
    d.receive_data(good + bytes(bad) + encode_bytes(Frame.ping(4)))
    assert d.next_frame().type == MsgType.PING
    assert d.next_frame().payload == b"x" * 5000
    with pytest.raises(ProtocolError, match="magic"):
        d.next_frame()
    d.receive_data(encode_bytes(Frame.ping(5)))  # nothing after the fault is ever decoded
    with pytest.raises(ProtocolError):
        d.next_frame()
