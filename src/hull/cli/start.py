"""hull start: run the user process of a created container."""

from __future__ import annotations

import argparse

from hull.cli.common import runtime
from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("start", help="start a created container",
                       description="Execute the user process of a created container.")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    runtime(ctx).start(args.container_id)
    return 0
