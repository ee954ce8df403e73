"""A replication path whose TLS channel failed (its receiver met a bad record) and that a batch
then flushes inline: the error stays with the path (it goes down, as when its sender task meets
a send error) instead of being raised into the loop whose batch it is, a host's connection or
another path's receiver. Found by review of the primary's deferred local write (round 10 of
issue 13): the raise also kept that write waiting."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trustme

from syncd import secure
from syncd.repl.link import Path
from syncd.repl.proto import Frame, encode


def _failed_tls_channel() -> secure.TlsChannel:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("peer.test").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="peer.test")
    for _ in range(10):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    chan = secure.TlsChannel(server, s_in, s_out)
    client.write(b"a frame")
    record = bytearray(c_out.read())
    record[-3] ^= 1  # tampered on the wire
    with pytest.raises(secure.AuthError):
        chan.unwrap(bytes(record))
    return chan


async def test_a_path_whose_tls_channel_failed_goes_down_instead_of_raising_from_an_inline_flush():
    chan = _failed_tls_channel()
    with pytest.raises(OSError):
        chan.wrap([b"x"])  # what the flush meets
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        with trio.CancelScope() as cs:
            p = Path(0, ("127.0.0.1", 1), ("127.0.0.1", 2), state="up", sock=a, chan=chan, cancel=cs)
            p.sendq.ctl.append(encode(Frame.release(1, 1, 1, 0)))
            p.flush_inline()  # does not raise
            assert p.last_error and cs.cancel_called  # the path goes down
            await trio.lowlevel.checkpoint()
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(100)  # nothing went out
    finally:
        a.close()
        b.close()
