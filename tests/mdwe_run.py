"""Run ``python -m syncd ARGS`` with MemoryDenyWriteExecute in force: the kernel's
``PR_SET_MDWE`` (Linux 6.3+; PR_MDWE_REFUSE_EXEC_GAIN) refuses, as the systemd unit's seccomp
filter does, any mapping that is writable and executable or that becomes executable. The tests
start the daemons through this, so the units' ``MemoryDenyWriteExecute=yes`` is known to hold
for CPython with our C extensions (xxhash, ssl, ctypes calls)."""

import ctypes
import runpy
import sys

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"mdwe_run: prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()} (Linux 6.3 or later needed)")
assert libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) & PR_MDWE_REFUSE_EXEC_GAIN
sys.argv = ["syncd", *sys.argv[1:]]
runpy.run_module("syncd", run_name="__main__", alter_sys=True)
