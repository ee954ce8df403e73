"""The witness daemon as a real process: authentication, decisions, persistence across restart."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from syncd.lab.rig import free_port
from syncd.witness import proto as w

pytestmark = pytest.mark.system
KEY = "0123456789abcdef-test-key"


class Client:
    def __init__(self, port: int, node: str, key: str = KEY):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.dec = w.WDecoder()
        self.rid = 0
        ch = self.next()
        assert ch.type == w.WType.CHALLENGE
        self.nonce = bytes(32)
        tag = w.hello_tag(key.encode(), ch.nonce, node)
        self.s.sendall(w.encode(w.WType.HELLO, node=node, tag=tag, nonce=self.nonce))
        self.welcome = self.next()

    def next(self):
        while (f := self.dec.next_frame()) is None:
            data = self.s.recv(65536)
            if not data:
                raise EOFError("witness closed the connection")
            self.dec.receive_data(data)
        return f

    def ask(self, t, **fields):
        self.rid += 1
        self.s.sendall(w.encode(t, self.rid, **fields))
        f = self.next()
        assert f.req_id == self.rid
        return f


@pytest.fixture
def witness(tmp_path):
    port = free_port()
    cfg = tmp_path / "witness.toml"
    cfg.write_text(f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "state"\n'
                   f'key = "{KEY}"\nnodes = ["A", "B"]\nowner_lease = 0.3\nmargin = 0.1\ngrace = 1.0\n')
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-m", "syncd", "witness", "--config", str(cfg)],
                             stdout=open(tmp_path / "w.log", "ab"), stderr=subprocess.STDOUT)
        procs.append(p)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return p
            except OSError:
                time.sleep(0.05)
        raise AssertionError((tmp_path / "w.log").read_text())

    start()
    yield port, start, procs
    for p in procs:
        p.terminate()
        p.wait(5)


def test_unknown_arrays_and_wrong_keys_are_refused(witness):
    port, _, _ = witness
    c = Client(port, "C")
    assert c.welcome.type == w.WType.GOODBYE and "unknown array 'C'" in c.welcome.reason
    c = Client(port, "A", key="wrong-key-wrong-key")
    assert c.welcome.type == w.WType.GOODBYE and "authentication failed" in c.welcome.reason
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"garbage" * 20)  # and the witness keeps serving
    s.close()
    wl = Client(port, "A").welcome
    assert wl.type == w.WType.WELCOME
    assert w.verify_welcome(KEY.encode(), bytes(32), wl.witness, wl.tag)  # the witness proved the key


def test_a_node_takes_no_decision_from_a_witness_that_cannot_prove_the_key():
    """An impostor that accepts any array and WELCOMEs it without knowing the key."""
    import functools

    import trio

    from syncd.witness.client import WitnessClient, WitnessClientConfig

    seen = {}

    async def impostor(stream):
        await stream.send_all(w.encode(w.WType.CHALLENGE, nonce=bytes(32)))
        await stream.receive_some(4096)
        await stream.send_all(w.encode(w.WType.WELCOME, witness="W", tag=bytes(32)))
        await trio.sleep(5)

    async def main():
        async with trio.open_nursery() as n:
            listeners = await n.start(functools.partial(trio.serve_tcp, impostor, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            wc = WitnessClient(WitnessClientConfig(("127.0.0.1", port), KEY.encode()), "A", lambda: [])
            try:
                await wc._connect()
            except w.WitnessProtocolError as e:
                seen["error"] = str(e)
            seen["sock"] = wc.sock
            n.cancel_scope.cancel()

    trio.run(main)
    assert "failed to prove the shared key" in seen["error"]
    assert seen["sock"] is None


def test_failover_decision_survives_a_witness_restart(witness):
    port, start, procs = witness
    a, b = Client(port, "A"), Client(port, "B")
    d = a.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert (d.granted, d.owner, d.epoch) == (True, "A", 1)
    d = a.ask(w.WType.REPORT, group="rcg1", epoch=1, flags=w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)
    d = b.ask(w.WType.CLAIM, group="rcg1", epoch=1)
    assert not d.granted and "may still serve" in d.reason
    assert b.ask(w.WType.CLAIM, group="nosuch", epoch=1).type == w.WType.ERROR
    a.s.close()  # A dies
    time.sleep(0.6)
    d = b.ask(w.WType.CLAIM, group="rcg1", epoch=1)
    assert (d.granted, d.owner, d.epoch) == (True, "B", 2)
    procs[-1].terminate()
    procs[-1].wait(5)
    start()
    a2 = Client(port, "A")
    d = a2.ask(w.WType.KEEP, group="rcg1", epoch=1)  # the old owner returns: it lost the group
    assert not d.granted and (d.owner, d.epoch) == ("B", 2) and "failsafe" in d.reason
    d = a2.ask(w.WType.REGISTER, group="rcg1", member1="A", member2="B", owner="A", epoch=1)
    assert (d.owner, d.epoch) == ("B", 2)  # registration never overwrites a record
