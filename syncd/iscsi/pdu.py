"""iSCSI PDUs (RFC 7143 section 11), sans-IO: framing with optional CRC32C digests, the basic
header segment of every PDU declared once with ``construct``, and typed events.

The target decodes what an initiator sends (``decode``) and encodes what a target sends
(``encode_*``). The per-I/O PDUs (SCSI Command, Data-Out, Data-In, SCSI Response, R2T) use
``struct`` objects whose layouts the tests prove equal to the declarations (``HOT_PATH``).
What syncd implements of the protocol is listed in proto/iscsi.md.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import google_crc32c
from construct import Bytes, Int8ub, Int16ub, Int24ub, Int32ub, Int64ub, Padding, Struct

# -- constants ---------------------------------------------------------------------------------
BHS_LEN: Final = 48
DIGEST_LEN: Final = 4
IMMEDIATE: Final = 0x40  # the I bit in byte 0 (initiator PDUs)
OPCODE_MASK: Final = 0x3F
F_BIT: Final = 0x80  # final
RESERVED_TAG: Final = 0xFFFFFFFF


class Op(enum.IntEnum):
    # initiator -> target
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    # target -> initiator
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


INITIATOR_OPS: Final = frozenset({Op.NOP_OUT, Op.SCSI_COMMAND, Op.TASK_MGMT_REQUEST, Op.LOGIN_REQUEST,
                                  Op.TEXT_REQUEST, Op.DATA_OUT, Op.LOGOUT_REQUEST, Op.SNACK_REQUEST})

# SCSI Command flags (byte 1)
CMD_READ: Final = 0x40
CMD_WRITE: Final = 0x20
CMD_ATTR_MASK: Final = 0x07
# Data-In flags (byte 1)
DATA_ACK: Final = 0x40
DATA_OVERFLOW: Final = 0x04
DATA_UNDERFLOW: Final = 0x02
DATA_STATUS: Final = 0x01
# SCSI Response flags (byte 1)
RESP_BIDI_OVERFLOW: Final = 0x10
RESP_BIDI_UNDERFLOW: Final = 0x08
RESP_OVERFLOW: Final = 0x04
RESP_UNDERFLOW: Final = 0x02
# SCSI Response: response codes
RESPONSE_COMPLETED: Final = 0x00
RESPONSE_TARGET_FAILURE: Final = 0x01
# Login and Text flags (byte 1)
TRANSIT: Final = 0x80
CONTINUE: Final = 0x40
# Login stages (CSG/NSG)
STAGE_SECURITY: Final = 0
STAGE_OPERATIONAL: Final = 1
STAGE_FULL_FEATURE: Final = 3
VERSION: Final = 0x00


class RejectReason(enum.IntEnum):
    DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    OUT_OF_RESOURCES = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class AsyncEvent(enum.IntEnum):
    SCSI_EVENT = 0
    LOGOUT_REQUEST = 1
    DROP_CONNECTION = 2
    DROP_ALL_CONNECTIONS = 3
    RENEGOTIATE = 4


# Login Response status (class << 8 | detail), RFC 7143 section 11.13.5
LOGIN_SUCCESS: Final = 0x0000
LOGIN_TARGET_MOVED_TEMPORARILY: Final = 0x0101
LOGIN_INITIATOR_ERROR: Final = 0x0200
LOGIN_AUTH_FAILURE: Final = 0x0201
LOGIN_AUTHORIZATION_FAILURE: Final = 0x0202
LOGIN_NOT_FOUND: Final = 0x0203
LOGIN_TARGET_REMOVED: Final = 0x0204
LOGIN_UNSUPPORTED_VERSION: Final = 0x0205
LOGIN_TOO_MANY_CONNECTIONS: Final = 0x0206
LOGIN_MISSING_PARAMETER: Final = 0x0207
LOGIN_CANT_INCLUDE_IN_SESSION: Final = 0x0208
LOGIN_SESSION_TYPE_NOT_SUPPORTED: Final = 0x0209
LOGIN_SESSION_DOES_NOT_EXIST: Final = 0x020A
LOGIN_INVALID_DURING_LOGIN: Final = 0x020B
LOGIN_TARGET_ERROR: Final = 0x0300
LOGIN_SERVICE_UNAVAILABLE: Final = 0x0301
LOGIN_OUT_OF_RESOURCES: Final = 0x0302

# Logout reasons and responses
LOGOUT_CLOSE_SESSION: Final = 0
LOGOUT_CLOSE_CONNECTION: Final = 1
LOGOUT_REMOVE_FOR_RECOVERY: Final = 2
LOGOUT_OK: Final = 0
LOGOUT_CID_NOT_FOUND: Final = 1
LOGOUT_RECOVERY_NOT_SUPPORTED: Final = 2
LOGOUT_CLEANUP_FAILED: Final = 3

# Bounds on what one PDU may make the target hold.
MAX_AHS_WORDS: Final = 255  # TotalAHSLength is one byte
MAX_DATA_SEGMENT: Final = (1 << 24) - 1  # DataSegmentLength is three bytes

# -- declarations (the single description of each basic header segment) -----------------------
# Byte 0 is the opcode with the I bit; byte 4 TotalAHSLength (4-byte words); bytes 5-7
# DataSegmentLength. "reserved" fields are sent as zero and ignored on receipt.
NOP_OUT = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, "cmdsn" / Int32ub, "expstatsn" / Int32ub, Padding(16),
)
SCSI_COMMAND = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "edtl" / Int32ub, "cmdsn" / Int32ub, "expstatsn" / Int32ub, "cdb" / Bytes(16),
)
TASK_MGMT_REQUEST = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ref_itt" / Int32ub, "cmdsn" / Int32ub, "expstatsn" / Int32ub, "ref_cmdsn" / Int32ub,
    "expdatasn" / Int32ub, Padding(8),
)
LOGIN_REQUEST = Struct(
    "op" / Int8ub, "flags" / Int8ub, "version_max" / Int8ub, "version_min" / Int8ub, "ahs_words" / Int8ub,
    "dsl" / Int24ub, "isid" / Bytes(6), "tsih" / Int16ub, "itt" / Int32ub, "cid" / Int16ub, Padding(2),
    "cmdsn" / Int32ub, "expstatsn" / Int32ub, Padding(16),
)
TEXT_REQUEST = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, "cmdsn" / Int32ub, "expstatsn" / Int32ub, Padding(16),
)
DATA_OUT = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, Padding(4), "expstatsn" / Int32ub, Padding(4), "datasn" / Int32ub,
    "offset" / Int32ub, Padding(4),
)
LOGOUT_REQUEST = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, Padding(8),
    "itt" / Int32ub, "cid" / Int16ub, Padding(2), "cmdsn" / Int32ub, "expstatsn" / Int32ub, Padding(16),
)
SNACK_REQUEST = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, Padding(4), "expstatsn" / Int32ub, Padding(8), "begrun" / Int32ub,
    "runlength" / Int32ub,
)
NOP_IN = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    Padding(12),
)
SCSI_RESPONSE = Struct(
    "op" / Int8ub, "flags" / Int8ub, "response" / Int8ub, "status" / Int8ub, "ahs_words" / Int8ub,
    "dsl" / Int24ub, Padding(8), "itt" / Int32ub, "snack_tag" / Int32ub, "statsn" / Int32ub,
    "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub, "expdatasn" / Int32ub, "bidi_residual" / Int32ub,
    "residual" / Int32ub,
)
TASK_MGMT_RESPONSE = Struct(
    "op" / Int8ub, "flags" / Int8ub, "response" / Int8ub, Padding(1), "ahs_words" / Int8ub, "dsl" / Int24ub,
    Padding(8), "itt" / Int32ub, Padding(4), "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    Padding(12),
)
LOGIN_RESPONSE = Struct(
    "op" / Int8ub, "flags" / Int8ub, "version_max" / Int8ub, "version_active" / Int8ub, "ahs_words" / Int8ub,
    "dsl" / Int24ub, "isid" / Bytes(6), "tsih" / Int16ub, "itt" / Int32ub, Padding(4), "statsn" / Int32ub,
    "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub, "status_class" / Int8ub, "status_detail" / Int8ub,
    Padding(10),
)
TEXT_RESPONSE = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    Padding(12),
)
DATA_IN = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(1), "status" / Int8ub, "ahs_words" / Int8ub, "dsl" / Int24ub,
    "lun" / Int64ub, "itt" / Int32ub, "ttt" / Int32ub, "statsn" / Int32ub, "expcmdsn" / Int32ub,
    "maxcmdsn" / Int32ub, "datasn" / Int32ub, "offset" / Int32ub, "residual" / Int32ub,
)
LOGOUT_RESPONSE = Struct(
    "op" / Int8ub, "flags" / Int8ub, "response" / Int8ub, Padding(1), "ahs_words" / Int8ub, "dsl" / Int24ub,
    Padding(8), "itt" / Int32ub, Padding(4), "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    Padding(4), "time2wait" / Int16ub, "time2retain" / Int16ub, Padding(4),
)
R2T = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, "ttt" / Int32ub, "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    "r2tsn" / Int32ub, "offset" / Int32ub, "length" / Int32ub,
)
ASYNC_MESSAGE = Struct(
    "op" / Int8ub, "flags" / Int8ub, Padding(2), "ahs_words" / Int8ub, "dsl" / Int24ub, "lun" / Int64ub,
    "itt" / Int32ub, Padding(4), "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    "event" / Int8ub, "vcode" / Int8ub, "parameter1" / Int16ub, "parameter2" / Int16ub,
    "parameter3" / Int16ub, Padding(4),
)
REJECT = Struct(
    "op" / Int8ub, "flags" / Int8ub, "reason" / Int8ub, Padding(1), "ahs_words" / Int8ub, "dsl" / Int24ub,
    Padding(8), "itt" / Int32ub, Padding(4), "statsn" / Int32ub, "expcmdsn" / Int32ub, "maxcmdsn" / Int32ub,
    "datasn" / Int32ub, Padding(8),
)
DECLARATIONS: Final[dict[Op, Any]] = {
    Op.NOP_OUT: NOP_OUT, Op.SCSI_COMMAND: SCSI_COMMAND, Op.TASK_MGMT_REQUEST: TASK_MGMT_REQUEST,
    Op.LOGIN_REQUEST: LOGIN_REQUEST, Op.TEXT_REQUEST: TEXT_REQUEST, Op.DATA_OUT: DATA_OUT,
    Op.LOGOUT_REQUEST: LOGOUT_REQUEST, Op.SNACK_REQUEST: SNACK_REQUEST, Op.NOP_IN: NOP_IN,
    Op.SCSI_RESPONSE: SCSI_RESPONSE, Op.TASK_MGMT_RESPONSE: TASK_MGMT_RESPONSE,
    Op.LOGIN_RESPONSE: LOGIN_RESPONSE, Op.TEXT_RESPONSE: TEXT_RESPONSE, Op.DATA_IN: DATA_IN,
    Op.LOGOUT_RESPONSE: LOGOUT_RESPONSE, Op.R2T: R2T, Op.ASYNC_MESSAGE: ASYNC_MESSAGE, Op.REJECT: REJECT,
}

# -- hot-path codecs derived from the declarations ---------------------------------------------
# Bytes 4-7 travel as one word: TotalAHSLength << 24 | DataSegmentLength.
H_SCSI_COMMAND = struct.Struct(">BBxxIQIIII16s")
H_DATA_OUT = struct.Struct(">BBxxIQII4xI4xII4x")
H_DATA_IN = struct.Struct(">BBxBIQ8I")
H_SCSI_RESPONSE = struct.Struct(">BBBBI8x8I")
H_R2T = struct.Struct(">BBxxIQ8I")
H_COMMON = struct.Struct(">BBxxI8xI")  # op, flags, ahs/dsl word, itt: enough to frame any PDU
HOT_PATH: Final = {  # struct codec -> its construct declaration (checked in tests)
    "H_SCSI_COMMAND": (H_SCSI_COMMAND, SCSI_COMMAND),
    "H_DATA_OUT": (H_DATA_OUT, DATA_OUT),
    "H_DATA_IN": (H_DATA_IN, DATA_IN),
    "H_SCSI_RESPONSE": (H_SCSI_RESPONSE, SCSI_RESPONSE),
    "H_R2T": (H_R2T, R2T),
}
U32: Final = struct.Struct(">I")


class ProtocolError(Exception):
    """The initiator broke the protocol in a way that ends its connection (RFC 7143 section
    7.1.4: at error recovery level 0 the session is dropped)."""


class HeaderDigestError(ProtocolError):
    """A header digest did not match: the header's lengths cannot be trusted, so the connection
    ends (RFC 7143 section 7.8)."""


def crc32c(*parts: bytes | bytearray | memoryview) -> int:
    crc = 0
    for p in parts:
        crc = google_crc32c.extend(crc, p if isinstance(p, bytes) else bytes(p))
    return crc


def digest_bytes(*parts: bytes | bytearray | memoryview) -> bytes:
    """The digest as it travels: CRC32C, least significant byte first (RFC 7143 section 13.1
    and the bit order iSCSI implementations agree on)."""
    return crc32c(*parts).to_bytes(4, "little")


def padded(n: int) -> int:
    return (n + 3) & ~3


# -- framing -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RawPdu:
    """One framed PDU: its 48-byte header, additional header segments, and its data segment
    (without padding). ``data_digest_ok`` is False when a negotiated data digest did not match:
    the receiver rejects the PDU (reason DIGEST_ERROR) and discards its data."""

    bhs: bytes
    ahs: bytes
    data: bytes
    data_digest_ok: bool = True

    @property
    def opcode(self) -> int:
        return self.bhs[0] & OPCODE_MASK

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & IMMEDIATE)

    @property
    def itt(self) -> int:
        return int.from_bytes(self.bhs[16:20], "big")


class _NeedData(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA: Final = _NeedData.NEED_DATA


class PduReader:
    """Cuts a byte stream into PDUs. ``max_data`` bounds one data segment: the
    MaxRecvDataSegmentLength this side declared (8192 during login, RFC 7143 section 13.12);
    a longer segment ends the connection before any of its bytes are held."""

    def __init__(self, max_data: int = 8192) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos > len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_pdu(self) -> RawPdu | Literal[_NeedData.NEED_DATA]:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        hd = DIGEST_LEN if self.header_digest else 0
        if avail < BHS_LEN + hd:
            return NEED_DATA
        op, _flags, word, _itt = H_COMMON.unpack_from(buf, pos)
        ahs_len = (word >> 24) * 4
        dsl = word & 0xFFFFFF
        if dsl > self.max_data:
            raise ProtocolError(
                f"data segment of {dsl} bytes exceeds MaxRecvDataSegmentLength {self.max_data} "
                f"(opcode {op & OPCODE_MASK:#04x})")
        head_end = pos + BHS_LEN + ahs_len
        dd = DIGEST_LEN if self.data_digest and dsl else 0
        total = BHS_LEN + ahs_len + hd + padded(dsl) + dd
        if avail < BHS_LEN + ahs_len + hd:
            return NEED_DATA
        if hd:
            got = bytes(buf[head_end : head_end + DIGEST_LEN])
            if got != digest_bytes(bytes(buf[pos:head_end])):
                raise HeaderDigestError(f"header digest mismatch (opcode {op & OPCODE_MASK:#04x})")
        if avail < total:
            return NEED_DATA
        bhs = bytes(buf[pos : pos + BHS_LEN])
        ahs = bytes(buf[pos + BHS_LEN : head_end])
        dstart = head_end + hd
        ok = True
        if dd:
            seg = bytes(buf[dstart : dstart + padded(dsl)])
            ok = bytes(buf[dstart + len(seg) : dstart + len(seg) + DIGEST_LEN]) == digest_bytes(seg)
            data = seg[:dsl] if len(seg) != dsl else seg
        else:
            data = bytes(buf[dstart : dstart + dsl])
        self._pos = pos + total
        return RawPdu(bhs, ahs, data if ok else b"", ok)


def frame(bhs: bytes, data: bytes | bytearray | memoryview = b"", *, header_digest: bool = False,
          data_digest: bool = False, ahs: bytes = b"") -> list[bytes | bytearray | memoryview]:
    """The buffers of one PDU, ready for one vectored send. ``bhs`` already carries the
    lengths (the encoders fill them in)."""
    head = bhs + ahs
    out: list[bytes | bytearray | memoryview] = [head + digest_bytes(head) if header_digest else head]
    if data:
        out.append(data)
        pad = bytes(padded(len(data)) - len(data))
        tail = pad + (digest_bytes(data, pad) if data_digest else b"")
        if tail:
            out.append(tail)
    return out


def lengths_word(ahs: int, dsl: int) -> int:
    if dsl > MAX_DATA_SEGMENT:
        raise ValueError(f"data segment of {dsl} bytes does not fit DataSegmentLength")
    return ((ahs // 4) << 24) | dsl


# -- initiator PDUs, decoded -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NopOut:
    immediate: bool
    lun: int
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ScsiCommand:
    immediate: bool
    final: bool
    read: bool
    write: bool
    attr: int
    lun: int
    itt: int
    edtl: int  # expected data transfer length
    cmdsn: int
    expstatsn: int
    cdb: bytes  # 16 bytes, plus an extended CDB AHS when one came
    data: bytes  # immediate data


@dataclass(frozen=True, slots=True)
class TaskMgmtRequest:
    immediate: bool
    function: int
    lun: int
    itt: int
    ref_itt: int
    cmdsn: int
    expstatsn: int
    ref_cmdsn: int
    expdatasn: int


@dataclass(frozen=True, slots=True)
class LoginRequest:
    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: bytes
    tsih: int
    itt: int
    cid: int
    cmdsn: int
    expstatsn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TextRequest:
    immediate: bool
    final: bool
    cont: bool
    lun: int
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DataOut:
    final: bool
    lun: int
    itt: int
    ttt: int
    expstatsn: int
    datasn: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    immediate: bool
    reason: int
    itt: int
    cid: int
    cmdsn: int
    expstatsn: int


@dataclass(frozen=True, slots=True)
class SnackRequest:
    type: int
    lun: int
    itt: int
    ttt: int
    expstatsn: int
    begrun: int
    runlength: int


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A PDU whose opcode a target does not accept: the target rejects it (COMMAND_NOT_SUPPORTED
    for unknown opcodes, PROTOCOL_ERROR for target opcodes)."""

    opcode: int
    bhs: bytes
    reason: RejectReason


InitiatorPdu = (NopOut | ScsiCommand | TaskMgmtRequest | LoginRequest | TextRequest | DataOut | LogoutRequest
                | SnackRequest | Unsupported)

_OPCODES: Final = frozenset(int(o) for o in Op)
AHS_EXTENDED_CDB: Final = 1
AHS_BIDI_READ_LENGTH: Final = 2


def _extended_cdb(ahs: bytes) -> bytes:
    """The extra CDB bytes an Extended CDB AHS carries (RFC 7143 section 11.3.1.2); other AHS
    types are ignored, as a target that does no bidirectional commands may."""
    pos, extra = 0, b""
    while pos + 4 <= len(ahs):
        length, typ = struct.unpack_from(">HB", ahs, pos)
        body = ahs[pos + 4 : pos + 3 + length]  # the length counts the reserved byte
        if pos + 3 + length > len(ahs) or length == 0:
            raise ProtocolError(f"AHS of {length} bytes does not fit the header")
        if typ == AHS_EXTENDED_CDB:
            extra = bytes(body)
        pos += padded(3 + length)
    return extra


def decode(raw: RawPdu) -> InitiatorPdu:
    """The typed form of a PDU an initiator sent. Raises ProtocolError for a header no target
    can act on (a length field that contradicts the opcode)."""
    bhs, op = raw.bhs, raw.opcode
    if op == Op.SCSI_COMMAND:
        o, flags, _w, lun, itt, edtl, cmdsn, expstatsn, cdb = H_SCSI_COMMAND.unpack(bhs)
        if raw.ahs:
            cdb += _extended_cdb(raw.ahs)
        return ScsiCommand(bool(o & IMMEDIATE), bool(flags & F_BIT), bool(flags & CMD_READ),
                           bool(flags & CMD_WRITE), flags & CMD_ATTR_MASK, lun, itt, edtl, cmdsn, expstatsn,
                           cdb, raw.data)
    if op == Op.DATA_OUT:
        _o, flags, _w, lun, itt, ttt, expstatsn, datasn, offset = H_DATA_OUT.unpack(bhs)
        return DataOut(bool(flags & F_BIT), lun, itt, ttt, expstatsn, datasn, offset, raw.data)
    if op not in INITIATOR_OPS:
        reason = RejectReason.PROTOCOL_ERROR if op in _OPCODES else RejectReason.COMMAND_NOT_SUPPORTED
        return Unsupported(op, bhs, reason)
    c = DECLARATIONS[Op(op)].parse(bhs)
    imm = bool(c.op & IMMEDIATE)
    if op == Op.NOP_OUT:
        return NopOut(imm, c.lun, c.itt, c.ttt, c.cmdsn, c.expstatsn, raw.data)
    if op == Op.LOGIN_REQUEST:
        return LoginRequest(bool(c.flags & TRANSIT), bool(c.flags & CONTINUE), (c.flags >> 2) & 3, c.flags & 3,
                            c.version_max, c.version_min, bytes(c.isid), c.tsih, c.itt, c.cid, c.cmdsn,
                            c.expstatsn, raw.data)
    if op == Op.TEXT_REQUEST:
        return TextRequest(imm, bool(c.flags & F_BIT), bool(c.flags & CONTINUE), c.lun, c.itt, c.ttt, c.cmdsn,
                           c.expstatsn, raw.data)
    if raw.data and op in (Op.TASK_MGMT_REQUEST, Op.LOGOUT_REQUEST, Op.SNACK_REQUEST):
        raise ProtocolError(f"opcode {op:#04x} carries no data segment, got {len(raw.data)} bytes")
    if op == Op.TASK_MGMT_REQUEST:
        return TaskMgmtRequest(imm, c.flags & 0x7F, c.lun, c.itt, c.ref_itt, c.cmdsn, c.expstatsn, c.ref_cmdsn,
                               c.expdatasn)
    if op == Op.LOGOUT_REQUEST:
        return LogoutRequest(imm, c.flags & 0x7F, c.itt, c.cid, c.cmdsn, c.expstatsn)
    return SnackRequest(c.flags & 0x0F, c.lun, c.itt, c.ttt, c.expstatsn, c.begrun, c.runlength)


# -- target PDUs, encoded ----------------------------------------------------------------------
def _build(decl: Any, **fields: int | bytes) -> bytes:
    return cast(bytes, decl.build(fields))


def data_in(*, itt: int, lun: int, datasn: int, offset: int, dsl: int, expcmdsn: int, maxcmdsn: int,
            final: bool = False, status: int | None = None, statsn: int = 0, residual_flags: int = 0,
            residual: int = 0, ttt: int = RESERVED_TAG) -> bytes:
    """A Data-In header for ``dsl`` bytes at ``offset``; with ``status`` it also ends the
    command (phase collapse: the F and S bits, StatSN, residuals)."""
    flags = (F_BIT if final or status is not None else 0)
    if status is not None:
        flags |= DATA_STATUS | residual_flags
    return H_DATA_IN.pack(Op.DATA_IN, flags, status or 0, lengths_word(0, dsl), lun, itt, ttt,
                          statsn if status is not None else 0, expcmdsn, maxcmdsn, datasn, offset,
                          residual if status is not None else 0)


def scsi_response(*, itt: int, status: int, statsn: int, expcmdsn: int, maxcmdsn: int, dsl: int = 0,
                  response: int = RESPONSE_COMPLETED, residual_flags: int = 0, residual: int = 0,
                  expdatasn: int = 0) -> bytes:
    return H_SCSI_RESPONSE.pack(Op.SCSI_RESPONSE, F_BIT | residual_flags, response, status,
                                lengths_word(0, dsl), itt, 0, statsn, expcmdsn, maxcmdsn, expdatasn, 0, residual)


def sense_segment(sense: bytes) -> bytes:
    """The data segment of a SCSI Response carrying sense data (RFC 7143 section 11.4.7)."""
    return len(sense).to_bytes(2, "big") + sense


def r2t(*, itt: int, lun: int, ttt: int, statsn: int, expcmdsn: int, maxcmdsn: int, r2tsn: int, offset: int,
        length: int) -> bytes:
    return H_R2T.pack(Op.R2T, F_BIT, 0, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset, length)


def login_response(*, transit: bool, cont: bool, csg: int, nsg: int, isid: bytes, tsih: int, itt: int,
                   statsn: int, expcmdsn: int, maxcmdsn: int, status: int = LOGIN_SUCCESS, dsl: int = 0) -> bytes:
    flags = (TRANSIT if transit else 0) | (CONTINUE if cont else 0) | (csg << 2) | (nsg if transit else 0)
    return _build(LOGIN_RESPONSE, op=Op.LOGIN_RESPONSE, flags=flags, version_max=VERSION, version_active=VERSION,
                  ahs_words=0, dsl=dsl, isid=isid, tsih=tsih, itt=itt, statsn=statsn, expcmdsn=expcmdsn,
                  maxcmdsn=maxcmdsn, status_class=status >> 8, status_detail=status & 0xFF)


def text_response(*, final: bool, cont: bool, lun: int, itt: int, ttt: int, statsn: int, expcmdsn: int,
                  maxcmdsn: int, dsl: int) -> bytes:
    flags = (F_BIT if final else 0) | (CONTINUE if cont else 0)
    return _build(TEXT_RESPONSE, op=Op.TEXT_RESPONSE, flags=flags, ahs_words=0, dsl=dsl, lun=lun, itt=itt,
                  ttt=ttt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn)


def nop_in(*, itt: int, ttt: int, lun: int, statsn: int, expcmdsn: int, maxcmdsn: int, dsl: int = 0) -> bytes:
    return _build(NOP_IN, op=Op.NOP_IN, flags=F_BIT, ahs_words=0, dsl=dsl, lun=lun, itt=itt, ttt=ttt,
                  statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn)


def task_mgmt_response(*, itt: int, response: int, statsn: int, expcmdsn: int, maxcmdsn: int) -> bytes:
    return _build(TASK_MGMT_RESPONSE, op=Op.TASK_MGMT_RESPONSE, flags=F_BIT, response=response, ahs_words=0,
                  dsl=0, itt=itt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn)


def logout_response(*, itt: int, response: int, statsn: int, expcmdsn: int, maxcmdsn: int, time2wait: int = 0,
                    time2retain: int = 0) -> bytes:
    return _build(LOGOUT_RESPONSE, op=Op.LOGOUT_RESPONSE, flags=F_BIT, response=response, ahs_words=0, dsl=0,
                  itt=itt, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, time2wait=time2wait,
                  time2retain=time2retain)


def async_message(*, event: int, lun: int, statsn: int, expcmdsn: int, maxcmdsn: int, dsl: int = 0,
                  vcode: int = 0, parameter1: int = 0, parameter2: int = 0, parameter3: int = 0) -> bytes:
    return _build(ASYNC_MESSAGE, op=Op.ASYNC_MESSAGE, flags=F_BIT, ahs_words=0, dsl=dsl, lun=lun,
                  itt=RESERVED_TAG, statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, event=event,
                  vcode=vcode, parameter1=parameter1, parameter2=parameter2, parameter3=parameter3)


def reject(*, reason: int, statsn: int, expcmdsn: int, maxcmdsn: int, datasn: int = 0) -> bytes:
    """A Reject header; its data segment is the rejected PDU's 48-byte header."""
    return _build(REJECT, op=Op.REJECT, flags=F_BIT, reason=reason, ahs_words=0, dsl=BHS_LEN, itt=RESERVED_TAG,
                  statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, datasn=datasn)


# -- LUN encoding (SAM-5 section 4.7: flat and peripheral addressing of LUNs below 16384) -----
def lun_field(lun: int) -> int:
    """The 8-byte LUN field for a LUN number: peripheral addressing below 256, flat above."""
    if lun < 256:
        return lun << 48
    if lun < 16384:
        return (0x4000 | lun) << 48
    raise ValueError(f"LUN {lun} is beyond flat addressing")


def lun_number(field: int) -> int | None:
    """The LUN number a LUN field addresses, or None for an addressing method syncd does not
    serve (which the target answers as a LUN that does not exist)."""
    first = field >> 48
    if field & 0xFFFF_FFFF_FFFF:
        return None
    method = first >> 14
    if method == 0 and first >> 8 == 0:
        return first & 0xFF
    if method == 1:
        return first & 0x3FFF
    return None
