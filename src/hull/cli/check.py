"""hull check: whether this host can run Hull, one line per item with the fix."""

from __future__ import annotations

import argparse
import json

from hull.cli.context import Context
from hull.runtime.hostcheck import healthy, run_checks


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="check whether this host can run Hull",
                       description="Diagnose the host: QEMU (version, machine type, "
                       "devices), the accelerator (KVM or TCG, and why), 9p, the guest "
                       "kernel and image (present, matching this hull's agent), /dev/net/tun, "
                       "cgroups, containerd and podman. Each failure comes with its fix. "
                       "Exits non-zero when Hull cannot run (optional items only warn).")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="output format (default: %(default)s)")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    findings = run_checks(ctx.config, ctx.root)
    ok = healthy(findings)
    if args.format == "json":
        print(json.dumps({"ok": ok, "findings": [f.to_json() for f in findings]}, indent=2))
        return 0 if ok else 1
    for f in findings:
        mark = "ok" if f.ok else ("FAIL" if f.required else "warn")
        line = f"{mark:4}  {f.item:13} {f.detail}"
        if not f.ok and f.fix:
            line += f"\n      {'':13} fix: {f.fix}"
        print(line)
    return 0 if ok else 1
