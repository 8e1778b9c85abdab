"""CLI containers (`hull create`, `hull run`) served by the factory's pool of clones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hull.runtime import sharedfs
from tests.integration.cli_helpers import Cli, become_subreaper, cleanup, reap_all
from tests.integration.conftest import BundleFactory, Runner
from tests.integration.test_factory import (
    COLD,
    PROBE,
    pool_factory,
    pool_status,
    wait_pool,
)
from tests.integration.test_mounts import bind, with_mounts


@pytest.fixture
def pooled(tmp_path: Path, hull: Runner) -> Iterator[Path]:
    """A configuration whose factory has a template and a pool of one warm clone."""
    with pool_factory(hull, tmp_path, 1) as config:
        yield config


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def own_qemu(cid: str) -> list[str]:
    """QEMU processes started for sandbox ``cid`` itself (a pooled clone is named after
    its slot, not after the sandbox that leases it)."""
    out = subprocess.run(["pgrep", "-af", f"hull-{cid},debug-threads"], capture_output=True,
                         text=True, check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_cli_create_takes_a_pooled_clone(hull: Runner, bundle: BundleFactory, pooled: Path,
                                         state_root: Path, tmp_path: Path) -> None:
    """`hull create` leases the pool's clone: the rootfs and a bind mount reach it through
    its one share (pod layout, bound after the lease); delete ends the lease, and
    nothing of the container stays mounted."""
    become_subreaper()
    cli = Cli(state_root, tmp_path)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "old").write_text("from the host\n")
    b = bundle(["sh", "-c", "cat /data/old /etc/hostname-test; echo hi > /data/new; "
                "echo written > /written; cat /written"],
               mutate=with_mounts(bind("/data", volume)))
    (b / "rootfs/etc/hostname-test").write_text("in the rootfs\n")
    config = ("--config", str(pooled))
    try:
        with cleanup(cli, "pc1"):
            done, out, err = cli.create("pc1", b, extra=config)
            assert done.returncode == 0, err.read_text()
            assert not own_qemu("pc1"), "the container restored or booted a VM of its own"
            assert (pooled_now := pool_status(hull, pooled)) and pooled_now["leased"] == 1
            # Its proxy came from the pool daemon's fork server (hull.runtime.forkserver).
            proxy = json.loads((state_root / "pc1/state.json").read_text())["proxy_pid"]
            assert parent(parent(proxy)) == pooled_now["pid"]
            assert sharedfs.mounts_under(state_root / "pc1/shared/pc1/rootfs")
            assert cli("start", "pc1", extra=config).returncode == 0
            assert cli.wait_status("pc1", "stopped")["status"] == "stopped"
            assert cli("delete", "pc1", extra=config).returncode == 0
            assert out.read_text() == "from the host\nin the rootfs\nwritten\n", (
                out.read_text() + err.read_text())
        assert (volume / "new").read_text() == "hi\n"
        assert (b / "rootfs/written").read_text() == "written\n"
        assert sharedfs.mounts_under(state_root) == [] and not (state_root / "pc1").exists()
        wait_pool(hull, pooled, idle=1, leased=0)
        # A proxy killed with SIGKILL ends its lease too; delete --force cleans the rest.
        with cleanup(cli, "pc2"):
            done, _, err = cli.create("pc2", b, extra=config)
            assert done.returncode == 0, err.read_text()
            wait_pool(hull, pooled, idle=1, leased=1)
            state = json.loads((state_root / "pc2/state.json").read_text())
            server = parent(state["proxy_pid"])
            os.kill(state["proxy_pid"], signal.SIGKILL)
            wait_pool(hull, pooled, idle=1, leased=0)
            assert cli("delete", "--force", "pc2").returncode == 0
        assert sharedfs.mounts_under(state_root) == [] and not (state_root / "pc2").exists()
        # Without its fork server (killed), `hull create` starts its proxy itself.
        os.kill(server, signal.SIGKILL)
        with cleanup(cli, "pc3"):
            done, _, err = cli.create("pc3", b, extra=config)
            assert done.returncode == 0, err.read_text()
            state = json.loads((state_root / "pc3/state.json").read_text())
            assert parent(parent(state["proxy_pid"])) != pool_status(hull, pooled)["pid"]
            assert cli("delete", "--force", "pc3").returncode == 0
        assert sharedfs.mounts_under(state_root) == [] and not (state_root / "pc3").exists()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{server}").exists(), "the daemon reaps its fork server"
        assert not sharedfs.mounts_under(volume)
    finally:
        reap_all()


def test_cli_run_from_the_pool_is_no_twin(hull: Runner, bundle: BundleFactory, pooled: Path,
                                          tmp_path: Path) -> None:
    """`hull run` through pooled clones (warmed up by the pool with a container of its
    own): each gets fresh entropy, its clock and its hostname before its process runs."""
    outs = []
    for name in ("ptwin1", "ptwin2"):
        log = tmp_path / f"{name}.log"
        wait_pool(hull, pooled, idle=1, leased=0)
        done = hull("--config", str(pooled), "--debug", "--log", str(log), "run", "-b",
                    str(bundle(["sh", "-c", PROBE])), name)
        assert done.returncode == 0, done.stderr
        assert COLD not in done.stderr, done.stderr
        text = log.read_text()
        assert f"sandbox {name}: took the pooled clone" in text, text
        assert f"sandbox {name} ready in" in text and "lease" in text
        outs.append(done.stdout.decode().split())
    first, second = outs
    assert first[0] != second[0], "two pooled clones read the same bytes from /dev/urandom"
    assert first[1] != second[1], "two pooled clones made the same UUID"
    for out in outs:
        assert len(out[0]) == 64 and uuid.UUID(out[1])
        assert abs(int(out[2]) - time.time()) < 30, "the clone's wall clock was not set"
        assert out[3] == "hulltest"
    wait_pool(hull, pooled, idle=1, leased=0)


def test_pod_layout_without_a_pooled_clone(hull: Runner, bundle: BundleFactory, pooled: Path,
                                           tmp_path: Path) -> None:
    """A container the pool cannot serve (a larger size class) keeps the pod layout on a
    VM of its own: its rootfs, bound within one filesystem, still reaches the guest."""
    config = tmp_path / "sized.toml"
    config.write_text(pooled.read_text() + "auto_rebuild = false\n")

    def limited(spec: dict[str, object]) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 128 << 20}}  # type: ignore[index]

    log = tmp_path / "sized.log"
    b = bundle(["sh", "-c", "cat /etc/hostname-test"], mutate=limited)
    (b / "rootfs/etc/hostname-test").write_text("in the rootfs\n")
    done = hull("--config", str(config), "--debug", "--log", str(log), "run", "-b", str(b),
                "psized")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"in the rootfs\n"
    text = log.read_text()  # --log: the notices go there
    assert COLD.decode() in text and "took the pooled clone" not in text, text
    wait_pool(hull, pooled, idle=1, leased=0)


def test_fork_server_without_a_pool(hull: Runner, bundle: BundleFactory, tmp_path: Path,
                                    state_root: Path) -> None:
    """factory.fork_server with pool_size 0: `hull factory init` starts the daemon for
    its fork server alone, which forks `hull create`'s proxy; the clone is the sandbox's
    own. With fork_server off there is no daemon and the proxy is `hull create`'s child.
    destroy leaves nothing (test_factory.factory_dir)."""
    from tests.integration.test_factory import factory_config, factory_dir

    become_subreaper()
    cli = Cli(state_root, tmp_path)
    b = bundle(["sleep", "30"])
    template_dir = Path("/dev/shm") / f"hull-test-{uuid.uuid4().hex[:12]}"
    try:
        for forked in (True, False):
            config = factory_config(tmp_path / f"fs-{forked}.toml", template_dir,
                                    f"fork_server = {str(forked).lower()}\n")
            with factory_dir(hull, config):
                done = hull("--config", str(config), "factory", "init")
                assert done.returncode == 0, done.stderr
                assert (b"pool daemon started" in done.stdout) == forked, done.stdout
                deadline = time.monotonic() + 30  # the daemon starts detached
                while forked and ((daemon := pool_status(hull, config)) is None or not (
                        template_dir / "forkserver.sock").exists()):
                    assert time.monotonic() < deadline, "no daemon for the fork server"
                    time.sleep(0.2)
                daemon = pool_status(hull, config)
                status = hull("--config", str(config), "factory", "status")
                cid = f"fs{int(forked)}"
                with cleanup(cli, cid):
                    done, _, err = cli.create(cid, b, extra=("--config", str(config)))
                    assert done.returncode == 0, err.read_text()
                    assert own_qemu(cid), "no clone of its own"
                    proxy = json.loads((state_root / cid / "state.json").read_text()
                                       )["proxy_pid"]
                    if forked:
                        assert daemon is not None and daemon["size"] == 0
                        assert b"pool: none (factory.pool_size is 0); daemon pid" in (
                            status.stdout)
                        assert parent(parent(proxy)) == daemon["pid"]
                        comm = Path(f"/proc/{proxy}/comm").read_text().strip()
                        assert comm == "hull-proxy"
                    else:
                        assert daemon is None and b"pool:" not in status.stdout
                        assert Path(f"/proc/{proxy}/comm").read_text().strip() != (
                            "hull-proxy")
                    # The pod layout without a pool: the rootfs bound into the one share.
                    assert sharedfs.mounts_under(state_root / cid / "shared" / cid / "rootfs")
                    os.kill(proxy, signal.SIGKILL)  # a dead proxy: delete --force cleans
                    assert cli("delete", "--force", cid).returncode == 0
                assert sharedfs.mounts_under(state_root) == []
                assert not (state_root / cid).exists()
    finally:
        reap_all()
