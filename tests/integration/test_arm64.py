"""An arm64 guest on this host: machine_type "virt" through qemu-system-aarch64 (TCG).

Debian's arm64 kernel (`hull kernel fetch --arch arm64`: no cross-build in CI) and an
arm64 guest image (`hull image build --arch arm64`) are fetched and built once and cached
in the asset directory under kernel/current-arm64 and image/current-arm64; the container
runs Debian's busybox-static:arm64.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hull.config import settings
from tests.integration.conftest import HULL, default_spec

pytestmark = pytest.mark.slow

QEMU = "qemu-system-aarch64"
APPLETS = ("sh", "echo", "uname", "cat", "true", "false")


def _sh(*argv: str, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stdout}"
                    f"{done.stderr}")
    return done.stdout


def _ensure_qemu() -> None:
    """qemu-system-aarch64 (Debian's qemu-system-arm): install it, or skip if that fails."""
    if shutil.which(QEMU):
        return
    if os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "qemu-system-arm"], capture_output=True, timeout=600, check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which(QEMU):
        pytest.skip(f"{QEMU} is not installed and `apt-get install qemu-system-arm` failed")


def _ensure_arm64_packages() -> None:
    """apt knows arm64 packages: dpkg --add-architecture arm64 + apt-get update, once."""
    if "arm64" in _sh("dpkg", "--print-foreign-architectures").split():
        probe = subprocess.run(["apt-cache", "show", "--no-all-versions",
                                "busybox-static:arm64"], capture_output=True, check=False)
        if probe.returncode == 0:
            return
    _sh("dpkg", "--add-architecture", "arm64")
    _sh("apt-get", "update", "-qq")


@pytest.fixture(scope="session")
def arm64_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A configuration for arm64 guests, with their kernel and image ready."""
    _ensure_qemu()
    _ensure_arm64_packages()
    asset_dir = settings.load().asset_dir  # the cache the rest of the suite uses
    config = tmp_path_factory.mktemp("arm64") / "configuration.toml"
    config.write_text(f'[hypervisor]\nmachine_type = "virt"\nboot_timeout = 300.0\n'
                      f'[runtime]\nasset_dir = "{asset_dir}"\n')
    _sh(*HULL, "--config", str(config), "kernel", "fetch", "--arch", "arm64")
    _sh(*HULL, "--config", str(config), "image", "build", "--arch", "arm64")
    return config


@pytest.fixture(scope="session")
def arm64_rootfs(tmp_path_factory: pytest.TempPathFactory, arm64_config: Path) -> Path:
    """A rootfs with Debian's busybox-static:arm64 and a few applet links."""
    work = tmp_path_factory.mktemp("busybox-arm64")
    _sh("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", "busybox-static:arm64",
        cwd=work)
    deb, = work.glob("busybox-static_*_arm64.deb")
    _sh("dpkg-deb", "-x", str(deb), str(work / "pkg"))
    root = work / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
        (root / d).mkdir(parents=True)
    root.chmod(0o755)
    shutil.copy(work / "pkg" / "bin" / "busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def run_arm64(arm64_config: Path, arm64_rootfs: Path, tmp_path: Path) -> Run:
    """run_arm64(["uname", "-m"], input=b""): `hull run` of an arm64 busybox bundle."""
    state = tmp_path / "state"
    counter = iter(range(1000))

    def run(args: list[str], input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        bundle = tmp_path / f"bundle{next(counter)}"
        bundle.mkdir()
        shutil.copytree(arm64_rootfs, bundle / "rootfs", symlinks=True)
        spec = default_spec(args)
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] in ("/proc", "/tmp")]
        (bundle / "config.json").write_text(json.dumps(spec))
        return subprocess.run([*HULL, "--config", str(arm64_config), "--root", str(state),
                               "run", "--bundle", str(bundle), f"arm64-{bundle.name}"],
                              input=input, capture_output=True, timeout=600, check=False)

    return run


def test_arm64_guest_runs_uname(run_arm64: Run) -> None:
    started = time.monotonic()
    done = run_arm64(["uname", "-m"])
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"aarch64\n"
    print(f"arm64 guest under TCG: `hull run uname -m` took {took:.1f}s")


def test_arm64_exit_codes(run_arm64: Run) -> None:
    for code in (0, 1, 42):
        done = run_arm64(["sh", "-c", f"exit {code}"])
        assert done.returncode == code, done.stderr


def test_arm64_stdio(run_arm64: Run) -> None:
    data = b"".join(b"line %d of the arm64 round trip\n" % i for i in range(2000))
    done = run_arm64(["cat"], input=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data
    done = run_arm64(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"])
    assert done.returncode == 3
    assert done.stdout == b"to-stdout\n"
    assert b"to-stderr\n" in done.stderr


def test_arm64_create_start_exec_delete(arm64_config: Path, arm64_rootfs: Path,
                                        tmp_path: Path) -> None:
    """The CLI lifecycle (proxy daemon + shims) with an arm64 guest."""
    from tests.integration.cli_helpers import Cli, become_subreaper, cleanup, reap

    become_subreaper()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(arm64_rootfs, bundle / "rootfs", symlinks=True)
    spec = default_spec(["sh", "-c", "echo started; while true; do sleep 1; done"])
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] in ("/proc", "/tmp")]
    (bundle / "config.json").write_text(json.dumps(spec))
    cli = Cli(tmp_path / "state", tmp_path)
    extra = ("--config", str(arm64_config))
    with cleanup(cli, "a64"):
        done, _, err = cli.create("a64", bundle, extra=extra)
        assert done.returncode == 0, err.read_text()
        assert cli("start", "a64", extra=extra).returncode == 0
        done = cli("exec", "a64", "uname", "-m", extra=extra, timeout=300)
        assert (done.returncode, done.stdout) == (0, b"aarch64\n"), done.stderr
        pid = cli.state("a64")["pid"]
        assert cli("kill", "a64", "KILL", extra=extra).returncode == 0
        assert reap(pid) == 137
        assert cli("delete", "a64", extra=extra).returncode == 0
