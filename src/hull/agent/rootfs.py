"""The container's filesystem view, built by its init process in its new mount namespace.

Follows runc (libcontainer/rootfs_linux.go): make every mount private, bind the rootfs on
itself, mount the spec's mounts under it, create the /dev nodes and links, then
pivot_root into it and detach the old root. Runs in the forked child only: every function
here may raise OSError or :class:`SetupError`, which the child reports to the agent.

The guest's root is the initramfs, which pivot_root(2) refuses to move (EINVAL: the
rootfs has no parent mount). Then the rootfs is moved onto / and chrooted into instead,
as runc --no-pivot does, after detaching the guest's own mounts so they are not visible.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from hull.agent import syscalls as sc
from hull.agent.spec import ContainerSpec, Device, Mount
from hull.agentapi import mountinfo

Warn = Callable[[str], None]
_MAX_SYMLINKS = 255

# runc's default devices (libcontainer/specconv AllowedDevices with a path).
DEFAULT_DEVICES = (
    Device("/dev/null", "c", 1, 3), Device("/dev/zero", "c", 1, 5),
    Device("/dev/full", "c", 1, 7), Device("/dev/random", "c", 1, 8),
    Device("/dev/urandom", "c", 1, 9), Device("/dev/tty", "c", 5, 0),
)
_DEV_LINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
              ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"),
              ("pts/ptmx", "/dev/ptmx"))
_SIMPLE_TYPES = frozenset({"proc", "sysfs", "tmpfs", "devpts", "mqueue"})
# statvfs f_flag bits that a bind remount must keep (ST_* == MS_* for these)
_KEEP_FLAGS = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC | sc.MS_NOATIME | sc.MS_NODIRATIME
_ST_RELATIME = 4096


class SetupError(Exception):
    """A setup step failed; the message is the one line the host will show."""


def secure_join(root: str, unsafe: str) -> str:
    """root + unsafe, resolving symlinks as if root were "/" (cf. filepath-securejoin).

    A container-controlled symlink must not make a mount land outside the rootfs.
    """
    pending = [p for p in unsafe.split("/") if p and p != "."]
    pending.reverse()
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join([*resolved, part])
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), candidate)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed([p for p in target.split("/") if p and p != "."]))
    return root + "/" + "/".join(resolved) if resolved else root


# ---------------------------------------------------------------------------- before pivot


def prepare(rootfs: str, cspec: ContainerSpec, warn: Warn, *, no_pivot: bool = False,
            before_pivot: Callable[[], None] | None = None) -> None:
    """Mounts and /dev under rootfs, then make it the root of this mount namespace
    (before_pivot runs in between: the createContainer hooks)."""
    sc.mount(None, "/", None, cspec.rootfs_propagation or sc.MS_REC | sc.MS_PRIVATE)
    sc.mount(rootfs, rootfs, None, sc.MS_BIND | sc.MS_REC)
    own_dev = False
    for m in cspec.mounts:
        mount_entry(rootfs, m, warn)
        own_dev = own_dev or m.destination.rstrip("/") == "/dev"
    if own_dev:
        # Only on a /dev the spec mounted: mknod on the 9p share itself would create
        # device nodes in the host's bundle.
        create_devices(rootfs, cspec.devices)
    elif cspec.devices:
        warn("no /dev mount in the spec: linux.devices were not created")
    if before_pivot is not None:
        before_pivot()
    enter(rootfs, no_pivot=no_pivot)


def mount_entry(rootfs: str, m: Mount, warn: Warn) -> None:
    try:
        _mount_entry(rootfs, m, warn)
    except OSError as exc:
        raise SetupError(f"mount {m.destination}: {sc.strerror(exc.errno or 0)}") from exc


def _mount_entry(rootfs: str, m: Mount, warn: Warn) -> None:
    dest = secure_join(rootfs, m.destination)
    if m.is_bind:
        if not _bind_entry(dest, m, warn):
            return  # skipped: no propagation change on a mount point that is not there
    elif m.type in _SIMPLE_TYPES:
        os.makedirs(dest, 0o755, exist_ok=True)
        try:
            sc.mount(m.source or m.type, dest, m.type, m.flags, m.data or None)
        except PermissionError:
            if m.type != "sysfs":
                raise
            # runc: in a user namespace without its own network namespace sysfs cannot
            # be mounted; bind the guest's instead.
            sc.mount("/sys", dest, None, sc.MS_BIND | sc.MS_REC)
            sc.mount(None, dest, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY
                     | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    elif m.type in ("cgroup", "cgroup2"):
        # The guest has the unified hierarchy only; runc too mounts cgroup2 for "cgroup"
        # on such hosts. A cgroup view is not worth failing the container over.
        try:
            os.makedirs(dest, 0o755, exist_ok=True)
            sc.mount("cgroup2", dest, "cgroup2", m.flags)
        except OSError as exc:
            warn(f"mount {m.destination}: {sc.strerror(exc.errno or 0)}, skipped")
            return
    else:
        warn(f"mount {m.destination}: type {m.type!r} is not supported, skipped")
        return
    if m.propagation:
        sc.mount(None, dest, None, m.propagation)


def _bind_entry(dest: str, m: Mount, warn: Warn) -> bool:
    # Host sources come staged in a share (hull.runtime.sharedfs; the agent rewrote them
    # to guest paths, Shares.resolve_binds). What the host could not share (a device
    # node, a socket) keeps its path: the guest's own is bound if there is one.
    try:
        src_stat = os.stat(m.source)
    except OSError:
        warn(f"mount {m.destination}: bind source {m.source} is not in the guest, skipped")
        return False
    if stat.S_ISDIR(src_stat.st_mode):
        os.makedirs(dest, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
        if not os.path.lexists(dest):
            os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    sc.mount(m.source, dest, None, sc.MS_BIND | (m.flags & sc.MS_REC))
    extra = m.flags & ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT)
    if extra:
        sc.mount(None, dest, None, sc.MS_BIND | sc.MS_REMOUNT | extra | _kept_flags(dest))
    return True


def create_devices(rootfs: str, devices: tuple[Device, ...]) -> None:
    wanted = {d.path: d for d in DEFAULT_DEVICES}
    wanted.update((d.path, d) for d in devices)
    old_umask = os.umask(0)
    try:
        for dev in wanted.values():
            _make_device(secure_join(rootfs, dev.path), dev)
    finally:
        os.umask(old_umask)
    for target, link in _DEV_LINKS:
        path = secure_join(rootfs, link)
        if link == "/dev/ptmx" and os.path.lexists(path):
            os.unlink(path)  # runc setupPtmx: the container's own devpts instance
        with contextlib.suppress(FileExistsError):
            os.symlink(target, path)


def _make_device(path: str, dev: Device) -> None:
    os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[dev.type]
    try:
        os.mknod(path, kind | dev.mode, os.makedev(dev.major, dev.minor))
    except FileExistsError:
        return
    except PermissionError:
        # runc in a user namespace: bind the guest's node (mknod needs init-ns CAP_MKNOD)
        if not os.path.exists(dev.path):
            raise
        if not os.path.lexists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        sc.mount(dev.path, path, None, sc.MS_BIND)
        return
    os.chown(path, dev.uid, dev.gid)


def enter(rootfs: str, *, no_pivot: bool = False) -> None:
    """Make rootfs this mount namespace's root (cwd and root both end up there)."""
    if not no_pivot:
        try:
            _pivot(rootfs)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    _move_root(rootfs)


def _pivot(rootfs: str) -> None:
    # runc's pivotRoot: pivot_root(".", ".") stacks the old root on top of the new one;
    # detaching it from there needs no directory for put_old inside the rootfs.
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.chdir(rootfs)
        sc.pivot_root(".", ".")
        os.fchdir(old_root)
    finally:
        os.close(old_root)
    sc.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def _move_root(rootfs: str) -> None:
    """runc's msMoveRoot, for a root that cannot be pivoted (the guest's initramfs)."""
    for point in sorted(_mount_points(), key=len, reverse=True):
        if (point == "/" or point == rootfs or point.startswith(rootfs + "/")
                or rootfs.startswith(point + "/")):
            continue
        try:
            sc.mount(None, point, None, sc.MS_SLAVE | sc.MS_REC)
            sc.umount2(point, sc.MNT_DETACH)
        except OSError:
            pass  # already gone with a parent, or busy: it is hidden by the chroot anyway
    os.chdir(rootfs)
    sc.mount(rootfs, "/", None, sc.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def _mount_points() -> list[str]:
    return mountinfo.mount_points()


# ---------------------------------------------------------------------------- after pivot


def finish(cspec: ContainerSpec) -> None:
    """The steps that need the container's own /proc: sysctl, masks, read-only views."""
    for key, value in cspec.sysctl:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
            fh.write(value)
    for path in cspec.masked_paths:
        _mask(path)
    for path in cspec.readonly_paths:
        _readonly(path)
    if cspec.readonly_root:
        sc.mount(None, "/", None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _kept_flags("/"))


def _mask(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY)
    else:
        sc.mount("/dev/null", path, None, sc.MS_BIND)


def _readonly(path: str) -> None:
    try:
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _kept_flags(path))


def _kept_flags(path: str) -> int:
    """The per-mount flags a bind remount would otherwise drop."""
    f_flag = os.statvfs(path).f_flag
    return (f_flag & _KEEP_FLAGS) | (sc.MS_RELATIME if f_flag & _ST_RELATIME else 0)


def os_text(exc: BaseException) -> str:
    """One lower-case line for an error raised in a setup step."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror[:1].lower() + exc.strerror[1:]
        if exc.filename is not None:
            return f"{os.fsdecode(exc.filename)}: {text}"
        return text
    return str(exc) or type(exc).__name__
