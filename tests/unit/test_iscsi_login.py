"""iSCSI text keys, operational negotiation, CHAP and the login state machine (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.iscsi import pdu as p
from syncd.iscsi import text as t
from syncd.iscsi.login import Login, Portal, SessionType, Target

TNAME = "iqn.2026-12.org.syncd:vol1"
INAME = "iqn.1994-05.com.redhat:host1"
SECRET = t.ChapSecret("host1", b"host1-secret-123")
TARGET_SECRET = t.ChapSecret("array-a", b"array-a-secret-456")
ISID = bytes.fromhex("400001370000")


# -- text --------------------------------------------------------------------------------------
def test_text_round_trip():
    pairs = [("InitiatorName", INAME), ("SessionType", "Normal"), ("X-com.example.k", "a=b")]
    assert t.parse(t.encode(pairs)) == pairs


@pytest.mark.parametrize("data,match", [
    (b"InitiatorName=x", "does not end with a NUL"),
    (b"NoEquals\0", "has no '='"),
    (b"=value\0", "key name"),
    (b"bad key=1\0", "key name"),
    (b"K" * 64 + b"=1\0", "key name"),
    (b"Key=\xff\xfe\0", "not UTF-8"),
    (b"CHAP_C=" + b"a" * 8193 + b"\0", "more than 8192"),
    (b"K=v\0" * 20000, "exceeds 65536"),
])
def test_text_refusals_name_the_problem(data, match):
    with pytest.raises(t.TextError, match=match):
        t.parse(data)


@given(st.binary(max_size=300))
def test_text_parser_never_fails_other_than_with_text_error(data):
    try:
        t.parse(data)
    except t.TextError:
        pass


def test_binary_values():
    assert t.decode_binary("0x0a0B") == b"\x0a\x0b"
    assert t.decode_binary("0xabc") == b"\x0a\xbc"
    assert t.decode_binary("0bAAEC") == b"\x00\x01\x02"
    for bad in ("0xzz", "0b!!", "1234", ""):
        with pytest.raises(t.TextError, match="not a binary value"):
            t.decode_binary(bad)


# -- negotiation -------------------------------------------------------------------------------
def negotiate(pairs, discovery=False, limits=None):
    n = t.Negotiation(limits or t.TargetLimits(), discovery=discovery)
    return dict(n.offer(pairs)), n


def test_each_key_settles_by_its_rule():
    out, n = negotiate([
        ("HeaderDigest", "None,CRC32C"), ("DataDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "65536"),
        ("MaxBurstLength", "16776192"), ("FirstBurstLength", "262144"), ("MaxConnections", "8"),
        ("MaxOutstandingR2T", "4"), ("DefaultTime2Wait", "0"), ("DefaultTime2Retain", "20"),
        ("ErrorRecoveryLevel", "2"), ("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("DataPDUInOrder", "Yes"),
        ("DataSequenceInOrder", "Yes"), ("IFMarker", "No"), ("OFMarkInt", "2048~8192"),
        ("X-com.vendor.key", "1"), ("iSCSIProtocolLevel", "2"),
    ])
    assert out == {
        "HeaderDigest": "None", "DataDigest": "CRC32C", "MaxBurstLength": "1048576", "FirstBurstLength": "65536",
        "MaxConnections": "1", "MaxOutstandingR2T": "1", "DefaultTime2Wait": "2", "DefaultTime2Retain": "0",
        "ErrorRecoveryLevel": "0", "InitialR2T": "Yes", "ImmediateData": "Yes", "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes", "IFMarker": "No", "OFMarkInt": "Reject", "X-com.vendor.key": "NotUnderstood",
        "iSCSIProtocolLevel": "1",
    }
    assert n.declarations() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.declarations() == []  # declared once
    r = n.result()
    assert (r.header_digest, r.data_digest, r.initiator_max_recv, r.target_max_recv, r.max_burst,
            r.first_burst, r.initial_r2t) == (False, True, 65536, 262144, 1 << 20, 65536, True)


def test_discovery_sessions_call_normal_keys_irrelevant():
    out, _ = negotiate([("MaxBurstLength", "65536"), ("InitialR2T", "No"), ("HeaderDigest", "None")],
                       discovery=True)
    assert out == {"MaxBurstLength": "Irrelevant", "InitialR2T": "Irrelevant", "HeaderDigest": "None"}


@pytest.mark.parametrize("pairs,match", [
    ([("MaxBurstLength", "511")], "not a number from 512"),
    ([("MaxBurstLength", "lots")], "not a number"),
    ([("ErrorRecoveryLevel", "3")], "from 0 to 2"),
    ([("InitialR2T", "yes")], "neither Yes nor No"),
    ([("MaxRecvDataSegmentLength", "16777216")], "not a number"),
])
def test_bad_values_are_refused(pairs, match):
    with pytest.raises(t.TextError, match=match):
        negotiate(pairs)


def test_a_key_twice_in_one_negotiation_is_refused():
    n = t.Negotiation(t.TargetLimits())
    n.offer([("MaxBurstLength", "65536")])
    with pytest.raises(t.TextError, match="negotiated twice"):
        n.offer([("MaxBurstLength", "65536")])


def test_first_burst_beyond_max_burst_is_refused():
    _, n = negotiate([("MaxBurstLength", "4096"), ("FirstBurstLength", "8192")],
                     limits=t.TargetLimits(first_burst=1 << 20))
    with pytest.raises(t.TextError, match="FirstBurstLength 8192 exceeds MaxBurstLength 4096"):
        n.result()


def test_digests_nobody_shares_are_rejected():
    out, n = negotiate([("HeaderDigest", "MD5")])
    assert out == {"HeaderDigest": "Reject"} and not n.result().header_digest


# -- CHAP --------------------------------------------------------------------------------------
def chap_exchange(chap, name, secret, mutual_challenge=None):
    got = dict(chap.step([("CHAP_A", "7,5")]))
    assert got["CHAP_A"] == "5"
    ident, challenge = int(got["CHAP_I"]), t.decode_binary(got["CHAP_C"])
    assert len(challenge) == t.CHALLENGE_LEN
    answer = [("CHAP_N", name), ("CHAP_R", t.encode_hex(t.chap_response(ident, secret, challenge)))]
    if mutual_challenge is not None:
        answer += [("CHAP_I", "77"), ("CHAP_C", t.encode_hex(mutual_challenge))]
    return chap.step(answer)


def test_chap_one_way_and_mutual():
    chap = t.ChapTarget({"host1": SECRET})
    assert chap_exchange(chap, "host1", SECRET.secret) == [] and chap.user == "host1"
    chap = t.ChapTarget({"host1": SECRET}, TARGET_SECRET)
    mine = b"initiator-challenge!"
    out = dict(chap_exchange(chap, "host1", SECRET.secret, mine))
    assert out["CHAP_N"] == "array-a"
    assert t.decode_binary(out["CHAP_R"]) == t.chap_response(77, TARGET_SECRET.secret, mine)


@pytest.mark.parametrize("name,secret", [("host1", b"wrong-secret-0000"), ("nobody", b"host1-secret-123")])
def test_chap_refuses_a_wrong_secret_or_name(name, secret):
    with pytest.raises(t.TextError, match="does not match") as e:
        chap_exchange(t.ChapTarget({"host1": SECRET}), name, secret)
    assert e.value.status == p.LOGIN_AUTH_FAILURE


def test_chap_refuses_a_reflected_challenge_and_missing_mutual():
    chap = t.ChapTarget({"host1": SECRET}, TARGET_SECRET)
    with pytest.raises(t.TextError, match="repeats the target's challenge"):
        chap_exchange(chap, "host1", SECRET.secret, chap.challenge)
    with pytest.raises(t.TextError, match="requires mutual CHAP"):
        chap_exchange(t.ChapTarget({"host1": SECRET}, TARGET_SECRET), "host1", SECRET.secret)
    with pytest.raises(t.TextError, match="no algorithm syncd knows"):
        t.ChapTarget({"host1": SECRET}).step([("CHAP_A", "6,7")])


# -- login -------------------------------------------------------------------------------------
def portal(chap=None, mutual=None, allowed=(INAME,), discovery_chap=None):
    return Portal(targets={TNAME: Target(TNAME, "vol1", chap, mutual)}, portal_group_tag=1,
                  authorize=lambda i, tn: i in allowed, discovery_chap=discovery_chap)


def req(csg, nsg, pairs, transit=True, cont=False, tsih=0, vmin=0, data=None, itt=0x10):
    return p.LoginRequest(transit, cont, csg, nsg if transit else 0, 0, vmin, ISID, tsih, itt, 0, 1, 0,
                          t.encode(pairs) if data is None else data)


def response(step):
    head = bytes(step.response[0])
    c = p.LOGIN_RESPONSE.parse(head[:48])
    data = b"".join(bytes(b) for b in step.response[1:])[: c.dsl]
    return c, dict(t.parse(data))


def test_a_login_without_security_straight_to_operational():
    login = Login(portal(), tsih=5, statsn=100)
    s = login.receive(req(1, 3, [("InitiatorName", INAME), ("TargetName", TNAME), ("SessionType", "Normal"),
                                 ("MaxRecvDataSegmentLength", "65536"), ("ImmediateData", "Yes")]))
    c, keys = response(s)
    assert s.complete and c.status_class == 0 and c.tsih == 5 and c.statsn == 100
    assert c.flags == p.TRANSIT | (1 << 2) | 3 and c.maxcmdsn == 64
    assert keys["TargetPortalGroupTag"] == "1" and keys["MaxRecvDataSegmentLength"] == "262144"
    sess = login.session
    assert sess.session_type is SessionType.NORMAL and sess.target.name == TNAME and sess.statsn == 101
    assert sess.params.initiator_max_recv == 65536


def test_a_login_through_security_with_chap_then_operational():
    login = Login(portal(chap={"host1": SECRET}), tsih=6)
    c, keys = response(login.receive(req(0, 1, [("InitiatorName", INAME), ("TargetName", TNAME),
                                                 ("AuthMethod", "None,CHAP")], transit=False)))
    assert c.status_class == 0 and keys["AuthMethod"] == "CHAP"
    c, keys = response(login.receive(req(0, 1, [("CHAP_A", "5")], transit=False)))
    ident, challenge = int(keys["CHAP_I"]), t.decode_binary(keys["CHAP_C"])
    answer = t.encode_hex(t.chap_response(ident, SECRET.secret, challenge))
    s = login.receive(req(0, 1, [("CHAP_N", "host1"), ("CHAP_R", answer)]))
    c, keys = response(s)
    assert c.status_class == 0 and c.flags & p.TRANSIT and c.flags & 3 == 1 and s.stage == 1
    s = login.receive(req(1, 3, [("HeaderDigest", "CRC32C,None")]))
    c, keys = response(s)
    assert s.complete and keys["HeaderDigest"] == "CRC32C" and login.session.chap_user == "host1"
    assert login.session.params.header_digest


@pytest.mark.parametrize("first,status", [
    (req(1, 3, [("InitiatorName", INAME)]), p.LOGIN_MISSING_PARAMETER),  # no TargetName
    (req(1, 3, [("TargetName", TNAME)]), p.LOGIN_MISSING_PARAMETER),  # no InitiatorName
    (req(1, 3, [("InitiatorName", INAME), ("TargetName", "iqn.x:none")]), p.LOGIN_NOT_FOUND),
    (req(1, 3, [("InitiatorName", "iqn.x:stranger"), ("TargetName", TNAME)]), p.LOGIN_AUTHORIZATION_FAILURE),
    (req(1, 3, [("InitiatorName", INAME), ("TargetName", TNAME)], vmin=1), p.LOGIN_UNSUPPORTED_VERSION),
    (req(1, 3, [("InitiatorName", INAME), ("TargetName", TNAME)], tsih=9), p.LOGIN_SESSION_DOES_NOT_EXIST),
    (req(1, 3, [("InitiatorName", INAME), ("SessionType", "Boot")]), p.LOGIN_SESSION_TYPE_NOT_SUPPORTED),
    (req(1, 2, [("InitiatorName", INAME), ("TargetName", TNAME)]), p.LOGIN_INITIATOR_ERROR),  # stage 2
    (req(1, 1, [("InitiatorName", INAME), ("TargetName", TNAME)]), p.LOGIN_INITIATOR_ERROR),  # no progress
    (req(1, 3, [("InitiatorName", INAME), ("TargetName", TNAME)], cont=True), p.LOGIN_INITIATOR_ERROR),  # T and C
    (req(1, 3, [], data=b"InitiatorName=a\0InitiatorName=b\0"), p.LOGIN_INITIATOR_ERROR),
    (req(1, 3, [], data=b"garbage"), p.LOGIN_INITIATOR_ERROR),
])
def test_first_request_refusals(first, status):
    login = Login(portal(), tsih=1)
    s = login.receive(first)
    c, _ = response(s)
    assert s.failed and (c.status_class << 8 | c.status_detail) == status and login.session is None
    assert c.flags & p.TRANSIT == 0 and login.error


def test_skipping_security_when_chap_is_required_fails_authentication():
    login = Login(portal(chap={"host1": SECRET}), tsih=1)
    s = login.receive(req(1, 3, [("InitiatorName", INAME), ("TargetName", TNAME)]))
    assert s.failed and s.status == p.LOGIN_AUTH_FAILURE


def test_auth_method_none_when_chap_is_required_fails_and_chap_when_none_is_configured_too():
    s = Login(portal(chap={"host1": SECRET}), tsih=1).receive(
        req(0, 1, [("InitiatorName", INAME), ("TargetName", TNAME), ("AuthMethod", "None")]))
    assert s.status == p.LOGIN_AUTH_FAILURE
    s = Login(portal(), tsih=1).receive(
        req(0, 1, [("InitiatorName", INAME), ("TargetName", TNAME), ("AuthMethod", "CHAP")]))
    assert s.status == p.LOGIN_AUTH_FAILURE


def test_transit_is_held_back_until_chap_finishes():
    login = Login(portal(chap={"host1": SECRET}), tsih=1)
    s = login.receive(req(0, 1, [("InitiatorName", INAME), ("TargetName", TNAME), ("AuthMethod", "CHAP")]))
    c, _ = response(s)
    assert not s.failed and c.flags & p.TRANSIT == 0 and s.stage == 0


def test_continued_text_is_gathered_across_requests():
    login = Login(portal(), tsih=2)
    whole = t.encode([("InitiatorName", INAME), ("TargetName", TNAME)])
    s = login.receive(req(1, 3, [], transit=False, cont=True, data=whole[:10]))
    c, keys = response(s)
    assert not s.failed and keys == {} and c.dsl == 0
    s = login.receive(req(1, 3, [], data=whole[10:]))
    assert s.complete and login.session.initiator_name == INAME


def test_identity_fields_may_not_change_mid_login():
    login = Login(portal(chap={"host1": SECRET}), tsih=1)
    login.receive(req(0, 1, [("InitiatorName", INAME), ("TargetName", TNAME), ("AuthMethod", "CHAP")],
                      transit=False))
    s = login.receive(req(0, 1, [("CHAP_A", "5")], transit=False, itt=0x99))
    assert s.status == p.LOGIN_INITIATOR_ERROR and "changed" in login.error


def test_discovery_session_with_and_without_chap():
    s = Login(portal(), tsih=3).receive(req(1, 3, [("InitiatorName", INAME), ("SessionType", "Discovery"),
                                                   ("MaxBurstLength", "65536")]))
    c, keys = response(s)
    assert s.complete and keys["MaxBurstLength"] == "Irrelevant" and "TargetPortalGroupTag" not in keys
    s = Login(portal(discovery_chap={"host1": SECRET}), tsih=3).receive(
        req(1, 3, [("InitiatorName", INAME), ("SessionType", "Discovery")]))
    assert s.status == p.LOGIN_AUTH_FAILURE


def test_a_login_that_goes_round_in_circles_ends():
    login = Login(portal(chap={"host1": SECRET}), tsih=1)
    login.receive(req(0, 1, [("InitiatorName", INAME), ("TargetName", TNAME), ("AuthMethod", "CHAP")],
                      transit=False))
    for _ in range(70):  # a byte of text at a time, never finishing
        s = login.receive(req(0, 1, [], transit=False, cont=True, data=b"C"))
        if s.failed:
            break
    assert s.failed and "too many" in login.error
