"""`hull`: the runc-compatible command line. Parses arguments and calls into the runtime.

Each verb lives in its own module under hull.cli and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a callable ``(Context, Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from hull import __version__
from hull.cli.context import DEFAULT_ROOT, Context
from hull.errors import HullError
from hull.logids import setup_logging

#: The hull.cli modules, in --help order, with the verbs each registers. A command imports
#: only the module of its verb: the verbs' runtimes import asyncio, qemu.qmp, pyroute2,
#: prometheus_client ..., and importing them all cost every `hull` call ~100 ms (clients
#: call `hull` several times per container). Add a new verb's module here.
VERBS: dict[str, tuple[str, ...]] = {
    "create": ("create",), "start": ("start",), "run": ("run",), "state": ("state",),
    "kill": ("kill",), "delete": ("delete",), "exec_": ("exec",), "ps": ("ps",),
    "list_": ("list",), "pause": ("pause", "resume"), "spec": ("spec",),
    "features": ("features",), "check": ("check",), "kernel": ("kernel",),
    "image": ("image",), "helpers": ("proxy",), "events": ("events",),
    "update": ("update",), "env": ("env",), "logs": ("logs",), "debug": ("debug",),
    "monitor": ("monitor",), "factory": ("factory",),
}
log = logging.getLogger("hull")


class UsageError(HullError):
    """Bad command-line usage: one line, exit 1 (as runc), not argparse's usage dump."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


#: A parser built ahead (:func:`prebuild_parser`) and the modules of its verbs.
_prebuilt: tuple[argparse.ArgumentParser, list[str]] | None = None


def prebuild_parser(argv: Sequence[str]) -> None:
    """Build the parser for ``argv``'s verb now, for :func:`build_parser` to return
    whenever it is asked for the same verb. The fork server does it for the proxy verb
    before it forks proxies: each proxy then parses its command line with a parser it
    shares with the others, instead of building one of its own (~0.7 MiB of private
    memory in every proxy; docs/performance.md, host memory)."""
    global _prebuilt
    _prebuilt = None
    parser = build_parser(argv)
    _prebuilt = parser, _modules(parser, argv)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the subcommand that ``argv`` (default: sys.argv) names, or with
    all of them when it names none (see _modules)."""
    if _prebuilt is not None and _modules(_prebuilt[0], argv) == _prebuilt[1]:
        return _prebuilt[0]
    parser = Parser(
        prog="hull",
        description="Hull: an OCI runtime that runs every container in its own lightweight VM.",
    )
    parser.add_argument("--root", default=str(DEFAULT_ROOT),
                        help="directory for container state (default: %(default)s)")
    parser.add_argument("--log", default=None, help="log to this file instead of stderr")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log format (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.add_argument("--config", default=None,
                        help="configuration file (default: $HULL_CONFIG or "
                             "/etc/hull/configuration.toml)")
    parser.add_argument("--systemd-cgroup", action="store_true",
                        help="accepted for compatibility: cgroups live in the guest")
    parser.add_argument("--rootless", default="auto", choices=("true", "false", "auto"),
                        help="accepted for compatibility (default: %(default)s)")
    parser.add_argument("--criu", default="criu", help=argparse.SUPPRESS)
    parser.add_argument("--version", "-v", action="version",
                        version=f"hull version {__version__}\nspec: 1.1.0")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for module in _modules(parser, argv):
        importlib.import_module(f"hull.cli.{module}").register(sub)
    return parser


def _modules(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The module of the verb in ``argv``; all of them when there is none (--help) or it
    is not one we know (argparse then reports it as it always did)."""
    with_value = {opt for action in parser._actions if action.nargs != 0
                  for opt in action.option_strings}
    args = iter(sys.argv[1:] if argv is None else argv)
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-"):
            if "=" not in arg and arg in with_value:
                next(args, None)  # the option's value
            continue
        for module, verbs in VERBS.items():
            if arg in verbs:
                return [module]
        break
    return list(VERBS)


def main(argv: Sequence[str] | None = None) -> int:
    """The `hull` program; with ``argv`` (in-process callers) it returns the exit status."""
    code = _run(argv)
    if argv is None:
        exit_now(code)
    return code


def exit_now(code: int) -> NoReturn:
    """Exit with ``code`` without the interpreter's teardown when nothing is left to wait
    for: freeing the ~200 imported modules takes ~10 ms, and clients run `hull` several
    times per container (an exec: ~8% of its time). The atexit handlers (logging's flush)
    and the stdio flush still run; another non-daemon thread alive (sys.exit would join
    it) or a failing flush (sys.exit reports it) takes the ordinary way."""
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    setup_logging(args.log, args.log_format, args.debug,
                  container_id=getattr(args, "container_id", None))
    ctx = Context.from_args(args)
    try:
        code: int = args.func(ctx, args)
    except HullError as exc:
        log.debug("command failed", exc_info=True)
        if args.log:
            log.error(str(exc))
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
