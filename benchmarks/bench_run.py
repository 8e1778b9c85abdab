"""`hull run /bin/true` beside `runc run` on the same busybox bundle, and where the time goes.

Usage: python -m benchmarks.bench_run [--reps N] [--image PATH] [--no-profile]

Each repetition runs, in turn: `runc run`; `hull run`; and, unless --no-profile, `hull run`
with HULL_PROFILE=1 on the guest kernel command line, so the agent also reports the
kernel's own boot marks (reading them costs the guest a few ms: these runs give the boot
breakdown, not the headline). ``--image PATH`` adds `hull run`s that boot another guest
image, e.g. one from `hull image build --compression none`, to compare.

Prints markdown: the machine; medians (and minimums) with ratios; the phases of `hull run`
from its --debug log (host process, VM boot, container create, start, run, teardown); the
phases of the boot (QEMU start, kernel, python start, agent imports and init, handshake).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from benchmarks.common import (
    busybox_bundle,
    hull_command,
    machine,
    phase_table,
    report,
    run_timed,
)

#: "run ID timing: total 1.790s: setup 0.001s, boot 1.495s, ..." (hull.runtime.run)
RUN_TIMING = re.compile(r"run \S+ timing: total ([0-9.]+)s: (.*)")
#: "sandbox ID ready in 1.505s: qemu start 0.035s, ..." (hull.runtime.sandbox)
BOOT = re.compile(r"sandbox \S+ ready in ([0-9.]+)s: (.*)")
PHASE = re.compile(r"\s*([a-z+ ]+?) ([0-9.]+)s")
#: The phases of hull.runtime.run's timeline, as the tables name them.
RUN_PHASES = {"host start": "host: python start, imports",
              "setup": "setup (state dir, bundle)",
              "boot": "VM ready (boot, restore or lease; hello)",
              "create": "container create", "start": "container start",
              "run": "process runs, exit event", "drain": "output drained",
              "teardown": "teardown (agent shutdown, QEMU exit)", "cleanup": "cleanup"}


def phases(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in PHASE.finditer(text)}


def config_with(work: Path, name: str, **hypervisor: str) -> Path:
    """The effective configuration plus ``hypervisor`` settings, as a file for HULL_CONFIG."""
    source = Path(os.environ.get("HULL_CONFIG", "/etc/hull/configuration.toml"))
    data: dict[str, dict[str, Any]] = tomllib.loads(source.read_text()) if source.is_file() else {}
    data.setdefault("hypervisor", {})
    for key, value in hypervisor.items():
        if key == "kernel_params":
            value = f"{data['hypervisor'].get(key, '')} {value}".strip()
        data["hypervisor"][key] = value
    path = work / f"{name}.toml"
    path.write_text("".join(f"[{table}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
                            for table, keys in data.items()))
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class HullRuns:
    """`hull run`s of one configuration: wall times and the phases their logs give."""

    def __init__(self, label: str, work: Path, bundle: Path, config: Path | None) -> None:
        self.label, self.work, self.bundle, self.config = label, work, bundle, config
        self.walls: list[float] = []
        #: CPU seconds of `hull` and the children it reaped (its QEMU, unless pooled)
        self.cpus: list[float] = []
        self.stderr = ""
        self.boots: list[float] = []
        self.run_phases: list[dict[str, float]] = []
        self.boot_phases: list[dict[str, float]] = []

    def once(self, i: int) -> None:
        log = self.work / f"{self.label}-{i}.log"
        env = dict(os.environ, **({"HULL_CONFIG": str(self.config)} if self.config else {}))
        argv = [*hull_command(), "--root", str(self.work / "hull-state"), "--debug",
                "--log", str(log), "run", "-b", str(self.bundle), f"{self.label}{i}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, self.stderr = run_timed(argv, env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        text = log.read_text()
        run, boot = RUN_TIMING.search(text), BOOT.search(text)
        if run is None or boot is None:
            raise SystemExit(f"no timing lines in {log}: is this hull too old?")
        self.walls.append(wall)
        self.boots.append(float(boot.group(1)))
        # The time line starts when the process did ("host start": python, imports).
        steps = {"host process exec and exit": wall - float(run.group(1))}
        steps.update((RUN_PHASES.get(k, k), v) for k, v in phases(run.group(2)).items())
        self.run_phases.append(steps)
        self.boot_phases.append(phases(boot.group(2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--image", help="also run hull with this guest image (an initrd)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiled runs (and the kernel/python split)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="hull-bench-") as tmp:
        work = Path(tmp)
        bundle = busybox_bundle(work / "bundle", ["/bin/true"])
        plain = HullRuns("h", work, bundle, None)
        variants = [plain]
        other = None
        if args.image:
            other = HullRuns("i", work, bundle, config_with(work, "image", image=args.image))
            variants.append(other)
        profiled = None
        if not args.no_profile:
            profiled = HullRuns("p", work, bundle,
                                config_with(work, "profile", kernel_params="HULL_PROFILE=1"))
            variants.append(profiled)
        runc: list[float] = []
        for i in range(args.reps):
            runc.append(run_timed(["runc", "--root", str(work / "runc-state"), "run", "-b",
                                   str(bundle), f"r{i}"])[0])
            for runs in variants:
                runs.once(i)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{args.reps} repetitions of each, interleaved; load average afterwards {load}\n")
    rows = [("run /bin/true (create, start, exit, delete)", plain.walls, runc)]
    if other is not None:
        rows.append((f"... booting {args.image}", other.walls, runc))
    rows.append(("QEMU start -> agent ready", plain.boots, []))
    if other is not None:
        rows.append((f"... booting {args.image}", other.boots, []))
    print(report(rows))
    print()
    print(phase_table("`hull run /bin/true`, by phase", plain.run_phases))
    print()
    source = profiled or plain
    what = ("the boot, by phase (HULL_PROFILE=1 runs)" if profiled
            else "the boot, by phase")
    print(phase_table(what, source.boot_phases))
    if profiled:
        median = statistics.median(profiled.walls) * 1000
        print(f"\n(profiled runs: `hull run` median {median:.0f} ms)")


if __name__ == "__main__":
    main()
