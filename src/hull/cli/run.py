"""hull run: create and start a container in its own VM.

In the foreground (the default), `hull` itself relays the container's stdio and signals
and exits with its status; with --detach it is `create` followed by `start`.
"""

from __future__ import annotations

import argparse

from hull.cli.common import runtime
from hull.cli.context import Context
from hull.cli.create import add_create_flags, warn_preserve_fds
from hull.config.annotations import apply_annotations
from hull.oci import bundle as oci_bundle
from hull.runtime import run as runtime_run
from hull.runtime.lifecycle import write_pid_file
from hull.runtime.state import check_id


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="create and run a container in its own VM",
                       description="Create and run a container (in its own VM). The exit "
                       "status is the container process's (128+N when killed by signal N).")
    add_create_flags(p)
    p.add_argument("--detach", "-d", action="store_true",
                   help="detach from the container's process (create, then start)")
    p.add_argument("container_id", metavar="ID", help="the container's unique id")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    check_id(args.container_id)
    warn_preserve_fds(args.preserve_fds, args.container_id)
    bundle = oci_bundle.load(args.bundle)
    if args.detach:
        rt = runtime(ctx)
        rt.create(args.container_id, bundle, args.pid_file, args.console_socket)
        try:
            rt.start(args.container_id)
        except BaseException:
            rt.delete(args.container_id, force=True)
            raise
        return 0
    if args.pid_file:
        import os

        write_pid_file(args.pid_file, os.getpid())
    config = apply_annotations(ctx.config, bundle.annotations)
    return runtime_run.run(config, ctx.root, args.container_id, bundle)
