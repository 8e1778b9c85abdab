"""Debian packages for the guest image: look up, download (cached), extract, and find libraries.

The guest's Python comes from Debian packages, never from the host's filesystem, so the
image does not depend on what happens to be installed here and an arm64 image can be built
on an amd64 host (``apt-get download pkg:arm64`` after ``dpkg --add-architecture arm64``).

Which package provides a library is found the way Debian itself records it: dpkg-shlibdeps
puts the provider of every DT_NEEDED soname into the requiring package's Depends, so the
candidates for a missing soname are the requirer's dependencies, tried in the order the
library package naming policy suggests (libffi.so.8 -> libffi8) until one provides it.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hull.errors import AssetError
from hull.image.elf import EM_AARCH64, EM_X86_64, read_elf

Progress = Callable[[str, str], None]  # (phase, message)


@dataclass(frozen=True)
class ArchInfo:
    triplet: str  # Debian multiarch tuple: the directory name under /lib and /usr/lib
    machine: int  # ELF e_machine of its binaries


ARCHES = {
    "amd64": ArchInfo("x86_64-linux-gnu", EM_X86_64),
    "arm64": ArchInfo("aarch64-linux-gnu", EM_AARCH64),
}


def host_arch() -> str:
    return run(["dpkg", "--print-architecture"]).strip()


def arch_info(arch: str) -> ArchInfo:
    if arch in ARCHES:
        return ARCHES[arch]
    triplet = run(["dpkg-architecture", "-a", arch, "-qDEB_HOST_MULTIARCH"]).strip()
    raise AssetError(f"architecture {arch} ({triplet}) is not supported for guest images")


def run(argv: Sequence[str], cwd: Path | None = None) -> str:
    """Run a command; its failure becomes an AssetError naming it, with its last error line."""
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise AssetError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise AssetError(f"{' '.join(argv[:3])} failed: {detail}")
    return proc.stdout


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    depends: tuple[str, ...] = ()  # names in Pre-Depends and Depends, alternatives included

    @property
    def deb_name(self) -> str:
        """The file name apt gives the package (an epoch's ':' is written '%3a')."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


class Apt:
    """apt-cache and apt-get for one architecture (the host's package lists)."""

    def __init__(self, arch: str) -> None:
        self.arch = arch

    def show(self, names: Iterable[str], strict: bool = True) -> dict[str, Package]:
        """The candidate version of each package apt knows (all of them, when ``strict``)."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        proc = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", *(f"{n}:{self.arch}" for n in wanted)],
            capture_output=True, text=True, check=False)
        found = {p.name: p for p in parse_control(proc.stdout) if p.name in wanted}
        missing = [n for n in wanted if n not in found]
        if missing and strict:
            hint = "run apt-get update"
            if self.arch != host_arch():
                hint = f"run dpkg --add-architecture {self.arch} and apt-get update"
            raise AssetError(f"apt knows no package {', '.join(missing)} for {self.arch} ({hint})")
        return found

    def download(self, pkg: Package, dest: Path) -> None:
        run(["apt-get", "download", "-q", f"{pkg.name}:{self.arch}={pkg.version}"], cwd=dest)


def parse_control(text: str) -> list[Package]:
    """Package stanzas of ``apt-cache show`` output."""
    packages = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields and "Version" in fields:
            deps = ", ".join(filter(None, (fields.get("Pre-Depends"), fields.get("Depends"))))
            packages.append(Package(fields["Package"], fields["Version"],
                                    fields.get("Architecture", ""), dependency_names(deps)))
    return packages


def dependency_names(depends: str) -> tuple[str, ...]:
    """``a (>= 1), b | c:any`` -> (a, b, c)."""
    names = []
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ")[0].split(":")[0]
        if name and name not in names:
            names.append(name)
    return tuple(names)


class DebCache:
    """Downloaded .debs under ``<asset_dir>/debs``, named name_version_arch.deb like apt does."""

    def __init__(self, root: Path, apt: Apt) -> None:
        self.root = root
        self.apt = apt

    def fetch(self, pkg: Package) -> tuple[Path, bool]:
        """The package's .deb, and whether it had to be downloaded."""
        path = self.root / pkg.deb_name
        if path.is_file():
            return path, False
        tmp = self.root / f".download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            self.apt.download(pkg, tmp)
            debs = list(tmp.glob("*.deb"))
            if len(debs) != 1:
                raise AssetError(f"apt-get download {pkg.name} left {len(debs)} files in {tmp}")
            os.replace(debs[0], path)
        except OSError as exc:
            raise AssetError(f"cannot store {pkg.deb_name} in {self.root}: {exc.strerror}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path, True


class PackageTree:
    """Extracted packages merged as the guest would see them, with each file's owner.

    Each package is extracted (``dpkg-deb -x``) into ``<root>/pkgs/<name>`` and hard-linked
    into ``<root>/merged``; a guest path ``/usr/bin/x`` is ``<root>/merged/usr/bin/x``.
    Symlinks are resolved against the merged tree, never against the host.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.merged = root / "merged"
        self.merged.mkdir(parents=True, exist_ok=True)
        self.owner: dict[str, str] = {}  # guest path of every file and symlink -> package

    def host(self, guest: str) -> Path:
        return self.merged / guest.lstrip("/")

    def add(self, name: str, deb: Path) -> None:
        dest = self.root / "pkgs" / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(dest)])
        for dirpath, dirnames, filenames in os.walk(dest):
            base = Path(dirpath)
            rel = base.relative_to(dest).as_posix()
            rel_dir = "/" if rel == "." else f"/{rel}"
            for sub in dirnames + filenames:
                src = base / sub
                guest = posixpath.join(rel_dir, sub)
                target = self.host(guest)
                if src.is_symlink() or not src.is_dir():
                    if guest in self.owner:
                        raise AssetError(f"{guest} is in both {self.owner[guest]} and {name}")
                    self.owner[guest] = name
                    if src.is_symlink():
                        target.symlink_to(os.readlink(src))
                    else:
                        os.link(src, target)
                elif not target.is_dir():
                    target.mkdir()

    def resolve(self, guest: str) -> list[str] | None:
        """The guest paths met while opening ``guest``: each symlink, then the file itself.

        None if it does not exist. Every entry of the list must go into the image for the
        path to work there.
        """
        chain: list[str] = []
        path = _absolute(guest)
        for _ in range(40):
            parts = path.strip("/").split("/")
            for i in range(len(parts)):
                current = "/" + "/".join(parts[: i + 1])
                host = self.host(current)
                if host.is_symlink():
                    link = os.readlink(host)
                    base = link if link.startswith("/") else posixpath.join(
                        posixpath.dirname(current), link)
                    chain.append(current)
                    path = _absolute(posixpath.join(base, *parts[i + 1:]))
                    break
                if not host.exists():
                    return None
            else:
                return [*chain, path]
        raise AssetError(f"too many levels of symbolic links resolving {guest}")


def _absolute(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/"))  # normpath would keep a leading "//"


SONAME = re.compile(r"^(?P<stem>.+?)\.so(?:\.(?P<version>[0-9.]+))?$")
# Library packages not named by the policy (libz.so.1 is in zlib1g; glibc's are in libc6).
PROVIDER_ALIASES = {"libz": "zlib1g", "libc": "libc6", "libm": "libc6", "libdl": "libc6",
                    "libpthread": "libc6", "librt": "libc6", "libutil": "libc6"}


def policy_package(soname: str) -> str:
    """The package name Debian policy 8.1 gives a library: libfoo.so.8 -> libfoo8."""
    m = SONAME.match(soname)
    if not m:
        return soname
    stem, version = m.group("stem"), (m.group("version") or "").split(".")[0]
    if stem in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[stem]
    sep = "-" if stem[-1:].isdigit() else ""
    return f"{stem}{sep}{version}".lower().replace("_", "-")


@dataclass
class PackageSet:
    """The packages one build fetched, and the library resolution over them."""

    apt: Apt
    cache: DebCache
    tree: PackageTree
    triplet: str
    progress: Progress
    packages: dict[str, Package] = field(default_factory=dict)
    downloaded: int = 0
    _shown: dict[str, Package | None] = field(default_factory=dict)  # apt-cache answers

    def add(self, names: Iterable[str]) -> None:
        """Download (or take from the cache) the candidate versions, then extract them."""
        todo = [n for n in names if n not in self.packages]
        fetched = [self._fetch(pkg, "download") for pkg in self.apt.show(todo).values()]
        for pkg, deb in fetched:
            self._extract(pkg, deb, "extract")

    def _fetch(self, pkg: Package, phase: str) -> tuple[Package, Path]:
        deb, downloaded = self.cache.fetch(pkg)
        self.downloaded += downloaded
        self.progress(phase, f"{pkg.deb_name}{'' if downloaded else ' (cached)'}")
        return pkg, deb

    def _extract(self, pkg: Package, deb: Path, phase: str) -> None:
        self.progress(phase, f"extracting {pkg.deb_name}")
        self.tree.add(pkg.name, deb)
        self.packages[pkg.name] = pkg

    def search_dirs(self, runpath: Sequence[str], origin: str) -> list[str]:
        # Debian's ld.so without an ld.so.cache: RUNPATH, then the multiarch and plain dirs.
        own = [p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for p in runpath]
        t = self.triplet
        return [*own, f"/lib/{t}", f"/usr/lib/{t}", "/lib", "/usr/lib"]

    def find_library(self, soname: str, dirs: Sequence[str]) -> list[str] | None:
        for d in dirs:
            chain = self.tree.resolve(posixpath.join(d, soname))
            if chain:
                return chain
        return None

    def provide(self, soname: str, requirer: str) -> bool:
        """Fetch the requirer's dependencies, likeliest first, until one has ``soname``."""
        pkg = self.packages.get(requirer)
        if pkg is None:
            return False
        policy = policy_package(soname)
        m = SONAME.match(soname)
        stem = (m.group("stem") if m else soname).replace("_", "-")

        def rank(p: Package) -> tuple[int, str]:
            return (0 if p.name == policy else 1 if p.name.startswith(stem) else 2, p.name)

        # Virtual packages and alternatives apt does not have are simply not candidates.
        unknown = [d for d in pkg.depends if d not in self._shown]
        found = self.apt.show(unknown, strict=False)
        self._shown.update({d: found.get(d) for d in unknown})
        candidates = [p for d in pkg.depends if (p := self._shown[d]) and d not in self.packages]
        for candidate in sorted(candidates, key=rank):
            self._extract(*self._fetch(candidate, "libraries"), "libraries")
            if self.find_library(soname, self.search_dirs((), "/")):
                return True
        return False

    def library_closure(self, roots: Iterable[str], machine: int,
                        dlopened: Iterable[tuple[str, str]] = ()) -> set[str]:
        """Every guest path the ELF files ``roots`` need to load, roots included.

        ``dlopened`` holds (soname, requiring soname) pairs: libraries a library in the
        closure dlopen()s at run time without a DT_NEEDED entry (glibc's libgcc_s.so.1).
        """
        needed: set[str] = set()
        queue = list(roots)
        pending = list(dlopened)
        while queue or pending:
            if not queue:
                soname, requirer = pending.pop(0)
                users = sorted(p for p in needed if posixpath.basename(p) == requirer)
                if users:
                    queue.append(self._locate(soname, users[0], ()))
                continue
            path = queue.pop()
            chain = self.tree.resolve(path)
            if chain is None:
                raise AssetError(f"{path} is in none of the packages {', '.join(self.packages)}")
            if chain[-1] in needed:
                needed.update(chain)
                continue
            needed.update(chain)
            info = read_elf(self.tree.host(chain[-1]))
            if info.machine != machine:
                raise AssetError(f"{chain[-1]} is for elf machine {info.machine}, not {machine}")
            if info.interp:
                queue.append(info.interp)
            for soname in info.needed:
                queue.append(self._locate(soname, chain[-1], info.runpath))
        return needed

    def _locate(self, soname: str, requirer: str, runpath: Sequence[str]) -> str:
        dirs = self.search_dirs(runpath, posixpath.dirname(requirer))
        chain = self.find_library(soname, dirs)
        owner = self.tree.owner.get(requirer, "")
        if chain is None and self.provide(soname, owner):
            chain = self.find_library(soname, dirs)
        if chain is None:
            raise AssetError(f"cannot find {soname} (needed by {requirer} from {owner}) "
                             f"in {owner}'s dependencies")
        return chain[0]
