"""The failure-matrix rig: five network namespaces joined by veth links (pyroute2).

    hA --san-- A ==rep0/rep1== B --san-- hB
               \\             /
                wit-A   wit-B
                   \\       /
                      W

A and B run storage nodes on loop devices, W runs the quorum witness, hA and hB run one host
each: a verifying write workload that also samples the ALUA state its array presents (non-uniform
Active Sync connectivity: each host reaches only its local array, proximity all). Every fault of
the seed's list is made real: processes killed or shut down, veths taken down, loop devices failed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

from syncd.ctl import CtlError, call, wait_synced
from syncd.faults import drop_loop, fail_disk, heal_disk, make_loop
from syncd.lab import node_toml
from syncd.workload import load_history

KEY = "matrix-witness-key-0123456789abcdef"
NBD_PORT, REP_PORT, WIT_PORT = 10809, 7001, 7100
ALUA_SHORT = {0: "AO", 1: "ANO", 2: "S", 3: "U", 15: "T", None: "-"}


class Matrix:
    def __init__(self, root: Path, tag: str, n: int, link_opts: dict, witness: dict, size: int = 16 << 20):
        self.root = root
        self.tag = tag
        self.net = f"10.{201 + n // 250}.{n % 250}"
        self.ns = {s: f"sm{tag}{s}" for s in ("A", "B", "W", "hA", "hB")}
        self.link_opts = link_opts
        self.witness = witness
        self.size = size
        net = self.net
        # link name -> (ns1, addr1, ns2, addr2)
        self.links = {
            "sanA": ("hA", f"{net}.1", "A", f"{net}.2"),
            "sanB": ("hB", f"{net}.5", "B", f"{net}.6"),
            "rep0": ("A", f"{net}.9", "B", f"{net}.10"),
            "rep1": ("A", f"{net}.13", "B", f"{net}.14"),
            "witA": ("A", f"{net}.17", "W", f"{net}.18"),
            "witB": ("B", f"{net}.21", "W", f"{net}.22"),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.loops: dict[str, str] = {}
        self.samples: list[tuple] = []  # (t, site, role, epoch, serving) from the admin sockets
        self._sampling = False

    # -- network -------------------------------------------------------------------------------
    def _ifn(self, link: str, end: int) -> str:
        return f"v{self.tag}{link}{end}"[:15]

    def build(self) -> None:
        for ns in self.ns.values():
            netns.create(ns)
            with NetNS(ns) as n:
                n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
        ipr = IPRoute()
        try:
            for link, (n1, a1, n2, a2) in self.links.items():
                e1, e2 = self._ifn(link, 1), self._ifn(link, 2)
                ipr.link("add", ifname=e1, kind="veth", peer=e2)
                for ifn, site, addr in ((e1, n1, a1), (e2, n2, a2)):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifn)[0], net_ns_fd=self.ns[site])
                    with NetNS(self.ns[site]) as n:
                        i = n.link_lookup(ifname=ifn)[0]
                        n.addr("add", index=i, address=addr, prefixlen=30)
                        n.link("set", index=i, state="up")
        finally:
            ipr.close()

    def set_link(self, link: str, up: bool) -> None:
        """Both ends down (a cut fibre) or up again."""
        n1, _, n2, _ = self.links[link]
        for site, end in ((n1, 1), (n2, 2)):
            with NetNS(self.ns[site]) as n:
                n.link("set", index=n.link_lookup(ifname=self._ifn(link, end))[0], state="up" if up else "down")

    def teardown(self) -> None:
        self._sampling = False
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for dev in self.loops.values():
            drop_loop(dev)
        for ns in self.ns.values():
            try:
                netns.remove(ns)
            except OSError:
                pass

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, ns: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[ns], sys.executable, *args],
                             stdout=log, stderr=subprocess.STDOUT, cwd=str(self.root))
        log.close()
        self.procs[name] = p
        return p

    def start_witness(self) -> None:
        d = self.root / "W"
        d.mkdir(exist_ok=True)
        cfg = d / "witness.toml"
        w = self.witness
        cfg.write_text(
            f'[witness]\nname = "W"\nlisten = ["{self.links["witA"][3]}:{WIT_PORT}", "{self.links["witB"][3]}:{WIT_PORT}"]\n'
            f'state_dir = "state"\nkey = "{KEY}"\nnodes = ["A", "B"]\n'
            f'owner_lease = {w["owner_lease"]}\ngrace = {w["grace"]}\nmargin = {w["margin"]}\n'
        )
        self._spawn("W", "W", ["-m", "syncd", "witness", "--config", str(cfg)])

    def node_config(self, site: str) -> Path:
        d = self.root / site
        d.mkdir(exist_ok=True)
        cfg = d / "node.toml"
        if cfg.exists():
            return cfg
        if site not in self.loops:
            self.loops[site] = make_loop(str(d / "vv1.img"), self.size)
        peer = "B" if site == "A" else "A"
        w = self.witness
        wit = {"address": f"{self.links['wit' + site][3]}:{WIT_PORT}", "key": KEY, "interval": w["interval"],
               "owner_lease": w["owner_lease"], "grace": w["grace"]}
        toml = node_toml(site, peer, d, NBD_PORT, [(REP_PORT, REP_PORT)] * 2, [("vv1", Path(self.loops[site]), None)],
                         self.link_opts, wit)
        toml = toml.replace(f'listen = ["127.0.0.1:{NBD_PORT}"]', f'listen = ["{self.links["san" + site][3]}:{NBD_PORT}"]')
        lines, i = [], 0
        for line in toml.splitlines():
            if line.strip().startswith("{ local ="):
                n1, a1, n2, a2 = self.links[f"rep{i}"]
                mine, theirs = (a1, a2) if site == "A" else (a2, a1)
                line = f'  {{ local = "{mine}:{REP_PORT}", peer = "{theirs}:{REP_PORT}" }},'
                i += 1
            lines.append(line)
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start_node(self, site: str) -> None:
        self._spawn(site, site, ["-m", "syncd", "node", "--config", str(self.node_config(site))])
        self.wait_admin(site)

    def admin(self, site: str) -> str:
        return str(self.root / site / "admin.sock")

    def wait_admin(self, site: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                call(self.admin(site), "showrcopy", timeout=3)
                return
            except CtlError:
                pass
            if self.procs[site].poll() is not None:
                raise RuntimeError(f"node {site} exited:\n{(self.root / f'{site}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"node {site} did not come up")

    def stop(self, name: str, sig: int = signal.SIGKILL, timeout: float = 15) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def up(self) -> None:
        """Namespaces, witness, both arrays, group rcg1 with vv1 synced, hosts exported."""
        self.build()
        self.start_witness()
        for s in ("A", "B"):
            self.start_node(s)
        a = self.admin("A")
        deadline = time.monotonic() + 20
        while True:
            try:
                call(a, "creatercopygroup", {"group": "rcg1", "target": "B"})
                break
            except CtlError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        call(a, "admitrcopyvv", {"volume": "vv1", "group": "rcg1"})
        call(a, "startrcopygroup", {"group": "rcg1"})
        for site in ("A", "B"):
            h = f"host{site.lower()}"
            call(self.admin(site), "createhost", {"name": h, "addresses": [self.links["san" + site][1]]})
            call(self.admin(site), "createvlun", {"volume": "vv1", "host": h, "lun": 0})
            call(self.admin(site), "admitrcopyhost", {"host": h, "group": "rcg1", "proximity": "all"})
        wait_synced(a, "rcg1", 60, None)
        self.wait(lambda: all(self.group(s)["serving"] and self.witness_ok(s) for s in ("A", "B")), 20, "both serving")
        time.sleep(4 * self.witness["interval"])  # the witness has heard that B is in sync

    # -- hosts ---------------------------------------------------------------------------------
    def start_host(self, site: str, duration: float = 600) -> None:
        writer, first = (1, 0) if site == "A" else (2, 1024)
        self._spawn(f"h{site}", f"h{site}", [
            "-m", "syncd.workload", f"nbd://{self.links['san' + site][3]}:{NBD_PORT}/vv1",
            "--writer", str(writer), "--blocks", f"{first}:1024", "--qd", "4", "--duration", str(duration),
            "--source", self.links["san" + site][1], "--alua-interval", "0.1",
            "--out", str(self.root / f"h{site}.json"),
        ])

    def stop_host(self, site: str):
        self.stop(f"h{site}", signal.SIGTERM)
        return load_history(str(self.root / f"h{site}.json"))

    # -- observation ---------------------------------------------------------------------------
    def group(self, site: str) -> dict:
        return call(self.admin(site), "showrcopy", {"group": "rcg1"}, timeout=5)["groups"][0]

    def witness_ok(self, site: str) -> bool:
        w = call(self.admin(site), "showrcopy", timeout=5).get("witness")
        return bool(w and w["reachable"])

    def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                v = pred()
                if v:
                    return v
            except (CtlError, OSError, KeyError, IndexError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def start_sampling(self) -> None:
        """Poll both arrays' role/epoch/serving every 50 ms (for the split-brain check)."""
        self._sampling = True

        def loop():
            while self._sampling:
                for s in ("A", "B"):
                    try:
                        g = call(self.admin(s), "showrcopy", {"group": "rcg1"}, timeout=1)["groups"][0]
                        self.samples.append((time.monotonic(), s, g["role"], g["epoch"], g["serving"]))
                    except (CtlError, OSError, KeyError, IndexError, json.JSONDecodeError):
                        pass
                time.sleep(0.05)

        threading.Thread(target=loop, daemon=True).start()

    def stop_sampling(self) -> None:
        self._sampling = False

    def primaries_per_epoch(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for _, s, role, epoch, serving in self.samples:
            if role == "primary" and serving:
                out.setdefault(epoch, set()).add(s)
        return out

    # -- faults --------------------------------------------------------------------------------
    def fail_disk(self, site: str) -> None:
        fail_disk(self.loops[site])

    def heal_disk(self, site: str) -> None:
        heal_disk(self.loops[site])


def alua_transitions(samples: list, t0: float) -> list[tuple[float, str]]:
    """Compress ALUA samples into [(seconds after t0, state)] at each change."""
    out = []
    last = object()
    for t, st, _ in samples:
        name = ALUA_SHORT.get(st, str(st))
        if name != last:
            out.append((round(t - t0, 2), name))
            last = name
    return out


def pause_after(history, t0: float) -> float:
    """The longest stretch without an acknowledged write from ``t0`` to the end of the run."""
    ts = [t0] + sorted(x for x in history.acked_times if x >= t0) + [history.ended]
    return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)
