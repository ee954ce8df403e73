"""How the daemons' log records are written: ``--log-format auto|text|journal|json``.

* ``text``: a timestamp, the level, the logger and the message (a terminal, a log file).
* ``journal``: no timestamp (journald stamps every line itself) and the sd-daemon priority
  prefix ``<N>`` on every line, so journald files each line under its priority (``journalctl
  -p err`` finds errors); a traceback keeps the prefix on each of its lines.
* ``json``: one object per line for log collectors: ``time`` (RFC 3339, UTC), ``level``,
  ``logger``, ``message``, the record's extra fields when it has any, ``exception`` as text.
* ``auto``: ``journal`` when stderr is connected to the journal (``$JOURNAL_STREAM`` names
  stderr's device and inode, as systemd documents), else ``text``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Final, TextIO

FORMATS: Final = ("auto", "text", "journal", "json")

# sd-daemon(3) priorities (syslog levels).
_PRIORITY: Final = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

# The attributes every LogRecord has: anything else was passed as ``extra=``.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level takes the next standard one up)."""
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        if levelno <= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.CRITICAL]


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``, every line of it (a traceback included) with its priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, object] = {
            "time": t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k not in out and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def stderr_is_journal(stream: TextIO | None = None, env: dict[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is the journal: systemd sets ``JOURNAL_STREAM=DEV:INODE``
    for the stream it connected, and a process whose stderr was redirected elsewhere since
    has another device or inode there."""
    js = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = js.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def make_formatter(fmt: str, stream: TextIO | None = None) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = "journal" if stderr_is_journal(stream) else "text"
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter()


def setup_logging(level: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """The root logger writes to ``stream`` (stderr) in format ``fmt`` at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt, stream or sys.stderr))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
