"""The host cost of one idle Hull pod: the figure behind RuntimeClass overhead.podFixed.

Usage: python -m benchmarks.bench_pod_overhead [--settle S] [--window S]
Starts a CRI-enabled containerd (benchmarks/pods.py), runs one pod through the ``hull``
handler (the sandbox plus one busybox ``sleep`` container, as a minimal real pod), lets
it settle, then measures over a window: the host PSS of the pod's processes (shim, QEMU,
placeholders) and their CPU use. Kubernetes adds podFixed to the pod's requests for
scheduling and to the pod cgroup's limits, so it is the pod's cost outside the
containers' own resources: all of QEMU and the shim (the guest's memory use lies inside
QEMU's PSS). Prints the figures and the overhead block for deploy/runtimeclass.yaml.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

from tests.integration.cri.fixture import CriEnv
from tests.integration.cri.images import BUSYBOX_IMAGE

from benchmarks.common import machine
from benchmarks.pods import cpu_ticks, cri_containerd, describe, pss_kib, shim_trees


def measure(env: CriEnv, settle: float, window: float) -> tuple[dict[str, float], float]:
    """(PSS MiB by process kind, CPU cores) of one idle pod."""
    pod, config = env.client.run_pod("overhead", "hull")
    cid = env.client.create_container(pod, config, "main", BUSYBOX_IMAGE, ["sleep", "3600"])
    env.client.start_container(cid)
    time.sleep(settle)
    pids = [p for tree in shim_trees(env).values() for p in tree]
    ticks = sum(cpu_ticks(p) for p in pids)
    time.sleep(window)
    cpu = (sum(cpu_ticks(p) for p in pids) - ticks) / os.sysconf("SC_CLK_TCK") / window
    parts: dict[str, float] = {}
    for pid in pids:
        parts[describe(pid)] = parts.get(describe(pid), 0) + pss_kib(pid) / 1024
    env.client.stop_pod(pod)
    env.client.remove_pod(pod)
    return parts, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with cri_containerd() as env:
        for _ in range(args.reps):
            runs.append(measure(env, args.settle, args.window))
    print(f"machine: {machine()}")
    print(f"idle Hull pod (sandbox + 1 busybox sleep container), settled {args.settle:.0f} s, "
          f"CPU over {args.window:.0f} s, {args.reps} pods one after another:")
    for i, (parts, cpu) in enumerate(runs):
        detail = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  pod {i}: PSS {sum(parts.values()):.1f} MiB ({detail}); "
              f"CPU {cpu * 1000:.0f} millicores")
    totals = [sum(parts.values()) for parts, _ in runs]
    cpus = [cpu for _, cpu in runs]
    print(f"median PSS {statistics.median(totals):.1f} MiB, max {max(totals):.1f} MiB; "
          f"max CPU {max(cpus) * 1000:.0f} millicores")
    memory = math.ceil(max(totals) / 10) * 10
    millicores = max(50, math.ceil(max(cpus) * 1000 / 50) * 50)
    print(f'\noverhead:\n  podFixed:\n    memory: "{memory}Mi"\n    cpu: "{millicores}m"')


if __name__ == "__main__":
    main()
