"""The golden replication frames. Run `python -m tests.unit.repl_vectors --write` once after a
deliberate protocol change; the tests compare the codec against the committed files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from syncd.repl.proto import Frame, Status

DIR = Path(__file__).resolve().parents[2] / "proto" / "vectors" / "replication"
UUID_A = bytes(range(16))
UUID_B = bytes(range(16, 32))

VECTORS: dict[str, Frame] = {
    "hello": Frame.hello(node_uuid=UUID_A, node_name="A", path_index=0, link_session=0x1122334455667788),
    "hello_ack": Frame.hello_ack(node_uuid=UUID_B, node_name="B", path_index=1, link_session=0x1122334455667788),
    "ping": Frame.ping(123456789),
    "pong": Frame.pong(123456789),
    "write": Frame.write(7, 0x42, 3, 1, 4096, b"syncd"),
    "write_fua_forwarded": Frame.write(8, 0x42, 3, 2, 8192, b"\x00\xff" * 8, fua=True, forwarded=True),
    "write_resync": Frame.write(9, 0x42, 3, 1, 262144, b"region", resync=True),
    "zeroes": Frame.zeroes(10, 0x42, 3, 1, 1 << 20, 65536, no_hole=True),
    "zeroes_fast": Frame.zeroes(20, 0x42, 3, 1, 2 << 20, 1 << 20, fast=True),
    "reply_error_enotsup": Frame.reply(20, Status.ENOTSUP),
    "trim": Frame.trim(11, 0x42, 3, 1, 0, 4096),
    "flush": Frame.flush(12, 0x42, 3),
    "release": Frame.release(8, 0x42, 3, 0),
    "read": Frame.read(13, 0x42, 3, 1, 512, 4096),
    "lease": Frame.lease(14, 0x42, 3),
    "reply_ok": Frame.reply(7),
    "reply_lease": Frame.reply(14, Status.OK, Frame.lease_payload(2000)),
    "reply_error_stale_epoch": Frame.reply(15, Status.STALE_EPOCH),
    "resync_begin": Frame.resync_begin(16, 0x42, 3, 1, 262144, bytes([0b00000101, 0, 0x80])),
    "resync_end": Frame.resync_end(17, 0x42, 3, 1, 0, 524288),
    "digests_request": Frame.digests(18, 0x42, 3, 1, 0, 524288, 262144),
    "digests_reply": Frame.reply(18, Status.OK, Frame.digests_payload([0x0123456789ABCDEF, 0xFEDCBA9876543210])),
    "control": Frame.control(19, {"op": "start", "group": "rcg1"}),
    "goodbye": Frame.goodbye("protocol versions do not overlap"),
}


def describe(f: Frame) -> dict:
    return {"type": f.type.name, "flags": f.flags, "req_id": f.req_id, "group": f.group,
            "epoch": f.epoch, "vol": f.vol, "offset": f.offset, "length": f.length,
            "payload_hex": bytes(f.payload).hex()}


def write() -> None:
    from syncd.repl.proto import encode_bytes

    DIR.mkdir(parents=True, exist_ok=True)
    for name, f in VECTORS.items():
        (DIR / f"{name}.hex").write_text(encode_bytes(f).hex() + "\n")
    (DIR / "index.json").write_text(json.dumps({k: describe(v) for k, v in VECTORS.items()}, indent=1) + "\n")


if __name__ == "__main__" and "--write" in sys.argv:
    write()
