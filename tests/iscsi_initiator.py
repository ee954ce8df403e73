"""A small blocking iSCSI initiator for tests that need to see what a target says (access states,
unit attentions, sense) through one session, which libiscsi's command-line tools do not show.
It uses syncd's own codec, so it proves nothing about the protocol: the real initiators
(libiscsi, qemu) do that; this one observes."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from syncd.iscsi import pdu as p
from syncd.iscsi import text as t


@dataclass
class Reply:
    status: int
    data: bytes
    sense: bytes

    @property
    def key_asc(self) -> tuple[int, int, int] | None:
        if len(self.sense) < 14:
            return None
        return self.sense[2] & 0x0F, self.sense[12], self.sense[13]


class Initiator:
    def __init__(self, host: str, port: int, target: str, name: str = "iqn.2026-12.org.syncd:test-initiator",
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = p.PduReader(1 << 24)
        self.itt = 1
        self.cmdsn = 1
        self.statsn = 0
        self.events: list[bytes] = []  # sense data of asynchronous events
        data = t.encode([("InitiatorName", name), ("TargetName", target), ("SessionType", "Normal"),
                         ("MaxRecvDataSegmentLength", "262144"), ("ImmediateData", "Yes")])
        self._send(p.LOGIN_REQUEST.build({
            "op": p.Op.LOGIN_REQUEST | p.IMMEDIATE, "flags": p.TRANSIT | (1 << 2) | 3, "version_max": 0,
            "version_min": 0, "ahs_words": 0, "dsl": len(data), "isid": bytes.fromhex("400001370000"), "tsih": 0,
            "itt": 0, "cid": 0, "cmdsn": self.cmdsn, "expstatsn": 0}), data)
        raw = self._next()
        c = p.LOGIN_RESPONSE.parse(raw.bhs)
        if c.status_class:
            raise ConnectionError(f"login refused: {c.status_class:#x}/{c.status_detail:#x}")
        self.statsn = c.statsn + 1

    def close(self) -> None:
        self.sock.close()

    def _send(self, header: bytes, data: bytes = b"") -> None:
        self.sock.sendall(b"".join(bytes(b) for b in p.frame(header, data)))

    def _next(self) -> p.RawPdu:
        while True:
            raw = self.reader.next_pdu()
            if raw is not p.NEED_DATA:
                return raw
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the target closed the connection")
            self.reader.receive_data(chunk)

    def command(self, cdb: bytes, *, read: int = 0, write: bytes = b"", lun: int = 0) -> Reply:
        itt, self.itt = self.itt, self.itt + 1
        flags = p.F_BIT | (p.CMD_READ if read else 0) | (p.CMD_WRITE if write else 0) | 1
        edtl = read or len(write)
        immediate = write[:65536]
        self._send(p.H_SCSI_COMMAND.pack(p.Op.SCSI_COMMAND, flags, len(immediate), p.lun_field(lun), itt, edtl,
                                         self.cmdsn, self.statsn, cdb.ljust(16, b"\0")), immediate)
        self.cmdsn += 1
        data = bytearray()
        while True:
            raw = self._next()
            op = raw.opcode
            if op == p.Op.DATA_IN:
                c = p.DATA_IN.parse(raw.bhs)
                data[c.offset: c.offset + len(raw.data)] = raw.data
                if c.flags & p.DATA_STATUS:
                    self.statsn = c.statsn + 1
                    return Reply(c.status, bytes(data), b"")
            elif op == p.Op.R2T:
                c = p.R2T.parse(raw.bhs)
                chunk = write[c.offset: c.offset + c.length]
                self._send(p.H_DATA_OUT.pack(p.Op.DATA_OUT, p.F_BIT, len(chunk), c.lun, itt, c.ttt, self.statsn, 0,
                                             c.offset), chunk)
            elif op == p.Op.SCSI_RESPONSE:
                c = p.SCSI_RESPONSE.parse(raw.bhs)
                self.statsn = c.statsn + 1
                sense = b""
                if raw.data:
                    (n,) = struct.unpack_from(">H", raw.data)
                    sense = raw.data[2: 2 + n]
                return Reply(c.status, bytes(data), sense)
            elif op == p.Op.NOP_IN:
                c = p.NOP_IN.parse(raw.bhs)
                if c.ttt != p.RESERVED_TAG:  # a ping: answer it
                    self._send(p.NOP_OUT.build({"op": p.Op.NOP_OUT | p.IMMEDIATE, "flags": p.F_BIT, "ahs_words": 0,
                                                "dsl": 0, "lun": 0, "itt": p.RESERVED_TAG, "ttt": c.ttt,
                                                "cmdsn": self.cmdsn, "expstatsn": self.statsn}))
            elif op == p.Op.ASYNC_MESSAGE:
                self.events.append(raw.data[2:])
            else:
                raise ConnectionError(f"unexpected PDU {op:#x}")

    # -- the commands tests use ------------------------------------------------------------------
    def tur(self, lun: int = 0) -> Reply:
        return self.command(bytes(6), lun=lun)

    def alua_state(self, lun: int = 0) -> int:
        """This path's asymmetric access state, from REPORT TARGET PORT GROUPS (retrying past
        unit attentions)."""
        for _ in range(8):
            r = self.command(bytes([0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), read=256, lun=lun)
            if r.status == 0:
                return r.data[4] & 0x0F
        raise AssertionError(f"REPORT TARGET PORT GROUPS kept failing: {r}")

    def read(self, lba: int, blocks: int, lun: int = 0) -> Reply:
        return self.command(struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0), read=blocks * 512, lun=lun)

    def write(self, lba: int, data: bytes, lun: int = 0, fua: bool = False) -> Reply:
        return self.command(struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, len(data) // 512, 0),
                            write=data, lun=lun)

    def compare_and_write(self, lba: int, verify: bytes, new: bytes, lun: int = 0) -> Reply:
        cdb = struct.pack(">BBQ3xBBB", 0x89, 0, lba, len(verify) // 512, 0, 0)
        return self.command(cdb, write=verify + new, lun=lun)

    def pr_out(self, sa: int, key: int = 0, sa_key: int = 0, rtype: int = 0, *, aptpl: bool = False,
               all_tg_pt: bool = False, lun: int = 0) -> Reply:
        """PERSISTENT RESERVE OUT with the 24-byte parameter list."""
        cdb = struct.pack(">BBBxxIB", 0x5F, sa, rtype, 24, 0)
        params = struct.pack(">QQIBxH", key, sa_key, 0, (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0), 0)
        return self.command(cdb, write=params, lun=lun)

    def pr_in(self, sa: int, lun: int = 0) -> Reply:
        """PERSISTENT RESERVE IN (READ KEYS 0, READ RESERVATION 1, ...)."""
        return self.command(struct.pack(">BB5xHB", 0x5E, sa, 8192, 0), read=8192, lun=lun)

    def keys(self, lun: int = 0) -> tuple[int, list[int]]:
        """READ KEYS: (generation, registered keys), retrying past unit attentions."""
        for _ in range(8):
            r = self.pr_in(0, lun)
            if r.status == 0:
                gen, n = struct.unpack_from(">II", r.data)
                return gen, [struct.unpack_from(">Q", r.data, 8 + i)[0] for i in range(0, n, 8)]
        raise AssertionError(f"READ KEYS kept failing: {r}")

    def reservation(self, lun: int = 0) -> tuple[int, int] | None:
        """READ RESERVATION: (holder's key, type), or None."""
        for _ in range(8):
            r = self.pr_in(1, lun)
            if r.status == 0:
                (n,) = struct.unpack_from(">I", r.data, 4)
                if not n:
                    return None
                key, rtype = struct.unpack_from(">Q5xB", r.data, 8)
                return key, rtype & 0x0F
        raise AssertionError(f"READ RESERVATION kept failing: {r}")
