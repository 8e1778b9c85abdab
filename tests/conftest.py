"""Fixtures shared by all tests: leak accounting around every test that starts things."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def hull_processes() -> set[str]:
    """qemu and hull helper processes alive now (pid + command line)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                         check=True).stdout
    found = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if int(pid) == os.getpid():
            continue
        if "qemu-system" in args or "hull-agent" in args or "hull proxy" in args:
            found.add(line.strip())
    return found


def hull_mounts() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line for line in f if "hull" in line}


@pytest.fixture
def no_leaks(tmp_path: Path) -> Iterator[None]:
    """Fail the test if it leaves a VM, helper process or mount behind."""
    procs, mounts = hull_processes(), hull_mounts()
    yield
    left_procs = hull_processes() - procs
    left_mounts = hull_mounts() - mounts
    for line in left_procs:
        subprocess.run(["kill", "-9", line.split()[0]], check=False)
    assert not left_procs, f"processes left behind: {left_procs}"
    assert not left_mounts, f"mounts left behind: {left_mounts}"
