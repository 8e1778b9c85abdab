"""hull monitor: Prometheus metrics of every sandbox on the host (CLI mode and shim v2)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hull.cli.context import Context
from hull.runtime import monitor
from hull.shim.v2.main import DEFAULT_STATE_ROOT, STATE_ROOT_ENV, state_root


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "monitor", help="serve Prometheus metrics of all sandboxes",
        description="Serve Prometheus metrics at http://HOST:PORT/metrics for every sandbox "
        "on the host: those of CLI mode under --root and the pods of containerd's "
        "containerd-shim-hull-v2 under --shim-root. Per sandbox: host overhead (PSS of "
        "QEMU, proxy or shim, and their helpers), guest memory and CPU, the sandbox "
        "container's cgroup figures, container count, boot or restore time, agent "
        "round-trip time; per host the sandboxes by status, the agents that did not answer "
        "and the shims that died. Runs until SIGTERM or SIGINT.")
    p.add_argument("--listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                   help="address to serve on (default: %(default)s; port 0: any free port)")
    p.add_argument("--shim-root", type=Path, default=None, metavar="DIR",
                   help=f"state root of the shim v2 pods (default: ${STATE_ROOT_ENV}, else "
                   f"{DEFAULT_STATE_ROOT}, as for the shim)")
    p.add_argument("--once", action="store_true",
                   help="print the metrics once on stdout and exit")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    shim_root = args.shim_root or state_root()
    if args.once:
        from prometheus_client import generate_latest

        sys.stdout.write(generate_latest(monitor.registry(ctx.root, shim_root)).decode())
        return 0

    def ready(host: str, port: int) -> None:
        print(f"serving metrics on http://{host}:{port}/metrics", flush=True)

    monitor.serve(ctx.root, args.listen, ready, shim_root)
    return 0
