"""hull delete: remove a stopped container, its VM and all its state."""

from __future__ import annotations

import argparse

from hull.cli.common import runtime
from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("delete", help="delete a container",
                       description="Delete a stopped container: its VM, helper processes "
                       "and state. With --force, kill it first if it runs.")
    p.add_argument("--force", "-f", action="store_true",
                   help="kill the container if it still runs; succeed if it does not exist")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    runtime(ctx).delete(args.container_id, args.force)
    return 0
