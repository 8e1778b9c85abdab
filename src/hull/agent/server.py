"""The agent's request dispatch: hello, containers, processes, shutdown.

Single-threaded: every handler runs in the loop and must not block. Requests whose
answer depends on a child (create, start, exec, delete of a created container) reply
later, from the child's status pipe or its reaping. Every error goes back as a Response
with an :class:`ErrorKind` and one lower-case line naming the container.
"""

from __future__ import annotations

import contextlib
import os
import signal

import hull
from hull.agent import ctrsetup, debug, init, rootfs, spawn
from hull.agent import syscalls as sc
from hull.agent.channel import VSOCK_HOST_CID, Channel
from hull.agent.container import Container, State
from hull.agent.log import log, mark, marks
from hull.agent.loop import Loop
from hull.agent.pipes import Pipes, release, set_winsize, unmount
from hull.agent.process import Process, Relay, exit_status
from hull.agent.shares import Shares
from hull.agent.spec import SpecError, parse_container, parse_process
from hull.agentapi import framing, schema
from hull.agentapi.schema import ErrorKind, Method

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import Any

    from hull.agent.cgroup import Cgroup

INIT_GRACE = 1.0  # its pid namespace dies with it: its pipes close on their own
EXEC_GRACE = 0.2  # a daemonized grandchild may keep an exec's pipes open


class Options:
    __slots__ = ("cgroup_root", "init", "no_pivot", "run_dir", "share_dir", "vsock_port")

    def __init__(self, *, init: bool = False, run_dir: str = "/run/hull",
                 share_dir: str | None = None, no_pivot: bool = False,
                 cgroup_root: str | None = None, vsock_port: int | None = None) -> None:
        #: Runs as the guest's PID 1 (power off on shutdown, set the clock, feed the RNG).
        self.init = init
        #: Where container rootfs mounts go: <run_dir>/containers/<id>/rootfs.
        self.run_dir = run_dir
        #: TEST ONLY: a rootfs tag names the directory <share_dir>/<tag>, bind-mounted,
        #: instead of a virtio-9p share (for running the agent on a host without QEMU).
        self.share_dir = share_dir
        #: TEST ONLY: use the MS_MOVE + chroot fallback even where pivot_root works.
        self.no_pivot = no_pivot
        #: cgroup v2 root for container cgroups (/sys/fs/cgroup in the guest); None: none
        self.cgroup_root = cgroup_root
        #: serve the host on this AF_VSOCK port instead of the virtio-serial port; outside
        #: init (tests) connections from any CID are accepted, as PID 1 only the host's
        self.vsock_port = vsock_port


class RequestError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Server:
    def __init__(self, options: Options, channel_fd: int | None = None) -> None:
        self.options = options
        self.loop = Loop()
        self.channel = Channel(self.loop, self._on_frame, self._on_session_end, channel_fd,
                               options.vsock_port,
                               VSOCK_HOST_CID if options.init else None)
        self.relay = Relay(self.loop, self.channel)
        self.containers: dict[str, Container] = {}
        self.by_pid: dict[int, Process] = {}
        self.helpers: set[int] = set()
        #: cgroups of removed containers whose last processes were not reaped yet
        self.stale_cgroups: list[Cgroup] = []
        self.shares = Shares(options.run_dir, options.share_dir)
        self.hello_done = False
        #: debug_exec processes (in the guest root, outside containers), by exec id
        self.debug: dict[str, Process] = {}
        self.devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.own_pidns = os.readlink("/proc/self/ns/pid")
        self._handlers = {
            Method.HELLO: self._hello,
            Method.CREATE_CONTAINER: self._create,
            Method.START_CONTAINER: self._start,
            Method.EXEC_PROCESS: self._exec,
            Method.SIGNAL_PROCESS: self._signal,
            Method.RESIZE_PTY: self._resize,
            Method.DELETE_CONTAINER: self._delete,
            Method.STATS_CONTAINER: self._stats,
            Method.UPDATE_CONTAINER: self._update,
            Method.PAUSE_CONTAINER: lambda rid, params: self._freeze(params, True),
            Method.RESUME_CONTAINER: lambda rid, params: self._freeze(params, False),
            Method.CONFIGURE_NETWORK: self._configure_network,
            Method.SHUTDOWN: self._shutdown,
            Method.SANDBOX_STATS: self._sandbox_stats,
            Method.DEBUG_EXEC: self._debug_exec,
        }

    def run(self) -> int:
        self.loop.watch_sigchld(self._reap)
        self._reap()
        self.channel.start()
        self.loop.run()
        self._teardown()
        return self.channel.exit_status

    # ------------------------------------------------------------------ frames

    def _on_frame(self, frame: framing.Frame) -> None:
        if frame.kind == framing.Kind.REQUEST:
            self._on_request(frame.payload)
        elif frame.stream != framing.CONTROL_STREAM:
            self.relay.on_frame(frame)
        else:
            log(f"ignored a {frame.kind.name} frame from the host")

    def _on_session_end(self) -> None:
        self.hello_done = False
        self.relay.reset()

    def _on_request(self, payload: bytes) -> None:
        obj: dict[str, Any] = {}
        try:
            obj = schema.decode(payload)
            request = schema.Request.from_json(obj)
        except schema.SchemaError as exc:
            rid = obj.get("id")
            if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= 2**53:
                self.reply_error(rid, ErrorKind.INVALID, str(exc))
            else:
                log(f"unusable request: {exc}")
            return
        try:
            if not self.hello_done and request.method != Method.HELLO:
                raise RequestError(ErrorKind.INVALID, "hello must be the first request")
            result = self._handlers[request.method](request.id, request.params)
        except RequestError as exc:
            self.reply_error(request.id, exc.kind, str(exc))
        except schema.SchemaError as exc:
            self.reply_error(request.id, ErrorKind.INVALID, f"{request.method}: {exc}")
        except Exception as exc:  # a bug here must not kill PID 1
            import traceback

            log(f"{request.method} failed:\n{traceback.format_exc()}")
            self.reply_error(request.id, ErrorKind.FAILED, f"{request.method}: {exc}")
        else:
            if result is not None:
                self.reply(request.id, result)

    def reply(self, rid: int, result: dict[str, Any]) -> None:
        self._control(framing.Kind.RESPONSE, schema.Response(rid, result).to_json())

    def reply_error(self, rid: int, kind: ErrorKind, message: str) -> None:
        self._control(framing.Kind.RESPONSE, schema.Response(rid, None, kind, message).to_json())

    def _control(self, kind: framing.Kind, message: dict[str, Any]) -> None:
        self.channel.send_parts(kind, framing.CONTROL_STREAM, schema.encode(message))

    # ------------------------------------------------------------------ hello

    def _hello(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        hello = schema.Hello.from_json(params)
        try:
            entropy = bytes.fromhex(hello.entropy)
        except ValueError:
            raise RequestError(ErrorKind.INVALID, "hello: entropy is not hex") from None
        if self.options.init:
            try:
                init.add_entropy(entropy)
            except OSError as exc:
                log(f"entropy: {exc.strerror}")
            try:
                init.set_clock(hello.time_ns)
            except OSError as exc:
                log(f"clock: {exc.strerror}")
        self.hello_done = True
        # One line per host session: `hull logs --agent` shows when the host connected.
        log(f"hello from the host (protocol {hello.version})")
        version = getattr(hull, "__version__", "0")
        mark("hello")
        boot = dict(marks)
        if self.options.init and os.environ.get("HULL_PROFILE") == "1":
            boot.update(init.kernel_marks())
        return schema.params(schema.HelloReply(schema.PROTOCOL_VERSION, version,
                                               os.uname().release, boot))

    # ------------------------------------------------------------------ lookups

    def _container(self, cid: str) -> Container:
        ctr = self.containers.get(cid)
        if ctr is None:
            raise RequestError(ErrorKind.NOT_FOUND, f"container {cid} does not exist")
        return ctr

    def _process(self, ctr: Container, exec_id: str) -> Process:
        if not exec_id:
            return ctr.init
        proc = ctr.execs.get(exec_id)
        if proc is None:
            raise RequestError(ErrorKind.NOT_FOUND,
                               f"exec {exec_id} of container {ctr.id} does not exist")
        return proc

    def _check_streams(self, what: str, stdio: schema.Stdio, terminal: bool) -> None:
        if terminal and stdio.stderr is not None:
            raise RequestError(ErrorKind.INVALID, f"{what}: with a terminal, stderr is not a "
                               "stream (the pty's output goes on stdout)")
        for stream in stdio.streams():
            if self.relay.in_use(stream):
                raise RequestError(ErrorKind.INVALID, f"{what}: stream {stream} is in use")

    # ------------------------------------------------------------------ create / start

    def _create(self, rid: int, params: dict[str, Any]) -> None:
        req = schema.CreateContainer.from_json(params)
        cid = req.container_id
        if not cid or cid in (".", "..") or "/" in cid or "\0" in cid:
            raise RequestError(ErrorKind.INVALID, f"container id {cid!r} is not valid")
        if cid in self.containers:
            raise RequestError(ErrorKind.EXISTS, f"container {cid} already exists")
        try:
            cspec = parse_container(req.spec)
        except SpecError as exc:
            raise RequestError(ErrorKind.INVALID, f"container {cid}: {exc}") from None
        terminal = cspec.process.terminal
        self._check_streams(f"container {cid}", req.stdio, terminal)
        try:
            self.shares.resolve_binds(cspec.mounts)
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"container {cid}: {exc.strerror}") from None
        try:
            join = ctrsetup.join_fds(self.containers, cspec, log)
            cgroup = ctrsetup.make_cgroup(self.options.cgroup_root, cid, cspec, log)
        except ctrsetup.SetupRefused as exc:
            raise RequestError(ErrorKind.INVALID, f"container {cid}: {exc}") from None
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"container {cid}: {exc.strerror}") from None
        root = os.path.join(self.options.run_dir, "containers", cid, "rootfs")
        setup = spawn.Setup(cgroup.procs if cgroup else None, join, cspec.seccomp, req.hooks)
        try:
            self._mount_rootfs(cid, req.rootfs, root)
            try:
                pipes = Pipes(req.stdio, terminal)
            except OSError as exc:
                unmount(root)
                raise RequestError(ErrorKind.FAILED, f"container {cid}: pipe: {exc.strerror}"
                                   ) from None
            try:
                spawned = spawn.spawn_init(cid, root, cspec, pipes.child, self.devnull,
                                           no_pivot=self.options.no_pivot, setup=setup)
            except OSError as exc:
                pipes.close_agent_ends()
                unmount(root)
                raise RequestError(ErrorKind.FAILED, f"container {cid}: fork: {exc.strerror}"
                                   ) from None
            finally:
                pipes.close_child_ends()
        except RequestError:
            if cgroup is not None:
                cgroup.remove()
            raise
        finally:
            for fd in join.values():
                os.close(fd)
        proc = Process(cid, "", req.stdio, terminal, self.relay, INIT_GRACE, self._finished)
        pipes.attach(proc)
        proc.pending_rid = rid
        proc.pending_winsize = cspec.process.console_size
        ctr = Container(cid, root, cspec, proc, start_fd=spawned.start_fd)
        ctr.cgroup = cgroup
        self.containers[cid] = ctr
        self.helpers.add(spawned.pid)
        self._watch_status(ctr, proc, spawned.status_fd)

    def _mount_rootfs(self, cid: str, share: schema.RootfsShare, root: str) -> None:
        try:
            self.shares.mount_rootfs(share, root)
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"container {cid}: mount rootfs share "
                               f"{share.tag}: {exc.strerror}") from None

    def _start(self, rid: int, params: dict[str, Any]) -> None:
        ctr = self._container(schema.ContainerRef.from_json(params).container_id)
        if not ctr.can_start() or ctr.start_fd is None:
            raise RequestError(ErrorKind.STATE, f"container {ctr.id} is {ctr.state.value}, "
                               "not created")
        start_fd, ctr.start_fd = ctr.start_fd, None
        try:
            os.write(start_fd, b"s")
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"container {ctr.id}: start: "
                               f"{sc.strerror(exc.errno or 0)}") from None
        finally:
            os.close(start_fd)
        ctr.state = State.STARTING
        ctr.init.pending_rid = rid

    # ------------------------------------------------------------------ status pipes

    def _watch_status(self, ctr: Container, proc: Process, fd: int) -> None:
        pipe = spawn.StatusPipe(fd)
        ctr.status_pipes[fd] = pipe

        def on_readable() -> None:
            if pipe.fd < 0:
                return
            for kind, text in pipe.read():
                self._status(ctr, proc, kind, text)
                if pipe.fd < 0:  # the container was removed meanwhile
                    return
            if pipe.eof:
                self._close_status(ctr, pipe)
                self._status(ctr, proc, "EOF", "")

        pipe.on_readable = on_readable
        self.loop.set_reader(fd, on_readable)

    def _status(self, ctr: Container, proc: Process, kind: str, text: str) -> None:
        is_init = proc is ctr.init
        if kind == "P":
            proc.pid = int(text)
            self.by_pid[proc.pid] = proc
            if is_init:
                try:
                    pidns = os.readlink(f"/proc/{proc.pid}/ns/pid")
                except OSError:
                    pidns = ""
                # Never the agent's own namespace: kill --all would hit the agent itself.
                ctr.pidns = "" if pidns == self.own_pidns else pidns
        elif kind == "W":
            log(f"{proc.label()}: {text}")
        elif kind == "T":
            if proc.pid is not None:
                self._take_terminal(proc, int(text))
            release(proc)
        elif kind == "R" and is_init:
            ctr.state = State.CREATED
            self._answer(ctr, proc, None)
        elif kind == "E":
            self._answer(ctr, proc, f"{proc.label()}: {text}")
        elif kind == "EOF":
            # EOF: every writer is gone; after a successful execve (close-on-exec) or exit.
            release(proc)
            if proc.pending_rid is not None:
                if proc.pid is not None and (not is_init or ctr.state == State.STARTING):
                    if is_init:
                        ctr.state = State.RUNNING
                    self._answer(ctr, proc, None)
                else:
                    self._answer(ctr, proc, f"{proc.label()}: the process exited during setup")
            if proc.pid is None and not proc.failed:  # the helper failed before a fork
                self._fail(ctr, proc)

    def _take_terminal(self, proc: Process, child_fd: int) -> None:
        assert proc.pid is not None
        try:
            master = sc.pidfd_getfd(proc.pid, child_fd)
        except OSError as exc:
            log(f"{proc.label()}: cannot take over the terminal: {exc.strerror}")
            return
        proc.attach_terminal(master)
        if proc.pending_winsize is not None:
            set_winsize(master, *proc.pending_winsize)
            proc.pending_winsize = None

    def _answer(self, ctr: Container, proc: Process, error: str | None) -> None:
        """Send the reply a child's status decides: create, start or exec."""
        rid, proc.pending_rid = proc.pending_rid, None
        if rid is None:
            if error:
                log(error)
            return
        if error is None:
            if proc is ctr.init and ctr.state == State.RUNNING:
                self.reply(rid, {})  # start_container
            else:
                assert proc.pid is not None
                self.reply(rid, schema.params(schema.ProcessPid(proc.pid)))
            return
        self.reply_error(rid, ErrorKind.FAILED, error)
        if proc is ctr.init and ctr.state == State.STARTING:
            ctr.state = State.RUNNING  # execve failed: it exits 126/127, an exit event follows
        else:
            self._fail(ctr, proc)

    def _fail(self, ctr: Container, proc: Process) -> None:
        """create or exec failed: for the host this process never existed; its id is free.

        The child still exits and gets reaped, as an unknown pid.
        """
        proc.failed = True
        release(proc)
        if proc.pid is not None and self.by_pid.get(proc.pid) is proc:
            del self.by_pid[proc.pid]
        if proc is ctr.init:
            self._remove(ctr)
        else:
            proc.silence()
            if ctr.execs.get(proc.exec_id) is proc:
                ctr.forget_exec(proc.exec_id)

    def _close_status(self, ctr: Container, pipe: spawn.StatusPipe) -> None:
        if pipe.fd >= 0:
            ctr.status_pipes.pop(pipe.fd, None)
            self.loop.close(pipe.fd)
            pipe.fd = -1

    # ------------------------------------------------------------------ exec

    def _exec(self, rid: int, params: dict[str, Any]) -> None:
        req = schema.ExecProcess.from_json(params)
        ctr = self._container(req.container_id)
        label = f"exec {req.exec_id} of container {ctr.id}"
        if not req.exec_id:
            raise RequestError(ErrorKind.INVALID, f"{label}: exec_id must not be empty")
        if not ctr.can_exec() or ctr.init.pid is None:
            raise RequestError(ErrorKind.STATE, f"container {ctr.id} is {ctr.state.value}, "
                               "not running")
        old = ctr.execs.get(req.exec_id)
        if old is not None and not old.finished:
            raise RequestError(ErrorKind.EXISTS, f"{label} already exists")
        try:
            pspec = parse_process(req.process)
        except SpecError as exc:
            raise RequestError(ErrorKind.INVALID, f"{label}: {exc}") from None
        self._check_streams(label, req.stdio, pspec.terminal)
        try:
            pipes = Pipes(req.stdio, pspec.terminal)
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"{label}: pipe: {exc.strerror}") from None
        try:
            setup = spawn.Setup(ctr.cgroup.procs if ctr.cgroup else None,
                                seccomp=ctr.spec.seccomp)
            spawned = spawn.spawn_exec(ctr.init.pid, pspec, pipes.child, self.devnull, setup)
        except OSError as exc:
            pipes.close_agent_ends()
            raise RequestError(ErrorKind.FAILED, f"{label}: fork: {rootfs.os_text(exc)}"
                               ) from None
        finally:
            pipes.close_child_ends()
        proc = Process(ctr.id, req.exec_id, req.stdio, pspec.terminal, self.relay, EXEC_GRACE,
                       self._finished)
        pipes.attach(proc)
        proc.pending_rid = rid
        proc.pending_winsize = pspec.console_size
        proc.ack_fd = spawned.start_fd
        proc.pid = spawned.pid  # the agent's own child: no helper, no "P" line
        self.by_pid[proc.pid] = proc
        ctr.execs[req.exec_id] = proc
        self._watch_status(ctr, proc, spawned.status_fd)

    # ------------------------------------------------------------------ signal / resize

    def _signal(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        req = schema.SignalProcess.from_json(params)
        ctr = self._container(req.container_id)
        proc = self._process(ctr, req.exec_id)
        if req.all and not req.exec_id:
            if not ctr.init.alive:
                raise RequestError(ErrorKind.STATE, f"container {ctr.id} is not running")
            self._kill_all(ctr, req.signal)
            return {}
        if not proc.alive or proc.pid is None:
            what = f"container {ctr.id}" if proc is ctr.init else f"exec {proc.exec_id}"
            raise RequestError(ErrorKind.STATE, f"{what} is not running")
        try:
            os.kill(proc.pid, req.signal)
        except ProcessLookupError:
            raise RequestError(ErrorKind.STATE, f"container {ctr.id}: process "
                               "already finished") from None
        return {}

    def _kill_all(self, ctr: Container, sig: int) -> None:
        """Signal every process of the container's pid namespace (runc kill --all)."""
        if ctr.pidns:
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    if os.readlink(f"/proc/{name}/ns/pid") == ctr.pidns:
                        os.kill(int(name), sig)
                except OSError:
                    continue
        if ctr.init.alive and ctr.init.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(ctr.init.pid, sig)

    def _resize(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        req = schema.ResizePty.from_json(params)
        ctr = self._container(req.container_id)
        proc = self._process(ctr, req.exec_id)
        if not proc.terminal or proc.finished:
            raise RequestError(ErrorKind.STATE, f"{proc.label()} has no terminal")
        if proc.master is None or proc.master.fd < 0:
            proc.pending_winsize = (req.rows, req.cols)  # applied when the pty is taken over
        else:
            set_winsize(proc.master.fd, req.rows, req.cols)
        return {}

    # ------------------------------------------------------------------ stats / update

    def _stats(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        ctr = self._container(schema.ContainerRef.from_json(params).container_id)
        return schema.params(schema.ContainerStats.from_json(ctrsetup.stats(ctr)))

    def _update(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        req = schema.UpdateContainer.from_json(params)
        ctr = self._container(req.container_id)
        try:
            ctrsetup.update(ctr, req.resources, log)
        except ctrsetup.SetupRefused as exc:
            raise RequestError(ErrorKind.INVALID, str(exc)) from None
        return {}

    def _freeze(self, params: dict[str, Any], frozen: bool) -> dict[str, Any]:
        ctr = self._container(schema.ContainerRef.from_json(params).container_id)
        try:
            ctrsetup.freeze(ctr, frozen)
        except ctrsetup.SetupRefused as exc:
            raise RequestError(ErrorKind.FAILED, str(exc)) from None
        return {}

    # ------------------------------------------------------------------ network

    def _configure_network(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        from hull.agent import network
        from hull.agentapi.network import NetworkConfig

        config = NetworkConfig.from_json(params)
        if self.containers:
            raise RequestError(ErrorKind.STATE, "configure_network: containers exist already")
        try:
            for line in network.configure(config):
                log(f"network: {line}")
        except LookupError as exc:
            raise RequestError(ErrorKind.INVALID, f"configure_network: {exc}") from None
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"configure_network: {exc.strerror}"
                               ) from None
        return {}

    # ------------------------------------------------------------------ operator

    def _sandbox_stats(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        try:
            figures = debug.stats(len(self.containers))
        except (OSError, ValueError) as exc:
            raise RequestError(ErrorKind.FAILED, f"sandbox_stats: {exc}") from None
        return schema.params(schema.SandboxStats.from_json(figures))

    def _debug_exec(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        req = schema.DebugExec.from_json(params)
        label = f"debug exec {req.exec_id}"
        if self.options.init and not debug.enabled():
            raise RequestError(ErrorKind.INVALID, f"{label}: the debug console is disabled "
                               "(hypervisor.debug_console)")
        old = self.debug.get(req.exec_id)
        if old is not None and not old.finished:
            raise RequestError(ErrorKind.EXISTS, f"{label} already exists")
        self._check_streams(label, req.stdio, False)
        env = req.env or list(debug.DEFAULT_ENV)
        try:
            path, argv = debug.resolve(req.args, env)
        except spawn.ExecError as exc:
            raise RequestError(ErrorKind.FAILED, f"{label}: {exc}") from None
        try:
            pipes = Pipes(req.stdio, False)
        except OSError as exc:
            raise RequestError(ErrorKind.FAILED, f"{label}: pipe: {exc.strerror}") from None
        try:
            pid = debug.fork_exec(path, argv, env, pipes.child, self.devnull)
        except OSError as exc:
            pipes.close_agent_ends()
            raise RequestError(ErrorKind.FAILED, f"{label}: fork: {exc.strerror}") from None
        finally:
            pipes.close_child_ends()
        proc = Process(schema.GUEST, req.exec_id, req.stdio, False, self.relay, EXEC_GRACE,
                       self._finished)
        pipes.attach(proc)
        proc.pid = pid
        self.by_pid[pid] = proc
        self.debug[req.exec_id] = proc
        log(f"{label}: {' '.join(req.args)[:200]} (pid {pid})")
        return schema.params(schema.ProcessPid(pid))

    # ------------------------------------------------------------------ reaping

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.helpers:
                self.helpers.discard(pid)
                continue
            proc = self.by_pid.get(pid)
            if proc is None or proc.pending_rid is not None:
                # Reparented before its "P" line was read, or an exec that ran and exited
                # before its pipe's EOF was seen: read the status pipes first (the reply
                # goes before the exit event).
                self._poll_status_pipes()
            proc = self.by_pid.pop(pid, None)
            if proc is not None:
                proc.reaped(status)
            if self.stale_cgroups:
                self.stale_cgroups = [cg for cg in self.stale_cgroups if not cg.remove()]

    def _poll_status_pipes(self) -> None:
        for ctr in list(self.containers.values()):
            for pipe in list(ctr.status_pipes.values()):
                pipe.on_readable()

    def _finished(self, proc: Process) -> None:
        """proc was reaped and its output streams are closed."""
        if proc.container_id == schema.GUEST and self.debug.get(proc.exec_id) is proc:
            del self.debug[proc.exec_id]
            assert proc.wait_status is not None
            status, sig = exit_status(proc.wait_status)
            self._control(framing.Kind.EVENT, schema.ProcessExit(
                schema.GUEST, proc.exec_id, status, sig).to_json())
            return
        ctr = self.containers.get(proc.container_id)
        if ctr is None:
            return
        if proc.failed:
            return
        if proc is ctr.init:
            ctr.state = State.STOPPED
        if not (proc is ctr.init and ctr.deleting_created):
            status, sig = exit_status(proc.wait_status) if proc.wait_status is not None else (
                128 + signal.SIGKILL, int(signal.SIGKILL))
            oom = sig == signal.SIGKILL and ctr.cgroup is not None and ctr.cgroup.new_oom_kill()
            if oom:
                log(f"{proc.label()}: OOM killed")
            event = schema.ProcessExit(ctr.id, proc.exec_id, status, sig, oom)
            self._control(framing.Kind.EVENT, event.to_json())
        if proc is ctr.init and ctr.delete_rid is not None:
            rid, ctr.delete_rid = ctr.delete_rid, None
            self._remove(ctr)
            self.reply(rid, {})

    # ------------------------------------------------------------------ delete / shutdown

    def _delete(self, rid: int, params: dict[str, Any]) -> dict[str, Any] | None:
        ctr = self._container(schema.ContainerRef.from_json(params).container_id)
        refusal = ctr.delete_refusal()
        if refusal is not None:
            raise RequestError(ErrorKind.STATE, f"container {ctr.id} is {refusal}")
        if ctr.init.alive:  # created, never started: its init waits for start
            ctr.deleting_created = True
            ctr.delete_rid = rid
            self._kill_all(ctr, signal.SIGKILL)
            return None
        if not ctr.init.finished:
            ctr.delete_rid = rid
            ctr.init.close_outputs()  # its exit event goes out, then _finished replies
            return None
        self._remove(ctr)
        return {}

    def _remove(self, ctr: Container) -> None:
        """Forget a container whose init is gone: kill leftovers, unmount, free streams."""
        if self.containers.get(ctr.id) is not ctr:
            return
        del self.containers[ctr.id]
        for proc in ctr.all_processes():
            if proc.alive and proc.pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGKILL)
            if proc.pid is not None and self.by_pid.get(proc.pid) is proc:
                del self.by_pid[proc.pid]
            release(proc)
            proc.silence()
        for pipe in list(ctr.status_pipes.values()):
            self._close_status(ctr, pipe)
        if ctr.start_fd is not None:
            os.close(ctr.start_fd)
            ctr.start_fd = None
        unmount(ctr.root)
        if ctr.cgroup is not None and not ctr.cgroup.remove():
            self.stale_cgroups.append(ctr.cgroup)
        for path in (ctr.root, os.path.dirname(ctr.root)):
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def _shutdown(self, rid: int, params: dict[str, Any]) -> None:
        self._teardown()
        os.sync()
        self.reply(rid, {})
        self.channel.flush_blocking(1.0)
        if self.options.init:
            log("powering off")
            sc.reboot(sc.RB_POWER_OFF)
        self.loop.running = False

    def _teardown(self) -> None:
        for ctr in list(self.containers.values()):
            self._kill_all(ctr, signal.SIGKILL)
            self._remove(ctr)
