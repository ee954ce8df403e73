"""Several node instances per array sharing one quorum witness (docs/design.md section 10, the
way syncd uses more than one core): pairs A1/B1 and A2/B2, each with its own group, volume,
ports and data directory, all four nodes admitted by one witness. When A1 fails, B1 takes
group g1 over automatically through the shared witness while pair 2 goes on untouched; A1
rejoins as secondary and both pairs end with identical replicas and no acknowledged write lost."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time

import pytest
import trio

from syncd.ctl import call, wait_synced
from syncd.lab.rig import _spawn, _wait_gone, _wait_socket, free_port, node_toml
from syncd.lab.workload import History, check_file, run_writer

from .rig import FAST_LINK, WITNESS, file_digest, wait_for

pytestmark = pytest.mark.system

PAIRS = ("1", "2")
SIZE = 16 << 20


def group(n: dict, name: str) -> dict:
    return call(n["admin_socket"], "showrcopy", {"group": name})["groups"][0]


@pytest.fixture
def fleet(tmp_path):
    key, py = secrets.token_hex(24), sys.executable
    wport = free_port()
    (tmp_path / "W").mkdir()
    wtoml = tmp_path / "W" / "witness.toml"
    wtoml.write_text(
        f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{wport}"]\nstate_dir = "state"\nkey = "{key}"\n'
        'nodes = ["A1", "B1", "A2", "B2"]\n'
        + "".join(f"{k} = {v}\n" for k, v in WITNESS.items() if k != "interval"))
    pids = [_spawn([py, "-m", "syncd", "witness", "--config", str(wtoml)], tmp_path / "W.log")]
    nodes: dict[str, dict] = {}
    try:
        for k in PAIRS:
            ports = {s: {"nbd": free_port(), "paths": [free_port(), free_port()]} for s in ("A", "B")}
            for s, peer in (("A", "B"), ("B", "A")):
                name, d = f"{s}{k}", tmp_path / f"{s}{k}"
                d.mkdir()
                paths = list(zip(ports[s]["paths"], ports[peer]["paths"], strict=True))
                wcfg = {"address": f"127.0.0.1:{wport}", "key": key, "name": "W",
                        **{x: WITNESS[x] for x in ("interval", "owner_lease", "grace")}}
                cfg = d / "node.toml"
                cfg.write_text(node_toml(name, f"{peer}{k}", d, ports[s]["nbd"], paths,
                                         [(f"vol{k}", d / f"vol{k}.img", SIZE)],
                                         dict(FAST_LINK, key=key), wcfg))
                log = d / "node.log"
                nodes[name] = {"config": str(cfg), "log": log, "admin_socket": str(d / "admin.sock"),
                               "uri": f"nbd://127.0.0.1:{ports[s]['nbd']}/vol{k}", "img": str(d / f"vol{k}.img"),
                               "pid": _spawn([py, "-m", "syncd", "node", "--config", str(cfg)], log)}
        for n in nodes.values():
            _wait_socket(n["admin_socket"], n["pid"], n["log"])
        for k in PAIRS:
            a = nodes[f"A{k}"]["admin_socket"]
            wait_for(lambda a=a, k=k: _try(call, a, "creatercopygroup", {"group": f"g{k}", "target": f"B{k}"}),
                     what=f"group g{k} created")
            call(a, "admitrcopyvv", {"volume": f"vol{k}", "group": f"g{k}", "target_volume": f"B{k}:vol{k}"})
            call(a, "startrcopygroup", {"group": f"g{k}"})
            for s in ("A", "B"):
                sock = nodes[f"{s}{k}"]["admin_socket"]
                call(sock, "createhost", {"name": "lab", "addresses": ["127.0.0.1"]})
                call(sock, "createvlun", {"volume": f"vol{k}", "host": "lab", "lun": 0})
                call(sock, "admitrcopyhost", {"host": "lab", "group": f"g{k}", "proximity": "all"})
            wait_synced(a, f"g{k}", 60, None)
        for k in PAIRS:
            wait_for(lambda k=k: group(nodes[f"B{k}"], f"g{k}")["serving"], what=f"B{k} serves g{k}")
            wait_for(lambda k=k: call(nodes[f"A{k}"]["admin_socket"], "showrcopy")["witness"]["reachable"],
                     what=f"A{k} reaches the witness")
        time.sleep(5 * WITNESS["interval"])  # the primaries' reports told the witness: peers in sync
        yield nodes
    finally:
        pids += [n["pid"] for n in nodes.values()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_gone([("process", p) for p in pids], 10)


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception as e:  # noqa: BLE001 - "not ready" until the link is up
        if "not ready" in str(e):
            return False
        raise


def restart(n: dict) -> None:
    n["pid"] = _spawn([sys.executable, "-m", "syncd", "node", "--config", n["config"]], n["log"])
    _wait_socket(n["admin_socket"], n["pid"], n["log"])


def test_instance_pairs_share_one_witness_and_fail_over_independently(fleet):
    h1, h2 = History(), History()
    t: dict = {}

    async def main():
        async with trio.open_nursery() as nursery:
            # a writer on each pair, at the site that survives (B1) and at the untouched pair
            nursery.start_soon(lambda: run_writer(fleet["B1"]["uri"], h1, writer=1, blocks=range(0, 1024),
                                                  duration=6, qd=4))
            nursery.start_soon(lambda: run_writer(fleet["A2"]["uri"], h2, writer=2, blocks=range(0, 1024),
                                                  duration=6, qd=4))
            await trio.sleep(1.0)
            os.kill(fleet["A1"]["pid"], signal.SIGKILL)
            t["kill"] = time.monotonic()

    trio.run(main)
    g1, g2 = group(fleet["B1"], "g1"), group(fleet["A2"], "g2")
    assert (g1["role"], g1["epoch"]) == ("primary", 2), g1
    assert (g2["role"], g2["epoch"], g2["peer_mode"]) == ("primary", 1, "attached"), g2
    assert [x for x in h1.acked_times if x > t["kill"]], "B1 never served writes after A1 failed"
    assert h1.errors == [] and h2.errors == [], (h1.errors[:3], h2.errors[:3])
    # The witness keeps the two pairs' groups apart: pair 2's owner and epoch never moved.
    assert group(fleet["B2"], "g2")["epoch"] == 1

    restart(fleet["A1"])
    wait_for(lambda: (group(fleet["A1"], "g1")["role"], group(fleet["A1"], "g1")["epoch"]) == ("secondary", 2),
             what="A1 rejoins as secondary")
    wait_for(lambda: all(v["sync_status"] == "synced" for v in group(fleet["B1"], "g1")["volumes"]),
             timeout=60, what="g1 resynced")
    for k, h, writer in (("1", h1, 1), ("2", h2, 2)):
        for s in ("A", "B"):
            assert check_file(fleet[f"{s}{k}"]["img"], h, writer=writer) == [], f"{s}{k} lost acknowledged writes"
    for name in ("A1", "B1", "A2", "B2"):  # a clean stop: nothing left in flight
        os.kill(fleet[name]["pid"], signal.SIGTERM)
    _wait_gone([("process", fleet[n]["pid"]) for n in fleet], 20)
    for k in PAIRS:
        assert file_digest(fleet[f"A{k}"]["img"]) == file_digest(fleet[f"B{k}"]["img"]), f"pair {k} differs"
