"""Witness wire protocol (sans-IO). Normative spec: proto/witness.md."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import xxhash
from construct import (
    Flag,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Struct,
)

MAGIC = 0x53594E57
MAX_PAYLOAD = 65536


class WType(IntEnum):
    # 1-3 were CHALLENGE, HELLO, WELCOME (protocol version 1): authentication is now the
    # security handshake of syncd.secure, before any frame. Not to be reused.
    GOODBYE = 4
    REGISTER = 10
    REPORT = 11
    CLAIM = 12
    KEEP = 13
    HANDOVER = 14
    RESOLVE = 15
    DECISION = 20
    ERROR = 21
    STALE = 22  # only to a request with FRESH set: heard too late, nothing changed; ask again


REQUEST_TYPES = frozenset({WType.REGISTER, WType.REPORT, WType.CLAIM, WType.KEEP, WType.HANDOVER, WType.RESOLVE})

# A request whose req_id has this bit asks the witness to refuse it (STALE, nothing changed) when
# it is heard more than decide.FRESH_FOR (less the clocks' drift) after the witness's previous
# answer on the same session was ready, or when it is a session's first request. The client sends
# a request only once the one before it was answered, so that answer is older than the request,
# and a request the client has given up on (its timeout is FRESH_FOR) can never be taken late. A
# witness before this bit existed echoes req_id and checks nothing; a client before it never sets
# the bit and is never refused so.
FRESH = 1 << 63


REPORT_PEER_ALIVE = 1
REPORT_PEER_IN_SYNC = 2
# The peer was reachable again at some moment since this array's previous answered report: a
# loss this report states is a new one, counted from now, not from a word about an earlier loss
# (found by review: a link that came back and went again while the secondary was cut off from
# the witness). A witness before this bit ignores it.
REPORT_LOST_ANEW = 4

HEADER = Struct(
    "magic" / Int32ub, "type" / Int8ub, "reserved1" / Int8ub, "reserved2" / Int16ub,
    "req_id" / Int64ub, "payload_len" / Int32ub, "checksum" / Int64ub,
)
_HDR = struct.Struct(">IBBHQIQ")
HEADER_SIZE = _HDR.size

PAYLOADS = {
    WType.GOODBYE: Struct("reason" / PascalString(Int16ub, "utf8")),
    WType.REGISTER: Struct(
        "group" / PascalString(Int16ub, "utf8"), "member1" / PascalString(Int8ub, "utf8"),
        "member2" / PascalString(Int8ub, "utf8"), "owner" / PascalString(Int8ub, "utf8"),
        "epoch" / Int64ub,
    ),
    WType.REPORT: Struct("group" / PascalString(Int16ub, "utf8"), "epoch" / Int64ub, "flags" / Int8ub),
    WType.CLAIM: Struct("group" / PascalString(Int16ub, "utf8"), "epoch" / Int64ub),
    WType.KEEP: Struct("group" / PascalString(Int16ub, "utf8"), "epoch" / Int64ub),
    WType.HANDOVER: Struct("group" / PascalString(Int16ub, "utf8"), "epoch" / Int64ub),
    WType.RESOLVE: Struct("group" / PascalString(Int16ub, "utf8"), "epoch" / Int64ub),
    WType.DECISION: Struct(
        "granted" / Flag, "owner" / PascalString(Int8ub, "utf8"), "epoch" / Int64ub,
        "reason" / PascalString(Int16ub, "utf8"),
    ),
    WType.ERROR: Struct("reason" / PascalString(Int16ub, "utf8")),
    WType.STALE: Struct("reason" / PascalString(Int16ub, "utf8")),
}


class WitnessProtocolError(Exception):
    """Malformed witness traffic; the connection is closed."""


@dataclass(frozen=True)
class WFrame:
    type: WType
    req_id: int
    fields: dict[str, Any]  # the payload's fields, as declared in PAYLOADS

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


def encode(type_: WType, req_id: int = 0, **fields: Any) -> bytes:
    payload = cast(bytes, PAYLOADS[type_].build(fields))
    if len(payload) > MAX_PAYLOAD:
        raise WitnessProtocolError(f"{type_.name} payload too large")
    csum = xxhash.xxh3_64_intdigest(payload) if payload else 0
    return _HDR.pack(MAGIC, type_, 0, 0, req_id, len(payload), csum) + payload


class WDecoder:
    def __init__(self) -> None:
        self.buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self) -> WFrame | None:
        if len(self.buf) < HEADER_SIZE:
            return None
        magic, t, r1, r2, req_id, plen, csum = _HDR.unpack_from(self.buf)
        if magic != MAGIC:
            raise WitnessProtocolError(f"bad witness frame magic {magic:#x}")
        if r1 or r2:
            raise WitnessProtocolError("reserved fields are not zero")
        if plen > MAX_PAYLOAD:
            raise WitnessProtocolError(f"payload of {plen} bytes is too large")
        try:
            wt = WType(t)
        except ValueError:
            raise WitnessProtocolError(f"unknown witness frame type {t}") from None
        if len(self.buf) < HEADER_SIZE + plen:
            return None
        payload = bytes(self.buf[HEADER_SIZE : HEADER_SIZE + plen])
        del self.buf[: HEADER_SIZE + plen]
        if (xxhash.xxh3_64_intdigest(payload) if payload else 0) != csum:
            raise WitnessProtocolError(f"checksum mismatch on {wt.name}")
        try:
            c = PAYLOADS[wt].parse(payload)
        except Exception as e:
            raise WitnessProtocolError(f"malformed {wt.name} payload: {e}") from None
        fields = {k: v for k, v in c.items() if not k.startswith("_")}
        if len(PAYLOADS[wt].build(fields)) != len(payload):
            raise WitnessProtocolError(f"{wt.name} payload has trailing bytes")
        return WFrame(wt, req_id, fields)
