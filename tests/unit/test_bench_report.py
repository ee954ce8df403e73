"""bench/run.py's report: the machine record, the ratios the issue's targets are judged by, the
Markdown and the chart of one run, from literal results (no fio, no servers)."""

from __future__ import annotations

import sys
from pathlib import Path

from pytest import approx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import benchkit  # noqa: E402


def fio_result(iops: float, p50: float = 100.0, p99: float = 300.0, bs: int = 4096) -> dict:
    return {"iops": iops, "mbps": iops * bs / 1e6, "lat_p50_us": p50, "lat_p99_us": p99,
            "clat_p50_us": p50, "clat_p99_us": p99}


def test_cpu_model_is_read_from_x86_and_arm_cpuinfo() -> None:
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t: fpu\n"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B\n"
    assert benchkit.cpu_model(x86) == "Intel(R) Xeon(R) Processor"
    assert benchkit.cpu_model(arm) == "Raspberry Pi 4 Model B"
    assert benchkit.cpu_model("") == "?"


def test_tool_versions_are_the_number_of_their_first_line() -> None:
    assert benchkit.first_version("fio-3.33\n") == "3.33"
    assert benchkit.first_version("nbdkit 1.32.5\n") == "1.32.5"
    assert benchkit.first_version("qemu-storage-daemon version 7.2.22 (Debian 1:7.2+dfsg-7)\nCopyright") == "7.2.22"
    assert benchkit.first_version("") == "?"


def test_a_restricted_affinity_is_named_in_tasksets_notation() -> None:
    assert benchkit.cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert benchkit.affinity_note(2, [0, 1]) == "2"
    assert benchkit.affinity_note(16, [0, 1, 2, 3]) == "4 (affinity 0-3 of 16)"
    assert benchkit.affinity_note(4, None) == "4"


def test_machine_record_names_cpus_kernel_debian_python_and_every_version() -> None:
    m = benchkit.machine_record(ROOT)
    assert m["cpus"] >= 1 and m["cpus_used"] and m["cpu_model"] and m["kernel"] and m["python"]
    assert set(m["versions"]) == {"fio", "nbdkit", "qemu", "trio", "construct", "xxhash", "syncd"}
    assert "git " in m["versions"]["syncd"]
    assert m["kernel_args"] and m["cpuidle"] and " -- " not in m["kernel_args"]
    lines = benchkit.machine_lines(m)
    assert any(m["kernel"] in ln for ln in lines) and any("trio " in ln for ln in lines)
    assert any("cpuidle driver" in ln for ln in lines)
    assert not any("cpuidle" in ln for ln in benchkit.machine_lines({k: v for k, v in m.items() if k != "kernel_args"}))


def test_qd1_bound_is_the_no_delay_p50_plus_the_round_trip_plus_10_percent() -> None:
    assert benchkit.qd1_bound_us(500, 1) == approx(1650)
    assert benchkit.qd1_bound_us(500, 0) == approx(550)


def test_qd64_bound_is_the_smaller_of_no_delay_iops_and_64_per_round_trip() -> None:
    assert benchkit.qd64_bound_iops(20000, 5) == 12800
    assert benchkit.qd64_bound_iops(9000, 5) == 9000
    assert benchkit.qd64_bound_iops(9000, 0) == 9000


def test_multiconn_ratio_is_four_connections_over_one() -> None:
    res = {"syncd-repl-A": {"randwrite-4k-qd16": fio_result(10000), "randwrite-4k-qd16-mc4": fio_result(15000),
                            "randread-4k-qd16": fio_result(40000)}}
    rows = benchkit.multiconn_rows(res, ["syncd-repl-A"])
    assert rows == [("syncd-repl-A", "4K randwrite QD16", 10000, 15000, approx(1.5))]  # the read ran on one conn only


def test_distance_rows_are_judged_against_the_relays_own_no_delay_run() -> None:
    dist = {"direct": {"qd1": fio_result(3000, p50=300)},
            "relay": {"0": {"qd1": fio_result(2000, p50=500)}, "1": {"qd1": fio_result(600, p50=1600)},
                      "10": {"qd1": fio_result(90, p50=11000)}}}
    rows = benchkit.distance_rows(dist)
    assert [r["rtt_ms"] for r in rows] == [0, 1, 10]  # numeric order, not "0" < "1" < "10" by luck
    assert [r["km"] for r in rows] == [0, 100, 1000]
    assert rows[1]["bound_us"] == approx(1650) and rows[1]["ratio"] == approx(1600 / 1650)
    assert rows[2]["ratio"] == approx(11000 / 11550)


def test_markdown_has_the_targets_multiconn_cold_distance_and_memory_tables() -> None:
    jobs = ["randwrite-4k-qd16", "randwrite-4k-qd16-mc4"]
    results = {"syncd-repl-A": {"randwrite-4k-qd16": fio_result(10000), "randwrite-4k-qd16-mc4": fio_result(16000)},
               "nbdkit": {"randwrite-4k-qd16": fio_result(50000), "randwrite-4k-qd16-mc4": fio_result(80000)},
               "qemu-quorum": {"randwrite-4k-qd16": fio_result(12500)}}
    doc = {
        "date": "2026-12-03", "runtime_s": 10, "size": 1 << 30, "jobs": jobs, "latency": "lat",
        "rows": ["syncd-repl-A", "nbdkit", "qemu-quorum"], "results": results,
        "machine": {"cpus": 2, "cpus_used": "2", "cpu_model": "Xeon", "kernel": "6.1", "debian": "12.11",
                    "python": "3.11.7", "versions": {"fio": "3.33", "trio": "0.35.0", "syncd": "0.1.0 (git abc)"}},
        "cold_log": {"size": 10 << 30, "warm_span": 256 << 20,
                     "results": {"syncd-repl-A": {"warm": fio_result(10000), "cold": fio_result(9000)}}},
        "distance": {"relay": {"0": {"qd1": fio_result(2000, p50=500)}, "5": {"qd1": fio_result(180, p50=5400)}},
                     "qd64": {"0": fio_result(20000), "5": fio_result(11000)}, "qd64_rtt_ms": 5.0,
                     "qd16": {"0": fio_result(19000, p50=800), "5": fio_result(2200, p50=7100)}},
        "memory": {"phases": {"A": {"mbps": 400, "peak_MB": {"A": 200, "B": 128}}}},
        "errors": {"qemu-quorum randwrite-4k-qd16-mc4": "fio failed\ndetails"},
    }
    md = benchkit.render_markdown(doc)
    assert "- CPUs: 2, Xeon" in md and "Debian 12.11" in md and "syncd 0.1.0 (git abc)" in md
    assert "| syncd-repl-A | 4K randwrite QD16 | 10000 | 41.0 | 100 | 300 | 0.20 | 0.80 |" in md
    assert "| qemu-quorum | 4K randwrite QD16, 4 conns | failed |" in md
    assert "| syncd-repl-A | 4K randwrite QD16 | 10000 | 16000 | 1.60 |" in md  # multi-conn
    assert "| syncd-repl-A | 10000 | 9000 | 300 | 0.90 |" in md  # cold × warm
    assert "| 5 | 500 | 180 | 5400 |" in md and "over 10 GiB" in md
    assert "| +5 ms | 11000 |" in md and "0.86 |" in md  # 11000 / min(20000, 12800)
    assert "| no delay | 19000 | 800 | 800 |" in md and "| +5 ms | 2200 | 7100 | 2100 |" in md  # QD16: p50 - RTT
    assert "| fio at A | 400 | 200 | 128 | 0.78 |" in md  # 200 MiB × the 256 MiB budget
    assert "**error** qemu-quorum randwrite-4k-qd16-mc4: fio failed" in md and "details" not in md


def test_chart_is_drawn_for_ratios_and_distance(tmp_path: Path) -> None:
    doc = {"jobs": ["randwrite-4k-qd16"], "rows": ["syncd-repl-A", "nbdkit"],
           "results": {"syncd-repl-A": {"randwrite-4k-qd16": fio_result(10000)},
                       "nbdkit": {"randwrite-4k-qd16": fio_result(50000)}},
           "distance": {"relay": {"0": {"qd1": fio_result(2000, p50=500)}, "1": {"qd1": fio_result(600, p50=1600)}}}}
    png = tmp_path / "run.png"
    assert benchkit.render_chart(doc, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not benchkit.render_chart({"jobs": [], "rows": [], "results": {}}, tmp_path / "none.png")


def _bench_run():
    """bench/run.py as a module (its pure helpers; main() is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interleaved_rounds_put_every_target_in_every_place() -> None:
    rows = ["syncd-repl-A", "syncd-repl-B", "nbdkit"]
    order = benchkit.rounds(rows, 3)
    assert all(sorted(o) == sorted(rows) for o in order)  # each round runs every target once
    assert [o[0] for o in order] == rows  # and no target always goes first (or last)
    assert benchkit.rounds(rows, 1) == [rows] and benchkit.rounds([], 3) == []


def test_the_median_round_is_kept_with_every_round_in_order() -> None:
    runs = [fio_result(900), None, fio_result(1200), fio_result(1000)]  # round 2 failed
    best = benchkit.pick_median("randwrite-4k-qd16", runs)
    assert best["iops"] == 1000  # of 900, 1000, 1200
    assert best["runs"] == [900, None, 1200, 1000]
    assert benchkit.pick_median("randwrite-4k-qd16", [fio_result(300), fio_result(100)])["iops"] == 100  # the lower
    assert benchkit.pick_median("randwrite-4k-qd16", [None, None]) is None
    assert "runs" not in benchkit.pick_median("randwrite-4k-qd16", [fio_result(5)])


def test_an_interleaved_ratio_is_taken_round_by_round() -> None:
    # The machine slowed down for rounds 2 and 3 of the syncd row and round 2 of the baseline.
    # Round by round syncd ran at half the baseline in two rounds of three; the two median runs
    # (2500 against 10000) would say a quarter.
    res = dict(fio_result(2500), runs=[5000, 2500, 2500])
    base = dict(fio_result(10000), runs=[10000, 5000, 10000])
    assert benchkit.paired_ratio(res, base, "iops", paired=True) == approx(0.5)  # of 0.5, 0.5, 0.25
    # not interleaved (one target after the other): the rounds are not paired
    assert benchkit.paired_ratio(res, base, "iops", paired=False) == approx(0.25)
    # a round either failed counts for neither; an even count takes the lower, as pick_median
    gap = dict(fio_result(6000), runs=[6000, None, 4000, 9000, 5000, 7000])
    base6 = dict(fio_result(10000), runs=[10000, 10000, 10000, 10000, 10000, None])
    assert benchkit.paired_ratio(gap, base6, "iops", paired=True) == approx(0.5)  # of 0.4, 0.5, 0.6, 0.9
    # rounds that do not line up, or no round both ran: the median runs
    assert benchkit.paired_ratio(gap, dict(base6, runs=[10000, 10000]), "iops", paired=True) == approx(0.6)
    apart = dict(fio_result(100), runs=[100, None, None])
    assert benchkit.paired_ratio(apart, dict(fio_result(400), runs=[None, 400, 50]), "iops", True) == approx(0.25)
    assert benchkit.paired_ratio(None, base, "iops", paired=True) is None
    assert benchkit.paired_ratio(res, None, "iops", paired=True) is None


def test_a_rows_range_leaves_out_the_rounds_that_failed() -> None:
    assert benchkit.spread(dict(fio_result(5), runs=[900, None, 1200, 1000]), "iops") == "900-1200"
    assert benchkit.spread(dict(fio_result(5), runs=[None, 1000.04]), "mbps") == ""  # one run left
    assert benchkit.spread(dict(fio_result(5), runs=[999.94, 1000.04]), "mbps") == "999.9-1000.0"
    assert benchkit.spread(fio_result(5), "iops") == ""


def _interleaved_doc(order: str = "interleaved") -> dict:
    # syncd ran at half nbdkit's speed in every round; its median run (4000) and nbdkit's
    # (20000) would say a fifth.
    jobs = ["randwrite-4k-qd16"]
    return {"jobs": jobs, "rows": ["syncd-repl-A", "syncd-repl-B", "nbdkit"], "repeat": 3, "order": order,
            "runtime_s": 6, "size": 256 << 20, "latency": "lat",
            "results": {"syncd-repl-A": {jobs[0]: dict(fio_result(4000), runs=[20000, 4000, 2000])},
                        "nbdkit": {jobs[0]: dict(fio_result(20000), runs=[40000, 8000, 4000])}}}


def test_interleaved_markdown_gives_each_rows_range_and_round_by_round_ratios() -> None:
    md = benchkit.render_markdown(_interleaved_doc())
    assert "median of 3 rounds, the targets taking turns" in md
    head = "| target | workload | IOPS | MB/s | range (IOPS; MB/s for 1M) | lat p50 µs | lat p99 µs | × nbdkit |"
    assert head in md
    assert "| syncd-repl-A | 4K randwrite QD16 | 4000 | 16.4 | 2000-20000 | 100 | 300 | 0.50 | - |" in md
    assert "| syncd-repl-B | 4K randwrite QD16 | failed |  |  |  |  |  |  |" in md  # as many cells as the head
    grouped = benchkit.render_markdown(_interleaved_doc("grouped"))
    assert "median of 3 runs" in grouped
    assert "| syncd-repl-A | 4K randwrite QD16 | 4000 | 16.4 | 2000-20000 | 100 | 300 | 0.20 | - |" in grouped
    one = dict(_interleaved_doc(), repeat=1)
    assert "| syncd-repl-B | 4K randwrite QD16 | failed |  |  |  |  |  |" in benchkit.render_markdown(one)
    assert "range" not in benchkit.render_markdown(one)


def test_the_chart_and_the_terminal_table_give_the_markdowns_ratios(capsys) -> None:
    doc = _interleaved_doc()
    (ref, data), = benchkit.ratio_panels(doc)  # nobody ran the C peer: one panel
    assert ref == "nbdkit" and data["randwrite-4k-qd16"]["syncd-repl-A"] == approx(0.5)
    assert benchkit.ratio_panels(_interleaved_doc("grouped"))[0][1]["randwrite-4k-qd16"]["syncd-repl-A"] == approx(0.2)
    run = _bench_run()
    ns = type("NS", (), {"repeat": 3, "runtime": 6, "size": "256MiB", "latency": "lat"})()
    run.report(doc, ns)
    out = capsys.readouterr().out
    assert "2000-20000" in out and "0.50" in out and "0.20" not in out
    # the link-security table: the insecure link slowed down in round 2, TLS in rounds 2 and 3
    link = {"syncd-repl-A/insecure": {"randwrite-4k-qd16": dict(fio_result(10000), runs=[10000, 2000, 10000])},
            "syncd-repl-A/tls": {"randwrite-4k-qd16": dict(fio_result(1000), runs=[5000, 1000, 1000])}}
    run.report_link_security(link, ["randwrite-4k-qd16"], ns, paired=True)
    assert "0.50" in capsys.readouterr().out  # 0.5, 0.5, 0.1 round by round
    run.report_link_security(link, ["randwrite-4k-qd16"], ns, paired=False)
    assert "0.10" in capsys.readouterr().out  # the medians: 1000 / 10000


def test_targets_take_turns_and_each_is_stopped_and_checked_however_the_run_ends(tmp_path, monkeypatch) -> None:
    from contextlib import contextmanager
    from types import SimpleNamespace

    run = _bench_run()
    calls: list[tuple[str, str]] = []
    stopped: list[str] = []

    def target(rows: list[str], fail: bool = False):
        @contextmanager
        def cm(d, size, seed, info, **kw):
            if fail:
                raise run.BenchError("would not start")
            try:
                yield {r: f"nbd://{r}" for r in rows}
            finally:
                stopped.append(rows[0])
                info["replicas_identical"] = True
        return cm

    def fio(job, uri, size, runtime):
        calls.append((job, uri[6:]))
        if uri == "nbd://nbdkit" and len(calls) == 3:  # nbdkit's first round of the first job
            raise run.BenchError("fio failed")
        if job == "stop":
            raise KeyboardInterrupt
        return fio_result(len(calls))

    monkeypatch.setattr(run, "run_fio", fio)
    monkeypatch.setattr(run, "settle", lambda: None)
    groups = {"a": (["syncd-repl-A", "syncd-repl-B"], target(["syncd-repl-A", "syncd-repl-B"])),
              "c": (["nbdkit"], target(["nbdkit"])), "d": (["qemu-quorum"], target(["qemu-quorum"], fail=True))}
    rows = ["syncd-repl-A", "syncd-repl-B", "nbdkit", "qemu-quorum"]
    ns = SimpleNamespace(repeat=2, runtime=1, quorum_remote="nbdkit", keep=True)
    results: dict = {}
    errors: dict = {}
    checks: dict = {}
    run.run_interleaved(groups, rows, ["j1", "j2"], 1 << 20, tmp_path / "seed", tmp_path, ns, results, errors, checks)
    assert calls[:6] == [("j1", "syncd-repl-A"), ("j1", "syncd-repl-B"), ("j1", "nbdkit"),
                         ("j1", "syncd-repl-B"), ("j1", "nbdkit"), ("j1", "syncd-repl-A")]  # round 2 starts at B
    assert errors["qemu-quorum"] == "would not start" and "qemu-quorum" not in results
    assert errors["nbdkit j1 (round 1)"] == "fio failed"
    assert results["nbdkit"]["j1"]["runs"] == [None, 5]  # the rounds still line up
    assert results["syncd-repl-A"]["j2"]["runs"] == [7, 12]
    assert stopped == ["nbdkit", "syncd-repl-A"] and checks["a"] == checks["c"] == {"replicas_identical": True}
    # Interrupted: every target that started is still stopped, its check recorded
    calls.clear()
    stopped.clear()
    checks.clear()
    (tmp_path / "again").mkdir()
    try:
        run.run_interleaved(groups, rows, ["stop"], 1 << 20, tmp_path / "seed2", tmp_path / "again", ns, {}, {},
                            checks)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert sorted(stopped) == ["nbdkit", "syncd-repl-A"] and checks["a"] == {"replicas_identical": True}


def _timehist(runs: list[tuple[float, int, str, float, float]]) -> str:
    """``perf sched timehist`` text from (start s, cpu, task, scheduling delay ms, run ms)."""
    head = ["           time    cpu  task name                       wait time  sch delay   run time",
            "                        [tid/pid]                          (msec)     (msec)     (msec)",
            "--------------- ------  ------------------------------  ---------  ---------  ---------"]
    return "\n".join(head + [f"{start + run / 1e3:15.6f} [{cpu:04d}]  {task:<30s}  {0:9.3f}  {delay:9.3f}  {run:9.3f} "
                             for start, cpu, task, delay, run in runs]) + "\n"


def test_fio_placement_names_whose_cpu_fio_took_and_the_cycle_in_each_case() -> None:
    serving, other = 20, 10
    text = _timehist([
        (0.999900, 0, "python[20]", 0.0, 0.100),
        (1.000000, 0, "fio[30]", 0.010, 0.018),          # the first run: no cycle before it
        (1.000040, 1, "python[10]", 0.0, 0.100),
        (1.000150, 1, "fio[30]", 0.006, 0.018),          # after the other node: 150 µs
        (1.000200, 0, "python[21/20]", 0.0, 0.100),       # a thread of the serving node
        (1.000310, 0, "fio[30]", 0.020, 0.018),          # after the serving node: 160 µs
        (1.000300, 1, "Web Content[77]", 0.0, 0.040),
        (1.000350, 1, "<idle>", 0.0, 0.100),
        (1.000460, 1, "fio[30]", 0.004, 0.018),          # on an idle CPU: 150 µs
        (1.000500, 0, "fio[29]", 0.0, 0.005),            # fio's main thread: not the job's
        (1.002300, 0, "kworker/0:1H-kb[47]", 0.0, 0.100),
        (1.002500, 0, "fio[30]", 0.050, 0.018),          # 2 ms after the last: not a cycle
        (1.002450, 1, "Web Content[77]", 0.0, 0.050),    # a name with a space: still a task
        (1.002550, 1, "python[10]", 0.0, 0.080),
        (1.002640, 1, "fio[30]", 0.008, 0.018),          # after the other node: 140 µs
        (1.002800, 0, "syncd io[22/20]", 0.0, 0.050),    # a serving node's thread, a space in its name
        (1.002900, 0, "fio[30]", 0.030, 0.018),          # after it: 260 µs
    ])
    got = benchkit.fio_placement(text, serving, other)
    assert got == {
        "other node": {"share": 0.4, "cycle_us": approx(145.0), "sched_delay_us": approx(7.0)},
        "serving node": {"share": 0.4, "cycle_us": approx(210.0), "sched_delay_us": approx(25.0)},
        "idle": {"share": 0.2, "cycle_us": approx(150.0), "sched_delay_us": approx(4.0)},
    }
    assert list(got)[-1] == "idle"  # most frequent first
    # The sites swapped: the same runs, the nodes' roles the other way round.
    swapped = benchkit.fio_placement(text, other, serving)
    assert swapped["serving node"] == got["other node"] and swapped["other node"] == got["serving node"]
    assert benchkit.fio_placement(_timehist([(1.0, 0, "python[20]", 0.0, 0.1)]), serving, other) == {}
    assert benchkit.fio_placement("garbage\n[0001] fio[3] x y z\n", serving, other) == {}
