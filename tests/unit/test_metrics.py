"""The metrics endpoint: [metrics] config, the HTTP handler against hostile clients (memory
streams, virtual time), the fixed-bucket histograms and the collectors' families."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import ConfigError, MetricsConfig, load_node_config, parse_metrics
from syncd.metrics.expose import Endpoint, Families, io_families
from syncd.metrics.http import MetricsHTTP
from syncd.metrics.stats import Histogram, IoStats
from syncd.nbd import proto as p

NODE = """[node]\nname = "A"\ndata_dir = "data"\n"""


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, name: str) -> dict:
    """{(sorted labels): value} of every sample named ``name`` (a family's or its _total etc.)."""
    out = {}
    for f in fams.values():
        for s in f.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- config ------------------------------------------------------------------------------------------

def test_metrics_are_off_unless_configured(tmp_path):
    (tmp_path / "n.toml").write_text(NODE)
    assert load_node_config(tmp_path / "n.toml").metrics is None
    (tmp_path / "m.toml").write_text(NODE + '[metrics]\nlisten = "127.0.0.1:9650"\n')
    m = load_node_config(tmp_path / "m.toml").metrics
    assert m == MetricsConfig(("127.0.0.1", 9650))
    assert (m.max_connections, m.request_timeout, m.max_header_bytes, m.allow_remote) == (16, 5.0, 8192, False)


@pytest.mark.parametrize("table, error", [
    ({}, "metrics.listen: missing"),
    ({"listen": "0.0.0.0:9650"}, "metrics.listen: 0.0.0.0 is not a loopback address"),
    ({"listen": "10.1.2.3:9650"}, "say metrics.allow_remote = true"),
    ({"listen": "127.0.0.1"}, "is not HOST:PORT"),
    ({"listen": "127.0.0.1:9650", "port": 1}, "metrics: unknown key(s) port"),
    ({"listen": "127.0.0.1:9650", "allow_remote": "yes"}, "metrics.allow_remote: expected bool"),
    ({"listen": "127.0.0.1:9650", "max_connections": 0}, "metrics.max_connections: must be between 1 and 1024"),
    ({"listen": "127.0.0.1:9650", "request_timeout": 0}, "metrics.request_timeout: must be between 0 and 300"),
    ({"listen": "127.0.0.1:9650", "max_header_bytes": 10}, "metrics.max_header_bytes: must be between 1024"),
])
def test_bad_metrics_tables_are_refused_naming_the_key(table, error):
    with pytest.raises(ConfigError) as e:
        parse_metrics({"metrics": table})
    assert error in str(e.value)


def test_remote_listen_only_when_said():
    assert parse_metrics({"metrics": {"listen": "0.0.0.0:9650", "allow_remote": True}}).listen == ("0.0.0.0", 9650)
    assert parse_metrics({"metrics": {"listen": "[::1]:9650"}}).listen == ("::1", 9650)
    assert parse_metrics({"metrics": {"listen": "localhost:0"}}).listen == ("localhost", 0)


def test_witness_and_host_configs_take_metrics(tmp_path):
    from syncd.host import load_host_config
    from syncd.witness.server import load_witness_config

    w = tmp_path / "w.toml"
    w.write_text('[witness]\nstate_dir = "s"\nnodes = ["A", "B"]\ninsecure = true\n[metrics]\nlisten = "127.0.0.1:1"\n')
    assert load_witness_config(str(w)).metrics.listen == ("127.0.0.1", 1)
    w.write_text('[witness]\nstate_dir = "s"\nnodes = ["A", "B"]\ninsecure = true\n[metric]\nlisten = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="unknown section.*metric"):
        load_witness_config(str(w))
    h = tmp_path / "h.toml"
    h.write_text('[host]\nname = "h"\nsocket = "s"\nadmin_socket = "a"\n[[array]]\nname = "A"\n'
                 'paths = ["nbd://127.0.0.1:1"]\n[metrics]\nlisten = "0.0.0.0:2"\n')
    with pytest.raises(ConfigError, match="metrics.listen: 0.0.0.0 is not a loopback"):
        load_host_config(str(h))


# -- HTTP handler ----------------------------------------------------------------------------------

class Page:
    """A render function that counts its calls (a refused request must never render)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> tuple[bytes, str]:
        self.calls += 1
        return b"syncd_test 1.0\n", "text/plain; version=0.0.4; charset=utf-8"


def server(**kw) -> tuple[MetricsHTTP, Page]:
    page = Page()
    return MetricsHTTP(MetricsConfig(("127.0.0.1", 0), **kw), page), page


async def exchange(h: MetricsHTTP, data: bytes, *, chunks: int = 1) -> bytes:
    """Send ``data`` as a client would and read until the server closes."""
    client, srv = trio.testing.memory_stream_pair()
    out = b""
    async with trio.open_nursery() as n:
        n.start_soon(h.handle, srv)
        step = max(1, len(data) // chunks)
        for i in range(0, len(data), step):
            try:
                await client.send_all(data[i:i + step])
            except trio.BrokenResourceError:
                break
        while d := await client.receive_some():
            out += d
        await client.aclose()
    return out


async def test_get_metrics_renders_the_page():
    h, page = server()
    out = await exchange(h, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", chunks=7)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-type: text/plain; version=0.0.4" in head
    assert body == b"syncd_test 1.0\n" and page.calls == 1 and h.served == 1
    out = await exchange(h, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and page.calls == 2


@pytest.mark.parametrize("request_, status", [
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"405"),
    (b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
    (b"GET /metrics/../etc HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(256)) + b"\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET /" + b"m" * 20000 + b" HTTP/1.1\r\n", b"431"),
])
async def test_anything_else_is_refused_without_rendering(request_, status):
    h, page = server()
    out = await exchange(h, request_)
    assert out.startswith(b"HTTP/1.1 " + status), out[:100]
    assert page.calls == 0 and h.rejected == 1 and h.served == 0 and h.active == 0


async def test_a_client_that_says_nothing_is_dropped_at_the_deadline(autojump_clock):
    h, page = server(request_timeout=2.0)
    client, srv = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        n.start_soon(h.handle, srv)
        await client.send_all(b"GET /metr")  # ... and then one byte now and then (slowloris)
        for _ in range(10):
            await trio.sleep(0.5)
            try:
                await client.send_all(b"i")
            except trio.BrokenResourceError:
                break
        assert await client.receive_some() == b""  # closed, nothing answered
    assert trio.current_time() < 5
    assert h.timed_out == 1 and page.calls == 0 and h.active == 0


async def test_connections_beyond_the_limit_are_closed_at_once(autojump_clock):
    h, page = server(max_connections=2, request_timeout=30.0)
    async with trio.open_nursery() as n:
        held = []
        for _ in range(2):  # two clients that send nothing hold both places
            c, s = trio.testing.memory_stream_pair()
            n.start_soon(h.handle, s)
            held.append(c)
        await trio.testing.wait_all_tasks_blocked()
        assert h.active == 2
        c, s = trio.testing.memory_stream_pair()
        await h.handle(s)  # returns at once: closed without reading
        assert await c.receive_some() == b"" and h.refused == 1
        for c in held:
            await c.aclose()
    # Places are given back: a scrape goes through again.
    out = await exchange(h, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and page.calls == 1 and h.active == 0


async def test_a_render_that_fails_answers_nothing_and_does_not_raise():
    def broken() -> tuple[bytes, str]:
        raise RuntimeError("boom")

    h = MetricsHTTP(MetricsConfig(("127.0.0.1", 0)), broken)
    assert await exchange(h, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert h.active == 0


async def test_served_over_tcp_on_the_event_loop():
    ep = Endpoint(MetricsConfig(("127.0.0.1", 0)), lambda fam: fam.gauge("syncd_x", "x", ["a"]).add_metric(["1"], 2))
    async with trio.open_nursery() as n:
        port = await n.start(ep.serve)
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while d := await s.receive_some():
            out += d
        n.cancel_scope.cancel()
    fams = families(out.partition(b"\r\n\r\n")[2].decode())
    assert samples(fams, "syncd_x") == {(("a", "1"),): 2.0}
    assert samples(fams, "syncd_metrics_scrapes_total") == {(): 0.0}


# -- what the data path records ----------------------------------------------------------------

def test_histogram_buckets_are_upper_bounds_inclusive():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 0.01, 5.0):
        h.observe(v)
    assert h.cumulative() == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]
    assert h.count == 5 and h.total == pytest.approx(5.0135)


def test_io_families_convert_at_scrape_time():
    st = IoStats()
    for op, n, err in ((p.CMD_WRITE, 4096, 0), (p.CMD_WRITE, 8192, 0), (p.CMD_READ, 512, 0),
                       (p.CMD_TRIM, 65536, 0), (p.CMD_WRITE_ZEROES, 1 << 20, 0), (p.CMD_FLUSH, 0, 0),
                       (p.CMD_WRITE, 4096, errno.ESHUTDOWN), (p.CMD_READ, 4096, errno.EIO)):
        t0 = st.begin()
        st.end(op, n, t0, err)
    st.begin()  # one still in flight
    fam = Families()
    io_families(fam, "syncd_volume", ["node", "volume"], ["A", "vv1"], st, "by hosts")
    ep = Endpoint(MetricsConfig(("127.0.0.1", 0)), lambda f: [f._f.update(fam._f)])
    fams = families(ep.render()[0].decode())
    req = samples(fams, "syncd_volume_requests_total")
    key = (("node", "A"),)
    assert req[(*key, ("op", "write"), ("volume", "vv1"))] == 3
    assert req[(*key, ("op", "read"), ("volume", "vv1"))] == 2
    assert req[(*key, ("op", "flush"), ("volume", "vv1"))] == 1
    b = samples(fams, "syncd_volume_bytes_total")
    assert b[(*key, ("op", "write"), ("volume", "vv1"))] == 12288  # failed requests move no bytes
    assert b[(*key, ("op", "read"), ("volume", "vv1"))] == 512
    assert b[(*key, ("op", "trim"), ("volume", "vv1"))] == 65536
    assert b[(*key, ("op", "zeroes"), ("volume", "vv1"))] == 1 << 20
    errs = samples(fams, "syncd_volume_request_errors_total")
    assert errs == {(("error", "ESHUTDOWN"), *key, ("op", "write"), ("volume", "vv1")): 1,
                    (("error", "EIO"), *key, ("op", "read"), ("volume", "vv1")): 1}
    cnt = samples(fams, "syncd_volume_request_duration_seconds_count")
    assert cnt[(*key, ("op", "write"), ("volume", "vv1"))] == 3
    inf = samples(fams, "syncd_volume_request_duration_seconds_bucket")
    assert inf[(("le", "+Inf"), *key, ("op", "write"), ("volume", "vv1"))] == 3
    assert samples(fams, "syncd_volume_inflight_requests") == {(*key, ("volume", "vv1")): 1}


async def test_witness_decisions_are_counted_by_group_request_and_outcome(tmp_path):
    from syncd.secure import Security
    from syncd.witness import proto as w
    from syncd.witness.decide import Timing
    from syncd.witness.server import Witness, WitnessConfig

    wit = Witness(WitnessConfig("W", (("127.0.0.1", 0),), str(tmp_path), Security("insecure"), ("A", "B"), Timing()))
    reg = w.WFrame(w.WType.REGISTER, 1, {"group": "g1", "member1": "A", "member2": "B", "owner": "A", "epoch": 1})
    wit._handle("A", reg)
    wit._handle("A", w.WFrame(w.WType.REPORT, 2, {"group": "g1", "epoch": 1, "flags": 3}))
    wit._handle("B", w.WFrame(w.WType.CLAIM, 3, {"group": "g1", "epoch": 1}))  # the owner is alive: refused
    wit._handle("B", w.WFrame(w.WType.REPORT, 4, {"group": "nope", "epoch": 1, "flags": 0}))  # unknown group
    before = dict(wit.state.groups["g1"].persistent())
    from syncd.metrics.witness import collect_witness

    ep = Endpoint(MetricsConfig(("127.0.0.1", 0)), lambda f: collect_witness(wit, f))
    fams = families(ep.render()[0].decode())
    d = samples(fams, "syncd_witness_decisions_total")
    assert d == {(("group", "g1"), ("outcome", "granted"), ("request", "register"), ("witness", "W")): 1,
                 (("group", "g1"), ("outcome", "granted"), ("request", "report"), ("witness", "W")): 1,
                 (("group", "g1"), ("outcome", "refused"), ("request", "claim"), ("witness", "W")): 1,
                 (("group", ""), ("outcome", "error"), ("request", "report"), ("witness", "W")): 1}
    assert samples(fams, "syncd_witness_group_epoch") == {(("group", "g1"), ("witness", "W")): 1}
    assert samples(fams, "syncd_witness_group_owner")[(("group", "g1"), ("node", "A"), ("witness", "W"))] == 1
    assert samples(fams, "syncd_witness_sessions") == {(("node", "A"), ("witness", "W")): 0,
                                                       (("node", "B"), ("witness", "W")): 0}
    assert wit.state.groups["g1"].persistent() == before  # scraping changes nothing


async def test_the_nbd_server_counts_every_request_of_an_export_that_keeps_stats(tmp_path):
    """Fast paths (plain read and write), the task path (FUA write, trim, zeroes, flush) and
    refusals (a read past the end): each counted once, bytes only when it succeeded."""
    from syncd.nbd.client import NBDError, open_nbd
    from syncd.nbd.export import FileExport, StaticCatalog
    from syncd.nbd.server import NBDServer

    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    exp = FileExport("vv1", str(img))
    exp.io_stats = st = IoStats()
    sock = str(tmp_path / "nbd.sock")
    async with trio.open_nursery() as n:
        await n.start(NBDServer(StaticCatalog({"vv1": exp})).serve_unix, sock)
        async with open_nbd(f"nbd+unix:///vv1?socket={sock}") as c:
            await c.write(0, b"x" * 4096)
            await c.write(8192, b"y" * 512, fua=True)
            assert await c.read(0, 4096) == b"x" * 4096
            await c.trim(65536, 65536)
            await c.zero(131072, 8192)
            await c.flush()
            with pytest.raises(NBDError):
                await c.read((1 << 20) - 512, 4096)
        n.cancel_scope.cancel()
    exp.close()
    assert st.requests[p.CMD_WRITE] == 2 and st.nbytes[p.CMD_WRITE] == 4096 + 512
    assert st.requests[p.CMD_READ] == 2 and st.nbytes[p.CMD_READ] == 4096
    assert (st.requests[p.CMD_TRIM], st.nbytes[p.CMD_TRIM]) == (1, 65536)
    assert (st.requests[p.CMD_WRITE_ZEROES], st.nbytes[p.CMD_WRITE_ZEROES]) == (1, 8192)
    assert st.requests[p.CMD_FLUSH] == 1
    assert [(op, n) for (op, _), n in st.errors.items()] == [(p.CMD_READ, 1)]
    assert all(h.count == st.requests[i] for i, h in enumerate(st.latency))
    assert st.inflight == 0
