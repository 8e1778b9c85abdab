"""hull state: the container's state as runtime-spec JSON (plus runc's extra fields)."""

from __future__ import annotations

import argparse

from hull.cli.common import print_json, runtime
from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("state", help="output the state of a container")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    print_json(runtime(ctx).state_json(args.container_id))
    return 0
