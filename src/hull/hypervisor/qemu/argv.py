"""QEMU command lines, generated purely from a VMConfig (no I/O, unit-tested).

Per-machine differences live in a small class hierarchy: each machine type knows its
guest architecture, its ``-machine`` and ``-cpu`` strings, its kernel parameters and the
names of its virtio devices (virtio-mmio "-device" variants on microvm and aarch64 virt,
"-pci" variants on q35).
"""

from __future__ import annotations

from dataclasses import dataclass

from hull.agentapi.framing import VSOCK_PORT, VSOCK_PORT_PARAM
from hull.hypervisor.base import Accel, ChannelKind, VMConfig

AGENT_PORT_NAME = "hull.agent"

#: Kernel parameters Hull always passes (see docs/internals.md, "Boot"); each machine adds
#: its console and platform quirks (Machine.kernel_params).
BASE_KERNEL_PARAMS = (
    "quiet", "panic=-1", "reboot=t", "mitigations=off", "cryptomgr.notests", "audit=0",
    "no_timer_check", "random.trust_cpu=on", "PYTHONHASHSEED=0",
)
#: The x86 machines' part: the 16550 console, no PS/2 controller probing.
X86_KERNEL_PARAMS = (
    "console=ttyS0", "8250.nr_uarts=1", "i8042.noaux", "i8042.nokbd", "i8042.nopnp",
    "i8042.dumbkbd",
)

#: QEMU's emulated local APIC timer counts at 1 GHz (hw/intel/apic.c: one count per ns
#: of QEMU_CLOCK_VIRTUAL). Hull's kernel patch (image/patches/x86_64/lapic-timer-hz.patch)
#: takes it as ``lapic_timer_hz=``, which skips the ~0.1 s calibration under TCG.
QEMU_APIC_TIMER_HZ = 1_000_000_000
#: Under TCG only: the parameters of Hull's x86 kernel patches (image/patches/x86_64/,
#: docs/performance.md). ``initmem_poison=0``: do not fill freed __init code with 0xcc
#: (a byte-wise store over translated code: ~0.16 s of TCG's self-modifying-code path).
#: Other kernels pass these unknown words on to init's environment, where they are
#: harmless. Under KVM the guest has a TSC-deadline timer and the fill is cheap.
X86_TCG_KERNEL_PARAMS = (f"lapic_timer_hz={QEMU_APIC_TIMER_HZ}", "initmem_poison=0")

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Fds:
    """Host file descriptors QEMU inherits: socketpair ends, and the console log."""

    agent: int  # -1 with the vsock channel
    qmp: int
    #: the console log, opened by Hull (-1: QEMU opens config.console_log itself)
    console: int = -1
    #: the vsock channel: /dev/vhost-vsock opened by Hull, with this guest CID claimed
    vhost_vsock: int = -1
    vsock_cid: int = 0


#: Virtio-mmio transports of a microvm with one IO-APIC (QEMU's VIRTIO_NUM_TRANSPORTS
#: without ioapic2).
MICROVM_TRANSPORTS = 8


class Machine:
    """One QEMU machine type: its architecture, ``-machine``, ``-cpu``, device names and
    kernel parameters. The base class is the x86_64 part; Virt overrides it for aarch64."""

    name = ""
    arch = "x86_64"  # the guest's architecture (uname -m)
    device_suffix = ""

    def machine_arg(self, accel: Accel, virtio_devices: int | None = None) -> str:
        """``virtio_devices``: how many virtio devices the VM gets (None: unknown)."""
        raise NotImplementedError

    def kernel_params(self, config: VMConfig) -> tuple[str, ...]:
        """Kernel parameters this machine needs (console, platform quirks)."""
        # tsc: the host's, no PIT calibration under TCG
        tsc = (f"tsc_early_khz={config.tsc_khz}",) if config.tsc_khz else ()
        tcg = X86_TCG_KERNEL_PARAMS if config.accel is Accel.TCG else ()
        return (*X86_KERNEL_PARAMS, *tsc, *tcg)

    def cpu(self, accel: Accel) -> str:
        # Under TCG, without ERMS/FSRM: with them the guest kernel and glibc copy and clear
        # memory with "rep movsb"/"rep stosb", which TCG runs one byte per iteration (a
        # page clear or a 64 KiB pipe copy then costs 8x more than with "rep movsq"): in-guest
        # pipe throughput went from 87 to 220 MB/s (docs/performance.md).
        return "host" if accel is Accel.KVM else "max,-erms,-fsrm"

    def device(self, kind: str) -> str:
        """``kind`` is "serial", "9p", "rng" or "net": the virtio device for this machine."""
        return f"virtio-{kind}{self.device_suffix}"

    def vsock_device(self) -> str:
        return f"vhost-vsock{self.device_suffix}"


class Microvm(Machine):
    name = "microvm"
    device_suffix = "-device"

    def machine_arg(self, accel: Accel, virtio_devices: int | None = None) -> str:
        # No PIT/PIC (the kernel uses the TSC and the LAPIC), no option ROMs; the ISA
        # serial stays on for the console; the RTC gives the guest a wall clock early.
        arg = f"microvm,accel={accel},x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on"
        if virtio_devices is not None and virtio_devices <= MICROVM_TRANSPORTS:
            # A second IO-APIC (on by default with ACPI) brings 24 virtio-mmio transports,
            # ~30 KiB of QEMU heap each; with one there are 8 (docs/performance.md).
            arg += ",ioapic2=off"
        return arg

    def kernel_params(self, config: VMConfig) -> tuple[str, ...]:
        return (*super().kernel_params(config), "pci=off")  # no PCI bus: skip probing it


class Q35(Machine):
    name = "q35"
    device_suffix = "-pci"

    def machine_arg(self, accel: Accel, virtio_devices: int | None = None) -> str:
        return f"q35,accel={accel}"


class Virt(Machine):
    """aarch64 ``-machine virt``: GICv3, a PL011 UART console, virtio-mmio devices.

    The kernel is an arm64 ``Image`` booted directly with ``-kernel`` (no PVH, no TSC).
    """

    name = "virt"
    arch = "aarch64"
    device_suffix = "-device"

    def machine_arg(self, accel: Accel, virtio_devices: int | None = None) -> str:
        return f"virt,gic-version=3,accel={accel}"

    def kernel_params(self, config: VMConfig) -> tuple[str, ...]:
        return ("console=ttyAMA0",)

    def cpu(self, accel: Accel) -> str:
        # Under TCG, "max" with the cheap implementation-defined pointer authentication:
        # the architected QARMA algorithm costs a lot of host time on every function return.
        return "host" if accel is Accel.KVM else "max,pauth-impdef=on"


MACHINES: dict[str, type[Machine]] = {"microvm": Microvm, "q35": Q35, "virt": Virt}


def machine_for(name: str) -> Machine:
    try:
        return MACHINES[name]()
    except KeyError:
        raise ValueError(f"unknown machine type {name!r}") from None


def escape(value: object) -> str:
    """Quote a value inside a QEMU ``key=value,...`` option: commas are doubled."""
    return str(value).replace(",", ",,")


def console_args(config: VMConfig, fds: Fds) -> list[str]:
    """The console goes to a file: shown when the boot fails, kept for `hull logs`."""
    if fds.console >= 0:
        return ["-add-fd", f"fd={fds.console},set=1",
                "-chardev", "file,id=console,path=/dev/fdset/1"]
    return ["-chardev", f"file,id=console,path={escape(config.console_log)}"]


def kernel_cmdline(config: VMConfig) -> str:
    params = [*BASE_KERNEL_PARAMS, *machine_for(config.machine_type).kernel_params(config)]
    if config.channel is ChannelKind.VSOCK:
        params.append(f"{VSOCK_PORT_PARAM}={VSOCK_PORT}")
    params.extend(config.kernel_params)
    return " ".join(params)


def memory_args(config: VMConfig) -> list[str]:
    """Guest RAM in a file (VM templates, see hull.runtime.factory): shared by the template
    (its RAM is saved there), private and copy-on-write in a clone. The migration stream
    leaves that RAM out (x-ignore-shared, set over QMP) and the guest must come up
    running, not paused (store-global-state=off)."""
    if config.memory_file is None:
        return []
    share = "on" if config.memory_shared else "off"
    argv = ["-object", f"memory-backend-file,id=mem,size={config.memory_mib}M,"
                       f"mem-path={escape(config.memory_file)},share={share}",
            "-global", "migration.store-global-state=off"]
    if config.incoming_fd >= 0:
        # QEMU 7.2 has no -global for x-ignore-shared: QemuVM.start sets it over QMP,
        # then restores from the inherited fd (migrate-incoming fd:N).
        argv += ["-incoming", "defer"]
    return argv


def channel_args(machine: Machine, config: VMConfig, fds: Fds) -> list[str]:
    """The agent channel's device. The virtio-serial port's backend and the vhost-vsock
    device are fds Hull made (a socketpair end; /dev/vhost-vsock with the VM's CID
    claimed): nothing on the filesystem to race for, and nothing left behind."""
    if config.channel is ChannelKind.VSOCK:
        if fds.vhost_vsock < 0:
            raise ValueError("the vsock channel needs an open /dev/vhost-vsock fd")
        return ["-device", f"{machine.vsock_device()},id=vsock0,guest-cid={fds.vsock_cid},"
                           f"vhostfd={fds.vhost_vsock}"]
    # max_ports=2: port 0 is reserved for a console, port 1 is the agent's; the default
    # (31) costs QEMU ~0.4 MiB of virtqueue arrays (docs/performance.md).
    return ["-device", f"{machine.device('serial')},id=vser0,max_ports=2",
            "-chardev", f"socket,id=agent,fd={fds.agent}",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}"]


def build(qemu: str, config: VMConfig, fds: Fds) -> list[str]:
    machine = machine_for(config.machine_type)
    # rng, the agent channel, the 9p shares, the NICs; unknown with extra arguments
    devices = None if config.extra_args else 2 + len(config.shares) + len(config.nics)
    machine_arg = machine.machine_arg(config.accel, devices)
    if config.memory_file is not None:
        machine_arg += ",memory-backend=mem"
    argv = [
        qemu,
        "-name", f"hull-{config.name},debug-threads=on",
        "-machine", machine_arg,
        "-cpu", machine.cpu(config.accel),
        "-smp", str(config.vcpus),
        "-m", f"{config.memory_mib}M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", kernel_cmdline(config),
        *console_args(config, fds),
        "-serial", "chardev:console",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", f"{machine.device('rng')},rng=rng0",
        *channel_args(machine, config, fds),
        # QMP is a socketpair too.
        "-chardev", f"socket,id=qmp,fd={fds.qmp}",
        "-mon", "chardev=qmp,mode=control",
        *memory_args(config),
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
        # Without one (tap_fd -1) the device has no backend.
        backend = f"netdev=net{i}," if nic.tap_fd >= 0 else ""
        device = f"{machine.device('net')},{backend}mac={nic.mac},host_mtu={nic.mtu}"
        if machine.device_suffix == "-pci":
            device += ",romfile="  # no option ROM (no iPXE): the kernel is booted directly
        if backend:
            argv += ["-netdev", f"tap,id=net{i},fd={nic.tap_fd}"]
        argv += ["-device", device]
    if config.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += list(config.extra_args)
    return argv
