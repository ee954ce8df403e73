"""A three-member etcd cluster on loopback for the lab (Debian ``etcd-server``), and its faults.

Each member is a real ``etcd`` process with its own data directory, client and peer ports and
log under ``DIR/etcd/``; the cluster's description is kept in ``DIR/etcd/cluster.json`` so the
lab's fault commands (``member N``, ``leader``, ``quorum``) find the processes again. Timings are
etcd's defaults scaled down for a loopback lab (heartbeat 50 ms, election 500 ms) so a leader
change takes well under the witness's grace period.

A cluster can also run inside a network namespace (``netns``), as the failure matrix's witness
site does: its members listen on every address there, and this module's own probes enter the
namespace to ask them.

With ``tls=True`` the members serve their clients over TLS and require a client certificate
(``--client-cert-auth``) from a CA made for the cluster (``DIR/etcd/tls``); their peers stay
plain HTTP on loopback. The client certificate carries no CommonName: once etcd's
authentication is enabled, its JSON gateway refuses a client certificate that has one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .ports import LabError, free_port

HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_binary() -> str:
    path = shutil.which("etcd")
    if path is None:
        raise LabError("etcd is not installed (Debian package etcd-server; ./scripts/setup installs it)")
    return path


def _member_args(d: Path, m: dict, cluster: str, state: str) -> list[str]:
    ns = ["ip", "netns", "exec", m["netns"]] if m.get("netns") else []
    args = [*ns, etcd_binary(), "--name", m["name"], "--data-dir", str(d / m["name"]),
            "--listen-client-urls", m.get("listen", m["client"]), "--advertise-client-urls", m["client"],
            "--listen-peer-urls", m["peer"], "--initial-advertise-peer-urls", m["peer"],
            "--initial-cluster", cluster, "--initial-cluster-token", "syncd-lab",
            "--initial-cluster-state", state, "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS), "--logger", "zap", "--log-outputs", "stderr"]
    if m.get("tls"):
        t = Path(m["tls"])
        args += ["--cert-file", str(t / "server.pem"), "--key-file", str(t / "server-key.pem"),
                 "--client-cert-auth", "--trusted-ca-file", str(t / "ca.pem")]
    return args + list(m.get("extra_args", []))


def make_tls(d: Path, ca: Any = None) -> dict:
    """The members' server certificate (127.0.0.1, localhost) and one client certificate (no
    CommonName) under ``d``, from ``ca`` (a ``trustme.CA``) or a CA made here whose key is not
    kept. Returns the client's files as EtcdConfig takes them: ca, cert, key."""
    try:
        import trustme
    except ImportError:
        raise LabError("an etcd cluster with TLS makes its CA with trustme: pip install 'syncd[lab]'") from None
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca = ca if ca is not None else trustme.CA(organization_name="syncd lab etcd")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server-key.pem"))
    client = ca.issue_cert("syncd-etcd-client")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client-key.pem"))
    for f in ("server-key.pem", "client-key.pem"):
        os.chmod(d / f, 0o600)
    return {"ca": str(d / "ca.pem"), "cert": str(d / "client.pem"), "key": str(d / "client-key.pem")}


def _client_context(tls_dir: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(Path(tls_dir) / "ca.pem"))
    ctx.load_cert_chain(str(Path(tls_dir) / "client.pem"), str(Path(tls_dir) / "client-key.pem"))
    return ctx


def _spawn(d: Path, m: dict, cluster: str, state: str) -> int:
    with open(d / f"{m['name']}.log", "ab") as log:
        p = subprocess.Popen(_member_args(d, m, cluster, state), stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(d))
    return p.pid


def _cluster_arg(members: list[dict]) -> str:
    return ",".join(f"{m['name']}={m['peer']}" for m in members)


def _save(d: Path, info: dict) -> None:
    tmp = d / "cluster.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, d / "cluster.json")


def load(lab_dir: str) -> dict:
    try:
        return dict(json.loads((Path(lab_dir) / "etcd" / "cluster.json").read_text()))
    except (OSError, ValueError) as e:
        raise LabError(f"the lab in {lab_dir} has no etcd cluster ({e})") from None


@contextmanager
def _inside(ns: str | None) -> Iterator[None]:
    """This thread's sockets in network namespace ``ns`` (None: where it is)."""
    if not ns:
        yield
        return
    from pyroute2 import netns

    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


def post(endpoint: str, path: str, body: dict, timeout: float = 1.0, tls: str | None = None,
         ns: str | None = None) -> dict:
    """One JSON gateway request (the lab's own checks; the nodes use syncd.witness.etcd);
    ``tls``: the cluster's TLS directory, for an https endpoint; ``ns``: the network namespace
    to ask from."""
    req = urllib.request.Request(endpoint + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    ctx = _client_context(tls) if tls and endpoint.startswith("https") else None
    with _inside(ns), urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:  # noqa: S310 (loopback)
        return dict(json.loads(r.read()))


def member_status(m: dict) -> dict | None:
    """The member's status (its leader's id, its own id), or None if it does not answer."""
    try:
        st = post(m["client"], "/v3/maintenance/status", {}, timeout=0.5, tls=m.get("tls"), ns=m.get("netns"))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return {"id": int(st["header"]["member_id"]), "leader": int(st.get("leader", 0))}


def healthy(info: dict, timeout: float = 1.0) -> bool:
    """A linearizable read succeeds at some member (the cluster has a quorum and a leader)."""
    for m in info["members"]:
        if not alive(m):
            continue
        try:
            post(m["client"], "/v3/kv/range", {"key": "AA=="}, timeout=timeout, tls=m.get("tls"), ns=m.get("netns"))
            return True
        except (OSError, ValueError, urllib.error.URLError):
            continue
    return False


def alive(m: dict) -> bool:
    try:
        os.kill(m["pid"], 0)
    except (ProcessLookupError, KeyError, TypeError):
        return False
    return True


def start_cluster(lab_dir: str, n: int = 3, timeout: float = 20.0, *, tls: Any = False,
                  extra_args: tuple[str, ...] = (), netns: str | None = None) -> dict:
    """Start an ``n``-member cluster under LAB_DIR/etcd; returns its description (members:
    name, client and peer URLs, pid) once it serves linearizable reads. ``tls`` (True, or the
    ``trustme.CA`` to issue the certificates from): https client URLs requiring a client
    certificate; the description's ``tls`` names the client's files (ca, cert, key).
    ``extra_args``: more etcd flags for every member (kept for its restarts). With ``netns``
    the members run in that network namespace and take clients on all its addresses (each
    member's ``port``); their ``client`` URLs are then the namespace's loopback."""
    d = Path(lab_dir) / "etcd"
    d.mkdir(parents=True, exist_ok=True)
    client_tls = make_tls(d / "tls", None if tls is True else tls) if tls else None
    scheme = "https" if tls else "http"
    members: list[dict] = []
    for i in range(n):
        port = free_port()
        m: dict = {"name": f"etcd{i + 1}", "client": f"{scheme}://127.0.0.1:{port}", "port": port,
                   "peer": f"http://127.0.0.1:{free_port()}"}
        if netns:
            m.update(netns=netns, listen=f"{scheme}://0.0.0.0:{port}")
        if tls:
            m["tls"] = str(d / "tls")
        if extra_args:
            m["extra_args"] = list(extra_args)
        members.append(m)
    cluster = _cluster_arg(members)
    for m in members:
        m["pid"] = _spawn(d, m, cluster, "new")
    info: dict = {"members": members, "endpoints": [m["client"] for m in members]}
    if client_tls is not None:
        info["tls"] = client_tls
    _save(d, info)
    deadline = time.monotonic() + timeout
    while not healthy(info):
        if time.monotonic() > deadline:
            stop_cluster(lab_dir)
            tail = "".join((d / f"{m['name']}.log").read_text(errors="replace")[-1500:] for m in members[:1])
            raise LabError(f"etcd cluster did not come up within {timeout:.0f}s:\n{tail}")
        time.sleep(0.1)
    return info


def stop_cluster(lab_dir: str) -> None:
    info = load(lab_dir)
    for m in info["members"]:
        kill_member(m)


def kill_member(m: dict, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(m["pid"], sig)
    except (ProcessLookupError, KeyError, TypeError):
        return
    deadline = time.monotonic() + 5
    while alive(m) and time.monotonic() < deadline:
        try:
            if os.waitpid(m["pid"], os.WNOHANG)[0]:
                break
        except ChildProcessError:
            pass
        time.sleep(0.02)


def member(info: dict, which: int) -> dict:
    """Member ``which`` (1-based), or a LabError naming the valid ones."""
    if not 1 <= which <= len(info["members"]):
        raise LabError(f"etcd member {which}: the lab's cluster has members 1 to {len(info['members'])}")
    return dict(info["members"][which - 1])


def leader(info: dict) -> int:
    """The 1-based number of the member that is leader now (asked of the members)."""
    ids: dict[int, int] = {}
    lead = 0
    for i, m in enumerate(info["members"], 1):
        st = member_status(m) if alive(m) else None
        if st is not None:
            ids[st["id"]] = i
            lead = lead or st["leader"]
    if lead not in ids:
        raise LabError("the etcd cluster has no leader now")
    return ids[lead]


def fail_member(lab_dir: str, which: int) -> dict:
    info = load(lab_dir)
    m = member(info, which)
    kill_member(m)
    return m


def restart_member(lab_dir: str, which: int) -> dict:
    """Start member ``which`` again on its data directory (it rejoins the cluster)."""
    info = load(lab_dir)
    m = member(info, which)
    if alive(m):
        return m
    d = Path(lab_dir) / "etcd"
    m["pid"] = _spawn(d, m, _cluster_arg(info["members"]), "existing")
    info["members"][which - 1] = m
    _save(d, info)
    return m


def fail_quorum(lab_dir: str) -> list[int]:
    """Kill all members but one: the survivor answers no linearizable request."""
    info = load(lab_dir)
    killed = []
    for i, m in enumerate(info["members"][1:], 2):
        if alive(m):
            kill_member(m)
            killed.append(i)
    return killed


def group_record(lab: dict) -> dict | None:
    """The witness's record of the lab's group as etcd holds it (None if it cannot be read)."""
    return _record(f"{lab['etcd']['prefix']}/groups/{lab['group']}",
                   [(endpoint, None, None) for endpoint in lab["etcd"]["endpoints"]])


def cluster_record(info: dict, prefix: str, group: str) -> dict | None:
    """``group_record`` asked of the cluster ``info`` (``load``) directly: each live member at
    its client URL, from its network namespace, over its TLS."""
    return _record(f"{prefix}/groups/{group}",
                   [(m["client"], m.get("tls"), m.get("netns")) for m in info["members"] if alive(m)])


def _record(name: str, where: list[tuple[str, str | None, str | None]]) -> dict | None:
    """The JSON record at key ``name``, from the first of ``where`` (endpoint, TLS directory,
    namespace) that answers."""
    import base64

    key = base64.b64encode(name.encode()).decode()
    for endpoint, tls, ns in where:
        try:
            ans = post(endpoint, "/v3/kv/range", {"key": key}, timeout=1.0, tls=tls, ns=ns)
        except (OSError, ValueError, urllib.error.URLError):
            continue
        kvs = ans.get("kvs") or []
        if not kvs:
            return None
        try:
            return dict(json.loads(base64.b64decode(kvs[0].get("value", ""))))
        except ValueError:
            return None
    return None
