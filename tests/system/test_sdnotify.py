"""Each daemon under systemd's notification protocol, emulated by the test: it binds the
datagram socket ``$NOTIFY_SOCKET`` names (a path, and an abstract ``@name``), sets
``$WATCHDOG_USEC``, and checks READY=1 comes once the ports listen (and not when start-up
fails), WATCHDOG=1 after it, STOPPING=1 at SIGTERM. Each daemon runs under its shipped unit's
system call filter and MemoryDenyWriteExecute (``tests/sandbox_run.py``), as systemd runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from syncd.lab.rig import free_port

pytestmark = pytest.mark.system
TESTS = Path(__file__).resolve().parents[1]
UNITS = {"node": "syncd-node@.service", "witness": "syncd-witness.service", "host": "syncd-host@.service"}
KEY = "0123456789abcdef-test-key"


class Manager:
    """The service manager's end: a datagram socket and the messages it received, in order."""

    def __init__(self, tmp: Path, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"syncd-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:
            self.env = str(tmp / "notify.sock")
            self.sock.bind(self.env)
        self.sock.settimeout(60)  # a guard against a hang; nothing here waits for a time
        self.got: list[dict[str, str]] = []

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        msg = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.got.append(msg)
        return msg

    def until(self, key: str) -> dict[str, str]:
        while True:
            m = self.next()
            if key in m:
                return m

    def close(self):
        self.sock.close()


def start(args: list[str], mgr: Manager, log: Path, watchdog_usec: int = 200_000) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": mgr.env, "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    unit = TESTS.parent / "systemd" / UNITS[args[0]]
    return subprocess.Popen(["/usr/bin/python3", str(TESTS / "sandbox_run.py"), str(unit), "--", sys.executable,
                             "-m", "syncd", *args], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


def node_config(d: Path, port: int, volume: str | None = None) -> Path:
    """A node with one volume: a 4 MiB file it creates, or the existing ``volume``."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "node.toml"
    vol = f'path = "{volume}"' if volume else f'path = "{d / "vv1.img"}"\nsize = "4MiB"'
    cfg.write_text(f'[node]\nname = "A"\ndata_dir = "data"\nadmin_socket = "admin.sock"\n'
                   f'[nbd]\nlisten = ["127.0.0.1:{port}"]\n[[volume]]\nname = "vv1"\n{vol}\n')
    return cfg


def ready_watchdog_stopping(p: subprocess.Popen, mgr: Manager, port: int, log: Path, what: str) -> None:
    first = mgr.next()
    assert "READY" not in first and "starting" in first.get("STATUS", ""), mgr.got
    ready = mgr.until("READY")
    assert ready["READY"] == "1" and what in ready["STATUS"], mgr.got
    assert listening(port), "READY=1 before the port listens"
    assert mgr.until("WATCHDOG")["WATCHDOG"] == "1"
    assert [i for i, m in enumerate(mgr.got) if "READY" in m] == [1], mgr.got  # once, before the watchdog
    p.send_signal(signal.SIGTERM)
    stop = mgr.until("STOPPING")
    assert stop["STOPPING"] == "1"
    assert p.wait(60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_node_sends_ready_when_it_serves_then_watchdog_and_stopping(tmp_path, abstract):
    mgr = Manager(tmp_path, abstract)
    port = free_port()
    log = tmp_path / "node.log"
    p = start(["node", "--config", str(node_config(tmp_path / "A", port))], mgr, log)
    try:
        ready_watchdog_stopping(p, mgr, port, log, "node A: 1 volumes")
    finally:
        p.kill()
        p.wait()
        mgr.close()
    # The variables are the daemon's only: its children (hooks, helpers) do not inherit them.
    assert "NOTIFY_SOCKET" not in os.environ


def test_witness_sends_ready_watchdog_stopping(tmp_path):
    mgr = Manager(tmp_path, abstract=True)
    port = free_port()
    cfg = tmp_path / "witness.toml"
    cfg.write_text(f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "state"\nkey = "{KEY}"\n'
                   'nodes = ["A", "B"]\n')
    log = tmp_path / "w.log"
    p = start(["witness", "--config", str(cfg)], mgr, log)
    try:
        ready_watchdog_stopping(p, mgr, port, log, "witness W")
    finally:
        p.kill()
        p.wait()
        mgr.close()


def test_host_shim_sends_ready_watchdog_stopping(tmp_path):
    """The shim in front of a real node (itself started under the protocol: its READY says
    when the shim may be started)."""
    nmgr = Manager(tmp_path, abstract=True)
    nport = free_port()
    node = start(["node", "--config", str(node_config(tmp_path / "A", nport))], nmgr, tmp_path / "node.log")
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    mgr = Manager(shim_dir, abstract=False)
    tport = free_port()
    cfg = shim_dir / "host.toml"
    cfg.write_text(f'[host]\nname = "h1"\nsocket = "nbd.sock"\nadmin_socket = "admin.sock"\n'
                   f'tcp = "127.0.0.1:{tport}"\ntcp_exports = ["*"]\n'
                   f'[[array]]\nname = "A"\npaths = ["nbd://127.0.0.1:{nport}"]\n')
    log = shim_dir / "shim.log"
    try:
        assert nmgr.until("READY")["READY"] == "1"
        from syncd.ctl import call

        admin = str(tmp_path / "A" / "admin.sock")
        call(admin, "createhost", {"name": "h1", "addresses": ["127.0.0.1"]})
        call(admin, "createvlun", {"volume": "vv1", "host": "h1", "lun": 0})
        p = start(["host", "--config", str(cfg)], mgr, log)
        try:
            ready_watchdog_stopping(p, mgr, tport, log, "host shim h1: 1 volumes, 1 paths")
        finally:
            p.kill()
            p.wait()
    finally:
        node.terminate()
        node.wait(60)
        nmgr.close()
        mgr.close()


@pytest.mark.parametrize("case", ["node-missing-volume", "node-port-in-use", "witness-bad-state-dir",
                                  "shim-no-array"])
def test_no_ready_when_start_up_fails(tmp_path, case):
    mgr = Manager(tmp_path, abstract=True)
    port = free_port()
    holder = None
    if case == "node-missing-volume":
        args = ["node", "--config", str(node_config(tmp_path / "A", port, volume="/dev/syncd-no-such-disk"))]
        why = "/dev/syncd-no-such-disk"
    elif case == "node-port-in-use":
        holder = socket.socket()
        holder.bind(("127.0.0.1", port))
        holder.listen()
        args = ["node", "--config", str(node_config(tmp_path / "A", port))]
        why = "in use"
    elif case == "witness-bad-state-dir":
        (tmp_path / "file").write_text("not a directory")
        cfg = tmp_path / "witness.toml"
        cfg.write_text(f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "file/state"\n'
                       f'key = "{KEY}"\nnodes = ["A", "B"]\n')
        args = ["witness", "--config", str(cfg)]
        why = "file/state"
    else:
        cfg = tmp_path / "host.toml"
        cfg.write_text(f'[host]\nname = "h1"\nsocket = "nbd.sock"\nadmin_socket = "admin.sock"\n'
                       f'[[array]]\nname = "A"\npaths = ["nbd://127.0.0.1:{port}"]\n')
        args = ["host", "--config", str(cfg)]
        why = "no array exports any volume"
    log = tmp_path / "d.log"
    p = start(args, mgr, log)
    try:
        assert p.wait(60) == 2, log.read_text()
    finally:
        p.kill()
        p.wait()
        if holder is not None:
            holder.close()
    text = log.read_text()
    assert "Traceback" not in text and why in text, text
    mgr.sock.settimeout(0)
    try:
        while True:
            mgr.next()
    except BlockingIOError:
        pass
    mgr.close()
    assert mgr.got and not any("READY" in m for m in mgr.got), mgr.got
    assert "failed to start" in mgr.got[-1]["STATUS"] and why in mgr.got[-1]["STATUS"], mgr.got
