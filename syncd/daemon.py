"""Run one service (node, witness, host shim) until SIGTERM/SIGINT, with clean start-up errors."""

from __future__ import annotations

import logging
import signal

import trio

log = logging.getLogger("syncd")


def run_until_signal(make, what: str, errors: tuple = (), before_stop=None) -> int:
    """``service = make()``, ``await nursery.start(service.run)``, then wait for SIGTERM/SIGINT
    (``before_stop(service)`` is awaited first, e.g. a node's handover). Exit code 2, with the
    reason and no traceback, when start-up fails with one of ``errors`` or with OSErrors only (a
    port in use...)."""

    async def main() -> None:
        service = make()
        async with trio.open_nursery() as n:
            await n.start(service.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    log.info("%s stopping", what)
                    if before_stop is not None:
                        await before_stop(service)
                    n.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except errors as e:
        log.error("%s", e)
        return 2
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
            for e in leaves:
                log.error("%s cannot run: %s", what, e)
            return 2
        raise
    return 0
