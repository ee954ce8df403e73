"""The security handshake in key mode, end to end in memory (secure.py, proto/security.md)."""

from __future__ import annotations

import pytest

from syncd import secure

KEY = b"a shared key of 32 bytes.......!"


def pair(dialer_key: bytes = KEY, listener_key: bytes = KEY):
    d = secure.Handshake(secure.Security("key", key=dialer_key), secure.Role.DIALER, "A", "B")
    lis = secure.Handshake(secure.Security("key", key=listener_key), secure.Role.LISTENER, "B", "A")
    return d, lis


def test_both_ends_finish_and_their_records_verify():
    d, lis = pair()
    d_pre, l_pre = d.take_output(), lis.take_output()
    d.receive(l_pre)
    lis.receive(d_pre)
    assert lis.take_output() == b""  # nothing but the preface before the dialer has proved the key
    lis.receive(d.take_output())
    assert lis.done
    d.receive(lis.take_output())
    assert d.done
    wire = b"".join(bytes(b) for b in d.channel.wrap([b"hello ", b"world"]))
    assert lis.channel.unwrap(wire) == b"hello world"
    with pytest.raises(secure.AuthError, match="integrity"):
        lis.channel.unwrap(wire)  # the same record again: its sequence number has passed


def test_a_prober_without_the_key_gets_nothing_computed_from_it():
    d, lis = pair(dialer_key=b"not the key, but as long.......!")
    lis.take_output()
    lis.receive(d.take_output())
    d.receive(secure.build_preface("key", secure.Role.LISTENER, bytes(32), "B"))
    with pytest.raises(secure.AuthError, match="failed to prove"):
        lis.receive(d.take_output())
    assert lis.take_output() == b""
