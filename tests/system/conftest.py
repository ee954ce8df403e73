import shutil

import pytest

from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_up

from .rig import FAST_LINK, WITNESS, require_root, require_tool, show, wait_for, wait_witness_knows_in_sync

# The most the system tests hold on disk at once (measured: 2.2 GB over a whole run, each
# passed test's directory removed as it ends), with room to spare.
DISK_NEEDED = 4 << 30


@pytest.fixture(scope="session", autouse=True)
def disk_space(tmp_path_factory):
    """Stops the run at once, saying why, where the temporary directory's file system has less
    room than the system tests need: they would fail one after another with I/O errors."""
    base = tmp_path_factory.getbasetemp()
    free = shutil.disk_usage(base).free
    if free < DISK_NEEDED:
        pytest.exit(f"{base}: {free / 2**30:.1f} GiB free, the system tests need {DISK_NEEDED / 2**30:.0f} GiB "
                    "(volumes, logs and etcd data of the labs): free some space", returncode=1)


@pytest.fixture
def lab(tmp_path):
    """A running two-node lab (file-backed volumes, 2 link paths), synced, with fast timeouts."""
    d = tmp_path / "lab"
    try:
        info = lab_up(str(d), size="32MiB", nvolumes=2, npaths=2, link_opts=FAST_LINK, timeout=60)
    except Exception:
        for f in d.glob("*.log"):
            print(f"--- {f}\n{f.read_text()[-3000:]}")
        lab_down(str(d)) if (d / "lab.json").exists() else None
        raise
    info["ctl"] = lambda node, cmd, **args: call(info["nodes"][node]["admin_socket"], cmd, args)
    yield info
    lab_down(str(d))
    for f in sorted(d.glob("*.log")):
        text = f.read_text()
        if "Traceback" in text:
            print(f"--- {f} has a traceback:\n{text[-5000:]}")


@pytest.fixture
def wlab(tmp_path):
    """A running two-node lab with one volume and a quorum witness (fast timeouts), both arrays
    reaching the witness and the witness told that B is in sync."""
    d = tmp_path / "lab"
    try:
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS, timeout=60)
    except Exception:
        for f in d.glob("*.log"):
            print(f"--- {f}\n{f.read_text()[-3000:]}")
        raise
    wait_for(lambda: show(lab, "A")["witness"]["reachable"] and show(lab, "B")["witness"]["reachable"], what="witness")
    wait_witness_knows_in_sync(lab)
    yield lab
    lab_down(str(d))
    for f in sorted(d.glob("*.log")):
        if "Traceback" in f.read_text():
            print(f"--- {f}\n{f.read_text()[-4000:]}")


@pytest.fixture
def looplab(tmp_path):
    """A two-node lab on loop devices (root) with a quorum witness: `lab fail disk` shrinks one."""
    require_root()
    require_tool("losetup")
    d = tmp_path / "lab"
    try:
        lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                     loop=True, timeout=60)
    except Exception:
        for f in d.glob("*.log"):
            print(f"--- {f}\n{f.read_text()[-3000:]}")
        if (d / "lab.json").exists():
            lab_down(str(d))
        raise
    yield lab
    lab_down(str(d))


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory):
    """One small two-node lab per test module (1 volume of 4 MiB, 1 path, fast timeouts), for
    tests that only ask the nodes and must leave them as they found them."""
    lab = lab_up(str(tmp_path_factory.mktemp("small") / "lab"), size="4MiB", nvolumes=1, npaths=1,
                 link_opts=FAST_LINK, timeout=60)
    yield lab
    lab_down(lab["dir"])
