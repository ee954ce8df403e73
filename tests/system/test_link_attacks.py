"""Attacks on the replication link (issue 11, rows 1, 2 and 8, and the half-open flood), played
as an attacker on the network would against a running lab, and the link in mutual TLS mode.

Every attack must be refused and change nothing: the replica bytes at both nodes (read back
through NBD), each group's role and epoch, the node metadata files, and the real link (its
paths stay up, never reconnected). The refusal is logged with the attacker's address: each
attack comes from a loopback address of its own (127.0.0.x), so the log line names it and no
other attack shares its rate-limited log entry."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
import ssl
import time
import tomllib
from pathlib import Path

import pytest
import trio
import trustme

from syncd import secure
from syncd.ctl import call
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_down, lab_up
from syncd.nbd.client import client_tls_context, open_nbd
from syncd.repl.proto import Frame, encode_bytes

from .rig import FAST_LINK

pytestmark = pytest.mark.system
MiB = 1 << 20
SIZE = 16 * MiB
# A hang guard only: every wait below ends on an event (a reply, a close, a log line).
GUARD = 20.0


# -- the lab and what must not change ----------------------------------------------------------
def start(tmp_path, **kw) -> dict:
    d = tmp_path / "lab"
    try:
        return lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, timeout=60, **kw)
    except Exception:
        for f in d.glob("*.log"):
            print(f"--- {f}\n{f.read_text()[-3000:]}")
        raise


def stop(lab: dict) -> None:
    lab_down(lab["dir"])
    for f in sorted(Path(lab["dir"]).glob("*.log")):
        if "Traceback" in f.read_text():
            print(f"--- {f} has a traceback:\n{f.read_text()[-4000:]}")


@pytest.fixture
def lab(tmp_path):
    lab = start(tmp_path, link_opts=FAST_LINK)
    write(lab, "A", 0, os.urandom(SIZE))  # the replicas hold data an injected write would change
    yield lab
    stop(lab)


def tls_ctx(lab: dict) -> ssl.SSLContext | None:
    t = lab.get("tls")
    if not t:
        return None
    c = Path(t["client_dir"])
    return client_tls_context(t["ca"], str(c / "client-cert.pem"), str(c / "client-key.pem"))


def write(lab: dict, site: str, offset: int, data: bytes) -> None:
    async def go():
        async with open_nbd(lab["nodes"][site]["volumes"]["vv1"]["uri"], tls=tls_ctx(lab)) as c:
            for o in range(0, len(data), 4 * MiB):
                await c.write(offset + o, data[o:o + 4 * MiB])
    trio.run(go)


def read(lab: dict, site: str, offset: int = 0, length: int = SIZE) -> bytes:
    async def go():
        async with open_nbd(lab["nodes"][site]["volumes"]["vv1"]["uri"], tls=tls_ctx(lab)) as c:
            return b"".join([await c.read(o, min(4 * MiB, offset + length - o))
                             for o in range(offset, offset + length, 4 * MiB)])
    return trio.run(go)


def show(lab: dict, site: str) -> dict:
    return call(lab["nodes"][site]["admin_socket"], "showrcopy")


def snapshot(lab: dict) -> dict:
    """What an attack must not change, at both sites."""
    out = {}
    for site in ("A", "B"):
        st = show(lab, site)
        g = st["groups"][0]
        data_dir = Path(lab["nodes"][site]["config"]).parent / "data"
        meta = {f.name: f.read_bytes() for f in sorted(data_dir.iterdir())
                if f.name == "state.json" or f.name.startswith("intent-")}
        out[site] = {
            "replica": hashlib.sha256(read(lab, site)).hexdigest(),
            "group": {k: g.get(k) for k in ("name", "gid", "role", "epoch", "peer_mode", "serving", "generation")},
            "metadata": meta,
            "link": (st["link"]["state"], st["link"]["session"],
                     [(p["index"], p["state"], p["since"]) for p in st["link"]["paths"]]),
        }
    assert out["A"]["replica"] == out["B"]["replica"]
    assert out["A"]["link"][0] == "up" and all(p[1] == "up" for s in "AB" for p in out[s]["link"][2])
    return out


def assert_unchanged(lab: dict, before: dict) -> None:
    after = snapshot(lab)
    for site in ("A", "B"):
        for k in before[site]:
            assert after[site][k] == before[site][k], f"{site}: {k} changed by the attack"


def path_port(lab: dict, site: str, index: int) -> int:
    """The port node ``site`` listens on for path ``index`` (B listens; A dials through the relay)."""
    cfg = tomllib.loads(Path(lab["nodes"][site]["config"]).read_text())
    return int(cfg["link"]["paths"][index]["local"].rsplit(":", 1)[1])


def wait_logged(lab: dict, site: str, source: str, words: str = "") -> str:
    """The refusal line naming ``source`` in ``site``'s log (the attack has been handled)."""
    log = Path(lab["nodes"][site]["log"])
    deadline = time.monotonic() + GUARD
    while True:
        for line in log.read_text().splitlines():
            if f"refused a connection from {source}:" in line and words in line:
                return line
        assert time.monotonic() < deadline, f"no refusal from {source} ({words!r}) in {log}"
        time.sleep(0.05)


# -- the attacker's side -----------------------------------------------------------------------
def dial(port: int, source: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(GUARD)
    s.connect(("127.0.0.1", port))
    return s


def read_to_end(s: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    got = bytearray()
    while True:
        try:
            d = s.recv(65536)
        except ConnectionResetError:
            break
        if not d:
            break
        got += d
    s.close()
    return bytes(got)


def send_and_read(port: int, source: str, data: bytes) -> bytes:
    s = dial(port, source)
    try:
        s.sendall(data)
    except OSError:  # refused while we were still sending: what it sent is still to be read
        pass
    return read_to_end(s)


def split_reply(reply: bytes) -> tuple[secure.Preface, bytes]:
    """The node's preface (sent at once, before it reads anything) and what followed it."""
    got = secure.parse_preface(reply)
    assert got is not None, f"no complete preface in the reply {reply!r}"
    pre, used = got
    return pre, reply[used:]


def assert_refused(reply: bytes) -> secure.Preface:
    pre, rest = split_reply(reply)
    assert rest == secure.REFUSAL, f"expected the refusal after the preface, got {rest!r}"
    assert (pre.role, pre.name) == (secure.Role.LISTENER, "B")
    return pre


def injected_frames(gid: int, epoch: int, group: str = "rcg1") -> bytes:
    """HELLO as node A (no key), a WRITE over the start of the volume, a CONTROL takeover."""
    hello = Frame.hello(node_uuid=secrets.token_bytes(16), node_name="A", path_index=0, link_session=7)
    wr = Frame.write(1, gid, epoch, 1, 0, b"\xee" * 65536)
    takeover = Frame.control(2, {"op": "takeover", "group": group, "epoch": 50})
    return encode_bytes(hello) + encode_bytes(wr) + encode_bytes(takeover)


def preface_as(name: str, mode: secure.Mode = "key") -> bytes:
    return secure.build_preface(mode, secure.Role.DIALER, secrets.token_bytes(secure.NONCE_SIZE), name)


# -- row 1: HELLO as node A, then WRITE and takeover ---------------------------------------------
def test_hello_as_A_without_the_key_is_refused_before_any_frame_is_read(lab):
    before = snapshot(lab)
    g = before["B"]["group"]
    frames = injected_frames(g["gid"], g["epoch"])
    port = path_port(lab, "B", 0)
    attacks = {
        # the old protocol: frames straight away
        "127.0.0.11": (frames, "did not start a syncd security handshake"),
        # a preface claiming to be A without any authentication
        "127.0.0.12": (preface_as("A", "insecure") + frames, "the peer uses insecure, this end key"),
        # a preface in key mode, then the frames where the proof must be
        "127.0.0.13": (preface_as("A") + frames, "failed to prove the shared key"),
    }
    for source, (data, why) in attacks.items():
        assert_refused(send_and_read(port, source, data))
        wait_logged(lab, "B", source, why)
    assert_unchanged(lab, before)
    assert "takeover" not in Path(lab["nodes"]["B"]["log"]).read_text()


# -- row 2: a captured session replayed ----------------------------------------------------------
def record_session(lab: dict, rec: Path, path: int) -> bytes:
    """The bytes node A sent on a new session of ``path``, as captured on the wire by the lab's
    relay (the path is dropped so that A dials it again while the relay records)."""
    ctl = lab["link"]["control"]
    old = next(p for p in show(lab, "A")["link"]["paths"] if p["index"] == path)["since"]
    proxy_command(ctl, "record", paths=[path], limit=64 * MiB)
    proxy_command(ctl, "heal", paths=[path])  # drops its connections: A reconnects
    deadline = time.monotonic() + GUARD
    while not any(p["index"] == path and p["state"] == "up" and p["since"] != old
                  for p in show(lab, "A")["link"]["paths"]):
        assert time.monotonic() < deadline, "path did not come back"
        time.sleep(0.05)
    for i in range(8):  # writes travel over both paths: some in the recorded session
        write(lab, "A", i * MiB, bytes([0x30 + i]) * MiB)
    time.sleep(0.5)  # a few keepalives on the recorded path too (more records; not a pass/fail timing)
    got = proxy_command(ctl, "recorded", paths=[path])["recorded"]
    sessions = [b"".join(base64.b64decode(chunk) for side, chunk in conn if side == "c")
                for relay in got for conn in relay]
    assert sessions, "nothing recorded"
    return max(sessions, key=len)


def records(data: bytes) -> list[bytes]:
    """The HMAC records of a recorded stream (after the handshake), whole ones only."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 4 + n + secure.TAG_SIZE
        if end > len(data):
            break
        out.append(data[pos:end])
        pos = end
    return out


def test_a_captured_session_replayed_is_refused(lab, tmp_path):
    wire = record_session(lab, tmp_path / "rec", 1)
    pre, used = secure.parse_preface(wire)
    assert (pre.name, pre.mode) == ("A", 1)
    after_proof = used + secure.PROOF_SIZE
    recs = records(wire[after_proof:])
    assert len(recs) >= 3, "the recorded session carried too few records"
    before = snapshot(lab)
    port = path_port(lab, "B", 1)

    # The whole session and cuts of it, replayed as they were captured: the proof was for the
    # other session's nonces. A cut that stops before the proof is complete waits for the
    # handshake deadline and is refused then (the same bytes).
    cuts = {"whole": len(wire), "in the preface": 10, "the preface": used, "half the proof": used + 16,
            "preface and proof": after_proof, "and the first record": after_proof + len(recs[0])}
    for i, (what, n) in enumerate(cuts.items()):
        source = f"127.0.0.{21 + i}"
        _, rest = split_reply(send_and_read(port, source, wire[:n]))
        assert rest == secure.REFUSAL, f"replay of {what}: {rest!r}"
        wait_logged(lab, "B", source)

    # Recorded records after a fresh preface (an attacker without the key)...
    source = "127.0.0.31"
    assert_refused(send_and_read(port, source, preface_as("A") + b"".join(recs)))
    wait_logged(lab, "B", source, "failed to prove the shared key")

    # ...and after a fresh handshake with the key: records of another session fail their tags.
    key = lab["link_opts"]["key"].encode()
    s = dial(port, "127.0.0.32")
    hs = secure.Handshake(secure.Security("key", key=key), secure.Role.DIALER, "A", "B")
    s.sendall(hs.take_output())
    while not hs.done:
        d = s.recv(65536)
        assert d, "the node closed during a handshake with the right key"
        hs.receive(d)
        s.sendall(hs.take_output())
    chan = hs.channel
    try:
        s.sendall(b"".join(recs))
    except (ConnectionResetError, BrokenPipeError):
        pass  # the first record failed: the node dropped the connection while the rest was sent
    rest = read_to_end(s)
    assert chan.unwrap(hs.leftover + rest) == b"", "the node answered replayed records"
    wait_logged(lab, "B", "127.0.0.32", "failed its integrity check")
    assert_unchanged(lab, before)


# -- row 8: the same reply whatever group it names -----------------------------------------------
def test_unauthenticated_frames_get_the_same_reply_for_any_group(lab):
    before = snapshot(lab)
    g = before["B"]["group"]
    port = path_port(lab, "B", 0)
    replies = {}
    n = 40
    for gid, epoch, group in ((g["gid"], g["epoch"], "rcg1"), (g["gid"] ^ 0x5A5A5A5A, 1, "nosuch"),
                              (g["gid"], 0, "rcg1")):
        for how, lead in (("raw", b""), ("preface", preface_as("A")), ("insecure", preface_as("A", "insecure"))):
            lease = Frame.lease(9, gid, epoch)
            data = lead + injected_frames(gid, epoch, group) + encode_bytes(lease)
            source = f"127.0.0.{n}"
            n += 1
            replies[(gid, epoch, how)] = split_reply(send_and_read(port, source, data))
            wait_logged(lab, "B", source)
    prefaces = {(p.version, p.mode, p.role, p.name) for p, _ in replies.values()}
    assert prefaces == {(secure.VERSION, 1, secure.Role.LISTENER, "B")}, prefaces
    rests = {rest for _, rest in replies.values()}
    assert rests == {secure.REFUSAL}, rests
    assert len({len(p.nonce) for p, _ in replies.values()}) == 1
    assert_unchanged(lab, before)


# -- a flood of half-open connections --------------------------------------------------------------
def test_a_flood_of_half_open_connections_is_refused_and_the_link_goes_on(tmp_path):
    # A long handshake deadline: the flood's first connections hold their slots while the test
    # opens the rest (the deadline is what frees them; the test does not race it).
    lab = start(tmp_path, link_opts={"path_timeout": 10.0, "io_timeout": 12.0})
    try:
        before = snapshot(lab)
        port = path_port(lab, "B", 0)
        answered, refused = [], []
        for _ in range(24):
            s = socket.socket()
            s.bind(("127.0.0.50", 0))
            s.settimeout(GUARD)
            try:
                s.connect(("127.0.0.1", port))
                first = s.recv(8)
            except ConnectionResetError:  # reset so soon that even connect() may see it
                first = b""
            (answered if first else refused).append(s)
        flood = answered + refused
        # max_handshakes_per_source (4) get the node's preface; the rest are closed at once.
        assert (len(answered), len(refused)) == (4, 20)
        wait_logged(lab, "B", "127.0.0.50", "too many connections in handshake")

        # Meanwhile the real link reconnects a dropped path and mirrors writes.
        old = {p["index"]: p["since"] for p in show(lab, "A")["link"]["paths"]}
        proxy_command(lab["link"]["control"], "heal", paths=[0])
        deadline = time.monotonic() + GUARD
        while not all(p["state"] == "up" and p["since"] != old[0]
                      for p in show(lab, "A")["link"]["paths"] if p["index"] == 0):
            assert time.monotonic() < deadline, "path 0 did not reconnect during the flood"
            time.sleep(0.05)
        data = os.urandom(4 * MiB)
        write(lab, "A", 4 * MiB, data)
        assert read(lab, "B", 4 * MiB, 4 * MiB) == data
        assert show(lab, "B")["link"]["paths_up"] == 2
        for s in flood:
            s.close()

        # The peer's own established paths (both from the relay's 127.0.0.1) are not half-open
        # connections: that address still has all its handshake slots.
        extra = [dial(port, "127.0.0.1") for _ in range(4)]
        assert all(s.recv(8) == b"SYNCDSEC" for s in extra)
        for s in extra:
            s.close()
        assert show(lab, "A")["groups"][0]["epoch"] == before["A"]["group"]["epoch"]
        assert show(lab, "B")["groups"][0]["role"] == before["B"]["group"]["role"]
    finally:
        stop(lab)


# -- mutual TLS ----------------------------------------------------------------------------------
def attack_tls(lab: dict, source: str, files: dict, name: str) -> tuple[bytes, str | None, bool]:
    """A dialer that speaks the TLS handshake with ``files`` claiming ``name``; when its side is
    done it sends HELLO, a WRITE and a takeover. Returns (every byte the node sent, this side's
    error, whether this side finished its handshake)."""
    g = show(lab, "B")["groups"][0]
    sec = secure.Security("tls", **files)
    s = dial(path_port(lab, "B", 0), source)
    hs = secure.Handshake(sec, secure.Role.DIALER, name, "B")
    raw = bytearray()
    err = None
    sent = False
    try:
        s.sendall(hs.take_output())
        while True:
            d = s.recv(65536)
            if not d:
                break
            raw += d
            if err is None and not hs.done:
                try:
                    hs.receive(d)
                except secure.AuthError as e:
                    err = str(e)
                s.sendall(hs.take_output())
            if hs.done and not sent:
                s.sendall(b"".join(bytes(b) for b in hs.channel.wrap([injected_frames(g["gid"], g["epoch"])])))
                sent = True
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    return bytes(raw), err, hs.done


def test_link_over_mutual_tls_replicates_fails_over_and_refuses_other_certificates(tmp_path):
    lab = start(tmp_path, link_opts=FAST_LINK, tls=True)
    try:
        assert show(lab, "A")["link"]["security"] == "tls"
        data = os.urandom(SIZE)
        write(lab, "A", 0, data)
        assert read(lab, "B") == data
        # One path cut: the other carries on; healed: both up again.
        ctl = lab["link"]["control"]
        proxy_command(ctl, "cut", paths=[0])
        deadline = time.monotonic() + GUARD
        while show(lab, "A")["link"]["paths_up"] != 1:
            assert time.monotonic() < deadline, "path 0 not seen down"
            time.sleep(0.05)
        more = os.urandom(2 * MiB)
        write(lab, "A", 2 * MiB, more)
        assert read(lab, "B", 2 * MiB, 2 * MiB) == more
        proxy_command(ctl, "heal", paths=[0])
        while show(lab, "A")["link"]["paths_up"] != 2 or show(lab, "B")["link"]["paths_up"] != 2:
            assert time.monotonic() < deadline + GUARD, "path 0 did not come back"
            time.sleep(0.05)
        before = snapshot(lab)

        # A certificate for "A" from another CA.
        other = trustme.CA()
        cert = other.issue_cert("A", common_name="A")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "evil.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "evil-key.pem"))
        evil = {"tls_certificate": str(tmp_path / "evil.pem"), "tls_key": str(tmp_path / "evil-key.pem"),
                "tls_ca": lab["tls"]["ca"]}
        raw, _err, _done = attack_tls(lab, "127.0.0.61", evil, "A")
        assert raw.endswith(secure.REFUSAL)
        wait_logged(lab, "B", "127.0.0.61", "TLS handshake")

        # The lab CA's certificate for the witness (or a host shim) claiming to be node A.
        for source, who in (("127.0.0.62", "W"), ("127.0.0.63", "ha")):
            raw, _err, _done = attack_tls(lab, source, lab["tls"]["certs"][who], "A")
            assert raw.endswith(secure.REFUSAL)
            wait_logged(lab, "B", source, "its certificate names")
        # ...and claiming its own name: B expects A.
        raw, _err, _done = attack_tls(lab, "127.0.0.64", lab["tls"]["certs"]["W"], "W")
        assert_refused(raw)
        wait_logged(lab, "B", "127.0.0.64", "expected 'A'")
        assert_unchanged(lab, before)
    finally:
        stop(lab)
