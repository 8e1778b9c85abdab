"""Integration fixtures: a busybox rootfs, bundles, and `hull` run as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BUSYBOX = Path("/bin/busybox")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.vm)
            item.add_marker(pytest.mark.usefixtures("no_leaks"))


@pytest.fixture(scope="session")
def guest_assets_ready() -> None:
    """VM tests need the built kernel and image: fail loudly (CI builds them first)."""
    done = subprocess.run([*HULL, "check"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail("host cannot run VMs (run scripts/test.sh, which builds the kernel and "
                    f"image):\n{done.stdout}{done.stderr}")


HULL = [sys.executable, "-m", "hull"]


@pytest.fixture(scope="session")
def rootfs_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} is missing: apt-get install busybox-static")
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)  # mktemp makes it 0700: a non-root container user must get in
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root", "home/user", "work"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     "user:x:1000:1000:user:/home/user:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\n")
    return root


def default_spec(args: list[str]) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "HOME=/root"], "cwd": "/"},
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "hulltest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }


BundleFactory = Callable[..., Path]


@pytest.fixture
def bundle(tmp_path: Path, rootfs_template: Path) -> BundleFactory:
    """make a bundle: bundle(["echo", "hi"], readonly=True, env=[...], cwd=..., uid=...)"""

    def make(args: list[str], *, readonly: bool = False, env: list[str] | None = None,
             cwd: str = "/", uid: int = 0, gid: int = 0, terminal: bool = False,
             mutate: Callable[[dict[str, Any]], None] | None = None) -> Path:
        path = tmp_path / "bundle"
        if not path.exists():
            path.mkdir()
            shutil.copytree(rootfs_template, path / "rootfs", symlinks=True)
        spec = default_spec(args)
        spec["root"]["readonly"] = readonly
        spec["process"].update(cwd=cwd, user={"uid": uid, "gid": gid}, terminal=terminal)
        if env is not None:
            spec["process"]["env"] = env
        if mutate:
            mutate(spec)
        (path / "config.json").write_text(json.dumps(spec))
        return path

    return make


@pytest.fixture
def state_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "state"
    yield root
    left = [p.name for p in root.iterdir()] if root.exists() else []
    assert not [n for n in left if n != "accel.json"], f"state left behind: {left}"


Runner = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def hull(state_root: Path, guest_assets_ready: None) -> Runner:
    """hull(*argv, input=b"", timeout=120): run the CLI with a private --root."""

    def run(*argv: str, input: bytes = b"", timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*HULL, "--root", str(state_root), *argv], input=input,
                              capture_output=True, timeout=timeout, check=False,
                              env={**os.environ, **(env or {})})

    return run
