"""hull events: container statistics as runc prints them (one JSON object per line)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from hull.cli.common import runtime
from hull.cli.context import Context
from hull.errors import HullError
from hull.runtime import resources


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="display container statistics",
                       description="Print the container's resource usage as JSON: once with "
                       "--stats, else every --interval until the container stops.")
    p.add_argument("--stats", action="store_true", help="print the statistics once and exit")
    p.add_argument("--interval", default="5s",
                   help="time between statistics (default: %(default)s)")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=execute)


def parse_interval(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number, scale = text[: -len(unit)], units[unit]
            break
    else:
        number, scale = text, 1.0
    try:
        value = float(number) * scale
    except ValueError:
        raise HullError(f"events: --interval {text!r} is not a duration (e.g. 5s)") from None
    if value <= 0:
        raise HullError("events: --interval must be positive")
    return value


def _print(container_id: str, stats: dict[str, object]) -> None:
    sys.stdout.write(json.dumps({"type": "stats", "id": container_id, "data": stats}) + "\n")
    sys.stdout.flush()


def execute(ctx: Context, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    interval = parse_interval(args.interval)
    stats = resources.runc_stats(resources.container_stats(rt, args.container_id))
    _print(args.container_id, stats)
    if args.stats:
        return 0
    oom_seen = stats["oom_kill"]
    while True:
        time.sleep(interval)
        try:
            stats = resources.runc_stats(resources.container_stats(rt, args.container_id))
        except HullError:
            return 0  # stopped or gone: the stream ends
        if stats["oom_kill"] != oom_seen:
            oom_seen = stats["oom_kill"]
            sys.stdout.write(json.dumps({"type": "oom", "id": args.container_id}) + "\n")
        _print(args.container_id, stats)
