"""Sites as network namespaces (pyroute2), joined by veth pairs that tests can cut.

Layout for sites A and B (suffix = a per-run tag so parallel runs never collide):

    root ns  --veth h-A/x-A 10.199.<n>.0/30--  ns A  --rep0 10.199.<n>.8/30--  ns B
                                              ns A  --rep1 10.199.<n>.12/30-  ns B
    root ns  --veth h-B/x-B 10.199.<n>.4/30--  ns B

The test process (root namespace) reaches each site's NBD port over its host veth; the two
replication paths are separate veth pairs, so cutting "the link" is taking them down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

from syncd.ctl import call
from syncd.lab import node_toml


class Rig:
    def __init__(self, root: Path, tag: str, n: int):
        self.root = root
        self.tag = tag
        self.net = f"10.199.{n}"
        self.ns = {s: f"syncd-{tag}-{s}" for s in ("A", "B")}
        self.procs: dict[str, subprocess.Popen] = {}
        self.addr = {
            "host": {"A": (f"{self.net}.1", f"{self.net}.2"), "B": (f"{self.net}.5", f"{self.net}.6")},
            "rep": [(f"{self.net}.9", f"{self.net}.10"), (f"{self.net}.13", f"{self.net}.14")],
        }

    # -- namespaces and links ------------------------------------------------------------------
    def build(self) -> None:
        for ns in self.ns.values():
            netns.create(ns)
        ipr = IPRoute()
        try:
            for site in ("A", "B"):
                h, x = f"h{self.tag}{site}", f"x{self.tag}{site}"
                ipr.link("add", ifname=h, kind="veth", peer=x)
                hidx = ipr.link_lookup(ifname=h)[0]
                xidx = ipr.link_lookup(ifname=x)[0]
                ipr.link("set", index=xidx, net_ns_fd=self.ns[site])
                ha, xa = self.addr["host"][site]
                ipr.addr("add", index=hidx, address=ha, prefixlen=30)
                ipr.link("set", index=hidx, state="up")
                with NetNS(self.ns[site]) as n:
                    i = n.link_lookup(ifname=x)[0]
                    n.addr("add", index=i, address=xa, prefixlen=30)
                    n.link("set", index=i, state="up")
                    lo = n.link_lookup(ifname="lo")[0]
                    n.link("set", index=lo, state="up")
            for i, (aa, ba) in enumerate(self.addr["rep"]):
                ea, eb = f"r{self.tag}{i}a", f"r{self.tag}{i}b"
                ipr.link("add", ifname=ea, kind="veth", peer=eb)
                ipr.link("set", index=ipr.link_lookup(ifname=ea)[0], net_ns_fd=self.ns["A"])
                ipr.link("set", index=ipr.link_lookup(ifname=eb)[0], net_ns_fd=self.ns["B"])
                for site, ifn, addr in (("A", ea, aa), ("B", eb, ba)):
                    with NetNS(self.ns[site]) as n:
                        idx = n.link_lookup(ifname=ifn)[0]
                        n.addr("add", index=idx, address=addr, prefixlen=30)
                        n.link("set", index=idx, state="up")
        finally:
            ipr.close()

    def set_path(self, i: int, up: bool) -> None:
        """Cut or restore replication path i (both ends, as when a fibre is cut)."""
        for site, ifn in (("A", f"r{self.tag}{i}a"), ("B", f"r{self.tag}{i}b")):
            with NetNS(self.ns[site]) as n:
                n.link("set", index=n.link_lookup(ifname=ifn)[0], state="up" if up else "down")

    def teardown(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in self.ns.values():
            try:
                netns.remove(ns)  # removing a namespace removes its veth ends too
            except OSError:
                pass

    # -- nodes ---------------------------------------------------------------------------------
    def start_nodes(self, size: int, link_opts: dict) -> None:
        nbd_port, rep_port = 10809, 7001
        for site, peer in (("A", "B"), ("B", "A")):
            d = self.root / site
            d.mkdir(parents=True, exist_ok=True)
            me = 0 if site == "A" else 1
            paths = [(rep_port, rep_port) for _ in self.addr["rep"]]
            toml = node_toml(site, peer, d, nbd_port, paths, [("vv1", d / "vv1.img", size)], link_opts)
            # node_toml writes loopback addresses: put each site's own addresses in instead.
            toml = toml.replace('listen = ["127.0.0.1:', f'listen = ["{self.addr["host"][site][1]}:')
            lines = []
            i = 0
            for line in toml.splitlines():
                if line.strip().startswith("{ local ="):
                    mine, theirs = self.addr["rep"][i][me], self.addr["rep"][i][1 - me]
                    line = f'  {{ local = "{mine}:{rep_port}", peer = "{theirs}:{rep_port}" }},'
                    i += 1
                lines.append(line)
            cfg = d / "node.toml"
            cfg.write_text("\n".join(lines) + "\n")
            log = open(self.root / f"{site}.log", "ab")
            self.procs[site] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[site], sys.executable, "-m", "syncd", "node", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(self.root),
            )
        for site in ("A", "B"):
            self.wait_admin(site)

    def export_to_site_hosts(self, group: str = "rcg1", volumes=("vv1",)) -> None:
        """Non-uniform hosts: host-a (the root namespace's address on site A's veth) is defined
        on array A only, host-b on array B only; proximity all."""
        for site in ("A", "B"):
            h = f"host-{site.lower()}"
            call(self.admin(site), "createhost", {"name": h, "addresses": [self.addr["host"][site][0]]})
            for lun, v in enumerate(volumes):
                call(self.admin(site), "createvlun", {"volume": v, "host": h, "lun": lun})
            call(self.admin(site), "admitrcopyhost", {"host": h, "group": group, "proximity": "all"})

    def admin(self, site: str) -> str:
        return str(self.root / site / "admin.sock")

    def wait_admin(self, site: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(self.admin(site)):
                try:
                    call(self.admin(site), "showrcopy", timeout=3)
                    return
                except Exception:
                    pass
            if self.procs[site].poll() is not None:
                raise RuntimeError(f"node {site} exited: {(self.root / f'{site}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"node {site} did not come up")

    def uri(self, site: str) -> str:
        return f"nbd://{self.addr['host'][site][1]}:10809/vv1"

    def image(self, site: str) -> str:
        return str(self.root / site / "vv1.img")
