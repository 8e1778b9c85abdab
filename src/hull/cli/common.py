"""Helpers shared by verbs: the runtime from the context, signal names, JSON output."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from hull.cli.context import Context
from hull.errors import HullError
from hull.runtime.lifecycle import Runtime


def runtime(ctx: Context) -> Runtime:
    return Runtime(ctx.config, ctx.root, ctx.hull_argv(), ctx.log_path, ctx.log_format,
                   ctx.debug)


def parse_signal(text: str) -> int:
    """A signal as runc's kill takes it: a number, a name, with or without SIG."""
    if text.isdigit():
        number = int(text)
        if number in {int(s) for s in signal.valid_signals()} and number > 0:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        with_name = getattr(signal.Signals, name, None)
        if with_name is not None:
            return int(with_name)
        if name.startswith("SIGRTMIN") or name.startswith("SIGRTMAX"):
            base = signal.SIGRTMIN if name.startswith("SIGRTMIN") else signal.SIGRTMAX
            offset = name[8:]
            if offset == "" or (offset[0] in "+-" and offset[1:].isdigit()):
                return int(base) + int(offset or "0")
    raise HullError(f"unknown signal {text!r}")


def print_json(value: Any, indent: int | None = 2) -> None:
    json.dump(value, sys.stdout, indent=indent)
    sys.stdout.write("\n")
