"""hull.image: the guest image builder's parts (cpio, ELF, debs, trimming, keys, status).

Everything but the last two tests runs without network, root or QEMU. Those two build the
real image into a temporary asset dir (root + apt lists) and boot it (QEMU + a kernel).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hull.cli import image as cli_image
from hull.config.settings import Config, RuntimeConfig
from hull.errors import AssetError
from hull.image import cpio, debs, initrd, trim
from hull.image.elf import EM_AARCH64, EM_X86_64, parse_elf, read_elf
from hull.image.store import IMAGE, KERNEL, AssetStore

# --- cpio -------------------------------------------------------------------------------


def sample_entries() -> list[cpio.Entry]:
    return cpio.with_parents([
        cpio.file("init", b"#!/bin/sh\n", 0o755),
        cpio.file("usr/lib/a.pyc", b"x" * 5),  # odd size: exercises data padding
        cpio.symlink("lib64/ld.so", "/lib/x86_64-linux-gnu/ld.so"),
        cpio.char_device("dev/console", 5, 1),
        cpio.directory("tmp", 0o1777),
    ])


def test_cpio_round_trip_keeps_every_entry() -> None:
    entries = sample_entries()
    out = io.BytesIO()
    size = cpio.write(out, entries)
    data = out.getvalue()
    assert size == len(data) and len(data) % 4 == 0
    assert cpio.read(data) == entries


def test_cpio_with_parents_orders_directories_first() -> None:
    names = [e.name for e in sample_entries()]
    assert names == ["dev", "dev/console", "init", "lib64", "lib64/ld.so", "tmp", "usr",
                     "usr/lib", "usr/lib/a.pyc"]
    for i, name in enumerate(names):
        parent = os.path.dirname(name)
        assert not parent or parent in names[:i]


def test_cpio_is_deterministic() -> None:
    a, b = io.BytesIO(), io.BytesIO()
    cpio.write(a, sample_entries())
    cpio.write(b, sample_entries())
    assert a.getvalue() == b.getvalue()
    assert b"TRAILER!!!" in a.getvalue()[-128:]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio(1)")
def test_cpio_tool_reads_device_node(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f:
        cpio.write(f, sample_entries())
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=archive.open("rb"),
                             capture_output=True, text=True, check=True).stdout
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert any(ln.startswith("lrwxrwxrwx") and ln.endswith("ld.so -> /lib/x86_64-linux-gnu/ld.so")
               for ln in listing.splitlines())


def test_cpio_tree_entries_normalises_modes(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    exe = tmp_path / "bin" / "tool"
    exe.write_bytes(b"\x7fELF")
    exe.chmod(0o700)
    (tmp_path / "data").write_text("d")
    (tmp_path / "data").chmod(0o600)
    (tmp_path / "link").symlink_to("bin/tool")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp").chmod(0o1777)
    got = {e.name: e for e in cpio.tree_entries(tmp_path)}
    assert got["bin/tool"].mode == stat.S_IFREG | 0o755
    assert got["data"].mode == stat.S_IFREG | 0o644
    assert got["link"].data == b"bin/tool" and got["link"].kind == stat.S_IFLNK
    assert got["tmp"].mode == stat.S_IFDIR | 0o1777


# --- ELF --------------------------------------------------------------------------------


def make_elf(*, is64: bool, little: bool, machine: int, needed: list[str],
             interp: str | None = None, runpath: str | None = None) -> bytes:
    """A tiny ELF: one PT_LOAD over the whole file (vaddr = offset + 0x400000), PT_INTERP,
    PT_DYNAMIC with DT_NEEDED/DT_RUNPATH/DT_STRTAB."""
    end = "<" if little else ">"
    base = 0x400000
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    phnum = 3
    strtab = b"\0"
    offsets = []
    for s in [*needed, *([runpath] if runpath else [])]:
        offsets.append(len(strtab))
        strtab += s.encode() + b"\0"
    interp_bytes = (interp or "").encode() + b"\0"
    interp_off = ehsize + phnum * phentsize
    strtab_off = interp_off + len(interp_bytes)
    dyn_off = strtab_off + len(strtab)
    dyn_off += -dyn_off % 8
    tags = [(1, o) for o in offsets[: len(needed)]]
    if runpath:
        tags.append((29, offsets[-1]))
    tags += [(5, base + strtab_off), (0, 0)]
    dyn_fmt = end + ("qQ" if is64 else "iI")
    dynamic = b"".join(struct.pack(dyn_fmt, t, v) for t, v in tags)
    total = dyn_off + len(dynamic)

    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    rest = (2, machine, 1, base, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0)
    header = ident + struct.pack(end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH"), *rest)

    def phdr(p_type: int, off: int, size: int) -> bytes:
        if is64:
            return struct.pack(end + "IIQQQQQQ", p_type, 4, off, base + off, base + off,
                               size, size, 8)
        return struct.pack(end + "IIIIIIII", p_type, off, base + off, base + off, size, size,
                           4, 4)

    phdrs = phdr(1, 0, total) + phdr(3, interp_off, len(interp_bytes)) + phdr(
        2, dyn_off, len(dynamic))
    body = header + phdrs + interp_bytes + strtab
    body += b"\0" * (dyn_off - len(body))
    return body + dynamic


@pytest.mark.parametrize("is64", [True, False])
@pytest.mark.parametrize("little", [True, False])
def test_elf_parse_synthetic(is64: bool, little: bool) -> None:
    data = make_elf(is64=is64, little=little, machine=EM_AARCH64,
                    needed=["libffi.so.8", "libc.so.6"], interp="/lib/ld-linux-aarch64.so.1",
                    runpath="$ORIGIN/../lib:/opt/lib")
    info = parse_elf(data)
    assert info.machine == EM_AARCH64
    assert info.interp == "/lib/ld-linux-aarch64.so.1"
    assert info.needed == ("libffi.so.8", "libc.so.6")
    assert info.runpath == ("$ORIGIN/../lib", "/opt/lib")


def test_elf_needed_of_host_python_matches_readelf() -> None:
    python = Path(sys.executable).resolve()
    info = read_elf(python)
    assert "libc.so.6" in info.needed
    assert info.interp and "ld-linux" in info.interp
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-d", str(python)], capture_output=True, text=True,
                             check=True).stdout
        expected = [ln.split("[")[1].rstrip("]") for ln in out.splitlines() if "(NEEDED)" in ln]
        assert list(info.needed) == expected


def test_elf_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF\x02\x01" + b"\0" * 10)
    with pytest.raises(AssetError, match=r"bad\.so is not a valid elf file"):
        read_elf(bad)


# --- Debian packages --------------------------------------------------------------------


def test_policy_package_names() -> None:
    assert debs.policy_package("libffi.so.8") == "libffi8"
    assert debs.policy_package("libgcc_s.so.1") == "libgcc-s1"
    assert debs.policy_package("libz.so.1") == "zlib1g"
    assert debs.policy_package("libm.so.6") == "libc6"
    assert debs.policy_package("libfoo-1.0.so.2") == "libfoo-1.0-2"


def test_parse_control_and_depends() -> None:
    text = ("Package: python3.11-minimal\nVersion: 3.11.2-6+deb12u9\nArchitecture: amd64\n"
            "Depends: libpython3.11-minimal (= 3.11.2-6+deb12u9), libexpat1 (>= 2.1~beta3),\n"
            " zlib1g (>= 1:1.2.0)\nPre-Depends: libc6 (>= 2.35)\n\n"
            "Package: zlib1g\nVersion: 1:1.2.13.dfsg-1\nArchitecture: amd64\n"
            "Depends: libc6 (>= 2.14), media-types | mime-support:any\n")
    py, z = debs.parse_control(text)
    assert py.depends == ("libc6", "libpython3.11-minimal", "libexpat1", "zlib1g")
    assert z.deb_name == "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb"
    assert z.depends == ("libc6", "media-types", "mime-support")


def test_arch_table_has_no_hardcoded_host() -> None:
    assert debs.arch_info("amd64").triplet == "x86_64-linux-gnu"
    assert debs.arch_info("arm64").machine == EM_AARCH64


def fake_tree(tmp_path: Path) -> debs.PackageTree:
    tree = debs.PackageTree(tmp_path / "pkgs")
    m = tree.merged
    (m / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (m / "usr/lib").mkdir(parents=True)
    (m / "lib64").mkdir()
    elf = make_elf(is64=True, little=True, machine=EM_X86_64, needed=[])
    (m / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").write_bytes(elf)
    (m / "lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    (m / "usr/lib/x86_64-linux-gnu").symlink_to("../../lib/x86_64-linux-gnu")  # a dir link
    (m / "lib/x86_64-linux-gnu/libc.so.6").write_bytes(make_elf(
        is64=True, little=True, machine=EM_X86_64, needed=["ld-linux-x86-64.so.2"]))
    (m / "lib/x86_64-linux-gnu/libffi.so.8.1.2").write_bytes(make_elf(
        is64=True, little=True, machine=EM_X86_64, needed=["libc.so.6"]))
    (m / "lib/x86_64-linux-gnu/libffi.so.8").symlink_to("libffi.so.8.1.2")
    (m / "usr/bin").mkdir(parents=True)
    (m / "usr/bin/prog").write_bytes(make_elf(
        is64=True, little=True, machine=EM_X86_64, needed=["libffi.so.8", "libc.so.6"],
        interp="/lib64/ld-linux-x86-64.so.2"))
    for p in m.rglob("*"):
        if not p.is_dir() or p.is_symlink():
            tree.owner["/" + p.relative_to(m).as_posix()] = "pkg"
    return tree


def test_package_tree_resolves_symlinks_inside_the_tree(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    assert tree.resolve("/lib64/ld-linux-x86-64.so.2") == [
        "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
    assert tree.resolve("/usr/lib/x86_64-linux-gnu/libffi.so.8") == [
        "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu/libffi.so.8",
        "/lib/x86_64-linux-gnu/libffi.so.8.1.2"]
    assert tree.resolve("/lib/nothing.so") is None


class NoApt(debs.Apt):
    def __init__(self) -> None:
        super().__init__("amd64")

    def show(self, names: object, strict: bool = True) -> dict[str, debs.Package]:
        return {}


def test_library_closure_follows_interp_needed_and_links(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path)
    pset = debs.PackageSet(NoApt(), debs.DebCache(tmp_path / "debs", NoApt()), tree,
                           "x86_64-linux-gnu", lambda phase, msg: None)
    got = pset.library_closure(["/usr/bin/prog"], EM_X86_64)
    assert got == {"/usr/bin/prog", "/lib64/ld-linux-x86-64.so.2",
                   "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                   "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libffi.so.8",
                   "/lib/x86_64-linux-gnu/libffi.so.8.1.2"}
    with pytest.raises(AssetError, match=r"cannot find libgcc_s\.so\.1"):
        pset.library_closure(["/usr/bin/prog"], EM_X86_64, [("libgcc_s.so.1", "libc.so.6")])
    with pytest.raises(AssetError, match="elf machine 62, not 183"):
        pset.library_closure(["/usr/bin/prog"], EM_AARCH64)


# --- module trimming --------------------------------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def fake_sources(tmp_path: Path, agent_main: str) -> tuple[Path, Path]:
    stdlib = tmp_path / "usr/lib/python3.11"
    write_tree(stdlib, {
        "encodings/__init__.py": "import codecs\n", "encodings/aliases.py": "",
        "encodings/utf_8.py": "", "encodings/ascii.py": "", "encodings/latin_1.py": "",
        "codecs.py": "",
        # top-level import, lazy heavy import, lazy light import, main guard
        "mod_a.py": "import mod_b\ndef f():\n    import doctest\ndef g():\n    import mod_c\n"
                    "if __name__ == '__main__':\n    import mod_main\n",
        # an optional C accelerator
        "mod_b.py": "try:\n    import _fastb\nexcept ImportError:\n    _fastb = None\n",
        "mod_c.py": "", "mod_main.py": "", "doctest.py": "import mod_dev\n", "mod_dev.py": "",
        # pickle is in OPTIONAL, but mod_d needs it at import time
        "mod_d.py": "import pickle\n", "pickle.py": "",
        "lib-dynload/_fastb.cpython-311-x86_64-linux-gnu.so": "",
    })
    hull_root = tmp_path / "hullsrc"
    write_tree(hull_root, {
        "hull/__init__.py": "", "hull/agent/__init__.py": "",
        "hull/agent/main.py": agent_main,
    })
    return stdlib, hull_root


def test_find_modules_trims_lazy_heavy_imports(tmp_path: Path) -> None:
    stdlib, hull_root = fake_sources(tmp_path, (
        "from typing import TYPE_CHECKING\nimport mod_a, mod_d\n"
        "if TYPE_CHECKING:\n    import hull.errors\n"))
    (stdlib / "typing.py").write_text("TYPE_CHECKING = False\n")
    ms = trim.find_modules(stdlib, hull_root, "x86_64-linux-gnu", (3, 11))
    assert {"mod_a", "mod_b", "mod_c", "mod_d", "pickle", "encodings", "encodings.utf_8",
            "typing"} <= set(ms.sources)
    assert "doctest" not in ms.sources and "mod_dev" not in ms.sources
    assert "mod_main" not in ms.sources
    assert set(ms.extensions) == {"_fastb"}
    assert not any(n.startswith("hull") for n in ms.names)


def test_find_modules_refuses_modules_not_in_the_image(tmp_path: Path) -> None:
    stdlib, hull_root = fake_sources(tmp_path, "import mod_a\nimport hull.errors\n")
    with pytest.raises(AssetError, match=r"hull.errors \(imported by hull.agent.main\)"):
        trim.find_modules(stdlib, hull_root, "x86_64-linux-gnu", (3, 11))


def test_compile_to_writes_sourceless_pyc(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("X = 41 + 1\n")
    trim.compile_to(src, tmp_path / "out/m.pyc", "/usr/lib/python3.11/m.py")
    src.unlink()
    code = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path[0] = 'out'; "
                           "import m; print(m.X, m.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout
    assert code.startswith("42 ") and code.strip().endswith("m.pyc")


# --- identity and status ----------------------------------------------------------------


def fake_package(root: Path) -> Path:
    pkg = root / "hull"
    write_tree(pkg, {"__init__.py": "v = 1\n", "agentapi/schema.py": "S = 1\n",
                     "agent/main.py": "def main() -> int:\n    return 0\n",
                     "cli/main.py": "host side\n", "agent/__pycache__/main.cpython-311.pyc": "x"})
    return pkg


def test_agent_hash_covers_only_image_sources(tmp_path: Path) -> None:
    pkg = fake_package(tmp_path)
    assert [rel for rel, _ in initrd.agent_sources(pkg)] == [
        "hull/__init__.py", "hull/agent/main.py", "hull/agentapi/schema.py"]
    first = initrd.agent_hash(pkg)
    (pkg / "cli/main.py").write_text("changed\n")
    (pkg / "agent/__pycache__/main.cpython-311.pyc").write_text("y")
    assert initrd.agent_hash(pkg) == first
    (pkg / "agent/main.py").write_text("def main() -> int:\n    return 1\n")
    assert initrd.agent_hash(pkg) != first
    assert len(initrd.agent_hash()) == 64  # the installed package


def key_of(agent: str = "a", packages: dict[str, str] | None = None, arch: str = "amd64",
           kernel_key: str | None = None, compression: str = "zstd",
           init_override: str | None = None) -> str:
    return initrd.image_key(agent, packages or {"libc6": "2.36"}, arch, kernel_key,
                            compression, init_override)


def test_image_key_changes_with_each_input() -> None:
    key = key_of()
    assert key == key_of() == key_of(packages={"libc6": "2.36"})
    others = {key_of(agent="b"), key_of(packages={"libc6": "2.37"}), key_of(arch="arm64"),
              key_of(kernel_key="k"), key_of(compression="none"), key_of(init_override="#!")}
    assert len(others) == 6 and key not in others


def store_image(store: AssetStore, key: str, **manifest: object) -> None:
    with store.building(IMAGE, key) as d:
        (d / "initrd.img").write_bytes(b"img")
        store.write_manifest(d, {"key": key, "recipe": initrd.BUILD_RECIPE_VERSION,
                                 "agent_hash": initrd.agent_hash(), "kernel_key": None,
                                 **manifest})
    store.publish(IMAGE, key)


def test_current_image_status(tmp_path: Path) -> None:
    config = Config(runtime=RuntimeConfig(asset_dir=str(tmp_path)))
    store = AssetStore(tmp_path)
    status = initrd.current_image_status(config)
    assert status.asset is None and status.stale and "hull image build" in status.reason

    store_image(store, "k1")
    status = initrd.current_image_status(config)
    assert status.asset and status.asset.key == "k1" and not status.stale
    assert status.initrd == tmp_path / "image/k1/initrd.img"

    store_image(store, "k2", agent_hash="0" * 64)
    assert "agent sources changed" in initrd.current_image_status(config).reason

    store_image(store, "k3", init_override=True)
    assert initrd.current_image_status(config).stale

    # A Debian kernel's modules go into the image: a new one makes the image stale.
    with store.building(KERNEL, "deb1") as d:
        (d / "modules").mkdir()
        (d / "modules/virtio.ko").write_bytes(b"ko")
        store.write_manifest(d, {"key": "deb1", "flavor": "debian", "modules": ["virtio.ko"]})
    store.publish(KERNEL, "deb1")
    store_image(store, "k4")
    assert "kernel's modules" in initrd.current_image_status(config).reason
    store_image(store, "k5", kernel_key="deb1")
    assert not initrd.current_image_status(config).stale
    km = initrd.kernel_modules(store)
    assert km.kernel_key == "deb1" and [f.name for f in km.files] == ["virtio.ko"]


def test_cli_registers_build_and_status() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb")
    cli_image.register(sub)
    args = parser.parse_args(["image", "build", "--force", "--arch", "arm64"])
    assert args.func is cli_image._build and args.force and args.arch == "arm64"
    assert args.compression == initrd.DEFAULT_COMPRESSION
    assert parser.parse_args(["image", "status"]).func is cli_image._status


# --- the real thing ---------------------------------------------------------------------

REAL_BUILD_REASON = "needs root, dpkg and apt lists that know python3.11-minimal"


def can_build_real() -> bool:
    if os.geteuid() != 0 or shutil.which("apt-cache") is None:
        return False
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", "python3.11-minimal"],
                          capture_output=True, check=False)
    return proc.returncode == 0 and bool(proc.stdout)


PROBE_INIT = """#!/usr/bin/python3.11 -S
import sys, time
print("HULL-PROBE", sys.version.split()[0], "%.3f" % time.clock_gettime(time.CLOCK_BOOTTIME),
      flush=True)
sys.path[0] = "/usr/lib/hull"
import hull.agentapi.schema, hull.agentapi.framing
print("HULL-PROBE-IMPORTED", flush=True)
"""


@pytest.fixture(scope="module")
def real_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test image (its /init prints and exits) built in a private asset dir; .debs are
    taken from /var/lib/hull/debs when there, so only new versions are downloaded."""
    if not can_build_real():
        pytest.skip(REAL_BUILD_REASON)
    assets = tmp_path_factory.mktemp("assets")
    shared = Path("/var/lib/hull/debs")
    if shared.is_dir():
        (assets / "debs").mkdir()
        for deb in shared.glob("*.deb"):
            os.link(deb, assets / "debs" / deb.name)
    config = Config(runtime=RuntimeConfig(asset_dir=str(assets)))
    result = initrd.build_image(config, init_override=PROBE_INIT, publish=False,
                                compression="gzip")
    return result.asset.path


@pytest.mark.slow
def test_real_image_layout(real_image: Path) -> None:
    manifest = json.loads((real_image / "manifest.json").read_text())
    assert manifest["compression"] == "gzip"
    entries = {e.name: e for e in cpio.read(gzip.decompress(
        (real_image / "initrd.img").read_bytes()))}
    assert entries["dev/console"].kind == stat.S_IFCHR and entries["dev/console"].rdev == (5, 1)
    assert entries["init"].data.startswith(b"#!/usr/bin/python3.11 -S\n")
    assert entries["init"].mode & 0o111
    assert "usr/bin/python3.11" in entries and "usr/lib/hull/hull/agentapi/schema.pyc" in entries
    assert "usr/lib/python3.11/json/__init__.pyc" in entries
    # frozen into python3.11 (trim.FROZEN): no files; os.pyc is getpath's landmark
    assert "usr/lib/python3.11/codecs.pyc" not in entries
    assert "usr/lib/python3.11/importlib/_bootstrap.pyc" not in entries
    assert "usr/lib/python3.11/os.pyc" in entries
    assert not any(n.endswith(".py") for n in entries)
    assert entries["lib64/ld-linux-x86-64.so.2"].kind == stat.S_IFLNK
    assert {"dev", "proc", "sys", "sys/fs/cgroup", "run", "tmp"} <= set(entries)
    assert manifest["size"] == (real_image / "initrd.img").stat().st_size <= 6_000_000
    assert manifest["init_override"] is True and "python3.11-minimal" in manifest["packages"]


def unpack(entries: list[cpio.Entry], root: Path) -> None:
    for e in entries:
        path = root / e.name
        if e.kind == stat.S_IFDIR:
            path.mkdir(parents=True, exist_ok=True)
        elif e.kind == stat.S_IFLNK:
            path.symlink_to(e.data.decode())
        elif e.kind == stat.S_IFREG:
            path.write_bytes(e.data)
            path.chmod(e.mode & 0o777)


@pytest.mark.slow
def test_verify_imports_catches_a_missing_module(real_image: Path, tmp_path: Path) -> None:
    unpack(cpio.read(gzip.decompress((real_image / "initrd.img").read_bytes())), tmp_path)
    initrd.verify_imports(tmp_path, ["json", "ctypes", "hull.agentapi.schema"])
    (tmp_path / "usr/lib/python3.11/struct.pyc").unlink()  # the framing imports struct
    with pytest.raises(AssetError, match=r"cannot import the agent: .*struct"):
        initrd.verify_imports(tmp_path, ["hull.agentapi.framing"])


def tsc_khz() -> str:
    """tsc_early_khz=<host>: without it a loaded host can stall the guest's TSC calibration."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return f" tsc_early_khz={int(float(line.split(':')[1]) * 1000)}"
    return ""


def current_kernel() -> Path | None:
    asset = AssetStore(Path("/var/lib/hull")).current(KERNEL)
    vmlinux = asset.path / "vmlinux" if asset else None
    return vmlinux if vmlinux and vmlinux.is_file() else None


@pytest.mark.vm
@pytest.mark.slow
def test_real_image_boots_python_as_init(real_image: Path, no_leaks: None) -> None:
    vmlinux = current_kernel()
    qemu = shutil.which("qemu-system-x86_64")
    if vmlinux is None or qemu is None:
        pytest.skip("needs qemu-system-x86_64 and a current kernel in /var/lib/hull")
    if AssetStore(Path("/var/lib/hull")).current(KERNEL).manifest.get(  # type: ignore[union-attr]
            "flavor") == "debian":
        pytest.skip("the test image was built without this Debian kernel's modules")
    argv = [qemu, "-machine", "microvm,accel=tcg", "-m", "256", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(vmlinux), "-initrd", str(real_image / "initrd.img"),
            "-append", f"console=ttyS0 panic=-1 quiet{tsc_khz()} PYTHONHASHSEED=0"]
    start = time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=False)
    out = proc.stdout
    assert "HULL-PROBE 3.11" in out, out[-2000:]
    assert "HULL-PROBE-IMPORTED" in out, out[-2000:]
    assert time.monotonic() - start < 60


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool")
def test_lz4_is_the_legacy_frame_the_kernel_reads() -> None:
    data = os.urandom(1000) * 50
    packed = initrd.compress(data, "lz4")
    assert packed[:4] == b"\x02\x21\x4c\x18"  # lz4 legacy magic (lib/decompress_unlz4.c)
    assert subprocess.run(["lz4", "-dc"], input=packed, capture_output=True,
                          check=True).stdout == data


def test_compression_needs_a_kernel_that_unpacks_it(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    initrd.check_kernel_unpacks(store, "lz4")  # no kernel yet: nothing to check against
    with store.building(KERNEL, "k1") as out:
        (out / "config").write_text("CONFIG_RD_GZIP=y\n# CONFIG_RD_LZ4 is not set\n")
        store.write_manifest(out, {"key": "k1"})
    store.publish(KERNEL, "k1")
    initrd.check_kernel_unpacks(store, "gzip")
    initrd.check_kernel_unpacks(store, "none")
    with pytest.raises(AssetError, match=r"cannot unpack a lz4 initrd \(CONFIG_RD_LZ4=y is "
                                         r"not in .*/kernel/k1/config\): rebuild it"):
        initrd.check_kernel_unpacks(store, "lz4")
    with store.building(KERNEL, "k2") as out:
        (out / "config").write_text("CONFIG_RD_LZ4=y\n")
        store.write_manifest(out, {"key": "k2"})
    store.publish(KERNEL, "k2")
    initrd.check_kernel_unpacks(store, "lz4")


def test_frozen_modules_left_out_are_frozen_in_this_python() -> None:
    import _imp

    frozen = set(_imp._frozen_module_names())  # type: ignore[attr-defined]
    bootstrap = {"importlib._bootstrap", "importlib._bootstrap_external"}
    assert trim.FROZEN - bootstrap <= frozen
    assert {"_frozen_importlib", "_frozen_importlib_external"} <= frozen
    assert "os" not in trim.FROZEN  # the stdlib landmark getpath looks for
