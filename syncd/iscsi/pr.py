"""SCSI-3 persistent reservations of one logical unit (SPC-4 sections 5.13, 6.15, 6.16),
sans-IO: PERSISTENT RESERVE OUT changes the state, PERSISTENT RESERVE IN reports it, and
``conflicts`` says which commands a reservation holds back from which I_T nexus.

The state is a plain value (``PrState``) so that its owner can persist it and hand it to the
other array; every change returns the new state and the unit attentions it raises.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Final

from syncd.iscsi.scsi import (
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_PARAMETER_LIST,
    PARAMETER_LIST_LENGTH_ERROR,
    UNIT_ATTENTION,
    Sense,
    invalid_field,
)

# Service actions of PERSISTENT RESERVE OUT
REGISTER: Final = 0x00
RESERVE: Final = 0x01
RELEASE: Final = 0x02
CLEAR: Final = 0x03
PREEMPT: Final = 0x04
PREEMPT_AND_ABORT: Final = 0x05
REGISTER_AND_IGNORE: Final = 0x06
# ... of PERSISTENT RESERVE IN
READ_KEYS: Final = 0x00
READ_RESERVATION: Final = 0x01
REPORT_CAPABILITIES: Final = 0x02
READ_FULL_STATUS: Final = 0x03

# Reservation types
WRITE_EXCLUSIVE: Final = 1
EXCLUSIVE_ACCESS: Final = 3
WE_REGISTRANTS_ONLY: Final = 5
EA_REGISTRANTS_ONLY: Final = 6
WE_ALL_REGISTRANTS: Final = 7
EA_ALL_REGISTRANTS: Final = 8
TYPES: Final = frozenset({WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS, WE_REGISTRANTS_ONLY, EA_REGISTRANTS_ONLY,
                          WE_ALL_REGISTRANTS, EA_ALL_REGISTRANTS})
ALL_REGISTRANTS: Final = frozenset({WE_ALL_REGISTRANTS, EA_ALL_REGISTRANTS})
REGISTRANTS: Final = frozenset({WE_REGISTRANTS_ONLY, EA_REGISTRANTS_ONLY}) | ALL_REGISTRANTS
EXCLUSIVE: Final = frozenset({EXCLUSIVE_ACCESS, EA_REGISTRANTS_ONLY, EA_ALL_REGISTRANTS})

INVALID_RELEASE: Final = Sense(ILLEGAL_REQUEST, 0x26, 0x04)  # INVALID RELEASE OF PERSISTENT RESERVATION
RESERVATIONS_PREEMPTED: Final = Sense(UNIT_ATTENTION, 0x2A, 0x03)
RESERVATIONS_RELEASED: Final = Sense(UNIT_ATTENTION, 0x2A, 0x04)
REGISTRATIONS_PREEMPTED: Final = Sense(UNIT_ATTENTION, 0x2A, 0x05)

# Commands a reservation never holds back (SPC-4 table 61's "allowed" rows that matter here).
_ALWAYS: Final = frozenset({0x12, 0x03, 0xA0, 0x5E, 0x5F, 0x1A, 0x5A, 0xA3, 0x00, 0x25, 0x9E, 0x4D})
_READS: Final = frozenset({0x08, 0x28, 0xA8, 0x88, 0x2F, 0xAF, 0x8F, 0x34, 0x90})


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus: the initiator port (iSCSI name and ISID, as a TransportID names it) and
    the relative target port it came in through."""

    initiator: str
    isid: bytes
    target_port: int

    def transport_id(self) -> bytes:
        """iSCSI TransportID, format 01b: "NAME,i,0xISID", NUL-padded to a multiple of 4."""
        name = f"{self.initiator},i,0x{self.isid.hex()}".encode() + b"\0"
        name += bytes(-len(name) % 4)
        return bytes([0x40 | 0x05, 0]) + len(name).to_bytes(2, "big") + name


@dataclass(frozen=True, slots=True)
class PrState:
    generation: int = 0
    keys: tuple[tuple[Nexus, int], ...] = ()  # registrations, in the order they were made
    holder: Nexus | None = None  # None with a reservation of an all-registrants type
    type: int = 0  # 0: no reservation
    aptpl: bool = False

    def key_of(self, n: Nexus) -> int | None:
        return next((k for x, k in self.keys if x == n), None)

    @property
    def reserved(self) -> bool:
        return self.type != 0

    def holds(self, n: Nexus) -> bool:
        """Whether ``n`` is a reservation holder (every registrant, for all-registrants types)."""
        if not self.reserved:
            return False
        if self.type in ALL_REGISTRANTS:
            return self.key_of(n) is not None
        return self.holder == n


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a PERSISTENT RESERVE OUT did: the new state (equal to the old one on a refusal),
    a refusal (sense, or RESERVATION CONFLICT when ``conflict``), and unit attentions for
    other nexuses."""

    state: PrState
    sense: Sense | None = None
    conflict: bool = False
    attentions: tuple[tuple[Nexus, Sense], ...] = ()


PARAM = struct.Struct(">QQIBxH")  # reservation key, service action key, obsolete, flags, obsolete


def conflicts(st: PrState, n: Nexus, opcode: int) -> bool:
    """Whether a command with ``opcode`` from ``n`` gets RESERVATION CONFLICT."""
    if not st.reserved or opcode in _ALWAYS or st.holds(n):
        return False
    registered = st.key_of(n) is not None
    if st.type in REGISTRANTS and registered:
        return False
    if opcode in _READS:
        return st.type in EXCLUSIVE
    return True


def reserve_out(st: PrState, n: Nexus, cdb: bytes, params: bytes, ports: frozenset[int],
                persist: bool = False) -> Outcome:
    """PERSISTENT RESERVE OUT. ``ports``: the relative target ports of the LU (for ALL_TG_PT);
    ``persist``: the owner keeps the state through a power loss (APTPL allowed)."""
    sa, scope_type = cdb[1] & 0x1F, cdb[2]
    if len(params) != 24:
        return Outcome(st, PARAMETER_LIST_LENGTH_ERROR)
    key, sa_key, _, flags, _ = PARAM.unpack(params)
    spec_i_pt, all_tg_pt, aptpl = bool(flags & 0x08), bool(flags & 0x04), bool(flags & 0x01)
    if spec_i_pt or (aptpl and not persist):
        # SPEC_I_PT is not supported; APTPL only where the state survives a power loss.
        return Outcome(st, INVALID_FIELD_IN_PARAMETER_LIST)
    mine = st.key_of(n)
    if sa in (REGISTER, REGISTER_AND_IGNORE):
        if sa == REGISTER and key != (mine or 0):
            return Outcome(st, conflict=True)
        nexuses = [Nexus(n.initiator, n.isid, p) for p in sorted(ports)] if all_tg_pt else [n]
        if sa_key == 0:
            if mine is None:
                return Outcome(st)
            new = _unregister(st, nexuses)
            return Outcome(replace(new, generation=st.generation + 1))
        keys = [(x, k) for x, k in st.keys if x not in nexuses] + [(x, sa_key) for x in nexuses]
        # A registered nexus changing its key keeps its place; new ones come last.
        order = {x: i for i, (x, _) in enumerate(st.keys)}
        keys.sort(key=lambda xk: order.get(xk[0], len(order)))
        return Outcome(replace(st, keys=tuple(keys), generation=st.generation + 1, aptpl=aptpl))
    if mine is None or key != mine:
        return Outcome(st, conflict=True)
    rtype = scope_type & 0x0F
    if scope_type & 0xF0:  # only LU scope
        return Outcome(st, invalid_field(2, 7))
    if sa == RESERVE:
        if rtype not in TYPES:
            return Outcome(st, invalid_field(2, 3))
        if not st.reserved:
            return Outcome(replace(st, holder=None if rtype in ALL_REGISTRANTS else n, type=rtype))
        if st.holds(n) and st.type == rtype:
            return Outcome(st)
        return Outcome(st, conflict=True)
    if sa == RELEASE:
        if not st.reserved or not st.holds(n):
            return Outcome(st)
        if rtype != st.type:
            return Outcome(st, INVALID_RELEASE)
        new = replace(st, holder=None, type=0)
        # Registrants of a registrants-only or all-registrants reservation lose access they
        # had through it: they are told (SPC-4 5.13.10.2).
        notify = tuple((x, RESERVATIONS_RELEASED) for x, _ in st.keys if x != n) if st.type in REGISTRANTS else ()
        return Outcome(new, attentions=notify)
    if sa == CLEAR:
        notify = tuple((x, RESERVATIONS_PREEMPTED) for x, _ in st.keys if x != n)
        return Outcome(PrState(generation=st.generation + 1), attentions=notify)
    if sa in (PREEMPT, PREEMPT_AND_ABORT):
        return _preempt(st, n, sa_key, rtype)
    return Outcome(st, invalid_field(1, 4))


def _unregister(st: PrState, nexuses: list[Nexus]) -> PrState:
    keys = tuple((x, k) for x, k in st.keys if x not in nexuses)
    new = replace(st, keys=keys)
    if st.reserved and (st.holder in nexuses or (st.type in ALL_REGISTRANTS and not keys)):
        new = replace(new, holder=None, type=0)
    if not keys:
        new = replace(new, aptpl=False)
    return new


def _preempt(st: PrState, n: Nexus, sa_key: int, rtype: int) -> Outcome:
    if not st.reserved or (st.type in ALL_REGISTRANTS and sa_key != 0) or \
            (st.type not in ALL_REGISTRANTS and st.key_of(st.holder or n) != sa_key):
        # No reservation, or not the holder's key: only registrations go (SPC-4 5.13.11.2).
        if sa_key == 0:
            return Outcome(st, INVALID_FIELD_IN_PARAMETER_LIST)
        gone = [x for x, k in st.keys if k == sa_key]
        if not gone:
            return Outcome(st, conflict=True)
        new = _unregister(st, gone)
        return Outcome(replace(new, generation=st.generation + 1),
                       attentions=tuple((x, REGISTRATIONS_PREEMPTED) for x in gone if x != n))
    if rtype not in TYPES:
        return Outcome(st, invalid_field(2, 3))
    if st.type in ALL_REGISTRANTS:  # sa_key 0: every other registration goes
        gone = [x for x, _ in st.keys if x != n]
    else:
        gone = [x for x, k in st.keys if k == sa_key and x != n]
    keys = tuple((x, k) for x, k in st.keys if x not in gone)
    new = PrState(st.generation + 1, keys, None if rtype in ALL_REGISTRANTS else n, rtype, st.aptpl)
    notify = tuple((x, REGISTRATIONS_PREEMPTED) for x in gone)
    return Outcome(new, attentions=notify)


def reserve_in(st: PrState, cdb: bytes, persist: bool = False) -> bytes | Sense:
    """PERSISTENT RESERVE IN's parameter data (the caller cuts it to the allocation length)."""
    sa = cdb[1] & 0x1F
    gen = struct.pack(">I", st.generation)
    if sa == READ_KEYS:
        body = b"".join(struct.pack(">Q", k) for _, k in st.keys)
        return gen + struct.pack(">I", len(body)) + body
    if sa == READ_RESERVATION:
        if not st.reserved:
            return gen + struct.pack(">I", 0)
        key = 0 if st.type in ALL_REGISTRANTS else (st.key_of(st.holder) if st.holder else 0) or 0
        body = struct.pack(">Q4xBBxx", key, 0, st.type)
        return gen + struct.pack(">I", len(body)) + body
    if sa == REPORT_CAPABILITIES:
        # ATP_C (ALL_TG_PT) and, where kept, PTPL_C; TMV with every type: WR_EX_AR, EX_AC_RO,
        # WR_EX_RO, EX_AC, WR_EX in the first byte, EX_AC_AR in the second.
        return struct.pack(">HBBH2x", 8, 0x04 | (0x01 if persist else 0), 0x80 | (0x01 if st.aptpl else 0), 0xEA01)
    if sa == READ_FULL_STATUS:
        out = b""
        for x, k in st.keys:
            tid = x.transport_id()
            holder = st.holds(x)
            out += struct.pack(">Q4xBB4xHI", k, 0x01 if holder else 0, st.type if holder else 0, x.target_port,
                               len(tid)) + tid
        return gen + struct.pack(">I", len(out)) + out
    return invalid_field(1, 4)


@dataclass
class Registry:
    """The persistent reservation state of each LU at one place (the unreplicated server keeps
    it in memory; a node must persist it and keep both arrays' copies equal)."""

    states: dict[str, PrState] = field(default_factory=dict)

    def get(self, lu: str) -> PrState:
        return self.states.get(lu, PrState())
