"""The node's persistent metadata: identity, groups, roles, epochs, policies, admitted volumes.

Written as one JSON document by atomic replace (write temp, fsync, rename, fsync directory), so a
crash leaves either the old or the new version. A node refuses to start on metadata it cannot
read or whose format version it does not know, and never overwrites it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field

from ..files import atomic_write, lock_dir, reserve_fds
from ..iscsi import pr

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
POLICIES = ("active_active", "auto_failover", "path_management", "auto_recover", "auto_synchronize")
DEFAULT_POLICIES = {
    "active_active": True,
    "auto_failover": True,
    "path_management": True,
    "auto_recover": True,
    "auto_synchronize": True,
}


# The seed ("Setting the group for Active Sync"): these two are always on for an Active Sync
# (active_active) group, and every group here is one.
FIXED_POLICIES = ("auto_failover", "path_management")
FIXED_REASON = ("the auto_failover and path_management group policies are set for an Active Sync group "
                "by default and cannot be modified")


class StateError(Exception):
    pass


@dataclass
class MemberState:
    local: str  # volume name on this node
    remote: str  # volume name on the peer
    vol_id: int  # shared by both nodes; carried in every replication frame
    wwn: str  # the primary's identity, presented by both arrays
    size: int
    dirty: str = ""  # base64 bitmap of regions that may differ (primary side), at clean stop
    synced_once: bool = False
    last_sync: float | None = None
    suspect: bool = False  # this replica's device failed: compare everything when it returns
    # Primary, while ``GroupState.peer_has_all`` is set on disk: base64 bitmap of regions the
    # peer's copy is known to be wrong in (online verify found them different, made this
    # array's copy durable, then marked them for resync). After an unclean stop they are copied
    # to the peer, never fetched back from it (``Group.decide_crash_regions``).
    peer_wrong: str = ""


@dataclass
class GroupState:
    name: str
    gid: int
    role: str  # "primary" | "secondary"
    peer: str
    epoch: int = 1
    started: bool = False
    policies: dict = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    members: list[MemberState] = field(default_factory=list)
    next_vol_id: int = 1
    failsafe: bool = False  # serves no I/O until the witness or the peer says it may
    proximity: dict = field(default_factory=dict)  # host name -> primary|secondary|all (this array)
    home: str = ""  # the array that is primary in the natural direction ("" = the creator)
    # Data generations: a new one starts whenever this array begins acknowledging writes its
    # peer does not get (going on alone, taking the group over); a secondary adopts the
    # primary's once in sync. On reconnect they tell which side is behind, or that both wrote
    # apart (split brain). "" = unknown (a group from before generations existed).
    gen: str = ""
    gen_history: list = field(default_factory=list)  # earlier generations, oldest first
    split_brain: str = ""  # set when both sides wrote apart: nothing resyncs until resolved
    # The peer may hold data of generation ``gen`` (it adopted it, or it is where the group
    # started): going on alone must then start a new one. A generation the peer never took can
    # go on (the peer is behind it either way), so a flapping link does not pile up generations.
    gen_shared: bool = True
    # This array owns an epoch the operator made without the witness (override while it was
    # unreachable, split-brain resolution): to be reported to the witness (RESOLVE).
    witness_behind: bool = False
    # Primary: the peer holds every write this array acknowledged (see roles.RoleState); kept
    # set while writes the peer holds too are being made durable here (roles.persisted_has_all).
    peer_has_all: bool = False
    # Primary restarted after an unclean stop while peer_has_all held: the peer may hold newer
    # data where this array was writing; it serves nothing without the peer until that is
    # fetched back (see roles.RoleState).
    peer_newer: bool = False


@dataclass
class HostState:
    """A host as this array knows it: the initiators a connection is recognised by."""

    name: str
    addresses: list[str] = field(default_factory=list)  # IP addresses or CIDR networks
    tls_names: list[str] = field(default_factory=list)  # certificate CN / PSK identity (NBD TLS)
    iqns: list[str] = field(default_factory=list)  # iSCSI initiator names


@dataclass
class VlunState:
    """Volume exported to a host or to a host set (target "set:NAME")."""

    volume: str
    target: str
    lun: int


@dataclass
class NodeState:
    node: str
    node_uuid: str
    groups: dict[str, GroupState] = field(default_factory=dict)
    hosts: dict[str, HostState] = field(default_factory=dict)
    hostsets: dict[str, list[str]] = field(default_factory=dict)
    vluns: list[VlunState] = field(default_factory=list)
    witness: dict | None = None  # set by setrcopytarget witness (overrides [witness] in the config)
    version: int = FORMAT_VERSION
    # SCSI persistent reservations per volume (local name; syncd.iscsi.pr.state_to_json): a
    # replicated volume's are the group primary's, copied here before a change is acknowledged.
    reservations: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        for g in d["groups"].values():
            for m in g["members"]:
                if not m["peer_wrong"]:
                    # Set only for moments (see MemberState): a syncd from before the field
                    # still reads the metadata (``from_json`` refuses unknown fields).
                    del m["peer_wrong"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "NodeState":
        groups = {}
        for name, g in d.get("groups", {}).items():
            members = [MemberState(**m) for m in g.pop("members", [])]
            groups[name] = GroupState(members=members, **g)
        hosts = {n: HostState(**h) for n, h in d.get("hosts", {}).items()}
        vluns = [VlunState(**v) for v in d.get("vluns", [])]
        hostsets = {n: list(v) for n, v in d.get("hostsets", {}).items()}
        return cls(node=d["node"], node_uuid=d["node_uuid"], groups=groups, hosts=hosts,
                   hostsets=hostsets, vluns=vluns, witness=d.get("witness"), version=d["version"],
                   reservations=dict(d.get("reservations", {})))


class StateStore:
    """Holds the data directory lock and reads/writes ``state.json`` crash-safely."""

    def __init__(self, data_dir: str, node: str):
        self.dir = data_dir
        self.path = os.path.join(data_dir, "state.json")
        reserve_fds()  # for metadata writes when clients have taken every other descriptor
        self._lockfd = lock_dir(data_dir)
        if self._lockfd is None:
            raise StateError(f"data directory {data_dir} is in use by another syncd node process")
        os.ftruncate(self._lockfd, 0)
        os.write(self._lockfd, f"{os.getpid()}\n".encode())
        self.node = node

    def load(self) -> NodeState:
        if not os.path.exists(self.path):
            st = NodeState(node=self.node, node_uuid=str(uuid.uuid4()))
            self.save(st)
            return st
        return read_state(self.path, self.node)

    def save(self, st: NodeState) -> None:
        atomic_write(self.path, json.dumps(st.to_json(), indent=1, sort_keys=True).encode())


def read_state(path: str, node: str) -> NodeState:
    """The metadata in ``path`` (read only: ``syncd node --check`` reads it too), or a
    StateError saying why this node must not start on it."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise StateError(
            f"{path} cannot be read ({e}); refusing to start. Restore it from backup "
            "or move it away to start this node as new (its groups are then forgotten)."
        ) from None
    if not isinstance(d, dict) or d.get("version") != FORMAT_VERSION:
        raise StateError(
            f"{path} has format version {d.get('version') if isinstance(d, dict) else '?'};"
            f" this syncd understands version {FORMAT_VERSION}. Refusing to start."
        )
    try:
        st = NodeState.from_json(d)
    except (KeyError, TypeError) as e:
        raise StateError(f"{path} is not valid syncd metadata ({e}); refusing to start.") from None
    if st.node != node:
        raise StateError(f"{path} belongs to node {st.node!r}, but this config names node {node!r}")
    for vol, r in st.reservations.items():
        try:
            pr.state_from_json(r)
        except pr.BadState as e:
            raise StateError(f"{path}: reservations of volume {vol}: {e}; refusing to start.") from None
    for g in st.groups.values():
        off = [p for p in FIXED_POLICIES if g.policies.get(p) is False]
        if off:
            # Metadata from before the rule: the policies are on again (saved by the next change).
            log.warning("group %s: policy %s turned on again: %s", g.name, ", ".join(off), FIXED_REASON)
            g.policies.update(dict.fromkeys(off, True))
    return st


def encode_bits(b: bytes) -> str:
    return base64.b64encode(bytes(b)).decode() if any(b) else ""


def decode_bits(s: str) -> bytes | None:
    return base64.b64decode(s) if s else None
