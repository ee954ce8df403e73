"""The NBD client against the in-process server over a unix socket: nbd+unix URIs, errors the
caller raises come back as themselves (not wrapped in an exception group), and a draining
server refuses new requests with ESHUTDOWN."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from syncd.nbd.client import NBDError, list_exports, open_alua_probe, open_nbd
from syncd.nbd.export import FileExport, StaticCatalog
from syncd.nbd.server import NBDServer


@pytest.fixture
async def server(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    exp = FileExport("vv1", str(img), description="test wwn=naa.6x")
    srv = NBDServer(StaticCatalog({"vv1": exp}))
    sock = str(tmp_path / "nbd.sock")
    async with trio.open_nursery() as n:
        await n.start(srv.serve_unix, sock)
        yield srv, f"nbd+unix:///vv1?socket={sock}"
        n.cancel_scope.cancel()
    exp.close()


async def test_unix_uri_reads_writes_lists_and_probes(server):
    _, uri = server
    async with open_nbd(uri) as c:
        await c.write(4096, b"x" * 4096)
        assert await c.read(4096, 4096) == b"x" * 4096
        assert c.size == 1 << 20
    assert ("vv1", "test wwn=naa.6x") in await list_exports(uri)
    async with open_alua_probe(uri) as p:
        assert await p.query() == (0, 0)  # a plain file export: active/optimized, epoch 0


async def test_the_callers_exception_is_not_wrapped(server):
    _, uri = server
    with pytest.raises(trio.TooSlowError):
        async with open_nbd(uri) as c:
            with trio.fail_after(0.01):
                await trio.sleep(1)
    with pytest.raises(KeyError):
        async with open_nbd(uri) as c:
            await c.flush()
            raise KeyError("mine")


async def test_a_draining_server_refuses_new_requests_with_eshutdown(server):
    srv, uri = server
    async with open_nbd(uri) as c:
        await c.write(0, b"y" * 512)
        with trio.move_on_after(1.0):
            await srv.drain()
        with pytest.raises(NBDError) as e:
            await c.write(0, b"z" * 512)
        assert e.value.errno == errno.ESHUTDOWN
        with pytest.raises(NBDError):
            await c.read(0, 512)


async def test_a_connection_closed_while_a_request_waits_to_send_is_a_disconnection(server):
    """The host shim closes a path's connection when one of its requests fails; another request
    already past the closed check and waiting for the send lock must see NBDDisconnected (which
    the shim re-issues on another path), not trio's ClosedResourceError (CI: a host lost its
    connection when an array was killed)."""
    from syncd.nbd.client import NBDDisconnected

    _, uri = server
    async with open_nbd(uri) as c:
        await c.write(0, b"a" * 512)
        outcome: list[BaseException] = []

        async def second() -> None:
            try:
                await c.write(512, b"b" * 512)
            except BaseException as e:  # noqa: BLE001 - the test looks at what came out
                outcome.append(e)

        async with trio.open_nursery() as n:
            async with c._send_lock:
                n.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                await c.stream.aclose()  # as the shim's path manager does after fail_path
        assert len(outcome) == 1 and isinstance(outcome[0], NBDDisconnected), outcome
        assert c.closed and not c._waiting
