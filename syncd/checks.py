"""What a daemon needs from the machine before it starts, checked without starting it
(``syncd node|witness|host --config F --check``, and again by the daemon itself at start):
volumes (exist, right type, size, open read-write, not in use), data directories (exist or can
be created, writable), ports (free), key files (safe permissions). Nothing is created or
changed: a directory is probed with a temporary file that is removed, a port with a bind that
is closed, a device with an open that is closed.

Every problem is found, each naming the config file and the key; certificates and keys are
loaded by the config parser (``config.py``) already.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from .config import NodeConfig, load_toml

RUNNING = "a running daemon holds it: stop it first, or ignore this when checking a running one"


@dataclass
class Report:
    source: str  # the config file, as given
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Unsafe key file permissions: a problem for --check, a warning when the daemon starts.
    keys_are_problems: bool = True

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.source}: {key}: {text}")

    def warn(self, key: str, text: str) -> None:
        self.warnings.append(f"{self.source}: {key}: {text}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    return p


def _unwritable(d: str) -> str:
    """Why this process cannot write in directory ``d`` ("" if it can)."""
    if os.access(d, os.W_OK | os.X_OK):
        return ""
    try:
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return (f"{d} is on a read-only file system (under a syncd unit, whose ProtectSystem=strict leaves "
                    f"only its own directories writable: add ReadWritePaths={d} with systemctl edit)")
    except OSError:
        pass
    return f"{d} is not writable by this user (uid {os.geteuid()})"


def _locked_elsewhere(fd: int) -> bool:
    """Whether another process holds a flock on ``fd``'s file (probed, then released)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def check_directory(r: Report, key: str, path: str, what: str) -> None:
    """``path`` is a writable directory, or can be created (by this user, in its nearest
    existing ancestor)."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            r.problem(key, f"{path} exists but is not a directory ({what})")
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=".syncd-check-", dir=path)
        except OSError as e:
            why = f"{e.strerror or e}" if e.errno != errno.EROFS else _unwritable(path)
            r.problem(key, f"{path}: cannot write in it ({what}): {why}")
            return
        os.close(fd)
        os.unlink(tmp)
        return
    parent = _nearest_existing(path)
    if not os.path.isdir(parent):
        r.problem(key, f"{path} cannot be created ({what}): {parent} is not a directory")
    elif why := _unwritable(parent):
        r.problem(key, f"{path} does not exist and cannot be created ({what}): {why}")


def check_dir_lock(r: Report, key: str, path: str, what: str) -> None:
    """The lock a running daemon holds on its data directory (``files.lock_dir``)."""
    lock = os.path.join(path, "lock")
    try:
        fd = os.open(lock, os.O_RDWR)  # never created here
    except OSError:
        return
    try:
        if _locked_elsewhere(fd):
            r.problem(key, f"{path} is in use by another syncd {what} process ({RUNNING})")
    finally:
        os.close(fd)


def check_port(r: Report, key: str, addr: tuple[str, int]) -> None:
    """A TCP port this daemon listens on can be bound now (then closed at once)."""
    host, port = addr
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon binds it
        s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            r.problem(key, f"{host}:{port} is in use by another program (or by this daemon, if it is already "
                           "running)")
        elif e.errno == errno.EADDRNOTAVAIL:
            r.problem(key, f"{host}:{port}: no local interface has address {host}")
        elif e.errno == errno.EACCES:
            r.problem(key, f"{host}:{port}: this user may not listen on ports below 1024 "
                           "(run as root or give it CAP_NET_BIND_SERVICE)")
        else:
            r.problem(key, f"{host}:{port}: cannot listen: {e.strerror or e}")
    finally:
        s.close()


def check_metrics_port(r: Report, cfg) -> None:
    """The [metrics] listen port of a node, witness or host shim config, when it has one."""
    m = getattr(cfg, "metrics", None)
    if m is not None:
        check_port(r, "metrics.listen", m.listen)


def check_key_file(r: Report, key: str, path: str | None) -> None:
    """A private key (TLS key, shared secret) others cannot read and nobody else can replace."""
    if not path:
        return
    try:
        st = os.stat(path)
    except OSError:
        return  # the parser reported it
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007 or mode & 0o020:
        report = r.problem if r.keys_are_problems else r.warn
        report(key, f"{path} has unsafe permissions {mode:04o}: a private key must not be readable or writable "
                    "by other users, nor writable by its group (chmod 0600, or 0640 for a group the daemon's "
                    "user is in)")


def check_metadata(r: Report, cfg: NodeConfig, sizes: dict[str, int]) -> None:
    """The node's metadata (read, never written) and the volumes its groups hold: each still
    defined, with the size it was admitted with (``sizes``: the volumes' sizes measured)."""
    from .node.state import StateError, read_state

    path = os.path.join(cfg.data_dir, "state.json")
    if not cfg.name or not os.path.exists(path):
        return
    try:
        st = read_state(path, cfg.name)
    except StateError as e:
        r.problem("node.data_dir", str(e))
        return
    defined = {v.name: v for v in cfg.volumes}
    for g in st.groups.values():
        for m in g.members:
            v = defined.get(m.local)
            if v is None:
                r.problem("[[volume]]", f"group {g.name} holds volume {m.local}, which the config no longer defines: "
                                        "restore it, or dismiss it from the group")
            elif m.local in sizes and sizes[m.local] != m.size:
                r.problem(f'[[volume]] name="{v.name}" path="{v.path}"',
                          f"is {sizes[m.local]} bytes, but group {g.name} admitted it with {m.size}")


def check_volume(r: Report, key: str, path: str, size: int | None, direct: bool) -> int | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if size is None:
            r.problem(key, "no such file or device (a volume file is created only when size is set)")
        elif os.path.abspath(path).startswith("/dev/"):
            r.problem(key, "no such device (a volume under /dev is never created as a file)")
        else:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                r.problem(key, f"no such file, and it cannot be created: {parent} is not a directory")
            elif why := _unwritable(parent):
                r.problem(key, f"no such file, and it cannot be created: {why}")
        return
    except OSError as e:
        r.problem(key, f"cannot reach it: {e.strerror or e}")
        return
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        r.problem(key, f"is {_kind(st.st_mode)}: a volume is a block device or a regular file")
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EROFS:
            r.problem(key, f"cannot be opened read-write: {_unwritable(os.path.dirname(os.path.abspath(path)))}")
        else:
            r.problem(key, f"cannot be opened read-write by this user (uid {os.geteuid()}): {e.strerror or e}")
        return
    try:
        from .node.volume import device_size

        if _locked_elsewhere(fd):
            r.problem(key, f"is in use by another process ({RUNNING})")
        try:
            actual = device_size(fd)
        except OSError as e:
            r.problem(key, f"its size cannot be read: {e.strerror or e}")
            return None
        measured = actual
        if actual == 0:
            r.problem(key, "has size 0")
        elif size is not None and actual < size:
            r.problem(key, f"is {actual} bytes, smaller than size = {size}")
        elif size is not None and actual != size:
            r.problem(key, f"is {actual} bytes but size = {size}: they must match (leave size out to use "
                           "the whole device)")
        elif actual % 512:
            r.problem(key, f"is {actual} bytes, not a multiple of 512")
    finally:
        os.close(fd)
    if direct:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
        except OSError as e:
            r.problem(key, f"direct = true, but O_DIRECT is not possible here: {e.strerror or e}")
    return measured


def _raw_security_files(t: object, base: str) -> Iterable[tuple[str, str]]:
    """(key, path) of the private key files in a security table (``config.SECURITY_KEYS``)."""
    if not isinstance(t, dict):
        return
    for k in ("tls_key", "key_file"):
        v = t.get(k)
        if isinstance(v, str):
            yield k, v if os.path.isabs(v) else os.path.join(base, v)


def check_node(cfg: NodeConfig, source: str, start: bool = False) -> Report:
    r = Report(source, keys_are_problems=not start)
    if cfg.data_dir:  # "" in a config whose [node] has problems (ConfigError.partial)
        check_directory(r, "node.data_dir", cfg.data_dir, "the node's metadata")
        if os.path.isdir(cfg.data_dir):
            check_dir_lock(r, "node.data_dir", cfg.data_dir, "node")
    if cfg.admin_socket and os.path.dirname(cfg.admin_socket) != cfg.data_dir:
        check_directory(r, "node.admin_socket", os.path.dirname(cfg.admin_socket), "where the admin socket goes")
    sizes = {}
    for v in cfg.volumes:
        n = check_volume(r, f'[[volume]] name="{v.name}" path="{v.path}"', v.path, v.size, v.direct)
        if n:
            sizes[v.name] = n
    if cfg.data_dir:
        check_metadata(r, cfg, sizes)
    for i, a in enumerate(cfg.nbd_listen):
        check_port(r, f"nbd.listen[{i}]", a)
    if cfg.link is not None:
        for i, lp in enumerate(cfg.link.paths):
            check_port(r, f"link.paths[{i}].local", lp.local)
    check_metrics_port(r, cfg)
    raw = load_toml_quiet(source)
    base = os.path.dirname(os.path.abspath(source))
    if cfg.nbd_tls is not None:
        check_key_file(r, "nbd.tls_key", cfg.nbd_tls.key)
    for section in ("link", "witness"):
        for k, p in _raw_security_files(raw.get(section), base):
            check_key_file(r, f"{section}.{k}", p)
    return r


def check_witness(cfg, source: str, start: bool = False) -> Report:
    r = Report(source, keys_are_problems=not start)
    check_directory(r, "witness.state_dir", cfg.state_dir, "the witness's decisions")
    if os.path.isdir(cfg.state_dir):
        check_dir_lock(r, "witness.state_dir", cfg.state_dir, "witness")
    for i, a in enumerate(cfg.listen):
        check_port(r, f"witness.listen[{i}]", a)
    check_metrics_port(r, cfg)
    base = os.path.dirname(os.path.abspath(source))
    for k, p in _raw_security_files(load_toml_quiet(source).get("witness"), base):
        check_key_file(r, f"witness.{k}", p)
    return r


def check_host(cfg, source: str, start: bool = False) -> Report:
    r = Report(source, keys_are_problems=not start)
    for k in ("socket", "admin_socket"):
        path = getattr(cfg, k)
        check_directory(r, f"host.{k}", os.path.dirname(path), "where the socket goes")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                r.problem(f"host.{k}", f"{path}: a process already listens on it ({RUNNING})")
            except OSError:
                pass  # a stale socket: replaced at start
            finally:
                s.close()
    if cfg.tcp is not None:
        check_port(r, "host.tcp", cfg.tcp)
    check_metrics_port(r, cfg)
    check_key_file(r, "host.tls_key", cfg.tls_key)
    return r


def load_toml_quiet(source: str) -> dict:
    from pathlib import Path

    try:
        return load_toml(Path(source))
    except Exception:  # noqa: BLE001 - it was parsed already; a file changed since has no keys to check
        return {}
