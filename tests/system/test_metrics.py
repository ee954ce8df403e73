"""The metrics endpoints of a running lab, scraped over HTTP and parsed as Prometheus does:
counters move by exactly what real NBD clients did, role/epoch/ALUA gauges say what
``syncctl showrcopy --json`` says (before and after a failover), the link's round trip above the
supported 10 ms is flagged, and hostile HTTP clients change nothing while hosts keep writing."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from syncd.lab.fuzz import _nbdsh
from syncd.lab.rig import lab_down, lab_kill, lab_up, metrics_endpoints, print_summary

from .rig import FAST_LINK, WITNESS, require_tool, run, wait_for

SYNCCTL = ".venv/bin/syncctl"
SYNCD = ".venv/bin/syncd"
ROOT = Path(__file__).resolve().parents[2]


def scrape(url: str) -> dict:
    """{(name, sorted labels): value} of every sample on the page."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(page: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in page, f"{name}{labels} not on the page"
    return page[key]


def ctl_json(lab: dict, site: str, *args: str) -> dict:
    return json.loads(run(SYNCCTL, "--lab", lab["dir"], "--node", site, *args, "--json").stdout)


def nbdsh(uri: str, code: str) -> None:
    subprocess.run([*_nbdsh(), "-u", uri, "-c", code], check=True, timeout=60, capture_output=True)


IO = "h.pwrite(b'x' * 65536, 0); h.pread(4096, 0); h.trim(65536, 65536); h.zero(131072, 131072); h.flush()"


def assert_roles_match(lab: dict, site: str, page: dict) -> None:
    """The group's role, epoch and each host's ALUA state on the page are showrcopy's / showpaths'."""
    show = ctl_json(lab, site, "showrcopy")
    g = show["groups"][0]
    key = dict(node=site, group=g["name"])
    for role in ("primary", "secondary"):
        assert value(page, "syncd_group_role", **key, state=role) == (1 if g["role"] == role else 0)
    assert value(page, "syncd_group_epoch", **key) == g["epoch"]
    assert value(page, "syncd_group_failsafe", **key) == (1 if g["status"] == "failsafe" else 0)
    for row in ctl_json(lab, site, "showpaths")["paths"]:
        k = dict(node=site, host=row["host"], group=row["group"] or "", volume=row["volume"])
        assert value(page, "syncd_host_volume_alua_state", **k, state=row["state"]) == 1
        assert value(page, "syncd_host_volume_alua_epoch", **k) == row["epoch"]


def test_metrics_follow_io_roles_and_failover(tmp_path, capsys):
    require_tool("nbdsh")
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="16MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, witness=WITNESS,
                 topology="uniform", timeout=60)
    try:
        # lab up prints every daemon's endpoint: two nodes, the witness, two host shims.
        print_summary(lab)
        out = capsys.readouterr().out
        urls = [u for _, u in metrics_endpoints(lab)]
        assert len(urls) == 5 and all(u in out for u in urls), out
        a_url, b_url = lab["nodes"]["A"]["metrics"], lab["nodes"]["B"]["metrics"]
        w_url, ha_url = lab["witness"]["metrics"], lab["hosts"]["A"]["metrics"]
        vol = dict(node="A", group="rcg1", volume="vv1")
        before = scrape(a_url)
        nbdsh(lab["nodes"]["A"]["volumes"]["vv1"]["uri"], IO)
        after = scrape(a_url)

        def moved(name: str, **labels) -> float:
            return value(after, name, **vol, **labels) - value(before, name, **vol, **labels)

        for op in ("read", "write", "trim", "zeroes", "flush"):
            assert moved("syncd_volume_requests_total", op=op) == 1, op
            assert moved("syncd_volume_request_duration_seconds_count", op=op) == 1, op
        for op, n in (("read", 4096), ("write", 65536), ("trim", 65536), ("zeroes", 131072)):
            assert moved("syncd_volume_bytes_total", op=op) == n, op
        # The primary mirrored the write, the trim and the zeroing to B: three round trips.
        assert moved("syncd_volume_replication_duration_seconds_count", kind="mirror") == 3
        assert value(after, "syncd_volume_inflight_requests", **vol) == 0
        assert not [k for k in after if k[0] == "syncd_volume_request_errors_total"]
        assert value(after, "syncd_link_up", node="A", peer="B") == 1
        for i in ("0", "1"):
            assert value(after, "syncd_link_path_up", node="A", peer="B", path=i) == 1
            # Whether the round trip is above the supported 10 ms depends on this machine's load
            # (test_round_trip_above_10ms_and_hostile_scrapers drives it with a delay); here the
            # flag must agree with the smoothed round trip on the same page: raised only above
            # the clear threshold (8 ms), down whenever the round trip is within 10 ms.
            high = value(after, "syncd_link_rtt_above_supported", node="A", peer="B", path=i)
            rtt = value(after, "syncd_link_path_rtt_seconds", node="A", peer="B", path=i)
            assert high in (0, 1) and (rtt > 0.008 if high else rtt <= 0.01), (high, rtt)
        assert value(after, "syncd_node_witness_reachable", node="A") == 1
        assert value(after, "syncd_volume_sync_state", **vol, state="synced") == 1
        assert_roles_match(lab, "A", after)
        assert_roles_match(lab, "B", scrape(b_url))

        # Through host a's shim: what its tools asked, and the requests its paths carried.
        hb = scrape(ha_url)
        nbdsh(lab["hosts"]["A"]["volumes"]["vv1"], IO)
        ha = scrape(ha_url)
        sv = dict(host="ha", volume="vv1")
        for op, n in (("read", 4096), ("write", 65536), ("trim", 65536), ("zeroes", 131072)):
            assert (value(ha, "syncd_shim_volume_bytes_total", **sv, op=op)
                    - value(hb, "syncd_shim_volume_bytes_total", **sv, op=op)) == n
        carried = sum(v - hb.get(k, 0) for k, v in ha.items() if k[0] == "syncd_shim_path_requests_total")
        assert carried == 5
        paths = {dict(k[1])["array"]: v for k, v in ha.items()
                 if k[0] == "syncd_shim_path_alua_state" and v == 1}
        assert set(paths) == {"A", "B"}

        w = scrape(w_url)
        # Every metric the dashboard draws is on some page of this lab.
        seen = {n for url in (a_url, ha_url, w_url)
                for n in re.findall(r"^(?:# TYPE )?(syncd_[a-z_]+)", urllib.request.urlopen(url).read().decode(), re.M)}
        seen |= {n + "_total" for n in seen}  # a counter's TYPE line may name it without _total
        dash = set(re.findall(r"syncd_[a-z_]+", (ROOT / "docs" / "grafana-syncd.json").read_text()))
        assert dash and dash <= seen, sorted(dash - seen)
        assert value(w, "syncd_witness_group_owner", witness="W", group="rcg1", node="A") == 1
        assert value(w, "syncd_witness_sessions", witness="W", node="A") == 1
        assert value(w, "syncd_witness_decisions_total", witness="W", group="rcg1", request="report",
                     outcome="granted") > 0

        # Failover: A dies, B takes the group over through the witness at a higher epoch.
        epoch = ctl_json(lab, "B", "showrcopy")["groups"][0]["epoch"]
        lab_kill(lab["dir"], "A", signal.SIGKILL)
        wait_for(lambda: ctl_json(lab, "B", "showrcopy")["groups"][0]["role"] == "primary", timeout=30,
                 what="B primary")
        b = scrape(b_url)
        assert_roles_match(lab, "B", b)
        assert value(b, "syncd_group_role", node="B", group="rcg1", state="primary") == 1
        assert value(b, "syncd_group_epoch", node="B", group="rcg1") > epoch
        assert value(b, "syncd_link_up", node="B", peer="A") == 0
        w = scrape(w_url)
        assert value(w, "syncd_witness_group_owner", witness="W", group="rcg1", node="B") == 1
        assert value(w, "syncd_witness_group_epoch", witness="W", group="rcg1") == \
            value(b, "syncd_group_epoch", node="B", group="rcg1")
        assert value(w, "syncd_witness_decisions_total", witness="W", group="rcg1", request="claim",
                     outcome="granted") >= 1
        def a_path_down() -> bool:
            p = scrape(ha_url)
            k = dict(host="ha", volume="vv1", array="A", path=_path(p, "A"))
            return (value(p, "syncd_shim_path_connected", **k) == 0
                    and value(p, "syncd_shim_path_alua_state", **k, state="unreachable") == 1)

        wait_for(a_path_down, timeout=20, what="host a's path to A shown down")
    finally:
        lab_down(str(d))


def _path(page: dict, array: str) -> str:
    return next(dict(k[1])["path"] for k in page if k[0] == "syncd_shim_path_connected"
                and dict(k[1])["array"] == array)


def _hold(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def _answer(s: socket.socket) -> bytes:
    """What the server answered before it closed the connection (b"" for nothing)."""
    out = b""
    try:
        while d := s.recv(65536):
            out += d
    except ConnectionResetError:  # closed without reading what we sent
        pass
    s.close()
    return out


def test_round_trip_above_10ms_and_hostile_scrapers(tmp_path):
    """``syncd lab delay`` above the seed's 10 ms flags every path; hostile HTTP clients (idle,
    slowloris, huge headers, garbage, more connections than allowed) are refused while hosts
    write, and change nothing."""
    require_tool("nbdsh")
    d = tmp_path / "lab"
    lab = lab_up(str(d), size="8MiB", nvolumes=1, npaths=2, link_opts=FAST_LINK, timeout=60)
    try:
        url = lab["nodes"]["A"]["metrics"]
        port = int(url.split(":")[2].split("/")[0])
        key = dict(node="A", peer="B")
        page = scrape(url)
        assert value(page, "syncd_link_rtt_supported_max_seconds", **key) == 0.01
        run(SYNCD, "lab", "delay", "15", "--dir", lab["dir"])

        def flagged(want: int) -> bool:
            p = scrape(url)
            return all(value(p, "syncd_link_rtt_above_supported", **key, path=i) == want and
                       (value(p, "syncd_link_path_rtt_seconds", **key, path=i) > 0.01) == bool(want)
                       for i in ("0", "1"))

        wait_for(lambda: flagged(1), timeout=20, what="RTT above 10 ms flagged on both paths")
        run(SYNCD, "lab", "delay", "0", "--dir", lab["dir"])
        wait_for(lambda: flagged(0), timeout=20, what="RTT flag cleared")

        show = ctl_json(lab, "A", "showrcopy")["groups"][0]
        before = scrape(url)
        # 17 clients that start a request and never finish it (slowloris): 16 take every place
        # (metrics.max_connections) and are dropped at request_timeout (5 s), one is closed at once.
        held = [_hold(port, b"GET /met") for _ in range(17)]
        nbdsh(lab["nodes"]["A"]["volumes"]["vv1"]["uri"], IO)  # hosts keep writing meanwhile
        for s_ in held:
            s_.settimeout(30)
            assert _answer(s_) == b""
        huge = _answer(_hold(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"))
        assert huge.startswith(b"HTTP/1.1 431")
        assert _answer(_hold(port, b"\x00\xff garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert _answer(_hold(port, b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert _answer(_hold(port, b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 404")
        after = scrape(url)

        def moved(name: str) -> float:
            return value(after, name) - value(before, name)

        assert moved("syncd_metrics_refused_connections_total") == 1
        assert moved("syncd_metrics_timed_out_connections_total") == 16
        assert moved("syncd_metrics_rejected_requests_total") == 4
        assert moved("syncd_metrics_scrapes_total") == 1  # ``before`` itself
        vol = dict(node="A", group="rcg1", volume="vv1")
        assert value(after, "syncd_volume_bytes_total", **vol, op="write") - \
            value(before, "syncd_volume_bytes_total", **vol, op="write") == 65536
        now = ctl_json(lab, "A", "showrcopy")["groups"][0]
        assert (now["role"], now["epoch"], now["status"]) == (show["role"], show["epoch"], show["status"])
        assert now["volumes"][0]["sync_status"] == "synced"
    finally:
        lab_down(str(d))
