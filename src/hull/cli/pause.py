"""hull pause / hull resume: freeze and thaw a container (its whole VM)."""

from __future__ import annotations

import argparse

from hull.cli.common import runtime
from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pause", help="pause all processes of a container",
                       description="Pause the container: its VM's vCPUs are stopped.")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=lambda ctx, args: _do(ctx, args, pause=True))
    p = sub.add_parser("resume", help="resume a paused container")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=lambda ctx, args: _do(ctx, args, pause=False))


def _do(ctx: Context, args: argparse.Namespace, pause: bool) -> int:
    rt = runtime(ctx)
    (rt.pause if pause else rt.resume)(args.container_id)
    return 0
