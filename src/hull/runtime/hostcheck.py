"""Can this host run Hull? One finding per item, each failure with its fix."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hull.config.settings import Config
from hull.errors import HullError
from hull.hypervisor import accel
from hull.hypervisor.base import Accel
from hull.image import store


@dataclass(frozen=True)
class Finding:
    item: str
    ok: bool
    detail: str
    fix: str = ""


def check_qemu(config: Config) -> tuple[Finding, str | None]:
    binary = shutil.which(config.hypervisor.path)
    if not binary:
        return Finding("qemu", False, f"{config.hypervisor.path} not found",
                       "apt-get install qemu-system-x86 (or set hypervisor.path)"), None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return Finding("qemu", False, f"{binary} --version failed: {exc}",
                       "reinstall qemu-system-x86"), None
    return Finding("qemu", True, f"{binary}: {out}"), binary


def check_9p(binary: str) -> Finding:
    try:
        out = subprocess.run([binary, "-device", "help"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("9p", False, f"cannot list qemu devices: {exc}", "reinstall qemu")
    if "virtio-9p-device" not in out:
        return Finding("9p", False, "qemu lacks virtio-9p (the rootfs is shared over 9p)",
                       "install Debian's qemu-system-x86, which has 9p built in")
    return Finding("9p", True, "qemu has virtio-9p")


def check_accel(config: Config, binary: str, state_root: Path | None) -> Finding:
    try:
        decision = accel.choose(config.hypervisor.accelerator, binary,
                                state_root / "accel.json" if state_root else None)
    except HullError as exc:
        return Finding("accelerator", False, str(exc),
                       "set hypervisor.accelerator = \"auto\" to fall back to TCG")
    if decision.accel is Accel.KVM:
        return Finding("accelerator", True, f"kvm ({decision.reason})")
    return Finding("accelerator", True,
                   f"tcg: software emulation, slower ({decision.reason})")


def check_kernel(config: Config) -> Finding:
    if config.hypervisor.kernel:
        path = Path(config.hypervisor.kernel)
        return (Finding("kernel", True, f"{path} (from configuration)") if path.is_file()
                else Finding("kernel", False, f"{path} does not exist",
                             "fix hypervisor.kernel or clear it and run `hull kernel build`"))
    current = store.AssetStore(config.asset_dir).current(store.KERNEL)
    if current is None or not (current.path / "vmlinux").is_file():
        return Finding("kernel", False, f"no guest kernel in {config.asset_dir}",
                       "hull kernel build (or hull kernel fetch)")
    release = current.manifest.get("release", "?")
    return Finding("kernel", True, f"{current.path / 'vmlinux'} ({release}, "
                   f"{current.manifest.get('flavor', '?')})")


def check_image(config: Config) -> Finding:
    if config.hypervisor.image:
        path = Path(config.hypervisor.image)
        return (Finding("image", True, f"{path} (from configuration)") if path.is_file()
                else Finding("image", False, f"{path} does not exist",
                             "fix hypervisor.image or clear it and run `hull image build`"))
    from hull.image import initrd

    current = store.AssetStore(config.asset_dir).current(store.IMAGE)
    if current is None or not (current.path / "initrd.img").is_file():
        return Finding("image", False, f"no guest image in {config.asset_dir}",
                       "hull image build")
    if current.manifest.get("agent_hash") != initrd.agent_hash():
        return Finding("image", False, f"{current.path} holds an agent older than this hull",
                       "hull image build")
    return Finding("image", True, f"{current.path / 'initrd.img'} (agent up to date)")


def run_checks(config: Config, state_root: Path | None = None) -> list[Finding]:
    qemu, binary = check_qemu(config)
    findings = [qemu]
    if binary:
        findings += [check_accel(config, binary, state_root), check_9p(binary)]
    findings += [check_kernel(config), check_image(config)]
    return findings
