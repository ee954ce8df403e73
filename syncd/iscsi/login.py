"""The target's side of an iSCSI login (RFC 7143 sections 6.3 and 11.12-11.13), sans-IO.

``Login.receive`` takes each Login Request and returns the Login Response to send, with the
stage the connection is then in. The stages are security negotiation (CHAP when the target
or discovery requires it), operational negotiation, and the full feature phase; a refusal is a
Login Response with a status class other than 0, after which the connection closes. The rules
of which stage may follow which are one table (``_NEXT``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from syncd.iscsi import pdu
from syncd.iscsi.pdu import (
    LOGIN_AUTH_FAILURE,
    LOGIN_AUTHORIZATION_FAILURE,
    LOGIN_MISSING_PARAMETER,
    LOGIN_NOT_FOUND,
    LOGIN_SESSION_DOES_NOT_EXIST,
    LOGIN_SESSION_TYPE_NOT_SUPPORTED,
    LOGIN_SUCCESS,
    LOGIN_UNSUPPORTED_VERSION,
    STAGE_FULL_FEATURE,
    STAGE_OPERATIONAL,
    STAGE_SECURITY,
    VERSION,
    LoginRequest,
)
from syncd.iscsi.text import ChapSecret, ChapTarget, Negotiation, Pairs, Params, TargetLimits, TextError
from syncd.iscsi.text import encode as encode_text
from syncd.iscsi.text import parse as parse_text

MAX_LOGIN_PDUS: Final = 64  # a login that needs more is an initiator going round in circles
CMD_WINDOW: Final = 64  # MaxCmdSN - ExpCmdSN + 1 offered to each session
MAX_LOGIN_RESPONSE: Final = 8192  # what an initiator accepts before it declares otherwise


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


@dataclass(frozen=True, slots=True)
class Target:
    """One iSCSI target a portal offers: its IQN, alias and who may log in to it."""

    name: str
    alias: str = ""
    chap: dict[str, ChapSecret] | None = None  # CHAP_N -> secret; None: no CHAP required
    mutual: ChapSecret | None = None  # the target's name and secret for mutual CHAP


@dataclass(frozen=True, slots=True)
class Portal:
    """What the login layer needs to know of its portal and of the array behind it."""

    targets: dict[str, Target]
    portal_group_tag: int
    # (initiator IQN, target IQN) -> may this initiator use this target (LUN masking by host)
    authorize: Callable[[str, str], bool]
    discovery_chap: dict[str, ChapSecret] | None = None
    discovery_mutual: ChapSecret | None = None
    limits: TargetLimits = field(default_factory=TargetLimits)


@dataclass(frozen=True, slots=True)
class Step:
    """What to send after one Login Request, and whether the login ended."""

    response: list[bytes | bytearray | memoryview]  # buffers of one Login Response
    status: int
    stage: int  # the stage the connection is now in (STAGE_FULL_FEATURE when done)

    @property
    def failed(self) -> bool:
        return self.status != LOGIN_SUCCESS

    @property
    def complete(self) -> bool:
        return self.status == LOGIN_SUCCESS and self.stage == STAGE_FULL_FEATURE


@dataclass(frozen=True, slots=True)
class Session:
    """The outcome of a successful login."""

    session_type: SessionType
    initiator_name: str
    initiator_alias: str
    target: Target | None  # None for discovery sessions
    isid: bytes
    tsih: int
    cid: int
    params: Params
    statsn: int  # the StatSN of the next response on this connection
    expcmdsn: int
    chap_user: str | None


# (current stage, next stage the initiator asks for) -> allowed. Stage 2 is reserved.
_NEXT: Final = {
    (STAGE_SECURITY, STAGE_OPERATIONAL), (STAGE_SECURITY, STAGE_FULL_FEATURE),
    (STAGE_OPERATIONAL, STAGE_FULL_FEATURE),
}


class Login:
    """One connection's login. ``tsih`` is the session handle a successful login returns."""

    def __init__(self, portal: Portal, tsih: int, statsn: int = 0) -> None:
        self.portal = portal
        self.tsih = tsih
        self.statsn = statsn
        self.stage = STAGE_SECURITY
        self.pdus = 0
        self.first: LoginRequest | None = None
        self.pending = b""  # text of requests sent with the C bit, not yet complete
        self.initiator_name = ""
        self.initiator_alias = ""
        self.session_type = SessionType.NORMAL
        self.target: Target | None = None
        self.chap: ChapTarget | None = None
        self.authenticated = False
        self.negotiation: Negotiation | None = None
        self.expcmdsn = 0
        self.session: Session | None = None
        self.error = ""  # why the login failed, for the log

    # -- helpers -------------------------------------------------------------------------------
    def _respond(self, req: LoginRequest, pairs: Pairs, *, transit: bool, nsg: int,
                 status: int = LOGIN_SUCCESS) -> Step:
        data = encode_text(pairs)
        if len(data) > MAX_LOGIN_RESPONSE:
            raise TextError("login response exceeds 8192 bytes", pdu.LOGIN_TARGET_ERROR)
        done = status == LOGIN_SUCCESS and transit and nsg == STAGE_FULL_FEATURE
        header = pdu.login_response(
            transit=transit, cont=False, csg=req.csg, nsg=nsg, isid=req.isid,
            tsih=self.tsih if done else (req.tsih if status == LOGIN_SUCCESS else 0), itt=req.itt,
            statsn=self.statsn, expcmdsn=self.expcmdsn, maxcmdsn=self.expcmdsn + CMD_WINDOW - 1,
            status=status, dsl=len(data))
        if status == LOGIN_SUCCESS:
            self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        if transit and status == LOGIN_SUCCESS:
            self.stage = nsg
        return Step(pdu.frame(header, data), status, self.stage)

    def _fail(self, req: LoginRequest, status: int) -> Step:
        return self._respond(req, [], transit=False, nsg=0, status=status)

    # -- the one entry point -------------------------------------------------------------------
    def receive(self, req: LoginRequest) -> Step:
        try:
            return self._receive(req)
        except TextError as e:
            self.error = str(e)
            return self._fail(req, e.status)

    def _receive(self, req: LoginRequest) -> Step:
        self.pdus += 1
        if self.stage == STAGE_FULL_FEATURE or self.pdus > MAX_LOGIN_PDUS:
            raise TextError("too many login requests" if self.stage != STAGE_FULL_FEATURE
                            else "login request after the login completed")
        if self.first is None:
            self.first = req
            self.expcmdsn = req.cmdsn
            if not req.version_min <= VERSION <= req.version_max:
                raise TextError(f"versions {req.version_min}-{req.version_max} do not include 0",
                                LOGIN_UNSUPPORTED_VERSION)
            if req.tsih != 0:
                # syncd runs one connection per session (MaxConnections=1): no session to join.
                raise TextError(f"TSIH {req.tsih} names no session of this target", LOGIN_SESSION_DOES_NOT_EXIST)
        elif (req.isid, req.itt, req.cid) != (self.first.isid, self.first.itt, self.first.cid):
            raise TextError("ISID, ITT or CID changed during the login")
        if req.csg != self.stage:
            # An initiator may skip security when the target requires none (checked below).
            if not (self.stage == STAGE_SECURITY and req.csg == STAGE_OPERATIONAL and self.pdus == 1):
                raise TextError(f"login request in stage {req.csg} while the login is in stage {self.stage}")
            self.stage = STAGE_OPERATIONAL
        if req.transit and (req.csg, req.nsg) not in _NEXT:
            raise TextError(f"transit from stage {req.csg} to stage {req.nsg} is not allowed")
        if req.transit and req.cont:
            raise TextError("the T and C bits are both set")
        self.pending += req.data
        if len(self.pending) > 64 << 10:
            raise TextError("login text exceeds 64 KiB")
        if req.cont:  # more text follows: acknowledge with an empty response
            return self._respond(req, [], transit=False, nsg=0)
        pairs = parse_text(self.pending)
        self.pending = b""
        keys = dict(pairs)
        if len(keys) != len(pairs):
            raise TextError("a key appears twice in one login request")
        out: Pairs = []
        if self.pdus == 1 or self.initiator_name == "":
            out += self._identify(keys)
        if self.stage == STAGE_SECURITY:
            out += self._security(keys)
            ready = self.authenticated
        else:
            if self.chap is not None and not self.authenticated:
                raise TextError("authentication did not finish", LOGIN_AUTH_FAILURE)
            if self._requires_chap() and not self.authenticated:
                raise TextError("this target requires CHAP: security negotiation was skipped",
                                LOGIN_AUTH_FAILURE)
            out += self._operational(pairs)
            ready = True
        if req.transit and ready:
            nsg = req.nsg
            if nsg == STAGE_FULL_FEATURE:
                self._complete(req)
            return self._respond(req, out, transit=True, nsg=nsg)
        return self._respond(req, out, transit=False, nsg=0)

    def _identify(self, keys: dict[str, str]) -> Pairs:
        name = keys.get("InitiatorName")
        if not name:
            raise TextError("the first login request must carry InitiatorName", LOGIN_MISSING_PARAMETER)
        self.initiator_name = name
        self.initiator_alias = keys.get("InitiatorAlias", "")
        stype = keys.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            raise TextError(f"SessionType={stype[:40]}", LOGIN_SESSION_TYPE_NOT_SUPPORTED)
        self.session_type = SessionType(stype)
        out: Pairs = []
        if self.session_type is SessionType.NORMAL:
            tname = keys.get("TargetName")
            if not tname:
                raise TextError("a normal session's first login request must carry TargetName",
                                LOGIN_MISSING_PARAMETER)
            target = self.portal.targets.get(tname)
            if target is None:
                raise TextError(f"no target {tname[:223]!r} at this portal", LOGIN_NOT_FOUND)
            if not self.portal.authorize(name, tname):
                raise TextError(f"initiator {name[:223]!r} may not use {tname[:223]!r}", LOGIN_AUTHORIZATION_FAILURE)
            self.target = target
            if target.alias:
                out.append(("TargetAlias", target.alias))
            out.append(("TargetPortalGroupTag", str(self.portal.portal_group_tag)))
        elif "TargetName" in keys:
            raise TextError("a discovery session carries no TargetName")
        self.negotiation = Negotiation(self.portal.limits, discovery=self.session_type is SessionType.DISCOVERY)
        return out

    def _requires_chap(self) -> bool:
        if self.session_type is SessionType.DISCOVERY:
            return self.portal.discovery_chap is not None
        return self.target is not None and self.target.chap is not None

    def _security(self, keys: dict[str, str]) -> Pairs:
        if self.authenticated:
            return []
        if self.chap is None:
            methods = keys.get("AuthMethod")
            if methods is None:
                if self._requires_chap():
                    raise TextError("AuthMethod missing; this target requires CHAP", LOGIN_AUTH_FAILURE)
                self.authenticated = True
                return []
            offered = methods.split(",")
            if self._requires_chap():
                if "CHAP" not in offered:
                    raise TextError(f"AuthMethod={methods[:40]} lacks CHAP, which this target requires",
                                    LOGIN_AUTH_FAILURE)
                if self.session_type is SessionType.DISCOVERY:
                    self.chap = ChapTarget(self.portal.discovery_chap or {}, self.portal.discovery_mutual)
                else:
                    assert self.target is not None
                    self.chap = ChapTarget(self.target.chap or {}, self.target.mutual)
                out: Pairs = [("AuthMethod", "CHAP")]
                if "CHAP_A" in keys:
                    out += self.chap.step([("CHAP_A", keys["CHAP_A"])])
                return out
            if "None" not in offered:
                raise TextError(f"AuthMethod={methods[:40]}: this target authenticates no one (None)",
                                LOGIN_AUTH_FAILURE)
            self.authenticated = True
            return [("AuthMethod", "None")]
        chap_keys = [(k, v) for k, v in keys.items() if k.startswith("CHAP_")]
        out = self.chap.step(chap_keys)
        if self.chap.state == "done":
            self.authenticated = True
        return out

    def _operational(self, pairs: Pairs) -> Pairs:
        assert self.negotiation is not None
        out = self.negotiation.offer(pairs)
        return out + self.negotiation.declarations()

    def _complete(self, req: LoginRequest) -> None:
        assert self.negotiation is not None
        # Straight from security to full feature, every operational key keeps its default
        # (the target's MaxRecvDataSegmentLength too: 8192).
        params = self.negotiation.result()
        self.session = Session(
            self.session_type, self.initiator_name, self.initiator_alias, self.target, req.isid, self.tsih,
            req.cid, params, (self.statsn + 1) & 0xFFFFFFFF, self.expcmdsn,
            self.chap.user if self.chap is not None else None)
