"""The local lab: two storage nodes on loopback, joined by a link relay that can cut the link,
each with file-backed volumes in one synchronously replicated group."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from ..config import parse_size
from ..ctl import CtlError, call, wait_synced
from .faults import pid_alive
from .ports import LabError, free_port

NODES = ("A", "B")
LAB_HOST = "lab"


def _spawn(args: list[str], log: Path) -> int:
    f = open(log, "ab")
    p = subprocess.Popen(
        args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        cwd=str(log.parent),
    )
    f.close()
    return p.pid


def _wait_socket(path: str, pid: int, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                call(path, "showrcopy", timeout=5)
                return
            except CtlError:
                pass
        if not pid_alive(pid):
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise LabError(f"process {pid} exited during start-up; its log ({log}) ends with:\n{tail}")
        time.sleep(0.05)
    raise LabError(f"{path} did not answer within {timeout:.0f}s (log: {log})")


def with_link_key(link_opts: dict | None) -> dict:
    """The lab's link settings, authenticated: unless they choose otherwise (a key, TLS files or
    ``insecure = true``), both nodes share a key made for this lab."""
    from ..config import SECURITY_KEYS

    opts = dict(link_opts or {})
    if not any(k in opts for k in SECURITY_KEYS):
        opts["key"] = secrets.token_hex(24)
    return opts


TLS_NAMES = {"A": ("A", "127.0.0.1", "localhost"), "B": ("B", "127.0.0.1", "localhost"),
             "W": ("W", "127.0.0.1", "localhost"), "ha": ("ha",), "hb": ("hb",), "client": ("client",)}
# The certificate names host "lab" answers to on both arrays (LUN masking by certificate).
LAB_CLIENT_NAMES = ["client"]
# The host shims of a lab with a topology are hosts of their own on the arrays, "ha" at site A and
# "hb" at site B, told apart by the address they connect from (and, with --tls, by their
# certificates). Uniform (the seed's Active Peer Persistence): proximity by site, so each host's
# paths to its local array are active/optimized and to the other array active/non-optimized (A is
# the natural primary). Non-uniform (Active Sync): proximity "all", and a host is an empty
# definition (no initiators) on the array it is not cabled to, as the seed describes.
HOST_SOURCES = {"A": "127.0.10.1", "B": "127.0.10.2"}
SITE_PROXIMITY = {"A": "primary", "B": "secondary"}


def make_lab_tls(d: Path) -> dict:
    """A test CA for this lab and a certificate for each daemon: nodes A and B (link and NBD
    server: their names and 127.0.0.1), the witness W, the host shims ha and hb, and a client
    certificate directory as libnbd and qemu take it (ca-cert.pem, client-cert.pem,
    client-key.pem). The CA's private key is never written: nothing else can be issued later."""
    try:
        import trustme
    except ImportError:
        raise LabError("syncd lab up --tls makes its CA with trustme: pip install 'syncd[lab]' "
                       "(./scripts/setup installs it)") from None
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca = trustme.CA(organization_name="syncd lab")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    out: dict = {"dir": str(d), "ca": str(d / "ca.pem"), "certs": {}}
    for who, names in TLS_NAMES.items():
        cert = ca.issue_cert(*names, common_name=names[0])
        if who == "client":
            cd = d / "client"
            cd.mkdir(exist_ok=True)
            ca.cert_pem.write_to_path(str(cd / "ca-cert.pem"))
            cert.cert_chain_pems[0].write_to_path(str(cd / "client-cert.pem"))
            cert.private_key_pem.write_to_path(str(cd / "client-key.pem"))
            out["client_dir"] = str(cd)
            continue
        cert.cert_chain_pems[0].write_to_path(str(d / f"{who}.pem"))
        cert.private_key_pem.write_to_path(str(d / f"{who}-key.pem"))
        out["certs"][who] = {"tls_certificate": str(d / f"{who}.pem"), "tls_key": str(d / f"{who}-key.pem"),
                             "tls_ca": str(d / "ca.pem")}
    for f in d.rglob("*-key.pem"):
        os.chmod(f, 0o600)
    return out


def link_timings(link_opts: dict) -> dict:
    """The settings of ``link_opts`` that a LinkConfig takes as they are (timings, limits)."""
    from ..config import SECURITY_KEYS, LinkConfig

    fields = set(LinkConfig.__dataclass_fields__) - {"peer", "paths", "security"}
    return {k: v for k, v in link_opts.items() if k in fields and k not in SECURITY_KEYS}


def node_toml(name: str, peer: str, d: Path, nbd_port: int, paths: list[tuple[int, int]],
              volumes: list[tuple[str, Path, int]], extra_link: dict | None = None,
              witness: dict | None = None, nbd: dict | None = None, metrics_port: int | None = None,
              intent: dict | None = None, iscsi: dict | None = None, boot_id_file: Path | None = None) -> str:
    lines = [
        "[node]",
        f'name = "{name}"',
        f'data_dir = "{d / "data"}"',
        f'admin_socket = "{d / "admin.sock"}"',
        *([f'boot_id_file = "{boot_id_file}"'] if boot_id_file is not None else []),
        "",
        "[nbd]",
        f'listen = ["127.0.0.1:{nbd_port}"]',
        *[f"{k} = {json.dumps(v)}" for k, v in (nbd or {}).items()],
        "",
        "[link]",
        f'peer = "{peer}"',
        "paths = [",
    ]
    for local, remote in paths:
        lines.append(f'  {{ local = "127.0.0.1:{local}", peer = "127.0.0.1:{remote}" }},')
    lines.append("]")
    for k, v in (extra_link or {}).items():
        lines.append(f"{k} = {json.dumps(v)}")
    if witness:
        lines += ["", "[witness]"] + [f"{k} = {json.dumps(v)}" for k, v in witness.items()]
    if metrics_port is not None:
        lines += ["", "[metrics]", f'listen = "127.0.0.1:{metrics_port}"']
    if intent:
        lines += ["", "[intent]"] + [f"{k} = {json.dumps(v)}" for k, v in intent.items()]
    if iscsi:
        lines += ["", "[iscsi]"] + [f"{k} = {json.dumps(v)}" for k, v in iscsi.items() if not isinstance(v, dict)]
        for k, v in iscsi.items():
            if isinstance(v, dict):
                lines += ["", f"[iscsi.{k}]"] + [f"{json.dumps(n)} = {json.dumps(x)}" for n, x in v.items()]
    for vname, vpath, size in volumes:
        lines += ["", "[[volume]]", f'name = "{vname}"', f'path = "{vpath}"']
        if size is not None:
            lines.append(f"size = {size}")
    return "\n".join(lines) + "\n"


def lab_up(d: str, **kw) -> dict:
    """Start the lab (parameters: see ``_lab_up``, whose signature this one reports). If it
    cannot come up, whatever was started is stopped again (no orphaned processes or loop
    devices) before the error is raised."""
    started: dict = {}
    try:
        return _lab_up(d, started=started, **kw)
    except BaseException:
        lab = started.get("lab") or {}
        pids = [n["pid"] for n in lab.get("nodes", {}).values()]
        pids += [x["pid"] for x in (lab.get("witness"), lab.get("link")) if x]
        pids += [h["pid"] for h in (lab.get("hosts") or {}).values() if "pid" in h]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone([("process", p) for p in pids], 5)
        if started.get("etcd"):
            from . import etcd as lab_etcd

            lab_etcd.stop_cluster(started["etcd"])
        _disks_off(started.get("disks") or {}, flush=False)
        if started.get("loops"):
            from .faults import drop_loop

            for devs in started["loops"].values():
                for dev in devs:
                    drop_loop(dev)
        raise


def _lab_up(
    d: str, *, started: dict, size: str = "64MiB", nvolumes: int = 2, npaths: int = 2, group: str = "rcg1",
    link_opts: dict | None = None, wait: bool = True, timeout: float = 120.0,
    volume_paths: dict[str, list[str]] | None = None, relay: bool = True,
    witness: dict | None = None, loop: bool = False, nbd_tls: dict | None = None,
    topology: str | None = None, power_cut: bool = False, tls: bool | str = False, intent: dict | None = None,
    iscsi: bool | dict = False, start_timeout: float = 20.0,
) -> dict:
    """Start the lab; ``volume_paths`` = {"A": [dev, ...], "B": [...]} uses existing files or
    block devices (e.g. loop devices) instead of creating image files; ``loop`` puts every
    volume on a loop device of its own (root), so ``lab fail disk`` can fail it for real;
    ``power_cut`` puts every volume on a disk with a volatile write cache
    (``faults.PowerCutDisk``: root, /dev/fuse, nbdkit, nbdfuse), so ``lab fail power`` can cut
    a site's power for real (writes not flushed are lost). ``tls`` runs every connection over
    TLS with certificates from a CA made for this lab (``make_lab_tls``): NBD ``require`` (the
    lab's host answers to its client certificates), the link and the witness mutual TLS, the
    host shims' paths nbds:// with client certificates; ``tls = "link"``: the link alone (the
    benchmark of what link security costs). ``intent``: the nodes' ``[intent]`` settings (the
    write-intent log's extent, hot set budget, idle time). ``iscsi``: each array also serves
    the volumes over iSCSI (target ``iqn.2026-12.org.syncd:lab-a`` / ``-b``, portal groups 1
    and 2, each array's SendTargets naming both), to the lab's host by its address; a dict adds
    [iscsi] settings (e.g. ``{"chap": {"host1": "secret"}}``). ``start_timeout``: how long
    a node may take to answer after it starts, and the link to come up (a second or two; more
    for nodes run slowed down, as ``bench/cpu_per_io.py --callgrind`` runs them). ``witness``: the built-in
    witness's timings, or with ``backend = "etcd"`` the witness kept in a three-member etcd
    cluster this lab starts, or, given ``endpoints``, in that running cluster (shared with other
    labs, each pair under its own ``prefix``; ``/syncd/GROUP`` by default)."""
    if tls not in (False, True, "link"):
        raise LabError(f"tls: {tls!r} is not one of False, True, 'link'")
    root = Path(d).resolve()
    if tls:
        from ..config import SECURITY_KEYS

        chosen = sorted(k for k in (link_opts or {}) if k in SECURITY_KEYS)
        if chosen or nbd_tls:
            raise LabError(f"--tls chooses how the link and NBD are protected; it cannot be combined with "
                           f"{', '.join(chosen) or 'nbd_tls'}")
    if (root / "lab.json").exists():
        lab = json.loads((root / "lab.json").read_text())
        if any(pid_alive(n["pid"]) for n in lab["nodes"].values()):
            raise LabError(f"a lab is already running in {root}: run 'syncd lab down --dir {root}' first")
    root.mkdir(parents=True, exist_ok=True)
    nbytes = parse_size(size, "--size")
    loops: dict[str, list[str]] = {}
    if loop and not volume_paths:
        from .faults import make_loop

        for n in NODES:
            (root / n).mkdir(exist_ok=True)
            loops[n] = [make_loop(str(root / n / f"vv{i + 1}.img"), nbytes) for i in range(nvolumes)]
            started["loops"] = loops
        volume_paths = loops
    disks: dict[str, list[dict]] = {}
    if power_cut:
        if volume_paths:
            raise LabError("power-cut disks are the lab's own volumes: they cannot be combined with "
                           "--loop or given volume paths")
        from .faults import PowerCutDisk

        started["disks"] = disks
        for n in NODES:
            (root / n).mkdir(exist_ok=True)
            # The site's machine: a power cut is a new boot of it (the node tells a power cut
            # from a kill -9 by its boot id).
            (root / n / "boot_id").write_text(f"{uuid.uuid4()}\n")
            disks[n] = []
            for i in range(nvolumes):
                disk = PowerCutDisk(str(root / n / f"vv{i + 1}.img"), str(root / n / f"vv{i + 1}.disk"), nbytes)
                disk.power_on()
                disks[n].append(disk.record)
        volume_paths = {n: [r["path"] for r in disks[n]] for n in NODES}
    py = sys.executable
    ports = {n: {"nbd": free_port(), "paths": [free_port() for _ in range(npaths)], "iscsi": free_port()}
             for n in NODES}
    relay_ports = [free_port() for _ in range(npaths)]
    link_tls = make_lab_tls(root / "tls") if tls else None
    lab_tls = link_tls if tls is True else None  # every connection, not just the link
    link_opts = dict(link_opts or {}) if tls else with_link_key(link_opts)
    lab: dict = {"dir": str(root), "group": group, "nodes": {}, "created": time.time(), "loops": loops,
                 "link_opts": link_opts, "disks": disks, "tls": lab_tls, "link_tls": link_tls is not None}
    started["lab"] = lab
    witness_tls = lab_tls is not None and witness is not None
    if lab_tls is not None:
        lab_tls["witness"] = "mutual TLS" if witness_tls else None
    wcfg: dict[str, dict] = {}
    etcd_relays: dict[str, list] = {}  # per site: (relay port, member URL) when the witness is on etcd
    if witness is not None and witness.get("backend") == "etcd":
        # The witness kept in a three-member etcd cluster on loopback (no witness process; its
        # own faults are its members', syncd.lab.etcd). With ``endpoints`` given, a cluster that
        # is not this lab's (several labs' pairs sharing it, one prefix each): it is neither
        # started nor stopped here.
        from . import etcd as lab_etcd

        prefix = witness.get("prefix", f"/syncd/{group}")
        if witness.get("endpoints"):
            endpoints = list(witness["endpoints"])
            lab["etcd"] = {"endpoints": endpoints, "prefix": prefix, "shared": True}
        else:
            endpoints = lab_etcd.start_cluster(str(root))["endpoints"]
            lab["etcd"] = {"endpoints": endpoints, "prefix": prefix}
            started["etcd"] = str(root)
        # Each array reaches every member through relays of its own, so either array can be cut
        # off from the whole cluster (lab fail witness-link SITE) while its peer still sees it.
        if relay:
            etcd_relays = {site: [(free_port(), urlsplit(e)) for e in endpoints] for site in NODES}
        relayed = {site: [f"{u.scheme}://127.0.0.1:{rp}" for rp, u in rs] for site, rs in etcd_relays.items()}
        lab["etcd"]["relayed"] = relayed
        wcfg = {site: etcd_witness_settings(witness, relayed.get(site, endpoints), prefix) for site in ("A", "B")}
        witness = None  # nothing more below: that is the built-in witness's
    if witness is not None:
        # The witness (site W) on loopback; A and B reach it through relays of their own (relay
        # indexes npaths and npaths+1), so either can be cut off from W alone.
        wport, wrelay, wrelay_b = free_port(), free_port(), free_port()
        timing = {k: witness[k] for k in ("owner_lease", "grace") if k in witness}
        key = secrets.token_hex(24)  # made for this lab, like the link's
        wauth = {"key": key}
        if witness_tls:
            assert lab_tls is not None
            wauth = lab_tls["certs"]["W"]
        (root / "W").mkdir(parents=True, exist_ok=True)
        wtoml = root / "W" / "witness.toml"
        wmetrics = free_port()
        wtoml.write_text(
            f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{wport}"]\nstate_dir = "state"\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in wauth.items())
            + 'nodes = ["A", "B"]\n'
            + "".join(f"{k} = {json.dumps(v)}\n"
                      for k, v in dict(timing, **{k: witness[k] for k in ("margin", "drift") if k in witness}).items())
            + f'\n[metrics]\nlisten = "127.0.0.1:{wmetrics}"\n'
        )
        wpid = _spawn([py, "-m", "syncd", "witness", "--config", str(wtoml)], root / "W.log")
        lab["witness"] = {"pid": wpid, "config": str(wtoml), "port": wport, "log": str(root / "W.log"),
                          "metrics": metrics_url(wmetrics)}
        common = dict(interval=witness.get("interval", 0.5), **timing)

        def wauth_of(site: str) -> dict:
            if witness_tls:
                assert lab_tls is not None
                return dict(lab_tls["certs"][site], name="W")
            return {"key": key}

        wcfg = {"A": dict(common, address=f"127.0.0.1:{wrelay if relay else wport}", **wauth_of("A")),
                "B": dict(common, address=f"127.0.0.1:{wrelay_b if relay else wport}", **wauth_of("B"))}

    # A dials B through the relay (which can cut or delay the link); B listens on its own path
    # ports. Without the relay (benchmarks) A dials B directly.
    relay_args = [py, "-m", "syncd", "linkproxy", "--control", str(root / "link.sock")]
    for i in range(npaths):
        relay_args += ["--relay", f"127.0.0.1:{relay_ports[i]}=127.0.0.1:{ports['B']['paths'][i]}"]
    nrelay = npaths
    witness_relays: dict[str, list[int]] | None = None
    if witness is not None:
        relay_args += ["--relay", f"127.0.0.1:{wrelay}=127.0.0.1:{wport}"]
        relay_args += ["--relay", f"127.0.0.1:{wrelay_b}=127.0.0.1:{wport}"]
        witness_relays = {"A": [npaths], "B": [npaths + 1]}
        nrelay += 2
    elif etcd_relays:
        witness_relays = {}
        for site, rs in etcd_relays.items():
            for rp, u in rs:
                relay_args += ["--relay", f"127.0.0.1:{rp}={u.hostname}:{u.port}"]
                witness_relays.setdefault(site, []).append(nrelay)
                nrelay += 1
    # Host shims reach each array through a relay of their own (the SAN cable from that host to
    # that array), so one host can be cut from one array: the seed's "host disconnect".
    host_relays: dict[str, dict[str, list]] = {}
    if topology is not None and relay:
        for h in NODES:
            for a in (NODES if topology == "uniform" else (h,)):
                rp = free_port()
                relay_args += ["--relay", f"127.0.0.1:{rp}=127.0.0.1:{ports[a]['nbd']}@{HOST_SOURCES[h]}"]
                host_relays.setdefault(h, {})[a] = [nrelay, f"127.0.0.1:{rp}"]
                nrelay += 1
    if relay:
        proxy_pid = _spawn(relay_args, root / "linkproxy.log")
        lab["link"] = {"pid": proxy_pid, "control": str(root / "link.sock"), "npaths": npaths,
                       "relays": [f"127.0.0.1:{p}" for p in relay_ports],
                       "witness_relay": npaths if witness is not None else None,
                       # per site, the relays between it and the witness (one per etcd member)
                       "witness_relays": witness_relays,
                       "host_relays": host_relays}
    else:
        relay_ports = ports["B"]["paths"]
        lab["link"] = None

    for name in NODES:
        peer = "B" if name == "A" else "A"
        nd = root / name
        nd.mkdir(exist_ok=True)
        if volume_paths:
            vols = [(f"vv{i + 1}", Path(pth), None) for i, pth in enumerate(volume_paths[name])]
        else:
            vols = [(f"vv{i + 1}", nd / f"vv{i + 1}.img", nbytes) for i in range(nvolumes)]
        if name == "A":
            paths = [(ports["A"]["paths"][i], relay_ports[i]) for i in range(npaths)]
        else:
            paths = [(ports["B"]["paths"][i], ports["A"]["paths"][i]) for i in range(npaths)]
        cfg = nd / "node.toml"
        node_link, node_nbd = link_opts, nbd_tls
        if link_tls is not None:
            node_link = dict(link_opts, **link_tls["certs"][name])
        if lab_tls is not None:
            node_nbd = dict(tls="require", **lab_tls["certs"][name])
        mport = free_port()
        node_iscsi = None
        if iscsi:
            node_iscsi = {"listen": [f"127.0.0.1:{ports[name]['iscsi']}"], "target": lab_iqn(name),
                          "portal_group": NODES.index(name) + 1, "peer_target": lab_iqn(peer),
                          "peer_portal_group": NODES.index(peer) + 1,
                          "peer_advertise": [f"127.0.0.1:{ports[peer]['iscsi']}"],
                          **(iscsi if isinstance(iscsi, dict) else {})}
        cfg.write_text(node_toml(name, peer, nd, ports[name]["nbd"], paths, vols, node_link, wcfg.get(name),
                                 node_nbd, metrics_port=mport, intent=intent, iscsi=node_iscsi,
                                 boot_id_file=root / name / "boot_id" if power_cut else None))
        scheme = "nbds" if lab_tls is not None else "nbd"
        log = root / f"{name}.log"
        pid = _spawn([py, "-m", "syncd", "node", "--config", str(cfg)], log)
        lab["nodes"][name] = {
            "pid": pid,
            "config": str(cfg),
            "log": str(log),
            "admin_socket": str(nd / "admin.sock"),
            "nbd": f"127.0.0.1:{ports[name]['nbd']}",
            "metrics": metrics_url(mport),
            "volumes": {
                v: {"path": str(p), "uri": f"{scheme}://127.0.0.1:{ports[name]['nbd']}/{v}"}
                for v, p, _ in vols
            },
        }
        if iscsi:
            portal = f"127.0.0.1:{ports[name]['iscsi']}"
            lab["nodes"][name]["iscsi"] = {"portal": portal, "target": lab_iqn(name), "portal_group":
                                           NODES.index(name) + 1}
            for lun, v in enumerate(lab["nodes"][name]["volumes"].values()):  # the LUNs createvlun gives below
                v["iscsi"] = f"iscsi://{portal}/{lab_iqn(name)}/{lun}"
        # Only power-cut labs have disk records (none: nothing to add).
        for v, rec in zip(lab["nodes"][name]["volumes"].values(), disks.get(name, []), strict=False):
            v["backing"] = rec["backing"]  # the medium: what survives a power cut
    (root / "lab.json").write_text(json.dumps(lab, indent=1))
    for name in NODES:
        n = lab["nodes"][name]
        _wait_socket(n["admin_socket"], n["pid"], Path(n["log"]), timeout=start_timeout)

    a = lab["nodes"]["A"]["admin_socket"]
    deadline = time.monotonic() + start_timeout
    while True:  # the link needs a moment to come up
        try:
            call(a, "creatercopygroup", {"group": group, "target": "B"})
            break
        except CtlError as e:
            if "not ready" not in str(e) or time.monotonic() > deadline:
                raise LabError(f"creating group {group}: {e}") from None
            time.sleep(0.1)
    for i in range(len(lab["nodes"]["A"]["volumes"])):
        call(a, "admitrcopyvv", {"volume": f"vv{i + 1}", "group": group, "target_volume": f"B:vv{i + 1}"})
    call(a, "startrcopygroup", {"group": group})
    # Hosts: lab clients connect from 127.0.0.1, so one host "lab" is that address, defined on
    # both arrays (uniform), proximity all, with every volume exported to it. A client from
    # another loopback address (127.0.0.2...) is no known host and sees no export.
    for name in NODES:
        sock = lab["nodes"][name]["admin_socket"]
        call(sock, "createhost", {"name": LAB_HOST, "addresses": ["127.0.0.1", "::1"],
                                  "tls_names": LAB_CLIENT_NAMES if lab_tls is not None else []})
        for lun, v in enumerate(lab["nodes"][name]["volumes"]):
            call(sock, "createvlun", {"volume": v, "host": LAB_HOST, "lun": lun})
        call(sock, "admitrcopyhost", {"host": LAB_HOST, "group": group, "proximity": "all"})
        if topology is not None:
            define_site_hosts(sock, name, group, topology, list(lab["nodes"][name]["volumes"]), lab_tls is not None)
    if wait:
        wait_synced(a, group, timeout, None)
        # ...and the secondary holds its serve lease, so both sites take I/O when we return.
        b = lab["nodes"]["B"]["admin_socket"]
        deadline = time.monotonic() + 15
        while not call(b, "showrcopy", {"group": group})["groups"][0]["serving"]:
            if time.monotonic() > deadline:
                raise LabError(f"site B does not serve group {group} after the initial sync")
            time.sleep(0.05)
    if topology is not None:
        lab["hosts"] = start_shims(lab, topology)
        (root / "lab.json").write_text(json.dumps(lab, indent=1))
    return lab


TOPOLOGIES = ("uniform", "non-uniform")


def lab_iqn(node: str) -> str:
    """The iSCSI target name of a lab array."""
    return f"iqn.2026-12.org.syncd:lab-{node.lower()}"


def site_host(site: str) -> str:
    return f"h{site.lower()}"


def site_proximity(topology: str, site: str) -> str:
    return SITE_PROXIMITY[site] if topology == "uniform" else "all"


def define_site_hosts(sock: str, array: str, group: str, topology: str, volumes: list[str], tls: bool) -> None:
    """Hosts ha and hb on ``array``: every volume exported to both, proximity per the topology."""
    if topology not in TOPOLOGIES:
        raise LabError(f"unknown topology {topology!r} (uniform, non-uniform)")
    for site in NODES:
        h = site_host(site)
        cabled = topology == "uniform" or site == array
        call(sock, "createhost", {"name": h, "addresses": [HOST_SOURCES[site]] if cabled else [],
                                  "tls_names": [h] if cabled and tls else []})
        for lun, v in enumerate(volumes):
            call(sock, "createvlun", {"volume": v, "host": h, "lun": lun})
        call(sock, "admitrcopyhost", {"host": h, "group": group, "proximity": site_proximity(topology, site)})
def metrics_url(port: int) -> str:
    """Where a lab daemon's Prometheus endpoint answers ([metrics] listen, loopback)."""
    return f"http://127.0.0.1:{port}/metrics"


def metrics_endpoints(lab: dict) -> list[tuple[str, str]]:
    """(daemon, URL) of every metrics endpoint of the lab."""
    out = [(f"node {n}", info["metrics"]) for n, info in lab["nodes"].items() if info.get("metrics")]
    if (lab.get("witness") or {}).get("metrics"):
        out.append(("witness W", lab["witness"]["metrics"]))
    out += [(f"host shim {h['name']}", h["metrics"]) for h in (lab.get("hosts") or {}).values() if h.get("metrics")]
    return out


def start_shims(lab: dict, topology: str) -> dict:
    """One host shim per site: host a at site A, host b at site B. Uniform: each reaches both
    arrays (Active Peer Persistence); non-uniform: only its local array (Active Sync)."""
    if topology not in TOPOLOGIES:
        raise LabError(f"unknown topology {topology!r} (uniform, non-uniform)")
    from ..config import LinkConfig

    root = Path(lab["dir"])
    hosts: dict = {}
    lab["hosts"] = hosts  # visible at once: a lab that fails to come up stops what started
    # Re-issued writes wait as long as an array of this lab may still apply the lost copy.
    bound = LinkConfig("B", (), **link_timings(lab.get("link_opts", {}))).max_request_hold() + 0.1
    for site in NODES:
        h = f"h{site.lower()}"
        d = root / h
        d.mkdir(exist_ok=True)
        port, mport = free_port(), free_port()
        arrays = NODES if topology == "uniform" else (site,)
        relays = ((lab.get("link") or {}).get("host_relays") or {}).get(site, {})
        # With the lab's TLS, the shim reaches its arrays over nbds:// with its own client
        # certificate (the arrays know host "lab" by it).
        tls = lab.get("tls")
        scheme = "nbds" if tls else "nbd"
        tls_lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in tls["certs"][h].items()) if tls else ""
        cfg = d / "host.toml"
        cfg.write_text(
            f'[host]\nname = "{h}"\nsocket = "{d / "nbd.sock"}"\nadmin_socket = "{d / "admin.sock"}"\n'
            f'tcp = "127.0.0.1:{port}"\ntcp_exports = {json.dumps(sorted(lab["nodes"][site]["volumes"]))}\n'
            f'source = "{HOST_SOURCES[site]}"\npoll_interval = 0.2\nstale_write_bound = {bound:.1f}\n' + tls_lines
            + "".join(f'\n[[array]]\nname = "{a}"\n'
                      f'paths = ["{scheme}://{relays[a][1] if a in relays else lab["nodes"][a]["nbd"]}"]\n'
                      for a in arrays)
            + f'\n[metrics]\nlisten = "127.0.0.1:{mport}"\n'
        )
        log = root / f"{h}.log"
        hosts[site] = {"name": h, "config": str(cfg), "log": str(log), "admin_socket": str(d / "admin.sock"),
                       "metrics": metrics_url(mport),
                       "socket": str(d / "nbd.sock"), "arrays": list(arrays),
                       "volumes": {v: f"nbd://127.0.0.1:{port}/{v}" for v in lab["nodes"][site]["volumes"]}}
        _start_shim(hosts[site])
    for hinfo in hosts.values():
        _wait_shim(hinfo)
    return hosts


def _start_shim(h: dict) -> None:
    h["pid"] = _spawn([sys.executable, "-m", "syncd", "host", "--config", h["config"]], Path(h["log"]))


def _wait_shim(hinfo: dict) -> None:
    """Until the shim answers and every path it reaches shows a usable state."""
    from ..host import host_status

    deadline = time.monotonic() + 20
    while True:
        try:
            st = host_status(hinfo["admin_socket"])
            if st["volumes"] and all(p["alua"] in ("active/optimized", "active/non-optimized")
                                     for v in st["volumes"] for p in v["paths"]):
                return
        except OSError:
            pass
        if not pid_alive(hinfo["pid"]) or time.monotonic() > deadline:
            tail = Path(hinfo["log"]).read_text()[-2000:] if Path(hinfo["log"]).exists() else ""
            raise LabError(f"host shim {hinfo['name']} did not come up; its log ends with:\n{tail}")
        time.sleep(0.05)


def _public_signature():
    import inspect

    sig = inspect.signature(_lab_up)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "started"])


lab_up.__signature__ = _public_signature()  # callers (bench/run.py) inspect what lab_up takes


def load_lab(d: str) -> dict:
    p = Path(d) / "lab.json"
    if not p.exists():
        raise LabError(f"no lab in {d} (no lab.json): run 'syncd lab up --dir {d}' first")
    return json.loads(p.read_text())


def lab_down(d: str, timeout: float = 15.0) -> list[str]:
    lab = load_lab(d)
    if lab.get("etcd") and not lab["etcd"].get("shared"):
        from . import etcd as lab_etcd

        try:
            lab_etcd.stop_cluster(d)
        except LabError:
            pass
    pids = [(f"node {k}", v["pid"]) for k, v in lab["nodes"].items()]
    if lab.get("witness"):
        pids.append(("witness", lab["witness"]["pid"]))
    if lab.get("link"):
        pids.append(("link relay", lab["link"]["pid"]))
    for h in (lab.get("hosts") or {}).values():
        pids.insert(0, (f"host shim {h['name']}", h["pid"]))
    for _, pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    stopped = _wait_gone(pids, timeout)
    for site, recs in (lab.get("disks") or {}).items():
        if _disks_off({site: recs}, flush=True):
            stopped.append(f"power-cut disks of {site} flushed and powered off")
    if lab.get("loops"):
        from .faults import drop_loop

        for devs in lab["loops"].values():
            for dev in devs:
                drop_loop(dev)
                stopped.append(f"loop device {dev} detached")
    return stopped


def _wait_gone(pids, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    stopped = []
    for what, pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            stopped.append(f"{what} (pid {pid}) killed after {timeout:.0f}s")
        else:
            stopped.append(f"{what} (pid {pid}) stopped")
    return stopped


def lab_kill(d: str, site: str, sig: int = signal.SIGKILL) -> int:
    """Stop one node abruptly (SIGKILL: as a power cut is to the process) or cleanly (SIGTERM)."""
    lab = load_lab(d)
    if site not in lab["nodes"]:
        raise LabError(f"lab {d} has no site {site!r} (sites: {', '.join(lab['nodes'])})")
    pid = lab["nodes"][site]["pid"]
    if not pid_alive(pid):
        raise LabError(f"node {site} (pid {pid}) is not running")
    os.kill(pid, sig)
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


def lab_start(d: str, site: str) -> int:
    """Start a stopped node again with its config and data; returns its new pid."""
    lab = load_lab(d)
    if site not in lab["nodes"]:
        raise LabError(f"lab {d} has no site {site!r} (sites: {', '.join(lab['nodes'])})")
    n = lab["nodes"][site]
    if pid_alive(n["pid"]):
        raise LabError(f"node {site} is already running (pid {n['pid']})")
    if (lab.get("disks") or {}).get(site) and not _disks_powered(lab, site):
        raise LabError(f"the disks of site {site} have no power: run 'syncd lab heal power {site}' "
                       f"(it powers them on and starts the node)")
    log = Path(n["log"])
    pid = _spawn([sys.executable, "-m", "syncd", "node", "--config", n["config"]], log)
    n["pid"] = pid
    (Path(d) / "lab.json").write_text(json.dumps(lab, indent=1))
    _wait_socket(n["admin_socket"], pid, log)
    return pid


def group_states(lab: dict) -> dict[str, dict]:
    """The lab's group as each running node shows it (a node that does not answer is left out)."""
    out = {}
    for name, n in lab["nodes"].items():
        try:
            out[name] = call(n["admin_socket"], "showrcopy", {"group": lab["group"]}, timeout=5)["groups"][0]
        except (CtlError, OSError, ValueError, IndexError, KeyError):  # down, starting, or busy
            pass
    return out


def lab_in_sync(lab: dict) -> bool:
    """One primary mirroring to its peer, every volume synced, both arrays serving."""
    gs = group_states(lab)
    prim = [g for g in gs.values() if g["role"] == "primary"]
    return (len(gs) == len(lab["nodes"]) and len(prim) == 1 and prim[0]["peer_mode"] == "attached"
            and all(v["sync_status"] == "synced" for g in gs.values() for v in g["volumes"])
            and all(g["serving"] for g in gs.values()))


def witness_record(state_dir: Path, group: str) -> dict | None:
    """The built-in witness's record of ``group`` in its state directory (None if unreadable)."""
    try:
        return dict(json.loads((state_dir / "witness.json").read_text())["groups"][group])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_knows_in_sync(rec: dict | None, primary: str, epoch: int) -> bool:
    """The witness's record holds ``primary``'s word, at ``epoch``, that its peer is in sync."""
    return (rec is not None and rec.get("owner") == primary and rec.get("epoch") == epoch
            and bool(rec.get("secondary_in_sync")))


def saw_key_move(admin_socket: str, other: str, within: float | None = None) -> bool:
    """With the witness in etcd: the array at ``admin_socket`` has seen ``other``'s key in etcd
    move since it started (and, with ``within``, less than that many seconds ago). Until it has,
    its word that it lost ``other`` would come late, so it does not take over from ``other`` (an
    array just started waits one lease's time first)."""
    try:
        w = call(admin_socket, "showrcopy", timeout=5).get("witness") or {}
    except (CtlError, OSError, ValueError):
        return False
    quiet = (w.get("peers_key_quiet_s") or {}).get(other)
    return quiet is not None and (within is None or quiet < within)


def witness_knows_in_sync(lab: dict) -> bool:
    """The witness (if the lab has one) has heard from the primary, at its epoch, that its peer
    is in sync: only then may it give the group to the peer when the primary fails. With the
    witness in etcd, the peer must also have seen the primary's key move (``saw_key_move``)."""
    if lab.get("etcd"):
        from . import etcd as lab_etcd

        rec = lab_etcd.group_record(lab)
    elif not lab.get("witness"):
        return True
    else:
        rec = witness_record(Path(lab["dir"]) / "W" / "state", lab["group"])
    prim = [(s, g) for s, g in group_states(lab).items() if g["role"] == "primary"]
    if len(prim) != 1 or not record_knows_in_sync(rec, prim[0][0], prim[0][1]["epoch"]):
        return False
    return not lab.get("etcd") or all(saw_key_move(n["admin_socket"], prim[0][0])
                                      for s, n in lab["nodes"].items() if s != prim[0][0])


def wait_in_sync(lab: dict, timeout: float) -> None:
    """Until the group is in sync (``lab_in_sync``) and the witness, if any, knows it."""
    deadline = time.monotonic() + timeout
    while not (lab_in_sync(lab) and witness_knows_in_sync(lab)):
        if time.monotonic() > deadline:
            state = {s: {k: g.get(k) for k in ("role", "epoch", "status", "peer_mode", "serving")}
                     | {"volumes": [v.get("sync_status") for v in g["volumes"]],
                        "events": [e["msg"] for e in g.get("events", [])[-3:]]}
                     for s, g in group_states(lab).items()}
            late = "" if witness_knows_in_sync(lab) else " (the witness has not heard it yet)"
            raise LabError(f"group {lab['group']} not back in sync within {timeout:.0f}s: {state}{late}")
        time.sleep(0.1)



# The witness kept in etcd (lab up --witness etcd): etcd-member N, etcd-leader, etcd-quorum.
ETCD_FAULTS = ("etcd-member", "etcd-leader", "etcd-quorum")


def _etcd_fault(d: str, lab: dict, what: str, arg: str | None, heal: bool) -> str:
    from . import etcd as lab_etcd

    if not lab.get("etcd"):
        raise LabError("this lab's witness is not kept in etcd (lab up --witness etcd)")
    info = _own_etcd(d, lab)
    n = len(info["members"])
    if what == "etcd-member":
        if arg is None or not arg.isdigit():
            raise LabError(f"lab {'heal' if heal else 'fail'} etcd-member needs a member number (1 to {n})")
        which = [int(arg)]
    elif what == "etcd-leader":
        if heal:
            raise LabError("lab heal etcd-leader: heal the member by number (lab heal etcd-member N)")
        which = [lab_etcd.leader(info)]
    else:
        which = list(range(2, n + 1))
    if heal:
        for i in which:
            lab_etcd.restart_member(d, i)
        return f"etcd member{'s' if len(which) > 1 else ''} {', '.join(map(str, which))} started"
    for i in which:
        lab_etcd.fail_member(d, i)
    if what == "etcd-quorum":
        return f"etcd quorum lost: members {', '.join(map(str, which))} killed, member 1 alone"
    return f"etcd member {which[0]}{' (the leader)' if what == 'etcd-leader' else ''} killed"


def etcd_witness_settings(timings: dict, endpoints: list[str], prefix: str) -> dict:
    """A lab node's ``[witness]`` settings for the witness kept in etcd: the lab's timings, and a
    decision's deadline of half the owner's lease (at most 1 s)."""
    from . import etcd as lab_etcd

    out = {k: timings[k] for k in ("interval", "owner_lease", "grace") if k in timings}
    out["timeout"] = min(1.0, out.get("owner_lease", 3.0) / 2)
    out["election_timeout"] = lab_etcd.ELECTION_MS / 1000  # the lab's clusters' (a leader change extends leases)
    return dict(out, backend="etcd", endpoints=list(endpoints), prefix=prefix)


def _own_etcd(d: str, lab: dict) -> dict:
    """The etcd cluster this lab started (its description), or LabError if it uses another's."""
    from . import etcd as lab_etcd

    if lab["etcd"].get("shared"):
        raise LabError("this lab's etcd cluster is shared with others, not its own: fail or heal its members "
                       "in the lab that started it")
    return lab_etcd.load(d)


def _etcd_witness(d: str, lab: dict, heal: bool) -> str:
    """The witness kept in etcd fails (every member killed) or heals (every member started)."""
    from . import etcd as lab_etcd

    n = len(_own_etcd(d, lab)["members"])
    for i in range(1, n + 1):
        (lab_etcd.restart_member if heal else lab_etcd.fail_member)(d, i)
    if heal:
        return f"witness started: its {n} etcd members"
    return f"witness stopped: its {n} etcd members killed (kill -9)"


FAULTS = ("primary", "secondary", "link", "witness", "disk", "site", "isolate", "witness-link", "host", "host-link",
          "power")


# -- power-cut disks -----------------------------------------------------------------------------
def _disks_off(disks: dict[str, list[dict]], flush: bool) -> bool:
    """Power off these disks (records are updated): flushed first (an orderly shutdown) or
    not (a power cut: what was not flushed is lost). True if any had power."""
    from .faults import PowerCutDisk

    any_on = False
    for recs in disks.values():
        for i, rec in enumerate(recs):
            disk = PowerCutDisk.from_record(rec)
            any_on |= disk.powered
            if flush:
                disk.stop()
            else:
                disk.cut()
            recs[i] = disk.record
    return any_on


def _disks_powered(lab: dict, site: str) -> bool:
    from .faults import PowerCutDisk

    return all(PowerCutDisk.from_record(r).powered for r in lab["disks"][site])


def _power_cut(d: str, lab: dict, sites: list[str]) -> str:
    """Power cut at ``sites`` (at the same instant): their arrays are killed (kill -9), then
    their disks lose what was not flushed."""
    if not any((lab.get("disks") or {}).get(s) for s in sites):
        raise LabError("power cuts need power-cut disks: start the lab with 'syncd lab up --power-cut-disks' "
                       "(root, /dev/fuse, nbdkit, nbdfuse)")
    killed = []
    for s in sites:  # the arrays first: a process still running would see its disk vanish
        pid = lab["nodes"][s]["pid"]
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append((f"node {s}", pid))
    _wait_gone(killed, 15)
    _disks_off({s: lab["disks"][s] for s in sites}, flush=False)
    for s in sites:  # the site's machine boots again
        (Path(d) / s / "boot_id").write_text(f"{uuid.uuid4()}\n")
    (Path(d) / "lab.json").write_text(json.dumps(lab, indent=1))
    arrays = " and ".join(w.split()[1] for w, _ in killed)
    return (f"power cut at site {'+'.join(sites)}: " + (f"array {arrays} killed (kill -9), " if arrays else "")
            + "the disks lost every write not flushed")


def _power_on(d: str, lab: dict, sites: list[str]) -> list[str]:
    """Power the disks of ``sites`` on again (same media, empty caches) and start their arrays."""
    from .faults import PowerCutDisk

    done = []
    for s in sites:
        recs = (lab.get("disks") or {}).get(s) or []
        off = [i for i, rec in enumerate(recs) if not PowerCutDisk.from_record(rec).powered]
        for i in off:
            disk = PowerCutDisk.from_record(recs[i])
            disk.power_on()
            recs[i] = disk.record
        if off:
            (Path(d) / "lab.json").write_text(json.dumps(lab, indent=1))
            done.append(f"disks of {s} powered on")
        if not pid_alive(lab["nodes"][s]["pid"]):
            lab_start(d, s)
            lab = load_lab(d)
            done.append(f"array {s} started")
    return done


def _host(lab: dict, site: str) -> dict:
    h = (lab.get("hosts") or {}).get(site)
    if h is None:
        raise LabError(f"this lab has no host shim at site {site} (lab up --topology uniform|non-uniform)")
    return h


def _kill_host(d: str, lab: dict, site: str) -> str:
    h = _host(lab, site)
    if pid_alive(h["pid"]):
        os.kill(h["pid"], signal.SIGKILL)
        _wait_gone([(h["name"], h["pid"])], 10)
    return h["name"]


def _start_host(d: str, site: str) -> str:
    lab = load_lab(d)  # fresh: a node restarted just before has recorded its new pid
    h = _host(lab, site)
    if not pid_alive(h["pid"]):
        _start_shim(h)
        (Path(d) / "lab.json").write_text(json.dumps(lab, indent=1))
        _wait_shim(h)
    return h["name"]


def _role_site(lab: dict, role: str) -> str:
    """The site whose array is ``role`` of the lab's group, asked of whichever node answers."""
    for name, n in lab["nodes"].items():
        if not pid_alive(n["pid"]):
            continue
        try:
            g = call(n["admin_socket"], "showrcopy", {"group": lab["group"]}, timeout=5)["groups"][0]
        except CtlError:
            continue
        return name if g["role"] == role else ("B" if name == "A" else "A")
    raise LabError("no node answers: cannot tell which site is " + role)


def _relays(lab: dict, paths: list[int], cmd: str) -> None:
    from .relay import proxy_command

    if not lab.get("link"):
        raise LabError("this lab runs without the link relay (--no-relay): links cannot be cut")
    proxy_command(lab["link"]["control"], cmd, paths=paths)


def lab_fail(d: str, what: str, site: str | None = None) -> str:
    """Inject a fault as the seed's failure scenarios describe it; returns what was done.

    primary|secondary [SITE]: power off that array (kill -9); link: cut every replication path;
    witness: stop the witness; witness-link SITE: cut SITE's connection to the witness only;
    isolate SITE: cut the replication link and SITE's witness connection; disk SITE: fail the
    backing devices of SITE's volumes (needs --loop); site SITE: data-center failure (the array
    and the site's host are powered off, the site is cut from the witness); host SITE: the
    host (server) at SITE fails; host-link SITE: the host at SITE loses its paths to the array
    at its own site (the seed's "host disconnect"); power [SITE|primary|secondary]: power cut
    at SITE (both sites without one): the array is killed and its disks lose every write not
    flushed (needs --power-cut-disks). With power-cut disks, a site failure cuts the site's
    power too.
    """
    lab = load_lab(d)
    if what in ETCD_FAULTS:
        return _etcd_fault(d, lab, what, site, heal=False)
    if what not in FAULTS:
        raise LabError(f"unknown fault {what!r}; faults: {', '.join(FAULTS + ETCD_FAULTS)}")
    if what == "power" and site in ("primary", "secondary"):
        site = _role_site(lab, site)
    if site is not None and site not in lab["nodes"]:
        raise LabError(f"lab {d} has no site {site!r} (sites: {', '.join(lab['nodes'])})")
    if what in ("disk", "site", "isolate", "witness-link", "host", "host-link") and site is None:
        raise LabError(f"lab fail {what} needs a SITE ({', '.join(lab['nodes'])})")
    npaths = lab["link"]["npaths"] if lab.get("link") else 0
    wr = (lab.get("link") or {}).get("witness_relays") or {}
    if what in ("primary", "secondary"):
        victim = site or _role_site(lab, what)
        lab_kill(d, victim)
        return f"array {victim} ({what}) powered off (kill -9)"
    if what == "power":
        return _power_cut(d, lab, [site] if site else list(lab["nodes"]))
    if what == "link":
        _relays(lab, list(range(npaths)), "cut")
        return f"replication link cut ({npaths} paths)"
    if what == "witness" and lab.get("etcd"):
        return _etcd_witness(d, lab, heal=False)
    if what == "witness":
        w = lab.get("witness")
        if not w:
            raise LabError("this lab has no witness (it was started with lab up --no-witness)")
        if not pid_alive(w["pid"]):
            raise LabError("the witness is not running")
        os.kill(w["pid"], signal.SIGKILL)
        _wait_gone([("witness", w["pid"])], 10)
        return "witness stopped (kill -9)"
    if what in ("witness-link", "isolate"):
        if site not in wr:
            raise LabError("this lab has no witness relays (it was started with lab up "
                           + ("--no-relay)" if lab.get("witness") else "--no-witness)"))
        paths = wr[site] + (list(range(npaths)) if what == "isolate" else [])
        _relays(lab, paths, "cut")
        return f"site {site} cut from the witness" + (" and from its peer" if what == "isolate" else "")
    if what == "disk":
        from .faults import fail_disk

        devs = lab.get("loops", {}).get(site) or []
        if not devs:
            raise LabError("disk failures need loop devices: start the lab with lab up --loop (root)")
        for dev in devs:
            fail_disk(dev)
        return f"backing devices of site {site} failed ({', '.join(devs)})"
    if what == "host":
        return f"host {_kill_host(d, lab, site)} at site {site} failed (its shim is gone)"
    if what == "host-link":
        h = _host(lab, site)
        hr = (lab["link"] or {}).get("host_relays", {}).get(site, {})
        _relays(lab, [hr[site][0]], "cut")
        return f"host {h['name']} disconnected from array {site} (its paths there are cut)"
    # site: data-center failure
    if (lab.get("disks") or {}).get(site):
        _power_cut(d, lab, [site])
    else:
        lab_kill(d, site)
    gone = ""
    if (lab.get("hosts") or {}).get(site):
        gone = f" and host {_kill_host(d, lab, site)}"
    if site in wr:
        _relays(lab, wr[site], "cut")
    return f"data center {site} lost (array{gone} powered off, cut from the witness)"


def lab_heal(d: str, what: str, site: str | None = None) -> str:
    """Undo ``lab_fail``: restart a powered-off array, heal links, restart the witness, repair
    a disk (its array is restarted: a failed device is taken back only by a restart), power a
    site on again (its disks, then its array)."""
    lab = load_lab(d)
    if what in ETCD_FAULTS:
        return _etcd_fault(d, lab, what, site, heal=True)
    if what not in FAULTS:
        raise LabError(f"unknown fault {what!r}; faults: {', '.join(FAULTS + ETCD_FAULTS)}")
    if what in ("disk", "host", "host-link") and site is None:
        raise LabError(f"lab heal {what} needs a SITE ({', '.join(lab['nodes'])})")
    npaths = lab["link"]["npaths"] if lab.get("link") else 0
    wr = (lab.get("link") or {}).get("witness_relays") or {}
    done = []
    if what == "power" or (what == "site" and (lab.get("disks") or {}).get(site)):
        done += _power_on(d, lab, [site] if site else list(lab["nodes"]))
        if what == "site" and site in wr:
            _relays(lab, wr[site], "heal")
        if what == "site" and (lab.get("hosts") or {}).get(site):
            done.append(f"host {_start_host(d, site)} started")
    elif what in ("primary", "secondary", "site"):
        down = [n for n, v in lab["nodes"].items() if not pid_alive(v["pid"]) and (site is None or n == site)]
        for n in down:
            lab_start(d, n)
            done.append(f"array {n} started")
        if what == "site" and site in wr:
            _relays(lab, wr[site], "heal")
        if what == "site" and (lab.get("hosts") or {}).get(site):
            done.append(f"host {_start_host(d, site)} started")
    elif what == "host":
        done.append(f"host {_start_host(d, site)} started")
    elif what == "host-link":
        hr = (lab.get("link") or {}).get("host_relays", {}).get(site, {})
        _relays(lab, [hr[site][0]], "heal")
        done.append(f"host at {site} reconnected to array {site}")
    elif what == "link":
        _relays(lab, list(range(npaths)), "heal")
        done.append("replication link healed")
    elif what == "witness" and lab.get("etcd"):
        done.append(_etcd_witness(d, lab, heal=True))
    elif what == "witness":
        w = lab.get("witness")
        if not w:
            raise LabError("this lab has no witness")
        if pid_alive(w["pid"]):
            raise LabError("the witness is running")
        w["pid"] = _spawn([sys.executable, "-m", "syncd", "witness", "--config", w["config"]], Path(w["log"]))
        (Path(d) / "lab.json").write_text(json.dumps(lab, indent=1))
        done.append("witness started")
    elif what in ("witness-link", "isolate"):
        sites = [site] if site else list(wr)
        paths = [i for s in sites if s in wr for i in wr[s]] + (list(range(npaths)) if what == "isolate" else [])
        _relays(lab, paths, "heal")
        done.append("connections healed")
    else:
        from .faults import heal_disk

        if site is None:
            raise LabError("lab heal disk needs a SITE")
        for dev in lab.get("loops", {}).get(site) or []:
            heal_disk(dev)
        if pid_alive(lab["nodes"][site]["pid"]):
            lab_kill(d, site, signal.SIGTERM)
        lab_start(d, site)
        done.append(f"disks of {site} repaired, array {site} restarted")
    return "; ".join(done) or "nothing to heal"


def tls_commands(lab: dict, volume: str) -> list[str]:
    """How nbdinfo and qemu-img reach ``volume`` at A and at B over nbds:// with the lab's
    client certificate directory (libnbd's tls-certificates, qemu's tls-creds-x509 dir: both
    take ca-cert.pem, client-cert.pem and client-key.pem). FILE and COPY stand for the file to
    write and the file to read into."""
    cdir = lab["tls"]["client_dir"]
    creds = f"--object tls-creds-x509,id=tls0,dir={cdir},endpoint=client"
    out = []
    for site, verb in (("A", "write FILE to"), ("B", "read back into COPY")):
        host, port = lab["nodes"][site]["nbd"].rsplit(":", 1)
        opts = f"driver=nbd,host={host},port={port},export={volume},tls-creds=tls0"
        out.append(f"nbdinfo 'nbds://{host}:{port}/{volume}?tls-certificates={cdir}'")
        out.append(f"qemu-img info {creds} --image-opts {opts}")
        if site == "A":
            out.append(f"qemu-img convert -n {creds} -f raw FILE --target-image-opts {opts}   # {verb} {site}")
        else:
            out.append(f"qemu-img convert {creds} --image-opts {opts} -O raw COPY   # {verb} from {site}")
    return out


def print_summary(lab: dict) -> None:
    from rich.table import Table

    from ..ctl import _console

    c = _console()  # full width when not a terminal, so URIs are never cut
    t = Table(title=f"syncd lab in {lab['dir']} (group {lab['group']}, synchronous, active-active)")
    for col in ("site", "volume", "NBD URI", "backing file"):
        t.add_column(col, overflow="fold")
    for name, n in lab["nodes"].items():
        for v, info in n["volumes"].items():
            medium = f" (medium {info['backing']})" if "backing" in info else ""
            t.add_row(name, v, info["uri"], info["path"] + medium)
    c.print(t)
    if any("iscsi" in n for n in lab["nodes"].values()):
        t = Table(title="iSCSI (each array its own target and portal group; the LUN has one WWN at both)")
        for col in ("site", "portal", "target", "portal group", "volume", "iSCSI URL"):
            t.add_column(col, overflow="fold")
        for name, n in lab["nodes"].items():
            i = n["iscsi"]
            for v, info in n["volumes"].items():
                t.add_row(name, i["portal"], i["target"], str(i["portal_group"]), v, info["iscsi"])
        c.print(t)
    if lab.get("hosts"):
        t = Table(title="host shims (multipath: use these from the hosts' tools)")
        for col in ("host", "site", "arrays", "volume", "NBD URI", "unix socket"):
            t.add_column(col, overflow="fold")
        for site, h in lab["hosts"].items():
            for v, u in h["volumes"].items():
                t.add_row(h["name"], site, "+".join(h["arrays"]), v, u, h["socket"])
        c.print(t)
    endpoints = metrics_endpoints(lab)
    if endpoints:
        t = Table(title="Prometheus metrics (dashboard: docs/grafana-syncd.json)")
        for col in ("daemon", "endpoint"):
            t.add_column(col, overflow="fold")
        for who, url in endpoints:
            t.add_row(who, url)
        c.print(t)
    a = lab["nodes"]["A"]["volumes"]
    first = next(iter(a))
    tls = lab.get("tls")
    if tls:
        # Plain print: these lines are commands to copy, never wrapped.
        print(f"Every connection is TLS, with certificates from this lab's CA ({tls['ca']}): NBD requires it, "
              f"the link uses mutual TLS; the witness: {tls.get('witness') or 'none in this lab'}.")
        print(f"Reach an export over nbds:// with the client certificate directory {tls['client_dir']}:")
        for line in tls_commands(lab, first):
            print(f"  {line}")
    c.print("Try:")
    if not tls:
        c.print(f"  nbdinfo {a[first]['uri']}")
        c.print(f"  nbdinfo --map=syncd:alua {lab['nodes']['B']['volumes'][first]['uri']}")
    if "iscsi" in a[first]:
        c.print(f"  iscsi-ls --url iscsi://{lab['nodes']['A']['iscsi']['portal']}")
        c.print(f"  iscsi-inq -e 1 -c 131 {a[first]['iscsi']}")
    bindir = os.path.dirname(sys.executable)
    c.print(f"  {bindir}/syncctl --lab {lab['dir']} --node A showrcopy")
    if lab.get("link"):
        c.print(f"  {bindir}/syncd lab cut-link --dir {lab['dir']}   /   "
                f"{bindir}/syncd lab heal-link --dir {lab['dir']}")
    c.print(f"  {bindir}/syncd lab kill A --dir {lab['dir']}   /   {bindir}/syncd lab start A --dir {lab['dir']}")
    if lab.get("etcd"):
        members = " ".join(lab["etcd"]["endpoints"])
        c.print(f"  witness kept in etcd, members {members}, prefix {lab['etcd']['prefix']}: "
                "kill A and watch B take over")
        c.print(f"  {bindir}/syncd lab fail etcd-member 2|etcd-leader|etcd-quorum --dir {lab['dir']}"
                f"   /   {bindir}/syncd lab heal etcd-member N|etcd-quorum --dir {lab['dir']}")
        if lab["etcd"].get("relayed"):
            c.print(f"  {bindir}/syncd lab fail witness|witness-link A|isolate A --dir {lab['dir']}"
                    "   (every member, or site A cut off from all of them)")
    elif not lab.get("witness"):
        c.print("  (no quorum witness in this lab: B does not take over by itself when A fails)")
    if lab.get("witness"):
        c.print(f"  witness (site W) on 127.0.0.1:{lab['witness']['port']}: kill A and watch B take over")
        c.print(f"  {bindir}/syncd lab fail primary|secondary|link|witness|isolate A|site A --dir {lab['dir']}"
                f"   /   {bindir}/syncd lab heal ... (same words)")
    if lab.get("disks"):
        c.print(f"  {bindir}/syncd lab fail power A --dir {lab['dir']}   (power cut: unflushed writes lost)"
                f"   /   {bindir}/syncd lab heal power A --dir {lab['dir']}")
    c.print(f"  {bindir}/syncctl --lab {lab['dir']} --node A setrcopygroup switchover {lab['group']}"
            f"   /   ... showpaths")
    c.print(f"  {bindir}/syncd lab down --dir {lab['dir']}")
