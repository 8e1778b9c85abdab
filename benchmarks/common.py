"""Helpers shared by the benchmarks: bundles, timing, the report table."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")


def busybox_bundle(path: Path, args: list[str]) -> Path:
    """An OCI bundle from `runc spec`, so runc and hull run the very same bundle."""
    shutil.rmtree(path, ignore_errors=True)
    (path / "rootfs/bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (path / "rootfs" / d).mkdir()
    shutil.copy(BUSYBOX, path / "rootfs/bin/busybox")
    for applet in ("sh", "true", "cat", "echo", "dd", "head", "sleep"):
        (path / "rootfs/bin" / applet).symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    spec: dict[str, Any] = json.loads((path / "config.json").read_text())
    spec["process"].update(terminal=False, args=args)
    (path / "config.json").write_text(json.dumps(spec, indent=2))
    return path


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run a command to completion: its wall time and its stderr; exit on failure."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode().strip()}")
    return wall, done.stderr.decode()


def run_quiet(argv: list[str]) -> None:
    run_timed(argv)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def report(rows: list[tuple[str, list[float], list[float]]]) -> str:
    """Rows of (what, hull samples, runc samples) as a markdown table with ratios.

    Medians decide; the minimum is shown too, as the best case on a machine shared with
    other work (noise only ever adds time).
    """
    lines = ["| what | hull median (min) | runc median (min) | ratio of medians |",
             "|---|---|---|---|"]
    for what, hull, runc in rows:
        h = median_ms(hull)
        hull_text = f"{h:.0f} ms ({min(hull) * 1000:.0f})"
        if runc:
            r = median_ms(runc)
            runc_text, ratio = f"{r:.0f} ms ({min(runc) * 1000:.0f})", f"{h / r:.1f}x"
        else:
            runc_text, ratio = "-", "-"
        lines.append(f"| {what} | {hull_text} | {runc_text} | {ratio} |")
    return "\n".join(lines)


def phase_table(title: str, samples: list[dict[str, float]]) -> str:
    """Per-phase medians (in ms, and share of the summed medians) of several runs."""
    names: list[str] = []
    for sample in samples:
        names += [n for n in sample if n not in names]
    medians = {n: statistics.median(s.get(n, 0.0) for s in samples) for n in names}
    total = sum(medians.values()) or 1.0
    lines = [f"| {title} | median | share |", "|---|---|---|"]
    lines += [f"| {n} | {medians[n] * 1000:.0f} ms | {100 * medians[n] / total:.0f}% |"
              for n in names]
    lines.append(f"| total (sum of medians) | {total * 1000:.0f} ms | |")
    return "\n".join(lines)


def hull_command() -> list[str]:
    """`hull` as users run it: the installed console script, else python -m hull."""
    found = shutil.which("hull")
    return [found] if found else [sys.executable, "-m", "hull"]


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by all threads of ``pid`` (0.0 if it is gone)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        pass
    return total / 1e9


def sandbox_overhead(root: Path) -> dict[str, dict[str, int]]:
    """Host PSS (bytes) of every live CLI-mode sandbox under ``root``, by component
    (qemu, proxy, shims: every Hull process serving it): `hull monitor`'s accounting."""
    from hull.runtime.monitor import cli_sandboxes  # prometheus_client: only when asked
    return {facts.label: facts.overhead for facts in cli_sandboxes(root)}


def compile_hull() -> str:
    """Compile Hull's modules to bytecode now, as installing a wheel does: an editable
    install run with PYTHONDONTWRITEBYTECODE set would have every shim and CLI process
    compile what changed since, which costs time and memory no installed Hull pays."""
    import compileall

    import hull

    where = Path(hull.__file__).parent
    compileall.compile_dir(where, quiet=1)
    return f"bytecode of {where} up to date"


def machine() -> str:
    """One line: cores, CPU, memory, host kernel, QEMU, accelerator, load average; Hull's
    bytecode compiled first (:func:`compile_hull`)."""
    compile_hull()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return (f"{os.cpu_count()} cores, {cpu}, {mem_gib:.0f} GiB, kernel {os.uname().release}, "
            f"{qemu_version()}, accelerator {accelerator()}, load average {load}")


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=False).stdout
    except OSError:
        return "no QEMU"
    first = out.splitlines()[0] if out else ""
    return first.replace("QEMU emulator version", "QEMU").split("(")[0].strip() or "QEMU ?"


def accelerator() -> str:
    """What `hull check` says about KVM/TCG (its first word after the item name)."""
    try:
        out = subprocess.run([*hull_command(), "check"], capture_output=True, text=True,
                             check=False).stdout
    except OSError:
        return "?"
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "accelerator":
            return parts[2].rstrip(":")
    return "?"
