"""Run one service (node, witness, host shim) until SIGTERM/SIGINT, with clean start-up errors,
telling systemd (``Type=notify``, ``sdnotify.py``) when it is ready, alive and stopping."""

from __future__ import annotations

import logging
import signal

import trio

from . import sdnotify

log = logging.getLogger("syncd")


def run_until_signal(make, what: str, errors: tuple = (), before_stop=None, summary=None) -> int:
    """``service = make()``, ``await nursery.start(service.run)``, then wait for SIGTERM/SIGINT
    (``before_stop(service)`` is awaited first, e.g. a node's handover). Exit code 2, with the
    reason and no traceback, when start-up fails with one of ``errors`` or with OSErrors only (a
    port in use, a data directory that cannot be written...).

    Under systemd: READY=1 (with ``summary(service)`` as STATUS) once ``service.run`` has
    started, i.e. its ports listen and its volumes and metadata are loaded; then WATCHDOG=1
    from this event loop while the unit asks for it; STOPPING=1 at the signal. Nothing is
    sent as READY when start-up fails (the STATUS says why)."""
    notifier = sdnotify.manager()
    ready = False

    async def main() -> None:
        nonlocal ready
        notifier.status(f"{what} starting")
        service = make()
        async with trio.open_nursery() as n:
            await n.start(service.run)
            notifier.ready(summary(service) if summary is not None else f"{what} running")
            ready = True
            n.start_soon(notifier.feed_watchdog)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    log.info("%s stopping", what)
                    notifier.stopping(f"{what} stopping")
                    if before_stop is not None:
                        await before_stop(service)
                    n.cancel_scope.cancel()
                    break

    def failed(reasons: list[str]) -> int:
        for r in reasons:
            log.error("%s cannot run: %s", what, r)
        notifier.status(f"{what} {'failed' if ready else 'failed to start'}: {'; '.join(reasons)}")
        return 2

    try:
        trio.run(main)
    except (OSError, *errors) as e:
        return failed([_reason(e)])
    except BaseExceptionGroup as eg:
        leaves = []

        def walk(e):
            if isinstance(e, BaseExceptionGroup):
                for x in e.exceptions:
                    walk(x)
            else:
                leaves.append(e)

        walk(eg)
        if all(isinstance(e, (OSError, *errors)) for e in leaves):
            return failed([_reason(e) for e in leaves])
        raise
    return 0


def _reason(e: BaseException) -> str:
    """An OSError as its file and reason (``[Errno 13] ...`` is for programmers)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)
