"""QemuVM: owns one QEMU process, its QMP connection and its agent socket.

An async context manager: whatever happens inside the block, leaving it stops QEMU and
closes every descriptor. QEMU also gets PR_SET_PDEATHSIG=SIGKILL so it cannot outlive
the Hull process that started it, even when that process is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from hull.agentapi.framing import VSOCK_PORT
from hull.errors import HypervisorError
from hull.hypervisor import vsock
from hull.hypervisor.base import Capability, ChannelKind, Hypervisor, VMConfig
from hull.hypervisor.qemu import argv as qemu_argv

log = logging.getLogger("hull.qemu")
#: Added to QEMU's environment. GLib's slice allocator (GLib 2.74) keeps TCG's tree of
#: translation blocks in per-thread slabs; plain malloc holds the same nodes in ~0.5 MiB
#: less per VM (docs/performance.md). GLib 2.76 and later ignore it (they always malloc).
QEMU_ENV = {"G_SLICE": "always-malloc"}
PR_SET_PDEATHSIG = 1
PR_SET_THP_DISABLE = 41
CLONE_NEWNET = 0x40000000


def _preexec(config: VMConfig) -> Callable[[], None]:
    """The child's setup before exec: die with the parent, keep transparent huge pages
    away unless ``config.transparent_huge_pages`` (the flag survives exec; QEMU asks for
    them with MADV_HUGEPAGE on its translated code and RAM blocks, and a 2 MiB page then
    backs a few KiB it touched), enter the network namespace, drop to an unprivileged
    user (QEMU's own -runas cannot work under its seccomp sandbox, which forbids set*id
    calls, so the privileges go before exec).

    The agent and QMP socketpairs were made before, in the parent's namespace: unix
    sockets keep working across network namespaces, and so do the inherited tap fds.
    """
    def child() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if not config.transparent_huge_pages:
            libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)  # fails only before Linux 3.15
        if config.netns_fd >= 0 and libc.setns(config.netns_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns to the container's network namespace")
        if config.run_as is not None:
            uid, gid = config.run_as
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            # setuid cleared the death signal: set it again for the unprivileged QEMU.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return child


def resolve_binary(path: str) -> str:
    found = shutil.which(path)
    if not found:
        raise HypervisorError(f"hypervisor binary {path} not found (apt-get install "
                              "qemu-system-x86, or set hypervisor.path)")
    return found


class QemuVM(Hypervisor):
    capabilities = Capability.PAUSE | Capability.FS_SHARE

    def __init__(self, binary: str, config: VMConfig) -> None:
        self.binary = resolve_binary(binary)
        self.config = config
        self._proc: asyncio.subprocess.Process | None = None
        self._agent: socket.socket | None = None
        self._qmp_sock: socket.socket | None = None
        self._qmp: QMPClient | None = None
        self._stderr = b""
        self._stderr_task: asyncio.Task[None] | None = None
        #: the guest CID of the vsock channel (0: virtio-serial)
        self.vsock_cid = 0

    # -------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        qmp_host, qmp_vm = socket.socketpair()
        self._qmp_sock = qmp_host
        # QEMU's end of the channel: a socketpair end, or /dev/vhost-vsock with a CID.
        agent_vm: socket.socket | None = None
        vhost = -1
        if self.config.channel is ChannelKind.VSOCK:
            try:
                vhost, self.vsock_cid = vsock.open_device()
            except BaseException:
                qmp_vm.close()
                self._close_sockets()
                raise
        else:
            self._agent, agent_vm = socket.socketpair()
        # The console log is opened here and handed over as an fd: QEMU may run as an
        # unprivileged user that cannot reach Hull's state directory.
        console = os.open(self.config.console_log,
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fds = qemu_argv.Fds(agent_vm.fileno() if agent_vm else -1, qmp_vm.fileno(), console,
                            vhost, self.vsock_cid)
        argv = qemu_argv.build(self.binary, self.config, fds)
        log.debug("starting %s", " ".join(argv))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=tuple(fd for fd in (fds.agent, fds.qmp, fds.console,
                                             fds.vhost_vsock, self.config.incoming_fd,
                                             *(nic.tap_fd for nic in self.config.nics))
                               if fd >= 0),
                preexec_fn=_preexec(self.config),
                env={**os.environ, **QEMU_ENV}, start_new_session=True)
        except OSError as exc:
            self._close_sockets()
            raise HypervisorError(f"cannot start {self.binary}: {exc.strerror}") from exc
        finally:
            if agent_vm is not None:
                agent_vm.close()
            if vhost >= 0:
                os.close(vhost)  # QEMU's copy holds the CID until it exits
            qmp_vm.close()
            os.close(console)
        self._stderr_task = asyncio.create_task(self._collect_stderr())
        try:
            self._qmp = QMPClient(f"hull-{self.config.name}")
            await asyncio.wait_for(self._qmp.connect(qmp_host), timeout=10)
        except (QMPError, OSError, TimeoutError) as exc:
            status = await self._reap(2.0)
            raise HypervisorError(self._failure(f"qemu exited with status {status}")) from exc
        if self.config.memory_file is not None:
            await self._template_setup()

    async def _template_setup(self) -> None:
        """A template or clone (hull.runtime.factory): its RAM file is never part of the
        migration stream; a clone then loads its device state from the inherited fd."""
        assert self._qmp is not None
        try:
            await self._qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": True}]})
            if self.config.incoming_fd >= 0:
                # No self-announce after the restore: its RARP frames would carry the
                # template NIC's MAC out of the clone's tap (the guest gets the veth's).
                await self._qmp.execute("migrate-set-parameters", {"announce-rounds": 0})
                await self._qmp.execute("migrate-incoming",
                                        {"uri": f"fd:{self.config.incoming_fd}"})
        except (QMPError, OSError, EOFError) as exc:
            self.kill()
            await self._reap(1.0)
            raise HypervisorError(self._failure(f"vm {self.config.name}: cannot set up "
                                                f"the template migration: {exc}")) from exc

    async def stop(self, timeout: float = 2.0) -> None:
        if self._proc is not None and self._proc.returncode is None:
            if self._qmp is not None:
                with contextlib.suppress(QMPError, OSError, TimeoutError, EOFError):
                    await asyncio.wait_for(self._qmp.execute("quit"), timeout=timeout)
            await self._reap(timeout)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), timeout=1)
            self._qmp = None
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stderr_task, timeout=1)
        self._close_sockets()

    async def _reap(self, timeout: float) -> int:
        assert self._proc is not None
        try:
            return await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            return await self._proc.wait()

    def kill(self) -> None:
        """Kill QEMU at once (the guest broke the protocol or stopped answering)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def _close_sockets(self) -> None:
        for sock in (self._agent, self._qmp_sock):
            if sock is not None:
                sock.close()
        self._agent = self._qmp_sock = None

    async def _collect_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        # Keep only the tail: QEMU's stderr is for error messages, never unbounded output.
        self._stderr = (self._stderr + await self._proc.stderr.read(64 * 1024))[-8192:]

    def _failure(self, what: str) -> str:
        err = self._stderr.decode(errors="replace").strip().splitlines()
        return f"{what}: {err[-1]}" if err else what

    # -------------------------------------------------------------------- queries

    async def pause(self) -> None:
        await self._execute("stop")

    async def resume(self) -> None:
        await self._execute("cont")

    async def _execute(self, command: str) -> None:
        if self._qmp is None:
            raise HypervisorError(f"vm {self.config.name} is not running")
        try:
            await self._qmp.execute(command)
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"qmp {command} on vm {self.config.name} failed: {exc}"
                                  ) from exc

    async def query(self, command: str) -> dict[str, object]:
        """A QMP query's answer (a dict), or HypervisorError."""
        if self._qmp is None:
            raise HypervisorError(f"vm {self.config.name} is not running")
        try:
            reply = await self._qmp.execute(command)
        except (QMPError, OSError, EOFError) as exc:
            raise HypervisorError(f"qmp {command} on vm {self.config.name} failed: {exc}"
                                  ) from exc
        return reply if isinstance(reply, dict) else {}

    async def save_state(self, fd: int, timeout: float = 30.0) -> None:
        """Pause the guest and write its device state to ``fd`` (a file Hull opened: the
        -sandbox forbids exec: URIs, and QEMU 7.2 has no file: URI). RAM held in a
        shared memory file is left out (x-ignore-shared, see argv.memory_args)."""
        if self._qmp is None:
            raise HypervisorError(f"vm {self.config.name} is not running")
        try:
            await self._qmp.execute("stop")
            self._qmp.send_fd_scm(fd)
            await self._qmp.execute("getfd", {"fdname": "hullstate"})
            await self._qmp.execute("migrate", {"uri": "fd:hullstate"})
        except (QMPError, OSError) as exc:
            raise HypervisorError(f"saving the state of vm {self.config.name}: {exc}"
                                  ) from exc
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            info = await self.query("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or (
                    asyncio.get_running_loop().time() > deadline):
                raise HypervisorError(f"saving the state of vm {self.config.name}: "
                                      f"migration {status}: {info.get('error-desc', '')}")
            await asyncio.sleep(0.01)

    async def wait_restored(self, timeout: float) -> None:
        """Wait until a VM started with ``incoming_fd`` has loaded its state and runs.
        A stream QEMU cannot load makes it exit: HypervisorError, never a hung VM."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.returncode is not None:
                raise HypervisorError(self.exit_reason())
            try:
                status = (await asyncio.wait_for(self.query("query-status"), timeout)
                          ).get("status")
            except (HypervisorError, TimeoutError) as exc:
                await asyncio.sleep(0.05)  # let the exit status and stderr arrive
                if self.returncode is not None:
                    raise HypervisorError(self.exit_reason()) from exc
                raise HypervisorError(f"vm {self.config.name}: restore failed: {exc}"
                                      ) from exc
            if status == "running":
                return
            if status not in ("inmigrate", "prelaunch", "restore-vm", "finish-migrate"):
                raise HypervisorError(f"vm {self.config.name}: restored into state {status}")
            if asyncio.get_running_loop().time() > deadline:
                raise HypervisorError(f"vm {self.config.name}: restore took over {timeout:g}s")
            await asyncio.sleep(0.005)

    async def connect_agent(self, timeout: float) -> socket.socket:
        if self._agent is None and self.config.channel is ChannelKind.VSOCK and self._proc:
            self._agent = await vsock.connect(
                socket.AF_VSOCK, (self.vsock_cid, VSOCK_PORT), timeout, self._gone,
                f"vm {self.config.name}: agent on vsock cid {self.vsock_cid} "
                f"port {VSOCK_PORT}")
        if self._agent is None:
            raise HypervisorError(f"vm {self.config.name} is not running")
        return self._agent

    def _gone(self) -> str | None:
        return self.exit_reason() if self.returncode is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    async def wait(self) -> int:
        if self._proc is None:
            raise HypervisorError(f"vm {self.config.name} was never started")
        return await self._proc.wait()

    def exit_reason(self) -> str:
        """Why QEMU ended, from its stderr and status (call after it exited)."""
        return self._failure(f"qemu exited with status {self.returncode}")

    def console_tail(self, lines: int = 6) -> str:
        return tail_lines(self.config.console_log, lines)


def tail_lines(path: Path, lines: int) -> str:
    """The guest console's last meaningful lines, joined with " | " for a one-line error.

    A kernel panic's backtrace would crowd out its cause, so when the console shows a
    panic the lines leading up to it and the panic line itself are what is kept.
    """
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "")
    all_lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    panic = next((i for i, ln in enumerate(all_lines) if "Kernel panic" in ln), None)
    if panic is not None:
        before = [ln for ln in all_lines[:panic] if not _is_trace(ln)]
        all_lines = [*before[-(lines - 1):], all_lines[panic]] if lines > 1 else [
            all_lines[panic]]
    kept = deque(all_lines, maxlen=lines)
    return " | ".join(kept)


def _is_trace(line: str) -> bool:
    """A line of a kernel oops/backtrace (registers, call trace), not a message."""
    body = line.split("] ", 1)[-1]
    return (body.startswith((" ", "?", "<", "Call Trace", "RIP:", "RSP:", "RAX:", "RDX:",
                             "RBP:", "R10:", "R13:", "Code:", "CPU:", "Hardware name:"))
            or "+0x" in body)
