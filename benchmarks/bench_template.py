"""`hull run /bin/true` booted cold vs cloned from a VM template, beside `runc run`; and
host memory (PSS) per idle sandbox, cold vs clone.

Usage: python -m benchmarks.bench_template [--reps N] [--idle N]

Makes a template of its own (`hull factory init`, in a private directory under /dev/shm,
removed afterwards) for the effective configuration ($HULL_CONFIG or
/etc/hull/configuration.toml) with factory.enabled set; cold runs use the same
configuration with the factory off. Runs are interleaved: runc, hull cold, hull clone.

Idle sandboxes: ``--idle`` sandboxes of each kind are created (`hull create`, the
container created, not started) and kept alive together; PSS is summed over QEMU and the
Hull processes serving each (its `hull proxy`), so pages clones share with the template
and with each other count once, split between them.
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

from benchmarks.common import busybox_bundle, hull_command, machine, pss_kib, report


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


def run_once(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode().strip()}")
    return wall, done.stderr.decode()


def sandbox_pss_kib(sandbox_id: str) -> int:
    """PSS of every process serving one sandbox: QEMU (-name hull-ID) and `hull proxy`."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if f"hull-{sandbox_id},debug-threads=on" in args or (
                "proxy" in args and any(sandbox_id in a for a in args)):
            total += pss_kib(int(pid))
    return total


def idle_pss(hull: list[str], config: Path, bundle: Path, count: int, tag: str
             ) -> list[float]:
    """MiB per sandbox, with ``count`` idle sandboxes alive at once."""
    ids = [f"idle-{tag}-{i}" for i in range(count)]
    created: list[str] = []
    try:
        for sid in ids:
            # Not run_once: the daemons `hull create` leaves behind inherit its stderr.
            done = subprocess.run([*hull, "--config", str(config), "create", "-b",
                                   str(bundle), sid], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  check=False, timeout=120)
            if done.returncode != 0:
                raise SystemExit(f"hull create {sid} failed")
            created.append(sid)
        time.sleep(2)  # let every guest settle
        return [sandbox_pss_kib(sid) / 1024 for sid in ids]
    finally:
        for sid in created:
            subprocess.run([*hull, "delete", "--force", sid], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--idle", type=int, default=4,
                        help="idle sandboxes of each kind alive at once for the PSS figures")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    template_dir = Path("/dev/shm") / f"hull-bench-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        cold = write_config(work, "cold", enabled=False)
        warm = write_config(work, "warm", enabled=True, template_dir=str(template_dir))
        hull = [*hull_command(), "--root", str(work / "state")]
        try:
            init, _ = run_once([*hull, "--config", str(warm), "factory", "init"])
            bundle = busybox_bundle(work / "bundle", ["/bin/true"])
            walls: dict[str, list[float]] = {"runc": [], "cold": [], "clone": []}
            for i in range(args.reps):
                walls["runc"].append(run_once(
                    ["runc", "--root", str(work / "runc-state"), "run", "-b", str(bundle),
                     f"r{i}"])[0])
                walls["cold"].append(run_once(
                    [*hull, "--config", str(cold), "run", "-b", str(bundle), f"c{i}"])[0])
                wall, err = run_once(
                    [*hull, "--config", str(warm), "run", "-b", str(bundle), f"w{i}"])
                if "booting cold" in err:
                    raise SystemExit(f"the clone booted cold: {err.strip()}")
                walls["clone"].append(wall)
            idle_bundle = busybox_bundle(work / "idle", ["/bin/sleep", "1000"])
            pss_cold = idle_pss(hull, cold, idle_bundle, args.idle, "cold")
            pss_clone = idle_pss(hull, warm, idle_bundle, args.idle, "clone")
        finally:
            shutil.rmtree(template_dir, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.reps} repetitions of each, interleaved; `hull factory init` took "
          f"{init:.2f}s; load average afterwards {load}\n")
    print(report([("run /bin/true, cold boot", walls["cold"], walls["runc"]),
                  ("run /bin/true, cloned from a template", walls["clone"], walls["runc"])]))
    print()
    print(f"| host PSS per idle sandbox ({args.idle} alive at once) | median | min | max |")
    print("|---|---|---|---|")
    for what, values in (("cold boot", pss_cold), ("clone", pss_clone)):
        ordered = sorted(values)
        print(f"| {what} | {ordered[len(ordered) // 2]:.1f} MiB | {ordered[0]:.1f} MiB | "
              f"{ordered[-1]:.1f} MiB |")


if __name__ == "__main__":
    main()
