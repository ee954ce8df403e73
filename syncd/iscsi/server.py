"""The iSCSI target's I/O shell: sockets, tasks and the volume behind each LUN.

Each connection runs ``conn.Connection`` (the protocol, sans-IO) and ``scsi.Unit`` (the
command set, sans-IO); this module only moves bytes and calls the ``Export`` of each LU, the
same interface the NBD server uses (``syncd.nbd.export``). Responses leave through one
ordered queue per connection, so StatSN order on the wire is the order the protocol layer
numbered them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from syncd import netio
from syncd.iscsi import conn as c
from syncd.iscsi import pdu, pr, scsi
from syncd.iscsi.login import Portal, Session
from syncd.nbd.export import BlockError, Export

log = logging.getLogger("syncd.iscsi")

LOGIN_TIMEOUT = 30.0
NOP_INTERVAL = 10.0  # idle time before the target pings an initiator
NOP_TIMEOUT = 30.0  # no answer to a ping for this long ends the connection
DATA_BUDGET = 64 << 20  # bytes the commands of one connection may hold at once (one command: at most 32 MiB)
OUT_LIMIT = 4 << 20  # queued responses beyond this: stop reading the initiator until they leave
CLOSE_GRACE = 5.0  # seconds a closing connection's last answers get to leave
WRITE_SAME_CHUNK = 1 << 20


@dataclass
class Lu:
    """One LUN as one initiator sees it: the command set's view and the volume behind it.
    ``lock`` makes COMPARE AND WRITE atomic against this array's other commands on the LU."""

    unit: scsi.Unit
    export: Export
    lock: trio.Lock = field(default_factory=trio.Lock)
    nexuses: dict[int, scsi.Nexus] = field(default_factory=dict)  # per session (TSIH)
    # COMPARE AND WRITE done elsewhere (a replicated volume: at the group's primary), returning
    # the offset of the first difference or None when it wrote; None here: at this array.
    compare_and_write: Callable[[int, bytes, bytes, bool], Awaitable[int | None]] | None = None
    # Persistent reservations, where this place keeps them (None: PERSISTENT RESERVE IN/OUT
    # are refused as unsupported): one registry for every session of the LU.
    reservations: pr.Registry | None = None
    # PERSISTENT RESERVE OUT done elsewhere (a replicated volume: at the group's primary, which
    # copies the new state to the other array and raises the unit attentions itself), given the
    # nexus, the CDB and the parameter list; None: applied to ``reservations`` here.
    reserve_out: Callable[[pr.Nexus, bytes, bytes], Awaitable[pr.Outcome]] | None = None


class Catalog(Protocol):
    def luns_for(self, initiator: str, address: str, target: str) -> dict[int, Lu]:
        """The LUNs this initiator (its iSCSI name, its connection's source address) sees
        through this target (LUN masking)."""
        ...


class Target:
    """One array's iSCSI target: a portal (targets, CHAP, authorization), the LUN catalog,
    and the addresses SendTargets reports."""

    def __init__(self, portal: Portal, catalog: Catalog, addresses: Callable[[str], list[c.Address]],
                 max_connections: int = 256, others: Callable[[], list[tuple[str, str]]] | None = None) -> None:
        self.portal = portal
        self.others = others
        self.catalog = catalog
        self.addresses = addresses
        self._tsih = itertools.cycle(range(1, 0x10000))
        self.sessions: dict[int, Session] = {}
        self.runners: set[ConnectionRunner] = set()
        self.max_connections = max_connections
        # A LOGICAL UNIT RESET: the array tells whoever else presents the LU (the peer array)
        self.on_reset: Callable[[Lu], Awaitable[None]] | None = None
        self.refused = 0  # connections closed at once: max_connections were open

    async def serve(self, listeners: list[socket.socket], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listeners`` (non-blocking sockets, ``netio.listen_tcp``) until cancelled."""
        async with trio.open_nursery() as n:
            for lst in listeners:
                n.start_soon(self._accept, lst, n)
            task_status.started()

    async def _accept(self, lsock: socket.socket, n: trio.Nursery) -> None:
        try:
            while True:
                sock, _ = await netio.accept(lsock)
                n.start_soon(self.handle, sock)
        finally:
            lsock.close()

    def _next_tsih(self) -> int:
        for tsih in self._tsih:
            if tsih not in self.sessions:
                return tsih
        raise RuntimeError("unreachable")

    async def handle(self, sock: socket.socket) -> None:
        with sock:
            if len(self.runners) >= self.max_connections:
                self.refused += 1
                return
            runner = ConnectionRunner(self, sock)
            self.runners.add(runner)
            try:
                await runner.run()
            except* OSError as eg:  # the initiator reset or broke the connection
                log.info("iSCSI connection ended: %s", eg.exceptions[0])
            except* Exception as eg:  # a defect: this connection ends, the target and the node go on
                log.error("iSCSI connection failed", exc_info=eg)
            finally:
                self.runners.discard(runner)

    def refresh(self) -> None:
        """Hosts or LUNs changed: each session sees its LUNs anew (REPORTED LUNS DATA HAS
        CHANGED where they did)."""
        for r in list(self.runners):
            r.refresh_luns()

    def reset_attention(self, export: Export) -> None:
        """The LU behind ``export`` was reset (here or at the other array): every session that
        sees it gets the unit attention."""
        for r in list(self.runners):
            for lu in r.luns.values():
                if lu.export is export:
                    r.nexus(lu).raise_attention(scsi.LU_RESET_OCCURRED)

    def pr_attention(self, export: Export, who: pr.Nexus, sense: scsi.Sense) -> None:
        """A reservation change told to the sessions of the nexus it concerns."""
        for r in list(self.runners):
            s = r.session
            if s is None or (s.initiator_name, s.isid) != (who.initiator, who.isid):
                continue
            for lu in r.luns.values():
                if lu.export is export:
                    r.nexus(lu).raise_attention(sense)

    def attention(self, sense: scsi.Sense) -> None:
        """Raise a unit attention for every session on every LU (e.g. the access state
        changed)."""
        for r in list(self.runners):
            for lu in r.luns.values():
                nx = lu.nexuses.get(r.tsih)
                if nx is not None:
                    nx.raise_attention(sense)


def sense_for(err: BlockError, write: bool) -> scsi.Sense:
    """The sense an I/O error becomes. ESHUTDOWN and EAGAIN mean the array stopped serving the
    volume (failover, lost lease): ALUA transitioning, so a host's multipath retries the
    command on the other path."""
    e = err.errno
    if e in (errno.ESHUTDOWN, errno.EAGAIN):
        return scsi.ALUA_TRANSITION
    if e == errno.ENOSPC:
        return scsi.SPACE_ALLOCATION_FAILED
    if e in (errno.EROFS, errno.EPERM):
        return scsi.WRITE_PROTECTED
    if e == errno.EIO:
        return scsi.WRITE_ERROR if write else scsi.MEDIUM_READ_ERROR
    return scsi.INTERNAL_TARGET_FAILURE


class ConnectionRunner:
    def __init__(self, target: Target, sock: socket.socket) -> None:
        self.target = target
        self.sock = sock
        self.flush_queued = False  # netio.Outbox: queued for the flush at the end of a batch
        self.writing = False  # the writer task is sending: inline flushes leave it to it
        self.pacer = netio.Pacer()
        self.probe = netio.Probe(sock)  # a receive that drained the socket: ask before the next
        self.tsih = target._next_tsih()
        self.conn = c.Connection(target.portal, self.tsih, target.addresses, others=target.others)
        # Responses in StatSN order, each with the budget bytes to give back once it is sent.
        self.out: collections.deque[tuple[c.Send, int]] = collections.deque()
        self.queued = 0  # bytes in ``out``
        self.drained = trio.Event()  # set when ``queued`` falls below OUT_LIMIT
        self.wake = trio.Event()
        self.waiting: dict[int, trio.Event] = {}  # ITT -> data-out arrived
        self.written: dict[int, bytes | bytearray] = {}
        self.luns: dict[int, Lu] = {}
        self.budget = ByteBudget(DATA_BUDGET)
        self.pinged: dict[int, float] = {}
        self.aborted: set[int] = set()
        self.closing = ""
        self.session: Session | None = None

    def emit(self, events: list[c.Event], release: int = 0) -> None:
        """Carry out the protocol layer's events; Sends keep their order. ``release``: budget
        bytes the last Send gives back once the writer has sent it (a read's data)."""
        last = max((i for i, ev in enumerate(events) if isinstance(ev, c.Send)), default=-1)
        for i, ev in enumerate(events):
            if isinstance(ev, c.Send):
                self.out.append((ev, release if i == last else 0))
                self.queued += sum(len(b) for b in ev.buffers)
                if not netio.defer(self):  # outside a batch: the writer task sends it
                    self.wake.set()
            elif isinstance(ev, c.Close):
                self.closing = self.closing or ev.reason
                self.wake.set()
                # The last answers get CLOSE_GRACE to leave: an initiator that stopped reading
                # (the writer waits on a full socket) does not keep the connection open.
                self.end_by(trio.current_time() + CLOSE_GRACE)
            elif isinstance(ev, c.WriteData):
                self.written[ev.itt] = ev.data
                done = self.waiting.pop(ev.itt, None)
                if done is not None:
                    done.set()
            elif isinstance(ev, c.Ping):
                self.pinged.pop(ev.ttt, None)
            elif isinstance(ev, c.LoggedIn):
                self.logged_in(ev.session)
            elif isinstance(ev, c.Command):
                self.dispatch(ev.cmd)
            elif isinstance(ev, c.TaskManagement):
                self.nursery.start_soon(self.task_management, ev.request)

    def end_by(self, deadline: float) -> None:
        scope = getattr(self, "nursery", None)
        if scope is not None:
            scope.cancel_scope.deadline = min(scope.cancel_scope.deadline, deadline)

    @property
    def address(self) -> str:
        try:
            peer = self.sock.getpeername()
        except OSError:
            return ""
        return str(peer[0]) if isinstance(peer, tuple) else ""  # a unix socket has no address

    def refresh_luns(self) -> None:
        s = self.session
        if s is None or s.target is None:
            return
        new = self.target.catalog.luns_for(s.initiator_name, self.address, s.target.name)
        if set(new) == set(self.luns) and all(new[n].export is self.luns[n].export for n in new):
            return
        for n, lu in new.items():
            old = self.luns.get(n)
            if old is not None and old.export is lu.export:
                new[n] = old  # keep its unit attentions
        self.luns = new
        for lu in new.values():
            self.nexus(lu).raise_attention(scsi.REPORTED_LUNS_CHANGED)

    def logged_in(self, session: Session) -> None:
        self.session = session
        self.target.sessions[self.tsih] = session
        if session.target is not None:
            self.luns = self.target.catalog.luns_for(session.initiator_name, self.address, session.target.name)
        log.info("iSCSI login: %s (%s) to %s, session %d, digests header %s data %s", session.initiator_name,
                 session.session_type.value, session.target.name if session.target else "discovery", self.tsih,
                 session.params.header_digest, session.params.data_digest)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as n:
                self.nursery = n
                n.start_soon(self.writer)
                with trio.move_on_after(LOGIN_TIMEOUT) as login_deadline:
                    await self.reader(until_login=True)
                if login_deadline.cancelled_caught and self.session is None:
                    self.closing = "no login within 30 s"
                if self.session is not None and not self.closing:
                    n.start_soon(self.keepalive)
                    await self.reader(until_login=False)
                self.closing = self.closing or "initiator closed the connection"
                self.wake.set()
                self.end_by(trio.current_time() + CLOSE_GRACE)  # let the last responses go out
        finally:
            self.target.sessions.pop(self.tsih, None)
            for lu in self.luns.values():
                lu.nexuses.pop(self.tsih, None)
            if self.closing and self.session is not None:
                log.info("iSCSI session %d of %s ended: %s", self.tsih, self.session.initiator_name, self.closing)
            elif self.closing:
                log.info("iSCSI connection ended before login: %s", self.closing)

    async def reader(self, until_login: bool) -> None:
        while not self.closing:
            if until_login and self.session is not None:
                return
            while self.queued > OUT_LIMIT:  # an initiator that does not read its answers
                self.drained = trio.Event()
                await self.drained.wait()
            data = await netio.recv(self.sock, 1 << 18, self.pacer, self.probe)
            if not data:
                return
            # What one recv brought is a batch: the answers it produces leave in one send when
            # it ends (netio), not a writer task's round later.
            was = netio.batch_begin()
            try:
                self.emit(self.conn.receive_data(data))
            finally:
                netio.batch_end(was)

    def flush_inline(self) -> None:
        """netio.Outbox: send what is queued now, without blocking; what the kernel does not
        take goes to the writer task."""
        if self.writing or not self.out:
            if self.out:
                self.wake.set()
            return
        items = list(self.out)
        self.out.clear()
        sent, rest = netio.send_available(self.sock, [b for ev, _ in items for b in ev.buffers])
        give = 0
        left = sent
        kept_release = 0
        for ev, release in items:
            size = sum(len(b) for b in ev.buffers)
            if left >= size:
                left -= size
                give += release
            else:
                left = 0
                kept_release += release
        self.queued -= sent
        if give:
            self.budget.give(give)
        if rest:
            self.out.appendleft((c.Send(list(rest)), kept_release))
            self.wake.set()
        elif self.queued <= OUT_LIMIT:
            self.drained.set()

    async def writer(self) -> None:
        while True:
            while self.out:
                # What is queued leaves in one send (up to 1 MiB): one system call for the
                # responses a batch of commands produced, not one each.
                parts: list[bytes | bytearray | memoryview] = []
                size = give = 0
                while self.out and size < (1 << 20):
                    ev, release = self.out.popleft()
                    parts += ev.buffers
                    size += sum(len(b) for b in ev.buffers)
                    give += release
                self.writing = True
                try:
                    await netio.sendmsg_all(self.sock, parts)
                finally:
                    self.writing = False
                self.queued -= size
                if give:
                    self.budget.give(give)
                if self.queued <= OUT_LIMIT:
                    self.drained.set()
            if self.closing:
                self.nursery.cancel_scope.cancel()
                return
            self.wake = trio.Event()
            if self.out or self.closing:
                continue
            await self.wake.wait()

    async def keepalive(self) -> None:
        while True:
            await trio.sleep(NOP_INTERVAL)
            now = trio.current_time()
            if any(now - t > NOP_TIMEOUT for t in self.pinged.values()):
                self.emit([c.Close(f"no answer to a NOP-In ping for {NOP_TIMEOUT:.0f} s")])
                return
            ping = self.conn.ping()
            self.pinged[int.from_bytes(bytes(ping.buffers[0])[20:24], "big")] = now
            self.emit([ping])

    # -- SCSI ----------------------------------------------------------------------------------
    def nexus(self, lu: Lu) -> scsi.Nexus:
        nx = lu.nexuses.get(self.tsih)
        if nx is None:
            nx = lu.nexuses[self.tsih] = scsi.Nexus()
        return nx

    def check(self, cmd: pdu.ScsiCommand, sense: scsi.Sense, length: int | None = None) -> None:
        self.emit([self.conn.response(cmd, scsi.CHECK_CONDITION, sense.fixed(), length)])

    async def receive(self, cmd: pdu.ScsiCommand, length: int) -> bytes | bytearray:
        if cmd.itt in self.written:  # taken already (a fast write that fell back)
            return self.written.pop(cmd.itt)
        done = trio.Event()
        self.waiting[cmd.itt] = done
        self.emit(self.conn.request_data(cmd, length))
        if cmd.itt in self.waiting:
            await done.wait()
        if cmd.itt in self.aborted:
            self.aborted.discard(cmd.itt)
            self.conn.forget(cmd.itt)
            raise _Aborted
        return self.written.pop(cmd.itt)

    def dispatch(self, cmd: pdu.ScsiCommand) -> None:
        """A command in CmdSN order: answered here when it needs no waiting (facts, a read the
        volume can serve at once), else run in a task of its own."""
        number = pdu.lun_number(cmd.lun)
        lu = self.luns.get(number) if number is not None else None
        if lu is None:
            self.no_lun(cmd)
            return
        nx = self.nexus(lu)
        op = cmd.cdb[0] if cmd.cdb else -1
        reg = lu.reservations
        if reg is not None and not nx.attentions:
            st = reg.get(lu.export.name)
            if pr.conflicts(st, self.pr_nexus(lu), op):
                self.emit([self.conn.response(cmd, scsi.RESERVATION_CONFLICT)])
                return
            if op == 0x5E and len(cmd.cdb) >= 10:
                got = pr.reserve_in(st, cmd.cdb, reg.persist)
                self.answer(cmd, scsi.Check(got) if isinstance(got, scsi.Sense)
                            else scsi.Done(got[: int.from_bytes(cmd.cdb[7:9], "big")]))
                return
            if op == 0x5F and len(cmd.cdb) >= 10:
                self.nursery.start_soon(self.reserve_out, cmd, lu)
                return
        outcome = lu.unit.command(cmd.cdb, nx)
        if isinstance(outcome, scsi.Check | scsi.Done):
            self.answer(cmd, outcome)
            return
        if (isinstance(outcome, scsi.Io) and outcome.kind is scsi.IoKind.READ
                and self.budget.try_take(outcome.length)):
            fast = getattr(lu.export, "fast_read", None)
            try:
                data = fast(outcome.offset, outcome.length) if fast is not None else None
            except BlockError as e:
                self.budget.give(outcome.length)
                self.check(cmd, sense_for(e, False))
                return
            if data is not None:
                self.emit(self.conn.data_in(cmd, data), release=outcome.length)
                return
            self.budget.give(outcome.length)
        if (isinstance(outcome, scsi.Io) and outcome.kind is scsi.IoKind.WRITE and not outcome.fua
                and cmd.edtl == outcome.data_out and len(cmd.data) >= outcome.data_out
                and getattr(lu.export, "fast_write", None) is not None and self.budget.try_take(outcome.data_out)):
            if self.fast_write(cmd, lu, outcome):
                return
        self.nursery.start_soon(self.command, cmd, lu, outcome)

    def fast_write(self, cmd: pdu.ScsiCommand, lu: Lu, io: scsi.Io) -> bool:
        """A write whose data came with the command, through the volume's callback path (no
        task; the NBD server's fast path). False: the task path takes it (the data is kept)."""
        n = io.data_out
        [ev] = self.conn.request_data(cmd, n)
        assert isinstance(ev, c.WriteData)
        data = ev.data

        def done(err: int, msg: str) -> None:
            self.budget.give(n)
            if err:
                self.check(cmd, sense_for(BlockError(err, msg), True))
            else:
                self.emit([self.conn.response(cmd, scsi.GOOD, length=n)])

        try:
            if lu.export.fast_write(io.offset, memoryview(data), done):  # type: ignore[attr-defined]
                return True
        except BlockError as e:
            done(e.errno, str(e))
            return True
        self.budget.give(n)
        self.written[cmd.itt] = data  # the task path finds it there
        return False

    def pr_nexus(self, lu: Lu) -> pr.Nexus:
        assert self.session is not None
        groups = lu.unit.alua()
        return pr.Nexus(self.session.initiator_name, self.session.isid, groups[0].relative_port if groups else 1)

    async def reserve_out(self, cmd: pdu.ScsiCommand, lu: Lu) -> None:
        """PERSISTENT RESERVE OUT: its 24-byte parameter list, then the registry's change and
        the unit attentions it raises for other sessions."""
        reg = lu.reservations
        assert reg is not None
        length = int.from_bytes(cmd.cdb[5:9], "big")
        if length != 24 or cmd.edtl < length:
            self.check(cmd, scsi.PARAMETER_LIST_LENGTH_ERROR)
            self.conn.forget(cmd.itt)
            return
        try:
            params = bytes(await self.receive(cmd, length))
        except _Aborted:
            return
        if lu.reserve_out is not None:
            try:
                out = await lu.reserve_out(self.pr_nexus(lu), cmd.cdb, params)
            except BlockError as e:
                self.check(cmd, sense_for(e, True))
                return
        else:
            ports = frozenset(g.relative_port for g in lu.unit.alua()) or frozenset({1})
            out = pr.reserve_out(reg.get(lu.export.name), self.pr_nexus(lu), cmd.cdb, params, ports, reg.persist)
        if out.conflict:
            self.emit([self.conn.response(cmd, scsi.RESERVATION_CONFLICT)])
            return
        if out.sense is not None:
            self.check(cmd, out.sense)
            return
        if lu.reserve_out is None:
            reg.states[lu.export.name] = out.state
            for who, sense in out.attentions:
                self.target.pr_attention(lu.export, who, sense)
        self.emit([self.conn.response(cmd, scsi.GOOD)])

    def answer(self, cmd: pdu.ScsiCommand, outcome: scsi.Check | scsi.Done) -> None:
        if isinstance(outcome, scsi.Check):
            self.check(cmd, outcome.sense)
        elif cmd.read or outcome.data:
            self.emit(self.conn.data_in(cmd, outcome.data))
        else:
            self.emit([self.conn.response(cmd, scsi.GOOD)])

    async def command(self, cmd: pdu.ScsiCommand, lu: Lu, outcome: scsi.Outcome) -> None:
        try:
            await self._command(cmd, lu, outcome)
        except _Aborted:
            pass  # ABORT TASK answered for it: an aborted task gets no response

    async def _command(self, cmd: pdu.ScsiCommand, lu: Lu, outcome: scsi.Outcome) -> None:
        if isinstance(outcome, scsi.NeedData):
            if outcome.length > cmd.edtl:
                self.check(cmd, scsi.invalid_field(7), outcome.length)
                return
            params = await self.receive(cmd, outcome.length)
            outcome = lu.unit.unmap_parameters(bytes(params))
            assert not isinstance(outcome, scsi.NeedData)
        if isinstance(outcome, scsi.Check | scsi.Done):
            self.answer(cmd, outcome)
        elif outcome.kind is scsi.IoKind.READ:
            # The budget goes back when the data has left (the writer gives it back).
            await self.budget.take(outcome.length)
            try:
                data = await lu.export.read(outcome.offset, outcome.length)
            except BlockError as e:
                self.budget.give(outcome.length)
                self.check(cmd, sense_for(e, False))
                return
            self.emit(self.conn.data_in(cmd, data), release=outcome.length)
        else:
            async with self.budget.hold(max(outcome.length, outcome.data_out)):
                await self.io(cmd, lu, outcome)

    def no_lun(self, cmd: pdu.ScsiCommand) -> None:
        """SPC-4 section 4.6.4: INQUIRY to a LUN that is not there answers "not connected",
        REPORT LUNS lists what is there; anything else is LOGICAL UNIT NOT SUPPORTED."""
        op = cmd.cdb[0]
        if op == 0x12 and not cmd.cdb[1] & 0x01:
            data = bytearray(36)
            data[0] = 0x7F  # peripheral qualifier 011b: no LU at this LUN
            data[4] = 31
            self.emit(self.conn.data_in(cmd, bytes(data[: int.from_bytes(cmd.cdb[3:5], "big")])))
        elif op == 0xA0 and self.luns:
            lu = next(iter(self.luns.values()))
            out = lu.unit.report_luns(cmd.cdb, scsi.Nexus([]))
            if isinstance(out, scsi.Done):
                self.emit(self.conn.data_in(cmd, out.data))
            elif isinstance(out, scsi.Check):
                self.check(cmd, out.sense)
        else:
            self.check(cmd, scsi.LU_NOT_SUPPORTED)

    async def io(self, cmd: pdu.ScsiCommand, lu: Lu, io: scsi.Io) -> None:
        fixed = io.kind in (scsi.IoKind.WRITE_SAME, scsi.IoKind.COMPARE_AND_WRITE, scsi.IoKind.VERIFY)
        if (io.data_out and not cmd.write) or (fixed and cmd.edtl != io.data_out):
            # The data-out these commands carry has one size (a block, twice the blocks compared):
            # anything else is refused, having written nothing.
            self.check(cmd, scsi.invalid_field(0), io.data_out)
            self.conn.forget(cmd.itt)
            return
        if io.kind is scsi.IoKind.WRITE and cmd.edtl < io.data_out:
            # The initiator sends less than the CDB says (RFC 7143 section 11.4.5.1): write
            # what it sends, if that is whole blocks, and report the overflow.
            if cmd.edtl % lu.unit.facts.block_size:
                self.check(cmd, scsi.INVALID_FIELD_IN_INFORMATION_UNIT, io.data_out)
                self.conn.forget(cmd.itt)
                return
            needed = io.data_out
            io = dataclasses.replace(io, length=cmd.edtl, data_out=cmd.edtl)
            if not io.length:
                self.emit([self.conn.response(cmd, scsi.GOOD, length=needed)])
                return
            await self._io(cmd, lu, io, needed)
            return
        await self._io(cmd, lu, io, io.data_out)

    async def _io(self, cmd: pdu.ScsiCommand, lu: Lu, io: scsi.Io, needed: int) -> None:
        ex = lu.export
        try:
            if io.kind is scsi.IoKind.LBA_STATUS:
                extents = await ex.allocation(io.offset, io.length)
                self.emit(self.conn.data_in(cmd, lu.unit.lba_status(io.offset, extents, io.allocation).data))
                return
            if io.kind is scsi.IoKind.SYNC:
                await ex.flush()
            elif io.kind is scsi.IoKind.UNMAP:
                for off, ln in io.ranges:
                    await ex.trim(off, ln, False)
            elif io.kind is scsi.IoKind.WRITE:
                data = await self.receive(cmd, io.data_out)
                await ex.write(io.offset, memoryview(data), io.fua)
            elif io.kind is scsi.IoKind.WRITE_SAME:
                block = bytes(lu.unit.facts.block_size) if io.ndob else bytes(await self.receive(cmd, io.data_out))
                await self.write_same(ex, io, block)
            elif io.kind is scsi.IoKind.VERIFY:
                data = await self.receive(cmd, io.data_out)
                have = await ex.read(io.offset, io.length)
                bad = _first_difference(have, data)
                if bad is not None:
                    self.emit([self.conn.response(cmd, scsi.CHECK_CONDITION, scsi.miscompare(bad).sense.fixed())])
                    return
            elif io.kind is scsi.IoKind.COMPARE_AND_WRITE and io.length:
                data = bytes(await self.receive(cmd, io.data_out))
                verify, new = data[: io.length], data[io.length :]
                if lu.compare_and_write is not None:
                    bad = await lu.compare_and_write(io.offset, verify, new, io.fua)
                else:
                    bad = await compare_and_write(ex, lu.lock, io.offset, verify, new, io.fua)
                if bad is not None:
                    self.emit([self.conn.response(cmd, scsi.CHECK_CONDITION, scsi.miscompare(bad).sense.fixed())])
                    return
        except BlockError as e:
            self.conn.forget(cmd.itt)
            self.check(cmd, sense_for(e, io.kind is not scsi.IoKind.READ))
            return
        self.emit([self.conn.response(cmd, scsi.GOOD, length=needed if cmd.write else None)])

    @staticmethod
    async def write_same(ex: Export, io: scsi.Io, block: bytes) -> None:
        if not any(block):
            if io.unmap:
                await ex.trim(io.offset, io.length, False)
            else:
                await ex.write_zeroes(io.offset, io.length, False, True)
            return
        chunk = block * max(1, WRITE_SAME_CHUNK // len(block))
        off, end = io.offset, io.offset + io.length
        while off < end:
            n = min(len(chunk), end - off)
            await ex.write(off, memoryview(chunk)[:n], False)
            off += n

    async def task_management(self, req: pdu.TaskMgmtRequest) -> None:
        """Error recovery level 0: commands run to completion quickly, so ABORT TASK answers
        whether the task is still known; LUN and target resets raise a unit attention."""
        fn = req.function
        number = pdu.lun_number(req.lun)
        if fn == pdu.TmfFunction.ABORT_TASK:
            # Only a task still waiting for its data-out can be stopped before it changes anything.
            known = req.ref_itt in self.waiting
            if known:
                self.aborted.add(req.ref_itt)
                self.waiting.pop(req.ref_itt).set()
            response = pdu.TmfResponse.COMPLETE if known else pdu.TmfResponse.TASK_DOES_NOT_EXIST
        elif fn in (pdu.TmfFunction.ABORT_TASK_SET, pdu.TmfFunction.CLEAR_TASK_SET,
                    pdu.TmfFunction.LOGICAL_UNIT_RESET):
            lu = self.luns.get(number) if number is not None else None
            if lu is None:
                response = pdu.TmfResponse.LUN_DOES_NOT_EXIST
            else:
                if fn == pdu.TmfFunction.LOGICAL_UNIT_RESET:
                    # SAM-5 section 7.7: every I_T nexus of the LU, the one that asked included.
                    self.target.reset_attention(lu.export)
                    if self.target.on_reset is not None:
                        await self.target.on_reset(lu)
                response = pdu.TmfResponse.COMPLETE
        elif fn in (pdu.TmfFunction.TARGET_WARM_RESET, pdu.TmfFunction.TARGET_COLD_RESET):
            for lu in self.luns.values():
                for nx in lu.nexuses.values():
                    nx.raise_attention(scsi.POWER_ON_RESET)
            response = pdu.TmfResponse.COMPLETE
        else:
            response = pdu.TmfResponse.NOT_SUPPORTED
        self.emit([self.conn.tmf_response(req, response)])


class ByteBudget:
    """Bytes that commands may hold at once; a command waits for its share (FIFO)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._lot = trio.lowlevel.ParkingLot()

    def try_take(self, n: int) -> bool:
        if self.free < min(n, self.total):
            return False
        self.free -= min(n, self.total)
        return True

    async def take(self, n: int) -> None:
        n = min(n, self.total)
        while self.free < n:
            await self._lot.park()
        self.free -= n

    def give(self, n: int) -> None:
        self.free += min(n, self.total)
        self._lot.unpark_all()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        await self.take(n)
        try:
            yield
        finally:
            self.give(n)


async def compare_and_write(ex: Export, lock: trio.Lock, offset: int, verify: bytes, new: bytes,
                            fua: bool) -> int | None:
    """SBC-3 COMPARE AND WRITE at one place: under ``lock`` (every COMPARE AND WRITE of the
    volume there takes it), read, compare, and write only if all matched. The offset of the
    first byte that differs, or None when it wrote."""
    async with lock:
        have = await ex.read(offset, len(verify))
        bad = _first_difference(have, verify)
        if bad is None:
            await ex.write(offset, memoryview(new), fua)
        return bad


class _Aborted(Exception):
    pass


def _first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int | None:
    a, b = bytes(a), bytes(b)
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass
class StaticCatalog:
    """The same LUNs for every initiator (the unreplicated server below, and tests)."""

    luns: dict[int, Lu]

    def luns_for(self, initiator: str, address: str, target: str) -> dict[int, Lu]:
        return self.luns


def file_lu(path: str, lun_numbers: Callable[[], list[int]]) -> Lu:
    """An unreplicated LU on a file or block device: one target port group, active/optimized."""
    import hashlib

    from syncd.nbd.export import FileExport

    ex = FileExport(path, path)
    wwn = "naa.6" + "0002ac" + hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:25]
    groups = [scsi.PortGroup(1, scsi.Alua.ACTIVE_OPTIMIZED, 1, preferred=True)]
    return Lu(scsi.Unit(scsi.LuFacts(ex.size, wwn, reservations=True), lambda: groups, lun_numbers), ex,
              reservations=_REGISTRY)


_REGISTRY = pr.Registry()  # the unreplicated server's reservations: in memory, until it stops


def main(argv: list[str] | None = None) -> int:
    """Serve files unreplicated over iSCSI: ``python -m syncd.iscsi.server --port P --target
    IQN --lun 0=PATH``. For tests and as the benchmark's baseline; a storage node serves its
    replicated volumes itself."""
    import argparse

    from syncd.iscsi.login import Target as IscsiTarget

    ap = argparse.ArgumentParser(prog="python -m syncd.iscsi.server", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3260)
    ap.add_argument("--target", default="iqn.2026-12.org.syncd:single")
    ap.add_argument("--lun", action="append", required=True, help="N=PATH (repeatable)")
    ns = ap.parse_args(argv)
    luns: dict[int, Lu] = {}
    for spec in ns.lun:
        n, _, path = spec.partition("=")
        luns[int(n)] = file_lu(path, lambda: sorted(luns))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    portal = Portal({ns.target: IscsiTarget(ns.target)}, 1, lambda i, t: True)
    target = Target(portal, StaticCatalog(luns), lambda name: [c.Address(ns.host, ns.port, 1)])

    async def run() -> None:
        await target.serve([netio.listen_tcp((ns.host, ns.port))])

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
