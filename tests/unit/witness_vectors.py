"""Golden witness frames; `python -m tests.unit.witness_vectors --write` after a deliberate change."""

import sys
from pathlib import Path

from syncd.witness.proto import FRESH, WType, encode

DIR = Path(__file__).resolve().parents[2] / "proto" / "vectors" / "witness"

VECTORS = {
    "goodbye": (WType.GOODBYE, 0, {"reason": "idle for 60 s"}),
    "register": (WType.REGISTER, 1, {"group": "rcg1", "member1": "A", "member2": "B", "owner": "A", "epoch": 1}),
    "report": (WType.REPORT, 2, {"group": "rcg1", "epoch": 1, "flags": 3}),
    "claim": (WType.CLAIM, 3, {"group": "rcg1", "epoch": 1}),
    "keep": (WType.KEEP, 4, {"group": "rcg1", "epoch": 1}),
    "handover": (WType.HANDOVER, 5, {"group": "rcg1", "epoch": 1}),
    "resolve": (WType.RESOLVE, 6, {"group": "rcg1", "epoch": 3}),
    "decision_granted": (WType.DECISION, 3, {"granted": True, "owner": "B", "epoch": 2, "reason": "failover"}),
    "decision_denied": (WType.DECISION, 3,
                        {"granted": False, "owner": "A", "epoch": 1, "reason": "A was heard 0.5s ago"}),
    "error": (WType.ERROR, 5, {"reason": "unknown group 'x'"}),
    # A request that asks to be refused when heard late (req_id's FRESH bit), and that refusal.
    "report_fresh": (WType.REPORT, FRESH | 7, {"group": "rcg1", "epoch": 1, "flags": 3}),
    "stale": (WType.STALE, FRESH | 7, {"reason": "heard 1.204 s after the answer before it"}),
}


def write() -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    for name, (t, rid, fields) in VECTORS.items():
        (DIR / f"{name}.hex").write_text(encode(t, rid, **fields).hex() + "\n")


if __name__ == "__main__" and "--write" in sys.argv:
    write()
