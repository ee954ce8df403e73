"""Path selection and failover rules of the host shim (syncd/host.py), on fake paths."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from syncd.host import HostConfig, Path, Shim, ShimVolume
from syncd.nbd.client import NBDDisconnected, NBDError
from syncd.nbd.export import BlockError

AO, ANO, U, T = 0, 1, 3, 15


class FakeClient:
    def __init__(self, name, log, fail=None):
        self.name, self.log, self.fail, self.closed = name, log, fail, False

    async def write(self, offset, data, fua=False):
        self.log.append((self.name, "write", offset, trio.current_time()))
        if self.fail:
            raise self.fail()

    async def read(self, offset, length):
        self.log.append((self.name, "read", offset, trio.current_time()))
        return bytes(length)

    def abort_on_close(self):
        self.closed = True


def volume(states, fails=None, **cfg):
    shim = Shim(HostConfig("h", "s", (), "a", **cfg))
    v = ShimVolume(shim, "vv1", "naa.1", 1 << 20)
    log = []
    for i, (st, ep) in enumerate(states):
        p = Path("A" if i == 0 else "B", f"nbd://x:{i}/vv1", state=st, epoch=ep)
        p.client = FakeClient(i, log, (fails or {}).get(i))
        v.paths.append(p)
    v.note_change()
    return v, log


async def test_optimized_first_then_non_optimized_never_unavailable_or_older_epoch():
    v, log = volume([(ANO, 1), (AO, 1)])
    await v.write(0, b"x", False)
    assert log[-1][0] == 1
    v, log = volume([(U, 1), (ANO, 1)])
    await v.write(0, b"x", False)
    assert log[-1][0] == 1
    v, log = volume([(AO, 1), (ANO, 2)])  # path 0 reports an older epoch than seen for the volume
    await v.write(0, b"x", False)
    assert log[-1][0] == 1


async def test_shutdown_error_rereads_and_reissues_on_the_other_path():
    v, log = volume([(AO, 1), (ANO, 1)], fails={0: lambda: NBDError(108, "not serving")})
    await v.write(0, b"x", False)
    assert [x[0] for x in log] == [0, 1] and v.paths[0].state == U


async def test_transport_error_reissues_and_quarantines_the_range(autojump_clock):
    v, log = volume([(AO, 1), (ANO, 1)], fails={0: NBDDisconnected}, stale_write_bound=15.0)
    t0 = trio.current_time()
    await v.write(4096, b"x" * 4096, False)
    assert [x[0] for x in log] == [0, 1]
    await v.write(1 << 16, b"y" * 4096, False)  # elsewhere: not delayed
    assert log[-1][3] - t0 < 1
    await v.write(6000, b"z" * 10, False)  # overlaps the re-issued write: waits out the bound
    assert log[-1][3] - t0 >= 15.0 and v.stats["quarantine_waits"] == 1


async def test_no_usable_path_queues_then_fails(autojump_clock):
    v, log = volume([(U, 1), (U, 1)], no_path_retry=3.0)
    t0 = trio.current_time()
    with pytest.raises(BlockError) as ei:
        await v.write(0, b"x", False)
    assert ei.value.errno == errno.EIO and 3.0 <= trio.current_time() - t0 < 4.0 and log == []


async def test_no_usable_path_then_one_returns(autojump_clock):
    v, log = volume([(U, 1), (T, 1)])

    async def later():
        await trio.sleep(2.0)
        v.paths[1].state, v.paths[1].epoch = AO, 2
        v.note_change()

    async with trio.open_nursery() as n:
        n.start_soon(later)
        await v.write(0, b"x", False)
    assert log[-1][0] == 1 and log[-1][3] >= 2.0


async def test_quarantine_ends_when_the_epoch_moves_on(autojump_clock):
    v, log = volume([(AO, 1), (ANO, 1)], fails={0: NBDDisconnected}, stale_write_bound=15.0)
    await v.write(0, b"x" * 4096, False)

    async def failover():
        await trio.sleep(2.0)
        v.paths[1].state, v.paths[1].epoch = AO, 2
        v.note_change()

    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(failover)
        await v.write(0, b"y" * 4096, False)
    assert 2.0 <= log[-1][3] - t0 < 3.0


async def test_round_robin_spreads_over_the_optimized_paths_only():
    v, log = volume([(AO, 1), (AO, 1), (ANO, 1)], path_selector="round-robin")
    for i in range(6):
        await v.write(i * 4096, b"x", False)
    assert sorted({x[0] for x in log}) == [0, 1] and [x[0] for x in log].count(0) == 3


async def test_immediate_failback_when_the_optimized_path_returns():
    v, log = volume([(None, 1), (ANO, 1)])
    v.paths[0].client = None  # path 0 down: the non-optimized path carries the I/O
    await v.write(0, b"x", False)
    assert log[-1][0] == 1
    v.paths[0].client = FakeClient(0, log)  # path 0 reconnected and probed active/optimized
    v.paths[0].state = AO
    v.note_change()
    await v.write(0, b"x", False)
    await v.read(0, 4096)
    assert [x[0] for x in log[-2:]] == [0, 0]
