"""The "newc" cpio format the kernel unpacks an initramfs from, written deterministically.

Written here rather than by cpio(1) for two reasons: the archive must hold device nodes
(``/dev/console``: without it the kernel starts init with no fds 0/1/2) even when the
builder is not root and cannot mknod them, and every build of the same tree must give the
same bytes (fixed mtime, uid/gid 0, sorted names, inode numbers by position).

Format (linux Documentation/driver-api/early-userspace/buffer-format.rst): per entry a
110-byte ASCII header "070701" + 13 eight-digit hex fields, the NUL-terminated name padded
to a multiple of 4 (counting the header), then the data padded to a multiple of 4; the
archive ends with an entry named "TRAILER!!!".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


@dataclass(frozen=True)
class Entry:
    name: str  # relative to the archive root, no leading "/" (e.g. "usr/bin/python3.11")
    mode: int  # full st_mode: type bits | permission bits
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def tree_entries(root: Path) -> Iterator[Entry]:
    """The directories, regular files and symlinks under ``root`` (not root itself).

    Permissions are normalised (0755 for directories and executables, 0644 otherwise) so
    the archive does not depend on the builder's umask; other file types are refused.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                yield symlink(rel, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                yield directory(rel, 0o1777 if st.st_mode & stat.S_ISVTX else 0o755)
            elif stat.S_ISREG(st.st_mode):
                yield file(rel, path.read_bytes(), 0o755 if st.st_mode & 0o111 else 0o644)
            else:
                raise ValueError(f"{path}: unsupported file type for the image")


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Sorted by name, each preceded by its parent directories (added if missing)."""
    by_name = {e.name: e for e in entries}
    for name in list(by_name):
        parent = os.path.dirname(name)
        while parent and parent not in by_name:
            by_name[parent] = directory(parent)
            parent = os.path.dirname(parent)
    # Sorting names as path component lists puts every directory before its contents.
    return [by_name[n] for n in sorted(by_name, key=lambda n: n.split("/"))]


def write(out: BinaryIO, entries: Iterable[Entry], mtime: int = 0) -> int:
    """Write ``entries`` in the given order plus the trailer; returns the bytes written."""
    written = 0
    for ino, entry in enumerate(entries, start=1):
        nlink = 2 if entry.kind == stat.S_IFDIR else 1
        written += _write_one(out, entry.name, entry.mode, entry.data, entry.rdev, ino, nlink,
                              mtime)
    written += _write_one(out, TRAILER, 0, b"", (0, 0), 0, 1, 0)
    return written


def _write_one(out: BinaryIO, name: str, mode: int, data: bytes, rdev: tuple[int, int],
               ino: int, nlink: int, mtime: int) -> int:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    header = MAGIC + b"".join(b"%08X" % f for f in fields)
    chunk = header + raw_name + _pad(HEADER_SIZE + len(raw_name)) + data + _pad(len(data))
    out.write(chunk)
    return len(chunk)


def read(data: bytes) -> list[Entry]:
    """Parse a newc archive (uncompressed) back into entries, trailer excluded."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        pos += HEADER_SIZE
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize + len(_pad(HEADER_SIZE + namesize))
        if name == TRAILER:
            return entries
        body = data[pos:pos + size]
        pos += size + len(_pad(size))
        entries.append(Entry(name, mode, body, rdev))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
