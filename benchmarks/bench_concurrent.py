"""N sandboxes started concurrently, through the CLI and through the shim v2, beside runc.

Usage: python -m benchmarks.bench_concurrent [--count N] [--reps R] [--pool P] [--cold]

CLI: N threads each run `hull create` + `hull start` of busybox `sleep` (runc: `runc
create` + `runc start` of the same bundle); the figure is the wall time until all N are
started. Shim v2: a private containerd 1.6 (the tests' fixture), N concurrent
`ctr run -d` with io.containerd.hull.v2 beside io.containerd.runc.v2. Everything is
deleted after each batch; batches are interleaved (runc, hull) R times; medians and
ratios. Sandboxes are clones of a template of their own (`hull factory init` under
/dev/shm, destroyed at the end; optionally with a pool of P clones), or boot cold with
--cold. With a pool, each Hull burst waits until the pool has refilled after the last
(`hull factory status`): a burst of at most P then meets P ready clones, as a burst after
a quiet spell does in production; the refill itself runs between bursts, untimed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.containerd_fixture import RUNTIME, Containerd

from benchmarks.bench_template import wait_refilled, write_config
from benchmarks.common import busybox_bundle, hull_command, machine, report, run_quiet

RUNC_RUNTIME = "io.containerd.runc.v2"


def batch(count: int, start: Callable[[int], None], cleanup: Callable[[int], None]
          ) -> float:
    """Wall time until ``count`` concurrent starts are all done; then cleanup."""
    with ThreadPoolExecutor(count) as pool:
        began = time.perf_counter()
        list(pool.map(start, range(count)))
        wall = time.perf_counter() - began
        list(pool.map(cleanup, range(count)))
    return wall


def quiet(argv: list[str]) -> None:
    """Run without pipes (a `hull create` leaves daemons that would hold them)."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pool", type=int, default=0, help="factory.pool_size")
    parser.add_argument("--cold", action="store_true", help="no template: cold boots")
    args = parser.parse_args()
    n = args.count
    print(f"machine: {machine()}")
    template_dir = Path("/dev/shm") / f"hull-bench-{uuid.uuid4().hex[:12]}"
    walls: dict[str, list[float]] = {k: [] for k in ("cli", "cli-runc", "shim", "shim-runc")}
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        config = write_config(work, "bench", enabled=not args.cold,
                              template_dir=str(template_dir), pool_size=args.pool)
        hull = [*hull_command(), "--root", str(work / "state"), "--config", str(config)]
        runc = ["runc", "--root", str(work / "runc-state")]
        bundle = busybox_bundle(work / "bundle", ["/bin/sleep", "100000"])
        ctrd = Containerd(Path(tempfile.mkdtemp(prefix="hullbc-", dir="/tmp")))
        ctrd.env["HULL_CONFIG"] = str(config)
        try:
            if not args.cold:
                run_quiet([*hull, "factory", "init"])
                time.sleep(2 + args.pool * 2)  # let the pool fill
            ctrd.start()
            rootfs = bundle / "rootfs"

            def refilled() -> None:
                """A burst meets a full pool: the one before it was deleted and the pool
                restored its clones meanwhile, as between bursts in production."""
                if args.pool and not args.cold:
                    wait_refilled(hull, config, args.pool, timeout=120)
                    time.sleep(1)  # the last restore's warm-up settles

            for rep in range(args.reps):
                def runc_start(i: int, rep: int = rep) -> None:
                    quiet([*runc, "create", "-b", str(bundle), f"r{rep}-{i}"])
                    quiet([*runc, "start", f"r{rep}-{i}"])

                def hull_start(i: int, rep: int = rep) -> None:
                    quiet([*hull, "create", "-b", str(bundle), f"h{rep}-{i}"])
                    quiet([*hull, "start", f"h{rep}-{i}"])

                def ctr_run(runtime: str, prefix: str) -> Callable[[int], None]:
                    def run(i: int) -> None:
                        ctrd.ctr("run", "-d", "--runtime", runtime, "--rootfs", str(rootfs),
                                 f"{prefix}{i}", "/bin/sleep", "100000")
                    return run

                def deleter(argv: list[str], prefix: str) -> Callable[[int], None]:
                    return lambda i: run_quiet([*argv, "delete", "--force", f"{prefix}{i}"])

                def ctr_gone(prefix: str) -> Callable[[int], None]:
                    def gone(i: int) -> None:
                        ctrd.ctr("task", "kill", "-s", "SIGKILL", f"{prefix}{i}", check=False)
                        for _ in range(100):
                            if ctrd.ctr("task", "delete", f"{prefix}{i}",
                                        check=False).returncode == 0:
                                break
                            time.sleep(0.1)
                        ctrd.ctr("containers", "rm", f"{prefix}{i}", check=False)
                    return gone

                walls["cli-runc"].append(batch(n, runc_start, deleter(runc, f"r{rep}-")))
                refilled()
                walls["cli"].append(batch(n, hull_start, deleter(hull, f"h{rep}-")))
                walls["shim-runc"].append(batch(n, ctr_run(RUNC_RUNTIME, f"sr{rep}-"),
                                                ctr_gone(f"sr{rep}-")))
                refilled()
                walls["shim"].append(batch(n, ctr_run(RUNTIME, f"sh{rep}-"),
                                           ctr_gone(f"sh{rep}-")))
        finally:
            ctrd.cleanup()
            ctrd.stop()
            shutil.rmtree(ctrd.base, ignore_errors=True)
            if not args.cold:
                subprocess.run([*hull, "factory", "destroy"], capture_output=True,
                               check=False)
    how = "cold boots" if args.cold else f"clones of a template, pool_size {args.pool}"
    print(f"\n{n} sandboxes started concurrently, {args.reps} batches of each, interleaved; "
          f"{how}; load average afterwards {os.getloadavg()[0]:.2f}\n")
    print(report([(f"{n} x create+start through the CLI", walls["cli"], walls["cli-runc"]),
                  (f"{n} x ctr run -d through the shim v2", walls["shim"],
                   walls["shim-runc"])]))


if __name__ == "__main__":
    main()
