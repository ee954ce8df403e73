"""Hosts, host sets and VLUNs on one array: which connection is which host, and which volumes a
host may see (LUN masking).

A connection is recognised by its TLS identity when it has one, then (iSCSI) by its initiator
name, else by its source address:
the host whose address entry is the most specific network containing it wins. An address entry
(as a network) belongs to one host only, so the answer is never ambiguous. A connection that
matches no host sees no export at all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..nbd.export import ClientIdentity
from .state import HostState, NodeState

PROXIMITIES = ("primary", "secondary", "all")
SET_PREFIX = "set:"


class HostError(ValueError):
    """Bad host, host set or VLUN input; the message names the problem."""


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise HostError(f"{text!r} is not an IP address or network "
                        "(examples: 10.0.0.5, 10.0.0.0/24, fd00::/64)") from None


@dataclass(frozen=True)
class _Entry:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    host: str


class HostTable:
    """A read-only index over the node state's hosts, sets and VLUNs; rebuilt on every change."""

    def __init__(self, st: NodeState):
        self.st = st
        self.by_tls = {n: h.name for h in st.hosts.values() for n in h.tls_names}
        self.by_iqn = {q: h.name for h in st.hosts.values() for q in h.iqns}
        entries = [_Entry(parse_network(a), h.name) for h in st.hosts.values() for a in h.addresses]
        # Most specific first; a lookup takes the first network that contains the address.
        self.entries = sorted(entries, key=lambda e: -e.net.prefixlen)
        self.sets_of: dict[str, list[str]] = {}
        for s, members in st.hostsets.items():
            for h in members:
                self.sets_of.setdefault(h, []).append(s)
        self._cache: dict[tuple, str | None] = {}

    def host_for(self, ident: ClientIdentity) -> str | None:
        key = (ident.tls_name, ident.address, ident.iqn)
        if key in self._cache:
            return self._cache[key]
        host = None
        if ident.tls_name is not None:
            host = self.by_tls.get(ident.tls_name)
        if host is None and ident.iqn is not None:
            host = self.by_iqn.get(ident.iqn)
        if host is None and ident.address:
            try:
                ip = ipaddress.ip_address(ident.address.split("%", 1)[0])
            except ValueError:
                ip = None
            if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            for e in self.entries:
                if ip is not None and ip.version == e.net.version and ip in e.net:
                    host = e.host
                    break
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = host
        return host

    def targets_of(self, host: str) -> set[str]:
        return {host} | {SET_PREFIX + s for s in self.sets_of.get(host, [])}

    def volumes_for(self, host: str | None) -> dict[str, int]:
        """Volume name -> LUN for what ``host`` may see (the lowest LUN if exported twice)."""
        if host is None:
            return {}
        targets = self.targets_of(host)
        out: dict[str, int] = {}
        for v in self.st.vluns:
            if v.target in targets and (v.volume not in out or v.lun < out[v.volume]):
                out[v.volume] = v.lun
        return out


# -- validation used by the admin commands (pure: they raise before anything changes) ---------

def _check_initiators(st: NodeState, name: str, addresses: list[str],
                      tls_names: list[str], iqns: list[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """Addresses/networks, TLS names and iSCSI names for host ``name``: well formed, none given
    twice, none held by a host already (another, or ``name`` itself when adding)."""
    from ..config import check_iscsi_name

    if len(set(iqns)) != len(iqns):
        raise HostError(f"host {name}: an iSCSI name is given twice")
    iqn_taken = {q: h.name for h in st.hosts.values() for q in h.iqns}
    for q in iqns:
        check_iscsi_name(q, "iSCSI name", HostError)
        if q in iqn_taken:
            raise HostError(f"iSCSI name {q} already belongs to host {iqn_taken[q]}")
    nets = [parse_network(a) for a in addresses]
    if len(set(nets)) != len(nets):
        raise HostError(f"host {name}: an address is given twice")
    if len(set(tls_names)) != len(tls_names):
        raise HostError(f"host {name}: a TLS name is given twice")
    taken = {parse_network(a): h.name for h in st.hosts.values() for a in h.addresses}
    for n in nets:
        if n in taken:
            raise HostError(f"initiator {n} already belongs to host {taken[n]}")
    tls_taken = {t: h.name for h in st.hosts.values() for t in h.tls_names}
    for t in tls_names:
        if not t or len(t) > 255 or any(ord(c) < 32 for c in t):
            raise HostError(f"TLS name {t!r} is empty, too long or holds control characters")
        if t in tls_taken:
            raise HostError(f"TLS name {t!r} already belongs to host {tls_taken[t]}")
    return [str(n) for n in nets], list(tls_names), list(iqns)


def check_new_host(st: NodeState, name: str, addresses: list[str], tls_names: list[str],
                   iqns: list[str] = ()) -> HostState:
    from ..config import check_name

    check_name(name, "host name", HostError)
    if name in st.hosts:
        raise HostError(f"host {name} already exists")
    if name in st.hostsets:
        raise HostError(f"{name} is already the name of a host set")
    # No initiators is allowed (the seed: "For the hosts that are not attached to a given site,
    # the host definition can be empty (no initiators)"): it matches no connection.
    nets, tls, names = _check_initiators(st, name, addresses, tls_names, list(iqns))
    return HostState(name=name, addresses=nets, tls_names=tls, iqns=names)


def check_more_initiators(st: NodeState, name: str, addresses: list[str], tls_names: list[str],
                          iqns: list[str] = ()) -> HostState:
    """Host ``name`` with more initiators (``createhost --add``: e.g. an empty definition whose
    host is now cabled to this array)."""
    h = st.hosts.get(name)
    if h is None:
        raise HostError(f"host {name} does not exist (hosts: {', '.join(sorted(st.hosts)) or 'none'})")
    if not addresses and not tls_names and not iqns:
        raise HostError(f"host {name}: give the initiators to add (--address, --tls-name, --iqn)")
    nets, tls, names = _check_initiators(st, name, addresses, tls_names, list(iqns))
    return HostState(name=name, addresses=h.addresses + nets, tls_names=h.tls_names + tls, iqns=h.iqns + names)


def check_target(st: NodeState, target: str) -> str:
    """A VLUN target: a host name, or set:NAME for a host set."""
    if target.startswith(SET_PREFIX):
        if target[len(SET_PREFIX):] not in st.hostsets:
            raise HostError(f"host set {target[len(SET_PREFIX):]} does not exist "
                            f"(sets: {', '.join(sorted(st.hostsets)) or 'none'})")
        return target
    if target not in st.hosts:
        raise HostError(f"host {target} does not exist (hosts: {', '.join(sorted(st.hosts)) or 'none'})")
    return target
