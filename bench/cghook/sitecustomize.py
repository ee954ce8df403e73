"""Instruction-count hook for ``bench/cpu_per_io.py --callgrind`` (a benchmark tool, not part of
syncd).

Python imports ``sitecustomize`` at start-up from the first directory on its path that has one.
The benchmark puts this directory on the ``PYTHONPATH`` of the lab's processes and names an
output directory in ``SYNCD_CALLGRIND``; without that variable this module does nothing, and it
does nothing in any process but a node (``python -m syncd node``).

A node started with it replaces itself at once (``exec``, so its pid stays the one the lab
recorded) by the same command under valgrind's callgrind, with instrumentation off
(``--instr-atstart=no``): the benchmark turns it on only while fio runs (``callgrind_control``),
so the count is the user-space instructions the node executed for the requests, start-up and
idle time left out. Instructions, unlike seconds, do not depend on the machine's load or on
how the host schedules the VM's CPUs, so two versions of the hot path compare on any machine.

Under callgrind the node runs some 80 times slower, so it never polls for input before it
sleeps (``busy_poll_us`` defaults to 0 in it): a poll's length is wall time, and would count
instructions that depend on the machine's speed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

_MARK = "SYNCD_CALLGRIND_ACTIVE"


def _main(argv: list[str], env: MutableMapping[str, str]) -> None:
    out = env.get("SYNCD_CALLGRIND")
    if not out or argv[1:4] != ["-m", "syncd", "node"]:
        return
    if env.get(_MARK):  # under callgrind already
        import syncd.config

        syncd.config.BUSY_POLL_US = 0
        return
    env[_MARK] = "1"
    vg = env.get("SYNCD_VALGRIND", "valgrind")
    os.execvp(vg, [vg, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p",
                   "--dump-instr=no", sys.executable, *argv[1:]])


_main(getattr(sys, "orig_argv", []), os.environ)
