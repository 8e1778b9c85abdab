"""Leak accounting: around every VM test, and around the whole test run.

What Hull starts must never outlive its owner: no QEMU, no helper process (proxy, shim,
containerd-shim-hull-v2, pod placeholder), no mount, no network device, no file under
Hull's default state directory, no file descriptor of the test process.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HELPER = re.compile(r"qemu-system|-m hull .*\b(proxy|shim)\b|containerd-shim-hull|hull-pause|"
                    r"hull-agent")
STATE_DIRS = (Path("/run/hull"), Path("/run/hull-shim"))


def hull_processes(mark: str = "") -> set[str]:
    """qemu and hull helper processes alive now (pid + command line).

    With ``mark`` (this run's temporary directory), only the processes whose command line
    names it: everything a test starts does (state roots, sockets, consoles live there),
    and other test runs on the same machine are left out of this run's accounting.
    """
    out = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    found = set()
    for line in out.splitlines():
        pid, stat, args = [*line.strip().split(None, 2), "", ""][:3]
        if (int(pid) != os.getpid() and not stat.startswith("Z") and HELPER.search(args)
                and mark in args):
            found.add(f"{pid} {args}")
    return found


def hull_mounts(mark: str = "") -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line for line in f if ("hull" in line or "/pytest-of-" in line)
                and mark in line}


def net_devices(mark: str = "") -> set[str]:
    """Network devices; with a run mark only Hull's own (taps), as others' runs add theirs."""
    names = set(os.listdir("/sys/class/net"))
    return {n for n in names if n.startswith(("tap", "hull"))} if mark else names


def state_files() -> set[str]:
    return {str(p) for d in STATE_DIRS if d.exists() for p in d.rglob("*")
            if p.name != "accel.json"}


def open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) <= 2:
            continue  # pytest's output capture swaps these around
        with contextlib.suppress(OSError):  # the fd that listdir itself used
            fds.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    return fds


@dataclass
class Snapshot:
    processes: set[str]
    mounts: set[str]
    devices: set[str]
    files: set[str]

    @classmethod
    def take(cls, mark: str = "") -> Snapshot:
        return cls(hull_processes(mark), hull_mounts(mark), net_devices(mark), state_files())

    def leaks_since(self, before: Snapshot) -> list[str]:
        found = []
        for what in ("processes", "mounts", "devices", "files"):
            new = getattr(self, what) - getattr(before, what)
            if new:
                found.append(f"{what} left behind: {sorted(new)}")
        return found


def kill_processes(lines: set[str]) -> None:
    for line in lines:
        subprocess.run(["kill", "-9", line.split()[0]], check=False)


@pytest.fixture(scope="session")
def run_mark(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This run's temporary directory: what its tests start names it."""
    return str(tmp_path_factory.getbasetemp())


@pytest.fixture
def no_leaks(run_mark: str) -> Iterator[None]:
    """Fail the test if it leaves a VM, helper process, mount or device behind."""
    before = Snapshot.take(run_mark)
    yield
    after = Snapshot.take(run_mark)
    leaks = after.leaks_since(before)
    kill_processes(after.processes - before.processes)
    assert not leaks, "; ".join(leaks)


@pytest.fixture(scope="session", autouse=True)
def no_leaks_in_the_whole_run() -> Iterator[None]:
    """The same accounting over the whole run, plus the test process's own fds.

    In CI (CI=true) nothing else runs on the machine, so every Hull process counts;
    elsewhere only this run's.
    """
    mark = "" if os.environ.get("CI") == "true" else "/pytest-of-"
    before, fds = Snapshot.take(mark), open_fds()
    yield
    after = Snapshot.take(mark)
    leaks = after.leaks_since(before)
    new_fds = open_fds() - fds
    if new_fds:
        leaks.append(f"file descriptors left open: {sorted(new_fds)}")
    kill_processes(after.processes - before.processes)
    assert not leaks, "; ".join(leaks)
