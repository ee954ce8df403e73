"""An array's key in etcd (``P/alive/NODE``) lives no longer than the array counts: a lease's
TTL after the answer to its grant, whatever becomes of the requests after it (``etcd_backend``,
``EtcdWitness.touch``). Driven in virtual time against the etcd model, with a network that loses
answers and delivers requests late, as a lossy link or a member regaining its quorum does.

A keepalive would fail this: etcd restarts a lease's TTL when it takes the keepalive, so one
delivered late keeps the key past anything the array counted (the late request of
docs/failover-plan.md rule 4)."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio

from syncd.witness.decide import Decision, Timing
from syncd.witness.etcd import EtcdError, EtcdUnreachable, cmp_mod, put
from syncd.witness.etcd_backend import EtcdWitness, NotRenewed

from .etcd_model import MemoryEtcd

T = Timing(owner_lease=3.0, drift=0.05, margin=0.5, grace=4.5)
PREFIX = b"/syncd/pair1"
KEY = PREFIX + b"/alive/A"


class LateNet:
    """Between an array and etcd: each call is answered, or taken by etcd with its answer lost,
    or held in the network and taken up to ``hold`` seconds later (the caller hears nothing)."""

    def __init__(self, store: MemoryEtcd, rng: random.Random, nursery: trio.Nursery, hold: float) -> None:
        self.store, self.rng, self.nursery, self.hold = store, rng, nursery, hold
        self.late = 0

    async def _call(self, name: str, *args):
        fate = self.rng.random()
        if fate < 0.2:
            async def later() -> None:
                await trio.sleep(self.rng.uniform(0, self.hold))
                try:
                    await getattr(self.store, name)(*args)
                    self.late += 1
                except EtcdError:
                    pass  # a put on a lease that expired meanwhile: refused, nothing changed
            self.nursery.start_soon(later)
            await trio.sleep(1.0)  # the client's timeout
            raise EtcdUnreachable("model: no answer")
        ans = await getattr(self.store, name)(*args)
        if fate < 0.35:
            raise EtcdUnreachable("model: the answer was lost")
        return ans

    async def range(self, *args):
        return await self._call("range", *args)

    async def txn(self, *args):
        return await self._call("txn", *args)

    async def lease_grant(self, *args):
        return await self._call("lease_grant", *args)


def present(store: MemoryEtcd) -> bool:
    store._check()  # the model expires leases when asked
    return KEY in store.kv


async def touch_until(w: EtcdWitness, stop: float, rng: random.Random, pauses: tuple[float, ...]) -> None:
    """The array's sign of life until ``stop``, whatever the network does to each request."""
    while trio.current_time() < stop:
        try:
            await w.touch()
        except (EtcdUnreachable, EtcdError):
            pass
        await trio.sleep(rng.choice(pauses))


@pytest.mark.parametrize("seed", range(12))
async def test_a_late_or_unanswered_request_never_keeps_the_key_past_the_last_answered_grant(seed, autojump_clock):
    rng = random.Random(seed)
    store = MemoryEtcd()
    granted: list[float] = []
    checks = 0
    async with trio.open_nursery() as n:
        net = LateNet(store, rng, n, hold=8.0)
        w = EtcdWitness(net, PREFIX, "A", T, renew=0.25)
        w.on_grant = granted.append
        stop = trio.current_time() + 30

        async def checker() -> None:
            nonlocal checks
            while trio.current_time() < stop + 12:
                if present(store):
                    # etcd holds A alive only within a TTL of a grant A heard the answer to.
                    now = trio.current_time()
                    assert granted and now < granted[-1] + w.ttl, (seed, now, granted[-3:])
                checks += 1
                await trio.sleep(0.05)

        n.start_soon(checker)
        await touch_until(w, stop, rng, (0.1, 0.5, 0.5, 2.0, 6.0))
    assert checks > 500 and granted and net.late > 0  # requests did reach etcd late
    assert not present(store)  # and it went once A stopped


@pytest.mark.parametrize("seed", range(12))
async def test_with_etcd_expiry_lag_and_a_leader_change_the_key_goes_within_owner_heard_for(seed, autojump_clock):
    """What etcd adds to a lease's TTL: its expiry check and revoke (up to 1 s) and a new leader,
    which gives every lease its whole TTL again plus the election timeout. The key is gone (and
    so can move no more) 2 × (TTL + 1 s) + the election timeout after the array's last answered
    grant, with one leader change anywhere in between: ``owner_heard_for`` without ``grace``."""
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EXPIRY_LAG, EtcdWitnessConfig

    rng = random.Random(seed)
    cfg = EtcdWitnessConfig(EtcdConfig(("http://x:1",)), "/p", election_timeout=1.0)
    store = MemoryEtcd(expiry_lag=rng.uniform(0.5, EXPIRY_LAG))
    granted: list[float] = []
    async with trio.open_nursery() as n:
        net = LateNet(store, rng, n, hold=8.0)
        w = EtcdWitness(net, PREFIX, "A", T, renew=cfg.interval / 2)
        assert w.ttl == cfg.lease_ttl()
        w.on_grant = granted.append
        stop = trio.current_time() + rng.uniform(5, 20)  # A's last touch
        election = stop + rng.uniform(-2, w.ttl + EXPIRY_LAG)  # as late as a lease can still be refreshed

        async def checker() -> None:
            elected = False
            while trio.current_time() < stop + 2 * cfg.owner_heard_for():
                if not elected and trio.current_time() >= election:
                    store.elect(cfg.election_timeout)
                    elected = True
                if present(store):
                    now = trio.current_time()
                    life = cfg.owner_heard_for() - cfg.grace
                    assert granted and now < granted[-1] + life, (seed, now, granted[-3:])
                await trio.sleep(0.05)

        n.start_soon(checker)
        await touch_until(w, stop, rng, (0.1, 0.5, 0.5, 2.0))
    assert granted and not present(store)


async def test_an_attach_delivered_late_cannot_move_the_key_back_to_an_older_lease(autojump_clock):
    store = MemoryEtcd()
    w = EtcdWitness(store, PREFIX, "A", T)
    assert await w.touch() is True  # this process's first word: nothing known of it before
    first_rev, first_lease = w.alive_rev, w.lease
    await trio.sleep(1.0)
    assert await w.touch() is False
    assert store.kv[KEY].lease == w.lease != first_lease
    # The first attach again, as if held in the network until now: its compare fails.
    res = await store.txn([cmp_mod(KEY, 0)], [put(KEY, b"1", first_lease)])
    assert not res.succeeded
    old = await store.txn([cmp_mod(KEY, first_rev)], [put(KEY, b"1", first_lease)])
    assert not old.succeeded and store.kv[KEY].lease == w.lease
    # Past the first lease's TTL, a put on it is refused whole and changes nothing.
    await trio.sleep(w.ttl - 0.5)  # the first lease is gone, the second not yet
    assert present(store)
    before = dict(store.kv), store.rev
    with pytest.raises(EtcdError, match="lease not found"):
        await store.txn([], [put(KEY, b"1", first_lease)])
    assert (dict(store.kv), store.rev) == before


async def test_fresh_when_the_key_had_gone_or_the_process_is_new_and_one_lease_per_renew(autojump_clock):
    store = MemoryEtcd()
    grants: list[float] = []
    w = EtcdWitness(store, PREFIX, "A", T, renew=0.25)
    w.on_grant = grants.append
    assert await w.touch() is True
    assert await w.touch() is False and len(grants) == 1  # within renew: the same lease
    await trio.sleep(0.3)
    assert await w.touch() is False and len(grants) == 2
    await trio.sleep(w.ttl + 0.1)  # silent: etcd drops the key
    assert KEY not in store.kv or not present(store)
    assert await w.touch() is True and present(store)
    # A restarted process finds its previous run's key: it takes it over, and says it is fresh
    # (the witness knows nothing of what this process did before).
    again = EtcdWitness(store, PREFIX, "A", T)
    assert await again.touch() is True
    assert store.kv[KEY].lease == again.lease
    # The earlier process's next attach no longer matches the key: it reads it and takes it back
    # (only one runs in practice; what counts is that no attach is blind).
    await trio.sleep(0.3)
    assert await w.touch() is False and store.kv[KEY].lease == w.lease


class LoseOne:
    """Passes calls to the store; the ``lose``-th txn from now is taken by etcd (``taken``) or
    not, and its answer lost."""

    def __init__(self, store: MemoryEtcd) -> None:
        self.store, self.n, self.lose, self.taken = store, 0, 0, True

    async def range(self, *a):
        return await self.store.range(*a)

    async def lease_grant(self, *a):
        return await self.store.lease_grant(*a)

    async def txn(self, *a):
        self.n += 1
        if self.n == self.lose:
            if self.taken:
                await self.store.txn(*a)
            raise EtcdUnreachable("model: the answer was lost")
        return await self.store.txn(*a)


async def rnd(w: EtcdWitness, epoch: int = 1, *, alive: bool, insync: bool) -> Decision:
    """One round of a node's client: its report, then its sign of life (``EtcdWitnessClient``)."""
    d = await w.report("g1", epoch, peer_alive=alive, peer_in_sync=insync)
    with contextlib.suppress(NotRenewed):
        await w.renew({"g1": (epoch, insync)})
    return d


async def pair(store, kv_b=None) -> tuple[EtcdWitness, EtcdWitness]:
    """A (owner of g1) and B, a few rounds in: B has seen A's key move."""
    a = EtcdWitness(store, PREFIX, "A", T, renew=0.25)
    b = EtcdWitness(kv_b or store, PREFIX, "B", T, renew=0.25)
    await a.register("g1", ("A", "B"), "A", 1)
    for _ in range(3):
        await rnd(a, alive=True, insync=True)
        await rnd(b, alive=True, insync=True)
        await trio.sleep(0.5)
    assert b.owner_quiet("A") is not None and b.owner_quiet("A") <= 1.0
    return a, b


@pytest.mark.parametrize("lost", ["taken", "not taken", "none"])
async def test_a_key_found_gone_keeps_the_array_fresh_even_if_the_attach_after_it_is_lost(lost, autojump_clock):
    """Found by review: B's key had gone (B cut off from etcd past its TTL), its next renewal
    saw so, then the attach's answer was lost. The renewal after it found the key as that attach
    left it (or gone again) and said nothing of the gap. Whatever is lost, B's first word that
    it lost A after so long is late: it has not seen A's key move for longer than grace."""
    store = MemoryEtcd()
    kv = LoseOne(store)
    a, b = await pair(store, kv)
    await trio.sleep(30)  # both cut off far past any TTL: both keys gone
    assert not present(store)
    if lost != "none":
        kv.lose, kv.taken = kv.n + 3, lost == "taken"  # report: read, write; renew: the attach
        with pytest.raises(EtcdUnreachable):
            await rnd(b, alive=False, insync=False)
    await trio.sleep(0.5)
    await rnd(b, alive=False, insync=False)  # B's first recorded word: lost A
    d = await b.claim("g1", 1)
    assert not d.granted and "cut off from the witness meanwhile" in d.reason, d


@pytest.mark.parametrize("elect", [False, True])
async def test_the_peer_cut_off_from_etcd_cannot_claim_while_the_primary_counts_itself_pre_elected(
        elect, autojump_clock):
    """Found by review. A is cut off from etcd; B's last report sees A's key just before it goes,
    then B is cut off from etcd too, with its own key alive. One etcd leader change just before
    B's lease is revoked gives it its TTL again. A, counting ``owner_heard_for`` from its last
    answer, takes itself for pre-elected once the link goes: B's claim must then be refused,
    with or without the leader change."""
    from syncd.node.roles import WitnessTiming
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EXPIRY_LAG, EtcdWitnessConfig

    cfg = EtcdWitnessConfig(EtcdConfig(("http://x:1",)), "/p", election_timeout=1.0)
    store = MemoryEtcd(expiry_lag=EXPIRY_LAG)
    b_grants: list[float] = []
    a, b = await pair(store)
    b.on_grant = b_grants.append
    assert (await rnd(a, alive=True, insync=True)).granted
    c = trio.current_time()  # A's last answer: A is cut off from etcd from now on
    while True:  # B reports while A's key is there; its last report sees it
        await trio.sleep(0.5)
        if not present(store):
            break
        await rnd(b, alive=True, insync=True)
    # B is cut off from etcd now. A leader change just before B's lease would be revoked.
    await trio.sleep_until(b_grants[-1] + b.ttl + EXPIRY_LAG - 0.05)
    if elect:
        store.elect(cfg.election_timeout)
    t = WitnessTiming(owner_heard_for=cfg.owner_heard_for())
    # The link goes so that A counts itself pre-elected; B notices up to link_notice earlier.
    await trio.sleep_until(c + t.lost_first_after() - t.link_notice + 0.1)
    await rnd(b, alive=False, insync=False)
    await trio.sleep(t.claim_after_link_loss())
    d = await b.claim("g1", 1)
    assert not d.granted, d


async def _alone_after_etcd_and_link_loss(store: MemoryEtcd):
    """A and B report in sync; etcd loses its quorum; the link goes long enough after that for A
    to count itself pre-elected: A goes on alone (its record still says B in sync)."""
    from syncd.node.roles import WitnessTiming
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EtcdWitnessConfig

    cfg = EtcdWitnessConfig(EtcdConfig(("http://x:1",)), "/p", election_timeout=1.0)
    a, b = await pair(store)
    store.reachable = False
    t = WitnessTiming(owner_heard_for=cfg.owner_heard_for())
    await trio.sleep(t.lost_first_after() + 2)  # the link went meanwhile: A is alone, pre-elected
    return a, b, cfg


async def test_etcd_back_with_the_alone_primary_cut_off_from_it_does_not_give_the_peer_the_group(autojump_clock):
    """Found by review. etcd regains its quorum while A (alone since the link went) is cut off
    from it: the new leader gives A's old lease its TTL again. A's key is there but does not
    move: B's word that it lost A is late, and its claim is refused, before and after the key
    expires. (The key being there was taken for a sign of life before: the claim was granted
    once it expired. The built-in witness refuses here: it has not heard A since it started.)"""
    store = MemoryEtcd()
    a, b, cfg = await _alone_after_etcd_and_link_loss(store)
    store.quorum_back(cfg.election_timeout)  # A stays cut off from etcd
    for _ in range(int(3 * cfg.owner_heard_for())):
        await rnd(b, alive=False, insync=False)
        d = await b.claim("g1", 1)
        assert not d.granted, d
        await trio.sleep(0.5)


class Partial:
    """A's way to etcd: every call passes until ``cut``; the ``lose``-th txn from now is not
    taken, and etcd is out of reach from then on."""

    def __init__(self, store: MemoryEtcd) -> None:
        self.store, self.n, self.lose, self.cut = store, 0, 0, False

    async def range(self, *a):
        if self.cut:
            raise EtcdUnreachable("model: cut off")
        return await self.store.range(*a)

    async def lease_grant(self, *a):
        if self.cut:
            raise EtcdUnreachable("model: cut off")
        return await self.store.lease_grant(*a)

    async def txn(self, *a):
        self.n += 1
        if self.cut or self.n == self.lose:
            self.cut = True
            raise EtcdUnreachable("model: cut off")
        return await self.store.txn(*a)


async def test_the_alone_primary_s_key_does_not_move_while_its_report_is_not_recorded(autojump_clock):
    """Found by review. etcd is back and A (alone) reaches it for part of a round: the report
    saying B is no longer in sync is lost, and A is cut off again. Its key does not move (the
    move requires the record to say what A says now), so B's word that it lost A is late and its
    claim refused. (The key moved before any report: the claim was granted once it expired.)
    And when the report does get through, the record says B is not in sync."""
    store = MemoryEtcd()
    a, b, cfg = await _alone_after_etcd_and_link_loss(store)
    a.kv = net = Partial(store)
    await trio.sleep(3 * cfg.owner_heard_for())
    store.reachable = True  # back, and everything from before the outage is long expired
    net.lose = net.n + 2  # A's round: the record read answered, its write lost
    with pytest.raises(EtcdUnreachable):
        await rnd(a, alive=False, insync=False)
    assert not present(store)
    for _ in range(int(3 * cfg.owner_heard_for())):
        await rnd(b, alive=False, insync=False)
        d = await b.claim("g1", 1)
        assert not d.granted, d
        await trio.sleep(0.5)
    # The renewal alone, with the record still saying B in sync: refused, nothing moves.
    a.kv, net.cut = store, False
    with pytest.raises(NotRenewed):
        await a.renew({"g1": (1, False)})
    assert not present(store)
    await rnd(a, alive=False, insync=False)
    assert present(store) and (await b.claim("g1", 1)).reason.endswith("was not in sync when A last reported")


async def test_a_renewal_racing_a_record_change_does_not_move_the_key(autojump_clock):
    """The key moves only if every record the array owns is as its last request left it: a
    change in between (here B's report) makes the move wait for the next round."""
    store = MemoryEtcd()
    a, b = await pair(store)
    await a.report("g1", 1, peer_alive=True, peer_in_sync=True)
    rev = store.kv[KEY].mod_revision
    await b.report("g1", 1, peer_alive=False, peer_in_sync=False)  # changes B's watch in the record
    await trio.sleep(0.5)
    with pytest.raises(NotRenewed, match="changed since its report"):
        await a.renew({"g1": (1, True)})
    assert store.kv[KEY].mod_revision == rev
    await rnd(a, alive=True, insync=True)
    assert store.kv[KEY].mod_revision != rev
