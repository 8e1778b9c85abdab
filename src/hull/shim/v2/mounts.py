"""Host mounts of the shim: the task's rootfs from containerd's snapshot, and its bind
into the sandbox's 9p share.

containerd sends the snapshot as ``containerd.types.Mount`` entries (overlay or bind);
the shim mounts them on ``<bundle>/rootfs`` and unmounts them on delete, as the runc
shim does (INTEGRATION.md §2 "Stdio and rootfs"; containerd mount/mount_linux.go, whose
option table this follows). A pod shares ONE host directory with its VM over 9p
(microvm's virtio-mmio devices cannot be hot-plugged), and each container's rootfs is
bind-mounted into it at ``<shared>/<cid>/rootfs``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hull.runtime.sharedfs import MountError, mount, unmount

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8  # the path may be in a directory the guest can write

# option -> (clear?, flag), as containerd's parseMountOptions
_FLAGS = {
    "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "bind": (False, MS_BIND), "rbind": (False, MS_BIND | MS_REC),
    "nosuid": (False, MS_NOSUID), "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV), "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC), "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS), "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC), "noatime": (False, MS_NOATIME),
    "atime": (True, MS_NOATIME), "nodiratime": (False, MS_NODIRATIME),
    "diratime": (True, MS_NODIRATIME), "relatime": (False, MS_RELATIME),
    "norelatime": (True, MS_RELATIME), "strictatime": (False, MS_STRICTATIME),
    "nostrictatime": (True, MS_STRICTATIME), "remount": (False, MS_REMOUNT),
    "defaults": (False, 0),
}


@dataclass(frozen=True)
class MountSpec:
    type: str
    source: str
    options: tuple[str, ...] = ()


def parse_options(options: Iterable[str]) -> tuple[int, str]:
    flags, data = 0, []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount_all(mounts: Iterable[MountSpec], target: Path) -> None:
    """Mount containerd's snapshot mounts on target, in order (containerd mount.All)."""
    target.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        for m in mounts:
            flags, data = parse_options(m.options)
            fstype = None if flags & MS_BIND else m.type
            if flags & MS_BIND and flags & MS_RDONLY:
                # A read-only bind takes a bind, then a read-only remount.
                mount(m.source, target, None, flags & ~MS_RDONLY)
                mount(None, target, None, flags | MS_REMOUNT)
            else:
                mount(m.source, target, fstype, flags, data or None)
            done = True
    except MountError:
        if done:
            unmount(target)
        raise


def remove_bind(target: Path) -> None:
    """Unmount a rootfs bind and remove the directories made for it (best effort)."""
    unmount(target)
    for path in (target, target.parent):
        with contextlib.suppress(OSError):
            path.rmdir()


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)
