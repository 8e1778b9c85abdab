"""containerd-shim-hull-v2: stats, update, OOM, pause of one pod container, annotations.

Driven by a real containerd 1.6 through `ctr` (containerd_fixture.py), as
test_shim_v2.py; the figures come from the container's cgroup v2 in the guest.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

from hull.shim import ttrpc
from hull.shim.proto import shim_pb2
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd
from tests.integration.test_shim_v2 import qemu_of, rootfs, run, wait_status

__all__ = ["containerd", "rootfs"]  # the fixtures, imported for the tests of this module

MIB = 1024 * 1024
LOOP = ("sh", "-c", "while true; do sleep 1; done")
RESOURCES_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def metrics(c: Containerd, task_id: str) -> dict[str, int]:
    """`ctr task metrics` (its table of the cgroups v2 Metrics) as {name: value}."""
    out = c.ctr("task", "metrics", task_id).stdout.splitlines()
    figures = {}
    for line in out:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            figures[parts[0]] = int(parts[1])
    return figures


def update_call(c: Containerd, task_id: str, resources: bytes) -> ttrpc.Code | None:
    """UpdateTaskRequest to the shim as containerd forwards it (ctr 1.6 has no
    `task update`); the status code, None when it worked."""
    address = (c.bundle(task_id) / "address").read_text()
    request = shim_pb2.UpdateTaskRequest(id=task_id)
    request.resources.type_url = RESOURCES_URL
    request.resources.value = resources

    async def call() -> ttrpc.Code | None:
        nonlocal message
        client = await ttrpc.Client.connect(address)
        try:
            await client.call("containerd.task.v2.Task", "Update",
                              request.SerializeToString())
        except ttrpc.TTRPCError as exc:
            message = str(exc)
            return exc.code
        finally:
            await client.close()
        return None

    message = ""
    code = asyncio.run(call())
    messages.append(message)
    return code


messages: list[str] = []  # update_call's error messages, last one last


def test_metrics_are_the_containers_own(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    assert run(c, rootfs, "m1", *LOOP, detach=True).returncode == 0
    # sh and its sleep, not the whole guest (the loop may be between two sleeps: retry)
    deadline = time.monotonic() + 10
    while (before := metrics(c, "m1"))["pids.current"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 2 <= before["pids.current"] < 10, before
    assert before["cpu.usage_usec"] > 0
    # 40 MiB on the container's /dev/shm (tmpfs): charged to its cgroup, and kept.
    done = c.ctr("task", "exec", "--exec-id", "fill", "m1", "sh", "-c",
                 f"head -c {40 * MIB} /dev/zero > /dev/shm/fill", check=False)
    assert done.returncode == 0, done.stderr
    after = metrics(c, "m1")
    assert after["memory.usage"] - before["memory.usage"] > 30 * MIB, (before, after)
    c.ctr("task", "kill", "-s", "SIGKILL", "m1")
    wait_status(c, "m1", "STOPPED")


def test_update_memory_limit(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    assert run(c, rootfs, "u1", *LOOP, detach=True).returncode == 0
    # What `ctr task update --memory-limit` (1.7) and CRI UpdateContainerResources send.
    assert update_call(c, "u1", json.dumps({"memory": {"limit": 100 * MIB}}).encode()
                       ) is None
    assert metrics(c, "u1")["memory.usage_limit"] == 100 * MIB
    # More than the VM has: refused by the guest, FailedPrecondition with its reason.
    assert update_call(c, "u1", json.dumps({"memory": {"limit": 64 << 30}}).encode()
                       ) == ttrpc.Code.FAILED_PRECONDITION
    assert "exceeds the VM's memory" in messages[-1], messages
    assert update_call(c, "u1", b"{not json") == ttrpc.Code.INVALID_ARGUMENT
    assert update_call(c, "u1", b"[]") == ttrpc.Code.INVALID_ARGUMENT
    assert update_call(c, "u1", json.dumps({"memory": {"limit": "lots"}}).encode()
                       ) == ttrpc.Code.INVALID_ARGUMENT
    assert update_call(c, "u1", json.dumps({"pids": {"limit": 50}}).encode()) is None
    assert metrics(c, "u1")["pids.limit"] == 50
    assert metrics(c, "u1")["memory.usage_limit"] == 100 * MIB  # the refusals changed nothing
    c.ctr("task", "kill", "-s", "SIGKILL", "u1")
    wait_status(c, "u1", "STOPPED")


def test_oom_kill_publishes_the_oom_event(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    events = subprocess.Popen(["ctr", "-a", str(c.socket), "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1)  # subscribed
        # awk is the container's init and doubles a string until the cgroup OOM-kills it.
        done = c.ctr("run", "--rm", "--runtime", RUNTIME, "--memory-limit", str(32 * MIB),
                     "--rootfs", str(rootfs), "o1",
                     "awk", 'BEGIN { s = "x"; while (1) s = s s }', check=False)
        assert done.returncode == 137, (done.returncode, done.stderr)
        time.sleep(1)  # the delete event reaches the subscriber
    finally:
        events.terminate()
        out = events.communicate(timeout=10)[0]
    # "<date> <time> <zone> UTC <namespace> <topic> <event JSON>"
    topics = [next(w for w in line.split() if w.startswith("/tasks/"))
              for line in out.splitlines() if " /tasks/" in line and '"o1"' in line]
    assert "/tasks/oom" in topics, out
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics


def test_disallowed_annotation_fails_create(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    done = c.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                 "io.hull.config.hypervisor.default_memory_mib=512", "--rootfs", str(rootfs),
                 "a1", "true", check=False)
    assert done.returncode != 0
    assert ("annotation io.hull.config.hypervisor.default_memory_mib is not allowed"
            in done.stderr), done.stderr
    assert "invalid argument" in done.stderr, done.stderr  # InvalidArgument, mapped back
    assert "a1" not in c.tasks()
    assert not qemu_of("a1")


def test_kill_of_a_paused_task(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    assert run(c, rootfs, "p1", *LOOP, detach=True).returncode == 0
    c.ctr("task", "pause", "p1")
    assert c.tasks() == {"p1": "PAUSED"}
    assert "cpu.usage_usec" in c.ctr("task", "metrics", "p1").stdout  # the host's view
    started = time.monotonic()
    c.ctr("task", "kill", "-s", "SIGKILL", "p1", timeout=20)
    wait_status(c, "p1", "STOPPED", timeout=15)
    assert time.monotonic() - started < 15
    c.ctr("task", "delete", "p1", timeout=20)
    c.ctr("containers", "rm", "p1")
    assert not qemu_of("p1")


def test_pause_one_container_of_a_pod(containerd: Containerd, rootfs: Path,
                                      tmp_path: Path) -> None:
    """The other containers of the pod keep running: c2's cgroup is frozen in the guest."""
    c = containerd
    second = tmp_path / "rootfs2"
    shutil.copytree(rootfs, second, symlinks=True)

    def pod_run(task_id: str, kind: str, root: Path, *args: str, netns: str = ""
                ) -> subprocess.CompletedProcess[str]:
        join = ["--with-ns", f"network:{netns}"] if netns else []
        return c.ctr("run", "-d", "--runtime", RUNTIME,
                     "--annotation", f"io.kubernetes.cri.container-type={kind}",
                     "--annotation", "io.kubernetes.cri.sandbox-id=ps", *join,
                     "--rootfs", str(root), task_id, *args, check=False)

    assert pod_run("ps", "sandbox", rootfs, *LOOP).returncode == 0
    pid = next(line.split()[1] for line in c.ctr("task", "ls").stdout.splitlines()
               if line.startswith("ps "))
    counter = "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.2; done"
    done = pod_run("c2", "container", second, "sh", "-c", counter, netns=f"/proc/{pid}/ns/net")
    assert done.returncode == 0, done.stderr

    def count() -> int:
        text = (second / "count").read_text().strip() if (second / "count").exists() else ""
        return int(text) if text.isdigit() else 0

    deadline = time.monotonic() + 20
    while count() < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    c.ctr("task", "pause", "c2")
    assert c.tasks() == {"ps": "RUNNING", "c2": "PAUSED"}, "the other container runs on"
    frozen = count()
    time.sleep(1.5)
    assert count() == frozen, "c2 is frozen"
    done = c.ctr("task", "exec", "--exec-id", "x", "ps", "echo", "alive", check=False)
    assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr
    c.ctr("task", "resume", "c2")
    assert c.tasks()["c2"] == "RUNNING"
    deadline = time.monotonic() + 10
    while count() <= frozen and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count() > frozen, "c2 runs again"
    # A frozen container is killed without a resume.
    c.ctr("task", "pause", "c2")
    c.ctr("task", "kill", "-s", "SIGKILL", "c2", timeout=20)
    wait_status(c, "c2", "STOPPED", timeout=15)
    c.ctr("task", "delete", "c2")
    assert c.tasks() == {"ps": "RUNNING"}
    assert len(qemu_of("ps")) == 1

