"""Choosing the accelerator: KVM only when a bounded probe proves it works, else TCG.

The existence of /dev/kvm proves nothing: on these machines it belongs to a PVM host on
which normal guest kernels hang. The probe checks, in order, each step bounded in time:

1. the CPU advertises hardware virtualisation (``vmx`` or ``svm`` in /proc/cpuinfo);
2. /dev/kvm opens and answers KVM_GET_API_VERSION with 12 and KVM_CREATE_VM works;
3. a test boot: QEMU with ``accel=kvm`` runs a 200-byte PVH payload that writes to the
   isa-debug-exit port, within a hard timeout.

The result is cached for the host's boot (keyed by /proc/sys/kernel/random/boot_id) so
only the first command after a reboot pays for the test boot.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hull.hypervisor.base import Accel

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12
DEBUG_EXIT_PORT = 0xF4
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Decision:
    accel: Accel
    reason: str


def cpu_has_virt(cpuinfo: str) -> bool:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return "vmx" in flags or "svm" in flags
    return False


def kvm_device_works(path: str = "/dev/kvm") -> str | None:
    """None when /dev/kvm answers like a working KVM; otherwise why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return f"{path} reports KVM API version {version}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as exc:
        return f"{path} does not work: {exc.strerror}"
    finally:
        os.close(fd)
    return None


def pvh_probe_payload() -> bytes:
    """A minimal 32-bit ELF with a PVH entry note whose code only exits QEMU.

    The code is ``mov dx, 0xf4; mov al, 0x31; out dx, al; hlt``: QEMU's isa-debug-exit
    device turns the write into exit status (0x31 << 1) | 1 = 99.
    """
    code = bytes([0x66, 0xBA, DEBUG_EXIT_PORT, 0x00, 0xB0, 0x31, 0xEE, 0xF4, 0xEB, 0xFD])
    load = 0x100000
    note_name = b"Xen\0"
    # XEN_ELFNOTE_PHYS32_ENTRY = 18: the 32-bit physical entry point.
    note = struct.pack("<III", len(note_name), 4, 18) + note_name + struct.pack("<I", 0)
    ehdr_size, phdr_size = 52, 32
    note_off = ehdr_size + 2 * phdr_size
    code_off = note_off + len(note)
    entry = load + code_off
    note = note[:-4] + struct.pack("<I", entry)
    total = code_off + len(code)
    ehdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 2, 40, 0, 0)
    load_ph = struct.pack("<IIIIIIII", 1, 0, load, load, total, total, 5, 0x1000)
    note_ph = struct.pack("<IIIIIIII", 4, note_off, load + note_off, load + note_off,
                          len(note), len(note), 4, 4)
    return ehdr + load_ph + note_ph + note + code


def test_boot(qemu: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Boot the probe payload under KVM; None when it ran, otherwise why not."""
    with tempfile.NamedTemporaryFile(suffix=".elf") as payload:
        payload.write(pvh_probe_payload())
        payload.flush()
        argv = [qemu, "-machine", "microvm,accel=kvm", "-nodefaults", "-no-user-config",
                "-display", "none", "-m", "16", "-kernel", payload.name,
                "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1"]
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return f"a test boot under KVM did not finish within {timeout:g}s"
        except OSError as exc:
            return f"cannot run {qemu}: {exc.strerror}"
    if done.returncode != (0x31 << 1) | 1:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return f"a test boot under KVM failed ({err[-1] if err else done.returncode})"
    return None


def probe(qemu: str, cpuinfo: str | None = None, machine: str | None = None) -> Decision:
    """Whether KVM really works on this host (uncached)."""
    if (machine or platform.machine()) == "aarch64":
        # No vmx/svm flag to look for, and the test boot is an x86 PVH payload: on arm64
        # a /dev/kvm that answers and creates a VM is taken as working.
        problem = kvm_device_works()
        if problem:
            return Decision(Accel.TCG, problem)
        return Decision(Accel.KVM, "/dev/kvm works (arm64 host)")
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    if not cpu_has_virt(cpuinfo):
        return Decision(Accel.TCG, "the CPU does not advertise vmx or svm")
    problem = kvm_device_works() or test_boot(qemu)
    if problem:
        return Decision(Accel.TCG, problem)
    return Decision(Accel.KVM, "KVM passed a test boot")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def choose(policy: str, qemu: str, cache: Path | None) -> Decision:
    """Apply the configured policy (auto, kvm, tcg); cache the probe for this host boot."""
    if policy == "tcg":
        return Decision(Accel.TCG, "configuration asks for TCG")
    cached = _read_cache(cache) if cache else None
    decision = cached or probe(qemu)
    if cache and cached is None:
        _write_cache(cache, decision)
    if policy == "kvm" and decision.accel is not Accel.KVM:
        from hull.errors import HypervisorError

        raise HypervisorError(f"configuration requires KVM, but {decision.reason}")
    return decision


def _read_cache(path: Path) -> Decision | None:
    try:
        data = json.loads(path.read_text())
        if data.get("boot_id") == _boot_id():
            return Decision(Accel(data["accel"]), str(data["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_cache(path: Path, decision: Decision) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"boot_id": _boot_id(), "accel": str(decision.accel),
                                   "reason": decision.reason}))
        tmp.replace(path)
    except OSError:
        pass  # caching is an optimisation only
