"""hull update: change a running container's cgroup limits in the guest (runc update)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hull.cli.common import runtime
from hull.cli.context import Context
from hull.errors import HullError
from hull.runtime import resources

# flag -> (section, key, parses a size)
_FLAGS = {
    "memory": ("memory", "limit", True), "memory_swap": ("memory", "swap", True),
    "memory_reservation": ("memory", "reservation", True),
    "cpu_quota": ("cpu", "quota", False), "cpu_period": ("cpu", "period", False),
    "cpu_shares": ("cpu", "shares", False), "pids_limit": ("pids", "limit", False),
    "blkio_weight": ("blockIO", "weight", False),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("update", help="update a container's resource limits",
                       description="Apply linux.resources (JSON from --resources FILE, '-' "
                       "for stdin, and/or the flags below) to the container's cgroup.")
    p.add_argument("--resources", "-r", metavar="FILE",
                   help="an OCI linux.resources JSON object ('-': stdin)")
    for flag in _FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, metavar="VALUE")
    p.add_argument("--cpuset-cpus", dest="cpuset_cpus", metavar="LIST")
    p.add_argument("--cpuset-mems", dest="cpuset_mems", metavar="LIST")
    p.add_argument("container_id", metavar="ID")
    p.set_defaults(func=execute)


def parse_size(text: str, flag: str) -> int:
    """runc's sizes: a number of bytes, or with a k/m/g/t suffix (powers of 1024); -1."""
    t = text.strip().lower().removesuffix("b")
    scale = 1
    if t and t[-1] in "kmgt":
        scale = 1024 ** ("kmgt".index(t[-1]) + 1)
        t = t[:-1]
    try:
        return int(t) * scale
    except ValueError:
        raise HullError(f"update: --{flag} {text!r} is not a size") from None


def resources_from(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if args.resources:
        try:
            if args.resources == "-":
                text = sys.stdin.read()
            else:
                with open(args.resources) as fh:
                    text = fh.read()
            res = json.loads(text)
        except (OSError, json.JSONDecodeError) as exc:
            raise HullError(f"update: --resources {args.resources}: {exc}") from None
        if not isinstance(res, dict):
            raise HullError("update: --resources must hold a JSON object")
    for flag, (section, key, size) in _FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        name = flag.replace("_", "-")
        if size:
            number = parse_size(value, name)
        else:
            try:
                number = int(value)
            except ValueError:
                raise HullError(f"update: --{name} {value!r} is not an integer") from None
        res.setdefault(section, {})[key] = number
    for flag, key in (("cpuset_cpus", "cpus"), ("cpuset_mems", "mems")):
        if getattr(args, flag) is not None:
            res.setdefault("cpu", {})[key] = getattr(args, flag)
    if not res:
        raise HullError("update: nothing to update (give --resources or a limit flag)")
    return res


def execute(ctx: Context, args: argparse.Namespace) -> int:
    resources.update(runtime(ctx), args.container_id, resources_from(args))
    return 0
