import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.witness.proto import _HDR, HEADER, WDecoder, WitnessProtocolError, encode

from .witness_vectors import DIR, VECTORS


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_golden_vectors(name):
    t, rid, fields = VECTORS[name]
    golden = bytes.fromhex((DIR / f"{name}.hex").read_text().strip())
    assert encode(t, rid, **fields) == golden
    d = WDecoder()
    d.receive_data(golden)
    f = d.next_frame()
    assert (f.type, f.req_id, f.fields) == (t, rid, fields)
    assert f"`{name}`" in (DIR.parent.parent / "witness.md").read_text()


def test_header_struct_matches_construct():
    vals = (0x53594E57, 11, 0, 0, 2**63, 17, 2**64 - 1)
    names = [sc.name for sc in HEADER.subcons]
    assert HEADER.build(dict(zip(names, vals, strict=True))) == _HDR.pack(*vals)


GOOD = b"".join(encode(t, r, **f) for t, r, f in VECTORS.values())


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=6), st.binary(max_size=100))
def test_mutated_or_random_input_only_raises_protocol_errors(muts, junk):
    wire = bytearray(GOOD)
    for pos, val in muts:
        wire[pos] = val
    for data in (bytes(wire), junk):
        d = WDecoder()
        d.receive_data(data)
        try:
            while d.next_frame() is not None:
                pass
        except WitnessProtocolError:
            pass
