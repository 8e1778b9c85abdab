"""The OCI CLI beside runc: create+start+delete, exec latency, stdout throughput, memory.

Usage: python -m benchmarks.bench_cli [--reps N] [--mib M] [--image PATH]

The same busybox bundle (process `sleep 1000`) for both runtimes, as clients drive them:

- create + start + delete --force, each command timed (stdio: /dev/null files; `hull
  create`'s stdio are inherited by the container's shim, so they must not be pipes the
  caller waits on);
- `exec ID /bin/true` in a running container, in the foreground (hull: its own shim);
- stdout throughput: `exec ID dd if=/dev/zero bs=64k count=...` with stdout a pipe this
  script reads to EOF; MB/s over the whole command, exec start-up included (``--mib``
  sets the size: the larger, the less the start-up weighs);
- host memory of an idle sandbox: PSS of its QEMU, proxy and shim processes (hull only).

Repetitions are interleaved (runc, hull, runc, hull ...). ``--image PATH`` boots another
guest image for the hull side (e.g. one built with `--compression none`). Prints markdown.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.bench_run import config_with
from benchmarks.common import busybox_bundle, hull_command, machine, report, sandbox_overhead

DEVNULL = subprocess.DEVNULL


class Runtime:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env

    def run(self, *args: str) -> float:
        # stderr to a file, not a pipe: `hull create` leaves its proxy and shim running
        # with the stdio it was given, and a pipe would then never reach EOF.
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            done = subprocess.run([*self.argv, *args], stdin=DEVNULL, stdout=DEVNULL,
                                  stderr=err, env=self.env, check=False)
            took = time.perf_counter() - start
            if done.returncode != 0:
                err.seek(0)
                raise SystemExit(f"{self.name} {' '.join(args)} failed: "
                                 f"{err.read().decode(errors='replace').strip()}")
        return took

    def stream(self, cid: str, mib: int) -> tuple[float, int]:
        """(seconds, bytes) of exec dd with stdout a pipe read here to EOF."""
        argv = [*self.argv, "exec", cid, "dd", "if=/dev/zero", "bs=65536",
                f"count={mib * 16}"]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=DEVNULL, stdout=subprocess.PIPE,
                                stderr=DEVNULL, env=self.env)
        assert proc.stdout is not None
        total = 0
        while chunk := proc.stdout.read1(1 << 20):
            total += len(chunk)
        status = proc.wait()
        took = time.perf_counter() - start
        if status != 0 or total != mib << 20:
            raise SystemExit(f"{self.name} exec dd: status {status}, {total} bytes")
        return took, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--mib", type=int, default=200, help="MiB per throughput run")
    parser.add_argument("--image", help="boot this guest image (an initrd) for hull")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        bundle = busybox_bundle(work / "bundle", ["sleep", "1000"])
        env = dict(os.environ)
        if args.image:
            env["HULL_CONFIG"] = str(config_with(work, "image", image=args.image))
        hull_state = work / "hull-state"
        hull = Runtime("hull", [*hull_command(), "--root", str(hull_state)], env)
        runc = Runtime("runc", ["runc", "--root", str(work / "runc-state")], dict(os.environ))
        steps: dict[str, dict[str, list[float]]] = {
            r.name: {"create": [], "start": [], "delete": [], "total": []} for r in (runc, hull)}
        for i in range(args.reps):
            for rt in (runc, hull):
                cid = f"{rt.name}-c{i}"
                times = [rt.run("create", "--bundle", str(bundle), cid), rt.run("start", cid),
                         rt.run("delete", "--force", cid)]
                for name, took in zip(("create", "start", "delete"), times, strict=True):
                    steps[rt.name][name].append(took)
                steps[rt.name]["total"].append(sum(times))
        for rt in (runc, hull):
            rt.run("create", "--bundle", str(bundle), f"{rt.name}-x")
            rt.run("start", f"{rt.name}-x")
        try:
            pss = sandbox_overhead(hull_state)["hull-x"]
            execs: dict[str, list[float]] = {"runc": [], "hull": []}
            rates: dict[str, list[float]] = {"runc": [], "hull": []}
            for _ in range(args.reps):
                for rt in (runc, hull):
                    execs[rt.name].append(rt.run("exec", f"{rt.name}-x", "/bin/true"))
            for _ in range(max(3, args.reps // 3)):
                for rt in (runc, hull):
                    took, total = rt.stream(f"{rt.name}-x", args.mib)
                    rates[rt.name].append(took / (total / 1e6))  # seconds per MB
        finally:
            for rt in (runc, hull):
                subprocess.run([*rt.argv, "delete", "--force", f"{rt.name}-x"], env=rt.env,
                               stdout=DEVNULL, stderr=DEVNULL, check=False)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.reps} repetitions, interleaved; load average afterwards {load}\n")
    rows = [(f"{name} (`{name} --force`)" if name == "delete" else name,
             steps["hull"][name], steps["runc"][name])
            for name in ("create", "start", "delete")]
    rows.append(("create + start + delete", steps["hull"]["total"], steps["runc"]["total"]))
    rows.append(("exec /bin/true (foreground)", execs["hull"], execs["runc"]))
    print(report(rows))
    print()
    # Throughput: medians of seconds per MB, shown as MB/s (higher is better).
    h = 1 / sorted(rates["hull"])[len(rates["hull"]) // 2]
    r = 1 / sorted(rates["runc"])[len(rates["runc"]) // 2]
    print("| stdout throughput, exec dd | hull median (best) | runc median (best) | ratio |")
    print("|---|---|---|---|")
    print(f"| {args.mib} MiB through a pipe to the caller | {h:.0f} MB/s "
          f"({1 / min(rates['hull']):.0f}) | {r:.0f} MB/s ({1 / min(rates['runc']):.0f}) | "
          f"{h / r:.2f}x |")
    print()
    print("| host memory of an idle sandbox (PSS) | hull |")
    print("|---|---|")
    print(f"| QEMU | {pss['qemu'] / 2**20:.0f} MiB |")
    print(f"| proxy (`hull proxy`) | {pss['proxy'] / 2**20:.0f} MiB |")
    print(f"| shim of the init process | {pss['shims'] / 2**20:.0f} MiB |")
    print(f"| total | {sum(pss.values()) / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
