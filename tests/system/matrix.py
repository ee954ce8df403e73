"""The failure-matrix rig: five network namespaces joined by veth links (pyroute2).

    hA --sanA-- A ==rep0/rep1== B --sanB-- hB        uniform only: hA --xA-- B, hB --xB-- A
                |               |
               witA           witB
                 `----- W -----'

A and B run storage nodes on loop devices, W runs the quorum witness, hA and hB run one host
each: a verifying write workload that also samples the ALUA state it is shown. The witness is
the built-in ``syncd witness`` process or (``backend="etcd"``) a three-member etcd cluster in W
(syncd.lab.etcd): then every member is reached over witA and witB, so cutting witA cuts A off
from the whole cluster, and stopping W stops every member.

* non-uniform (Active Sync): each host reaches only its local array (proximity all) and the
  workload connects to it directly;
* uniform (Active Peer Persistence): each host also reaches the other array (links xA, xB) and
  runs the host shim (``syncd host``) in its namespace with one path to each array; the
  workload writes through the shim's unix socket. Proximity follows the site: host a is near
  the natural primary A ("primary"), host b near B ("secondary"), so each host's local paths
  are active/optimized and the remote ones active/non-optimized.

Every fault of the seed's lists is made real: processes killed or shut down, veths taken down,
loop devices failed.

Several rigs may run at once, one per thread (test_matrix runs its rows in lanes): each has
its own namespaces, addresses, loop devices and directory.
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

from syncd.config import LinkConfig
from syncd.ctl import CtlError, call, wait_synced
from syncd.lab import etcd as lab_etcd
from syncd.lab.faults import drop_loop, fail_disk, heal_disk, make_loop
from syncd.lab.rig import (
    etcd_witness_settings,
    link_timings,
    node_toml,
    record_knows_in_sync,
    saw_key_move,
    with_link_key,
    witness_record,
)
from syncd.lab.workload import load_history

KEY = "matrix-witness-key-0123456789abcdef"
ETCD_PREFIX = "/syncd/rcg1"  # the pair's records in etcd (backend etcd)
NBD_PORT, REP_PORT, WIT_PORT = 10809, 7001, 7100
ALUA_SHORT = {0: "AO", 1: "ANO", 2: "S", 3: "U", 15: "T", None: "-"}
SHIM_SHORT = {"active/optimized": "AO", "active/non-optimized": "ANO", "transitioning": "T",
              "unavailable": "U", "standby": "S", "unreachable": "-"}
_losetup = threading.Lock()  # `losetup --find` run at once by two rigs may pick the same device


class Matrix:
    def __init__(self, root: Path, tag: str, n: int, link_opts: dict, witness: dict, size: int = 16 << 20,
                 topology: str = "non-uniform", backend: str = "builtin", rate: float = 0.0):
        self.root = root
        self.topology = topology
        self.backend = backend
        self.rate = rate  # each host's writes per second (0: as fast as they complete)
        self.etcd: dict | None = None  # the cluster's description (backend etcd)
        self.tag = tag
        self.net = f"10.{201 + n // 250}.{n % 250}"
        self.ns = {s: f"sm{tag}{s}" for s in ("A", "B", "W", "hA", "hB")}
        self.link_opts = with_link_key(link_opts)
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
        if topology == "uniform":
            self.links["xA"] = ("hA", f"{net}.25", "B", f"{net}.26")
            self.links["xB"] = ("hB", f"{net}.29", "A", f"{net}.30")
        self.procs: dict[str, subprocess.Popen] = {}
        self.loops: dict[str, str] = {}
        self.samples: list[tuple] = []  # (t, site, role, epoch, serving) from the admin sockets
        self.paths: dict[str, list] = {"A": [], "B": []}  # per host: (t, ((array, ALUA, epoch), ...)) at each change
        self._sampling = False
        self.note = ""  # what a fault saw as it struck, for the row's report

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
        if self.etcd is not None:
            lab_etcd.stop_cluster(str(self.root))
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
        if self.backend == "etcd":
            if self.etcd is None:
                self.etcd = lab_etcd.start_cluster(str(self.root), netns=self.ns["W"])
            else:
                for i in range(1, len(self.etcd["members"]) + 1):
                    lab_etcd.restart_member(str(self.root), i)
            return
        d = self.root / "W"
        d.mkdir(exist_ok=True)
        cfg = d / "witness.toml"
        w = self.witness
        cfg.write_text(
            '[witness]\nname = "W"\n'
            f'listen = ["{self.links["witA"][3]}:{WIT_PORT}", "{self.links["witB"][3]}:{WIT_PORT}"]\n'
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
            with _losetup:
                self.loops[site] = make_loop(str(d / "vv1.img"), self.size)
        peer = "B" if site == "A" else "A"
        w = self.witness
        wit = {"address": f"{self.links['wit' + site][3]}:{WIT_PORT}", "key": KEY, "interval": w["interval"],
               "owner_lease": w["owner_lease"], "grace": w["grace"]}
        if self.etcd is not None:
            # Every member, at W's address on this array's witness link.
            wit = etcd_witness_settings(
                w, [f"http://{self.links['wit' + site][3]}:{m['port']}" for m in self.etcd["members"]], ETCD_PREFIX)
        toml = node_toml(site, peer, d, NBD_PORT, [(REP_PORT, REP_PORT)] * 2, [("vv1", Path(self.loops[site]), None)],
                         self.link_opts, wit)
        listen = [f'"{a}:{NBD_PORT}"' for a in self.host_ports(site).values()]
        toml = toml.replace(f'listen = ["127.0.0.1:{NBD_PORT}"]', f'listen = [{", ".join(listen)}]')
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

    def host_ports(self, array: str) -> dict[str, str]:
        """{host site: the array's address on the link to that host}."""
        out = {}
        for n1, _, n2, a2 in self.links.values():
            if n2 == array and n1.startswith("h"):
                out[n1[1:]] = a2
        return out

    def host_addresses(self, site: str) -> list[str]:
        return [a1 for n1, a1, _, _ in self.links.values() if n1 == f"h{site}"]

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
        if name == "W" and self.etcd is not None:
            lab_etcd.stop_cluster(str(self.root))  # every member
            return
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
        for array in ("A", "B"):
            for site in self.host_ports(array):
                h = f"host{site.lower()}"
                prox = "all" if self.topology != "uniform" else ("primary" if site == "A" else "secondary")
                call(self.admin(array), "createhost", {"name": h, "addresses": self.host_addresses(site)})
                call(self.admin(array), "createvlun", {"volume": "vv1", "host": h, "lun": 0})
                call(self.admin(array), "admitrcopyhost", {"host": h, "group": "rcg1", "proximity": prox})
        wait_synced(a, "rcg1", 60, None)
        self.wait(lambda: all(self.group(s)["serving"] and self.witness_ok(s) for s in ("A", "B")), 20, "both serving")
        self.wait(self.witness_knows_in_sync, 20, "the witness to hear from A that B is in sync")
        if self.etcd is not None:  # B takes over in time only once it has seen A's key move
            self.wait(lambda: saw_key_move(self.admin("B"), "A"), 20, "B to see A's key in etcd move")

    # -- hosts ---------------------------------------------------------------------------------
    def shim_config(self, site: str) -> Path:
        """The host shim of host ``site``: one path to each array it is cabled to."""
        d = self.root / f"s{site}"
        d.mkdir(exist_ok=True)
        cfg = d / "host.toml"
        arrays = [(array, self.host_ports(array)[site]) for array in ("A", "B") if site in self.host_ports(array)]
        # Re-issued writes' ranges are quarantined as long as an array may still apply the lost copy.
        lk = self.link_opts
        bound = LinkConfig("B", (), **link_timings(lk)).max_request_hold() + 0.1
        cfg.write_text(
            f'[host]\nname = "host{site.lower()}"\nsocket = "{d / "nbd.sock"}"\nadmin_socket = "{d / "admin.sock"}"\n'
            f'poll_interval = 0.2\nstale_write_bound = {bound:.1f}\nio_timeout = {bound:.1f}\n'
            + "".join(f'\n[[array]]\nname = "{a}"\npaths = ["nbd://{addr}:{NBD_PORT}"]\n' for a, addr in arrays))
        return cfg

    def start_shim(self, site: str) -> None:
        from syncd.host import host_status

        self._spawn(f"s{site}", f"h{site}", ["-m", "syncd", "host", "--config", str(self.shim_config(site))])
        admin = str(self.root / f"s{site}" / "admin.sock")

        def ready():
            st = host_status(admin)["volumes"]
            return st and all(p["alua"] in ("active/optimized", "active/non-optimized") for p in st[0]["paths"])
        self.wait(ready, 20, f"host shim {site} with every path usable")

    def start_host(self, site: str, duration: float = 600) -> None:
        """The workload of host ``site`` (through its shim when uniform)."""
        writer, first = (1, 0) if site == "A" else (2, 1024)
        if self.topology == "uniform":
            if f"s{site}" not in self.procs or self.procs[f"s{site}"].poll() is not None:
                self.start_shim(site)
            target = ["nbd+unix:///vv1?socket=" + str(self.root / f"s{site}" / "nbd.sock")]
        else:
            target = [f"nbd://{self.links['san' + site][3]}:{NBD_PORT}/vv1", "--source", self.links["san" + site][1]]
        self._spawn(f"h{site}", f"h{site}", [
            "-m", "syncd.lab.workload", *target,
            "--writer", str(writer), "--blocks", f"{first}:1024", "--qd", "4", "--duration", str(duration),
            "--rate", str(self.rate), "--ready", str(self.root / f"h{site}.ready"),
            "--alua-interval", "0.1", "--out", str(self.root / f"h{site}.json"),
        ])

    def wait_hosts(self, timeout: float = 30) -> None:
        """Until every started host has an acknowledged write and a path state sampled."""
        for s in ("A", "B"):
            if f"h{s}" in self.procs:
                ready = self.root / f"h{s}.ready"
                self.wait(ready.exists, timeout, f"host {s} writing and sampling")

    def fail_host(self, site: str) -> None:
        """The host (server) dies: its workload and its shim."""
        self.stop(f"h{site}", signal.SIGTERM)
        if f"s{site}" in self.procs:
            self.stop(f"s{site}")

    def stop_host(self, site: str):
        self.stop(f"h{site}", signal.SIGTERM)
        if f"s{site}" in self.procs:
            self.stop(f"s{site}", signal.SIGTERM)
        return load_history(str(self.root / f"h{site}.json"))

    # -- observation ---------------------------------------------------------------------------
    def group(self, site: str) -> dict:
        return call(self.admin(site), "showrcopy", {"group": "rcg1"}, timeout=5)["groups"][0]

    def witness_knows_in_sync(self) -> bool:
        """The witness's record (the built-in witness's state file, or the group's key in etcd,
        asked in W's namespace where etcd listens) holds A's word, at A's epoch, that B is in sync."""
        a = self.group("A")
        if a["role"] != "primary":
            return False
        rec = (witness_record(self.root / "W" / "state", "rcg1") if self.etcd is None
               else lab_etcd.cluster_record(lab_etcd.load(str(self.root)), ETCD_PREFIX, "rcg1"))
        return record_knows_in_sync(rec, "A", a["epoch"])

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

        from syncd.host import host_status

        def loop():
            while self._sampling:
                for s in ("A", "B"):
                    try:
                        g = call(self.admin(s), "showrcopy", {"group": "rcg1"}, timeout=1)["groups"][0]
                        self.samples.append((time.monotonic(), s, g["role"], g["epoch"], g["serving"]))
                    except (CtlError, OSError, KeyError, IndexError, json.JSONDecodeError):
                        pass
                    if self.topology == "uniform":
                        try:
                            st = host_status(str(self.root / f"s{s}" / "admin.sock"))["volumes"][0]["paths"]
                            states = tuple((p["array"], SHIM_SHORT.get(p["alua"], p["alua"]), p["epoch"]) for p in st)
                        except (OSError, KeyError, IndexError, json.JSONDecodeError):
                            states = None
                        if not self.paths[s] or self.paths[s][-1][1] != states:
                            self.paths[s].append((time.monotonic(), states))
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
    def etcd_leader(self) -> int:
        return lab_etcd.leader(lab_etcd.load(str(self.root)))

    def fail_etcd_member(self, which: int) -> None:
        lab_etcd.fail_member(str(self.root), which)

    def fail_etcd_quorum(self) -> None:
        lab_etcd.fail_quorum(str(self.root))

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


def path_timeline(paths: list, t0: float) -> list[tuple[float, str]]:
    """A shim's path states over time: [(seconds after t0, "A:AO@1 B:ANO@1")]."""
    return [(round(t - t0, 2), "shim down" if st is None else " ".join(f"{a}:{x}@{e}" for a, x, e in st))
            for t, st in paths]
