"""The metrics endpoint's HTTP/1.1 side: ``GET /metrics`` and nothing else.

Parsing is h11's (sans-IO; the request line and headers are bounded by ``max_header_bytes``),
the I/O Trio's, in the daemon's own event loop: the page is rendered by the task that serves
the request, so the collectors read the daemon's state as its owner, between two of its steps.
Whoever connects is untrusted: at most ``max_connections`` at once (more are closed before a
byte is read), one request per connection, the whole exchange within ``request_timeout``, and
anything but ``GET /metrics`` answered 404/405/400/431 without rendering. Nothing a client
sends changes the daemon.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import h11
import trio

log = logging.getLogger("syncd.metrics")

PATH = "/metrics"
_RECV = 4096


class Limits(Protocol):
    """What the server takes from the [metrics] table (``config.MetricsConfig``)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def request_timeout(self) -> float: ...
    @property
    def max_header_bytes(self) -> int: ...


class MetricsHTTP:
    def __init__(self, cfg: Limits, render: Callable[[], tuple[bytes, str]]) -> None:
        self.cfg = cfg
        self.render = render  # -> (body, content type)
        self.active = 0
        self.port = 0
        # What hostile or broken clients cost, for the page itself.
        self.served = 0  # pages sent
        self.refused = 0  # connections closed at once: max_connections reached
        self.rejected = 0  # requests answered 4xx (malformed, too large, wrong method or path)
        self.timed_out = 0  # connections dropped at request_timeout

    async def serve(self, sock: socket.socket, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the listening ``sock`` until cancelled; started with its port."""
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, [listener])

    async def handle(self, stream: trio.abc.HalfCloseableStream | trio.abc.Stream) -> None:
        """One client connection, whatever it sends: never raises (a handler that raised would
        end the daemon's listener)."""
        if self.active >= self.cfg.max_connections:
            self.refused += 1
            await _close(stream)
            return
        self.active += 1
        try:
            with trio.move_on_after(self.cfg.request_timeout) as scope:
                await self._exchange(stream)
            if scope.cancelled_caught:
                self.timed_out += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:  # noqa: BLE001 - a scrape must never take the daemon down
            log.exception("metrics: request failed")
        finally:
            self.active -= 1
            await _close(stream)

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        limit = self.cfg.max_header_bytes
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        received = 0
        while True:
            try:
                ev = conn.next_event()
                if ev is h11.NEED_DATA and received > limit:
                    # h11 bounds what it buffers; this bounds the request head itself, however
                    # the client cut it into packets.
                    raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            except h11.RemoteProtocolError as e:
                self.rejected += 1
                status = e.error_status_hint
                why = "request line and headers too large" if status == 431 else "malformed request"
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # h11 lets a server still answer
                    await self._send(stream, conn, status, f"{why}\n".encode())
                return
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(min(_RECV, limit + 1 - received) or 1)
                received += len(data)
                conn.receive_data(bytes(data))  # b"": the end of the stream (next_event says what it means)
                continue
            if isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                if received > limit:
                    self.rejected += 1
                    await self._send(stream, conn, 431, b"request line and headers too large\n")
                    return
                break
            return  # PAUSED and the like: nothing more to do on a one-request connection
        target = ev.target.split(b"?", 1)[0]
        if target != PATH.encode():
            self.rejected += 1
            await self._send(stream, conn, 404, b"not found: the only page is /metrics\n")
            return
        if ev.method != b"GET":
            self.rejected += 1
            # A HEAD answer carries no body (its length is the one a GET would get: none here).
            body = b"" if ev.method == b"HEAD" else b"method not allowed: use GET\n"
            await self._send(stream, conn, 405, body, [(b"allow", b"GET")])
            return
        body, ctype = self.render()
        await self._send(stream, conn, 200, body, ctype=ctype.encode())
        self.served += 1

    @staticmethod
    async def _send(stream: trio.abc.Stream, conn: h11.Connection, status: int, body: bytes,
                    extra: list[tuple[bytes, bytes]] | None = None,
                    ctype: bytes = b"text/plain; charset=utf-8") -> None:
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *(extra or [])]
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()))
        out = (out or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
        if status != 200:
            await _linger(stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """After an error answer: say we are done and read (a bounded amount of) what the client
    still sends, so closing does not reset the connection before it has read the answer."""
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    with trio.move_on_after(1):
        got = 0
        while got < 1 << 16 and (d := await stream.receive_some(_RECV)):
            got += len(d)


async def _close(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
