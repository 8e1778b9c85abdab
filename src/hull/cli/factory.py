"""`hull factory init|status|destroy`: VM templates (the work is in hull.runtime.factory)."""

from __future__ import annotations

import argparse
import asyncio
import json

from hull.cli.context import Context


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "factory", help="manage VM templates (sandboxes cloned instead of booted)",
        description="Manage the VM templates new sandboxes are cloned from when "
                    "factory.enabled is set in the configuration.")
    actions = parser.add_subparsers(dest="factory_action", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="boot and save a template for the current "
                                           "configuration (replacing an older one)")
    init.add_argument("--lock-fd", type=int, default=-1, help=argparse.SUPPRESS)
    init.set_defaults(func=_init)
    status = actions.add_parser("status", help="list the templates and whether each is usable")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)
    destroy = actions.add_parser("destroy", help="stop the pool and any template build, "
                                                 "remove every template (clones that run "
                                                 "are not disturbed)")
    destroy.set_defaults(func=_destroy)
    pool = actions.add_parser("pool", help="run the pool daemon (factory.pool_size clones "
                                           "restored ahead of demand; started by init)")
    pool.add_argument("--lock-fd", type=int, required=True, help=argparse.SUPPRESS)
    pool.set_defaults(func=_pool)


def _init(ctx: Context, args: argparse.Namespace) -> int:
    from hull.runtime import factory, rebuild

    if args.lock_fd >= 0:
        # A background build a sandbox asked for (hull.runtime.rebuild): bounded.
        key = factory.key_id(factory.current_key(ctx.config))
        timeout = ctx.config.hypervisor.boot_timeout + 60
        with rebuild.builder(ctx.config, key, args.lock_fd):
            template = asyncio.run(asyncio.wait_for(factory.build(ctx.config), timeout))
    else:
        template = asyncio.run(factory.build(ctx.config))
    m = template.manifest
    print(f"template {template.path}: guest booted in {m['boot_seconds']:.2f}s, "
          f"state {template.state.stat().st_size} bytes, RAM {m['ram_size'] >> 20} MiB")
    if not ctx.config.factory.enabled:
        print("note: factory.enabled is false in the configuration: sandboxes boot cold")
    elif args.lock_fd < 0:
        from hull.runtime import pool

        if pool.wanted(ctx.config):
            print(pool.ensure(ctx.config))
    return 0


def _status(ctx: Context, args: argparse.Namespace) -> int:
    from hull.runtime import factory

    found = factory.templates(ctx.config)
    current = ""
    try:
        current = factory.key_id(factory.current_key(ctx.config))
    except Exception as exc:  # status must still list what there is
        current = f"? ({exc})"
    rows = [{"path": str(path), "status": why, "current": path.name == current,
             "manifest": template.manifest if template else None}
            for path, template, why in found]
    from hull.runtime import pool

    pooled = pool.status(ctx.config)
    if args.json:
        print(json.dumps({"enabled": ctx.config.factory.enabled, "current_key": current,
                          "templates": rows, "pool": pooled}, indent=2))
        return 0
    print(f"factory: {'enabled' if ctx.config.factory.enabled else 'disabled'}; "
          f"template dir {factory.root(ctx.config)}; current key {current}")
    if pooled is not None and not pooled["size"]:
        print(f"pool: none (factory.pool_size is 0); daemon pid {pooled['pid']} for the "
              "fork server")
    elif pooled is not None:
        print(f"pool: daemon pid {pooled['pid']}, {pooled['idle']} of {pooled['size']} "
              f"clone(s) ready, {pooled['leased']} leased"
              + (f"; last error: {pooled['error']}" if pooled["error"] else ""))
    elif ctx.config.factory.pool_size:
        print("pool: no daemon (started by `hull factory init` or the next sandbox)")
    if not rows:
        print("no templates: run `hull factory init`")
    for row in rows:
        mark = " (current)" if row["current"] else ""
        print(f"{row['path']}{mark}: {row['status']}")
    return 0 if any(r["current"] and r["status"] == "ok" for r in rows) else 1


def _destroy(ctx: Context, args: argparse.Namespace) -> int:
    from hull.runtime import factory, pool, rebuild

    print(pool.stop(ctx.config))
    if stopped := rebuild.stop_builders(ctx.config):
        print(f"stopped {stopped} template build(s)")
    print(f"removed {factory.destroy(ctx.config)} template(s)")
    return 0


def _pool(ctx: Context, args: argparse.Namespace) -> int:
    from hull.cli.helpers import forked_proxy, preload_proxy
    from hull.runtime import factory, forkserver, pool

    # Before the daemon's event loop exists: the fork server forks the CLI sandboxes'
    # proxies (hull.runtime.forkserver), which then share their imports.
    server = (forkserver.start(factory.root(ctx.config) / forkserver.SOCKET, forked_proxy,
                               preload_proxy) if ctx.config.factory.fork_server else None)
    return pool.serve(ctx.config, args.lock_fd, server)
