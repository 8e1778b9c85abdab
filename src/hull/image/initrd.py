"""The guest image: an initrd whose /init is the Hull agent on a trimmed Debian Python.

Layout (docs/internals.md, "Guest image layout")::

    /init                         #!/usr/bin/python3.11 -S, runs hull.agent.main:main()
    /usr/bin/python3.11           from python3.11-minimal (libpython linked in statically)
    /lib/<triplet>/..., /lib64/ld-linux-x86-64.so.2   what the ELF files need, at Debian's paths
    /usr/lib/python3.11/**.pyc    only the stdlib modules the agent needs, sourceless
    /usr/lib/python3.11/lib-dynload/*.so   only the extension modules needed
    /usr/lib/hull/hull/{__init__,agentapi/*,agent/*}.pyc
    /lib/modules/hull/*.ko + modules.order   only for a kernel of flavor "debian"
    /dev/console (5,1), /etc/{passwd,group}, empty /dev /proc /sys /run /tmp /sys/fs/cgroup

Build: look up the package versions -> key; if ``image/<key>`` exists it is current.
Otherwise download (cached under ``<asset_dir>/debs``), extract, trim, compile, verify the
agent imports inside a chroot of the staged tree, pack (newc), compress, publish.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import hull
from hull.config.settings import Config
from hull.errors import AssetError
from hull.image import cpio, debs
from hull.image.store import IMAGE, KERNEL, Asset, AssetStore, debian_arch
from hull.image.trim import ModuleSet, compile_to, find_modules, package_modules

# Bump when the image's content changes for the same inputs (layout, trimming, /init ...).
BUILD_RECIPE_VERSION = 3

PYTHON_VERSION = (3, 11)
PYTHON = f"python{PYTHON_VERSION[0]}.{PYTHON_VERSION[1]}"
BASE_PACKAGES = (f"{PYTHON}-minimal", f"lib{PYTHON}-minimal", f"lib{PYTHON}-stdlib")
GUEST_PYTHON = f"/usr/bin/{PYTHON}"
GUEST_STDLIB = f"/usr/lib/{PYTHON}"
GUEST_HULL = "/usr/lib/hull"
GUEST_MODULES = "/lib/modules/hull"
# The parts of the hull package that go into the image (agent_hash covers exactly these).
AGENT_PARTS = ("agentapi", "agent")
# Libraries loaded with dlopen() and so not in any DT_NEEDED: glibc needs libgcc_s for
# pthread_exit() and thread cancellation, and aborts the process without it.
DLOPENED = (("libgcc_s.so.1", "libc.so.6"),)
# Measured under TCG (microvm, built 6.1 kernel, 12.6 MB cpio; qemu start -> python as init,
# median of 10): gzip -9 5.1 MB 1.10 s; zstd -19 4.2 MB 1.22 s (the kernel's unzstd is slow
# under TCG, and its 8 MiB window leaves ~6 MB more guest RAM touched); none 12.6 MB 0.94 s
# but ~8 MB more host memory per VM. lz4 (legacy frame, -12), measured later with Hull's
# patched kernel (docs/performance.md, median of 10 interleaved): gzip 5.1 MB 1.51 s,
# lz4 5.96 MB 1.35 s, none 12.5 MB 1.30 s (`hull run /bin/true`). lz4 is the default:
# nearly the boot time of none within the 6 MB target; it needs CONFIG_RD_LZ4 in the kernel.
COMPRESSIONS = ("gzip", "lz4", "zstd", "none")
#: The external compressor of each compression gzip's stdlib module does not cover. The
#: kernel's unlz4 only reads the legacy frame format (-l).
_COMPRESSORS = {"zstd": ("zstd", "-19", "-q", "-c"), "lz4": ("lz4", "-l", "-12", "-q", "-c")}
DEFAULT_COMPRESSION = "lz4"

INIT = f"""#!{GUEST_PYTHON} -S
# Hull guest init (PID 1): the agent, from the sourceless .pyc under {GUEST_HULL}.
from time import monotonic

started = monotonic()  # for the boot profile: when python was up and running /init
import sys

sys.path[0] = "{GUEST_HULL}"
from hull.agent.main import main

sys.exit(main(started=started))
"""
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
EMPTY_DIRS = ("dev", "proc", "sys", "sys/fs/cgroup", "run", "etc", "root")

Progress = Callable[[str, str], None]  # (phase, message)


def _quiet(phase: str, message: str) -> None:
    pass


# --- identity: what the image is built from ---------------------------------------------


def hull_package_dir() -> Path:
    return Path(hull.__file__).parent


def agent_sources(package_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, file) of every hull source in the image, sorted: hull/__init__.py,
    hull/agentapi/**.py, hull/agent/**.py of the installed hull package."""
    pkg = package_dir or hull_package_dir()
    files = [pkg / "__init__.py"]
    for part in AGENT_PARTS:
        files += [p for p in (pkg / part).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted((f"hull/{p.relative_to(pkg).as_posix()}", p) for p in files if p.is_file())


def agent_hash(package_dir: Path | None = None) -> str:
    """sha256 over the relative paths and contents of :func:`agent_sources`.

    The runtime compares it with the current image's manifest to tell a stale image.
    """
    digest = hashlib.sha256()
    for rel, path in agent_sources(package_dir):
        data = path.read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def image_key(agent: str, packages: Mapping[str, str], arch: str, kernel_key: str | None,
              compression: str, init_override: str | None = None,
              busybox: str | None = None) -> str:
    recipe: dict[str, object] = {
        "recipe": BUILD_RECIPE_VERSION, "agent_hash": agent, "arch": arch,
        "packages": dict(sorted(packages.items())), "kernel_key": kernel_key,
        "compression": compression,
    }
    if init_override is not None:
        recipe["init_override"] = hashlib.sha256(init_override.encode()).hexdigest()
    if busybox is not None:
        recipe["busybox"] = busybox
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class KernelModules:
    kernel_key: str | None  # the current kernel's key when its modules go into the image
    files: tuple[Path, ...]  # in load order


def check_kernel_unpacks(store: AssetStore, compression: str, arch: str | None = None) -> None:
    """AssetError when the current kernel cannot unpack an initrd of ``compression``
    (a kernel without its CONFIG_RD_* panics at boot, far from the cause)."""
    if compression in ("none", "gzip"):  # every kernel Hull builds or fetches has gzip
        return
    kernel = store.current(KERNEL, arch)
    config = kernel.path / "config" if kernel else None
    if kernel is None or config is None or not config.is_file():
        return  # no kernel yet: `hull check` and the runtime report that
    symbol = f"CONFIG_RD_{compression.upper()}=y"
    if symbol not in config.read_text().splitlines():
        raise AssetError(f"the current kernel {kernel.key[:16]} cannot unpack a {compression} "
                         f"initrd ({symbol} is not in {config}): rebuild it with "
                         "`hull kernel build`, or use another --compression")


def kernel_modules(store: AssetStore, arch: str | None = None) -> KernelModules:
    """The current kernel's modules when it is a Debian kernel (a built one has none).

    ``arch``: the guest architecture (Debian name) whose current kernel counts.
    """
    kernel = store.current(KERNEL, arch)
    if kernel is None or kernel.manifest.get("flavor") != "debian":
        return KernelModules(None, ())
    names = kernel.manifest.get("modules") or []
    files = tuple(kernel.path / "modules" / str(n) for n in names)
    for f in files:
        if not f.is_file():
            raise AssetError(f"kernel {kernel.key} lists module {f.name} but {f} is missing")
    return KernelModules(kernel.key, files)


# --- status, for hull check and the runtime ---------------------------------------------


@dataclass(frozen=True)
class ImageStatus:
    asset: Asset | None
    stale: bool
    reason: str  # why it is stale; "" when current

    @property
    def initrd(self) -> Path | None:
        return self.asset.path / "initrd.img" if self.asset else None


def current_image_status(config: Config) -> ImageStatus:
    """Whether the current image matches the installed agent sources and current kernel.

    The image and kernel of the configured guest architecture (hypervisor.machine_type).
    Cheap (no apt, no network): package updates are only noticed by ``hull image build``.
    """
    store = AssetStore(config.asset_dir)
    arch = debian_arch(config.hypervisor.arch)
    asset = store.current(IMAGE, arch)
    if asset is None:
        return ImageStatus(None, True, "no image has been built (run hull image build)")
    m = asset.manifest
    reason = ""
    if not (asset.path / "initrd.img").is_file():
        reason = f"{asset.path / 'initrd.img'} is missing"
    elif m.get("recipe") != BUILD_RECIPE_VERSION:
        reason = "it was built by another version of hull"
    elif m.get("agent_hash") != agent_hash():
        reason = "the agent sources changed since it was built"
    elif m.get("init_override"):
        reason = "it is a test image with another /init"
    else:
        try:
            kernel_key = kernel_modules(store, arch).kernel_key
        except AssetError as exc:
            kernel_key, reason = None, str(exc)
        if not reason and m.get("kernel_key") != kernel_key:
            reason = "the current kernel's modules are not the ones in the image"
    return ImageStatus(asset, bool(reason), reason)


# --- build ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    asset: Asset
    built: bool  # False: an up-to-date image was already there


def build_image(config: Config, *, arch: str | None = None, force: bool = False,
                compression: str = DEFAULT_COMPRESSION, init_override: str | None = None,
                publish: bool = True, progress: Progress = _quiet,
                with_busybox: bool = False) -> BuildResult:
    """Build (or find up to date) the guest image and make it current.

    ``with_busybox`` adds the host's static busybox as /bin/busybox: the shell and tools
    of `hull debug` (the image has none otherwise).

    ``init_override`` replaces /init with the given text: for boot tests only, never
    published unless asked, and marked in the manifest so the runtime refuses it as stale.
    """
    if compression not in COMPRESSIONS:
        raise AssetError(f"unknown compression {compression}: use one of {', '.join(COMPRESSIONS)}")
    if sys.version_info[:2] != PYTHON_VERSION:
        raise AssetError(f"building the image needs python {PYTHON_VERSION[0]}."
                         f"{PYTHON_VERSION[1]} to compile its .pyc, not {sys.version.split()[0]}")
    arch = debian_arch(arch) if arch else debs.host_arch()
    info = debs.arch_info(arch)
    store = AssetStore(config.asset_dir)
    kmods = kernel_modules(store, arch)
    check_kernel_unpacks(store, compression, arch)
    agent = agent_hash()
    apt = debs.Apt(arch)
    if with_busybox and arch != debs.host_arch():
        raise AssetError(f"--with-busybox copies the host's {BUSYBOX}, which cannot run in "
                         f"an {arch} guest: build the {arch} image without it")
    busybox = busybox_hash() if with_busybox else None

    progress("resolve", f"package versions for {arch}")
    current = store.current(IMAGE, arch)
    names = BASE_PACKAGES
    if current and current.manifest.get("arch") == arch and current.manifest.get("packages"):
        names = tuple(current.manifest["packages"])
    versions = {n: p.version for n, p in apt.show(names).items()}
    key = image_key(agent, versions, arch, kmods.kernel_key, compression, init_override,
                    busybox)
    existing = store.get(IMAGE, key)
    if not force and existing and (existing.path / "initrd.img").is_file():
        if publish and (current is None or current.key != key):
            store.publish(IMAGE, key, arch)
        return BuildResult(existing, built=False)

    with tempfile.TemporaryDirectory(prefix="hull-image-") as tmp:
        work = Path(tmp)
        pset = debs.PackageSet(apt, debs.DebCache(config.asset_dir / "debs", apt),
                               debs.PackageTree(work / "pkgs"), info.triplet, progress)
        staged = _stage(pset, work, info.machine, kmods, init_override, progress)
        if with_busybox:
            progress("busybox", f"{BUSYBOX} as /bin/busybox")
            dest = work / "root" / "bin" / "busybox"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(BUSYBOX, dest)
            dest.chmod(0o755)
        packages = {n: pset.packages[n].version for n in sorted(staged.packages)}
        agent = staged.agent_hash  # of the files staged, should they have changed meanwhile
        key = image_key(agent, packages, arch, kmods.kernel_key, compression, init_override,
                        busybox)
        if arch == debs.host_arch():
            progress("verify", "importing the agent in a chroot of the image")
            verify_imports(work / "root", staged.import_check)
        else:
            progress("verify", f"skipped: cannot run {arch} binaries on this host")

        progress("pack", "newc cpio")
        entries = cpio.with_parents([*cpio.tree_entries(work / "root"),
                                     cpio.char_device("dev/console", 5, 1)])
        raw = work / "initrd.cpio"
        with raw.open("wb") as out:
            raw_size = cpio.write(out, entries)
        progress("compress", f"{compression} of {raw_size / 1e6:.1f} MB")
        data = compress(raw.read_bytes(), compression)

        with store.building(IMAGE, key) as out_dir:
            (out_dir / "initrd.img").write_bytes(data)
            manifest = {
                "key": key, "agent_hash": agent, "kernel_key": kmods.kernel_key,
                "python": _upstream_version(pset.packages[BASE_PACKAGES[0]].version),
                "packages": packages, "arch": arch, "size": len(data), "raw_size": raw_size,
                "files": sum(1 for e in entries if e.kind != stat.S_IFDIR),
                "compression": compression, "recipe": BUILD_RECIPE_VERSION,
                "python_modules": staged.modules.names,
                "kernel_modules": [f.name for f in kmods.files],
                "init_override": init_override is not None,
                "busybox": with_busybox,
            }
            store.write_manifest(out_dir, manifest)
    if publish:
        store.publish(IMAGE, key, arch)
    asset = store.get(IMAGE, key)
    assert asset is not None
    return BuildResult(asset, built=True)


#: The host's static busybox (Debian's busybox-static), copied in by --with-busybox.
BUSYBOX = Path("/bin/busybox")


def busybox_hash() -> str:
    try:
        return hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
    except OSError as exc:
        raise AssetError(f"--with-busybox needs {BUSYBOX} ({exc.strerror}): "
                         "apt-get install busybox-static") from exc


@dataclass(frozen=True)
class _Staged:
    agent_hash: str
    modules: ModuleSet
    packages: frozenset[str]  # the packages files were taken from
    import_check: list[str]  # module names the chroot check imports


def _stage(pset: debs.PackageSet, work: Path, machine: int, kmods: KernelModules,
           init_override: str | None, progress: Progress) -> _Staged:
    """Fill ``work/root`` with the image's tree (all but device nodes)."""
    tree = pset.tree
    pset.add(BASE_PACKAGES)

    progress("trim", "finding the stdlib modules the agent imports")
    hull_src = work / "hullsrc"
    sources = agent_sources()
    for rel, path in sources:
        (hull_src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, hull_src / rel)
    stdlib = tree.host(GUEST_STDLIB)
    modules = find_modules(stdlib, hull_src, pset.triplet, PYTHON_VERSION)

    progress("libraries", "resolving ELF dependencies")
    ext_guest = [f"{GUEST_STDLIB}/{p.relative_to(stdlib).as_posix()}"
                 for p in modules.extensions.values()]
    libs = pset.library_closure([GUEST_PYTHON, *ext_guest], machine, DLOPENED)

    root = work / "root"
    for guest in sorted(libs):
        dest = root / guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = tree.host(guest)
        if src.is_symlink():
            dest.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dest)

    progress("compile", f"{len(modules.sources)} stdlib modules, {len(sources)} hull files")
    used = {tree.owner[g] for g in libs}
    for src in modules.sources.values():
        rel = src.relative_to(stdlib).as_posix()
        used.add(tree.owner[f"{GUEST_STDLIB}/{rel}"])
        compile_to(src, root / GUEST_STDLIB.lstrip("/") / (rel[:-3] + ".pyc"),
                   f"{GUEST_STDLIB}/{rel}")
    for rel, path in sources:
        compile_to(path, root / GUEST_HULL.lstrip("/") / (rel[:-3] + ".pyc"),
                   f"{GUEST_HULL}/{rel}")

    _write(root / "init", init_override if init_override is not None else INIT, 0o755)
    _write(root / "etc/passwd", PASSWD)
    _write(root / "etc/group", GROUP)
    for d in EMPTY_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    if kmods.files:
        mod_dir = root / GUEST_MODULES.lstrip("/")
        mod_dir.mkdir(parents=True)
        for f in kmods.files:
            shutil.copyfile(f, mod_dir / f.name)
        _write(mod_dir / "modules.order", "".join(f"{f.name}\n" for f in kmods.files))

    hull_modules = package_modules(hull_src)
    return _Staged(agent_hash(hull_src / "hull"), modules, frozenset(used),
                   [*modules.names, *hull_modules])


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _upstream_version(debian_version: str) -> str:
    m = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", debian_version)
    return m.group(1) if m else debian_version


def verify_imports(root: Path, modules: list[str]) -> None:
    """Import every module with the image's own python, chrooted into the staged tree.

    Only the files in the image are visible, so an import the trimming got wrong fails
    here instead of in the guest. The environment is the one the kernel gives init.
    """
    chroot = shutil.which("chroot", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if chroot is None:
        raise AssetError("cannot verify the image: chroot (coreutils) is not installed")
    argv = [chroot, str(root), GUEST_PYTHON, "-S", "-c",
            f"import sys\nsys.path[0] = {GUEST_HULL!r}\n"
            f"for name in {modules!r}:\n    __import__(name)\n"]
    if os.geteuid() != 0:  # an unprivileged user may still chroot in its own user namespace
        argv = ["unshare", "--map-root-user", *argv]
    env = {"HOME": "/", "TERM": "linux", "PYTHONHASHSEED": "0"}
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(f"cannot verify the image in a chroot of {root}: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        raise AssetError("the image's python cannot import the agent: "
                         + (lines[-1] if lines else f"exit status {proc.returncode}"))


def compress(data: bytes, method: str) -> bytes:
    """Compress as the kernel's initramfs unpacker expects (CONFIG_RD_GZIP, _LZ4, _ZSTD)."""
    if method == "none":
        return data
    if method == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    argv = _COMPRESSORS[method]
    if shutil.which(argv[0]) is None:
        raise AssetError(f"{argv[0]} is not installed (apt-get install {argv[0]})")
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssetError(f"`{' '.join(argv)}` failed: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
