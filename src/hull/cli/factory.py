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
    init.set_defaults(func=_init)
    status = actions.add_parser("status", help="list the templates and whether each is usable")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_status)
    destroy = actions.add_parser("destroy", help="remove every template (clones that run "
                                                 "are not disturbed)")
    destroy.set_defaults(func=_destroy)


def _init(ctx: Context, args: argparse.Namespace) -> int:
    from hull.runtime import factory

    template = asyncio.run(factory.build(ctx.config))
    m = template.manifest
    print(f"template {template.path}: guest booted in {m['boot_seconds']:.2f}s, "
          f"state {template.state.stat().st_size} bytes, RAM {m['ram_size'] >> 20} MiB")
    if not ctx.config.factory.enabled:
        print("note: factory.enabled is false in the configuration: sandboxes boot cold")
    return 0


def _status(ctx: Context, args: argparse.Namespace) -> int:
    from hull.runtime import factory

    found = factory.templates(ctx.config)
    current = ""
    try:
        from hull.runtime.sandbox import Sandbox

        vm = Sandbox(ctx.config, "status", ctx.root / "unused.log").vm_config()
        current = factory.key_id(factory.template_key(vm, factory.vm_binary(ctx.config)))
    except Exception as exc:  # status must still list what there is
        current = f"? ({exc})"
    rows = [{"path": str(path), "status": why, "current": path.name == current,
             "manifest": template.manifest if template else None}
            for path, template, why in found]
    if args.json:
        print(json.dumps({"enabled": ctx.config.factory.enabled, "current_key": current,
                          "templates": rows}, indent=2))
        return 0
    print(f"factory: {'enabled' if ctx.config.factory.enabled else 'disabled'}; "
          f"template dir {factory.root(ctx.config)}; current key {current}")
    if not rows:
        print("no templates: run `hull factory init`")
    for row in rows:
        mark = " (current)" if row["current"] else ""
        print(f"{row['path']}{mark}: {row['status']}")
    return 0 if any(r["current"] and r["status"] == "ok" for r in rows) else 1


def _destroy(ctx: Context, args: argparse.Namespace) -> int:
    from hull.runtime import factory

    print(f"removed {factory.destroy(ctx.config)} template(s)")
    return 0
