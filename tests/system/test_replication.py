"""Two real node processes, real NBD clients: every acknowledged write is on both replicas."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import trio

from syncd.ctl import CtlError
from syncd.lab.relay import proxy_command
from syncd.lab.workload import History, check_file, pattern, run_writer
from syncd.nbd.client import NBDError, open_nbd

from .rig import assert_replicas_identical, require_tool, run

pytestmark = pytest.mark.system


def uri(lab, site, vol="vv1"):
    return lab["nodes"][site]["volumes"][vol]["uri"]


def path(lab, site, vol="vv1"):
    return lab["nodes"][site]["volumes"][vol]["path"]


def show(lab, site):
    return lab["ctl"](site, "showrcopy")


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def synced(lab):
    g = show(lab, "A")["groups"][0]
    return g["peer_mode"] == "attached" and all(v["sync_status"] == "synced" for v in g["volumes"])


def test_lab_comes_up_synced_with_same_wwn_on_both_sites(lab):
    a, b = show(lab, "A"), show(lab, "B")
    ga, gb = a["groups"][0], b["groups"][0]
    assert (ga["role"], gb["role"]) == ("primary", "secondary")
    assert [v["sync_status"] for v in ga["volumes"]] == ["synced", "synced"]
    assert [v["wwn"] for v in ga["volumes"]] == [v["wwn"] for v in gb["volumes"]]
    assert a["link"]["paths_up"] == 2 and a["link"]["state"] == "up"
    wait_for(lambda: all(p["rtt_ms"] is not None for p in show(lab, "A")["link"]["paths"]), what="rtt measured")


def test_writes_through_each_site_are_on_both_replicas_qemu(lab):
    require_tool("qemu-io", "qemu-img")
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa1 0 1M", "-c", "write -P 0xa2 4M 64k", uri(lab, "A"))
    run("qemu-io", "-f", "raw", "-c", "write -P 0xb1 1M 1M", "-c", "write -P 0xb2 4M 4k", uri(lab, "B"))
    # Reads at either site see the writes of both.
    for site in ("A", "B"):
        run("qemu-io", "-f", "raw", "-c", "read -P 0xa1 0 1M", "-c", "read -P 0xb1 1M 1M",
            "-c", "read -P 0xb2 4M 4k", "-c", "read -P 0xa2 4100k 60k", uri(lab, site))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", path(lab, "A"), path(lab, "B"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(lab, "A"), uri(lab, "B"))


def test_nbdcopy_round_trip_through_both_sites(lab, tmp_path):
    require_tool("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(32 << 20))
    run("nbdcopy", str(src), uri(lab, "B", "vv2"))
    out = tmp_path / "out.img"
    run("nbdcopy", uri(lab, "A", "vv2"), str(out))
    assert out.read_bytes() == src.read_bytes()
    assert_replicas_identical(lab, "vv2")


@pytest.mark.parametrize("site", ["A", "B"])
def test_fio_verify_job_through_nbd_engine(lab, site):
    require_tool("fio")
    p = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri(lab, site)}", "--rw=randwrite",
            "--bs=4k", "--iodepth=8", "--size=16M", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", "--verify_state_save=0", "--output-format=json", timeout=180)
    res = json.loads(p.stdout[p.stdout.index("{"):])
    assert res["jobs"][0]["error"] == 0
    assert_replicas_identical(lab, "vv1")


def test_concurrent_overlapping_writers_at_both_sites_leave_identical_replicas(lab):
    require_tool("fio")
    procs = []
    for site, seed in (("A", 1), ("B", 2)):
        procs.append(subprocess.Popen(
            ["fio", f"--name=overlap{site}", "--ioengine=nbd", f"--uri={uri(lab, site)}",
             "--rw=randwrite", "--bsrange=512-64k", "--iodepth=16", "--size=2M",
             "--time_based", "--runtime=4", f"--randseed={seed}", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out[out.index("{"):])["jobs"][0]["error"] == 0
    assert_replicas_identical(lab, "vv1")


def test_write_at_secondary_is_on_both_replicas_before_ack(lab):
    async def main():
        async with open_nbd(uri(lab, "B")) as c:
            for i in range(64):
                await c.write(i * 4096, pattern(7, i, i + 1))
                # Acknowledged: the primary's disk has it already.
                async with await trio.open_file(path(lab, "A"), "rb") as f:
                    await f.seek(i * 4096)
                    assert await f.read(4096) == pattern(7, i, i + 1)
    trio.run(main)
    assert_replicas_identical(lab, "vv1")


def test_losing_one_path_keeps_mirroring_on_the_other(lab):
    proxy_command(lab["link"]["control"], "cut", paths=[0])
    h = History()
    trio.run(lambda: run_writer(uri(lab, "A"), h, writer=1, blocks=range(0, 256), duration=2.5, qd=4))
    assert not h.errors
    link = wait_for(lambda: (lk := show(lab, "A")["link"])["paths"][0]["state"] != "up" and lk, what="path 0 down")
    assert link["state"] == "up" and link["paths_up"] == 1
    assert show(lab, "A")["groups"][0]["peer_mode"] == "attached"
    assert check_file(path(lab, "B"), h, writer=1) == []
    proxy_command(lab["link"]["control"], "heal", paths=[0])
    wait_for(lambda: show(lab, "A")["link"]["paths_up"] == 2, what="path 0 back")
    assert_replicas_identical(lab, "vv1")


def test_link_cut_during_writes_then_heal_resyncs_and_loses_nothing(lab):
    """Writes at both sites; all paths cut: the secondary stops serving before the primary goes
    on alone; heal: dirty regions resync and the group is synced again with no operator."""
    ha, hb = History(), History()
    events = {}

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(lambda: run_writer(uri(lab, "A"), ha, writer=1, blocks=range(0, 2048), duration=7, qd=8))
            n.start_soon(lambda: run_writer(uri(lab, "B"), hb, writer=2, blocks=range(2048, 4096), duration=7, qd=8,
                                            seed=2))
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(lambda: proxy_command(lab["link"]["control"], "cut"))
            events["cut"] = time.monotonic()
            await trio.sleep(3.0)
            # The secondary no longer serves; the primary does.
            b = await trio.to_thread.run_sync(show, lab, "B")
            events["b_serving_while_cut"] = b["groups"][0]["serving"]
            await trio.to_thread.run_sync(lambda: proxy_command(lab["link"]["control"], "heal"))
            events["heal"] = time.monotonic()

    trio.run(main)
    assert events["b_serving_while_cut"] is False
    assert ha.acked_count() > 100 and hb.acked_count() > 10
    # Site B lost access while cut (its writes failed), site A went on after the lease.
    assert any(t > events["cut"] for t, _ in hb.errors)
    assert any(t > events["cut"] + 1.2 for t in ha.acked_times)
    wait_for(lambda: synced(lab), timeout=60, what="resync after heal")
    for site in ("A", "B"):
        assert check_file(path(lab, site), ha, writer=1) == [], f"site {site} lost writes of A"
        assert check_file(path(lab, site), hb, writer=2) == [], f"site {site} lost writes of B"
    assert_replicas_identical(lab, "vv1")
    # Only what was written while degraded was resynced, not the volume.
    assert show(lab, "A")["resync_bytes"] < 32 << 20


def test_secondary_refuses_io_once_link_is_cut(lab):
    proxy_command(lab["link"]["control"], "cut")
    wait_for(lambda: not show(lab, "B")["groups"][0]["serving"], timeout=10, what="B stops serving")

    async def main():
        async with open_nbd(uri(lab, "B")) as c:
            with pytest.raises(NBDError):
                await c.read(0, 4096)
            with pytest.raises(NBDError):
                await c.write(0, b"x" * 4096)
        async with open_nbd(uri(lab, "A")) as c:
            await c.write(0, b"y" * 4096)  # the primary goes on alone
            assert await c.read(0, 4096) == b"y" * 4096

    trio.run(main)
    assert show(lab, "A")["groups"][0]["peer_mode"] == "detached"
    proxy_command(lab["link"]["control"], "heal")
    wait_for(lambda: synced(lab), timeout=60, what="resync after heal")
    assert_replicas_identical(lab, "vv1")


def test_stop_and_start_group_resyncs_what_was_written_alone(lab):
    lab["ctl"]("A", "stoprcopygroup", group="rcg1")
    assert show(lab, "A")["groups"][0]["status"] == "stopped"
    wait_for(lambda: not show(lab, "B")["groups"][0]["serving"], timeout=10, what="B stops serving")
    require_tool("qemu-io")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 8M 3M", uri(lab, "A", "vv2"))
    lab["ctl"]("A", "startrcopygroup", group="rcg1")
    wait_for(lambda: synced(lab), timeout=60, what="resync after start")
    assert_replicas_identical(lab, "vv2")


def test_bad_admin_input_is_refused_and_changes_nothing(lab):
    before_a, before_b = show(lab, "A")["groups"], show(lab, "B")["groups"]
    ctl = lab["ctl"]
    cases = [
        (("A", "admitrcopyvv"), {"volume": "nosuch", "group": "rcg1"}, "volume nosuch does not exist"),
        (("A", "admitrcopyvv"), {"volume": "vv1", "group": "nogroup"}, "group nogroup does not exist"),
        (("A", "admitrcopyvv"), {"volume": "vv1", "group": "rcg1"}, "already in group rcg1"),
        (("A", "setrcopygroup"), {"action": "pol", "policies": "auto_recovr", "group": "rcg1"},
         "unknown policy 'auto_recovr'"),
        (("B", "stoprcopygroup"), {"group": "rcg1"}, "operation only on primary side"),
        (("A", "creatercopygroup"), {"group": "rcg2", "target": "C"}, "unknown target 'C'"),
        (("A", "creatercopygroup"), {"group": "rcg1", "target": "B"}, "already exists"),
        (("A", "removercopygroup"), {"group": "rcg1"}, "is not stopped"),
        (("A", "dismissrcopyvv"), {"volume": "vv1", "group": "rcg1"}, "is not stopped"),
    ]
    for (site, cmd), args, fragment in cases:
        with pytest.raises(CtlError) as e:
            ctl(site, cmd, **args)
        assert fragment in str(e.value), (cmd, args, str(e.value))
    after_a = show(lab, "A")["groups"]
    assert after_a == before_a or [g["volumes"] for g in after_a] == [g["volumes"] for g in before_a]
    assert [g["name"] for g in show(lab, "B")["groups"]] == [g["name"] for g in before_b]


def test_syncctl_prints_tables_and_json(lab):
    out = run(".venv/bin/syncctl", "--lab", lab["dir"], "--node", "A", "showrcopy")
    assert "rcg1" in out.stdout and "synced" in out.stdout
    js = json.loads(run(".venv/bin/syncctl", "--lab", lab["dir"], "--node", "B", "--json", "showrcopy").stdout)
    assert js["groups"][0]["role"] == "secondary"
    bad = run(".venv/bin/syncctl", "--lab", lab["dir"], "--node", "A", "setrcopygroup", "pol", "bogus", "rcg1",
              check=False)
    assert bad.returncode == 1 and "unknown policy" in bad.stderr


def alua(lab, site, vol="vv1"):
    """(state, epoch) as a host reads it: nbdinfo --map=syncd:alua."""
    out = run("nbdinfo", "--map=syncd:alua", uri(lab, site, vol)).stdout.split()
    flags = int(out[2])
    return flags & 0xFF, flags >> 8


def test_alua_path_states_follow_the_link(lab):
    require_tool("nbdinfo")
    assert alua(lab, "A") == (0, 1) and alua(lab, "B") == (0, 1)  # both active/optimized, epoch 1
    info = run("nbdinfo", "--json", uri(lab, "B")).stdout
    desc_a = json.loads(run("nbdinfo", "--json", uri(lab, "A")).stdout)["exports"][0]["description"]
    wwn_a = desc_a.split("wwn=")[1].split()[0]
    assert f"wwn={wwn_a}" in json.loads(info)["exports"][0]["description"]
    proxy_command(lab["link"]["control"], "cut")
    wait_for(lambda: alua(lab, "B") == (3, 1), timeout=10, what="B unavailable")
    assert alua(lab, "A") == (0, 1)
    proxy_command(lab["link"]["control"], "heal")
    wait_for(lambda: alua(lab, "B") == (0, 1), timeout=30, what="B active again")


@pytest.mark.parametrize("victim", ["A", "B"])
def test_kill_9_of_a_node_under_writes_loses_no_acknowledged_write(lab, victim):
    """A crash of either node during writes at the primary: the survivor's acknowledged writes
    are all on both replicas once the node is back and the group has resynchronized."""
    from syncd.lab.rig import lab_kill, lab_start

    h = History()

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(lambda: run_writer(uri(lab, "A"), h, writer=1, blocks=range(0, 4096), duration=6, qd=8))
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(lab_kill, lab["dir"], victim)
            await trio.sleep(1.5)
            await trio.to_thread.run_sync(lab_start, lab["dir"], victim)

    trio.run(main)
    lab.update(json.loads(open(os.path.join(lab["dir"], "lab.json")).read()))
    assert h.acked_count() > 100
    wait_for(lambda: synced(lab), timeout=90, what="resync after restart")
    for site in ("A", "B"):
        assert check_file(path(lab, site), h, writer=1) == [], f"site {site} lost acknowledged writes"
    assert_replicas_identical(lab, "vv1")
