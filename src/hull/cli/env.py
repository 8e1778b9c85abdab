"""hull env: the effective configuration, component versions and paths, for bug reports."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from hull import __version__
from hull.cli.context import Context
from hull.image import store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", help="print the configuration, versions and paths in effect",
                       description="Print the effective configuration (defaults, the file, "
                       "--config), the versions of Hull's components (hull, python, qemu, "
                       "guest kernel, guest image and its agent) and the paths Hull uses, "
                       "as TOML or JSON: paste it into a bug report.")
    p.add_argument("--format", choices=("toml", "json"), default="toml",
                   help="output format (default: %(default)s)")
    p.set_defaults(func=execute)


def collect(ctx: Context) -> dict[str, Any]:
    from hull.image import initrd

    config = ctx.config
    hv = config.hypervisor
    assets = store.AssetStore(config.asset_dir)
    arch = store.debian_arch(hv.arch)  # the guest's: kernel/current-arm64 for "virt"
    kernel = assets.current(store.KERNEL, arch)
    image = assets.current(store.IMAGE, arch)
    qemu = shutil.which(hv.path) or ""
    qemu_version = ""
    if qemu:
        try:
            qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                                          timeout=10, check=False).stdout.split("\n")[0]
        except (OSError, subprocess.SubprocessError) as exc:
            qemu_version = f"unknown ({exc})"
    km = kernel.manifest if kernel else {}
    im = image.manifest if image else {}
    status = initrd.current_image_status(config)
    return {
        "hull": {"version": __version__, "python": platform.python_version(),
                 "python_executable": sys.executable,
                 "host_kernel": platform.release(), "machine": platform.machine()},
        "components": {
            "qemu": qemu_version or "not found",
            "kernel_release": str(km.get("release", "")),
            "kernel_key": kernel.key if kernel else "",
            "kernel_flavor": str(km.get("flavor", "")),
            "image_key": image.key if image else "",
            "image_agent_hash": str(im.get("agent_hash", "")),
            "agent_hash": initrd.agent_hash(),
            "image_up_to_date": not status.stale,
            "image_python": str(im.get("python", "")),
        },
        "paths": {
            "config": str(config.source) if config.source else "(none: defaults)",
            "root": str(ctx.root),
            "asset_dir": str(config.asset_dir),
            "qemu": qemu,
            "kernel": hv.kernel or (str(kernel.kernel_file) if kernel else ""),
            "image": hv.image or (str(image.path / "initrd.img") if image else ""),
            "hull": shutil.which("hull") or "",
            "containerd_shim": shutil.which("containerd-shim-hull-v2") or "",
            "log": ctx.log_path or "",
        },
        "environment": {name: os.environ[name] for name in ("HULL_CONFIG", "PATH")
                        if name in os.environ},
        "configuration": config.as_dict(),
    }


def to_toml(data: dict[str, Any]) -> str:
    """A TOML document of nested tables of strings, numbers, booleans and string lists."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{name}]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
            lines.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{_key(key)}", value)

    for name, values in data.items():
        table(_key(name), values)
    return "\n".join(lines)


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum()
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def execute(ctx: Context, args: argparse.Namespace) -> int:
    data = collect(ctx)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(to_toml(data), end="")
    return 0
