"""Ten pods started concurrently through Kubernetes CRI: Hull beside containerd's runc shim.

Usage: python -m benchmarks.bench_pods [--pods N]
One containerd 1.6 with its CRI plugin (benchmarks/pods.py) and two runtime handlers:
``runc`` (io.containerd.runc.v2) and ``hull`` (io.containerd.hull.v2, one VM per pod).
For each, N pods are started at once, each RunPodSandbox + CreateContainer (busybox
``sleep``) + StartContainer, from N threads; then the host PSS of every pod's processes
(the shim and everything under it) is summed and divided by N; then the pods are
removed. Prints the machine, the wall time of the whole batch, the median per-pod
latency and the PSS per pod, with Hull/runc ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from tests.integration.cri.fixture import CriEnv
from tests.integration.cri.images import BUSYBOX_IMAGE

from benchmarks.common import machine
from benchmarks.pods import cri_containerd, describe, pss_kib, shim_trees


def start_pod(env: CriEnv, handler: str, i: int) -> tuple[str, float]:
    start = time.perf_counter()
    pod, config = env.client.run_pod(f"{handler}-{i}", handler)
    cid = env.client.create_container(pod, config, "main", BUSYBOX_IMAGE, ["sleep", "3600"])
    env.client.start_container(cid)
    return pod, time.perf_counter() - start


def remove_pod(env: CriEnv, pod: str) -> None:
    env.client.stop_pod(pod)
    env.client.remove_pod(pod)


def batch(env: CriEnv, handler: str, n: int) -> dict[str, float]:
    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda i: start_pod(env, handler, i), range(n)))
        wall = time.perf_counter() - start
    time.sleep(3)  # let the guests and shims settle before measuring memory
    trees = shim_trees(env)
    pids = [p for tree in trees.values() for p in tree]
    kinds: dict[str, int] = {}
    for pid in pids:
        kinds[describe(pid)] = kinds.get(describe(pid), 0) + pss_kib(pid)
    total = sum(kinds.values())
    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        list(pool.map(lambda r: remove_pod(env, r[0]), results))
        removal = time.perf_counter() - start
    return {"wall": wall, "median": statistics.median(r[1] for r in results),
            "pss_mib": total / n / 1024, "shims": len(trees), "removal": removal,
            **{f"pss_{k}_mib": v / n / 1024 for k, v in sorted(kinds.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=10)
    args = parser.parse_args()
    with cri_containerd() as env:
        runc = batch(env, "runc", args.pods)
        hull = batch(env, "hull", args.pods)
    n = args.pods
    print(f"machine: {machine()}; containerd 1.6 CRI, {n} pods started concurrently "
          "(RunPodSandbox + CreateContainer + StartContainer of busybox sleep)\n")
    print("| what | hull | runc | ratio |\n|---|---|---|---|")
    rows = [(f"wall time, {n} pods", "wall", "s"), ("median per-pod start", "median", "s"),
            ("host PSS per pod (shim + all below it)", "pss_mib", "MiB"),
            (f"wall time, removing {n} pods", "removal", "s")]
    for what, key, unit in rows:
        h, r = hull[key], runc[key]
        print(f"| {what} | {h:.2f} {unit} | {r:.2f} {unit} | {h / r:.1f}x |")
    print("\nPSS per pod by process (MiB):")
    for name, result in (("hull", hull), ("runc", runc)):
        parts = ", ".join(f"{k[4:-4]} {v:.1f}" for k, v in result.items()
                          if k.startswith("pss_") and k != "pss_mib")
        print(f"- {name}: {parts} ({result['shims']:.0f} shims)")


if __name__ == "__main__":
    main()
