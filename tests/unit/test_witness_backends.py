"""The witness's decisions, one suite for both backends: the built-in witness (``decide.py`` in
the witness process, its clock) and the witness kept in etcd (``etcd_backend.py``, the arrays
deciding against an etcd model whose leases expire on the same virtual clock). Each array's
request is also its sign of life, as with the built-in witness: an array that makes none is
silent. Times are chosen valid for both (the etcd lease counts whole seconds: 4 s by default
where the built-in witness waits 3.65 s).

What only one backend has is tested beside it: the built-in witness forgets liveness when it
restarts (``test_witness_decide.py``); etcd's records and leases survive its members."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.witness import decide
from syncd.witness.decide import GroupRecord, Timing, WitnessError
from syncd.witness.etcd_backend import RECORD_FORMAT, BadRecord, EtcdWitness, NewerRecord, NotRenewed, Record

from .etcd_model import MemoryEtcd

T = Timing(owner_lease=3.0, drift=0.05, margin=0.5, grace=4.5)
GONE = 4.2  # s after the owner's last word: past both backends' wait


class Builtin:
    name = "builtin"

    def __init__(self) -> None:
        self.g = GroupRecord("rcg1", ("A", "B"), owner="A")

    async def start(self) -> None:
        pass

    def _now(self) -> float:
        return trio.current_time()

    async def report(self, node, epoch, *, alive, insync, anew=False):
        return decide.report(self.g, T, self._now(), node, epoch, peer_alive=alive, peer_in_sync=insync,
                             lost_anew=anew)

    async def claim(self, node, epoch):
        return decide.claim(self.g, T, self._now(), node, epoch)

    async def keep(self, node, epoch):
        return decide.keep(self.g, T, self._now(), node, epoch)

    async def handover(self, node, epoch):
        return decide.handover(self.g, T, self._now(), node, epoch)

    async def resolve(self, node, epoch):
        return decide.resolve(self.g, T, self._now(), node, epoch)

    async def state(self):
        return self.g.owner, self.g.epoch, self.g.failover_disabled, self.g.secondary_in_sync


class Etcd:
    name = "etcd"

    def __init__(self) -> None:
        self.store = MemoryEtcd()
        self.w = {n: EtcdWitness(self.store, b"/syncd/pair1", n, T) for n in "AB"}

    async def start(self) -> None:
        await self.w["A"].register("rcg1", ("A", "B"), "A", 1)
        await self.w["B"].register("rcg1", ("A", "B"), "A", 1)  # the second changes nothing
        # B has been watching A's key (as a running pair's secondary has): it sees it move. The
        # built-in witness hears A itself; here B's count of A's silence starts from now.
        await self.w["B"].report("rcg1", 1, peer_alive=True, peer_in_sync=False)
        await self.w["A"].report("rcg1", 1, peer_alive=True, peer_in_sync=False)
        await self.w["A"].renew({"rcg1": (1, False)})
        await self.w["B"].report("rcg1", 1, peer_alive=True, peer_in_sync=False)
        assert self.w["B"].owner_quiet("A") is not None

    async def report(self, node, epoch, *, alive, insync, anew=False):
        # A round of reports, then the array's sign of life (its key moves onto a new lease).
        d = await self.w[node].report("rcg1", epoch, peer_alive=alive, peer_in_sync=insync, lost_anew=anew)
        with contextlib.suppress(NotRenewed):  # the record does not say what it said: no sign of life
            await self.w[node].renew({"rcg1": (epoch, insync)})
        return d

    async def claim(self, node, epoch):
        return await self.w[node].claim("rcg1", epoch)

    async def keep(self, node, epoch):
        return await self.w[node].keep("rcg1", epoch)

    async def handover(self, node, epoch):
        return await self.w[node].handover("rcg1", epoch)

    async def resolve(self, node, epoch):
        return await self.w[node].resolve("rcg1", epoch)

    async def state(self):
        [kv], _ = await self.store.range(b"/syncd/pair1/groups/rcg1")
        r = Record.from_json(kv.value)
        return r.owner, r.epoch, r.failover_disabled, r.secondary_in_sync


@pytest.fixture(params=[Builtin, Etcd], ids=["builtin", "etcd"])
async def w(request):
    b = request.param()
    await b.start()
    return b


async def test_primary_failure_fails_over_once_the_owner_is_silent_long_enough(w, autojump_clock):
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    await w.report("B", 1, alive=True, insync=False)
    await trio.sleep_until(t0 + 2.0)
    d = await w.claim("B", 1)  # A heard 2 s ago: it may still serve
    assert not d.granted and decide.may_grant_later(d.reason), d.reason
    await trio.sleep_until(t0 + GONE)
    d = await w.claim("B", 1)
    assert d.granted and (d.owner, d.epoch) == ("B", 2), d.reason
    assert not (await w.keep("A", 1)).granted  # the old owner comes back: it owns nothing


async def test_a_decision_whose_answer_was_lost_is_the_same_when_asked_again(w, autojump_clock):
    """A request that timed out may still have been carried out (etcd commits what its leader
    logged once a quorum is back; a built-in witness's answer can be lost on the way): asked
    again, the claimant gets the group it was given, and the old owner still owns nothing."""
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    await w.report("B", 1, alive=True, insync=False)
    await trio.sleep_until(t0 + 2.0)
    assert not (await w.claim("B", 1)).granted  # B lost A: too early
    await trio.sleep_until(t0 + GONE)
    first = await w.claim("B", 1)  # carried out; B never heard the answer
    assert first.granted, first.reason
    again = await w.claim("B", 1)  # B still thinks it is at epoch 1
    assert again.granted and (again.owner, again.epoch) == ("B", 2), again.reason
    assert (await w.state())[:2] == ("B", 2)  # granted once: the epoch moved once
    assert not (await w.keep("A", 1)).granted


async def test_a_loss_said_anew_counts_from_that_word_not_from_an_earlier_loss(w, autojump_clock):
    """Found by review (stop 48): B said in time that it lost A; the link came back and went
    again while B was cut off from the witness, and B's next word says the link came up since its
    previous report (REPORT_LOST_ANEW). The loss counts from that word, now more than grace after
    the witness last heard A: to A the witness was lost first, and B's claim is refused."""
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    await w.report("B", 1, alive=True, insync=False)
    await trio.sleep_until(t0 + 3.0)
    await w.report("B", 1, alive=False, insync=False)  # in time: 3 s after A's last word
    await trio.sleep_until(t0 + 5.0)
    await w.report("B", 1, alive=False, insync=False, anew=True)
    await trio.sleep_until(t0 + GONE + 3.0)
    d = await w.claim("B", 1)
    assert not d.granted and "failover disabled" in d.reason, d.reason
    # Without the word anew, the first loss counts, and the claim is granted (the case it fixes).
    w2 = type(w)()
    await w2.start()
    t0 = trio.current_time()
    await w2.report("A", 1, alive=True, insync=True)
    await w2.report("B", 1, alive=True, insync=False)
    await trio.sleep_until(t0 + 3.0)
    await w2.report("B", 1, alive=False, insync=False)
    await trio.sleep_until(t0 + 5.0)
    await w2.report("B", 1, alive=False, insync=False)
    await trio.sleep_until(t0 + GONE + 3.0)
    assert (await w2.claim("B", 1)).granted


async def test_link_failure_the_owner_keeps_the_group_and_the_secondary_cannot_claim(w, autojump_clock):
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    assert (await w.keep("A", 1)).granted  # A lost B, goes on alone
    await trio.sleep_until(t0 + 100)
    d = await w.claim("B", 1)
    assert not d.granted and "not in sync" in d.reason


async def test_witness_lost_first_then_the_link_the_pre_elected_primary_keeps_the_group(w, autojump_clock):
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    for t in (2.0, 4.0, 6.0):  # A cut from the witness: only B reports, and B still reaches A
        await trio.sleep_until(t0 + t)
        await w.report("B", 1, alive=True, insync=False)
    assert (await w.state())[2]  # failover disabled
    await trio.sleep_until(t0 + 20)
    d = await w.claim("B", 1)  # then the link goes
    assert not d.granted and "keeps the group" in d.reason


async def test_a_secondary_cut_off_from_the_witness_too_cannot_claim_long_after(w, autojump_clock):
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    await trio.sleep_until(t0 + 0.5)
    await w.report("B", 1, alive=False, insync=False)  # a flap, then B is cut off too
    await trio.sleep_until(t0 + 10)
    d = await w.claim("B", 1)
    assert not d.granted and "failover disabled" in d.reason
    assert (await w.state())[:2] == ("A", 1)


async def test_a_real_primary_failure_said_in_time_is_granted(w, autojump_clock):
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        await trio.sleep_until(t0 + t)
        await w.report("B", 1, alive=t < 1.0, insync=False)
    await trio.sleep_until(t0 + GONE)
    d = await w.claim("B", 1)
    assert d.granted, d.reason


async def test_an_isolated_primary_loses_the_group(w, autojump_clock):
    t0 = trio.current_time()
    await w.report("A", 1, alive=True, insync=True)
    await trio.sleep_until(t0 + 0.5)
    await w.report("B", 1, alive=True, insync=False)
    await trio.sleep_until(t0 + 1.5)
    await w.report("B", 1, alive=False, insync=False)  # A cut from B and the witness at once
    assert not (await w.state())[2]
    await trio.sleep_until(t0 + GONE)
    assert (await w.claim("B", 1)).granted
    assert not (await w.keep("A", 1)).granted  # if A reaches the witness again, it stays failsafe


async def test_handover_only_by_the_owner_to_an_in_sync_peer(w, autojump_clock):
    await w.report("A", 1, alive=True, insync=False)
    assert not (await w.handover("A", 1)).granted  # B not in sync
    await w.report("A", 1, alive=True, insync=True)
    assert not (await w.handover("B", 1)).granted  # not the owner
    assert not (await w.handover("A", 0)).granted  # stale epoch
    d = await w.handover("A", 1)
    assert d.granted and (d.owner, d.epoch) == ("B", 2)
    await trio.sleep(100)
    assert not (await w.claim("A", 2)).granted  # not until B reports A in sync
    # A report by A right after the handover, before B reported itself, disables nothing.
    await w.report("B", 2, alive=True, insync=False)
    await w.report("A", 2, alive=True, insync=False)
    assert not (await w.state())[2]


async def test_resolve_adopts_only_a_newer_epoch_of_the_operator(w, autojump_clock):
    await w.report("A", 1, alive=True, insync=True)
    assert not (await w.resolve("B", 1)).granted
    assert (await w.resolve("A", 1)).granted and (await w.state())[:2] == ("A", 1)
    d = await w.resolve("B", 3)
    assert d.granted and (await w.state()) == ("B", 3, False, False)
    assert not (await w.resolve("A", 2)).granted and (await w.state())[:2] == ("B", 3)
    assert (await w.keep("B", 3)).granted
    await trio.sleep(100)
    assert not (await w.claim("A", 3)).granted


async def test_a_stranger_is_refused_and_changes_nothing(w, autojump_clock):
    await w.report("A", 1, alive=True, insync=True)
    before = await w.state()
    if w.name == "builtin":
        with pytest.raises(WitnessError, match="not a member"):
            decide.claim(w.g, T, trio.current_time(), "C", 1)
    else:
        with pytest.raises(WitnessError, match="not a member"):
            await EtcdWitness(w.store, b"/syncd/pair1", "C", T).claim("rcg1", 1)
    assert await w.state() == before


KINDS = ["report", "claim", "keep", "handover", "resolve"]
EVENTS = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(["A", "B"]), st.floats(0.0, 3.0),
                            st.booleans(), st.booleans(), st.integers(-1, 2)), max_size=40)


@pytest.mark.parametrize("backend", [Builtin, Etcd], ids=["builtin", "etcd"])
@settings(max_examples=150, deadline=None)
@given(evs=EVENTS)
def test_one_owner_per_epoch_and_epochs_only_grow(backend, evs):
    async def main():
        b = backend()
        await b.start()
        owners = {1: "A"}
        last = 1
        for kind, node, dt, alive, insync, off in evs:
            await trio.sleep(dt)
            epoch = (await b.state())[1] + off
            if kind == "report":
                d = await b.report(node, epoch, alive=alive, insync=insync)
            else:
                d = await getattr(b, kind)(node, epoch)
            owner, now_epoch, disabled, _ = await b.state()
            assert now_epoch >= last
            if now_epoch > last and kind == "resolve":
                assert d.granted and now_epoch == epoch and owner == node
            elif now_epoch > last:
                assert now_epoch == last + 1 and kind in ("claim", "handover") and d.granted
                assert not disabled
            last = now_epoch
            assert owners.setdefault(now_epoch, owner) == owner

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("raw, problem", [
    (b"{", "not JSON"), (b"[]", "not a JSON object"),
    (b'{"members": ["A"], "owner": "A", "epoch": 1}', "members"),
    (b'{"members": ["A", "A"], "owner": "A", "epoch": 1}', "members"),
    (b'{"members": ["A", "B"], "owner": "C", "epoch": 1}', "owner"),
    (b'{"members": ["A", "B"], "owner": "A", "epoch": 0}', "epoch"),
    (b'{"members": ["A", "B"], "owner": "A", "epoch": 1, "secondary_in_sync": "yes"}', "true or false"),
    (b'{"members": ["A", "B"], "owner": "A", "epoch": 1, "watch": {"C": {}}}', "watch of 'C'"),
    (b'{"members": ["A", "B"], "owner": "A", "epoch": 1, "watch": {"B": {"lost": "soon"}}}', "watch of 'B'"),
    (b'{"format": "1", "members": ["A", "B"], "owner": "A", "epoch": 1}', "format"),
    (b'{"format": 0, "members": ["A", "B"], "owner": "A", "epoch": 1}', "format"),
    (b'{"format": true, "members": ["A", "B"], "owner": "A", "epoch": 1}', "format"),
])
def test_a_record_that_is_not_syncds_is_refused_by_name(raw, problem):
    with pytest.raises(BadRecord, match=problem):
        Record.from_json(raw)


async def test_a_tampered_record_stops_decisions_and_is_not_overwritten(autojump_clock):
    b = Etcd()
    await b.start()
    key = b"/syncd/pair1/groups/rcg1"
    from syncd.witness.etcd import put

    await b.store.txn([], [put(key, b'{"members": ["A", "B"], "owner": "Z", "epoch": 1}')])
    with pytest.raises(WitnessError, match="not syncd's: owner"):
        await b.claim("B", 1)
    [kv], _ = await b.store.range(key)
    assert b'"Z"' in kv.value


async def test_a_record_of_a_newer_format_stops_decisions_and_is_left_as_it_is(autojump_clock):
    """A later syncd's record (a format this node does not read): this node would drop what it
    does not know if it rewrote it. It refuses every decision on it, saying to upgrade, and
    writes nothing, not even when it registers the group."""
    b = Etcd()
    await b.start()
    key = b"/syncd/pair1/groups/rcg1"
    from syncd.witness.etcd import put

    [kv], _ = await b.store.range(key)
    newer = json.loads(kv.value)
    newer.update(format=RECORD_FORMAT + 1, quorum_of_three=["A", "B", "C"])
    raw = json.dumps(newer).encode()
    await b.store.txn([], [put(key, raw)])
    [before], _ = await b.store.range(key)
    for ask in (b.claim("B", 1), b.keep("A", 1), b.report("A", 1, alive=True, insync=True),
                b.handover("A", 1), b.resolve("B", 2)):
        with pytest.raises(WitnessError, match=f"format {RECORD_FORMAT + 1}, written by a newer syncd.*upgrade"):
            await ask
    await b.w["A"].register("rcg1", ("A", "B"), "A", 1)
    [after], _ = await b.store.range(key)
    assert (after.value, after.mod_revision) == (raw, before.mod_revision)
    with pytest.raises(NewerRecord):
        Record.from_json(raw)


async def test_a_record_without_a_format_is_read_as_format_1_and_gains_it_when_it_changes(autojump_clock):
    """Records written by syncd before the format field (the same fields, no "format") still
    work, and the first decision that changes one writes it with the format."""
    b = Etcd()
    await b.start()
    key = b"/syncd/pair1/groups/rcg1"
    from syncd.witness.etcd import put

    [kv], _ = await b.store.range(key)
    assert json.loads(kv.value)["format"] == RECORD_FORMAT
    old = json.loads(kv.value)
    del old["format"]
    await b.store.txn([], [put(key, json.dumps(old).encode())])
    assert (await b.state()) == ("A", 1, False, False)
    await b.report("A", 1, alive=True, insync=True)  # the owner says its peer is in sync: a change
    [kv], _ = await b.store.range(key)
    assert json.loads(kv.value)["format"] == RECORD_FORMAT and (await b.state())[3] is True


async def test_a_lost_race_reads_again_and_one_claim_or_keep_wins(autojump_clock):
    """The owner going on alone and its peer claiming at once: the revision check lets exactly
    one change the record; the other decides again on what the first wrote."""
    b = Etcd()
    await b.start()
    t0 = trio.current_time()
    await b.report("A", 1, alive=True, insync=True)
    await trio.sleep_until(t0 + 0.5)
    await b.report("B", 1, alive=False, insync=False)
    await trio.sleep_until(t0 + GONE)
    out = {}

    async def run(kind, node):
        out[kind] = await getattr(b, kind)(node, 1)

    async with trio.open_nursery() as n:
        n.start_soon(run, "keep", "A")  # A touches its lease first: its key is back
        n.start_soon(run, "claim", "B")
    assert [out["keep"].granted, out["claim"].granted].count(True) == 1, out
    owner, epoch, _, _ = await b.state()
    assert (owner, epoch) in (("A", 1), ("B", 2))
