"""`hull run /bin/true` beside `runc run` on the same busybox bundle; plus boot time.

Usage: python -m benchmarks.bench_run [--reps N]
Prints medians and ratios as a markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from benchmarks.common import busybox_bundle, machine, report, run_quiet, timed

HULL = [sys.executable, "-m", "hull"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        bundle = busybox_bundle(work / "bundle", ["/bin/true"])
        hull_root, runc_root = work / "hull-state", work / "runc-state"
        log = work / "hull.log"
        hull_times, runc_times, boot_times = [], [], []
        for i in range(args.reps):
            runc_times.append(timed(lambda i=i: run_quiet(
                ["runc", "--root", str(runc_root), "run", "-b", str(bundle), f"r{i}"])))
            hull_times.append(timed(lambda i=i: run_quiet(
                [*HULL, "--root", str(hull_root), "--debug", "--log", str(log), "run",
                 "-b", str(bundle), f"h{i}"])))
        boot_times = [float(m) for m in re.findall(r"ready in ([0-9.]+)s", log.read_text())]
    print(f"machine: {machine()}; {args.reps} repetitions, interleaved\n")
    print(report([("run /bin/true (create, start, exit, delete)", hull_times, runc_times),
                  ("qemu start -> agent ready", boot_times, [])]))


if __name__ == "__main__":
    main()
