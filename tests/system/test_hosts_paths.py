"""Hosts, VLUNs and LUN masking, proximity and per-host ALUA, on real node processes.

Lab clients connect from 127.0.0.1 (host "lab"); other loopback source addresses stand for
other hosts: 127.0.0.2 is defined as host h2 on array A only, 127.0.0.9 is nobody.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import trio

from syncd.ctl import CtlError
from syncd.ctl import main as syncctl
from syncd.nbd.client import NBDDisconnected, NBDError, open_nbd

from .rig import require_tool, run
from .test_replication import uri

pytestmark = pytest.mark.system
SYNCCTL = os.path.join(os.path.dirname(sys.executable), "syncctl")


def alua(lab, site, vol="vv1"):
    out = run("nbdinfo", "--map=syncd:alua", uri(lab, site, vol)).stdout.split()
    word = int(out[2])
    return word & 0xFF, word >> 8


async def _visible(u: str, source: str) -> bool:
    try:
        async with open_nbd(u, source=source) as c:
            await c.read(0, 4096)
            return True
    except NBDError:
        return False


def visible(lab, site, vol, source):
    return trio.run(_visible, uri(lab, site, vol), source)


def test_masking_follows_hosts_and_vluns(lab):
    ctl = lab["ctl"]
    # Unknown address: no host, no export. The lab host sees both volumes.
    assert not visible(lab, "A", "vv1", "127.0.0.9")
    assert visible(lab, "A", "vv1", "127.0.0.1") and visible(lab, "A", "vv2", "127.0.0.1")
    ctl("A", "createhost", name="h2", addresses=["127.0.0.2"])
    assert not visible(lab, "A", "vv2", "127.0.0.2")  # a host, but nothing exported to it yet
    ctl("A", "createvlun", volume="vv2", host="h2")
    assert visible(lab, "A", "vv2", "127.0.0.2")
    assert not visible(lab, "A", "vv1", "127.0.0.2")
    assert not visible(lab, "B", "vv2", "127.0.0.2")  # h2 is not defined on array B
    # Host sets: export vv1 to a set holding h2.
    ctl("A", "createhostset", name="cluster", hosts=["h2"])
    ctl("A", "createvlun", volume="vv1", host="set:cluster", lun=5)
    assert visible(lab, "A", "vv1", "127.0.0.2")
    vl = ctl("A", "showvlun")["vluns"]
    assert {"volume": "vv1", "host": "set:cluster", "lun": 5} in vl


def test_unexporting_disconnects_the_hosts_open_connection(lab):
    ctl = lab["ctl"]
    ctl("A", "createhost", name="h2", addresses=["127.0.0.2"])
    ctl("A", "createvlun", volume="vv2", host="h2")
    seen = {}

    async def main():
        async with open_nbd(uri(lab, "A", "vv2"), source="127.0.0.2") as c:
            await c.write(0, b"x" * 4096)
            seen["connections"] = (await trio.to_thread.run_sync(lambda: ctl("A", "showhost")))["hosts"]
            await trio.to_thread.run_sync(lambda: ctl("A", "removevlun", volume="vv2", host="h2"))
            try:
                with trio.fail_after(5):
                    await c.read(0, 4096)
                seen["after"] = "read succeeded"
            except (NBDDisconnected, NBDError, trio.BrokenResourceError, OSError) as e:
                seen["after"] = f"disconnected: {type(e).__name__}"

    try:
        trio.run(main)
    except BaseExceptionGroup as eg:  # the receiver task sees the close too
        seen.setdefault("after", f"disconnected: {eg!r}")
    h2 = next(h for h in seen["connections"] if h["name"] == "h2")
    assert h2["connections"] == 1
    assert seen["after"].startswith("disconnected"), seen
    assert not visible(lab, "A", "vv2", "127.0.0.2")


def test_proximity_sets_alua_per_host_and_showpaths_shows_it(lab):
    require_tool("nbdinfo")
    ctl = lab["ctl"]
    assert alua(lab, "A") == (0, 1) and alua(lab, "B") == (0, 1)
    # The lab host is near the secondary (B): A is active/non-optimized for it, B optimized.
    for site in ("A", "B"):
        ctl(site, "admitrcopyhost", host="lab", group="rcg1", proximity="secondary")
    assert alua(lab, "A") == (1, 1) and alua(lab, "B") == (0, 1)
    rows = ctl("A", "showpaths")["paths"]
    assert {(r["host"], r["volume"], r["state"], r["proximity"], r["role"]) for r in rows} == {
        ("lab", "vv1", "active/non-optimized", "secondary", "primary"),
        ("lab", "vv2", "active/non-optimized", "secondary", "primary"),
    }
    ctl("A", "admitrcopyhost", host="lab", group="rcg1", proximity="primary")
    assert alua(lab, "A") == (0, 1)
    # syncctl prints it as a table and as JSON.
    out = run(SYNCCTL, "--socket", lab["nodes"]["B"]["admin_socket"], "showpaths").stdout
    assert "active/optimized" in out and "vv2" in out
    js = json.loads(run(SYNCCTL, "--socket", lab["nodes"]["B"]["admin_socket"], "--json", "showpaths", "lab").stdout)
    assert {r["state"] for r in js["paths"]} == {"active/optimized"}


@pytest.mark.parametrize("cmd,args,msg", [
    ("createhost", {"name": "lab2", "addresses": ["127.0.0.1"]}, "already belongs to host lab"),
    ("createhost", {"name": "h9", "addresses": ["999.1.1.1"]}, "not an IP address"),
    ("createhost", {"name": "lab"}, "already exists"),
    ("removehost", {"name": "lab"}, "has exported volumes"),
    ("removehost", {"name": "nobody"}, "does not exist"),
    ("createvlun", {"volume": "vv9", "host": "lab"}, "volume vv9 does not exist"),
    ("createvlun", {"volume": "vv1", "host": "nobody"}, "host nobody does not exist"),
    ("createvlun", {"volume": "vv1", "host": "lab"}, "already exported"),
    ("createvlun", {"volume": "vv1", "host": "set:none"}, "host set none does not exist"),
    ("removevlun", {"volume": "vv1", "host": "nobody"}, "not exported to nobody"),
    ("admitrcopyhost", {"host": "lab", "group": "rcg1", "proximity": "near"}, "not one of primary, secondary, all"),
    ("admitrcopyhost", {"host": "nobody", "group": "rcg1"}, "host nobody does not exist"),
    ("admitrcopyhost", {"host": "lab", "group": "nogroup"}, "group nogroup does not exist"),
    ("createhostset", {"name": "s1", "hosts": ["nobody"]}, "host nobody does not exist"),
    ("removehostset", {"name": "s1"}, "does not exist"),
    ("showpaths", {"host": "nobody"}, "does not exist"),
])
def test_bad_host_input_is_refused_and_changes_nothing(lab, cmd, args, msg):
    ctl = lab["ctl"]
    before = (ctl("A", "showhost"), ctl("A", "showvlun"), ctl("A", "showpaths"))
    with pytest.raises(CtlError, match=msg):
        ctl("A", cmd, **args)
    assert (ctl("A", "showhost"), ctl("A", "showvlun"), ctl("A", "showpaths")) == before


def test_syncctl_host_verbs(lab, capsys):
    sock = lab["nodes"]["A"]["admin_socket"]
    assert syncctl(["--socket", sock, "createhost", "h5", "--address", "10.1.0.0/16"]) == 0
    assert syncctl(["--socket", sock, "createvlun", "vv1", "h5", "3"]) == 0
    assert syncctl(["--socket", sock, "admitrcopyhost", "-proximity", "primary", "h5", "rcg1"]) == 0
    assert syncctl(["--socket", sock, "showhost"]) == 0
    out = capsys.readouterr().out
    assert "10.1.0.0/16" in out
    assert syncctl(["--socket", sock, "removehost", "h5"]) == 1  # still exported


async def _alua_from(u: str, source: str) -> tuple[int, int]:
    from syncd.nbd.client import open_alua_probe

    async with open_alua_probe(u, source=source) as p:
        return await p.query()


def test_a_new_host_sees_the_seeds_initial_states_until_its_proximity_is_set(lab):
    """The seed, "Host array proximity": when active_active is applied (here: the group exists),
    a host's paths to the primary are active/optimized and to the secondary active/non-optimized
    until its proximity is set. Host h3 (127.0.0.3) is defined on both arrays, nothing admitted."""
    ctl = lab["ctl"]
    for site in ("A", "B"):
        ctl(site, "createhost", name="h3", addresses=["127.0.0.3"])
        ctl(site, "createvlun", volume="vv1", host="h3")

    def seen():
        return {s: trio.run(_alua_from, uri(lab, s, "vv1"), "127.0.0.3") for s in ("A", "B")}

    def shown():
        return {s: {(r["state"], r["proximity"]) for r in ctl(s, "showpaths", host="h3")["paths"]} for s in ("A", "B")}

    assert seen() == {"A": (0, 1), "B": (1, 1)}  # active/optimized, active/non-optimized at epoch 1
    assert shown() == {"A": {("active/optimized", None)}, "B": {("active/non-optimized", None)}}
    # The lab host (proximity all on both arrays) is unaffected.
    assert trio.run(_alua_from, uri(lab, "B", "vv1"), "127.0.0.1") == (0, 1)
    # Proximity "all" (the seed's rule for Active Sync hosts) makes B optimized too; dismissing
    # it brings the initial states back.
    ctl("B", "admitrcopyhost", host="h3", group="rcg1", proximity="all")
    assert seen() == {"A": (0, 1), "B": (0, 1)}
    ctl("B", "dismissrcopyhost", host="h3", group="rcg1")
    assert seen() == {"A": (0, 1), "B": (1, 1)}


def test_an_empty_host_definition_is_allowed(lab):
    """The seed: "For the hosts that are not attached to a given site, the host definition can be
    empty (no initiators)"; volumes are exported to it too. It matches no connection."""
    sock = lab["nodes"]["B"]["admin_socket"]
    assert syncctl(["--socket", sock, "createhost", "esx-a"]) == 0
    assert syncctl(["--socket", sock, "createvlun", "vv1", "esx-a", "7"]) == 0
    h = next(h for h in lab["ctl"]("B", "showhost")["hosts"] if h["name"] == "esx-a")
    assert (h["addresses"], h["tls_names"], h["connections"]) == ([], [], 0)
    assert {"volume": "vv1", "host": "esx-a", "lun": 7} in lab["ctl"]("B", "showvlun")["vluns"]
    assert [r["state"] for r in lab["ctl"]("B", "showpaths", host="esx-a")["paths"]] == ["active/non-optimized"]
    assert not visible(lab, "B", "vv1", "127.0.0.9")  # still nobody's address
    # Cabled later: createhost --add gives it an initiator, and that address sees its export.
    before = lab["ctl"]("B", "showhost")
    assert syncctl(["--socket", sock, "createhost", "--add", "esx-a", "--address", "127.0.0.1"]) == 1  # lab's
    assert syncctl(["--socket", sock, "createhost", "--add", "nobody", "--address", "127.0.0.8"]) == 3
    assert lab["ctl"]("B", "showhost") == before
    assert syncctl(["--socket", sock, "createhost", "--add", "esx-a", "--address", "127.0.0.8"]) == 0
    h = next(h for h in lab["ctl"]("B", "showhost")["hosts"] if h["name"] == "esx-a")
    assert h["addresses"] == ["127.0.0.8/32"]
    assert visible(lab, "B", "vv1", "127.0.0.8")
    assert syncctl(["--socket", sock, "removevlun", "vv1", "esx-a"]) == 0
    assert syncctl(["--socket", sock, "removehost", "esx-a"]) == 0
