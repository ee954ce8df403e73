"""Online verify: ``syncctl checkrcopyvv VOLUME [--fix]`` compares both replicas of a volume
by xxh3 digests, region by region, while hosts keep reading and writing.

The primary walks the volume in batches of regions. For each batch it takes the volume's range
lock (so no host write to those regions is in flight on either replica: mirrored writes hold it
until the peer applied them, forwarded ones until the peer released them), asks the peer for
its digests and computes its own, then lets go. Host writes to a batch being compared wait for
that one exchange (a few milliseconds); between batches verify yields to host I/O like resync
(``link.resync_share``). Regions that differ are reported; with ``fix`` they are marked for
resync and copied from the primary (the peer forwards reads of them to the primary meanwhile),
after the primary's copy was made durable (``fix_regions``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from ..repl.link import LinkDown, LinkTimeout
from .resync import VERIFY_BATCH, ResyncFailed, region_digests
from .roles import Mode

if TYPE_CHECKING:
    from .daemon import Node
    from .group import Group, Member


class VerifyError(Exception):
    pass


def _runs(regions: list[int], region: int, size: int) -> list[list[int]]:
    """Consecutive regions merged into [offset, length] byte ranges."""
    out: list[list[int]] = []
    for r in regions:
        off = r * region
        ln = min(region, size - off)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += ln
        else:
            out.append([off, ln])
    return out


async def fix_regions(node: "Node", g: "Group", m: "Member", regions: list[int]) -> None:
    """Copy ``regions`` of ``m``, which differ at the peer, from this primary again.

    Marking them for resync makes the peer no longer hold every write (``NeedSync``), but the
    primary keeps ``peer_has_all`` set on disk until the writes it applied before are durable
    (``RoleState.flush_pending``): a power cut meanwhile makes the restart fetch back from the
    peer the regions its write-intent log names, these among them, from the copy just found
    wrong (found by review). So, with the volume's writes held off for a moment (its whole range
    lock: every write in flight has been applied here): this array's copy is made durable, the
    regions are saved as ones the peer holds wrong (``Member.peer_wrong``: a restart copies
    them, never fetches them back), then marked. Writes after that are made durable here before
    they are acknowledged, as always while the peer lacks regions."""
    tok = await m.lock.acquire(0, m.vol.size)
    try:
        if g.role != "primary":
            raise VerifyError(f"checkrcopyvv: group {g.name} is no longer primary here; run it on {g.st.peer}")
        try:
            await m.vol.durable()
        except OSError as e:
            raise VerifyError(f"checkrcopyvv {m.st.local}: this array's copy cannot be made durable ({e}); "
                              "the differing regions are not copied") from None
        for r in regions:
            m.peer_wrong.set(r)
            m.dirty.set(r)  # before the save: it keeps only the bits of regions still to copy
        node.save()
        g.resync_regions(m, regions)
    finally:
        m.lock.release(tok)


async def verify_member(node: "Node", g: "Group", m: "Member", fix: bool = False) -> dict:
    def check_attached() -> None:
        if g.role != "primary":
            raise VerifyError(f"checkrcopyvv: group {g.name} is no longer primary here; run it on {g.st.peer}")
        if g.mode is not Mode.ATTACHED:
            raise VerifyError(f"checkrcopyvv: group {g.name} is not in sync ({g.mode.value}): verify compares "
                              "in-sync replicas; wait for the resync to finish")

    check_attached()
    region = m.dirty.region
    n = m.dirty.nregions
    size = m.vol.size
    differ: list[int] = []
    t0 = time.monotonic()
    share = node.cfg.link.resync_share
    try:
        for r0 in range(0, n, VERIFY_BATCH):
            r1 = min(r0 + VERIFY_BATCH, n)
            off = r0 * region
            ln = min(r1 * region, size) - off
            step = trio.current_time()
            tok = await m.lock.acquire(off, ln)
            try:
                check_attached()
                local, remote = await region_digests(node, g, m, off, ln, region)
            finally:
                m.lock.release(tok)
            differ += [r0 + i for i, (a, b) in enumerate(zip(local, remote, strict=True)) if a != b]
            took = trio.current_time() - step
            if trio.current_time() - g.io.last_host_io < 0.5 and share < 1:
                await trio.sleep(took * (1 - share) / share)
    except (LinkDown, LinkTimeout, ResyncFailed) as e:
        raise VerifyError(f"checkrcopyvv {m.st.local}: interrupted: {e}") from None
    seconds = time.monotonic() - t0
    result = {
        "volume": m.st.local, "group": g.name, "peer_volume": m.st.remote, "region_size": region, "regions": n,
        "bytes_compared": size, "seconds": round(seconds, 3),
        "mb_per_s": round(size / seconds / 1e6, 1) if seconds > 0 else None,
        "differing_regions": len(differ), "differing": _runs(differ, region, size), "fixing": False,
    }
    if differ:
        g.note(f"verify of {m.st.local}: REPLICAS DIFFER: {len(differ)} regions differ from {g.st.peer}"
               + ("; copying them again from this primary" if fix else
                  f"; run 'syncctl checkrcopyvv {m.st.local} --fix' to copy them from this primary"), logging.ERROR)
        if fix:
            await fix_regions(node, g, m, differ)
            result["fixing"] = True
    else:
        g.note(f"verify of {m.st.local}: replicas identical")
    # The verify's outcome, on the event stream (and the replicas_differ hook): the last one
    # per volume is part of the snapshot; every verify is one event (its time is a fact).
    node.events.update("verify", {"group": g.name, "volume": m.st.local, "peer": g.st.peer,
                                  "result": "differ" if differ else "same", "differing_regions": len(differ),
                                  "differing_bytes": sum(ln for _, ln in result["differing"]),
                                  "bytes_compared": size, "fixing": result["fixing"],
                                  "verified_at": round(time.time(), 3)})
    return result
