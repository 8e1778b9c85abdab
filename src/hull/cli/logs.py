"""hull logs: a sandbox's guest console and the agent's own log."""

from __future__ import annotations

import argparse
import sys

from hull.cli.context import Context
from hull.errors import ContainerNotFound, HullError
from hull.runtime import guestlog
from hull.runtime.state import ContainerDir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "logs", help="show a container's guest console and agent log",
        description="Show the guest console of container ID's VM (kernel messages and the "
        "agent's lines) and the log of the Hull agent in the guest, or only one of them. "
        "The host-side logs of the proxy and shims are proxy.log and shim.log in the "
        "container's state directory (--root/ID).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--console", action="store_true",
                       help="only the guest console, as the VM wrote it")
    which.add_argument("--agent", action="store_true",
                       help="only the agent's log (its lines of the console, unprefixed)")
    p.add_argument("--tail", type=int, default=0, metavar="N",
                   help="only the last N lines (default: all)")
    p.add_argument("container_id", metavar="ID", help="the container")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    cdir = ContainerDir(ctx.root, args.container_id)
    if not cdir.path.is_dir():
        raise ContainerNotFound(args.container_id)
    try:
        text = cdir.console_log.read_bytes().decode(errors="replace").replace("\r", "")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise HullError(f"container {cdir.id}: cannot read {cdir.console_log}: "
                        f"{exc.strerror}") from exc
    console = text.splitlines()
    agent = guestlog.agent_lines(text)
    if args.agent:
        lines = _tail(agent, args.tail)
    elif args.console:
        lines = _tail(console, args.tail)
    else:
        lines = [f"==> guest console ({cdir.console_log}) <==", *_tail(console, args.tail),
                 "==> hull agent <==", *_tail(agent, args.tail)]
    out = "\n".join(lines)
    sys.stdout.write(out + ("\n" if out else ""))
    return 0


def _tail(lines: list[str], count: int) -> list[str]:
    return lines[-count:] if count > 0 else lines
