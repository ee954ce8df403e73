"""What every part of the lab uses: its error, and ports to listen on."""

from __future__ import annotations

import socket


class LabError(Exception):
    pass


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, below the kernel's ephemeral range: a port the kernel can also
    pick as the source of an outgoing connection could be taken before the node binds it."""
    import random

    low, high = 20000, _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(low, high) if high > low else 0
        if port in _handed_out:
            continue
        s = socket.socket()
        try:
            s.bind((host, port))
            port = s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
        _handed_out.add(port)
        return port
    raise LabError(f"no free port found between {low} and {high}")
