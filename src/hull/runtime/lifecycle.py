"""The container lifecycle of CLI mode: create, start, kill, delete, state, list, ps,
pause, resume (runtime-spec runtime.md, runc's CLI as clients call it).

`create` starts two helper processes and returns: the sandbox's proxy daemon (`hull
proxy`, which boots the VM and owns QEMU) and the init process's shim (``python -m
hull.runtime.shim``, whose pid is the container pid). Later commands talk to the proxy
over its socket. Commands on one container are serialized by its lock; the proxy never
takes it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hull.agentapi import schema
from hull.config.settings import Config
from hull.errors import ContainerNotFound, HullError, InvalidState
from hull.oci.bundle import Bundle
from hull.runtime import client, hooks
from hull.runtime.state import ContainerDir, ContainerState, Status, alive, start_time

log = logging.getLogger("hull.lifecycle")
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0


@dataclass
class Runtime:
    config: Config
    root: Path
    #: argv prefix that runs `hull` with the caller's global flags (for helper processes)
    helper: list[str]
    #: The caller's --log, --log-format and --debug, for the shims (which are no `hull`)
    log_path: str | None = None
    log_format: str = "text"
    debug: bool = False

    def dir(self, container_id: str) -> ContainerDir:
        return ContainerDir(self.root, container_id)

    # ------------------------------------------------------------------ create

    def create(self, container_id: str, bundle: Bundle, pid_file: str | None,
               console_socket: str | None) -> ContainerState:
        check_terminal(bundle.terminal, console_socket)
        cdir = self.dir(container_id)
        cdir.create()
        created = False
        try:
            with cdir.locked():
                state = ContainerState(
                    id=container_id, bundle=str(bundle.path), rootfs=str(bundle.rootfs),
                    created=now(), annotations=bundle.annotations, owner=owner())
                cdir.save(state)
                crash_point("create:saved")
                # The proxy shares the rootfs and the bind sources with the VM
                # (hull.runtime.layout); self.teardown() and cdir.remove() undo them.
                state.proxy_pid = self.spawn(cdir, ["proxy", "--bundle", str(bundle.path),
                                                    container_id], daemon=True)
                crash_point("create:proxy-started")
                state.proxy_start = start_time(state.proxy_pid) or 0
                cdir.save(state)
                state.pid = self.spawn_shim(cdir, "", self._init_payload(cdir, bundle, state),
                                            console_socket, bundle.terminal)
                crash_point("create:shim-started")
                state.pid_start = start_time(state.pid) or 0
                state.status = Status.CREATED
                cdir.save(state)
                crash_point("create:created")
                # The shim ran prestart and createRuntime, the agent createContainer.
                if pid_file:
                    write_pid_file(pid_file, state.pid)
                created = True
                return state
        finally:
            if not created:
                self.teardown(cdir, None)
                cdir.remove()

    def _init_payload(self, cdir: ContainerDir, bundle: Bundle, state: ContainerState
                      ) -> dict[str, Any]:
        """What the init's shim asks the agent for; after the proxy staged the layout
        (hull.runtime.layout), which decides the guest paths."""
        from hull.runtime import sharedfs
        from hull.runtime.layout import rootfs_request

        staging = shared_dir(cdir)
        return {"spec": sharedfs.guest_spec(bundle.spec, staging, cdir.id),
                "state": oci_state(state),
                "rootfs": schema.params(rootfs_request(bundle, staging, cdir.id))}

    def spawn_shim(self, cdir: ContainerDir, exec_id: str, payload: dict[str, Any],
                   console_socket: str | None, terminal: bool) -> int:
        """Start the shim of the init ("" exec_id) or of an exec process; its pid once it
        reports "ok". It inherits the caller's stdio (the container's), unless it relays
        a console: then it must not hold the caller's pipes open, or a caller that reads
        our output to EOF (go-runc does, for a create or exec with a console socket)
        never returns."""
        from hull.runtime import shim

        request = shim.request_json(cdir.path, cdir.id, exec_id, payload, console_socket,
                                    terminal, self.log_path, self.log_format, self.debug)
        read, write = os.pipe2(os.O_CLOEXEC)  # _spawn closes both
        argv = shim.command(sys.executable, "--ready-fd", "{ready}", "--request-fd",
                            str(read), cdir.id)
        return self._spawn(cdir, "shim", argv, daemon=False, inherit=not console_socket,
                           request=(read, write, request))

    def spawn(self, cdir: ContainerDir, verb: list[str], daemon: bool) -> int:
        """Start a `hull` helper (the proxy) and wait until it reports "ok" (or its
        error) on a pipe."""
        argv = [*self.helper, verb[0], "--ready-fd", "{ready}", *verb[1:]]
        server = None
        if daemon and self.config.factory.enabled and self.config.factory.fork_server:
            from hull.runtime import factory, forkserver

            server = factory.root(self.config) / forkserver.SOCKET
        return self._spawn(cdir, verb[0], argv, daemon, inherit=not daemon, server=server)

    def _spawn(self, cdir: ContainerDir, name: str, argv: list[str], daemon: bool,
               inherit: bool, request: tuple[int, int, bytes] | None = None,
               server: Path | None = None) -> int:
        """``request``: (read end, write end, bytes) of a pipe the child reads at once;
        both ends are closed here, whatever happens. ``server``: a daemon forked by the
        pool's fork server there (hull.runtime.forkserver), when it answers."""
        read, write = os.pipe2(os.O_CLOEXEC)
        log_file = cdir.path / f"{name}.log"
        proc: subprocess.Popen[bytes] | None = None
        pid: int | None = None
        try:
            with open(log_file, "ab") as err:
                if server is not None:
                    from hull.runtime import forkserver

                    pid = forkserver.spawn(server, argv, write, err.fileno())
                if pid is None:
                    proc = subprocess.Popen(
                        [str(write) if arg == "{ready}" else arg for arg in argv],
                        pass_fds=(write,) if request is None else (write, request[0]),
                        start_new_session=daemon,
                        stdin=None if inherit else subprocess.DEVNULL,
                        stdout=None if inherit else subprocess.DEVNULL,
                        stderr=None if inherit else err)
                    pid = proc.pid
        except OSError as exc:
            os.close(read)
            if request is not None:
                os.close(request[1])
            raise HullError(f"cannot start {argv[0]}: {exc.strerror}") from exc
        finally:
            os.close(write)
            if request is not None:
                os.close(request[0])
        if request is not None:
            try:  # the child reads it whole before anything else: no deadlock
                with open(request[1], "wb") as pipe:
                    pipe.write(request[2])
            except BrokenPipeError:
                pass  # it died first: its log says why
        with os.fdopen(read, "rb") as ready:
            answer = ready.readline(4096).decode(errors="replace").strip()
        if answer != "ok":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if proc is not None:  # a forked one is the fork server's to reap
                proc.wait()
            if not answer:
                answer = _last_line(log_file) or f"hull {name} exited" + (
                    f" with {proc.returncode}" if proc is not None else "")
            raise HullError(answer)
        return pid

    # ------------------------------------------------------------------ queries

    def load(self, container_id: str) -> tuple[ContainerDir, ContainerState]:
        cdir = self.dir(container_id)
        state = cdir.load()
        return cdir, refresh(cdir, state)

    def state_json(self, container_id: str) -> dict[str, Any]:
        return oci_state(self.load(container_id)[1])

    def containers(self) -> list[ContainerState]:
        states: list[ContainerState] = []
        if not self.root.is_dir():
            return states
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir():
                continue
            with contextlib.suppress(HullError):
                states.append(self.load(entry.name)[1])
        return states

    def pids(self, container_id: str) -> list[int]:
        cdir, state = self.load(container_id)
        pids = [state.pid] if state.pid else []
        for record in sorted((cdir.path / "execs").glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(record.read_text())
                if alive(data["pid"], data["start"]):
                    pids.append(data["pid"])
        return pids

    # ------------------------------------------------------------------ operations

    def start(self, container_id: str) -> None:
        cdir = self.dir(container_id)
        with self.locked(cdir):
            state = refresh(cdir, cdir.load())
            if not state.can_start():
                raise InvalidState(start_error(state))
            spec = load_spec(state)
            # The agent runs the startContainer hooks before the process's execve.
            wait = hooks.guest_wait(hooks.guest_hooks(spec, {}).start_container)
            client.call(cdir, schema.Method.START_CONTAINER, schema.ContainerRef(container_id),
                        timeout=client.TIMEOUT + wait)
            state.status = Status.RUNNING
            cdir.save(state)
        hooks.run(spec, "poststart", oci_state(state))

    def kill(self, container_id: str, signum: int, all_processes: bool) -> None:
        cdir, state = self.load(container_id)
        if not state.can_kill():
            raise InvalidState("container not running")
        if foreground(state):
            # `hull run` in the foreground forwards the signals it receives to its
            # container (SIGKILL ends it, and with it the VM: the same outcome).
            if all_processes:
                raise InvalidState(f"container {container_id} runs under a foreground "
                                   "`hull run`: kill --all is not available")
            try:
                os.kill(state.pid, signum)
            except ProcessLookupError:
                raise InvalidState("container not running") from None
            return
        client.call(cdir, schema.Method.SIGNAL_PROCESS,
                    schema.SignalProcess(container_id, "", signum, all_processes))

    def pause(self, container_id: str) -> None:
        self._pause_resume(container_id, pause=True)

    def resume(self, container_id: str) -> None:
        self._pause_resume(container_id, pause=False)

    def _pause_resume(self, container_id: str, pause: bool) -> None:
        cdir = self.dir(container_id)
        with self.locked(cdir):
            state = refresh(cdir, cdir.load())
            if pause and not state.can_pause():
                raise InvalidState(f"container {container_id} is not running")
            if not pause and not state.can_resume():
                raise InvalidState(f"container {container_id} is not paused")
            method = schema.Method.PAUSE_SANDBOX if pause else schema.Method.RESUME_SANDBOX
            client.call(cdir, method)
            state.status = Status.PAUSED if pause else Status.RUNNING
            cdir.save(state)

    def delete(self, container_id: str, force: bool) -> None:
        cdir = self.dir(container_id)
        if not cdir.path.is_dir():
            if force:
                return  # runc: --force on a missing container succeeds
            raise ContainerNotFound(container_id)
        with self.locked(cdir):
            try:
                state: ContainerState | None = refresh(cdir, cdir.load())
            except ContainerNotFound:
                state = None  # a create that died half way: clean up what it left
            if state is not None and not state.can_delete() and not force:
                raise InvalidState(f"cannot delete container {container_id} that is not "
                                   f"stopped: {state.status}")
            crash_point("delete:locked")
            self.teardown(cdir, state)
            crash_point("delete:torn-down")
        if state is not None:
            with contextlib.suppress(HullError):
                hooks.run(load_spec(state), "poststop", oci_state(state))
        cdir.remove()

    def teardown(self, cdir: ContainerDir, state: ContainerState | None) -> None:
        """Stop everything serving the container: proxy (and with it QEMU), shims."""
        if state is None:
            with contextlib.suppress(HullError):
                state = cdir.load()
        if state is not None and alive(state.proxy_pid, state.proxy_start):
            with contextlib.suppress(HullError):
                client.call(cdir, schema.Method.STOP_SANDBOX, timeout=STOP_TIMEOUT)
            if not wait_gone(state.proxy_pid, state.proxy_start, STOP_TIMEOUT):
                # QEMU has PR_SET_PDEATHSIG: it dies with its proxy.
                kill_pid(state.proxy_pid, state.proxy_start)
        if state is not None:
            for pid, started in [(state.pid, state.pid_start), *exec_shims(cdir)]:
                if alive(pid, started):
                    kill_pid(pid, started)
        # The sandbox's owner is gone now; if it was killed, its filters are still on
        # the client's veths (an owner that stopped cleanly removed them and the record).
        from hull.network import host as netns  # ctypes, ipaddress: not for every verb

        netns.release_recorded(network_record(cdir))

    @contextlib.contextmanager
    def locked(self, cdir: ContainerDir) -> Iterator[None]:
        if not cdir.path.is_dir():
            raise ContainerNotFound(cdir.id)
        with cdir.locked():
            yield


# ---------------------------------------------------------------------- helpers


#: Test hook: `HULL_CRASH_AT=<point>` makes `hull` SIGKILL itself there, so tests can
#: prove that a command killed at any step leaves state a later command can clean.
CRASH_POINTS = ("create:saved", "create:proxy-started", "create:shim-started",
                "create:created", "delete:locked", "delete:torn-down")


def crash_point(name: str) -> None:
    if os.environ.get("HULL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def shared_dir(cdir: ContainerDir) -> Path:
    """Where a CLI container's bind sources are staged for its VM (hull.runtime.sharedfs);
    ContainerDir.remove unmounts whatever is left there."""
    return cdir.path / "shared"


def network_record(cdir: ContainerDir) -> Path:
    """Where a CLI container's sandbox records its taps and filters, for the teardown
    after its owner (proxy, foreground `hull run`) was killed (hull.network.host)."""
    from hull.network.host import RECORD_NAME

    return cdir.path / RECORD_NAME


def check_terminal(terminal: bool, console_socket: str | None) -> None:
    """runc's rules for terminal and --console-socket (utils_linux.go setupIO)."""
    if terminal and not console_socket:
        raise HullError("cannot allocate tty if runc will detach without setting console "
                        "socket")
    if console_socket and not terminal:
        raise HullError("cannot use console socket if runc will not provide a terminal")
    if console_socket and not os.path.exists(console_socket):
        raise HullError(f"console socket {console_socket} does not exist")


def refresh(cdir: ContainerDir, state: ContainerState) -> ContainerState:
    """The true status: a container whose init, shim or proxy is gone has stopped."""
    if state.status in (Status.CREATED, Status.RUNNING, Status.PAUSED) and (
            (cdir.path / "exits" / "init.json").exists()
            or not alive(state.pid, state.pid_start)
            or not (foreground(state) or alive(state.proxy_pid, state.proxy_start))):
        state.status = Status.STOPPED
    if state.status is Status.STOPPED:
        state.pid = 0
    return state


def foreground(state: ContainerState) -> bool:
    """A container of a foreground `hull run`: no proxy; that `hull` process owns the VM."""
    return state.proxy_pid == 0


def start_error(state: ContainerState) -> str:
    if state.status is Status.STOPPED:
        return "cannot start a container that has stopped"
    if state.status in (Status.RUNNING, Status.PAUSED):
        return "cannot start an already running container"
    return f"cannot start a container in the {state.status} state"


def oci_state(state: ContainerState) -> dict[str, Any]:
    """runtime-spec runtime.md state, plus runc's rootfs, created and owner."""
    return {"ociVersion": "1.0.2", "id": state.id, "pid": state.pid,
            "status": str(state.status), "bundle": state.bundle, "rootfs": state.rootfs,
            "created": state.created, "owner": state.owner,
            "annotations": state.annotations}


def load_spec(state: ContainerState) -> dict[str, Any]:
    try:
        spec: dict[str, Any] = json.loads((Path(state.bundle) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise HullError(f"cannot read config.json of container {state.id}: {exc}") from exc
    return spec


def exec_shims(cdir: ContainerDir) -> list[tuple[int, int]]:
    found = []
    for record in (cdir.path / "execs").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(record.read_text())
            found.append((int(data["pid"]), int(data["start"])))
    return found


def wait_gone(pid: int, started: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def kill_pid(pid: int, started: int) -> None:
    if alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, started, STOP_TIMEOUT)


def write_pid_file(path: str, pid: int) -> None:
    """Atomically: clients read the pid file as soon as create exits."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    tmp.replace(target)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def owner() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return ""
