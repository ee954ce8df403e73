"""The host shim (issue 4, first slice): one NBD endpoint per volume over paths to both arrays,
ALUA path selection, failover without an application I/O error (uniform connectivity)."""

from __future__ import annotations

import json
import sys

import pytest
import trio

from syncd.config import ConfigError
from syncd.host import host_status, load_host_config
from syncd.lab.relay import proxy_command
from syncd.lab.rig import lab_down, lab_kill, lab_start, lab_up
from syncd.lab.workload import History, check_file, run_writer

from .rig import FAST_LINK, assert_replicas_identical, require_tool, run, wait_witness_knows_in_sync
from .test_failover import WITNESS, group, wait_for

pytestmark = pytest.mark.system


@pytest.fixture
def shim(tmp_path):
    """A lab with a witness and uniform host shims (each host reaches both arrays)."""
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                 topology="uniform", timeout=60)
    ha = lab["hosts"]["A"]
    lab["shim"] = {"uri": ha["volumes"]["vv1"], "admin": ha["admin_socket"], "socket": ha["socket"],
                   "config": ha["config"]}
    try:
        wait_witness_knows_in_sync(lab)
        yield lab
    finally:
        lab_down(str(d))
        for h in ("ha", "hb"):
            print((d / f"{h}.log").read_text()[-2000:])


def _through_shim(lab, action, duration=7.0):
    h = History()

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(lambda: run_writer(lab["shim"]["uri"], h, writer=1, blocks=range(0, 2048),
                                            duration=duration, qd=4))
            await trio.sleep(2.0)
            await trio.to_thread.run_sync(action)

    trio.run(main)
    return h


def test_status_shows_both_arrays_paths_and_real_clients_use_the_socket(shim):
    require_tool("nbdinfo", "qemu-io")
    st = host_status(shim["shim"]["admin"])
    v = st["volumes"][0]
    assert v["name"] == "vv1" and v["wwn"].startswith("naa.") and len(v["paths"]) == 2
    assert {p["array"] for p in v["paths"]} == {"A", "B"} and v["max_epoch"] == 1
    sock_uri = f"nbd+unix:///vv1?socket={shim['shim']['socket']}"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", sock_uri)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", shim["nodes"]["B"]["volumes"]["vv1"]["uri"])
    assert "wwn=" + v["wwn"] in run("nbdinfo", sock_uri).stdout
    out = run(sys.executable, "-m", "syncd", "host", "--config", shim["shim"]["config"], "--status").stdout
    assert "active/optimized" in out and "vv1: epoch 1, re-issued 0" in out
    assert "block status answered as all data 0" in out
    # In a pipe the table is full width: no URI or WWN is cut.
    assert all(p["uri"] in out for p in v["paths"]) and v["wwn"] in out and "…" not in out
    js = json.loads(run(sys.executable, "-m", "syncd", "host", "--config", shim["shim"]["config"], "--status",
                        "--json").stdout)
    assert js["volumes"][0]["wwn"] == v["wwn"] and len(js["volumes"][0]["paths"]) == 2


@pytest.mark.parametrize("fault", ["primary", "secondary", "link", "switchover"])
def test_failures_that_spare_the_host_cost_no_io_error(shim, fault):
    lab = shim

    def act():
        if fault == "primary":
            lab_kill(lab["dir"], "A")
        elif fault == "secondary":
            lab_kill(lab["dir"], "B")
        elif fault == "link":
            proxy_command(lab["link"]["control"], "cut", paths=[0, 1])
        else:
            from syncd.ctl import call

            call(lab["nodes"]["A"]["admin_socket"], "setrcopygroup", {"action": "switchover", "group": "rcg1"},
                 timeout=30)

    h = _through_shim(lab, act)
    assert h.errors == [], h.errors[:3]
    print(f"{fault}: longest pause seen by the application {h.longest_pause():.2f}s, acked {h.acked_count()}")
    st = host_status(lab["shim"]["admin"])["volumes"][0]
    if fault == "primary":
        assert st["max_epoch"] == 2
        lab_start(lab["dir"], "A")
    elif fault == "secondary":
        lab_start(lab["dir"], "B")
    elif fault == "link":
        proxy_command(lab["link"]["control"], "heal", paths=[0, 1])
    primary = "B" if fault in ("primary", "switchover") else "A"
    wait_for(lambda: group(lab, primary)["peer_mode"] == "attached"
             and all(v["sync_status"] == "synced" for v in group(lab, primary)["volumes"]), timeout=60, what="resync")
    for site in ("A", "B"):
        assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], h, writer=1) == []
    assert_replicas_identical(lab, "vv1")


_HOST = '[host]\nname = "h"\nsocket = "s"\nadmin_socket = "a"\n'
_ARRAY = '[[array]]\nname = "A"\npaths = ["nbd://10.0.0.1:10809"]\n'


@pytest.mark.parametrize("text,msg", [
    (_HOST, "array: missing"),
    (_HOST + '[[array]]\nname = "A"\npaths = ["10.0.0.1:10809"]\n', "nbd://"),
    (_HOST + "poll_interval = 0\n" + _ARRAY, "poll_interval"),
    (_HOST + "what = 1\n" + _ARRAY, "what"),
    (_HOST + 'path_selector = "random"\n' + _ARRAY, "path_selector"),
])
def test_bad_host_config_is_named(tmp_path, text, msg):
    f = tmp_path / "h.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_host_config(str(f))


def test_lab_scenario_reports_per_host(tmp_path):
    from syncd.lab.scenario import run_scenario

    r = run_scenario(str(tmp_path / "lab"), "link-failure", "uniform", hold=3.0)
    assert r["replicas_identical"]
    for h in r["hosts"]:
        assert h["io_errors"] == 0 and h["acked_lost"] == 0 and h["acked"] > 100
        assert any("B:U" in label for _, label in h["alua"])  # the secondary's paths went unavailable
    # Proximity by site: host a sees A optimized and B non-optimized before the fault, host b the reverse.
    assert [(h["host"], h["alua"][0][1]) for h in r["hosts"]] == [("ha", "A:AO@1 B:ANO@1"), ("hb", "A:ANO@1 B:AO@1")]
    assert r["paths_as_seed"]
    out = run(sys.executable, "-m", "syncd", "lab", "scenario", "switchover", "--hold", "1",
              "--dir", str(tmp_path / "lab2")).stdout
    assert "replicas identical after recovery: yes" in out and "scenario switchover (uniform)" in out


def test_scenario_all_writes_the_topology_report_with_plots(tmp_path):
    """`lab scenario all` (one scenario here: the matrix runs them all): both topologies, a
    Markdown report, a PNG timeline per scenario and topology, results as JSON; uniform hosts
    ride through a secondary failure, non-uniform hosts at the failed site lose access."""
    import json

    from syncd.lab.report import outcome

    rep = tmp_path / "report"
    out = run(sys.executable, "-m", "syncd", "lab", "scenario", "all", "--only", "secondary-failure",
              "--hold", "3", "--dir", str(tmp_path / "labs"), "--report", str(rep), timeout=600).stdout
    assert "report:" in out and "secondary-failure" in out
    md = (rep / "report.md").read_text()
    assert "## Choosing a topology" in md and "| secondary-failure |" in md
    results = {(r["topology"], r["scenario"]): r for r in json.loads((rep / "results.json").read_text())}
    assert len(results) == 2
    for (top, name), r in results.items():
        png = (rep / f"{name}-{top}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert f"]({name}-{top}.png)" in md
        assert r["replicas_identical"] and all(h["acked_lost"] == 0 for h in r["hosts"])
        # Every path in the seed's state before the fault (checked by the scenario) and after recovery.
        assert r["paths_as_seed"], [h["paths_after"] for h in r["hosts"]]
        want = ({"ha": {"A": "AO", "B": "ANO"}, "hb": {"A": "ANO", "B": "AO"}} if top == "uniform"
                else {"ha": {"A": "AO"}, "hb": {"B": "AO"}})
        assert {h["host"]: h["paths_before"] for h in r["hosts"]} == want
        assert all(h["paths_after"]["seen"] == h["paths_after"]["want"] for h in r["hosts"])
    for name in ("secondary-failure",):
        assert all(outcome(r, h).startswith("ran on") for r in [results[("uniform", name)]] for h in r["hosts"])
    lost = {name: [h["host"] for h in results[("non-uniform", name)]["hosts"]
                   if not outcome(results[("non-uniform", name)], h).startswith("ran on")]
            for name in ("secondary-failure",)}
    assert lost == {"secondary-failure": ["hb"]}, lost
    bad = run(sys.executable, "-m", "syncd", "lab", "scenario", "all", "--only", "bogus", "--dir", str(tmp_path / "x"),
              check=False)
    assert bad.returncode != 0 and "unknown scenario" in bad.stderr + bad.stdout


def test_lab_site_failure_and_heal_then_down_leaves_nothing_running(shim):
    """lab fail/heal site restarts the array and its host shim; lab down then stops them all
    (the restarted processes' pids are the ones recorded)."""
    import subprocess

    from syncd.lab.rig import lab_fail, lab_heal

    lab = shim
    lab_fail(lab["dir"], "site", "A")
    lab_heal(lab["dir"], "site", "A")
    lab_down(lab["dir"])
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert lab["dir"] not in ps, [line for line in ps.splitlines() if lab["dir"] in line]


def test_row9_shim_tcp_export_serves_only_its_listed_volumes_on_loopback(tmp_path):
    """Issue 11 row 9 on a running shim with ``tcp`` set: its unix and admin sockets are
    0600, its TCP export lists and opens only ``tcp_exports`` (an unlisted volume can be
    neither listed nor opened, and a write to it changes neither replica) while the unix
    socket serves both, it listens on loopback only, and a non-loopback ``tcp`` does not start."""
    import json
    import os
    import stat
    import subprocess

    from syncd.lab.rig import free_port

    from .rig import file_digest

    require_tool("nbdinfo", "qemu-io")
    lab = lab_up(str(tmp_path / "lab"), size="8MiB", nvolumes=2, npaths=1, link_opts=FAST_LINK, timeout=60)
    d = tmp_path / "shim"
    d.mkdir()
    port = free_port()
    arrays = "".join(f'[[array]]\nname = "{s}"\npaths = ["nbd://{lab["nodes"][s]["nbd"]}"]\n' for s in ("A", "B"))
    cfg = d / "host.toml"
    cfg.write_text(f'[host]\nname = "lab"\nsocket = "nbd.sock"\nadmin_socket = "admin.sock"\npoll_interval = 0.2\n'
                   f'tcp = "127.0.0.1:{port}"\ntcp_exports = ["vv1"]\n' + arrays)
    log = open(d / "shim.log", "wb")
    shim = subprocess.Popen([sys.executable, "-m", "syncd", "host", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: all(x["alua"] == "active/optimized" for v in host_status(str(d / "admin.sock"))["volumes"]
                             for x in v["paths"]) and len(host_status(str(d / "admin.sock"))["volumes"]) == 2,
                 timeout=30, what="the shim's paths")
        for sock in ("nbd.sock", "admin.sock"):
            st = os.stat(d / sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (sock, oct(st.st_mode))
        def digests():
            return {(s, v): file_digest(lab["nodes"][s]["volumes"][v]["path"]) for s in ("A", "B")
                    for v in ("vv1", "vv2")}

        before = digests()

        def names(uri):
            listed = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)["exports"]
            return sorted(e["export-name"] for e in listed)

        assert names(f"nbd://127.0.0.1:{port}/") == ["vv1"]
        assert names(f"nbd+unix:///?socket={d / 'nbd.sock'}") == ["vv1", "vv2"]
        r = run("nbdinfo", f"nbd://127.0.0.1:{port}/vv2", check=False)
        assert r.returncode != 0 and "vv2" not in r.stdout
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 64k", f"nbd://127.0.0.1:{port}/vv2", check=False)
        assert r.returncode != 0 and "wrote" not in r.stdout, r.stdout
        # The listed volume is served over TCP (and its write reaches both replicas).
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 64k", f"nbd://127.0.0.1:{port}/vv1")
        after = digests()
        assert after[("A", "vv2")] == before[("A", "vv2")] and after[("B", "vv2")] == before[("B", "vv2")]
        assert after[("A", "vv1")] != before[("A", "vv1")]
        assert_replicas_identical(lab, "vv1")
        # Loopback only: every TCP socket the shim listens on is bound to 127.0.0.1.
        out = run("ss", "-Hltnp").stdout
        mine = [line.split()[3] for line in out.splitlines() if f"pid={shim.pid}," in line]
        assert mine and all(a.startswith("127.0.0.1:") for a in mine), out
    finally:
        shim.terminate()
        shim.wait(10)
        log.close()
        lab_down(lab["dir"])
    # A shim told to listen beyond loopback does not start, and says why.
    cfg.write_text(cfg.read_text().replace(f'tcp = "127.0.0.1:{port}"', f'tcp = "0.0.0.0:{port}"'))
    for f in ("nbd.sock", "admin.sock"):
        (d / f).unlink(missing_ok=True)
    r = run(sys.executable, "-m", "syncd", "host", "--config", str(cfg), check=False, timeout=30)
    assert r.returncode != 0 and "not a loopback address" in r.stderr + r.stdout, r.stderr
    assert not (d / "nbd.sock").exists() and not (d / "admin.sock").exists()
