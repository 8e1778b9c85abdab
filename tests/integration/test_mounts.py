"""Bind mounts of host files and directories (issue 5 item 4): each source is staged on
the host under the container's state directory and shared into the VM over one 9p share
(hull.runtime.sharedfs). The no_leaks fixture checks that no mount stays behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hull.runtime import sharedfs
from tests.integration.cli_helpers import Cli, become_subreaper, cleanup, reap_all
from tests.integration.conftest import HULL, BundleFactory, Runner


def bind(dest: str, source: Path | str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": str(source),
            "options": list(options or ("rbind",))}


def with_mounts(*mounts: dict[str, Any]) -> Any:
    def mutate(spec: dict[str, Any]) -> None:
        spec["mounts"] += list(mounts)

    return mutate


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    vol = tmp_path / "volume"
    vol.mkdir()
    (vol / "old").write_text("from the host\n")
    return vol


def run_ok(hull: Runner, b: Path, cid: str = "m1") -> str:
    done = hull("run", "-b", str(b), cid)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def test_rw_bind_of_a_host_directory(hull: Runner, bundle: BundleFactory, volume: Path,
                                     state_root: Path) -> None:
    b = bundle(["sh", "-c", "cat /data/old; echo written > /data/new; mkdir /data/d; "
                "echo deep > /data/d/f"], mutate=with_mounts(bind("/data", volume, "rbind", "rw")))
    assert run_ok(hull, b) == "from the host\n"
    assert (volume / "new").read_text() == "written\n"
    assert (volume / "d" / "f").read_text() == "deep\n"
    assert sharedfs.mounts_under(state_root) == []


def test_ro_bind_cannot_be_written(hull: Runner, bundle: BundleFactory, volume: Path) -> None:
    script = ("cat /data/old; (echo x > /data/new) 2>/tmp/err; echo status $?; "
              "grep -o 'Read-only file system' /tmp/err; rm /data/old 2>/dev/null || echo kept")
    b = bundle(["sh", "-c", script], mutate=with_mounts(bind("/data", volume, "rbind", "ro")))
    assert run_ok(hull, b) == "from the host\nstatus 1\nRead-only file system\nkept\n"
    assert sorted(os.listdir(volume)) == ["old"]


def test_bind_of_a_single_host_file(hull: Runner, bundle: BundleFactory,
                                    tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.1.2.3 from-the-host\n")
    state = tmp_path / "state-file"
    state.write_text("")
    b = bundle(["sh", "-c", "cat /etc/hosts; echo appended >> /var/state"],
               mutate=with_mounts(bind("/etc/hosts", hosts, "bind", "ro"),
                                  bind("/var/state", state, "bind", "rw")))
    assert run_ok(hull, b) == "127.0.0.1 localhost\n10.1.2.3 from-the-host\n"
    assert state.read_text() == "appended\n"


def test_missing_bind_source_is_one_clear_error(hull: Runner, bundle: BundleFactory,
                                                volume: Path, state_root: Path) -> None:
    b = bundle(["true"], mutate=with_mounts(bind("/data", volume),
                                             bind("/gone", "/nonexistent/source")))
    for argv in (("run", "-b", str(b), "m2"), ("create", "-b", str(b), "m2")):
        done = hull(*argv)
        assert done.returncode == 1
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert "mount /gone: bind source /nonexistent/source" in lines[0]
        assert not (state_root / "m2").exists()
        assert sharedfs.mounts_under(volume.parent) == []


@pytest.fixture
def cli(state_root: Path, tmp_path: Path, guest_assets_ready: None) -> Iterator[Cli]:
    become_subreaper()
    yield Cli(state_root, tmp_path)
    reap_all()


def test_create_start_delete_with_binds(cli: Cli, bundle: BundleFactory, volume: Path,
                                        tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.9.9.9 bound\n")
    b = bundle(["sh", "-c", "cat /etc/hosts /data/old; echo hi > /data/new"],
               mutate=with_mounts(bind("/data", volume), bind("/etc/hosts", hosts, "bind")))
    with cleanup(cli, "m3"):
        done, out, err = cli.create("m3", b)
        assert done.returncode == 0, err.read_text()
        assert len(sharedfs.mounts_under(cli.root / "m3")) == 2
        assert cli("start", "m3").returncode == 0
        cli.wait_status("m3", "stopped")
        assert cli("delete", "m3").returncode == 0
        assert out.read_text() == "10.9.9.9 bound\nfrom the host\n"
    assert (volume / "new").read_text() == "hi\n"
    assert sharedfs.mounts_under(cli.root) == [] and not (cli.root / "m3").exists()


@pytest.mark.parametrize("victim", ["proxy", "hull"])
def test_delete_force_after_sigkill_unmounts(cli: Cli, bundle: BundleFactory, volume: Path,
                                             victim: str) -> None:
    b = bundle(["sh", "-c", "while true; do sleep 0.1; done"],
               mutate=with_mounts(bind("/data", volume, "rbind", "ro")))
    with cleanup(cli, "m4"):
        if victim == "hull":  # killed after staging, with the proxy booting
            with open(cli.work / "out", "wb") as out:
                done = subprocess.run(
                    [*HULL, "--root", str(cli.root), "create", "--bundle", str(b), "m4"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60, check=False,
                    env={**os.environ, "HULL_CRASH_AT": "create:proxy-started"})
            assert done.returncode == -signal.SIGKILL
        else:
            done, _, err = cli.create("m4", b)
            assert done.returncode == 0, err.read_text()
            os.kill(json.loads((cli.root / "m4" / "state.json").read_text())["proxy_pid"],
                    signal.SIGKILL)
        assert sharedfs.mounts_under(cli.root / "m4")
        assert cli("delete", "--force", "m4").returncode == 0
    assert sharedfs.mounts_under(cli.root) == [] and not (cli.root / "m4").exists()
    assert (volume / "old").read_text() == "from the host\n"
