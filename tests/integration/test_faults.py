"""Fault injection (CLI mode): whatever dies — QEMU, the proxy, a shim, the guest kernel —
the client sees the container stopped within 5 seconds with a meaningful status, and
`delete --force` then leaves nothing behind (the no_leaks fixture checks)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import Cli, become_subreaper, cleanup, reap, reap_all
from tests.integration.conftest import HULL, BundleFactory

LOOP = ["sh", "-c", "echo started; while true; do sleep 0.1; done"]


@pytest.fixture
def cli(state_root: Path, tmp_path: Path, guest_assets_ready: None) -> Iterator[Cli]:
    become_subreaper()
    yield Cli(state_root, tmp_path)
    reap_all()


def running(cli: Cli, bundle: BundleFactory, cid: str, args: list[str] | None = None
            ) -> dict[str, int]:
    done, _, err = cli.create(cid, bundle(args or LOOP))
    assert done.returncode == 0, err.read_text()
    assert cli("start", cid).returncode == 0
    state = (cli.root / cid / "state.json").read_text()
    import json

    data = json.loads(state)
    return {"shim": data["pid"], "proxy": data["proxy_pid"], "qemu": qemu_of(data["proxy_pid"])}


def qemu_of(proxy_pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(proxy_pid), "qemu-system"], capture_output=True,
                         text=True, check=False).stdout.split()
    assert out, f"no qemu under proxy {proxy_pid}"
    return int(out[0])


def stopped_within(cli: Cli, cid: str, seconds: float) -> dict[str, object]:
    start = time.monotonic()
    state = cli.wait_status(cid, "stopped", timeout=seconds)
    assert state["status"] == "stopped", state
    assert time.monotonic() - start <= seconds + 1
    return state


def gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("victim", ["qemu", "proxy"])
def test_sigkill_of_the_vm_side_stops_the_container(cli: Cli, bundle: BundleFactory,
                                                    victim: str) -> None:
    with cleanup(cli, "f1"):
        pids = running(cli, bundle, "f1")
        os.kill(pids[victim], signal.SIGKILL)
        assert reap(pids["shim"], timeout=5) == 128 + signal.SIGKILL
        stopped_within(cli, "f1", 5)
        assert gone(pids["qemu"]) and gone(pids["proxy"])
        assert cli("delete", "--force", "f1").returncode == 0
        assert not (cli.root / "f1").exists()


def test_sigkill_of_the_shim_kills_the_process(cli: Cli, bundle: BundleFactory) -> None:
    with cleanup(cli, "f2"):
        pids = running(cli, bundle, "f2")
        os.kill(pids["shim"], signal.SIGKILL)
        assert reap(pids["shim"]) == -signal.SIGKILL
        stopped_within(cli, "f2", 5)
        assert cli("delete", "f2").returncode == 0
        assert gone(pids["qemu"]) and gone(pids["proxy"])


def test_guest_kernel_panic(cli: Cli, bundle: BundleFactory) -> None:
    with cleanup(cli, "f3"):
        pids = running(cli, bundle, "f3", ["sh", "-c", "sleep 0.5; echo c > /proc/sysrq-trigger;"
                                                 " sleep 100"])
        assert reap(pids["shim"], timeout=15) == 128 + signal.SIGKILL
        stopped_within(cli, "f3", 5)
        assert gone(pids["qemu"])
        assert "Kernel panic" in (cli.root / "f3" / "console.log").read_text()
        assert cli("delete", "--force", "f3").returncode == 0


def test_killed_qemu_under_hull_run_is_an_error(bundle: BundleFactory, state_root: Path,
                                                guest_assets_ready: None) -> None:
    b = bundle(LOOP)
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "run", "-b", str(b), "r1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        qemu = subprocess.run(["pgrep", "-f", "hull-r1,debug-threads"], capture_output=True,
                              text=True, check=True).stdout.split()[0]
        os.kill(int(qemu), signal.SIGKILL)
        _, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert b"vm of container r1 died" in err
    assert not (state_root / "r1").exists()


def test_a_hung_guest_is_an_error_within_five_seconds(cli: Cli, bundle: BundleFactory) -> None:
    with cleanup(cli, "f4"):
        pids = running(cli, bundle, "f4")
        assert cli("pause", "f4").returncode == 0  # vCPUs stopped: the agent cannot answer
        start = time.monotonic()
        done = cli("kill", "f4", "KILL")
        assert done.returncode == 1 and b"did not answer" in done.stderr
        assert time.monotonic() - start < 8  # 5 s wait + process start-up
        assert cli.state("f4")["status"] == "paused"
        assert cli("delete", "--force", "f4").returncode == 0
        assert gone(pids["qemu"]) and gone(pids["proxy"])
        assert reap(pids["shim"]) is not None


@pytest.mark.parametrize("point", ["create:saved", "create:proxy-started",
                                   "create:shim-started", "create:created"])
def test_hull_killed_during_create_leaves_cleanable_state(cli: Cli, bundle: BundleFactory,
                                                          point: str) -> None:
    b = bundle(LOOP)
    with open(cli.work / "out", "wb") as out:
        done = subprocess.run([*HULL, "--root", str(cli.root), "create", "--bundle", str(b),
                               "k1"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              env={**os.environ, "HULL_CRASH_AT": point}, timeout=60,
                              check=False)
    assert done.returncode == -signal.SIGKILL
    state = cli("state", "k1")  # readable, or cleanly "does not exist"
    assert state.returncode == 0 or b"does not exist" in state.stderr, state.stderr
    assert cli("delete", "--force", "k1").returncode == 0
    assert not (cli.root / "k1").exists()
    time.sleep(1.5)  # an orphaned proxy notices its state is gone within a second
    reap_all()


@pytest.mark.parametrize("point", ["delete:locked", "delete:torn-down"])
def test_hull_killed_during_delete_leaves_cleanable_state(cli: Cli, bundle: BundleFactory,
                                                          point: str) -> None:
    with cleanup(cli, "k2"):
        running(cli, bundle, "k2")
        done = subprocess.run([*HULL, "--root", str(cli.root), "delete", "--force", "k2"],
                              env={**os.environ, "HULL_CRASH_AT": point}, capture_output=True,
                              timeout=60, check=False)
        assert done.returncode == -signal.SIGKILL
        assert cli("state", "k2").returncode == 0
        assert cli("delete", "--force", "k2").returncode == 0
        assert not (cli.root / "k2").exists()
