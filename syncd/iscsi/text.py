"""iSCSI text keys (RFC 7143 sections 6 and 13), sans-IO: the key=value codec, the target's
side of operational negotiation, and CHAP (RFC 7143 section 12.1.3, RFC 1994).

Every function here takes untrusted bytes or strings from an initiator; a refusal raises
``TextError`` (the caller answers with the login status or Reject it names) and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, cast

MAX_KEY: Final = 63  # RFC 7143 section 6.1
MAX_VALUE: Final = 8192  # the longest value syncd accepts (a CHAP challenge or response)
MAX_TEXT: Final = 64 << 10  # all text of one negotiation (several PDUs with the C bit)
KEY_RE: Final = re.compile(r"[A-Za-z0-9.\-+@_]{1,63}")

NOT_UNDERSTOOD: Final = "NotUnderstood"
IRRELEVANT: Final = "Irrelevant"
REJECT: Final = "Reject"
RESPONSES: Final = frozenset({NOT_UNDERSTOOD, IRRELEVANT, REJECT})


class TextError(Exception):
    """Text an initiator sent that breaks RFC 7143; ``status`` is the login status to answer
    with (initiator error unless said otherwise)."""

    def __init__(self, message: str, status: int = 0x0200) -> None:
        super().__init__(message)
        self.status = status


Pairs = list[tuple[str, str]]


def parse(data: bytes) -> Pairs:
    """Key=value pairs, each ended by a NUL (RFC 7143 section 6.1). Names are checked; a
    value stays a string (UTF-8)."""
    if len(data) > MAX_TEXT:
        raise TextError(f"text of {len(data)} bytes exceeds {MAX_TEXT}")
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise TextError("text does not end with a NUL")
    pairs: Pairs = []
    for item in data[:-1].split(b"\0"):
        key, sep, value = item.partition(b"=")
        if not sep:
            raise TextError(f"text item {item[:64]!r} has no '='")
        try:
            k, v = key.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextError(f"text item {item[:64]!r} is not UTF-8: {e.reason}") from None
        if not KEY_RE.fullmatch(k):
            raise TextError(f"key name {k[:64]!r} is empty, too long or has characters RFC 7143 forbids")
        if len(value) > MAX_VALUE:
            raise TextError(f"value of {k} is {len(value)} bytes, more than {MAX_VALUE}")
        pairs.append((k, v))
    return pairs


def encode(pairs: Pairs) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def decode_binary(value: str) -> bytes:
    """A binary value: 0x hexadecimal or 0b base64 (RFC 7143 section 6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            digits = value[2:]
            return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise TextError(f"{value[:40]!r} is not a binary value (0x hex or 0b base64)")


def encode_hex(data: bytes) -> str:
    return "0x" + data.hex()


def parse_number(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value, 16) if value[:2] in ("0x", "0X") else int(value, 10) if value.isdigit() else None
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise TextError(f"{key}={value[:40]} is not a number from {lo} to {hi}")
    return n


def parse_bool(key: str, value: str) -> bool:
    if value not in ("Yes", "No"):
        raise TextError(f"{key}={value[:40]} is neither Yes nor No")
    return value == "Yes"


# -- operational parameters --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Params:
    """The session and connection parameters in force (RFC 7143 section 13, defaults)."""

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    initiator_max_recv: int = 8192  # MaxRecvDataSegmentLength the initiator declared: what we may send
    target_max_recv: int = 8192  # what we declared: what the initiator may send us
    max_burst: int = 262144
    first_burst: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0


@dataclass(frozen=True, slots=True)
class TargetLimits:
    """What this target offers; negotiation settles on these or on the initiator's, by each
    key's rule."""

    max_recv: int = 262144
    max_burst: int = 1 << 20
    first_burst: int = 65536
    max_connections: int = 1
    max_outstanding_r2t: int = 1
    digests: tuple[str, ...] = ("CRC32C", "None")  # in the target's order of preference
    initial_r2t: bool = True  # unsolicited Data-Out is not taken: every burst beyond immediate data is asked for
    immediate_data: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 0  # no session reinstatement at error recovery level 0
    error_recovery_level: int = 0


_NUM = (512, (1 << 24) - 1)
# Keys a discovery session does not negotiate (RFC 7143 section 13: "Irrelevant when
# SessionType=Discovery").
_NORMAL_ONLY: Final = frozenset({"MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength",
                                 "FirstBurstLength", "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder",
                                 "DefaultTime2Wait", "DefaultTime2Retain"})
# Numeric keys: (lowest, highest, the rule that settles them, the Params and TargetLimits field).
_NUMERIC: Final[dict[str, tuple[int, int, Callable[[int, int], int], str]]] = {
    "MaxBurstLength": (*_NUM, min, "max_burst"),
    "FirstBurstLength": (*_NUM, min, "first_burst"),
    "MaxConnections": (1, 65535, min, "max_connections"),
    "MaxOutstandingR2T": (1, 65535, min, "max_outstanding_r2t"),
    "DefaultTime2Wait": (0, 3600, max, "default_time2wait"),
    "DefaultTime2Retain": (0, 3600, min, "default_time2retain"),
    "ErrorRecoveryLevel": (0, 2, min, "error_recovery_level"),
}
# Boolean keys: InitialR2T is an OR (either side may insist on R2T for the first burst),
# ImmediateData an AND.
_BOOLEAN: Final[dict[str, tuple[Callable[[bool, bool], bool], str]]] = {
    "InitialR2T": (lambda a, b: a or b, "initial_r2t"),
    "ImmediateData": (lambda a, b: a and b, "immediate_data"),
}
# Keys the login layer handles, not operational negotiation.
LOGIN_KEYS: Final = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType", "AuthMethod",
                               "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "TargetAlias",
                               "TargetAddress", "TargetPortalGroupTag", "SendTargets"})


@dataclass
class Negotiation:
    """The target's side of one login's operational negotiation. ``offer`` answers the keys
    the initiator sent (one PDU's worth) and remembers them: RFC 7143 section 6.2 forbids a
    key twice in one negotiation. ``result()`` is what the session then runs with."""

    limits: TargetLimits
    discovery: bool = False
    params: Params = field(default_factory=Params)
    seen: set[str] = field(default_factory=set)
    declared_max_recv: bool = False

    def offer(self, pairs: Pairs) -> Pairs:
        out: Pairs = []
        lim, p = self.limits, self.params
        for key, value in pairs:
            if key in LOGIN_KEYS:
                continue
            if key in self.seen:
                raise TextError(f"key {key} was negotiated twice")
            self.seen.add(key)
            if value in RESPONSES:  # an answer to something we did not offer: nothing to do
                continue
            if self.discovery and key in _NORMAL_ONLY:
                out.append((key, IRRELEVANT))
                continue
            if key in ("HeaderDigest", "DataDigest"):
                choice = next((v for v in value.split(",") if v in lim.digests), None)
                if choice is None:
                    out.append((key, REJECT))
                    continue
                out.append((key, choice))
                p = (replace(p, header_digest=choice == "CRC32C") if key == "HeaderDigest"
                     else replace(p, data_digest=choice == "CRC32C"))
            elif key == "MaxRecvDataSegmentLength":
                p = replace(p, initiator_max_recv=parse_number(key, value, *_NUM))
            elif key in _NUMERIC:
                lo, hi, rule, name = _NUMERIC[key]
                n = rule(parse_number(key, value, lo, hi), getattr(lim, name))
                p = replace(p, **cast("dict[str, Any]", {name: n}))
                out.append((key, str(n)))
            elif key in _BOOLEAN:
                rule_b, name = _BOOLEAN[key]
                b = rule_b(parse_bool(key, value), getattr(lim, name))
                p = replace(p, **cast("dict[str, Any]", {name: b}))
                out.append((key, "Yes" if b else "No"))
            elif key in ("DataPDUInOrder", "DataSequenceInOrder"):
                # OR; syncd places data by buffer offset but answers Yes: out-of-order data would
                # only matter above error recovery level 0.
                parse_bool(key, value)
                out.append((key, "Yes"))
            elif key in ("IFMarker", "OFMarker"):  # obsolete (RFC 7143 section 13.25)
                out.append((key, "No"))
            elif key in ("IFMarkInt", "OFMarkInt"):
                out.append((key, REJECT))
            elif key == "iSCSIProtocolLevel":  # RFC 7144: numerical minimum; 1 is RFC 7143
                n = min(parse_number(key, value, 0, 31), 1)
                out.append((key, str(n)))
            elif key == "TaskReporting":  # RFC 7144: syncd reports tasks as RFC 3720 does
                out.append((key, "RFC3720"))
            else:
                out.append((key, NOT_UNDERSTOOD))
        self.params = p
        return out

    def declarations(self) -> Pairs:
        """What the target declares once per login (sent with its first operational answer)."""
        if self.declared_max_recv:
            return []
        self.declared_max_recv = True
        self.params = replace(self.params, target_max_recv=self.limits.max_recv)
        return [("MaxRecvDataSegmentLength", str(self.limits.max_recv))]

    def result(self) -> Params:
        p = self.params
        if not self.discovery and p.first_burst > p.max_burst:
            raise TextError(f"FirstBurstLength {p.first_burst} exceeds MaxBurstLength {p.max_burst}")
        return p


# -- CHAP --------------------------------------------------------------------------------------
CHAP_MD5: Final = 5
CHALLENGE_LEN: Final = 16
MIN_SECRET: Final = 12  # RFC 7143 section 12.1.3 (96 bits)
MAX_CHALLENGE: Final = 1024
AUTH_FAILURE: Final = 0x0201


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5(identifier || secret || challenge)."""
    return hashlib.md5(bytes([identifier]) + secret + challenge, usedforsecurity=True).digest()


@dataclass(frozen=True, slots=True)
class ChapSecret:
    user: str
    secret: bytes


@dataclass
class ChapTarget:
    """The target's side of CHAP, one exchange. ``initiators`` maps CHAP_N names to secrets;
    ``mutual`` is the target's own name and secret, answered when the initiator challenges."""

    initiators: dict[str, ChapSecret]
    mutual: ChapSecret | None = None
    identifier: int = field(default_factory=lambda: secrets.randbelow(256))
    challenge: bytes = field(default_factory=lambda: secrets.token_bytes(CHALLENGE_LEN))
    state: str = "algorithm"  # algorithm -> response -> done
    user: str | None = None

    def step(self, pairs: Pairs) -> Pairs:
        keys = dict(pairs)
        if self.state == "algorithm":
            algorithms = keys.get("CHAP_A")
            if algorithms is None:
                raise TextError("CHAP_A missing after AuthMethod=CHAP", AUTH_FAILURE)
            if str(CHAP_MD5) not in algorithms.split(","):
                raise TextError(f"CHAP_A={algorithms[:40]} offers no algorithm syncd knows (MD5 is 5)",
                                AUTH_FAILURE)
            self.state = "response"
            return [("CHAP_A", str(CHAP_MD5)), ("CHAP_I", str(self.identifier)),
                    ("CHAP_C", encode_hex(self.challenge))]
        if self.state != "response":
            raise TextError("CHAP keys after CHAP finished", AUTH_FAILURE)
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise TextError("CHAP_N and CHAP_R are both required", AUTH_FAILURE)
        cred = self.initiators.get(name)
        got = decode_binary(response)
        expected = chap_response(self.identifier, cred.secret if cred else b"", self.challenge)
        # Compare in constant time, and the same way for unknown names.
        if not hmac.compare_digest(got, expected) or cred is None:
            raise TextError(f"CHAP response of {name[:64]!r} does not match", AUTH_FAILURE)
        self.user = name
        self.state = "done"
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            if self.mutual is not None:
                raise TextError("this target requires mutual CHAP: CHAP_I and CHAP_C missing", AUTH_FAILURE)
            return []
        if self.mutual is None:
            raise TextError("mutual CHAP asked for, but this target has no CHAP name and secret", AUTH_FAILURE)
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise TextError("mutual CHAP needs both CHAP_I and CHAP_C", AUTH_FAILURE)
        ident = parse_number("CHAP_I", keys["CHAP_I"], 0, 255)
        theirs = decode_binary(keys["CHAP_C"])
        if not 1 <= len(theirs) <= MAX_CHALLENGE:
            raise TextError(f"CHAP_C of {len(theirs)} bytes", AUTH_FAILURE)
        if theirs == self.challenge:  # a reflection: the initiator would have us answer our own
            raise TextError("the initiator's CHAP_C repeats the target's challenge", AUTH_FAILURE)
        return [("CHAP_N", self.mutual.user),
                ("CHAP_R", encode_hex(chap_response(ident, self.mutual.secret, theirs)))]
