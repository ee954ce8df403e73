"""Admin commands for hosts, host sets, VLUNs (LUN masking), proximity and path states.

Hosts are objects of one array, as on Remote Copy arrays: define a host on every array it
connects to (both arrays for uniform connectivity). Each command validates fully before it
changes anything, then persists and re-indexes; connections that lose their export are closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..nbd.export import ALUA_ACTIVE_OPTIMIZED, ALUA_NAMES
from .errors import NodeError, NotFound
from .hosts import PROXIMITIES, SET_PREFIX, HostError, check_more_initiators, check_new_host, check_target
from .state import VlunState

if TYPE_CHECKING:
    from .daemon import Node


def _hosts_of(node: Node, target: str) -> list[str]:
    if target.startswith(SET_PREFIX):
        return list(node.state.hostsets.get(target[len(SET_PREFIX):], []))
    return [target]


def _list(v, what: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise NodeError(f"{what} must be a list of strings")
    return [x.strip() for x in v]


async def createhost(node: Node, name: str, addresses=None, tls_names=None, add: bool = False,
                     iqns=None) -> dict:
    if not isinstance(add, bool):
        raise NodeError("createhost: add must be true or false")
    if add and name not in node.state.hosts:
        raise NotFound(f"createhost --add: host {name} does not exist")
    try:
        check = check_more_initiators if add else check_new_host
        h = check(node.state, name, _list(addresses, "addresses"), _list(tls_names, "tls_names"),
                  _list(iqns, "iqns"))
    except HostError as e:
        raise NodeError(f"createhost{' --add' if add else ''}: {e}") from None
    node.state.hosts[name] = h
    node.hosts_changed()
    return {"host": name, "addresses": h.addresses, "tls_names": h.tls_names, "iqns": h.iqns}


async def removehost(node: Node, name: str) -> dict:
    st = node.state
    if name not in st.hosts:
        raise NotFound(f"removehost: host {name} does not exist")
    vl = [f"{v.volume} (LUN {v.lun})" for v in st.vluns if v.target == name]
    if vl:
        raise NodeError(f"removehost: host {name} has exported volumes: {', '.join(vl)}; "
                        "remove them with removevlun first")
    sets = [s for s, m in st.hostsets.items() if name in m]
    if sets:
        raise NodeError(f"removehost: host {name} is in host set(s) {', '.join(sets)}; remove it from them first")
    del st.hosts[name]
    for g in node.groups.values():
        g.st.proximity.pop(name, None)
    node.hosts_changed()
    return {"host": name, "removed": True}


async def createhostset(node: Node, name: str, hosts=None, add: bool = False) -> dict:
    from ..config import check_name

    st = node.state
    members = _list(hosts, "hosts")
    check_name(name, "createhostset: host set name", NodeError)
    for h in members:
        if h not in st.hosts:
            raise NotFound(f"createhostset: host {h} does not exist (hosts: {', '.join(sorted(st.hosts)) or 'none'})")
    if add:
        if name not in st.hostsets:
            raise NotFound(f"createhostset --add: host set {name} does not exist")
        dup = [h for h in members if h in st.hostsets[name]]
        if dup:
            raise NodeError(f"createhostset --add: {', '.join(dup)} already in host set {name}")
        st.hostsets[name] = st.hostsets[name] + members
    else:
        if name in st.hostsets:
            raise NodeError(f"createhostset: host set {name} already exists (use --add to add hosts)")
        if name in st.hosts:
            raise NodeError(f"createhostset: {name} is already the name of a host")
        st.hostsets[name] = list(dict.fromkeys(members))
    node.hosts_changed()
    return {"hostset": name, "hosts": st.hostsets[name]}


async def removehostset(node: Node, name: str, hosts=None) -> dict:
    """Remove the whole set, or only the given hosts from it."""
    st = node.state
    if name not in st.hostsets:
        raise NotFound(f"removehostset: host set {name} does not exist")
    members = _list(hosts, "hosts")
    if members:
        missing = [h for h in members if h not in st.hostsets[name]]
        if missing:
            raise NodeError(f"removehostset: {', '.join(missing)} not in host set {name}")
        st.hostsets[name] = [h for h in st.hostsets[name] if h not in members]
    else:
        vl = [f"{v.volume} (LUN {v.lun})" for v in st.vluns if v.target == SET_PREFIX + name]
        if vl:
            raise NodeError(f"removehostset: host set {name} has exported volumes: {', '.join(vl)}; remove them first")
        del st.hostsets[name]
    node.hosts_changed()
    return {"hostset": name, "hosts": st.hostsets.get(name), "removed": not members}


async def createvlun(node: Node, volume: str, host: str, lun: int | None = None) -> dict:
    st = node.state
    if volume not in node.volumes:
        raise NotFound(f"createvlun: volume {volume} does not exist on {node.cfg.name} "
                        f"(volumes: {', '.join(sorted(node.volumes)) or 'none'})")
    try:
        target = check_target(st, host)
    except HostError as e:
        raise NodeError(f"createvlun: {e}") from None
    if any(v.volume == volume and v.target == target for v in st.vluns):
        raise NodeError(f"createvlun: volume {volume} is already exported to {target}")
    used = {v.lun for v in st.vluns if v.target == target}
    if lun is None:
        lun = next(i for i in range(len(used) + 1) if i not in used)
    elif not isinstance(lun, int) or isinstance(lun, bool) or not 0 <= lun < 16384:
        raise NodeError(f"createvlun: LUN {lun!r} is not an integer 0-16383")
    elif lun in used:
        other = next(v.volume for v in st.vluns if v.target == target and v.lun == lun)
        raise NodeError(f"createvlun: LUN {lun} of {target} is already used by volume {other}")
    st.vluns.append(VlunState(volume=volume, target=target, lun=lun))
    node.hosts_changed()
    return {"volume": volume, "host": target, "lun": lun}


async def removevlun(node: Node, volume: str, host: str) -> dict:
    st = node.state
    match = [v for v in st.vluns if v.volume == volume and v.target == host]
    if not match:
        raise NodeError(f"removevlun: volume {volume} is not exported to {host}")
    st.vluns.remove(match[0])
    node.hosts_changed()
    return {"volume": volume, "host": host, "removed": True}


async def showhost(node: Node) -> dict:
    st = node.state
    conns: dict[str, int] = {}
    if node.nbd is not None:
        for c in node.nbd.live:
            h = node.hosts.host_for(c.identity)
            conns[h or "(unknown)"] = conns.get(h or "(unknown)", 0) + 1
    return {
        "hosts": [
            {"name": h.name, "addresses": h.addresses, "tls_names": h.tls_names, "iqns": h.iqns,
             "sets": sorted(s for s, m in st.hostsets.items() if h.name in m),
             "connections": conns.get(h.name, 0)}
            for h in sorted(st.hosts.values(), key=lambda h: h.name)
        ],
        "hostsets": {s: m for s, m in sorted(st.hostsets.items())},
        "unrecognised_connections": conns.get("(unknown)", 0),
    }


async def showvlun(node: Node) -> dict:
    return {"vluns": [{"volume": v.volume, "host": v.target, "lun": v.lun}
                      for v in sorted(node.state.vluns, key=lambda v: (v.target, v.lun))]}


async def admitrcopyhost(node: Node, host: str, group: str, proximity: str = "all") -> dict:
    g = node.group(group)
    if host not in node.state.hosts:
        raise NotFound(f"admitrcopyhost: host {host} does not exist on {node.cfg.name}")
    if proximity not in PROXIMITIES:
        raise NodeError(f"admitrcopyhost: proximity {proximity!r} is not one of {', '.join(PROXIMITIES)}")
    if not g.st.policies.get("active_active", False):
        raise NodeError(f"admitrcopyhost: proximity is only allowed on active_active groups; {group} is not")
    g.st.proximity[host] = proximity
    node.save()
    g.note(f"host {host} proximity {proximity}")
    node.publish_alua(g)
    return {"host": host, "group": group, "proximity": proximity}


async def dismissrcopyhost(node: Node, host: str, group: str) -> dict:
    g = node.group(group)
    if host not in g.st.proximity:
        raise NodeError(f"dismissrcopyhost: host {host} is not admitted to group {group}")
    del g.st.proximity[host]
    node.save()
    node.publish_alua(g)
    return {"host": host, "group": group, "dismissed": True}


async def showpaths(node: Node, host: str | None = None) -> dict:
    """The ALUA state this array presents for every (host, exported volume)."""
    st = node.state
    if host is not None and host not in st.hosts:
        raise NotFound(f"showpaths: host {host} does not exist on {node.cfg.name}")
    rows = []
    for h in sorted(st.hosts) if host is None else [host]:
        for vol, lun in sorted(node.hosts.volumes_for(h).items(), key=lambda x: x[1]):
            m = node.member_of.get(vol)
            if m is None:
                rows.append({"host": h, "volume": vol, "lun": lun, "group": None, "role": None,
                             "proximity": None, "state": ALUA_NAMES[ALUA_ACTIVE_OPTIMIZED],
                             "epoch": 0, "wwn": node.local_wwn(vol)})
                continue
            g = m.group
            a = g.alua(h)
            rows.append({"host": h, "volume": vol, "lun": lun, "group": g.name, "role": g.role_label,
                         "proximity": g.st.proximity.get(h), "state": ALUA_NAMES[a.state],
                         "epoch": a.epoch, "wwn": m.st.wwn})
    return {"node": node.cfg.name, "paths": rows}


COMMANDS = {
    "createhost": createhost,
    "removehost": removehost,
    "createhostset": createhostset,
    "removehostset": removehostset,
    "createvlun": createvlun,
    "removevlun": removevlun,
    "showhost": showhost,
    "showvlun": showvlun,
    "admitrcopyhost": admitrcopyhost,
    "dismissrcopyhost": dismissrcopyhost,
    "showpaths": showpaths,
}
