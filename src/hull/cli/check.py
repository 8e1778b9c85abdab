"""hull check: whether this host can run Hull, one line per item with the fix."""

from __future__ import annotations

import argparse

from hull.cli.context import Context
from hull.runtime.hostcheck import run_checks


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="check whether this host can run Hull",
                       description="Check QEMU, the accelerator (KVM or TCG), 9p, and the "
                       "guest kernel and image; exit non-zero when Hull cannot run.")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    findings = run_checks(ctx.config, ctx.root)
    for f in findings:
        line = f"{'ok' if f.ok else 'FAIL':4}  {f.item:12} {f.detail}"
        if not f.ok and f.fix:
            line += f"\n      {'':12} fix: {f.fix}"
        print(line)
    return 0 if all(f.ok for f in findings) else 1
