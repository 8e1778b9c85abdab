"""`hull image build|status`: the guest image (the work is in hull.image.initrd)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

from hull.cli.context import Context
from hull.image import initrd


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("image", help="build the guest image (initrd with the agent)",
                            description="Manage the guest image in the asset directory.")
    actions = parser.add_subparsers(dest="image_action", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build", help="build the initrd: the Hull agent on a trimmed Debian python",
        description="Build the guest initrd from Debian's python3.11 packages and the "
                    "installed agent sources, and make it current.")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument("--arch", default=None,
                       help="Debian architecture of the guest (default: the host's)")
    build.add_argument("--compression", choices=initrd.COMPRESSIONS,
                       default=initrd.DEFAULT_COMPRESSION,
                       help="initrd compression (default: %(default)s)")
    build.add_argument("--with-busybox", action="store_true",
                       help="add a static busybox as /bin/busybox: a shell and tools for "
                       "`hull debug` (with hypervisor.debug_console = true)")
    build.set_defaults(func=_build)

    status = actions.add_parser("status", help="tell whether the current image is up to date")
    status.set_defaults(func=_status)


def _build(ctx: Context, args: argparse.Namespace) -> int:
    start = time.monotonic()
    with _progress() as progress:
        result = initrd.build_image(ctx.config, arch=args.arch, force=args.force,
                                    compression=args.compression, progress=progress,
                                    with_busybox=args.with_busybox)
    m = result.asset.manifest
    if not result.built:
        print(f"image {result.asset.key} is up to date")
    else:
        print(f"image {result.asset.key} built in {time.monotonic() - start:.1f}s")
    print(f"  path:     {result.asset.path / 'initrd.img'}")
    print(f"  size:     {_mb(m.get('size'))} {m.get('compression')} "
          f"({_mb(m.get('raw_size'))} uncompressed), {m.get('files')} files, "
          f"{len(m.get('python_modules') or [])} python modules")
    print(f"  python:   {m.get('python')} ({m.get('arch')})")
    packages = m.get("packages") or {}
    print("  packages: " + ", ".join(f"{n} {v}" for n, v in sorted(packages.items())))
    if m.get("kernel_modules"):
        print(f"  kernel modules ({m.get('kernel_key')}): {', '.join(m['kernel_modules'])}")
    return 0


def _status(ctx: Context, args: argparse.Namespace) -> int:
    status = initrd.current_image_status(ctx.config)
    if status.asset is None:
        print(f"no current image in {ctx.config.asset_dir}: {status.reason}")
        return 1
    m = status.asset.manifest
    state = f"stale: {status.reason}" if status.stale else "up to date"
    print(f"image {status.asset.key}: {state}")
    print(f"  path:       {status.initrd}")
    print(f"  size:       {_mb(m.get('size'))} {m.get('compression')}, {m.get('files')} files")
    print(f"  python:     {m.get('python')} ({m.get('arch')})")
    print(f"  agent hash: {m.get('agent_hash')}")
    print(f"  kernel:     {m.get('kernel_key') or '(no kernel modules)'}")
    return 1 if status.stale else 0


def _mb(size: object) -> str:
    return f"{size / 1e6:.2f} MB" if isinstance(size, int) else "?"


@contextmanager
def _progress() -> Iterator[initrd.Progress]:
    """A live status line per phase on a terminal, short plain lines otherwise (stderr)."""
    console = Console(stderr=True)
    if not console.is_terminal or os.environ.get("CI"):  # as hull.image.kernel
        def plain(phase: str, message: str) -> None:
            print(f"{phase}: {message}", file=sys.stderr, flush=True)
        yield plain
        return

    current = {"phase": "", "since": time.monotonic()}

    with console.status("starting") as status:
        def live(phase: str, message: str) -> None:
            if phase != current["phase"]:
                _done(console, current)
                current.update(phase=phase, since=time.monotonic())
            status.update(f"[bold]{phase}[/bold] {message}")
        yield live
        _done(console, current)


def _done(console: Console, current: dict[str, object]) -> None:
    phase, since = current["phase"], current["since"]
    if phase and isinstance(since, float):
        console.print(f"[green]✓[/green] {phase} [dim]{time.monotonic() - since:.1f}s[/dim]",
                      highlight=False)
