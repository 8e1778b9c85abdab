"""The one seam between the agent and the kernel calls Python 3.11's ``os`` lacks.

Thin ctypes wrappers over libc: each raises :class:`OSError` (with errno and the path
concerned) on failure, like the ``os`` functions do. Everything is Linux-specific; the
syscall numbers that glibc has no wrapper for are per architecture (x86_64, aarch64).
"""

from __future__ import annotations

import ctypes
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_c_str = ctypes.c_char_p
_c_ulong = ctypes.c_ulong
_c_int = ctypes.c_int
_c_long = ctypes.c_long

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000
MNT_DETACH = 0x2

CLONE_NEWUSER = 0x10000000

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/reboot.h>
RB_POWER_OFF = 0x4321FEDC

# ioctls (asm-generic numbering, shared by x86_64 and aarch64)
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MODULE_INIT_COMPRESSED_FILE = 4

#: Raw syscall numbers, by ``uname -m``: x86_64's <asm/unistd_64.h>, and aarch64's, which
#: is the generic table (<asm-generic/unistd.h>). Only for calls glibc has no wrapper for
#: (everything else goes through libc's own wrappers, which know their architecture).
SYSCALL_NUMBERS = {
    "x86_64": {"finit_module": 313, "seccomp": 317, "capset": 126, "pidfd_open": 434,
               "pidfd_getfd": 438},
    "aarch64": {"finit_module": 273, "seccomp": 277, "capset": 91, "pidfd_open": 434,
                "pidfd_getfd": 438},
}
MACHINE = os.uname().machine


def _nr(name: str, machine: str = MACHINE) -> int:
    try:
        return SYSCALL_NUMBERS[machine][name]
    except KeyError:
        raise OSError(38, f"{name}: no syscall number for {machine}") from None  # ENOSYS


def _fs(path: str | bytes | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _check(result: int, what: str, path: str | bytes | None = None) -> int:
    """OSError with errno set and one lower-case line as its text ("mount proc /x: ...")."""
    if result < 0:
        err = ctypes.get_errno()
        where = "" if path is None else " " + os.fsdecode(path)
        raise OSError(err, f"{what}{where}: {strerror(err)}")
    return result


def strerror(err: int) -> str:
    text = os.strerror(err)
    return text[:1].lower() + text[1:]


_libc.mount.argtypes = (_c_str, _c_str, _c_str, _c_ulong, _c_str)
_libc.umount2.argtypes = (_c_str, _c_int)
_libc.unshare.argtypes = (_c_int,)
_libc.setns.argtypes = (_c_int, _c_int)
_libc.pivot_root.argtypes = (_c_str, _c_str)
_libc.sethostname.argtypes = (_c_str, ctypes.c_size_t)
_libc.setdomainname.argtypes = (_c_str, ctypes.c_size_t)
_libc.reboot.argtypes = (_c_int,)
_libc.prctl.argtypes = (_c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong)
_libc.syscall.restype = _c_long


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_fs(source), _fs(target), _fs(fstype), flags, _fs(data)),
           f"mount {fstype or 'bind'}", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_fs(target), flags), "umount", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.pivot_root(_fs(new_root), _fs(put_old)), "pivot_root", new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname")


def prctl(option: int, arg2: int = 0) -> None:
    _check(_libc.prctl(option, arg2, 0, 0, 0), "prctl")


def prctl3(option: int, arg2: int, arg3: int) -> None:
    _check(_libc.prctl(option, arg2, arg3, 0, 0), "prctl")


_CAP_VERSION_3 = 0x20080522


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of the calling thread, 64-bit masks (two 32-bit data structs)."""
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = struct.pack("=6I", effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF,
                       inheritable & 0xFFFFFFFF, effective >> 32, permitted >> 32,
                       inheritable >> 32)
    _check(_libc.syscall(_c_long(_nr("capset")), _c_str(header), _c_str(data)), "capset")


def seccomp_filter(program: bytes, flags: int) -> None:
    """Install a classic BPF program (struct sock_filter[]) as this thread's filter."""
    buf = ctypes.create_string_buffer(program, len(program))

    class _Fprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    prog = _Fprog(len(program) // 8, ctypes.addressof(buf))
    set_mode_filter = 1
    _check(_libc.syscall(_c_long(_nr("seccomp")), _c_int(set_mode_filter), _c_ulong(flags),
                         ctypes.byref(prog)), "seccomp")


def personality(persona: int) -> None:
    _libc.personality.argtypes = (_c_ulong,)
    _check(_libc.personality(persona), "personality")


def reboot(cmd: int) -> None:
    _check(_libc.reboot(cmd), "reboot")


def finit_module(fd: int, flags: int = 0) -> None:
    _check(_libc.syscall(_c_long(_nr("finit_module")), _c_int(fd), _c_str(b""), _c_int(flags)),
           "finit_module")


def init_module(image: bytes) -> None:
    _libc.init_module.argtypes = (_c_str, _c_ulong, _c_str)
    _check(_libc.init_module(image, len(image), b""), "init_module")


def pidfd_getfd(pid: int, targetfd: int) -> int:
    """A duplicate of another process's fd (Linux 5.6+; needs ptrace rights over it)."""
    pidfd = _check(_libc.syscall(_c_long(_nr("pidfd_open")), _c_int(pid), _c_int(0)),
                   "pidfd_open")
    try:
        return _check(_libc.syscall(_c_long(_nr("pidfd_getfd")), _c_int(pidfd), _c_int(targetfd),
                                    _c_int(0)), "pidfd_getfd")
    finally:
        os.close(pidfd)


def inet_dgram_socket() -> int:
    """An AF_INET datagram socket fd, for interface ioctls."""
    af_inet, sock_dgram, sock_cloexec = 2, 2, 0o2000000
    return _check(_libc.socket(af_inet, sock_dgram | sock_cloexec, 0), "socket")


# RLIMIT_* numbers of <asm-generic/resource.h>; the resource module is avoided (import cost).
RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
    "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
    "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}


class _Rlimit(ctypes.Structure):
    _fields_ = (("cur", ctypes.c_uint64), ("max", ctypes.c_uint64))


def setrlimit(resource: int, soft: int, hard: int) -> None:
    limit = _Rlimit(soft, hard)
    _check(_libc.prlimit(0, resource, ctypes.byref(limit), None), "setrlimit")


def winsize(rows: int, cols: int) -> bytes:
    """struct winsize for TIOCSWINSZ."""
    return struct.pack("HHHH", rows, cols, 0, 0)
