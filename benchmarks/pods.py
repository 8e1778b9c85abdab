"""Helpers for the pod benchmarks: a CRI-enabled containerd and the host cost of pods.

The containerd is the CRI test fixture's (tests/integration/cri/fixture.py): private
socket, root, state and CNI network, a local pause and busybox image, runtime handlers
``hull`` (io.containerd.hull.v2) and ``runc`` (io.containerd.runc.v2). A pod's host
processes are its shim and everything below it (for Hull: QEMU and the placeholder
processes; for runc: pause and the container processes), found from the shims whose
command line names this containerd's socket.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.cri import images
from tests.integration.cri.fixture import CriEnv, start_cri, stop_cri

SHIMS = ("containerd-shim-runc-v2", "hull.shim.v2.main")


@contextmanager
def cri_containerd() -> Iterator[CriEnv]:
    with tempfile.TemporaryDirectory(prefix="hull-bench-img-") as tmp:
        archives = [images.pause_archive(Path(tmp) / "pause.tar"),
                    images.busybox_archive(Path(tmp) / "busybox.tar")]
        base = Path(tempfile.mkdtemp(prefix="hullcri-", dir="/tmp"))
        env = start_cri(base, archives)
        try:
            yield env
        finally:
            stop_cri(env)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        procs[int(entry)] = (int(stat.rpartition(")")[2].split()[1]),
                             cmdline.decode(errors="replace"))
    return procs


def shim_trees(env: CriEnv) -> dict[int, list[int]]:
    """shim pid -> its process and all its descendants, for this containerd's shims."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    address = f"-address {env.containerd.socket} "
    trees = {}
    for pid, (_, cmd) in procs.items():
        words = cmd.split()
        # The long-lived shims, not their short `start`/`delete` invocations.
        if (address in cmd and any(s in cmd for s in SHIMS)
                and words[-1] not in ("start", "delete")):
            tree, todo = [], [pid]
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(children.get(p, []))
            trees[pid] = tree
    return trees


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(c.decode(errors="replace") for c in cmd[:3])
    if "qemu-system" in text:
        return "qemu"
    if "hull.shim.v2.main" in text:
        return "hull shim"
    if "containerd-shim-runc-v2" in text:
        return "runc shim"
    if text.startswith("hull-pause"):
        return "placeholder"
    return Path(cmd[0].decode(errors="replace")).name or "?"
