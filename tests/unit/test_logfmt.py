"""Log formats (``syncd --log-format``): text, journal (priorities, no timestamp), json, and auto."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from syncd.logfmt import JournalFormatter, JsonFormatter, TextFormatter, make_formatter, stderr_is_journal


def record(level: int, msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    r = logging.LogRecord("syncd.node", level, __file__, 1, msg, args, exc_info)
    r.__dict__.update(extra)
    return r


@pytest.mark.parametrize("level,prio", [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                                        (logging.INFO, 6), (logging.DEBUG, 7)])
def test_journal_lines_carry_the_priority_and_no_timestamp(level, prio):
    out = JournalFormatter().format(record(level, "group %s: %s", "rcg1", "failover"))
    assert out == f"<{prio}>syncd.node: group rcg1: failover"


def test_journal_traceback_keeps_the_priority_on_every_line():
    out = JournalFormatter().format(record(logging.ERROR, "it failed", exc=True))
    lines = out.split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), out
    assert lines[0] == "<3>syncd.node: it failed"
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-2:] == ["<3>ValueError: boom", "<3>second line"]


def test_text_has_a_timestamp_level_and_logger():
    out = TextFormatter().format(record(logging.WARNING, "lease %.1f s", 2.0))
    date, time_, level, rest = out.split(" ", 3)
    assert len(date) == 10 and date[4] == "-" and ":" in time_
    assert (level, rest) == ("WARNING", "syncd.node: lease 2.0 s")


def test_json_one_object_per_line_with_extras_and_exception():
    r = record(logging.ERROR, "split brain in %s", "rcg1", exc=True, group="rcg1", epoch=7)
    out = JsonFormatter().format(r)
    assert "\n" not in out
    d = json.loads(out)
    assert d["message"] == "split brain in rcg1" and d["level"] == "ERROR" and d["logger"] == "syncd.node"
    assert d["group"] == "rcg1" and d["epoch"] == 7
    assert d["exception"].startswith("Traceback") and d["exception"].rstrip().endswith("second line")
    assert d["time"].endswith("Z") and "T" in d["time"]
    import datetime

    t = datetime.datetime.fromisoformat(d["time"].replace("Z", "+00:00"))
    assert abs(t.timestamp() - r.created) < 0.001
    plain = json.loads(JsonFormatter().format(record(logging.INFO, "ready")))
    assert set(plain) == {"time", "level", "logger", "message"}


def test_json_extra_that_is_not_json_is_written_as_text():
    d = json.loads(JsonFormatter().format(record(logging.INFO, "x", path=object.__new__(type("P", (), {})))))
    assert isinstance(d["path"], str)


def test_auto_is_journal_only_when_stderr_is_the_stream_journal_stream_names():
    with tempfile.TemporaryFile("w") as f, tempfile.TemporaryFile("w") as other:
        st, ot = os.fstat(f.fileno()), os.fstat(other.fileno())
        assert stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stderr_is_journal(f, {"JOURNAL_STREAM": f"{ot.st_dev}:{ot.st_ino}"})  # redirected since
        assert not stderr_is_journal(f, {})
        assert not stderr_is_journal(f, {"JOURNAL_STREAM": "garbage"})
        assert not stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    with pytest.raises(ValueError):
        make_formatter("xml")


def test_syncd_writes_the_chosen_format_on_stderr(tmp_path):
    """The real command: a config error logged by each format (and auto under a JOURNAL_STREAM
    naming its stderr)."""
    cfg = tmp_path / "w.toml"
    cfg.write_text('[witness]\nname = "W"\nlisten = ["127.0.0.1:0"]\nstate_dir = "nodir/sub"\nnodes = ["A", "B"]\n'
                   'insecure = true\n')
    (tmp_path / "nodir").write_text("a file, not a directory")

    def run(*fmt: str, env: dict | None = None, stderr=None) -> str:
        p = subprocess.run([sys.executable, "-m", "syncd", *fmt, "witness", "--config", str(cfg)],
                           stderr=stderr or subprocess.PIPE, text=True, timeout=60,
                           env={**os.environ, **(env or {})})
        assert p.returncode == 2
        return p.stderr if stderr is None else ""

    text = run("--log-format", "text")
    assert " ERROR syncd" in text and "Traceback" not in text
    journal = run("--log-format", "journal").strip().splitlines()
    assert journal and all(line.startswith("<3>syncd") for line in journal), journal
    objs = [json.loads(line) for line in run("--log-format", "json").strip().splitlines()]
    assert objs and all(o["level"] == "ERROR" for o in objs) and "nodir" in objs[0]["message"]
    with open(tmp_path / "err", "w") as f:
        st = os.fstat(f.fileno())
        run(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr=f)
    auto = (tmp_path / "err").read_text().strip().splitlines()
    assert auto and all(line.startswith("<3>") for line in auto), auto
    assert run(env={"JOURNAL_STREAM": "1:2"}).startswith("20")  # not our stderr: text
