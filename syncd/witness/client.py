"""The node's side of the witness: one authenticated connection, periodic reports per group,
and KEEP / CLAIM requests when the replication link is lost."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from .. import netio, secure
from . import proto as w
from .decide import FRESH_FOR
from .reach import GroupsFn, OnChange, OnReport, WitnessReach
from .session import Session, establish

log = logging.getLogger("syncd.witness.client")

# s: the witness answers a request at once; one that takes longer leaves the connection out of
# step (an answer may still come), so the connection is dropped and made again. The witness
# takes a request only within this of its answer before it (decide.fresh), so one given up
# here is never taken later.
REQUEST_TIMEOUT = FRESH_FOR
CONNECT_TIMEOUT = 2.0  # s to connect, and again to finish the security handshake


@dataclass(frozen=True)
class WitnessClientConfig:
    address: tuple[str, int]
    security: secure.Security  # how the connection is authenticated (key, mutual TLS, insecure)
    name: str | None = None  # the witness's name, when the config gives it: any other is refused
    interval: float = 0.5  # s between reports
    owner_lease: float = 3.0  # must equal the witness's owner_lease
    grace: float = 4.5  # must equal the witness's grace


class WitnessUnreachable(Exception):
    pass


class WitnessClient(WitnessReach):
    def __init__(self, cfg: WitnessClientConfig, node_name: str, groups_fn: GroupsFn,
                 on_report: OnReport | None = None, on_change: OnChange | None = None) -> None:
        super().__init__(cfg.interval, on_change)
        self.cfg = cfg
        self.node = node_name
        self.groups_fn = groups_fn
        self.on_report = on_report
        self.sess: Session | None = None
        self.lock = trio.Lock()
        self.rid = 0
        self.registered: set[str] = set()
        self.last_ok_sent: float | None = None  # when the last answered request was sent
        self.witness_name = ""
        self.session_heard = False  # an answer was heard on this session
        # Whether the witness refuses requests heard late (None: not known yet): it refuses the
        # first request of every session, which a witness before protocol's FRESH bit does not.
        self.fresh_checked: bool | None = None

    @property
    def reachable(self) -> bool:
        return self.sess is not None and super().reachable

    def info(self) -> dict[str, Any]:
        return {"backend": "builtin", "address": "%s:%d" % self.cfg.address, "reachable": self.reachable,
                "witness": self.witness_name, "security": self.cfg.security.describe(), "last_error": self.last_error,
                "last_heard_s_ago": self.last_heard_s_ago(), "refuses_late_requests": self.fresh_checked}

    async def run(self) -> None:
        while True:
            try:
                await self._connect()
                while True:
                    await self._check_idle()
                    await self._round()
                    await trio.sleep(self.cfg.interval)
            except (OSError, w.WitnessProtocolError, WitnessUnreachable, trio.TooSlowError, EOFError,
                    secure.AuthError) as e:
                self._lose(e)
            await trio.sleep(self.cfg.interval)

    async def _round(self) -> None:
        """Register each new group, then report each group."""
        for name, members, owner, epoch, _flags in self.groups_fn():
            if name not in self.registered:
                await self.request(w.WType.REGISTER, group=name, member1=members[0],
                                   member2=members[1], owner=owner, epoch=epoch)
                self.registered.add(name)
            await self._report(name)

    async def _report(self, name: str) -> None:
        """Group ``name``'s report, its answer handed to the node (``on_report``)."""
        f = await self._request(w.WType.REPORT, partial(self._report_fields, name))
        if f is not None and f.type == w.WType.DECISION and self.on_report is not None:
            assert self.last_ok_sent is not None  # set by the request that answered
            self.on_report(name, self.last_ok_sent, f.owner, f.epoch)

    async def _check_idle(self) -> None:
        """Between rounds: a connection the witness closed meanwhile (an array with no groups
        sends nothing and is closed as idle) is dropped now, not found dead by a decision."""
        async with self.lock:
            if self.sess is not None and self.sess.poll_closed():
                raise WitnessUnreachable("the witness closed the connection")

    def _lose(self, why: BaseException | str) -> None:
        """The session failed: close it with a reset (the kernel stops retransmitting a request
        the node gave up on: the witness must not hear it late, docs/failover-plan.md rule 4)
        and record why (``showrcopy``'s last error)."""
        if self.sess is not None:
            netio.set_abortive_close(self.sess.sock)
        self._drop()
        self._failed(why)

    def _drop(self) -> None:
        """Close the session (the caller says why: ``_failed``)."""
        if self.sess is not None:
            self.sess.close()
            self.sess = None
        self.registered.clear()

    async def _connect(self) -> None:
        # The session is published (self.sess) only once the handshake is done, so requests
        # from other tasks never use it concurrently with the handshake.
        addr = "%s:%d" % self.cfg.address
        with trio.fail_after(CONNECT_TIMEOUT):
            sock = await netio.connect(self.cfg.address)
        try:
            hs = secure.Handshake(self.cfg.security, secure.Role.DIALER, self.node, self.cfg.name)
            sess = await establish(sock, hs, CONNECT_TIMEOUT)
        except secure.AuthError as e:
            # Whoever answers did not prove itself (or refused us): never take a decision from it.
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise WitnessUnreachable(f"the witness at {addr} is not authenticated: {e}") from None
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
        self.sess = sess
        self.session_heard = False
        self.witness_name = sess.peer
        self.last_error = ""
        self._set_connected(True)
        log.info("witness %s reached (%s)", self.witness_name, self.cfg.security.describe())

    def _report_fields(self, name: str) -> dict[str, Any] | None:
        now = self._report_now(self.groups_fn, name)
        return None if now is None else {"group": name, "epoch": now[0], "flags": now[1]}

    async def request(self, t: w.WType, **fields: Any) -> w.WFrame:
        f = await self._request(t, lambda: fields)
        assert f is not None
        return f

    async def _request(self, t: w.WType, fields_now: Callable[[], dict[str, Any] | None]) -> w.WFrame | None:
        """One request, its fields read once it holds the connection (``_report_now``); None
        when there is nothing to ask any more (``fields_now`` said so: the group is gone)."""
        async with self.lock:
            sess = self.sess
            if sess is None:  # checked under the lock: another request may have dropped it
                raise WitnessUnreachable(self.last_error or "not connected")
            for _attempt in range(2):
                # A retry reads its fields again: a report says what is true when it is sent.
                fields = fields_now()
                if fields is None:
                    return None
                self.rid += 1
                rid = self.rid | w.FRESH
                sent = trio.current_time()
                self._sent(fields["group"], sent)
                try:
                    with trio.fail_at(sent + REQUEST_TIMEOUT):  # from the send the node counted
                        await sess.send(w.encode(t, rid, **fields))
                        f = await sess.next_frame()
                except (OSError, trio.TooSlowError, EOFError, w.WitnessProtocolError, secure.AuthError) as e:
                    self._lose(e)
                    raise WitnessUnreachable(self.last_error) from None
                except BaseException:
                    # Cancelled with the request under way: its answer may still come, and the
                    # next request must not follow it on this session (it would be measured
                    # from an answer it was not sent after).
                    self._lose("a request was cancelled before its answer")
                    raise
                if f.type == w.WType.GOODBYE:
                    self._lose(f"the witness closed the connection: {f.reason}")
                    raise WitnessUnreachable(self.last_error)
                if f.req_id != rid:
                    self._lose("the witness answered out of order")
                    raise WitnessUnreachable(self.last_error)
                first, self.session_heard = not self.session_heard, True
                if f.type == w.WType.STALE:
                    # Heard too late after the answer before it (or first on the session): it
                    # changed nothing. Ask again at once, right after this answer.
                    self.fresh_checked = True
                    log.debug("witness: %s of %s not taken (%s): asking again", t.name, fields["group"], f.reason)
                    continue
                if first:
                    if self.fresh_checked is not False:
                        log.warning("witness %s took the first request of a session: it does not refuse requests "
                                    "heard late (an older witness; docs/failover-plan.md rule 4)", self.witness_name)
                    self.fresh_checked = False
                self._ok()
                self.last_ok_sent = sent
                return f
            # Both heard later than the witness takes: this network delays requests that long.
            self._lose(f"the witness heard two requests in a row too late to take them: {f.reason}")
            raise WitnessUnreachable(self.last_error)

    async def decide(self, t: w.WType, group: str, epoch: int) -> tuple[w.WFrame | None, float]:
        """(DECISION frame, or None when the witness cannot be asked; when the request was sent)."""
        sent = trio.current_time()
        try:
            if t is w.WType.CLAIM:
                # A report first, so that the witness has this array's word about the link as it
                # is now (a loss since the link last came back is a new one) before the claim.
                await self._report(group)
                sent = trio.current_time()
            f = await self.request(t, group=group, epoch=epoch)
        except WitnessUnreachable:
            return None, sent
        sent = self.last_ok_sent if self.last_ok_sent is not None else sent
        if f.type != w.WType.DECISION:
            log.warning("witness: %s %s: %s", t.name, group, getattr(f, "reason", f.type.name))
            return None, sent
        return f, sent
