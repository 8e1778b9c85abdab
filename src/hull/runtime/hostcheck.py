"""Can this host run Hull? One finding per item, each failure with its fix.

Required items (QEMU and its features, the accelerator, 9p, kernel, image) decide
whether Hull can run; optional ones (tun, cgroups, containerd, podman) only say what a
client integration is missing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hull.config.settings import Config
from hull.errors import HullError
from hull.hypervisor import accel, vsock
from hull.hypervisor.base import Accel, ChannelKind
from hull.image import store

#: QEMU older than this lacks what Hull's command line uses (microvm with PVH, -sandbox).
MIN_QEMU = (6, 0)


@dataclass(frozen=True)
class Finding:
    item: str
    ok: bool
    detail: str
    fix: str = ""
    #: False: a failure is reported but Hull can still run containers.
    required: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10,
                          check=False).stdout


def qemu_version(binary: str) -> tuple[str, tuple[int, int] | None]:
    """The first line of ``qemu --version`` and its (major, minor)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                         check=True).stdout.splitlines()[0]
    found = re.search(r"version (\d+)\.(\d+)", out)
    return out, (int(found.group(1)), int(found.group(2))) if found else None


def _qemu_package(config: Config) -> str:
    """Debian's package of the QEMU for the guest's architecture."""
    return "qemu-system-arm" if config.hypervisor.arch == "aarch64" else "qemu-system-x86"


def check_qemu(config: Config) -> tuple[Finding, str | None]:
    binary = shutil.which(config.hypervisor.path)
    if not binary:
        where = ("" if os.sep in config.hypervisor.path
                 else f" on PATH ({os.environ.get('PATH', '')})")
        return Finding("qemu", False, f"QEMU ({config.hypervisor.path}) not found{where}",
                       f"apt-get install {_qemu_package(config)} (or set hypervisor.path in "
                       "the configuration to the QEMU binary)"), None
    try:
        out, version = qemu_version(binary)
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return Finding("qemu", False, f"{binary} --version failed: {exc}",
                       "reinstall qemu-system-x86"), None
    if version is not None and version < MIN_QEMU:
        return Finding("qemu", False, f"{binary}: {out}: older than "
                       f"{MIN_QEMU[0]}.{MIN_QEMU[1]}",
                       "install a newer qemu-system-x86 (Debian 12's 7.2 works)"), None
    return Finding("qemu", True, f"{binary}: {out}"), binary


def check_qemu_features(config: Config, binary: str) -> Finding:
    """The machine type and the virtio devices Hull's command line names."""
    from hull.hypervisor.qemu.argv import machine_for

    try:
        machines, devices = _run([binary, "-machine", "help"]), _run([binary, "-device", "help"])
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("qemu-features", False, f"cannot ask qemu: {exc}", "reinstall qemu")
    machine = machine_for(config.hypervisor.machine_type)
    missing = [] if re.search(rf"^{re.escape(config.hypervisor.machine_type)}\s", machines,
                              re.MULTILINE) else [f"machine {config.hypervisor.machine_type}"]
    wanted = [machine.device("serial"), "virtserialport", machine.device("rng")]
    missing += [d for d in wanted if f'"{d}"' not in devices]
    if missing:
        return Finding("qemu-features", False, f"qemu lacks {', '.join(missing)}",
                       "install Debian's qemu-system-x86 (or set hypervisor.machine_type "
                       "to one this qemu has)")
    return Finding("qemu-features", True,
                   f"machine {config.hypervisor.machine_type}, {', '.join(wanted)}")


def check_9p(binary: str) -> Finding:
    try:
        out = subprocess.run([binary, "-device", "help"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return Finding("9p", False, f"cannot list qemu devices: {exc}", "reinstall qemu")
    if "virtio-9p" not in out:
        return Finding("9p", False, "qemu lacks virtio-9p (the rootfs is shared over 9p)",
                       "install Debian's qemu-system-x86, which has 9p built in")
    return Finding("9p", True, "qemu has virtio-9p")


def check_accel(config: Config, binary: str, state_root: Path | None) -> Finding:
    if config.hypervisor.arch != platform.machine():
        return Finding("accelerator", config.hypervisor.accelerator != "kvm",
                       f"tcg: emulated {config.hypervisor.arch} guest on this "
                       f"{platform.machine()} host (slow; for tests and image builds)",
                       "set hypervisor.accelerator = \"auto\" or \"tcg\"")
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


def check_channel(config: Config) -> Finding:
    """The agent channel hypervisor.channel gives on this host (hull.hypervisor.vsock)."""
    try:
        kind = vsock.choose(config.hypervisor.channel)
    except HullError as exc:
        return Finding("agent channel", False, str(exc),
                       "modprobe vhost_vsock, or set hypervisor.channel = \"auto\"")
    if kind is ChannelKind.VSOCK:
        return Finding("agent channel", True, f"vsock ({vsock.VHOST_VSOCK} works)")
    why = (vsock.vhost_vsock_problem() if config.hypervisor.channel == "auto"
           else "hypervisor.channel")
    return Finding("agent channel", True, f"virtio-serial ({why})")


def check_kernel(config: Config) -> Finding:
    if config.hypervisor.kernel:
        path = Path(config.hypervisor.kernel)
        return (Finding("kernel", True, f"{path} (from configuration)") if path.is_file()
                else Finding("kernel", False, f"{path} does not exist",
                             "fix hypervisor.kernel or clear it and run `hull kernel build`"))
    arch = store.debian_arch(config.hypervisor.arch)
    current = store.AssetStore(config.asset_dir).current(store.KERNEL, arch)
    if current is None or not current.kernel_file.is_file():
        flag = "" if store.current_link(arch) == "current" else f" --arch {arch}"
        return Finding("kernel", False, f"no {arch} guest kernel in {config.asset_dir}",
                       f"hull kernel build{flag} (or hull kernel fetch{flag})")
    release = current.manifest.get("release", "?")
    return Finding("kernel", True, f"{current.kernel_file} ({release}, "
                   f"{current.manifest.get('flavor', '?')})")


def check_image(config: Config) -> Finding:
    if config.hypervisor.image:
        path = Path(config.hypervisor.image)
        return (Finding("image", True, f"{path} (from configuration)") if path.is_file()
                else Finding("image", False, f"{path} does not exist",
                             "fix hypervisor.image or clear it and run `hull image build`"))
    from hull.image import initrd

    status = initrd.current_image_status(config)
    if status.asset is None or status.initrd is None:
        return Finding("image", False, f"no guest image in {config.asset_dir}",
                       "hull image build")
    if status.stale:
        return Finding("image", False, f"{status.asset.path} is stale: {status.reason}",
                       "hull image build")
    agent = str(status.asset.manifest.get("agent_hash", "?"))[:12]
    return Finding("image", True, f"{status.initrd} (agent {agent} matches this hull, "
                   "kernel modules match the kernel)")


def check_tun(path: str = "/dev/net/tun") -> Finding:
    if os.path.exists(path):
        return Finding("tun", True, f"{path} present (for container networking)",
                       required=False)
    return Finding("tun", False, f"{path} is missing: sandboxes cannot get a network "
                   "device", "modprobe tun (and load it at boot: echo tun >> /etc/modules)",
                   required=False)


def check_cgroups(mount: str = "/sys/fs/cgroup") -> Finding:
    """Host cgroups: containers' cgroups live in the guest; the host's hold Hull's
    processes (the shim v2 and its VM), which containerd places by cgroup path."""
    root = Path(mount)
    if (root / "cgroup.controllers").exists():
        return Finding("cgroups", True, f"cgroup v2 at {mount}", required=False)
    if (root / "unified" / "cgroup.controllers").exists():
        return Finding("cgroups", True, f"hybrid cgroups (v1, v2 at {mount}/unified); "
                       "container limits are enforced in the guest", required=False)
    if (root / "memory").is_dir():
        return Finding("cgroups", True, f"cgroup v1 at {mount}; container limits are "
                       "enforced in the guest", required=False)
    return Finding("cgroups", False, f"no cgroup hierarchy mounted at {mount}",
                   "mount cgroup2 at /sys/fs/cgroup (systemd does this at boot)",
                   required=False)


def check_ksm(directory: str = "/sys/kernel/mm/ksm") -> Finding:
    """Kernel samepage merging: QEMU marks guest RAM mergeable (mem-merge, on by default),
    and pages that sandboxes write alike (zeroed pages, the same kernel and agent data in
    clones of one template) are then kept once. Measured: ~10 MiB less host memory per
    idle clone, for under 1% of a core of ksmd at the default scan rate
    (docs/performance.md)."""
    ksm = Path(directory)
    try:
        run = (ksm / "run").read_text().strip()
        zero = (ksm / "use_zero_pages").read_text().strip()
    except OSError:
        return Finding("ksm", False, f"{directory} is missing: this kernel has no KSM "
                       "(idle sandboxes cannot share identical guest pages)",
                       "a kernel with CONFIG_KSM", required=False)
    fix = f"echo 1 > {directory}/use_zero_pages; echo 1 > {directory}/run"
    if run != "1":
        return Finding("ksm", False, f"KSM is off ({directory}/run = {run}): idle sandboxes "
                       "keep identical guest pages apart (~10 MiB each)", fix, required=False)
    if zero != "1":
        return Finding("ksm", False, "KSM runs, but merges zeroed guest pages only with "
                       f"each other ({directory}/use_zero_pages = {zero})", fix,
                       required=False)
    return Finding("ksm", True, "KSM runs, with use_zero_pages (idle sandboxes share "
                   "identical guest pages)", required=False)


CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
SHIM_V2 = "containerd-shim-hull-v2"
CONTAINERS_CONF = (Path("/etc/containers/containers.conf"),
                   Path("/usr/share/containers/containers.conf"))


def check_containerd(config_file: Path = CONTAINERD_CONFIG) -> Finding:
    binary = shutil.which("containerd")
    if not binary:
        return Finding("containerd", False, "containerd not found (only needed for "
                       "containerd, CRI and Kubernetes)", "apt-get install containerd",
                       required=False)
    if not shutil.which(SHIM_V2):
        return Finding("containerd", False, f"{binary} found, but {SHIM_V2} is not on PATH",
                       f"ln -s /opt/hull/venv/bin/{SHIM_V2} /usr/local/bin/", required=False)
    try:
        text = config_file.read_text()
    except OSError:
        text = ""
    if "io.containerd.hull.v2" not in text:
        return Finding("containerd", False, f"{binary} found; {config_file} has no hull "
                       "runtime (ctr --runtime io.containerd.hull.v2 works; CRI does not)",
                       "merge deploy/containerd-hull.toml into /etc/containerd/config.toml "
                       "and systemctl restart containerd", required=False)
    return Finding("containerd", True, f"{binary}; {SHIM_V2} on PATH; runtime "
                   f"io.containerd.hull.v2 in {config_file}", required=False)


def check_podman(confs: tuple[Path, ...] = CONTAINERS_CONF) -> Finding:
    binary = shutil.which("podman")
    if not binary:
        return Finding("podman", False, "podman not found (only needed for podman)",
                       "apt-get install podman", required=False)
    home = os.environ.get("HOME")
    paths = [*confs, *([Path(home) / ".config/containers/containers.conf"] if home else [])]
    for conf in paths:
        try:
            text = conf.read_text()
        except OSError:
            continue
        if re.search(r"^\s*hull\s*=", text, re.MULTILINE):
            return Finding("podman", True, f"{binary}; runtime hull in {conf}",
                           required=False)
    return Finding("podman", False, f"{binary} found; no hull runtime in containers.conf "
                   "(podman --runtime /usr/local/bin/hull works)",
                   "add to /etc/containers/containers.conf: [engine.runtimes] "
                   'hull = ["/usr/local/bin/hull"]', required=False)


def run_checks(config: Config, state_root: Path | None = None) -> list[Finding]:
    qemu, binary = check_qemu(config)
    findings = [qemu]
    if binary:
        findings += [check_qemu_features(config, binary),
                     check_accel(config, binary, state_root), check_9p(binary)]
    findings += [check_channel(config), check_kernel(config), check_image(config),
                 check_tun(), check_cgroups(), check_ksm(),
                 check_containerd(), check_podman()]
    return findings


def healthy(findings: list[Finding]) -> bool:
    return all(f.ok for f in findings if f.required)
