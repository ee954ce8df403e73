"""Run a command under a systemd unit's syscall filter and MemoryDenyWriteExecute, as systemd
would run the unit's ExecStart: ``/usr/bin/python3 tests/sandbox_run.py UNIT -- COMMAND...``.

Run by Debian's python3 (its ``python3-seccomp`` builds the filter), which then executes the
command: a seccomp filter and PR_SET_MDWE stay in force across execve. The allowed system
calls are the unit's own ``SystemCallFilter=`` lines, applied in order (the first without ``~``
makes an allow-list, ``~`` lines remove, later plain lines add back), each group expanded by
``systemd-analyze syscall-filter``; the rest fail with ``SystemCallErrorNumber=`` (EPERM), as
under systemd. So the daemons are tested under the very filter the shipped units declare."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import subprocess
import sys

import seccomp


@functools.cache
def expand(name: str) -> frozenset[str]:
    if not name.startswith("@"):
        return frozenset({name})
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            calls |= expand(word)
    return frozenset(calls)


def unit_settings(unit: str) -> tuple[set[str], int, bool]:
    allowed: set[str] | None = None
    err = errno.EPERM
    mdwe = False
    for line in open(unit):
        key, _, value = line.strip().partition("=")
        if key == "SystemCallFilter":
            deny = value.startswith("~")
            names = set().union(*(expand(w) for w in value.lstrip("~").split()))
            if allowed is None:
                if deny:
                    sys.exit("sandbox_run: a deny-list filter is not emulated")
                allowed = names
            elif deny:
                allowed -= names
            else:
                allowed |= names
        elif key == "SystemCallErrorNumber":
            err = getattr(errno, value)
        elif key == "MemoryDenyWriteExecute":
            mdwe = value == "yes"
    if allowed is None:
        sys.exit(f"sandbox_run: {unit} has no SystemCallFilter")
    return allowed, err, mdwe


def main() -> None:
    unit, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, "usage: sandbox_run.py UNIT -- COMMAND..."
    allowed, err, mdwe = unit_settings(unit)
    if mdwe:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            sys.exit(f"sandbox_run: prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()} (Linux 6.3 or later)")
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
    unknown = 0
    for name in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            unknown += 1  # not a system call of this architecture (or of this libseccomp)
    f.load()  # sets no_new_privs, as the units' NoNewPrivileges=yes
    os.execvp(cmd[0], cmd)


main()
