"""An array's key in etcd (``P/alive/NODE``) lives no longer than the array counts: a lease's
TTL after the answer to its grant, whatever becomes of the requests after it (``etcd_backend``,
``EtcdWitness.touch``). Driven in virtual time against the etcd model, with a network that loses
answers and delivers requests late, as a lossy link or a member regaining its quorum does.

A keepalive would fail this: etcd restarts a lease's TTL when it takes the keepalive, so one
delivered late keeps the key past anything the array counted (the late request of
docs/failover-plan.md rule 4)."""

from __future__ import annotations

import random

import pytest
import trio

from syncd.witness.decide import Timing
from syncd.witness.etcd import EtcdError, EtcdUnreachable, cmp_mod, put
from syncd.witness.etcd_backend import EtcdWitness

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
        while trio.current_time() < stop:
            try:
                await w.touch()
            except (EtcdUnreachable, EtcdError):
                pass
            await trio.sleep(rng.choice((0.1, 0.5, 0.5, 2.0, 6.0)))
    assert checks > 500 and granted and net.late > 0  # requests did reach etcd late
    assert not present(store)  # and it went once A stopped


@pytest.mark.parametrize("seed", range(12))
async def test_with_etcd_expiry_lag_and_a_leader_change_the_key_goes_within_owner_heard_for(seed, autojump_clock):
    """What etcd adds to a lease's TTL: its expiry check and revoke (up to 1 s) and a new leader,
    which gives every lease its whole TTL again plus the election timeout. The primary counts
    ``owner_heard_for`` (2 × (TTL + 1 s) + the election timeout) from its last answered grant:
    the key is gone by then, with one leader change anywhere in between."""
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
                    assert granted and now < granted[-1] + cfg.owner_heard_for(), (seed, now, granted[-3:])
                await trio.sleep(0.05)

        n.start_soon(checker)
        while trio.current_time() < stop:
            try:
                await w.touch()
            except (EtcdUnreachable, EtcdError):
                pass
            await trio.sleep(rng.choice((0.1, 0.5, 0.5, 2.0)))
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
