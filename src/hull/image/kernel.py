"""The guest kernel: build a small one from Debian's linux-source, or fetch Debian's own.

Both flavors end up as ``kernel/<key>/`` in the :class:`AssetStore`:

``vmlinux``
    uncompressed ELF with a PVH entry note: QEMU boots it with ``-kernel`` directly, which
    saves the ~1 s a bzImage spends decompressing itself under TCG.
``Image``
    instead of ``vmlinux`` for arm64 (manifest ``"boot_file"``): the uncompressed arm64
    boot image, which QEMU's ``-machine virt`` boots with ``-kernel`` (no PVH there).
``manifest.json``
    ``{"key", "flavor", "release", "source", "arch", "vmlinux_size", "compressed_size",
    "modules"}`` (docs/internals.md).
``config``
    the kernel's .config, to answer "is X built in?" without the source.
``modules/``
    flavor ``debian`` only: the ``.ko`` files the guest agent loads (decompressed, since
    it uses init_module), in the load order of ``modules.order`` and ``manifest["modules"]``.

The pure helpers (Kconfig parsing, merging and verification, cache keys, vmlinux
extraction, module ordering) take text or bytes and are unit-tested without a kernel.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from hull.errors import AssetError
from hull.image.store import KERNEL, Asset, AssetStore

log = logging.getLogger("hull.image.kernel")

# Bump when the way a kernel is built changes in a way the inputs below do not capture
# (make targets, merge method, strip flags ...): it invalidates every cached build.
BUILD_RECIPE_VERSION = 1
# Same for `hull kernel fetch` (which modules are shipped, how vmlinux is extracted).
FETCH_RECIPE_VERSION = 1

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src") / f"{SOURCE_PACKAGE}.tar.xz"
# The generic flavor: Debian's cloud flavor has no 9p at all (CONFIG_NET_9P is not set),
# and the container rootfs reaches the guest over virtio-9p.
DEFAULT_IMAGE_PACKAGE = "linux-image-amd64"
KCONFIG_DIR = Path(__file__).with_name("kconfig")
COMMON_FRAGMENT = "common.config"
# Hull's own kernel patches (``patch -p1``): patches/common/*.patch for every
# architecture, then patches/<arch>/*.patch, each in name order.
PATCH_DIR = Path(__file__).with_name("patches")
LOG_TAIL_LINES = 30
BUILD_TOOLS = ("make", "gcc", "ld", "flex", "bison", "bc", "perl", "strip", "tar", "xz",
               "patch")
BUILD_PACKAGES = "build-essential flex bison bc libelf-dev xz-utils"

KconfigValues = dict[str, str | None]  # symbol -> value; None means "is not set"
# (kind, data) -> data, for the compressions Python 3.11's stdlib lacks (zstd, lz4)
External = Callable[[str, bytes], bytes]


@dataclass(frozen=True)
class Arch:
    """How one guest architecture is named by the kernel's make and by dpkg."""

    make_arch: str  # ARCH= for make; x86_64 (not x86) makes tinyconfig 64-bit
    image: str  # the compressed image make builds, relative to the tree
    debian: str
    #: the file QEMU boots, in the asset: an x86 PVH vmlinux, an arm64 Image
    boot_file: str = "vmlinux"
    #: make targets of a build
    targets: tuple[str, ...] = ("vmlinux", "bzImage")
    #: CROSS_COMPILE prefix when this is not the host's architecture (Debian's cross gcc)
    cross_prefix: str = ""
    cross_package: str = ""
    #: options a fetched Debian kernel must have built in (not as modules)
    builtin: tuple[str, ...] = ()


_BUILTIN = ("CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS", "CONFIG_MODULES", "CONFIG_TMPFS",
            "CONFIG_UNIX")
ARCHES = {
    "x86_64": Arch(make_arch="x86_64", image="arch/x86/boot/bzImage", debian="amd64",
                   cross_prefix="x86_64-linux-gnu-", cross_package="gcc-x86-64-linux-gnu",
                   builtin=("CONFIG_PVH", "CONFIG_SERIAL_8250_CONSOLE", *_BUILTIN)),
    "aarch64": Arch(make_arch="arm64", image="arch/arm64/boot/Image.gz", debian="arm64",
                    boot_file="Image", targets=("Image", "Image.gz"),
                    cross_prefix="aarch64-linux-gnu-", cross_package="gcc-aarch64-linux-gnu",
                    builtin=("CONFIG_SERIAL_AMBA_PL011_CONSOLE", *_BUILTIN)),
}
#: Debian's names for the same architectures
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    return platform.machine()


def canonical_arch(arch: str | None) -> str:
    """uname -m name of ``arch`` (which may be Debian's: arm64), the host's if None."""
    arch = arch or host_arch()
    return _ALIASES.get(arch, arch)


def arch_info(arch: str) -> Arch:
    try:
        return ARCHES[canonical_arch(arch)]
    except KeyError:
        raise AssetError(f"no guest kernel recipe for architecture {arch}") from None


# ---------------------------------------------------------------------------------------
# Kconfig fragments: parse, merge, verify


_SET = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_UNSET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")


@dataclass(frozen=True)
class Fragment:
    name: str  # e.g. "kconfig/common.config", for messages
    text: str

    @property
    def values(self) -> KconfigValues:
        return parse_kconfig(self.text)


def parse_kconfig(text: str) -> KconfigValues:
    """Parse a .config or a fragment: ``CONFIG_X=v`` and ``# CONFIG_X is not set`` lines."""
    values: KconfigValues = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _SET.fullmatch(line):
            values[m[1]] = m[2]
        elif m := _UNSET.fullmatch(line):
            values[m[1]] = None
    return values


def merge_kconfig(base: Mapping[str, str | None],
                  *layers: Mapping[str, str | None]) -> KconfigValues:
    """Later layers win, as in scripts/kconfig/merge_config.sh."""
    merged = dict(base)
    for layer in layers:
        merged.update(layer)
    return merged


def render_kconfig(values: Mapping[str, str | None]) -> str:
    lines = [f"{sym}={val}" if val is not None else f"# {sym} is not set"
             for sym, val in values.items()]
    return "\n".join(lines) + "\n"


def _describe(symbol: str, value: str | None) -> str:
    return f"{symbol}={value}" if value is not None else f"# {symbol} is not set"


def dropped_options(fragments: Sequence[Fragment], actual: Mapping[str, str | None]) -> list[str]:
    """What the fragments asked for that the final .config lacks, one message per option.

    A symbol absent from .config counts as "not set" (it is invisible: dependencies unmet).
    """
    wanted: dict[str, tuple[str | None, str]] = {}
    for fragment in fragments:
        for symbol, value in fragment.values.items():
            wanted[symbol] = (value, fragment.name)  # the last fragment wins, as in the merge
    problems = []
    for symbol, (value, origin) in wanted.items():
        got = actual.get(symbol)
        if got != value:
            now = "not set" if got is None else f"{symbol}={got}"
            problems.append(f"{_describe(symbol, value)} from {origin} (now: {now})")
    return problems


def load_fragments(arch: str, directory: Path = KCONFIG_DIR) -> list[Fragment]:
    fragments = []
    for name in (COMMON_FRAGMENT, f"{arch}.config"):
        path = directory / name
        try:
            fragments.append(Fragment(f"kconfig/{name}", path.read_text()))
        except FileNotFoundError:
            raise AssetError(f"kernel config fragment {path} does not exist") from None
    return fragments


@dataclass(frozen=True)
class Patch:
    """One of Hull's kernel patches, applied to the unpacked linux-source tree."""

    name: str  # e.g. "patches/x86_64/lapic-timer-hz.patch", for messages and the key
    text: str


def load_patches(arch: str, directory: Path = PATCH_DIR) -> list[Patch]:
    return [Patch(f"patches/{path.parent.name}/{path.name}", path.read_text())
            for part in ("common", arch)
            for path in sorted((directory / part).glob("*.patch"))]


# ---------------------------------------------------------------------------------------
# Cache keys


def _sha256_json(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _digests(files: Sequence[Fragment | Patch]) -> list[list[str]]:
    return [[f.name, hashlib.sha256(f.text.encode()).hexdigest()] for f in files]


def build_key(source_version: str, arch: str, fragments: Sequence[Fragment],
              recipe: int = BUILD_RECIPE_VERSION, patches: Sequence[Patch] = ()) -> str:
    """Key of a built kernel: source package version, arch, fragment and patch contents,
    recipe. (Without patches the key is what it was before Hull had any.)"""
    doc: dict[str, Any] = {
        "flavor": "built",
        "source": f"{SOURCE_PACKAGE}={source_version}",
        "arch": arch,
        "fragments": _digests(fragments),
        "recipe": recipe,
    }
    if patches:
        doc["patches"] = _digests(patches)
    return _sha256_json(doc)


def fetch_key(package: str, version: str, arch: str, recipe: int = FETCH_RECIPE_VERSION) -> str:
    """Key of a fetched Debian kernel: the exact package, version and arch, and the recipe."""
    return _sha256_json({"flavor": "debian", "package": package, "version": version,
                         "arch": arch, "recipe": recipe})


# ---------------------------------------------------------------------------------------
# ELF and bzImage: the PVH note, and vmlinux out of a vmlinuz


ELF_MAGIC = b"\x7fELF"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note QEMU looks for to boot an ELF kernel via PVH


def has_pvh_note(elf: bytes) -> bool:
    """True if a little-endian ELF64 has the Xen PHYS32_ENTRY note in a PT_NOTE segment."""
    if len(elf) < 64 or elf[:4] != ELF_MAGIC or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        p_type, = struct.unpack_from("<I", elf, base)
        if p_type != _PT_NOTE:
            continue
        offset, = struct.unpack_from("<Q", elf, base + 8)
        size, = struct.unpack_from("<Q", elf, base + 32)
        if any(name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY
               for name, kind in _notes(elf[offset:offset + size])):
            return True
    return False


def _notes(segment: bytes) -> Iterator[tuple[bytes, int]]:
    pos = 0
    while pos + 12 <= len(segment):
        namesz, descsz, kind = struct.unpack_from("<III", segment, pos)
        pos += 12
        name = segment[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        pos += (descsz + 3) & ~3
        yield name, kind


def external_decompress(kind: str, data: bytes) -> bytes:
    """Decompress with the zstd or lz4 program (Python 3.11's stdlib has neither).

    zstd complains about the 4-byte size the kernel appends after the frame and exits
    non-zero, but has written the frame's data by then: the caller checks the result.
    """
    if shutil.which(kind) is None:
        raise AssetError(f"{kind} not found, needed to decompress the kernel: "
                         f"apt-get install {kind}")
    proc = subprocess.run([kind, "-dc"], input=data, capture_output=True, check=False)
    return proc.stdout


def _decompress_stream(kind: str, data: bytes, external: External) -> bytes:
    """Decompress one stream at the start of ``data``, ignoring whatever follows it."""
    decomp: Any
    if kind == "gzip":
        decomp = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif kind == "xz":
        decomp = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif kind == "lzma":
        decomp = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    elif kind == "bzip2":
        decomp = bz2.BZ2Decompressor()
    elif kind in ("zstd", "lz4"):
        return external(kind, data)
    else:
        raise ValueError(f"unknown compression {kind}")
    return bytes(decomp.decompress(data))


# Order and magics as in the kernel's scripts/extract-vmlinux (lzo unsupported). lz4 is
# the legacy frame format of `lz4 -l` (Debian's cloud kernel uses it).
COMPRESSION_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)


def _bzimage_payload(image: bytes) -> bytes | None:
    """The compressed kernel inside an x86 bzImage, located by its setup header.

    Boot protocol >= 2.08 records the payload's offset and length (relative to the
    protected-mode code, which starts after the setup sectors), so no scanning is needed.
    """
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    version, = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start:start + length]
    return payload if len(payload) == length and length else None


def _try(kind: str, data: bytes, external: External) -> bytes | None:
    try:
        out = _decompress_stream(kind, data, external)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
        return None
    return out if out[:4] == ELF_MAGIC else None


def extract_vmlinux(image: bytes, external: External = external_decompress) -> bytes:
    """The uncompressed ELF kernel inside a vmlinuz/bzImage (scripts/extract-vmlinux).

    Uses the bzImage header when there is one; otherwise tries every compression magic
    at every offset, as extract-vmlinux does, until one decompresses to an ELF file.
    """
    if image[:4] == ELF_MAGIC:
        return image
    payload = _bzimage_payload(image)
    if payload is not None:
        for kind, magic in COMPRESSION_MAGICS:
            if payload.startswith(magic) and (elf := _try(kind, payload, external)) is not None:
                return elf
    for kind, magic in COMPRESSION_MAGICS:
        pos = image.find(magic)
        while pos >= 0:
            if (elf := _try(kind, image[pos:], external)) is not None:
                return elf
            pos = image.find(magic, pos + 1)
    raise ValueError("no gzip, xz, bzip2, lzma, lz4 or zstd compressed ELF kernel found")


# ---------------------------------------------------------------------------------------
# Modules: which to ship, in which order


@dataclass(frozen=True)
class GuestModule:
    name: str
    required: bool
    why: str


# What the guest needs, transports first. Dependencies (virtio, virtio_ring, netfs,
# fscache, vsock, failover ...) are added from modules.dep.
GUEST_MODULES = (
    GuestModule("virtio_mmio", True, "the devices of -machine microvm and of arm64 virt"),
    GuestModule("virtio_pci", False, "the devices of -machine q35"),
    GuestModule("virtio_console", True, "the agent channel (virtio-serial)"),
    GuestModule("virtio_rng", True, "guest entropy"),
    GuestModule("9pnet_virtio", True, "the container rootfs over virtio-9p"),
    GuestModule("9p", True, "the container rootfs over virtio-9p"),
    GuestModule("overlay", False, "overlay mounts in containers"),
    GuestModule("vmw_vsock_virtio_transport", False, "vsock"),
    GuestModule("virtio_net", False, "networking"),
    GuestModule("virtio_blk", False, "block devices"),
    GuestModule("virtio_balloon", False, "memory ballooning"),
)
# Options a fetched x86_64 kernel must have built in (they cannot come from a module);
# Arch.builtin has every architecture's.
REQUIRED_BUILTIN = ARCHES["x86_64"].builtin
_KO_SUFFIX = re.compile(r"\.ko(\.xz|\.gz|\.zst)?$")


def module_name(path: str) -> str:
    """kernel/fs/9p/9p.ko.xz -> 9p; dashes and underscores are the same to the kernel."""
    return _KO_SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: ``path: dep dep ...`` -> {path: [deps]} (paths relative to the tree)."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep and path.strip() and not path.startswith("#"):
            deps[path.strip()] = rest.split()
    return deps


def load_order(deps: Mapping[str, Sequence[str]], wanted: Sequence[str]) -> list[str]:
    """The wanted modules and everything they depend on, each after its dependencies."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "active":
            raise ValueError(f"module dependency cycle: {' -> '.join((*chain, path))}")
        if path not in deps:
            raise ValueError(f"module {path} is not in modules.dep")
        state[path] = "active"
        # modprobe loads a line's dependencies last to first: follow the same order.
        for dep in reversed(deps[path]):
            visit(dep, (*chain, path))
        state[path] = "done"
        order.append(path)

    for path in wanted:
        visit(path, ())
    return order


@dataclass(frozen=True)
class ModulePlan:
    paths: list[str]  # every .ko to ship, in load order (relative to lib/modules/<release>)
    builtin: list[str]  # wanted modules the kernel has built in
    missing: list[GuestModule]  # wanted modules neither built in nor shipped as modules


def plan_modules(deps: Mapping[str, Sequence[str]], builtin_text: str,
                 wanted: Sequence[GuestModule] = GUEST_MODULES) -> ModulePlan:
    """Pick the .ko files for the wanted modules; skip what is built in (modules.builtin)."""
    by_name = {module_name(path): path for path in deps}
    builtin_names = {module_name(line) for line in builtin_text.split() if line}
    roots, builtin, missing = [], [], []
    for module in wanted:
        name = module.name.replace("-", "_")
        if name in by_name:
            roots.append(by_name[name])
        elif name in builtin_names:
            builtin.append(module.name)
        else:
            missing.append(module)
    return ModulePlan(load_order(deps, roots), builtin, missing)


def decompress_module(path: str, data: bytes,
                      external: External = external_decompress) -> bytes:
    """A module's ELF bytes; .ko.xz/.gz/.zst are decompressed (init_module wants plain ELF)."""
    if path.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        return zlib.decompress(data, wbits=16 + zlib.MAX_WBITS)
    if path.endswith(".ko.zst"):
        return external("zstd", data)
    return data


def parse_apt_record(text: str) -> dict[str, str]:
    """The first paragraph of ``apt-cache show`` output as {field: value}."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and last:
            fields[last] += "\n" + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            fields[last] = value.strip()
    return fields


_REAL_IMAGE = re.compile(r"linux-image-\d[^\s,(|]*")


def image_dependency(record: Mapping[str, str]) -> str | None:
    """The versioned kernel package a metapackage (linux-image-amd64) depends on."""
    for alternatives in record.get("Depends", "").split(","):
        for alternative in alternatives.split("|"):
            if m := _REAL_IMAGE.fullmatch(alternative.split("(")[0].strip()):
                return m[0]
    return None


# ---------------------------------------------------------------------------------------
# Progress on the terminal


class Progress(Protocol):
    def phase(self, text: str) -> None: ...

    def make_line(self, line: str) -> None: ...

    def tail(self, lines: Sequence[str], log_path: Path) -> None: ...

    def close(self, ok: bool = True) -> None: ...


_MAKE_STEP = re.compile(r"^  ([A-Z][A-Z0-9_]*)\s+(\S.*)$")  # "  CC      kernel/fork.o"
_COMPILE_STEPS = frozenset({"CC", "AS", "HOSTCC", "HOSTLD", "LD", "AR", "OBJCOPY"})


class PlainProgress:
    """A few log lines on stderr: for pipes, log files and CI."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr

    def phase(self, text: str) -> None:
        print(f"hull: {text}", file=self.stream, flush=True)

    def make_line(self, line: str) -> None:
        pass

    def tail(self, lines: Sequence[str], log_path: Path) -> None:
        print(f"hull: last lines of {log_path}:", file=self.stream)
        for line in lines:
            print(f"  {line}", file=self.stream)
        self.stream.flush()

    def close(self, ok: bool = True) -> None:
        pass


class RichProgress:
    """A live line: spinner, phase, elapsed time, count of compiled files, current file."""

    def __init__(self) -> None:
        # Imported here: only a terminal needs rich.
        from rich.console import Console
        from rich.progress import Progress as Live
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        self.live = Live(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                         TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                         console=Console(stderr=True, highlight=False), transient=True)
        self.live.start()
        self.task = self.live.add_task("", detail="")
        self.current = ""
        self.phase_started = time.monotonic()
        self.compiled = 0

    def _done(self) -> None:
        if self.current:
            took = time.monotonic() - self.phase_started
            self.live.console.print(f"[green]✓[/] {self.current} [dim]({took:.0f}s)")

    def phase(self, text: str) -> None:
        self._done()
        self.current, self.phase_started = text, time.monotonic()
        self.live.update(self.task, description=text, detail="")

    def make_line(self, line: str) -> None:
        m = _MAKE_STEP.match(line.rstrip())
        if m is None:
            return
        if m[1] in _COMPILE_STEPS:
            self.compiled += 1
        detail = f"{self.compiled} files  [cyan]{m[1]} {m[2]}[/]"
        self.live.update(self.task, detail=detail)

    def tail(self, lines: Sequence[str], log_path: Path) -> None:
        console = self.live.console
        console.print(f"[red]✗[/] {self.current}; last lines of {log_path}:")
        for line in lines:
            console.print(line, markup=False)
        self.current = ""

    def close(self, ok: bool = True) -> None:
        if ok:
            self._done()
        elif self.current:
            self.live.console.print(f"[red]✗[/] {self.current}")
        self.current = ""
        self.live.stop()


def make_progress() -> Progress:
    interactive = sys.stderr.isatty() and not os.environ.get("CI")
    return RichProgress() if interactive else PlainProgress()


# ---------------------------------------------------------------------------------------
# Running commands


def _run(argv: Sequence[str], what: str, cwd: Path | None = None,
         env: Mapping[str, str] | None = None) -> str:
    """Run a short command, return stdout; a failure becomes one AssetError line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd,
                              env=env)
    except FileNotFoundError:
        raise AssetError(f"{argv[0]} not found, needed to {what}") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise AssetError(f"`{' '.join(argv)}` failed ({what}): {detail}")
    return proc.stdout


class BuildLog:
    """Runs commands with their output appended to one log file, fed to the progress."""

    def __init__(self, path: Path, progress: Progress, env: Mapping[str, str]) -> None:
        self.path = path
        self.progress = progress
        self.env = dict(env)
        self.file = path.open("a", encoding="utf-8", errors="replace")

    def run(self, argv: Sequence[str], cwd: Path) -> None:
        self.file.write(f"$ {' '.join(argv)}\n")
        self.file.flush()
        tail: list[str] = []
        with subprocess.Popen(argv, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", bufsize=1) as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    self.file.write(line)
                    self.progress.make_line(line)
                    tail.append(line.rstrip("\n"))
                    del tail[:-LOG_TAIL_LINES]
            except BaseException:  # interrupted (^C): do not leave make running
                proc.kill()
                raise
            rc = proc.wait()
        self.file.flush()
        if rc != 0:
            self.progress.tail(tail, self.path)
            raise AssetError(f"`{' '.join(argv)}` failed with exit status {rc} in {cwd}; "
                             f"full log: {self.path}")

    def note(self, text: str) -> None:
        self.file.write(f"# {text}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build or fetch per key at a time: they share the scratch directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AssetError(f"another hull kernel build holds {path}") from None
        yield


# ---------------------------------------------------------------------------------------
# hull kernel build


@dataclass(frozen=True)
class KernelResult:
    asset: Asset
    up_to_date: bool  # nothing was built: the cached asset was already there
    seconds: float = 0.0

    @property
    def vmlinux(self) -> Path:
        """The file QEMU boots (an arm64 kernel's is ``Image``)."""
        return self.asset.kernel_file


def source_version() -> str:
    """Version of the installed linux-source package (part of the cache key)."""
    missing = f"{SOURCE_TARBALL} not found: apt-get install {SOURCE_PACKAGE}"
    if not SOURCE_TARBALL.is_file():
        raise AssetError(missing)
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise AssetError("dpkg-query not found: the kernel build needs a Debian host") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssetError(missing)
    return proc.stdout.strip()


def check_build_tools(info: Arch | None = None) -> None:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if info is not None and _cross(info) and shutil.which(f"{info.cross_prefix}gcc") is None:
        missing.append(info.cross_package)
    if not Path("/usr/include/gelf.h").exists():  # objtool links libelf
        missing.append("libelf-dev")
    if missing:
        raise AssetError(f"missing kernel build tools ({', '.join(missing)}): "
                         f"apt-get install {BUILD_PACKAGES}")


def _cross(info: Arch) -> bool:
    return info is not arch_info(host_arch()) if host_arch() in ARCHES else True


def _up_to_date(store: AssetStore, key: str, arch: str | None = None) -> KernelResult | None:
    asset = store.get(KERNEL, key)
    if asset is None or not asset.kernel_file.is_file():
        return None
    current = store.current(KERNEL, arch)
    if current is None or current.path != asset.path:
        # asking for this kernel again makes it the one in use (for its architecture)
        store.publish(KERNEL, key, arch)
    return KernelResult(asset, up_to_date=True)


def build(asset_dir: Path, *, force: bool = False, keep_build: bool = False,
          jobs: int | None = None, arch: str | None = None,
          progress: Progress | None = None) -> KernelResult:
    """`hull kernel build`: a minimal kernel from linux-source, cached by its inputs."""
    arch = canonical_arch(arch)
    info = arch_info(arch)
    fragments = load_fragments(arch)
    patches = load_patches(arch)
    version = source_version()
    key = build_key(version, arch, fragments, patches=patches)
    store = AssetStore(asset_dir)
    if not force and (cached := _up_to_date(store, key, arch)) is not None:
        return cached
    check_build_tools(info)
    build_dir = asset_dir / "build" / f"kernel-{key}"
    started = time.monotonic()
    with _lock(build_dir.with_name(f"kernel-{key}.lock")):
        if force:
            shutil.rmtree(build_dir, ignore_errors=True)
        progress = progress or make_progress()
        try:
            asset = _build_in(store, key, version, info, arch, (fragments, patches),
                              build_dir, jobs or len(os.sched_getaffinity(0)), progress)
        except BaseException:
            progress.close(ok=False)
            raise
        progress.close()
    if not keep_build:
        shutil.rmtree(build_dir, ignore_errors=True)
    return KernelResult(asset, up_to_date=False, seconds=time.monotonic() - started)


def _build_env(info: Arch) -> dict[str, str]:
    env = dict(os.environ, ARCH=info.make_arch, LC_ALL="C",
               KBUILD_BUILD_USER="hull", KBUILD_BUILD_HOST="hull")
    env.pop("LOCALVERSION", None)  # CONFIG_LOCALVERSION alone names the release
    env.pop("MAKEFLAGS", None)
    if _cross(info):  # e.g. arm64 on an x86_64 host: Debian's gcc-aarch64-linux-gnu
        env["CROSS_COMPILE"] = info.cross_prefix
    else:
        env.pop("CROSS_COMPILE", None)
    return env


def _build_in(store: AssetStore, key: str, version: str, info: Arch, arch: str,
              inputs: tuple[Sequence[Fragment], Sequence[Patch]], build_dir: Path, jobs: int,
              progress: Progress) -> Asset:
    fragments, patches = inputs
    build_dir.mkdir(parents=True, exist_ok=True)
    logbook = BuildLog(build_dir / "build.log", progress, _build_env(info))
    logbook.note(f"hull kernel build {key}: {SOURCE_PACKAGE} {version}, {arch}, -j{jobs}")
    try:
        tree = _extract_source(build_dir, patches, logbook, progress)
        progress.phase("configuring (tinyconfig + kconfig fragments)")
        _configure(tree, fragments, logbook)
        progress.phase(f"compiling {' and '.join(info.targets)} (make -j{jobs})")
        make = ["make", f"ARCH={info.make_arch}", f"-j{jobs}"]
        logbook.run([*make, *info.targets], tree)
        progress.phase("storing")
        release = _run(["make", "-s", f"ARCH={info.make_arch}", "kernelrelease"],
                       "read the kernel release", cwd=tree, env=logbook.env).strip()
        with store.building(KERNEL, key) as out:
            if info.boot_file == "vmlinux":
                _strip_vmlinux(tree / "vmlinux", out / "vmlinux",
                               f"{info.cross_prefix}strip" if _cross(info) else "strip")
            else:
                shutil.copyfile(tree / "arch" / info.make_arch / "boot" / info.boot_file,
                                out / info.boot_file)
            shutil.copyfile(tree / ".config", out / "config")
            store.write_manifest(out, {
                "key": key, "flavor": "built", "release": release,
                "source": version, "package": SOURCE_PACKAGE, "arch": arch,
                "boot_file": info.boot_file,
                "vmlinux_size": (out / info.boot_file).stat().st_size,
                "compressed_size": (tree / info.image).stat().st_size,
                "modules": [], "patches": [p.name for p in patches],
            })
            logbook.close()
            shutil.copyfile(logbook.path, out / "build.log")
        store.publish(KERNEL, key, arch)
    finally:
        logbook.close()
    asset = store.get(KERNEL, key)
    if asset is None:
        raise AssetError(f"kernel {key} vanished from {store.dir(KERNEL, key)} after the build")
    return asset


def _extract_source(build_dir: Path, patches: Sequence[Patch], logbook: BuildLog,
                    progress: Progress) -> Path:
    """Unpack the source and apply Hull's patches once per build dir (whose name is the
    key, which covers the patches); a stamp marks a complete, patched tree."""
    stamp = build_dir / ".extracted"
    tree = build_dir / SOURCE_PACKAGE
    if stamp.exists() and tree.is_dir():
        logbook.note(f"reusing the source tree {tree}")
        return tree
    progress.phase(f"extracting {SOURCE_TARBALL.name}")
    shutil.rmtree(tree, ignore_errors=True)
    logbook.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(build_dir)], build_dir)
    if not (tree / "Makefile").is_file():
        raise AssetError(f"{SOURCE_TARBALL} did not unpack to {tree}")
    for patch in patches:
        progress.phase(f"applying {patch.name}")
        logbook.note(f"applying {patch.name}")
        patch_file = build_dir / "patch.diff"
        patch_file.write_text(patch.text)
        try:
            # --forward --batch: a patch that is already applied or does not fit fails
            # instead of asking questions (stdin is /dev/null anyway).
            logbook.run(["patch", "-p1", "--forward", "--batch", "-i", str(patch_file)], tree)
        except AssetError as exc:
            raise AssetError(f"kernel patch {patch.name} does not apply to {SOURCE_PACKAGE}: "
                             f"{exc}") from exc
    stamp.touch()
    return tree


def _configure(tree: Path, fragments: Sequence[Fragment], logbook: BuildLog) -> None:
    """tinyconfig, then the fragments, then olddefconfig; check that nothing was dropped.

    The merge works like ``merge_config.sh -n``: base + fragments become the
    KCONFIG_ALLCONFIG of an allnoconfig, so options our fragments make visible default
    to off instead of to their Kconfig default (which would pull in keyboards, VGA
    console, ACPI fans ...). Only what the fragments list gets in.
    """
    logbook.run(["make", "tinyconfig"], tree)
    base = parse_kconfig((tree / ".config").read_text())
    merged = merge_kconfig(base, *(f.values for f in fragments))
    allconfig = tree / "hull.allconfig"
    allconfig.write_text(render_kconfig(merged))
    logbook.run(["make", f"KCONFIG_ALLCONFIG={allconfig}", "allnoconfig"], tree)
    logbook.run(["make", "olddefconfig"], tree)
    problems = dropped_options(fragments, parse_kconfig((tree / ".config").read_text()))
    if problems:
        for problem in problems:
            logbook.note(f"dropped: {problem}")
        more = f" (and {len(problems) - 1} more, see {logbook.path})" if len(problems) > 1 else ""
        raise AssetError(f"kernel config option {problems[0]} did not survive olddefconfig: "
                         f"its dependencies are missing{more}")


def _strip_vmlinux(source: Path, dest: Path, strip: str = "strip") -> None:
    """Drop the symbol table (QEMU does not need it); the PVH note is in a loaded segment."""
    _run([strip, "--strip-all", "-o", str(dest), str(source)], f"strip {source}")
    if not has_pvh_note(dest.read_bytes()):
        raise AssetError(f"{dest} has no PVH entry note: is CONFIG_PVH set?")


# ---------------------------------------------------------------------------------------
# hull kernel fetch


@dataclass(frozen=True)
class Package:
    name: str  # the versioned image package, e.g. linux-image-6.1.0-56-amd64
    version: str


def resolve_package(name: str, debian_arch: str | None = None) -> Package:
    """Follow a metapackage (linux-image-amd64) to the versioned kernel package.

    ``debian_arch``: look the packages up for that (foreign) architecture, e.g. arm64
    after ``dpkg --add-architecture arm64 && apt-get update``.
    """
    qualifier = f":{debian_arch}" if debian_arch else ""
    for _ in range(3):  # metapackage -> image (-> a signed/unsigned indirection at most)
        out = _run(["apt-cache", "show", "--no-all-versions", f"{name}{qualifier}"],
                   f"look up package {name}{qualifier}")
        record = parse_apt_record(out)
        if not record.get("Version"):
            hint = (f"dpkg --add-architecture {debian_arch} && apt-get update" if qualifier
                    else "apt-get update")
            raise AssetError(f"apt-cache has no candidate version of {name}{qualifier}: "
                             f"run {hint}")
        if _REAL_IMAGE.fullmatch(name):
            return Package(name, record["Version"])
        dependency = image_dependency(record)
        if dependency is None:
            raise AssetError(f"{name} is not a linux-image package and depends on none")
        name = dependency
    raise AssetError(f"cannot resolve {name} to a versioned linux-image package")


def fetch(asset_dir: Path, *, package: str | None = None, force: bool = False,
          arch: str | None = None, progress: Progress | None = None) -> KernelResult:
    """`hull kernel fetch`: Debian's packaged kernel, as PVH vmlinux (x86_64) or Image
    (arm64) + guest modules. ``arch`` (default: the host's) may be a foreign one."""
    arch = canonical_arch(arch)
    info = arch_info(arch)
    package = package or f"linux-image-{info.debian}"
    pkg = resolve_package(package, info.debian if _cross(info) else None)
    key = fetch_key(pkg.name, pkg.version, info.debian)
    store = AssetStore(asset_dir)
    if not force and (cached := _up_to_date(store, key, arch)) is not None:
        return cached
    started = time.monotonic()
    scratch_root = asset_dir / "build"
    with _lock(scratch_root / f"kernel-{key}.lock"):
        progress = progress or make_progress()
        try:
            with tempfile.TemporaryDirectory(prefix="fetch-", dir=scratch_root) as tmp:
                asset = _fetch_in(store, key, pkg, arch, Path(tmp), progress)
        except BaseException:
            progress.close(ok=False)
            raise
        progress.close()
    return KernelResult(asset, up_to_date=False, seconds=time.monotonic() - started)


def _fetch_in(store: AssetStore, key: str, pkg: Package, arch: str, tmp: Path,
              progress: Progress) -> Asset:
    info = arch_info(arch)
    progress.phase(f"downloading {pkg.name} {pkg.version}")
    qualifier = f":{info.debian}" if _cross(info) else ""
    # The _apt sandbox user cannot write into our private temp dir: download as root.
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
          f"{pkg.name}{qualifier}={pkg.version}"], f"download {pkg.name}", cwd=tmp)
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise AssetError(f"apt-get download {pkg.name} left no .deb in {tmp}")
    progress.phase(f"unpacking {debs[0].name}")
    root = tmp / "root"
    _run(["dpkg-deb", "-x", str(debs[0]), str(root)], f"unpack {debs[0]}")
    release, vmlinuz, config_path = _find_kernel(root, pkg)
    config = parse_kconfig(config_path.read_text())
    absent = [sym for sym in info.builtin if config.get(sym) != "y"]
    if absent:
        raise AssetError(f"{pkg.name} {pkg.version} lacks {', '.join(absent)} "
                         f"(must be built in, see {config_path.name})")
    progress.phase("choosing guest modules")
    moddir = _module_dir(root, release)
    plan = _plan(root, moddir, release, pkg)  # before the extraction: fail fast
    progress.phase(f"extracting {info.boot_file}")
    kernel = _boot_image(info, vmlinuz, pkg)
    with store.building(KERNEL, key) as out:
        (out / info.boot_file).write_bytes(kernel)
        shutil.copyfile(config_path, out / "config")
        names = _copy_modules(moddir, plan.paths, out / "modules")
        store.write_manifest(out, {
            "key": key, "flavor": "debian", "release": release, "source": pkg.version,
            "package": pkg.name, "arch": arch, "boot_file": info.boot_file,
            "vmlinux_size": len(kernel),
            "compressed_size": vmlinuz.stat().st_size, "modules": names,
            "builtin": plan.builtin,
        })
    store.publish(KERNEL, key, arch)
    asset = store.get(KERNEL, key)
    if asset is None:
        raise AssetError(f"kernel {key} vanished from {store.dir(KERNEL, key)} after the fetch")
    return asset


ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 0x38 of an arm64 Image (Documentation/arm64)


def arm64_image(vmlinuz: bytes) -> bytes:
    """The arm64 ``Image`` inside Debian's vmlinuz (a gzip of it), or the Image itself."""
    data = vmlinuz
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"bad gzip data: {exc}") from exc
    if data[0x38:0x3C] != ARM64_IMAGE_MAGIC:
        raise ValueError("not an arm64 Image (no ARM\\x64 magic at 0x38)")
    return data


def _boot_image(info: Arch, vmlinuz: Path, pkg: Package) -> bytes:
    """What QEMU boots, from the package's vmlinuz: a PVH vmlinux, or an arm64 Image."""
    try:
        if info.boot_file == "Image":
            return arm64_image(vmlinuz.read_bytes())
        vmlinux = extract_vmlinux(vmlinuz.read_bytes())
    except ValueError as exc:
        raise AssetError(f"cannot extract {info.boot_file} from {vmlinuz.name}: {exc}") from exc
    if not has_pvh_note(vmlinux):
        raise AssetError(f"vmlinux of {pkg.name} has no PVH entry note (CONFIG_PVH)")
    return vmlinux


def _find_kernel(root: Path, pkg: Package) -> tuple[str, Path, Path]:
    """(release, vmlinuz, config) from an unpacked linux-image package."""
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise AssetError(f"{pkg.name} {pkg.version} holds {len(images)} boot/vmlinuz-* files, "
                         "expected one")
    release = images[0].name.removeprefix("vmlinuz-")
    config = root / "boot" / f"config-{release}"
    if not config.is_file():
        raise AssetError(f"{pkg.name} {pkg.version} has no boot/config-{release}")
    return release, images[0], config


def _module_dir(root: Path, release: str) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):  # before and after the /usr merge
        if (root / base / release).is_dir():
            return root / base / release
    raise AssetError(f"no lib/modules/{release} in the unpacked kernel package")


def _plan(root: Path, moddir: Path, release: str, pkg: Package) -> ModulePlan:
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():  # Debian runs depmod in postinst: do it on the unpacked tree
        base = root if moddir.parent == root / "lib" / "modules" else root / "usr"
        _run(["depmod", "-b", str(base), release], "compute module dependencies")
    builtin = moddir / "modules.builtin"
    try:
        plan = plan_modules(parse_modules_dep(dep_file.read_text()),
                            builtin.read_text() if builtin.exists() else "")
    except ValueError as exc:
        raise AssetError(f"{pkg.name}: {exc}") from exc
    for module in plan.missing:
        message = (f"{pkg.name} {pkg.version} has no {module.name} module and does not build "
                   f"it in ({module.why})")
        if module.required:
            raise AssetError(f"{message}; the generic flavor (e.g. {DEFAULT_IMAGE_PACKAGE}, "
                             "linux-image-arm64) has it")
        log.warning("%s", message)
    return plan


def _copy_modules(moddir: Path, paths: Sequence[str], dest: Path) -> list[str]:
    """Store the modules decompressed under their plain names, plus modules.order."""
    dest.mkdir()
    names: list[str] = []
    for path in paths:
        name = f"{module_name(path)}.ko"
        if name in names:
            raise AssetError(f"two guest modules are named {name}")
        try:
            data = decompress_module(path, (moddir / path).read_bytes())
        except (OSError, lzma.LZMAError, zlib.error) as exc:
            raise AssetError(f"cannot read module {moddir / path}: {exc}") from exc
        if data[:4] != ELF_MAGIC:
            raise AssetError(f"module {moddir / path} is not an ELF file once decompressed")
        (dest / name).write_bytes(data)
        names.append(name)
    (dest / "modules.order").write_text("".join(f"{name}\n" for name in names))
    return names


# ---------------------------------------------------------------------------------------
# hull kernel status


def status(asset_dir: Path, arch: str | None = None) -> Asset | None:
    """The kernel in use (``kernel/current``, or ``current-<arch>``), or None."""
    return AssetStore(asset_dir).current(KERNEL, arch)
