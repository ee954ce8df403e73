"""The golden iSCSI PDUs the target sends. Run `python -m tests.unit.iscsi_vectors --write` once
after a deliberate codec change; tests/unit/test_iscsi_pdu.py compares the codec against the
committed files in proto/vectors/iscsi."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from syncd.iscsi import pdu as p
from syncd.iscsi import text

DIR = Path(__file__).resolve().parents[2] / "proto" / "vectors" / "iscsi"
ISID = bytes.fromhex("800012345678")
LUN1 = p.lun_field(1)
# fixed-format sense: ILLEGAL REQUEST, INVALID FIELD IN CDB
SENSE = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0])


def _pdu(header: bytes, data: bytes = b"", hd: bool = False, dd: bool = False) -> bytes:
    return b"".join(bytes(b) for b in p.frame(header, data, header_digest=hd, data_digest=dd))


_login_text = text.encode([("TargetPortalGroupTag", "1"), ("AuthMethod", "None")])
_sendtargets = text.encode([("TargetName", "iqn.2026-12.org.syncd:vol1"), ("TargetAddress", "192.0.2.1:3260,1")])

VECTORS: dict[str, bytes] = {
    "login_response_security": _pdu(p.login_response(
        transit=True, cont=False, csg=0, nsg=1, isid=ISID, tsih=0, itt=0x10, statsn=0x1000, expcmdsn=1,
        maxcmdsn=64, dsl=len(_login_text)), _login_text),
    "login_response_final": _pdu(p.login_response(
        transit=True, cont=False, csg=1, nsg=3, isid=ISID, tsih=0x0102, itt=0x10, statsn=0x1001, expcmdsn=1,
        maxcmdsn=64)),
    "login_response_auth_failure": _pdu(p.login_response(
        transit=False, cont=False, csg=0, nsg=0, isid=ISID, tsih=0, itt=0x10, statsn=0, expcmdsn=1, maxcmdsn=64,
        status=p.LOGIN_AUTH_FAILURE)),
    "text_response_sendtargets": _pdu(p.text_response(
        final=True, cont=False, lun=0, itt=0x11, ttt=p.RESERVED_TAG, statsn=0x1002, expcmdsn=2, maxcmdsn=65,
        dsl=len(_sendtargets)), _sendtargets),
    "data_in": _pdu(p.data_in(itt=0x20, lun=LUN1, datasn=0, offset=0, dsl=8, expcmdsn=3, maxcmdsn=66),
                    b"syncd-di"),
    "data_in_status": _pdu(p.data_in(itt=0x20, lun=LUN1, datasn=1, offset=8, dsl=4, expcmdsn=3, maxcmdsn=66,
                                     status=0, statsn=0x1003), b"last"),
    "data_in_status_digests": _pdu(p.data_in(itt=0x21, lun=LUN1, datasn=0, offset=0, dsl=5, expcmdsn=3,
                                             maxcmdsn=66, status=0, statsn=0x1004,
                                             residual_flags=p.DATA_UNDERFLOW, residual=507), b"short",
                                   hd=True, dd=True),
    "scsi_response_good": _pdu(p.scsi_response(itt=0x22, status=0, statsn=0x1005, expcmdsn=4, maxcmdsn=67)),
    "scsi_response_check_condition": _pdu(p.scsi_response(
        itt=0x23, status=0x02, statsn=0x1006, expcmdsn=5, maxcmdsn=68, dsl=2 + len(SENSE)),
        p.sense_segment(SENSE)),
    "r2t": _pdu(p.r2t(itt=0x24, lun=LUN1, ttt=0x5000, statsn=0x1007, expcmdsn=6, maxcmdsn=69, r2tsn=0,
                      offset=65536, length=262144)),
    "nop_in_ping": _pdu(p.nop_in(itt=p.RESERVED_TAG, ttt=0x6000, lun=0, statsn=0x1008, expcmdsn=7, maxcmdsn=70)),
    "task_mgmt_response": _pdu(p.task_mgmt_response(itt=0x25, response=p.TmfResponse.TASK_DOES_NOT_EXIST,
                                                    statsn=0x1009, expcmdsn=8, maxcmdsn=71)),
    "logout_response": _pdu(p.logout_response(itt=0x26, response=p.LOGOUT_OK, statsn=0x100A, expcmdsn=9,
                                              maxcmdsn=72, time2wait=2)),
    "async_scsi_event": _pdu(p.async_message(event=p.AsyncEvent.SCSI_EVENT, lun=LUN1, statsn=0x100B, expcmdsn=10,
                                             maxcmdsn=73, dsl=2 + len(SENSE)), p.sense_segment(SENSE)),
    "reject_protocol_error": _pdu(p.reject(reason=p.RejectReason.PROTOCOL_ERROR, statsn=0x100C, expcmdsn=11,
                                           maxcmdsn=74), bytes([p.Op.SCSI_RESPONSE]) + bytes(47)),
}


def describe(wire: bytes) -> dict[str, object]:
    op = p.Op(wire[0] & p.OPCODE_MASK)
    parsed = p.DECLARATIONS[op].parse(wire[:48])
    return {"opcode": op.name, "length": len(wire),
            "fields": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in parsed.items()
                       if not k.startswith("_")}}


def write() -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    for name, wire in VECTORS.items():
        (DIR / f"{name}.hex").write_text(wire.hex() + "\n")
    (DIR / "index.json").write_text(json.dumps({k: describe(v) for k, v in VECTORS.items()}, indent=1) + "\n")


if __name__ == "__main__" and "--write" in sys.argv:
    write()
