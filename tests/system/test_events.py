"""The event stream and hooks (issue 12, item 2) on a real lab: `syncctl events --json` at both
nodes sees an event for every state change of a failover, a link cut and its repair, a
switchover and a verify that finds the replicas different; what the stream says, replayed, is
what the node shows (showrcopy, showpaths). Hooks run with the facts in their environment, and
a hook that fails or hangs is logged and changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from syncd.ctl import EXIT, call
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_fail, lab_heal, lab_kill, lab_start
from syncd.node.events import IDENTITY, Event

from .rig import show, wait_for

pytestmark = pytest.mark.system
SYNCCTL = os.path.join(os.path.dirname(sys.executable), "syncctl")
MiB = 1 << 20


class Stream:
    """`syncctl events --json` at one node, read by a thread."""

    def __init__(self, lab: dict, site: str) -> None:
        self.site = site
        self.proc = subprocess.Popen([SYNCCTL, "--lab", lab["dir"], "--node", site, "events", "--json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        wait_for(lambda: any(e["action"] == "snapshot-end" for e in self.events), what=f"snapshot at {site}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def seen(self, kind: str, action: str | None = None, **facts) -> list[dict]:
        return [e for e in list(self.events) if e["kind"] == kind and (action is None or e["action"] == action)
                and all(e.get(k) == v for k, v in facts.items())]

    def wait(self, kind: str, action: str | None = None, timeout: float = 30, **facts) -> dict:
        wait_for(lambda: self.seen(kind, action, **facts), timeout=timeout,
                 what=f"{action or 'any'} {kind} {facts} at {self.site}; seen: {self.lines()[-15:]}")
        return self.seen(kind, action, **facts)[0]

    def lines(self) -> list[str]:
        return [" ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "old")) for e in list(self.events)]

    def replay(self) -> dict:
        """The objects the stream describes: its snapshot with every later event applied."""
        objs: dict[tuple, dict] = {}
        for e in list(self.events):
            if e["kind"] not in IDENTITY:
                continue
            key = (e["kind"],) + tuple(e[k] for k in IDENTITY[e["kind"]])
            if e["action"] == "destroy":
                objs.pop(key, None)
            else:
                objs[key] = e
        return objs

    def stop(self) -> int:
        """Ctrl-C: syncctl exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=10)
        self._t.join(timeout=5)
        return rc


def matches_node(st: Stream, lab: dict, site: str) -> bool:
    """What the stream says, replayed, is the node's state (its admin API, an independent
    reader): role, epoch, peer mode, failsafe, split brain, serving, volume sync states, link
    and path states, the witness, and the ALUA state of every (host, volume)."""
    r = show(lab, site)
    objs = st.replay()
    sock = lab["nodes"][site]["admin_socket"]
    for g in r["groups"]:
        e = objs[("group", g["name"])]
        want = (g["role"], g["epoch"], g.get("peer_mode") or g.get("mode"), g["status"] == "failsafe",
                g["split_brain"] is not None, g["serving"])
        if (e["role"], e["epoch"], e["mode"], e["failsafe"], e["split_brain"], e["serving"]) != want:
            return False
        for v in g["volumes"]:
            if objs[("volume", g["name"], v["name"])]["sync"] != v["sync_status"]:
                return False
    lk = r["link"]
    if objs[("link", lk["peer"])]["state"] != lk["state"]:
        return False
    if any(objs[("path", lk["peer"], p["index"])]["state"] != p["state"] for p in lk["paths"]):
        return False
    if r["witness"] is not None and (objs[("witness", r["witness"]["address"])]["state"] == "reachable") \
            != r["witness"]["reachable"]:
        return False
    paths = call(sock, "showpaths")["paths"]
    alua = {k: e for k, e in objs.items() if k[0] == "alua"}
    return len(alua) == len(paths) and all(
        alua[("alua", p["group"], p["volume"], p["host"])]["state"] == p["state"] for p in paths)


def assert_stream_matches(st: Stream, lab: dict, site: str) -> None:
    wait_for(lambda: matches_node(st, lab, site), timeout=15,
             what=f"the event stream at {site} to describe the node's state; stream: {st.lines()[-20:]}")


def plain(d: dict) -> str:
    """A JSON event line as syncctl prints it without --json."""
    facts = tuple((k, v) for k, v in d.items() if k not in ("seq", "time", "action", "kind", "old"))
    return Event(d["seq"], d["time"], d["action"], d["kind"], facts, tuple((d.get("old") or {}).items())).to_line()


def corrupt(path: str, offset: int) -> None:
    """Bit rot behind the node's back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xba" * 4096, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_every_state_change_of_a_failover_with_the_witness_is_an_event_at_both_nodes(wlab):
    a, b = Stream(wlab, "A"), Stream(wlab, "B")
    for st, site in ((a, "A"), (b, "B")):
        assert_stream_matches(st, wlab, site)
        assert st.seen("group", "exists", group="rcg1") and st.seen("alua", "exists", host="lab")
    lab_kill(wlab["dir"], "A")
    assert a.proc.wait(timeout=10) == EXIT["unreachable"]  # its node is gone: not a clean end
    b.wait("link", "change", peer="A", state="down")
    assert {e["path"] for e in b.seen("path", "change", state="down")} == {0, 1}
    took = b.wait("group", "change", role="primary", epoch=2, cause="failover")
    assert took["old"]["role"] == "secondary" and took["old"]["epoch"] == 1
    b.wait("alua", "change", host="lab", volume="vv1", state="active/optimized", epoch=2)
    assert_stream_matches(b, wlab, "B")
    # Writes at B alone, one region in every MiB: A's return resyncs them run by run.
    for i in range(16):
        host_write(wlab, "B", i * MiB)

    lab_start(wlab["dir"], "A")
    a2 = Stream(wlab, "A")
    b.wait("link", "change", peer="A", state="up")
    b.wait("resync", "create", group="rcg1")
    done = b.wait("resync", "destroy", group="rcg1", timeout=60)
    assert (done["result"], done["percent"]) == ("done", 100.0)
    progress = [e["percent"] for e in b.seen("resync", "change", volume="vv1")]
    assert progress == sorted(progress) and any(0 < p < 100 for p in progress), progress
    wait_for(lambda: show(wlab, "A")["groups"][0]["volumes"][0]["sync_status"] == "synced", what="A synced")
    for st, site in ((a2, "A"), (b, "B")):
        assert_stream_matches(st, wlab, site)
    g = a2.replay()[("group", "rcg1")]
    assert (g["role"], g["epoch"]) == ("secondary", 2)
    # Sequence numbers only go up, and the snapshot came first.
    seqs = [e["seq"] for e in b.events if e["action"] not in ("exists", "snapshot-end")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert b.events.index(b.seen("", "snapshot-end")[0]) < b.events.index(took)
    assert a2.stop() == 0 and b.stop() == 0
    print("syncctl events at B during the failover and A's return:")
    for e in b.events:
        print("  " + plain(e))
    log_b = Path(wlab["nodes"]["B"]["log"]).read_text()
    assert "WARNING syncd.group: group rcg1: failover: now primary at epoch 2" in log_b


def test_link_cut_and_repair_switchover_and_differing_replicas_are_events(wlab):
    a, b = Stream(wlab, "A"), Stream(wlab, "B")
    # A reader that goes away (`syncctl events | head -1`): syncctl ends cleanly at its next line.
    head = subprocess.Popen([SYNCCTL, "--lab", wlab["dir"], "--node", "A", "events"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert head.stdout.readline().startswith("exists node A ")
    head.stdout.close()
    proxy_command(wlab["link"]["control"], "cut", paths=[0, 1])
    assert head.wait(timeout=15) == 0 and head.stderr.read() == ""
    for st, peer in ((a, "B"), (b, "A")):
        st.wait("link", "change", peer=peer, state="down")
        assert {e["path"] for e in st.seen("path", "change", state="down")} == {0, 1}  # the link is down after both
    a.wait("group", "change", mode="detached")
    b.wait("group", "change", serving=False)
    b.wait("alua", "change", host="lab", state="unavailable")
    assert_stream_matches(a, wlab, "A")
    assert_stream_matches(b, wlab, "B")
    proxy_command(wlab["link"]["control"], "heal", paths=[0, 1])
    for st, peer in ((a, "B"), (b, "A")):
        st.wait("link", "change", peer=peer, state="up")
        st.wait("path", "change", path=0, state="up")
        st.wait("path", "change", path=1, state="up")
    a.wait("resync", "create", group="rcg1")
    assert a.wait("resync", "destroy", group="rcg1", timeout=60)["result"] == "done"
    a.wait("group", "change", mode="attached")
    b.wait("alua", "change", host="lab", state="active/optimized")
    # A planned switchover: both sides say so. (Refused, changing nothing, until A's reports
    # have told the witness that B is in sync again.)
    wait_for(lambda: call(wlab["nodes"]["A"]["admin_socket"], "setrcopygroup",
                          {"action": "switchover", "group": "rcg1"}, timeout=60), what="switchover to B")
    sa = a.wait("group", "change", role="secondary", cause="switchover")
    sb = b.wait("group", "change", role="primary", cause="switchover")
    assert sa["epoch"] == sb["epoch"] == sa["old"]["epoch"] + 1
    assert_stream_matches(a, wlab, "A")
    assert_stream_matches(b, wlab, "B")
    # The replica at A (now the secondary) goes bad: a verify at B says so, once per run.
    corrupt(wlab["nodes"]["A"]["volumes"]["vv1"]["path"], 5 * MiB)
    r = call(wlab["nodes"]["B"]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
    assert r["differing_regions"] == 1
    v = b.wait("verify", group="rcg1", volume="vv1", result="differ")
    assert (v["differing_regions"], v["fixing"]) == (1, False)
    log_b = Path(wlab["nodes"]["B"]["log"]).read_text()
    assert "ERROR syncd.group: group rcg1: verify of vv1: REPLICAS DIFFER: 1 regions differ from A" in log_b
    # Plain mode, snapshot only: the last verify is part of the state.
    out = subprocess.run([SYNCCTL, "--lab", wlab["dir"], "--node", "B", "events", "--now"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "snapshot-end"
    assert any(x.startswith("exists verify rcg1 vv1 peer=A result=differ differing_regions=1 ") for x in lines), lines
    assert any(x.startswith("exists group rcg1 peer=A role=primary ") for x in lines), lines
    assert a.stop() == 0 and b.stop() == 0


HOOK = """#!/bin/sh
{py} -c 'import json, os, sys; json.dump({{k: v for k, v in os.environ.items() if k.startswith("SYNCD_")}},
    open(sys.argv[1] + ".tmp", "w")); os.replace(sys.argv[1] + ".tmp", sys.argv[1])' {out}
echo "hook {name} ran for $SYNCD_GROUP"
{tail}
"""


def restart_with_hooks(lab: dict, site: str, tmp_path: Path, tails: dict[str, str]) -> dict[str, Path]:
    """Give ``site`` a [hooks] section, a script per hook that writes its SYNCD_* environment
    to a file (written aside and renamed: a test that sees the file reads all of it) and then
    runs ``tails[hook]``, and restart it (it must be the secondary, so the primary goes on
    meanwhile); returns the files."""
    outs = {}
    lines = ["", "[hooks]", "timeout = 2", "max_running = 2"]
    for name, tail in tails.items():
        outs[name] = tmp_path / f"{site}-{name}.env.json"
        script = tmp_path / f"{site}-{name}.sh"
        script.write_text(HOOK.format(py=sys.executable, out=outs[name], name=name, tail=tail))
        script.chmod(0o755)
        lines.append(f'{name} = ["{script}"]')
    cfg = Path(lab["nodes"][site]["config"])
    cfg.write_text(cfg.read_text() + "\n".join(lines) + "\n")
    other = "A" if site == "B" else "B"
    assert show(lab, other)["groups"][0]["role"] == "primary"
    lab_kill(lab["dir"], site, signal.SIGTERM)
    lab_start(lab["dir"], site)
    wait_for(lambda: show(lab, other)["groups"][0]["peer_mode"] == "attached", timeout=60, what=f"{site} back in sync")

    def current() -> bool:  # what an automatic failover to it needs: in sync and serving (a lease)
        g = show(lab, site)["groups"][0]
        return g["serving"] and all(v["sync_status"] == "synced" for v in g["volumes"])

    wait_for(current, timeout=60, what=f"{site} in sync and serving")
    return outs


def test_hooks_run_with_the_facts_and_a_failing_or_hanging_hook_changes_nothing(wlab, tmp_path):
    outs = restart_with_hooks(wlab, "B", tmp_path, {
        "failover": "exit 0", "resync_done": "sleep 30", "replicas_differ": "echo no pager >&2; exit 7",
        "failsafe": "exit 0", "split_brain": "exit 0"})
    wait_for(lambda: show(wlab, "B")["witness"]["reachable"], what="witness at B")
    b = Stream(wlab, "B")
    lab_kill(wlab["dir"], "A")  # failover to B: the failover hook
    b.wait("group", "change", role="primary", cause="failover")
    wait_for(lambda: outs["failover"].exists(), what="failover hook ran")
    env = json.loads(outs["failover"].read_text())
    assert {k: env[k] for k in ("SYNCD_EVENT", "SYNCD_NODE", "SYNCD_GROUP", "SYNCD_ROLE", "SYNCD_EPOCH", "SYNCD_PEER",
                                "SYNCD_OLD_ROLE", "SYNCD_CAUSE", "SYNCD_KIND", "SYNCD_ACTION")} == {
        "SYNCD_EVENT": "failover", "SYNCD_NODE": "B", "SYNCD_GROUP": "rcg1", "SYNCD_ROLE": "primary",
        "SYNCD_EPOCH": "2", "SYNCD_PEER": "A", "SYNCD_OLD_ROLE": "secondary", "SYNCD_CAUSE": "failover",
        "SYNCD_KIND": "group", "SYNCD_ACTION": "change"}
    lab_start(wlab["dir"], "A")  # B resyncs A: the resync_done hook, which hangs and is killed
    b.wait("resync", "destroy", result="done", timeout=60)
    wait_for(lambda: outs["resync_done"].exists(), what="resync_done hook ran")
    env = json.loads(outs["resync_done"].read_text())
    assert (env["SYNCD_EVENT"], env["SYNCD_GROUP"], env["SYNCD_RESULT"], env["SYNCD_ROLE"], env["SYNCD_EPOCH"],
            env["SYNCD_PEER"]) == ("resync_done", "rcg1", "done", "primary", "2", "A")
    log = Path(wlab["nodes"]["B"]["log"])
    wait_for(lambda: "hook resync_done" in log.read_text() and "killed after its timeout" in log.read_text(),
             what="the hung hook killed and logged")
    # Replicas found different: the hook fails (exit 7); logged as an error, nothing changes.
    wait_for(lambda: show(wlab, "A")["groups"][0]["volumes"][0]["sync_status"] == "synced", what="A synced")
    corrupt(wlab["nodes"]["A"]["volumes"]["vv1"]["path"], 3 * MiB)
    before = show(wlab, "B")["groups"][0]
    r = call(wlab["nodes"]["B"]["admin_socket"], "checkrcopyvv", {"volume": "vv1"}, timeout=60)
    assert r["differing_regions"] == 1
    wait_for(lambda: "hook replicas_differ" in log.read_text() and "exit status 7" in log.read_text(),
             what="the failing hook logged")
    env = json.loads(outs["replicas_differ"].read_text())
    assert (env["SYNCD_EVENT"], env["SYNCD_VOLUME"], env["SYNCD_RESULT"], env["SYNCD_DIFFERING_REGIONS"]) == (
        "replicas_differ", "vv1", "differ", "1")
    text = log.read_text()
    failed = [x for x in text.splitlines() if "hook replicas_differ" in x]
    assert " ERROR syncd.hooks: " in failed[0] and "exit status 7" in failed[0] and "no pager" in failed[0], failed
    killed = [x for x in text.splitlines() if "hook resync_done" in x]
    assert " ERROR syncd.hooks: " in killed[0] and "hook resync_done ran for rcg1" in killed[0], killed
    ok = [x for x in text.splitlines() if "hook failover" in x]
    assert " INFO syncd.hooks: " in ok[0] and "exit status 0" in ok[0], ok
    after = show(wlab, "B")["groups"][0]
    for k in ("role", "epoch", "status", "peer_mode", "serving", "generation"):
        assert after[k] == before[k], (k, before[k], after[k])
    assert show(wlab, "A")["groups"][0]["role"] == "secondary"
    # No split brain, no failsafe here: those hooks never ran.
    assert not outs["failsafe"].exists() and not outs["split_brain"].exists()
    assert b.stop() == 0


def test_an_isolated_primary_says_failsafe_and_witness_lost_and_runs_its_failsafe_hook(wlab, tmp_path):
    outs = restart_with_hooks(wlab, "B", tmp_path, {"failsafe": "exit 0", "failover": "exit 0"})
    # Refused (nothing changed) until A's reports have told the witness that B is in sync again.
    wait_for(lambda: call(wlab["nodes"]["A"]["admin_socket"], "setrcopygroup",
                          {"action": "switchover", "group": "rcg1"}, timeout=60), what="switchover to B")
    assert show(wlab, "A")["groups"][0]["role"] == "secondary"
    a, b = Stream(wlab, "A"), Stream(wlab, "B")
    wait_for(lambda: show(wlab, "B")["witness"]["reachable"] and show(wlab, "A")["witness"]["reachable"],
             what="witness")
    # B, now primary, loses its peer and the witness at once: failsafe; A takes over.
    proxy_command(wlab["link"]["control"], "cut", paths=[0, 1, *wlab["link"]["witness_relays"]["B"]])
    b.wait("witness", "change", state="unreachable")
    fs = b.wait("group", "change", failsafe=True)
    assert fs["role"] == "primary" and fs["serving"] is False
    b.wait("alua", "change", host="lab", state="unavailable")
    a.wait("group", "change", role="primary", cause="failover")
    wait_for(lambda: outs["failsafe"].exists(), what="failsafe hook ran at B")
    env = json.loads(outs["failsafe"].read_text())
    assert (env["SYNCD_EVENT"], env["SYNCD_NODE"], env["SYNCD_GROUP"], env["SYNCD_FAILSAFE"], env["SYNCD_OLD_FAILSAFE"],
            env["SYNCD_ROLE"]) == ("failsafe", "B", "rcg1", "yes", "no", "primary")
    assert not outs["failover"].exists()  # the failover hook is for the node that takes over (A here)
    log_b = Path(wlab["nodes"]["B"]["log"]).read_text()
    assert "WARNING syncd.group: group rcg1: FAILSAFE" in log_b
    proxy_command(wlab["link"]["control"], "heal", paths=[0, 1, *wlab["link"]["witness_relays"]["B"]])
    b.wait("witness", "change", state="reachable")
    back = b.wait("group", "change", role="secondary", cause="replaced")
    assert back["failsafe"] is False
    wait_for(lambda: show(wlab, "A")["groups"][0]["volumes"][0]["sync_status"] == "synced", timeout=60, what="resync")
    assert_stream_matches(a, wlab, "A")
    assert_stream_matches(b, wlab, "B")
    assert a.stop() == 0 and b.stop() == 0


def test_split_brain_is_an_event_at_both_nodes_an_error_in_the_log_and_runs_the_hook(lab, tmp_path):
    outs = restart_with_hooks(lab, "B", tmp_path, {"split_brain": "exit 0"})
    a, b = Stream(lab, "A"), Stream(lab, "B")
    sock_b = lab["nodes"]["B"]["admin_socket"]
    # Apart, both acknowledge writes (no witness: the operator overrides on B).
    proxy_command(lab["link"]["control"], "cut", paths=[0, 1])
    a.wait("group", "change", mode="detached")
    b.wait("group", "change", serving=False)
    call(sock_b, "setrcopygroup", {"action": "override", "group": "rcg1"}, timeout=30)
    b.wait("group", "change", role="primary")
    for site in ("A", "B"):
        host_write(lab, site, MiB if site == "A" else 2 * MiB)
    proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
    for st in (a, b):
        sb = st.wait("group", "change", split_brain=True)
        assert sb["old"]["split_brain"] is False
    wait_for(lambda: outs["split_brain"].exists(), what="split_brain hook ran at B")
    env = json.loads(outs["split_brain"].read_text())
    assert (env["SYNCD_EVENT"], env["SYNCD_NODE"], env["SYNCD_GROUP"], env["SYNCD_SPLIT_BRAIN"], env["SYNCD_PEER"]) == (
        "split_brain", "B", "rcg1", "yes", "A")
    for site in ("A", "B"):
        assert "ERROR syncd.group: group rcg1: SPLIT BRAIN" in Path(lab["nodes"][site]["log"]).read_text()
        assert_stream_matches(a if site == "A" else b, lab, site)
    assert a.stop() == 0 and b.stop() == 0


def host_write(lab: dict, site: str, offset: int) -> None:
    """A host writes 64 KiB to vv1 at ``site``."""
    import trio

    from syncd.nbd.client import open_nbd

    async def go():
        async with open_nbd(lab["nodes"][site]["volumes"]["vv1"]["uri"]) as c:
            await c.write(offset, b"\x5a" * 65536)

    trio.run(go)


def test_a_round_trip_above_10_ms_is_one_warning_event_until_it_comes_back_below(wlab):
    a, b = Stream(wlab, "A"), Stream(wlab, "B")
    ctl = wlab["link"]["control"]
    # A loaded machine (CI's two CPUs) can hold a path's smoothed round trip above 10 ms on its
    # own: the episode under test starts once path 0 is below the limit at both nodes.
    start = {}
    for st in (a, b):
        wait_for(lambda st=st: st.replay()[("path", "B" if st.site == "A" else "A", 0)]["rtt_warning"] is False,
                 timeout=60, what=f"path 0 below the limit at {st.site}; seen: {st.lines()[-15:]}")
        start[st.site] = st.events[-1]["seq"]
    proxy_command(ctl, "delay", ms=25, paths=[0])  # the relay adds 25 ms to each round trip on path 0
    for st in (a, b):
        wait_for(lambda st=st: [e for e in st.seen("path", "change", path=0, rtt_warning=True)
                                if e["seq"] > start[st.site]],
                 timeout=30, what=f"path 0's warning at {st.site}; seen: {st.lines()[-15:]}")
        w = [e for e in st.seen("path", "change", path=0, rtt_warning=True) if e["seq"] > start[st.site]][0]
        assert w["rtt_ms"] > 10 and w["max_rtt_ms"] == 10 and w["old"] == {"rtt_warning": False}
    assert show(wlab, "A")["link"]["paths"][0]["rtt_warning"] is True
    proxy_command(ctl, "delay", ms=0, paths=[0])
    for st in (a, b):
        wait_for(lambda st=st: [e for e in st.seen("path", "change", path=0, rtt_warning=False)
                                if e["seq"] > start[st.site]],
                 timeout=30, what=f"path 0 back below the limit at {st.site}; seen: {st.lines()[-15:]}")
        back = [e for e in st.seen("path", "change", path=0, rtt_warning=False) if e["seq"] > start[st.site]][0]
        assert back["rtt_ms"] < 8 and back["state"] == "up"
        # One warning for the episode, not one per keepalive.
        assert len([e for e in st.seen("path", "change", path=0, rtt_warning=True)
                    if start[st.site] < e["seq"] < back["seq"]]) == 1
    log_a = Path(wlab["nodes"]["A"]["log"]).read_text()
    assert "WARNING syncd.link: path 0: round trip" in log_a and "INFO syncd.link: path 0: round trip back to" in log_a
    assert a.stop() == 0 and b.stop() == 0


@pytest.mark.root
def test_a_failed_disk_at_the_primary_is_events_at_both_nodes(looplab):
    """The failure matrix's disk row (the seed's "RAID set or metadata failure"): the primary's
    loop device shrinks under it. A's stream says its group stopped serving on a failed disk
    (ALUA unavailable), B's that it took the group over; after the repair both say synced."""
    lab = looplab
    wait_for(lambda: show(lab, "A")["groups"][0]["peer_mode"] == "attached", what="attached")
    a, b = Stream(lab, "A"), Stream(lab, "B")
    lab_fail(lab["dir"], "disk", "A")

    def write_at_a() -> bool:
        """A host write at A (beyond the shrunken end) finds the failed device."""
        try:
            host_write(lab, "A", 15 * MiB)
        except Exception:  # noqa: BLE001 - the write fails once the device has
            pass
        return bool(a.seen("group", "change", group="rcg1", mode="disk-failed"))

    wait_for(write_at_a, timeout=30, what=f"A's group disk-failed; seen: {a.lines()[-10:]}")
    a.wait("alua", "change", host="lab", volume="vv1", state="unavailable")
    b.wait("group", "change", group="rcg1", role="primary", epoch=2)
    b.wait("alua", "change", host="lab", volume="vv1", state="active/optimized", epoch=2)
    for st, site in ((a, "A"), (b, "B")):
        assert_stream_matches(st, lab, site)
    host_write(lab, "B", 0)
    lab_heal(lab["dir"], "disk", "A")
    wait_for(lambda: show(lab, "B")["groups"][0]["peer_mode"] == "attached", timeout=60, what="resync after repair")
    b.wait("resync", "destroy", group="rcg1", timeout=60)
    a2 = a if a.proc.poll() is None else Stream(lab, "A")
    for st, site in ((a2, "A"), (b, "B")):
        assert_stream_matches(st, lab, site)
    assert a2.stop() == 0 and b.stop() == 0
    for st in (a, b):
        print(f"syncctl events at {st.site}:\n  " + "\n  ".join(st.lines()))
