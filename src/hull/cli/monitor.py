"""hull monitor: Prometheus metrics of every sandbox under --root."""

from __future__ import annotations

import argparse
import sys

from hull.cli.context import Context
from hull.runtime import monitor


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "monitor", help="serve Prometheus metrics of all sandboxes",
        description="Serve Prometheus metrics at http://HOST:PORT/metrics for every sandbox "
        "under --root: host overhead (PSS of QEMU, proxy and shims), guest memory and CPU, "
        "the container's cgroup figures, container count, boot time, agent round-trip "
        "time; per host the sandboxes by status and the agents that did not answer. "
        "Runs until SIGTERM or SIGINT.")
    p.add_argument("--listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                   help="address to serve on (default: %(default)s; port 0: any free port)")
    p.add_argument("--once", action="store_true",
                   help="print the metrics once on stdout and exit")
    p.set_defaults(func=execute)


def execute(ctx: Context, args: argparse.Namespace) -> int:
    if args.once:
        from prometheus_client import generate_latest

        sys.stdout.write(generate_latest(monitor.registry(ctx.root)).decode())
        return 0

    def ready(host: str, port: int) -> None:
        print(f"serving metrics on http://{host}:{port}/metrics", flush=True)

    monitor.serve(ctx.root, args.listen, ready)
    return 0
