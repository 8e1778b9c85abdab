"""QEMU command lines, generated purely from a VMConfig (no I/O, unit-tested).

Per-machine differences live in a small class hierarchy: each machine type knows its
``-machine`` string and the names of its virtio devices (virtio-mmio "-device" variants
on microvm, "-pci" variants on q35).
"""

from __future__ import annotations

from dataclasses import dataclass

from hull.hypervisor.base import Accel, VMConfig

AGENT_PORT_NAME = "hull.agent"

#: Kernel parameters Hull always passes (see docs/internals.md, "Boot").
BASE_KERNEL_PARAMS = (
    "console=ttyS0", "quiet", "panic=-1", "reboot=t", "mitigations=off",
    "cryptomgr.notests", "audit=0", "8250.nr_uarts=1", "no_timer_check", "i8042.noaux",
    "i8042.nokbd", "i8042.nopnp", "i8042.dumbkbd", "random.trust_cpu=on", "PYTHONHASHSEED=0",
)

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Fds:
    """Host file descriptors QEMU inherits: each is one end of a socketpair."""

    agent: int
    qmp: int


class Machine:
    """x86_64 machine quirks; subclasses override what differs."""

    name = ""
    device_suffix = ""

    def machine_arg(self, accel: Accel) -> str:
        raise NotImplementedError

    def kernel_params(self) -> tuple[str, ...]:
        """Kernel parameters this machine needs."""
        return ()

    def cpu(self, accel: Accel) -> str:
        # Under TCG, without ERMS/FSRM: with them the guest kernel and glibc copy and clear
        # memory with "rep movsb"/"rep stosb", which TCG runs one byte per iteration (a
        # page clear or a 64 KiB pipe copy then costs 8x more than with "rep movsq"): in-guest
        # pipe throughput went from 87 to 220 MB/s (docs/performance.md).
        return "host" if accel is Accel.KVM else "max,-erms,-fsrm"

    def device(self, kind: str) -> str:
        """``kind`` is "serial", "9p", "rng" or "net": the virtio device for this machine."""
        return f"virtio-{kind}{self.device_suffix}"


class Microvm(Machine):
    name = "microvm"
    device_suffix = "-device"

    def machine_arg(self, accel: Accel) -> str:
        # No PIT/PIC (the kernel uses the TSC and the LAPIC), no option ROMs; the ISA
        # serial stays on for the console; the RTC gives the guest a wall clock early.
        return (f"microvm,accel={accel},x-option-roms=off,pit=off,pic=off,isa-serial=on,"
                "rtc=on")

    def kernel_params(self) -> tuple[str, ...]:
        return ("pci=off",)  # no PCI bus: skip probing it


class Q35(Machine):
    name = "q35"
    device_suffix = "-pci"

    def machine_arg(self, accel: Accel) -> str:
        return f"q35,accel={accel}"


MACHINES: dict[str, type[Machine]] = {"microvm": Microvm, "q35": Q35}


def machine_for(name: str) -> Machine:
    try:
        return MACHINES[name]()
    except KeyError:
        raise ValueError(f"unknown machine type {name!r}") from None


def escape(value: object) -> str:
    """Quote a value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def kernel_cmdline(config: VMConfig) -> str:
    params = [*BASE_KERNEL_PARAMS, *machine_for(config.machine_type).kernel_params()]
    if config.tsc_khz:
        params.append(f"tsc_early_khz={config.tsc_khz}")
    params.extend(config.kernel_params)
    return " ".join(params)


def build(qemu: str, config: VMConfig, fds: Fds) -> list[str]:
    machine = machine_for(config.machine_type)
    argv = [
        qemu,
        "-name", f"hull-{config.name},debug-threads=on",
        "-machine", machine.machine_arg(config.accel),
        "-cpu", machine.cpu(config.accel),
        "-smp", str(config.vcpus),
        "-m", f"{config.memory_mib}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", kernel_cmdline(config),
        # The console goes to a file: shown when the boot fails, kept for `hull logs`.
        "-chardev", f"file,id=console,path={escape(config.console_log)}",
        "-serial", "chardev:console",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", f"{machine.device('rng')},rng=rng0",
        # The agent channel and QMP are socketpairs Hull made: nothing on the filesystem
        # to race for, and nothing left behind.
        "-device", f"{machine.device('serial')},id=vser0",
        "-chardev", f"socket,id=agent,fd={fds.agent}",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=qmp,fd={fds.qmp}",
        "-mon", "chardev=qmp,mode=control",
    ]
    for i, share in enumerate(config.shares):
        fsdev = (f"local,id=fs{i},path={escape(share.path)},security_model=none,"
                 "multidevs=remap")
        if share.readonly:
            fsdev += ",readonly=on"
        argv += ["-fsdev", fsdev,
                 "-device", f"{machine.device('9p')},fsdev=fs{i},mount_tag={share.tag}"]
    for i, nic in enumerate(config.nics):
        # The tap is an fd Hull opened: -sandbox spawn=deny rules out QEMU's ifup scripts.
        device = f"{machine.device('net')},netdev=net{i},mac={nic.mac},host_mtu={nic.mtu}"
        if machine.device_suffix == "-pci":
            device += ",romfile="  # no option ROM (no iPXE): the kernel is booted directly
        argv += ["-netdev", f"tap,id=net{i},fd={nic.tap_fd}", "-device", device]
    if config.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += list(config.extra_args)
    return argv
