"""Key mode's records, version 2 (AES-256-GCM over the data as associated data) and version 1
(HMAC-SHA256), and how two ends agree on one (proto/security.md sections 3 and 4): bytes in,
bytes out, and a node of this release against the frozen previous release."""

from __future__ import annotations

import hashlib
import hmac
import logging
import mmap
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import secure
from syncd.buffers import PayloadBuffers
from syncd.secure import RECORD_MAX, TAG_SIZE, AuthError, GcmChannel, Handshake, MacChannel, Role, Security
from tests.unit import secure_release1 as release1

KEY = b"a shared key of 32 bytes.......!"
SEC = Security("key", key=KEY)
V1, V2 = secure.RECORDS_V1, secure.RECORDS_V2


def pump(d, lis, tamper=None) -> None:
    """Two handshakes (of either release) against each other until both are done or one raises;
    ``tamper(direction, bytes)`` sees and may change what travels ('d>l' or 'l>d')."""
    for _ in range(10):
        if d.done and lis.done:
            return
        for src, dst, way in ((d, lis, "d>l"), (lis, d, "l>d")):
            out = src.take_output()
            if tamper is not None:
                out = tamper(way, out)
            if out:
                dst.receive(out)
    raise AssertionError("the handshake did not finish")


def new(role: Role, records: int | None = None, key: bytes = KEY) -> Handshake:
    name, expect = ("A", "B") if role == Role.DIALER else ("B", "A")
    return Handshake(Security("key", key=key), role, name, expect, records=records)


def old(role: Role) -> release1.Handshake:
    name, expect = ("A", "B") if role == Role.DIALER else ("B", "A")
    return release1.Handshake(release1.Security("key", key=KEY), release1.Role(int(role)), name, expect)


def session(records: int = V2):
    d, lis = new(Role.DIALER, records), new(Role.LISTENER, records)
    pump(d, lis)
    return d, lis


def wire(chan, bufs) -> bytes:
    return b"".join(bytes(b) for b in chan.wrap(bufs))


def records_of(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(length, body, tag) of each record in ``data``."""
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append((n, data[4:4 + n], data[4 + n:4 + n + TAG_SIZE]))
        data = data[4 + n + TAG_SIZE:]
    return out


# -- the record format, from the spec ----------------------------------------------------------
def spec_keys(transcript: bytes, records: int) -> tuple[bytes, bytes]:
    prk = hmac.new(KEY, b"syncd keys v%d" % records + transcript, hashlib.sha256).digest()
    return (hmac.new(prk, b"dialer", hashlib.sha256).digest(), hmac.new(prk, b"listener", hashlib.sha256).digest())


def test_v2_records_are_length_data_and_a_gmac_tag_from_the_spec():
    d, lis = session()
    assert isinstance(d.channel, GcmChannel) and isinstance(lis.channel, GcmChannel)
    assert d.transcript() == lis.transcript()
    k_dialer, k_listener = spec_keys(d.transcript(), 2)
    got = [records_of(wire(d.channel, [m])) for m in (b"first", b"second record")]
    for seq, ((n, body, tag),) in enumerate(got):
        assert n == len(body)
        assert tag == AESGCM(k_dialer).encrypt(struct.pack(">IQ", 0, seq), b"", body)
    ((_, body, tag),) = records_of(wire(lis.channel, [b"first"]))
    assert tag == AESGCM(k_listener).encrypt(bytes(12), b"", body)
    # Same sequence number and data in the other direction: another key, another tag.
    assert tag != got[0][0][2]


def test_v1_records_are_still_the_hmac_records_of_the_previous_release():
    d, lis = session(V1)
    assert isinstance(d.channel, MacChannel)
    k_dialer, _ = spec_keys(d.transcript(), 1)
    ((n, body, tag),) = records_of(wire(d.channel, [b"hello ", b"world"]))
    assert (n, body) == (11, b"hello world")
    assert tag == hmac.new(k_dialer, struct.pack(">QI", 0, 11) + body, hashlib.sha256).digest()[:16]


@pytest.mark.parametrize("records", [V1, V2])
def test_round_trip_in_both_directions_and_any_chunking(records):
    d, lis = session(records)
    w = wire(d.channel, [b"hello ", memoryview(b"world"), b"", bytearray(b"!")])
    assert b"hello world!" in w  # integrity, not secrecy, in this mode (either version)
    assert b"".join(bytes(lis.channel.unwrap(w[i:i + 3])) for i in range(0, len(w), 3)) == b"hello world!"
    back = wire(lis.channel, [b"ack"])
    assert d.channel.unwrap(back[:7]) == b"" and d.channel.unwrap(back[7:]) == b"ack"


@pytest.mark.parametrize("records", [V1, V2])
@pytest.mark.parametrize("where", ["length", "data", "tag"])
def test_an_altered_record_fails(records, where):
    d, lis = session(records)
    w = bytearray(wire(d.channel, [b"WRITE 4096 at 0"]))
    w[{"length": 3, "data": 6, "tag": -1}[where]] ^= 0x01
    with pytest.raises(AuthError):
        # A longer length leaves the record incomplete: the tag fails once the bytes arrive.
        lis.channel.unwrap(bytes(w) + wire(d.channel, [b"x" * 32]))


@pytest.mark.parametrize("records", [V1, V2])
def test_replayed_reordered_cut_reflected_or_moved_records_fail(records):
    d, lis = session(records)
    r0, r1 = wire(d.channel, [b"first"]), wire(d.channel, [b"second"])
    assert lis.channel.unwrap(r0) == b"first"
    with pytest.raises(AuthError):  # replayed
        lis.channel.unwrap(r0)

    d, lis = session(records)
    r0, r1 = wire(d.channel, [b"first"]), wire(d.channel, [b"second"])
    with pytest.raises(AuthError):  # reordered
        lis.channel.unwrap(r1 + r0)

    d, lis = session(records)
    r0, r1 = wire(d.channel, [b"first"]), wire(d.channel, [b"second"])
    with pytest.raises(AuthError):  # one cut out of the stream
        lis.channel.unwrap(r1)
    d, lis = session(records)
    r0 = wire(d.channel, [b"first"])
    assert lis.channel.unwrap(r0[:-1]) == b""  # cut short: nothing until the tag is whole

    d, lis = session(records)
    w = wire(d.channel, [b"to the listener"])
    with pytest.raises(AuthError):  # reflected to its sender: the other direction's key
        d.channel.unwrap(w)

    _, other = session(records)
    with pytest.raises(AuthError):  # moved to another connection: other keys
        other.channel.unwrap(w)


def forged(key: bytes, seq: int, body: bytes = b"forged") -> bytes:
    return struct.pack(">I", len(body)) + body + AESGCM(key).encrypt(struct.pack(">IQ", 0, seq), b"", body)


@pytest.mark.parametrize("case", ["wrong key", "wrong nonce", "the listener's key", "right"])
def test_a_v2_record_verifies_only_under_its_direction_key_and_sequence_number(case):
    d, lis = session()
    k_dialer, k_listener = spec_keys(d.transcript(), 2)
    key, seq = {"wrong key": (bytes(32), 0), "wrong nonce": (k_dialer, 1),
                "the listener's key": (k_listener, 0), "right": (k_dialer, 0)}[case]
    if case == "right":  # the checks below fail for the reason they name
        assert lis.channel.unwrap(forged(key, seq)) == b"forged"
        return
    with pytest.raises(AuthError, match="record 0 failed"):
        lis.channel.unwrap(forged(key, seq))


def test_v2_large_buffers_are_tagged_in_place_and_small_ones_joined():
    d, lis = session()
    payload = bytearray(bytes(range(256)) * ((RECORD_MAX + 5 * 256) // 256))
    header = b"H" * 32
    out = d.channel.wrap([header, payload, b"t1", b"t2"])
    # header record; the payload cut at RECORD_MAX, sent from its own memory; the small tail joined.
    lengths = [len(b) for b in out[0::3]]
    assert [struct.unpack(">I", h)[0] for h in out[0::3]] == [32, RECORD_MAX, len(payload) - RECORD_MAX, 4]
    assert lengths == [4] * 4
    assert all(isinstance(b, memoryview) and b.obj is payload for b in out[4:8:3])
    w = b"".join(bytes(b) for b in out)
    got = b"".join(bytes(lis.channel.unwrap(w[i:i + 65536])) for i in range(0, len(w), 65536))
    assert got == header + payload + b"t1t2"


def test_v2_many_small_buffers_never_make_a_record_beyond_the_limit():
    d, lis = session()
    small = [bytes([i % 256]) * 9000 for i in range(300)]  # 2.7 MB in parts below the in-place size
    w = wire(d.channel, small)
    assert all(0 < n <= RECORD_MAX for n, _, _ in records_of(w))
    assert lis.channel.unwrap(w) == b"".join(small)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([V1, V2]),
       st.lists(st.lists(st.binary(max_size=40000), max_size=4), min_size=1, max_size=5),
       st.lists(st.integers(1, 70000), max_size=10))
def test_any_batches_round_trip_whatever_the_chunking(records, batches, chunks):
    d, lis = session(records)
    w = b"".join(wire(d.channel, b) for b in batches)
    got = b""
    for n in chunks:
        got += bytes(lis.channel.unwrap(w[:n]))
        w = w[n:]
    got += bytes(lis.channel.unwrap(w))
    assert got == b"".join(b"".join(b) for b in batches)


# -- which version two ends use ----------------------------------------------------------------
@pytest.mark.parametrize("d_rec,l_rec,want", [(V2, V2, V2), (V2, V1, V1), (V1, V2, V1), (V1, V1, V1)])
def test_the_lower_offer_of_the_two_is_used(d_rec, l_rec, want):
    d, lis = new(Role.DIALER, d_rec), new(Role.LISTENER, l_rec)
    pump(d, lis)
    assert d.records == lis.records == want
    assert type(d.channel) is type(lis.channel) is (GcmChannel if want == V2 else MacChannel)
    assert lis.channel.unwrap(wire(d.channel, [b"ping"])) == b"ping"


def test_an_end_offering_only_v1_sends_the_preface_of_the_previous_release():
    hs = new(Role.DIALER, V1)
    pre, _ = secure.parse_preface(hs.take_output())
    assert pre.version == 1 and secure.offered_records(pre.nonce) == V1
    hs = new(Role.DIALER, V2)
    pre, _ = secure.parse_preface(hs.take_output())
    assert pre.version == 1 and pre.nonce.startswith(secure.RECORDS_OFFER) and secure.offered_records(pre.nonce) == V2
    # Every other mode's preface carries no offer.
    assert not Handshake(Security("insecure"), Role.DIALER, "A", "B").nonce.startswith(secure.RECORDS_OFFER)


@pytest.mark.parametrize("new_role", [Role.DIALER, Role.LISTENER])
def test_a_node_of_this_release_links_with_the_previous_release_in_v1(new_role):
    other_role = Role.LISTENER if new_role == Role.DIALER else Role.DIALER
    mine, theirs = new(new_role), old(other_role)
    d, lis = (mine, theirs) if new_role == Role.DIALER else (theirs, mine)
    pump(d, lis)
    assert mine.records == V1 and isinstance(mine.channel, MacChannel)
    assert theirs.channel.unwrap(wire(mine.channel, [b"to the old node"])) == b"to the old node"
    assert mine.channel.unwrap(wire(theirs.channel, [b"to the new node"])) == b"to the new node"
    big = bytes(range(256)) * (RECORD_MAX // 128)
    assert theirs.channel.unwrap(wire(mine.channel, [b"hdr", big])) == b"hdr" + big


def strip_offer(pre: bytes) -> bytes:
    """The preface with its nonce's offer replaced by random-looking bytes (no offer)."""
    at = 8 + 3
    return pre[:at] + b"\x5a" * 9 + pre[at + 9:]


@pytest.mark.parametrize("way", ["d>l", "l>d"])
def test_a_man_in_the_middle_who_removes_an_offer_fails_the_proofs(way):
    d, lis = new(Role.DIALER), new(Role.LISTENER)
    done = set()

    def downgrade(w, out):
        if w == way and out.startswith(b"SYNCDSEC") and w not in done:
            done.add(w)
            return strip_offer(out)
        return out

    with pytest.raises(AuthError, match="failed to prove"):
        pump(d, lis, downgrade)
    assert d.channel is None and lis.channel is None


@pytest.mark.parametrize("way", ["d>l", "l>d"])
def test_a_man_in_the_middle_who_adds_or_raises_an_offer_fails_the_proofs(way):
    d, lis = new(Role.DIALER, V1), new(Role.LISTENER, V1)
    done = set()

    def upgrade(w, out):
        if w == way and out.startswith(b"SYNCDSEC") and w not in done:
            done.add(w)
            return out[:11] + secure.RECORDS_OFFER + bytes([2]) + out[11 + 9:]
        return out

    with pytest.raises(AuthError, match="failed to prove"):
        pump(d, lis, upgrade)


def test_a_forced_downgrade_is_only_possible_from_a_v1_end_and_stays_authenticated():
    # The one way to v1 records: an end that offers only v1 (an older release, no AES-GCM, or
    # SYNCD_KEY_RECORDS=1). Such a link still proves the key and tags every record (HMAC).
    d, lis = new(Role.DIALER, V1), new(Role.LISTENER)
    pump(d, lis)
    w = bytearray(wire(d.channel, [b"payload"]))
    w[5] ^= 1
    with pytest.raises(AuthError):
        lis.channel.unwrap(bytes(w))


def test_without_aes_gcm_an_end_offers_v1_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(secure, "AEAD_PROBLEM", "the 'cryptography' package cannot be imported (test)")
    monkeypatch.setattr(secure, "_warned_v1_only", False)
    with caplog.at_level(logging.WARNING, logger="syncd.secure"):
        assert secure.records_to_offer() == V1
        assert secure.records_to_offer() == V1
    assert [r.getMessage().count("cryptography") > 0 for r in caplog.records] == [True]
    d, lis = Handshake(SEC, Role.DIALER, "A", "B"), new(Role.LISTENER)
    pump(d, lis)
    assert isinstance(lis.channel, MacChannel)


def test_the_environment_can_hold_an_end_to_v1(monkeypatch):
    monkeypatch.setenv(secure.RECORDS_ENV, "1")
    assert secure.records_to_offer() == V1
    assert Handshake(SEC, Role.DIALER, "A", "B").records == V1
    monkeypatch.setenv(secure.RECORDS_ENV, "2")
    assert secure.records_to_offer() == V2


@pytest.mark.parametrize("records", [V1, V2])
def test_what_unwrap_returns_stays_valid_whatever_arrives_next(records):
    """Plaintext may be a view (of the caller's bytes or of a buffer the channel let go); it must
    not change when the caller reuses its receive buffer or the channel takes more bytes."""
    d, lis = session(records)
    big = bytes(range(256)) * 1024  # 256 KiB: records of their own in version 2
    stream = b"".join(wire(d.channel, [m]) for m in (b"a" * 100, big, b"b" * 100, big, big, b"c" * 5))
    rx = bytearray(70000)  # the link's reusable receive buffer, smaller than a record
    got = []
    for i in range(0, len(stream), len(rx)):
        chunk = stream[i:i + len(rx)]
        rx[:len(chunk)] = chunk
        got.append(lis.channel.unwrap(memoryview(rx)[:len(chunk)]))
        got[-1] = bytes(got[-1])  # the caller copies before it reuses rx, as the link does
    assert b"".join(got) == b"a" * 100 + big + b"b" * 100 + big + big + b"c" * 5


@pytest.mark.parametrize("records", [V1, V2])
def test_a_record_completed_in_the_buffer_with_a_long_tail_after_it(records):
    d, lis = session(records)
    first = wire(d.channel, [b"x" * 1000])
    second = wire(d.channel, [b"y" * 300000])
    third = wire(d.channel, [b"z" * 10])
    assert lis.channel.unwrap(first[:500]) == b""
    # The rest of the first record and more than the kept tail of the second, in one piece.
    out = lis.channel.unwrap(first[500:] + second[:200000])
    held = [out]
    assert bytes(out) == b"x" * 1000
    assert bytes(lis.channel.unwrap(second[200000:] + third)) == b"y" * 300000 + b"z" * 10
    assert bytes(held[0]) == b"x" * 1000  # an earlier result is not disturbed by later input


# -- receiving the rest of a large record straight into its own buffer -------------------------
def receive(chan, stream: bytes, chunks: list[int], rx_size: int = 70000) -> bytes:
    """What the link's receiver does: the rest of a record being completed goes into
    ``recv_space`` (then ``received``), anything else into a reused buffer (then ``unwrap``).
    Each result is copied before the next receive, as the frame decoder does."""
    rx = bytearray(rx_size)
    got = []
    i = 0
    sizes = iter(chunks)
    while i < len(stream):
        want = next(sizes, rx_size)
        into = chan.recv_space()
        if into is None:
            n = min(want, rx_size, len(stream) - i)
            rx[:n] = stream[i:i + n]
            got.append(bytes(chan.unwrap(memoryview(rx)[:n])))
        else:
            n = min(want, len(into), len(stream) - i)
            into[:n] = stream[i:i + n]
            got.append(bytes(chan.received(n)))
        i += n
    return b"".join(got)


@pytest.mark.parametrize("records", [V1, V2])
@pytest.mark.parametrize("pool", [False, True])
def test_the_rest_of_a_large_record_is_received_into_its_own_buffer(records, pool):
    d, lis = session(records)
    if pool:
        lis.channel.buffers = PayloadBuffers()
    big = bytes(range(256)) * 4096  # 1 MiB: a record of its own in version 2
    msgs = [b"h" * 48, big, b"t" * 48, big[:300000], b"x"]
    stream = b"".join(wire(d.channel, [m]) for m in msgs)
    assert lis.channel.recv_space() is None  # nothing begun: receive anywhere
    assert receive(lis.channel, stream, []) == b"".join(msgs)
    assert lis.channel.recv_space() is None


@pytest.mark.parametrize("records", [V1, V2])
def test_a_record_completed_in_its_buffer_is_the_callers_and_checked(records):
    d, lis = session(records)
    lis.channel.buffers = pool = PayloadBuffers()
    big = bytes(range(256)) * 1024
    w = wire(d.channel, [big])
    assert lis.channel.unwrap(w[:1000]) == b"" and not lis.channel.owned
    space = lis.channel.recv_space()
    assert len(space) == len(w) - 1000
    space[:] = w[1000:]
    body = lis.channel.received(len(space))
    assert lis.channel.owned and bytes(body) == big
    assert isinstance(body.obj, mmap.mmap) and pool.fresh == 1  # the pool's buffer, handed out with it
    # Tampered while it travels: the record fails once whole, in its own buffer too.
    w = bytearray(wire(d.channel, [big]))
    w[-100] ^= 1
    assert lis.channel.unwrap(bytes(w[:5])) == b""
    space = lis.channel.recv_space()
    space[:] = w[5:]
    with pytest.raises(AuthError, match="record 1 failed"):
        lis.channel.received(len(space))


def test_a_refusal_cut_anywhere_is_still_a_refusal():
    for cut in range(1, 12):
        _, lis = session()
        with pytest.raises(AuthError, match="refused"):
            for i in range(0, len(secure.REFUSAL), cut):
                lis.channel.unwrap(secure.REFUSAL[i:i + cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([V1, V2]), st.booleans(),
       st.lists(st.sampled_from([1, 3, 100, 16 << 10, 200000, RECORD_MAX]), min_size=1, max_size=6),
       st.lists(st.integers(1, 400000), max_size=12))
def test_any_mix_of_received_and_unwrapped_pieces_round_trips(records, pool, sizes, chunks):
    d, lis = session(records)
    if pool:
        lis.channel.buffers = PayloadBuffers()
    msgs = [bytes([i]) * n for i, n in enumerate(sizes)]
    stream = b"".join(wire(d.channel, [m]) for m in msgs)
    assert receive(lis.channel, stream, chunks) == b"".join(msgs)


# -- found by review: every check of the in-place path, at its edges --------------------------
@pytest.mark.parametrize("records", [V1, V2])
@pytest.mark.parametrize("cut", [1, 5, 100, 150000])
def test_a_tampered_first_record_split_across_unwraps_fails(records, cut):
    d, lis = session(records)
    w = bytearray(wire(d.channel, [b"q" * 200000]))
    w[-1] ^= 1
    with pytest.raises(AuthError, match="record 0 failed"):
        lis.channel.unwrap(bytes(w[:cut]))
        lis.channel.unwrap(bytes(w[cut:]))


@pytest.mark.parametrize("records", [V1, V2])
def test_a_tampered_first_record_received_in_place_fails(records):
    d, lis = session(records)
    lis.channel.buffers = PayloadBuffers()
    w = bytearray(wire(d.channel, [b"q" * 200000]))
    w[100] ^= 1
    assert lis.channel.unwrap(bytes(w[:10])) == b""
    space = lis.channel.recv_space()
    space[:] = w[10:]
    with pytest.raises(AuthError, match="record 0 failed"):
        lis.channel.received(len(space))


@pytest.mark.parametrize("records", [V1, V2])
def test_nothing_until_the_last_byte_received_in_place(records):
    d, lis = session(records)
    w = wire(d.channel, [b"q" * 1000]) + wire(d.channel, [b"r"])
    one = len(w) - (4 + 1 + TAG_SIZE)
    assert lis.channel.unwrap(w[:10]) == b""
    for i in range(10, one - 1):
        space = lis.channel.recv_space()
        space[:1] = w[i:i + 1]
        assert lis.channel.received(1) == b""
    space = lis.channel.recv_space()
    assert len(space) == 1
    space[:1] = w[one - 1:one]
    assert bytes(lis.channel.received(1)) == b"q" * 1000
    assert lis.channel.recv_space() is None
    assert bytes(lis.channel.unwrap(w[one:])) == b"r"


def test_a_refusal_cut_unevenly_is_a_refusal():
    for first in range(1, 8):
        _, lis = session()
        with pytest.raises(AuthError, match="refused"):
            lis.channel.unwrap(secure.REFUSAL[:first])
            lis.channel.unwrap(secure.REFUSAL[first:])


@pytest.mark.parametrize("length", [0, RECORD_MAX + 1, 0xFFFFFFFF])
@pytest.mark.parametrize("cut", [None, 2, 6])
def test_a_record_length_out_of_range_is_refused_at_once(length, cut):
    _, lis = session()
    hdr = struct.pack(">I", length) + b"\0" * 8
    with pytest.raises(AuthError, match="out of range"):
        if cut is None:
            lis.channel.unwrap(hdr)
        else:
            lis.channel.unwrap(hdr[:cut])
            lis.channel.unwrap(hdr[cut:])


@pytest.mark.parametrize("records", [V1, V2])
def test_a_record_of_exactly_record_max_is_taken(records):
    d, lis = session(records)
    w = wire(d.channel, [b"m" * RECORD_MAX])
    assert struct.unpack(">I", w[:4])[0] == RECORD_MAX
    assert bytes(lis.channel.unwrap(w[:3])) == b""
    assert bytes(lis.channel.unwrap(w[3:])) == b"m" * RECORD_MAX


@pytest.mark.parametrize("records", [V1, V2])
def test_plaintext_kept_as_views_survives_the_pool_reusing_buffers(records):
    """Records completed in pool buffers, their plaintext kept as views (as adopted payloads
    are) while the pool is trimmed and more records come: none of them changes."""
    d, lis = session(records)
    lis.channel.buffers = pool = PayloadBuffers(keep=4 << 20)
    kept = []
    rng = random.Random(7)
    for i in range(40):
        msg = bytes([i]) * rng.choice([70000, 300000, RECORD_MAX])
        w = wire(d.channel, [msg])
        cut = rng.randrange(1, 70000)
        assert lis.channel.unwrap(w[:cut]) == b""
        space = lis.channel.recv_space()
        space[:] = w[cut:]
        plain = lis.channel.received(len(space))
        assert lis.channel.owned
        if i % 3:
            kept.append((msg, plain))  # the others are let go: their buffers come back
        pool.trim()
    assert pool.reused > 0
    for msg, plain in kept:
        assert bytes(plain) == msg


# -- the common cases: a lone small batch, a lone whole record ---------------------------------
def test_v2_a_small_batch_of_any_buffer_types_is_one_record_of_its_bytes():
    """Buffers below the in-place size make one record whatever their type, its length their
    bytes (a memoryview of 4-byte items counts 4 per item), its tag the spec's."""
    import array

    d, lis = session()
    k_dialer, _ = spec_keys(d.transcript(), 2)
    words = memoryview(array.array("I", range(100)))  # 400 bytes, 100 items
    cases = [[words], [b"head", words, bytearray(b"tail")], [memoryview(b"x" * 5000), b"y" * 3000],
             [b"", b"z"], [bytes((16 << 10) - 1)]]
    for seq, bufs in enumerate(cases):
        want = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
        ((n, body, tag),) = records_of(wire(d.channel, bufs))
        assert (n, body) == (len(want), want)
        assert tag == AESGCM(k_dialer).encrypt(struct.pack(">IQ", 0, seq), b"", body)
        assert bytes(lis.channel.unwrap(records_wire(n, body, tag))) == want
    assert d.channel.wrap([b"", bytearray()]) == []


def test_v2_a_batch_is_measured_in_bytes_not_items():
    """A small buffer and a view of 5,000 4-byte items: 20,100 bytes, over the in-place size, so
    two records (the view tagged where it lies), as ever; counted in items it would be one."""
    import array

    d, lis = session()
    words = memoryview(array.array("I", range(5000)))
    w = wire(d.channel, [b"x" * 100, words])
    assert [n for n, _, _ in records_of(w)] == [100, 20000]
    assert lis.channel.unwrap(w) == b"x" * 100 + words.tobytes()
    # Any buffer alone: a record of its bytes.
    ((n, body, _),) = records_of(wire(d.channel, [array.array("I", [7, 8])]))
    assert (n, body) == (8, array.array("I", [7, 8]).tobytes())
    m = mmap.mmap(-1, 4096)
    m[:5] = b"mmap!"
    ((n, body, _),) = records_of(wire(d.channel, [m]))
    assert (n, body[:5]) == (4096, b"mmap!")


def records_wire(n: int, body: bytes, tag: bytes) -> bytes:
    return struct.pack(">I", n) + body + tag


@pytest.mark.parametrize("records", [V1, V2])
def test_a_lone_whole_record_is_checked_where_it_lies(records):
    d, lis = session(records)
    w = bytearray(wire(d.channel, [b"W" * 4096]))
    got = lis.channel.unwrap(memoryview(w))
    assert bytes(got) == b"W" * 4096 and not lis.channel.owned
    assert isinstance(got, memoryview) and got.obj is w  # a view of what was received: no copy
    assert lis.channel.unwrap(wire(d.channel, [b"next"])) == b"next"  # the sequence went on


@pytest.mark.parametrize("records", [V1, V2])
@pytest.mark.parametrize("where", [4, 2000, -TAG_SIZE, -1])
def test_a_lone_record_altered_anywhere_fails(records, where):
    d, lis = session(records)
    w = bytearray(wire(d.channel, [b"W" * 4096]))
    w[where] ^= 0x40
    with pytest.raises(AuthError, match="record 0 failed"):
        lis.channel.unwrap(bytes(w))


@pytest.mark.parametrize("records", [V1, V2])
def test_a_lone_record_replayed_fails(records):
    d, lis = session(records)
    w = wire(d.channel, [b"W" * 4096])
    assert bytes(lis.channel.unwrap(w)) == b"W" * 4096
    with pytest.raises(AuthError, match="record 1 failed"):
        lis.channel.unwrap(w)


@pytest.mark.parametrize("records", [V1, V2])
def test_a_lone_record_after_one_completed_in_its_own_buffer_is_not_owned(records):
    """What ``received`` hands out is the caller's; a lone record unwrapped next is a view of the
    caller's receive buffer, which it reuses: not owned."""
    d, lis = session(records)
    big = wire(d.channel, [b"B" * 200000])
    assert lis.channel.unwrap(big[:1000]) == b""
    space = lis.channel.recv_space()
    space[:] = big[1000:]
    assert bytes(lis.channel.received(len(space))) == b"B" * 200000 and lis.channel.owned
    assert bytes(lis.channel.unwrap(bytearray(wire(d.channel, [b"small"])))) == b"small"
    assert not lis.channel.owned


@pytest.mark.parametrize("records", [V1, V2])
@pytest.mark.parametrize(("cut", "size"), [(2, 65536), (5000, 70000)])
def test_the_rest_of_a_record_that_looks_like_a_lone_record_is_still_the_rest(records, cut, size):
    """A record cut ``cut`` bytes in (inside its length, or inside its data) whose remaining bytes
    begin with what reads as the length of a record exactly their size: they are still the end of
    the record begun, not a record of their own."""
    d, lis = session(records)
    fake = struct.pack(">I", size - cut)  # the data length of a record as long as the rest
    msg = bytearray(b"m" * size)
    if cut < 4:  # the forged length starts inside the real one (which must agree) and ends in the data
        assert struct.pack(">I", size)[cut:] == fake[:4 - cut]
        msg[:cut] = fake[4 - cut:]
    else:
        msg[cut - 4:cut] = fake
    w = wire(d.channel, [bytes(msg)])
    assert w[cut:cut + 4] == fake
    assert lis.channel.unwrap(w[:cut]) == b""
    assert bytes(lis.channel.unwrap(w[cut:])) == bytes(msg)
