"""Hooks: the commands of the node config's [hooks] run on events of the node's event bus.

One consumer of the bus (``HookRunner.on_event``) decides which events call for a hook and
queues them (``hooks.max_queued``; beyond, a hook is skipped and that is logged as an error).
Hooks run as child processes (``hooks.max_running`` at once) with the event's facts in
environment variables, each in its own session so that killing it at ``hooks.timeout`` kills
whatever it started. The exit status and the tail of the output are logged; a hook that fails
is an error in the log and nothing else: hooks never change replication state.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO

import trio

from ..config import HooksConfig
from .events import CHANGE, CREATE, DESTROY, Event, EventBus

log = logging.getLogger("syncd.hooks")

OUTPUT_TAIL = 1024  # bytes of a hook's output (stdout and stderr) that are logged


def hook_for(ev: Event) -> str | None:
    """Which hook (a key of [hooks]) an event calls for, if any."""
    if ev.kind == "group" and ev.action == CHANGE:
        if ev.changed("split_brain") and ev.get("split_brain") is True:
            return "split_brain"
        if ev.changed("failsafe") and ev.get("failsafe") is True:
            return "failsafe"
        if ev.changed("role") and ev.get("role") == "primary" and ev.get("cause") == "failover":
            return "failover"
    if ev.kind == "verify" and ev.action in (CREATE, CHANGE) and ev.get("result") == "differ":
        return "replicas_differ"
    if ev.kind == "resync" and ev.action == DESTROY and ev.get("result") == "done":
        return "resync_done"
    return None


def hook_env(hook: str, node: str, ev: Event, group: dict | None) -> dict[str, str]:
    """The environment of a hook run: SYNCD_EVENT (the hook's name), SYNCD_NODE, SYNCD_SEQ,
    SYNCD_TIME, SYNCD_KIND, SYNCD_ACTION, every fact of the event as SYNCD_<FACT> (and a
    changed fact's previous value as SYNCD_OLD_<FACT>), and the group's SYNCD_ROLE,
    SYNCD_EPOCH, SYNCD_PEER when the event does not carry them."""
    def text(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)

    env = {
        "SYNCD_EVENT": hook, "SYNCD_NODE": node, "SYNCD_SEQ": str(ev.seq),
        "SYNCD_TIME": datetime.datetime.fromtimestamp(ev.time, datetime.timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
        "SYNCD_KIND": ev.kind, "SYNCD_ACTION": ev.action,
    }
    for k, v in ev.facts:
        env["SYNCD_" + k.upper()] = text(v)
    for k, v in ev.old:
        env["SYNCD_OLD_" + k.upper()] = text(v)
    for k in ("role", "epoch", "peer"):
        if group is not None and "SYNCD_" + k.upper() not in env:
            env["SYNCD_" + k.upper()] = text(group.get(k))
    return env


@dataclass(frozen=True, slots=True, eq=False)  # each run is its own borrower of the limiter
class _Job:
    hook: str
    argv: tuple[str, ...]
    env: dict[str, str]
    seq: int


async def _kill_session(proc: trio.Process) -> None:
    """At the timeout: the hook and everything it started (its own session) are killed."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class HookRunner:
    def __init__(self, node: str, cfg: HooksConfig, bus: EventBus) -> None:
        self.node = node
        self.cfg = cfg
        self.bus = bus
        self._send, self._recv = trio.open_memory_channel[_Job](cfg.max_queued)
        self.runs = 0
        self.failures = 0
        self.skipped = 0

    def on_event(self, ev: Event) -> None:
        """The bus's listener: queue the hook the event calls for (never waits)."""
        hook = hook_for(ev)
        if hook is None:
            return
        argv = self.cfg.command(hook)
        if argv is None:
            return
        group = self.bus.facts("group", {"group": ev.get("group")}) if ev.get("group") is not None else None
        job = _Job(hook, argv, hook_env(hook, self.node, ev, group), ev.seq)
        try:
            self._send.send_nowait(job)
        except trio.ClosedResourceError:
            log.warning("hook %s for event %d not run: the node is stopping", hook, ev.seq)
        except trio.WouldBlock:
            self.skipped += 1
            log.error("hook %s for event %d skipped: %d hooks are already waiting to run (hooks.max_queued)",
                      hook, ev.seq, self.cfg.max_queued)

    def close(self) -> None:
        """No more hooks are queued; ``run`` returns once those queued have run."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.cfg.max_running)
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for job in self._recv:
                await limiter.acquire_on_behalf_of(job)
                nursery.start_soon(self._run_one, job, limiter)

    async def _run_one(self, job: _Job, limiter: trio.CapacityLimiter) -> None:
        try:
            await self._execute(job)
        finally:
            limiter.release_on_behalf_of(job)

    async def _execute(self, job: _Job) -> None:
        what = f"hook {job.hook} ({' '.join(job.argv)}) for event {job.seq}"
        env = dict(os.environ)
        env.update(job.env)
        self.runs += 1
        t0 = time.monotonic()
        # Output goes to a file, not a pipe: a hook that leaves children holding it open, or
        # writes a lot, can neither block the node nor outlive its timeout through it.
        with tempfile.TemporaryFile() as out:
            try:
                async with trio.open_nursery() as n:
                    proc: trio.Process = await n.start(functools.partial(
                        trio.run_process, list(job.argv), check=False, env=env, stdin=subprocess.DEVNULL,
                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                        deliver_cancel=_kill_session))
                    with trio.move_on_after(self.cfg.timeout) as cs:
                        await proc.wait()
                    if cs.cancelled_caught:
                        n.cancel_scope.cancel()
            except OSError as e:
                self.failures += 1
                log.error("%s could not be started: %s", what, e)
                return
            took = time.monotonic() - t0
            tail = _tail(out)
        code = proc.returncode
        if cs.cancelled_caught:
            self.failures += 1
            log.error("%s killed after its timeout of %ss (hooks.timeout); exit status %s%s", what,
                      self.cfg.timeout, code, tail)
        elif code != 0:
            self.failures += 1
            log.error("%s failed: exit status %s after %.2fs%s", what, code, took, tail)
        else:
            log.info("%s done: exit status 0 after %.2fs%s", what, took, tail)


def _tail(f: BinaryIO) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - OUTPUT_TAIL))
    text = f.read().decode(errors="replace").strip()
    if not text:
        return ""
    return "; output" + (" (end)" if size > OUTPUT_TAIL else "") + ": " + " | ".join(text.splitlines())
