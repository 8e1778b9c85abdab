"""Capabilities of a container process (config.md "process.capabilities"), as runc sets them.

Order (runc's finalizeNamespace): drop the bounding set, keep the permitted set across
the uid change (PR_SET_KEEPCAPS), then capset(2) effective/permitted/inheritable and
raise the ambient ones. A process without a ``capabilities`` object keeps what it has.
"""

from __future__ import annotations

from collections.abc import Callable

from hull.agent import syscalls as sc

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import Any

# <linux/capability.h>, in number order (CAP_CHOWN = 0 ... CAP_CHECKPOINT_RESTORE = 40)
NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
_NUMBER = {name: i for i, name in enumerate(NAMES)}
SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


class CapsError(ValueError):
    pass


class Caps:
    """The five sets as bit masks."""

    __slots__ = SETS

    def __init__(self, bounding: int = 0, effective: int = 0, inheritable: int = 0,
                 permitted: int = 0, ambient: int = 0) -> None:
        self.bounding = bounding
        self.effective = effective
        self.inheritable = inheritable
        self.permitted = permitted
        self.ambient = ambient


def parse(obj: Any, what: str) -> Caps:
    """Caps from a runtime-spec capabilities object; CapsError names an unknown name."""
    if not isinstance(obj, dict):
        raise CapsError(f"{what} must be an object")
    masks = {}
    for key in SETS:
        names = obj.get(key) or []
        if not isinstance(names, list):
            raise CapsError(f"{what}.{key} must be a list of strings")
        mask = 0
        for name in names:
            bit = _NUMBER.get(name) if isinstance(name, str) else None
            if bit is None:
                raise CapsError(f"{what}.{key}: unknown capability {name!r}")
            mask |= 1 << bit
        masks[key] = mask
    return Caps(**masks)


_last_cap: list[int] = []  # the kernel's, read once (it never changes)


def last_cap() -> int:
    if not _last_cap:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as fh:
                _last_cap.append(int(fh.read()))
        except (OSError, ValueError):
            _last_cap.append(len(NAMES) - 1)
    return _last_cap[0]


def drop_bounding(caps: Caps, last: int) -> None:
    for bit in range(last + 1):
        if not caps.bounding & (1 << bit):
            sc.prctl3(sc.PR_CAPBSET_DROP, bit, 0)


def apply(caps: Caps, last: int, warn: Callable[[str], None]) -> None:
    """capset the three sets, then raise the ambient ones (after the uid change)."""
    known = (1 << (last + 1)) - 1
    sc.capset(caps.effective & known, caps.permitted & known, caps.inheritable & known)
    sc.prctl3(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL, 0)
    for bit in range(last + 1):
        if caps.ambient & (1 << bit):
            try:
                sc.prctl3(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, bit)
            except OSError:  # runc ignores these too: not in permitted and inheritable
                warn(f"ambient capability {NAMES[bit]} cannot be raised (it must be "
                     "permitted and inheritable)")
