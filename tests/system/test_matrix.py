"""The failure matrices of the seed, automated: the Active Sync list with non-uniform hosts
(plus the witness cases) and the Active Peer Persistence list with uniform hosts.

Each scenario builds a fresh rig of five network namespaces (tests/system/matrix.py): arrays A
and B on loop devices, witness W, hosts a and b running a verifying write workload that also
samples the ALUA state it is shown. Non-uniform: each host connects to its local array only
(proximity all). Uniform: each host runs the host shim with a path to both arrays (proximity by
site) and the workload writes through the shim. The fault is injected for real, held, healed;
then the test checks what the seed promises (uniform: no application I/O error at any host the
fault does not take down), that no acknowledged write of either host is missing on either
replica, that the replicas are identical, that no epoch ever had two serving primaries, and
records each host's ALUA transitions, longest pause and slowest write.

The witness rows run a second time with the witness kept in a three-member etcd cluster
(``etcd:`` rows), with the rows only etcd has: one member down, its leader killed during a
claim, its quorum lost, and an array cut off from it but not from its peer.

Rigs are independent, so the rows run in lanes: SYNCD_MATRIX_LANES rigs at once (default 2),
each host writing SYNCD_MATRIX_RATE writes per second (default 300, 0 for as fast as they
complete, as one lane at full rate runs: ``SYNCD_MATRIX_LANES=1 SYNCD_MATRIX_RATE=0``). Each
test waits for its own row's result, so a row passes or fails under its own name.

Set SYNCD_MATRIX_REPORT=FILE to collect every row as JSON lines (tests/system/matrix_report.py
turns them into the Markdown table of docs/failure-matrix.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from syncd.ctl import call
from syncd.lab.ports import LabError
from syncd.lab.workload import check_file

from .matrix import Matrix, alua_transitions, path_timeline
from .rig import FAST_LINK, first_difference, require_root, require_tool

pytestmark = [pytest.mark.system, pytest.mark.root]

FAST_WITNESS = {"interval": 0.2, "owner_lease": 1.0, "grace": 2.0, "margin": 0.2}
# The product defaults (syncd/config.py, WitnessClientConfig, witness Timing).
DEFAULT_LINK: dict = {}
DEFAULT_WITNESS = {"interval": 0.5, "owner_lease": 3.0, "grace": 4.5, "margin": 0.5}


@dataclass
class Scenario:
    seed: str  # the outcome the seed's Active Sync list promises
    fault: object
    heal: object
    primary: str  # which array is primary once the fault has played out
    epoch: int
    no_error: tuple = ()  # hosts whose application must see no I/O error
    lose: tuple = ()  # hosts that lose access (their array cannot serve them)
    hold: float = 5.0
    link: dict = field(default_factory=lambda: FAST_LINK)
    witness: dict = field(default_factory=lambda: FAST_WITNESS)


def _links(m, names, up):
    for n in names:
        m.set_link(n, up)


def _restart(m, site, sig=signal.SIGTERM):
    m.stop(site, sig)
    m.start_node(site)


def _lost_first_wait(m) -> float:
    """How long the witness is gone before the link is cut in the "witness lost first" rows:
    ``grace`` + 1.5 s for the built-in witness. Kept in etcd, the witness drops the primary only
    once etcd has dropped its key (``EtcdWitnessConfig.owner_heard_for``), so the primary counts
    longer (``WitnessTiming.lost_first_after``): the rows wait that much longer."""
    w = m.witness
    if m.backend != "etcd":
        return w["grace"] + 1.5
    from syncd.lab import etcd as lab_etcd
    from syncd.node.roles import WitnessTiming
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EtcdWitnessConfig

    e = EtcdWitnessConfig(EtcdConfig(("http://x:1",)), "/x", w["interval"], w["owner_lease"], w["grace"],
                          election_timeout=lab_etcd.ELECTION_MS / 1000)
    t = WitnessTiming(w["interval"], w["owner_lease"], w["grace"], link_notice=m.link_opts["path_timeout"])
    etcd_t = WitnessTiming(w["interval"], w["owner_lease"], w["grace"], link_notice=m.link_opts["path_timeout"],
                           owner_heard_for=e.owner_heard_for())
    return w["grace"] + 1.5 + etcd_t.lost_first_after() - t.lost_first_after()


def _witness_then_link(m):
    m.stop("W")
    time.sleep(_lost_first_wait(m))
    _links(m, ["rep0", "rep1"], False)


def _heal_witness_then_link(m):
    m.start_witness()
    _links(m, ["rep0", "rep1"], True)


def _dc_failure(m):
    m.fail_host("A")
    m.stop("A")
    m.set_link("witA", False)


def _dc_heal(m):
    m.set_link("witA", True)
    m.start_node("A")


def _heal_disk(m):
    m.heal_disk("A")
    _restart(m, "A")


SCENARIOS = {
    "primary array failure": Scenario(
        "automatic failover through the witness; hosts at the secondary are not interrupted; "
        "hosts at the failed array lose access",
        lambda m: m.stop("A"), lambda m: m.start_node("A"), "B", 2, no_error=("B",), lose=("A",)),
    "secondary array failure": Scenario(
        "hosts at the primary are not interrupted; hosts at the failed secondary lose access",
        lambda m: m.stop("B"), lambda m: m.start_node("B"), "A", 1, no_error=("A",), lose=("B",)),
    "replication link failure": Scenario(
        "paths to the secondary go active/optimized -> unavailable; the primary's hosts go on",
        lambda m: _links(m, ["rep0", "rep1"], False), lambda m: _links(m, ["rep0", "rep1"], True),
        "A", 1, no_error=("A",), lose=("B",)),
    "RAID set / metadata failure (primary)": Scenario(
        "paths to the failed array go unavailable, the group stops there, automatic failover to "
        "the secondary",
        lambda m: m.fail_disk("A"), _heal_disk, "B", 2, no_error=("B",), lose=("A",)),
    "host disconnect": Scenario(
        "the disconnected host's I/O stops; everything else goes on",
        lambda m: m.set_link("sanA", False), lambda m: m.set_link("sanA", True), "A", 1,
        no_error=("B",), lose=("A",)),
    "primary array reboot/shutdown": Scenario(
        "automatic failover; hosts at the secondary go on; hosts at the rebooting array lose access",
        lambda m: m.stop("A", signal.SIGTERM), lambda m: m.start_node("A"), "B", 2,
        no_error=("B",), lose=("A",)),
    "secondary array reboot/shutdown": Scenario(
        "hosts at the primary go on; hosts at the rebooting secondary lose access",
        lambda m: m.stop("B", signal.SIGTERM), lambda m: m.start_node("B"), "A", 1,
        no_error=("A",), lose=("B",)),
    "cluster server failure": Scenario(
        "the failed server's applications stop (restarted elsewhere by the cluster); RPO 0",
        lambda m: m.fail_host("A"), lambda m: None, "A", 1, no_error=("B",)),
    "data center failure": Scenario(
        "automatic failover of the failed array's groups; hosts of the failed site are lost",
        _dc_failure, _dc_heal, "B", 2, no_error=("B",)),
    "witness failure": Scenario(
        "nothing changes: mirroring and host I/O go on at both sites",
        lambda m: m.stop("W"), lambda m: m.start_witness(), "A", 1, no_error=("A", "B")),
    "witness failure, then link failure": Scenario(
        "the pre-elected primary goes on; the secondary stops",
        _witness_then_link, _heal_witness_then_link, "A", 1, no_error=("A",), lose=("B",)),
    "isolated primary": Scenario(
        "the secondary fails over through the witness; the isolated primary enters failsafe",
        lambda m: _links(m, ["rep0", "rep1", "witA"], False), lambda m: _links(m, ["rep0", "rep1", "witA"], True),
        "B", 2, no_error=("B",), lose=("A",)),
    "isolated secondary": Scenario(
        "the primary goes on alone; the isolated secondary stops serving",
        lambda m: _links(m, ["rep0", "rep1", "witB"], False), lambda m: _links(m, ["rep0", "rep1", "witB"], True),
        "A", 1, no_error=("A",), lose=("B",)),
    "primary array failure (default timeouts)": Scenario(
        "as primary array failure, with the product's default timeouts",
        lambda m: m.stop("A"), lambda m: m.start_node("A"), "B", 2, no_error=("B",), lose=("A",),
        hold=9.0, link=DEFAULT_LINK, witness=DEFAULT_WITNESS),
}


def _switchover(m):
    call(m.admin("A"), "setrcopygroup", {"action": "switchover", "group": "rcg1"}, timeout=30)


_APP = "RPO 0 and RTO 0: "
# The seed's Active Peer Persistence list (uniform hosts, each connected to both arrays through
# the host shim), plus the secondary reboot of the Active Sync list, a planned switchover and
# the isolation rows.
UNIFORM = {
    "primary array failure": Scenario(
        _APP + "automatic transparent failover; hosts go on over their paths to the secondary",
        lambda m: m.stop("A"), lambda m: m.start_node("A"), "B", 2, no_error=("A", "B")),
    "secondary array failure": Scenario(
        _APP + "paths to the secondary are lost; hosts use their non-optimized paths to the primary",
        lambda m: m.stop("B"), lambda m: m.start_node("B"), "A", 1, no_error=("A", "B")),
    "replication link failure": Scenario(
        _APP + "paths to the secondary go unavailable; hosts use their non-optimized paths to the primary",
        lambda m: _links(m, ["rep0", "rep1"], False), lambda m: _links(m, ["rep0", "rep1"], True),
        "A", 1, no_error=("A", "B")),
    "RAID set / metadata failure (primary)": Scenario(
        _APP + "paths to the failed array go unavailable, automatic transparent failover",
        lambda m: m.fail_disk("A"), _heal_disk, "B", 2, no_error=("A", "B")),
    "host disconnect (host a from array A)": Scenario(
        _APP + "the host uses its non-optimized paths to the other array",
        lambda m: m.set_link("sanA", False), lambda m: m.set_link("sanA", True), "A", 1, no_error=("A", "B")),
    "primary array reboot/shutdown": Scenario(
        _APP + "the secondary takes the groups over transparently",
        lambda m: m.stop("A", signal.SIGTERM), lambda m: m.start_node("A"), "B", 2, no_error=("A", "B")),
    "secondary array reboot/shutdown": Scenario(
        _APP + "hosts use their paths to the primary",
        lambda m: m.stop("B", signal.SIGTERM), lambda m: m.start_node("B"), "A", 1, no_error=("A", "B")),
    "cluster server failure": Scenario(
        "the failed server's applications stop (restarted elsewhere by the cluster); RPO 0",
        lambda m: m.fail_host("A"), lambda m: None, "A", 1, no_error=("B",)),
    "data center failure": Scenario(
        "automatic failover; the failed site's servers are lost (RTO > 0 for their VMs), RPO 0",
        _dc_failure, _dc_heal, "B", 2, no_error=("B",)),
    "planned switchover under load": Scenario(
        _APP + "the group moves to the other array while both hosts write",
        _switchover, lambda m: None, "B", 2, no_error=("A", "B")),
    # DESIGN.md section 5's witness rows, with uniform hosts.
    "isolated primary": Scenario(
        "the secondary fails over through the witness, the isolated primary enters failsafe; "
        "hosts move to the new primary",
        lambda m: _links(m, ["rep0", "rep1", "witA"], False), lambda m: _links(m, ["rep0", "rep1", "witA"], True),
        "B", 2, no_error=("A", "B")),
    "isolated secondary": Scenario(
        "the primary goes on alone, the isolated secondary stops serving; hosts use the primary",
        lambda m: _links(m, ["rep0", "rep1", "witB"], False), lambda m: _links(m, ["rep0", "rep1", "witB"], True),
        "A", 1, no_error=("A", "B")),
    "primary array failure (default timeouts)": Scenario(
        _APP + "as primary array failure, with the product's default timeouts",
        lambda m: m.stop("A"), lambda m: m.start_node("A"), "B", 2, no_error=("A", "B"),
        hold=9.0, link=DEFAULT_LINK, witness=DEFAULT_WITNESS),
}

def _etcd_member_then_primary(m):
    old = m.etcd_leader()
    m.fail_etcd_member(old)  # the leader: the two left must elect another
    # Then the primary fails, once the two members have a leader and A has renewed its lease
    # with it: a new leader extends every lease by its election timeout (the row "leader killed
    # during the claim" is the one where the two faults overlap).
    m.wait(lambda: _new_etcd_leader(m, old), 10, "a new etcd leader")
    time.sleep(1.0)
    m.stop("A")


def _new_etcd_leader(m, old: int) -> bool:
    try:
        return m.etcd_leader() != old
    except LabError:  # no leader yet
        return False


def _etcd_leader_during_claim(m):
    m.stop("A")
    # B asks the witness to take the group as soon as its link to A drops, and goes on asking
    # until A's lease in etcd has run out: kill the leader in the middle of that.
    time.sleep(m.witness["owner_lease"] / 2)
    before = m.group("B")
    leader = m.etcd_leader()
    m.fail_etcd_member(leader)
    m.note = f"leader etcd{leader} killed while B was {before['role']} at epoch {before['epoch']}"


def _etcd_heal_members(m):
    m.start_witness()  # every member that is down starts again on its data


def _etcd_quorum_then_link(m):
    m.fail_etcd_quorum()
    time.sleep(_lost_first_wait(m))
    _links(m, ["rep0", "rep1"], False)


def _etcd_heal_quorum_then_link(m):
    m.start_witness()
    _links(m, ["rep0", "rep1"], True)


# DESIGN.md section 5: an array that loses the witness but not its peer changes nothing.
CUT_OFF = Scenario(
    "nothing changes: the primary goes on mirroring; the witness is needed only when the peer is lost",
    lambda m: m.set_link("witA", False), lambda m: m.set_link("witA", True), "A", 1, no_error=("A", "B"))
SCENARIOS["primary cut off from the witness, not from its peer"] = CUT_OFF

# The witness rows again, with the witness kept in etcd, and etcd's own faults.
ETCD = {n: SCENARIOS[n] for n in (
    "primary array failure", "RAID set / metadata failure (primary)", "primary array reboot/shutdown",
    "data center failure", "witness failure", "witness failure, then link failure", "isolated primary",
    "isolated secondary", "primary cut off from the witness, not from its peer")}
ETCD.update({
    "one etcd member down, then primary array failure": Scenario(
        "failover is still automatic: two of three members are a quorum",
        _etcd_member_then_primary, lambda m: (_etcd_heal_members(m), m.start_node("A")), "B", 2,
        no_error=("B",), lose=("A",)),
    # A new etcd leader extends every lease by its election timeout, so the takeover can take
    # longer than the test's io_timeout (2 s): writes B held that long fail (and are redone).
    "etcd leader killed during the claim": Scenario(
        "exactly one array wins: the secondary takes the group once etcd has a leader again",
        _etcd_leader_during_claim, lambda m: (_etcd_heal_members(m), m.start_node("A")), "B", 2,
        lose=("A",), hold=8.0),
    "etcd quorum lost, then link failure": Scenario(
        "as witness failure, then link failure: the pre-elected primary goes on; the secondary stops",
        _etcd_quorum_then_link, _etcd_heal_quorum_then_link, "A", 1, no_error=("A",), lose=("B",)),
})

CASES = ([("non-uniform", n, "builtin") for n in SCENARIOS] + [("uniform", n, "builtin") for n in UNIFORM]
         + [("non-uniform", n, "etcd") for n in ETCD])
IDS = [f"{t}:{n}" if b == "builtin" else f"{b}:{n}" for t, n, b in CASES]
LANES = max(1, int(os.environ.get("SYNCD_MATRIX_LANES", "2")))
RATE = float(os.environ.get("SYNCD_MATRIX_RATE", "300"))


@dataclass
class Outcome:
    root: Path
    row: dict | None = None
    printed: str = ""


@pytest.fixture(scope="module")
def lanes(request, tmp_path_factory):
    """Starts every selected row at once in LANES worker threads, in CASES order; each test
    then waits for its own."""
    require_root()
    require_tool("losetup")
    chosen = [item.callspec.params for item in request.session.items
              if item.module is request.module and getattr(item, "originalname", "") == "test_failure_scenario"]
    pool = ThreadPoolExecutor(max_workers=LANES, thread_name_prefix="matrix")
    futures: dict[tuple, Future] = {}
    for params in chosen:
        case = (params["topology"], params["name"], params["backend"])
        root = tmp_path_factory.mktemp("matrix")
        futures[case] = pool.submit(run_case, root, *case)
    yield futures
    for f in futures.values():
        f.cancel()
    pool.shutdown(wait=True)


@pytest.mark.parametrize("topology,name,backend", CASES, ids=IDS)
def test_failure_scenario(lanes, topology, name, backend):
    out: Outcome = lanes[(topology, name, backend)].result()
    print(out.printed)
    if out.row is None:
        for f in sorted(out.root.glob("*.log")) + sorted(out.root.glob("etcd/*.log")):
            print(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        pytest.fail(out.printed.splitlines()[-1] if out.printed else f"{name}: no result", pytrace=False)
    # A passed row's volumes and logs go at once (about 400 MB a row); a failed row keeps them.
    shutil.rmtree(out.root, ignore_errors=True)


def run_case(root: Path, topology: str, name: str, backend: str) -> Outcome:
    """One row on a rig of its own: its Outcome has the row, or the failure's text."""
    import traceback

    out = Outcome(root)
    try:
        out.row = _run(root, topology, name, backend)
        out.printed = json.dumps(out.row)
    except BaseException as e:  # noqa: BLE001 - handed to the row's test, which fails with it
        out.printed = "".join(traceback.format_exception(e)) + f"{type(e).__name__}: {e}"
    return out


def _run(tmp_path: Path, topology: str, name: str, backend: str) -> dict:
    sc = (UNIFORM if topology == "uniform" else ETCD if backend == "etcd" else SCENARIOS)[name]
    n = (os.getpid() * 7 + CASES.index((topology, name, backend))) % 1000
    m = Matrix(tmp_path, format(n, "x"), n, sc.link, sc.witness, topology=topology, backend=backend, rate=RATE)
    try:
        m.up()
        for s in ("A", "B"):
            m.start_host(s)
        m.start_sampling()
        m.wait_hosts()
        time.sleep(1.0)  # both hosts write and sample before the fault
        t_fault = time.monotonic()
        sc.fault(m)
        time.sleep(sc.hold)
        during = {}
        for s in ("A", "B"):
            try:
                during[s] = m.group(s)
            except Exception:
                during[s] = None
        sc.heal(m)
        t_heal = time.monotonic()
        prim = sc.primary  # the array that took (or kept) the group keeps it after the heal
        m.wait(lambda: m.group(prim)["role"] == "primary" and m.group(prim)["peer_mode"] == "attached"
               and all(v["sync_status"] == "synced" for v in m.group(prim)["volumes"]), 90, "resync after heal")
        m.wait(lambda: all(m.group(s)["serving"] for s in ("A", "B")), 20, "both arrays serving again")
        time.sleep(2.5)  # hosts reconnect (a cut TCP connection needs its probe timeout) and write again
        m.stop_sampling()
        hist = {s: m.stop_host(s) for s in ("A", "B")}

        # What the seed promises, while the fault held.
        g = during[sc.primary]
        assert g is not None and g["role"] == "primary" and g["epoch"] == sc.epoch and g["serving"], \
            f"{name}: expected {sc.primary} primary at epoch {sc.epoch}, saw {g}"
        for s in sc.no_error:
            h, _ = hist[s]
            assert h.errors == [], f"{name}: host {s} saw I/O errors: {h.errors[:3]}"
            assert any(t > t_fault + 1.0 for t in h.acked_times), f"{name}: host {s} stopped writing"
        for s in sc.lose:
            h, samples = hist[s]
            in_fault = [x for x in samples if t_fault + 0.5 < x[0] < t_heal]
            assert h.errors or all(x[1] in (None, 3) for x in in_fault), f"{name}: host {s} kept access"
            assert any(x[1] in (None, 3) for x in in_fault), f"{name}: host {s} never saw its path unavailable"
        # Before the fault both paths were active/optimized; after recovery they are again.
        for s in ("A", "B"):
            samples = hist[s][1]
            before = [x[1] for x in samples if x[0] < t_fault]
            assert before and set(before) == {0}, f"{name}: host {s} saw {set(before)} before the fault"
            assert samples[-1][1] == 0, f"{name}: host {s} ends with ALUA {samples[-1]}"
        # Never two serving primaries in one epoch.
        for epoch, sites in m.primaries_per_epoch().items():
            assert len(sites) == 1, f"{name}: epoch {epoch} had serving primaries on {sites}"
        # No acknowledged write lost, replicas identical after recovery.
        lost = 0
        for s in ("A", "B"):
            for w, hs in ((1, "A"), (2, "B")):
                problems = check_file(m.loops[s], hist[hs][0], writer=w)
                lost += len(problems)
                assert problems == [], \
                    f"{name}: replica {s} is missing acknowledged writes of host {hs}: {problems[:3]}"
        assert first_difference(m.loops["A"], m.loops["B"]) is None, f"{name}: replicas differ"

        row = {
            "topology": topology, "scenario": name, "expected": sc.seed,
            "primary_during": f"{sc.primary} (epoch {g['epoch']})",
            "alua": {s: alua_transitions(hist[s][1], t_fault) for s in ("A", "B")},
            "errors": {s: len(hist[s][0].errors) for s in ("A", "B")},
            "interruption_s": {s: round(hist[s][0].longest_pause(since=t_fault), 2) for s in ("A", "B")},
            "slowest_write_s": {s: round(hist[s][0].slowest, 2) for s in ("A", "B")},
            "paths": {s: path_timeline(m.paths[s], t_fault) for s in ("A", "B")} if topology == "uniform" else None,
            "acked": {s: hist[s][0].acked_count() for s in ("A", "B")},
            "lost_acked_writes": lost,
            "timings": "defaults" if sc.link is DEFAULT_LINK else "fast test timings",
            "witness": backend, "note": m.note, "rate": RATE,
        }
        out = os.environ.get("SYNCD_MATRIX_REPORT")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row
    finally:
        m.teardown()
