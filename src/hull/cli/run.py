"""hull run: create and start a container in its own VM, in the foreground."""

from __future__ import annotations

import argparse

from hull.cli.context import Context
from hull.oci import bundle as oci_bundle
from hull.runtime import run as runtime_run
from hull.runtime.state import check_id


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="create and run a container in its own VM",
                       description="Create and run a container (in its own VM). The exit "
                       "status is the container process's (128+N when killed by signal N).")
    p.add_argument("--bundle", "-b", default=".",
                   help="path to the OCI bundle (default: the current directory)")
    p.add_argument("container_id", metavar="ID", help="the container's unique id")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    check_id(args.container_id)
    bundle = oci_bundle.load(args.bundle)
    return runtime_run.run(ctx.config, ctx.root, args.container_id, bundle)
