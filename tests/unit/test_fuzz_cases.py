"""The live fuzzer's cases are a function of the seed, the case id and the recordings: a finding
can be re-run alone (``syncd lab fuzz --seed S --case PORT:N``) on the same bytes."""

from __future__ import annotations

import random
import struct

from syncd.lab.fuzz import Session, make_case, mutate, truncations

NBD_REQ = struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 4096, 512)  # a WRITE header (NBD spec)
NBD = [
    Session("nbd", "rw", (("s", b"NBDMAGIC..."), ("c", b"\0\0\0\3"), ("c", b"IHAVEOPT" + b"\0" * 8),
                          ("s", b"reply"), ("c", NBD_REQ + b"x" * 512))),
    Session("nbd", "info", (("s", b"NBDMAGIC..."), ("c", b"\0\0\0\3"), ("c", b"IHAVEOPT" + b"\0\0\0\7\0\0\0\0"))),
]


def test_a_case_is_the_same_bytes_for_the_same_seed_and_index():
    a = make_case(5, "nbd", 17, NBD, 2, 8)
    b = make_case(5, "nbd", 17, NBD, 2, 8)
    assert a.dump() == b.dump()
    assert any(make_case(6, "nbd", i, NBD, 2, 8).dump() != make_case(5, "nbd", i, NBD, 2, 8).dump()
               for i in range(1, 20))


def test_truncation_sweep_covers_every_chunk_boundary():
    total = sum(len(c) for c in NBD[0].chunks)
    cuts = {n for si, n in truncations(NBD) if si == 0}
    pos = 0
    for c in NBD[0].chunks[:-1]:
        pos += len(c)
        assert {pos - 1, pos, pos + 1} <= cuts
    assert all(0 < n < total for n in cuts)


def test_every_mutation_changes_what_is_sent():
    rng = random.Random(3)
    seen = set()
    for _ in range(400):
        chunks, desc = mutate(rng, "nbd", NBD[0].chunks, NBD[1:])
        seen.add(desc.split()[0])
        if "repeated" not in desc and "swapped" not in desc:  # a swap of equal chunks is the same stream
            assert chunks != NBD[0].chunks or "= 0x" in desc, desc  # a field may already hold the value
    assert {"bitflip", "insert", "delete", "nbd", "chunk", "chunks"} <= seen, seen


def test_the_waits_follow_the_recorded_conversation():
    assert NBD[0].waits == frozenset({1})  # the server answered after the client's second chunk
