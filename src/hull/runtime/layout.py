"""How a CLI container's files reach its VM: its rootfs and the host sources of its binds.

Two layouts; :meth:`Files.of` picks one from the configuration.

* **Own devices** (without the factory): the rootfs is a 9p device of its own (tag
  :data:`ROOTFS_TAG`, read-only on the host for a read-only rootfs); the bind sources are
  staged in the container's shared directory (hull.runtime.sharedfs), exported as a
  second device when there are any. QEMU's command line names both: they are made
  before the VM starts.
* **Pod layout** (the factory is enabled, factory.enabled): ONE device, the shared
  directory, with the rootfs bound at ``<cid>/rootfs`` beside the staged sources, as in
  a shim v2 pod. Templates have that one device only (a second 9p device costs each
  clone ~1.2 MiB of QEMU memory, hull.runtime.factory), and it is the only shape a
  clone the pool restored ahead of demand can serve (hull.runtime.pool.fits): its 9p
  device was fixed before anyone leased it. So the binds are made *after* the sandbox
  has its VM: a pooled clone's exported directory is bound onto the (still empty)
  shared directory first, and binds made under it afterwards reach QEMU by mount
  propagation. A clone restored on demand exports the shared directory itself, and a
  cold boot (no usable template) does the same.

Whoever sends create_container asks :func:`rootfs_request` which layout the staging
made (a mount point at ``<cid>/rootfs``: only the host makes those), as guest_spec looks
at what was staged.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hull.agentapi import schema
from hull.config.settings import Config
from hull.oci.bundle import Bundle
from hull.runtime import sharedfs

if TYPE_CHECKING:  # the VM side: the shim imports this module too
    from hull.hypervisor.base import Share

#: The 9p tag of a rootfs exported as a device of its own.
ROOTFS_TAG = "hullroot"


def rootfs_path(cid: str) -> str:
    """Where the pod layout binds the rootfs, relative to the shared directory."""
    return f"{cid}/rootfs"


def rootfs_request(bundle: Bundle, staging: Path, cid: str) -> schema.RootfsShare:
    """The create_container rootfs for the layout the staging of ``cid`` made. By the
    mount table: os.path.ismount misses a bind within one filesystem."""
    point = staging / rootfs_path(cid)
    if os.path.realpath(point) in sharedfs.mounts_under(point):
        return schema.RootfsShare(sharedfs.SHARE_TAG, bundle.readonly_rootfs,
                                  rootfs_path(cid))
    return schema.RootfsShare(ROOTFS_TAG, bundle.readonly_rootfs)


@dataclasses.dataclass(frozen=True)
class Files:
    """The files of one CLI container: staged by before_boot(), then after_boot()."""

    bundle: Bundle
    #: the container's shared directory (hull.runtime.lifecycle.shared_dir)
    staging: Path
    cid: str
    pod_layout: bool

    @classmethod
    def of(cls, config: Config, bundle: Bundle, staging: Path, cid: str) -> Files:
        return cls(bundle, staging, cid, pod_layout=config.factory.enabled)

    def before_boot(self) -> tuple[Share, ...]:
        """Stage what must exist before QEMU starts; the VM's shares. ShareError names
        the mount that cannot be shared."""
        from hull.hypervisor.base import Share

        if self.pod_layout:
            self.staging.mkdir(mode=0o700, exist_ok=True)  # empty: a pooled clone's mount
            return (Share(sharedfs.SHARE_TAG, self.staging),)
        sharedfs.stage(self.bundle.spec, self.bundle.path, self.staging, self.cid)
        rootfs = Share(ROOTFS_TAG, self.bundle.rootfs, readonly=self.bundle.readonly_rootfs)
        return (rootfs, *sharedfs.shares(self.staging))

    def after_boot(self) -> None:
        """The pod layout's binds, once the sandbox has its VM (and, if pooled, the
        clone's directory is bound on the shared directory). Unmounted with the state
        directory (ContainerDir.remove), or with the lease (hull.runtime.pool)."""
        if not self.pod_layout:
            return
        try:
            sharedfs.bind_into(str(self.bundle.rootfs), self.staging, rootfs_path(self.cid),
                               is_dir=True, recursive=True,
                               readonly=self.bundle.readonly_rootfs)
        except OSError as exc:
            raise sharedfs.ShareError(f"container {self.cid}: cannot share its rootfs "
                                      f"{self.bundle.rootfs} into the VM: "
                                      f"{exc.strerror or exc}") from None
        sharedfs.stage(self.bundle.spec, self.bundle.path, self.staging, self.cid)

    def guest_spec(self) -> dict[str, Any]:
        """The spec for the agent, once staged (bind sources named in the share)."""
        return sharedfs.guest_spec(self.bundle.spec, self.staging, self.cid)
