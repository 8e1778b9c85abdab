"""The hidden verb Hull starts itself: `hull proxy`, the per-sandbox daemon. Not for
people: `hull create` runs it. (The per-process shims are no `hull` verb: they start as
``python -m hull.runtime.shim``, without the CLI, hull.runtime.shim says why.)"""

from __future__ import annotations

import argparse
import logging
import os

from hull.cli.context import Context
from hull.errors import HullError
from hull.logids import setup_logging
from hull.oci import bundle as oci_bundle
from hull.runtime.state import ContainerDir

log = logging.getLogger("hull")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Added without help=, argparse leaves it out of the --help listing.
    p = sub.add_parser("proxy")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("container_id")
    p.set_defaults(func=run_proxy)


#: What a proxy imports, in run_proxy and below: the pool's fork server (hull.runtime.
#: forkserver) imports them once for all the proxies it forks.
PROXY_MODULES = ("asyncio", "hull.config.annotations", "hull.network.host",
                 "hull.runtime.proxyd", "hull.runtime.sizing", "hull.runtime.layout",
                 "hull.runtime.lifecycle", "hull.proxy.router", "hull.runtime.sandboxinfo",
                 "hull.runtime.sandbox", "hull.runtime.pool", "hull.runtime.factory",
                 "hull.hypervisor.qemu.machine", "hull.cli.helpers",
                 # imported at run time: the spec check (hull.oci.bundle), to_thread
                 "hull.agent.spec", "hull.agent.cgroup", "concurrent.futures.thread")


def preload_proxy() -> None:
    import importlib

    from hull.cli.main import prebuild_parser

    for name in PROXY_MODULES:
        importlib.import_module(name)
    prebuild_parser(["proxy"])


def forked_proxy(argv: list[str]) -> int:
    """A proxy's main in a process the fork server forked: ``argv`` is the command line
    `hull create` would have run (``python -m hull ... proxy ...``); the exit `hull`
    makes."""
    from hull.cli.main import exit_now, main

    if argv[1:3] != ["-m", "hull"]:
        raise HullError(f"not a hull command line: {argv[:3]}")
    exit_now(main(argv[3:]))


def run_proxy(ctx: Context, args: argparse.Namespace) -> int:
    # Each verb imports only what its process needs: both live as long as their sandbox
    # or process, and every module imported stays in their memory (docs/performance.md).
    import asyncio

    from hull.config.annotations import apply_annotations
    from hull.network import host as netns
    from hull.runtime import proxyd, sizing
    from hull.runtime.layout import Files
    from hull.runtime.lifecycle import shared_dir

    cdir = ContainerDir(ctx.root, args.container_id)
    if ctx.log_path is None:
        # Our stderr is proxy.log already; log there at the level --debug asks for.
        setup_logging(str(cdir.path / "proxy.log"), ctx.log_format, ctx.debug,
                      container_id=cdir.id)
    try:
        bundle = oci_bundle.load(args.bundle)
        # Per-pod overrides (io.hull.config.*), only for keys the allow-list names.
        config = sizing.for_spec(apply_annotations(ctx.config, bundle.annotations),
                                 bundle.spec)
        network = netns.choose(bundle.spec)  # refuses the host's network namespace
        # The rootfs and the bind sources; `hull create` unmounts them if we fail.
        files = Files.of(config, bundle, shared_dir(cdir), cdir.id)
        shares = files.before_boot()
    except HullError as exc:
        log.error("%s", exc)
        os.write(args.ready_fd, f"{exc}\n".encode())
        return 1
    return asyncio.run(proxyd.serve(config, ctx.root, cdir, shares, args.ready_fd, network,
                                    after_boot=files.after_boot))
