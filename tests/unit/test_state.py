"""Node metadata is replaced atomically and a node refuses metadata it cannot trust."""

import json

import pytest

from syncd.node.state import GroupState, MemberState, StateError, StateStore


def test_round_trip_and_lock(tmp_path):
    s = StateStore(str(tmp_path), "A")
    st = s.load()
    st.groups["rcg1"] = GroupState("rcg1", 7, "primary", "B", members=[MemberState("vv1", "vv1", 1, "naa.6x", 4096)])
    s.save(st)
    with pytest.raises(StateError, match="in use by another"):
        StateStore(str(tmp_path), "A")
    del s
    import gc

    gc.collect()


def test_refuses_unreadable_or_foreign_metadata(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="cannot be read"):
        StateStore(str(tmp_path / ""), "A").load()
    d2 = tmp_path / "two"
    d2.mkdir()
    (d2 / "state.json").write_text(json.dumps({"version": 99, "node": "A", "node_uuid": "x"}))
    with pytest.raises(StateError, match="format version 99"):
        StateStore(str(d2), "A").load()
    assert json.loads((d2 / "state.json").read_text())["version"] == 99  # untouched
    d3 = tmp_path / "three"
    d3.mkdir()
    (d3 / "state.json").write_text(json.dumps({"version": 1, "node": "B", "node_uuid": "x", "groups": {}}))
    with pytest.raises(StateError, match="belongs to node 'B'"):
        StateStore(str(d3), "A").load()


def test_metadata_with_a_fixed_policy_off_loads_with_it_on(tmp_path):
    """auto_failover and path_management cannot be turned off (the seed); metadata written
    before the rule loads with them on, the other policies as they were."""
    d = tmp_path / "old"
    d.mkdir()
    s = StateStore(str(d), "A")
    st = s.load()
    g = GroupState("rcg1", 7, "primary", "B")
    g.policies.update(auto_failover=False, path_management=False, auto_recover=False)
    st.groups["rcg1"] = g
    s.save(st)
    loaded = s.load().groups["rcg1"].policies
    assert loaded["auto_failover"] is True and loaded["path_management"] is True
    assert loaded["auto_recover"] is False


def test_reservations_round_trip_and_a_bad_one_refuses_the_start_by_name(tmp_path):
    from syncd.iscsi import pr

    s = StateStore(str(tmp_path), "A")
    st = s.load()
    held = pr.PrState(3, ((pr.Nexus("iqn.2026-12.org.syncd:h1", bytes(6), 1), 0xAB),),
                      pr.Nexus("iqn.2026-12.org.syncd:h1", bytes(6), 1), pr.WRITE_EXCLUSIVE)
    st.reservations["vv1"] = pr.state_to_json(held)
    s.save(st)
    assert pr.state_from_json(s.load().reservations["vv1"]) == held
    d = json.loads((tmp_path / "state.json").read_text())
    d["reservations"]["vv1"]["type"] = 2
    (tmp_path / "state.json").write_text(json.dumps(d))
    before = (tmp_path / "state.json").read_bytes()
    with pytest.raises(StateError, match="reservations of volume vv1: type: 2 is not a reservation type"):
        s.load()
    assert (tmp_path / "state.json").read_bytes() == before
