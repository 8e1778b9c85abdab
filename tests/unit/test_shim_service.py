"""The Task service's request translation and error codes, without a VM.

A Pod with no sandbox answers every lookup; anything that needs the guest is refused
before it gets there. Events go to a recording publisher.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from hull.config.settings import Config
from hull.errors import ContainerExists, ContainerNotFound, InvalidState
from hull.shim.proto import events_pb2, runtimeoptions_pb2, shim_pb2
from hull.shim.ttrpc import Code, Context, TTRPCError
from hull.shim.v2 import events, main, service, sizing
from hull.shim.v2.pod import Container, Pod, Proc, Status
from hull.shim.v2.stdio import StdioPaths


class Recorder(events.Publisher):
    def __init__(self) -> None:
        super().__init__("unused", "ns")
        self.sent: list[Message] = []

    def publish(self, event: Message) -> None:
        self.sent.append(event)


class FakePlaceholder:
    pid = 4242

    async def stop(self) -> None:
        pass


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    return Pod("ns", tmp_path, Recorder(), lambda path: Config())


def add_container(pod: Pod, tmp_path: Path, cid: str, status: Status) -> Container:
    init = Proc(cid, "", StdioPaths(), 4242, status=status)
    ctr = Container(cid, tmp_path, {}, tmp_path / "rootfs", False, tmp_path / "share",
                    FakePlaceholder(), init)  # type: ignore[arg-type]
    pod.containers[cid] = ctr
    return ctr


async def call(pod: Pod, method: str, request: Message) -> bytes:
    handlers = service.TaskService(pod, lambda: None).handlers()
    return await handlers[method](request.SerializeToString(),
                                  Context(service.SERVICE, method))


async def code_of(pod: Pod, method: str, request: Message) -> Code:
    with pytest.raises(TTRPCError) as err:
        await call(pod, method, request)
    return err.value.code


async def test_unknown_ids_are_not_found(pod: Pod) -> None:
    for method, request in (
            ("State", shim_pb2.StateRequest(id="x")),
            ("Start", shim_pb2.StartRequest(id="x")),
            ("Delete", shim_pb2.DeleteRequest(id="x")),
            ("Kill", shim_pb2.KillRequest(id="x", signal=9)),
            ("Pids", shim_pb2.PidsRequest(id="x")),
            ("Wait", shim_pb2.WaitRequest(id="x")),
            ("Pause", shim_pb2.PauseRequest(id="x")),
            ("CloseIO", shim_pb2.CloseIORequest(id="x", stdin=True)),
            ("ResizePty", shim_pb2.ResizePtyRequest(id="x", width=80, height=24)),
            ("Update", shim_pb2.UpdateTaskRequest(id="x")),
            ("Stats", shim_pb2.StatsRequest(id="x"))):
        assert await code_of(pod, method, request) == Code.NOT_FOUND, method


async def test_exec_and_state_translation(pod: Pod, tmp_path: Path) -> None:
    add_container(pod, tmp_path, "c", Status.RUNNING)
    spec = any_pb2.Any(type_url=service.PROCESS_TYPE_URL,
                       value=json.dumps({"args": ["true"], "cwd": "/"}).encode())
    await call(pod, "Exec", shim_pb2.ExecProcessRequest(id="c", exec_id="e", spec=spec,
                                                        stdout="/x/out"))
    assert await code_of(pod, "Exec", shim_pb2.ExecProcessRequest(
        id="c", exec_id="e", spec=spec)) == Code.ALREADY_EXISTS
    bad = any_pb2.Any(type_url=service.PROCESS_TYPE_URL, value=b'{"args": []}')
    assert await code_of(pod, "Exec", shim_pb2.ExecProcessRequest(
        id="c", exec_id="f", spec=bad)) == Code.INVALID_ARGUMENT
    state = shim_pb2.StateResponse()
    state.ParseFromString(await call(pod, "State", shim_pb2.StateRequest(id="c", exec_id="e")))
    assert (state.status, state.pid, state.stdout, state.exec_id) == (1, 4242, "/x/out", "e")
    assert [type(e).__name__ for e in pod.publisher.sent] == ["TaskExecAdded"]  # type: ignore[attr-defined]
    # An exec that never started cannot be signalled: NotFound, as runc's shim.
    assert await code_of(pod, "Kill", shim_pb2.KillRequest(
        id="c", exec_id="e", signal=9)) == Code.NOT_FOUND


async def test_exec_on_a_stopped_container_is_failed_precondition(pod: Pod, tmp_path: Path
                                                                  ) -> None:
    add_container(pod, tmp_path, "c", Status.STOPPED)
    spec = any_pb2.Any(value=json.dumps({"args": ["true"]}).encode())
    assert await code_of(pod, "Exec", shim_pb2.ExecProcessRequest(
        id="c", exec_id="e", spec=spec)) == Code.FAILED_PRECONDITION
    assert await code_of(pod, "Kill", shim_pb2.KillRequest(id="c", signal=9)) == Code.NOT_FOUND
    assert await code_of(pod, "Start", shim_pb2.StartRequest(id="c")) == \
        Code.FAILED_PRECONDITION


async def test_delete_of_a_running_task_is_refused(pod: Pod, tmp_path: Path) -> None:
    add_container(pod, tmp_path, "c", Status.RUNNING)
    assert await code_of(pod, "Delete", shim_pb2.DeleteRequest(id="c")) == \
        Code.FAILED_PRECONDITION


async def test_wait_returns_the_exit(pod: Pod, tmp_path: Path) -> None:
    ctr = add_container(pod, tmp_path, "c", Status.RUNNING)
    ctr.init.may_report.set()
    pod._exited(ctr.init, 7)
    reply = shim_pb2.WaitResponse()
    reply.ParseFromString(await call(pod, "Wait", shim_pb2.WaitRequest(id="c")))
    assert reply.exit_status == 7 and reply.exited_at.seconds > 0
    (exit_event,) = pod.publisher.sent  # type: ignore[attr-defined]
    assert isinstance(exit_event, events_pb2.TaskExit)
    assert (exit_event.container_id, exit_event.id, exit_event.pid) == ("c", "c", 4242)


async def test_unsupported_calls(pod: Pod, tmp_path: Path) -> None:
    add_container(pod, tmp_path, "c", Status.RUNNING)
    assert await code_of(pod, "Checkpoint", shim_pb2.CheckpointTaskRequest(id="c")) == \
        Code.UNIMPLEMENTED
    # Update is supported: bad resources are InvalidArgument, a missing VM refuses.
    assert await code_of(pod, "Update", shim_pb2.UpdateTaskRequest(
        id="c", resources=any_pb2.Any(value=b'{"memory": {"limit": "x"}}'))) == \
        Code.INVALID_ARGUMENT
    assert await code_of(pod, "Update", shim_pb2.UpdateTaskRequest(
        id="c", resources=any_pb2.Any(value=b'{"memory": {"limit": 1048576}}'))) == \
        Code.FAILED_PRECONDITION
    assert await code_of(pod, "Create", shim_pb2.CreateTaskRequest(
        id="d", checkpoint="/cp")) == Code.UNIMPLEMENTED
    assert await code_of(pod, "Create", shim_pb2.CreateTaskRequest(id="../x")) == \
        Code.INVALID_ARGUMENT
    assert await code_of(pod, "Create", shim_pb2.CreateTaskRequest(
        id="c", bundle=str(tmp_path))) == Code.ALREADY_EXISTS
    assert await code_of(pod, "Kill", shim_pb2.KillRequest(id="c", signal=0)) == \
        Code.INVALID_ARGUMENT


async def test_garbage_payload_is_invalid_argument(pod: Pod) -> None:
    handlers = service.TaskService(pod, lambda: None).handlers()
    with pytest.raises(TTRPCError) as err:
        await handlers["State"](b"\xff\xff", Context(service.SERVICE, "State"))
    assert err.value.code == Code.INVALID_ARGUMENT


async def test_shutdown_waits_for_the_last_task(pod: Pod, tmp_path: Path) -> None:
    calls: list[int] = []
    handlers = service.TaskService(pod, lambda: calls.append(1)).handlers()
    add_container(pod, tmp_path, "c", Status.STOPPED)
    ctx = Context(service.SERVICE, "Shutdown")
    await handlers["Shutdown"](shim_pb2.ShutdownRequest(id="c").SerializeToString(), ctx)
    await handlers["Shutdown"](b"", ctx)
    assert calls == []
    pod.containers.clear()
    await handlers["Shutdown"](b"", ctx)
    import asyncio

    await asyncio.sleep(0)
    assert calls == [1]


def test_error_mapping() -> None:
    assert service.grpc_error(ContainerNotFound("x")).code == Code.NOT_FOUND
    assert service.grpc_error(ContainerExists("x")).code == Code.ALREADY_EXISTS
    assert service.grpc_error(InvalidState("x")).code == Code.FAILED_PRECONDITION
    assert service.grpc_error(NotImplementedError("x")).code == Code.UNIMPLEMENTED
    assert service.grpc_error(OSError("x")).code == Code.UNKNOWN


def test_config_path_from_runtime_options() -> None:
    opts = runtimeoptions_pb2.Options(config_path="/etc/hull/x.toml")
    packed = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    assert service.config_path(packed) == "/etc/hull/x.toml"
    assert service.config_path(any_pb2.Any()) == ""


def test_event_envelope() -> None:
    request = events.envelope("k8s.io", events_pb2.TaskExit(container_id="c", exit_status=3))
    env = request.envelope
    assert (env.namespace, env.topic, env.event.type_url) == (
        "k8s.io", "/tasks/exit", "containerd.events.TaskExit")
    decoded = events_pb2.TaskExit()
    decoded.ParseFromString(env.event.value)
    assert decoded.exit_status == 3
    assert env.timestamp.ToDatetime(tzinfo=datetime.UTC).year >= 2024


def test_sizing_from_pod_annotations() -> None:
    config = Config()
    sized = sizing.apply(config, {sizing.MEMORY: str(512 * 2**20), sizing.CPU_QUOTA: "50000",
                                  sizing.CPU_PERIOD: "100000"})
    assert sized.hypervisor.default_memory_mib == config.hypervisor.default_memory_mib + 512
    assert sized.hypervisor.default_vcpus == config.hypervisor.default_vcpus + 1
    assert sizing.apply(config, {sizing.MEMORY: "junk"}).hypervisor.default_memory_mib == \
        config.hypervisor.default_memory_mib


def test_start_flags_and_grouping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = main.parse_args(["-namespace", "k8s.io", "-address", "/run/c.sock",
                            "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug",
                            "start"])
    assert (args.namespace, args.id, args.debug, args.action) == ("k8s.io", "abc", True,
                                                                  "start")
    (tmp_path / "config.json").write_text(json.dumps(
        {"annotations": {main.SANDBOX_ID: "pod1"}}))
    assert main.group_of(tmp_path, "abc") == "pod1"
    assert main.group_of(tmp_path / "missing", "abc") == "abc"
    monkeypatch.setenv(main.STATE_ROOT_ENV, "/run/hull-shim")
    one = main.socket_path("/run/c.sock", "k8s.io", "pod1")
    assert one == main.socket_path("/run/c.sock", "k8s.io", "pod1")
    assert one != main.socket_path("/run/c.sock", "default", "pod1")
    assert len(str(one)) < 108


def test_shim_log_lines_carry_the_task_id(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from hull.shim.v2 import daemon

    daemon.setup_logging("task-7", debug=False)
    logging.getLogger("hull.shim").warning("something happened")
    logging.getLogger("hull.shim").warning("of another", extra={"container_id": "c2"})
    err = capsys.readouterr().err
    assert "[task-7] hull.shim: something happened" in err
    assert "[c2] hull.shim: of another" in err


def test_go_style_flags() -> None:
    args = main.parse_args(["--namespace=ns", "-id", "x", "-debug=false", "-bundle", "/b",
                            "delete"])
    assert (args.namespace, args.id, args.debug, args.bundle, args.action) == (
        "ns", "x", False, "/b", "delete")
    assert main.parse_args(["-v"]).version
    with pytest.raises(main.UsageError, match="not defined: -nope"):
        main.parse_args(["-nope", "start"])
    with pytest.raises(main.UsageError, match="needs an argument: -id"):
        main.parse_args(["-id"])


def test_start_imports_only_what_it_needs() -> None:
    import subprocess
    import sys

    # `start` runs for every task: each of these costs milliseconds (docs/performance.md).
    heavy = ("argparse", "logging", "json", "pathlib", "subprocess", "asyncio", "re",
             "google.protobuf", "pyroute2")
    code = ("import sys, hull.shim.v2.main\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def _shim_start(bundle: Path, root: Path, task_id: str) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, main.STATE_ROOT_ENV: str(root),
           "TTRPC_ADDRESS": str(root / "no-containerd.ttrpc")}
    # capture_output: returns only once nothing holds the pipes, as containerd's
    # CombinedOutput; a daemon that kept them would hang this call.
    out = subprocess.run([sys.executable, "-m", "hull.shim.v2.main", "-namespace", "ns",
                          "-address", "/run/test-containerd.sock", "-publish-binary",
                          "/bin/false", "-id", task_id, "start"], cwd=bundle, env=env,
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stderr == ""
    return out.stdout


def test_start_forks_a_detached_daemon_and_joins_a_pod(tmp_path: Path) -> None:
    import asyncio
    import os
    import signal
    import time

    from hull.shim import ttrpc
    from tests.integration.cli_helpers import become_subreaper, reap

    root = tmp_path / "root"
    pod, ctr = tmp_path / "pod", tmp_path / "ctr"
    pod.mkdir()
    ctr.mkdir()
    (pod / "config.json").write_text("{}")
    (pod / "log").touch()  # a file where containerd has a fifo
    (ctr / "config.json").write_text(json.dumps({"annotations": {main.SANDBOX_ID: "pod-1"}}))
    # containerd is a child subreaper: the daemon `start` forks is reparented to it, and
    # reaped by it. So is this test (PID 1 of a container may never reap).
    become_subreaper()
    address = _shim_start(pod, root, "pod-1")
    pid = 0
    try:
        assert address.startswith("unix://") and (pod / "address").read_text() == address

        async def connect() -> int:
            client = await ttrpc.Client.connect(address)
            try:
                reply = shim_pb2.ConnectResponse.FromString(await client.call(
                    service.SERVICE, "Connect",
                    shim_pb2.ConnectRequest(id="pod-1").SerializeToString(), timeout=10))
            finally:
                await client.close()
            return reply.shim_pid

        pid = asyncio.run(connect())
        assert os.getsid(pid) == pid  # a session of its own
        assert Path(f"/proc/{pid}/cwd").resolve() == pod.resolve()
        # The container of the pod gets the running shim's address; no second daemon.
        assert _shim_start(ctr, root, "ctr-1") == address
        assert (ctr / "address").read_text() == address
        deadline = time.monotonic() + 10
        while "serving on" not in (pod / "log").read_text():  # the daemon's stderr
            assert time.monotonic() < deadline, (pod / "log").read_text()
            time.sleep(0.01)
        assert "[pod-1] hull.shim: shim for ns/pod-1 serving on" in (pod / "log").read_text()
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
            assert reap(pid, timeout=10) is not None, "the daemon did not exit on SIGTERM"
    assert not Path(address.removeprefix("unix://")).exists()  # removed on the way out
