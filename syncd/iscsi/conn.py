"""One iSCSI connection of the target, sans-IO: login, then the full feature phase's session
rules (command numbering, StatSN, text requests such as SendTargets, NOP keepalives, logout,
rejects). SCSI commands leave as ``Command`` events for the layer that runs them.

The connection is its session (MaxConnections=1, error recovery level 0): any protocol error
ends both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from syncd.iscsi import pdu
from syncd.iscsi.login import Login, Portal, Session, SessionType
from syncd.iscsi.pdu import RESERVED_TAG, InitiatorPdu, Op, ProtocolError, RejectReason
from syncd.iscsi.text import Pairs, TextError
from syncd.iscsi.text import encode as encode_text
from syncd.iscsi.text import parse as parse_text

Buffers = list[bytes | bytearray | memoryview]
MAX_TEXT_EXCHANGE: Final = 64 << 10
SERIAL_HALF: Final = 1 << 31


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982, 32 bits): a precedes b."""
    return a != b and ((b - a) & 0xFFFFFFFF) < SERIAL_HALF


def sn_in_window(sn: int, lo: int, hi: int) -> bool:
    """lo <= sn <= hi in serial arithmetic."""
    return not sn_lt(sn, lo) and not sn_lt(hi, sn)


@dataclass(frozen=True, slots=True)
class Send:
    buffers: Buffers


@dataclass(frozen=True, slots=True)
class Close:
    reason: str


@dataclass(frozen=True, slots=True)
class Command:
    """A SCSI command in CmdSN order, for the SCSI layer."""

    cmd: pdu.ScsiCommand


@dataclass(frozen=True, slots=True)
class WriteData:
    """All the data-out a command was asked for has arrived."""

    itt: int
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class TaskManagement:
    """A task management request, for the SCSI layer; answer with ``Connection.tmf_response``."""

    request: pdu.TaskMgmtRequest


@dataclass(frozen=True, slots=True)
class LoggedIn:
    session: Session


@dataclass(frozen=True, slots=True)
class Ping:
    """An initiator answered a NOP-In ping: it is alive."""

    ttt: int


Event = Send | Close | Command | WriteData | TaskManagement | LoggedIn | Ping


@dataclass
class _Transfer:
    """A command's data-out being gathered: immediate data, then one R2T at a time
    (MaxOutstandingR2T=1, data in order)."""

    itt: int
    lun: int
    buf: bytearray
    received: int = 0
    burst_end: int = 0  # where the outstanding R2T's burst ends
    ttt: int = RESERVED_TAG
    r2tsn: int = 0
    datasn: int = 0


@dataclass(frozen=True, slots=True)
class Address:
    """A portal address SendTargets reports: host (IPv6 without brackets), port, group tag."""

    host: str
    port: int
    tag: int

    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port},{self.tag}"


class Connection:
    """Bytes from the initiator in, events out. ``addresses`` lists the portals SendTargets
    reports for each target (both arrays' portals, so a host learns every path)."""

    def __init__(self, portal: Portal, tsih: int, addresses: Callable[[str], list[Address]],
                 window: int = 64, others: Callable[[], Pairs] | None = None) -> None:
        self.portal = portal
        self.addresses = addresses
        self.others = others  # SendTargets=All: targets of other arrays (the peer's), as pairs
        self.window = window
        self.reader = pdu.PduReader(8192)
        self.login: Login | None = Login(portal, tsih)
        self.session: Session | None = None
        self.statsn = 0
        self.expcmdsn = 0
        self.header_digest = False
        self.data_digest = False
        self._text_in = b""  # a text request continued with the C bit
        self._text_out: tuple[int, bytes] | None = None  # (TTT, what is left of a long text response)
        self._next_ttt = 1
        self._immediate: dict[int, bytes] = {}  # ITT -> immediate data of a command not yet asked for data
        self._transfers: dict[int, _Transfer] = {}  # TTT -> transfer
        self.closed = False

    # -- numbering -----------------------------------------------------------------------------
    @property
    def maxcmdsn(self) -> int:
        return (self.expcmdsn + self.window - 1) & 0xFFFFFFFF

    def _statsn(self) -> int:
        """The StatSN for a response that carries status, advancing it."""
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        return sn

    def _ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = (ttt + 1) & 0x7FFFFFFF or 1
        return ttt

    def _send(self, header: bytes, data: bytes | bytearray | memoryview = b"") -> Send:
        return Send(pdu.frame(header, data, header_digest=self.header_digest, data_digest=self.data_digest))

    @property
    def transfers(self) -> int:
        """Commands whose data-out is being gathered (bounded by the command window)."""
        return len(self._transfers) + len(self._immediate)

    def _command_number(self, immediate: bool, cmdsn: int, what: str) -> bool:
        """Checks a command's CmdSN: True to act on it. A command outside the window is
        dropped as RFC 7143 section 4.2.2.1 requires; out of order at one connection and error
        recovery level 0 is a protocol error."""
        if immediate:
            return cmdsn == self.expcmdsn or sn_in_window(cmdsn, self.expcmdsn, self.maxcmdsn)
        if not sn_in_window(cmdsn, self.expcmdsn, self.maxcmdsn):
            return False
        if cmdsn != self.expcmdsn:
            raise ProtocolError(f"{what} CmdSN {cmdsn} skips ahead of ExpCmdSN {self.expcmdsn}")
        self.expcmdsn = (cmdsn + 1) & 0xFFFFFFFF
        return True

    # -- bytes in ------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self.closed:
            return []
        self.reader.receive_data(data)
        out: list[Event] = []
        try:
            while not self.closed and (raw := self.reader.next_pdu()) is not pdu.NEED_DATA:
                out += self._pdu(raw)
        except ProtocolError as e:
            self.closed = True
            out.append(Close(str(e)))
        return out

    def _reject(self, reason: RejectReason, bhs: bytes) -> Send:
        return self._send(pdu.reject(reason=reason, statsn=self._statsn(), expcmdsn=self.expcmdsn,
                                     maxcmdsn=self.maxcmdsn), bhs)

    def _pdu(self, raw: pdu.RawPdu) -> list[Event]:
        if self.login is not None:
            return self._login(raw)
        if not raw.data_digest_ok:
            return [self._reject(RejectReason.DIGEST_ERROR, raw.bhs)]
        msg = pdu.decode(raw)
        if isinstance(msg, pdu.Unsupported):
            return [self._reject(msg.reason, msg.bhs)]
        return self._full_feature(msg, raw)

    def _login(self, raw: pdu.RawPdu) -> list[Event]:
        assert self.login is not None
        if raw.opcode != Op.LOGIN_REQUEST:
            raise ProtocolError(f"opcode {raw.opcode:#04x} before the login completed")
        req = pdu.decode(raw)
        assert isinstance(req, pdu.LoginRequest)
        step = self.login.receive(req)
        out: list[Event] = [Send(step.response)]
        if step.failed:
            self.closed = True
            out.append(Close(f"login failed ({step.status:#06x}): {self.login.error}"))
            return out
        if step.complete:
            session = self.login.session
            assert session is not None
            self.session = session
            self.login = None
            self.statsn = session.statsn
            self.expcmdsn = session.expcmdsn
            # Digests and the declared segment size apply from the first PDU after the login.
            self.header_digest = self.reader.header_digest = session.params.header_digest
            self.data_digest = self.reader.data_digest = session.params.data_digest
            self.reader.max_data = session.params.target_max_recv
            out.append(LoggedIn(session))
        return out

    def _full_feature(self, msg: InitiatorPdu, raw: pdu.RawPdu) -> list[Event]:
        assert self.session is not None
        discovery = self.session.session_type is SessionType.DISCOVERY
        if isinstance(msg, pdu.LoginRequest):
            raise ProtocolError("login request in the full feature phase")
        if isinstance(msg, pdu.NopOut):
            return self._nop_out(msg)
        if isinstance(msg, pdu.TextRequest):
            if not self._command_number(msg.immediate, msg.cmdsn, "text request"):
                return []
            return self._text(msg)
        if isinstance(msg, pdu.LogoutRequest):
            if not self._command_number(msg.immediate, msg.cmdsn, "logout"):
                return []
            return self._logout(msg)
        if discovery:  # RFC 7143 section 4.3: only text, NOP and logout in a discovery session
            self.closed = True
            return [self._reject(RejectReason.PROTOCOL_ERROR, raw.bhs),
                    Close(f"opcode {raw.opcode:#04x} in a discovery session")]
        if isinstance(msg, pdu.ScsiCommand):
            if not self._command_number(msg.immediate, msg.cmdsn, "SCSI command"):
                return []
            if msg.data:
                if not msg.write or len(msg.data) > self.session.params.first_burst:
                    raise ProtocolError(f"immediate data of {len(msg.data)} bytes with a command that may not "
                                        "carry it (no W bit, or beyond FirstBurstLength)")
                self._immediate[msg.itt] = msg.data
            return [Command(msg)]
        if isinstance(msg, pdu.DataOut):
            return self._data_out(msg, raw)
        if isinstance(msg, pdu.TaskMgmtRequest):
            if not self._command_number(msg.immediate, msg.cmdsn, "task management"):
                return []
            return [TaskManagement(msg)]
        # SNACK needs error recovery level 1 or more; syncd runs at 0.
        return [self._reject(RejectReason.COMMAND_NOT_SUPPORTED, raw.bhs)]

    # -- data-out ------------------------------------------------------------------------------
    def request_data(self, cmd: pdu.ScsiCommand, length: int) -> list[Event]:
        """The SCSI layer needs ``length`` bytes of data-out for ``cmd`` (at most its expected
        data transfer length): immediate data first, then R2Ts. ``WriteData`` comes when all
        has arrived (at once when immediate data covered it)."""
        assert self.session is not None
        immediate = self._immediate.pop(cmd.itt, b"")
        if len(immediate) >= length:
            return [WriteData(cmd.itt, immediate[:length])]
        t = _Transfer(cmd.itt, cmd.lun, bytearray(length))
        t.buf[: len(immediate)] = immediate
        t.received = len(immediate)
        return [self._r2t(t)]

    def _r2t(self, t: _Transfer) -> Send:
        assert self.session is not None
        self._transfers.pop(t.ttt, None)
        t.ttt = self._ttt()
        self._transfers[t.ttt] = t
        burst = min(self.session.params.max_burst, len(t.buf) - t.received)
        t.burst_end = t.received + burst
        t.datasn = 0
        sn, t.r2tsn = t.r2tsn, t.r2tsn + 1
        return self._send(pdu.r2t(itt=t.itt, lun=t.lun, ttt=t.ttt, statsn=self.statsn, expcmdsn=self.expcmdsn,
                                  maxcmdsn=self.maxcmdsn, r2tsn=sn, offset=t.received, length=burst))

    def _data_out(self, msg: pdu.DataOut, raw: pdu.RawPdu) -> list[Event]:
        t = self._transfers.get(msg.ttt)
        if t is None or t.itt != msg.itt:
            # Unsolicited data (InitialR2T=Yes forbids it) or a tag we never gave.
            raise ProtocolError(f"Data-Out for ITT {msg.itt:#x} TTT {msg.ttt:#x}, which no R2T asked for")
        end = msg.offset + len(msg.data)
        if msg.offset != t.received or end > t.burst_end or msg.datasn != t.datasn:
            raise ProtocolError(f"Data-Out at offset {msg.offset} (+{len(msg.data)}, DataSN {msg.datasn}) where "
                                f"{t.received} (DataSN {t.datasn}) was due, burst ending at {t.burst_end}")
        t.buf[msg.offset : end] = msg.data
        t.received = end
        t.datasn += 1
        if end < t.burst_end:
            if msg.final:
                raise ProtocolError(f"Data-Out sequence ended at {end}, short of the burst's end {t.burst_end}")
            return []
        if not msg.final:
            raise ProtocolError("the burst's last Data-Out lacks the F bit")
        if t.received < len(t.buf):
            return [self._r2t(t)]
        del self._transfers[t.ttt]
        return [WriteData(t.itt, t.buf)]

    def forget(self, itt: int) -> None:
        """A command ended (answered or aborted): drop what the connection kept for it."""
        self._immediate.pop(itt, None)
        for ttt, t in list(self._transfers.items()):
            if t.itt == itt:
                del self._transfers[ttt]

    # -- answers -------------------------------------------------------------------------------
    def _residual(self, edtl: int, length: int, overflow: int, underflow: int) -> tuple[int, int]:
        if length < edtl:
            return underflow, edtl - length
        if length > edtl:
            return overflow, length - edtl
        return 0, 0

    def data_in(self, cmd: pdu.ScsiCommand, data: bytes | bytearray | memoryview) -> list[Event]:
        """A read's data and its GOOD status: Data-In PDUs no longer than the initiator
        declared, the last with the status (phase collapse). Data beyond the expected data
        transfer length is not sent (overflow residual)."""
        assert self.session is not None
        self.forget(cmd.itt)
        flags, residual = self._residual(cmd.edtl, len(data), pdu.DATA_OVERFLOW, pdu.DATA_UNDERFLOW)
        view = memoryview(data)[: cmd.edtl]
        if not view:
            return [self.response(cmd, 0, length=len(data))]
        step = self.session.params.initiator_max_recv
        out: list[Event] = []
        for n, off in enumerate(range(0, len(view), step)):
            chunk = view[off : off + step]
            last = off + step >= len(view)
            header = pdu.data_in(itt=cmd.itt, lun=cmd.lun, datasn=n, offset=off, dsl=len(chunk),
                                 expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn, final=last,
                                 status=0 if last else None, statsn=self._statsn() if last else 0,
                                 residual_flags=flags, residual=residual)
            out.append(self._send(header, chunk))
        return out

    def response(self, cmd: pdu.ScsiCommand, status: int, sense: bytes = b"", length: int | None = None) -> Send:
        """A SCSI Response. ``length`` is how many bytes the command transferred or needed,
        for the residual against the expected data transfer length."""
        self.forget(cmd.itt)
        flags, residual = (0, 0) if length is None else self._residual(
            cmd.edtl, length, pdu.RESP_OVERFLOW, pdu.RESP_UNDERFLOW)
        data = pdu.sense_segment(sense) if sense else b""
        return self._send(pdu.scsi_response(itt=cmd.itt, status=status, statsn=self._statsn(), expcmdsn=self.expcmdsn,
                                            maxcmdsn=self.maxcmdsn, dsl=len(data), residual_flags=flags,
                                            residual=residual), data)

    def tmf_response(self, req: pdu.TaskMgmtRequest, response: int) -> Send:
        return self._send(pdu.task_mgmt_response(itt=req.itt, response=response, statsn=self._statsn(),
                                                 expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn))

    def async_event(self, lun: int, sense: bytes) -> Send:
        """An asynchronous SCSI event (a unit attention reported without waiting for a
        command)."""
        data = pdu.sense_segment(sense)
        return self._send(pdu.async_message(event=pdu.AsyncEvent.SCSI_EVENT, lun=lun, statsn=self.statsn,
                                            expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn, dsl=len(data)), data)

    def _nop_out(self, msg: pdu.NopOut) -> list[Event]:
        if msg.itt == RESERVED_TAG:
            if not msg.immediate:
                raise ProtocolError("NOP-Out with the reserved ITT must be immediate")
            return [Ping(msg.ttt)] if msg.ttt != RESERVED_TAG else []
        if not self._command_number(msg.immediate, msg.cmdsn, "NOP-Out"):
            return []
        return [self._send(pdu.nop_in(itt=msg.itt, ttt=RESERVED_TAG, lun=msg.lun, statsn=self._statsn(),
                                      expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn, dsl=len(msg.data)),
                           msg.data)]

    def ping(self) -> Send:
        """A NOP-In asking the initiator for a NOP-Out (keepalive); the answer comes back as a
        ``Ping`` event with the same TTT."""
        return self._send(pdu.nop_in(itt=RESERVED_TAG, ttt=self._ttt(), lun=0, statsn=self.statsn,
                                     expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn))

    def _logout(self, msg: pdu.LogoutRequest) -> list[Event]:
        if msg.reason == pdu.LOGOUT_REMOVE_FOR_RECOVERY:
            response = pdu.LOGOUT_RECOVERY_NOT_SUPPORTED
        elif msg.reason == pdu.LOGOUT_CLOSE_CONNECTION and msg.cid != (self.session.cid if self.session else 0):
            response = pdu.LOGOUT_CID_NOT_FOUND
        else:
            response = pdu.LOGOUT_OK
        out: list[Event] = [self._send(pdu.logout_response(
            itt=msg.itt, response=response, statsn=self._statsn(), expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn,
            time2wait=0, time2retain=0))]
        if response == pdu.LOGOUT_OK:
            self.closed = True
            out.append(Close("logout"))
        return out

    # -- text requests -------------------------------------------------------------------------
    def _text(self, msg: pdu.TextRequest) -> list[Event]:
        assert self.session is not None
        if msg.ttt != RESERVED_TAG:
            # The initiator asks for the rest of a long answer.
            if self._text_out is None or self._text_out[0] != msg.ttt:
                return [self._reject(RejectReason.INVALID_PDU_FIELD, self._text_header(msg))]
            _, rest = self._text_out
            return self._text_reply(msg, rest)
        self._text_out = None
        self._text_in += msg.data
        if len(self._text_in) > MAX_TEXT_EXCHANGE:
            raise ProtocolError("text request exceeds 64 KiB")
        if msg.cont:
            return [self._send(pdu.text_response(final=False, cont=False, lun=msg.lun, itt=msg.itt, ttt=self._ttt(),
                                                 statsn=self._statsn(), expcmdsn=self.expcmdsn,
                                                 maxcmdsn=self.maxcmdsn, dsl=0))]
        data, self._text_in = self._text_in, b""
        try:
            pairs = parse_text(data)
        except TextError:
            return [self._reject(RejectReason.PROTOCOL_ERROR, self._text_header(msg))]
        answer: Pairs = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self.send_targets(value)
            else:  # syncd renegotiates nothing in the full feature phase
                answer.append((key, "Reject" if key.startswith(("Max", "First", "Default")) else "NotUnderstood"))
        return self._text_reply(msg, encode_text(answer))

    @staticmethod
    def _text_header(msg: pdu.TextRequest) -> bytes:
        return pdu.TEXT_REQUEST.build({  # type: ignore[no-any-return]
            "op": Op.TEXT_REQUEST | (pdu.IMMEDIATE if msg.immediate else 0), "flags": pdu.F_BIT if msg.final else 0,
            "ahs_words": 0, "dsl": len(msg.data), "lun": msg.lun, "itt": msg.itt, "ttt": msg.ttt,
            "cmdsn": msg.cmdsn, "expstatsn": msg.expstatsn})

    def _text_reply(self, msg: pdu.TextRequest, data: bytes) -> list[Event]:
        assert self.session is not None
        limit = self.session.params.initiator_max_recv
        more = len(data) > limit
        chunk, rest = (data[:limit], data[limit:]) if more else (data, b"")
        ttt = self._ttt() if more else RESERVED_TAG
        self._text_out = (ttt, rest) if more else None
        return [self._send(pdu.text_response(final=not more, cont=more, lun=msg.lun, itt=msg.itt, ttt=ttt,
                                             statsn=self._statsn(), expcmdsn=self.expcmdsn, maxcmdsn=self.maxcmdsn,
                                             dsl=len(chunk)), chunk)]

    def send_targets(self, value: str) -> Pairs:
        """RFC 7143 appendix C: All (discovery sessions), one target's name, or empty (the
        session's own target). Only targets this initiator may use are listed."""
        assert self.session is not None
        initiator = self.session.initiator_name
        if value == "All" and self.session.session_type is SessionType.DISCOVERY:
            names = sorted(self.portal.targets)
        elif value == "" and self.session.target is not None:
            names = [self.session.target.name]
        elif value in self.portal.targets:
            names = [value]
        else:
            return []
        out: Pairs = []
        for name in names:
            if not self.portal.authorize(initiator, name):
                continue
            out.append(("TargetName", name))
            out += [("TargetAddress", a.text()) for a in self.addresses(name)]
        if value == "All" and self.others is not None:
            out += self.others()
        return out
