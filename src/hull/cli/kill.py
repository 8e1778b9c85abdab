"""hull kill: send a signal to the container's init (or all its processes)."""

from __future__ import annotations

import argparse

from hull.cli.common import parse_signal, runtime
from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("kill", help="send a signal to a container's process",
                       description="Send SIGNAL (a name, SIG-name or number; default "
                       "SIGTERM) to the container's init process.")
    p.add_argument("--all", "-a", action="store_true",
                   help="send the signal to all processes of the container")
    p.add_argument("container_id", metavar="ID")
    p.add_argument("signal", nargs="?", default="SIGTERM", metavar="SIGNAL")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    signum = parse_signal(args.signal)
    runtime(ctx).kill(args.container_id, signum, args.all)
    return 0
