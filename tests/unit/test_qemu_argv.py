from pathlib import Path

import pytest

from hull.hypervisor.base import Accel, Nic, Share, VMConfig
from hull.hypervisor.qemu import argv


def config(**kw: object) -> VMConfig:
    base: dict[str, object] = dict(name="c1", kernel=Path("/k/vmlinux"),
                                   initrd=Path("/k/initrd.img"),
                                   console_log=Path("/run/hull/c1/console.log"))
    base.update(kw)
    return VMConfig(**base)  # type: ignore[arg-type]


def opt(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_microvm_tcg() -> None:
    args = argv.build("/usr/bin/qemu-system-x86_64", config(tsc_khz=2596142), argv.Fds(5, 6))
    assert args[0] == "/usr/bin/qemu-system-x86_64"
    assert opt(args, "-machine")[0].startswith("microvm,accel=tcg,")
    assert "isa-serial=on" in opt(args, "-machine")[0]
    assert opt(args, "-kernel") == ["/k/vmlinux"]
    assert "tsc_early_khz=2596142" in opt(args, "-append")[0].split()
    assert "socket,id=agent,fd=5" in opt(args, "-chardev")
    assert "socket,id=qmp,fd=6" in opt(args, "-chardev")
    assert "virtserialport,bus=vser0.0,chardev=agent,name=hull.agent" in opt(args, "-device")
    assert "virtio-serial-device,id=vser0,max_ports=2" in opt(args, "-device")
    assert opt(args, "-sandbox") == [argv.SANDBOX]
    assert "-no-reboot" in args and "-nodefaults" in args
    assert opt(args, "-machine")[0].endswith(",ioapic2=off")  # rng + serial: 2 devices


@pytest.mark.parametrize("nics, extra, second_ioapic", [
    (5, (), False),  # rng, serial, a 9p share, 5 NICs: 8 devices, 8 transports
    (6, (), True),  # 9 devices: the second IO-APIC's 24 transports
    (1, ("-device", "virtio-balloon-device"), True),  # devices Hull does not count
])
def test_microvm_has_a_second_io_apic_only_when_it_needs_one(
        nics: int, extra: tuple[str, ...], second_ioapic: bool) -> None:
    shares = (Share("hullroot", Path("/r")),)
    vm = config(shares=shares, extra_args=extra,
                nics=tuple(Nic(f"02:00:00:00:00:{i:02x}", -1, 1500) for i in range(nics)))
    machine = opt(argv.build("q", vm, argv.Fds(3, 4)), "-machine")[0]
    assert ("ioapic2=off" not in machine) is second_ioapic


def test_shares_and_escaping() -> None:
    shares = (Share("hullroot", Path("/b/root,fs"), readonly=True),)
    args = argv.build("q", config(shares=shares, sandbox=False), argv.Fds(3, 4))
    assert opt(args, "-fsdev") == [
        "local,id=fs0,path=/b/root,,fs,security_model=none,multidevs=remap,readonly=on"]
    assert "virtio-9p-device,fsdev=fs0,mount_tag=hullroot" in opt(args, "-device")
    assert "-sandbox" not in args


def test_q35_kvm_uses_pci_devices_and_host_cpu() -> None:
    args = argv.build("q", config(machine_type="q35", accel=Accel.KVM, vcpus=2,
                                  memory_mib=512), argv.Fds(3, 4))
    assert opt(args, "-machine") == ["q35,accel=kvm"]
    assert opt(args, "-cpu") == ["host"]
    assert opt(args, "-smp") == ["2"] and opt(args, "-m") == ["512M"]
    assert "virtio-serial-pci,id=vser0,max_ports=2" in opt(args, "-device")


def test_kernel_params_are_appended_last() -> None:
    args = argv.build("q", config(kernel_params=("foo=1", "debug")), argv.Fds(3, 4))
    assert opt(args, "-append")[0].split()[-2:] == ["foo=1", "debug"]


def test_unknown_machine() -> None:
    with pytest.raises(ValueError, match="unknown machine type"):
        argv.build("q", config(machine_type="pc-i440fx"), argv.Fds(3, 4))


def test_x86_machines_pass_the_16550_console_and_tsc() -> None:
    for machine in ("microvm", "q35"):
        params = argv.kernel_cmdline(config(machine_type=machine, tsc_khz=1000)).split()
        assert "console=ttyS0" in params and "8250.nr_uarts=1" in params
        assert "i8042.nokbd" in params and "tsc_early_khz=1000" in params
        assert "console=ttyAMA0" not in params
        assert argv.machine_for(machine).arch == "x86_64"
    assert "pci=off" in argv.kernel_cmdline(config(machine_type="microvm")).split()
    assert "pci=off" not in argv.kernel_cmdline(config(machine_type="q35")).split()


def test_aarch64_virt_tcg() -> None:
    shares = (Share("hullroot", Path("/b/rootfs")),)
    nics = (Nic(tap_fd=9, mac="02:00:00:00:00:01", mtu=1500),)
    args = argv.build("/usr/bin/qemu-system-aarch64",
                      config(machine_type="virt", kernel=Path("/k/Image"), tsc_khz=2596142,
                             shares=shares, nics=nics),
                      argv.Fds(5, 6))
    assert args[0] == "/usr/bin/qemu-system-aarch64"
    assert opt(args, "-machine") == ["virt,gic-version=3,accel=tcg"]
    assert opt(args, "-cpu") == ["max,pauth-impdef=on"]
    assert opt(args, "-kernel") == ["/k/Image"]
    params = opt(args, "-append")[0].split()
    assert "console=ttyAMA0" in params  # the PL011 UART
    for x86_only in ("console=ttyS0", "8250.nr_uarts=1", "i8042.nokbd", "pci=off",
                     "tsc_early_khz=2596142"):
        assert x86_only not in params
    assert {*argv.BASE_KERNEL_PARAMS} <= {*params}
    # virtio-mmio transports of -machine virt: the "-device" variants, no PCI option ROMs
    devices = opt(args, "-device")
    assert "virtio-serial-device,id=vser0,max_ports=2" in devices
    assert "virtio-rng-device,rng=rng0" in devices
    assert "virtio-9p-device,fsdev=fs0,mount_tag=hullroot" in devices
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1500" in devices
    assert not any("-pci" in d or "romfile" in d for d in devices)
    assert opt(args, "-serial") == ["chardev:console"]
    assert argv.machine_for("virt").arch == "aarch64"


def test_aarch64_virt_kvm_uses_the_host_cpu() -> None:
    args = argv.build("q", config(machine_type="virt", accel=Accel.KVM), argv.Fds(3, 4))
    assert opt(args, "-machine") == ["virt,gic-version=3,accel=kvm"]
    assert opt(args, "-cpu") == ["host"]


def test_console_tail_keeps_the_panic_not_the_backtrace(tmp_path: Path) -> None:
    from hull.hypervisor.qemu.machine import tail_lines

    log = tmp_path / "console.log"
    log.write_text("\n".join([
        "[    0.5] Run /init as init process",
        "hull-agent: cannot open channel",
        "[    2.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
        "[    2.3] CPU: 0 PID: 1 Comm: init Not tainted 6.1.0",
        "[    2.3] Call Trace:",
        "[    2.3]  <TASK>",
        "[    2.3]  dump_stack_lvl+0x44/0x5c",
        "[    2.3] RIP: 0033:0x7f688b8cb409",
    ]) + "\n")
    tail = tail_lines(log, 3)
    assert tail.endswith("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
    assert "hull-agent: cannot open channel" in tail
    assert "RIP" not in tail and "dump_stack" not in tail
