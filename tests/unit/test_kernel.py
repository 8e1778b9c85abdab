"""hull.image.kernel: the pure parts (no kernel is built or downloaded here)."""

from __future__ import annotations

import argparse
import gzip
import lzma
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from hull.cli import kernel as cli_kernel
from hull.errors import AssetError
from hull.image import kernel
from hull.image.kernel import Fragment, GuestModule

# ---------------------------------------------------------------------------------------
# helpers: a tiny ELF with or without the PVH note, and a fake bzImage around it


def make_elf(*, pvh: bool = True, body: bytes = b"kernel text") -> bytes:
    """A minimal little-endian ELF64 with one PT_NOTE segment."""
    notes = _note(b"GNU", 3, b"\0" * 20)
    if pvh:
        notes += _note(b"Xen", 18, struct.pack("<I", 0x1000000))
    phoff, phentsize = 64, 56
    note_off = phoff + phentsize
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # ELFCLASS64, little-endian, version
    struct.pack_into("<HHI", header, 16, 2, 62, 1)  # ET_EXEC, EM_X86_64
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HHH", header, 0x34, 64, phentsize, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + phdr + notes + body


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    name_z = name + b"\0"

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name_z), len(desc), kind) + pad(name_z) + pad(desc)


def make_bzimage(payload: bytes, setup_sects: int = 3, version: int = 0x20F) -> bytes:
    """Setup sectors with a boot-protocol header, then protected-mode code with the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    stub = b"\x90" * 100  # decompressor code before the payload
    struct.pack_into("<II", setup, 0x248, len(stub), len(payload))
    return bytes(setup) + stub + payload + b"\xcc" * 64


def with_size(compressed: bytes, size: int) -> bytes:
    return compressed + struct.pack("<I", size)  # the kernel's size_append


# ---------------------------------------------------------------------------------------
# Kconfig


def test_parse_kconfig_reads_set_unset_and_strings() -> None:
    text = """
# comment line
CONFIG_A=y
CONFIG_B=m
# CONFIG_C is not set
CONFIG_D="-hull"
CONFIG_E=-1
   CONFIG_F=y
# --- mentions CONFIG_G but is a comment
"""
    assert kernel.parse_kconfig(text) == {
        "CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": None, "CONFIG_D": '"-hull"',
        "CONFIG_E": "-1", "CONFIG_F": "y",
    }


def test_merge_later_layers_win_and_render_round_trips() -> None:
    base = {"CONFIG_SLOB": "y", "CONFIG_SLUB": None, "CONFIG_X": "y"}
    merged = kernel.merge_kconfig(base, {"CONFIG_SLOB": None, "CONFIG_SLUB": "y"},
                                  {"CONFIG_X": None})
    assert merged == {"CONFIG_SLOB": None, "CONFIG_SLUB": "y", "CONFIG_X": None}
    assert base["CONFIG_SLOB"] == "y"  # not modified
    assert kernel.parse_kconfig(kernel.render_kconfig(merged)) == merged


def test_dropped_options_names_option_fragment_and_new_value() -> None:
    fragments = [
        Fragment("kconfig/common.config", "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
                                          "CONFIG_N=1\nCONFIG_ABSENT_OFF=y\n"),
        Fragment("kconfig/x86_64.config", "# CONFIG_ABSENT_OFF is not set\nCONFIG_P=y\n"),
    ]
    actual = {"CONFIG_A": "y", "CONFIG_C": "y", "CONFIG_N": "4", "CONFIG_P": "y"}
    problems = kernel.dropped_options(fragments, actual)
    assert problems == [
        "CONFIG_B=y from kconfig/common.config (now: not set)",
        "# CONFIG_C is not set from kconfig/common.config (now: CONFIG_C=y)",
        "CONFIG_N=1 from kconfig/common.config (now: CONFIG_N=4)",
    ]  # CONFIG_ABSENT_OFF: the later fragment turned it off, and it is absent: fine


def test_dropped_options_empty_when_all_survived() -> None:
    fragment = Fragment("f", "CONFIG_A=y\n# CONFIG_B is not set\n")
    assert kernel.dropped_options([fragment], {"CONFIG_A": "y", "CONFIG_B": None}) == []


def test_shipped_fragments_cover_the_guest_needs() -> None:
    fragments = kernel.load_fragments("x86_64")
    assert [f.name for f in fragments] == ["kconfig/common.config", "kconfig/x86_64.config"]
    values = kernel.merge_kconfig({}, *(f.values for f in fragments))
    needed = ["64BIT", "PVH", "PRINTK", "TTY", "SERIAL_8250", "SERIAL_8250_CONSOLE",
              "SERIAL_8250_PNP", "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_PCI",
              "VIRTIO_CONSOLE", "NET_9P", "NET_9P_VIRTIO", "9P_FS", "9P_FS_POSIX_ACL",
              "VIRTIO_NET", "HW_RANDOM_VIRTIO", "VIRTIO_VSOCKETS", "UTS_NS", "IPC_NS", "PID_NS",
              "NET_NS", "USER_NS", "CGROUPS", "MEMCG", "CGROUP_SCHED", "CGROUP_PIDS", "CPUSETS",
              "CGROUP_FREEZER", "BLK_CGROUP", "PSI", "SECCOMP", "SECCOMP_FILTER", "OVERLAY_FS",
              "EXT4_FS", "TMPFS", "TMPFS_POSIX_ACL", "TMPFS_XATTR", "DEVTMPFS", "PROC_FS",
              "SYSFS", "UNIX", "INET", "IPV6", "BINFMT_ELF", "BINFMT_SCRIPT", "FUTEX", "EPOLL",
              "SIGNALFD", "TIMERFD", "EVENTFD", "AIO", "FILE_LOCKING", "POSIX_MQUEUE", "SYSVIPC",
              "MULTIUSER", "SHMEM", "UNIX98_PTYS", "BLK_DEV_INITRD", "RD_GZIP", "RD_ZSTD", "SMP",
              "NO_HZ_IDLE", "KVM_GUEST", "PARAVIRT", "MAGIC_SYSRQ", "ACPI"]
    assert [s for s in needed if values.get(f"CONFIG_{s}") != "y"] == []
    assert values["CONFIG_PANIC_TIMEOUT"] == "-1"
    assert values["CONFIG_SLOB"] is None  # tinyconfig's SLOB cannot account to memcg
    assert [s for s, v in values.items() if v == "m"] == []  # no modules in this flavor


def test_shipped_fragments_define_each_option_once() -> None:
    for fragment in kernel.load_fragments("x86_64"):
        symbols = [line.split("=")[0].removeprefix("# ").split()[0]
                   for line in fragment.text.splitlines()
                   if line.startswith("CONFIG_") or line.endswith(" is not set")]
        assert len(symbols) == len(set(symbols)), fragment.name


def test_load_fragments_missing_arch_is_an_asset_error(tmp_path: Path) -> None:
    (tmp_path / "common.config").write_text("CONFIG_A=y\n")
    with pytest.raises(AssetError, match=r"arm64\.config does not exist"):
        kernel.load_fragments("arm64", tmp_path)


def test_unknown_arch_is_an_asset_error() -> None:
    with pytest.raises(AssetError, match="no guest kernel recipe for architecture s390x"):
        kernel.arch_info("s390x")


# ---------------------------------------------------------------------------------------
# keys


def test_build_key_covers_every_input() -> None:
    frags = [Fragment("kconfig/common.config", "CONFIG_A=y\n")]
    key = kernel.build_key("6.1.192-2", "x86_64", frags)
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == kernel.build_key("6.1.192-2", "x86_64", list(frags))
    others = {
        kernel.build_key("6.1.193-1", "x86_64", frags),
        kernel.build_key("6.1.192-2", "aarch64", frags),
        kernel.build_key("6.1.192-2", "x86_64",
                         [Fragment("kconfig/common.config", "CONFIG_A=n\n")]),
        kernel.build_key("6.1.192-2", "x86_64", frags, recipe=kernel.BUILD_RECIPE_VERSION + 1),
    }
    assert len(others) == 4 and key not in others


def test_fetch_key_covers_every_input_and_differs_from_build() -> None:
    key = kernel.fetch_key("linux-image-6.1.0-56-amd64", "6.1.192-2", "amd64")
    assert key == kernel.fetch_key("linux-image-6.1.0-56-amd64", "6.1.192-2", "amd64")
    others = {
        kernel.fetch_key("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "amd64"),
        kernel.fetch_key("linux-image-6.1.0-56-amd64", "6.1.192-3", "amd64"),
        kernel.fetch_key("linux-image-6.1.0-56-amd64", "6.1.192-2", "arm64"),
        kernel.fetch_key("linux-image-6.1.0-56-amd64", "6.1.192-2", "amd64", recipe=99),
    }
    assert len(others) == 4 and key not in others


# ---------------------------------------------------------------------------------------
# ELF and vmlinux extraction


def test_has_pvh_note() -> None:
    assert kernel.has_pvh_note(make_elf(pvh=True))
    assert not kernel.has_pvh_note(make_elf(pvh=False))
    assert not kernel.has_pvh_note(b"MZ" + b"\0" * 100)
    assert not kernel.has_pvh_note(make_elf()[:70])  # truncated program header


@pytest.mark.parametrize("compress", [
    lambda b: with_size(lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
                        len(b)),
    lambda b: gzip.compress(b),
    # the kernel's lzma uses a 2^n MiB dictionary: the header then matches 5d 00 00 00
    lambda b: with_size(lzma.compress(b, format=lzma.FORMAT_ALONE, filters=[
        {"id": lzma.FILTER_LZMA1, "dict_size": 1 << 24}]), len(b)),
], ids=["xz", "gzip", "lzma"])
def test_extract_vmlinux_from_bzimage_header(compress: Callable[[bytes], bytes]) -> None:
    elf = make_elf(body=b"x" * 5000)
    assert kernel.extract_vmlinux(make_bzimage(compress(elf))) == elf


def test_extract_vmlinux_scans_without_header() -> None:
    elf = make_elf()
    blob = b"\x1f\x8b\x08 not really gzip" + b"\0" * 50 + gzip.compress(elf) + b"trailer"
    assert kernel.extract_vmlinux(blob) == elf


def test_extract_vmlinux_uses_external_tools_for_zstd_and_lz4() -> None:
    elf = make_elf()
    calls: list[str] = []

    def external(kind: str, data: bytes) -> bytes:
        calls.append(kind)
        return elf if data.startswith(b"\x28\xb5\x2f\xfd" if kind == "zstd"
                                      else b"\x02\x21\x4c\x18") else b""

    assert kernel.extract_vmlinux(make_bzimage(b"\x28\xb5\x2f\xfd" + b"z" * 40), external) == elf
    assert kernel.extract_vmlinux(make_bzimage(b"\x02\x21\x4c\x18" + b"l" * 40), external) == elf
    assert calls == ["zstd", "lz4"]


def test_extract_vmlinux_passes_an_elf_through_and_rejects_junk() -> None:
    elf = make_elf()
    assert kernel.extract_vmlinux(elf) == elf
    with pytest.raises(ValueError, match="no gzip, xz"):
        kernel.extract_vmlinux(make_bzimage(b"\x00" * 300), lambda kind, data: b"")


# ---------------------------------------------------------------------------------------
# modules

# Shaped like Debian 12's (depmod lists all dependencies, nearest last); "V" abbreviates
# the virtio directory to keep lines short.
DEP = """\
V/virtio.ko: V/virtio_ring.ko
V/virtio_ring.ko:
V/virtio_mmio.ko: V/virtio.ko V/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: V/virtio.ko V/virtio_ring.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko V/virtio.ko V/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/fs/fscache/fscache.ko kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: V/virtio.ko V/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
"""


def test_module_name_normalizes() -> None:
    assert kernel.module_name("kernel/fs/9p/9p.ko") == "9p"
    assert kernel.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert kernel.module_name("x/net_failover.ko.zst") == "net_failover"


def test_load_order_puts_dependencies_first() -> None:
    deps = kernel.parse_modules_dep(DEP)
    order = kernel.load_order(deps, ["kernel/fs/9p/9p.ko", "V/virtio_mmio.ko"])
    names = [kernel.module_name(p) for p in order]
    # modprobe's order: a line's dependencies from last to first, each after its own
    assert names == ["netfs", "9pnet", "fscache", "9p", "virtio_ring", "virtio", "virtio_mmio"]
    for path in order:  # every dependency appears before its user
        assert all(order.index(dep) < order.index(path) for dep in deps[path])


def test_load_order_reports_cycles_and_unknown_modules() -> None:
    with pytest.raises(ValueError, match=r"cycle: a\.ko -> b\.ko -> a\.ko"):
        kernel.load_order({"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, ["a.ko"])
    with pytest.raises(ValueError, match=r"c\.ko is not in modules\.dep"):
        kernel.load_order({"a.ko": ["c.ko"]}, ["a.ko"])


def test_plan_modules_skips_builtin_and_reports_missing() -> None:
    deps = kernel.parse_modules_dep(DEP)
    wanted = (GuestModule("virtio_mmio", True, ""), GuestModule("virtio_console", True, ""),
              GuestModule("virtio_rng", True, ""), GuestModule("9p", True, ""),
              GuestModule("9pnet_virtio", True, ""), GuestModule("virtio_net", False, "net"),
              GuestModule("virtio_blk", False, "blk"))
    builtin = "kernel/drivers/block/virtio_blk.ko\nkernel/lib/crc32.ko\n"
    plan = kernel.plan_modules(deps, builtin, wanted)
    names = [kernel.module_name(p) for p in plan.paths]
    assert names == ["virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_rng",
                     "netfs", "9pnet", "fscache", "9p", "9pnet_virtio"]
    assert plan.builtin == ["virtio_blk"]
    assert [m.name for m in plan.missing] == ["virtio_net"]


def test_decompress_module() -> None:
    elf = make_elf()
    assert kernel.decompress_module("a.ko", elf) == elf
    assert kernel.decompress_module("a.ko.xz", lzma.compress(elf)) == elf
    assert kernel.decompress_module("a.ko.gz", gzip.compress(elf)) == elf
    assert kernel.decompress_module("a.ko.zst", b"zzz", lambda kind, data: elf) == elf


# ---------------------------------------------------------------------------------------
# apt records

APT_META = """\
Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
Description: Linux for 64-bit PCs (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on PCs.

Package: linux-image-amd64
Version: 6.1.176-1
"""


def test_parse_apt_record_reads_first_paragraph() -> None:
    record = kernel.parse_apt_record(APT_META)
    assert record["Version"] == "6.1.192-2"
    assert record["Description"].endswith("modules for use on PCs.")


def test_image_dependency() -> None:
    assert kernel.image_dependency(kernel.parse_apt_record(APT_META)) == \
        "linux-image-6.1.0-56-amd64"
    assert kernel.image_dependency({"Depends": "initramfs-tools | linux-initramfs-tool, "
                                    "linux-image-6.1.0-9-cloud-amd64-unsigned"}) == \
        "linux-image-6.1.0-9-cloud-amd64-unsigned"
    assert kernel.image_dependency({"Depends": "kmod, linux-base (>= 4.3~)"}) is None


# ---------------------------------------------------------------------------------------
# the command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hull")
    cli_kernel.register(parser.add_subparsers(dest="verb", required=True))
    return parser


def test_cli_registers_build_fetch_status() -> None:
    args = _parser().parse_args(["kernel", "build", "--force", "--keep-build", "-j", "3"])
    assert (args.force, args.keep_build, args.jobs) == (True, True, 3)
    assert args.func is cli_kernel._build
    args = _parser().parse_args(["kernel", "fetch"])
    # no --package: linux-image-<arch> (DEFAULT_IMAGE_PACKAGE on amd64)
    assert (args.package, args.arch) == (None, None) and args.func is cli_kernel._fetch
    args = _parser().parse_args(["kernel", "fetch", "--arch", "arm64"])
    assert args.arch == "arm64"
    assert _parser().parse_args(["kernel", "status"]).func is cli_kernel._status
    with pytest.raises(SystemExit):
        _parser().parse_args(["kernel"])


def test_plain_progress_is_quiet_about_make_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    progress = kernel.PlainProgress(sys.stderr)
    progress.phase("compiling")
    progress.make_line("  CC      kernel/fork.o\n")
    progress.tail(["error: boom"], Path("/x/build.log"))
    progress.close()
    assert capsys.readouterr().err == (
        "hull: compiling\nhull: last lines of /x/build.log:\n  error: boom\n")


# ---------------------------------------------------------------------------------------
# Hull's kernel patches


def test_patches_load_common_then_arch(tmp_path: Path) -> None:
    for part, name in (("x86_64", "b.patch"), ("x86_64", "a.patch"), ("common", "z.patch"),
                       ("aarch64", "c.patch")):
        (tmp_path / part).mkdir(exist_ok=True)
        (tmp_path / part / name).write_text(f"{part}/{name}\n")
    names = [p.name for p in kernel.load_patches("x86_64", tmp_path)]
    assert names == ["patches/common/z.patch", "patches/x86_64/a.patch",
                     "patches/x86_64/b.patch"]
    assert kernel.load_patches("riscv64", tmp_path)[0].text == "common/z.patch\n"


def test_shipped_lapic_patch_adds_the_parameter_argv_passes() -> None:
    from hull.hypervisor.qemu import argv

    patches = {p.name.rsplit("/", 1)[1]: p.text for p in kernel.load_patches("x86_64")}
    assert sorted(patches) == ["initmem-poison.patch", "lapic-timer-hz.patch"]
    lapic, poison = patches["lapic-timer-hz.patch"], patches["initmem-poison.patch"]
    assert lapic.startswith("--- a/arch/x86/kernel/apic/apic.c\n+++ b/arch/x86/kernel/apic/")
    assert poison.startswith("--- a/arch/x86/mm/init.c\n+++ b/arch/x86/mm/init.c\n")
    params = {p.split("=")[0] for p in argv.X86_TCG_KERNEL_PARAMS}
    assert params == {"lapic_timer_hz", "initmem_poison"}
    for name, text in (("lapic_timer_hz", lapic), ("initmem_poison", poison)):
        assert f'+early_param("{name}", parse_{name});' in text
    assert argv.QEMU_APIC_TIMER_HZ == 10**9
    assert kernel.load_patches("aarch64") == []


def test_build_key_covers_patches_and_keeps_patchless_keys() -> None:
    frags = [Fragment("kconfig/common.config", "CONFIG_A=y\n")]
    plain = kernel.build_key("6.1.192-2", "x86_64", frags)
    assert kernel.build_key("6.1.192-2", "x86_64", frags, patches=()) == plain
    one = kernel.build_key("6.1.192-2", "x86_64", frags,
                           patches=[kernel.Patch("patches/x86_64/p.patch", "+a\n")])
    other = kernel.build_key("6.1.192-2", "x86_64", frags,
                             patches=[kernel.Patch("patches/x86_64/p.patch", "+b\n")])
    assert len({plain, one, other}) == 3
