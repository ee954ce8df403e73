"""The witness daemon as a real process: authentication (the secure handshake, key and mutual TLS),
refusals that change nothing, listener limits, decisions, persistence across restart."""

from __future__ import annotations

import functools
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trustme

from syncd import secure
from syncd.lab.rig import free_port
from syncd.witness import proto as w
from syncd.witness.client import WitnessClient, WitnessClientConfig, WitnessUnreachable
from tests.securekit import blocking_handshake, read_all, tls_files

pytestmark = pytest.mark.system
KEY = "0123456789abcdef-test-key"
SEC = secure.Security("key", key=KEY.encode())


class Client:
    """An array speaking the witness protocol by hand, after a real security handshake."""

    def __init__(self, port: int, node: str, sec: secure.Security = SEC, source: str = "127.0.0.1",
                 fresh: bool = False):
        self.fresh = fresh  # set the FRESH bit of req_id (a node since it exists; older ones did not)
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.hs = secure.Handshake(sec, secure.Role.DIALER, node, "W")
        first = blocking_handshake(self.s, self.hs)
        self.chan = self.hs.channel
        self.dec = w.WDecoder()
        self.dec.receive_data(first)
        self.rid = 0

    def next(self):
        while (f := self.dec.next_frame()) is None:
            data = self.s.recv(65536)
            if not data:
                raise EOFError("witness closed the connection")
            self.dec.receive_data(bytes(self.chan.unwrap(data)))
        return f

    def ask(self, t, **fields):
        self.rid += 1
        rid = self.rid | (w.FRESH if self.fresh else 0)
        self.s.sendall(b"".join(bytes(b) for b in self.chan.wrap([w.encode(t, rid, **fields)])))
        f = self.next()
        assert f.req_id == rid
        return f


def attempt(port: int, sec: secure.Security, node: str, frames: bytes = b"", source: str = "127.0.0.1") -> bytes:
    """An array that cannot authenticate: runs its side of the handshake as far as it goes, sends
    ``frames`` (through the channel if it got one, else in the clear) and returns every byte the
    witness sent until it closed."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    hs = secure.Handshake(sec, secure.Role.DIALER, node, None)
    got = b""
    s.sendall(hs.take_output())
    try:
        while not hs.done:
            data = s.recv(65536)
            got += data
            if not data:
                break
            hs.receive(data)
            s.sendall(hs.take_output())
    except secure.AuthError:
        # It found the witness's proof wrong: still send its own (it may have been queued with
        # the failure), so the witness judges it instead of waiting out its handshake deadline.
        try:
            s.sendall(hs.take_output())
        except OSError:
            return got + read_all(s)
    except OSError:
        return got
    try:
        if hs.done and frames:
            s.sendall(b"".join(bytes(b) for b in hs.channel.wrap([frames])))
        elif frames:
            s.sendall(frames)
    except OSError:
        pass
    got += read_all(s)
    s.close()
    return got


def snapshot(state_dir: Path) -> dict:
    """The witness's persistent state, byte for byte (what a refused peer must not change)."""
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir()) if p.is_file()}


class WitnessProc:
    def __init__(self, tmp_path: Path, auth: str, extra: str = ""):
        self.tmp = tmp_path
        self.port = free_port()
        self.cfg = tmp_path / "witness.toml"
        self.cfg.write_text(f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{self.port}"]\nstate_dir = "state"\n'
                            f'{auth}\nnodes = ["A", "B"]\nowner_lease = 0.3\nmargin = 0.1\ngrace = 1.0\n{extra}')
        self.state = tmp_path / "state"
        self.log = tmp_path / "w.log"
        self.procs: list[subprocess.Popen] = []

    def start(self):
        p = subprocess.Popen([sys.executable, "-m", "syncd", "witness", "--config", str(self.cfg)],
                             stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (self.state / "witness.lock").exists() or self.state.exists():
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return p
                except OSError:
                    pass
            if p.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(self.log.read_text())

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait(5)


@pytest.fixture
def make_witness(tmp_path):
    made = []

    def make(auth: str = f'key = "{KEY}"', extra: str = "", sub: str = "w") -> WitnessProc:
        d = tmp_path / sub
        d.mkdir()
        wp = WitnessProc(d, auth, extra)
        wp.start()
        made.append(wp)
        return wp

    yield make
    for wp in made:
        wp.stop()


@pytest.fixture
def witness(make_witness):
    wp = make_witness()
    return wp.port, wp.start, wp.procs


def test_unknown_arrays_wrong_keys_and_garbage_get_the_same_refusal_and_change_nothing(make_witness):
    wp = make_witness()
    a = Client(wp.port, "A")
    assert a.hs.peer_name == "W"
    a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    before = snapshot(wp.state)
    register_c = w.encode(w.WType.REGISTER, 1, group="rcgX", member1="C", member2="A", owner="C", epoch=9)
    claim = w.encode(w.WType.CLAIM, 2, group="rcg1", epoch=1)
    tails = []
    for sec, node, frames in [
        (SEC, "C", register_c),  # the right key, but not an admitted array
        (secure.Security("key", key=b"wrong-key-wrong-key"), "A", claim),
        (secure.Security("key", key=b"wrong-key-wrong-key"), "B", register_c + claim),
        (secure.Security("insecure"), "B", claim),  # another mode
    ]:
        got = attempt(wp.port, sec, node, frames)
        assert got.endswith(secure.REFUSAL) and got.count(b"SYNCDNO!") == 1
        tails.append(got[-len(secure.REFUSAL):])
    for junk in (b"garbage" * 20, claim, b"SYNCDSEC" + bytes([2, 1, 0]) + bytes(32) + b"\x01A"):  # version 2
        s = socket.create_connection(("127.0.0.1", wp.port), timeout=10)
        s.sendall(junk)
        got = read_all(s)
        assert got.endswith(secure.REFUSAL)
        tails.append(got[-len(secure.REFUSAL):])
    assert len(set(tails)) == 1  # one refusal, whatever was wrong
    assert snapshot(wp.state) == before  # nothing registered, nothing decided
    d = a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)
    assert (d.owner, d.epoch) == ("A", 1)  # and the witness keeps serving the real array
    log = wp.log.read_text()
    assert "WARNING" in log and "refused 127.0.0.1: the peer claims to be 'C'" in log
    assert "failed to prove the shared key" in log


def capture(port: int, wport: int, node: str, groups, then):
    """A real witness client (the node's code) for ``node`` reaching the witness at ``wport``
    through a relay on ``port`` that records both directions; ``then(wc)`` runs once it has
    registered and reported. Returns (bytes node -> witness, bytes witness -> node, then's result)."""
    up, down = bytearray(), bytearray()
    out = {}

    async def relay(stream):
        peer = await trio.open_tcp_stream("127.0.0.1", wport)

        async def pump(src, dst, buf):
            try:
                while data := await src.receive_some(65536):
                    buf += data
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as n:
            n.start_soon(pump, stream, peer, up)
            n.start_soon(pump, peer, stream, down)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(functools.partial(trio.serve_tcp, relay, port, host="127.0.0.1"))
            reported = trio.Event()
            wc = WitnessClient(WitnessClientConfig(("127.0.0.1", port), SEC, "W", interval=0.05), node,
                               lambda: groups, lambda *a: reported.set())
            n.start_soon(wc.run)
            with trio.fail_after(10):
                await reported.wait()
            out["result"] = await then(wc)
            n.cancel_scope.cancel()

    trio.run(main)
    return bytes(up), bytes(down), out["result"]


def test_a_captured_real_session_replayed_cannot_claim_or_keep_a_group(make_witness):
    wp = make_witness()
    a = Client(wp.port, "A")
    a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)

    async def claim(wc):
        d, _ = await wc.decide(w.WType.CLAIM, "rcg1", 1)
        return d

    up, down, d = capture(free_port(), wp.port, "B", [("rcg1", ("A", "B"), "A", 1, w.REPORT_PEER_ALIVE)], claim)
    assert d is not None and not d.granted  # A is alive: the real B was refused the group
    assert up.startswith(b"SYNCDSEC") and len(up) > 200  # preface, proof and tagged records
    a.s.close()  # A dies: from now on a CLAIM by B would be granted
    time.sleep(0.6)
    before = snapshot(wp.state)
    # The whole recorded stream at once, then replayed step by step as the witness answers.
    got = attempt_raw(wp.port, up)
    assert got.endswith(secure.REFUSAL) and b"SYNW" not in got
    s = socket.create_connection(("127.0.0.1", wp.port), timeout=10)
    pre = up[:secure.PREFACE_MAX]
    n = pre.index(b"B", 8 + 3 + secure.NONCE_SIZE) + 1  # the recorded preface ends with the name
    s.sendall(up[:n])
    assert s.recv(65536).startswith(b"SYNCDSEC")  # the witness's preface, with a fresh nonce
    s.sendall(up[n:])
    assert read_all(s).endswith(secure.REFUSAL)
    # The recorded records after a fresh, valid handshake (another session's keys): refused too.
    b = Client(wp.port, "B")
    b.s.sendall(up[n + secure.PROOF_SIZE:])
    got = read_all(b.s)
    assert got.endswith(secure.REFUSAL)
    assert snapshot(wp.state) == before  # no decision recorded, the group still A's at epoch 1
    b = Client(wp.port, "B")  # the real B can claim: the replays could have done it too
    d = b.ask(w.WType.CLAIM, group="rcg1", epoch=1)
    assert (d.granted, d.owner, d.epoch) == (True, "B", 2)
    a2 = Client(wp.port, "A")  # and the replay of A's group keep by someone without the key: refused
    assert attempt(wp.port, secure.Security("key", key=b"x" * 16), "A",
                   w.encode(w.WType.KEEP, 1, group="rcg1", epoch=1)).endswith(secure.REFUSAL)
    d = a2.ask(w.WType.KEEP, group="rcg1", epoch=1)
    assert not d.granted and (d.owner, d.epoch) == ("B", 2)


def attempt_raw(port: int, data: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    got = read_all(s)
    s.close()
    return got


def test_a_node_is_never_believed_by_a_witness_with_another_key_or_an_impostor(make_witness):
    wp = make_witness(auth='key = "another-key-0123456789"')
    seen = {}

    async def impostor(stream):
        """Answers with a preface and a proof it cannot compute, then grants everything in clear."""
        hs = secure.Handshake(SEC, secure.Role.LISTENER, "W", None)
        await stream.send_all(hs.take_output() + bytes(secure.PROOF_SIZE))
        await stream.receive_some(4096)
        await stream.send_all(w.encode(w.WType.DECISION, 1, granted=True, owner="B", epoch=9, reason="yes"))
        await trio.sleep(5)

    async def main():
        async with trio.open_nursery() as n:
            listeners = await n.start(functools.partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
            for label, port in (("impostor", listeners[0].socket.getsockname()[1]), ("wrong key", wp.port)):
                wc = WitnessClient(WitnessClientConfig(("127.0.0.1", port), SEC), "B", lambda: [])
                try:
                    await wc._connect()
                except WitnessUnreachable as e:
                    seen[label] = str(e)
                seen[label + " session"] = wc.sess
                d, _ = await wc.decide(w.WType.CLAIM, "rcg1", 1)
                seen[label + " decision"] = d
            n.cancel_scope.cancel()

    trio.run(main)
    # The impostor's proof fails at the node; the real witness with another key finds the
    # node's proof wrong first (the dialer proves first) and refuses it.
    assert "not authenticated" in seen["impostor"] and "failed to prove the shared key" in seen["impostor"]
    assert "not authenticated" in seen["wrong key"] and "refused this end's authentication" in seen["wrong key"]
    for label in ("impostor", "wrong key"):
        assert seen[label + " session"] is None and seen[label + " decision"] is None
    assert not (wp.state / "witness.json").exists()


def test_mutual_tls_admits_certificates_from_its_ca_for_the_name_claimed_only(make_witness, tmp_path):
    ca, other = trustme.CA(), trustme.CA()
    wf = tls_files(ca, "W", tmp_path / "wcerts")
    wp = make_witness(auth="\n".join(f'{k} = "{v}"' for k, v in wf.items()))
    a_sec = secure.Security("tls", **tls_files(ca, "A", tmp_path / "A"))
    a = Client(wp.port, "A", a_sec)
    d = a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert (d.granted, d.owner, d.epoch) == (True, "A", 1)
    before = snapshot(wp.state)
    foreign = tls_files(other, "B", tmp_path / "foreign")
    foreign["tls_ca"] = wf["tls_ca"]  # it trusts the witness, but its own certificate is from another CA
    b_sec = secure.Security("tls", **tls_files(ca, "B", tmp_path / "B"))
    claim = w.encode(w.WType.CLAIM, 1, group="rcg1", epoch=1)
    for sec, node in ((secure.Security("tls", **foreign), "B"), (b_sec, "A"), (SEC, "B")):
        assert attempt(wp.port, sec, node, claim).endswith(secure.REFUSAL)
    assert snapshot(wp.state) == before
    assert Client(wp.port, "B", b_sec).ask(w.WType.REPORT, group="rcg1", epoch=1, flags=0).owner == "A"
    log = wp.log.read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in log and "claims to be 'A', its certificate names ['b']" in log


def test_listener_limits_per_address_handshake_deadline_and_idle_sessions(make_witness):
    wp = make_witness(extra="max_connections_per_address = 3\nhandshake_timeout = 0.5\nidle_timeout = 1\n")
    silent = [socket.create_connection(("127.0.0.1", wp.port), timeout=10, source_address=("127.0.0.2", 0))
              for _ in range(3)]
    # Over the limit for that address: closed at once, before a byte is read or sent.
    extra = socket.create_connection(("127.0.0.1", wp.port), timeout=10, source_address=("127.0.0.2", 0))
    assert read_all(extra) == b""
    a = Client(wp.port, "A")  # another address is still served
    assert a.ask(w.WType.CLAIM, group="nosuch", epoch=1).type == w.WType.ERROR
    for s in silent:  # who never authenticates is refused at the deadline
        got = read_all(s)
        assert got.startswith(b"SYNCDSEC") and got.endswith(secure.REFUSAL)
    f = a.next()  # an authenticated session that stays silent is closed
    assert f.type == w.WType.GOODBYE and "idle" in f.reason
    assert read_all(a.s) == b""
    assert not (wp.state / "witness.json").exists()
    log = wp.log.read_text()
    assert re.search(r"connection from 127\.0\.0\.2 refused: \d+ connections open \(3 from that address\)", log)
    # Logged once the refusal is delivered (the witness lingers up to 1 s for the peer to read it).
    deadline = time.monotonic() + 10
    while "no security handshake within 0.5s" not in log and time.monotonic() < deadline:
        time.sleep(0.1)
        log = wp.log.read_text()
    assert "no security handshake within 0.5s" in log


def test_a_flood_of_bad_connections_is_logged_with_a_bound(make_witness):
    wp = make_witness(extra="max_connections_per_address = 200\n")
    bad = secure.Security("key", key=b"wrong-key-wrong-key")
    for _ in range(40):
        assert attempt(wp.port, bad, "A").endswith(secure.REFUSAL)
    assert Client(wp.port, "A").ask(w.WType.CLAIM, group="nosuch", epoch=1).type == w.WType.ERROR
    # (The hand-written client sets no FRESH bit: the witness's one warning about that is not
    # about the flood.)
    warnings = [ln for ln in wp.log.read_text().splitlines() if "WARNING" in ln and "does not ask" not in ln]
    assert 1 <= len(warnings) <= 10 and all("127.0.0.1" in ln for ln in warnings)


def test_failover_decision_survives_a_witness_restart(witness):
    port, start, procs = witness
    a, b = Client(port, "A"), Client(port, "B")
    d = a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert (d.granted, d.owner, d.epoch) == (True, "A", 1)
    d = a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)
    d = b.ask(w.WType.CLAIM, group="rcg1", epoch=1)
    assert not d.granted and "may still serve" in d.reason
    assert b.ask(w.WType.CLAIM, group="nosuch", epoch=1).type == w.WType.ERROR
    a.s.close()  # A dies
    time.sleep(0.6)
    d = b.ask(w.WType.CLAIM, group="rcg1", epoch=1)
    assert (d.granted, d.owner, d.epoch) == (True, "B", 2)
    procs[-1].terminate()
    procs[-1].wait(5)
    start()
    a2 = Client(port, "A")
    d = a2.ask(w.WType.KEEP, group="rcg1", epoch=1)  # the old owner returns: it lost the group
    assert not d.granted and (d.owner, d.epoch) == ("B", 2) and "failsafe" in d.reason
    d = a2.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert (d.owner, d.epoch) == ("B", 2)  # registration never overwrites a record


def test_a_request_heard_late_after_the_answer_before_it_is_refused_and_changes_nothing(make_witness):
    """docs/failover-plan.md rule 4: a request whose req_id carries FRESH is taken only within
    decide.FRESH_FOR (less the clocks' drift) of the witness's previous answer on its session, so
    one its client gave up on (a REPORT saying "B in sync" delayed past the client's timeout,
    heard after the KEEP that revoked it) changes nothing; the client asks again at once. A
    session's first request is refused so too. Requests without the bit (an older node) are
    taken as before, and the witness says once per session that they are not checked."""
    wp = make_witness()
    a = Client(wp.port, "A", fresh=True)
    before = snapshot(wp.state)
    f = a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert (f.type, f.reason) == (w.WType.STALE, "first request of the session")
    assert snapshot(wp.state) == before  # not registered
    f = a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert f.type == w.WType.DECISION and f.granted
    f = a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)
    assert f.type == w.WType.DECISION  # right after the answer before it: taken
    a2 = Client(wp.port, "A", fresh=True)  # the link went: A's KEEP on its next connection
    assert a2.ask(w.WType.KEEP, group="rcg1", epoch=1).type == w.WType.STALE
    d = a2.ask(w.WType.KEEP, group="rcg1", epoch=1)
    assert d.granted and (d.owner, d.epoch) == ("A", 1)
    revoked = snapshot(wp.state)
    assert b'"secondary_in_sync": false' in revoked["witness.json"]
    time.sleep(1.2)  # longer than the client waits for an answer (decide.FRESH_FOR)
    # The REPORT saying B is in sync, on the first connection, heard only now: refused.
    f = a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)
    assert f.type == w.WType.STALE and f.reason.startswith("heard 1.") and "after the answer before it" in f.reason
    assert snapshot(wp.state) == revoked  # B still out of sync
    # Asked again at once, right after that answer, the same request is taken.
    f = a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE)
    assert f.type == w.WType.DECISION
    # An older node's requests carry no FRESH bit: taken as before, said once in the log.
    old = Client(wp.port, "B")
    assert old.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=0).type == w.WType.DECISION
    time.sleep(1.2)
    assert old.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=0).type == w.WType.DECISION
    log = wp.log.read_text()
    assert log.count("B (127.0.0.1) does not ask for its requests to be refused when heard late") == 1
    assert "A (127.0.0.1) does not ask" not in log
