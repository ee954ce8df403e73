"""Persistent reservations (SPC-4 5.13), sans-IO: the state machine PERSISTENT RESERVE OUT
drives, what PERSISTENT RESERVE IN reports, and which commands a reservation holds back."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from syncd.iscsi import pr

H1 = pr.Nexus("iqn.2026-12.org.syncd:h1", bytes.fromhex("400001370000"), 1)
H1B = pr.Nexus(H1.initiator, H1.isid, 2)  # the same initiator port through the other array
H2 = pr.Nexus("iqn.2026-12.org.syncd:h2", bytes.fromhex("400001370001"), 1)
PORTS = frozenset({1, 2})
READ, WRITE = 0x28, 0x2A


def out(st, n, sa, key=0, sa_key=0, rtype=0, flags=0):
    cdb = bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0])
    return pr.reserve_out(st, n, cdb, struct.pack(">QQIBxH", key, sa_key, 0, flags, 0), PORTS)


def registered(*pairs):
    st = pr.PrState()
    for n, k in pairs:
        o = out(st, n, pr.REGISTER, sa_key=k)
        assert o.sense is None and not o.conflict
        st = o.state
    return st


def test_register_change_and_unregister_count_generations():
    st = registered((H1, 0xA), (H2, 0xB))
    assert st.generation == 2 and st.key_of(H1) == 0xA
    assert out(st, H1, pr.REGISTER, key=0xBAD, sa_key=0xC).conflict  # wrong current key
    st = out(st, H1, pr.REGISTER, key=0xA, sa_key=0xC).state
    assert st.key_of(H1) == 0xC and [n for n, _ in st.keys] == [H1, H2]
    st = out(st, H1, pr.REGISTER_AND_IGNORE, key=0x999, sa_key=0).state
    assert st.key_of(H1) is None and st.generation == 4
    all_ports = out(pr.PrState(), H1, pr.REGISTER, sa_key=7, flags=0x04).state  # ALL_TG_PT
    assert all_ports.key_of(H1) == 7 and all_ports.key_of(H1B) == 7


@pytest.mark.parametrize("rtype,reads_blocked", [(pr.WRITE_EXCLUSIVE, False), (pr.EXCLUSIVE_ACCESS, True)])
def test_a_reservation_holds_back_others_but_not_its_holder(rtype, reads_blocked):
    st = registered((H1, 0xA), (H2, 0xB))
    st = out(st, H1, pr.RESERVE, key=0xA, rtype=rtype).state
    assert st.holds(H1) and not pr.conflicts(st, H1, WRITE)
    assert pr.conflicts(st, H2, WRITE) and pr.conflicts(st, H2, READ) is reads_blocked
    assert not pr.conflicts(st, H2, 0x12)  # INQUIRY is never held back
    assert out(st, H2, pr.RESERVE, key=0xB, rtype=rtype).conflict
    assert out(st, H1, pr.RESERVE, key=0xA, rtype=rtype).state == st  # the holder again: nothing changes
    bad = out(st, H1, pr.RELEASE, key=0xA, rtype=pr.EXCLUSIVE_ACCESS if rtype == 1 else 1)
    assert bad.sense == pr.INVALID_RELEASE and bad.state == st
    st = out(st, H1, pr.RELEASE, key=0xA, rtype=rtype).state
    assert not st.reserved and not pr.conflicts(st, H2, WRITE)


def test_registrants_only_and_all_registrants():
    st = registered((H1, 0xA), (H2, 0xB))
    ro = out(st, H1, pr.RESERVE, key=0xA, rtype=pr.WE_REGISTRANTS_ONLY).state
    stranger = pr.Nexus("iqn.2026-12.org.syncd:h3", bytes(6), 1)
    assert not pr.conflicts(ro, H2, WRITE) and pr.conflicts(ro, stranger, WRITE)
    released = out(ro, H1, pr.RELEASE, key=0xA, rtype=pr.WE_REGISTRANTS_ONLY)
    assert released.attentions == ((H2, pr.RESERVATIONS_RELEASED),)
    ar = out(st, H2, pr.RESERVE, key=0xB, rtype=pr.EA_ALL_REGISTRANTS).state
    assert ar.holds(H1) and ar.holds(H2) and pr.conflicts(ar, stranger, READ)
    # The last registrant leaving ends an all-registrants reservation.
    ar = out(ar, H1, pr.REGISTER, key=0xA, sa_key=0).state
    assert ar.reserved
    ar = out(ar, H2, pr.REGISTER, key=0xB, sa_key=0).state
    assert not ar.reserved and not ar.keys


def test_preempt_and_clear():
    st = registered((H1, 0xA), (H2, 0xB))
    st = out(st, H2, pr.RESERVE, key=0xB, rtype=pr.WRITE_EXCLUSIVE).state
    o = out(st, H1, pr.PREEMPT, key=0xA, sa_key=0xB, rtype=pr.EXCLUSIVE_ACCESS)
    assert o.state.holds(H1) and o.state.type == pr.EXCLUSIVE_ACCESS and o.state.key_of(H2) is None
    assert o.attentions == ((H2, pr.REGISTRATIONS_PREEMPTED),)
    assert out(o.state, H1, pr.PREEMPT, key=0xA, sa_key=0x77, rtype=1).conflict  # no such key
    assert out(o.state, H1, pr.PREEMPT, key=0xA, sa_key=0, rtype=1).sense == pr.INVALID_FIELD_IN_PARAMETER_LIST
    st = registered((H1, 0xA), (H2, 0xB))
    c = out(st, H1, pr.CLEAR, key=0xA)
    assert c.state.keys == () and not c.state.reserved and c.attentions == ((H2, pr.RESERVATIONS_PREEMPTED),)
    assert out(st, H2, pr.CLEAR, key=0xA).conflict  # not its key: nothing cleared


def test_refusals_change_nothing():
    st = registered((H1, 0xA))
    for o in (out(st, H1, pr.RESERVE, key=0xA, rtype=2),  # no type 2
              out(st, H1, pr.RESERVE, key=0xA, rtype=0x11),  # not LU scope
              out(st, H1, pr.REGISTER, key=0xA, sa_key=5, flags=0x08),  # SPEC_I_PT
              out(st, H1, pr.REGISTER, key=0xA, sa_key=5, flags=0x01),  # APTPL where nothing is persisted
              out(st, H1, 0x07, key=0xA),
              pr.reserve_out(st, H1, bytes([0x5F, 0, 0, 0, 0, 0, 0, 0, 20, 0]), bytes(20), PORTS)):
        assert (o.sense is not None or o.conflict) and o.state == st


def test_reserve_in_reports():
    st = registered((H1, 0xA), (H2, 0xB))
    st = out(st, H1, pr.RESERVE, key=0xA, rtype=pr.WRITE_EXCLUSIVE).state
    keys = pr.reserve_in(st, bytes([0x5E, pr.READ_KEYS]) + bytes(8))
    assert struct.unpack(">IIQQ", keys) == (st.generation, 16, 0xA, 0xB)
    res = pr.reserve_in(st, bytes([0x5E, pr.READ_RESERVATION]) + bytes(8))
    assert struct.unpack_from(">IIQ", res) == (st.generation, 16, 0xA) and res[21] == pr.WRITE_EXCLUSIVE
    caps = pr.reserve_in(st, bytes([0x5E, pr.REPORT_CAPABILITIES]) + bytes(8))
    assert caps[:2] == b"\x00\x08" and caps[2] & 0x04 and caps[4:6] == b"\xea\x01"
    full = pr.reserve_in(st, bytes([0x5E, pr.READ_FULL_STATUS]) + bytes(8))
    first = full[8:]
    assert struct.unpack_from(">Q", first)[0] == 0xA and first[12] == 1 and first[13] == pr.WRITE_EXCLUSIVE
    tid_len = struct.unpack_from(">I", first, 20)[0]
    assert first[24:24 + tid_len].startswith(bytes([0x45, 0])) and b"iqn.2026-12.org.syncd:h1,i,0x400001370000" \
        in first[24:24 + tid_len]
    assert isinstance(pr.reserve_in(st, bytes([0x5E, 0x09]) + bytes(8)), pr.Sense)


# -- the state as JSON (state.json, and the copy sent to the other array) ---------------------------

NEXUSES = [H1, H1B, H2]
ACTIONS = hs.tuples(hs.sampled_from(NEXUSES),
                    hs.sampled_from([pr.REGISTER, pr.REGISTER_AND_IGNORE, pr.RESERVE, pr.RELEASE, pr.CLEAR,
                                     pr.PREEMPT, pr.PREEMPT_AND_ABORT]),
                    hs.sampled_from([0, 0xA, 0xB]), hs.sampled_from([0, 0xA, 0xB]),
                    hs.sampled_from(sorted(pr.TYPES)), hs.sampled_from([0, 0x01, 0x04]))


@settings(max_examples=300, deadline=None)
@given(hs.lists(ACTIONS, max_size=12))
def test_every_reachable_state_survives_json(actions):
    """Whatever state PERSISTENT RESERVE OUT reaches, it reads back equal from its JSON (and the
    loaded copy reports the same through PERSISTENT RESERVE IN)."""
    st = pr.PrState()
    for n, sa, key, sa_key, rtype, flags in actions:
        cdb = bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0])
        st = pr.reserve_out(st, n, cdb, struct.pack(">QQIBxH", key, sa_key, 0, flags, 0), PORTS, persist=True).state
        back = pr.state_from_json(json.loads(json.dumps(pr.state_to_json(st))))
        assert back == st
        for sa_in in range(4):
            assert pr.reserve_in(back, bytes([0x5E, sa_in]), True) == pr.reserve_in(st, bytes([0x5E, sa_in]), True)


GOOD = pr.state_to_json(registered((H1, 0xA), (H2, 0xB)))


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.update(generation=-1), "generation"),
    (lambda d: d.update(generation=True), "generation"),
    (lambda d: d.update(keys="x"), "keys"),
    (lambda d: d["keys"].append(list(d["keys"][0])), "registered twice"),
    (lambda d: d["keys"][0].__setitem__(3, 0), "reservation key"),
    (lambda d: d["keys"][0].__setitem__(3, 1 << 64), "reservation key"),
    (lambda d: d["keys"][0].__setitem__(1, "zz"), "not hex"),
    (lambda d: d["keys"][0].__setitem__(1, "4000"), "not an I_T nexus"),
    (lambda d: d["keys"][0].__setitem__(0, ""), "not an I_T nexus"),
    (lambda d: d["keys"][0].__setitem__(2, 70000), "not an I_T nexus"),
    (lambda d: d.update(type=2), "reservation type"),
    (lambda d: d.update(type=pr.WRITE_EXCLUSIVE), "registered holder"),
    (lambda d: d.update(type=pr.WRITE_EXCLUSIVE, holder=["iqn.x", "400001370000", 1]), "registered holder"),
    (lambda d: d.update(holder=d["keys"][0][:3]), "without a reservation"),
    (lambda d: d.update(aptpl=1), "aptpl"),
    (lambda d: d.clear(), "generation"),
])
def test_a_bad_state_is_refused_with_a_reason(change, problem):
    d = json.loads(json.dumps(GOOD))
    change(d)
    with pytest.raises(pr.BadState, match=problem):
        pr.state_from_json(d)
    assert pr.state_from_json(json.loads(json.dumps(GOOD))) == registered((H1, 0xA), (H2, 0xB))


def test_attentions_and_sense_travel_as_json():
    att = ((H1, pr.RESERVATIONS_PREEMPTED), (H2, pr.INVALID_RELEASE))
    assert pr.attentions_from_json(json.loads(json.dumps(pr.attentions_to_json(att)))) == att
    for bad in ([[["iqn.x", "400001370000", 1], [1, 2]]], [[["iqn.x", "400001370000", 1], [1, 2, 300, 0, 0, 0]]], "x"):
        with pytest.raises(pr.BadState):
            pr.attentions_from_json(bad)
