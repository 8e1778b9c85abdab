"""The per-architecture parts: configuration, asset links, kernel recipes, agent syscalls."""

from __future__ import annotations

import gzip
import json
import platform
from pathlib import Path

import pytest

from hull.agent import seccomp, syscalls
from hull.config import settings
from hull.errors import AssetError
from hull.image import kernel, store


def test_virt_machine_means_an_aarch64_guest_and_its_qemu(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[hypervisor]\nmachine_type = "virt"\n')
    hv = settings.load(f).hypervisor
    assert (hv.arch, hv.path) == ("aarch64", "qemu-system-aarch64")
    f.write_text('[hypervisor]\nmachine_type = "virt"\npath = "/opt/q/qemu"\n')
    assert settings.load(f).hypervisor.path == "/opt/q/qemu"
    f.write_text('[hypervisor]\nmachine_type = "q35"\n')
    hv = settings.load(f).hypervisor
    assert (hv.arch, hv.path) == ("x86_64", "qemu-system-x86_64")


def test_default_machine_follows_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "host_arch", lambda: "aarch64")
    hv = settings.HypervisorConfig()
    assert (hv.machine_type, hv.arch, hv.path) == ("virt", "aarch64", "qemu-system-aarch64")
    monkeypatch.setattr(settings, "host_arch", lambda: "x86_64")
    hv = settings.HypervisorConfig()
    assert (hv.machine_type, hv.arch, hv.path) == ("microvm", "x86_64", "qemu-system-x86_64")


def test_each_guest_arch_has_its_own_current_link(tmp_path: Path) -> None:
    host = store.debian_arch(platform.machine())
    other = "arm64" if host == "amd64" else "amd64"
    assert store.current_link(None) == store.current_link(host) == "current"
    assert store.current_link(platform.machine()) == "current"
    assert store.current_link(other) == f"current-{other}"
    assets = store.AssetStore(tmp_path)
    for key, arch in (("native", None), ("foreign", other)):
        d = assets.dir(store.KERNEL, key)
        d.mkdir(parents=True)
        assets.write_manifest(d, {"key": key, "boot_file": "Image" if arch else "vmlinux"})
        assets.publish(store.KERNEL, key, arch)
    native, foreign = assets.current(store.KERNEL), assets.current(store.KERNEL, other)
    assert native is not None and foreign is not None
    assert (native.key, foreign.key) == ("native", "foreign")
    assert native.kernel_file.name == "vmlinux" and foreign.kernel_file.name == "Image"


def test_kernel_arch_names() -> None:
    assert kernel.arch_info("arm64") is kernel.arch_info("aarch64")
    assert kernel.arch_info("amd64") is kernel.arch_info("x86_64")
    arm = kernel.arch_info("arm64")
    assert (arm.make_arch, arm.debian, arm.boot_file) == ("arm64", "arm64", "Image")
    assert "CONFIG_SERIAL_AMBA_PL011_CONSOLE" in arm.builtin
    assert "CONFIG_PVH" not in arm.builtin and "CONFIG_PVH" in kernel.REQUIRED_BUILTIN
    with pytest.raises(AssetError, match="no guest kernel recipe"):
        kernel.arch_info("riscv64")


def test_arm64_kernel_fragment_loads() -> None:
    names = [f.name for f in kernel.load_fragments("aarch64")]
    assert names == ["kconfig/common.config", "kconfig/aarch64.config"]
    values = kernel.load_fragments("aarch64")[1].values
    assert values["CONFIG_SERIAL_AMBA_PL011_CONSOLE"] == "y"


def test_arm64_image_from_a_vmlinuz() -> None:
    image = bytes(0x38) + kernel.ARM64_IMAGE_MAGIC + bytes(64)
    assert kernel.arm64_image(image) == image
    assert kernel.arm64_image(gzip.compress(image)) == image
    with pytest.raises(ValueError, match="not an arm64 Image"):
        kernel.arm64_image(b"\x7fELF" + bytes(100))


def test_agent_syscall_numbers_per_arch() -> None:
    # <asm/unistd_64.h> (x86_64) and <asm-generic/unistd.h> (aarch64)
    assert syscalls._nr("finit_module", "x86_64") == 313
    assert syscalls._nr("finit_module", "aarch64") == 273
    assert syscalls._nr("seccomp", "aarch64") == 277
    assert syscalls._nr("capset", "aarch64") == 91
    assert syscalls._nr("pidfd_getfd", "aarch64") == 438
    assert set(syscalls.SYSCALL_NUMBERS["x86_64"]) == set(syscalls.SYSCALL_NUMBERS["aarch64"])
    with pytest.raises(OSError, match="no syscall number for riscv64"):
        syscalls._nr("capset", "riscv64")


def test_seccomp_profiles_are_refused_on_aarch64() -> None:
    profile = json.loads('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}')
    assert seccomp.compile_profile(profile, machine="x86_64").program
    with pytest.raises(seccomp.SeccompError, match=r"x86_64 guests only.*aarch64"):
        seccomp.compile_profile(profile, machine="aarch64")
