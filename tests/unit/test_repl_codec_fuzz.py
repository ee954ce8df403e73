"""Hypothesis: arbitrary and mutated bytes only ever produce frames or ProtocolError."""

from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.repl.proto import FrameDecoder, ProtocolError, encode_bytes

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
