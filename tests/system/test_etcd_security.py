"""The witness kept in etcd, behind etcd's own security, against real etcd (one member on
loopback, ``syncd.lab.etcd`` with TLS): TLS with a client certificate (``--client-cert-auth``)
and etcd's users and roles. The right CA, certificate and user do compare-and-set and the
witness's decisions; a wrong CA, a missing or foreign client certificate, a wrong password, a
user without permission on the pair's prefix are each refused with an error naming the problem,
within the deadline, and nothing changes in etcd (read back as root). A token that expired is
fetched again; a member that restarted is asked again on a new connection. A real node reaches
the witness over TLS as an etcd user."""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
import trustme

from syncd.ctl import call
from syncd.lab import etcd as lab_etcd
from syncd.lab.ports import free_port
from syncd.lab.rig import node_toml, with_link_key
from syncd.witness.decide import Timing
from syncd.witness.etcd import (
    EtcdClient,
    EtcdConfig,
    EtcdError,
    EtcdUnreachable,
    b64,
    cmp_mod,
    get,
    prefix_end,
    put,
)
from syncd.witness.etcd_backend import EtcdWitness, Record

from .rig import etcd_pair_rounds, require_tool, wait_for

pytestmark = pytest.mark.system

PAIR = b"/syncd/pair1"
TIMING = Timing(owner_lease=0.3, drift=0.05, margin=0.2, grace=1.0)  # etcd lease TTL 1 s, its minimum here
PASSWORDS = {"root": "root-secret", "pair1": "pair1-secret", "pair2": "pair2-secret"}
TIMEOUT = 1.0
TOKEN_TTL = 1  # s: etcd forgets a (simple) token unused for that long


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A one-member cluster serving TLS and requiring a client certificate; no etcd users."""
    require_tool("etcd")
    d = str(tmp_path_factory.mktemp("etcd-tls"))
    info = lab_etcd.start_cluster(d, n=1, tls=True)
    info["dir"] = d
    yield info
    lab_etcd.stop_cluster(d)


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory):
    """A one-member TLS cluster with authentication enabled and tokens that expire after
    TOKEN_TTL unused: root; ``pair1`` whose role may read and write the prefix /syncd/pair1/
    only; ``pair2`` whose role may do so on /syncd/pair2/ only. Its CA (``issuer``) is the
    test's, to issue more client certificates."""
    require_tool("etcd")
    d = str(tmp_path_factory.mktemp("etcd-auth"))
    ca = trustme.CA(organization_name="syncd test etcd")
    info = lab_etcd.start_cluster(d, n=1, tls=ca, extra_args=("--auth-token-ttl", str(TOKEN_TTL)))
    try:
        for name, password in PASSWORDS.items():
            gateway(info, "/v3/auth/user/add", {"name": name, "password": password})
            gateway(info, "/v3/auth/role/add", {"name": name})
            gateway(info, "/v3/auth/user/grant", {"user": name, "role": name})
        for name in ("pair1", "pair2"):
            prefix = f"/syncd/{name}/".encode()
            gateway(info, "/v3/auth/role/grant", {"name": name, "perm": {
                "key": b64(prefix), "range_end": b64(prefix_end(prefix)), "permType": "READWRITE"}})
        gateway(info, "/v3/auth/enable", {})
        info["issuer"] = ca
    except BaseException:
        lab_etcd.stop_cluster(d)
        raise
    yield info
    lab_etcd.stop_cluster(d)


def gateway(info: dict, path: str, body: dict, token: str | None = None) -> dict:
    """One request to the member's JSON gateway, by hand (urllib), with the cluster's client
    certificate: how the test sets etcd up and looks at it, independently of syncd's client."""
    t = info["tls"]
    ctx = ssl.create_default_context(cafile=t["ca"])
    ctx.load_cert_chain(t["cert"], t["key"])
    headers = {"Content-Type": "application/json", **({"Authorization": token} if token else {})}
    req = urllib.request.Request(info["endpoints"][0] + path, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=2.0, context=ctx) as r:  # noqa: S310 (loopback)
        return dict(json.loads(r.read()))


def token_of(info: dict, user: str) -> str:
    return str(gateway(info, "/v3/auth/authenticate", {"name": user, "password": PASSWORDS[user]})["token"])


def everything(info: dict, auth: bool) -> tuple[int, dict[bytes, tuple[bytes, int]]]:
    """The store's revision and every key in it (value, mod revision), read as root when
    authentication is on: whatever a refused request might have changed shows here."""
    ans = gateway(info, "/v3/kv/range", {"key": b64(b"\0"), "range_end": b64(b"\0")},
                  token_of(info, "root") if auth else None)
    kvs = {base64.b64decode(kv["key"]): (base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
           for kv in ans.get("kvs", [])}
    return int(ans["header"]["revision"]), kvs


def client(info: dict, **kw) -> EtcdClient:
    files = {"ca": info["tls"]["ca"], "cert": info["tls"]["cert"], "key": info["tls"]["key"]}
    return EtcdClient(EtcdConfig(tuple(info["endpoints"]), **dict(files, timeout=TIMEOUT) | kw))


# -- TLS ----------------------------------------------------------------------------------------------

def test_the_clusters_own_probes_work_over_tls(tls_cluster):
    """The lab's health and status probes speak TLS with the cluster's client certificate."""
    m = tls_cluster["members"][0]
    assert m["client"].startswith("https://") and lab_etcd.healthy(tls_cluster)
    st = lab_etcd.member_status(m)
    assert st is not None and st["leader"] == st["id"]
    assert lab_etcd.leader(tls_cluster) == 1


async def test_with_the_right_ca_and_client_certificate_the_witness_decides_over_tls(tls_cluster):
    ca, cb = client(tls_cluster), client(tls_cluster)
    wa, wb = EtcdWitness(ca, PAIR, "A", TIMING), EtcdWitness(cb, PAIR, "B", TIMING)
    try:
        key = PAIR + b"/cas"
        assert (await ca.txn([cmp_mod(key, 0)], [put(key, b"v1")])).succeeded
        lost = await cb.txn([cmp_mod(key, 0)], [put(key, b"v2")], [get(key)])
        assert not lost.succeeded and lost.ranges[0][0].value == b"v1"  # compare-and-set over TLS
        await wa.register("rcg1", ("A", "B"), "A", 1)
        await etcd_pair_rounds(wa, wb)  # B has seen A's key move
        early = await wb.claim("rcg1", 1)
        assert not early.granted and "still holds its witness lease" in early.reason, early
        with trio.fail_after(6):  # A says nothing more: its lease runs out on etcd's clock
            while True:
                d = await wb.claim("rcg1", 1)
                if d.granted:
                    break
                await wb.renew({})  # B's own sign of life goes on (its client's rounds)
                await trio.sleep(0.3)
        assert (d.owner, d.epoch) == ("B", 2), d
        [kv], _ = await ca.range(wa.group_key("rcg1"))
        rec = Record.from_json(kv.value)
        assert (rec.owner, rec.epoch) == ("B", 2)
        assert ca.last_endpoint == tls_cluster["endpoints"][0] and ca.last_endpoint.startswith("https://")
    finally:
        if wb.lease:
            await cb.lease_revoke(wb.lease)
        await ca.aclose()
        await cb.aclose()


@pytest.mark.parametrize("wrong, problem", [
    ("ca", "TLS: etcd's certificate is not trusted"),
    ("no client certificate", "TLS: etcd requires a client certificate and none is configured"),
    ("foreign client certificate", "TLS: etcd refused the client certificate"),
])
async def test_a_tls_mismatch_is_refused_by_name_as_unreachable_and_changes_nothing(tls_cluster, tmp_path,
                                                                                    wrong, problem):
    other = trustme.CA(organization_name="not etcd's CA")
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    foreign = other.issue_cert("syncd-etcd-client")
    foreign.cert_chain_pems[0].write_to_path(str(tmp_path / "foreign.pem"))
    foreign.private_key_pem.write_to_path(str(tmp_path / "foreign-key.pem"))
    kw = {"ca": {"ca": str(tmp_path / "other-ca.pem")},
          "no client certificate": {"cert": None, "key": None},
          "foreign client certificate": {"cert": str(tmp_path / "foreign.pem"),
                                         "key": str(tmp_path / "foreign-key.pem")}}[wrong]
    before = everything(tls_cluster, auth=False)
    c = client(tls_cluster, **kw)
    w = EtcdWitness(c, PAIR, "A", TIMING)
    try:
        for attempt in (lambda: c.txn([], [put(PAIR + b"/tls", b"x")]),
                        lambda: w.register("rcg9", ("A", "B"), "A", 1)):
            t0 = trio.current_time()
            with pytest.raises(EtcdUnreachable, match=problem):
                await attempt()
            assert trio.current_time() - t0 < TIMEOUT + 0.5  # refused at once, not at the deadline's end
    finally:
        await c.aclose()
    assert everything(tls_cluster, auth=False) == before


async def test_a_restarted_member_is_asked_again_on_a_new_connection(tls_cluster, tmp_path):
    """One endpoint (a cluster behind one address): the member restarts between two requests,
    so the connection the client kept is closed; the next request still gets its answer."""
    c = client(tls_cluster, timeout=2.0)
    try:
        assert (await c.txn([], [put(PAIR + b"/restart", b"1")])).succeeded
        d = tls_cluster["dir"]
        lab_etcd.fail_member(d, 1)
        lab_etcd.restart_member(d, 1)
        with trio.fail_after(10):  # a process coming back: watched from outside
            while True:
                if lab_etcd.healthy(lab_etcd.load(d), timeout=0.5):
                    break
                await trio.sleep(0.1)
        assert (await c.txn([], [put(PAIR + b"/restart", b"2")])).succeeded
        [kv], _ = await c.range(PAIR + b"/restart")
        assert kv.value == b"2"
    finally:
        await c.aclose()


# -- etcd's users ------------------------------------------------------------------------------------

async def test_the_pairs_user_decides_and_an_expired_token_is_fetched_again(auth_cluster):
    info = auth_cluster
    c = client(info, user="pair1", password=PASSWORDS["pair1"])
    w = EtcdWitness(c, PAIR, "A", TIMING)
    try:
        await w.register("rcg1", ("A", "B"), "A", 1)
        assert (await w.report("rcg1", 1, peer_alive=True, peer_in_sync=True)).granted
        assert (await w.keep("rcg1", 1)).granted
        stale = token_of(info, "pair1")
        await trio.sleep(TOKEN_TTL + 1.5)  # etcd's clock: the client's token, unused, expires with this one
        with pytest.raises(urllib.error.HTTPError) as refused:
            gateway(info, "/v3/kv/range", {"key": b64(PAIR + b"/x")}, stale)
        assert "invalid auth token" in refused.value.read().decode()
        t0 = trio.current_time()
        assert (await w.report("rcg1", 1, peer_alive=True, peer_in_sync=False)).granted
        assert trio.current_time() - t0 < TIMEOUT
        rec = Record.from_json(everything(info, auth=True)[1][w.group_key("rcg1")][0])
        assert (rec.owner, rec.epoch, rec.secondary_in_sync) == ("A", 1, False)
    finally:
        if w.lease:
            await c.lease_revoke(w.lease)
        await c.aclose()


@pytest.mark.parametrize("user, password, problem", [
    ("pair1", "not-the-password", "etcd user 'pair1': authentication failed"),
    ("nobody", "x", "etcd user 'nobody': authentication failed"),
    ("pair2", PASSWORDS["pair2"], "permission denied to etcd user 'pair2'"),
    (None, None, "etcd requires authentication and no etcd user is configured"),
])
async def test_a_refused_user_is_told_why_and_changes_nothing(auth_cluster, user, password, problem):
    info = auth_cluster
    before = everything(info, auth=True)
    c = client(info, user=user, password=password)
    w = EtcdWitness(c, PAIR, "B", TIMING)
    try:
        for attempt in (lambda: c.txn([], [put(PAIR + b"/auth", b"x")]),
                        lambda: c.range(PAIR + b"/", prefix_end(PAIR + b"/")),
                        lambda: w.register("rcg2", ("A", "B"), "A", 1),
                        lambda: w.report("rcg1", 1, peer_alive=False, peer_in_sync=False)):
            t0 = trio.current_time()
            with pytest.raises(EtcdError, match=problem):
                await attempt()
            assert trio.current_time() - t0 < TIMEOUT
    finally:
        if w.lease:  # any user may take a lease (no key): pair2 did, before its key was refused
            await c.lease_revoke(w.lease)
        await c.aclose()
    assert everything(info, auth=True) == before


async def test_a_client_certificate_with_a_common_name_is_refused_by_name(auth_cluster, tmp_path):
    """etcd's JSON gateway, once authentication is on, refuses a client certificate that has a
    CommonName (in plain text, not JSON): the error quotes it and says what to do."""
    info = auth_cluster
    named = info["issuer"].issue_cert("syncd-etcd-client", common_name="pair1")
    named.cert_chain_pems[0].write_to_path(str(tmp_path / "named.pem"))
    named.private_key_pem.write_to_path(str(tmp_path / "named-key.pem"))
    before = everything(info, auth=True)
    c = client(info, cert=str(tmp_path / "named.pem"), key=str(tmp_path / "named-key.pem"), user="pair1",
               password=PASSWORDS["pair1"])
    try:
        t0 = trio.current_time()
        with pytest.raises(EtcdUnreachable, match="HTTP 400: CommonName of client .* without one"):
            await c.txn([], [put(PAIR + b"/cn", b"x")])
        assert trio.current_time() - t0 < TIMEOUT + 0.5
    finally:
        await c.aclose()
    assert everything(info, auth=True) == before


def test_a_node_reaches_the_witness_over_tls_as_an_etcd_user(auth_cluster, tmp_path):
    """A real ``syncd node`` (its peer never comes: none is needed to reach the witness) with
    ``[witness] backend = "etcd"``, https endpoints, the client certificate and the pair's
    user: showrcopy says the witness is reachable, and how."""
    info = auth_cluster
    t = info["tls"]
    witness = {"backend": "etcd", "endpoints": info["endpoints"], "prefix": PAIR.decode(), "tls_ca": t["ca"],
               "tls_certificate": t["cert"], "tls_key": t["key"], "user": "pair1", "password": PASSWORDS["pair1"],
               "interval": 0.2, "owner_lease": 1.0, "grace": 2.0, "timeout": 0.5}
    cfg = tmp_path / "node.toml"
    cfg.write_text(node_toml("N", "P", tmp_path, free_port(), [(free_port(), free_port())],
                             [("vv1", tmp_path / "vv1.img", 4 << 20)], with_link_key({}), witness))
    log = tmp_path / "node.log"
    with open(log, "wb") as out:
        node = subprocess.Popen([sys.executable, "-m", "syncd", "node", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ))
    try:
        sock = str(tmp_path / "admin.sock")
        wait_for(lambda: node.poll() is not None or call(sock, "showrcopy", timeout=2)["witness"]["reachable"],
                 timeout=15, what=f"the node reaching the witness (log {log})")
        assert node.poll() is None, _tail(log)
        w = call(sock, "showrcopy")["witness"]
        assert w["backend"] == "etcd" and w["answered_by"] == info["endpoints"][0], w
        assert w["security"] == "TLS with a client certificate, etcd user pair1", w
        assert PAIR + b"/alive/N" in everything(info, auth=True)[1]  # its key, on its lease, as pair1
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(10)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    assert "Traceback" not in log.read_text(), _tail(log)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


async def test_a_user_configured_before_etcd_switches_authentication_on(tmp_path):
    """Nodes may be given their etcd user first and etcd's authentication switched on later (as
    etcd's own client allows): without authentication the client sends no token; once it is on,
    the first request refused for want of a user fetches a token and is asked again. A wrong
    password shows only then, by name, and changes nothing."""
    require_tool("etcd")
    d = str(tmp_path / "etcd")
    info = lab_etcd.start_cluster(d, n=1)  # plain HTTP: what matters here is the users
    ep = info["endpoints"][0]

    def raw(path: str, body: dict, token: str | None = None) -> dict:
        headers = {"Content-Type": "application/json", **({"Authorization": token} if token else {})}
        req = urllib.request.Request(ep + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=2.0) as r:  # noqa: S310 (loopback)
            return dict(json.loads(r.read()))

    good = EtcdClient(EtcdConfig((ep,), user="pair1", password=PASSWORDS["pair1"], timeout=TIMEOUT))
    bad = EtcdClient(EtcdConfig((ep,), user="pair1", password="not-the-password", timeout=TIMEOUT))
    try:
        for name in ("root", "pair1"):
            raw("/v3/auth/user/add", {"name": name, "password": PASSWORDS[name]})
            raw("/v3/auth/role/add", {"name": name})
            raw("/v3/auth/user/grant", {"user": name, "role": name})
        prefix = PAIR + b"/"
        raw("/v3/auth/role/grant", {"name": "pair1", "perm": {
            "key": b64(prefix), "range_end": b64(prefix_end(prefix)), "permType": "READWRITE"}})
        assert (await good.txn([], [put(PAIR + b"/k", b"off")])).succeeded  # authentication off: no token
        assert (await bad.txn([], [put(PAIR + b"/k", b"off, any password")])).succeeded
        raw("/v3/auth/enable", {})
        root = str(raw("/v3/auth/authenticate", {"name": "root", "password": PASSWORDS["root"]})["token"])
        before = raw("/v3/kv/range", {"key": b64(PAIR + b"/k")}, root)
        with pytest.raises(EtcdError, match="pair1.*authentication failed"):
            await bad.txn([], [put(PAIR + b"/k", b"refused")])
        assert raw("/v3/kv/range", {"key": b64(PAIR + b"/k")}, root)["kvs"] == before["kvs"]  # nothing changed
        assert (await good.txn([], [put(PAIR + b"/k", b"on")])).succeeded  # authenticates now, asked again
        [kv], _ = await good.range(PAIR + b"/k")
        assert kv.value == b"on"
    finally:
        await good.aclose()
        await bad.aclose()
        lab_etcd.stop_cluster(d)
