"""hull spec: write a default config.json (runc's example) into the bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hull.cli.context import Context
from hull.errors import HullError
from hull.oci.default_spec import example


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("spec", help="create a new specification file",
                       description="Write a default config.json (as runc spec does).")
    p.add_argument("--bundle", "-b", default=".", help="directory for config.json")
    p.add_argument("--rootless", action="store_true", help="a spec for a rootless container")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise HullError(f"bundle {bundle} is not a directory")
    target = bundle / "config.json"
    if target.exists():
        raise HullError("File config.json exists. Remove it first")
    target.write_text(json.dumps(example(args.rootless), indent=2) + "\n")
    return 0
