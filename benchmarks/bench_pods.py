"""Ten pods started concurrently through Kubernetes CRI or ctr: Hull beside containerd's
runc shim.

Usage: python -m benchmarks.bench_pods [--pods N] [--via cri|ctr] [--factory] [--pool N]
[--no-runc]
One containerd 1.6 with its CRI plugin (benchmarks/pods.py) and two runtime handlers:
``runc`` (io.containerd.runc.v2) and ``hull`` (io.containerd.hull.v2, one VM per pod).
For each, N pods are started at once from N threads, through CRI (the default: each
RunPodSandbox, with the CNI network and the pause container, + CreateContainer of
busybox ``sleep`` + StartContainer) or through ctr (``--via ctr``: each a ``ctr run -d``
of the same busybox image, which the shim v2 runs as a pod of its own: one VM, one
container, no pod network; Hull's runtime gets the same configuration file as the CRI
handler); then the host PSS of every pod's processes (the shim and everything under it,
and the QEMU a pod leased from the pool) is summed and divided by N; then the pods are
removed. Prints the machine, the wall time of the whole batch, the median per-pod
latency and the PSS per pod, with Hull/runc ratios, and where a Hull pod's start time
went (per phase, medians over the pods, from containerd's log). With N pods on few
cores the pods' CPU time decides the wall time: the host's busy time during the batch,
per pod, is shown too (meaningful on a machine without other work).

``--factory`` enables VM templates in this containerd's own Hull configuration (the CRI
runtime's ConfigPath; the default configuration is never touched) and builds the
template first; ``--pool N`` also keeps N restored clones waiting (use N >= --pods for
every pod to lease one). Both are destroyed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.containerd_fixture import RUNTIME
from tests.integration.cri.fixture import CriEnv
from tests.integration.cri.images import BUSYBOX_IMAGE

from benchmarks.common import machine, phase_table
from benchmarks.pods import (
    cpu_ticks,
    cri_containerd,
    describe,
    factory,
    leased_qemus,
    pod_phases,
    pss_kib,
    shim_trees,
)

#: Runtime (ctr) per CRI runtime handler.
RUNTIMES = {"hull": RUNTIME, "runc": "io.containerd.runc.v2"}


def start_pod(env: CriEnv, handler: str, i: int) -> tuple[str, float]:
    start = time.perf_counter()
    pod, config = env.client.run_pod(f"{handler}-{i}", handler)
    cid = env.client.create_container(pod, config, "main", BUSYBOX_IMAGE, ["sleep", "3600"])
    env.client.start_container(cid)
    return pod, time.perf_counter() - start


def remove_pod(env: CriEnv, pod: str) -> None:
    env.client.stop_pod(pod)
    env.client.remove_pod(pod)


def run_task(env: CriEnv, handler: str, i: int) -> tuple[str, float]:
    """`ctr run -d` of busybox sleep: a task of its own (for Hull, a VM of its own)."""
    task = f"{handler}-ctr-{i}"
    options = (["--runtime-config-path", str(env.containerd.base / "hull.toml")]
               if handler == "hull" else [])
    start = time.perf_counter()
    env.containerd.ctr("run", "-d", "--runtime", RUNTIMES[handler], *options,
                       BUSYBOX_IMAGE, task, "sleep", "3600")
    return task, time.perf_counter() - start


def remove_task(env: CriEnv, task: str) -> None:
    env.containerd.ctr("task", "kill", "-s", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 60
    while env.containerd.ctr("task", "delete", task, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"ctr task delete {task}: the task did not stop")
        time.sleep(0.2)
    env.containerd.ctr("containers", "rm", task)


def busy_seconds() -> float:
    """CPU time the whole host spent busy so far, over all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def batch(env: CriEnv, handler: str, n: int, via: str = "cri") -> dict[str, float]:
    start_one, remove_one = (start_pod, remove_pod) if via == "cri" else (run_task,
                                                                          remove_task)
    with ThreadPoolExecutor(n) as pool:
        before = all_ticks()
        start, busy = time.perf_counter(), busy_seconds()
        results = list(pool.map(lambda i: start_one(env, handler, i), range(n)))
        wall = time.perf_counter() - start
        cpu = busy_seconds() - busy
        during = burst_ticks(before, all_ticks())
    time.sleep(3)  # let the guests and shims settle before measuring memory
    trees = shim_trees(env)
    pids = [p for tree in trees.values() for p in tree] + leased_qemus(env)
    kinds: dict[str, int] = {}
    ticks: dict[str, int] = {}
    for pid in pids:
        kind = describe(pid)
        kinds[kind] = kinds.get(kind, 0) + pss_kib(pid)
        ticks[kind] = ticks.get(kind, 0) + cpu_ticks(pid)
    total = sum(kinds.values())
    hz = os.sysconf("SC_CLK_TCK")
    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        list(pool.map(lambda r: remove_one(env, r[0]), results))
        removal = time.perf_counter() - start
    return {"wall": wall, "median": statistics.median(r[1] for r in results), "cpu": cpu / n,
            "pss_mib": total / n / 1024, "shims": len(trees), "removal": removal,
            **{f"pss_{k}_mib": v / n / 1024 for k, v in sorted(kinds.items())},
            **{f"cpu_{k}_s": v / n / hz for k, v in sorted(ticks.items())},
            **{f"burst_{k}_s": v / n / hz for k, v in during.items()}}


def all_ticks() -> dict[int, int]:
    """CPU ticks (user + system) of every process now."""
    return {int(e): cpu_ticks(int(e)) for e in os.listdir("/proc") if e.isdigit()}


def burst_ticks(before: dict[int, int], after: dict[int, int]) -> dict[str, int]:
    """CPU ticks each kind of process (hull.describe; "(new)": started in between, e.g.
    the pool's refill) spent between the snapshots, over the whole host, most first:
    processes that started and ended in between are not seen (the whole host's busy time
    counts them)."""
    kinds: dict[str, int] = {}
    for pid, ticks in after.items():
        spent = ticks - before.get(pid, 0)
        if spent > 0:
            kind = describe(pid) + ("" if pid in before else " (new)")
            kinds[kind] = kinds.get(kind, 0) + spent
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=10)
    parser.add_argument("--via", choices=("cri", "ctr"), default="cri",
                        help="start pods through CRI (pod network, pause container, "
                        "one busybox container) or as `ctr run -d` tasks (default: cri)")
    parser.add_argument("--factory", action="store_true",
                        help="clone the pods' VMs from a template (built first)")
    parser.add_argument("--pool", type=int, default=0, metavar="N",
                        help="keep N restored clones waiting (implies --factory)")
    parser.add_argument("--no-runc", action="store_true", help="only Hull's batch")
    parser.add_argument("--log", type=Path, metavar="FILE",
                        help="keep containerd's log (with the shims' lines) in FILE")
    args = parser.parse_args()
    n = args.pods
    with cri_containerd() as env:
        runc = None if args.no_runc else batch(env, "runc", n, args.via)
        with (factory(env, args.pool) if args.factory or args.pool
              else contextlib.nullcontext()):
            hull = batch(env, "hull", n, args.via)
        phases, notes = (pod_phases(env.containerd.log, [f"hull-{i}" for i in range(n)])
                         if args.via == "cri" else ([], []))
        if args.log:
            shutil.copy(env.containerd.log, args.log)
    mode = (f"from a pool of {args.pool} clones" if args.pool
            else "cloned from a template" if args.factory else "cold boots")
    how = ("CRI (RunPodSandbox + CreateContainer + StartContainer of busybox sleep)"
           if args.via == "cri" else "ctr (`ctr run -d` of busybox sleep, a pod each)")
    print(f"machine: {machine()}; containerd 1.6, {n} pods started concurrently through "
          f"{how}; hull: {mode}\n")
    print("| what | hull | runc | ratio |\n|---|---|---|---|")
    rows = [(f"wall time, {n} pods", "wall", "s"), ("median per-pod start", "median", "s"),
            ("host CPU per pod start (whole host, busy time / pods)", "cpu", "s"),
            ("host PSS per pod (shim + all below it)", "pss_mib", "MiB"),
            (f"wall time, removing {n} pods", "removal", "s")]
    for what, key, unit in rows:
        h = hull[key]
        r = runc[key] if runc else None
        other = f"{r:.2f} {unit} | {h / r:.1f}x" if r else "- | -"
        print(f"| {what} | {h:.2f} {unit} | {other} |")
    print("\nPSS per pod by process (MiB):")
    for name, result in (("hull", hull), ("runc", runc)):
        if result is None:
            continue
        parts = ", ".join(f"{k[4:-4]} {v:.1f}" for k, v in result.items()
                          if k.startswith("pss_") and k != "pss_mib")
        print(f"- {name}: {parts} ({result['shims']:.0f} shims)")
    print("\nCPU per pod by process, since each started (s; a pooled QEMU's includes its "
          "restore and its wait in the pool):")
    for name, result in (("hull", hull), ("runc", runc)):
        if result is not None:
            print(f"- {name}: " + ", ".join(f"{k[4:-2]} {v:.2f}" for k, v in result.items()
                                            if k.startswith("cpu_") and k.endswith("_s")))
    print("\nCPU during the start of the pods, per pod, by kind of process over the whole "
          "host (s; the busiest first, those above 5 ms):")
    for name, result in (("hull", hull), ("runc", runc)):
        if result is not None:
            print(f"- {name}: " + ", ".join(
                f"{k[6:-2]} {v:.3f}" for k, v in result.items()
                if k.startswith("burst_") and v >= 0.005))
    if args.via != "cri":
        return
    print(f"\nWhere a Hull pod's start went ({n} pods at once; medians over the pods):\n")
    print(phase_table("phase", phases))
    print("\nThe shims' boot lines:")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
