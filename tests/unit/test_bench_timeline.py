"""bench/timeline.py and its hook (bench/tracehook/sitecustomize.py): a QD1 request followed hop
by hop through both nodes, from literal events, and the hook recording in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pytest import approx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import timeline  # noqa: E402
from timeline import Recording  # noqa: E402
from tracehook.sitecustomize import GC, GC_DONE, PWRITE, RX, SEND, SENT, WAKE  # noqa: E402

HOST_A, HOST_B = 7000, 7100  # the nodes' NBD ports
LINK_A, LINK_B = 41000, 9000  # A dialled B's path port 9000 from 41000
PORTS_A = {LINK_A: LINK_B, HOST_A: 51000, 8000: 2379}  # a host connection, a witness one
PORTS_B = {LINK_B: LINK_A, HOST_B: 52000}
HOST_PORT = {"A": HOST_A, "B": HOST_B}

# One replicated write with the host at A, as (µs from the request, node, kind, port).
AT_A = [(0, "A", RX, HOST_A), (20, "A", SEND, LINK_A), (30, "A", SENT, LINK_A), (37, "A", PWRITE, 0),
        (40, "B", RX, LINK_B), (60, "B", PWRITE, 0), (65, "B", SEND, LINK_B), (75, "B", SENT, LINK_B),
        (80, "A", RX, LINK_A), (95, "A", SEND, HOST_A), (105, "A", SENT, HOST_A)]
CYCLE_A = 140  # the host's next request comes 35 µs after its reply
# The same at B, then the RELEASE B sends once the host has its reply.
AT_B = [(0, "B", RX, HOST_B), (20, "B", SEND, LINK_B), (30, "B", SENT, LINK_B), (42, "A", RX, LINK_A),
        (60, "A", PWRITE, 0), (66, "A", SEND, LINK_A), (76, "A", SENT, LINK_A), (80, "B", RX, LINK_B),
        (100, "B", PWRITE, 0), (110, "B", SEND, HOST_B), (120, "B", SENT, HOST_B), (126, "B", SEND, LINK_B),
        (134, "B", SENT, LINK_B), (140, "A", RX, LINK_A)]
CYCLE_B = 170


def recordings(template: list, cycle: int, n: int, t0: int = 10**9, odd: int | None = None) -> dict[str, Recording]:
    """``n`` cycles of ``template`` from ``t0`` ns; cycle ``odd`` has an extra receive at A (a
    keepalive) and takes 30 µs longer."""
    ev: dict[str, list] = {"A": [], "B": []}
    t = t0
    for i in range(n):
        for us, node, kind, port in template:
            ev[node].append((t + us * 1000, kind, port))
        if i == odd:
            ev["A"].append((t + 50_000, RX, LINK_A))
            t += 30_000
        t += cycle * 1000
    return {"A": Recording(ev["A"], PORTS_A), "B": Recording(ev["B"], PORTS_B)}


def test_the_link_is_the_connection_whose_ends_name_each_other() -> None:
    a, b = Recording([], PORTS_A), Recording([], PORTS_B)
    assert timeline.link_ports(a, b) == {LINK_A}
    assert timeline.link_ports(b, a) == {LINK_B}
    # B happening to use the port of A's host connection (for another connection) is no link.
    b = Recording([], {**PORTS_B, 51000: 7777})
    assert timeline.link_ports(a, b) == {LINK_A}


def test_a_request_received_in_two_pieces_is_one_cycle() -> None:
    recs = recordings([AT_A[0], (2, "A", RX, HOST_A)] + AT_A[1:], CYCLE_A, 10)
    events, _ = timeline.labelled(recs, HOST_PORT, 0, 2**62)
    an = timeline.analyse(events, "A")
    assert an is not None and an.cycles == 9 and an.cycle_p50_us == approx(CYCLE_A)
    second = an.steps[1]
    assert (second.name, second.at_us, second.waited_us) == ("A rx (host)", approx(2.0), approx(2.0))


def test_events_are_labelled_by_socket_and_kept_to_the_window_and_wakes_counted_apart() -> None:
    recs = recordings(AT_A, CYCLE_A, 3)
    recs["B"].events.append((10**9 + 1000, WAKE, 0))
    recs["A"].events.append((10**9 + 2000, RX, 8000))  # the witness connection
    events, wakes = timeline.labelled(recs, HOST_PORT, 10**9, 10**9 + CYCLE_A * 1000 - 1)
    assert wakes == {"B": 1}
    assert [(n, k, w) for _, n, k, w in events][:4] == [("A", RX, "host"), ("A", RX, "other"), ("A", SEND, "link"),
                                                        ("A", SENT, "link")]
    assert len(events) == len(AT_A) + 1  # one cycle and the witness's receive; nothing after the window


def test_a_cycle_at_site_a_hop_by_hop_and_where_its_time_went() -> None:
    recs = recordings(AT_A, CYCLE_A, 20, odd=7)
    events, wakes = timeline.labelled(recs, HOST_PORT, 0, 2**62)
    an = timeline.analyse(events, "A", wakes)
    assert an is not None
    assert (an.cycles, an.typical) == (19, 18)  # the last request starts no whole cycle; one odd one
    assert an.cycle_p50_us == approx(CYCLE_A)
    steps = {st.name: st for st in an.steps}
    assert [st.name for st in an.steps][0] == "A rx (host)" and an.steps[-1].name == "next request A rx (host)"
    assert [st.at_us for st in an.steps] == approx([us for us, *_ in AT_A] + [CYCLE_A])
    # B's receive waited for A's send (10 µs), not for A's own copy, written meanwhile.
    assert (steps["B rx (link)"].after, steps["B rx (link)"].waited_us) == ("A sent (link)", approx(10.0))
    assert steps["B rx (link)"].spent_on == "hand-over to B"
    assert steps["A pwrite"].spent_on == "off the critical path"
    # A's receive of the answer waited for B's send, not for its own earlier write.
    assert (steps["A rx (link)"].after, steps["A rx (link)"].waited_us) == ("B sent (link)", approx(5.0))
    assert an.classes == approx({"node A: Python": 20 + 15, "sendmsg": 30, "hand-over to B": 10,
                                 "hand-over to A": 5, "node B: Python": 20 + 5, "the host": 35})
    assert sum(an.classes.values()) == approx(CYCLE_A)


def test_work_of_both_nodes_at_once_is_counted_on_the_node_that_did_it() -> None:
    """B receives while A is still in its sendmsg, and writes while A writes its own copy: B's
    steps count from B's own, A's copy is off the critical path."""
    overlap = [(0, "A", RX, HOST_A), (20, "A", SEND, LINK_A), (24, "B", RX, LINK_B), (30, "A", SENT, LINK_A),
               (55, "A", PWRITE, 0), (60, "B", PWRITE, 0), (65, "B", SEND, LINK_B), (75, "B", SENT, LINK_B),
               (80, "A", RX, LINK_A), (95, "A", SEND, HOST_A), (105, "A", SENT, HOST_A)]
    events, _ = timeline.labelled(recordings(overlap, CYCLE_A, 10), HOST_PORT, 0, 2**62)
    an = timeline.analyse(events, "A")
    assert an is not None
    steps = {st.name: st for st in an.steps}
    assert (steps["B rx (link)"].after, steps["B rx (link)"].spent_on) == ("A send (link)", "hand-over to B")
    assert (steps["B pwrite"].after, steps["B pwrite"].waited_us) == ("B rx (link)", approx(36.0))
    assert steps["A sent (link)"].spent_on == steps["A pwrite"].spent_on == "off the critical path"
    assert an.classes == approx({"node A: Python": 20 + 15, "hand-over to B": 4, "node B: Python": 36 + 5,
                                 "sendmsg": 20, "hand-over to A": 5, "the host": 35})


def test_work_after_the_hosts_reply_is_off_the_critical_path() -> None:
    recs = recordings(AT_B, CYCLE_B, 10)
    events, wakes = timeline.labelled(recs, HOST_PORT, 0, 2**62)
    an = timeline.analyse(events, "B", wakes)
    assert an is not None and an.typical == an.cycles == 9
    assert an.classes == approx({"node B: Python": 20 + 20 + 10, "sendmsg": 30, "hand-over to A": 12,
                                 "node A: Python": 18 + 6, "hand-over to B": 4, "the host": 50})
    steps = {st.name: st for st in an.steps}
    assert steps["next request B rx (host)"].after == "B sent (host)"
    md = timeline.markdown({"B": an, "A": None}, "a note")
    assert "## fio at B" in md
    assert "| B send (link) | 126.0 | 6.0 | B sent (host) | off the critical path (after the reply) |" in md
    assert "a note" in md and "No whole cycles were recorded." in md


def test_too_few_requests_give_no_analysis() -> None:
    events, _ = timeline.labelled(recordings(AT_A, CYCLE_A, 2), HOST_PORT, 0, 2**62)
    assert timeline.analyse(events, "A") is None


def test_the_hook_records_a_real_processs_sends_receives_and_writes(tmp_path: Path) -> None:
    """A process started with the hook on its path records what syncd.netio sends and receives
    and what Volume.write_sync writes; without SYNCD_TIMELINE it records nothing."""
    script = textwrap.dedent("""
        import os, socket, sys
        from syncd import netio
        from syncd.node import volume
        a, b = socket.socketpair()
        l = socket.create_server(("127.0.0.1", 0)); c = socket.create_connection(l.getsockname()); s, _ = l.accept()
        for sock in (a, b, c, s):
            sock.setblocking(False)
        netio.send_available(c, [b"x" * 100])
        assert netio.recv_into_nowait(s, memoryview(bytearray(200))) == 100
        assert netio.recv_into_nowait(s, memoryview(bytearray(200))) is None  # nothing: not recorded
        netio.send_available(a, [b"unix"])
        try:  # fill the Unix socket: a send the kernel takes nothing of is not marked
            while True:
                a.send(b"f" * 65536)
        except BlockingIOError:
            pass
        assert netio.send_available(a, [b"more"])[0] == 0
        class V:  # what Volume.write_sync uses of a volume
            fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        volume.Volume.write_sync(V(), 4096, b"w" * 512)
        assert os.pread(V.fd, 512, 4096) == b"w" * 512  # the wrapped method did write
        import gc
        gc.collect(1)  # a pass of the collector, generation 1

        import threading, time, trio, trio.testing
        from trio._core._io_epoll import EpollIOManager

        async def main():
            # Data found by a poll with timeout 0 (tasks were ready): no wake-up from a sleep.
            async with trio.open_nursery() as n:
                n.start_soon(trio.lowlevel.wait_readable, s)
                await trio.testing.wait_all_tasks_blocked()
                c.send(b"x")
                for _ in range(3):
                    await trio.lowlevel.checkpoint()
            assert s.recv(1) == b"x"
            netio.send_available(b, [b"mark"])  # (a Unix send: the end of this part)
            # The loop sleeps in epoll until another thread's send wakes it.
            threading.Thread(target=lambda: (time.sleep(0.05), s.send(b"late"))).start()
            assert await netio.recv(c, 100, netio.Pacer(), netio.Probe(c)) == b"late"  # as the NBD server
            await netio.sendmsg_all(c, [b"hello"], pacer=netio.Pacer())
        trio.run(main)
        assert s.recv(100) == b"hello"
        netio.send_available(b, [b"m1"])  # a pass in another thread between these is not recorded
        worker = threading.Thread(target=gc.collect, args=(1,))
        worker.start()
        worker.join()
        netio.send_available(b, [b"m2"])
        print(c.getsockname()[1], s.getsockname()[1], netio.recv.__name__, EpollIOManager.get_events.__name__)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench" / "tracehook")]),
               SYNCD_TIMELINE=str(tmp_path))
    disk = str(tmp_path / "disk")
    p = subprocess.run([sys.executable, "-c", script, disk], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    client, server, recv_name, epoll_name = p.stdout.split()
    client, server = int(client), int(server)
    assert (recv_name, epoll_name) == ("traced_recv", "traced_get_events")
    (f,) = tmp_path.glob("*.events")
    rec = timeline.read_recording(f)
    got = [(k, port) for _, k, port in rec.events if k not in (GC, GC_DONE)]  # passes: below
    assert [e for e in got if e[0] != WAKE] == [(SEND, client), (SENT, client), (RX, server),
                                                (SEND, -1), (SENT, -1), (PWRITE, 0),  # -1: a Unix socket
                                                (SEND, -1), (SENT, -1),
                                                (RX, client), (SEND, client), (SENT, client),
                                                (SEND, -1), (SENT, -1), (SEND, -1), (SENT, -1)]
    assert got[:8] == [e for e in got[:8] if e[0] != WAKE]  # no wake-up where the loop found data at once
    assert (WAKE, 0) in got[8:got.index((RX, client))]  # the loop slept until the thread's send
    assert rec.peer_port == {client: server, server: client} and rec.dropped == 0
    timed = [e for e in rec.events if e[1] not in (GC, GC_DONE)]  # a pass may fall inside a send
    assert all(a[0] <= b[0] for a, b in zip(timed, timed[1:], strict=False))
    # Every pass of the collector is recorded, start and end, the asked-for one after the write.
    passes = [(k, gen) for _, k, gen in rec.events if k in (GC, GC_DONE)]
    assert passes[::2] == [(GC, g) for _, g in passes[::2]] and passes[1::2] == [(GC_DONE, g) for _, g in passes[::2]]
    after_write = [(k, g) for _, k, g in rec.events[[k for _, k, _ in rec.events].index(PWRITE):]]
    assert after_write[1:3] == [(GC, 1), (GC_DONE, 1)]
    seq = [(k, g) for _, k, g in rec.events]
    m1, m2 = [i for i, e in enumerate(seq) if e == (SEND, -1)][-2:]
    assert (GC, 1) not in seq[m1:m2]  # the worker thread's pass

    env.pop("SYNCD_TIMELINE")  # the hook on the path but not asked for: nothing wrapped, nothing written
    p = subprocess.run([sys.executable, "-c", script, disk], env=env, check=True, capture_output=True, text=True,
                       timeout=60)
    assert p.stdout.split()[2:] == ["recv", "get_events"]
    assert len(list(tmp_path.glob("*.events"))) == 1


def cycle_events(template: list, t: int, late_from: int | None = None, late_us: int = 0) -> dict[str, list]:
    """One cycle of ``template`` from ``t`` ns; its steps from index ``late_from`` on ``late_us``
    later."""
    ev: dict[str, list] = {"A": [], "B": []}
    for i, (us, node, kind, port) in enumerate(template):
        ev[node].append((t + (us + (late_us if late_from is not None and i >= late_from else 0)) * 1000, kind, port))
    return ev


def test_slow_cycles_are_put_down_to_a_collectors_pass_or_their_longest_quiet_gap() -> None:
    """Of 40 cycles at A, three take over 3 × the median: one where B's Python stalls before its
    write, one overlapped by a pass of A's collector, one where the host is late with its next
    request."""
    ev: dict[str, list] = {"A": [], "B": []}
    t = 10**9
    gc_at = None
    for i in range(40):
        late_from, late = {5: (5, 600), 12: (9, 500)}.get(i, (None, 0))  # 5: B's pwrite late; 12: A's rx late
        extra = {5: 600, 12: 500, 20: 700}.get(i, 0)  # 20: the next request comes 700 µs late
        for node, evs in cycle_events(AT_A, t, late_from, late).items():
            ev[node] += evs
        if i == 12:  # A's collector runs from 85 to 585 µs into cycle 12
            gc_at = t + 85_000
        t += (CYCLE_A + extra) * 1000
    assert gc_at is not None
    t5 = 10**9 + 5 * CYCLE_A * 1000  # cycle 5's start
    ev["A"] += [(gc_at, GC, 1), (gc_at + 500_000, GC_DONE, 1), (t + 10**6, GC, 0), (t + 10**6 + 1000, GC_DONE, 0)]
    # in cycle 5, a short pass of B's (10-50 µs in), ending 10 µs into the long gap (40-660 µs)
    ev["B"] += [(t5 + 10_000, GC, 0), (t5 + 50_000, GC_DONE, 0)]
    # a short one of A's at the start of cycle 12 (before the long one), and one of B's across
    # the start of cycle 30 (cycles 29 and 30 both overlap it)
    t12, t30 = gc_at - 85_000, 10**9 + (30 * CYCLE_A + 600 + 500 + 700) * 1000
    ev["A"] += [(t12 + 1000, GC, 0), (t12 + 3000, GC_DONE, 0)]
    ev["B"] += [(t30 - 20_000, GC, 0), (t30 + 5000, GC_DONE, 0)]
    ev["A"].sort()
    ev["B"].sort()
    recs = {"A": Recording(ev["A"], PORTS_A), "B": Recording(ev["B"], PORTS_B)}
    events, _ = timeline.labelled(recs, HOST_PORT, 0, t)
    assert all(k not in (GC, GC_DONE) for _, _, k, _ in events)  # passes are kept apart
    gcs = timeline.gc_passes(recs, 0, t)
    # the pass after the window is left out
    assert gcs == [(t5 + 10_000, t5 + 50_000, "B", 0), (t12 + 1000, t12 + 3000, "A", 0),
                   (gc_at, gc_at + 500_000, "A", 1), (t30 - 20_000, t30 + 5000, "B", 0)]
    sl = timeline.slow_cycles(events, "A", gcs)
    assert sl is not None
    assert (sl.cycles, sl.slow, sl.threshold_us) == (39, 3, approx(3 * CYCLE_A))
    assert {c: (k, t_) for c, k, _, t_ in sl.causes} == {
        "node B: Python": (1, approx(600 + 20)),  # B rx (link) at 40 µs, B pwrite at 60 + 600: not the pass
        "GC pass in A (generation 1)": (1, approx(500)),  # 495 µs of the 505 µs gap (75-580); not the short one
        "the host": (1, approx(35 + 700)),  # A's reply sent at 105 µs, the next request 735 µs later
    }
    assert sl.with_gc == approx(4 / 39)  # cycles 5, 12, 29 and 30
    # the p99 lies between the two longest cycles (740 and 840 µs), interpolated
    assert sl.p99_us == approx(740 + 0.62 * 100)
    none = timeline.slow_cycles(events, "A", gcs, factor=10)
    assert none is not None and (none.slow, none.causes) == (0, [])
    an = timeline.analyse(events, "A")
    md = timeline.markdown({"A": an}, slow={"A": sl})
    assert "Slow cycles: 3 of 39 (7.69 %) took over 3 × the median (420 µs)" in md
    assert "A collector pass overlaps 10.3 % of all cycles." in md
    assert "| GC pass in A (generation 1) | 1 | 640 | 500 |" in md


def test_collector_passes_are_paired_and_kept_when_they_overlap_the_window() -> None:
    w0, w1 = 10**9, 2 * 10**9
    a = [(w0 - 500, GC, 0), (w0 - 100, GC_DONE, 0),  # over before the window
         (w0 - 50, GC, 2), (w0 + 50, GC_DONE, 2),  # straddles its start
         (w0 + 100, GC_DONE, 1),  # an end with no start
         (w0 + 200, GC, 0), (w0 + 300, GC, 1), (w0 + 400, GC_DONE, 1),  # a start with no end, then a pass
         (w1 - 10, GC, 0), (w1 + 10, GC_DONE, 0),  # straddles its end
         (w1 + 20, GC, 0), (w1 + 30, GC_DONE, 0)]  # after it
    b = [(w0 + 350, GC, 1), (w0 + 360, GC_DONE, 1)]
    recs = {"A": Recording(a, PORTS_A), "B": Recording(b, PORTS_B)}
    assert timeline.gc_passes(recs, w0, w1) == [(w0 - 50, w0 + 50, "A", 2), (w0 + 300, w0 + 400, "A", 1),
                                                (w0 + 350, w0 + 360, "B", 1), (w1 - 10, w1 + 10, "A", 0)]


def test_the_quiet_gap_before_each_kind_of_event_is_named_for_what_it_waited_on() -> None:
    a_send, a_sent = (0, "A", SEND, "link"), (1, "A", SENT, "link")
    b_rx, b_pw = (2, "B", RX, "link"), (3, "B", PWRITE, "")
    assert timeline.gap_class(a_send, a_sent, "A") == "sendmsg in A"
    assert timeline.gap_class(a_sent, b_rx, "A") == "hand-over to B"
    assert timeline.gap_class(b_rx, b_pw, "A") == "node B: Python"
    assert timeline.gap_class(b_rx, (4, "A", PWRITE, ""), "A") == "node A: Python"  # A worked meanwhile
    assert timeline.gap_class((5, "A", SENT, "host"), (6, "A", RX, "host"), "A") == "the host"
    assert timeline.gap_class((5, "A", SENT, "host"), (6, "A", RX, "host"), "B") == "node A: Python"
