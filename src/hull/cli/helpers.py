"""Hidden verbs Hull starts itself: `hull proxy` (per-sandbox daemon) and `hull shim`
(per-process relay). Not for people: `hull create` and `hull exec` run them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hull.cli.context import Context, setup_logging
from hull.errors import HullError
from hull.oci import bundle as oci_bundle
from hull.runtime.state import ContainerDir

log = logging.getLogger("hull")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _hidden(sub, "proxy")
    _hidden(sub, "shim")


def _hidden(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    # Added without help=, argparse leaves them out of the --help listing.
    p = sub.add_parser(name)
    if name == "proxy":
        p.add_argument("--ready-fd", type=int, required=True)
        p.add_argument("--bundle", required=True)
        p.add_argument("container_id")
        p.set_defaults(func=run_proxy)
        return
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--bundle", default=None, help="the init process: create the container")
    p.add_argument("--exec-id", default="", help="an exec process")
    p.add_argument("--process", default=None, help="the exec's process.json")
    p.add_argument("--console-socket", default=None)
    p.add_argument("container_id")
    p.set_defaults(func=run_shim)


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


def run_shim(ctx: Context, args: argparse.Namespace) -> int:
    # asyncio imports ssl for TLS, which a shim never speaks: loading OpenSSL costs every
    # shim (one per container process) ~1.4 MiB of private memory. None in sys.modules
    # makes that import fail, and asyncio runs on without TLS support.
    if "asyncio" not in sys.modules and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]
    import asyncio

    from hull.agentapi import schema
    from hull.runtime import sharedfs, shim
    from hull.runtime.layout import rootfs_request
    from hull.runtime.lifecycle import oci_state, shared_dir

    cdir = ContainerDir(ctx.root, args.container_id)
    if ctx.log_path is None:
        # stderr is the container's: the shim must never write its own messages there.
        setup_logging(str(cdir.path / "shim.log"), ctx.log_format, ctx.debug,
                      container_id=cdir.id)
    try:
        if args.bundle:
            bundle = oci_bundle.load(args.bundle)
            # What the proxy staged decides (hull.runtime.layout).
            spec = sharedfs.guest_spec(bundle.spec, shared_dir(cdir), cdir.id)
            # The hooks' state: this shim's pid is the container's (runc gives the init's).
            state = {**oci_state(cdir.load()), "pid": os.getpid()}
            payload = {"spec": spec, "state": state, "rootfs": schema.params(
                rootfs_request(bundle, shared_dir(cdir), cdir.id))}
            terminal = bundle.terminal
        else:
            process = json.loads(Path(args.process).read_text())
            payload = {"process": process}
            terminal = bool(process.get("terminal", False))
    except (HullError, OSError, ValueError) as exc:
        os.write(args.ready_fd, f"{exc}\n".encode())
        return 1
    if not args.console_socket:
        os.setsid()  # out of the caller's process group: signals reach us only as sent
    request = shim.ShimRequest(cdir, args.exec_id, payload, args.console_socket, terminal)
    return asyncio.run(shim.serve(request, args.ready_fd))
