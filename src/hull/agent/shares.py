"""The virtio-9p shares a container's rootfs comes from, mounted in the guest."""

from __future__ import annotations

import errno
import os

from hull.agent import syscalls as sc
from hull.agent.pipes import unmount
from hull.agentapi import schema

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from collections.abc import Iterable

    from hull.agent.spec import Mount

# cache=mmap, not loose: a pod's containers from one image share lower-layer inodes
# (overlayfs reports the lower file's st_dev/st_ino, so their 9p QIDs are equal), and a
# loose cache kept serving them through a deleted container's path: a new container
# then found no /bin/sleep (tests/integration/test_cri.py, exit_stop_and_remove).
_9P_OPTIONS = "trans=virtio,version=9p2000.L,msize=512000,cache=mmap"


class Shares:
    def __init__(self, run_dir: str, share_dir: str | None) -> None:
        self.run_dir = run_dir
        #: TEST ONLY: a tag names <share_dir>/<tag>, bind-mounted (see server.Options)
        self.share_dir = share_dir
        #: mount points of shares mounted once and shared by containers (RootfsShare.path)
        self.share_mounts: set[str] = set()

    def mount_rootfs(self, share: schema.RootfsShare, root: str) -> None:
        """Mount the container's rootfs share at root; OSError (root unmounted) on failure."""
        os.makedirs(root, 0o755, exist_ok=True)
        try:
            if share.path:
                self._bind_from_share(share, root)
            elif self.share_dir is not None:
                if not share.tag or "/" in share.tag or share.tag in (".", ".."):
                    raise OSError(errno.EINVAL, f"share tag {share.tag!r} is not valid")
                sc.mount(os.path.join(self.share_dir, share.tag), root, None,
                         sc.MS_BIND | sc.MS_REC)
                if share.readonly:
                    sc.mount(None, root, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)
            else:
                sc.mount(share.tag, root, "9p", sc.MS_RDONLY if share.readonly else 0,
                         _9P_OPTIONS)
        except OSError:
            unmount(root)
            raise

    def _bind_from_share(self, share: schema.RootfsShare, root: str) -> None:
        """Bind <share>/<path> as the rootfs: a pod's containers share one 9p device."""
        point = self._share_mount(share.tag)
        source = os.path.realpath(os.path.join(point, share.path))
        # The schema refuses "..": this also refuses a symlink leading out of the share.
        if not source.startswith(point + "/"):
            raise OSError(errno.EINVAL, f"rootfs path {share.path!r} leaves the share")
        sc.mount(source, root, None, sc.MS_BIND | sc.MS_REC)
        if share.readonly:
            sc.mount(None, root, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY)

    def resolve_binds(self, mounts: Iterable[Mount]) -> None:
        """Point each bind mount the host staged in a share at its path in the guest.

        ``hullshare:<tag>/<path>`` sources (hull.runtime.sharedfs) become the path under
        the share's mount point, mounting the share on first use. OSError names the mount.
        """
        for m in mounts:
            if m.is_bind and m.source.startswith(schema.SHARE_SOURCE_PREFIX):
                try:
                    m.source = self._share_path(m.source[len(schema.SHARE_SOURCE_PREFIX):])
                except OSError as exc:
                    raise OSError(exc.errno, f"mount {m.destination}: bind source "
                                  f"{m.source}: {exc.strerror}") from None

    def _share_path(self, ref: str) -> str:
        tag, _, path = ref.partition("/")
        parts = path.split("/")
        if (not path or "\0" in path or len(path) > schema.MAX_SHARE_PATH
                or any(p in ("", ".", "..") for p in parts)):
            raise OSError(errno.EINVAL, f"share path {path!r} must be relative, without "
                          "'..'")
        point = self._share_mount(tag)
        source = os.path.realpath(os.path.join(point, path))
        if not source.startswith(point + "/"):
            raise OSError(errno.EINVAL, f"share path {path!r} leaves the share")
        os.stat(source)  # a staged source is there: ENOENT is an error, not a skip
        return source

    def _share_mount(self, tag: str) -> str:
        """Where share ``tag`` is mounted, mounting it on first use (once per tag)."""
        if not tag or "/" in tag or tag in (".", ".."):
            raise OSError(errno.EINVAL, f"share tag {tag!r} is not valid")
        point = os.path.join(self.run_dir, "shares", tag)
        if point in self.share_mounts:
            return point
        os.makedirs(point, 0o755, exist_ok=True)
        if self.share_dir is not None:
            sc.mount(os.path.join(self.share_dir, tag), point, None,
                     sc.MS_BIND | sc.MS_REC)
        else:
            sc.mount(tag, point, "9p", 0, _9P_OPTIONS)
        self.share_mounts.add(point)
        return point
