"""Persistent reservations at the storage nodes (``syncd.node.iscsi``): the group primary
decides, the secondary's copy is written before the host hears GOOD, and every refusal (from
the host's side or the peer's) changes nothing at either array."""

from __future__ import annotations

import errno
import struct
import types

import pytest
import trio

from syncd.iscsi import pr
from syncd.nbd.export import BlockError
from syncd.node.errors import NodeError
from syncd.node.iscsi import peer_reservations, reserve_out_here

H1 = pr.Nexus("iqn.2026-12.org.syncd:h1", bytes.fromhex("400001370000"), 1)
H2 = pr.Nexus("iqn.2026-12.org.syncd:h2", bytes.fromhex("400001370001"), 2)


def cdb_params(sa, key=0, sa_key=0, rtype=0):
    return bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0]), struct.pack(">QQIBxH", key, sa_key, 0, 0, 0)


class FakeNode:
    """What the reservation code asks of a node: its volumes, groups, registry, metadata
    (saves counted) and the link to the peer (``answer``: what the peer's control RPC does)."""

    def __init__(self, role="primary", mirroring=True, serving=True):
        self.cfg = types.SimpleNamespace(name="A", iscsi=None, link=types.SimpleNamespace(io_timeout=5))
        self.exports = {"vv1": object()}
        self.reservations = pr.Registry(persist=True)
        self.state = types.SimpleNamespace(reservations={})
        self.pr_locks = {}
        self.iscsi = None
        self.saves = 0
        self.sent = []
        self.answer = None
        self.link = types.SimpleNamespace(up=True)
        g = types.SimpleNamespace(name="rcg1", role=role, epoch=4, mirroring=mirroring, may_serve=lambda: serving,
                                  st=types.SimpleNamespace(peer="B"))
        m = types.SimpleNamespace(group=g, st=types.SimpleNamespace(local="vv1", remote="vv9"))
        g.members = {1: m}
        self.g = g
        self.member_of = {"vv1": m}

    def group(self, name):
        if name != "rcg1":
            raise NodeError(f"group {name} does not exist on A")
        return self.g

    def save(self):
        self.saves += 1

    async def control(self, body):
        self.sent.append(body)
        if self.answer is not None:
            raise self.answer
        return {"ok": True}

    def spawn(self, fn, *args):
        raise AssertionError("no background copy while mirroring")


async def test_the_primary_copies_a_change_to_the_peer_before_it_answers():
    node = FakeNode()
    out = await reserve_out_here(node, "vv1", H1, *cdb_params(pr.REGISTER, sa_key=0xA))
    assert out.sense is None and not out.conflict
    [body] = node.sent
    assert body["op"] == "pr_state" and body["volume"] == "vv9" and body["epoch"] == 4
    assert pr.state_from_json(body["state"]) == out.state == node.reservations.get("vv1")
    assert node.state.reservations["vv1"] == body["state"] and node.saves == 1


async def test_a_peer_that_cannot_be_told_fails_the_command_and_nothing_changes_here():
    node = FakeNode()
    node.answer = NodeError("target B did not answer")
    with pytest.raises(BlockError) as e:
        await reserve_out_here(node, "vv1", H1, *cdb_params(pr.REGISTER, sa_key=0xA))
    assert e.value.errno == errno.EAGAIN and "could not be copied to B" in str(e.value)
    assert node.reservations.get("vv1") == pr.PrState() and node.state.reservations == {} and node.saves == 0


@pytest.mark.parametrize("role, serving", [("secondary", True), ("primary", False)])
async def test_only_a_serving_primary_decides(role, serving):
    node = FakeNode(role=role, serving=serving)
    with pytest.raises(BlockError) as e:
        await reserve_out_here(node, "vv1", H1, *cdb_params(pr.REGISTER, sa_key=0xA))
    assert e.value.errno == errno.EAGAIN
    assert node.sent == [] and node.saves == 0 and node.reservations.get("vv1") == pr.PrState()


async def test_a_refused_command_is_not_sent_and_changes_nothing():
    node = FakeNode()
    await reserve_out_here(node, "vv1", H1, *cdb_params(pr.REGISTER, sa_key=0xA))
    before = (node.reservations.get("vv1"), dict(node.state.reservations), node.saves, len(node.sent))
    out = await reserve_out_here(node, "vv1", H2, *cdb_params(pr.RESERVE, key=0xB, rtype=pr.WRITE_EXCLUSIVE))
    assert out.conflict  # H2 is not registered
    assert (node.reservations.get("vv1"), dict(node.state.reservations), node.saves, len(node.sent)) == before
    with pytest.raises(NodeError, match="no volume vv7"):
        await reserve_out_here(node, "vv7", H1, *cdb_params(pr.REGISTER, sa_key=0xA))


async def test_a_primary_alone_changes_its_copy_and_tells_the_peer_later():
    node = FakeNode(mirroring=False)
    node.link.up = False
    out = await reserve_out_here(node, "vv1", H1, *cdb_params(pr.REGISTER, sa_key=0xA))
    assert out.sense is None and node.sent == [] and node.reservations.get("vv1").key_of(H1) == 0xA


async def test_changes_to_one_volume_are_applied_one_at_a_time():
    node = FakeNode()
    order = []

    async def slow_control(body):
        order.append(("sent", pr.state_from_json(body["state"]).generation))
        await trio.sleep(0.01)
        return {"ok": True}

    node.control = slow_control
    async with trio.open_nursery() as n:
        n.start_soon(reserve_out_here, node, "vv1", H1, *cdb_params(pr.REGISTER, sa_key=0xA))
        n.start_soon(reserve_out_here, node, "vv1", H2, *cdb_params(pr.REGISTER, sa_key=0xB))
    assert order == [("sent", 1), ("sent", 2)]  # the second saw the first's result
    assert node.reservations.get("vv1").generation == 2


def good_body(**kw):
    st = pr.PrState(1, ((H1, 0xA),))
    return {"op": "pr_state", "group": "rcg1", "epoch": 4, "volume": "vv1", "state": pr.state_to_json(st),
            "attentions": []} | kw


def test_the_secondary_takes_its_primarys_state():
    node = FakeNode(role="secondary")
    peer_reservations(node, good_body())
    assert node.reservations.get("vv1") == pr.PrState(1, ((H1, 0xA),)) and node.saves == 1


@pytest.mark.parametrize("change, problem", [
    ({"epoch": 3}, "at epoch 3, this array is secondary at epoch 4"),
    ({"group": "rcg9"}, "group rcg9 does not exist"),
    ({"volume": "vv2"}, "has no volume vv2"),
    ({"state": {"generation": 1, "keys": "x", "holder": None, "type": 0, "aptpl": False}}, "keys"),
    ({"attentions": [[1, 2]]}, "attentions"),
])
def test_the_secondary_refuses_a_bad_or_stale_state_and_keeps_its_own(change, problem):
    node = FakeNode(role="secondary")
    with pytest.raises(NodeError, match=problem):
        peer_reservations(node, good_body(**change))
    assert node.reservations.get("vv1") == pr.PrState() and node.saves == 0


def test_a_primary_refuses_a_state_from_a_peer_that_thinks_it_is_primary():
    node = FakeNode(role="primary")
    with pytest.raises(NodeError, match="this array is primary"):
        peer_reservations(node, good_body())
    assert node.saves == 0
