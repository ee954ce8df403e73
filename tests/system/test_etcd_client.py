"""syncd's etcd v3 client (``syncd.witness.etcd``) against a real three-member etcd cluster on
loopback (Debian ``etcd-server``, started by ``syncd.lab.etcd``): compare-and-set transactions,
leases that expire, reconnection across endpoints when members die or the leader changes, "no
quorum within the deadline" reported as unreachable, and endpoints that answer garbage or
nothing."""

from __future__ import annotations

import pytest
import trio

from syncd.lab import etcd as lab_etcd
from syncd.witness.etcd import (
    EtcdClient,
    EtcdConfig,
    EtcdError,
    EtcdUnreachable,
    cmp_mod,
    get,
    prefix_end,
    put,
)

from .rig import etcd_pair_rounds, require_tool

pytestmark = pytest.mark.system


@pytest.fixture
def cluster(tmp_path):
    require_tool("etcd")
    info = lab_etcd.start_cluster(str(tmp_path))
    yield str(tmp_path), info
    lab_etcd.stop_cluster(str(tmp_path))


def client(info, **kw) -> EtcdClient:
    return EtcdClient(EtcdConfig(tuple(info["endpoints"]), **kw))


async def test_compare_and_set_lets_one_writer_of_a_revision_win(cluster):
    _, info = cluster
    c = client(info)
    try:
        key = b"/syncd/test/rcg1/record"
        first = await c.txn([cmp_mod(key, 0)], [put(key, b"v1")], [get(key)])
        assert first.succeeded
        again = await c.txn([cmp_mod(key, 0)], [put(key, b"other")], [get(key)])
        assert not again.succeeded and again.ranges[0][0].value == b"v1"  # exists: the loser sees it
        rev = again.ranges[0][0].mod_revision
        # Two writers read revision ``rev``; exactly one replaces it.
        results = await _both(c, [c.txn([cmp_mod(key, rev)], [put(key, v)]) for v in (b"A", b"B")])
        assert sorted(r.succeeded for r in results) == [False, True]
        [kv], _ = await c.range(key)
        assert kv.value in (b"A", b"B") and kv.mod_revision > rev
        await c.txn([cmp_mod(b"/syncd/test/rcg2/record", 0)], [put(b"/syncd/test/rcg2/record", b"x")])
        kvs, _ = await c.range(b"/syncd/test/", prefix_end(b"/syncd/test/"))
        assert [k.key for k in kvs] == [b"/syncd/test/rcg1/record", b"/syncd/test/rcg2/record"]
    finally:
        await c.aclose()


async def _both(c, coros):
    out = []

    async def run(co):
        out.append(await co)

    async with trio.open_nursery() as n:
        for co in coros:
            n.start_soon(run, co)
    return out


async def test_a_key_lives_a_ttl_from_its_lease_grant_and_a_late_put_cannot_revive_it(cluster):
    """What the witness's liveness rests on (etcd_backend.EtcdWitness.touch), against real etcd:
    a key on a lease goes once the lease's TTL has run from its grant; a put on an expired lease
    is refused whole (nothing changes); a key moved onto a newer lease by compare-and-set cannot
    be moved back by a put that compares what it was before."""
    _, info = cluster
    c = client(info)
    try:
        key = b"/syncd/test/alive/A"
        old, ttl = await c.lease_grant(2)
        assert ttl == 2  # the lab's etcd: an election timeout of 0.5 s, so 1 s at least
        first = await c.txn([cmp_mod(key, 0)], [put(key, b"1", old)])
        assert first.succeeded
        await trio.sleep(1.0)
        new, _ = await c.lease_grant(2)
        moved = await c.txn([cmp_mod(key, first.revision)], [put(key, b"1", new)])
        assert moved.succeeded
        late = await c.txn([cmp_mod(key, first.revision)], [put(key, b"1", old)], [get(key)])
        assert not late.succeeded and late.ranges[0][0].lease == new
        with trio.fail_after(8):  # etcd's clock, not ours: watched from outside
            while True:
                if not (await c.range(key))[0]:
                    break
                await trio.sleep(0.2)
        _, rev = await c.range(key)
        with pytest.raises(EtcdError, match="lease not found"):
            await c.txn([], [put(key, b"1", new), put(b"/syncd/test/other", b"x")])
        kvs, rev2 = await c.range(b"/syncd/test/", prefix_end(b"/syncd/test/"))
        assert kvs == [] and rev2 == rev  # refused whole: not even the other key
    finally:
        await c.aclose()


async def test_members_dying_and_the_leader_changing_are_ridden_through(cluster):
    d, info = cluster
    c = client(info, timeout=3.0)
    try:
        await c.txn([], [put(b"k", b"0")])
        assert c.last_endpoint == info["endpoints"][0]
        lab_etcd.fail_member(d, 1)  # the member the client uses
        await c.txn([], [put(b"k", b"1")])
        assert c.last_endpoint != info["endpoints"][0]
        lab_etcd.restart_member(d, 1)
        with trio.fail_after(20):  # a process coming back: watched from outside
            while True:
                if lab_etcd.member_status(info["members"][0]) is not None:
                    break
                await trio.sleep(0.1)
        lead = lab_etcd.leader(info)
        lab_etcd.fail_member(d, lead)
        for i in range(5):  # through the election
            await c.txn([], [put(b"k", str(i).encode())])
        [kv], _ = await c.range(b"k")
        assert kv.value == b"4"
        assert lab_etcd.leader(lab_etcd.load(d)) != lead
    finally:
        await c.aclose()


async def test_without_a_quorum_a_request_is_unreachable_within_its_deadline(cluster):
    d, info = cluster
    c = client(info, timeout=1.0)
    try:
        await c.txn([], [put(b"k", b"before")])
        assert lab_etcd.fail_quorum(d) == [2, 3]
        t0 = trio.current_time()
        with pytest.raises(EtcdUnreachable):
            await c.range(b"k")
        assert trio.current_time() - t0 < 1.5
        with pytest.raises(EtcdUnreachable):
            await c.txn([], [put(b"k", b"during")])
        for i in (2, 3):
            lab_etcd.restart_member(d, i)
        with trio.fail_after(20):
            while True:
                try:
                    [kv], _ = await c.range(b"k")
                    break
                except EtcdUnreachable:
                    await trio.sleep(0.2)
        # "Unreachable" means the outcome is unknown, not that nothing happened: if the survivor
        # was the leader, it logged the write and commits it once a quorum is back (seen in 2 of
        # about 25 runs). The witness's decisions are safe with that: a CLAIM committed late is
        # granted when asked again (the claimant owns the group already), and an owner changed
        # behind a node's back refuses its KEEP. Either way the value is one that was written.
        assert kv.value in (b"before", b"during")
    finally:
        await c.aclose()


async def _serve(handler, task_status=trio.TASK_STATUS_IGNORED):
    async def guarded(stream):
        try:
            await handler(stream)
        except trio.BrokenResourceError:
            pass  # the client gave up on it: as it should

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(guarded, listeners)


async def _garbage(stream):
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")


async def _endless(stream):
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
    while True:
        await stream.send_all(chunk)


async def _silent(stream):
    await trio.sleep_forever()


@pytest.mark.parametrize("bad", [_garbage, _endless, _silent])
async def test_an_endpoint_that_answers_garbage_or_nothing_is_passed_over(cluster, bad):
    _, info = cluster
    async with trio.open_nursery() as n:
        port = await n.start(_serve, bad)
        c = EtcdClient(EtcdConfig((f"http://127.0.0.1:{port}", *info["endpoints"]), timeout=2.0))
        try:
            assert (await c.txn([], [put(b"k", b"v")])).succeeded
            assert c.last_endpoint == info["endpoints"][0]
            alone = EtcdClient(EtcdConfig((f"http://127.0.0.1:{port}",), timeout=0.5))
            with pytest.raises(EtcdUnreachable, match=f"127.0.0.1:{port}"):
                await alone.range(b"k")
            await alone.aclose()
        finally:
            await c.aclose()
        n.cancel_scope.cancel()


def test_bad_client_settings_are_refused_by_name():
    for kw, problem in [({"endpoints": ()}, "at least one endpoint"),
                        ({"endpoints": ("127.0.0.1:2379",)}, "expected http"),
                        ({"endpoints": ("http://127.0.0.1",)}, "expected http"),
                        ({"endpoints": ("http://h:1",), "cert": "c.pem"}, "needs its key"),
                        ({"endpoints": ("http://h:1",), "user": "root"}, "needs a password")]:
        with pytest.raises(ValueError, match=problem):
            EtcdConfig(**kw)


async def test_the_witness_decisions_on_a_real_cluster_with_its_leader_killed_during_a_claim(cluster):
    """The etcd backend's decisions against real etcd (the decision suite runs them on a model in
    virtual time: tests/unit/test_witness_backends.py): a claim waits for the owner's lease to
    expire in etcd; the etcd leader killed while the owner's KEEP and its peer's CLAIM race:
    exactly one wins and the record says who; without quorum, decisions are unreachable."""
    from syncd.witness.decide import Timing, may_grant_later
    from syncd.witness.etcd_backend import EtcdWitness, Record

    d, info = cluster
    t = Timing(owner_lease=3.0, drift=0.05, margin=0.5, grace=4.5)
    # The race below spans etcd electing a new leader: on a slow 2-vCPU VM that took over 3 s
    # (CI at fc79480: "leader changed", then no answer), so the clients wait longer than that.
    ca, cb = client(info, timeout=8.0), client(info, timeout=8.0)
    try:
        wa, wb = EtcdWitness(ca, b"/syncd/pair1", "A", t), EtcdWitness(cb, b"/syncd/pair1", "B", t)
        await wa.register("rcg1", ("A", "B"), "A", 1)
        await etcd_pair_rounds(wa, wb)  # B has seen A's key move
        assert (await wb.report("rcg1", 1, peer_alive=False, peer_in_sync=False)).granted
        early = await wb.claim("rcg1", 1)
        assert not early.granted and may_grant_later(early.reason), early
        for _ in range(10):  # B keeps saying it lost A; A says nothing (its lease runs out)
            await trio.sleep(0.5)
            await wb.report("rcg1", 1, peer_alive=False, peer_in_sync=False)
            await wb.renew({})
        out = {}

        async def run(name, co):
            out[name] = await co

        lab_etcd.fail_member(d, lab_etcd.leader(info))
        async with trio.open_nursery() as n:
            n.start_soon(run, "keep", wa.keep("rcg1", 1))
            n.start_soon(run, "claim", wb.claim("rcg1", 1))
        assert [out["keep"].granted, out["claim"].granted].count(True) == 1, out
        [kv], _ = await ca.range(b"/syncd/pair1/groups/rcg1")
        rec = Record.from_json(kv.value)
        assert (rec.owner, rec.epoch) == (("A", 1) if out["keep"].granted else ("B", 2))
        lab_etcd.fail_quorum(d)
        with pytest.raises(EtcdUnreachable):
            await wa.report("rcg1", rec.epoch, peer_alive=False, peer_in_sync=False)
    finally:
        await ca.aclose()
        await cb.aclose()
