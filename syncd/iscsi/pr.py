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
    persist: bool = False  # kept through a power loss (APTPL accepted, PTPL_C reported)

    def get(self, lu: str) -> PrState:
        return self.states.get(lu, PrState())


# -- the state as JSON: persisted in a node's state file and sent to the other array ---------------

class BadState(ValueError):
    """A persisted or received reservation state that does not parse; names what is wrong."""


def nexus_to_json(n: Nexus) -> list[object]:
    return [n.initiator, n.isid.hex(), n.target_port]


def nexus_from_json(v: object, what: str = "nexus") -> Nexus:
    if not (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], str)
            and isinstance(v[2], int) and not isinstance(v[2], bool)):
        raise BadState(f"{what}: expected [initiator, isid hex, target port], got {v!r:.80}")
    try:
        isid = bytes.fromhex(v[1])
    except ValueError:
        raise BadState(f"{what}: ISID {v[1]!r:.40} is not hex") from None
    if not v[0] or len(v[0]) > 223 or len(isid) != 6 or not 0 <= v[2] <= 0xFFFF:
        raise BadState(f"{what}: {v!r:.80} is not an I_T nexus (name 1-223 bytes, 6-byte ISID, port 0-65535)")
    return Nexus(v[0], isid, v[2])


def state_to_json(st: PrState) -> dict[str, object]:
    return {"generation": st.generation, "keys": [[*nexus_to_json(n), k] for n, k in st.keys],
            "holder": None if st.holder is None else nexus_to_json(st.holder), "type": st.type, "aptpl": st.aptpl}


def state_from_json(d: object) -> PrState:
    """The inverse of ``state_to_json``; BadState names the first problem."""
    if not isinstance(d, dict):
        raise BadState(f"reservation state must be an object, got {type(d).__name__}")
    gen, keys, holder, rtype, aptpl = (d.get(k) for k in ("generation", "keys", "holder", "type", "aptpl"))
    if not isinstance(gen, int) or isinstance(gen, bool) or not 0 <= gen <= 0xFFFFFFFF:
        raise BadState(f"generation: {gen!r:.40} is not a 32-bit count")
    if not isinstance(keys, list) or len(keys) > 4096:
        raise BadState("keys: expected a list of at most 4096 registrations")
    regs: list[tuple[Nexus, int]] = []
    for i, e in enumerate(keys):
        if not isinstance(e, list) or len(e) != 4:
            raise BadState(f"keys[{i}]: expected [initiator, isid hex, target port, key]")
        k = e[3]
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k < 1 << 64:
            raise BadState(f"keys[{i}]: {k!r:.40} is not a non-zero 64-bit reservation key")
        n = nexus_from_json(e[:3], f"keys[{i}]")
        if any(x == n for x, _ in regs):
            raise BadState(f"keys[{i}]: {n.initiator} (ISID {n.isid.hex()}, port {n.target_port}) registered twice")
        regs.append((n, k))
    if not isinstance(rtype, int) or isinstance(rtype, bool) or (rtype != 0 and rtype not in TYPES):
        raise BadState(f"type: {rtype!r:.40} is not a reservation type")
    if not isinstance(aptpl, bool):
        raise BadState(f"aptpl: {aptpl!r:.40} is not true or false")
    who = None if holder is None else nexus_from_json(holder, "holder")
    if rtype and rtype not in ALL_REGISTRANTS and (who is None or all(x != who for x, _ in regs)):
        raise BadState("holder: a reservation of this type needs a registered holder")
    if (not rtype or rtype in ALL_REGISTRANTS) and who is not None:
        raise BadState("holder: given without a reservation that has one")
    return PrState(gen, tuple(regs), who, rtype, aptpl)


def sense_to_json(s: Sense) -> list[int | None]:
    return [s.key, s.asc, s.ascq, s.information, s.field_pointer, s.bit_pointer]


def sense_from_json(v: object) -> Sense:
    if not (isinstance(v, list) and len(v) == 6 and all(x is None or (isinstance(x, int) and not isinstance(x, bool))
                                                         for x in v)
            and all(isinstance(x, int) and 0 <= x <= 0xFF for x in v[:3])):
        raise BadState(f"sense: {v!r:.80} is not [key, asc, ascq, information, field, bit]")
    return Sense(v[0], v[1], v[2], v[3], v[4], v[5])


def attentions_to_json(att: tuple[tuple[Nexus, Sense], ...]) -> list[list[object]]:
    return [[nexus_to_json(n), sense_to_json(s)] for n, s in att]


def attentions_from_json(v: object) -> tuple[tuple[Nexus, Sense], ...]:
    if not isinstance(v, list) or len(v) > 4096:
        raise BadState("attentions: expected a list")
    out = []
    for i, e in enumerate(v):
        if not isinstance(e, list) or len(e) != 2:
            raise BadState(f"attentions[{i}]: expected [nexus, sense]")
        out.append((nexus_from_json(e[0], f"attentions[{i}]"), sense_from_json(e[1])))
    return tuple(out)
