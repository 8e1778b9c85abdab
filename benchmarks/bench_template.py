"""`hull run /bin/true` booted cold, cloned from a VM template, and leased from the pool
of clones, beside `runc run`, with where the time goes; and host memory (PSS) per idle
sandbox, cold vs clone.

Usage: python -m benchmarks.bench_template [--reps N] [--idle N] [--pool N]

Makes a template of its own (`hull factory init`, in a private directory under /dev/shm,
removed afterwards) for the effective configuration ($HULL_CONFIG or
/etc/hull/configuration.toml) with factory.enabled set; cold runs use the same
configuration with the factory off, pooled runs the same template with factory.pool_size
set (the pool daemon `factory init` started; before each pooled run the pool is let
refill, so that run only has to lease a clone, as under a steady trickle of work).
Runs are interleaved: runc, hull cold, hull clone, hull pooled. Each `hull run` logs its
phases (--debug): the tables give their medians, and the CPU time of `hull` with the
children it reaped (its QEMU, except for a pooled clone's: the pool daemon's child).

Idle sandboxes: ``--idle`` sandboxes of each kind are created (`hull create`, the
container created, not started) and kept alive together; PSS is summed over QEMU and the
Hull processes serving each (its `hull proxy` and shim: `hull monitor`'s
accounting), so pages clones share with the template and with each other count once,
split between them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

from benchmarks.bench_run import HullRuns
from benchmarks.common import (
    busybox_bundle,
    hull_command,
    machine,
    median_ms,
    phase_table,
    report,
    run_timed,
    sandbox_overhead,
)


def write_config(work: Path, name: str, **factory: Any) -> Path:
    source = Path(os.environ.get("HULL_CONFIG", "/etc/hull/configuration.toml"))
    data: dict[str, dict[str, Any]] = (tomllib.loads(source.read_text())
                                       if source.is_file() else {})
    data.setdefault("factory", {}).update(factory)
    path = work / f"{name}.toml"
    # JSON scalars and lists of strings are valid TOML values.
    path.write_text("".join(f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                      for k, v in keys.items())
                            for table, keys in data.items()))
    return path


def idle_pss(hull: list[str], root: Path, config: Path, bundle: Path, count: int, tag: str
             ) -> list[float]:
    """MiB per sandbox (QEMU, proxy and shims), with ``count`` idle sandboxes alive at
    once."""
    ids = [f"idle-{tag}-{i}" for i in range(count)]
    created: list[str] = []
    try:
        for sid in ids:
            # Not run_timed: the daemons `hull create` leaves behind inherit its stderr.
            done = subprocess.run([*hull, "--config", str(config), "create", "-b",
                                   str(bundle), sid], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  check=False, timeout=120)
            if done.returncode != 0:
                raise SystemExit(f"hull create {sid} failed")
            created.append(sid)
        time.sleep(2)  # let every guest settle
        overhead = sandbox_overhead(root)
        return [sum(overhead.get(sid, {}).values()) / 2**20 for sid in ids]
    finally:
        for sid in created:
            subprocess.run([*hull, "delete", "--force", sid], capture_output=True, check=False)


def wait_refilled(hull: list[str], config: Path, size: int, timeout: float = 60) -> None:
    """Until the pool has ``size`` idle clones again (`hull factory status --json`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run([*hull, "--config", str(config), "factory", "status", "--json"],
                              capture_output=True, check=False)
        pool = json.loads(done.stdout or b"{}").get("pool") or {}
        if pool.get("idle") == size:
            return
        time.sleep(0.2)
    raise SystemExit(f"the pool did not refill to {size} clones within {timeout:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--idle", type=int, default=4,
                        help="idle sandboxes of each kind alive at once for the PSS figures")
    parser.add_argument("--pool", type=int, default=2, help="factory.pool_size of the pooled "
                        "runs (0: none)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    template_dir = Path("/dev/shm") / f"hull-bench-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        cold = write_config(work, "cold", enabled=False)
        warm = write_config(work, "warm", enabled=True, template_dir=str(template_dir))
        pooled = write_config(work, "pooled", enabled=True, template_dir=str(template_dir),
                              pool_size=args.pool)
        hull = [*hull_command(), "--root", str(work / "state")]
        try:
            init, _ = run_timed([*hull, "--config", str(pooled), "factory", "init"])
            bundle = busybox_bundle(work / "bundle", ["/bin/true"])
            runc: list[float] = []
            kinds = {"cold": HullRuns("c", work, bundle, cold),
                     "clone": HullRuns("w", work, bundle, warm)}
            if args.pool:
                kinds["pooled"] = HullRuns("p", work, bundle, pooled)
            for i in range(args.reps):
                runc.append(run_timed(
                    ["runc", "--root", str(work / "runc-state"), "run", "-b", str(bundle),
                     f"r{i}"])[0])
                for kind, runs in kinds.items():
                    if kind == "pooled":
                        wait_refilled(hull, pooled, args.pool)
                    runs.once(i)
                    if kind != "cold" and "booting cold" in runs.stderr:
                        raise SystemExit(f"the {kind} run booted cold: {runs.stderr.strip()}")
            idle_bundle = busybox_bundle(work / "idle", ["/bin/sleep", "1000"])
            pss_cold = idle_pss(hull, work / "state", cold, idle_bundle, args.idle, "cold")
            pss_clone = idle_pss(hull, work / "state", warm, idle_bundle, args.idle, "clone")
        finally:
            subprocess.run([*hull, "--config", str(pooled), "factory", "destroy"],
                           capture_output=True, check=False)
            shutil.rmtree(template_dir, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.reps} repetitions of each, interleaved; `hull factory init` took "
          f"{init:.2f}s; load average afterwards {load}\n")
    names = {"cold": "cold boot", "clone": "cloned from a template",
            "pooled": "leased from the pool"}
    print(report([(f"run /bin/true, {names[kind]}", runs.walls, runc)
                  for kind, runs in kinds.items()]))
    print()
    print("| CPU time of `hull run` and the children it reaped | median |\n|---|---|")
    for kind, runs in kinds.items():
        print(f"| {names[kind]} | {median_ms(runs.cpus):.0f} ms |")
    for kind, runs in kinds.items():
        if kind != "cold":
            print()
            print(phase_table(f"`hull run /bin/true`, {names[kind]}, by phase",
                              runs.run_phases))
            print()
            print(phase_table(f"VM ready, {names[kind]}, by phase", runs.boot_phases))
    print()
    print(f"| host PSS per idle sandbox ({args.idle} alive at once) | median | min | max |")
    print("|---|---|---|---|")
    for what, values in (("cold boot", pss_cold), ("clone", pss_clone)):
        ordered = sorted(values)
        print(f"| {what} | {ordered[len(ordered) // 2]:.1f} MiB | {ordered[0]:.1f} MiB | "
              f"{ordered[-1]:.1f} MiB |")


if __name__ == "__main__":
    main()
