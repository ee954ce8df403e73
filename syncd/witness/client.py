"""The node's side of the witness: one authenticated connection, periodic reports per group,
and KEEP / CLAIM requests when the replication link is lost."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import trio

from .. import netio
from . import proto as w

log = logging.getLogger("syncd.witness.client")

# s: the witness answers a request at once; one that takes longer leaves the connection out of
# step (an answer may still come), so the connection is dropped and made again.
REQUEST_TIMEOUT = 1.0


@dataclass(frozen=True)
class WitnessClientConfig:
    address: tuple[str, int]
    key: bytes
    interval: float = 0.5  # s between reports
    owner_lease: float = 3.0  # must equal the witness's owner_lease
    grace: float = 4.5  # must equal the witness's grace


class WitnessUnreachable(Exception):
    pass


class WitnessClient:
    def __init__(self, cfg: WitnessClientConfig, node_name: str, groups_fn, on_report=None):
        self.cfg = cfg
        self.node = node_name
        self.groups_fn = groups_fn  # -> list of (name, members, owner, epoch, flags)
        self.on_report = on_report  # (group, sent, owner, epoch): the witness's record, per report
        self.sock = None
        self.dec = w.WDecoder()
        self.lock = trio.Lock()
        self.rid = 0
        self.registered: set[str] = set()
        self.last_ok: float | None = None  # trio time of the last answered request
        self.last_ok_sent: float | None = None  # when that request was sent
        self.lost_at: float | None = None  # when the witness stopped answering
        self.witness_name = ""
        self.last_error = ""

    @property
    def reachable(self) -> bool:
        return self.sock is not None and self.last_ok is not None and \
            trio.current_time() - self.last_ok < 3 * self.cfg.interval

    def lost_for(self) -> float:
        """Seconds since the witness was last heard (inf if never)."""
        if self.last_ok is None:
            return float("inf")
        return trio.current_time() - self.last_ok

    def info(self) -> dict:
        return {"address": "%s:%d" % self.cfg.address, "reachable": self.reachable,
                "witness": self.witness_name, "last_error": self.last_error,
                "last_heard_s_ago": None if self.last_ok is None else round(self.lost_for(), 2)}

    async def run(self) -> None:
        while True:
            try:
                await self._connect()
                while True:
                    for name, members, owner, epoch, flags in self.groups_fn():
                        if name not in self.registered:
                            await self.request(w.WType.REGISTER, group=name, member1=members[0],
                                               member2=members[1], owner=owner, epoch=epoch)
                            self.registered.add(name)
                        f = await self.request(w.WType.REPORT, group=name, epoch=epoch, flags=flags)
                        if f.type == w.WType.DECISION and self.on_report is not None:
                            self.on_report(name, self.last_ok_sent, f.owner, f.epoch)
                    await trio.sleep(self.cfg.interval)
            except (OSError, w.WitnessProtocolError, WitnessUnreachable, trio.TooSlowError, EOFError) as e:
                self.last_error = str(e) or type(e).__name__
                self._drop()
            await trio.sleep(self.cfg.interval)

    def _drop(self) -> None:
        if self.sock is not None:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
            self.sock = None
        self.registered.clear()

    async def _recv_frame(self, sock=None) -> w.WFrame:
        while (f := self.dec.next_frame()) is None:
            data = await netio.recv(sock or self.sock, 65536)
            if not data:
                raise EOFError("witness closed the connection")
            self.dec.receive_data(data)
        return f

    async def _connect(self) -> None:
        # The socket is published (self.sock) only once the handshake is done, so requests
        # from other tasks never read it concurrently with the handshake.
        self.dec = w.WDecoder()
        with trio.fail_after(2.0):
            sock = await netio.connect(self.cfg.address)
        try:
            with trio.fail_after(2.0):
                ch = await self._recv_frame(sock)
                if ch.type != w.WType.CHALLENGE:
                    raise w.WitnessProtocolError(f"expected CHALLENGE, got {ch.type.name}")
                mine = secrets.token_bytes(w.NONCE_SIZE)
                await netio.sendall(sock, w.encode(
                    w.WType.HELLO, node=self.node, tag=w.hello_tag(self.cfg.key, ch.nonce, self.node), nonce=mine))
                f = await self._recv_frame(sock)
            if f.type != w.WType.WELCOME:
                raise w.WitnessProtocolError(f"witness refused this array: {getattr(f, 'reason', f.type.name)}")
            if not w.verify_welcome(self.cfg.key, mine, f.witness, f.tag):
                # Whoever answers does not hold the key: never take a decision from it.
                raise w.WitnessProtocolError(f"{f.witness!r} at {self.cfg.address[0]}:{self.cfg.address[1]} "
                                             "failed to prove the shared key: not our witness")
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
        self.sock = sock
        self.witness_name = f.witness
        self.last_error = ""
        log.info("witness %s reached", self.witness_name)

    async def request(self, t: w.WType, **fields) -> w.WFrame:
        async with self.lock:
            if self.sock is None:  # checked under the lock: another request may have dropped it
                raise WitnessUnreachable(self.last_error or "not connected")
            self.rid += 1
            sent = trio.current_time()
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    await netio.sendall(self.sock, w.encode(t, self.rid, **fields))
                    f = await self._recv_frame()
            except (OSError, trio.TooSlowError, EOFError, w.WitnessProtocolError) as e:
                self.last_error = str(e) or type(e).__name__
                self._drop()
                raise WitnessUnreachable(self.last_error) from None
            if f.req_id != self.rid:
                self._drop()
                raise WitnessUnreachable("witness answered out of order")
            self.last_ok, self.last_ok_sent = trio.current_time(), sent
            return f

    async def decide(self, t: w.WType, group: str, epoch: int):
        """(DECISION frame, or None when the witness cannot be asked; when the request was sent)."""
        sent = trio.current_time()
        try:
            f = await self.request(t, group=group, epoch=epoch)
        except WitnessUnreachable:
            return None, sent
        sent = self.last_ok_sent if self.last_ok_sent is not None else sent
        if f.type != w.WType.DECISION:
            log.warning("witness: %s %s: %s", t.name, group, getattr(f, "reason", f.type.name))
            return None, sent
        return f, sent
