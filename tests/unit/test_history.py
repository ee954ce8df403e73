"""The history checker: hand-made histories of each violation, generated legal histories that must
pass, the same histories mutated that must fail, and the sweep against a brute-force reading of
the definitions."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from syncd.lab.history import INITIAL, Event, Kind, Op, Outcome, check

OK, ERROR, UNKNOWN = Outcome.OK, Outcome.ERROR, Outcome.UNKNOWN


def W(value, invoke, complete, outcome=OK, block=0, client=1, site="A"):
    return Event(client, site, Op.WRITE, block, value, invoke, complete, outcome)


def R(value, invoke, complete, outcome=OK, block=0, client=9, site="B"):
    return Event(client, site, Op.READ, block, value, invoke, complete, outcome)


def kinds(report):
    return {k: n for k, n in report.violations.items() if n}


# ---- hand-made histories ---------------------------------------------------------------------

def test_a_sequential_history_passes_and_is_counted():
    r = check([W(1, 0, 10), R(1, 11, 12), W(2, 20, 30), R(2, 31, 40), R(2, 41, 42, site="A")],
              {"A": {0: 2}, "B": {0: 2}})
    assert r.ok and kinds(r) == {}
    assert (r.reads, r.writes_ok, r.blocks, r.readbacks) == (3, 2, 1, 2)
    assert r.per_site["B"]["reads"] == 2 and r.per_site["A"]["writes_ok"] == 2


def test_reading_a_value_superseded_before_the_read_began_is_a_stale_read():
    w1, w2, r = W(1, 0, 10), W(2, 20, 30, client=2, site="A/shim"), R(1, 40, 50)
    rep = check([w1, w2, r])
    assert kinds(rep) == {Kind.STALE_READ: 1}
    v = rep.examples[0]
    assert (v.read, v.source, v.superseded_by, v.where) == (r, w1, w2, "B")
    assert "superseded by write 0x2 by client 2 at A/shim" in v.text
    assert rep.by_site[(Kind.STALE_READ, "B")] == 1


def test_a_short_write_that_completes_inside_a_long_one_still_supersedes():
    # Acknowledged writes before the read, in completion order: 1, 3, 2. The last to complete
    # (2) was invoked before 1 completed, so it does not supersede 1; 3 does.
    rep = check([W(1, 0, 10), W(2, 5, 100, client=2), W(3, 50, 60, client=3), R(1, 110, 120)])
    assert kinds(rep) == {Kind.STALE_READ: 1}
    assert rep.examples[0].superseded_by.value == 3


def test_reading_the_initial_zeroes_after_an_acknowledged_write_is_stale():
    rep = check([W(1, 0, 10), R(INITIAL, 11, 12)])
    assert kinds(rep) == {Kind.STALE_READ: 1}
    assert "the initial zeroes" in rep.examples[0].text


@pytest.mark.parametrize("history,final", [
    ([W(1, 0, 10), W(2, 20, 30), R(1, 25, 50)], 2),  # the newer write completed only after the read began
    ([W(1, 0, 10), W(2, 20, 30), R(1, 30, 50)], 2),  # ... at the same nanosecond: not before it
    ([W(1, 0, 25), W(2, 20, 30), R(1, 40, 50)], 1),  # the writes overlap: 1 may take effect after 2
    ([W(1, 0, 10), W(2, 20, 30, ERROR), R(1, 40, 50)], 1),  # a failed write may not have happened
    ([W(1, 0, 10), W(2, 20, 30, ERROR), R(2, 40, 50)], 2),  # ... or may have
    ([W(1, 0, 10, UNKNOWN), W(2, 20, 30), R(1, 40, 50)], 1),  # an unanswered write may land late
    ([W(1, 0, 10), R(1, 5, 6)], 1),  # a write in flight may be seen
    ([W(1, 0, 10), R(INITIAL, 5, 6)], 1),  # ... or not
    ([W(1, 0, 10), W(2, 20, 30), R(2, 0, 50)], 2),  # the read overlaps both
    ([W(1, 0, 10), W(2, 20, 30), R(1, 0, 50, ERROR), R(-7, 0, 50, UNKNOWN)], 2),  # failed reads return nothing
])
def test_what_a_concurrent_or_failed_write_allows_is_no_violation(history, final):
    rep = check(history, {"A": {0: final}, "B": {0: final}})
    assert rep.ok, rep.lines()


def test_new_old_inversion_between_reads_is_allowed_by_the_promise():
    # The primary applies a write before its peer: a read there sees it, a later read at the
    # peer does not yet; the write is acknowledged only after both. Not linearizable, but no
    # acknowledged write had superseded the older value when the second read began.
    rep = check([W(1, 0, 10), W(2, 20, 100), R(2, 30, 40, site="A"), R(1, 50, 60, site="B")])
    assert rep.ok


@pytest.mark.parametrize("read,why", [
    (R(-12345, 40, 50), "no write issued it"),
    (R(77, 40, 50), "no write issued this stamp"),
    (R(3, 40, 50), "write to block 1"),
    (R(4, 40, 50), "invoked only after the read completed"),
])
def test_a_value_no_write_could_have_put_there_is_never_written(read, why):
    rep = check([W(1, 0, 10), W(3, 0, 10, block=1), W(4, 60, 70), read])
    assert kinds(rep) == {Kind.NEVER_WRITTEN: 1}
    assert why in rep.examples[0].text


def test_an_undecodable_read_shows_what_the_recorder_saw():
    torn = Event(9, "A", Op.READ, 0, -99, 40, 50, OK, "sectors 0-3: write 1:7, sectors 4-7: write 2:9")
    rep = check([W(1, 0, 10), torn])
    assert "undecodable data (sectors 0-3: write 1:7, sectors 4-7: write 2:9)" in rep.examples[0].text


def test_a_replica_holding_a_superseded_value_lost_an_acknowledged_write():
    rep = check([W(1, 0, 10), W(2, 20, 30)], {"A": {0: 2}, "B": {0: 1}})
    assert kinds(rep) == {Kind.LOST_WRITE: 1, Kind.REPLICAS_DIFFER: 1}
    lost = next(v for v in rep.examples if v.kind is Kind.LOST_WRITE)
    assert lost.where == "replica B" and lost.superseded_by is not None and lost.superseded_by.value == 2


def test_a_replica_still_zero_after_an_acknowledged_write_lost_it():
    rep = check([W(1, 0, 10)], {"A": {0: INITIAL}, "B": {0: INITIAL}})
    assert kinds(rep) == {Kind.LOST_WRITE: 2}


def test_replicas_may_hold_any_write_not_superseded_but_must_agree():
    h = [W(1, 0, 10), W(2, 20, 30), W(3, 25, 35), W(4, 40, 50, UNKNOWN)]
    for v in (2, 3, 4):
        assert check(h, {"A": {0: v}, "B": {0: v}}).ok
    rep = check(h, {"A": {0: 2}, "B": {0: 3}})
    assert kinds(rep) == {Kind.REPLICAS_DIFFER: 1} and "A: value 0x2, B: value 0x3" in rep.examples[0].text


def test_blocks_no_request_touched_must_read_back_as_zeroes_on_every_replica():
    rep = check([W(1, 0, 10)], {"A": {0: 1, 5: INITIAL, 6: -3}, "B": {0: 1, 5: INITIAL, 6: -3}})
    assert kinds(rep) == {Kind.NEVER_WRITTEN: 2}
    assert "no write touched it" in rep.examples[0].text


def test_examples_are_the_earliest_few_of_each_kind():
    h = [W(1, 0, 10)] + [R(INITIAL, 100 + i, 101 + i) for i in range(50)] + [R(-1, 20, 30)]
    rep = check(h, examples=3)
    assert rep.violations[Kind.STALE_READ] == 50 and rep.violations[Kind.NEVER_WRITTEN] == 1
    stale = [v for v in rep.examples if v.kind is Kind.STALE_READ]
    assert [v.at for v in stale] == [100, 101, 102]
    text = "\n".join(rep.lines())
    assert "stale read: 50 (B: 50)" in text and "value never written: 1" in text


def test_violations_close_in_time_at_one_place_form_one_episode():
    s = 1_000_000_000
    h = [W(1, 0, 10)] + [R(INITIAL, 100 + i * s // 2, 101 + i * s // 2) for i in range(4)]  # 0.5 s apart
    h += [R(INITIAL, 10 * s, 10 * s + 1), R(INITIAL, 10 * s, 10 * s + 1, site="A")]
    rep = check(h)
    assert [(e.where, e.count, e.first, e.last) for e in rep.episodes] == [
        ("B", 4, 100, 100 + 3 * s // 2), ("A", 1, 10 * s, 10 * s), ("B", 1, 10 * s, 10 * s)]
    assert rep.episodes[0].example.at == 100
    assert "3 episode(s)" in "\n".join(rep.lines())


@pytest.mark.parametrize("history,replicas,message", [
    ([W(1, 0, 10), W(1, 20, 30, client=2)], None, "written twice"),
    ([W(0, 0, 10)], None, "stamps are > 0"),
    ([R(1, 10, 5)], None, "completed before it was invoked"),
    ([W(1, 0, 10)], {"A": {}}, "replica A was not read back at block 0"),
    ([W(1, 0, 10)], {"A": {0: 1, 1: 0}, "B": {0: 1}}, "but not from B"),
])
def test_a_history_that_cannot_be_checked_is_refused_by_name(history, replicas, message):
    with pytest.raises(ValueError, match=message):
        check(history, replicas)


# ---- generated legal histories, and mutations of them ---------------------------------------

@st.composite
def legal_histories(draw, max_ops=40):
    """Requests on a few blocks whose values come from a linearizable register: every applied
    request takes effect at one instant (its linearization point) inside its interval; failed or
    unanswered writes take effect at some instant after their invoke, or never."""
    nblocks = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_ops))
    ops = []
    for i in range(n):
        block = draw(st.integers(0, nblocks - 1))
        write = draw(st.booleans())
        invoke = draw(st.integers(0, 1000))
        complete = invoke + draw(st.integers(0, 200))
        outcome = draw(st.sampled_from([OK, OK, OK, ERROR, UNKNOWN]))
        if outcome is OK:
            point = draw(st.integers(invoke, complete))
        elif write and draw(st.booleans()):
            point = draw(st.integers(invoke, invoke + 2000))  # applied, possibly late
        else:
            point = None
        ops.append([i, block, write, invoke, complete, outcome, point])
    stamp = {op[0]: 100 + op[0] for op in ops}
    value = {b: INITIAL for b in range(nblocks)}
    seen = {}
    placed = sorted((o for o in ops if o[6] is not None), key=lambda o: (o[6], o[0]))
    for i, block, write, _inv, _comp, _out, _point in placed:
        if write:
            value[block] = stamp[i]
        else:
            seen[i] = value[block]
    events = []
    for i, block, write, invoke, complete, outcome, _point in ops:
        client = draw(st.integers(1, 4))
        site = draw(st.sampled_from(["A", "B", "A/shim", "B/shim"]))
        if write:
            events.append(Event(client, site, Op.WRITE, block, stamp[i], invoke, complete, outcome))
        else:
            v = seen.get(i, draw(st.sampled_from([INITIAL, -5, 999999])))  # a failed read returns nothing
            events.append(Event(client, site, Op.READ, block, v, invoke, complete, outcome))
    replica = {b: value[b] for b in range(nblocks)}
    return events, {"A": dict(replica), "B": dict(replica)}


@settings(max_examples=400, deadline=None)
@given(legal_histories())
def test_every_legal_history_passes(h):
    events, replicas = h
    rep = check(events, replicas)
    assert rep.ok, rep.lines()
    assert rep.reads + rep.reads_failed + rep.writes_ok + rep.writes_error + rep.writes_unknown == len(events)


def _done(e):
    return e.complete if e.outcome is OK else float("inf")


def _superseded_values(events, block, before):
    """Values of ``block`` some OK write acknowledged before ``before`` had superseded."""
    writes = [e for e in events if e.op is Op.WRITE and e.block == block]
    newer = [w for w in writes if w.outcome is OK and w.complete < before]
    out = []
    if newer:
        out.append(INITIAL)
    out += [w.value for w in writes if any(_done(w) < n.invoke for n in newer)]
    return out


@settings(max_examples=200, deadline=None)
@given(legal_histories(), st.data())
def test_a_read_made_stale_is_found(h, data):
    events, replicas = h
    reads = [i for i, e in enumerate(events) if e.op is Op.READ and e.outcome is OK]
    assume(reads)
    i = data.draw(st.sampled_from(reads))
    r = events[i]
    stale = _superseded_values(events, r.block, r.invoke)
    assume(stale)
    events[i] = Event(r.client, r.site, Op.READ, r.block, data.draw(st.sampled_from(stale)), r.invoke, r.complete, OK)
    rep = check(events, replicas)
    assert rep.violations[Kind.STALE_READ] >= 1


@settings(max_examples=200, deadline=None)
@given(legal_histories(), st.data())
def test_a_read_given_a_value_nobody_wrote_is_found(h, data):
    events, _ = h
    reads = [i for i, e in enumerate(events) if e.op is Op.READ and e.outcome is OK]
    assume(reads)
    i = data.draw(st.sampled_from(reads))
    r = events[i]
    bad = data.draw(st.sampled_from([-1, -(2 ** 50), 10 ** 9]))
    events[i] = Event(r.client, r.site, Op.READ, r.block, bad, r.invoke, r.complete, OK)
    assert check(events).violations[Kind.NEVER_WRITTEN] == 1


@settings(max_examples=120, deadline=None)
@given(legal_histories(), st.data())
def test_a_replica_missing_an_acknowledged_write_is_found(h, data):
    events, replicas = h
    blocks = sorted({e.block for e in events if e.op is Op.WRITE and e.outcome is OK})
    assume(blocks)
    block = data.draw(st.sampled_from(blocks))
    stale = _superseded_values(events, block, float("inf"))
    assume(stale)
    replicas["B"][block] = data.draw(st.sampled_from(stale))
    rep = check(events, replicas)
    assert rep.violations[Kind.LOST_WRITE] == 1
    assert rep.violations[Kind.REPLICAS_DIFFER] == (replicas["A"][block] != replicas["B"][block])


@settings(max_examples=100, deadline=None)
@given(legal_histories(), st.data())
def test_replicas_that_differ_are_found(h, data):
    events, replicas = h
    block = data.draw(st.sampled_from(sorted(replicas["A"])))
    replicas["A"][block] = -77
    rep = check(events, replicas)
    assert rep.violations[Kind.REPLICAS_DIFFER] == 1 and rep.violations[Kind.NEVER_WRITTEN] == 1


# ---- the sweep against the definitions read literally ----------------------------------------

def brute_force(events):
    """Stale and never-written reads by the definitions, pair by pair (O(n^2))."""
    writes = {e.value: e for e in events if e.op is Op.WRITE}
    stale = never = 0
    for r in events:
        if r.op is not Op.READ or r.outcome is not OK:
            continue
        if r.value != INITIAL:
            w = writes.get(r.value)
            if w is None or w.block != r.block or w.invoke > r.complete:
                never += 1
                continue
        done = float("-inf") if r.value == INITIAL else _done(writes[r.value])
        if any(w.op is Op.WRITE and w.block == r.block and w.outcome is OK and w.complete < r.invoke
               and w.invoke > done for w in events):
            stale += 1
    return stale, never


@st.composite
def any_histories(draw):
    """Arbitrary (mostly illegal) histories: reads return any value."""
    n = draw(st.integers(1, 40))
    events = []
    for i in range(n):
        invoke = draw(st.integers(0, 300))
        complete = invoke + draw(st.integers(0, 100))
        block = draw(st.integers(0, 1))
        outcome = draw(st.sampled_from([OK, OK, ERROR, UNKNOWN]))
        if draw(st.booleans()):
            events.append(Event(1, "A", Op.WRITE, block, 1 + i, invoke, complete, outcome))
        else:
            events.append(Event(2, "B", Op.READ, block, draw(st.integers(-2, n + 2)), invoke, complete, outcome))
    return events


@settings(max_examples=1000, deadline=None)
@given(any_histories())
def test_the_sweep_finds_exactly_what_the_definitions_say(events):
    rep = check(events)
    assert (rep.violations[Kind.STALE_READ], rep.violations[Kind.NEVER_WRITTEN]) == brute_force(events)
