"""``base:allocation`` extents: what a backing file says of its holes, and the rules a reply keeps.

An extent is ``(length, flags)`` with the NBD protocol's ``NBD_STATE_HOLE`` (1) and
``NBD_STATE_ZERO`` (2). A reply built here always keeps the protocol's rules: it starts at the
request's offset, its extents are non-empty, in order and consecutive, it covers no more than
the request, and it has at most ``max_extents`` of them (it may cover less than asked: the client
asks again from where it ends). Flags 0 ("data") is always a correct answer; a hole is reported
only where the backing file says so and nothing says the bytes there may not be final.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

STATE_HOLE = 1
STATE_ZERO = 2
HOLE = STATE_HOLE | STATE_ZERO  # a hole in a file reads as zeroes
DATA = 0

Extent = tuple[int, int]


def scan(fd: int, offset: int, length: int, max_extents: int) -> list[Extent]:
    """Data and hole extents of ``[offset, offset+length)`` of a file, from SEEK_DATA/SEEK_HOLE,
    at most ``max_extents`` of them. Where the file cannot tell (no SEEK_DATA support, an
    error), the rest is data."""
    end = offset + length
    out: list[Extent] = []
    pos = offset
    while pos < end and len(out) < max_extents:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: nothing but a hole up to the end of the file
                break
            data = end
        if data > pos:
            n = min(data, end) - pos
            out.append((n, HOLE))
            pos += n
            continue
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        except OSError:
            break
        if hole <= pos:  # a file changing under us: say data for the rest
            break
        out.append((hole - pos, DATA))
        pos = hole
    if pos < end and len(out) < max_extents:
        out.append((end - pos, DATA))
    return out


def cover_with_data(extents: list[Extent], offset: int, ranges: Iterable[tuple[int, int]]) -> list[Extent]:
    """``extents`` (starting at ``offset``) with every byte inside one of ``ranges``
    (``(start, length)``, in any order) reported as data: regions whose bytes the local replica
    may not hold yet."""
    spans = sorted((s, s + n) for s, n in ranges if n > 0)
    if not spans:
        return merge(extents)
    out: list[Extent] = []
    pos = offset
    i = 0
    for ln, flags in extents:
        end = pos + ln
        p = pos
        while p < end:
            while i < len(spans) and spans[i][1] <= p:
                i += 1
            if flags == DATA or i == len(spans) or spans[i][0] >= end:
                out.append((end - p, flags))
                p = end
            elif spans[i][0] > p:
                out.append((spans[i][0] - p, flags))
                p = spans[i][0]
            else:
                stop = min(spans[i][1], end)
                out.append((stop - p, DATA))
                p = stop
        pos = end
    return merge(out)


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Neighbours with the same flags joined, empty extents dropped."""
    out: list[Extent] = []
    for ln, flags in extents:
        if ln <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + ln, flags)
        else:
            out.append((ln, flags))
    return out


def bound(extents: list[Extent], length: int, max_extents: int, req_one: bool = False) -> list[Extent]:
    """A reply's extents: at most ``max_extents`` (one with ``req_one``), covering no more than
    ``length``, each of at most 2**32-1 bytes (the wire field), never empty; data for the whole
    request if nothing is left."""
    out: list[Extent] = []
    left = length
    for ln, flags in extents:
        if left <= 0:
            break
        ln = min(ln, left, 0xFFFFFFFF)
        if ln <= 0:
            continue
        out.append((ln, flags))
        left -= ln
        if len(out) >= (1 if req_one else max_extents):
            break
    return out or [(min(length, 0xFFFFFFFF), DATA)]


def validate(raw: list[Extent], length: int) -> list[Extent] | None:
    """The ``base:allocation`` extents another server sent for a request of ``length`` bytes, or
    None when they break the protocol's rules (the caller then says data: always correct).

    The descriptors of one reply are consecutive from the request's offset, so they are in
    order by construction; what an untrusted server can get wrong is sending none, an empty
    one, or more than the request (their lengths' sum must not exceed it). Status bits that
    ``base:allocation`` does not define are ignored, as the protocol says a client must."""
    if not raw or length <= 0:
        return None
    out: list[Extent] = []
    pos = 0
    for ln, flags in raw:
        if ln <= 0:
            return None
        pos += ln
        if pos > length:
            return None
        out.append((ln, flags & HOLE))
    return out
