"""Node configuration: a TOML file, validated in full before anything starts.

Every problem is reported with the key that caused it; a config with any problem changes nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .secure import Security


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem. It may carry
    several problems (``problems``, one line each in the message): every one found at once."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: list[str] = list(problems)
        # What could be parsed despite the problems (a NodeConfig without the parts in error),
        # so that ``--check`` also reports what the machine lacks for the rest.
        self.partial: object = None

    def prefixed(self, prefix: str) -> "ConfigError":
        e = ConfigError(*(f"{prefix}: {q}" for q in self.problems))
        e.partial = self.partial
        return e


class Problems:
    """Collects the ConfigErrors of independent parts (sections, volumes) so that all of them
    are reported at once: ``with problems.part(): ...`` per part, ``problems.raise_if_any()``."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def part(self) -> "_Part":
        return _Part(self)

    def raise_if_any(self, partial: object = None) -> None:
        if self.found:
            e = ConfigError(*self.found)
            e.partial = partial
            raise e


class _Part:
    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.ok = True

    def __enter__(self) -> "_Part":
        return self

    def __exit__(self, et, e, tb) -> bool:
        if isinstance(e, ConfigError):
            self.problems.found.extend(e.problems)
            self.ok = False
            return True
        return False


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")


MIN_INFLIGHT = 1 << 20  # the smallest in-flight bound a config may set (link, NBD)


def parse_size(value: object, key: str) -> int:
    """Parse 1048576, "1M", "1MiB", "2G" into bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
        n = int(m.group(1)) * _UNITS[unit]
    else:
        raise ConfigError(f"{key}: {value!r} is not a size (use bytes or e.g. '256MiB')")
    if n <= 0:
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    return n


def parse_addr(value: object, key: str) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: {value!r} is not HOST:PORT")
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535 or not host:
        raise ConfigError(f"{key}: {value!r} is not a valid HOST:PORT")
    return host, p


def check_name(value: object, key: str, error: type[Exception] | None = None) -> str:
    """``value`` if it is a valid object name; else raises ``error`` (ConfigError by default)."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise (error or ConfigError)(
            f"{key}: {value!r} is not a valid name (1-31 letters, digits, '_', '.', '-')"
        )
    return value


@dataclass(frozen=True)
class VolumeConfig:
    name: str
    path: str
    size: int | None  # create a sparse file of this size when the path does not exist
    direct: bool = False


@dataclass(frozen=True)
class LinkPath:
    local: tuple[str, int]  # where this node listens for its peer
    peer: tuple[str, int]  # where the peer listens (we dial it when our name sorts lower)


@dataclass(frozen=True)
class LinkConfig:
    peer: str
    paths: tuple[LinkPath, ...]
    ping_interval: float = 0.2
    path_timeout: float = 1.5
    io_timeout: float = 5.0
    lease: float = 2.0
    lease_margin: float = 0.5
    clock_drift: float = 0.05
    max_rtt_ms: float = 10.0
    region_size: int = 256 << 10
    resync_share: float = 0.5
    transition_timeout: float = 5.0  # s host I/O waits during a switchover before EAGAIN
    # How the link proves who is at the other end (``secure.py``); the default is for tests
    # that build a LinkConfig by hand: a config file must choose (parse_security).
    security: Security = Security("insecure")
    max_inflight: int = 32 << 20  # bytes of data requests in flight on the link (flow control)
    # Connections the listener keeps in handshake at once, in all and from one address: the
    # peer needs one per path (two while one replaces another); the rest are refused at once.
    max_handshakes: int = 16
    max_handshakes_per_source: int = 4

    def lease_expiry(self) -> float:
        """How long after granting a lease the primary treats it as possibly still running."""
        return self.lease * (1 + self.clock_drift) + self.lease_margin

    def max_request_hold(self) -> float:
        """The longest an array may still apply a host write after receiving it: held through a
        role change (``transition_timeout``), forwarded or mirrored (``io_timeout``), and the
        primary going on alone (lease expiry). A host shim's ``stale_write_bound`` must not be
        shorter (with the defaults: 12.6 s; the shim's default is 15 s)."""
        return self.transition_timeout + self.io_timeout + self.lease_expiry()


@dataclass(frozen=True, slots=True)
class NbdLimits:
    """What NBD clients may make a server (a node's NBD service, a host shim's export) hold."""

    max_inflight: int = 128 << 20  # bytes all connections may hold (requests, unsent replies)
    max_inflight_per_connection: int = 32 << 20  # ... and one connection
    max_connections: int = 512  # connections at once, beyond which new ones are closed at once
    max_connections_per_address: int = 128  # ... from one source address (a host and its tools)
    handshake_timeout: float = 10.0  # s from accept to transmission (option haggling, TLS)
    payload_timeout: float = 30.0  # s a write's payload may stop arriving before the client is dropped
    reply_timeout: float = 120.0  # s a client may leave its replies unread before it is dropped
    block_status_max_extents: int = 4096  # base:allocation extents per reply (the client asks on)


# File descriptors a node needs besides its NBD connections: its volumes (data, direct I/O,
# intent log), link paths (listening, dialled, replaced), the witness, admin connections, its
# metadata writes (a reserve: see files.reserve_fds), Python and trio themselves.
FD_BASE = 64
FD_PER_VOLUME = 4
FD_PER_LINK_PATH = 4
FD_ADMIN = 32


def parse_nbd_limits(table: dict, where: str) -> NbdLimits:
    """The limit keys of an [nbd] (or a host shim's [host]) table, checked together."""
    d = NbdLimits()
    kw: dict = {}
    for k in ("max_inflight", "max_inflight_per_connection"):
        v = parse_size(table.get(k, getattr(d, k)), f"{where}.{k}")
        if v < MIN_INFLIGHT:
            raise ConfigError(f"{where}.{k}: {v} bytes is too small to hold a host request (at least 1MiB)")
        kw[k] = v
    if kw["max_inflight_per_connection"] > kw["max_inflight"]:
        raise ConfigError(f"{where}.max_inflight_per_connection: larger than {where}.max_inflight "
                          "(what all connections together may hold)")
    for k in ("max_connections", "max_connections_per_address"):
        v = _take(table, k, where, int, getattr(d, k))
        if v < 1:
            raise ConfigError(f"{where}.{k}: must be at least 1, got {v}")
        kw[k] = v
    if kw["max_connections_per_address"] > kw["max_connections"]:
        raise ConfigError(f"{where}.max_connections_per_address: larger than {where}.max_connections")
    v = _take(table, "block_status_max_extents", where, int, d.block_status_max_extents)
    if not 1 <= v <= 1 << 20:
        raise ConfigError(f"{where}.block_status_max_extents: must be between 1 and 1048576 (the NBD "
                          f"protocol's bound on descriptors per reply), got {v}")
    kw["block_status_max_extents"] = v
    for k in ("handshake_timeout", "payload_timeout", "reply_timeout"):
        v = _take(table, k, where, float, getattr(d, k))
        if not 0 < v <= 3600:
            raise ConfigError(f"{where}.{k}: must be between 0 and 3600 seconds, got {v}")
        kw[k] = v
    return NbdLimits(**kw)


NBD_LIMIT_KEYS = frozenset(f.name for f in fields(NbdLimits))


def fds_needed(cfg: "NodeConfig") -> int:
    """File descriptors a node may need with its config's limits (see FD_BASE)."""
    npaths = len(cfg.link.paths) if cfg.link else 0
    return (FD_BASE + FD_ADMIN + FD_PER_VOLUME * len(cfg.volumes) + FD_PER_LINK_PATH * npaths
            + cfg.nbd_limits.max_connections + (cfg.metrics.max_connections + 1 if cfg.metrics else 0))


def ensure_fd_limit(needed: int, what: str, key: str) -> None:
    """Make sure this process may open ``needed`` file descriptors: raise the soft
    RLIMIT_NOFILE up to the hard one if needed, else a ConfigError naming ``key``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise ConfigError(
        f"{key}: {what} may need {needed} file descriptors, but this process may open only {hard} "
        f"(RLIMIT_NOFILE; LimitNOFILE= in a systemd unit, ulimit -n in a shell): raise that limit "
        f"or lower {key}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") can only be reached from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The Prometheus endpoint of a daemon ([metrics]): off unless the table is there."""

    listen: tuple[str, int]
    # The metrics name groups, volumes, hosts and addresses and need no login: they listen on
    # loopback unless the config says allow_remote = true (then put a firewall in front).
    allow_remote: bool = False
    max_connections: int = 16  # scrapes at once; more are closed at once
    request_timeout: float = 5.0  # s a client has to send its request and read the answer
    max_header_bytes: int = 8192  # the request line and headers; more is refused (431)


METRICS_KEYS = frozenset({"listen", "allow_remote", "max_connections", "request_timeout", "max_header_bytes"})


_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.\-]*(:[\x21-\x7e]+)?"
                     r"|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")


def check_iscsi_name(value: object, key: str, error: type[Exception] | None = None) -> str:
    """An iSCSI name (RFC 7143 section 4.2.7): iqn.YYYY-MM.reversed.domain[:anything], eui.
    or naa.; at most 223 bytes."""
    if not isinstance(value, str) or len(value.encode()) > 223 or not _IQN_RE.match(value):
        raise (error or ConfigError)(
            f"{key}: {value!r} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:name], eui.<16 hex>, "
            "naa.<16 or 32 hex>; at most 223 bytes, lower case before the colon)")
    return value


@dataclass(frozen=True)
class IscsiConfig:
    """[iscsi]: the array's iSCSI target. ``advertise`` is what SendTargets reports for this
    array (default: ``listen``); ``peer_target`` and ``peer_advertise`` the other array's, so a
    host that discovers one array learns both paths."""

    listen: tuple[tuple[str, int], ...]
    target: str
    portal_group: int
    advertise: tuple[tuple[str, int], ...]
    peer_target: str | None = None
    peer_portal_group: int | None = None
    peer_advertise: tuple[tuple[str, int], ...] = ()
    chap: tuple[tuple[str, bytes], ...] = ()  # [iscsi.chap]: CHAP name -> secret; set: every login needs CHAP
    mutual_chap: tuple[str, bytes] | None = None  # [iscsi.mutual_chap]: the target's own name and secret


ISCSI_KEYS = ("listen", "target", "portal_group", "advertise", "peer_target", "peer_portal_group", "peer_advertise",
              "chap", "mutual_chap")
CHAP_MIN_SECRET = 12  # bytes: RFC 7143 section 12.1.3 wants at least 96 bits
CHAP_MAX_SECRET = 255


def _chap_secret(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    b = value.encode()
    if not CHAP_MIN_SECRET <= len(b) <= CHAP_MAX_SECRET:
        raise ConfigError(f"{key}: a CHAP secret of {len(b)} bytes; use {CHAP_MIN_SECRET} to {CHAP_MAX_SECRET} "
                          "(RFC 7143 section 12.1.3: at least 96 bits)")
    return b


def _parse_chap(t: dict) -> tuple[tuple[tuple[str, bytes], ...], tuple[str, bytes] | None]:
    users = _take(t, "chap", "iscsi", dict, {})
    chap = []
    for name, secret in users.items():
        if not name or len(name.encode()) > 255 or any(ord(ch) < 33 for ch in name):
            raise ConfigError(f"iscsi.chap: {name!r} is not a CHAP name (1-255 bytes, no spaces or control "
                              "characters)")
        chap.append((name, _chap_secret(secret, f"iscsi.chap.{name}")))
    mutual = None
    m = _take(t, "mutual_chap", "iscsi", dict, None)
    if m is not None:
        _no_extra(m, {"user", "secret"}, "iscsi.mutual_chap")
        user = _take(m, "user", "iscsi.mutual_chap", str)
        if not user:
            raise ConfigError("iscsi.mutual_chap.user: empty")
        mutual = (user, _chap_secret(_take(m, "secret", "iscsi.mutual_chap", str), "iscsi.mutual_chap.secret"))
        if not chap:
            raise ConfigError("iscsi.mutual_chap: set without [iscsi.chap] (the hosts' CHAP names and secrets); "
                              "mutual CHAP answers a host that authenticated itself first")
        if any(secret == mutual[1] for _, secret in chap):
            raise ConfigError("iscsi.mutual_chap.secret: the same as a host's secret in [iscsi.chap]; RFC 7143 "
                              "section 12.1.3 forbids one secret for both directions")
    return tuple(chap), mutual


def parse_iscsi(raw: dict, node_name: str) -> IscsiConfig | None:
    if "iscsi" not in raw:
        return None
    t = _take(raw, "iscsi", "config", dict)
    _no_extra(t, set(ISCSI_KEYS), "iscsi")
    listen = tuple(parse_addr(a, f"iscsi.listen[{i}]")
                   for i, a in enumerate(_take(t, "listen", "iscsi", list, ["127.0.0.1:3260"])))
    if not listen:
        raise ConfigError("iscsi.listen: empty; give at least one HOST:PORT (or leave out [iscsi])")
    target = check_iscsi_name(_take(t, "target", "iscsi", str, f"iqn.2026-12.org.syncd:{node_name.lower()}"),
                              "iscsi.target")
    group = _take(t, "portal_group", "iscsi", int, 1)
    if not 1 <= group <= 65535:
        raise ConfigError(f"iscsi.portal_group: {group} is not from 1 to 65535")
    advertise = tuple(parse_addr(a, f"iscsi.advertise[{i}]")
                      for i, a in enumerate(_take(t, "advertise", "iscsi", list, [])))
    if not advertise:
        if any(h in ("0.0.0.0", "::") for h, _ in listen):
            raise ConfigError("iscsi.advertise: needed when iscsi.listen has a wildcard address: say which "
                              "addresses hosts reach this array at")
        advertise = listen
    peer_target = t.get("peer_target")
    if peer_target is not None:
        check_iscsi_name(peer_target, "iscsi.peer_target")
        if peer_target == target:
            raise ConfigError("iscsi.peer_target: the same name as iscsi.target; each array's target has its own")
    peer_group = t.get("peer_portal_group")
    if peer_group is not None and (not isinstance(peer_group, int) or isinstance(peer_group, bool)
                                   or not 1 <= peer_group <= 65535):
        raise ConfigError(f"iscsi.peer_portal_group: {peer_group!r} is not a number from 1 to 65535")
    if peer_group == group:
        raise ConfigError(f"iscsi.peer_portal_group: {group} is this array's portal_group too; hosts tell the "
                          "arrays' ports apart by it")
    peer_adv = tuple(parse_addr(a, f"iscsi.peer_advertise[{i}]")
                     for i, a in enumerate(_take(t, "peer_advertise", "iscsi", list, [])))
    if peer_adv and peer_target is None:
        raise ConfigError("iscsi.peer_advertise: set without iscsi.peer_target (the other array's target name)")
    chap, mutual = _parse_chap(t)
    return IscsiConfig(listen, target, group, advertise, peer_target, peer_group, peer_adv, chap, mutual)


def parse_metrics(raw: dict, where: str = "metrics") -> MetricsConfig | None:
    """The [metrics] table of a node, witness or host shim config (None when absent: off)."""
    if "metrics" not in raw:
        return None
    t = _take(raw, "metrics", "config", dict)
    _no_extra(t, set(METRICS_KEYS), where)
    listen = parse_addr(_take(t, "listen", where, str), f"{where}.listen")
    allow_remote = _take(t, "allow_remote", where, bool, False)
    if not allow_remote and not is_loopback(listen[0]):
        raise ConfigError(f"{where}.listen: {listen[0]} is not a loopback address; the metrics endpoint has no "
                          f"authentication, so say {where}.allow_remote = true to serve it beyond this machine "
                          "(and keep it behind a firewall), or listen on 127.0.0.1")
    d = MetricsConfig(listen)
    mc = _take(t, "max_connections", where, int, d.max_connections)
    if not 1 <= mc <= 1024:
        raise ConfigError(f"{where}.max_connections: must be between 1 and 1024, got {mc}")
    rt = _take(t, "request_timeout", where, float, d.request_timeout)
    if not 0 < rt <= 300:
        raise ConfigError(f"{where}.request_timeout: must be between 0 and 300 seconds, got {rt}")
    mh = _take(t, "max_header_bytes", where, int, d.max_header_bytes)
    if not 1024 <= mh <= 1 << 20:
        raise ConfigError(f"{where}.max_header_bytes: must be between 1024 and 1048576, got {mh}")
    return MetricsConfig(listen, allow_remote, mc, rt, mh)


BUSY_POLL_US = 500  # [node] busy_poll_us: the default (200 before 2026-12-07)
# [node] boot_id_file: names this boot of the machine. A different one at start than when the
# daemon last started means the machine restarted since (power cut, kernel crash): the page cache
# and the disks' caches went with it. The same one after an unclean stop: only the daemon died.
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
MAX_BUSY_POLL_US = 10_000

HOOK_EVENTS = ("split_brain", "replicas_differ", "failsafe", "failover", "resync_done")


@dataclass(frozen=True)
class HooksConfig:
    """[hooks]: commands run on events (``syncd/node/hooks.py``), each an argv."""

    commands: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (event, argv)
    timeout: float = 30.0  # s a hook may run before it is killed
    max_running: int = 4  # hooks running at once; more wait their turn
    max_queued: int = 64  # hooks waiting to run; beyond, a hook is skipped (logged as an error)

    def command(self, event: str) -> tuple[str, ...] | None:
        return dict(self.commands).get(event)


@dataclass(frozen=True)
class IntentConfig:
    """[intent]: the write-intent log kept as an activity log (``syncd/node/intent.py``)."""

    extent: int = 4 << 20  # bytes marked at once: the first write to an extent marks all of it
    hot: int = 16 << 30  # bytes of extents per volume kept marked while written (LRU beyond)
    idle: float = 300.0  # s without a write after which an extent is cleared anyway
    ahead: int = 16 << 20  # bytes (an aligned group of extents) marked with a cold extent while the budget has room


@dataclass(frozen=True)
class EventsConfig:
    """[events]: the event stream (``syncd/node/events.py``, ``syncctl events``)."""

    backlog: int = 1024  # events a subscriber may leave unread before it is cut off
    progress_percent: float = 10.0  # a resync progress event at least every this many percent...
    progress_interval: float = 5.0  # ... or this many seconds, whichever comes first


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: str
    admin_socket: str
    nbd_listen: tuple[tuple[str, int], ...]
    link: LinkConfig | None
    volumes: tuple[VolumeConfig, ...] = field(default_factory=tuple)
    source: str = ""
    witness: object = None  # syncd.witness.client.WitnessClientConfig
    nbd_tls: "NbdTlsConfig | None" = None
    nbd_limits: NbdLimits = NbdLimits()
    metrics: MetricsConfig | None = None
    hooks: HooksConfig = HooksConfig()
    events: EventsConfig = EventsConfig()
    intent: IntentConfig = IntentConfig()
    iscsi: IscsiConfig | None = None
    # µs the event loop polls for input before it sleeps (syncd/netio.py, IdlePoller); 0: never
    busy_poll_us: int = BUSY_POLL_US
    boot_id_file: str = BOOT_ID_FILE

    @property
    def nbd_max_inflight(self) -> int:
        return self.nbd_limits.max_inflight

    @property
    def nbd_max_inflight_per_connection(self) -> int:
        return self.nbd_limits.max_inflight_per_connection


@dataclass(frozen=True)
class NbdTlsConfig:
    mode: str  # "on": STARTTLS offered; "require": nothing but STARTTLS before TLS
    certificate: str
    key: str
    ca: str | None  # client certificates signed by this CA name their host (createhost --tls-name)


def _take(table: dict, key: str, where: str, kind, default=..., ):
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}.{key}: missing")
        return default
    v = table[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise ConfigError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {v!r}")
    return v


def _no_extra(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)}")


def load_toml(p: Path) -> dict:
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def load_node_config(path: str | os.PathLike) -> NodeConfig:
    p = Path(path)
    raw = load_toml(p)
    try:
        cfg = parse_node_config(raw, base=p.parent, source=str(p))
        # Connections must never take the descriptors the node's own metadata writes need.
        ensure_fd_limit(fds_needed(cfg), f"with {cfg.nbd_limits.max_connections} NBD connections, this node",
                        "nbd.max_connections")
        return cfg
    except ConfigError as e:
        raise e.prefixed(str(p)) from None


def parse_node_config(raw: dict, base: Path = Path("."), source: str = "") -> NodeConfig:
    """The node config in ``raw``; raises one ConfigError with the problems of every section
    and volume (a section's own checks stop at its first problem)."""
    problems = Problems()
    with problems.part():
        _no_extra(raw, {"node", "nbd", "link", "volume", "witness", "metrics", "hooks", "events", "intent",
                        "iscsi"}, "config")
    name = data_dir = admin_socket = ""
    busy_poll_us = BUSY_POLL_US
    boot_id_file = BOOT_ID_FILE
    node: dict = {}
    with problems.part() as node_part:
        node = _take(raw, "node", "config", dict)
    if node_part.ok:
        with problems.part():
            _no_extra(node, {"name", "data_dir", "admin_socket", "busy_poll_us", "boot_id_file"}, "node")
        with problems.part():
            name = check_name(_take(node, "name", "node", str), "node.name")
        with problems.part():
            busy_poll_us = _take(node, "busy_poll_us", "node", int, BUSY_POLL_US)
            if not 0 <= busy_poll_us <= MAX_BUSY_POLL_US:
                raise ConfigError(f"node.busy_poll_us: must be between 0 (never poll) and {MAX_BUSY_POLL_US}, "
                                  f"got {busy_poll_us}")

    def rel(s: str) -> str:
        return str((base / s).resolve()) if not os.path.isabs(s) else s

    if node_part.ok:
        with problems.part():
            data_dir = rel(_take(node, "data_dir", "node", str))
            admin_socket = rel(_take(node, "admin_socket", "node", str, os.path.join(data_dir, "admin.sock")))
        with problems.part():
            boot_id_file = rel(_take(node, "boot_id_file", "node", str, BOOT_ID_FILE))

    nbd_listen: tuple[tuple[str, int], ...] = ()
    nbd_tls = None
    nbd_limits = NbdLimits()
    nbd: dict = {}
    with problems.part() as nbd_part:
        nbd = _take(raw, "nbd", "config", dict, {})
    with problems.part():
        _no_extra(nbd, {"listen", "tls", "tls_certificate", "tls_key", "tls_ca"} | NBD_LIMIT_KEYS, "nbd")
        listen = _take(nbd, "listen", "nbd", list, ["127.0.0.1:10809"])
        nbd_listen = tuple(parse_addr(a, f"nbd.listen[{i}]") for i, a in enumerate(listen))
        nbd_limits = parse_nbd_limits(nbd, "nbd")
    if nbd_part.ok:
        with problems.part():
            nbd_tls = parse_nbd_tls(nbd, base)

    link = None
    with problems.part() as link_part:
        link = _parse_link(raw, name, base) if "link" in raw else None

    vols = []
    seen_names: set[str] = set()
    seen_paths: dict[str, str] = {}
    volumes: list = []
    with problems.part():
        volumes = _take(raw, "volume", "config", list, [])
    for i, vr in enumerate(volumes):
        with problems.part():
            where = f"volume[{i}]"
            if not isinstance(vr, dict):
                raise ConfigError(f"{where}: expected a table")
            _no_extra(vr, {"name", "path", "size", "direct"}, where)
            vname = check_name(_take(vr, "name", where, str), f"{where}.name")
            if vname in seen_names:
                raise ConfigError(f"{where}.name: volume {vname} is defined twice")
            seen_names.add(vname)
            vpath = rel(_take(vr, "path", where, str))
            real = os.path.realpath(vpath)
            if real in seen_paths:
                raise ConfigError(
                    f"{where}.path: {vpath} is already used by volume {seen_paths[real]}"
                )
            seen_paths[real] = vname
            size = parse_size(vr["size"], f"{where}.size") if "size" in vr else None
            if size is not None and size % 512:
                raise ConfigError(f"{where}.size: must be a multiple of 512 bytes")
            vols.append(VolumeConfig(vname, vpath, size, _take(vr, "direct", where, bool, False)))

    witness = None
    if "witness" in raw:
        with problems.part():
            witness = parse_witness_client(_take(raw, "witness", "config", dict), "witness", base)
            if link is None and link_part.ok:
                raise ConfigError("witness: a witness needs a [link] to a peer")
    metrics = None
    with problems.part():
        metrics = parse_metrics(raw)
    hooks = HooksConfig()
    with problems.part():
        hooks = parse_hooks(_take(raw, "hooks", "config", dict, {}), base)
    events = EventsConfig()
    with problems.part():
        events = parse_events(_take(raw, "events", "config", dict, {}))
    intent = IntentConfig()
    with problems.part():
        intent = parse_intent(_take(raw, "intent", "config", dict, {}))
    iscsi = None
    with problems.part():
        iscsi = parse_iscsi(raw, name or "node")
    cfg = NodeConfig(name, data_dir, admin_socket, nbd_listen, link, tuple(vols), source, witness, nbd_tls,
                     nbd_limits, metrics, hooks, events, intent, iscsi, busy_poll_us, boot_id_file)
    problems.raise_if_any(partial=cfg)
    return cfg


def parse_hooks(t: dict, base: Path = Path(".")) -> HooksConfig:
    """[hooks]: ``EVENT = ["/path/prog", "arg", ...]`` (an argv, run without a shell) or
    ``EVENT = "/path/prog arg ..."`` (split as a shell would, but run without one); a program
    without a '/' is looked up in PATH, a relative path is relative to the config file."""
    _no_extra(t, {*HOOK_EVENTS, "timeout", "max_running", "max_queued"}, "hooks")
    d = HooksConfig()
    cmds = []
    for ev in HOOK_EVENTS:
        if ev not in t:
            continue
        v = t[ev]
        where = f"hooks.{ev}"
        if isinstance(v, str):
            try:
                argv = shlex.split(v)
            except ValueError as e:
                raise ConfigError(f"{where}: {v!r} is not a command line: {e}") from None
        elif isinstance(v, list) and all(isinstance(a, str) for a in v):
            argv = list(v)
        else:
            raise ConfigError(f"{where}: expected a command (a string, or a list of strings: the argv), got {v!r}")
        if not argv or not argv[0]:
            raise ConfigError(f"{where}: the command is empty")
        prog = argv[0]
        if "/" in prog:
            prog = prog if os.path.isabs(prog) else str((base / prog).resolve())
            if not os.path.isfile(prog):
                raise ConfigError(f"{where}: {prog} does not exist")
            if not os.access(prog, os.X_OK):
                raise ConfigError(f"{where}: {prog} is not executable (chmod +x)")
        else:
            found = shutil.which(prog)
            if found is None:
                raise ConfigError(f"{where}: program {prog!r} is not found in PATH (give its full path)")
            prog = found
        cmds.append((ev, (prog, *argv[1:])))
    timeout = _take(t, "timeout", "hooks", float, d.timeout)
    if timeout <= 0:
        raise ConfigError(f"hooks.timeout: must be positive (seconds), got {timeout}")
    kw = {}
    for k in ("max_running", "max_queued"):
        kw[k] = _take(t, k, "hooks", int, getattr(d, k))
        if kw[k] < 1:
            raise ConfigError(f"hooks.{k}: must be at least 1, got {kw[k]}")
    return HooksConfig(tuple(cmds), timeout, **kw)


def intent_headroom(budget: int) -> int:
    """How far below its budget (``budget`` extents) the write-intent log's hot set is brought
    by an eviction batch, and kept by marks ahead: an eighth, at least one extent."""
    return max(1, budget // 8)


def parse_intent(t: dict) -> IntentConfig:
    """[intent]: ``extent``, ``hot`` and ``ahead`` sizes, ``idle`` seconds."""
    _no_extra(t, {"extent", "hot", "idle", "ahead"}, "intent")
    d = IntentConfig()
    extent = parse_size(t.get("extent", d.extent), "intent.extent")
    if extent % 4096 or extent & (extent - 1):
        raise ConfigError(f"intent.extent: must be a power of two multiple of 4096 (default 4MiB), got {extent}")
    hot = parse_size(t.get("hot", d.hot), "intent.hot")
    if hot < extent:
        raise ConfigError(f"intent.hot: at least one extent ({extent} bytes), got {hot}")
    idle = _take(t, "idle", "intent", float, d.idle)
    if idle <= 0:
        raise ConfigError(f"intent.idle: must be positive (seconds), got {idle}")
    # Marks ahead stop where they would take the hot set past its headroom below the budget
    # (IntentLog), so more than that could never be marked at once.
    budget = hot // extent
    most = max(1, budget - intent_headroom(budget)) * extent
    default_ahead = min(max(d.ahead, extent), most)  # 16 MiB, one extent where extents are larger
    ahead = parse_size(t.get("ahead", default_ahead), "intent.ahead")
    if ahead < extent or ahead % extent or ahead > most:
        raise ConfigError(f"intent.ahead: must be a whole number of extents ({extent} bytes) and at most "
                          f"{most} bytes (seven eighths of intent.hot, {hot} bytes), got {ahead}; "
                          f"intent.ahead = intent.extent marks each extent alone")
    return IntentConfig(extent, hot, idle, ahead)


def parse_events(t: dict) -> EventsConfig:
    """[events]: limits of the event stream."""
    _no_extra(t, {"backlog", "progress_percent", "progress_interval"}, "events")
    d = EventsConfig()
    backlog = _take(t, "backlog", "events", int, d.backlog)
    if not 16 <= backlog <= 1 << 20:
        raise ConfigError(f"events.backlog: between 16 and 1048576 events, got {backlog}")
    pct = _take(t, "progress_percent", "events", float, d.progress_percent)
    if not 0 < pct <= 100:
        raise ConfigError(f"events.progress_percent: between 0 and 100 (exclusive of 0), got {pct}")
    every = _take(t, "progress_interval", "events", float, d.progress_interval)
    if every <= 0:
        raise ConfigError(f"events.progress_interval: must be positive (seconds), got {every}")
    return EventsConfig(backlog, pct, every)


def _parse_link(raw: dict, name: str, base: Path) -> LinkConfig:
    lk = _take(raw, "link", "config", dict)
    fields = {
        "peer", "paths", "ping_interval", "path_timeout", "io_timeout", "lease",
        "lease_margin", "clock_drift", "max_rtt_ms", "region_size", "resync_share",
        "transition_timeout", "max_inflight", "max_handshakes", "max_handshakes_per_source",
        *SECURITY_KEYS,
    }
    _no_extra(lk, fields, "link")
    peer = check_name(_take(lk, "peer", "link", str), "link.peer")
    if peer == name:
        raise ConfigError(f"link.peer: the peer cannot be this node ({name})")
    paths_raw = _take(lk, "paths", "link", list)
    if not paths_raw:
        raise ConfigError("link.paths: at least one path is needed")
    paths = []
    for i, pr in enumerate(paths_raw):
        where = f"link.paths[{i}]"
        if not isinstance(pr, dict):
            raise ConfigError(f"{where}: expected a table {{local=..., peer=...}}")
        _no_extra(pr, {"local", "peer"}, where)
        paths.append(
            LinkPath(
                parse_addr(_take(pr, "local", where, str), f"{where}.local"),
                parse_addr(_take(pr, "peer", where, str), f"{where}.peer"),
            )
        )
    d = LinkConfig(peer=peer, paths=())
    kw = {}
    for k in ("ping_interval", "path_timeout", "io_timeout", "lease", "lease_margin",
              "clock_drift", "max_rtt_ms", "resync_share", "transition_timeout"):
        v = _take(lk, k, "link", float, getattr(d, k))
        if v < 0 or (k != "clock_drift" and k != "lease_margin" and v == 0):
            raise ConfigError(f"link.{k}: must be positive, got {v}")
        kw[k] = v
    if kw["resync_share"] > 1:
        raise ConfigError("link.resync_share: must be between 0 and 1")
    if kw["path_timeout"] <= kw["ping_interval"]:
        raise ConfigError("link.path_timeout: must be longer than link.ping_interval")
    if kw["io_timeout"] <= kw["path_timeout"]:
        # A request given up after io_timeout must not still arrive over a path that was
        # only declared down (and reset) after path_timeout.
        raise ConfigError("link.io_timeout: must be longer than link.path_timeout")
    rs = parse_size(lk.get("region_size", d.region_size), "link.region_size")
    if rs % 4096 or rs & (rs - 1):
        raise ConfigError("link.region_size: must be a power of two multiple of 4096")
    security = parse_security(lk, "link", base)
    mi = parse_size(lk.get("max_inflight", d.max_inflight), "link.max_inflight")
    if mi < MIN_INFLIGHT:
        raise ConfigError(f"link.max_inflight: {mi} bytes is too small for data in flight to the peer "
                          f"(at least 1MiB; default 32MiB)")
    hs = {}
    for k in ("max_handshakes", "max_handshakes_per_source"):
        hs[k] = _take(lk, k, "link", int, getattr(d, k))
        if hs[k] < 2:
            raise ConfigError(f"link.{k}: at least 2 (a path's new connection may arrive before the old "
                              f"one is gone), got {hs[k]}")
    return LinkConfig(peer=peer, paths=tuple(paths), region_size=rs, security=security, max_inflight=mi,
                      **hs, **kw)


def tls_culprit(files: dict[str, str], where: str) -> str:
    """Which of the ``tls_certificate``, ``tls_key``, ``tls_ca`` files does not load, and why
    ("" when each loads alone: then they do not belong together)."""
    import ssl

    def fails(load) -> str:
        try:
            load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            return str(e)
        return ""

    cert, key, ca = (files.get(k) for k in ("tls_certificate", "tls_key", "tls_ca"))
    if cert and (why := fails(lambda c: c.load_verify_locations(cafile=cert))):
        return f"{where}.tls_certificate: {cert} is not a PEM certificate ({why})"
    if cert and key and (why := fails(lambda c: c.load_cert_chain(cert, key))):
        return f"{where}.tls_key: {key} is not a PEM private key, or not the key of {cert} ({why})"
    if ca and (why := fails(lambda c: c.load_verify_locations(cafile=ca))):
        return f"{where}.tls_ca: {ca} is not a PEM CA certificate ({why})"
    return ""


def check_readable(path: str, key: str) -> None:
    """A ConfigError naming ``key`` unless ``path`` is a regular file this process can read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path} is not a regular file")


SECURITY_KEYS = frozenset({"key", "key_file", "tls_certificate", "tls_key", "tls_ca", "insecure"})
MIN_KEY = 16


def parse_security(t: dict, where: str, base: Path = Path(".")):
    """How a daemon-to-daemon connection is authenticated (``secure.Security``), from the keys
    of ``SECURITY_KEYS`` in table ``t``: ``key`` or ``key_file`` (a shared secret of at least
    16 bytes), or ``tls_certificate`` + ``tls_key`` + ``tls_ca`` (mutual TLS), or
    ``insecure = true``; exactly one. Files are read now, so a bad one is a config error."""
    from .secure import Security

    insecure = _take(t, "insecure", where, bool, False)
    tls = [k for k in ("tls_certificate", "tls_key", "tls_ca") if k in t]
    modes = [m for m, on in (("key", "key" in t), ("key_file", "key_file" in t), ("TLS", bool(tls)),
                             ("insecure", insecure)) if on]
    if not modes:
        raise ConfigError(f"{where}: no authentication configured: set key (or key_file), or tls_certificate, "
                          "tls_key and tls_ca (mutual TLS), or insecure = true (no authentication at all)")
    if len(modes) > 1:
        raise ConfigError(f"{where}: {' and '.join(modes)} are both set: configure exactly one of key, key_file, "
                          "TLS (tls_certificate, tls_key, tls_ca), insecure = true")

    def path(k: str) -> str:
        v = _take(t, k, where, str)
        return v if os.path.isabs(v) else str((base / v).resolve())

    if insecure:
        return Security("insecure")
    if tls:
        missing = [k for k in ("tls_certificate", "tls_key", "tls_ca") if k not in t]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: missing (mutual TLS needs tls_certificate, tls_key and tls_ca)")
        files = {k: path(k) for k in ("tls_certificate", "tls_key", "tls_ca")}
        for k, v in files.items():
            check_readable(v, f"{where}.{k}")
        sec = Security("tls", tls_certificate=files["tls_certificate"], tls_key=files["tls_key"],
                       tls_ca=files["tls_ca"])
        try:
            sec.tls_context(server_side=True)
            sec.tls_context(server_side=False)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ConfigError(f"{where}: the TLS certificate, key or CA cannot be loaded: "
                              f"{tls_culprit(files, where) or e}") from None
        return sec
    if "key_file" in t:
        kf = path("key_file")
        try:
            with open(kf, "rb") as f:
                key = f.read(1 << 16).strip()
        except OSError as e:
            raise ConfigError(f"{where}.key_file: cannot read {kf}: {e.strerror or e}") from None
        which = "key_file"
    else:
        key = _take(t, "key", where, str).encode()
        which = "key"
    if len(key) < MIN_KEY:
        raise ConfigError(f"{where}.{which}: use at least {MIN_KEY} bytes (the key has {len(key)})")
    return Security("key", key=key)


def parse_witness_client(wt: dict, where: str, base: Path = Path(".")):
    """A node's witness settings (the [witness] table, or setrcopytarget witness create)."""
    from .witness.client import WitnessClientConfig

    wt = dict(wt)
    backend = _take(wt, "backend", where, str, "builtin")
    if backend == "etcd":
        return parse_etcd_witness(wt, where, base)
    if backend != "builtin":
        raise ConfigError(f"{where}.backend: {backend!r} is not one of builtin, etcd")
    _no_extra(wt, {"backend", "address", "name", "interval", "owner_lease", "grace"} | SECURITY_KEYS, where)
    sec = parse_security(wt, where, base)
    name = check_name(_take(wt, "name", where, str), f"{where}.name") if "name" in wt else None
    if name is None and sec.mode == "tls":
        # Any certificate from the CA would do as the witness otherwise: a node's or a host's.
        raise ConfigError(f"{where}.name: required with TLS (the name the witness's certificate must carry)")
    d = WitnessClientConfig(("", 0), sec)
    cfg = WitnessClientConfig(
        parse_addr(_take(wt, "address", where, str), f"{where}.address"), sec, name,
        _take(wt, "interval", where, float, d.interval),
        _take(wt, "owner_lease", where, float, d.owner_lease),
        _take(wt, "grace", where, float, d.grace),
    )
    for k in ("interval", "owner_lease", "grace"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{where}.{k}: must be positive, got {getattr(cfg, k)}")
    if cfg.grace <= cfg.interval:
        raise ConfigError(f"{where}.grace: must be longer than {where}.interval")
    return cfg


def parse_etcd_witness(wt: dict, where: str, base: Path = Path(".")):
    """[witness] backend = "etcd": the witness's decisions kept in an etcd cluster."""
    from .witness.etcd import EtcdConfig
    from .witness.etcd_node import EtcdWitnessConfig

    _no_extra(wt, {"backend", "endpoints", "prefix", "tls_ca", "tls_certificate", "tls_key", "user", "password",
                   "timeout", "interval", "owner_lease", "grace", "election_timeout"}, where)
    endpoints = _take(wt, "endpoints", where, list)
    if not endpoints or not all(isinstance(e, str) for e in endpoints):
        raise ConfigError(f"{where}.endpoints: a list of etcd client URLs (http://HOST:PORT or https://HOST:PORT)")
    prefix = _take(wt, "prefix", where, str)
    if not prefix.startswith("/") or len(prefix) < 2 or prefix.endswith("/") or "//" in prefix:
        raise ConfigError(f"{where}.prefix: {prefix!r}: a key prefix such as \"/syncd/pair1\" (one per array pair)")
    files = {}
    for k in ("tls_ca", "tls_certificate", "tls_key"):
        v = _take(wt, k, where, str, None)
        if v is not None:
            v = v if os.path.isabs(v) else str(base / v)
            check_readable(v, f"{where}.{k}")
        files[k] = v
    d = EtcdWitnessConfig(EtcdConfig(("http://x:1",)), "/x")
    try:
        etcd = EtcdConfig(tuple(endpoints), files["tls_ca"], files["tls_certificate"], files["tls_key"],
                          _take(wt, "user", where, str, None), _take(wt, "password", where, str, None),
                          _take(wt, "timeout", where, float, 1.0))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if any(e.startswith("https") for e in endpoints):
        import ssl

        try:
            ctx = ssl.create_default_context(cafile=etcd.ca)
            if etcd.cert is not None:
                ctx.load_cert_chain(etcd.cert, etcd.key)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: the TLS files cannot be used together: {e}") from None
    elif etcd.cert is not None or etcd.ca is not None:
        raise ConfigError(f"{where}.tls_*: set, but the endpoints are http:// (use https:// for TLS)")
    cfg = EtcdWitnessConfig(etcd, prefix, _take(wt, "interval", where, float, d.interval),
                            _take(wt, "owner_lease", where, float, d.owner_lease),
                            _take(wt, "grace", where, float, d.grace),
                            election_timeout=_take(wt, "election_timeout", where, float, d.election_timeout))
    for k in ("interval", "owner_lease", "grace", "election_timeout"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{where}.{k}: must be positive, got {getattr(cfg, k)}")
    if cfg.election_timeout > 50:
        raise ConfigError(f"{where}.election_timeout: {cfg.election_timeout} s; etcd allows at most 50 s "
                          "(its --election-timeout, in seconds here)")
    if cfg.grace <= cfg.interval:
        raise ConfigError(f"{where}.grace: must be longer than {where}.interval")
    if not 0 < etcd.timeout < cfg.owner_lease:
        raise ConfigError(f"{where}.timeout: must be positive and shorter than {where}.owner_lease")
    return cfg


def parse_nbd_tls(nbd: dict, base: str) -> NbdTlsConfig | None:
    """[nbd] tls = "off" | "on" | "require", with tls_certificate, tls_key, optional tls_ca."""
    mode = _take(nbd, "tls", "nbd", str, "off")
    if mode not in ("off", "on", "require"):
        raise ConfigError(f"nbd.tls: {mode!r} is not one of off, on, require")
    files = {k: _take(nbd, k, "nbd", str, None) for k in ("tls_certificate", "tls_key", "tls_ca")}
    if mode == "off":
        extra = [k for k, v in files.items() if v is not None]
        if extra:
            raise ConfigError(f"nbd.{extra[0]}: set, but nbd.tls is off (say tls = \"on\" or \"require\")")
        return None
    for k in ("tls_certificate", "tls_key"):
        if files[k] is None:
            raise ConfigError(f"nbd.{k}: missing (needed with nbd.tls = {mode!r})")
    paths = {k: (os.path.join(base, v) if v is not None else None) for k, v in files.items()}
    for k, v in paths.items():
        if v is not None:
            check_readable(v, f"nbd.{k}")
    cfg = NbdTlsConfig(mode, paths["tls_certificate"], paths["tls_key"], paths["tls_ca"])
    try:
        server_tls_context(cfg)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        files = {k: v for k, v in paths.items() if v is not None}
        raise ConfigError(f"nbd.tls: the certificate, key or CA cannot be loaded: {tls_culprit(files, 'nbd') or e}"
                          ) from None
    return cfg


def server_tls_context(cfg: NbdTlsConfig):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.certificate, cfg.key)
    if cfg.ca:
        ctx.load_verify_locations(cfg.ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a host without a certificate falls back to its address
    return ctx
