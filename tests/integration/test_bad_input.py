"""Bad input: exit 1, one line naming the problem, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hull.config import settings
from hull.hypervisor.vsock import VHOST_VSOCK
from tests.integration.conftest import BundleFactory, Runner


def one_error_line(done: object) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)  # type: ignore[attr-defined]
    lines = done.stderr.decode().strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def test_missing_bundle(hull: Runner, tmp_path: Path) -> None:
    line = one_error_line(hull("run", "-b", str(tmp_path / "nope"), "x"))
    assert "is not a directory" in line


def test_missing_config(hull: Runner, tmp_path: Path) -> None:
    assert "has no config.json" in one_error_line(hull("run", "-b", str(tmp_path), "x"))


@pytest.mark.parametrize("mutate, text", [
    (lambda s: s.update(ociVersion="2.0.0"), "unsupported ociVersion"),
    (lambda s: s.pop("process"), "process is missing"),
])
def test_unsupported_config(hull: Runner, bundle: BundleFactory, mutate: object,
                            text: str) -> None:
    b = bundle(["true"], mutate=mutate)  # type: ignore[arg-type]
    assert text in one_error_line(hull("run", "-b", str(b), "x"))


def test_malformed_config(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["true"])
    (b / "config.json").write_text("{ not json")
    assert "is not valid JSON" in one_error_line(hull("run", "-b", str(b), "x"))


def test_missing_rootfs(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["true"], mutate=lambda s: s["root"].update(path="elsewhere"))
    assert "is not a directory" in one_error_line(hull("run", "-b", str(b), "x"))


def test_bad_id(hull: Runner, bundle: BundleFactory) -> None:
    assert "invalid container id" in one_error_line(hull("run", "-b", str(bundle(["true"])),
                                                         "a/b"))


def test_missing_executable(hull: Runner, bundle: BundleFactory) -> None:
    line = one_error_line(hull("run", "-b", str(bundle(["/no/such/program"])), "x"))
    assert "/no/such/program" in line


def test_vm_that_fails_to_boot_shows_the_console(hull: Runner, bundle: BundleFactory,
                                                 tmp_path: Path) -> None:
    # A "kernel" that is not one: QEMU refuses it, or the guest never answers.
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"\x7fELF" + bytes(60))
    config = tmp_path / "c.toml"
    config.write_text(f'[hypervisor]\nkernel = "{bogus}"\nboot_timeout = 20\n')
    line = one_error_line(hull("--config", str(config), "run", "-b", str(bundle(["true"])),
                               "x"))
    assert "failed to boot" in line or "qemu exited" in line


def test_duplicate_id_while_running(hull: Runner, bundle: BundleFactory,
                                    state_root: Path) -> None:
    (state_root / "dup").mkdir(parents=True)
    (state_root / "dup" / "state.json").write_text(json.dumps({}))
    try:
        assert "exists" in one_error_line(hull("run", "-b", str(bundle(["true"])), "dup"))
    finally:
        import shutil

        shutil.rmtree(state_root / "dup")


@pytest.mark.skipif(os.path.exists(VHOST_VSOCK), reason=f"this host has {VHOST_VSOCK}")
def test_vsock_channel_without_vhost_vsock(hull: Runner, bundle: BundleFactory,
                                           tmp_path: Path) -> None:
    config = tmp_path / "hull.toml"
    config.write_text(f'[hypervisor]\nchannel = "vsock"\n[runtime]\n'
                      f'asset_dir = "{settings.load().runtime.asset_dir}"\n')
    line = one_error_line(hull("--config", str(config), "run", "-b", str(bundle(["true"])),
                               "vs"))
    assert line.endswith(f'hypervisor.channel is "vsock", but cannot open {VHOST_VSOCK}: '
                         'No such file or directory (modprobe vhost_vsock, or use "auto")')
