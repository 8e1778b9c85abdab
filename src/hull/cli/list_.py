"""hull list: the containers under --root."""

from __future__ import annotations

import argparse

from hull.cli.common import print_json, runtime
from hull.cli.context import Context
from hull.runtime.lifecycle import oci_state


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="list containers")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("--quiet", "-q", action="store_true", help="display only container ids")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    states = runtime(ctx).containers()
    if args.quiet:
        for state in states:
            print(state.id)
    elif args.format == "json":
        print_json([oci_state(s) for s in states], indent=None)
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s.id, str(s.pid), str(s.status), s.bundle, s.created, s.owner)
                 for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0
