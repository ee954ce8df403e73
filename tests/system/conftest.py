import pytest

from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_up

from .rig import FAST_LINK


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
