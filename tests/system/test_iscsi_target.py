"""The iSCSI target (unreplicated: python -m syncd.iscsi.server) against initiators nobody here
wrote: libiscsi's iscsi-inq and iscsi-readcapacity16, qemu's iSCSI driver (qemu-io,
qemu-img), and libiscsi's compliance suite iscsi-test-cu, whose SCSI and iSCSI families must
pass except the tests listed in KNOWN with the reason each does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from syncd.lab import iscsi_compliance

from .rig import require_tool, run

pytestmark = pytest.mark.system

IQN = "iqn.2026-12.org.syncd:test"
# Tests of libiscsi 1.19.0 that fail against syncd, and why (the README's compliance table says the same).
KNOWN = {
    "SCSI.GetLBAStatus.UnmapSingle":
        "asks for the status of LBA i+1 and expects the first descriptor to start at i+8; SBC-4 5.20.2 has "
        "it start at the LBA asked for, which syncd does",
    "iSCSI.iSCSIdatasn.iSCSIDataSnInvalid":
        "syncd drops the connection at each wrong DataSN, as error recovery level 0 requires; the test's "
        "reconnect forgets its ImmediateData=No setting, so a later case sends no Data-Out to get wrong",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def target(tmp_path):
    require_tool("iscsi-inq", "iscsi-readcapacity16", "iscsi-test-cu", "qemu-io", "qemu-img", "stdbuf")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    port = free_port()
    log = open(tmp_path / "target.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "syncd.iscsi.server", "--port", str(port), "--target", IQN,
                          "--lun", f"0={disk}"], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "target.log").read_text()
            time.sleep(0.05)
    yield f"iscsi://127.0.0.1:{port}/{IQN}/0", disk, tmp_path / "target.log"
    p.terminate()
    p.wait(10)
    log.close()


def test_libiscsi_tools_read_identity_and_capacity(target):
    url, disk, _ = target
    inq = run("iscsi-inq", url).stdout
    assert "TPGS:1" in inq and "MultiP:1" in inq and "Vendor:SYNCD" in inq and "CmdQue:1" in inq
    ident = run("iscsi-inq", "-e", "1", "-c", "131", url).stdout
    assert "NAA" in ident and "TARGET_PORT_GROUP" in ident and "RELATIVE_TARGET_PORT" in ident
    cap = run("iscsi-readcapacity16", url).stdout
    assert "RETURNED LOGICAL BLOCK ADDRESS:131071" in cap and "LBPME:1 LBPRZ:1" in cap


def test_qemu_writes_and_reads_through_the_target(target):
    url, disk, _ = target
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 3M", "-c", "write -P 0xcd 1000448 4096",
              "-c", "read -P 0xab 0 1000448", "-c", "read -P 0xcd 1000448 4096",
              "-c", "write -z 8M 1M", "-c", "read -P 0 8M 1M", url).stdout
    assert "Pattern verification failed" not in out and out.count("wrote") == 3, out
    with open(disk, "rb") as f:
        assert f.read(4096) == b"\xab" * 4096
        f.seek(1000448)
        assert f.read(4096) == b"\xcd" * 4096
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(disk))


def test_compliance_suite_scsi_and_iscsi_families(target):
    url, _, log = target
    results = []
    for family in ("SCSI", "iSCSI"):
        got, raw = iscsi_compliance.run(url, family)
        assert got, raw[-3000:]
        results += got
    failed = {r.name: r.detail for r in results if r.outcome == "failed"}
    assert set(failed) <= set(KNOWN), (failed, log.read_text()[-3000:])
    passed = [r for r in results if r.outcome == "passed"]
    # The families' size in libiscsi 1.19.0: a suite that stopped listing tests would shrink it.
    assert len(results) >= 230 and len(passed) >= 140, iscsi_compliance.markdown(results)
    essential = {"SCSI.Read10.Simple", "SCSI.Write16.Simple", "SCSI.CompareAndWrite.Miscompare",
                 "SCSI.Unmap.Simple", "SCSI.WriteSame16.Unmap", "SCSI.ReportSupportedOpcodes.Simple",
                 "SCSI.Inquiry.MandatoryVPDSBC", "iSCSI.iSCSIResiduals.Write10Residuals",
                 "iSCSI.iSCSITMF.AbortTaskSimpleAsync"}
    assert essential <= {r.name for r in passed}, iscsi_compliance.markdown(results)
    if os.environ.get("SYNCD_ISCSI_REPORT"):  # the README's table: SYNCD_ISCSI_REPORT=FILE pytest ...
        with open(os.environ["SYNCD_ISCSI_REPORT"], "w") as f:
            f.write(iscsi_compliance.markdown(results, KNOWN))
