"""Heavy but legitimate load does not break the replication link (issue 10, item 6).

fio's nbd engine with 8 jobs x iodepth 64 x 1 MiB random writes at the secondary, then 1 MiB random
reads and writes at both sites at once, on a 1 GiB volume of the lab (relay in the link, default
timings): no path goes down, the link session never changes, no peer is lost or fenced, fio sees
no error, and the replicas are identical afterwards. Each phase runs SYNCD_LINK_LOAD_SECONDS
(default 10; set e.g. 300 to run for minutes); SYNCD_LINK_LOAD_TIMINGS=fast uses the tests'
FAST_LINK timings instead. Throughput and control-frame latencies are printed (and appended as
JSON to SYNCD_LINK_LOAD_OUT if set): they never decide pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from syncd.ctl import call
from syncd.lab.rig import lab_down, lab_up

from .rig import FAST_LINK, assert_replicas_identical, require_tool

pytestmark = pytest.mark.system

SECONDS = int(os.environ.get("SYNCD_LINK_LOAD_SECONDS", "10"))
# What must never appear in a node's log while hosts load the link.
TROUBLE = re.compile(r"path \d+ down|link to \S+ down|peer lost|FAILSAFE|fenced|not confirm|reset:")


def fio(lab: dict, site: str, rw: str, out: str) -> subprocess.Popen:
    uri = lab["nodes"][site]["volumes"]["vv1"]["uri"]
    return subprocess.Popen(
        ["fio", f"--name=load{site}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=1M",
         "--numjobs=8", "--iodepth=64", "--direct=1", "--time_based", f"--runtime={SECONDS}",
         "--size=1G", "--group_reporting", "--output-format=json", f"--output={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, out: str) -> dict:
    _, err = p.communicate(timeout=SECONDS + 120)
    text = open(out).read()
    assert p.returncode == 0 and "io_u error" not in err, f"fio failed ({p.returncode}): {err[-3000:]}"
    job = json.loads(text[text.index("{"):])["jobs"][0]
    assert job["error"] == 0, f"fio reported error {job['error']}"
    ios = job["write"]["total_ios"] + job["read"]["total_ios"]
    assert ios > 0
    return {"write_MBps": round(job["write"]["bw_bytes"] / 1e6, 1),
            "read_MBps": round(job["read"]["bw_bytes"] / 1e6, 1), "ios": ios}


def link_state(lab: dict, site: str) -> tuple:
    lk = call(lab["nodes"][site]["admin_socket"], "showrcopy", {})["link"]
    return lk["session"], [(p["state"], p["since"]) for p in lk["paths"]]


def log_offsets(lab: dict) -> dict:
    return {s: os.path.getsize(n["log"]) for s, n in lab["nodes"].items()}


def trouble_since(lab: dict, offsets: dict) -> list[str]:
    lines = []
    for s, n in lab["nodes"].items():
        with open(n["log"]) as f:
            f.seek(offsets[s])
            lines += [f"{s}: {ln.rstrip()}" for ln in f if TROUBLE.search(ln)]
    return lines


def measurements(lab: dict) -> dict:
    out = {}
    for s, n in lab["nodes"].items():
        info = call(n["admin_socket"], "showrcopy", {})
        lk = info["link"]
        with open(f"/proc/{n['pid']}/status") as f:
            hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
        out[s] = {"rss_peak_MiB": hwm // 1024, "credit_waits": lk["credit_waits"],
                  "credit_wait_max_ms": lk["credit_wait_max_ms"],
                  "ctl_wait_max_ms": max(p["ctl_wait_max_ms"] for p in lk["paths"]),
                  "keepalive_rtt_max_ms": max(p["rtt_max_ms"] for p in lk["paths"])}
    return out


def test_heavy_load_at_both_sites_keeps_the_link_up_and_hosts_error_free(tmp_path):
    require_tool("fio")
    timings = FAST_LINK if os.environ.get("SYNCD_LINK_LOAD_TIMINGS") == "fast" else {}
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="1GiB", nvolumes=1, npaths=2, link_opts=timings, timeout=120)
    try:
        before = {s: link_state(lab, s) for s in lab["nodes"]}
        assert all(st == "up" for s in before for st, _ in before[s][1])
        offsets = log_offsets(lab)
        results = {}

        # Phase 1: the reported case, every write forwarded by the secondary.
        p = fio(lab, "B", "randwrite", str(tmp_path / "b1.json"))
        results["B randwrite"] = finish(p, str(tmp_path / "b1.json"))
        assert trouble_since(lab, offsets) == []

        # Phase 2: both sites read and write at once (mirrored and forwarded data both ways).
        pa = fio(lab, "A", "randrw", str(tmp_path / "a2.json"))
        pb = fio(lab, "B", "randrw", str(tmp_path / "b2.json"))
        results["A randrw (mixed)"] = finish(pa, str(tmp_path / "a2.json"))
        results["B randrw (mixed)"] = finish(pb, str(tmp_path / "b2.json"))

        assert trouble_since(lab, offsets) == []
        after = {s: link_state(lab, s) for s in lab["nodes"]}
        assert after == before, "a path went down (or the link session changed) under load"
        for s in lab["nodes"]:
            g = call(lab["nodes"][s]["admin_socket"], "showrcopy", {})["groups"][0]
            assert not [e for e in g["events"] if "peer lost" in e["msg"] or "FAILSAFE" in e["msg"]]
            assert g["status"] == "started" and g["serving"]
            if g["role"] == "primary":
                assert g["peer_mode"] == "attached"
        m = measurements(lab)
        report = {"seconds_per_phase": SECONDS, "timings": "fast" if timings else "default",
                  "fio": results, "nodes": m}
        print(json.dumps(report, indent=1))
        if os.environ.get("SYNCD_LINK_LOAD_OUT"):
            with open(os.environ["SYNCD_LINK_LOAD_OUT"], "a") as f:
                f.write(json.dumps(report) + "\n")
        assert_replicas_identical(lab, "vv1")
    finally:
        lab_down(str(d))
