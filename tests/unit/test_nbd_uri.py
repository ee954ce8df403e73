"""NBD URIs as the host shim and the tools take them (the NBD project's URI format)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.nbd.client import NbdUri, parse_uri


@pytest.mark.parametrize("uri,want", [
    ("nbd://10.0.0.1:10810/vv1", NbdUri("vv1", "10.0.0.1", 10810)),
    ("nbd://array-a/vv1", NbdUri("vv1", "array-a", 10809)),
    ("nbds://[::1]:10809/vv%202", NbdUri("vv 2", "::1", 10809, tls=True)),
    ("nbd+unix:///vv1?socket=/run/syncd/nbd.sock", NbdUri("vv1", socket="/run/syncd/nbd.sock")),
    ("nbds+unix:///?socket=s", NbdUri("", socket="s", tls=True)),
    ("nbd://127.0.0.1:10809", NbdUri("", "127.0.0.1", 10809)),
])
def test_parses(uri, want):
    assert parse_uri(uri) == want


@pytest.mark.parametrize("uri,msg", [
    ("http://x/vv1", "not an NBD URI"),
    ("10.0.0.1:10809", "not an NBD URI"),
    ("nbd+unix:///vv1", "socket=PATH"),
    ("nbd+unix://host/vv1?socket=s", "no host"),
    ("nbd://h:99999/vv1", "bad port"),
    ("nbd://h:port/vv1", "bad port"),
])
def test_bad_uri_is_named(uri, msg):
    with pytest.raises(ValueError, match=msg):
        parse_uri(uri)


names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20)


@given(st.builds(NbdUri, names, st.sampled_from(["10.1.2.3", "::1", "array-b"]), st.integers(1, 65535),
                 st.none(), st.booleans())
       | st.builds(NbdUri, names, socket=st.sampled_from(["/run/x.sock", "/tmp/a b&c.sock"]), tls=st.booleans()))
def test_round_trip(u):
    assert parse_uri(str(u)) == u
