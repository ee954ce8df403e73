"""Real backing-device failures for labs and tests (the seed's "RAID set or metadata failure"),
and disks that a power cut empties of what was not flushed (``PowerCutDisk``).

A loop device is made to fail by shrinking its capacity to one block (LOOP_SET_STATUS64 with a
size limit, then LOOP_SET_CAPACITY): every read beyond it comes back short and every write
fails with ENOSPC from the kernel's block layer, exactly as when a LUN shrinks or vanishes under
a running array. The backing file is untouched, so "repairing" the disk (size limit back to 0)
brings the same data back. Needs root and a loop device.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import time

LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
# struct loop_info64: 5 x u64 (device, inode, rdevice, offset, sizelimit), 4 x u32, 64 + 64 + 32
# bytes of names/key, 2 x u64.
_INFO = struct.Struct("=5Q4I64s64s32s2Q")
_SIZELIMIT = 4


class FaultError(Exception):
    pass


def _set_sizelimit(dev: str, limit: int) -> None:
    fd = os.open(dev, os.O_RDONLY)
    try:
        buf = bytearray(_INFO.size)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        fields = list(_INFO.unpack(buf))
        fields[_SIZELIMIT] = limit
        fcntl.ioctl(fd, LOOP_SET_STATUS64, _INFO.pack(*fields))
        fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
    except OSError as e:
        raise FaultError(f"{dev}: cannot change the loop device's size limit: {e.strerror}") from None
    finally:
        os.close(fd)


def is_loop(dev: str) -> bool:
    return os.path.basename(os.path.realpath(dev)).startswith("loop") and dev.startswith("/dev/")


def fail_disk(dev: str) -> None:
    """Make every I/O to ``dev`` beyond its first 512 bytes fail."""
    if not is_loop(dev):
        raise FaultError(f"{dev} is not a loop device: disk failures are injected on loop devices "
                         "(syncd lab up --loop)")
    _set_sizelimit(dev, 512)


def heal_disk(dev: str) -> None:
    if not is_loop(dev):
        raise FaultError(f"{dev} is not a loop device")
    _set_sizelimit(dev, 0)


def make_loop(image: str, size: int) -> str:
    with open(image, "ab") as f:
        f.truncate(size)
    p = subprocess.run(["losetup", "--find", "--show", image], capture_output=True, text=True)
    if p.returncode != 0:
        raise FaultError(f"losetup {image} failed: {p.stderr.strip()} (loop devices need root)")
    return p.stdout.strip()


def drop_loop(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True)


class FailingFile:
    """A file whose I/O fails with a real EIO from the kernel on demand: ``nbdfuse`` exposes an
    ``nbdkit file`` export of ``backing`` (through nbdkit's error filter) as the regular file
    ``path`` on FUSE. While ``fail()`` is in force every read and write of ``path`` returns EIO;
    ``heal()`` ends it. The data stays in ``backing``. Needs root, /dev/fuse, nbdfuse, nbdkit."""

    def __init__(self, path: str, backing: str, size: int):
        self.path, self.backing = path, backing
        self.trigger = backing + ".fail"
        with open(backing, "ab") as f:
            f.truncate(size)
        open(path, "ab").close()  # the mount point: a regular file
        self.proc = subprocess.Popen(
            ["nbdfuse", path, "--command", "nbdkit", "-s", "--filter=error", "file", backing,
             "error=EIO", "error-rate=100%", f"error-file={self.trigger}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import time

        deadline = time.monotonic() + 10
        while not os.path.ismount(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.stop()
                raise FaultError(f"nbdfuse could not mount {path}: {err.strip() or 'timed out'}")
            time.sleep(0.05)

    def fail(self) -> None:
        open(self.trigger, "w").close()

    def heal(self) -> None:
        try:
            os.unlink(self.trigger)
        except FileNotFoundError:
            pass

    def stop(self) -> None:
        self.heal()
        if os.path.ismount(self.path):
            subprocess.run(["umount", self.path], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pid_alive(pid: int) -> bool:
    """``pid`` runs (a zombie child of ours is reaped, and is not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child: its parent (or init) reaps it
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _mounted(path: str) -> bool:
    """``path`` is a mount point, even of a FUSE server that is gone (stat fails: ENOTCONN)."""
    path = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    esc = path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    with open("/proc/self/mounts") as f:
        return any(line.split(" ")[1] == esc for line in f)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class PowerCutDisk:
    """A disk with a volatile write cache that a power cut empties, for power-cut tests and the
    lab: ``nbdkit``'s file plugin serves ``backing`` (the medium) through its cache filter in
    writeback mode, and ``nbdfuse`` exposes that as the regular file ``path`` (the node's volume).
    A write to ``path`` lands in nbdkit's cache; only a flush (fsync/fdatasync of ``path``, or a
    write with O_DSYNC/RWF_DSYNC, which the kernel turns into one) writes the cache back to
    ``backing`` and syncs it. ``cut()`` kills nbdkit with SIGKILL: everything written since the
    last flush is gone, as a power cut loses the host's page cache and the disk's write cache.
    ``power_on()`` serves the same ``backing`` at ``path`` again. Needs root, /dev/fuse, nbdkit
    and nbdfuse (libnbd-bin).

    How the cache filter is set up (nbdkit 1.32): ``cache=writeback`` (writes reach the plugin
    only on a flush or with FUA); no ``cache-max-size``, so the cache (an unlinked file in
    ``TMPDIR``, here the backing file's directory) grows up to the disk's size and never
    reclaims a block behind the client's back; ``cache-on-read`` stays off (reads of blocks not
    in the cache go to ``backing``, and nothing but this disk writes ``backing``). The filter
    does not cache trims: they would reach ``backing`` at once while the cache kept serving the
    old data, so trims are refused (EINVAL, through nbdkit's error filter) and a punch-hole
    falls back to writing zeroes, which go through the cache like any write.

    A disk's state (paths and process ids) is a dict (``record``), so a lab keeps it in its
    lab.json and another process can cut or power it on (``PowerCutDisk.from_record``).
    """

    def __init__(self, path: str, backing: str, size: int | None = None, *, log: str | None = None):
        self.path, self.backing = os.path.abspath(path), os.path.abspath(backing)
        self.log = log or self.backing + ".log"
        self.pidfile = self.backing + ".nbdkit.pid"
        self.fuse_pid = 0  # nbdfuse; nbdkit is its child (pid in ``pidfile``)
        self.nbdkit_pid = 0
        if size is not None:
            with open(self.backing, "ab") as f:
                f.truncate(size)
        if not os.path.exists(self.backing):
            raise FaultError(f"{self.backing} does not exist: a power-cut disk needs its backing file")
        if not os.path.exists(self.path) and not _mounted(self.path):
            open(self.path, "ab").close()  # the mount point: a regular file

    @property
    def record(self) -> dict:
        return {"path": self.path, "backing": self.backing, "log": self.log, "fuse_pid": self.fuse_pid,
                "nbdkit_pid": self.nbdkit_pid}

    @classmethod
    def from_record(cls, rec: dict) -> "PowerCutDisk":
        d = cls(rec["path"], rec["backing"], log=rec.get("log"))
        d.fuse_pid, d.nbdkit_pid = rec.get("fuse_pid", 0), rec.get("nbdkit_pid", 0)
        return d

    @property
    def powered(self) -> bool:
        return bool(self.nbdkit_pid) and self._is_ours(self.nbdkit_pid, "nbdkit") and _mounted(self.path)

    def _is_ours(self, pid: int, prog: str) -> bool:
        """``pid`` is still the ``prog`` serving this disk (not a reused pid)."""
        args = _cmdline(pid)
        return pid_alive(pid) and bool(args) and os.path.basename(args[0]) == prog and (
            self.backing in args or self.path in args)

    def power_on(self, timeout: float = 10.0) -> None:
        """Serve ``backing`` at ``path`` (a fresh, empty cache)."""
        if self.powered:
            raise FaultError(f"disk {self.path} is already powered on")
        if _mounted(self.path):  # left by an nbdfuse that was killed
            subprocess.run(["umount", "-l", self.path], capture_output=True)
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass
        env = dict(os.environ, TMPDIR=os.path.dirname(self.backing))
        with open(self.log, "ab") as logf:
            proc = subprocess.Popen(
                ["nbdfuse", self.path, "--command", "nbdkit", "-s", "-P", self.pidfile,
                 "--filter=cache", "--filter=error", "file", self.backing, "cache=writeback",
                 "error=EINVAL", "error-trim-rate=100%"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, start_new_session=True)
        self.fuse_pid = proc.pid
        deadline = time.monotonic() + timeout
        while not (_mounted(self.path) and os.path.exists(self.pidfile)):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.nbdkit_pid = self._read_pidfile()
                self.cut()
                with open(self.log, errors="replace") as f:
                    tail = f.read()[-1500:].strip()
                raise FaultError(f"nbdfuse could not serve {self.backing} at {self.path}: "
                                 f"{tail or 'timed out'} (log: {self.log})")
            time.sleep(0.02)
        self.nbdkit_pid = self._read_pidfile()

    def _read_pidfile(self) -> int:
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        """Write the cache back to ``backing`` (what an operating system does when it shuts down)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def cut(self) -> None:
        """Power cut: nbdkit is killed (its cache is lost), the FUSE mount goes away."""
        if self.nbdkit_pid and self._is_ours(self.nbdkit_pid, "nbdkit"):
            os.kill(self.nbdkit_pid, signal.SIGKILL)
            _wait_gone(self.nbdkit_pid, 10)
        self._unmount()

    def stop(self) -> None:
        """Orderly power-off: flush, then cut (nothing is lost)."""
        if self.powered:
            self.flush()
        self.cut()

    def _unmount(self) -> None:
        fuse = self.fuse_pid if self.fuse_pid and self._is_ours(self.fuse_pid, "nbdfuse") else 0
        if _mounted(self.path):
            # Lazy: a process that still has the volume open (a node not yet stopped) gets
            # ENOTCONN from then on, as from a disk without power.
            if subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", self.path], capture_output=True)
                if fuse:  # a lazy unmount ends only with the last user: stop nbdfuse now
                    os.kill(fuse, signal.SIGTERM)
        if fuse and not _wait_gone(fuse, 5):  # nbdfuse exits once unmounted (and reaps nbdkit)
            os.kill(fuse, signal.SIGKILL)
            _wait_gone(fuse, 5)
        self.nbdkit_pid = self.fuse_pid = 0
