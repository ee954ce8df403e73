"""The live fuzzer (``syncd lab fuzz``) in CI's budget: recordings of real sessions on every port
of a running lab (two nodes, witness, link relay), mutated and replayed for a fixed time; then
every daemon still serves, roles and epochs are as before, the volumes the fuzzer cannot write
are byte-identical to before at both nodes and the fuzz volume's replicas agree.

SYNCD_FUZZ_SECONDS sets the budget (default 20), SYNCD_FUZZ_SEED the cases (default 11).
By hand, longer: ``syncd lab fuzz --seconds 600 --seed 2``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from syncd.lab.fuzz import PORTS, fuzz_lab, print_fuzz
from syncd.lab.rig import lab_down, lab_up

from .rig import require_tool

pytestmark = pytest.mark.system


def link_authenticated(lab: dict) -> bool:
    """Whether the lab's replication link is configured to authenticate its peer (a key, a
    certificate) and not declared insecure. An unauthenticated link takes any recorded frame
    it is sent (issue 11, item 1): fuzzing it changes the replicas by design."""
    link = tomllib.loads(Path(lab["nodes"]["B"]["config"]).read_text())["link"]
    if link.get("insecure"):
        return False
    return any(k in link for k in ("key", "key_file")) or any(k.startswith(("tls", "psk")) for k in link)


def test_mutated_real_sessions_on_every_port_leave_every_daemon_serving_and_nothing_changed(tmp_path):
    require_tool("nbdinfo", "nbdsh", "nbdcopy", "qemu-img")
    seconds = float(os.environ.get("SYNCD_FUZZ_SECONDS", "20"))
    seed = int(os.environ.get("SYNCD_FUZZ_SEED", "11"))
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="16MiB", nvolumes=3, npaths=2, witness={}, timeout=120)
    try:
        ports = PORTS if link_authenticated(lab) else tuple(p for p in PORTS if p != "link")
        if "link" not in ports:
            print("the lab's replication link is not authenticated: its port is not fuzzed here "
                  "(syncd lab fuzz --ports link shows what an unauthenticated link accepts)")
        res = fuzz_lab(lab, seconds, seed, ports, oracle_every=15, progress=print)
    finally:
        lab_down(str(d))
    print_fuzz(res)
    assert res.problems == []
    assert res.findings == [], "\n".join(f.line() for f in res.findings)
    assert res.oracles >= 2
    for p in ports:
        st = res.stats[p]
        assert st.cases >= 10 and st.bytes_sent > 0, (p, st)
    # The mutations reached the daemons' error paths, not only a closed door.
    assert res.stats["nbd"].refusals > 0 and res.stats["admin"].refusals > 0, res.stats
