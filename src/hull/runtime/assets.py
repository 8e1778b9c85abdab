"""Which kernel and guest image a VM boots: from configuration, else the current builds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hull.config.settings import Config
from hull.errors import AssetError
from hull.image import store


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path


def resolve(config: Config) -> GuestAssets:
    assets = store.AssetStore(config.asset_dir)
    hv = config.hypervisor
    # The guest's architecture picks the assets: kernel/current for the host's, else
    # kernel/current-<arch> (e.g. current-arm64 for machine_type "virt" on x86_64).
    arch = store.debian_arch(hv.arch)
    flag = "" if store.current_link(arch) == "current" else f" --arch {arch}"
    if hv.kernel:
        kernel = Path(hv.kernel)
    else:
        current = assets.current(store.KERNEL, arch)
        if current is None:
            raise AssetError(f"no {arch} guest kernel in {config.asset_dir}: run "
                             f"`hull kernel build{flag}` (or `hull kernel fetch{flag}`)")
        kernel = current.kernel_file
    if hv.image:
        initrd = Path(hv.image)
    else:
        image = assets.current(store.IMAGE, arch)
        if image is None:
            raise AssetError(f"no {arch} guest image in {config.asset_dir}: run "
                             f"`hull image build{flag}`")
        initrd = image.path / "initrd.img"
    for what, path in (("guest kernel", kernel), ("guest image", initrd)):
        if not path.is_file():
            raise AssetError(f"{what} {path} does not exist")
    return GuestAssets(kernel, initrd)
