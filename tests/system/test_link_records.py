"""Two daemons of different record versions on one link (issue 13): a node that offers key mode's
records version 2 and a node that offers only version 1 (what a release before version 2 sends:
``SYNCD_KEY_RECORDS=1`` makes its nonce plain random bytes) agree on version 1, showrcopy says
so at both ends, and writes at either site reach both replicas; a restart of the old node as a
new one brings both ends to version 2 without the operator doing anything."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from syncd import secure
from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_kill, lab_start, lab_up, load_lab, wait_in_sync

from .rig import file_digest, require_tool, run

pytestmark = pytest.mark.system

V1, V2 = secure.MacChannel.protection, secure.GcmChannel.protection


def path_protection(lab: dict, site: str) -> list[str]:
    st = call(lab["nodes"][site]["admin_socket"], "showrcopy")
    assert st["link"]["security"] == "key"
    return [p["protection"] for p in st["link"]["paths"] if p["state"] == "up"]


def wait_protection(lab: dict, want: str, timeout: float = 60) -> None:
    """Until every path is up at both ends with ``want`` (paths reconnect on their own)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = {s: path_protection(lab, s) for s in ("A", "B")}
        if all(len(v) == 2 and set(v) == {want} for v in got.values()):
            return
        assert time.monotonic() < deadline, f"paths not all {want!r}: {got}"
        time.sleep(0.1)


def restart(d: Path, site: str, records: str | None, monkeypatch) -> dict:
    if records is None:
        monkeypatch.delenv(secure.RECORDS_ENV, raising=False)
    else:
        monkeypatch.setenv(secure.RECORDS_ENV, records)
    lab_kill(str(d), site, signal.SIGTERM)
    lab_start(str(d), site)
    monkeypatch.delenv(secure.RECORDS_ENV, raising=False)
    lab = load_lab(str(d))
    wait_in_sync(lab, 120)
    return lab


def write_and_read_back(lab: dict, tmp: Path, at: str, other: str, seed: int) -> None:
    data = tmp / f"w{seed}.img"
    data.write_bytes(os.urandom(2 << 20))
    run("nbdcopy", "--flush", str(data), f"{lab['nodes'][at]['volumes']['vv1']['uri']}")
    back = tmp / f"r{seed}.img"
    run("nbdcopy", f"{lab['nodes'][other]['volumes']['vv1']['uri']}", str(back))
    assert back.read_bytes()[: 2 << 20] == data.read_bytes()


def test_a_v1_only_node_and_a_v2_node_link_with_v1_records_and_replicate(tmp_path, monkeypatch):
    require_tool("nbdcopy")
    if secure.records_to_offer() < secure.RECORDS_V2:
        pytest.fail("this node cannot offer key records version 2 (is 'cryptography' installed?)")
    d = tmp_path / "lab"
    monkeypatch.delenv(secure.RECORDS_ENV, raising=False)
    lab = lab_up(str(d), size="16MiB", nvolumes=1)
    try:
        wait_protection(lab, V2)  # two current releases: version 2

        lab = restart(d, "B", "1", monkeypatch)  # B as the previous release would link
        wait_protection(lab, V1)
        write_and_read_back(lab, tmp_path, "A", "B", 1)
        write_and_read_back(lab, tmp_path, "B", "A", 2)  # forwarded to the primary over v1 records

        lab = restart(d, "B", None, monkeypatch)  # B upgraded: both ends back on version 2
        wait_protection(lab, V2)
        write_and_read_back(lab, tmp_path, "B", "A", 3)
    finally:
        if (d / "lab.json").exists():
            lab_down(str(d))
    paths = [lab["nodes"][s]["volumes"]["vv1"]["path"] for s in ("A", "B")]
    assert file_digest(paths[0]) == file_digest(paths[1])
