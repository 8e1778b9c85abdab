"""hull debug: a shell or a command in the guest VM itself (outside the container)."""

from __future__ import annotations

import argparse
import asyncio

from hull.cli.context import Context
from hull.errors import ContainerNotFound, HullError
from hull.runtime.debugexec import debug_exec
from hull.runtime.state import ContainerDir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "debug", help="run a shell or a command in a container's guest VM (debugging)",
        description="Run COMMAND (default: an interactive shell) in the guest VM of "
        "container ID, in the guest's root and outside the container: to look at the "
        "guest kernel, mounts and processes. Needs hypervisor.debug_console = true in the "
        "configuration and a guest image built with `hull image build --with-busybox` "
        "(the image has no shell otherwise). Exits with the command's status.")
    p.add_argument("container_id", metavar="ID", help="the container")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the command and its arguments (after --)")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    cdir = ContainerDir(ctx.root, args.container_id)
    if not cdir.exists():
        raise ContainerNotFound(args.container_id)
    try:
        return asyncio.run(debug_exec(cdir, command))
    except OSError as exc:
        raise HullError(f"container {cdir.id}: debug: {exc}") from exc
