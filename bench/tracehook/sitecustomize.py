"""Timeline hook for ``bench/cpu_per_io.py --timeline`` (a benchmark tool, not part of syncd).

Python imports ``sitecustomize`` at start-up from the first directory on its path that has one.
The benchmark puts this directory on the ``PYTHONPATH`` of the lab's processes and names an
output directory in ``SYNCD_TIMELINE``; without that variable this module does nothing.

With it, the syncd process records a timestamp (``time.monotonic_ns``: one clock for every
process of the machine) at each socket receive and send of the hot paths (``syncd.netio``), each
local write of a volume (``Volume.write_sync``), each time the event loop was woken from a sleep
(an ``epoll_wait`` with a timeout that returned events) and at the start and end of each pass of
the garbage collector in the main thread, the event loop's (``gc.callbacks``; the generation
where the others have a port), and writes them to ``$SYNCD_TIMELINE/<pid>.events`` when it
exits. The functions are wrapped when their modules are first imported (an import hook), so the
daemon's code is the code measured, plus about a microsecond per recorded event. Events are
written in the order they are recorded, not always in time order (a pass during
``send_available`` comes before the send stamped when the call began); the analysis sorts them.

A receive through ``netio.recv`` and a send through ``netio.sendmsg_all`` are marked when the
call returns, which may include waiting for the socket and, every 16 calls that did not block, a
scheduler checkpoint; the hot paths' ``recv_into_nowait`` and ``send_available`` are marked at
the system call (a send the kernel took nothing of is not marked). Writes that bypass
``Volume.write_sync`` (FUA, O_DIRECT: a worker thread) are not marked.

Events are kept in preallocated arrays (13 bytes each, at most ``SYNCD_TIMELINE_MAX``, default
4,000,000: about 52 MB per process while recording); past that they are counted, not recorded.
This module hides any other ``sitecustomize`` later on the path (the lab's processes have none).
"""

from __future__ import annotations

import os

# The event codes written (bench/timeline.py reads them from here).
KINDS = ("rx", "send", "sent", "pwrite", "wake", "gc", "gc-done")
RX, SEND, SENT, PWRITE, WAKE, GC, GC_DONE = range(len(KINDS))


def _install(out_dir: str) -> None:
    import array
    import atexit
    import gc
    import importlib.abc
    import importlib.machinery
    import struct
    import sys
    import threading
    import time
    import weakref

    limit = int(os.environ.get("SYNCD_TIMELINE_MAX", "4000000"))
    ts = array.array("q", bytes(8 * limit))
    kinds = array.array("b", bytes(limit))
    ports = array.array("i", bytes(4 * limit))
    state = {"n": 0, "dropped": 0}
    now = time.monotonic_ns
    local_port: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    peer_port: dict[int, int] = {}  # local port -> the other end's (written beside the events)

    def port_of(sock) -> int:
        try:
            return local_port[sock]
        except KeyError:
            p = -1
            try:
                here, there = sock.getsockname(), sock.getpeername()
                if isinstance(here, tuple) and isinstance(there, tuple):  # not a Unix socket
                    p = here[1]
                    peer_port[p] = there[1]
            except OSError:
                pass
            local_port[sock] = p
            return p

    def mark(kind: int, port: int, t: int = 0) -> None:
        i = state["n"]
        if i >= limit:
            state["dropped"] += 1
            return
        ts[i] = t or now()
        kinds[i] = kind
        ports[i] = port
        state["n"] = i + 1

    def dump() -> None:
        n = state["n"]
        path = os.path.join(out_dir, f"{os.getpid()}.events")
        with open(path, "wb") as f:
            f.write(struct.pack("<qq", n, state["dropped"]))
            ts[:n].tofile(f)
            kinds[:n].tofile(f)
            ports[:n].tofile(f)
        with open(os.path.join(out_dir, f"{os.getpid()}.ports"), "w") as f:
            f.write("".join(f"{k} {v}\n" for k, v in sorted(peer_port.items())))

    atexit.register(dump)

    loop_thread = threading.get_ident()

    def on_gc(phase: str, info: dict) -> None:
        # Only the event loop's thread records: a pass in a worker thread (to_thread: syncs,
        # O_DIRECT writes, digests) would write the arrays from two threads at once.
        if threading.get_ident() == loop_thread:
            mark(GC if phase == "start" else GC_DONE, info["generation"])

    gc.callbacks.append(on_gc)

    def patch_netio(m) -> None:
        send_available, recv, recv_into_nowait, sendmsg_all = (
            m.send_available, m.recv, m.recv_into_nowait, m.sendmsg_all)

        def traced_send_available(sock, bufs):
            t = now()
            r = send_available(sock, bufs)
            if r[0]:  # something went (a send the kernel refused is no send)
                p = port_of(sock)
                mark(SEND, p, t)
                mark(SENT, p)
            return r

        async def traced_recv(sock, n, pacer=None, probe=None):
            data = await recv(sock, n, pacer, probe)
            mark(RX, port_of(sock))
            return data

        def traced_recv_into_nowait(sock, view):
            n = recv_into_nowait(sock, view)
            if n is not None:
                mark(RX, port_of(sock))
            return n

        async def traced_sendmsg_all(sock, bufs, pacer=None):
            p = port_of(sock)
            mark(SEND, p)
            r = await sendmsg_all(sock, bufs, pacer)
            mark(SENT, p)
            return r

        m.send_available, m.recv, m.recv_into_nowait, m.sendmsg_all = (
            traced_send_available, traced_recv, traced_recv_into_nowait, traced_sendmsg_all)

    def patch_volume(m) -> None:
        write_sync = m.Volume.write_sync

        def traced_write_sync(self, offset, data):
            write_sync(self, offset, data)
            mark(PWRITE, 0)

        m.Volume.write_sync = traced_write_sync

    def patch_epoll(m) -> None:
        get_events = m.EpollIOManager.get_events

        def traced_get_events(self, timeout):
            r = get_events(self, timeout)
            if r and timeout > 0:
                mark(WAKE, 0)
            return r

        m.EpollIOManager.get_events = traced_get_events

    patches = {"syncd.netio": patch_netio, "syncd.node.volume": patch_volume,
               "trio._core._io_epoll": patch_epoll}

    class Loader(importlib.abc.Loader):
        def __init__(self, inner, patch) -> None:
            self.inner, self.patch = inner, patch

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module) -> None:
            self.inner.exec_module(module)
            self.patch(module)

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            patch = patches.get(name)
            if patch is None:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = Loader(spec.loader, patch)
            return spec

    sys.meta_path.insert(0, Finder())


if os.environ.get("SYNCD_TIMELINE"):
    _install(os.environ["SYNCD_TIMELINE"])
