"""Host files and directories bind-mounted into containers (Kata's shared-directory model).

A VM cannot see host paths: each bind mount's source is bind-mounted on the host into a
per-sandbox staging directory, ``<staging>/<cid>/mounts/<i>`` (``i`` = the mount's index
in config.json), and the staging directory is exported to the guest as ONE 9p share
(tag :data:`SHARE_TAG`; microvm's virtio-mmio devices cannot be hot-plugged, and a pod's
later containers join the same share). The spec sent to the agent names each such
mount's source as ``hullshare:<tag>/<cid>/mounts/<i>``; the agent mounts the share and
binds that path (hull.agent.shares). Only the sources are reachable: nothing above them.

Each staged bind is nosuid and nodev on the host (the guest is untrusted: a device node
or set-uid file it creates through the share must not work for a host process, or for
QEMU itself), read-only on the host too for ``ro``, and private (nothing propagates).
The mounts are cloned with open_tree(2), given their attributes while still detached and
attached with move_mount(2) onto a target reached without following symlinks: the guest
can write in the staging directory (a pod's share root), so a path walk there is
untrusted.

Cleanup reads /proc/self/mountinfo: :func:`release` unmounts everything under a staging
directory, so a `hull delete --force` after a SIGKILL finds what a dead process left.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hull.agentapi import mountinfo, schema
from hull.errors import HullError

if TYPE_CHECKING:  # the VM side: `hull exec` and other clients import this module too
    from hull.hypervisor.base import Share

log = logging.getLogger("hull.sharedfs")

SHARE_TAG = "hullshared"
#: A mount source the agent resolves inside a share: ``hullshare:<tag>/<relative path>``.
GUEST_PREFIX = schema.SHARE_SOURCE_PREFIX

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 0x1, 0x2, 0x4, 0x20
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# The "new mount API" syscalls have one number on every architecture (asm-generic).
# The same numbers on x86_64 and aarch64: syscalls added since Linux 5.1 (424+) are
# numbered alike on every architecture.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class ShareError(HullError):
    """A bind mount could not be shared into the VM (names the mount)."""


class MountError(HullError):
    """A mount or unmount on the host failed."""


def mount(source: str | None, target: str | Path, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    if _libc.mount(source.encode() if source else None, os.fsencode(target),
                   fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise MountError(f"mount {source or fstype} on {target}: {os.strerror(err)}")


def unmount(target: str | Path, every_layer: bool = True) -> None:
    """Detach what is mounted on target (lazily: a busy mount does not fail delete):
    every stacked mount, or only the top one."""
    while _libc.umount2(os.fsencode(target), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        if not every_layer:
            return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOENT):
        raise MountError(f"unmount {target}: {os.strerror(err)}")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# ---------------------------------------------------------------------------- the spec


def is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def relpath(cid: str, index: int) -> str:
    return f"{cid}/mounts/{index}"


def guest_source(cid: str, index: int) -> str:
    return f"{GUEST_PREFIX}{SHARE_TAG}/{relpath(cid, index)}"


def guest_spec(spec: dict[str, Any], staging: Path, cid: str) -> dict[str, Any]:
    """The spec for the agent: each mount staged under ``staging`` gets its share source.

    Pure but for a look at ``staging``: what :func:`stage` did decides, so a source it
    left alone (a device node, a socket) stays a guest path.
    """
    mounts = spec.get("mounts") or []
    staged = [i for i, m in enumerate(mounts) if isinstance(m, dict) and is_bind(m)
              and os.path.lexists(staging / relpath(cid, i))]
    if not staged:
        return spec
    out = copy.copy(spec)
    out["mounts"] = [dict(m, source=guest_source(cid, i)) if i in staged else m
                     for i, m in enumerate(mounts)]
    return out


def shares(staging: Path) -> tuple[Share, ...]:
    """The 9p share of ``staging``, if anything was staged there."""
    from hull.hypervisor.base import Share

    return (Share(SHARE_TAG, staging),) if staging.is_dir() else ()


# ---------------------------------------------------------------------------- staging


def stage(spec: dict[str, Any], bundle: Path, staging: Path, cid: str) -> dict[str, Any]:
    """Bind every host source of the spec's bind mounts under ``staging``; the guest spec.

    ShareError names the mount on failure, with nothing left mounted for ``cid``.
    """
    mounts = spec.get("mounts") or []
    todo = []
    for i, m in enumerate(mounts):
        if not isinstance(m, dict) or not is_bind(m):
            continue
        dest = m.get("destination", "?")
        source = str(m.get("source") or "")
        if not source:
            raise ShareError(f"mount {dest}: a bind mount needs a source")
        host = os.path.realpath(bundle / source)  # relative: to the bundle, as runc
        try:
            st = os.stat(host)
        except OSError as exc:
            raise ShareError(f"mount {dest}: bind source {source}: {exc.strerror}") from None
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            log.warning("mount %s: bind source %s is not a file or directory: it cannot be "
                        "shared into the VM; the guest's own %s is bound if there is one",
                        dest, source, source)
            continue
        options = [o for o in m.get("options") or [] if o in ("ro", "rw", "rbind")]
        readonly = bool(options) and [o for o in options if o != "rbind"][-1:] == ["ro"]
        todo.append((i, dest, host, stat.S_ISDIR(st.st_mode), "rbind" in options, readonly))
    if not todo:
        return spec
    staging.mkdir(mode=0o700, exist_ok=True)
    try:
        for i, dest, host, is_dir, recursive, readonly in todo:
            try:
                bind_into(host, staging, relpath(cid, i), is_dir, recursive, readonly)
            except OSError as exc:
                raise ShareError(f"mount {dest}: cannot share bind source {host} into the "
                                 f"VM: {exc.strerror or exc}") from None
    except BaseException:
        release(staging / cid / "mounts")
        with contextlib.suppress(OSError):
            (staging / cid).rmdir()
        raise
    return guest_spec(spec, staging, cid)


def bind_into(source: str, staging: Path, rel: str, is_dir: bool, recursive: bool,
              readonly: bool) -> None:
    """Bind ``source`` at ``staging/rel`` (nosuid, nodev, private; read-only if asked),
    reaching the target without following any symlink: the guest can write the share."""
    parent, name = rel.rsplit("/", 1)
    dirfd = _open_dirs(staging, parent)
    tfd = mfd = -1
    try:
        if is_dir:
            os.mkdir(name, 0o755, dir_fd=dirfd)
            tfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                          dir_fd=dirfd)
        else:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644, dir_fd=dirfd))
            tfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            if not stat.S_ISREG(os.fstat(tfd).st_mode):
                raise OSError(errno.EINVAL, "mount target is not a regular file")
        flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_RECURSIVE if recursive else 0)
        mfd = _check(_libc.syscall(_SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), flags),
                     "open_tree")
        attr = _MountAttr(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                          | (MOUNT_ATTR_RDONLY if readonly else 0), 0, MS_PRIVATE, 0)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, mfd, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                             ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")
        _check(_libc.syscall(_SYS_MOVE_MOUNT, mfd, b"", tfd, b"",
                             MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH), "move_mount")
    finally:
        for fd in (mfd, tfd, dirfd):
            if fd >= 0:
                os.close(fd)


def _open_dirs(root: Path, rel: str) -> int:
    """An fd of root/rel, made as needed, no component followed if it is a symlink."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.split("/"):
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, f"bad staging path {rel!r}")
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


# ---------------------------------------------------------------------------- cleanup


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path`` (by /proc/self/mountinfo), deepest first."""
    top = os.path.realpath(path)
    try:
        points = mountinfo.mount_points()
    except OSError:
        return []
    found = [p for p in points if p == top or p.startswith(top + "/")]
    return sorted(set(found), key=lambda p: (p.count("/"), p), reverse=True)


def unmount_under(path: Path | str) -> list[str]:
    """Detach every mount at or below ``path``; the mount points that would not go."""
    for _ in range(8):  # stacked mounts come back one layer per pass
        points = mounts_under(path)
        if not points:
            return []
        for point in points:
            if _libc.umount2(os.fsencode(point), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
                err = ctypes.get_errno()
                if err not in (errno.EINVAL, errno.ENOENT):
                    log.warning("unmount %s: %s", point, os.strerror(err))
    return mounts_under(path)


def release(path: Path) -> None:
    """Unmount everything under ``path``, then remove it. Never removes through a mount:
    a bind that would not go raises ShareError and the tree stays (it is a host path)."""
    left = unmount_under(path)
    if left:
        raise ShareError(f"cannot unmount {', '.join(left)}: not removing {path}")
    shutil.rmtree(path, ignore_errors=True)
