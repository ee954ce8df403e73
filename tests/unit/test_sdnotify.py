"""sd_notify (``syncd/sdnotify.py``): addresses, the watchdog's interval and WATCHDOG_PID, the
variables taken from the environment, datagrams as systemd reads them, a manager that does
not read never blocks the daemon."""

from __future__ import annotations

import socket

import trio
import trio.testing

from syncd.sdnotify import Notifier, socket_address, watchdog_interval


def test_addresses():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd-notify/1") == b"\0sd-notify/1"
    assert socket_address("") is None and socket_address("@") is None and socket_address("relative") is None


def test_watchdog_interval_is_half_the_timeout_for_this_pid_only():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}, 42) is None  # another process's
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None


def bound(tmp_path) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "n.sock"))
    s.setblocking(False)
    return s, str(tmp_path / "n.sock")


def test_messages_and_environment(tmp_path):
    s, path = bound(tmp_path)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7", "OTHER": "x"}
    n = Notifier(env, pid=7)
    assert env == {"OTHER": "x"}  # children do not inherit them
    assert n.enabled and n.interval == 1.0
    assert n.ready("node A: 2 volumes\nsecond line")
    assert s.recv(4096) == b"READY=1\nSTATUS=node A: 2 volumes second line"
    assert n.stopping("node A stopping")
    assert s.recv(4096) == b"STOPPING=1\nSTATUS=node A stopping"
    n.close()
    s.close()


def test_without_notify_socket_nothing_is_sent():
    n = Notifier({"WATCHDOG_USEC": "2000000"}, pid=1)
    assert not n.enabled and n.interval is None and not n.ready("x")


def test_a_manager_that_does_not_read_never_blocks(tmp_path):
    s, path = bound(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path}, pid=1)
    sent = [n.send("WATCHDOG=1") for _ in range(1000)]  # far beyond the socket's queue
    assert sent[0] and not sent[-1]
    s.close()
    assert not n.send("WATCHDOG=1")  # gone: refused, logged once, not raised
    n.close()


def test_watchdog_is_fed_every_half_timeout_from_the_loop(tmp_path):
    s, path = bound(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}, pid=1)
    times = []

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.feed_watchdog)
            for _ in range(4):
                await trio.sleep(5)  # the mock clock: virtual time, nothing waits
                await trio.testing.wait_all_tasks_blocked()
                while True:
                    try:
                        assert s.recv(64) == b"WATCHDOG=1"
                        times.append(trio.current_time())
                    except BlockingIOError:
                        break
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(times) == 5  # at 0, then every 5 s up to 20
    s.close()


def test_disabled_watchdog_returns():
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "2"}, pid=1)
    trio.run(n.feed_watchdog)  # not this process's watchdog: returns at once
