"""containerd 1.6 with its CRI plugin, a `hull` runtime handler and a private CNI network.

Every setting here mattered (MEASUREMENTS.md "containerd 1.6 CRI works here offline"):
the pause image is a local one, ``restrict_oom_score_adj`` (CRI gives the sandbox
oom_score_adj -998), network namespaces under the private state dir, the streaming
server on an ephemeral loopback port, no AppArmor, cgroupfs rather than systemd, CNI
plugins from Debian's containernetworking-plugins (/usr/lib/cni) with a private
conf_dir and a bridge + host-local network (ipMasq off: no iptables). The bridge plugin
never deletes its bridge: the fixture does. Pods are removed through CRI before
containerd stops, so no shim or VM outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.containerd_fixture import Containerd, _unmount_under
from tests.integration.cri import images
from tests.integration.cri.client import Cri

HANDLER = "hull"
RUNC_HANDLER = "runc"
K8S_NAMESPACE = "k8s.io"
# The VM size the fixture's Hull configuration gives a pod without resources (not the
# shipped default, so the tests see that CRI's ConfigPath reaches the shim).
VM_VCPUS = 1
VM_MEMORY_MIB = 192
HULL_CONFIG = f"""\
[hypervisor]
default_vcpus = {VM_VCPUS}
default_memory_mib = {VM_MEMORY_MIB}
"""

CRI_CONFIG = """\
version = 2
root = "{{dir}}/root"
state = "{{dir}}/state"
[grpc]
  address = "{{dir}}/c.sock"
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{{dir}}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{{dir}}/runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hull]
      runtime_type = "io.containerd.hull.v2"
      pod_annotations = ["io.hull.*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hull.options]
        ConfigPath = "{{dir}}/hull.toml"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{{dir}}/cni"
    max_conf_num = 1
"""


def cni_conflist(bridge: str, subnet: str, data_dir: Path) -> dict[str, object]:
    return {
        "cniVersion": "0.4.0",
        "name": bridge,
        "plugins": [{
            "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "dataDir": str(data_dir)},
        }],
    }


@dataclass
class CriEnv:
    containerd: Containerd
    client: Cri
    bridge: str

    def remove_all_pods(self) -> None:
        for pod in self.client.pods():
            with contextlib.suppress(Exception):
                self.client.stop_pod(pod)
            with contextlib.suppress(Exception):
                self.client.remove_pod(pod)


@pytest.fixture(scope="session")
def image_archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("images")
    return [images.pause_archive(out / "pause.tar"), images.busybox_archive(out / "busybox.tar")]


def start_cri(base: Path, archives: list[Path]) -> CriEnv:
    """containerd with CRI under base, the images imported. The caller stops it."""
    bridge = f"hcni{secrets.token_hex(4)}"[:15]
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24"
    (base / "cni").mkdir(parents=True)
    (base / "hull.toml").write_text(HULL_CONFIG)
    (base / "cni/10-hull.conflist").write_text(
        json.dumps(cni_conflist(bridge, subnet, base / "ipam")))
    daemon = Containerd(base, config=CRI_CONFIG.format(pause=images.PAUSE_IMAGE),
                        namespace=K8S_NAMESPACE)
    daemon.start()
    for archive in archives:
        daemon.ctr("images", "import", str(archive))
    return CriEnv(daemon, Cri(daemon.socket), bridge)


def stop_cri(env: CriEnv) -> None:
    base = env.containerd.base
    try:
        with contextlib.suppress(Exception):
            env.remove_all_pods()
        env.client.close()
        with contextlib.suppress(Exception):
            env.containerd.cleanup()
    finally:
        env.containerd.stop()
        _unmount_under(base)
        subprocess.run(["ip", "link", "del", env.bridge], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def bridge_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


@pytest.fixture
def cri(image_archives: list[Path], guest_assets_ready: None) -> Iterator[CriEnv]:
    for tool in ("containerd", "ctr", "ip"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing (scripts/setup-host.sh)")
    if not Path("/usr/lib/cni/bridge").exists():
        pytest.fail("CNI plugins are missing: apt-get install containernetworking-plugins")
    base = Path(tempfile.mkdtemp(prefix="hullcri-", dir="/tmp"))
    env = start_cri(base, image_archives)
    try:
        yield env
        env.remove_all_pods()
        assert env.client.pods() == [], "pods left after RemovePodSandbox"
        shim_root = env.containerd.shim_root
        left = list(shim_root.rglob("*")) if shim_root.exists() else []
        assert not [p for p in left if p.name != "s"], f"shim state left behind: {left}"
    finally:
        stop_cri(env)
        assert not bridge_exists(env.bridge), f"CNI bridge {env.bridge} left behind"
