"""``syncd node|witness|host --config F --check`` runs what the daemon needs from the machine
without starting it: each case's message names the file and the key, the exit status is 2,
nothing is created or changed; every problem is reported at once; the daemon itself refuses
to start with the same messages (no traceback). Permission cases run the check as ``nobody``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trustme

from syncd.lab.rig import free_port

from .rig import require_root, require_tool

pytestmark = pytest.mark.system
KEY = "0123456789abcdef-test-key"


def tree(d: Path) -> dict:
    """Everything under ``d``: what must not change when a check or a refused start ran (a
    directory's modification time aside: a writable directory is probed with a temporary file,
    removed at once)."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_mode, st.st_uid) if p.is_dir() else (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid)
    return out


def syncd(*args: str, user: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "syncd", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    return p


def node_toml(d: Path, port: int, volumes: str, extra: str = "", data_dir: str = "data") -> Path:
    cfg = d / "node.toml"
    cfg.write_text(f'[node]\nname = "A"\ndata_dir = "{data_dir}"\nadmin_socket = "admin.sock"\n'
                   f'[nbd]\nlisten = ["127.0.0.1:{port}"]\n{extra}{volumes}')
    return cfg


def vol(name: str, path: str | Path, size: str | None = None) -> str:
    return f'[[volume]]\nname = "{name}"\npath = "{path}"\n' + (f'size = "{size}"\n' if size else "")


def check(cfg: Path, what: str = "node", **kw) -> tuple[int, list[str]]:
    p = syncd(what, "--config", str(cfg), "--check", **kw)
    return p.returncode, [line for line in p.stderr.splitlines() if line.startswith("syncd: ")]


def test_a_good_config_passes_with_a_summary_and_creates_nothing(tmp_path):
    cfg = node_toml(tmp_path, free_port(), vol("vv1", tmp_path / "vv1.img", "4MiB"))
    before = tree(tmp_path)
    p = syncd("node", "--config", str(cfg), "--check")
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert p.stdout.startswith(f"{cfg}: ok (node A, 1 volumes, nbd 127.0.0.1:"), p.stdout
    assert tree(tmp_path) == before  # neither the volume file nor the data directory was created


def test_missing_device(tmp_path):
    cfg = node_toml(tmp_path, free_port(), vol("v1", "/dev/syncd-test-loop99"))
    before = tree(tmp_path)
    rc, lines = check(cfg)
    assert rc == 2
    assert lines == [f'syncd: {cfg}: [[volume]] name="v1" path="/dev/syncd-test-loop99": no such file or device '
                     "(a volume file is created only when size is set)"], lines
    assert tree(tmp_path) == before


def test_missing_device_under_dev_is_never_created_as_a_file(tmp_path):
    """With size set, a missing file is created at start, but never a file under /dev (a typo
    in a device name would put the volume in RAM)."""
    cfg = node_toml(tmp_path, free_port(), vol("v1", "/dev/syncd-test-sdz", "4MiB"))
    rc, lines = check(cfg)
    assert rc == 2 and lines == [f'syncd: {cfg}: [[volume]] name="v1" path="/dev/syncd-test-sdz": no such device '
                                 "(a volume under /dev is never created as a file)"], lines
    p = syncd("node", "--config", str(cfg))  # the daemon refuses the same way
    assert p.returncode == 2 and "no such device" in p.stderr
    assert not os.path.exists("/dev/syncd-test-sdz") and not (tmp_path / "data").exists()


def test_too_small_file_and_block_device(tmp_path):
    require_root()
    require_tool("losetup")
    img = tmp_path / "small.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(2 << 20)
    loop = subprocess.run(["losetup", "--find", "--show", str(disk)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        vols = vol("v1", img, "2MiB") + vol("v2", loop, "4MiB") + vol("v3", loop + "p9")
        cfg = node_toml(tmp_path, free_port(), vols)
        before = tree(tmp_path)
        rc, lines = check(cfg)
        assert rc == 2
        assert lines == [
            f'syncd: {cfg}: [[volume]] name="v1" path="{img}": is 1048576 bytes, smaller than size = 2097152',
            f'syncd: {cfg}: [[volume]] name="v2" path="{loop}": is 2097152 bytes, smaller than size = 4194304',
            f'syncd: {cfg}: [[volume]] name="v3" path="{loop}p9": no such file or device (a volume file is '
            "created only when size is set)",
        ], lines
        assert tree(tmp_path) == before
        # The whole device, size left out: fine.
        cfg = node_toml(tmp_path, free_port(), vol("v2", loop))
        p = syncd("node", "--config", str(cfg), "--check")
        assert p.returncode == 0, p.stderr
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_wrong_type(tmp_path):
    (tmp_path / "adir").mkdir()
    cfg = node_toml(tmp_path, free_port(), vol("v1", "/dev/null") + vol("v2", tmp_path / "adir"))
    rc, lines = check(cfg)
    assert rc == 2 and lines == [
        f'syncd: {cfg}: [[volume]] name="v1" path="/dev/null": is a character device: a volume is a block device '
        "or a regular file",
        f'syncd: {cfg}: [[volume]] name="v2" path="{tmp_path / "adir"}": is a directory: a volume is a block device '
        "or a regular file"], lines


def test_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = node_toml(tmp_path, free_port(), vol("v1", tmp_path / "v.img", "1MiB"), data_dir="afile/data")
    before = tree(tmp_path)
    rc, lines = check(cfg)
    assert rc == 2 and lines == [f"syncd: {cfg}: node.data_dir: {tmp_path}/afile/data cannot be created (the "
                                 f"node's metadata): {tmp_path}/afile is not a directory"], lines
    # The daemon itself: the same message, no traceback, nothing created (not even the volume file).
    p = syncd("node", "--config", str(cfg))
    assert p.returncode == 2 and "afile/data cannot be created" in p.stderr, p.stderr
    assert tree(tmp_path) == before


def test_port_in_use(tmp_path):
    port = free_port()
    cfg = node_toml(tmp_path, port, vol("v1", tmp_path / "v.img", "1MiB"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        before = tree(tmp_path)
        rc, lines = check(cfg)
        assert rc == 2 and lines == [f"syncd: {cfg}: nbd.listen[0]: 127.0.0.1:{port} is in use by another program "
                                     "(or by this daemon, if it is already running)"], lines
        p = syncd("node", "--config", str(cfg))
        assert p.returncode == 2 and f"127.0.0.1:{port} is in use" in p.stderr
        assert tree(tmp_path) == before


def test_a_running_node_is_reported_as_such(tmp_path):
    port = free_port()
    cfg = node_toml(tmp_path, port, vol("v1", tmp_path / "v.img", "1MiB"))
    node = subprocess.Popen([sys.executable, "-m", "syncd", "node", "--config", str(cfg)], stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in node.stderr:
            if "ready" in line:
                break
        rc, lines = check(cfg)
        assert rc == 2
        text = "\n".join(lines)
        assert "node.data_dir" in text and "in use by another syncd node process" in text
        assert "is in use by another process (a running daemon holds it" in text  # the volume
        assert f"127.0.0.1:{port} is in use" in text and "already running" in text
    finally:
        node.terminate()
        node.wait(30)


def tls(tmp_path: Path) -> dict:
    ca = trustme.CA()
    cert = ca.issue_cert("A")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "a.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "a.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    os.chmod(tmp_path / "a.key", 0o600)
    return {"cert": tmp_path / "a.crt", "key": tmp_path / "a.key", "ca": tmp_path / "ca.crt"}


def test_bad_key_permissions(tmp_path):
    """A private key others can read: a problem for --check (so a unit's ExecStartPre refuses),
    a warning when the daemon is started by hand."""
    t = tls(tmp_path)
    os.chmod(t["key"], 0o644)
    (tmp_path / "link.key").write_text(KEY)
    os.chmod(tmp_path / "link.key", 0o666)
    nbd = f'tls = "on"\ntls_certificate = "{t["cert"]}"\ntls_key = "{t["key"]}"\n'
    link = ('[link]\npeer = "B"\npaths = [{ local = "127.0.0.1:0", peer = "127.0.0.1:1" }]\n'
            'key_file = "link.key"\n')
    cfg = node_toml(tmp_path, free_port(), link + vol("v1", tmp_path / "v.img", "1MiB"), extra=nbd)
    before = tree(tmp_path)
    rc, lines = check(cfg)
    assert rc == 2 and lines == [
        f"syncd: {cfg}: nbd.tls_key: {t['key']} has unsafe permissions 0644: a private key must not be readable or "
        "writable by other users, nor writable by its group (chmod 0600, or 0640 for a group the daemon's user is in)",
        f"syncd: {cfg}: link.key_file: {tmp_path / 'link.key'} has unsafe permissions 0666: a private key must not "
        "be readable or writable by other users, nor writable by its group (chmod 0600, or 0640 for a group the "
        "daemon's user is in)"], lines
    assert tree(tmp_path) == before
    os.chmod(t["key"], 0o640)
    os.chmod(tmp_path / "link.key", 0o600)
    assert check(cfg)[0] == 0


def test_garbage_certificate(tmp_path):
    t = tls(tmp_path)
    t["cert"].write_text("not a certificate")
    nbd = f'tls = "on"\ntls_certificate = "{t["cert"]}"\ntls_key = "{t["key"]}"\n'
    cfg = node_toml(tmp_path, free_port(), vol("v1", tmp_path / "v.img", "1MiB"), extra=nbd)
    rc, lines = check(cfg)
    assert rc == 2 and len(lines) == 1 and "nbd.tls: the certificate, key or CA cannot be loaded" in lines[0], lines


@pytest.fixture
def world_dir():
    """A directory ``nobody`` can reach (pytest's tmp_path is root's only)."""
    require_root()
    require_tool("setpriv")
    d = Path(tempfile.mkdtemp(prefix="syncd-check-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_permissions_seen_by_the_daemons_user(world_dir):
    """As ``nobody``: a certificate it cannot read, a data directory and a socket directory it
    cannot write in, a volume it cannot open read-write."""
    d = world_dir
    t = tls(d)
    for f in t.values():
        os.chmod(f, 0o600)  # root's
    with open(d / "v.img", "wb") as f:
        f.truncate(1 << 20)
    os.chmod(d / "v.img", 0o644)
    (d / "data").mkdir(mode=0o755)
    nbd = f'tls = "on"\ntls_certificate = "{t["cert"]}"\ntls_key = "{t["key"]}"\n'
    cfg = node_toml(d, free_port(), vol("v1", d / "v.img"), extra=nbd)
    before = tree(d)
    rc, lines = check(cfg, user="nobody")
    assert rc == 2
    assert lines == [
        f"syncd: invalid configuration: {cfg}: nbd.tls_certificate: cannot read {t['cert']}: Permission denied",
        f"syncd: {cfg}: node.data_dir: {d}/data: cannot write in it (the node's metadata): Permission denied",
        f"syncd: {cfg}: node.admin_socket: {d}: cannot write in it (where the admin socket goes): Permission denied",
        f'syncd: {cfg}: [[volume]] name="v1" path="{d}/v.img": cannot be opened read-write by this user '
        "(uid 65534): Permission denied",
    ], lines
    assert tree(d) == before


def test_every_problem_at_once(tmp_path):
    """A missing device, a volume too small, a data directory that cannot be created, a port in
    use, an unloadable certificate, a key others can read, a config error in another section:
    all reported, each naming the file and the key, in one run."""
    t = tls(tmp_path)
    t["cert"].write_text("garbage")
    (tmp_path / "link.key").write_text(KEY)
    os.chmod(tmp_path / "link.key", 0o644)
    (tmp_path / "afile").write_text("x")
    with open(tmp_path / "small.img", "wb") as f:
        f.truncate(4096)
    port, lport = free_port(), free_port()
    link = (f'[link]\npeer = "B"\npaths = [{{ local = "127.0.0.1:{lport}", peer = "127.0.0.1:1" }}]\n'
            'key_file = "link.key"\nping_interval = -1\n')
    nbd = f'tls = "on"\ntls_certificate = "{t["cert"]}"\ntls_key = "{t["key"]}"\n'
    cfg = node_toml(tmp_path, port, link + vol("v1", "/dev/syncd-test-loop98") + vol("v2", tmp_path / "small.img",
                                                                                     "1MiB"),
                    extra=nbd, data_dir="afile/data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        before = tree(tmp_path)
        rc, lines = check(cfg)
        after = tree(tmp_path)
        p = syncd("node", "--config", str(cfg))
    assert rc == 2 and after == before
    text = "\n".join(lines)
    for needle in ("nbd.tls: the certificate, key or CA cannot be loaded", "link.ping_interval: must be positive",
                   "node.data_dir: ", 'name="v1" path="/dev/syncd-test-loop98": no such file',
                   'name="v2"', "smaller than size = 1048576", f"nbd.listen[0]: 127.0.0.1:{port} is in use",
                   "link.key_file: "):
        assert sum(needle in line for line in lines) == 1, (needle, text)
    assert all(line.startswith(f"syncd: invalid configuration: {cfg}: ") or line.startswith(f"syncd: {cfg}: ")
               for line in lines), text
    assert len(lines) == 7, text  # the link is in error: its port is not checked (its key file is)
    # Started by hand, the key's permissions are a warning; the rest stops it, nothing created.
    assert p.returncode == 2 and p.stderr.count("cannot start: ") == 6, p.stderr
    assert "WARNING" in p.stderr and "unsafe permissions 0644" in p.stderr
    assert tree(tmp_path) == before


def test_witness_checks(tmp_path):
    port = free_port()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "w.key").write_text(KEY)
    os.chmod(tmp_path / "w.key", 0o604)
    cfg = tmp_path / "witness.toml"
    cfg.write_text(f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "afile/state"\n'
                   f'key_file = "w.key"\nnodes = ["A", "B"]\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        before = tree(tmp_path)
        rc, lines = check(cfg, "witness")
        assert tree(tmp_path) == before
    assert rc == 2 and lines == [
        f"syncd: {cfg}: witness.state_dir: {tmp_path}/afile/state cannot be created (the witness's decisions): "
        f"{tmp_path}/afile is not a directory",
        f"syncd: {cfg}: witness.listen[0]: 127.0.0.1:{port} is in use by another program (or by this daemon, if it "
        "is already running)",
        f"syncd: {cfg}: witness.key_file: {tmp_path}/w.key has unsafe permissions 0604: a private key must not be "
        "readable or writable by other users, nor writable by its group (chmod 0600, or 0640 for a group the "
        "daemon's user is in)"], lines
    cfg.write_text(cfg.read_text().replace("afile/state", "state"))
    os.chmod(tmp_path / "w.key", 0o600)
    p = syncd("witness", "--config", str(cfg), "--check")
    assert p.returncode == 0 and p.stdout.startswith(f"{cfg}: ok (witness W, arrays A, B, listen 127.0.0.1:{port})")
    assert not (tmp_path / "state").exists()


def test_host_shim_checks(tmp_path):
    port = free_port()
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[host]\nname = "h1"\nsocket = "nodir/nbd.sock"\nadmin_socket = "admin.sock"\n'
                   f'tcp = "127.0.0.1:{port}"\ntcp_exports = ["*"]\n'
                   '[[array]]\nname = "A"\npaths = ["nbd://127.0.0.1:1"]\n')
    (tmp_path / "nodir").write_text("a file")
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "admin.sock"))
    live.listen()
    with socket.socket() as s, live:
        s.bind(("127.0.0.1", port))
        s.listen()
        before = tree(tmp_path)
        rc, lines = check(cfg, "host")
        assert tree(tmp_path) == before
    assert rc == 2 and lines == [
        f"syncd: {cfg}: host.socket: {tmp_path}/nodir exists but is not a directory (where the socket goes)",
        f"syncd: {cfg}: host.admin_socket: {tmp_path}/admin.sock: a process already listens on it (a running "
        "daemon holds it: stop it first, or ignore this when checking a running one)",
        f"syncd: {cfg}: host.tcp: 127.0.0.1:{port} is in use by another program (or by this daemon, if it is already "
        "running)"], lines


def test_host_config_problems_of_every_array_and_the_host_section_at_once(tmp_path):
    cfg = tmp_path / "host.toml"
    cfg.write_text('[host]\nname = "h1"\nsocket = "s"\nadmin_socket = "a"\npoll_interval = -1\n'
                   '[[array]]\nname = "A"\npaths = ["http://x"]\n[[array]]\nname = "B!"\npaths = ["nbd://1.2.3.4:1"]\n')
    before = tree(tmp_path)
    rc, lines = check(cfg, "host")
    assert rc == 2 and lines == [
        f"syncd: invalid host configuration: {cfg}: array[0].paths: a list of nbd://HOST:PORT (or nbds://HOST:PORT "
        "for TLS) addresses",
        f"syncd: invalid host configuration: {cfg}: array[1].name: 'B!' is not a valid name (1-31 letters, digits, "
        "'_', '.', '-')",
        f"syncd: invalid host configuration: {cfg}: host.poll_interval: must be positive, got -1.0"], lines
    assert tree(tmp_path) == before


def test_metadata_and_the_volumes_its_groups_hold(tmp_path):
    """A node whose group holds a volume the config no longer defines, or one whose size
    changed since it was admitted, does not start: --check says so too (reading its metadata,
    never writing it)."""
    from syncd.lab.rig import lab_down, lab_up

    from .rig import FAST_LINK

    lab = lab_up(str(tmp_path / "lab"), size="8MiB", nvolumes=2, npaths=1, link_opts=FAST_LINK, timeout=60)
    lab_down(lab["dir"])
    node = lab["nodes"]["A"]
    cfg = Path(node["config"])
    text = cfg.read_text()
    assert check(cfg)[0] == 0
    vv1, vv2 = node["volumes"]["vv1"]["path"], node["volumes"]["vv2"]["path"]
    # vv2 left out of the config; vv1 grown by 1 MiB (and its size key dropped, so only the
    # group's record can tell).
    kept = text.split("[[volume]]")
    assert len(kept) == 3 and 'name = "vv1"' in kept[1]
    cfg.write_text(kept[0] + "[[volume]]" + "\n".join(line for line in kept[1].splitlines()
                                                      if not line.startswith("size")) + "\n")
    with open(vv1, "r+b") as f:
        f.truncate(9 << 20)
    before = tree(tmp_path / "lab" / "A")
    rc, lines = check(cfg)
    assert rc == 2 and lines == [
        f'syncd: {cfg}: [[volume]] name="vv1" path="{vv1}": is 9437184 bytes, but group rcg1 admitted it with '
        "8388608",
        f"syncd: {cfg}: [[volume]]: group rcg1 holds volume vv2, which the config no longer defines: restore it, or "
        "dismiss it from the group"], lines
    p = syncd("node", "--config", str(cfg))
    assert p.returncode == 2 and "group rcg1 holds volume vv2" in p.stderr
    assert tree(tmp_path / "lab" / "A") == before
    assert os.path.exists(vv2)


def test_read_only_file_system_names_the_unit_setting(tmp_path):
    """What a unit's ProtectSystem=strict does to a volume file or a data directory outside its
    own directories: a read-only file system, and the message says which setting opens it."""
    require_root()
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ro)], check=True)
    try:
        with open(ro / "v.img", "wb") as f:
            f.truncate(1 << 20)
        (ro / "data").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        cfg = node_toml(tmp_path, free_port(), vol("v1", ro / "v.img") + vol("v2", ro / "new.img", "1MiB"),
                        data_dir=str(ro / "data"))
        rc, lines = check(cfg)
        hint = (f"{ro} is on a read-only file system (under a syncd unit, whose ProtectSystem=strict leaves only "
                f"its own directories writable: add ReadWritePaths={ro} with systemctl edit)")
        assert rc == 2 and lines == [
            f"syncd: {cfg}: node.data_dir: {ro}/data: cannot write in it (the node's metadata): "
            + hint.replace(f"{ro} is", f"{ro}/data is").replace(f"={ro} ", f"={ro}/data "),
            f'syncd: {cfg}: [[volume]] name="v1" path="{ro}/v.img": cannot be opened read-write: {hint}',
            f'syncd: {cfg}: [[volume]] name="v2" path="{ro}/new.img": no such file, and it cannot be created: {hint}',
        ], lines
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("what", ["node", "witness"])
def test_metrics_port_in_use(tmp_path, what):
    """The [metrics] endpoint's port is checked like the daemon's other ports."""
    port, mport = free_port(), free_port()
    if what == "node":
        cfg = node_toml(tmp_path, port, vol("v1", tmp_path / "v.img", "1MiB"),
                        extra=f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    else:
        (tmp_path / "w.key").write_text(KEY)
        os.chmod(tmp_path / "w.key", 0o600)
        cfg = tmp_path / "witness.toml"
        cfg.write_text(f'[witness]\nname = "W"\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "state"\n'
                       f'key_file = "w.key"\nnodes = ["A", "B"]\n[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", mport))
        s.listen()
        before = tree(tmp_path)
        rc, lines = check(cfg, what)
        assert tree(tmp_path) == before
    assert rc == 2 and lines == [f"syncd: {cfg}: metrics.listen: 127.0.0.1:{mport} is in use by another program "
                                 "(or by this daemon, if it is already running)"], lines
    assert check(cfg, what)[0] == 0
