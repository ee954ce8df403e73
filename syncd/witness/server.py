"""The quorum witness daemon: authenticates arrays, decides, and persists before it answers."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import netio
from ..config import ConfigError, check_name, load_toml, parse_addr
from ..files import atomic_write, lock_dir
from . import proto as w
from .decide import (
    Decision,
    GroupRecord,
    Timing,
    WitnessError,
    claim,
    handover,
    keep,
    report,
    resolve,
)

log = logging.getLogger("syncd.witness")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class WitnessConfig:
    name: str
    listen: tuple[tuple[str, int], ...]
    state_dir: str
    key: bytes
    nodes: tuple[str, ...]
    timing: Timing


def load_witness_config(path: str) -> WitnessConfig:
    p = Path(path)
    raw = load_toml(p)
    try:
        wt = raw.get("witness")
        if not isinstance(wt, dict):
            raise ConfigError("[witness] section missing")
        extra = set(wt) - {"name", "listen", "state_dir", "key", "key_file", "nodes",
                           "owner_lease", "drift", "margin", "grace"}
        if extra:
            raise ConfigError(f"witness: unknown key(s) {', '.join(sorted(extra))}")
        name = check_name(wt.get("name", "W"), "witness.name")
        listen = tuple(parse_addr(a, f"witness.listen[{i}]") for i, a in enumerate(wt.get("listen", ["0.0.0.0:7400"])))
        if "state_dir" not in wt:
            raise ConfigError("witness.state_dir: missing")
        state_dir = str((p.parent / wt["state_dir"]).resolve())
        if "key" in wt:
            key = str(wt["key"]).encode()
        elif "key_file" in wt:
            key = (p.parent / wt["key_file"]).read_bytes().strip()
        else:
            raise ConfigError("witness.key or witness.key_file: the shared key is required")
        if len(key) < 16:
            raise ConfigError("witness.key: use at least 16 bytes")
        nodes = wt.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise ConfigError("witness.nodes: list the array names admitted, e.g. [\"A\", \"B\"]")
        nodes = tuple(check_name(n, "witness.nodes") for n in nodes)
        d = Timing()
        kw = {}
        for k in ("owner_lease", "drift", "margin", "grace"):
            v = wt.get(k, getattr(d, k))
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"witness.{k}: expected a non-negative number, got {v!r}")
            kw[k] = float(v)
        return WitnessConfig(name, listen, state_dir, key, nodes, Timing(**kw))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


class WitnessState:
    """Group records on disk: atomic replace + fsync; a record is saved before it is answered."""

    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.path = os.path.join(state_dir, "witness.json")
        self._lock = lock_dir(state_dir)
        if self._lock is None:
            raise ConfigError(f"witness state directory {state_dir} is in use by another witness")
        self.groups: dict[str, GroupRecord] = {}
        if os.path.exists(self.path):
            try:
                d = json.loads(Path(self.path).read_text())
                if d.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format version {d.get('version')}, expected {FORMAT_VERSION}")
                self.groups = {k: GroupRecord.restore(v) for k, v in d["groups"].items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{self.path} cannot be trusted ({e}); refusing to start") from None

    def save(self) -> None:
        data = json.dumps({"version": FORMAT_VERSION, "saved": time.time(),
                           "groups": {k: g.persistent() for k, g in self.groups.items()}}, indent=1)
        atomic_write(self.path, data.encode())


class Witness:
    def __init__(self, cfg: WitnessConfig):
        self.cfg = cfg
        self.state = WitnessState(cfg.state_dir)
        self.ports: list[int] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        socks = [netio.listen_tcp(a) for a in self.cfg.listen]
        self.ports = [s.getsockname()[1] for s in socks]
        async with trio.open_nursery() as n:
            for s in socks:
                n.start_soon(self._accept_loop, s, n)
            log.info("witness %s listening on %s", self.cfg.name, self.ports)
            task_status.started(self.ports)

    async def _accept_loop(self, lsock, nursery) -> None:
        while True:
            sock, addr = await netio.accept(lsock)
            nursery.start_soon(self._conn, sock, addr)

    async def _conn(self, sock, addr) -> None:
        dec = w.WDecoder()
        node = None
        try:
            nonce = secrets.token_bytes(w.NONCE_SIZE)
            await netio.sendall(sock, w.encode(w.WType.CHALLENGE, nonce=nonce))
            with trio.fail_after(10):
                hello = await self._next(sock, dec)
            if hello.type != w.WType.HELLO:
                raise w.WitnessProtocolError(f"expected HELLO, got {hello.type.name}")
            if hello.node not in self.cfg.nodes:
                await self._bye(sock, f"unknown array {hello.node!r}")
                return
            if not w.verify_hello(self.cfg.key, nonce, hello.node, hello.tag):
                await self._bye(sock, f"authentication failed for {hello.node!r}")
                log.warning("witness: authentication failed for %r from %s", hello.node, addr)
                return
            node = hello.node
            await netio.sendall(sock, w.encode(
                w.WType.WELCOME, witness=self.cfg.name, tag=w.welcome_tag(self.cfg.key, hello.nonce, self.cfg.name)))
            while True:
                f = await self._next(sock, dec)
                await netio.sendall(sock, self._handle(node, f))
        except (w.WitnessProtocolError, OSError, trio.TooSlowError, EOFError) as e:
            if not isinstance(e, EOFError):
                log.info("witness: connection from %s (%s) closed: %s", addr, node or "?", e)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _next(self, sock, dec: w.WDecoder) -> w.WFrame:
        while (f := dec.next_frame()) is None:
            data = await netio.recv(sock, 65536)
            if not data:
                raise EOFError
            dec.receive_data(data)
        return f

    async def _bye(self, sock, reason: str) -> None:
        await netio.sendall(sock, w.encode(w.WType.GOODBYE, reason=reason))

    def _handle(self, node: str, f: w.WFrame) -> bytes:
        t = f.type
        st = self.state
        now = trio.current_time()
        try:
            if t == w.WType.REGISTER:
                members = (f.member1, f.member2)
                if node not in members or f.owner not in members or f.member1 == f.member2:
                    raise WitnessError(f"bad registration of {f.group}: members {members}, owner {f.owner}")
                rec = st.groups.get(f.group)
                if rec is None:
                    rec = GroupRecord(f.group, members, f.owner, f.epoch, last_decision=f"registered by {node}")
                    st.groups[f.group] = rec
                    st.save()
                d = Decision(True, rec.owner, rec.epoch, rec.last_decision)
            elif t in (w.WType.REPORT, w.WType.CLAIM, w.WType.KEEP, w.WType.HANDOVER, w.WType.RESOLVE):
                rec = st.groups.get(f.group)
                if rec is None:
                    raise WitnessError(f"unknown group {f.group!r}: register it first")
                before = rec.persistent()
                if t == w.WType.REPORT:
                    d = report(rec, self.cfg.timing, now, node, f.epoch,
                               peer_alive=bool(f.flags & w.REPORT_PEER_ALIVE),
                               peer_in_sync=bool(f.flags & w.REPORT_PEER_IN_SYNC))
                elif t == w.WType.CLAIM:
                    d = claim(rec, self.cfg.timing, now, node, f.epoch)
                elif t == w.WType.KEEP:
                    d = keep(rec, self.cfg.timing, now, node, f.epoch)
                elif t == w.WType.HANDOVER:
                    d = handover(rec, self.cfg.timing, now, node, f.epoch)
                else:
                    d = resolve(rec, self.cfg.timing, now, node, f.epoch)
                if rec.persistent() != before:
                    st.save()  # durable before anyone hears of it
                    log.info("witness: group %s: %s", rec.name, rec.last_decision)
            else:
                raise WitnessError(f"{t.name} is not a request")
        except WitnessError as e:
            return w.encode(w.WType.ERROR, f.req_id, reason=str(e))
        return w.encode(w.WType.DECISION, f.req_id, granted=d.granted, owner=d.owner, epoch=d.epoch, reason=d.reason)


def serve_witness(cfg: WitnessConfig) -> int:
    from ..daemon import run_until_signal

    return run_until_signal(lambda: Witness(cfg), f"witness {cfg.name}", (ConfigError,))
