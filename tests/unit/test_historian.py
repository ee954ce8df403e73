"""The recorder's block stamps and history file: every intact write decodes to its stamp, anything
else (torn at any byte, damaged, another run's) never does, and says what it holds."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from syncd.lab.historian import (
    BLOCK,
    FUA,
    OK,
    READ,
    UNKNOWN,
    WRITE,
    Writer,
    decode_block,
    label,
    make_block,
    read_history,
    stamp_of,
)

RUN = 0x5EED


def test_an_intact_block_decodes_to_its_stamp_and_zeroes_to_the_initial_value():
    s = stamp_of(3, 17)
    assert label(s) == "3:17"
    assert decode_block(make_block(RUN, s, 42, FUA), 42, RUN) == (s, "")
    assert decode_block(bytes(BLOCK), 42, RUN) == (0, "")


def test_a_block_torn_between_two_writes_says_which_sectors_hold_which():
    a, b = make_block(RUN, stamp_of(1, 7), 2), make_block(RUN, stamp_of(2, 9), 2, FUA)
    value, what = decode_block(a[:2048] + b[2048:], 2, RUN)
    assert value < 0
    assert what == "sectors 0-3: write 1:7 (block 2), sectors 4-7: write 2:9 FUA (block 2)"


@settings(max_examples=300)
@given(st.integers(1, BLOCK - 1), st.integers(1, 2 ** 40 - 1), st.integers(1, 2 ** 40 - 1))
def test_a_tear_at_any_byte_never_passes_for_a_write(cut, s1, s2):
    a, b = make_block(RUN, stamp_of(1, s1), 0), make_block(RUN, stamp_of(2, s2), 0)
    torn = a[:cut] + b[cut:]
    assume(torn not in (a, b))  # a cut where both blocks hold the same bytes tears nothing
    value, what = decode_block(torn, 0, RUN)
    assert value < 0 and what


@settings(max_examples=200)
@given(st.integers(0, BLOCK - 1), st.integers(1, 255))
def test_one_flipped_byte_is_seen(pos, x):
    data = bytearray(make_block(RUN, stamp_of(1, 5), 9))
    data[pos] ^= x
    value, what = decode_block(bytes(data), 9, RUN)
    assert value < 0 and ("damaged" in what or "garbage" in what)


def test_another_blocks_or_another_runs_write_is_told_apart():
    s = stamp_of(1, 5)
    assert decode_block(make_block(RUN, s, 8), 9, RUN) == (s, "")  # the checker sees it belongs to block 8
    value, what = decode_block(make_block(RUN + 1, s, 9), 9, RUN)
    assert value < 0 and f"of run {RUN + 1:#x}" in what


def test_equal_contents_get_equal_ids_and_different_ones_different_ids():
    torn = make_block(RUN, 1, 0)[:100] + bytes(BLOCK - 100)
    assert decode_block(torn, 0, RUN)[0] == decode_block(bytes(torn), 0, RUN)[0]
    assert decode_block(torn, 0, RUN)[0] != decode_block(b"\1" + torn[1:], 0, RUN)[0]


def test_the_history_file_round_trips_and_a_cut_file_yields_what_it_holds(tmp_path):
    path = str(tmp_path / "h.hist")
    w = Writer(path)
    w.meta({"run": RUN})
    w.meta({"client": 1, "site": "A", "uri": "nbd://x/vv1", "role": "writer"})
    w.events([(1, WRITE, OK, FUA, 3, stamp_of(1, 1), 100, 200, ""),
              (1, READ, OK, 0, 3, -42, 150, 250, "sectors 0-7: garbage")])
    w.events([(1, WRITE, UNKNOWN, 0, 4, stamp_of(1, 2), 300, 400, "")])
    w.meta({"summary": {"requests": 3}})
    w.close()
    records, meta = read_history(path)
    assert records == [(1, WRITE, OK, FUA, 3, stamp_of(1, 1), 100, 200), (1, READ, OK, 0, 3, -42, 150, 250),
                       (1, WRITE, UNKNOWN, 0, 4, stamp_of(1, 2), 300, 400)]
    assert meta["run"] == RUN and meta["clients"][1]["site"] == "A"
    assert meta["details"] == {-42: "sectors 0-7: garbage"} and meta["summary"] == {"requests": 3}
    data = open(path, "rb").read()
    cut = tmp_path / "cut.hist"
    cut.write_bytes(data[:-60])  # killed while writing: the last batch and the summary are lost
    records, meta = read_history(str(cut))
    assert len(records) == 2 and meta["summary"] == {}


def test_a_file_that_is_no_history_is_refused_by_name(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    try:
        read_history(str(p))
    except ValueError as e:
        assert "is not a history file" in str(e)
    else:
        raise AssertionError("accepted")
