"""syncd.secure as released before key mode's record version 2 (commit f6b756d), frozen: the peer a
node of this release must still link with during a rolling upgrade (tests/unit/test_secure_records.py)."""

# ruff: noqa

from __future__ import annotations

import hashlib
import hmac
import secrets
import ssl
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import AbstractSet, Any, Literal, Protocol, Sequence, Union, cast

from construct import Bytes, Const, Int8ub, PascalString, Struct

Buffer = Union[bytes, bytearray, memoryview]

VERSION = 1
NONCE_SIZE = 32
TAG_SIZE = 16
PROOF_SIZE = 32
# Largest record body: a sender's batch beyond it is cut into several records. The receiver
# holds at most one record it has not verified yet (plus what one recv brings).
RECORD_MAX = 1 << 20

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
        return {"insecure": "none (insecure = true)", "key": "shared key, HMAC-SHA256 on every record",
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
        """Plaintext carried by ``data`` (possibly empty: a record is not complete yet).
        Raises AuthError on anything that does not verify."""
        ...

    def outgoing(self) -> bytes:
        """Bytes the channel itself must send (TLS post-handshake messages); usually empty."""
        ...


class PlainChannel:
    """``insecure``: bytes pass unchanged."""

    def wrap(self, bufs: Sequence[Buffer]) -> list[Buffer]:
        return list(bufs)

    def unwrap(self, data: Buffer) -> Buffer:
        return data

    def outgoing(self) -> bytes:
        return b""


class MacChannel:
    """``key``: records of up to ``RECORD_MAX`` bytes, each with an HMAC-SHA256 tag (16 bytes)
    over its sequence number in its direction, its length and its data."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send = hmac.new(send_key, digestmod=hashlib.sha256)
        self._recv = hmac.new(recv_key, digestmod=hashlib.sha256)
        self._send_seq = 0
        self._recv_seq = 0
        self._buf = bytearray()

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

    def unwrap(self, data: Buffer) -> Buffer:
        buf = self._buf
        buf += data
        # Records are checked and copied out through views of the buffer: one copy of the
        # plaintext, not three (the copies cost more than the HMAC at 1 MiB writes).
        out: list[memoryview] = []
        pos = 0
        with memoryview(buf) as view:
            while len(buf) - pos >= _RECORD_HDR.size:
                (length,) = _RECORD_HDR.unpack_from(buf, pos)
                if bytes(buf[pos:pos + 8]) == REFUSAL[:8]:
                    # Cannot be a record (its length would exceed RECORD_MAX): the peer refused what
                    # this end sent (e.g. a name it does not admit, found after the proofs).
                    raise AuthError("the peer refused this end's authentication")
                if length == 0 or length > RECORD_MAX:
                    raise AuthError(f"record length {length} out of range")
                end = pos + _RECORD_HDR.size + length
                if len(buf) < end + TAG_SIZE:
                    break
                body = view[pos + _RECORD_HDR.size:end]
                h = self._recv.copy()
                h.update(_SEQ_LEN.pack(self._recv_seq, length))
                h.update(body)
                if not hmac.compare_digest(h.digest()[:TAG_SIZE], view[end:end + TAG_SIZE]):
                    raise AuthError(f"record {self._recv_seq} failed its integrity check")
                self._recv_seq += 1
                out.append(body)
                pos = end + TAG_SIZE
            plain = b"".join(out) if out else b""
            for v in out:  # the buffer cannot shrink while a view of it is alive
                v.release()
        if pos:
            del buf[:pos]
        return plain

    def outgoing(self) -> bytes:
        return b""


class TlsChannel:
    """``tls``: an ``ssl.SSLObject`` over memory buffers, after its handshake."""

    def __init__(self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._obj = obj
        self._in = incoming
        self._out = outgoing

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


# -- handshake ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preface:
    version: int
    mode: int
    role: int
    nonce: bytes
    name: str


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


def _direction_keys(key: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    prk = hmac.new(key, b"syncd keys v1" + transcript, hashlib.sha256).digest()
    return (hmac.new(prk, b"dialer", hashlib.sha256).digest(),
            hmac.new(prk, b"listener", hashlib.sha256).digest())


class Handshake:
    """One end's handshake. Feed it what arrives (``receive``); send what ``take_output`` gives;
    when ``done``, ``channel`` is ready and ``leftover`` is what arrived after the handshake (to
    be passed through ``channel.unwrap``). Raises AuthError on failure: send ``REFUSAL``.

    ``expect`` is the name the peer must claim, or a set of names it must claim one of (the
    witness: the arrays it admits), checked before this end sends anything but its preface;
    None: any name, which the caller then checks."""

    def __init__(self, sec: Security, role: Role, name: str, expect: str | AbstractSet[str] | None,
                 server_hostname: str | None = None) -> None:
        self.sec = sec
        self.role = role
        self.name = name
        self.expect = expect
        self.nonce = secrets.token_bytes(NONCE_SIZE)
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
            d, lis = _direction_keys(self.sec.key, self.transcript())
            send, recv = (d, lis) if self.role == Role.DIALER else (lis, d)
            self._finish(MacChannel(send, recv))
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
