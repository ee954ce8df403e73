"""Requests the witness hears late (docs/failover-plan.md rule 4): the rule in ``decide.fresh``,
and the node's real client against the real witness (in this process, over loopback): it asks
again at once when the witness refuses a request as heard late, and it says when a witness does
not refuse such requests (one older than the FRESH bit). The witness process itself, attacked
by hand-written requests, is in ``tests/system/test_witness_daemon.py``."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
import trio
from rich.console import Console

from syncd import secure
from syncd.ctl import print_witness
from syncd.witness import decide, server
from syncd.witness import proto as w
from syncd.witness.client import WitnessClient, WitnessClientConfig
from syncd.witness.decide import Timing
from syncd.witness.server import Witness, WitnessConfig

SEC = secure.Security("key", key=b"0123456789abcdef-test-key")
GROUPS = [("rcg1", ("A", "B"), "A", 1, w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC)]


def test_a_request_is_fresh_only_within_the_client_timeout_less_both_clocks_drift():
    t = Timing(drift=0.05)
    within = decide.FRESH_FOR * 0.95 / 1.05
    assert t.fresh_within() == pytest.approx(within)
    assert not decide.fresh(t, 100.0, None)  # nothing answered on the session yet
    assert decide.fresh(t, 100.0, 100.0 - within)
    assert not decide.fresh(t, 100.0, 100.0 - within - 1e-6)
    assert decide.fresh(Timing(drift=0.0), 100.0, 99.0) and not decide.fresh(t, 100.0, 99.0)
    assert decide.fresh(t, 100.0, 99.5, limit=0.6) and not decide.fresh(t, 100.0, 99.4, limit=0.6)


def run_client(tmp_path, rounds: int) -> tuple[WitnessClient, dict, Witness]:
    """A real witness and the node's client, until the client heard ``rounds`` answers to its
    report; returned with what it then said of the witness (``info``) and the witness, both
    stopped."""
    cfg = WitnessConfig("W", (("127.0.0.1", 0),), str(tmp_path / "state"), SEC, ("A", "B"), Timing())
    wit = Witness(cfg)
    heard: list[float] = []
    enough = trio.Event()

    def on_report(*a: object) -> None:
        heard.append(1.0)
        if len(heard) >= rounds:
            enough.set()

    async def main() -> tuple[WitnessClient, dict]:
        async with trio.open_nursery() as n:
            ports = await n.start(wit.run)
            wc = WitnessClient(WitnessClientConfig(("127.0.0.1", ports[0]), SEC, "W", interval=0.05), "A",
                               lambda: GROUPS, on_report)
            n.start_soon(wc.run)
            with trio.fail_after(10):
                await enough.wait()
            info = wc.info()
            n.cancel_scope.cancel()
        return wc, info

    wc, info = trio.run(main)
    return wc, info, wit


def test_the_client_asks_again_at_once_when_its_request_was_refused_as_heard_late(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, "syncd.witness")
    wc, info, wit = run_client(tmp_path, 3)
    # The session's first request (the REGISTER) was refused as heard late, asked again, taken
    # (counted without its group's name: the witness did not hold the group yet).
    assert wit.decisions[("", "register", "stale")] == 1
    assert wit.decisions[("rcg1", "register", "granted")] == 1
    assert wit.decisions[("rcg1", "report", "granted")] >= 3
    assert wc.fresh_checked is True and info["refuses_late_requests"] is True
    assert wit.state.groups["rcg1"].secondary_in_sync  # the reports were taken
    assert "not taken (first request of the session): asking again" in caplog.text
    assert "older witness" not in caplog.text


def test_a_witness_that_takes_late_requests_is_said_in_the_log_and_by_showrcopy(tmp_path, caplog, monkeypatch):
    # A witness before the FRESH bit: it echoes req_id and checks nothing.
    monkeypatch.setattr(server, "fresh", lambda *a, **k: True)
    caplog.set_level(logging.WARNING, "syncd.witness")
    wc, info, wit = run_client(tmp_path, 2)
    assert not any(k[2] == "stale" for k in wit.decisions)
    assert wc.fresh_checked is False and info["refuses_late_requests"] is False
    assert caplog.text.count("it does not refuse requests heard late (an older witness") == 1
    console = Console(record=True, width=200, color_system=None)
    print_witness(info, console)
    assert "WARNING: this witness takes requests heard late" in console.export_text()


# -- the client's side, in virtual time, against a scripted witness connection ----------------

class ScriptSession:
    """A witness connection that answers each request as ``script`` says, after ``delay`` s:
    "stale", "decision", "wrong-id" (an answer to another request) or "never"."""

    peer = "W"

    def __init__(self, *script: tuple[float, str]) -> None:
        self.script = list(script)
        self.sent: list[w.WFrame] = []
        self.sock = socket.socket()
        self.linger = b""

    async def send(self, data: bytes) -> None:
        dec = w.WDecoder()
        dec.receive_data(data)
        f = dec.next_frame()
        assert f is not None and f.req_id & w.FRESH, "every request asks to be refused when heard late"
        self.sent.append(f)

    async def next_frame(self) -> w.WFrame:
        delay, what = self.script.pop(0)
        if what == "never":
            await trio.sleep_forever()
        await trio.sleep(delay)
        rid = self.sent[-1].req_id
        if what == "stale":
            return w.WFrame(w.WType.STALE, rid, {"reason": "heard 1.100 s after the answer before it"})
        return w.WFrame(w.WType.DECISION, rid if what == "decision" else rid + 1,
                        {"granted": True, "owner": "A", "epoch": 1, "reason": "A goes on alone"})

    def close(self) -> None:
        self.linger = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        self.sock.close()


def scripted(*script: tuple[float, str]) -> tuple[WitnessClient, ScriptSession, list[float]]:
    wc = WitnessClient(WitnessClientConfig(("127.0.0.1", 1), secure.Security("insecure")), "A", lambda: [])
    sends: list[float] = []
    wc.on_sent = lambda group, when: sends.append(when)
    wc.sess = sess = ScriptSession(*script)
    return wc, sess, sends


def reset(sess: ScriptSession) -> bool:
    """The connection was closed with a reset (SO_LINGER on, 0 s): nothing it sent is retransmitted."""
    return struct.unpack("ii", sess.linger) == (1, 0)


async def test_a_retry_is_counted_as_sent_and_its_send_is_what_the_role_machine_hears(autojump_clock):
    wc, sess, sends = scripted((0.05, "stale"), (0.05, "decision"))
    await trio.sleep(3.0)
    f, sent = await wc.decide(w.WType.KEEP, "rcg1", 1)
    assert f is not None and f.granted
    # Both went on the connection: the witness may have heard either (the pre-election bound).
    assert sends == [3.0, 3.05]
    # The answer is the retry's: a lease or deadline counted from it starts at its sending.
    assert sent == wc.last_ok_sent == 3.05
    assert [x.type for x in sess.sent] == [w.WType.KEEP, w.WType.KEEP] and sess.sent[0].req_id != sess.sent[1].req_id
    assert wc.fresh_checked is True and wc.sess is sess


async def test_a_second_stale_in_a_row_gives_the_connection_up_with_a_reset(autojump_clock):
    wc, sess, sends = scripted((0.05, "stale"), (0.05, "stale"))
    f, _ = await wc.decide(w.WType.KEEP, "rcg1", 1)
    assert f is None and len(sends) == 2  # no third attempt: the network delays requests that long
    assert wc.sess is None and reset(sess)
    assert "two requests in a row too late" in wc.last_error


async def test_a_request_cancelled_or_answered_out_of_order_leaves_no_session_behind(autojump_clock):
    wc, sess, _ = scripted((0.0, "never"))
    with trio.move_on_after(0.3):
        await wc.decide(w.WType.KEEP, "rcg1", 1)
    # Its answer may still come: a next request on this session would be measured from it.
    assert wc.sess is None and reset(sess) and "cancelled" in wc.last_error
    wc, sess, _ = scripted((0.05, "wrong-id"))
    f, _ = await wc.decide(w.WType.KEEP, "rcg1", 1)
    assert f is None and wc.sess is None and reset(sess) and "out of order" in wc.last_error


def test_the_client_timeout_the_role_machines_and_the_witness_window_are_one_number():
    """The client's timeout, the role machine's and the witness's window are one number."""
    from syncd.node import roles
    from syncd.witness.client import REQUEST_TIMEOUT

    from .roles_sim import SimConfig

    assert REQUEST_TIMEOUT == decide.FRESH_FOR == roles.WitnessTiming().request_timeout == SimConfig().witness_timeout
