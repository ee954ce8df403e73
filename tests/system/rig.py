"""Building blocks for system tests: tools, root, a running lab, replica comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import trio

from syncd.ctl import call
from syncd.lab.rig import witness_knows_in_sync

from ..guard import unavailable

FAST_LINK = {"ping_interval": 0.1, "path_timeout": 0.6, "io_timeout": 2.0, "lease": 1.0, "lease_margin": 0.2}
WITNESS = {"interval": 0.2, "owner_lease": 1.0, "grace": 2.0, "margin": 0.2}


def require_tool(*names: str) -> None:
    """Fail, naming them, when tools are not installed (./scripts/setup installs them)."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        unavailable(f"missing tools: {', '.join(missing)} (./scripts/setup installs them)")


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("this test needs root", "SYNCD_REQUIRE_ROOT")


def run(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


_ZEROES = bytes(1 << 20)


def file_digest(path: str) -> str:
    """A digest of the bytes the file (or device) reads as. Holes are hashed as the zeroes they
    read as without being read (a thin 4 GiB volume costs a fraction of a second)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size or f.seek(0, os.SEEK_END)
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: holes to the end (or a device that cannot say: read it)
                data_at = size if os.path.isfile(path) else pos
            while pos < data_at:
                n = min(len(_ZEROES), data_at - pos)
                h.update(_ZEROES[:n] if n < len(_ZEROES) else _ZEROES)
                pos += n
            if pos >= size:
                break
            hole_at = os.lseek(f.fileno(), pos, os.SEEK_HOLE) if os.path.isfile(path) else size
            f.seek(pos)
            while pos < hole_at:
                chunk = f.read(min(1 << 20, hole_at - pos))
                if not chunk:
                    return h.hexdigest()
                h.update(chunk)
                pos += len(chunk)
    return h.hexdigest()


def first_difference(a: str, b: str) -> int | None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                for i, (p, q) in enumerate(zip(x, y, strict=False)):  # one may be shorter: past its end they differ
                    if p != q:
                        return off + i
                return off + min(len(x), len(y))
            if not x:
                return None
            off += len(x)


def assert_replicas_identical(lab: dict, volume: str) -> None:
    a = lab["nodes"]["A"]["volumes"][volume]["path"]
    b = lab["nodes"]["B"]["volumes"][volume]["path"]
    diff = first_difference(a, b)
    assert diff is None, f"replicas of {volume} differ first at byte {diff} ({a} vs {b})"


def show(lab: dict, site: str) -> dict:
    """showrcopy of one site's node."""
    with open(os.path.join(lab["dir"], "lab.json")) as f:
        return call(json.load(f)["nodes"][site]["admin_socket"], "showrcopy")


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll another process (its admin API, its files) until ``pred()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_witness_knows_in_sync(lab: dict, timeout: float = 30.0) -> None:
    """Until the lab's witness has heard from the primary, at its epoch, that its peer is in sync
    (``syncd.lab.rig.witness_knows_in_sync``): only then may it give the group to the peer, or
    allow a switchover. Waited for rather than slept for: a fixed pause is too short on a loaded
    machine and mostly wasted on a quiet one."""
    wait_for(lambda: witness_knows_in_sync(lab), timeout,
             "the witness to hear from the primary that its peer is in sync")


def syncctl(*args: str) -> subprocess.CompletedProcess:
    """``syncctl ARGS`` as a script runs it: stdout a pipe, output captured, never raises."""
    return subprocess.run([sys.executable, "-m", "syncd.ctl", *args], capture_output=True, text=True, timeout=120)


async def etcd_pair_rounds(wa, wb, group: str = "rcg1", rounds: int = 3) -> None:
    """A (owner of ``group`` at epoch 1, its peer in sync) and B driven straight on
    ``etcd_backend.EtcdWitness`` for a few rounds, each a report and then the array's sign of
    life, as their clients do: B has seen A's key in etcd move."""
    for _ in range(rounds):
        assert (await wa.report(group, 1, peer_alive=True, peer_in_sync=True)).granted
        await wa.renew({group: (1, True)})
        await wb.report(group, 1, peer_alive=True, peer_in_sync=False)
        await wb.renew({})
        await trio.sleep(0.1)
