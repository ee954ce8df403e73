"""The SCSI block command set of syncd's iSCSI target (SPC-4, SBC-3/4), sans-IO.

``Unit.command(cdb, ...)`` decodes one CDB and returns either its answer (the data-in of
INQUIRY, READ CAPACITY, MODE SENSE and the like, computed from the logical unit's facts) or an
``Io`` for the layer that reads and writes the replicated volume. Every refusal is a
``Check`` with sense data per SPC-4 section 4.5 (fixed format), and changes nothing.

ALUA as SPC-4 section 5.15 states it: the target port group's access state gates which commands
run, and a change of state is reported once to each I_T nexus as a unit attention.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

# -- status, sense keys, additional sense codes ------------------------------------------------
GOOD: Final = 0x00
CHECK_CONDITION: Final = 0x02
CONDITION_MET: Final = 0x04
BUSY: Final = 0x08
RESERVATION_CONFLICT: Final = 0x18
TASK_SET_FULL: Final = 0x28

NO_SENSE: Final = 0x0
NOT_READY: Final = 0x2
MEDIUM_ERROR: Final = 0x3
HARDWARE_ERROR: Final = 0x4
ILLEGAL_REQUEST: Final = 0x5
UNIT_ATTENTION: Final = 0x6
DATA_PROTECT: Final = 0x7
ABORTED_COMMAND: Final = 0xB
MISCOMPARE: Final = 0xE


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int
    information: int | None = None  # the INFORMATION field (VALID bit set when given)
    field_pointer: int | None = None  # SENSE KEY SPECIFIC: the CDB byte in error (ILLEGAL REQUEST)
    bit_pointer: int | None = None

    def fixed(self) -> bytes:
        """Fixed-format sense data (response code 0x70), 18 bytes."""
        b = bytearray(18)
        b[0] = 0x70 | (0x80 if self.information is not None else 0)
        b[2] = self.key
        if self.information is not None:
            b[3:7] = (self.information & 0xFFFFFFFF).to_bytes(4, "big")
        b[7] = 10
        b[12], b[13] = self.asc, self.ascq
        if self.field_pointer is not None:
            # SKSV, C/D = 1 (the error is in the CDB), BPV with the bit pointer
            b[15] = 0x80 | 0x40 | ((0x08 | self.bit_pointer) if self.bit_pointer is not None else 0)
            b[16:18] = self.field_pointer.to_bytes(2, "big")
        return bytes(b)


def _s(key: int, asc: int, ascq: int) -> Sense:
    return Sense(key, asc, ascq)


INVALID_OPCODE: Final = _s(ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE: Final = _s(ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB: Final = _s(ILLEGAL_REQUEST, 0x24, 0x00)
LU_NOT_SUPPORTED: Final = _s(ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT: Final = _s(ILLEGAL_REQUEST, 0x0E, 0x03)
INVALID_FIELD_IN_PARAMETER_LIST: Final = _s(ILLEGAL_REQUEST, 0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Final = _s(ILLEGAL_REQUEST, 0x1A, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED: Final = _s(ILLEGAL_REQUEST, 0x39, 0x00)
WRITE_PROTECTED: Final = _s(DATA_PROTECT, 0x27, 0x00)
POWER_ON_RESET: Final = _s(UNIT_ATTENTION, 0x29, 0x00)
LU_RESET_OCCURRED: Final = _s(UNIT_ATTENTION, 0x29, 0x03)  # BUS DEVICE RESET FUNCTION OCCURRED
ALUA_STATE_CHANGED: Final = _s(UNIT_ATTENTION, 0x2A, 0x06)
REPORTED_LUNS_CHANGED: Final = _s(UNIT_ATTENTION, 0x3F, 0x0E)
CAPACITY_CHANGED: Final = _s(UNIT_ATTENTION, 0x2A, 0x09)
ALUA_TRANSITION: Final = _s(NOT_READY, 0x04, 0x0A)
ALUA_STANDBY_STATE: Final = _s(NOT_READY, 0x04, 0x0B)
ALUA_UNAVAILABLE_STATE: Final = _s(NOT_READY, 0x04, 0x0C)
MEDIUM_READ_ERROR: Final = _s(MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR: Final = _s(MEDIUM_ERROR, 0x0C, 0x00)
INTERNAL_TARGET_FAILURE: Final = _s(HARDWARE_ERROR, 0x44, 0x00)
SPACE_ALLOCATION_FAILED: Final = _s(DATA_PROTECT, 0x27, 0x07)
MISCOMPARE_DURING_VERIFY: Final = _s(MISCOMPARE, 0x1D, 0x00)
COMMANDS_CLEARED_BY_ANOTHER: Final = _s(UNIT_ATTENTION, 0x2F, 0x00)


def invalid_field(byte: int, bit: int | None = None) -> Sense:
    return Sense(ILLEGAL_REQUEST, 0x24, 0x00, field_pointer=byte, bit_pointer=bit)


# -- ALUA --------------------------------------------------------------------------------------
class Alua(enum.IntEnum):
    """Target port group asymmetric access states (SPC-4 table 162): the same numbers as the
    syncd:alua NBD context carries."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    TRANSITIONING = 0xF


@dataclass(frozen=True, slots=True)
class PortGroup:
    """One target port group as REPORT TARGET PORT GROUPS shows it: one per array, each with
    one target port (its relative target port identifier)."""

    tpg_id: int
    state: Alua
    relative_port: int
    preferred: bool = False


# Commands each non-active state still runs (SPC-4 section 5.15.2.4 to 5.15.2.6).
# Standby: INQUIRY, REQUEST SENSE, REPORT LUNS, MODE SENSE/SELECT, LOG SENSE/SELECT, diagnostics,
# persistent reservations and MAINTENANCE IN/OUT (target port groups, supported opcodes).
_STANDBY_OK: Final = frozenset({0x12, 0x03, 0xA0, 0x1A, 0x5A, 0x15, 0x55, 0x4C, 0x4D, 0x1C, 0x1D, 0x5E, 0x5F,
                                0xA3, 0xA4})
_UNAVAILABLE_OK: Final = frozenset({0x12, 0xA0, 0x03, 0xA3, 0xA4})
_TRANSITIONING_OK: Final = _UNAVAILABLE_OK
# Commands a pending unit attention does not stop (SAM-5 section 5.14 and SPC-4 table 63).
_UA_EXEMPT: Final = frozenset({0x12, 0xA0, 0x03})


# -- what a command becomes --------------------------------------------------------------------
class IoKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    VERIFY = "verify"  # compare data-out with the medium (BYTCHK)
    SYNC = "sync"
    UNMAP = "unmap"
    WRITE_SAME = "write_same"
    COMPARE_AND_WRITE = "compare_and_write"
    LBA_STATUS = "lba_status"  # GET LBA STATUS: which blocks are mapped (the volume's holes)


@dataclass(frozen=True, slots=True)
class Io:
    """A command that reads or writes the volume. Offsets and lengths are in bytes. ``data_out``
    is how many bytes the initiator must send (the command's data-out buffer)."""

    kind: IoKind
    offset: int
    length: int
    fua: bool = False
    data_out: int = 0
    unmap: bool = False  # WRITE SAME with UNMAP: deallocate when the block is zeros
    ndob: bool = False  # WRITE SAME(16) with no data-out buffer: zeros
    ranges: tuple[tuple[int, int], ...] = ()  # UNMAP: (offset, length) each, filled from the parameter list
    allocation: int = 0  # GET LBA STATUS: the allocation length


@dataclass(frozen=True, slots=True)
class Done:
    """A command answered from facts: GOOD with ``data`` as data-in (already cut to the
    allocation length)."""

    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Check:
    sense: Sense
    status: int = CHECK_CONDITION


@dataclass(frozen=True, slots=True)
class NeedData:
    """A command whose parameter list (UNMAP, MODE SELECT, PERSISTENT RESERVE OUT) must arrive
    before it can be decoded further: call ``Unit.parameters`` with it."""

    length: int


Outcome = Io | Done | Check | NeedData


# -- the logical unit --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LuFacts:
    """What INQUIRY, READ CAPACITY and the VPD pages say of a volume. ``wwn`` is the NAA
    identifier both arrays present (``naa.6...``, 16 bytes)."""

    size: int
    wwn: str
    block_size: int = 512
    physical_exponent: int = 3  # 4 KiB physical blocks
    read_only: bool = False
    thin: bool = True
    vendor: str = "SYNCD"
    product: str = "syncd volume"
    revision: str = "0001"
    max_transfer: int = 32 << 20  # as NBD's largest request
    optimal_transfer: int = 1 << 20
    max_unmap: int = 512 << 20  # 1 Mi blocks of 512 bytes per UNMAP command
    max_unmap_descriptors: int = 256
    max_write_same: int = 1 << 30
    max_compare_and_write_blocks: int = 255
    reservations: bool = False  # PERSISTENT RESERVE IN/OUT are served (listed by REPORT SUPPORTED OPCODES)

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    @property
    def naa(self) -> bytes:
        digits = self.wwn.removeprefix("naa.")
        return bytes.fromhex(digits.ljust(32, "0")[:32])


@dataclass
class Nexus:
    """What the unit keeps per I_T nexus (one initiator session): pending unit attentions."""

    attentions: list[Sense] = field(default_factory=lambda: [POWER_ON_RESET])

    def raise_attention(self, sense: Sense) -> None:
        if sense not in self.attentions:
            self.attentions.append(sense)


U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# (opcode, service action or None) -> (CDB length, CDB usage data): the bits this target reads
# of each CDB byte, for REPORT SUPPORTED OPERATION CODES (SPC-4 section 6.35).
_USAGE: Final[dict[tuple[int, int | None], bytes]] = {
    (0x00, None): bytes([0x00, 0, 0, 0, 0, 0x07]),  # TEST UNIT READY
    (0x03, None): bytes([0x03, 0x01, 0, 0, 0xFF, 0x07]),  # REQUEST SENSE
    (0x08, None): bytes([0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),  # READ(6)
    (0x0A, None): bytes([0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),  # WRITE(6)
    (0x12, None): bytes([0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07]),  # INQUIRY
    (0x1A, None): bytes([0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07]),  # MODE SENSE(6)
    (0x25, None): bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),  # READ CAPACITY(10)
    (0x28, None): bytes([0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x07]),  # READ(10)
    (0x2A, None): bytes([0x2A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x07]),  # WRITE(10)
    (0x2E, None): bytes([0x2E, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x07]),  # WRITE AND VERIFY(10)
    (0x2F, None): bytes([0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x07]),  # VERIFY(10)
    (0x35, None): bytes([0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x07]),  # SYNCHRONIZE CACHE(10)
    (0x41, None): bytes([0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x07]),  # WRITE SAME(10)
    (0x42, None): bytes([0x42, 0x00, 0, 0, 0, 0, 0x00, 0xFF, 0xFF, 0x07]),  # UNMAP
    (0x5A, None): bytes([0x5A, 0x08, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07]),  # MODE SENSE(10)
    (0x88, None): bytes([0x88, 0x18, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # READ(16)
    (0x89, None): bytes([0x89, 0x08, *[0xFF] * 8, 0, 0, 0, 0xFF, 0x00, 0x07]),  # COMPARE AND WRITE
    (0x8A, None): bytes([0x8A, 0x18, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # WRITE(16)
    (0x8E, None): bytes([0x8E, 0x16, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # WRITE AND VERIFY(16)
    (0x8F, None): bytes([0x8F, 0x16, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # VERIFY(16)
    (0x91, None): bytes([0x91, 0x02, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # SYNCHRONIZE CACHE(16)
    (0x93, None): bytes([0x93, 0x09, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # WRITE SAME(16)
    (0x9E, 0x10): bytes([0x9E, 0x10, *[0] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # READ CAPACITY(16)
    (0x9E, 0x12): bytes([0x9E, 0x12, *[0xFF] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x07]),  # GET LBA STATUS
    (0xA0, None): bytes([0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),  # REPORT LUNS
    (0xA8, None): bytes([0xA8, 0x18, *[0xFF] * 8, 0x00, 0x07]),  # READ(12)
    (0xAA, None): bytes([0xAA, 0x18, *[0xFF] * 8, 0x00, 0x07]),  # WRITE(12)
    (0xAE, None): bytes([0xAE, 0x16, *[0xFF] * 8, 0x00, 0x07]),  # WRITE AND VERIFY(12)
    (0xAF, None): bytes([0xAF, 0x16, *[0xFF] * 8, 0x00, 0x07]),  # VERIFY(12)
    (0xA3, 0x0A): bytes([0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),  # REPORT TARGET PORT GROUPS
    (0xA3, 0x0C): bytes([0xA3, 0x8C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),  # REPORT OPCODES
}


_PR_USAGE: Final[dict[tuple[int, int | None], bytes]] = {
    **{(0x5E, sa): bytes([0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]) for sa in range(4)},
    **{(0x5F, sa): bytes([0x5F, sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07]) for sa in range(7)},
}


def _cut(data: bytes, allocation: int) -> Done:
    return Done(data[:allocation])


def _ascii(s: str, n: int) -> bytes:
    return s.encode("ascii", "replace")[:n].ljust(n, b" ")


class Unit:
    """One logical unit as one array's target port presents it. ``alua()`` returns the port
    groups (this array's first) as the array sees them now, for the asking initiator;
    ``luns()`` the LUN numbers that initiator sees (for REPORT LUNS)."""

    def __init__(self, facts: LuFacts, alua: Callable[[], list[PortGroup]], luns: Callable[[], list[int]]) -> None:
        self.facts = facts
        self.alua = alua
        self.luns = luns

    # -- the one entry point -------------------------------------------------------------------
    def command(self, cdb: bytes, nexus: Nexus) -> Outcome:
        if not cdb:
            return Check(INVALID_OPCODE)
        op = cdb[0]
        length = _cdb_length(op)
        if length is None:
            return Check(INVALID_OPCODE)
        if len(cdb) < length:
            return Check(invalid_field(0))
        if cdb[length - 1] & 0x04:  # CONTROL byte NACA: no ACA support
            return Check(invalid_field(length - 1, 2))
        if nexus.attentions and op not in _UA_EXEMPT:
            return Check(nexus.attentions.pop(0))
        groups = self.alua()
        gated = self._gate(op, groups[0].state if groups else Alua.ACTIVE_OPTIMIZED)
        if gated is not None:
            return gated
        handler = _HANDLERS.get(op)
        if handler is None:
            return Check(INVALID_OPCODE)
        return handler(self, cdb, nexus)

    @staticmethod
    def _gate(op: int, state: Alua) -> Check | None:
        if state in (Alua.ACTIVE_OPTIMIZED, Alua.ACTIVE_NON_OPTIMIZED):
            return None
        if state is Alua.STANDBY:
            return None if op in _STANDBY_OK else Check(ALUA_STANDBY_STATE)
        if state is Alua.UNAVAILABLE:
            return None if op in _UNAVAILABLE_OK else Check(ALUA_UNAVAILABLE_STATE)
        return None if op in _TRANSITIONING_OK else Check(ALUA_TRANSITION)

    # -- informational commands ----------------------------------------------------------------
    def test_unit_ready(self, cdb: bytes, nexus: Nexus) -> Outcome:
        return Done()

    def request_sense(self, cdb: bytes, nexus: Nexus) -> Outcome:
        if cdb[1] & 0x01:  # DESC: descriptor format is not supported
            return Check(invalid_field(1, 0))
        sense = nexus.attentions.pop(0) if nexus.attentions else Sense(NO_SENSE, 0, 0)
        return _cut(sense.fixed(), cdb[4])

    def inquiry(self, cdb: bytes, nexus: Nexus) -> Outcome:
        allocation = U16.unpack_from(cdb, 3)[0]
        evpd, page = cdb[1] & 0x01, cdb[2]
        if cdb[1] & 0xFE:
            return Check(invalid_field(1))
        if not evpd:
            if page:
                return Check(invalid_field(2))
            return _cut(self._standard_inquiry(), allocation)
        build = _VPD.get(page)
        if build is None:
            return Check(invalid_field(2))
        body = build(self)
        return _cut(bytes([0x00, page]) + U16.pack(len(body)) + body, allocation)

    def _standard_inquiry(self) -> bytes:
        f = self.facts
        b = bytearray(36)
        b[0] = 0x00  # connected, direct access block device
        b[2] = 0x06  # SPC-4
        b[3] = 0x12  # HISUP, response data format 2
        b[5] = 0x10  # TPGS = 01b: implicit ALUA only
        b[6] = 0x10  # MULTIP: the LU is reached through both arrays' ports
        b[7] = 0x02  # CMDQUE
        b[8:16] = _ascii(f.vendor, 8)
        b[16:32] = _ascii(f.product, 16)
        b[32:36] = _ascii(f.revision, 4)
        b[4] = 96 - 5  # additional length
        # Bytes 36-57 vendor specific and reserved; 58-73 version descriptors: SAM-5, iSCSI,
        # SPC-4, SBC-3; 74-95 reserved.
        versions = b"".join(U16.pack(v) for v in (0x00A0, 0x0960, 0x0460, 0x04C0)).ljust(16, b"\0")
        return bytes(b) + bytes(22) + versions + bytes(22)

    def _vpd_supported(self) -> bytes:
        return bytes(sorted(_VPD))

    def _vpd_serial(self) -> bytes:
        return self.facts.naa.hex().encode()

    def _vpd_identification(self) -> bytes:
        groups = self.alua()
        naa = bytes([0x01, 0x03, 0x00, 16]) + self.facts.naa  # binary, LU, NAA
        out = naa
        if groups:
            ours = groups[0]
            # iSCSI (protocol 5), binary, PIV, target port association
            out += bytes([0x51, 0x94, 0x00, 4]) + U16.pack(0) + U16.pack(ours.relative_port)
            out += bytes([0x51, 0x95, 0x00, 4]) + U16.pack(0) + U16.pack(ours.tpg_id)
        return out

    def _vpd_block_limits(self) -> bytes:
        f = self.facts
        bs = f.block_size
        b = bytearray(0x3C)
        b[0] = 0x01  # WSNZ: WRITE SAME of zero blocks is refused
        b[1] = f.max_compare_and_write_blocks
        U16.pack_into(b, 2, (1 << f.physical_exponent))  # optimal transfer length granularity
        U32.pack_into(b, 4, f.max_transfer // bs)
        U32.pack_into(b, 8, f.optimal_transfer // bs)
        if f.thin and not f.read_only:
            U32.pack_into(b, 16, f.max_unmap // bs)
            U32.pack_into(b, 20, f.max_unmap_descriptors)
            U32.pack_into(b, 24, 1 << f.physical_exponent)  # optimal unmap granularity
        U64.pack_into(b, 32, f.max_write_same // bs)
        return bytes(b)

    def _vpd_characteristics(self) -> bytes:
        b = bytearray(0x3C)
        U16.pack_into(b, 0, 1)  # non-rotating medium
        return bytes(b)

    def _vpd_provisioning(self) -> bytes:
        if not self.facts.thin:
            return bytes([0, 0, 0, 0])
        # LBPU, LBPWS, LBPWS10, LBPRZ=1 (deallocated blocks read zeros); provisioning type thin
        return bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])

    def read_capacity10(self, cdb: bytes, nexus: Nexus) -> Outcome:
        if cdb[8] & 0x01 or U32.unpack_from(cdb, 2)[0]:  # PMI and LBA are obsolete: must be zero
            return Check(invalid_field(8 if cdb[8] & 1 else 2))
        last = self.facts.blocks - 1
        return Done(U32.pack(min(last, 0xFFFFFFFF)) + U32.pack(self.facts.block_size))

    def service_action_in(self, cdb: bytes, nexus: Nexus) -> Outcome:
        sa = cdb[1] & 0x1F
        if sa == 0x12:
            return self._get_lba_status(cdb)
        if sa != 0x10:  # READ CAPACITY(16) and GET LBA STATUS are the service actions served
            return Check(invalid_field(1, 4))
        allocation = U32.unpack_from(cdb, 10)[0]
        f = self.facts
        b = bytearray(32)
        U64.pack_into(b, 0, f.blocks - 1)
        U32.pack_into(b, 8, f.block_size)
        b[13] = f.physical_exponent
        if f.thin:
            b[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return _cut(bytes(b), allocation)

    LBA_STATUS_SPAN = 1 << 30  # bytes one GET LBA STATUS looks at

    def _get_lba_status(self, cdb: bytes) -> Outcome:
        lba, allocation = U64.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 10)[0]
        if lba >= self.facts.blocks:
            return Check(LBA_OUT_OF_RANGE)
        if allocation < 24 and allocation != 0:
            return Done(bytes(allocation))  # too short for one descriptor: the header only
        if allocation == 0:
            return Done()
        bs = self.facts.block_size
        span = min(self.LBA_STATUS_SPAN, (self.facts.blocks - lba) * bs)
        return Io(IoKind.LBA_STATUS, lba * bs, span, allocation=allocation)

    def lba_status(self, offset: int, extents: list[tuple[int, int]], allocation: int) -> Done:
        """GET LBA STATUS's answer from the volume's (length, hole flag) extents starting at
        ``offset``: one descriptor per run, mapped (0) or deallocated (1)."""
        bs = self.facts.block_size
        body = b""
        lba = offset // bs
        for length, flags in extents:
            blocks = length // bs
            if not blocks:
                continue
            state = 1 if flags & 1 else 0
            body += U64.pack(lba) + U32.pack(blocks) + bytes([state, 0, 0, 0])
            lba += blocks
            if 8 + len(body) >= allocation:
                break
        return _cut(U32.pack(len(body) + 4) + bytes(4) + body, allocation)

    def report_luns(self, cdb: bytes, nexus: Nexus) -> Outcome:
        allocation = U32.unpack_from(cdb, 6)[0]
        if allocation < 16:
            return Check(invalid_field(6))
        select = cdb[2]
        if select not in (0x00, 0x01, 0x02):
            return Check(invalid_field(2))
        luns = [] if select == 0x01 else sorted(self.luns())  # 0x01: well-known LUs only (none)
        body = b"".join(_lun_bytes(n) for n in luns)
        return _cut(U32.pack(len(body)) + bytes(4) + body, allocation)

    def maintenance_in(self, cdb: bytes, nexus: Nexus) -> Outcome:
        sa = cdb[1] & 0x1F
        if sa == 0x0A:
            return self._report_tpgs(cdb)
        if sa == 0x0C:
            return self._report_opcodes(cdb)
        return Check(invalid_field(1, 4))

    def _report_tpgs(self, cdb: bytes) -> Outcome:
        allocation = U32.unpack_from(cdb, 6)[0]
        extended = (cdb[1] >> 5) == 0x01
        body = b""
        for g in self.alua():
            head = bytes([(0x80 if g.preferred else 0) | int(g.state),
                          0x80 | 0x08 | 0x04 | 0x02 | 0x01])  # T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP
            body += head + U16.pack(g.tpg_id) + bytes([0, 0x02, 0, 1]) + U16.pack(0) + U16.pack(g.relative_port)
        if extended:
            data = U32.pack(len(body) + 4) + bytes([0x10, 0, 0, 10]) + body  # implicit transition: 10 s
        else:
            data = U32.pack(len(body)) + body
        return _cut(data, allocation)

    def _report_opcodes(self, cdb: bytes) -> Outcome:
        options = cdb[2] & 0x07
        rctd = cdb[2] & 0x80
        opcode, sa = cdb[3], U16.unpack_from(cdb, 4)[0]
        allocation = U32.unpack_from(cdb, 6)[0]
        timeouts = bytes([0, 0x0A, 0, 0]) + U32.pack(0) + U32.pack(30) if rctd else b""
        usage_table = {**_USAGE, **(_PR_USAGE if self.facts.reservations else {})}
        if options == 0:
            body = b""
            for (op, action), cdb_usage in sorted(usage_table.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
                flags = (0x01 if action is not None else 0) | (0x02 if rctd else 0)
                body += (bytes([op, 0]) + U16.pack(action or 0) + bytes([0, flags]) + U16.pack(len(cdb_usage))
                         + timeouts)
            return _cut(U32.pack(len(body)) + body, allocation)
        if options in (1, 2):
            with_actions = any(o == opcode and s is not None for o, s in usage_table)
            if (options == 1 and with_actions) or (options == 2 and (opcode, None) in usage_table):
                # SPC-4 6.35.1: asked without a service action for a command that has them,
                # or with one for a command that has none
                return Check(invalid_field(2))
            usage = usage_table.get((opcode, None) if options == 1 else (opcode, sa))
            if usage is None:
                return _cut(bytes([0, 0x01, 0, 0]), allocation)  # not supported
            return _cut(bytes([0, 0x03 | (0x80 if rctd else 0)]) + U16.pack(len(usage)) + usage + timeouts,
                        allocation)
        return Check(invalid_field(2))

    def mode_sense(self, cdb: bytes, nexus: Nexus) -> Outcome:
        ten = cdb[0] == 0x5A
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        allocation = U16.unpack_from(cdb, 7)[0] if ten else cdb[4]
        if pc == 3:
            return Check(SAVING_PARAMETERS_NOT_SUPPORTED)
        if subpage not in (0x00, 0xFF):
            return Check(invalid_field(3))
        pages = self._mode_pages(pc == 1)
        if page == 0x3F:
            body = b"".join(pages.values())
        elif page in pages:
            body = pages[page]
        else:
            return Check(invalid_field(2, 5))
        f = self.facts
        descriptor = b""
        if not dbd:
            if llbaa:
                descriptor = U64.pack(f.blocks) + bytes(4) + U32.pack(f.block_size)
            else:
                descriptor = U32.pack(min(f.blocks, 0xFFFFFFFF)) + bytes([0]) + f.block_size.to_bytes(3, "big")
        device = (0x80 if f.read_only else 0) | 0x10  # WP, DPOFUA
        if ten:
            head = bytes([0, 0, device, 0x01 if llbaa and descriptor else 0, 0]) + U16.pack(len(descriptor))
            data = head + descriptor + body
            data = U16.pack(len(data) - 2) + data[2:]
        else:
            data = bytes([0, 0, device, len(descriptor)]) + descriptor + body
            data = bytes([len(data) - 1]) + data[1:]
        return _cut(data, allocation)

    def _mode_pages(self, changeable: bool) -> dict[int, bytes]:
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 0x12
        if not changeable:
            caching[2] = 0x04  # WCE: writes are in the arrays' page caches until a flush or FUA
        control = bytearray(12)
        control[0], control[1] = 0x0A, 0x0A
        if not changeable:
            control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            control[5] = 0x40  # TAS: aborted commands of other nexuses are reported
            U16.pack_into(control, 8, 0xFFFF)  # busy timeout period: unlimited
        exceptions = bytearray(12)
        exceptions[0], exceptions[1] = 0x1C, 0x0A
        return {0x08: bytes(caching), 0x0A: bytes(control), 0x1C: bytes(exceptions)}

    # -- commands that read or write the volume ------------------------------------------------
    def _rw(self, lba: int, blocks: int, length_byte: int, write: bool, flags: int = 0) -> Outcome:
        if flags & 0xE0:  # RDPROTECT/WRPROTECT: this LU has no protection information
            return Check(invalid_field(1, 7))
        if write and self.facts.read_only:
            return Check(WRITE_PROTECTED)
        if lba + blocks > self.facts.blocks:
            return Check(LBA_OUT_OF_RANGE)
        if blocks * self.facts.block_size > self.facts.max_transfer:
            return Check(invalid_field(length_byte))
        bs = self.facts.block_size
        if write:
            return Io(IoKind.WRITE, lba * bs, blocks * bs, fua=bool(flags & 0x08), data_out=blocks * bs)
        return Io(IoKind.READ, lba * bs, blocks * bs, fua=bool(flags & 0x08))

    def rw6(self, cdb: bytes, nexus: Nexus) -> Outcome:
        lba = ((cdb[1] & 0x1F) << 16) | U16.unpack_from(cdb, 2)[0]
        blocks = cdb[4] or 256  # READ(6)/WRITE(6): 0 means 256 blocks
        return self._rw(lba, blocks, 4, cdb[0] == 0x0A)

    def rw10(self, cdb: bytes, nexus: Nexus) -> Outcome:
        return self._rw(U32.unpack_from(cdb, 2)[0], U16.unpack_from(cdb, 7)[0], 7, cdb[0] == 0x2A, cdb[1])

    def rw16(self, cdb: bytes, nexus: Nexus) -> Outcome:
        return self._rw(U64.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 10)[0], 10, cdb[0] == 0x8A, cdb[1])

    def rw12(self, cdb: bytes, nexus: Nexus) -> Outcome:
        return self._rw(U32.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 6)[0], 6, cdb[0] == 0xAA, cdb[1])

    @staticmethod
    def _lba_blocks(cdb: bytes) -> tuple[int, int]:
        """LBA and transfer length of a 10-, 12- or 16-byte block CDB."""
        if cdb[0] >> 5 == 1:
            return U32.unpack_from(cdb, 2)[0], U16.unpack_from(cdb, 7)[0]
        if cdb[0] >> 5 == 5:
            return U32.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 6)[0]
        return U64.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 10)[0]

    def write_and_verify(self, cdb: bytes, nexus: Nexus) -> Outcome:
        """WRITE AND VERIFY: a write made durable on both replicas before GOOD (the verify
        half is the medium's own: what was written is what a read returns)."""
        lba, blocks = self._lba_blocks(cdb)
        if (cdb[1] >> 1) & 0x03 not in (0, 1):  # BYTCHK 0 or 1 only
            return Check(invalid_field(1, 2))
        out = self._rw(lba, blocks, 7 if cdb[0] == 0x2E else 10 if cdb[0] == 0x8E else 6, True, cdb[1] & 0xE0)
        return replace(out, fua=True) if isinstance(out, Io) else out

    def verify(self, cdb: bytes, nexus: Nexus) -> Outcome:
        lba, blocks = self._lba_blocks(cdb)
        if cdb[1] & 0xE0:
            return Check(invalid_field(1, 7))
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk not in (0, 1):
            return Check(invalid_field(1, 2))
        if lba + blocks > self.facts.blocks:
            return Check(LBA_OUT_OF_RANGE)
        if not bytchk or not blocks:
            return Done()  # the medium is readable: nothing to compare
        bs = self.facts.block_size
        return Io(IoKind.VERIFY, lba * bs, blocks * bs, data_out=blocks * bs)

    def sync_cache(self, cdb: bytes, nexus: Nexus) -> Outcome:
        if cdb[0] == 0x35:
            lba, blocks = U32.unpack_from(cdb, 2)[0], U16.unpack_from(cdb, 7)[0]
        else:
            lba, blocks = U64.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 10)[0]
        if lba + blocks > self.facts.blocks:
            return Check(LBA_OUT_OF_RANGE)
        # Both arrays sync the whole volume: a range is no cheaper to make durable.
        return Io(IoKind.SYNC, lba * self.facts.block_size, blocks * self.facts.block_size)

    def write_same(self, cdb: bytes, nexus: Nexus) -> Outcome:
        sixteen = cdb[0] == 0x93
        lba = U64.unpack_from(cdb, 2)[0] if sixteen else U32.unpack_from(cdb, 2)[0]
        blocks = U32.unpack_from(cdb, 10)[0] if sixteen else U16.unpack_from(cdb, 7)[0]
        unmap, anchor, ndob = bool(cdb[1] & 0x08), bool(cdb[1] & 0x10), sixteen and bool(cdb[1] & 0x01)
        if cdb[1] & 0xE0:
            return Check(invalid_field(1, 7))
        if anchor:
            return Check(invalid_field(1, 4))
        if self.facts.read_only:
            return Check(WRITE_PROTECTED)
        if blocks == 0:  # WSNZ=1 in the block limits page
            return Check(invalid_field(10 if sixteen else 7))
        if unmap and not self.facts.thin:
            return Check(invalid_field(1, 3))
        bs = self.facts.block_size
        if lba + blocks > self.facts.blocks:
            return Check(LBA_OUT_OF_RANGE)
        if blocks * bs > self.facts.max_write_same:
            return Check(invalid_field(10 if sixteen else 7))
        return Io(IoKind.WRITE_SAME, lba * bs, blocks * bs, data_out=0 if ndob else bs, unmap=unmap, ndob=ndob)

    def unmap(self, cdb: bytes, nexus: Nexus) -> Outcome:
        if cdb[1] & 0x01:  # ANCHOR
            return Check(invalid_field(1, 0))
        if self.facts.read_only:
            return Check(WRITE_PROTECTED)
        if not self.facts.thin:
            return Check(INVALID_OPCODE)
        length = U16.unpack_from(cdb, 7)[0]
        if length == 0:
            return Done()
        if length < 8:
            return Check(PARAMETER_LIST_LENGTH_ERROR)
        return NeedData(length)

    def unmap_parameters(self, data: bytes) -> Outcome:
        """UNMAP's parameter list (SBC-3 section 5.28.2): the ranges to deallocate."""
        if len(data) < 8:
            return Check(PARAMETER_LIST_LENGTH_ERROR)
        data_len, desc_len = U16.unpack_from(data, 0)[0], U16.unpack_from(data, 2)[0]
        if data_len + 2 > len(data) or desc_len + 8 > len(data) or desc_len % 16:
            return Check(PARAMETER_LIST_LENGTH_ERROR)
        if desc_len // 16 > self.facts.max_unmap_descriptors:
            return Check(INVALID_FIELD_IN_PARAMETER_LIST)
        bs = self.facts.block_size
        ranges = []
        total = 0
        for i in range(desc_len // 16):
            lba, blocks = U64.unpack_from(data, 8 + 16 * i)[0], U32.unpack_from(data, 16 + 16 * i)[0]
            if lba + blocks > self.facts.blocks:
                return Check(LBA_OUT_OF_RANGE)
            total += blocks * bs
            if blocks:
                ranges.append((lba * bs, blocks * bs))
        if total > self.facts.max_unmap:
            return Check(INVALID_FIELD_IN_PARAMETER_LIST)
        return Io(IoKind.UNMAP, 0, 0, ranges=tuple(ranges))

    def compare_and_write(self, cdb: bytes, nexus: Nexus) -> Outcome:
        lba, blocks = U64.unpack_from(cdb, 2)[0], cdb[13]
        if cdb[1] & 0xE0:
            return Check(invalid_field(1, 7))
        if self.facts.read_only:
            return Check(WRITE_PROTECTED)
        if blocks > self.facts.max_compare_and_write_blocks:
            return Check(invalid_field(13))
        if lba + blocks > self.facts.blocks:
            return Check(LBA_OUT_OF_RANGE)
        bs = self.facts.block_size
        return Io(IoKind.COMPARE_AND_WRITE, lba * bs, blocks * bs, fua=bool(cdb[1] & 0x08), data_out=2 * blocks * bs)


def miscompare(offset_in_buffer: int) -> Check:
    """COMPARE AND WRITE or VERIFY found a difference at this byte of the compared data."""
    return Check(Sense(MISCOMPARE, 0x1D, 0x00, information=offset_in_buffer))


def _lun_bytes(n: int) -> bytes:
    first = n if n < 256 else 0x4000 | n
    return U16.pack(first) + bytes(6)


def _cdb_length(op: int) -> int | None:
    group = op >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group)


_VPD: Final[dict[int, Callable[[Unit], bytes]]] = {
    0x00: Unit._vpd_supported,
    0x80: Unit._vpd_serial,
    0x83: Unit._vpd_identification,
    0xB0: Unit._vpd_block_limits,
    0xB1: Unit._vpd_characteristics,
    0xB2: Unit._vpd_provisioning,
}

_HANDLERS: Final[dict[int, Callable[[Unit, bytes, Nexus], Outcome]]] = {
    0x00: Unit.test_unit_ready,
    0x03: Unit.request_sense,
    0x08: Unit.rw6,
    0x0A: Unit.rw6,
    0x12: Unit.inquiry,
    0x1A: Unit.mode_sense,
    0x25: Unit.read_capacity10,
    0x28: Unit.rw10,
    0x2A: Unit.rw10,
    0x2E: Unit.write_and_verify,
    0x2F: Unit.verify,
    0x35: Unit.sync_cache,
    0x41: Unit.write_same,
    0x42: Unit.unmap,
    0x5A: Unit.mode_sense,
    0x88: Unit.rw16,
    0x89: Unit.compare_and_write,
    0x8A: Unit.rw16,
    0x8E: Unit.write_and_verify,
    0x8F: Unit.verify,
    0x91: Unit.sync_cache,
    0x93: Unit.write_same,
    0x9E: Unit.service_action_in,
    0xA0: Unit.report_luns,
    0xA3: Unit.maintenance_in,
    0xA8: Unit.rw12,
    0xAA: Unit.rw12,
    0xAE: Unit.write_and_verify,
    0xAF: Unit.verify,
}
