"""Where built guest assets live, and which build is current.

Layout under the asset directory (``[runtime] asset_dir``, default ``/var/lib/hull``)::

    kernel/<key>/vmlinux         PVH-bootable uncompressed kernel (what QEMU boots)
    kernel/<key>/Image           instead of vmlinux for arm64 (manifest "boot_file")
    kernel/<key>/manifest.json   {"key", "flavor": "built"|"debian", "release", ...}
    kernel/<key>/modules/        only for flavor "debian": .ko files + modules.order
    kernel/current -> <key>
    image/<key>/initrd.img       the guest image (init = the Hull agent)
    image/<key>/manifest.json    {"key", "agent_hash", "kernel_key", "size", ...}
    image/current -> <key>
    kernel/current-arm64, image/current-arm64    the same for a guest architecture other
                                                 than the host's (Debian arch names)

A build writes into ``<kind>/<key>.tmp-<pid>``, renames it to ``<kind>/<key>`` and then
swaps the ``current`` symlink atomically, so a reader never sees a half-written asset.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hull.errors import AssetError

KERNEL = "kernel"
IMAGE = "image"
#: uname -m -> Debian architecture; either name may be given where an arch is asked for.
DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def debian_arch(arch: str) -> str:
    return DEBIAN_ARCH.get(arch, arch)


def current_link(arch: str | None = None) -> str:
    """The name of the ``current`` link for a guest architecture (None: the host's).

    The host's architecture keeps the plain ``current``; another gets ``current-<arch>``.
    """
    if arch is None or debian_arch(arch) == debian_arch(platform.machine()):
        return "current"
    return f"current-{debian_arch(arch)}"


@dataclass(frozen=True)
class Asset:
    path: Path  # the asset's directory
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return str(self.manifest.get("key", self.path.name))

    @property
    def kernel_file(self) -> Path:
        """A kernel's file QEMU boots: ``vmlinux`` (x86_64, PVH) or ``Image`` (arm64)."""
        return self.path / str(self.manifest.get("boot_file", "vmlinux"))


class AssetStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def current(self, kind: str, arch: str | None = None) -> Asset | None:
        link = self.root / kind / current_link(arch)
        try:
            target = link.resolve(strict=True)
            manifest = json.loads((target / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
        return Asset(target, manifest)

    def get(self, kind: str, key: str) -> Asset | None:
        path = self.dir(kind, key)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return Asset(path, manifest) if isinstance(manifest, dict) else None

    @contextmanager
    def building(self, kind: str, key: str) -> Iterator[Path]:
        """A scratch directory that becomes ``<kind>/<key>`` if the block succeeds."""
        final = self.dir(kind, key)
        tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise AssetError(f"cannot create {tmp}: {exc.strerror}") from exc
        try:
            yield tmp
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_manifest(self, directory: Path, manifest: dict[str, Any]) -> None:
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    def publish(self, kind: str, key: str, arch: str | None = None) -> None:
        """Make ``<kind>/<key>`` the current asset of its kind and guest architecture
        (atomic symlink swap)."""
        link = self.root / kind / current_link(arch)
        tmp = link.with_name(f"{link.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(key)
        tmp.replace(link)
