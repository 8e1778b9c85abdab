"""Init duties of the agent when it is the guest's PID 1, and the guest-wide setup of hello.

Order matters: the mounts first (devtmpfs gives /dev/console and the virtio-serial port
nodes), then the kernel modules (they may provide virtio drivers), then ``lo``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from hull.agent import syscalls as sc
from hull.agent.log import log

# (source, target, fstype, flags, data)
_EARLY_MOUNTS: tuple[tuple[str, str, str, int, str | None], ...] = (
    ("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", sc.MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
     "newinstance,ptmxmode=0666,mode=0620"),
    ("shm", "/dev/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"),
    ("run", "/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
    ("tmp", "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"),
    # favordynmods (Linux 6.0+): a task's move into a cgroup (every exec and container
    # init joins its container's) then skips an RCU grace period, ~10 ms under TCG.
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
     "favordynmods"),
)
MODULES_DIR = "/lib/modules/hull"


def early_setup() -> None:
    """Everything PID 1 does before it looks for the channel; failures are logged only."""
    for source, target, fstype, flags, data in _EARLY_MOUNTS:
        try:
            os.makedirs(target, exist_ok=True)
            try:
                sc.mount(source, target, fstype, flags, data)
            except OSError as exc:
                if fstype != "cgroup2" or exc.errno != errno.EINVAL:
                    raise
                sc.mount(source, target, fstype, flags, None)  # a kernel before 6.0
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log(f"mount {target}: {exc.strerror}")
    _ensure_stdio()
    load_modules(MODULES_DIR)
    _enable_cgroup_controllers("/sys/fs/cgroup")
    try:
        loopback_up()
    except OSError as exc:
        log(f"lo: {exc.strerror}")


def _ensure_stdio() -> None:
    """Without /dev/console in the initrd the kernel starts init with fds 0-2 closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                console = os.open("/dev/console", os.O_RDWR | os.O_NOCTTY)
            except OSError:
                console = os.open("/dev/null", os.O_RDWR)
            if console != fd:
                os.dup2(console, fd)
                os.close(console)


def load_modules(directory: str) -> None:
    """Load directory/*.ko in modules.order order (the kernel flavor "debian" ships them)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    try:
        with open(os.path.join(directory, "modules.order")) as fh:
            order = [os.path.basename(line.strip()) for line in fh if line.strip()]
    except FileNotFoundError:
        order = sorted(n for n in names if ".ko" in n)
    present = set(names)
    for name in order:
        if name not in present:
            log(f"module {name}: not in {directory}")
            continue
        flags = 0 if name.endswith(".ko") else sc.MODULE_INIT_COMPRESSED_FILE
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.finit_module(fd, flags)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                log(f"module {name}: {exc.strerror}")
        finally:
            os.close(fd)


def _enable_cgroup_controllers(root: str) -> None:
    try:
        with open(os.path.join(root, "cgroup.controllers")) as fh:
            controllers = fh.read().split()
    except OSError:
        return
    for name in controllers:  # one by one: one unavailable controller must not stop the rest
        try:
            with open(os.path.join(root, "cgroup.subtree_control"), "w") as fh:
                fh.write(f"+{name}")
        except OSError as exc:
            log(f"cgroup controller {name}: {exc.strerror}")


def loopback_up() -> None:
    sock = sc.inet_dgram_socket()  # ctypes: the socket module is a costly import
    try:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock, sc.SIOCGIFFLAGS, ifreq))[1]
        iff_up = 0x1
        fcntl.ioctl(sock, sc.SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | iff_up))
    finally:
        os.close(sock)


def add_entropy(entropy: bytes) -> None:
    """Mix host entropy into the guest RNG, crediting it (RNDADDENTROPY needs CAP_SYS_ADMIN)."""
    if not entropy:
        return
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        try:
            info = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
            fcntl.ioctl(fd, sc.RNDADDENTROPY, info)
        except OSError:
            os.write(fd, entropy)  # mixed in without credit
        # Reseed the kernel's CRNG from the pool now, not at its next scheduled reseed: a
        # VM restored from a template (hull.runtime.factory) starts with its template's
        # CRNG state, and two clones must never produce the same bytes.
        try:
            fcntl.ioctl(fd, sc.RNDRESEEDCRNG)
        except OSError as exc:
            log(f"crng reseed: {exc.strerror}")
    finally:
        os.close(fd)


#: Kernel log lines that mark boot phases (HULL_PROFILE=1 only): name -> line start.
_KERNEL_MARKS = (("kernel.unpack", "Unpacking initramfs"),
                 ("kernel.unpacked", "Freeing initrd memory"),
                 ("kernel.init", "Run /init as init process"))


def kernel_marks() -> dict[str, float]:
    """When the kernel logged its boot milestones (seconds of its log clock), from
    /dev/kmsg: for boot profiles only, as reading the log costs a little."""
    found: dict[str, float] = {}
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return found
    try:
        while len(found) < len(_KERNEL_MARKS):
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while reading: skip ahead
                    continue
                break
            header, _, text = record.partition(";")
            fields = header.split(",")  # priority,sequence,microseconds,flags
            for name, start in _KERNEL_MARKS:
                if text.startswith(start) and len(fields) > 2 and fields[2].isdigit():
                    found.setdefault(name, int(fields[2]) / 1e6)
    finally:
        os.close(fd)
    return found


def set_clock(time_ns: int) -> bool:
    """Step CLOCK_REALTIME to the host's clock when it is more than a second off."""
    if time_ns <= 0 or abs(time.time_ns() - time_ns) <= 1_000_000_000:
        return False
    time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
    return True
