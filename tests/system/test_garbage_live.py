"""Garbage on a live node's NBD port and replication port never hurts the node or its peer."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.lab.workload import History, check_file, run_writer

pytestmark = pytest.mark.system

NBD_OPT_HEAD = struct.pack(">I", 3)  # client flags: fixed newstyle, no zeroes
IHAVEOPT = struct.pack(">Q", 0x49484156454F5054)


def blast(addr: tuple[str, int], payload: bytes) -> None:
    s = socket.create_connection(addr, timeout=2)
    try:
        s.settimeout(0.3)
        try:
            s.recv(4096)  # NBD greeting, if any
        except OSError:
            pass
        s.sendall(payload)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    finally:
        s.close()


def hostport(uri: str) -> tuple[str, int]:
    hp = uri[6:].split("/")[0]
    h, _, p = hp.rpartition(":")
    return h, int(p)


def test_garbage_never_crashes_a_node(lab):
    nbd_b = hostport(lab["nodes"]["B"]["volumes"]["vv1"]["uri"])
    import tomllib

    cfg_b = tomllib.loads(open(lab["nodes"]["B"]["config"]).read())
    repl_b = [hostport("nbd://" + p["local"]) for p in cfg_b["link"]["paths"]]

    nbd_inputs = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda opt, ln, body: NBD_OPT_HEAD + IHAVEOPT + struct.pack(">II", opt, ln) + body,
                  st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
        st.builds(lambda hdr: NBD_OPT_HEAD + IHAVEOPT + struct.pack(">II", 7, 6) + b"\0\0\0\x03vv1" + hdr,
                  st.binary(min_size=28, max_size=60)),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(nbd_inputs, st.binary(max_size=200), st.sampled_from([0, 1]))
    def attack(nbd_payload, repl_payload, which):
        blast(nbd_b, nbd_payload)
        blast(repl_b[which % len(repl_b)], b"SYNC" + repl_payload if which else repl_payload)

    attack()

    # Both nodes still serve, mirror and agree.
    import trio

    h = History()
    trio.run(lambda: run_writer(lab["nodes"]["B"]["volumes"]["vv1"]["uri"], h, writer=3, blocks=range(64),
                                duration=1.0, qd=2))
    assert h.acked_count() > 0 and not h.errors
    for site in ("A", "B"):
        assert check_file(lab["nodes"][site]["volumes"]["vv1"]["path"], h, writer=3) == []
    assert lab["ctl"]("A", "showrcopy")["link"]["paths_up"] == 2
