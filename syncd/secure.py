"""Authenticated channels between daemons: the replication link and the witness (sans-IO).

Every connection between two syncd daemons starts with a *preface* from each end, sent at once
and in the clear: magic, version, mode, role (dialer or listener), a fresh 32-byte nonce and the
name the sender claims. What follows depends on the mode both ends are configured with:

``key``
    A shared secret. Each end sends a proof, HMAC-SHA256(key, "proof", role, transcript), where
    the transcript is both prefaces (so both nonces): a recorded proof is worth nothing in another
    session, and a proof cannot be reflected to its sender. The dialer proves first; the
    listener sends its proof only once the dialer's has verified. Both ends then derive one key per
    direction from the secret and the transcript; every byte after the handshake travels in
    *records* (length, data, a 16-byte tag bound to a per-direction sequence number). Record
    version 2 (``GcmChannel``) tags with AES-256-GCM over the data as associated data (GMAC),
    version 1 (``MacChannel``) with HMAC-SHA256; an end offers version 2 in its nonce and the
    lower offer of the two is used, so a node of this release still links with an older one.
    A record replayed, reordered, cut, moved to another connection or altered fails its tag.
    The data is not encrypted: this mode is for networks where confidentiality is not needed
    (the setting says so in words).
``tls``
    Mutual TLS (Python's ``ssl``, TLS 1.3 or 1.2): each end presents a certificate issued by the
    configured CA for the name it claims in its preface, and checks the other's. Everything
    after the handshake is encrypted and integrity-protected by TLS.
``insecure``
    Nothing is checked. Allowed only when a config says ``insecure = true``.

An end that cannot authenticate its peer (a malformed preface, another mode or version, an
unexpected name, a wrong proof, a failed TLS handshake) sends ``REFUSAL`` (the same bytes
whatever went wrong, so a prober learns nothing) and closes; the reason is for its own log.

The classes here are sans-IO: the I/O side (``netio.establish``) moves bytes between a
socket and them. A ``Channel`` turns outgoing plaintext buffers into wire buffers (``wrap``) and
incoming wire bytes into plaintext (``unwrap``), which is what the daemons' frame codecs see.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import logging
import os
import secrets
import ssl
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import AbstractSet, Any, Literal, Protocol, Sequence, Union, cast

from construct import Bytes, Const, Int8ub, PascalString, Struct

from .buffers import PayloadBuffers

try:  # AES-GCM for key mode's records version 2; without it an end offers version 1 only
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    AEAD_PROBLEM: str | None = None
except ImportError as _e:  # pragma: no cover - the package is a dependency; a distro may lack it
    AEAD_PROBLEM = f"the 'cryptography' package cannot be imported ({_e})"

log = logging.getLogger("syncd.secure")

Buffer = Union[bytes, bytearray, memoryview]

VERSION = 1
NONCE_SIZE = 32
TAG_SIZE = 16
PROOF_SIZE = 32
# Largest record body: a sender's batch beyond it is cut into several records. The receiver
# holds at most one record it has not verified yet (plus what one recv brings).
RECORD_MAX = 1 << 20

# Key mode's record versions (proto/security.md section 4): 1 HMAC-SHA256, 2 AES-256-GCM (GMAC).
RECORDS_V1 = 1
RECORDS_V2 = 2
# An end that offers records newer than version 1 starts its preface's nonce with this marker and
# the version; the preface itself stays version 1, which releases before record version 2 require.
# Both nonces are in the transcript that the proofs cover: an offer changed on the way fails them.
RECORDS_OFFER = b"SYNCDREC"
_OFFER_SIZE = len(RECORDS_OFFER) + 1
# For measurements and to rule record version 2 out in the field: the highest version to offer.
RECORDS_ENV = "SYNCD_KEY_RECORDS"
# A part of a buffer list this large gets records of its own (tagged where it lies, no copy);
# smaller parts are joined into one record (a short copy is cheaper than a record per part).
_ALONE = 16 << 10

Mode = Literal["insecure", "key", "tls"]
_MODE_CODES: dict[str, int] = {"insecure": 0, "key": 1, "tls": 2}
_MODE_NAMES = {v: k for k, v in _MODE_CODES.items()}


class Role(IntEnum):
    DIALER = 0
    LISTENER = 1


PREFACE = Struct(
    "magic" / Const(b"SYNCDSEC"),
    "version" / Int8ub,
    "mode" / Int8ub,
    "role" / Int8ub,
    "nonce" / Bytes(NONCE_SIZE),
    "name" / PascalString(Int8ub, "utf8"),
)
PREFACE_MAX = 8 + 3 + NONCE_SIZE + 1 + 255
PROOF = Struct("tag" / Bytes(PROOF_SIZE))
# What an end that refuses its peer sends, whatever the peer sent (same length as a preface
# prefix, so it cannot be mistaken for one: the magic differs).
REFUSAL = b"SYNCDNO!" + b"authentication failed\n"

_RECORD_HDR = struct.Struct(">I")
_SEQ_LEN = struct.Struct(">QI")
# A GCM nonce: four zero bytes and the record's sequence number in its direction.
_GCM_NONCE = struct.Struct(">IQ")


class AuthError(Exception):
    """The peer did not authenticate, or a record failed its check. The message is for this
    end's log (it names what went wrong); the peer only ever sees ``REFUSAL``."""


@dataclass(frozen=True)
class Security:
    """How one kind of connection (link or witness) is protected, from a node's config."""

    mode: Mode
    key: bytes | None = None
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def describe(self) -> str:
        return {"insecure": "none (insecure = true)",
                "key": "shared key, AES-GCM (or HMAC-SHA256 with an older peer) on every record",
                "tls": "mutual TLS"}[self.mode]

    def tls_context(self, server_side: bool) -> ssl.SSLContext:
        """The TLS context for one end: its own certificate, the CA it trusts for the other end,
        the other end's certificate required. Names are checked by ``TlsHandshake``, against
        the name the peer claims and the caller expects."""
        if self.tls_certificate is None or self.tls_key is None or self.tls_ca is None:
            raise ValueError("TLS needs a certificate, a key and a CA")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_certificate, self.tls_key)
        ctx.load_verify_locations(cafile=self.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False  # checked against the claimed name once the handshake is done
        return ctx


# -- channels ----------------------------------------------------------------------------------
class Channel(Protocol):
    def wrap(self, bufs: Sequence[Buffer]) -> list[Buffer]:
        """Wire buffers carrying ``bufs`` (in order; the caller sends all of them)."""
        ...

    def unwrap(self, data: Buffer) -> Buffer:
        """Plaintext carried by ``data`` (possibly empty: a record is not complete yet), maybe
        a view of ``data``: use it before reusing ``data``'s memory. Raises AuthError on
        anything that does not verify."""
        ...

    def outgoing(self) -> bytes:
        """Bytes the channel itself must send (TLS post-handshake messages); usually empty."""
        ...

    def recv_space(self) -> memoryview | None:
        """Memory the next bytes of the stream may be received straight into (then say how
        many with ``received``), or None: receive into any buffer and ``unwrap`` it."""
        ...

    def received(self, n: int) -> Buffer:
        """Like ``unwrap`` for ``n`` bytes received into ``recv_space``."""
        ...

    @property
    def owned(self) -> bool:
        """Whether what ``unwrap`` or ``received`` returned last is the caller's to keep (no
        view of the data it was given, nor of memory the channel reuses): a frame decoder may
        then hand out views of it as payloads instead of copies."""
        ...

    @property
    def protection(self) -> str:
        """What protects the bytes, for operators (showrcopy): the record version, the TLS
        version and cipher."""
        ...


class PlainChannel:
    """``insecure``: bytes pass unchanged."""

    protection = "none (insecure)"
    owned = False  # views of the caller's data

    def wrap(self, bufs: Sequence[Buffer]) -> list[Buffer]:
        return list(bufs)

    def unwrap(self, data: Buffer) -> Buffer:
        return data

    def outgoing(self) -> bytes:
        return b""

    def recv_space(self) -> memoryview | None:
        return None

    def received(self, n: int) -> Buffer:
        raise RuntimeError("a plain channel has no receive space")


def _joined(bodies: list[memoryview]) -> Buffer:
    if not bodies:
        return b""
    return bodies[0] if len(bodies) == 1 else b"".join(bodies)


class _RecordChannel(abc.ABC):
    """Key mode's record layer: u32 length, data, 16-byte tag. Subclasses tag and check.

    A record that a piece of the stream leaves unfinished is completed in a buffer of its own
    (from ``buffers``, the owner's pool of reused payload buffers, when it has one: no page
    faults), which the owner may receive the rest of the record straight into (``recv_space``,
    ``received``): those bytes are copied once, by the kernel; what the piece that began the
    record held of it is copied there once more. The record leaves with that buffer (its
    payload adopted by the frame decoder, not copied again)."""

    def __init__(self) -> None:
        self._send_seq = 0
        self._recv_seq = 0
        self._head = bytearray()  # the first bytes of a record, too few to know its length
        self._rec: bytearray | memoryview | None = None  # a record being completed, whole size
        self._got = 0  # bytes of it so far
        self.owned = False
        self.buffers: PayloadBuffers | None = None

    @abc.abstractmethod
    def _verify(self, seq: int, length: int, body: memoryview, tag: memoryview) -> bool:
        """Whether ``tag`` is the tag of record ``seq`` (``length`` bytes of ``body``)."""

    def unwrap(self, data: Buffer) -> Buffer:
        # The plaintext is returned as views where it can be (the caller copies it into its
        # frame decoder at once, before it reuses ``data``): records that lie whole in ``data``
        # are checked where they are, and a record completed in its own buffer is handed out
        # with that buffer. ``owned``: that buffer and joined records are the caller's to keep;
        # views of ``data`` are not.
        view = memoryview(data).cast("B")
        if self._rec is None and not self._head and len(view) > _RECORD_HDR.size + TAG_SIZE:
            # The common case, one whole record and nothing else (a lone request or reply):
            # checked where it lies, without the general walk below (same result).
            end = len(view) - TAG_SIZE
            length = end - _RECORD_HDR.size
            if _RECORD_HDR.unpack_from(view)[0] == length and length <= RECORD_MAX:
                lone = view[_RECORD_HDR.size:end]
                if not self._verify(self._recv_seq, length, lone, view[end:]):
                    raise AuthError(f"record {self._recv_seq} failed its integrity check")
                self._recv_seq += 1
                self.owned = False
                return lone
        bodies: list[memoryview] = []
        kept = False
        if self._head:  # a few bytes of a record's start: now maybe its length
            probe = bytes(self._head) + bytes(view[:8])
            size = _record_size(probe)
            if size is None:
                self._head += view
                self.owned = False
                return b""
            self._begin(size, self._head)
            self._head.clear()
        space = self.recv_space()
        if space is not None:
            take = min(len(view), len(space))
            space[:take] = view[:take]
            view = view[take:]
            body = self.received(take)
            if self._rec is not None:
                self.owned = False
                return b""
            bodies.append(cast(memoryview, body))
            kept = True
        more, pos = self._take_records(view)
        bodies += more
        if pos < len(view):
            rest = view[pos:]
            size = _record_size(rest[:8])
            if size is None:
                self._head += rest
            else:
                self._begin(size, rest)
        self.owned = kept or len(bodies) > 1
        return _joined(bodies)

    def _begin(self, size: int, start: Buffer) -> None:
        """Complete the record of ``size`` wire bytes that ``start`` begins in a buffer of its own."""
        rec = self.buffers.get(size) if self.buffers is not None else bytearray(size)
        n = len(start)
        rec[:n] = start
        self._rec, self._got = rec, n

    def recv_space(self) -> memoryview | None:
        """Where the next bytes of the stream may be received: the rest of the record being
        completed (then say ``received``), or None (receive anywhere and ``unwrap``)."""
        if self._rec is None:
            return None
        return memoryview(self._rec)[self._got:]

    def received(self, n: int) -> Buffer:
        """``n`` bytes were received into ``recv_space``: the record's plaintext once it is
        whole (``owned``), else empty. AuthError if it does not verify."""
        rec = self._rec
        assert rec is not None and 0 <= n <= len(rec) - self._got
        self._got += n
        if self._got < len(rec):
            self.owned = False
            return b""
        self._rec, self._got = None, 0
        whole = memoryview(rec)
        end = len(whole) - TAG_SIZE
        body = whole[_RECORD_HDR.size:end]
        if not self._verify(self._recv_seq, len(body), body, whole[end:]):
            raise AuthError(f"record {self._recv_seq} failed its integrity check")
        self._recv_seq += 1
        self.owned = True
        return body

    def _take_records(self, view: memoryview) -> tuple[list[memoryview], int]:
        """The bodies of the whole records at the start of ``view``, each checked, and where the
        first one not yet whole starts. AuthError if one fails."""
        out: list[memoryview] = []
        pos = 0
        while (size := _record_size(view[pos:pos + 8])) is not None and len(view) - pos >= size:
            end = pos + size - TAG_SIZE
            body = view[pos + _RECORD_HDR.size:end]
            if not self._verify(self._recv_seq, len(body), body, view[end:end + TAG_SIZE]):
                raise AuthError(f"record {self._recv_seq} failed its integrity check")
            self._recv_seq += 1
            out.append(body)
            pos += size
        return out, pos

    def outgoing(self) -> bytes:
        return b""


def _record_size(start: Buffer) -> int | None:
    """The wire size (header, data, tag) of the record that ``start`` begins (its first bytes,
    up to 8), or None if they are too few to tell. AuthError if it cannot be a record."""
    probe = bytes(start[:8])
    if REFUSAL.startswith(probe):
        # Cannot be a record (its length would exceed RECORD_MAX): the peer refused what this
        # end sent (e.g. a name it does not admit, found after the proofs).
        if len(probe) == 8:
            raise AuthError("the peer refused this end's authentication")
        return None
    if len(probe) < _RECORD_HDR.size:
        return None
    length: int = _RECORD_HDR.unpack_from(probe)[0]
    if length == 0 or length > RECORD_MAX:
        raise AuthError(f"record length {length} out of range")
    return _RECORD_HDR.size + length + TAG_SIZE


class MacChannel(_RecordChannel):
    """``key``, records version 1: records of up to ``RECORD_MAX`` bytes, each with an
    HMAC-SHA256 tag (16 bytes) over its sequence number in its direction, its length and its
    data. What a peer of an older release speaks."""

    protection = "key records v1 (HMAC-SHA256)"

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        super().__init__()
        self._send = hmac.new(send_key, digestmod=hashlib.sha256)
        self._recv = hmac.new(recv_key, digestmod=hashlib.sha256)

    def _seal(self, parts: list[Buffer], length: int, out: list[Buffer]) -> None:
        h = self._send.copy()
        h.update(_SEQ_LEN.pack(self._send_seq, length))
        for b in parts:
            h.update(b)
        self._send_seq += 1
        out.append(_RECORD_HDR.pack(length))
        out.extend(parts)
        out.append(h.digest()[:TAG_SIZE])

    def wrap(self, bufs: Sequence[Buffer]) -> list[Buffer]:
        out: list[Buffer] = []
        parts: list[Buffer] = []
        size = 0
        for b in bufs:
            view = memoryview(b).cast("B")
            while len(view):
                take = min(len(view), RECORD_MAX - size)
                parts.append(view[:take])
                size += take
                view = view[take:]
                if size == RECORD_MAX:
                    self._seal(parts, size, out)
                    parts, size = [], 0
        if size:
            self._seal(parts, size, out)
        return out

    def _verify(self, seq: int, length: int, body: memoryview, tag: memoryview) -> bool:
        h = self._recv.copy()
        h.update(_SEQ_LEN.pack(seq, length))
        h.update(body)
        return hmac.compare_digest(h.digest()[:TAG_SIZE], tag)


class GcmChannel(_RecordChannel):
    """``key``, records version 2: the same framing, the tag AES-256-GCM with an empty plaintext
    and the record's data as associated data (GMAC: integrity, no encryption), under the
    direction's key and a nonce made of the record's sequence number in that direction.

    A buffer of at least ``_ALONE`` bytes is tagged where it lies and sent as it is (one-shot
    GCM needs its associated data in one piece); smaller ones are joined into one record."""

    protection = "key records v2 (AES-256-GCM tags)"

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        super().__init__()
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)

    def _seal(self, data: Buffer, out: list[Buffer]) -> None:
        # Each key serves one direction of one connection (derived from both fresh nonces) and
        # the sequence number only grows: a nonce is never used twice under a key (struct
        # refuses a sequence number of 2**64 rather than wrap).
        tag = self._send.encrypt(_GCM_NONCE.pack(0, self._send_seq), b"", data)
        self._send_seq += 1
        out.append(_RECORD_HDR.pack(len(data)))
        out.append(data)
        out.append(tag)

    def _seal_joined(self, parts: list[memoryview], out: list[Buffer]) -> None:
        self._seal(parts[0] if len(parts) == 1 else b"".join(parts), out)

    def wrap(self, bufs: Sequence[Buffer]) -> list[Buffer]:
        out: list[Buffer] = []
        total = 0
        for b in bufs:
            total += len(b) if type(b) is bytes or type(b) is bytearray else memoryview(b).nbytes
            if total >= _ALONE:
                break
        else:
            # The common case, what a lone request or a batch of small ones queued: one record
            # (what the walk below makes of it, with less work).
            if total:
                data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
                if type(data) is not bytes and type(data) is not bytearray:
                    data = memoryview(data).cast("B")  # its length in bytes, whatever the items
                self._seal(data, out)
            return out
        small: list[memoryview] = []
        size = 0
        for b in bufs:
            view = memoryview(b).cast("B")
            n = len(view)
            if not n:
                continue
            if n >= _ALONE:
                if small:
                    self._seal_joined(small, out)
                    small, size = [], 0
                for at in range(0, n, RECORD_MAX):
                    self._seal(view[at:at + RECORD_MAX], out)
                continue
            if size + n > RECORD_MAX:
                self._seal_joined(small, out)
                small, size = [], 0
            small.append(view)
            size += n
        if small:
            self._seal_joined(small, out)
        return out

    def _verify(self, seq: int, length: int, body: memoryview, tag: memoryview) -> bool:
        # The length needs no tag of its own: GCM authenticates the associated data's length,
        # and a changed length cuts a different body and tag.
        try:
            self._recv.decrypt(_GCM_NONCE.pack(0, seq), tag, body)
        except InvalidTag:
            return False
        return True


class TlsChannel:
    """``tls``: an ``ssl.SSLObject`` over memory buffers, after its handshake."""

    owned = False  # (new bytes in fact; decoded with copies as before)

    def __init__(self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._obj = obj
        self._in = incoming
        self._out = outgoing

    @property
    def protection(self) -> str:
        cipher = self._obj.cipher()
        return f"{self._obj.version() or 'TLS'} {cipher[0] if cipher else ''}".strip()

    def wrap(self, bufs: Sequence[Buffer]) -> list[Buffer]:
        for b in bufs:
            if len(b):
                self._obj.write(b)
        return [self._out.read()]

    def unwrap(self, data: Buffer) -> Buffer:
        self._in.write(data)
        out: list[bytes] = []
        try:
            while True:
                chunk = self._obj.read(1 << 20)
                if not chunk:
                    break
                out.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as e:
            raise AuthError(f"TLS: {e}") from None
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def outgoing(self) -> bytes:
        return self._out.read()

    def recv_space(self) -> memoryview | None:
        return None  # ssl reads its records from its own memory BIO

    def received(self, n: int) -> Buffer:
        raise RuntimeError("a TLS channel has no receive space")


# -- handshake ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preface:
    version: int
    mode: int
    role: int
    nonce: bytes
    name: str


def make_nonce(records: int) -> bytes:
    """A fresh preface nonce that offers key mode's records up to version ``records``: 32
    random bytes for version 1 (what older releases send), else the offer marker, the version
    and 23 random bytes (184 bits: still never repeated)."""
    if records <= RECORDS_V1:
        return secrets.token_bytes(NONCE_SIZE)
    return RECORDS_OFFER + bytes([records]) + secrets.token_bytes(NONCE_SIZE - _OFFER_SIZE)


def offered_records(nonce: bytes) -> int:
    """The highest record version a preface's nonce offers (1 when it carries no offer)."""
    if nonce[:len(RECORDS_OFFER)] == RECORDS_OFFER and nonce[len(RECORDS_OFFER)] > RECORDS_V1:
        return nonce[len(RECORDS_OFFER)]
    return RECORDS_V1


_warned_v1_only = False


def records_to_offer() -> int:
    """The highest record version this process offers in key mode: 2, unless AES-GCM is
    unavailable (logged once) or ``SYNCD_KEY_RECORDS=1`` is set."""
    global _warned_v1_only
    want = RECORDS_V2
    env = os.environ.get(RECORDS_ENV, "")
    if env.strip() == "1":
        want = RECORDS_V1
    if want > RECORDS_V1 and AEAD_PROBLEM is not None:
        if not _warned_v1_only:
            _warned_v1_only = True
            log.warning("key mode: %s: records use HMAC-SHA256 (version 1), which costs far more CPU "
                        "than AES-GCM; install cryptography (a dependency of syncd)", AEAD_PROBLEM)
        want = RECORDS_V1
    return want


def build_preface(mode: Mode, role: Role, nonce: bytes, name: str) -> bytes:
    return cast(bytes, PREFACE.build(dict(version=VERSION, mode=_MODE_CODES[mode], role=int(role),
                                          nonce=nonce, name=name)))


def parse_preface(buf: bytes) -> tuple[Preface, int] | None:
    """(preface, bytes it took), or None when more bytes are needed. AuthError if ``buf`` cannot
    start a preface."""
    fixed = 8 + 3 + NONCE_SIZE
    if len(buf) < 8:
        if not b"SYNCDSEC".startswith(bytes(buf)):
            raise AuthError("the peer did not start a syncd security handshake")
        return None
    if bytes(buf[:8]) != b"SYNCDSEC":
        if bytes(buf[:8]) == REFUSAL[:8]:
            raise AuthError("the peer refused this end's authentication")
        raise AuthError("the peer did not start a syncd security handshake")
    if len(buf) < fixed + 1:
        return None
    total = fixed + 1 + buf[fixed]
    if len(buf) < total:
        return None
    try:
        c: Any = PREFACE.parse(bytes(buf[:total]))
    except Exception as e:  # construct raises many kinds; the message names the field
        raise AuthError(f"malformed preface: {e}") from None
    return Preface(int(c.version), int(c.mode), int(c.role), bytes(c.nonce), str(c.name)), total


def _proof(key: bytes, role: Role, transcript: bytes) -> bytes:
    return hmac.new(key, b"syncd proof v1" + bytes([role]) + transcript, hashlib.sha256).digest()


def _direction_keys(key: bytes, transcript: bytes, records: int = RECORDS_V1) -> tuple[bytes, bytes]:
    # Another label per record version: an HMAC key and an AES key are never the same bytes.
    label = b"syncd keys v1" if records == RECORDS_V1 else b"syncd keys v%d" % records
    prk = hmac.new(key, label + transcript, hashlib.sha256).digest()
    return (hmac.new(prk, b"dialer", hashlib.sha256).digest(),
            hmac.new(prk, b"listener", hashlib.sha256).digest())


class Handshake:
    """One end's handshake. Feed it what arrives (``receive``); send what ``take_output`` gives;
    when ``done``, ``channel`` is ready and ``leftover`` is what arrived after the handshake (to
    be passed through ``channel.unwrap``). Raises AuthError on failure: send ``REFUSAL``.

    ``expect`` is the name the peer must claim, or a set of names it must claim one of (the
    witness: the arrays it admits), checked before this end sends anything but its preface;
    None: any name, which the caller then checks.

    ``records`` (key mode): the highest record version to offer, by default
    ``records_to_offer()``; once the peer's preface is in, ``records`` is the version both use."""

    def __init__(self, sec: Security, role: Role, name: str, expect: str | AbstractSet[str] | None,
                 server_hostname: str | None = None, records: int | None = None) -> None:
        self.sec = sec
        self.role = role
        self.name = name
        self.expect = expect
        if sec.mode != "key":
            self.records = RECORDS_V1  # the prefaces of the other modes stay as they were
        else:
            self.records = records_to_offer() if records is None else records
        self.nonce = make_nonce(self.records)
        self.mine = build_preface(sec.mode, role, self.nonce, name)
        self._out = bytearray(self.mine)
        self._in = bytearray()
        self.peer: Preface | None = None
        self.peer_raw = b""
        self.channel: Channel | None = None
        self.leftover = b""
        self._sent_proof = False
        self._tls: tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO] | None = None
        self._server_hostname = server_hostname
        self._pending_plain: Buffer = b""

    @property
    def done(self) -> bool:
        return self.channel is not None

    @property
    def peer_name(self) -> str:
        return self.peer.name if self.peer is not None else ""

    def take_output(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def transcript(self) -> bytes:
        if self.role == Role.DIALER:
            return self.mine + self.peer_raw
        return self.peer_raw + self.mine

    def receive(self, data: Buffer) -> None:
        if self.done:
            raise AuthError("handshake already done")
        self._in += data
        if self.peer is not None and bytes(self._in[:8]) == REFUSAL[:8]:
            raise AuthError("the peer refused this end's authentication")
        if self.peer is None:
            got = parse_preface(bytes(self._in[:PREFACE_MAX]))
            if got is None:
                return
            pre, used = got
            self._check_preface(pre)
            self.peer, self.peer_raw = pre, bytes(self._in[:used])
            del self._in[:used]
            if self.sec.mode == "key":
                self.records = min(self.records, offered_records(pre.nonce))
            if self.sec.mode == "insecure":
                self._finish(PlainChannel())
                return
            if self.sec.mode == "key":
                if self.role == Role.DIALER:
                    # The listener proves itself only to a dialer that has (below): a prober
                    # without the key gets its preface and REFUSAL, the same bytes whatever
                    # it sent, and nothing computed from the key.
                    assert self.sec.key is not None
                    self._out += _proof(self.sec.key, self.role, self.transcript())
                    self._sent_proof = True
            else:
                self._start_tls()
        if self.sec.mode == "key":
            if len(self._in) < PROOF_SIZE:
                return
            assert self.sec.key is not None
            other = Role.LISTENER if self.role == Role.DIALER else Role.DIALER
            want = _proof(self.sec.key, other, self.transcript())
            if not hmac.compare_digest(bytes(self._in[:PROOF_SIZE]), want):
                raise AuthError(f"{self.peer_name!r} failed to prove the shared key")
            del self._in[:PROOF_SIZE]
            if not self._sent_proof:
                self._out += _proof(self.sec.key, self.role, self.transcript())
                self._sent_proof = True
            d, lis = _direction_keys(self.sec.key, self.transcript(), self.records)
            send, recv = (d, lis) if self.role == Role.DIALER else (lis, d)
            self._finish(GcmChannel(send, recv) if self.records >= RECORDS_V2 else MacChannel(send, recv))
        elif self.sec.mode == "tls":
            self._step_tls()

    def _check_preface(self, pre: Preface) -> None:
        if pre.version != VERSION:
            raise AuthError(f"the peer speaks security handshake version {pre.version}, this end {VERSION}")
        if pre.role == self.role or pre.role not in (0, 1):
            raise AuthError(f"the peer claims role {pre.role}, the same as this end's")
        if pre.mode != _MODE_CODES[self.sec.mode]:
            theirs = _MODE_NAMES.get(pre.mode, f"unknown mode {pre.mode}")
            raise AuthError(f"the peer uses {theirs}, this end {self.sec.mode}: configure both ends alike")
        if pre.nonce == self.nonce:
            raise AuthError("the peer echoed this end's nonce")
        if isinstance(self.expect, str):
            if pre.name != self.expect:
                raise AuthError(f"the peer claims to be {pre.name!r}, expected {self.expect!r}")
        elif self.expect is not None and pre.name not in self.expect:
            raise AuthError(f"the peer claims to be {pre.name!r}, not one of {sorted(self.expect)}")

    def _start_tls(self) -> None:
        server = self.role == Role.LISTENER
        ctx = self.sec.tls_context(server_side=server)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_side=server,
                           server_hostname=None if server else (self._server_hostname or self.peer_name))
        self._tls = (obj, inc, out)

    def _step_tls(self) -> None:
        assert self._tls is not None
        obj, inc, out = self._tls
        if self._in:
            inc.write(bytes(self._in))
            self._in.clear()
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            self._out += out.read()
            return
        except ssl.SSLError as e:
            self._out += out.read()
            raise AuthError(f"TLS handshake: {e.reason or e}") from None
        self._out += out.read()
        names = certificate_names(obj.getpeercert())
        if self.peer_name.lower() not in {n.lower() for n in names}:  # DNS names ignore case
            raise AuthError(f"the peer claims to be {self.peer_name!r}, its certificate names {sorted(names)}")
        chan = TlsChannel(obj, inc, out)
        self._finish(chan)
        # Application data that came with the last handshake flight is already in ``inc``.
        self.leftover = b""
        self._pending_plain = chan.unwrap(b"")

    def _finish(self, chan: Channel) -> None:
        self.channel = chan
        self.leftover = bytes(self._in)
        self._in.clear()
        self._pending_plain = b""

    def first_plaintext(self) -> Buffer:
        """Plaintext that arrived with the end of the handshake."""
        assert self.channel is not None
        plain = self._pending_plain
        more = self.channel.unwrap(self.leftover) if self.leftover else b""
        self._pending_plain, self.leftover = b"", b""
        if not plain:
            return more
        return bytes(plain) + bytes(more)


def certificate_names(cert: dict[str, Any] | None) -> set[str]:
    """The names a verified peer certificate gives: DNS names of its subjectAltName, or its
    common name when it has none."""
    if not cert:
        return set()
    names = {v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")}
    if not names:
        for rdn in cert.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    names.add(v)
    return names
