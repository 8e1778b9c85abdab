"""hull ps: the container's processes as host pids (its shims: one per process)."""

from __future__ import annotations

import argparse
import subprocess

from hull.cli.common import print_json, runtime
from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ps", help="list the processes of a container",
                       description="List the container's processes by their host pids "
                       "(each process in the VM is represented by its shim on the host).")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("container_id", metavar="ID")
    p.add_argument("ps_args", nargs="*", metavar="PS_ARGS", help="options for ps (table)")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    pids = runtime(ctx).pids(args.container_id)
    if args.format == "json":
        print_json(pids, indent=None)
        return 0
    ps_args = args.ps_args or ["-f"]
    if not pids:
        pids = [0]  # ps prints the header only
    done = subprocess.run(["ps", *ps_args, "-p", ",".join(map(str, pids))], check=False)
    return 0 if done.returncode in (0, 1) else done.returncode
