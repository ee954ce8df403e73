"""One authenticated witness connection, either end: witness frames through a security channel
(``syncd.secure``), so every byte the frame decoder sees has passed the channel's checks."""

from __future__ import annotations

import socket
from typing import cast

import trio

from .. import netio, secure
from . import proto as w


class Session:
    """Frames over ``sock`` after ``netio.establish`` gave ``channel`` (and ``first``, the
    plaintext that came with the end of the handshake). ``peer`` is the name the peer proved."""

    def __init__(self, sock: socket.socket, channel: secure.Channel, first: secure.Buffer, peer: str) -> None:
        self.sock = sock
        self.channel = channel
        self.peer = peer
        self.dec = w.WDecoder()
        if len(first):
            self.dec.receive_data(bytes(first))

    async def send(self, frame: bytes) -> None:
        await netio.sendmsg_all(self.sock, self.channel.wrap([frame]))

    async def next_frame(self) -> w.WFrame:
        """The next frame; EOFError when the peer closed, secure.AuthError when what arrived
        does not verify, WitnessProtocolError when it verifies but is not a valid frame."""
        while (f := self.dec.next_frame()) is None:
            data = await netio.recv(self.sock, 65536)
            if not data:
                raise EOFError("the peer closed the connection")
            self._take(data)
            out = self.channel.outgoing()  # TLS post-handshake messages (e.g. a key update)
            if out:
                await netio.sendall(self.sock, out)
        return f

    def _take(self, data: bytes) -> None:
        plain = self.channel.unwrap(data)
        if len(plain):
            self.dec.receive_data(bytes(plain))

    def poll_closed(self) -> bool:
        """Without waiting: True when the peer closed the connection or sent something this end
        did not ask for (it reads what is there; a GOODBYE is raised as WitnessProtocolError)."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        if not data:
            return True
        self._take(data)
        f = self.dec.next_frame()
        if f is not None and f.type == w.WType.GOODBYE:
            raise w.WitnessProtocolError(f"the witness closed the connection: {f.reason}")
        return f is not None

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


async def establish(sock: socket.socket, hs: secure.Handshake, limit: float) -> Session:
    """Run the security handshake ``hs`` over ``sock`` within ``limit`` seconds; the session
    once it is done. secure.AuthError otherwise (REFUSAL already sent, a timeout included)."""
    channel, first = await netio.establish(sock, hs, limit)
    return Session(sock, cast(secure.Channel, channel), cast(secure.Buffer, first), hs.peer_name)
