"""containerd-shim-hull-v2 driven by a real containerd 1.6 through `ctr`.

Every test gets its own containerd (containerd_fixture.py) and, through the integration
conftest, the no_leaks check: no QEMU, helper process or mount may outlive it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hull.shim import ttrpc
from hull.shim.proto import shim_pb2
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd

__all__ = ["containerd"]  # the fixture, imported for the tests of this module


@pytest.fixture
def rootfs(rootfs_template: Path, tmp_path: Path, guest_assets_ready: None) -> Path:
    root = tmp_path / "rootfs"
    shutil.copytree(rootfs_template, root, symlinks=True)
    return root


def run(c: Containerd, rootfs: Path, task_id: str, *args: str, detach: bool = False,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    flags = ["-d"] if detach else ["--rm"]
    return c.ctr("run", *flags, "--runtime", RUNTIME, "--rootfs", str(rootfs), task_id,
                 *args, check=False, input=input)


def wait_status(c: Containerd, task_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.tasks().get(task_id) == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} is {c.tasks().get(task_id)}, not {status}")


def shim_pids(task_id: str) -> list[int]:
    # The daemon is the forked child of `start` (hull.shim.v2.main): the same command line.
    pattern = f"containerd-shim-hull-v2 .*-id {task_id}( -debug)? start"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def qemu_of(task_id: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"qemu-system.*-name hull-{task_id},"],
                         capture_output=True, text=True, check=False).stdout
    return out.splitlines()


def test_run_output_and_exit_code(containerd: Containerd, rootfs: Path) -> None:
    done = run(containerd, rootfs, "r1", "sh", "-c", "echo hello from hull; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello from hull\n"
    assert containerd.tasks() == {}


def test_stdin_reaches_the_task_and_closes(containerd: Containerd, rootfs: Path) -> None:
    done = run(containerd, rootfs, "r2", "sh", "-c", "cat; echo done", input=b"data\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "data\ndone\n"


def test_terminal(containerd: Containerd, rootfs: Path) -> None:
    command = (f"ctr -a {containerd.socket} run --rm -t --runtime {RUNTIME} "
               f"--rootfs {rootfs} r3 sh -c 'tty; exit 4'")
    # ctr wants a console of its own: script(1) gives it one.
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "/dev/pts/" in done.stdout


def test_detached_lifecycle(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    done = run(c, rootfs, "d1", "sh", "-c", "while true; do sleep 1; done", detach=True)
    assert done.returncode == 0, done.stderr
    assert c.tasks() == {"d1": "RUNNING"}
    pid = int(c.ctr("task", "ls").stdout.splitlines()[1].split()[1])
    assert os.path.exists(f"/proc/{pid}"), "the task pid is a real host process"

    done = c.ctr("task", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo in exec; exit 5",
                 check=False)
    assert (done.returncode, done.stdout) == (5, "in exec\n"), done.stderr
    done = c.ctr("task", "exec", "--exec-id", "e1", "d1", "true", check=False)
    assert done.returncode == 0, "an exec id is free again once its exec was deleted"

    c.ctr("task", "pause", "d1")
    assert c.tasks() == {"d1": "PAUSED"}
    c.ctr("task", "resume", "d1")
    assert c.tasks() == {"d1": "RUNNING"}
    assert "cpu.usage_usec" in c.ctr("task", "metrics", "d1").stdout
    assert str(pid) in c.ctr("task", "ps", "d1").stdout

    c.ctr("task", "kill", "-s", "SIGKILL", "d1")
    wait_status(c, "d1", "STOPPED")
    refused = c.ctr("task", "exec", "--exec-id", "e2", "d1", "true", check=False)
    assert refused.returncode != 0
    c.ctr("task", "delete", "d1")
    c.ctr("containers", "rm", "d1")
    assert c.tasks() == {}
    assert not qemu_of("d1")
    assert not os.path.exists(f"/proc/{pid}")


def test_delete_of_a_running_task_is_refused(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    assert run(c, rootfs, "d2", "sleep", "1000", detach=True).returncode == 0
    done = c.ctr("task", "delete", "d2", check=False)
    assert done.returncode != 0 and "stopped" in done.stderr
    assert c.tasks() == {"d2": "RUNNING"}


def test_bad_requests_get_status_codes(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    assert run(c, rootfs, "b1", "sleep", "1000", detach=True).returncode == 0
    address = (c.bundle("b1") / "address").read_text()
    create = shim_pb2.CreateTaskRequest(id="b1", bundle=str(c.bundle("b1")))

    async def probe() -> None:
        client = await ttrpc.Client.connect(address)
        svc = "containerd.task.v2.Task"
        try:
            for method, payload, code in (
                    ("Create", create, ttrpc.Code.ALREADY_EXISTS),
                    ("State", shim_pb2.StateRequest(id="nope"), ttrpc.Code.NOT_FOUND),
                    ("Kill", shim_pb2.KillRequest(id="nope", signal=9), ttrpc.Code.NOT_FOUND),
                    ("Checkpoint", shim_pb2.CheckpointTaskRequest(id="b1"),
                     ttrpc.Code.UNIMPLEMENTED),
                    ("Frobnicate", shim_pb2.StateRequest(id="b1"), ttrpc.Code.UNIMPLEMENTED)):
                with pytest.raises(ttrpc.TTRPCError) as err:
                    await client.call(svc, method, payload.SerializeToString())
                assert err.value.code == code, (method, err.value)
            # garbage on another connection: dropped, this one keeps working
            reader, writer = await asyncio.open_unix_connection(address[len("unix://"):])
            writer.write(b"\x00\x00\x00\x05\x00\x00\x00\x01\x07\x00junk!")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            state = shim_pb2.StateResponse()
            state.ParseFromString(await client.call(
                svc, "State", shim_pb2.StateRequest(id="b1").SerializeToString()))
            assert state.id == "b1" and state.status == 2  # RUNNING
        finally:
            await client.close()

    asyncio.run(probe())
    assert c.tasks() == {"b1": "RUNNING"}


def test_killed_shim_is_cleaned_up(containerd: Containerd, rootfs: Path) -> None:
    c = containerd
    assert run(c, rootfs, "k1", "sleep", "1000", detach=True).returncode == 0
    address = (c.bundle("k1") / "address").read_text()
    assert qemu_of("k1")
    (pid,) = shim_pids("k1")
    os.kill(pid, signal.SIGKILL)
    # containerd sees the shim go, runs `containerd-shim-hull-v2 delete` and forgets
    # the task; the VM dies with the shim (PDEATHSIG) and delete removes the rest.
    deadline = time.monotonic() + 30
    while "k1" in c.tasks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "k1" not in c.tasks()
    c.ctr("containers", "rm", "k1")
    sock = Path(address[len("unix://"):])
    deadline = time.monotonic() + 10  # containerd forgets the task, then runs delete
    while (qemu_of("k1") or sock.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_of("k1")
    assert not sock.exists()
    assert not (c.shim_root / "default" / "k1").exists()
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(c.base) in line]


def test_containerd_restart_reconnects_to_the_shim(containerd: Containerd, rootfs: Path
                                                   ) -> None:
    c = containerd
    assert run(c, rootfs, "s1", "sleep", "1000", detach=True).returncode == 0
    c.stop()
    c.start()
    assert c.tasks() == {"s1": "RUNNING"}
    done = c.ctr("task", "exec", "--exec-id", "after", "s1", "echo", "still here",
                 check=False)
    assert (done.returncode, done.stdout) == (0, "still here\n"), done.stderr
    c.ctr("task", "kill", "-s", "SIGKILL", "s1")
    wait_status(c, "s1", "STOPPED")


def test_pod_containers_share_one_vm_and_localhost(containerd: Containerd, rootfs: Path,
                                                   tmp_path: Path) -> None:
    """CRI's grouping by hand: the sandbox-id annotation puts c2 in sb's VM."""
    c = containerd
    (rootfs / "www").mkdir()
    (rootfs / "www/index.html").write_text("pod-hello\n")
    second = tmp_path / "rootfs2"
    shutil.copytree(rootfs, second, symlinks=True)

    def pod_run(task_id: str, kind: str, root: Path, *args: str, detach: bool,
                netns: str = "") -> subprocess.CompletedProcess[str]:
        # As CRI does, a pod's container joins the sandbox's network namespace by path.
        join = ["--with-ns", f"network:{netns}"] if netns else []
        return c.ctr("run", "-d" if detach else "--rm", "--runtime", RUNTIME,
                     "--annotation", f"io.kubernetes.cri.container-type={kind}",
                     "--annotation", "io.kubernetes.cri.sandbox-id=sb", *join,
                     "--rootfs", str(root), task_id, *args, check=False)

    done = pod_run("sb", "sandbox", rootfs, "httpd", "-f", "-p", "8080", "-h", "/www",
                   detach=True)
    assert done.returncode == 0, done.stderr
    assert (c.bundle("sb") / "address").exists()
    sandbox_pid = next(line.split()[1] for line in c.ctr("task", "ls").stdout.splitlines()
                       if line.startswith("sb "))
    done = pod_run("c2", "container", second, "sh", "-c",
                   "wget -qO- http://127.0.0.1:8080/index.html && touch /mine", detach=False,
                   netns=f"/proc/{sandbox_pid}/ns/net")
    assert (done.returncode, done.stdout) == (0, "pod-hello\n"), done.stderr
    assert (second / "mine").exists() and not (rootfs / "mine").exists()
    assert len(qemu_of("sb")) == 1 and not qemu_of("c2")
    assert len(shim_pids("sb")) == 1 and not shim_pids("c2")
    assert c.tasks() == {"sb": "RUNNING"}  # c2's delete did not shut the pod's shim down


def test_binary_logging_uri(containerd: Containerd, rootfs: Path, tmp_path: Path) -> None:
    """stdio through a binary:// logger: fds 3 and 4 carry stdout and stderr, closing
    fd 5 says it is ready (containerd pkg/process/io.go NewBinaryIO)."""
    c = containerd
    logger = tmp_path / "logger.sh"
    logger.write_text("#!/bin/sh\n# $1=out $2=DIR\nexec 5>&-\n"
                      "cat <&3 > \"$2/stdout\" &\ncat <&4 > \"$2/stderr\"\nwait\n"
                      "echo \"$CONTAINER_ID\" > \"$2/id\"\n")
    logger.chmod(0o755)
    done = c.ctr("run", "-d", "--runtime", RUNTIME, "--log-uri",
                 f"binary://{logger}?out={tmp_path}", "--rootfs", str(rootfs), "bl",
                 "sh", "-c", "echo to-out; echo to-err >&2", check=False)
    assert done.returncode == 0, done.stderr
    wait_status(c, "bl", "STOPPED")
    c.ctr("task", "delete", "bl")
    c.ctr("container", "delete", "bl", check=False)
    deadline = time.monotonic() + 10
    while not (tmp_path / "id").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "stdout").read_text() == "to-out\n"
    assert (tmp_path / "stderr").read_text() == "to-err\n"
    assert (tmp_path / "id").read_text() == "bl\n"
