"""A TCP relay standing in for the inter-site network in the lab: it can cut a path silently
(packets vanish, nothing is reset, as when a fibre is cut), heal it, and add one-way latency
(this kernel has no netem), and record what new connections carry (each direction to a file
of its own: the wire bytes an eavesdropper would capture, for replay tests). Controlled over a
unix socket with JSON lines."""

from __future__ import annotations

import collections
import json
import logging
import os

import trio

log = logging.getLogger("syncd.linkproxy")


class Relay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.listen = listen
        self.target = target
        self.cut = False
        self.delay = 0.0
        self.conns: set[trio.CancelScope] = set()
        self.bytes = 0
        self.record: str | None = None  # directory: new connections are recorded there
        self.recorded = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, down: trio.SocketStream) -> None:
        with trio.CancelScope() as cs:
            self.conns.add(cs)
            try:
                if self.cut:  # a cut path accepts nothing onward: the dialer just times out
                    await trio.sleep_forever()  # until do_heal() drops the connection
                up = await trio.open_tcp_stream(*self.target)
                taps = [None, None]
                if self.record is not None:
                    self.recorded += 1
                    base = os.path.join(self.record, f"{self.listen[1]}-{self.recorded}")
                    taps = [open(base + "-dialer.bin", "wb", buffering=0),  # noqa: ASYNC230 (lab tool)
                            open(base + "-listener.bin", "wb", buffering=0)]  # noqa: ASYNC230
                try:
                    async with down, up, trio.open_nursery() as n:
                        n.start_soon(self._pump, down, up, cs, taps[0])
                        n.start_soon(self._pump, up, down, cs, taps[1])
                finally:
                    for t in taps:
                        if t is not None:
                            t.close()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.conns.discard(cs)

    async def _pump(self, src, dst, cs: trio.CancelScope, tap=None) -> None:
        q: collections.deque = collections.deque()
        more = trio.Event()

        async def sender():
            nonlocal more
            while True:
                while not q:
                    await more.wait()
                    more = trio.Event()
                t, data = q.popleft()
                if self.delay:
                    await trio.sleep_until(t + self.delay)
                if self.cut:
                    await trio.sleep_forever()  # until do_heal() drops the connection
                await dst.send_all(data)
                self.bytes += len(data)

        try:
            async with trio.open_nursery() as n:
                n.start_soon(sender)
                while True:
                    data = await src.receive_some(1 << 18)
                    if not data:
                        break
                    if self.cut:
                        continue  # silently dropped
                    if tap is not None:
                        tap.write(data)
                    q.append((trio.current_time(), data))
                    more.set()
                n.cancel_scope.cancel()
        finally:
            cs.cancel()

    def do_cut(self) -> None:
        self.cut = True

    def do_heal(self) -> None:
        self.cut = False
        for cs in list(self.conns):  # the old connections are dead to both ends: drop them
            cs.cancel()


async def run_proxy(relays: list[Relay], control: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as n:
        for r in relays:
            await n.start(r.serve)
        try:
            os.unlink(control)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(control)
        sock.listen(8)

        async def handle(stream):
            async with stream:
                buf = b""
                while b"\n" not in buf:
                    d = await stream.receive_some(4096)
                    if not d:
                        return
                    buf += d
                req = json.loads(buf)
                sel = [relays[i] for i in req.get("paths", range(len(relays)))]
                cmd = req.get("cmd")
                if cmd == "cut":
                    for r in sel:
                        r.do_cut()
                elif cmd == "heal":
                    for r in sel:
                        r.do_heal()
                elif cmd == "record":
                    for r in sel:
                        r.record = req.get("dir")
                elif cmd == "delay":
                    for r in sel:
                        r.delay = float(req["ms"]) / 2000.0  # the round trip gets ms
                elif cmd != "status":
                    await stream.send_all(json.dumps({"ok": False, "error": f"unknown command {cmd}"}).encode() + b"\n")
                    return
                st = [{"listen": list(r.listen), "target": list(r.target), "cut": r.cut,
                       "rtt_added_ms": r.delay * 2000, "bytes": r.bytes, "conns": len(r.conns)} for r in relays]
                await stream.send_all(json.dumps({"ok": True, "paths": st}).encode() + b"\n")

        n.start_soon(trio.serve_listeners, handle, [trio.SocketListener(sock)])
        task_status.started()


def proxy_command(control: str, cmd: str, **kw) -> dict:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(control)
    s.sendall(json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    ans = json.loads(buf)
    if not ans.get("ok"):
        raise RuntimeError(ans.get("error"))
    return ans
