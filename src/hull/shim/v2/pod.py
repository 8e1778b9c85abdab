"""One pod as the shim runs it: a sandbox VM and the tasks (containers, execs) inside it.

The Task service (service.py) only translates protobuf to the calls here; this module
decides. The first Create boots the VM (sandbox), later Creates of the same pod join it
(INTEGRATION.md §2 "CRI pod grouping"). Each container's rootfs is bound into the
sandbox's one 9p share at ``<cid>/rootfs`` (see mounts.py). Events go out in the order
the shim v2 contract requires: a process's exit is published only after its start (or
after it was killed or lost before starting).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2

from hull.agentapi import schema
from hull.config.annotations import apply_annotations
from hull.config.settings import Config
from hull.errors import (
    AgentError,
    BundleError,
    ContainerExists,
    ContainerNotFound,
    HullError,
    InvalidState,
    ProtocolError,
)
from hull.hypervisor.base import Share
from hull.network import host as netns
from hull.oci import bundle as oci_bundle
from hull.runtime import sandboxinfo, sharedfs
from hull.runtime.sandbox import Sandbox, Timeline
from hull.shim.proto import events_pb2, types_pb2
from hull.shim.v2 import mounts, sizing
from hull.shim.v2.events import Publisher
from hull.shim.v2.pausing import Pauser
from hull.shim.v2.placeholder import Placeholder
from hull.shim.v2.stdio import StdioPaths, TaskIO
from hull.shim.v2.taskhooks import TaskHooks

log = logging.getLogger("hull.shim.pod")
SHARE_TAG = "hullshared"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
VM_LOST_STATUS = 255


class Status(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


class ProcessGone(HullError):
    """Kill of a process that already finished (containerd maps it to NotFound)."""


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Proc:
    container_id: str
    exec_id: str
    paths: StdioPaths
    pid: int
    spec: dict[str, Any] | None = None  # an exec's OCI process
    status: Status = Status.CREATED
    exit_status: int = 0
    exited_at: datetime.datetime | None = None
    io: TaskIO | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: set once the process's exit may be published (after its start event)
    may_report: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


@dataclass
class Container:
    id: str
    bundle: Path
    spec: dict[str, Any]
    rootfs: Path
    mounted_rootfs: bool
    share: Path
    placeholder: Placeholder
    init: Proc
    execs: dict[str, Proc] = field(default_factory=dict)

    @property
    def hooks(self) -> TaskHooks:
        return TaskHooks(self.id, self.bundle, self.spec, self.init.pid)


@dataclass(frozen=True)
class CreateRequest:
    id: str
    bundle: str
    rootfs: tuple[mounts.MountSpec, ...]
    stdio: StdioPaths
    config_path: str = ""


class Pod:
    def __init__(self, namespace: str, state_root: Path, publisher: Publisher,
                 load_config: Callable[[str], Config]) -> None:
        self.namespace = namespace
        self.state_root = state_root
        self.publisher = publisher
        self.load_config = load_config
        self.sandbox: Sandbox | None = None
        self.sandbox_id = ""
        self.containers: dict[str, Container] = {}
        self.pauser = Pauser(publisher, on_vm_change=self._record)
        self._vm_watch: asyncio.Task[None] | None = None
        #: the status socket `hull monitor` asks (sandboxinfo.StatusServer)
        self._published = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()  # Create and Delete change the pod one at a time

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.namespace / self.sandbox_id

    @property
    def shared(self) -> Path:
        return self.state_dir / "shared"

    # ------------------------------------------------------------------ lookups

    def container(self, cid: str) -> Container:
        ctr = self.containers.get(cid)
        if ctr is None:
            raise ContainerNotFound(cid)
        return ctr

    def process(self, cid: str, exec_id: str) -> Proc:
        ctr = self.container(cid)
        if not exec_id:
            return ctr.init
        proc = ctr.execs.get(exec_id)
        if proc is None:
            raise ContainerNotFound(f"{cid} exec {exec_id}")
        return proc

    def _running_sandbox(self) -> Sandbox:
        if self.sandbox is None or self.sandbox.channel is None:
            raise InvalidState(f"sandbox {self.sandbox_id} is not running")
        return self.sandbox

    # ------------------------------------------------------------------ create

    async def create(self, req: CreateRequest) -> int:
        timeline = Timeline()
        async with self._lock:
            timeline.mark("wait")
            if req.id in self.containers:
                raise ContainerExists(req.id)
            bundle = Path(req.bundle)
            spec = _load_spec(bundle)
            annotations = spec.get("annotations") or {}
            sandbox_id = annotations.get(SANDBOX_ID) or req.id
            if self.sandbox is not None and sandbox_id != self.sandbox_id:
                raise InvalidState(f"container {req.id} belongs to sandbox {sandbox_id}, "
                                   f"this shim serves {self.sandbox_id}")
            with contextlib.ExitStack() as undo:
                rootfs = bundle / "rootfs"
                if req.rootfs:
                    mounts.mount_all(req.rootfs, rootfs)
                    undo.callback(sharedfs.unmount, rootfs)
                else:
                    rootfs = oci_bundle.Bundle(bundle, spec).rootfs  # docker: absolute path
                timeline.mark("rootfs")
                if self.sandbox is None:
                    self.sandbox_id = sandbox_id
                    await self._boot(req, annotations, spec)
                    timeline.mark("sandbox")
                # The share stays writable: the container's init makes its mount points
                # first (a read-only image such as CRI's pause has no /proc), then the
                # agent remounts its root read-only when root.readonly says so, as runc.
                readonly = False
                share = self.shared / req.id / "rootfs"
                # The guest can write the share root: reach the target with no symlink
                # followed, or a planted <shared>/<cid> link would aim the bind at the host.
                sharedfs.bind_into(str(rootfs), self.shared, f"{req.id}/rootfs", is_dir=True,
                                   recursive=True, readonly=readonly)
                undo.callback(mounts.remove_bind, share)
                # Host sources of bind mounts, staged at <shared>/<cid>/mounts (sharedfs).
                guest_spec = sharedfs.stage(spec, bundle, self.shared, req.id)
                undo.callback(sharedfs.release, self.shared / req.id / "mounts")
                timeline.mark("share")
                placeholder = await Placeholder.spawn(req.id, spec)
                timeline.mark("placeholder")
                try:
                    proc = Proc(req.id, "", req.stdio, placeholder.pid)
                    # prestart and createRuntime come before the guest's createContainer.
                    task_hooks = TaskHooks(req.id, bundle, spec, placeholder.pid)
                    await task_hooks.before_create()
                    timeline.mark("hooks")
                    await self._create_in_guest(req.id, guest_spec, readonly, proc,
                                                task_hooks)
                    timeline.mark("guest create")
                except BaseException:
                    await placeholder.stop()
                    raise
                undo.pop_all()
            ctr = Container(req.id, bundle, spec, rootfs, bool(req.rootfs), share, placeholder,
                            proc)
            self.containers[req.id] = ctr
            self.publisher.publish(events_pb2.TaskCreate(
                container_id=req.id, bundle=req.bundle, pid=proc.pid,
                rootfs=[types_pb2.Mount(type=m.type, source=m.source, options=m.options)
                        for m in req.rootfs],
                io=events_pb2.TaskIO(stdin=req.stdio.stdin, stdout=req.stdio.stdout,
                                     stderr=req.stdio.stderr, terminal=req.stdio.terminal)))
            log.debug("create %s timing: %s", req.id, timeline.describe())
            return proc.pid

    async def _boot(self, req: CreateRequest, annotations: dict[str, str],
                    spec: dict[str, Any]) -> None:
        config = apply_annotations(sizing.apply(self.load_config(req.config_path), annotations),
                                   annotations)
        # The pod's network is the first container's (CRI: the sandbox's CNI namespace);
        # the others join the guest's, which the agent configured once.
        network = netns.choose(spec)
        self.shared.mkdir(parents=True, exist_ok=True)
        sandbox = Sandbox(config, self.sandbox_id, self.state_dir / "console.log",
                          (Share(SHARE_TAG, self.shared),), state_root=self.state_dir,
                          network=network, network_record=self.state_dir / netns.RECORD_NAME)
        try:
            await sandbox.__aenter__()
        except BaseException:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise
        self.sandbox = sandbox
        assert sandbox.vm is not None
        # For the `delete` cleanup of a shim that died (main.py cleanup_dead).
        (self.state_dir / "qemu.pid").write_text(f"{sandbox.vm.pid}\n")
        self._vm_watch = asyncio.create_task(self._watch_vm(sandbox))
        await self._publish(sandbox)

    async def _publish(self, sandbox: Sandbox) -> None:
        """Let `hull monitor` find this pod and ask its agent, without containerd's help:
        sandbox.json and status.sock in the state directory (runtime/sandboxinfo.py)."""
        assert sandbox.hello is not None
        name = f"sandbox {self.namespace}/{self.sandbox_id}"
        try:
            await self._published.enter_async_context(sandboxinfo.StatusServer(
                name, self.state_dir, schema.params(sandbox.hello), sandbox.call))
        except HullError as exc:  # the pod works without; only the monitor cannot see it
            log.warning("%s", exc)
            return
        self._record()

    def _record(self) -> None:
        """(Re)write sandbox.json: at boot, and when the whole VM pauses or resumes."""
        if self.sandbox is not None:
            status = "paused" if self.pauser.vm_paused else "running"
            sandboxinfo.record(self.state_dir, self.sandbox, status=status)

    async def _create_in_guest(self, cid: str, spec: dict[str, Any], readonly: bool,
                               proc: Proc, task_hooks: TaskHooks) -> None:
        sandbox = self._running_sandbox()
        assert sandbox.channel is not None
        proc.io = await TaskIO.open(sandbox.channel, proc.paths, cid, self.namespace)
        fut = self._exit_future(sandbox, cid, "")
        try:
            request = schema.CreateContainer(
                cid, spec, schema.RootfsShare(SHARE_TAG, readonly, f"{cid}/rootfs"),
                proc.io.streams, task_hooks.guest())
            await sandbox.call(schema.Method.CREATE_CONTAINER, request,
                               timeout=task_hooks.create_timeout())
        except BaseException:
            proc.io.close_fds()
            sandbox.forget_exit(cid, "")
            raise
        proc.io.start_input()
        proc.watcher = asyncio.create_task(self._watch(proc, fut))

    # ------------------------------------------------------------------ start / exec

    async def start(self, cid: str, exec_id: str) -> int:
        proc = self.process(cid, exec_id)
        if proc.status is not Status.CREATED:
            raise InvalidState(f"process {cid}/{exec_id} is {proc.status.value}, not created")
        sandbox = self._running_sandbox()
        if not exec_id:
            task_hooks = self.container(cid).hooks
            try:  # the guest runs the startContainer hooks before the process's execve
                await sandbox.call(schema.Method.START_CONTAINER, schema.ContainerRef(cid),
                                   timeout=task_hooks.start_timeout())
            except HullError:
                proc.may_report.set()  # the init never ran: its exit may follow create
                raise
            proc.status = Status.RUNNING
            self.publisher.publish(events_pb2.TaskStart(container_id=cid, pid=proc.pid))
            await task_hooks.after("poststart", "running")
        else:
            await self._start_exec(sandbox, proc)
            self.publisher.publish(events_pb2.TaskExecStarted(
                container_id=cid, exec_id=exec_id, pid=proc.pid))
        proc.may_report.set()
        return proc.pid

    async def _start_exec(self, sandbox: Sandbox, proc: Proc) -> None:
        assert sandbox.channel is not None and proc.spec is not None
        cid, exec_id = proc.container_id, proc.exec_id
        proc.io = await TaskIO.open(sandbox.channel, proc.paths, cid, self.namespace)
        fut = self._exit_future(sandbox, cid, exec_id)
        try:
            await sandbox.call(schema.Method.EXEC_PROCESS, schema.ExecProcess(
                cid, exec_id, proc.spec, proc.io.streams))
        except BaseException:
            proc.io.close_fds()
            sandbox.forget_exit(cid, exec_id)
            raise
        proc.status = Status.RUNNING
        proc.io.start_input()
        proc.watcher = asyncio.create_task(self._watch(proc, fut))

    def add_exec(self, cid: str, exec_id: str, paths: StdioPaths,
                 process: dict[str, Any]) -> None:
        ctr = self.container(cid)
        if ctr.init.status is not Status.RUNNING:
            raise InvalidState(f"container {cid} is {ctr.init.status.value}, not running")
        if not exec_id:
            raise BundleError("exec id must not be empty")
        if exec_id in ctr.execs:
            raise ContainerExists(f"{cid} exec {exec_id}")
        oci_bundle.check_process(process, f"exec {exec_id}")
        ctr.execs[exec_id] = Proc(cid, exec_id, paths, ctr.init.pid, spec=process)
        self.publisher.publish(events_pb2.TaskExecAdded(container_id=cid, exec_id=exec_id))

    # ------------------------------------------------------------------ exits

    async def _watch(self, proc: Proc, fut: asyncio.Future[schema.ProcessExit]) -> None:
        try:
            event = await fut
            status, oom = event.status, event.oom_killed
        except HullError:
            status, oom = VM_LOST_STATUS, False
        if oom:  # before the exit, as runc's shim (its OOM watcher fires first)
            self.publisher.publish(events_pb2.TaskOOM(container_id=proc.container_id))
        if proc.io is not None:
            await proc.io.drain()
            proc.io.close_fds()
        await proc.may_report.wait()
        self._exited(proc, status)

    def _exited(self, proc: Proc, status: int) -> None:
        if proc.exited.is_set():
            return
        proc.status, proc.exit_status, proc.exited_at = Status.STOPPED, status, now()
        self.publisher.publish(events_pb2.TaskExit(
            container_id=proc.container_id, id=proc.exec_id or proc.container_id,
            pid=proc.pid, exit_status=status, exited_at=_timestamp(proc.exited_at)))
        proc.exited.set()

    async def _watch_vm(self, sandbox: Sandbox) -> None:
        reason = await sandbox.watch_vm()
        if self.sandbox is not sandbox:
            return
        log.error("sandbox %s: %s", self.sandbox_id, reason)
        for ctr in self.containers.values():
            for proc in (ctr.init, *ctr.execs.values()):
                if proc.status is not Status.STOPPED and proc.watcher is not None:
                    proc.may_report.set()
                    proc.watcher.cancel()
                    if proc.io is not None:
                        proc.io.close_fds()
                    self._exited(proc, VM_LOST_STATUS)

    @staticmethod
    def _exit_future(sandbox: Sandbox, cid: str, exec_id: str
                     ) -> asyncio.Future[schema.ProcessExit]:
        sandbox.forget_exit(cid, exec_id)  # an exec id may be reused after delete
        return sandbox.exit_future(cid, exec_id)

    async def wait(self, cid: str, exec_id: str) -> Proc:
        proc = self.process(cid, exec_id)
        await proc.exited.wait()
        return proc

    # ------------------------------------------------------------------ signals / tty

    async def kill(self, cid: str, exec_id: str, signal: int, all: bool) -> None:
        proc = self.process(cid, exec_id)
        if proc.status is Status.STOPPED or (exec_id and proc.status is Status.CREATED):
            raise ProcessGone(f"process {cid}/{exec_id}: process already finished")
        if proc.status is Status.CREATED:
            proc.may_report.set()  # killed before start: its exit follows create
        await self.pauser.thaw(self.sandbox, cid)  # not wait for a resume that may not come
        try:
            await self._running_sandbox().call(
                schema.Method.SIGNAL_PROCESS, schema.SignalProcess(cid, exec_id, signal, all))
        except InvalidState as exc:
            raise ProcessGone(f"process {cid}/{exec_id}: {exc}") from exc

    async def resize(self, cid: str, exec_id: str, width: int, height: int) -> None:
        proc = self.process(cid, exec_id)
        if proc.status is not Status.STOPPED and proc.io is not None:
            await self._running_sandbox().call(
                schema.Method.RESIZE_PTY, schema.ResizePty(cid, exec_id, height, width))

    async def close_stdin(self, cid: str, exec_id: str) -> None:
        proc = self.process(cid, exec_id)
        if proc.io is not None:
            await proc.io.close_stdin()

    # ------------------------------------------------------------------ pause / resources

    async def pause(self, cid: str) -> None:
        ctr = self.container(cid)
        if ctr.init.status is not Status.RUNNING:
            raise InvalidState(f"container {cid} is {ctr.init.status.value}, not running")
        # Alone in its sandbox: the whole VM stops; else the guest freezes its cgroup.
        alone = not [c for c in self.containers.values()
                     if c is not ctr and c.init.status is Status.RUNNING]
        await self.pauser.pause(self._running_sandbox(), cid, alone)

    async def resume(self, cid: str) -> None:
        self.container(cid)
        await self.pauser.resume(self._running_sandbox(), cid)

    async def stats(self, cid: str) -> schema.ContainerStats | None:
        """The container's guest cgroup figures; None while the whole VM is paused."""
        self.container(cid)
        sandbox = self._running_sandbox()
        if self.pauser.vm_paused:
            return None
        reply = await sandbox.call(schema.Method.STATS_CONTAINER, schema.ContainerRef(cid))
        try:
            return schema.ContainerStats.from_json(reply)
        except schema.SchemaError as exc:
            raise AgentError(f"container {cid}: bad stats from the guest: {exc}") from None

    async def update(self, cid: str, resources: dict[str, Any]) -> None:
        """linux.resources applied to the container's cgroup in the guest."""
        ctr = self.container(cid)
        if ctr.init.status is not Status.RUNNING or self.pauser.vm_paused:
            raise InvalidState(f"container {cid} is not running (or its VM is paused)")
        try:
            await self._running_sandbox().call(schema.Method.UPDATE_CONTAINER,
                                               schema.UpdateContainer(cid, resources))
        except ProtocolError:
            raise
        except AgentError as exc:  # refused by the guest, e.g. more memory than the VM has
            raise InvalidState(str(exc)) from None

    # ------------------------------------------------------------------ delete

    async def delete(self, cid: str, exec_id: str) -> Proc:
        async with self._lock:
            ctr = self.container(cid)
            if exec_id:
                proc = self.process(cid, exec_id)
                if proc.status is Status.RUNNING:
                    raise InvalidState(f"exec {exec_id} of {cid} is running")
                del ctr.execs[exec_id]
                if proc.io is not None:
                    proc.io.close_fds()
                return proc
            proc = ctr.init
            if proc.status is Status.RUNNING:
                raise InvalidState(f"container {cid} is running: kill it first")
            await self.pauser.thaw(self.sandbox, cid)
            await self._remove_from_guest(ctr)
            self.pauser.forget(cid)
            if proc.status is Status.CREATED:  # never started: it is gone without an exit
                proc.may_report.set()
                self._exited(proc, 128 + 9)
            await self._release(ctr)
            del self.containers[cid]
            # runtime-spec: poststop after the container is deleted, before delete returns.
            await ctr.hooks.after("poststop", "stopped")
            self.publisher.publish(events_pb2.TaskDelete(
                container_id=cid, id=cid, pid=proc.pid, exit_status=proc.exit_status,
                exited_at=_timestamp(proc.exited_at or now())))
            return proc

    async def _remove_from_guest(self, ctr: Container) -> None:
        if self.sandbox is None or self.sandbox.channel is None or self.sandbox.channel.failure:
            return
        try:
            await self.sandbox.call(schema.Method.DELETE_CONTAINER, schema.ContainerRef(ctr.id),
                                    timeout=10)
        except HullError as exc:
            log.warning("delete of %s in the guest: %s", ctr.id, exc)
        for exec_id in ctr.execs:
            self.sandbox.forget_exit(ctr.id, exec_id)
        self.sandbox.forget_exit(ctr.id, "")

    async def _release(self, ctr: Container) -> None:
        for proc in (ctr.init, *ctr.execs.values()):
            if proc.watcher is not None and not proc.watcher.done():
                proc.watcher.cancel()
            if proc.io is not None:
                proc.io.close_fds()
        await ctr.placeholder.stop()
        sharedfs.release(self.shared / ctr.id / "mounts")
        mounts.remove_bind(ctr.share)
        if ctr.mounted_rootfs:
            sharedfs.unmount(ctr.rootfs)

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop everything: the containers' host parts, the VM, the state directory."""
        if self.sandbox_id:
            sandboxinfo.withdraw(self.state_dir)  # the monitor no longer asks a dying pod
        await self._published.aclose()
        for ctr in list(self.containers.values()):
            await self._release(ctr)
        self.containers.clear()
        if self._vm_watch is not None:
            self._vm_watch.cancel()
        if self.pauser.vm_paused:  # a stopped VM would not answer the agent's shutdown
            await self.pauser.thaw(self.sandbox, self.pauser.vm_paused_by)
        if self.sandbox is not None:
            sandbox, self.sandbox = self.sandbox, None
            await sandbox.__aexit__(None, None, None)
        if self.sandbox_id:
            if self.shared.exists():
                for child in self.shared.iterdir():
                    mounts.remove_bind(child / "rootfs")
            sharedfs.unmount_under(self.state_dir)  # never rmtree through a host bind
            shutil.rmtree(self.state_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.state_dir.parent.rmdir()

    def qemu_pid(self) -> int | None:
        if self.sandbox is None or self.sandbox.vm is None:
            return None
        return self.sandbox.vm.pid


def _load_spec(bundle: Path) -> dict[str, Any]:
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc
    oci_bundle.check_spec(spec, path)
    assert isinstance(spec, dict)
    return spec


def _timestamp(when: datetime.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts
