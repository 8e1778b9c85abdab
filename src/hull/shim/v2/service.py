"""The shim v2 Task service: ttrpc requests translated to the Pod and back.

Service ``containerd.task.v2.Task`` (INTEGRATION.md §2 "Task service"). Only translation
lives here: decoding the request, calling :class:`~hull.shim.v2.pod.Pod`, encoding the
answer, and mapping Hull's errors onto the gRPC codes containerd's errdefs expects
(NotFound 5, AlreadyExists 6, FailedPrecondition 9, InvalidArgument 3, Unimplemented 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from hull import __version__
from hull.agent import cgroup
from hull.errors import (
    BundleError,
    ConfigError,
    ContainerExists,
    ContainerNotFound,
    HullError,
    InvalidState,
)
from hull.shim.proto import cgroups_v2_pb2, runtimeoptions_pb2, shim_pb2, task_types_pb2
from hull.shim.ttrpc import Code, Context, Handler, TTRPCError
from hull.shim.v2 import metrics
from hull.shim.v2.mounts import MountSpec
from hull.shim.v2.pod import CreateRequest, Pod, ProcessGone, Status
from hull.shim.v2.stdio import StdioPaths

SERVICE = "containerd.task.v2.Task"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
M = TypeVar("M", bound=Message)

_STATUS = {Status.CREATED: task_types_pb2.CREATED, Status.RUNNING: task_types_pb2.RUNNING,
           Status.STOPPED: task_types_pb2.STOPPED}


def grpc_error(exc: BaseException) -> TTRPCError:
    """Hull's exceptions as the status containerd's errdefs.FromGRPC understands."""
    if isinstance(exc, TTRPCError):
        return exc
    code = Code.UNKNOWN
    if isinstance(exc, ContainerNotFound | ProcessGone):
        code = Code.NOT_FOUND
    elif isinstance(exc, ContainerExists):
        code = Code.ALREADY_EXISTS
    elif isinstance(exc, InvalidState):
        code = Code.FAILED_PRECONDITION
    elif isinstance(exc, BundleError | ConfigError):
        code = Code.INVALID_ARGUMENT
    elif isinstance(exc, NotImplementedError):
        code = Code.UNIMPLEMENTED
    return TTRPCError(code, str(exc))


def _ts(when: Any) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def _decode(cls: type[M], payload: bytes) -> M:
    message = cls()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"bad {cls.__name__}: {exc}") from exc
    return message


def _paths(stdin: str, stdout: str, stderr: str, terminal: bool) -> StdioPaths:
    return StdioPaths(stdin, stdout, stderr, terminal)


def config_path(options: any_pb2.Any) -> str:
    """runtimeoptions.v1.Options.config_path, the ConfigPath CRI passes (if any)."""
    if not options.type_url.endswith("runtimeoptions.v1.Options"):
        return ""
    opts = runtimeoptions_pb2.Options()
    try:
        opts.ParseFromString(options.value)
    except DecodeError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"bad runtime options: {exc}") from exc
    return opts.config_path


class TaskService:
    def __init__(self, pod: Pod, on_shutdown: Callable[[], None]) -> None:
        self.pod = pod
        self.on_shutdown = on_shutdown

    def handlers(self) -> dict[str, Handler]:
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "State": (shim_pb2.StateRequest, self.state),
            "Create": (shim_pb2.CreateTaskRequest, self.create),
            "Start": (shim_pb2.StartRequest, self.start),
            "Delete": (shim_pb2.DeleteRequest, self.delete),
            "Pids": (shim_pb2.PidsRequest, self.pids),
            "Pause": (shim_pb2.PauseRequest, self.pause),
            "Resume": (shim_pb2.ResumeRequest, self.resume),
            "Checkpoint": (shim_pb2.CheckpointTaskRequest, self.checkpoint),
            "Kill": (shim_pb2.KillRequest, self.kill),
            "Exec": (shim_pb2.ExecProcessRequest, self.exec),
            "ResizePty": (shim_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": (shim_pb2.CloseIORequest, self.close_io),
            "Update": (shim_pb2.UpdateTaskRequest, self.update),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Stats": (shim_pb2.StatsRequest, self.stats),
            "Connect": (shim_pb2.ConnectRequest, self.connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.shutdown),
        }
        return {name: self._wrap(cls, fn) for name, (cls, fn) in table.items()}

    @staticmethod
    def _wrap(cls: type[Message], fn: Callable[[Any], Awaitable[Message]]) -> Handler:
        async def handle(payload: bytes, ctx: Context) -> bytes:
            request = _decode(cls, payload)
            try:
                response = await fn(request)
            except (HullError, NotImplementedError, OSError) as exc:
                raise grpc_error(exc) from exc
            return response.SerializeToString()

        return handle

    # ------------------------------------------------------------------ lifecycle

    async def create(self, r: shim_pb2.CreateTaskRequest) -> Message:
        if r.checkpoint or r.parent_checkpoint:
            raise TTRPCError(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported")
        if not r.id or "/" in r.id or r.id in (".", ".."):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"task id {r.id!r} is not valid")
        request = CreateRequest(
            id=r.id, bundle=r.bundle,
            rootfs=tuple(MountSpec(m.type, m.source, tuple(m.options)) for m in r.rootfs),
            stdio=_paths(r.stdin, r.stdout, r.stderr, r.terminal),
            config_path=config_path(r.options))
        return shim_pb2.CreateTaskResponse(pid=await self.pod.create(request))

    async def start(self, r: shim_pb2.StartRequest) -> Message:
        return shim_pb2.StartResponse(pid=await self.pod.start(r.id, r.exec_id))

    async def delete(self, r: shim_pb2.DeleteRequest) -> Message:
        proc = await self.pod.delete(r.id, r.exec_id)
        return shim_pb2.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status,
                                       exited_at=_ts(proc.exited_at))

    async def exec(self, r: shim_pb2.ExecProcessRequest) -> Message:
        if r.spec.type_url and not r.spec.type_url.endswith("runtime-spec/1/Process"):
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec spec of type {r.spec.type_url}")
        try:
            process = json.loads(r.spec.value)
        except ValueError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"exec spec is not JSON: {exc}") from exc
        if not isinstance(process, dict):
            raise TTRPCError(Code.INVALID_ARGUMENT, "exec spec is not a JSON object")
        self.pod.add_exec(r.id, r.exec_id, _paths(r.stdin, r.stdout, r.stderr, r.terminal),
                          process)
        return empty_pb2.Empty()

    async def wait(self, r: shim_pb2.WaitRequest) -> Message:
        proc = await self.pod.wait(r.id, r.exec_id)
        return shim_pb2.WaitResponse(exit_status=proc.exit_status,
                                     exited_at=_ts(proc.exited_at))

    # ------------------------------------------------------------------ queries

    async def state(self, r: shim_pb2.StateRequest) -> Message:
        proc = self.pod.process(r.id, r.exec_id)
        ctr = self.pod.container(r.id)
        status = _STATUS[proc.status]
        if self.pod.pauser.is_paused(r.id) and proc.status is Status.RUNNING:
            status = task_types_pb2.PAUSED
        return shim_pb2.StateResponse(
            id=r.id, bundle=str(ctr.bundle), pid=proc.pid, status=status,
            stdin=proc.paths.stdin, stdout=proc.paths.stdout, stderr=proc.paths.stderr,
            terminal=proc.paths.terminal, exit_status=proc.exit_status,
            exited_at=_ts(proc.exited_at), exec_id=r.exec_id)

    async def pids(self, r: shim_pb2.PidsRequest) -> Message:
        ctr = self.pod.container(r.id)
        # Every process of a container reports its placeholder's pid (placeholder.py).
        return shim_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=ctr.init.pid)])

    async def stats(self, r: shim_pb2.StatsRequest) -> Message:
        figures = await self.pod.stats(r.id)
        pid = self.pod.qemu_pid()
        if figures is not None:
            return shim_pb2.StatsResponse(stats=metrics.as_any(
                metrics.container_metrics(figures)))
        if pid is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"sandbox of {r.id} is not running")
        # The VM is stopped (paused) and its agent cannot answer: the host's view of it.
        return shim_pb2.StatsResponse(stats=metrics.as_any(vm_metrics(pid)))

    async def connect(self, r: shim_pb2.ConnectRequest) -> Message:
        task_pid = 0
        with contextlib.suppress(ContainerNotFound):
            task_pid = self.pod.container(r.id).init.pid
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=task_pid,
                                        version=f"hull {__version__}")

    # ------------------------------------------------------------------ control

    async def kill(self, r: shim_pb2.KillRequest) -> Message:
        if not 0 < r.signal <= 64:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"signal {r.signal} is not valid")
        await self.pod.kill(r.id, r.exec_id, r.signal, r.all)
        return empty_pb2.Empty()

    async def pause(self, r: shim_pb2.PauseRequest) -> Message:
        await self.pod.pause(r.id)
        return empty_pb2.Empty()

    async def resume(self, r: shim_pb2.ResumeRequest) -> Message:
        await self.pod.resume(r.id)
        return empty_pb2.Empty()

    async def resize_pty(self, r: shim_pb2.ResizePtyRequest) -> Message:
        await self.pod.resize(r.id, r.exec_id, r.width, r.height)
        return empty_pb2.Empty()

    async def close_io(self, r: shim_pb2.CloseIORequest) -> Message:
        if r.stdin:
            await self.pod.close_stdin(r.id, r.exec_id)
        return empty_pb2.Empty()

    async def update(self, r: shim_pb2.UpdateTaskRequest) -> Message:
        self.pod.container(r.id)
        if r.resources.type_url and not r.resources.type_url.endswith("/LinuxResources"):
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"update of {r.id}: resources of type {r.resources.type_url}")
        try:
            resources = json.loads(r.resources.value or b"{}")
            # Checked here, so that bad input is InvalidArgument and only what the
            # guest refuses (a limit beyond the VM) is FailedPrecondition.
            if not isinstance(resources, dict):
                raise ValueError("resources must be a JSON object")
            cgroup.parse(resources, "resources")
        except (ValueError, cgroup.CgroupError) as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"update of {r.id}: {exc}") from exc
        await self.pod.update(r.id, resources)
        return empty_pb2.Empty()

    async def checkpoint(self, r: shim_pb2.CheckpointTaskRequest) -> Message:
        raise TTRPCError(Code.UNIMPLEMENTED, "checkpoint is not supported by hull")

    async def shutdown(self, r: shim_pb2.ShutdownRequest) -> Message:
        # containerd calls Shutdown after every task delete; a shim serving a pod stays
        # while it has tasks (runc task/service.go Shutdown).
        if self.pod.containers and not r.now:
            return empty_pb2.Empty()
        # Answer first: the caller waits for the reply, then the shim goes away.
        asyncio.get_running_loop().call_soon(self.on_shutdown)
        return empty_pb2.Empty()


def vm_metrics(pid: int) -> cgroups_v2_pb2.Metrics:
    """The VM's host usage in cgroups v2 form (CRI decodes cpu and memory usage).

    A VM-level approximation until the agent reports the guest cgroups: exact for a
    one-container sandbox, the pod's total for the containers of a pod.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            rss_kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except (OSError, ValueError, IndexError) as exc:
        raise TTRPCError(Code.UNAVAILABLE, f"cannot read usage of vm pid {pid}: {exc}"
                         ) from exc
    user_usec = int(fields[11]) * 1_000_000 // ticks
    system_usec = int(fields[12]) * 1_000_000 // ticks
    return cgroups_v2_pb2.Metrics(
        cpu=cgroups_v2_pb2.CPUStat(usage_usec=user_usec + system_usec, user_usec=user_usec,
                                   system_usec=system_usec),
        memory=cgroups_v2_pb2.MemoryStat(usage=rss_kib * 1024, anon=rss_kib * 1024))
