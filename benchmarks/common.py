"""Helpers shared by the benchmarks: bundles, timing, the report table."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
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
    for applet in ("sh", "true", "cat", "echo", "dd", "head"):
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


def run_quiet(argv: list[str]) -> None:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode().strip()}")


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def report(rows: list[tuple[str, list[float], list[float]]]) -> str:
    """Rows of (what, hull samples, runc samples) as a markdown table with ratios."""
    lines = ["| what | hull median | runc median | ratio |", "|---|---|---|---|"]
    for what, hull, runc in rows:
        h, r = median_ms(hull), median_ms(runc) if runc else float("nan")
        ratio = f"{h / r:.1f}x" if runc else "-"
        lines.append(f"| {what} | {h:.0f} ms | {r:.0f} ms | {ratio} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, kernel {os.uname().release}"
