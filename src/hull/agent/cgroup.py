"""A container's cgroup v2 in the guest: linux.resources applied, statistics, OOM counts.

Each container gets ``<root>/hull/<cgroupsPath, sanitised>`` (``<root>/hull/<id>`` without
one), where root is /sys/fs/cgroup in the guest. The agent stays in the root cgroup; the
helper that forks a container's init (or an exec) moves itself into the container's
cgroup before it unshares the cgroup namespace, so every container process starts there.

Conversions follow runc (libcontainer/cgroups/fs2 and cgroups/utils.go): cpu shares ->
cpu.weight, quota/period -> cpu.max, memory swap (memory+swap in the spec) -> the swap
share in memory.swap.max, blkio weight -> io.weight. Settings that mean nothing in the
VM (hugetlb, net_cls/net_prio, rdma, swappiness, kernel memory) are logged and skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import Any

Warn = Callable[[str], None]
CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids")
MAX_MEMORY = 2**62  # anything above is a mistake, not a limit
_I64 = 2**63 - 1


class CgroupError(ValueError):
    """linux.resources cannot be applied as given; the message names the field."""


class Resources:
    """The cgroup v2 files to write, in order: (file name, value)."""

    __slots__ = ("cpu_limit", "cpus", "files", "memory_limit", "warnings")

    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.memory_limit: int | None = None  # bytes, for the VM-size check of an update
        self.cpu_limit: float | None = None  # quota / period
        self.cpus = ""


def _num(obj: dict[str, Any], key: str, what: str, lo: int = -1, hi: int = _I64) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CgroupError(f"{what}.{key} must be an integer in [{lo}, {hi}], not {value!r}")
    return value


def _obj(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CgroupError(f"{what} must be an object")
    return value


def parse(obj: Any, what: str = "linux.resources") -> Resources:
    res = Resources()
    r = _obj(obj, what)
    _memory(res, _obj(r.get("memory"), f"{what}.memory"), f"{what}.memory")
    _cpu(res, _obj(r.get("cpu"), f"{what}.cpu"), f"{what}.cpu")
    pids = _obj(r.get("pids"), f"{what}.pids")
    limit = _num(pids, "limit", f"{what}.pids", -1)
    if limit is not None and limit != 0:
        res.files.append(("pids.max", "max" if limit < 0 else str(limit)))
    blkio = _obj(r.get("blockIO"), f"{what}.blockIO")
    weight = _num(blkio, "weight", f"{what}.blockIO", 0, 1000)
    if weight:
        if weight < 10:
            raise CgroupError(f"{what}.blockIO.weight must be in [10, 1000], not {weight}")
        res.files.append(("io.weight", f"default {1 + (weight - 10) * 9999 // 990}"))
    if any(blkio.get(k) for k in ("weightDevice", "throttleReadBpsDevice",
                                  "throttleWriteBpsDevice", "throttleReadIOPSDevice",
                                  "throttleWriteIOPSDevice")):
        res.warnings.append(f"{what}.blockIO device rules skipped: the guest's disks are "
                            "not the host's")
    for key in ("hugepageLimits", "network", "rdma"):
        if r.get(key):
            res.warnings.append(f"{what}.{key} has no meaning in the VM, skipped")
    unified = _obj(r.get("unified"), f"{what}.unified")
    for key, value in unified.items():
        if not isinstance(value, str) or "/" in key or key.startswith(".") or "\0" in key:
            raise CgroupError(f"{what}.unified: {key!r} is not a cgroup file setting")
        res.files.append((key, value))
    return res


def _memory(res: Resources, mem: dict[str, Any], what: str) -> None:
    limit = _num(mem, "limit", what, -1, MAX_MEMORY)
    swap = _num(mem, "swap", what, -1, MAX_MEMORY)
    low = _num(mem, "reservation", what, -1, MAX_MEMORY)
    if limit is not None and limit != 0:
        if 0 < limit < 4096:
            raise CgroupError(f"{what}.limit={limit} is less than one page")
        res.files.append(("memory.max", "max" if limit < 0 else str(limit)))
        res.memory_limit = None if limit < 0 else limit
    if swap is not None and swap != 0:
        lim = limit or 0
        if swap == -1:
            res.files.append(("memory.swap.max", "max"))
        elif lim <= 0:
            raise CgroupError(f"{what}.swap needs a memory limit (swap is memory+swap)")
        elif swap < lim:
            raise CgroupError(f"{what}.swap={swap} is below {what}.limit={lim} "
                              "(swap is memory+swap)")
        else:
            res.files.append(("memory.swap.max", str(swap - lim)))
    elif limit == -1:
        res.files.append(("memory.swap.max", "max"))
    if low is not None and low != 0:
        res.files.append(("memory.low", "max" if low < 0 else str(low)))
    if mem.get("swappiness") is not None or mem.get("kernel") or mem.get("kernelTCP"):
        res.warnings.append(f"{what}: swappiness and kernel memory have no cgroup v2 "
                            "equivalent, skipped")
    if mem.get("disableOOMKiller"):
        res.warnings.append(f"{what}.disableOOMKiller has no cgroup v2 equivalent, skipped")


def _cpu(res: Resources, cpu: dict[str, Any], what: str) -> None:
    shares = _num(cpu, "shares", what, 0, 262144)
    if shares:
        shares = max(2, shares)
        res.files.append(("cpu.weight", str(1 + ((shares - 2) * 9999) // 262142)))
    quota = _num(cpu, "quota", what, -1, _I64)
    period = _num(cpu, "period", what, 0, 1_000_000)
    if quota or period:
        if period is not None and 0 < period < 1000:
            raise CgroupError(f"{what}.period must be at least 1000 (microseconds)")
        period = period or 100_000
        if quota is not None and 0 < quota < 1000:
            raise CgroupError(f"{what}.quota must be at least 1000 (microseconds) or -1")
        text = "max" if quota is None or quota <= 0 else str(quota)
        res.files.append(("cpu.max", f"{text} {period}"))
        if quota is not None and quota > 0:
            res.cpu_limit = quota / period
    for key, name in (("cpus", "cpuset.cpus"), ("mems", "cpuset.mems")):
        value = cpu.get(key)
        if value:
            if not isinstance(value, str) or not all(c in "0123456789,- " for c in value):
                raise CgroupError(f"{what}.{key} {value!r} is not a CPU/node list")
            res.files.append((name, value))
            if key == "cpus":
                res.cpus = value
    if cpu.get("realtimeRuntime") or cpu.get("realtimePeriod"):
        res.warnings.append(f"{what}: realtime scheduling limits have no cgroup v2 "
                            "equivalent, skipped")
    idle = _num(cpu, "idle", what, 0, 1)
    if idle:
        res.files.append(("cpu.idle", "1"))


def cpu_list(text: str) -> set[int]:
    """The CPUs of a list such as "0-2,4"."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def relative_path(cgroups_path: str, cid: str) -> str:
    """cgroupsPath made safe: under hull/, no "..", systemd "slice:prefix:name" mapped."""
    if cgroups_path.count(":") == 2 and not cgroups_path.startswith("/"):
        slice_, prefix, name = cgroups_path.split(":")
        cgroups_path = f"{slice_ or 'system.slice'}/{prefix}-{name}.scope" if prefix else \
            f"{slice_}/{name}"
    parts = [p for p in cgroups_path.split("/") if p and p not in (".", "..")]
    parts = ["".join(c if c.isalnum() or c in "-_.@:" else "_" for c in p) for p in parts]
    return "/".join(["hull", *(parts or [cid])])


class Cgroup:
    def __init__(self, root: str, rel: str) -> None:
        self.root = root
        self.rel = rel
        self.path = os.path.join(root, rel)
        #: memory.events oom_kill already reported
        self.oom_seen = 0

    @property
    def procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def create(self) -> None:
        """mkdir -p, enabling the controllers in every parent's subtree_control."""
        parent = self.root
        for part in self.rel.split("/"):
            _enable_controllers(parent)
            parent = os.path.join(parent, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, 0o755)

    def apply(self, res: Resources) -> None:
        for name, value in res.files:
            try:
                with open(os.path.join(self.path, name), "w") as fh:
                    fh.write(value)
            except OSError as exc:
                if exc.errno == errno.ENOENT and name == "io.weight":
                    continue  # no io controller (no block device): nothing to weigh
                raise CgroupError(f"cgroup {name}={value}: "
                                  f"{os.strerror(exc.errno or 0).lower()}") from None

    def freeze(self, frozen: bool, timeout: float = 2.0) -> None:
        """cgroup.freeze, then wait (briefly) until cgroup.events says it took effect."""
        try:
            with open(os.path.join(self.path, "cgroup.freeze"), "w") as fh:
                fh.write("1" if frozen else "0")
        except OSError as exc:
            raise CgroupError(f"cgroup.freeze: {os.strerror(exc.errno or 0).lower()}"
                              ) from None
        deadline = time.monotonic() + timeout
        events = os.path.join(self.path, "cgroup.events")
        while read_keyed(events).get("frozen", int(frozen)) != int(frozen):
            if time.monotonic() > deadline:
                break  # the kernel finishes it later (a task in uninterruptible sleep)
            time.sleep(0.01)

    def oom_kills(self) -> int:
        return read_keyed(os.path.join(self.path, "memory.events")).get("oom_kill", 0)

    def new_oom_kill(self) -> bool:
        """An OOM kill happened since the last call."""
        count = self.oom_kills()
        seen, self.oom_seen = self.oom_seen, max(self.oom_seen, count)
        return count > seen

    def remove(self) -> bool:
        """rmdir the cgroup and its empty hull/ parents; False while it still has tasks."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                return False
            if exc.errno == errno.ENOTEMPTY:  # a fake (test) tree holds plain files
                _remove_tree(self.path)
            else:
                return True
        parts = self.rel.split("/")[:-1]
        while parts:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.root, *parts))
            parts.pop()
        return True

    def stats(self) -> dict[str, Any]:
        """The figures of schema.ContainerStats."""
        p = self.path
        return {
            "cpu": read_keyed(os.path.join(p, "cpu.stat")),
            "memory_current": _read_int(os.path.join(p, "memory.current")) or 0,
            "memory_max": _read_int(os.path.join(p, "memory.max")),
            "memory_peak": _read_int(os.path.join(p, "memory.peak")) or 0,
            "swap_current": _read_int(os.path.join(p, "memory.swap.current")) or 0,
            "swap_max": _read_int(os.path.join(p, "memory.swap.max")),
            "memory_stat": read_keyed(os.path.join(p, "memory.stat")),
            "memory_events": read_keyed(os.path.join(p, "memory.events")),
            "pids_current": _read_int(os.path.join(p, "pids.current")) or 0,
            "pids_max": _read_int(os.path.join(p, "pids.max")),
            "io": _io_stat(os.path.join(p, "io.stat")),
        }


def _enable_controllers(path: str) -> None:
    try:
        with open(os.path.join(path, "cgroup.controllers")) as fh:
            available = fh.read().split()
    except OSError:
        available = list(CONTROLLERS)  # a test tree of plain files
    control = os.path.join(path, "cgroup.subtree_control")
    for name in CONTROLLERS:
        if name in available:
            try:
                with open(control, "a") as fh:
                    fh.write(f"+{name}")
            except OSError:
                pass  # e.g. cpuset busy: the limits that need it fail with a clear error


def read_keyed(path: str) -> dict[str, int]:
    """A "key value" per line file (cpu.stat, memory.stat, memory.events)."""
    out: dict[str, int] = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = int(value)
    except OSError:
        pass
    return out


def _read_int(path: str) -> int | None:
    """The number in a one-value file; None for "max" or a missing file."""
    try:
        with open(path) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _io_stat(path: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    try:
        with open(path) as fh:
            for line in fh:
                dev, *fields = line.split()
                entry = {}
                for f in fields:
                    key, _, value = f.partition("=")
                    with contextlib.suppress(ValueError):
                        entry[key] = int(value)
                out[dev] = entry
    except OSError:
        pass
    return out


def _remove_tree(path: str) -> None:
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)


def vm_limits() -> tuple[int, int]:
    """(memory bytes, online CPUs) of the VM."""
    mem = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    return mem, os.cpu_count() or 1


def check_fits_vm(res: Resources, what: str) -> None:
    """Refuse an update the VM cannot honour (no memory or CPU hotplug)."""
    mem, ncpu = vm_limits()
    if res.memory_limit is not None and mem and res.memory_limit > mem:
        raise CgroupError(f"{what}.memory.limit={res.memory_limit} exceeds the VM's "
                          f"memory ({mem} bytes): the VM's memory cannot change "
                          "(no memory hotplug)")
    if res.cpu_limit is not None and res.cpu_limit > ncpu:
        raise CgroupError(f"{what}.cpu quota/period={res.cpu_limit:g} CPUs exceeds the VM's "
                          f"{ncpu} vCPUs: the VM's CPU count cannot change (no CPU hotplug)")
    if res.cpus:
        try:
            wanted = cpu_list(res.cpus)
        except ValueError:
            raise CgroupError(f"{what}.cpu.cpus {res.cpus!r} is not a CPU list") from None
        if wanted and max(wanted) >= ncpu:
            raise CgroupError(f"{what}.cpu.cpus {res.cpus!r} names CPUs the VM does not "
                              f"have (it has {ncpu}: 0-{ncpu - 1}); the VM's CPU count "
                              "cannot change")
