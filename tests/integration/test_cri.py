"""Kubernetes CRI through containerd 1.6's CRI plugin with the `hull` runtime handler.

A test CRI client (tests/integration/cri: Hull's own subset of the CRI v1 proto) drives
RunPodSandbox, CreateContainer, StartContainer, ExecSync, ContainerStatus,
StopPodSandbox and RemovePodSandbox; the pod's containers share one VM (one QEMU) and
its loopback. The fixture (cri/fixture.py) removes the pods, stops containerd, deletes
the CNI bridge; the integration conftest adds the no_leaks check.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.clients import http_get
from tests.integration.cri.client import Cri, pb
from tests.integration.cri.fixture import (
    HANDLER,
    VM_MEMORY_MIB,
    VM_VCPUS,
    CriEnv,
    cri,
    image_archives,
)
from tests.integration.cri.images import BUSYBOX_IMAGE

__all__ = ["cri", "image_archives"]  # the fixtures, imported for the tests of this module


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[1])


def _shim_root(pid: int) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    for var in environ:
        if var.startswith(b"HULL_SHIM_ROOT="):
            return var.partition(b"=")[2].decode()
    return ""


def qemu_pids(env: CriEnv) -> set[int]:
    """The QEMU processes of this containerd's hull shims (other tests may run VMs too)."""
    out = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True,
                         check=False).stdout
    mine = str(env.containerd.shim_root)
    return {int(p) for p in out.split()
            if mine in (_shim_root(int(p)), _shim_root(_ppid(int(p))))}


def exec_until(client: Cri, cid: str, cmd: list[str], timeout: float = 60) -> Any:
    """ExecSync until it exits 0 (a server in the other container may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.exec_sync(cid, cmd)
        if reply.exit_code == 0 or time.monotonic() > deadline:
            return reply
        time.sleep(0.5)


def test_pod_of_two_containers_in_one_vm(cri: CriEnv) -> None:
    c = cri.client
    assert c.call("Version", pb.VersionRequest()).runtime_name == "containerd"
    before = qemu_pids(cri)
    pod, pod_config = c.run_pod("web", HANDLER)
    vm = qemu_pids(cri) - before
    assert len(vm) == 1, f"RunPodSandbox started {len(vm)} QEMU processes"

    status = c.pod_status(pod)
    assert status.state == pb.SANDBOX_READY
    assert status.network.ip, "CNI gave the pod no address"
    verbose = c.call("PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=pod,
                                                                    verbose=True))
    info = json.loads(verbose.info["info"])
    assert info["runtimeHandler"] == HANDLER
    # The sandbox pid is a real host process inside the pod's network namespace.
    netns = info["runtimeSpec"]["linux"]["namespaces"]
    netns_path = next(ns["path"] for ns in netns if ns["type"] == "network")
    pid = info["pid"]
    assert (subprocess.run(["stat", "-L", "-c", "%i", f"/proc/{pid}/ns/net"],
                           capture_output=True, text=True, check=True).stdout
            == subprocess.run(["stat", "-L", "-c", "%i", netns_path], capture_output=True,
                              text=True, check=True).stdout)

    server = c.create_container(pod, pod_config, "server", BUSYBOX_IMAGE,
                                ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/www"])
    client = c.create_container(pod, pod_config, "client", BUSYBOX_IMAGE,
                                ["sleep", "3600"])
    c.start_container(server)
    c.start_container(client)
    assert qemu_pids(cri) - before == vm, "the pod's containers did not join its VM"

    reply = exec_until(c, client, ["wget", "-qO-", "http://127.0.0.1:8080/index.html"])
    assert reply.exit_code == 0, reply.stderr
    assert reply.stdout == b"hello from the other container\n"
    reply = c.exec_sync(client, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"out\n", b"err\n", 3)

    for cid, name in ((server, "server"), (client, "client")):
        st = c.container_status(cid)
        assert st.state == pb.CONTAINER_RUNNING, st
        assert st.metadata.name == name
        assert st.started_at > 0

    c.stop_pod(pod)
    for cid in (server, client):
        assert c.container_status(cid).state == pb.CONTAINER_EXITED
    assert c.pod_status(pod).state == pb.SANDBOX_NOTREADY
    c.remove_pod(pod)
    assert c.pods() == []
    deadline = time.monotonic() + 15
    while qemu_pids(cri) & vm and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_pids(cri) & vm, "QEMU outlived RemovePodSandbox"


def _guest_size(c: Cri, cid: str) -> tuple[int, int]:
    """(nproc, MemTotal in MiB) seen in the pod's VM."""
    reply = c.exec_sync(cid, ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"])
    assert reply.exit_code == 0, reply.stderr
    nproc, meminfo = reply.stdout.decode().splitlines()
    return int(nproc), int(meminfo.split()[1]) // 1024


def test_vm_sized_from_pod_resources(cri: CriEnv) -> None:
    """issue 4 item 7: CRI's sandbox-cpu-*/sandbox-memory annotations size the VM."""
    c = cri.client
    sizes = {}
    for name, quota, memory in (("small", 0, 0), ("big", 100_000, 512 << 20)):
        pod, pod_config = c.run_pod(name, HANDLER, cpu_quota=quota,
                                    cpu_period=100_000 if quota else 0, memory=memory)
        cid = c.create_container(pod, pod_config, "main", BUSYBOX_IMAGE, ["sleep", "3600"])
        c.start_container(cid)
        sizes[name] = _guest_size(c, cid)
        c.stop_pod(pod)
        c.remove_pod(pod)
    cpus = os.cpu_count() or 1
    assert sizes["small"][0] == min(VM_VCPUS, cpus)
    assert sizes["big"][0] == min(VM_VCPUS + 1, cpus)
    # MemTotal is the VM's memory less what the guest kernel keeps for itself; the
    # fixture's ConfigPath (not the shipped 256 MiB default) sets the base size.
    small_mib, big_mib = sizes["small"][1], sizes["big"][1]
    assert VM_MEMORY_MIB - 48 < small_mib <= VM_MEMORY_MIB
    assert big_mib - small_mib == pytest.approx(512, abs=16)


def test_container_exit_stop_and_remove_in_a_running_pod(cri: CriEnv) -> None:
    c = cri.client
    pod, pod_config = c.run_pod("life", HANDLER)
    short = c.create_container(pod, pod_config, "short", BUSYBOX_IMAGE,
                               ["sh", "-c", "exit 3"])
    long = c.create_container(pod, pod_config, "long", BUSYBOX_IMAGE, ["sleep", "3600"])
    assert c.container_status(short).state == pb.CONTAINER_CREATED
    c.start_container(long)
    c.start_container(short)
    deadline = time.monotonic() + 30
    while c.container_status(short).state != pb.CONTAINER_EXITED:
        assert time.monotonic() < deadline, "the container's exit never reached CRI"
        time.sleep(0.2)
    st = c.container_status(short)
    assert st.exit_code == 3 and st.finished_at >= st.started_at > 0
    c.call("RemoveContainer", pb.RemoveContainerRequest(container_id=short))

    c.call("StopContainer", pb.StopContainerRequest(container_id=long, timeout=5))
    st = c.container_status(long)
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 128 + 15, st  # SIGTERM
    c.call("RemoveContainer", pb.RemoveContainerRequest(container_id=long))
    assert c.pod_status(pod).state == pb.SANDBOX_READY  # the VM outlives its containers
    again = c.create_container(pod, pod_config, "again", BUSYBOX_IMAGE, ["sleep", "3600"])
    c.start_container(again)
    assert c.exec_sync(again, ["echo", "still here"]).stdout == b"still here\n"
    assert c.exec_sync(again, ["ls", "/bin/sleep"]).exit_code == 0
    c.stop_pod(pod)
    c.remove_pod(pod)


def test_pod_network_reached_from_the_host_and_shared_by_its_containers(cri: CriEnv) -> None:
    """CNI (bridge + host-local) gives the pod an address; a server in one container is
    reached from the host at that address through the test's bridge, and from the
    other container on localhost: the pod's containers share one network in its VM."""
    c = cri.client
    pod, pod_config = c.run_pod("net", HANDLER)
    status = c.pod_status(pod)
    pod_ip = status.network.ip
    assert pod_ip, "CNI gave the pod no address"
    verbose = c.call("PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=pod,
                                                                    verbose=True))
    spec = json.loads(verbose.info["info"])["runtimeSpec"]
    netns = next(ns["path"] for ns in spec["linux"]["namespaces"] if ns["type"] == "network")
    assert os.listdir(f"/sys/class/net/{cri.bridge}/brif"), "no veth on the CNI bridge"

    server = c.create_container(pod, pod_config, "a", BUSYBOX_IMAGE,
                                ["httpd", "-f", "-p", "8080", "-h", "/www"])
    client = c.create_container(pod, pod_config, "b", BUSYBOX_IMAGE, ["sleep", "3600"])
    c.start_container(server)
    c.start_container(client)

    assert http_get(pod_ip, 8080, "/index.html") == b"hello from the other container\n"
    reply = exec_until(c, client, ["wget", "-qO-", "http://127.0.0.1:8080/index.html"])
    assert (reply.exit_code, reply.stdout) == (0, b"hello from the other container\n"), \
        reply.stderr
    reply = c.exec_sync(client, ["ip", "-4", "-o", "addr", "show", "eth0"])
    assert reply.exit_code == 0, reply.stderr
    assert f" {pod_ip}/" in reply.stdout.decode(), reply.stdout

    c.stop_pod(pod)
    c.remove_pod(pod)
    # CNI DEL took the pod's veth and containerd its namespace (the fixture deletes the
    # bridge, which the bridge plugin never does).
    assert not os.path.exists(netns), f"the pod's network namespace {netns} is left"
    assert not os.listdir(f"/sys/class/net/{cri.bridge}/brif"), "a veth is left on the bridge"
