"""Replication wire protocol (sans-IO). Normative spec: proto/replication.md.

Provisional codec written by the lead to unblock the engine; the construct declarations are the
single description of each frame and the hot-path struct is checked against them in tests.
"""

from __future__ import annotations

import collections
import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import xxhash
from construct import Bytes, Int8ub, Int16ub, Int32ub, Int64ub, PascalString, Struct

from ..buffers import PayloadBuffers

MAGIC = 0x53594E43
PROTO_VERSION = 1
MIN_VERSION = 1
MAX_PAYLOAD = (32 << 20) + 4096
HEADER_SIZE = 56

FEAT_FUA, FEAT_TRIM, FEAT_ZEROES, FEAT_FORWARD, FEAT_DIGESTS = 1, 2, 4, 8, 16
# The receiver honours FAST_ZERO on ZEROES: it zeroes without writing data or answers ENOTSUP
# having changed nothing. A node sends FAST_ZERO only to a peer whose HELLO had this bit.
FEAT_FAST_ZERO = 32
FEATURES = FEAT_FUA | FEAT_TRIM | FEAT_ZEROES | FEAT_FORWARD | FEAT_DIGESTS | FEAT_FAST_ZERO

FLAG_FUA, FLAG_FORWARDED, FLAG_RESYNC, FLAG_NO_HOLE, FLAG_FAST_ZERO = 0x01, 0x02, 0x04, 0x08, 0x10

# A frame's payload: received frames carry bytes or views of buffers nothing else writes; a
# sender may pass any buffer (not copied).
Payload = bytes | bytearray | memoryview


class MsgType(IntEnum):
    HELLO = 1
    HELLO_ACK = 2
    PING = 3
    PONG = 4
    WRITE = 10
    ZEROES = 11
    TRIM = 12
    FLUSH = 13
    RELEASE = 21
    READ = 22
    LEASE = 30
    RESYNC_BEGIN = 40
    RESYNC_END = 42
    DIGESTS = 43
    CONTROL = 50
    REPLY = 100
    GOODBYE = 101


class Status(IntEnum):
    OK = 0
    EIO = 5
    EINVAL = 22
    ENOSPC = 28
    STALE_EPOCH = 1001
    NOT_PRIMARY = 1002
    UNKNOWN_GROUP = 1003
    UNKNOWN_VOLUME = 1004
    BAD_CHECKSUM = 1005
    NOT_SERVING = 1006
    BAD_REQUEST = 1007
    BUSY = 1008
    ENOTSUP = 95  # ZEROES with FAST_ZERO: the receiver cannot zero without writing; nothing changed


HEADER = Struct(
    "magic" / Int32ub,
    "type" / Int8ub,
    "flags" / Int8ub,
    "reserved" / Int16ub,
    "req_id" / Int64ub,
    "group" / Int32ub,
    "epoch" / Int64ub,
    "vol" / Int32ub,
    "offset" / Int64ub,
    "length" / Int32ub,
    "payload_len" / Int32ub,
    "checksum" / Int64ub,
)
HELLO_PAYLOAD = Struct(
    "proto_version" / Int16ub,
    "min_version" / Int16ub,
    "features" / Int64ub,
    "node_uuid" / Bytes(16),
    "node_name" / PascalString(Int8ub, "utf8"),
    "path_index" / Int8ub,
    "link_session" / Int64ub,
    "reserved" / Bytes(32),  # zeros: authentication is the security handshake's (secure.py)
)
PING_PAYLOAD = Struct("ns" / Int64ub)
LEASE_REPLY = Struct("lease_ms" / Int32ub)
RELEASE_PAYLOAD = Struct("status" / Int32ub)
DIGESTS_REQUEST = Struct("region" / Int32ub)

_HDR = struct.Struct(">IBBHQIQIQIIQ")
assert _HDR.size == HEADER.sizeof() == HEADER_SIZE
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
# Each known type by its number: a dict lookup, where calling the enum per received frame
# costs about half a microsecond.
_TYPES: dict[int, MsgType] = {int(t): t for t in MsgType}


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the path must be closed."""


class ChecksumError(ProtocolError):
    pass


class HandshakeError(ProtocolError):
    pass


@dataclass(frozen=True, slots=True)
class Hello:
    proto_version: int
    min_version: int
    features: int
    node_uuid: bytes
    node_name: str
    path_index: int
    link_session: int
    reserved: bytes


def version_problem(h: Hello) -> str | None:
    if h.proto_version < MIN_VERSION or PROTO_VERSION < h.min_version:
        return (f"protocol versions do not overlap: peer speaks {h.min_version}..{h.proto_version}, "
                f"this node {MIN_VERSION}..{PROTO_VERSION}")
    return None


class Frame:
    """One frame. A plain slotted class: frames are built per request on the hot path."""

    __slots__ = ("type", "flags", "req_id", "group", "epoch", "vol", "offset", "length", "payload")

    def __init__(self, type: int, flags: int = 0, req_id: int = 0, group: int = 0, epoch: int = 0, vol: int = 0,
                 offset: int = 0, length: int = 0, payload: Payload = b"") -> None:
        self.type = type
        self.flags = flags
        self.req_id = req_id
        self.group = group
        self.epoch = epoch
        self.vol = vol
        self.offset = offset
        self.length = length
        self.payload = payload

    def _key(self) -> tuple[int, int, int, int, int, int, int, int, bytes]:
        return (int(self.type), self.flags, self.req_id, self.group, self.epoch, self.vol,
                self.offset, self.length, bytes(self.payload))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Frame) and self._key() == other._key()

    def __repr__(self) -> str:
        return (f"Frame({MsgType(self.type).name}, flags={self.flags:#x}, req_id={self.req_id}, "
                f"group={self.group}, epoch={self.epoch}, vol={self.vol}, offset={self.offset}, "
                f"length={self.length}, payload={len(self.payload)} bytes)")

    # -- flags ---------------------------------------------------------------------------------
    @property
    def fua(self) -> bool:
        return bool(self.flags & FLAG_FUA)

    @property
    def forwarded(self) -> bool:
        return bool(self.flags & FLAG_FORWARDED)

    @property
    def resync(self) -> bool:
        return bool(self.flags & FLAG_RESYNC)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & FLAG_NO_HOLE)

    @property
    def fast_zero(self) -> bool:
        return bool(self.flags & FLAG_FAST_ZERO)

    @property
    def status(self) -> int:
        return self.length

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def _hello(cls, t: MsgType, node_uuid: bytes, node_name: str, path_index: int, link_session: int) -> Frame:
        payload = cast(bytes, HELLO_PAYLOAD.build(dict(
            proto_version=PROTO_VERSION, min_version=MIN_VERSION, features=FEATURES,
            node_uuid=node_uuid, node_name=node_name, path_index=path_index,
            link_session=link_session, reserved=bytes(32),
        )))
        return cls(t, payload=payload)

    @classmethod
    def hello(cls, *, node_uuid: bytes, node_name: str, path_index: int, link_session: int) -> Frame:
        return cls._hello(MsgType.HELLO, node_uuid, node_name, path_index, link_session)

    @classmethod
    def hello_ack(cls, *, node_uuid: bytes, node_name: str, path_index: int, link_session: int) -> Frame:
        return cls._hello(MsgType.HELLO_ACK, node_uuid, node_name, path_index, link_session)

    @classmethod
    def ping(cls, ns: int) -> Frame:
        return cls(MsgType.PING, payload=_U64.pack(ns))

    @classmethod
    def pong(cls, ns: int) -> Frame:
        return cls(MsgType.PONG, payload=_U64.pack(ns))

    @classmethod
    def write(cls, req_id: int, group: int, epoch: int, vol: int, offset: int, data: Payload, *,
              fua: bool = False, forwarded: bool = False, resync: bool = False) -> Frame:
        flags = (FLAG_FUA if fua else 0) | (FLAG_FORWARDED if forwarded else 0) | (FLAG_RESYNC if resync else 0)
        return cls(MsgType.WRITE, flags, req_id, group, epoch, vol, offset, len(data), data)

    @classmethod
    def zeroes(cls, req_id: int, group: int, epoch: int, vol: int, offset: int, length: int, *,
               fua: bool = False, no_hole: bool = False, forwarded: bool = False, fast: bool = False) -> Frame:
        flags = (FLAG_FUA if fua else 0) | (FLAG_NO_HOLE if no_hole else 0) | (FLAG_FORWARDED if forwarded else 0) \
            | (FLAG_FAST_ZERO if fast else 0)
        return cls(MsgType.ZEROES, flags, req_id, group, epoch, vol, offset, length)

    @classmethod
    def trim(cls, req_id: int, group: int, epoch: int, vol: int, offset: int, length: int, *,
             fua: bool = False, forwarded: bool = False, resync: bool = False) -> Frame:
        flags = (FLAG_FUA if fua else 0) | (FLAG_FORWARDED if forwarded else 0) | (FLAG_RESYNC if resync else 0)
        return cls(MsgType.TRIM, flags, req_id, group, epoch, vol, offset, length)

    @classmethod
    def flush(cls, req_id: int, group: int, epoch: int, vol: int = 0xFFFFFFFF) -> Frame:
        return cls(MsgType.FLUSH, 0, req_id, group, epoch, vol)

    @classmethod
    def release(cls, req_id: int, group: int, epoch: int, status: int = 0) -> Frame:
        return cls(MsgType.RELEASE, 0, req_id, group, epoch, payload=_U32.pack(status))

    @classmethod
    def read(cls, req_id: int, group: int, epoch: int, vol: int, offset: int, length: int) -> Frame:
        return cls(MsgType.READ, 0, req_id, group, epoch, vol, offset, length)

    @classmethod
    def lease(cls, req_id: int, group: int, epoch: int) -> Frame:
        return cls(MsgType.LEASE, 0, req_id, group, epoch)

    @classmethod
    def resync_begin(cls, req_id: int, group: int, epoch: int, vol: int, region: int, bits: bytes) -> Frame:
        return cls(MsgType.RESYNC_BEGIN, 0, req_id, group, epoch, vol, payload=_U32.pack(region) + bytes(bits))

    @classmethod
    def resync_end(cls, req_id: int, group: int, epoch: int, vol: int, offset: int, length: int) -> Frame:
        return cls(MsgType.RESYNC_END, 0, req_id, group, epoch, vol, offset, length)

    @classmethod
    def digests(cls, req_id: int, group: int, epoch: int, vol: int, offset: int, length: int, region: int) -> Frame:
        return cls(MsgType.DIGESTS, 0, req_id, group, epoch, vol, offset, length, _U32.pack(region))

    @classmethod
    def control(cls, req_id: int, body: dict[str, Any]) -> Frame:
        return cls(MsgType.CONTROL, 0, req_id, payload=json.dumps(body).encode())

    @classmethod
    def reply(cls, req_id: int, status: int = 0, payload: Payload = b"") -> Frame:
        return cls(MsgType.REPLY, 0, req_id, length=int(status), payload=payload)

    @classmethod
    def goodbye(cls, reason: str = "") -> Frame:
        return cls(MsgType.GOODBYE, payload=reason.encode())

    @staticmethod
    def lease_payload(ms: int) -> bytes:
        return _U32.pack(ms)

    @staticmethod
    def digests_payload(ds: list[int]) -> bytes:
        return struct.pack(f">{len(ds)}Q", *ds)

    # -- payload readers -----------------------------------------------------------------------
    def hello_fields(self) -> Hello:
        try:
            c = HELLO_PAYLOAD.parse(bytes(self.payload))
        except Exception as e:
            raise HandshakeError(f"malformed HELLO payload: {e}") from None
        return Hello(c.proto_version, c.min_version, c.features, c.node_uuid, c.node_name,
                     c.path_index, c.link_session, c.reserved)

    def ping_ns(self) -> int:
        if len(self.payload) != 8:
            raise ProtocolError("PING/PONG payload must be 8 bytes")
        ns: int = _U64.unpack(self.payload)[0]
        return ns

    def lease_ms(self) -> int:
        ms: int = _U32.unpack(self.payload[:4])[0] if len(self.payload) >= 4 else 0
        return ms

    def release_status(self) -> int:
        status: int = _U32.unpack(self.payload[:4])[0] if len(self.payload) >= 4 else 0
        return status

    def resync_bitmap(self) -> tuple[int, bytes]:
        if len(self.payload) < 4:
            raise ProtocolError("RESYNC_BEGIN payload too short")
        region: int = _U32.unpack(self.payload[:4])[0]
        return region, bytes(self.payload[4:])

    def digest_region(self) -> int:
        if len(self.payload) != 4:
            raise ProtocolError("DIGESTS request payload must be 4 bytes")
        region: int = _U32.unpack(self.payload)[0]
        return region

    def digest_list(self) -> list[int]:
        n = len(self.payload) // 8
        return list(struct.unpack(f">{n}Q", self.payload[: n * 8]))

    def control_json(self) -> dict[str, Any]:
        try:
            body = json.loads(bytes(self.payload).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"CONTROL payload is not UTF-8 JSON: {e}") from None
        if not isinstance(body, dict):
            raise ProtocolError("CONTROL payload must be a JSON object")
        return body

    def goodbye_reason(self) -> str:
        return bytes(self.payload).decode("utf-8", "replace")


def encode(f: Frame) -> list[Payload]:
    """Header and payload as separate buffers, for vectored sends (the payload is not copied)."""
    p = f.payload
    n = len(p)
    hdr = _HDR.pack(MAGIC, f.type, f.flags, 0, f.req_id, f.group, f.epoch, f.vol, f.offset,
                    f.length, n, xxhash.xxh3_64_intdigest(p) if n else 0)
    return [hdr, p] if n else [hdr]


def encode_bytes(f: Frame) -> bytes:
    return b"".join(bytes(b) for b in encode(f))


# Payloads over this many bytes that arrive whole in a piece the caller gives away (a key-mode
# record completed in the channel's own buffer) are handed out as views of it, not copied: a
# copy of 1 MiB costs about 50 µs on the 2-vCPU test VM. Only from a piece at most twice the
# payload and this much more: a view keeps the whole piece alive, and a payload held for long
# (waiting for its range, queued to a slow host) must not hold several records' memory (review).
ADOPT_MIN = 64 << 10
_NEVER = MAX_PAYLOAD + 1  # no payload is this large


class FrameDecoder:
    """Bytes in, frames out. ``next_frame`` raises ProtocolError subclasses on anything malformed
    (after handing out every frame that arrived before it).

    Each payload byte is copied once, from what ``receive_data`` is given into the frame's own
    payload buffer: a frame whole in one piece of data is sliced out of it; a payload that
    spans pieces is filled in place as they arrive (its buffer allocated when its first bytes
    come). Only a header cut between pieces is gathered separately. Nothing is buffered then
    compacted, so a 1 MiB write costs no more copies than a 4 KiB one. A large payload that lies
    whole in a piece its caller gives away (``owned``) is not copied at all."""

    __slots__ = ("_head", "_frames", "_error", "_fill", "_need", "_hdr", "_buffers")

    def __init__(self, buffers: PayloadBuffers | None = None) -> None:
        self._head = bytearray()  # a header cut between two pieces of data
        self._frames: collections.deque[Frame] = collections.deque()
        self._error: ProtocolError | None = None
        self._fill: bytearray | memoryview | None = None  # the payload being filled
        self._buffers = buffers  # where payloads that span pieces of data come from
        self._need = 0  # its bytes still to come
        self._hdr: tuple[Any, ...] = ()  # its frame's header fields

    def receive_data(self, data: Payload, owned: bool = False) -> None:
        """Take the next piece of the stream. ``owned``: the caller gives the piece away (no
        one writes to its memory again): a payload of over ``ADOPT_MIN`` bytes that lies whole
        in it is handed out as a view of it instead of a copy."""
        if self._error is not None:
            return  # the stream is broken: next_frame raises once the frames before it are out
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        i, n = 0, len(view)
        # The smallest payload handed out as a view of this piece: over ADOPT_MIN, and at least
        # half of what the piece holds beyond ADOPT_MIN (n <= 2 * size + ADOPT_MIN).
        adopt = max(ADOPT_MIN + 1, (n - ADOPT_MIN + 1) // 2) if owned else _NEVER
        try:
            while i < n:
                need = self._need
                if need:  # in a payload
                    fill = self._fill
                    if fill is None:  # none of it yet
                        if n - i >= need >= adopt:
                            self._need = 0
                            self._emit(self._hdr, view[i:i + need])
                            i += need
                            continue
                        buffers = self._buffers
                        fill = self._fill = buffers.get(need) if buffers is not None else bytearray(need)
                    take = min(n - i, need)
                    at = len(fill) - need
                    fill[at:at + take] = view[i:i + take]
                    i += take
                    self._need -= take
                    if not self._need:
                        self._fill = None
                        self._emit(self._hdr, fill)
                    continue
                head = self._head
                if head:
                    take = min(HEADER_SIZE - len(head), n - i)
                    head += view[i:i + take]
                    i += take
                    if len(head) < HEADER_SIZE:
                        return
                    hdr = _check_header(head, 0)
                    head.clear()
                elif n - i >= HEADER_SIZE:
                    hdr = _check_header(view, i)
                    i += HEADER_SIZE
                else:
                    head += view[i:]
                    return
                plen = hdr[9]
                if not plen:
                    self._emit(hdr, b"")
                elif n - i >= plen:
                    self._emit(hdr, view[i:i + plen] if plen >= adopt else bytes(view[i:i + plen]))
                    i += plen
                else:  # its buffer is taken when its first bytes come
                    self._need, self._hdr = plen, hdr
        except ProtocolError as e:
            self._error = e
            self._fill = None
            self._need = 0
            self._head.clear()

    def _emit(self, hdr: tuple[Any, ...], payload: Payload) -> None:
        t, flags, req_id, group, epoch, vol, offset, length, plen, csum = hdr[1:]
        if (xxhash.xxh3_64_intdigest(payload) if plen else 0) != csum:
            raise ChecksumError(f"checksum mismatch on {_TYPES[t].name} req_id {req_id}")
        self._frames.append(Frame(_TYPES[t], flags, req_id, group, epoch, vol, offset, length, payload))

    def next_frame(self) -> Frame | None:
        if self._frames:
            return self._frames.popleft()
        if self._error is not None:
            raise self._error
        return None


def _check_header(buf: Payload, pos: int) -> tuple[Any, ...]:
    """The header at ``buf[pos:]``, validated; without the reserved field (always zero)."""
    (magic, t, flags, reserved, req_id, group, epoch, vol, offset, length, plen,
     csum) = _HDR.unpack_from(buf, pos)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic:#010x}")
    if reserved:
        raise ProtocolError("reserved header field is not zero")
    if t not in _TYPES:
        raise ProtocolError(f"unknown frame type {t}")
    if plen > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {plen} bytes exceeds the maximum {MAX_PAYLOAD}")
    return (magic, t, flags, req_id, group, epoch, vol, offset, length, plen, csum)
