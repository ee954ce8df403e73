"""What the node's witness clients (built-in and etcd) keep about reaching the witness, in
virtual time: one owner (``reach.WitnessReach``) of when it last answered, the last error, and
the connected/lost edges the node is told of. For etcd, each member's health as the client
gathers it (every member at once, each with a deadline) and as ``showrcopy witness`` draws it."""

from __future__ import annotations

import json
import socket
import struct

import pytest
import trio
import trio.testing
from rich.console import Console

from syncd.ctl import print_witness
from syncd.witness.etcd import EtcdError, EtcdUnreachable, MemberStatus
from syncd.witness.etcd_members import MemberHealth, gather
from syncd.witness.reach import UNHEARD_INTERVALS, WitnessReach


async def test_the_node_hears_each_edge_once_and_reachability_lapses_after_unheard_intervals(autojump_clock):
    edges: list[bool | None] = []
    r = WitnessReach(0.5, edges.append)
    assert (r.connected, r.reachable, r.last_heard_s_ago(), r.lost_for()) == (None, False, None, float("inf"))
    r._ok()
    r._ok()
    assert edges == [True] and r.reachable and r.last_heard_s_ago() == 0.0
    await trio.sleep(UNHEARD_INTERVALS * 0.5 + 0.01)
    assert not r.reachable and r.connected  # silent: not reachable, though nothing failed yet
    r._failed(OSError("connection refused"))
    r._failed(trio.TooSlowError())
    assert edges == [True, False] and r.last_error == "TooSlowError"  # an error without text is named
    r._ok()
    assert edges == [True, False, True] and r.last_error == "" and r.reachable


# -- the etcd members' health, for showrcopy witness ------------------------------------------------

def status(endpoint: str, member_id: int, leader: int, term: int = 2, index: int = 42) -> MemberStatus:
    return MemberStatus(endpoint, member_id, leader, term, index, index, 20480, 16384, "3.4.23", False, ())


class Cluster:
    """Three members as the gathering sees them: one answering, refusing, or silent at will."""

    def __init__(self) -> None:
        self.ids = {f"http://m{i}:2379": 0x10 + i for i in (1, 2, 3)}
        self.state = dict.fromkeys(self.ids, "up")
        self.leader = 0x12
        self.asked: list[tuple[str, float]] = []

    async def member_status(self, endpoint: str, within: float) -> MemberStatus:
        self.asked.append((endpoint, trio.current_time()))
        await trio.sleep(0.01)
        if self.state[endpoint] == "down":
            raise EtcdUnreachable("[Errno 111] Connection refused")
        if self.state[endpoint] == "silent":
            await trio.sleep_forever()  # a partitioned member: the gathering's deadline ends it
        if self.state[endpoint] == "garbled":
            return MemberStatus.from_answer(endpoint, {"header": {"member_id": "not a number"}})
        return status(endpoint, self.ids[endpoint], self.leader)


async def test_gathering_asks_every_member_at_once_and_a_silent_one_costs_only_the_deadline(autojump_clock):
    c = Cluster()
    eps = list(c.ids)
    c.state[eps[0]], c.state[eps[2]] = "silent", "down"
    t0 = trio.current_time()
    g = await gather(c, eps, 0.5)
    assert g.at - t0 == pytest.approx(0.5)  # the silent member's deadline, not three in a row
    assert {t for _, t in c.asked} == {t0}  # all asked at once
    m1, m2, m3 = g.members
    assert [m.endpoint for m in g.members] == eps  # the configured order, whatever answered first
    assert (m1.status, m1.error) == (None, "no answer within 0.50s")
    assert m2.status is not None and m2.status.is_leader and m2.error == ""
    assert (m3.status, m3.error) == (None, "[Errno 111] Connection refused")
    c.state[eps[2]] = "garbled"
    assert (await gather(c, eps, 0.5)).members[2].error.startswith("invalid literal")


def test_members_json_is_machine_readable_ids_in_hex_the_leader_marked():
    up = MemberHealth("http://m1:2379", status("http://m1:2379", 0x8E9E05C52164694D, 0x8E9E05C52164694D))
    down = MemberHealth("http://m2:2379", None, "no answer within 0.50s")
    assert up.to_json() == {"endpoint": "http://m1:2379", "reachable": True, "id": "8e9e05c52164694d", "leader": True,
                            "leader_id": "8e9e05c52164694d", "raft_term": 2, "raft_index": 42, "db_size": 20480,
                            "version": "3.4.23", "alarms": [], "error": ""}
    j = down.to_json()
    assert (j["reachable"], j["id"], j["leader"], j["error"]) == (False, None, False, "no answer within 0.50s")
    assert json.loads(json.dumps([up.to_json(), j])) == [up.to_json(), j]


def test_a_status_answer_is_read_as_etcd_gives_it():
    ans = {"header": {"cluster_id": "15266989359947598340", "member_id": "108855803116454548", "revision": "1",
                      "raft_term": "2"}, "version": "3.4.23", "dbSize": "20480", "leader": "7156832609233358326",
           "raftIndex": "8", "raftTerm": "2", "raftAppliedIndex": "8", "dbSizeInUse": "16384"}
    s = MemberStatus.from_answer("http://m1:2379", ans)
    assert (s.member_id, s.leader, s.raft_term, s.raft_index, s.db_size, s.is_learner, s.errors) == (
        108855803116454548, 7156832609233358326, 2, 8, 20480, False, ())
    assert not s.is_leader
    with pytest.raises(EtcdError, match="without a header"):
        MemberStatus.from_answer("http://m1:2379", {"version": "3.4.23"})


def render(wt: dict) -> str:
    console = Console(record=True, width=160, color_system=None)
    print_witness(wt, console)
    return console.export_text()


ETCD_INFO = {"backend": "etcd", "address": "http://m1:2379,http://m2:2379,http://m3:2379",
             "endpoints": ["http://m1:2379", "http://m2:2379", "http://m3:2379"], "prefix": "/syncd/rcg1",
             "reachable": True, "witness": "etcd", "security": "plain HTTP (insecure)",
             "answered_by": "http://m2:2379", "last_error": "", "last_heard_s_ago": 0.1, "lease_ttl_s": 2,
             "peers_key_quiet_s": {"B": 0.3}, "members_age_s": 0.4}


def test_showrcopy_witness_draws_one_row_per_etcd_member_with_its_health():
    members = [MemberHealth("http://m1:2379", None, "[Errno 111] Connection refused").to_json(),
               MemberHealth("http://m2:2379", status("http://m2:2379", 0x12, 0x12)).to_json(),
               MemberHealth("http://m3:2379", status("http://m3:2379", 0x13, 0x12)).to_json()]
    out = render(dict(ETCD_INFO, members=members))
    assert "Quorum witness in etcd (3 endpoints): reachable, plain HTTP (insecure)" in out
    assert "prefix /syncd/rcg1, answered last by http://m2:2379" in out
    assert "etcd members: 2 of 3 reachable, leader 12 (asked 0.4 s ago)" in out
    assert "B's key in etcd: last seen to move 0.3 s ago" in out
    fresh = render(dict(ETCD_INFO, members=members, peers_key_quiet_s={"B": None}))
    assert "B's key in etcd: not seen to move since this node started" in fresh
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if "http://m" in line and "│" in line}
    assert rows["http://m1:2379"] == ["unreachable", "-", "-", "-", "-", "-", "[Errno 111] Connection refused"]
    assert rows["http://m2:2379"] == ["reachable", "12", "yes", "2", "42", "20.0 KiB", ""]
    assert rows["http://m3:2379"] == ["reachable", "13", "no", "2", "42", "20.0 KiB", ""]


def test_showrcopy_witness_says_when_the_members_were_not_asked_yet_and_builtin_is_unchanged():
    assert "etcd members: not asked yet" in render(dict(ETCD_INFO, members=None, members_age_s=None))
    out = render({"backend": "builtin", "address": "127.0.0.1:7000", "reachable": False, "witness": "W",
                  "security": "key", "last_error": "connection refused", "last_heard_s_ago": None})
    assert out.strip() == "Quorum witness W at 127.0.0.1:7000: unreachable (connection refused), key"


# -- what the witness may have heard: requests put on a connection (WitnessSent) ------------------

class SilentSession:
    """A witness connection whose answers never come back (lost on the way)."""

    peer = "w1"

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.sock = socket.socket()
        self.linger = b""

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def next_frame(self):
        await trio.sleep_forever()

    def close(self) -> None:
        self.linger = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        self.sock.close()
        self.closed = True


async def test_a_request_put_on_a_connection_counts_as_maybe_heard_even_unanswered(autojump_clock):
    from syncd import secure
    from syncd.witness import proto as w
    from syncd.witness.client import REQUEST_TIMEOUT, WitnessClient, WitnessClientConfig, WitnessUnreachable

    wc = WitnessClient(WitnessClientConfig(("127.0.0.1", 1), secure.Security("insecure")), "A", lambda: [])
    sent: list[tuple[str, float]] = []
    wc.on_sent = lambda group, when: sent.append((group, when))
    with pytest.raises(WitnessUnreachable):
        await wc.request(w.WType.REPORT, group="g", epoch=1, flags=0)  # no connection: nothing went
    assert sent == []
    await trio.sleep(2.0)
    wc.sess = sess = SilentSession()
    with pytest.raises(WitnessUnreachable):
        await wc.request(w.WType.REPORT, group="g", epoch=1, flags=0)
    assert sent == [("g", 2.0)], "the witness may have heard it, though its answer never came"
    assert trio.current_time() == 2.0 + REQUEST_TIMEOUT  # given up counting from that send
    # ... and closed with a reset: the kernel stops retransmitting it (the witness must not hear
    # it late).
    assert sess.closed and sess.linger == struct.pack("ii", 1, 0)



# -- a report never follows a KEEP with flags read before it ----------------------------------------

class TurnSession:
    """A witness connection that answers each request when the test says (``answer``)."""

    peer = "w1"

    def __init__(self) -> None:
        from syncd.witness import proto as w

        self.sent: list = []  # the frames, decoded
        self.turn = trio.Event()
        self.sock = socket.socket()
        self._w = w

    async def send(self, data: bytes) -> None:
        dec = self._w.WDecoder()
        dec.receive_data(data)
        self.sent.append(dec.next_frame())

    async def next_frame(self):
        await self.turn.wait()
        self.turn = trio.Event()
        w, last = self._w, self.sent[-1]
        return w.WFrame(w.WType.DECISION, last.req_id, {"granted": True, "owner": "A", "epoch": 1, "reason": "ok"})

    def answer(self) -> None:
        self.turn.set()

    def close(self) -> None:
        self.sock.close()


async def keep_while_reporting(client, answer, flags: dict, group: str, before=lambda: None) -> None:
    """A round of reports by ``client``; once its first report is under way the link is lost for
    ``group`` (its flags drop) and the node asks the witness to KEEP it; ``before`` checks what
    went out by then; then each request is answered in turn (``answer``)."""
    from syncd.witness import proto as w

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client._round)
        await trio.testing.wait_all_tasks_blocked()
        flags[group] = 0
        nursery.start_soon(client.decide, w.WType.KEEP, group, 1)
        await trio.testing.wait_all_tasks_blocked()
        before()
        for _ in range(3):
            answer()
            await trio.testing.wait_all_tasks_blocked()


def groups_of(flags: dict):
    """The node's groups as the witness clients read them: every one owned by A at epoch 1."""
    return lambda: [(g, ("A", "B"), "A", 1, f) for g, f in flags.items()]


async def test_a_report_waiting_behind_a_keep_sends_the_flags_of_its_own_turn():
    """Found by the role model's random schedules (stop 43): a round of reports read every
    group's flags at its start; the link went while it reported another group, the KEEP for this
    group went first, and the report after it still said the peer was in sync. The witness took
    the peer for in sync again, and, once this array was cut off from it too, gave the peer the
    group while this array went on alone. The flags are now read when the report's turn comes."""
    from syncd import secure
    from syncd.witness import proto as w
    from syncd.witness.client import WitnessClient, WitnessClientConfig

    both = w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC
    flags = {"g1": both, "g2": both}
    wc = WitnessClient(WitnessClientConfig(("127.0.0.1", 1), secure.Security("insecure")), "A", groups_of(flags))
    wc.sess = sess = TurnSession()
    wc.registered = {"g1", "g2"}

    def the_keep_waits() -> None:
        assert [(f.type, f.group) for f in sess.sent] == [(w.WType.REPORT, "g1")]

    await keep_while_reporting(wc, sess.answer, flags, "g2", the_keep_waits)
    assert [(f.type, f.group) for f in sess.sent] == [(w.WType.REPORT, "g1"), (w.WType.KEEP, "g2"),
                                                      (w.WType.REPORT, "g2")]
    assert sess.sent[2].flags == 0, "the report after the KEEP says what holds at its sending"


class TurnEtcd:
    """The etcd witness, each request answered when the test says: what reached it, in order."""

    def __init__(self) -> None:
        self.got: list[tuple] = []
        self.turn = trio.Event()
        self.lease_sent = 0.0  # (when its lease was asked for: the client reports no later)
        self.refused = ""

    async def renew(self, now):  # (the round's sign of life: not a request this test follows)
        pass

    async def _answer(self, what: tuple):
        from syncd.witness.decide import Decision

        self.got.append(what)
        await self.turn.wait()
        self.turn = trio.Event()
        return Decision(True, "A", 1, "ok")

    async def report(self, name, epoch, *, peer_alive, peer_in_sync, lost_anew=False):
        return await self._answer(("report", name, peer_in_sync))

    async def keep(self, name, epoch):
        return await self._answer(("keep", name))

    claim = handover = resolve = keep  # (the client looks every decision up)

    def answer(self) -> None:
        self.turn.set()


async def test_the_etcd_client_too_sends_a_report_after_a_keep_with_the_flags_of_its_own_turn():
    """The same on etcd: reports and decisions go one at a time, each report's flags read when its
    turn comes."""
    from syncd.witness import proto as w
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EtcdWitnessClient, EtcdWitnessConfig

    both = w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC
    flags = {"g1": both, "g2": both}
    ec = EtcdWitnessClient(EtcdWitnessConfig(EtcdConfig(("http://127.0.0.1:1",)), "p"), "A", groups_of(flags))
    ec.witness = etcd = TurnEtcd()
    ec.registered = {"g1", "g2"}
    await keep_while_reporting(ec, etcd.answer, flags, "g2")
    assert etcd.got == [("report", "g1", True), ("keep", "g2"), ("report", "g2", False)]
    # A KEEP asked while the report of the same group is under way waits for its answer: etcd
    # must not commit the KEEP first and the report's older flags after it.
    flags["g1"] = both
    etcd.got.clear()

    def the_keep_waits() -> None:
        assert etcd.got == [("report", "g1", True)]

    await keep_while_reporting(ec, etcd.answer, flags, "g1", the_keep_waits)
    assert etcd.got == [("report", "g1", True), ("keep", "g1"), ("report", "g2", False)]


async def test_the_etcd_client_says_each_granted_lease_to_every_group_and_reports_no_later_than_it(autojump_clock):
    """etcd may hold this array alive for a lease's TTL from its grant, answered or not what came
    after it: the client tells the node of each grant's answer for every group (the role
    machine's WitnessSent), and a report done on a lease granted before it is said to have been
    sent no later than that grant (the witness owes the group from then)."""
    from syncd.witness import proto as w
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EtcdWitnessClient, EtcdWitnessConfig

    from .etcd_model import MemoryEtcd

    both = w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC
    reports, sent = [], []
    ec = EtcdWitnessClient(EtcdWitnessConfig(EtcdConfig(("http://127.0.0.1:1",)), "/p", interval=0.5), "A",
                           groups_of({"g1": both, "g2": both}), lambda *a: reports.append(a))
    ec.on_sent = lambda group, when: sent.append((group, when))
    ec.witness.kv = MemoryEtcd()
    await trio.sleep(10.0)
    await ec._round()
    assert sent == [("g1", 10.0), ("g2", 10.0)]  # one lease serves the round
    assert [(r[0], r[1]) for r in reports] == [("g1", 10.0), ("g2", 10.0)]
    await trio.sleep(0.1)  # within renew (interval / 2): the same lease
    await ec._round()
    assert len(sent) == 2 and [r[1] for r in reports[2:]] == [10.0, 10.0]
    await trio.sleep(0.3)
    await ec._round()
    assert sent[2:] == [("g1", pytest.approx(10.4)), ("g2", pytest.approx(10.4))]
    assert [r[1] for r in reports[4:]] == [pytest.approx(10.4)] * 2


async def test_an_etcd_lease_longer_than_counted_is_refused_and_the_witness_not_used(autojump_clock, caplog):
    """etcd raises a lease's TTL to 1.5 of its election timeouts. A cluster whose election
    timeout is longer than ``[witness] election_timeout`` says would hold this array alive
    longer than the node counts: the client puts nothing on such a lease, and the witness is
    unreachable from this array, with the reason (logged once, in ``last_error``)."""
    from syncd.witness import proto as w
    from syncd.witness.etcd import EtcdConfig
    from syncd.witness.etcd_node import EtcdWitnessClient, EtcdWitnessConfig

    from .etcd_model import MemoryEtcd

    both = w.REPORT_PEER_ALIVE | w.REPORT_PEER_IN_SYNC
    sent, reports = [], []
    ec = EtcdWitnessClient(EtcdWitnessConfig(EtcdConfig(("http://127.0.0.1:1",)), "/p"), "A",
                           groups_of({"g1": both}), lambda *a: reports.append(a))
    ec.on_sent = lambda group, when: sent.append(group)
    ec.witness.kv = store = MemoryEtcd()
    store.min_ttl = 8  # a cluster with an election timeout of 5 s; the node counts 1 s
    with trio.move_on_after(3.0):
        await ec.run()
    assert ec.reachable is False and "set [witness] election_timeout" in ec.last_error
    assert [k for k in store.kv if b"/alive/" in k] == [] and reports == [] and sent == []
    d, _ = await ec.decide(w.WType.KEEP, "g1", 1)
    assert d is None  # as with a witness that cannot be asked
    assert sum("election_timeout" in r.getMessage() for r in caplog.records if "KEEP" not in r.getMessage()) == 1
    store.min_ttl = 1  # the cluster's election timeout as configured: the witness is used again
    with trio.move_on_after(1.0):
        await ec.run()
    assert ec.reachable and reports and set(sent) == {"g1"}
