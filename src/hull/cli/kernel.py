"""`hull kernel build|fetch|status`: the guest kernel (the work is in hull.image.kernel)."""

from __future__ import annotations

import argparse
import json

from hull.cli.context import Context
from hull.image import kernel


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("kernel", help="build or fetch the guest kernel",
                            description="Manage the guest kernel in the asset directory.")
    actions = parser.add_subparsers(dest="kernel_action", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build", help=f"build a minimal kernel from Debian's {kernel.SOURCE_PACKAGE}",
        description=f"Build a minimal guest kernel from {kernel.SOURCE_TARBALL} "
                    "(tinyconfig + Hull's kconfig fragments) and make it current.")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument("--arch", default=None,
                       help="guest architecture: x86_64/amd64 or aarch64/arm64 (default: the "
                            "host's; another is cross-compiled with Debian's cross gcc)")
    build.add_argument("--keep-build", action="store_true",
                       help="keep the build tree under <asset_dir>/build after success")
    build.add_argument("--jobs", "-j", type=int, default=None,
                       help="parallel make jobs (default: the number of CPUs)")
    build.set_defaults(func=_build)

    fetch = actions.add_parser(
        "fetch", help="use Debian's packaged kernel (downloaded, not installed)",
        description="Download a Debian linux-image package, extract a PVH-bootable vmlinux "
                    "and the modules the guest needs, and make it current.")
    fetch.add_argument("--package", default=None,
                       help="linux-image package or metapackage (default: linux-image-<arch>, "
                            "e.g. linux-image-amd64; the cloud flavor has no 9p)")
    fetch.add_argument("--arch", default=None,
                       help="guest architecture: x86_64/amd64 or aarch64/arm64 (default: the "
                            "host's; another needs `dpkg --add-architecture` + apt-get update)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if up to date")
    fetch.set_defaults(func=_fetch)

    status = actions.add_parser("status", help="show the current kernel's manifest")
    status.add_argument("--arch", default=None, help="guest architecture (default: the host's)")
    status.set_defaults(func=_status)


def _build(ctx: Context, args: argparse.Namespace) -> int:
    result = kernel.build(ctx.config.asset_dir, force=args.force, keep_build=args.keep_build,
                          jobs=args.jobs, arch=args.arch)
    _report(result, "built")
    return 0


def _fetch(ctx: Context, args: argparse.Namespace) -> int:
    result = kernel.fetch(ctx.config.asset_dir, package=args.package, force=args.force,
                          arch=args.arch)
    _report(result, "fetched")
    return 0


def _status(ctx: Context, args: argparse.Namespace) -> int:
    asset = kernel.status(ctx.config.asset_dir, args.arch)
    if asset is None:
        print(f"no current kernel in {ctx.config.asset_dir}: "
              "run `hull kernel build` or `hull kernel fetch`")
        return 1
    print(f"path: {asset.kernel_file}")
    print(json.dumps(asset.manifest, indent=2, sort_keys=True))
    return 0


def _mb(size: object) -> str:
    return f"{size / 1e6:.2f} MB" if isinstance(size, int) else "?"


def _report(result: kernel.KernelResult, verb: str) -> None:
    manifest = result.asset.manifest
    if result.up_to_date:
        print(f"kernel {result.asset.key} is up to date")
    else:
        minutes, seconds = divmod(int(result.seconds), 60)
        print(f"kernel {result.asset.key} {verb} in {minutes}m{seconds:02d}s")
    compressed = "bzImage" if manifest.get("flavor") == "built" else "vmlinuz"
    print(f"  path:       {result.vmlinux}")
    print(f"  release:    {manifest.get('release')}")
    print(f"  vmlinux:    {_mb(manifest.get('vmlinux_size'))}")
    print(f"  compressed: {_mb(manifest.get('compressed_size'))} ({compressed})")
    modules = manifest.get("modules") or []
    if modules:
        print(f"  modules:    {len(modules)} in {result.asset.path / 'modules'} "
              f"({', '.join(str(m) for m in modules)})")
