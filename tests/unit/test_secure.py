"""syncd.secure: the handshake and channels of every daemon-to-daemon connection, sans-IO and over
socketpairs. Every refusal is the same bytes; nothing a failed peer sent becomes plaintext."""

from __future__ import annotations

import socket
import threading

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import secure
from syncd.secure import REFUSAL, AuthError, Handshake, Role, Security
from tests.securekit import blocking_handshake, read_all, tls_security

KEY = Security("key", key=b"0123456789abcdef-key")


def pump(a: Handshake, b: Handshake, tamper=None) -> None:
    """Run two handshakes against each other in memory until both are done (or one raises)."""
    for _ in range(20):
        if a.done and b.done:
            for src, dst in ((a, b), (b, a)):
                out = src.take_output()
                if out:
                    assert dst.channel.unwrap(out) == b""
            return
        for src, dst in ((a, b), (b, a)):
            out = src.take_output()
            if tamper is not None:
                out = tamper(src, out)
            if out and dst.done:  # after the end of its handshake: channel input (TLS tickets)
                assert dst.channel.unwrap(out) == b""
            elif out:
                dst.receive(out)
    raise AssertionError("the handshake did not finish")


def pair(sec_d: Security = KEY, sec_l: Security = KEY, names=("A", "W"), expect=("W", None), records=None):
    d = Handshake(sec_d, Role.DIALER, names[0], expect[0], records=records)
    lis = Handshake(sec_l, Role.LISTENER, names[1], expect[1], records=records)
    return d, lis


def over_socketpair(dialer: Handshake, listener: Handshake):
    """Both handshakes over a real socketpair (threads, blocking sockets): for each end, its
    first plaintext or the exception it raised (``dialer``, ``listener``), every byte it received
    (``dialer_got``, ``listener_got``) and what came after its handshake (``*_rest``)."""
    sd, sl = socket.socketpair()
    sd.settimeout(10)
    sl.settimeout(10)
    res: dict = {}

    class Tap:
        def __init__(self, sock, name):
            self.sock, self.name = sock, name
            res[name + "_got"] = b""

        def recv(self, n):
            data = self.sock.recv(n)
            res[self.name + "_got"] += data
            return data

        def sendall(self, data):
            self.sock.sendall(data)

    def run(name, sock, hs):
        try:
            res[name] = blocking_handshake(Tap(sock, name), hs)
        except Exception as e:  # recorded for the assertion
            res[name] = e
        finally:
            sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, args=("listener", sl, listener))
    t.start()
    run("dialer", sd, dialer)
    t.join(10)
    res["dialer_rest"], res["listener_rest"] = read_all(sd), read_all(sl)
    res["dialer_got"] += res["dialer_rest"]
    res["listener_got"] += res["listener_rest"]
    sd.close()
    sl.close()
    return res


@pytest.fixture(scope="module")
def cas():
    return trustme.CA(), trustme.CA()


def test_key_mode_round_trip_over_a_socketpair():
    d, lis = pair()
    res = over_socketpair(d, lis)
    assert res["dialer"] == b"" and res["listener"] == b""
    assert (d.peer_name, lis.peer_name) == ("W", "A")
    wire = b"".join(bytes(b) for b in d.channel.wrap([b"hello ", memoryview(b"witness")]))
    assert b"hello witness" in wire  # integrity, not secrecy, in this mode
    assert lis.channel.unwrap(wire) == b"hello witness"
    back = b"".join(bytes(b) for b in lis.channel.wrap([b"decision"]))
    assert d.channel.unwrap(back[:5]) == b"" and d.channel.unwrap(back[5:]) == b"decision"


def test_tls_mode_round_trip_over_a_socketpair(cas, tmp_path):
    ca, _ = cas
    d, lis = pair(tls_security(ca, "A", tmp_path / "a"), tls_security(ca, "W", tmp_path / "w"))
    res = over_socketpair(d, lis)
    assert res["dialer"] == b"" and res["listener"] == b""
    # What came after the handshakes (TLS 1.3 session tickets) is channel input, not plaintext.
    assert d.channel.unwrap(res["dialer_rest"]) == b"" and lis.channel.unwrap(res["listener_rest"]) == b""
    wire = b"".join(bytes(b) for b in d.channel.wrap([b"secret decision"]))
    assert b"secret" not in wire
    assert lis.channel.unwrap(wire) == b"secret decision"
    back = b"".join(bytes(b) for b in lis.channel.wrap([b"granted"]))
    assert d.channel.unwrap(back) == b"granted"


def refused(res: dict, who: str) -> None:
    """``who`` raised AuthError and sent exactly REFUSAL after its handshake bytes."""
    assert isinstance(res[who], AuthError), res[who]
    other = "dialer_got" if who == "listener" else "listener_got"
    assert res[other].endswith(REFUSAL) and res[other].count(b"SYNCDNO!") == 1


@pytest.mark.parametrize("case", ["wrong key", "wrong name", "unadmitted name", "mode", "ca", "cert name"])
def test_failures_get_the_same_refusal_and_no_channel(case, cas, tmp_path):
    ca, other = cas
    if case == "wrong key":
        d, lis = pair(Security("key", key=b"another-key-0123456789"))
    elif case == "wrong name":
        d, lis = pair(names=("A", "impostor"))
    elif case == "unadmitted name":
        d, lis = pair(names=("C", "W"), expect=("W", frozenset({"A", "B"})))
    elif case == "mode":
        d, lis = pair(Security("insecure"))
    elif case == "ca":
        foreign = tls_security(other, "A", tmp_path / "a")
        foreign = Security("tls", tls_certificate=foreign.tls_certificate, tls_key=foreign.tls_key,
                           tls_ca=tls_security(ca, "X", tmp_path / "x").tls_ca)
        d, lis = pair(foreign, tls_security(ca, "W", tmp_path / "w"))
    else:  # a certificate from the right CA for another name
        d, lis = pair(tls_security(ca, "B", tmp_path / "b"), tls_security(ca, "W", tmp_path / "w"))
    res = over_socketpair(d, lis)
    who = "dialer" if case in ("wrong name",) else "listener"
    refused(res, who)
    assert not d.done or case in ("ca", "cert name")  # TLS 1.3: the client is done before the server checks it
    assert not lis.done or case == "wrong name"


def test_version_mismatch_is_refused():
    lis = Handshake(KEY, Role.LISTENER, "W", None)
    pre = bytearray(secure.build_preface("key", Role.DIALER, bytes(32), "A"))
    pre[8] = secure.VERSION + 1
    with pytest.raises(AuthError, match="version"):
        lis.receive(bytes(pre))
    assert not lis.done


def test_same_role_and_echoed_nonce_are_refused():
    lis = Handshake(KEY, Role.LISTENER, "W", None)
    with pytest.raises(AuthError, match="role"):
        lis.receive(secure.build_preface("key", Role.LISTENER, bytes(32), "A"))
    lis = Handshake(KEY, Role.LISTENER, "W", None)
    with pytest.raises(AuthError, match="echoed"):
        lis.receive(secure.build_preface("key", Role.DIALER, lis.nonce, "A"))


def test_a_recorded_handshake_replayed_to_a_new_listener_fails():
    d, lis = pair()
    recorded = []

    def tap(src, out):
        if src is d:
            recorded.append(out)
        return out

    pump(d, lis, tap)
    records = b"".join(bytes(b) for b in d.channel.wrap([b"CLAIM rcg1"]))
    fresh = Handshake(KEY, Role.LISTENER, "W", None)
    fresh.take_output()
    with pytest.raises(AuthError, match="failed to prove"):
        fresh.receive(b"".join(recorded) + records)
    assert not fresh.done and fresh.channel is None


def session(records=None):
    d, lis = pair(records=records)
    pump(d, lis)
    return d.channel, lis.channel


def test_records_replayed_reordered_truncated_or_moved_fail():
    snd, rcv = session()
    r1 = b"".join(bytes(b) for b in snd.wrap([b"first"]))
    r2 = b"".join(bytes(b) for b in snd.wrap([b"second"]))
    assert rcv.unwrap(r1) == b"first"
    with pytest.raises(AuthError):  # replayed
        rcv.unwrap(r1)
    snd, rcv = session()
    r1 = b"".join(bytes(b) for b in snd.wrap([b"first"]))
    r2 = b"".join(bytes(b) for b in snd.wrap([b"second"]))
    with pytest.raises(AuthError):  # reordered
        rcv.unwrap(r2 + r1)
    snd, rcv = session()
    r1 = b"".join(bytes(b) for b in snd.wrap([b"first"]))
    assert rcv.unwrap(r1[:-1]) == b""  # truncated: waits, yields nothing
    other_snd, other_rcv = session()
    with pytest.raises(AuthError):  # moved to another session
        other_rcv.unwrap(r1)
    d, lis = pair()
    pump(d, lis)
    back = b"".join(bytes(b) for b in lis.channel.wrap([b"x"]))
    with pytest.raises(AuthError):  # reflected to its sender
        lis.channel.unwrap(back)


def test_a_refusal_inside_the_channel_is_named():
    _, rcv = session()
    with pytest.raises(AuthError, match="refused"):
        rcv.unwrap(REFUSAL)


WIRE_PLAIN = [b"REGISTER rcg1 A B", b"", b"REPORT" * 50, bytes(range(256))]


def fresh_wire(records=None):
    snd, rcv = session(records)
    wire = b"".join(b"".join(bytes(b) for b in snd.wrap([m])) for m in WIRE_PLAIN)
    return wire, rcv


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_mutation_of_the_wire_never_yields_altered_plaintext(data):
    wire, rcv = fresh_wire(data.draw(st.sampled_from([secure.RECORDS_V1, secure.RECORDS_V2])))
    kind = data.draw(st.sampled_from(["flip", "set", "delete", "insert", "cut"]))
    pos = data.draw(st.integers(0, len(wire) - 1))
    mutated = bytearray(wire)
    if kind == "flip":
        mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "set":
        # Another value: drawn as a non-zero difference, not filtered against the wire's byte,
        # which a new session's random keys change when hypothesis replays the example (it
        # called that inconsistent data generation and failed the test, CI at 1518760).
        mutated[pos] = wire[pos] ^ data.draw(st.integers(1, 255))
    elif kind == "delete":
        del mutated[pos]
    elif kind == "insert":
        mutated.insert(pos, data.draw(st.integers(0, 255)))
    else:
        del mutated[pos:]
    chunks = data.draw(st.lists(st.integers(1, 64), max_size=8))
    got = b""
    try:
        rest = bytes(mutated)
        for n in chunks:
            got += bytes(rcv.unwrap(rest[:n]))
            rest = rest[n:]
        got += bytes(rcv.unwrap(rest))
    except AuthError:
        pass
    plain = b"".join(WIRE_PLAIN)
    assert plain.startswith(got)  # only a prefix of what was sent, never altered bytes
    if kind != "cut":
        assert got != plain or bytes(mutated) == wire


def test_large_messages_are_split_into_records_and_rejoined():
    snd, rcv = session()
    big = bytes(range(256)) * ((secure.RECORD_MAX * 2 + 12345) // 256)
    parts = snd.wrap([big[:100], memoryview(big)[100:]])
    wire = b"".join(bytes(b) for b in parts)
    assert len(wire) > len(big) + 2 * secure.TAG_SIZE  # at least three records
    got = b"".join(bytes(rcv.unwrap(wire[i:i + 65536])) for i in range(0, len(wire), 65536))
    assert got == big


def test_tls_large_messages_round_trip(cas, tmp_path):
    ca, _ = cas
    d, lis = pair(tls_security(ca, "A", tmp_path / "a"), tls_security(ca, "W", tmp_path / "w"))
    pump(d, lis)
    big = bytes(range(256)) * (secure.RECORD_MAX // 128)
    wire = b"".join(bytes(b) for b in d.channel.wrap([big]))
    got = b"".join(bytes(lis.channel.unwrap(wire[i:i + 65536])) for i in range(0, len(wire), 65536))
    assert got == big
    tampered = bytearray(b"".join(bytes(b) for b in d.channel.wrap([b"x" * 100])))
    tampered[-5] ^= 1
    with pytest.raises(AuthError):
        lis.channel.unwrap(bytes(tampered))


def test_insecure_mode_needs_both_ends_to_say_so():
    d, lis = pair(Security("insecure"), Security("insecure"))
    pump(d, lis)
    assert d.channel.wrap([b"x"]) == [b"x"]
    d, lis = pair(Security("insecure"), KEY)
    with pytest.raises(AuthError, match="configure both ends alike"):
        pump(d, lis)
