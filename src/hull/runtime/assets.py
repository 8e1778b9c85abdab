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
    if hv.kernel:
        kernel = Path(hv.kernel)
    else:
        current = assets.current(store.KERNEL)
        if current is None:
            raise AssetError(f"no guest kernel in {config.asset_dir}: run `hull kernel build` "
                             "(or `hull kernel fetch`)")
        kernel = current.path / "vmlinux"
    if hv.image:
        initrd = Path(hv.image)
    else:
        image = assets.current(store.IMAGE)
        if image is None:
            raise AssetError(f"no guest image in {config.asset_dir}: run `hull image build`")
        initrd = image.path / "initrd.img"
    for what, path in (("guest kernel", kernel), ("guest image", initrd)):
        if not path.is_file():
            raise AssetError(f"{what} {path} does not exist")
    return GuestAssets(kernel, initrd)
