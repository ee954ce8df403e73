"""Real backing-device failures for labs and tests (the seed's "RAID set or metadata failure").

A loop device is made to fail by shrinking its capacity to one block (LOOP_SET_STATUS64 with a
size limit, then LOOP_SET_CAPACITY): every read beyond it comes back short and every write
fails with ENOSPC from the kernel's block layer, exactly as when a LUN shrinks or vanishes under
a running array. The backing file is untouched, so "repairing" the disk (size limit back to 0)
brings the same data back. Needs root and a loop device.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess

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
