"""bench/scale.py's pure parts: the fio job file (one job per pair, summed), the argument
checks, the CPU accounting, the Markdown and the chart, from literal results (no fio, no
nodes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402


def result(iops: float, cores: float, us: float | None) -> dict:
    return {"iops": iops, "mbps": iops * 4096 / 1e6, "ios": int(iops * 8), "lat_p50_us": 900.0,
            "lat_p99_us": 3000.0, "node_cores": cores, "node_cpu_us_per_io": us}


def doc() -> dict:
    return {"date": "2026-12-03T10:00:00+0000", "runtime": 8, "size_mib": 256, "allowed": "0-1",
            "fio_cpus": None, "command": "bench/scale.py", "machine": {},
            "replicas_identical": {"1": True, "2": False},
            "results": {"randwrite-4k-qd16": {
                "1": {"1": result(6000, 0.97, 161.0), "2": result(6600, 0.95, 150.0)},
                "2": {"1": result(8000, 1.4, 170.0), "2": {"error": "fio failed (status 1): boom"}}}}}


def test_the_job_file_has_one_job_per_pair_with_its_own_uri_reported_as_one_group() -> None:
    text = scale.fio_file("randwrite-4k-qd16", ["nbd://a:1/vv1", "nbd://b:2/vv1"], 1 << 20, 8)
    assert "group_reporting=1" in text and "iodepth=16" in text and "rw=randwrite" in text
    assert text.count("uri=") == 2 and "[randwrite-4k-qd16-pair1]\nuri=nbd://b:2/vv1" in text


def test_bad_lists_are_refused_by_name() -> None:
    assert scale.parse_list("1,2, 4", "workers") == [1, 2, 4]
    with pytest.raises(SystemExit, match="--workers '1,x'"):
        scale.parse_list("1,x", "workers")
    with pytest.raises(SystemExit, match="--cpus needs positive"):
        scale.parse_list("0", "cpus")


def test_cpu_seconds_counts_this_process_and_ignores_a_gone_one() -> None:
    t = sum(os.times()[:2])
    got = scale.cpu_seconds([os.getpid(), 2**22 + 12345])
    assert 0 < got <= t + 0.05


def test_markdown_gives_ratios_to_one_pair_failures_and_the_replica_check() -> None:
    md = scale.render_markdown(doc())
    assert "| 2 | 1 | 6600 | 1.10 | 900 | 3000 | 0.95 | 150.0 |" in md
    assert "| 2 | 2 | failed: fio failed (status 1): boom |" in md
    assert "1 worker(s) yes, 2 worker(s) NO" in md


def test_chart_is_drawn(tmp_path: Path) -> None:
    png = tmp_path / "s.png"
    assert scale.render_chart(doc(), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
