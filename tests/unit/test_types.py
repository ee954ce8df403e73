"""The protocol and state-machine modules pass ``mypy --strict`` (STYLE.md §9): the one list of
them, checked together (so what they import is checked too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STRICT = [
    "syncd/nbd/proto.py",
    "syncd/repl/proto.py",
    "syncd/witness/proto.py",
    "syncd/secure.py",
    "syncd/witness/decide.py",
    "syncd/witness/etcd.py",
    "syncd/witness/etcd_backend.py",
    "syncd/witness/etcd_node.py",
    "syncd/witness/reach.py",
    "syncd/witness/etcd_members.py",
    "syncd/node/roles.py",
    "syncd/repl/flow.py",
    "syncd/buffers.py",
    "syncd/ranges.py",
    "syncd/lab/history.py",
    "syncd/nbd/extents.py",
    "syncd/metrics/stats.py",
    "syncd/metrics/http.py",
    "syncd/node/events.py",
    "syncd/logfmt.py",
    "syncd/sdnotify.py",
    "syncd/iscsi/pdu.py",
    "syncd/iscsi/text.py",
    "syncd/iscsi/login.py",
    "syncd/iscsi/conn.py",
    "syncd/iscsi/scsi.py",
    "syncd/iscsi/pr.py",
]


def test_protocol_and_state_machine_modules_pass_mypy_strict(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", str(tmp_path),
                        *STRICT], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
