"""The lab relay's control socket (``syncd lab cut-link/heal-link/delay``, the fuzzer's recording):
every command does what it says on the relays it names, and a bad request is answered with an
error that names the problem while nothing changes and the relay goes on relaying (before, an
unknown path number or a malformed line ended the relay process, and with it every path)."""

from __future__ import annotations

import base64
import functools
import json

import pytest
import trio

from syncd.lab.relay import Relay, RelayError, parse_request, proxy_command, proxy_line, run_proxy


@pytest.mark.parametrize("raw, want", [
    (b'{"cmd": "status"}\n', ("status", [0, 1, 2], {})),
    (b'{"cmd": "cut", "paths": [2, 0, 2]}', ("cut", [2, 0, 2], {})),  # as before: twice is harmless
    (b'{"cmd": "delay", "ms": 60000}', ("delay", [0, 1, 2], {"ms": 60000.0})),
    (b'{"cmd": "delay", "ms": -0.0}', ("delay", [0, 1, 2], {"ms": 0.0})),
    (b'{"cmd": "record", "limit": 67108864}', ("record", [0, 1, 2], {"limit": 64 << 20})),
    (b'{"cmd": "delay", "ms": 5, "paths": [1]}', ("delay", [1], {"ms": 5.0})),
    (b'{"cmd": "delay", "ms": 0.5}', ("delay", [0, 1, 2], {"ms": 0.5})),
    (b'{"cmd": "record", "paths": []}', ("record", [], {"limit": 1 << 16})),
    (b'{"cmd": "record", "limit": 10}', ("record", [0, 1, 2], {"limit": 10})),
])
def test_good_requests(raw: bytes, want: tuple) -> None:
    assert parse_request(raw, 3) == want


@pytest.mark.parametrize("raw, names", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 50_000, "not JSON"),
    (b'["cmd", "cut"]', "JSON object"),
    (b'{"cmd": "explode"}', "unknown command 'explode'"),
    (b'{}', "unknown command None"),
    (b'{"cmd": "cut", "paths": [3]}', "no path 3: this relay has paths 0 to 2"),
    (b'{"cmd": "cut", "paths": [-1]}', "no path -1"),
    (b'{"cmd": "cut", "paths": 1}', "paths must be a list"),
    (b'{"cmd": "cut", "paths": [true]}', "paths must be a list"),
    (b'{"cmd": "cut", "paths": [1.0]}', "paths must be a list"),
    (b'{"cmd": "delay"}', "ms must be"),
    (b'{"cmd": "delay", "ms": "5"}', "ms must be"),
    (b'{"cmd": "delay", "ms": -1}', "ms must be"),
    (b'{"cmd": "delay", "ms": NaN}', "ms must be"),
    (b'{"cmd": "delay", "ms": Infinity}', "ms must be"),
    (b'{"cmd": "delay", "ms": 1e9}', "ms must be"),
    (b'{"cmd": "delay", "ms": 60000.5}', "ms must be"),
    (b'{"cmd": "delay", "ms": 1' + b"0" * 400 + b'}', "ms must be"),  # an int too large for a float
    (b'{"cmd": "delay", "ms": true}', "ms must be"),
    (b'{"cmd": "record", "limit": 0}', "limit must be"),
    (b'{"cmd": "record", "limit": 1e3}', "limit must be"),
    (b'{"cmd": "record", "limit": 67108865}', "limit must be"),
    (b'{"cmd": "status", "pad": "' + b"x" * 70_000 + b'"}', "longer than"),
])
def test_bad_requests_name_the_problem(raw: bytes, names: str) -> None:
    with pytest.raises(ValueError, match=names.replace("(", r"\(")):
        parse_request(raw, 3)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def _roundtrip(port: int, data: bytes, wait: float = 2.0) -> bytes | None:
    """``data`` sent through the relay on a new connection and what came back (None: nothing)."""
    s = await trio.open_tcp_stream("127.0.0.1", port)
    async with s:
        await s.send_all(data)
        got = b""
        with trio.move_on_after(wait):
            while len(got) < len(data):
                chunk = await s.receive_some(65536)
                if not chunk:
                    break
                got += chunk
        return got or None


class Lab:
    """Two relays in front of one echo server, and their control socket."""

    def __init__(self, control: str, ports: list[int], relays: list[Relay]) -> None:
        self.control, self.ports, self.relays = control, ports, relays

    async def cmd(self, cmd: str, **kw) -> dict:
        return await trio.to_thread.run_sync(lambda: proxy_command(self.control, cmd, **kw))

    async def raw(self, line: bytes) -> dict:
        return await trio.to_thread.run_sync(proxy_line, self.control, line)


@pytest.fixture
async def lab(nursery: trio.Nursery, tmp_path) -> Lab:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    echo_port = listeners[0].socket.getsockname()[1]
    relays = []
    ports = []
    for _ in range(2):
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        ports.append(probe.getsockname()[1])
        probe.close()
        relays.append(Relay(("127.0.0.1", ports[-1]), ("127.0.0.1", echo_port)))
    control = str(tmp_path / "ctl")
    await nursery.start(run_proxy, relays, control)
    return Lab(control, ports, relays)


async def test_refusals_change_nothing_and_the_relay_goes_on(lab: Lab) -> None:
    await lab.cmd("delay", ms=2, paths=[1])
    before = (await lab.cmd("status"))["paths"]
    for line in (b"{garbage\n", b'{"cmd": "cut", "paths": [0, 7]}\n', b'{"cmd": "delay", "ms": -3}\n',
                 b'{"cmd": "delay", "ms": NaN}\n', b'{"cmd": "record", "limit": -1}\n', b'"cut"\n',
                 b'{"cmd": "reboot"}\n'):
        ans = await lab.raw(line)
        assert ans["ok"] is False and ans["error"], line
    with pytest.raises(RelayError, match="refused 'cut': no path 2"):
        await lab.cmd("cut", paths=[2])
    after = (await lab.cmd("status"))["paths"]
    assert [(p["cut"], p["rtt_added_ms"]) for p in after] == [(p["cut"], p["rtt_added_ms"]) for p in before] \
        == [(False, 0.0), (False, 2.0)]
    assert [r.recording for r in lab.relays] == [None, None]
    for port in lab.ports:  # still relaying, on both paths
        assert await _roundtrip(port, b"still here") == b"still here"


async def test_a_client_that_leaves_without_its_answer_changes_only_what_it_asked(lab: Lab) -> None:
    for line in (b"{bad\n", b'{"cmd": "status"}\n', b'{"cmd": "delay", "ms": 3, "paths": [0]}\n'):
        s = await trio.open_unix_socket(lab.control)
        await s.send_all(line)
        await s.aclose()  # gone before the answer: its send fails (EPIPE), the relay goes on
    with trio.fail_after(5):
        st = (await lab.cmd("status"))["paths"]
    assert [p["rtt_added_ms"] for p in st] == [3.0, 0.0]
    assert await _roundtrip(lab.ports[1], b"on") == b"on"


async def test_cut_heal_and_delay_act_on_the_paths_named(lab: Lab) -> None:
    s = await trio.open_tcp_stream("127.0.0.1", lab.ports[0])
    async with s:
        await s.send_all(b"a")
        assert await s.receive_some(10) == b"a"
        st = (await lab.cmd("cut", paths=[0]))["paths"]
        assert [p["cut"] for p in st] == [True, False]
        await s.send_all(b"lost")  # silently dropped: no answer, no reset
        with trio.move_on_after(0.3) as waited:
            await s.receive_some(10)
        assert waited.cancelled_caught
        assert await _roundtrip(lab.ports[0], b"x", wait=0.3) is None  # a new one goes nowhere either
        assert await _roundtrip(lab.ports[1], b"other path") == b"other path"
        await lab.cmd("heal", paths=[0])
        # The old connection was dropped by the heal (dead to both ends, as after a real cut).
        with trio.fail_after(2):
            try:
                assert await s.receive_some(10) == b""
            except trio.BrokenResourceError:
                pass
    assert await _roundtrip(lab.ports[0], b"back") == b"back"
    st = (await lab.cmd("delay", ms=40, paths=[1]))["paths"]
    assert [p["rtt_added_ms"] for p in st] == [0.0, 40.0]
    t0 = trio.current_time()
    assert await _roundtrip(lab.ports[1], b"slow") == b"slow"
    assert trio.current_time() - t0 >= 0.040  # a round trip through it: both directions' halves
    st = (await lab.cmd("delay", ms=0))["paths"]
    assert [p["rtt_added_ms"] for p in st] == [0.0, 0.0]


async def test_record_keeps_both_directions_up_to_the_limit(lab: Lab) -> None:
    await lab.cmd("record", paths=[1], limit=8)
    assert await _roundtrip(lab.ports[1], b"hello") == b"hello"
    assert await _roundtrip(lab.ports[0], b"not recorded") == b"not recorded"
    # the limit is reached within the first connection's chunks: what follows is not kept
    assert await _roundtrip(lab.ports[1], b"0123456789") == b"0123456789"
    ans = await lab.cmd("recorded", paths=[1])
    conns = ans["recorded"][0]
    assert len(conns) == 2
    first = [(side, base64.b64decode(b)) for side, b in conns[0]]
    assert first == [("c", b"hello"), ("s", b"hello")]
    second = b"".join(base64.b64decode(b) for _, b in conns[1])
    assert 8 <= len(second) < 20 and b"0123456789".startswith(second[:10])
    assert lab.relays[1].recording is None  # recording stops when read
    assert (await lab.cmd("recorded", paths=[1]))["recorded"] == [[]]


@pytest.mark.parametrize("argv, names", [
    (["delay", "--", "-5"], "from 0 to 60000 ms, got -5"),
    (["delay", "nan"], "got nan"),
    (["delay", "inf"], "got inf"),
    (["delay", "60001"], "got 60001"),
    (["cut-link", "--path", "2"], "cut-link: no link path 2: this lab's link has paths 0 to 1"),
    (["heal-link", "--path", "0", "--path", "-1"], "no link path -1"),
    # accepted by the command, then the (absent) relay is asked: the checks let these through
    (["delay", "0"], "No such file"),
    (["delay", "60000"], "No such file"),
    (["cut-link", "--path", "1"], "No such file"),
])
def test_lab_commands_refuse_before_asking_the_relay(tmp_path, capsys, argv: list[str], names: str) -> None:
    """Checked by the command: the relay (here: no relay at all) is never asked. Path 2 would
    be the lab's witness relay in the same relay process: not the link. Values in range get as
    far as asking it."""
    from syncd.cli import main

    (tmp_path / "lab.json").write_text(json.dumps({"link": {"control": str(tmp_path / "none"), "npaths": 2,
                                                            "relays": [{}, {}, {}]}}))
    cmd, rest = argv[0], argv[1:]
    assert main(["lab", cmd, "--dir", str(tmp_path), *rest]) == 1
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err
