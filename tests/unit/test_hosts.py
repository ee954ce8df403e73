"""Host recognition and LUN masking (syncd/node/hosts.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.nbd.export import ClientIdentity
from syncd.node.hosts import HostError, HostTable, check_more_initiators, check_new_host, check_target
from syncd.node.state import NodeState, VlunState


def _state() -> NodeState:
    s = NodeState(node="A", node_uuid="00000000-0000-0000-0000-000000000000")
    for name, addrs, tls in (
        ("web", ["10.0.0.0/24"], []),
        ("db", ["10.0.0.7", "fd00::7"], ["db.example"]),
        ("lab", ["127.0.0.0/8"], []),
    ):
        s.hosts[name] = check_new_host(s, name, addrs, tls)
    s.hostsets["cluster"] = ["web", "db"]
    s.vluns = [VlunState("vv1", "set:cluster", 0), VlunState("vv2", "db", 1), VlunState("vv3", "lab", 0)]
    return s


def test_most_specific_address_wins_and_tls_name_beats_address():
    t = HostTable(_state())
    assert t.host_for(ClientIdentity("10.0.0.5")) == "web"
    assert t.host_for(ClientIdentity("10.0.0.7")) == "db"
    assert t.host_for(ClientIdentity("::ffff:10.0.0.7")) == "db"
    assert t.host_for(ClientIdentity("fd00::7")) == "db"
    assert t.host_for(ClientIdentity("10.0.0.5", tls_name="db.example")) == "db"
    assert t.host_for(ClientIdentity("10.0.1.5")) is None
    assert t.host_for(ClientIdentity("")) is None


def test_masking_by_host_and_host_set():
    t = HostTable(_state())
    assert t.volumes_for("web") == {"vv1": 0}
    assert t.volumes_for("db") == {"vv1": 0, "vv2": 1}
    assert t.volumes_for("lab") == {"vv3": 0}
    assert t.volumes_for(None) == {}


@pytest.mark.parametrize("name,addrs,tls,msg", [
    ("web", ["10.9.0.1"], [], "already exists"),
    ("other", ["10.0.0.0/24"], [], "already belongs to host web"),
    ("other", ["10.0.0.7/32"], [], "already belongs to host db"),
    ("other", ["not-an-ip"], [], "not an IP address"),
    ("other", [], ["db.example"], "already belongs to host db"),
    ("cluster", ["10.9.0.1"], [], "host set"),
    ("bad name!", ["10.9.0.1"], [], "host name"),
    ("other", ["10.9.0.1", "10.9.0.1/32"], [], "twice"),
])
def test_bad_hosts_are_refused_with_the_reason(name, addrs, tls, msg):
    s = _state()
    before = repr(s)
    with pytest.raises(HostError, match=msg):
        check_new_host(s, name, addrs, tls)
    assert repr(s) == before


def test_an_empty_host_definition_is_allowed_and_matches_no_connection():
    """The seed: for hosts not attached to a site, the host definition can be empty (no
    initiators); volumes are exported to it like to any host."""
    s = _state()
    s.hosts["esx-b"] = check_new_host(s, "esx-b", [], [])
    assert (s.hosts["esx-b"].addresses, s.hosts["esx-b"].tls_names) == ([], [])
    assert check_target(s, "esx-b") == "esx-b"
    s.vluns.append(VlunState("vv1", "esx-b", 0))
    t = HostTable(s)
    assert t.volumes_for("esx-b") == {"vv1": 0}
    assert t.host_for(ClientIdentity("10.9.9.9")) is None
    assert t.host_for(ClientIdentity("10.0.0.5")) == "web"
    assert t.host_for(ClientIdentity("10.9.9.9", tls_name="")) is None


def test_vlun_targets_must_exist():
    s = _state()
    assert check_target(s, "set:cluster") == "set:cluster"
    with pytest.raises(HostError, match="host set nope"):
        check_target(s, "set:nope")
    with pytest.raises(HostError, match="host nope does not exist"):
        check_target(s, "nope")


@given(st.ip_addresses())
def test_any_address_maps_to_at_most_one_host_consistently(ip):
    t = HostTable(_state())
    a = t.host_for(ClientIdentity(str(ip)))
    assert a in (None, "web", "db", "lab")
    assert t.host_for(ClientIdentity(str(ip))) == a


def test_initiators_are_added_to_an_existing_host_and_checked_like_new_ones():
    """createhost --add: an empty definition whose host is now cabled to this array."""
    from syncd.node.hosts import check_more_initiators

    s = _state()
    s.hosts["esx-b"] = check_new_host(s, "esx-b", [], [])
    h = check_more_initiators(s, "esx-b", ["10.9.0.1"], ["esx-b.example"])
    assert (h.addresses, h.tls_names) == (["10.9.0.1/32"], ["esx-b.example"])
    s.hosts["esx-b"] = h
    h2 = check_more_initiators(s, "esx-b", ["fd00::b"], [])
    assert h2.addresses == ["10.9.0.1/32", "fd00::b/128"] and h2.tls_names == ["esx-b.example"]
    before = repr(s)
    for name, addrs, tls, msg in (
        ("esx-b", ["10.9.0.1"], [], "already belongs to host esx-b"),
        ("esx-b", ["10.0.0.0/24"], [], "already belongs to host web"),
        ("esx-b", [], ["db.example"], "already belongs to host db"),
        ("esx-b", [], [], "give the initiators to add"),
        ("esx-b", ["nope"], [], "not an IP address"),
        ("esx-b", [], ["x", "x"], "given twice"),
        ("nobody", ["10.9.0.2"], [], "host nobody does not exist"),
    ):
        with pytest.raises(HostError, match=msg):
            check_more_initiators(s, name, addrs, tls)
    assert repr(s) == before
    assert HostTable(s).host_for(ClientIdentity("10.9.0.1")) == "esx-b"


def test_iscsi_initiator_names_identify_hosts():
    s = _state()
    s.hosts["esx"] = check_new_host(s, "esx", [], [], ["iqn.1998-01.com.vmware:esx1-1234"])
    t = HostTable(s)
    assert t.host_for(ClientIdentity("192.0.2.9", iqn="iqn.1998-01.com.vmware:esx1-1234")) == "esx"
    # An initiator name nobody has: the address decides, as for NBD.
    assert t.host_for(ClientIdentity("10.0.0.5", iqn="iqn.1998-01.com.vmware:other")) == "web"
    with pytest.raises(HostError, match="already belongs to host esx"):
        check_new_host(s, "esx2", [], [], ["iqn.1998-01.com.vmware:esx1-1234"])
    with pytest.raises(HostError, match="is not an iSCSI name"):
        check_new_host(s, "esx3", [], [], ["not-an-iqn"])
    with pytest.raises(HostError, match="given twice"):
        check_new_host(s, "esx4", [], [], ["iqn.1998-01.com.vmware:a", "iqn.1998-01.com.vmware:a"])
    more = check_more_initiators(s, "esx", [], [], ["iqn.1998-01.com.vmware:esx1-5678"])
    assert more.iqns == ["iqn.1998-01.com.vmware:esx1-1234", "iqn.1998-01.com.vmware:esx1-5678"]
