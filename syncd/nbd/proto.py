"""NBD wire protocol, server side, sans-IO (fixed newstyle handshake, simple and structured
replies). Normative reference: doc/proto.md of the NBD project; what syncd implements of it is
listed in proto/nbd.md.

Every frame is declared once with ``construct``; the per-request hot path uses ``struct``
objects whose layouts the tests prove equal to those declarations.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, Literal, cast

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    GreedyBytes,
    Int16ub,
    Int32ub,
    Int64ub,
    Struct,
)

# -- constants ---------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1
STATE_ZERO = 2

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# ALUA target port group states carried by the syncd:alua meta context (proto/nbd-extensions.md):
# the low 8 bits of ALUA_STATUS.
ALUA_ACTIVE_OPTIMIZED = 0
ALUA_ACTIVE_NON_OPTIMIZED = 1
ALUA_STANDBY = 2
ALUA_UNAVAILABLE = 3
ALUA_TRANSITIONING = 15

ALUA_NAMES = {
    ALUA_ACTIVE_OPTIMIZED: "active/optimized",
    ALUA_ACTIVE_NON_OPTIMIZED: "active/non-optimized",
    ALUA_STANDBY: "standby",
    ALUA_UNAVAILABLE: "unavailable",
    ALUA_TRANSITIONING: "transitioning",
}


MIN_BLOCK = 1
PREF_BLOCK = 4096
MAX_BLOCK = 32 << 20
MAX_OPTION_DATA = 64 << 10
MAX_NAME = 4096

# -- declarations (the single description of each frame) ---------------------------------------
GREETING = Struct(
    "nbdmagic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "handshake_flags" / Int16ub,
)
CLIENT_FLAGS = Struct("flags" / Int32ub)
OPTION_HEADER = Struct("magic" / Int64ub, "option" / Int32ub, "length" / Int32ub)
OPTION_REPLY_HEADER = Struct(
    "magic" / Const(OPT_REPLY_MAGIC, Int64ub), "option" / Int32ub, "type" / Int32ub, "length" / Int32ub
)
EXPORT_NAME_REPLY = Struct("size" / Int64ub, "flags" / Int16ub)
INFO_EXPORT_REPLY = Struct("info" / Const(INFO_EXPORT, Int16ub), "size" / Int64ub, "flags" / Int16ub)
INFO_BLOCK_SIZE_REPLY = Struct(
    "info" / Const(INFO_BLOCK_SIZE, Int16ub), "minimum" / Int32ub, "preferred" / Int32ub, "maximum" / Int32ub
)
REQUEST_HEADER = Struct(
    "magic" / Int32ub, "flags" / Int16ub, "type" / Int16ub, "cookie" / Int64ub, "offset" / Int64ub,
    "length" / Int32ub,
)
SIMPLE_REPLY = Struct("magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub), "error" / Int32ub, "cookie" / Int64ub)
STRUCTURED_REPLY_HEADER = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub), "flags" / Int16ub, "type" / Int16ub,
    "cookie" / Int64ub, "length" / Int32ub,
)
OFFSET_DATA_HEAD = Struct("offset" / Int64ub)
BLOCK_STATUS_HEAD = Struct("context_id" / Int32ub)
BLOCK_DESCRIPTOR = Struct("length" / Int32ub, "status" / Int32ub)
OFFSET_HOLE_BODY = Struct("offset" / Int64ub, "length" / Int32ub)
ERROR_CHUNK = Struct("error" / Int32ub, "message_length" / Int16ub, "message" / Bytes(lambda c: c.message_length))
NAME_FIELD = Struct("length" / Int32ub, "name" / Bytes(lambda c: c.length))
# The status word of a syncd:alua extent (proto/nbd-extensions.md): the group epoch's low 24 bits
# above the ALUA state.
ALUA_STATUS = BitStruct("epoch" / BitsInteger(24), "state" / BitsInteger(8))
META_CONTEXT_REPLY = Struct("context_id" / Int32ub, "name" / GreedyBytes)

# -- hot-path codecs derived from the declarations ---------------------------------------------
REQ = struct.Struct(">IHHQQI")
SIMPLE = struct.Struct(">IIQ")
SHDR = struct.Struct(">IHHQI")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
OPT_HDR = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
DESCRIPTOR = struct.Struct(">II")


def alua_word(state: int, epoch: int) -> int:
    """The syncd:alua status word (ALUA_STATUS) for an ALUA state and a group epoch."""
    return ((epoch & 0xFFFFFF) << 8) | (state & 0xFF)


def alua_unpack(word: int) -> tuple[int, int]:
    """(ALUA state, low 24 bits of the epoch) from a syncd:alua status word."""
    return word & 0xFF, word >> 8
HOT_PATH = {  # struct codec -> its construct declaration (checked in tests)
    "REQ": (REQ, REQUEST_HEADER),
    "SIMPLE": (SIMPLE, SIMPLE_REPLY),
    "SHDR": (SHDR, STRUCTURED_REPLY_HEADER),
    "OPT_HDR": (OPT_HDR, OPTION_HEADER),
    "OPT_REPLY": (OPT_REPLY, OPTION_REPLY_HEADER),
    "DESCRIPTOR": (DESCRIPTOR, BLOCK_DESCRIPTOR),
}


class ProtocolError(Exception):
    """The client broke the protocol in a way that ends its connection."""


# -- events ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: int


@dataclass(frozen=True, slots=True)
class Option:
    option: int
    data: bytes


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a call per field, per request
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None  # WRITE payload (large ones: a reused buffer's view)


class _NeedData(enum.Enum):
    """The type of NEED_DATA: an enum member, so that ``is NEED_DATA`` narrows the event's type."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = _NeedData.NEED_DATA


class ServerConnection:
    """Turns client bytes into ClientFlags / Option / Request events and events into bytes.

    Phases: ``handshake`` (client flags, then options) and ``transmission`` (requests), which
    the server enters by calling ``start_transmission()`` after a successful GO/EXPORT_NAME.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.phase = "flags"
        self.no_zeroes = False
        self.structured = False

    # bytes in
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def take_into(self, view: memoryview) -> int:
        """Move already-buffered bytes into ``view`` (used for large write payloads)."""
        n = min(len(view), len(self._buf) - self._pos)
        with memoryview(self._buf) as buf:
            view[:n] = buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def next_event(self) -> ClientFlags | Option | Request | PartialWrite | Literal[_NeedData.NEED_DATA]:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if self.phase == "transmission":
            if avail < REQ.size:
                return NEED_DATA
            magic, flags, typ, cookie, offset, length = REQ.unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if typ == CMD_WRITE:
                if length > MAX_BLOCK:
                    raise ProtocolError(f"write of {length} bytes exceeds the maximum {MAX_BLOCK}")
                if avail < REQ.size + length:
                    self._pos = pos + REQ.size
                    return PartialWrite(Request(flags, typ, cookie, offset, length), avail - REQ.size)
                self._pos = end = pos + REQ.size + length
                with memoryview(buf) as view:  # one copy (a bytearray slice would be a second)
                    data = bytes(view[pos + REQ.size : end])
                return Request(flags, typ, cookie, offset, length, data)
            self._pos = pos + REQ.size
            return Request(flags, typ, cookie, offset, length)
        if self.phase == "flags":
            if avail < 4:
                return NEED_DATA
            (flags,) = U32.unpack_from(buf, pos)
            self._pos += 4
            if flags & ~CLIENT_FLAGS_KNOWN:
                raise ProtocolError(f"unknown client flags {flags:#x}")
            if not flags & FLAG_FIXED_NEWSTYLE:
                raise ProtocolError("client does not speak fixed newstyle")
            self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
            self.phase = "options"
            return ClientFlags(flags)
        if self.phase == "options":
            if avail < OPT_HDR.size:
                return NEED_DATA
            magic, opt, length = OPT_HDR.unpack_from(buf, pos)
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise ProtocolError(f"option data of {length} bytes is too long")
            if avail < OPT_HDR.size + length:
                return NEED_DATA
            self._pos = pos + OPT_HDR.size + length
            return Option(opt, bytes(buf[pos + OPT_HDR.size : self._pos]))
        raise ProtocolError(f"no events in phase {self.phase}")

    def start_transmission(self) -> None:
        self.phase = "transmission"

    # events out
    @staticmethod
    def greeting() -> bytes:
        return cast(bytes, GREETING.build({"handshake_flags": FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES}))

    @staticmethod
    def option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
        return OPT_REPLY.pack(OPT_REPLY_MAGIC, option, rtype, len(data)) + data

    def export_name_reply(self, size: int, tflags: int) -> bytes:
        reply = cast(bytes, EXPORT_NAME_REPLY.build({"size": size, "flags": tflags}))
        return reply + (b"" if self.no_zeroes else bytes(124))

    @staticmethod
    def info_export(size: int, tflags: int) -> bytes:
        return cast(bytes, INFO_EXPORT_REPLY.build({"size": size, "flags": tflags}))

    @staticmethod
    def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
        return cast(bytes, INFO_BLOCK_SIZE_REPLY.build(
            {"minimum": minimum, "preferred": preferred, "maximum": maximum}))

    @staticmethod
    def simple_reply(cookie: int, error: int = 0) -> bytes:
        return SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)

    @staticmethod
    def chunk_header(cookie: int, flags: int, rtype: int, length: int) -> bytes:
        return SHDR.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)

    def offset_data_head(self, cookie: int, offset: int, datalen: int) -> bytes:
        return (SHDR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + datalen)
                + U64.pack(offset))

    @staticmethod
    def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
        msg = message.encode()[:4096]
        body = U32.pack(error) + U16.pack(len(msg)) + msg
        return SHDR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(body)) + body

    @staticmethod
    def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool) -> bytes:
        body = U32.pack(context_id) + b"".join(struct.pack(">II", ln, st) for ln, st in extents)
        flags = REPLY_FLAG_DONE if done else 0
        return SHDR.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body

    @staticmethod
    def done_chunk(cookie: int) -> bytes:
        return SHDR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


@dataclass(frozen=True, slots=True)
class PartialWrite:
    """A WRITE whose payload has not fully arrived; ``have`` bytes of it are buffered."""

    request: Request
    have: int


# -- option payload parsing --------------------------------------------------------------------
def parse_go(data: bytes) -> tuple[str, list[int]]:
    """NBD_OPT_INFO / NBD_OPT_GO: export name and the info types requested."""
    if len(data) < 6:
        raise ValueError("option data too short")
    (nlen,) = U32.unpack_from(data, 0)
    if nlen > MAX_NAME or 4 + nlen + 2 > len(data):
        raise ValueError("export name length does not fit the option")
    name = data[4 : 4 + nlen].decode("utf-8")
    (n,) = U16.unpack_from(data, 4 + nlen)
    rest = data[4 + nlen + 2 :]
    if len(rest) != 2 * n:
        raise ValueError("number of information requests does not match the option length")
    return name, [U16.unpack_from(rest, 2 * i)[0] for i in range(n)]


def parse_meta_query(data: bytes) -> tuple[str, list[str]]:
    """NBD_OPT_{LIST,SET}_META_CONTEXT: export name and the queries."""
    if len(data) < 8:
        raise ValueError("option data too short")
    (nlen,) = U32.unpack_from(data, 0)
    if nlen > MAX_NAME or 4 + nlen + 4 > len(data):
        raise ValueError("export name length does not fit the option")
    name = data[4 : 4 + nlen].decode("utf-8")
    pos = 4 + nlen
    (n,) = U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(n):
        if pos + 4 > len(data):
            raise ValueError("query count does not match the option length")
        (qlen,) = U32.unpack_from(data, pos)
        pos += 4
        if qlen > MAX_NAME or pos + qlen > len(data):
            raise ValueError("query length does not fit the option")
        queries.append(data[pos : pos + qlen].decode("utf-8"))
        pos += qlen
    if pos != len(data):
        raise ValueError("trailing bytes after the queries")
    return name, queries
