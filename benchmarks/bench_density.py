"""Density: how many idle sandboxes stay alive at once, and how `create` time grows with
the number alive; beside runc (`runc create` of the same bundle) in the same run.

Usage: python -m benchmarks.bench_density [--max N] [--step S] [--floor-mib M] [--pool P]
                                          [--settle SECONDS]

Sandboxes are cloned from a VM template of their own (`hull factory init` in a private
directory under /dev/shm; `hull factory destroy` at the end), optionally with a pool of
P clones. Each sandbox is a `hull create` of busybox `sleep` (created, not started: an
idle VM with its container set up), kept alive; after every S sandboxes the table gets a
row: the median create time of those S (Hull and runc), the host PSS per sandbox (every
process serving it: QEMU, its `hull proxy` and the shim of its init, as `hull
monitor` counts them; summed over all alive, divided by their number), split by process,
and the host's MemAvailable. It stops at N sandboxes, at the first create that fails, or when
MemAvailable falls below M MiB; then everything is deleted. ``--settle`` waits before each
PSS figure: with the host's KSM on, merging identical guest pages takes ksmd a minute or
so (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.bench_template import write_config
from benchmarks.common import busybox_bundle, hull_command, machine, sandbox_overhead
from hull.runtime import hostcheck


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def timed_create(argv: list[str]) -> float | None:
    """Seconds a create took, None when it failed. No pipes: the daemons `hull create`
    leaves behind would hold them open."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False, timeout=300)
    return time.perf_counter() - start if done.returncode == 0 else None


def per_sandbox_mib(overhead: dict[str, dict[str, int]], alive: int) -> dict[str, float]:
    """MiB per sandbox by component, summed over every sandbox, divided by ``alive``."""
    parts: dict[str, float] = {}
    for components in overhead.values():
        for name, value in components.items():
            parts[name] = parts.get(name, 0.0) + value / 2**20 / alive
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max", type=int, default=100)
    parser.add_argument("--step", type=int, default=10)
    parser.add_argument("--floor-mib", type=float, default=1024)
    parser.add_argument("--pool", type=int, default=0, help="factory.pool_size")
    parser.add_argument("--settle", type=float, default=0,
                        help="seconds to wait before each PSS figure (for KSM)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"ksm: {hostcheck.check_ksm().detail}")  # it changes what idle sandboxes share
    template_dir = Path("/dev/shm") / f"hull-bench-{uuid.uuid4().hex[:12]}"
    rows: list[str] = []
    stop_reason = f"reached --max {args.max}"
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        config = write_config(work, "warm", enabled=True, template_dir=str(template_dir),
                              pool_size=args.pool)
        hull = [*hull_command(), "--root", str(work / "state"), "--config", str(config)]
        runc = ["runc", "--root", str(work / "runc-state")]
        hull_ids: list[str] = []
        runc_ids: list[str] = []
        try:
            subprocess.run([*hull, "factory", "init"], check=True, capture_output=True)
            time.sleep(2 + args.pool * 2)  # let the pool fill
            bundle = busybox_bundle(work / "bundle", ["/bin/sleep", "100000"])
            hull_step: list[float] = []
            runc_step: list[float] = []
            for i in range(args.max):
                took = timed_create([*hull, "create", "-b", str(bundle), f"d{i}"])
                if took is None:
                    stop_reason = f"hull create number {i + 1} failed"
                    break
                hull_ids.append(f"d{i}")
                hull_step.append(took)
                took = timed_create([*runc, "create", "-b", str(bundle), f"r{i}"])
                if took is not None:
                    runc_ids.append(f"r{i}")
                    runc_step.append(took)
                if len(hull_ids) % args.step == 0 or i == args.max - 1:
                    alive = len(hull_ids)
                    time.sleep(args.settle)
                    pss = per_sandbox_mib(sandbox_overhead(work / "state"), alive)
                    total = sum(pss.values())
                    parts = ", ".join(f"{k} {v:.1f}" for k, v in pss.items())
                    h = statistics.median(hull_step) * 1000
                    r = statistics.median(runc_step) * 1000 if runc_step else float("nan")
                    rows.append(f"| {alive} | {h:.0f} ms | {r:.0f} ms | {h / r:.1f}x | "
                                f"{total:.1f} MiB ({parts}) | {mem_available_mib():.0f} MiB |")
                    print(rows[-1], flush=True)
                    hull_step, runc_step = [], []
                if mem_available_mib() < args.floor_mib:
                    stop_reason = f"MemAvailable below {args.floor_mib:.0f} MiB"
                    break
        finally:
            for sid in hull_ids:
                subprocess.run([*hull, "delete", "--force", sid], capture_output=True,
                               check=False)
            for rid in runc_ids:
                subprocess.run([*runc, "delete", "--force", rid], capture_output=True,
                               check=False)
            subprocess.run([*hull, "factory", "destroy"], capture_output=True, check=False)
    print(f"\n{len(hull_ids)} idle sandboxes alive at once ({stop_reason}); clones of a "
          f"template, pool_size {args.pool}\n")
    print("| sandboxes alive | hull create (median of the step) | runc create | ratio | "
          "host PSS per sandbox | MemAvailable |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
