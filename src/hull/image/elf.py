"""Just enough of an ELF reader to find what a binary needs at load time.

Reads the program headers the way the dynamic loader does (PT_INTERP, PT_DYNAMIC, and the
PT_LOAD segments to map DT_STRTAB's address to a file offset), so it works for stripped
files, both classes and both byte orders: the image builder uses it on the guest's
Python, its extension modules and their libraries, whatever the guest architecture.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from hull.errors import AssetError

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 14, 15, 29

EM_X86_64 = 62
EM_AARCH64 = 183


@dataclass(frozen=True)
class ElfInfo:
    machine: int
    interp: str | None  # PT_INTERP, the loader the kernel maps: /lib64/ld-linux-x86-64.so.2
    needed: tuple[str, ...]  # DT_NEEDED sonames, in order
    soname: str | None
    runpath: tuple[str, ...]  # DT_RUNPATH (or DT_RPATH), split on ':'


def read_elf(path: Path) -> ElfInfo:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AssetError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return parse_elf(data)
    except (struct.error, IndexError, ValueError) as exc:
        raise AssetError(f"{path} is not a valid elf file: {exc}") from exc


def parse_elf(data: bytes) -> ElfInfo:
    if data[:4] != b"\x7fELF":
        raise ValueError("bad magic")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise ValueError(f"unknown class {ei_class} or byte order {ei_data}")
    is64 = ei_class == 2
    end = "<" if ei_data == 1 else ">"
    header = struct.unpack_from(end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH"), data, 16)
    machine, phoff, phentsize, phnum = header[1], header[4], header[8], header[9]

    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(phnum):
        off = phoff + i * phentsize
        if is64:
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                end + "IIQQQQ", data, off)
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                end + "IIIII", data, off)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == PT_INTERP:
            interp = _cstr(data, p_offset)

    if dynamic is None:  # static executable
        return ElfInfo(machine, interp, (), None, ())

    entries: list[tuple[int, int]] = []
    fmt, size = (end + "qQ", 16) if is64 else (end + "iI", 8)
    d_off, d_size = dynamic
    for pos in range(d_off, d_off + d_size, size):
        tag, val = struct.unpack_from(fmt, data, pos)
        if tag == DT_NULL:
            break
        entries.append((tag, val))

    strtab_addr = next((val for tag, val in entries if tag == DT_STRTAB), None)
    if strtab_addr is None:
        raise ValueError("dynamic section without DT_STRTAB")
    strtab = _vaddr_to_offset(strtab_addr, loads)

    def string(tag: int) -> list[str]:
        return [_cstr(data, strtab + val) for t, val in entries if t == tag]

    runpath = string(DT_RUNPATH) or string(DT_RPATH)
    sonames = string(DT_SONAME)
    return ElfInfo(
        machine=machine,
        interp=interp,
        needed=tuple(string(DT_NEEDED)),
        soname=sonames[0] if sonames else None,
        runpath=tuple(p for entry in runpath for p in entry.split(":") if p),
    )


def _vaddr_to_offset(vaddr: int, loads: list[tuple[int, int, int]]) -> int:
    for seg_vaddr, seg_offset, seg_filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_filesz:
            return seg_offset + (vaddr - seg_vaddr)
    raise ValueError(f"address {vaddr:#x} is in no PT_LOAD segment")


def _cstr(data: bytes, offset: int) -> str:
    end = data.index(b"\0", offset)
    return data[offset:end].decode("utf-8", "surrogateescape")
