"""hull create: create a container (its VM, proxy and init shim), stopped before exec."""

from __future__ import annotations

import argparse
import logging

from hull.cli.common import runtime
from hull.cli.context import Context
from hull.oci import bundle as oci_bundle
from hull.runtime.state import check_id

log = logging.getLogger("hull")


def add_create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", "-b", default=".",
                   help="path to the OCI bundle (default: the current directory)")
    p.add_argument("--console-socket", default=None,
                   help="AF_UNIX socket that receives the pty master (with terminal: true)")
    p.add_argument("--pid-file", default=None, help="file to write the container pid to")
    p.add_argument("--no-pivot", action="store_true",
                   help="accepted for compatibility (the guest root is set up by the agent)")
    p.add_argument("--no-new-keyring", action="store_true",
                   help="accepted for compatibility (each container has its own VM kernel)")
    p.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                   help="extra fds for the process (not passed: they cannot cross into a VM)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("create", help="create a container",
                       description="Create a container in its own VM. The process waits "
                       "before exec until `hull start`.")
    add_create_flags(p)
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    check_id(args.container_id)
    warn_preserve_fds(args.preserve_fds, args.container_id)
    bundle = oci_bundle.load(args.bundle)
    runtime(ctx).create(args.container_id, bundle, args.pid_file, args.console_socket)
    return 0


def warn_preserve_fds(count: int, container_id: str) -> None:
    if count < 0:
        from hull.errors import HullError

        raise HullError(f"--preserve-fds must not be negative, not {count}")
    if count:
        log.warning("container %s: --preserve-fds %d ignored: host file descriptors cannot "
                    "be passed into the VM", container_id, count)
