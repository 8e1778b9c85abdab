"""hull exec: run a new process inside a running container."""

from __future__ import annotations

import argparse

from hull.cli.common import runtime
from hull.cli.context import Context
from hull.errors import HullError
from hull.runtime.execproc import build_process, exec_process


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("exec", help="execute a new process inside a container",
                       description="Run a process in a running container. Without "
                       "--detach, exit with the process's status.")
    p.add_argument("--process", "-p", default=None, help="path to a process.json")
    p.add_argument("--detach", "-d", action="store_true", help="detach from the process")
    p.add_argument("--pid-file", default=None, help="file to write the process pid to")
    p.add_argument("--console-socket", default=None,
                   help="AF_UNIX socket that receives the pty master")
    p.add_argument("--tty", "-t", action="store_true", help="allocate a pseudo-TTY")
    p.add_argument("--cwd", default=None, help="working directory in the container")
    p.add_argument("--env", "-e", action="append", default=[], help="KEY=VALUE to add")
    p.add_argument("--user", "-u", default=None, help="UID[:GID]")
    p.add_argument("--preserve-fds", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-new-privs", action="store_true", help="set no_new_privileges")
    p.add_argument("container_id", metavar="ID")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    try:
        return _execute(ctx, args)
    except HullError as exc:
        exc.exit_code = 255  # runc exec: 255 on error, else the process's status
        raise


def _execute(ctx: Context, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    _, state = rt.load(args.container_id)
    from hull.runtime.lifecycle import load_spec

    base = load_spec(state).get("process", {})
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    process = build_process(base, args.process, command, args.tty, args.cwd, args.env,
                            args.user)
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    return exec_process(rt, args.container_id, process, args.detach, args.pid_file,
                        args.console_socket)
