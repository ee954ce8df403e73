"""The systemd notification protocol (sd_notify(3)), with the standard library only.

A service started with ``Type=notify`` gets ``$NOTIFY_SOCKET``: a unix datagram socket (a path,
or an abstract name written with a leading ``@``) to which it sends newline-separated
``KEY=VALUE`` assignments: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``,
``STOPPING=1`` when it begins to stop, and ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC``
microseconds when the unit sets ``WatchdogSec=`` (only if ``$WATCHDOG_PID``, when set, is this
process). Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

import trio

log = logging.getLogger("syncd")

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(name: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value: a filesystem path, or an abstract
    name (``@name`` -> ``b"\\0name"``); None for anything else (systemd sends no other kind)."""
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 notifications (half the watchdog timeout), or None when the
    watchdog is not enabled for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    wpid = env.get("WATCHDOG_PID", "")
    try:
        timeout = int(usec)
        if wpid and int(wpid) != pid:
            return None
    except ValueError:
        return None
    if timeout <= 0:
        return None
    return timeout / 2 / 1e6


class Notifier:
    """This process's link to its service manager. Reads (and removes, as sd_notify's
    ``unset_environment`` does, so child processes do not talk for us) the variables."""

    def __init__(self, env: MutableMapping[str, str] | None = None, pid: int | None = None) -> None:
        e: MutableMapping[str, str] = os.environ if env is None else env
        self.pid = os.getpid() if pid is None else pid
        self.address = socket_address(e.get("NOTIFY_SOCKET", ""))
        self.interval = watchdog_interval(e, self.pid) if self.address is not None else None
        for k in _ENV:
            e.pop(k, None)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False (logged once) when it cannot be sent."""
        if self.address is None:
            return False
        msg = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never waits: a manager that does not read must not stop the event loop (a lost
            # WATCHDOG=1 costs nothing while the next one arrives in time).
            self._sock.sendto(msg, socket.MSG_DONTWAIT, self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %r: %s", self.address, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    async def feed_watchdog(self) -> None:
        """WATCHDOG=1 every half timeout, from the event loop it guards: a loop that blocks stops
        feeding it and the service manager restarts the service. Returns at once when disabled."""
        if self.interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_manager: Notifier | None = None


def manager() -> Notifier:
    """This process's Notifier (made at the first call: it takes the variables)."""
    global _manager
    if _manager is None:
        _manager = Notifier()
    return _manager
