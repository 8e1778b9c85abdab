"""VM templates: `hull run` through a clone, clones that are not twins, bad templates."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import HULL, BundleFactory, Runner
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd
from tests.integration.test_network import (
    CTR_V4,
    Net,
    echo_client,
    echo_round_trip,
    hull_filters,
    ip,
    net,
    one_veth,
    with_netns,
)
from tests.integration.test_shim_v2 import qemu_of, shim_pids, wait_status

__all__ = ["containerd", "net", "one_veth"]  # the fixtures, imported for the tests of this module

COLD = b"booting cold"
PROBE = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
         "cat /proc/sys/kernel/random/uuid; date +%s; hostname")


def factory_config(path: Path, template_dir: Path, extra: str = "") -> Path:
    path.write_text(f'[factory]\nenabled = true\ntemplate_dir = "{template_dir}"\n{extra}')
    return path


@contextlib.contextmanager
def factory_dir(hull: Runner, config: Path) -> Iterator[Path]:
    """The factory of ``config``: destroyed at the end (builders, pool and all), and
    nothing of it may be left running."""
    template_dir = Path(config.read_text().split('template_dir = "')[1].split('"')[0])
    try:
        yield template_dir
    finally:
        done = hull("--config", str(config), "factory", "destroy")
        shutil.rmtree(template_dir, ignore_errors=True)
        assert done.returncode == 0, done.stderr
        assert not factory_processes(template_dir), "the factory left processes behind"


def factory_processes(template_dir: Path) -> list[str]:
    """QEMU, builders and pool daemons working in ``template_dir``."""
    out = subprocess.run(["pgrep", "-af", str(template_dir)], capture_output=True,
                         text=True, check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture
def templated(tmp_path: Path, hull: Runner) -> Iterator[Path]:
    """A configuration file whose factory has a fresh template (in its own tmpfs dir)."""
    template_dir = Path("/dev/shm") / f"hull-test-{uuid.uuid4().hex[:12]}"
    config = factory_config(tmp_path / "factory.toml", template_dir)
    with factory_dir(hull, config):
        done = hull("--config", str(config), "factory", "init")
        assert done.returncode == 0, done.stderr
        yield config


def only_template(config: Path) -> Path:
    template_dir = Path(config.read_text().split('template_dir = "')[1].split('"')[0])
    # Not the daemon's sockets (pool.sock, forkserver.sock) beside the template.
    (found,) = [p for p in template_dir.iterdir() if not p.name.startswith(".")
                and p.is_dir()]
    return found


def probe(hull: Runner, config: Path, bundle: BundleFactory, name: str
          ) -> tuple[list[str], bytes, float]:
    started = time.monotonic()
    done = hull("--config", str(config), "run", "-b", str(bundle(["sh", "-c", PROBE])), name)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split(), done.stderr, took


def test_clones_are_not_twins(hull: Runner, bundle: BundleFactory, templated: Path) -> None:
    first, err1, _ = probe(hull, templated, bundle, "twin1")
    second, err2, _ = probe(hull, templated, bundle, "twin2")
    assert COLD not in err1 + err2, err1 + err2
    assert first[0] != second[0], "two clones read the same bytes from /dev/urandom"
    assert first[1] != second[1], "two clones made the same UUID"
    for out in (first, second):
        assert len(out[0]) == 64 and uuid.UUID(out[1])
        assert abs(int(out[2]) - time.time()) < 30, "the clone's wall clock was not set"
        assert out[3] == "hulltest"


def test_run_through_a_template(hull: Runner, bundle: BundleFactory, templated: Path,
                                tmp_path: Path) -> None:
    cold_config = tmp_path / "cold.toml"
    cold_config.write_text("[factory]\nenabled = false\n")
    _, _, cold = probe(hull, cold_config, bundle, "cold")
    _, err, warm = probe(hull, templated, bundle, "warm")
    assert COLD not in err, err
    done = hull("--config", str(templated), "run", "-b",
                str(bundle(["sh", "-c", "cat /etc/passwd; echo hi > /tmp/x; cat /tmp/x"])),
                "rootfs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"root:x:0:0") and done.stdout.endswith(b"hi\n")
    print(f"\nhull run: cold {cold:.2f}s, from a template {warm:.2f}s")


def test_a_clone_serves_rootfs_and_binds_through_one_9p_device(
        hull: Runner, bundle: BundleFactory, templated: Path, tmp_path: Path) -> None:
    """Templates have one 9p device (each costs a clone ~1.2 MiB of QEMU memory): a CLI
    container's rootfs is bound into its shared directory beside its bind sources."""
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "old").write_text("from the host\n")

    def with_bind(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/data", "type": "bind",
                               "source": str(volume), "options": ["rbind", "rw"]})

    b = bundle(["sh", "-c", "cat /data/old /etc/in-rootfs; echo new > /data/new"],
               mutate=with_bind)
    (b / "rootfs/etc/in-rootfs").write_text("from the rootfs\n")
    log = tmp_path / "one9p.log"
    done = hull("--config", str(templated), "--debug", "--log", str(log), "run", "-b",
                str(b), "one9p")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"from the host\nfrom the rootfs\n"
    assert (volume / "new").read_text() == "new\n"
    (qemu_line,) = [line for line in log.read_text().splitlines()
                    if "starting" in line and "qemu-system" in line]
    assert qemu_line.count("virtio-9p-device") == 1, qemu_line
    assert COLD.decode() not in log.read_text()


def rewrite_manifest(template: Path, **changes: object) -> None:
    manifest = json.loads((template / "manifest.json").read_text())
    manifest.update(changes)
    (template / "manifest.json").write_text(json.dumps(manifest))


def test_bad_templates_fall_back_to_a_cold_boot(hull: Runner, bundle: BundleFactory,
                                                templated: Path) -> None:
    # Bypassed, not rebuilt: this test breaks the one template step by step.
    templated.write_text(templated.read_text() + "auto_rebuild = false\n")
    template = only_template(templated)
    state = (template / "state").read_bytes()
    # 1. a flipped bit in the device state: caught by its checksum
    (template / "state").write_bytes(state[:1000] + bytes([state[1000] ^ 1]) + state[1001:])
    out, err, _ = probe(hull, templated, bundle, "corrupt")
    assert b"corrupt" in err and COLD in err, err
    # 2. a truncated device state whose manifest was made to match: QEMU refuses it, Hull
    #    gives up on the clone within factory.restore_timeout and boots cold
    short = state[: len(state) // 2]
    (template / "state").write_bytes(short)
    rewrite_manifest(template, state_sha256=hashlib.sha256(short).hexdigest())
    out, err, _ = probe(hull, templated, bundle, "truncated")
    assert b"did not restore" in err and COLD in err, err
    assert len(out) == 4
    # 3. a template made for another configuration
    (template / "state").write_bytes(state)
    rewrite_manifest(template, state_sha256=hashlib.sha256(state).hexdigest(),
                     key={"format": 1, "memory_mib": 1})
    _, err, _ = probe(hull, templated, bundle, "mismatch")
    assert b"another configuration" in err and COLD in err, err
    # 4. a truncated RAM file
    rewrite_manifest(template, key=json.loads(
        (template / "manifest.json").read_text())["key"])
    os.truncate(template / "ram", 4096)
    _, err, _ = probe(hull, templated, bundle, "shortram")
    assert COLD in err, err
    status = hull("--config", str(templated), "factory", "status")
    assert status.returncode == 1 and b"truncated" in status.stdout


def test_deleting_the_template_does_not_disturb_running_clones(
        hull: Runner, bundle: BundleFactory, templated: Path, state_root: Path) -> None:
    script = "echo up; read x; head -c 8 /dev/urandom | od -An -tx1; echo alive"
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "--config", str(templated),
                             "run", "-b", str(bundle(["sh", "-c", script])), "survivor"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == b"up\n"
        done = hull("--config", str(templated), "factory", "destroy")
        assert done.returncode == 0 and b"removed 1" in done.stdout, done
        out, err = proc.communicate(b"go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.endswith(b"alive\n") and COLD not in err


def test_networked_clone(hull: Runner, bundle: BundleFactory, templated: Path,
                         one_veth: Net, state_root: Path) -> None:
    """A clone gets the veth's MAC, MTU and address on the template's spare NIC, and
    serves TCP to the peer."""
    ip("link", "set", "eth0", "mtu", "1400", netns=one_veth.ctr)
    mac = re.search(r"link/ether (\S+)", ip("link", "show", "eth0", netns=one_veth.ctr))
    assert mac
    b = bundle(["sh", "-c", "ip addr show eth0; exec nc -l -p 7000 -e cat"],
               mutate=with_netns(one_veth.ctr_path))
    client, code, out, err = echo_round_trip(
        one_veth, ["--config", str(templated), "run", "-b", str(b), "netclone"], state_root,
        "through-a-clone")
    assert client.returncode == 0, client.stderr + err
    assert client.stdout.strip() == "through-a-clone"
    assert code == 0 and COLD.decode() not in err, err
    assert f"link/ether {mac.group(1)}" in out and "mtu 1400" in out, out
    assert f"inet {CTR_V4}/24" in out


def restart_with(containerd: Containerd, config: Path) -> None:
    """containerd again, its shims using Hull configuration ``config``."""
    containerd.stop()
    containerd.env["HULL_CONFIG"] = str(config)
    containerd.start()


def run_echo_pod(containerd: Containerd, rootfs: Path, net: Net, name: str) -> None:
    """A pod in ``net``'s namespace whose container echoes one TCP connection on 7000."""
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns",
                   f"network:{net.ctr_path}", "--rootfs", str(rootfs), name,
                   "nc", "-l", "-p", "7000", "-e", "cat")


def echo_through(net: Net, text: str) -> None:
    client = echo_client(net, text)
    assert client.returncode == 0, client.stderr
    assert client.stdout.strip() == text


def test_shim_v2_pod_from_a_template(containerd: Containerd, rootfs_template: Path,
                                     templated: Path, one_veth: Net, tmp_path: Path) -> None:
    """containerd-shim-hull-v2 clones its pod's VM from the template, NIC included."""
    restart_with(containerd, templated)
    rootfs = tmp_path / "rootfs"
    shutil.copytree(rootfs_template, rootfs, symlinks=True)
    run_echo_pod(containerd, rootfs, one_veth, "tpod")
    (qemu,) = qemu_of("tpod")
    assert "-incoming defer" in qemu and f"mem-path={only_template(templated)}/ram" in qemu
    echo_through(one_veth, "pod-clone")
    wait_status(containerd, "tpod", "STOPPED")
    containerd.ctr("task", "delete", "tpod")
    containerd.ctr("containers", "rm", "tpod")


def wait_for_template(hull: Runner, config: Path, timeout: float = 180, **key: Any
                      ) -> dict[str, Any]:
    """The manifest of a usable template whose key has ``key``'s values, once a build
    made it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads(hull("--config", str(config), "factory", "status", "--json"
                                 ).stdout)
        for row in status["templates"]:
            if row["status"] == "ok" and all(
                    row["manifest"]["key"][k] == v for k, v in key.items()):
                return dict(row["manifest"])
        time.sleep(1)
    raise AssertionError(f"no template with {key} after {timeout:g}s: {status}")


def test_sized_sandbox_gets_its_template_built(hull: Runner, bundle: BundleFactory,
                                               templated: Path) -> None:
    """A container whose memory limit makes its VM bigger misses the default template:
    it boots cold, its size class (256 + 128 MiB -> 512 MiB) is built in the background,
    and the next one is a clone of it."""
    def limited(spec: dict[str, Any]) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 128 << 20}}

    b = bundle(["sh", "-c", "grep MemTotal /proc/meminfo"], mutate=limited)
    first = hull("--config", str(templated), "run", "-b", str(b), "sized1")
    assert first.returncode == 0, first.stderr
    assert COLD in first.stderr and b"in the background" in first.stderr, first.stderr
    built = wait_for_template(hull, templated, memory_mib=512)
    assert built["key"]["vcpus"] == 1
    again = hull("--config", str(templated), "run", "-b", str(b), "sized2")
    assert again.returncode == 0 and COLD not in again.stderr, again.stderr
    for done in (first, again):  # the guest has the class's memory, cold or cloned
        assert 400 << 10 < int(done.stdout.split()[1]) <= 512 << 10, done.stdout
    # The default-size template is still there, and still used.
    _, err, _ = probe(hull, templated, bundle, "default")
    assert COLD not in err, err


def test_stale_template_is_rebuilt(hull: Runner, bundle: BundleFactory,
                                   templated: Path) -> None:
    """A corrupt template is bypassed and rebuilt in its place; one made for another
    kernel command line is pruned when the template for the new one is built."""
    template = only_template(templated)
    state = template / "state"
    state.write_bytes(state.read_bytes()[:-1] + b"x")
    _, err, _ = probe(hull, templated, bundle, "corrupt")
    assert b"corrupt" in err and COLD in err and b"in the background" in err, err
    deadline = time.monotonic() + 180
    while hull("--config", str(templated), "factory", "status").returncode != 0:
        assert time.monotonic() < deadline, "the corrupt template was not rebuilt"
        time.sleep(1)
    _, err, _ = probe(hull, templated, bundle, "rebuilt")
    assert COLD not in err, err
    templated.write_text(templated.read_text() + '[hypervisor]\nkernel_params = "hull.x=1"\n')
    _, err, _ = probe(hull, templated, bundle, "newparams")
    assert b"another configuration" not in err and COLD in err, err
    wait_for_template(hull, templated, memory_mib=256, kernel_params=["hull.x=1"])
    assert not template.exists(), "the template of the old command line was not pruned"


def pool_status(hull: Runner, config: Path) -> dict[str, Any] | None:
    status = json.loads(hull("--config", str(config), "factory", "status", "--json").stdout)
    pooled: dict[str, Any] | None = status["pool"]
    return pooled


def wait_pool(hull: Runner, config: Path, idle: int, leased: int, timeout: float = 120
              ) -> None:
    deadline = time.monotonic() + timeout
    while (pooled := pool_status(hull, config)) is None or (
            pooled["idle"], pooled["leased"]) != (idle, leased):
        assert time.monotonic() < deadline, f"pool is {pooled}, not {idle} idle {leased} leased"
        time.sleep(0.5)


@contextlib.contextmanager
def pool_factory(hull: Runner, tmp_path: Path, size: int) -> Iterator[Path]:
    """A configuration whose factory has a template and a pool of ``size`` ready clones
    (`hull factory init` starts its daemon); destroyed at the end, as factory_dir."""
    template_dir = Path("/dev/shm") / f"hull-test-{uuid.uuid4().hex[:12]}"
    config = factory_config(tmp_path / "pool.toml", template_dir, f"pool_size = {size}\n")
    with factory_dir(hull, config):
        done = hull("--config", str(config), "factory", "init")
        assert done.returncode == 0 and b"pool daemon started" in done.stdout, done
        wait_pool(hull, config, idle=size, leased=0)
        yield config


def test_pool_hands_out_clones_and_destroy_leaves_nothing(
        hull: Runner, containerd: Containerd, rootfs_template: Path, tmp_path: Path) -> None:
    """`hull factory init` starts the pool daemon; a shim v2 pod leases one of its
    clones (the refill restores another); the lease ends with the pod; a shim killed
    with SIGKILL ends its lease too; destroy stops the daemon and every clone."""
    with pool_factory(hull, tmp_path, 2) as config:
        restart_with(containerd, config)
        rootfs = tmp_path / "rootfs"
        shutil.copytree(rootfs_template, rootfs, symlinks=True)
        containerd.ctr("run", "-d", "--runtime", RUNTIME, "--rootfs", str(rootfs), "pooled",
                       "sh", "-c", "echo from-the-pool > /tmp/x; cat /tmp/x; sleep 60")
        assert not qemu_of("pooled"), "the pod booted or restored a VM of its own"
        wait_pool(hull, config, idle=2, leased=1)  # taken, and refilled
        out = containerd.ctr("task", "exec", "--exec-id", "e1", "pooled", "cat", "/tmp/x")
        assert out.stdout == "from-the-pool\n"
        # The shim dies without a word: the daemon ends the lease and kills the clone.
        (shim,) = shim_pids("pooled")
        os.kill(shim, signal.SIGKILL)
        wait_pool(hull, config, idle=2, leased=0)
        containerd.ctr("task", "delete", "-f", "pooled", check=False)
        containerd.ctr("containers", "rm", "pooled", check=False)
        started = time.monotonic()
        done_run = containerd.ctr("run", "--rm", "--runtime", RUNTIME, "--rootfs", str(rootfs),
                                  "pooled2", "echo", "second")
        took = time.monotonic() - started
        assert done_run.stdout == "second\n"
        wait_pool(hull, config, idle=2, leased=0)
        print(f"\nctr run --rm from the pool: {took:.2f}s")
    assert pool_status(hull, config) is None


def test_networked_pod_leases_a_pooled_clone(
        hull: Runner, containerd: Containerd, rootfs_template: Path, one_veth: Net,
        tmp_path: Path) -> None:
    """A pod with a network leases a pooled clone: the clone's tap is moved into the pod's
    namespace and the veth redirected to it; TCP reaches the pod through it. The lease's
    end, by the pod's end or its shim's SIGKILL, leaves the namespace as it was (no tap,
    no filters)."""
    before = one_veth.snapshot()
    with pool_factory(hull, tmp_path, 1) as config:
        restart_with(containerd, config)
        rootfs = tmp_path / "rootfs"
        shutil.copytree(rootfs_template, rootfs, symlinks=True)
        run_echo_pod(containerd, rootfs, one_veth, "npool")
        assert not qemu_of("npool"), "the pod booted or restored a VM of its own"
        wait_pool(hull, config, idle=1, leased=1)
        assert hull_filters(one_veth) and "hullp" in ip("link", netns=one_veth.ctr)
        echo_through(one_veth, "through-the-pool")
        wait_status(containerd, "npool", "STOPPED")
        containerd.ctr("task", "delete", "npool")
        containerd.ctr("containers", "rm", "npool")
        wait_pool(hull, config, idle=1, leased=0)
        assert one_veth.snapshot() == before
        # The shim dies without a word: the daemon ends the lease, containerd's delete
        # removes the filters (network.json); nothing of the pod is left.
        containerd.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns",
                       f"network:{one_veth.ctr_path}", "--rootfs", str(rootfs), "npool2",
                       "sleep", "1000")
        wait_pool(hull, config, idle=1, leased=1)
        (shim,) = shim_pids("npool2")
        os.kill(shim, signal.SIGKILL)
        wait_pool(hull, config, idle=1, leased=0)
        containerd.ctr("task", "delete", "-f", "npool2", check=False)
        containerd.ctr("containers", "rm", "npool2", check=False)
        deadline = time.monotonic() + 30
        while one_veth.snapshot() != before:
            assert time.monotonic() < deadline, "the killed pod's taps or filters remain"
            time.sleep(0.5)
