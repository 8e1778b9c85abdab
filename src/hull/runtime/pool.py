"""A pool of restored clones (factory.pool_size): a sandbox takes one over instead of
restoring its own, so QEMU's start and the restore are off its path.

Who owns what. One pool daemon per template directory (``hull factory pool``, started
detached by ``hull factory init`` or by the first sandbox that finds none; the flock on
``<template_dir>/.pool.lock``, held for its whole life, keeps it single). With
factory.fork_server it also keeps the fork server of the CLI sandboxes' proxies
(hull.runtime.forkserver), and then runs even when pool_size is 0: without clones,
from `hull factory init` to `hull factory destroy`, for the fork server alone.

The daemon is the parent of every pooled QEMU (which dies with it: PR_SET_PDEATHSIG, as any QemuVM)
and stays so after a hand-over: a sandbox *leases* a clone over ``pool.sock``. It gets
the clone's agent socket (SCM_RIGHTS: the daemon keeps no copy, the channel is the
lessee's alone) and the clone's share directory, and keeps the connection open: the
lease. Over it the lessee asks for the few QMP commands a sandbox needs (stop, cont,
quit, query-status) and hears of QEMU's exit. When the lease ends, because the sandbox
stopped or because its process died (even by SIGKILL: the kernel closes the socket),
the daemon kills that QEMU and removes its directory. Nothing can leak that way: a clone
is either idle (the daemon's) or leased (dies with its lease).

Shares. A clone's 9p device exports ``<slot>/hullshared``, fixed on its command line
before anyone asks for it. The daemon makes that directory a mount point with shared
propagation; the lessee binds it onto its own (empty) share directory, so every bind it
makes there later (a pod's container rootfs, staged bind mounts) propagates into the
directory QEMU exports. So the pool serves sandboxes whose only share is the pod
layout's (shim v2 pods) and of the default size: the others restore a clone of their own.

Network. Every NIC of a clone needs a vnet-header tap (factory: the template negotiated
offloads), and a running NIC cannot be given another backend. So each pooled clone is
restored on taps of its own, made by the daemon in a network namespace of their own
(hull.network.host.PrivateTaps). A lessee with a network sends its namespace with the
take request (an fd, SCM_RIGHTS); the daemon moves the clone's taps there (renamed
``hullp<random>``) and answers with their names, and the lessee redirects its veths to
them (tc filters, as to taps of its own). The taps go when QEMU and the daemon's copy of
their fds are gone: when the lease ends.

Stopping. ``hull factory destroy`` asks the daemon to stop: it stops refilling, kills
its idle clones and exits as soon as no lease is left (running sandboxes are not
disturbed, as with the templates themselves).

Protocol: JSON lines. Take: ``{"take": key_id, "name": sandbox, "netns": bool}`` with the
namespace's fd attached when true -> ``{"slot": path, "pid": n, "taps": [names]}`` with
the agent socket attached, or ``{"error": why}``. Then, on the lease:
``{"id": n, "qmp": command}`` -> ``{"id": n, "return": {...}}`` or ``{"id": n, "error":
why}``; ``{"event": "exit", "status": n, "reason": why}`` when QEMU ends. Other
requests: ``{"status": true}`` -> counts; ``{"stop": true}``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from hull.config.settings import Config
from hull.errors import HullError, HypervisorError
from hull.hypervisor.base import Capability, Hypervisor, Share, VMConfig
from hull.hypervisor.qemu.machine import QemuVM, tail_lines
from hull.network.host import PrivateTaps
from hull.runtime import factory, sharedfs, warmup

log = logging.getLogger("hull.pool")
SOCKET = "pool.sock"
LOCK = ".pool.lock"
SLOTS = ".pool"
#: QMP commands a lessee may send.
LEASE_COMMANDS = frozenset({"stop", "cont", "quit", "query-status"})
#: Seconds between checks of the template (a rebuild, a new key) and refills.
CHECK_EVERY = 2.0
#: Seconds without a take before refilling: a burst of sandboxes (ten pods at once) does
#: not share the CPU with the restores of their replacements.
REFILL_QUIET = 1.0
#: The longest request line, and how long a client may take to send it.
MAX_LINE = 4096
REQUEST_TIMEOUT = 5.0
MS_SHARED = 1 << 20


class PoolError(HullError):
    """The pool cannot serve a request."""


def socket_path(config: Config) -> Path:
    return factory.root(config) / SOCKET


def pooled_vm(config: Config, name: str, share: Path, console_log: Path) -> VMConfig:
    """The VM of a pooled clone: the default size, one pod-layout share, no NICs."""
    from hull.runtime.sandbox import Sandbox

    return Sandbox(config, name, console_log,
                   (Share(sharedfs.SHARE_TAG, share),)).vm_config()


def fits(vm: VMConfig) -> bool:
    """Whether a pooled clone can serve ``vm`` (before its network is attached): only
    the pod layout's share."""
    return [s.tag for s in vm.shares] == [sharedfs.SHARE_TAG]


def recv_line(sock: socket.socket, max_fds: int) -> tuple[bytes, list[int]]:
    """One line from the blocking ``sock`` and the fds that came with it (SCM_RIGHTS).
    Byte by byte: nothing after the line is consumed (it belongs to whoever reads the
    socket next, asyncio). ValueError for an overlong line or more than ``max_fds`` fds
    (the kernel closed the extra ones: the request is refused, never half-served)."""
    fds = array.array("i")
    data = b""
    try:
        while not data.endswith(b"\n"):
            if len(data) > MAX_LINE:
                raise ValueError(f"request line longer than {MAX_LINE} bytes")
            chunk, ancdata, flags, _ = sock.recvmsg(
                1, socket.CMSG_SPACE(max(max_fds, 1) * fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
                raise ValueError(f"more than {max_fds} file descriptors sent")
            if not chunk:
                break
            data += chunk
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data, list(fds)


# ---------------------------------------------------------------------------- daemon


@dataclasses.dataclass
class Slot:
    id: str
    path: Path
    key: str
    vm: QemuVM
    #: the clone's NICs' taps (moved into the lessee's namespace at lease time)
    taps: PrivateTaps
    leased: bool = False

    @property
    def share(self) -> Path:
        return self.path / sharedfs.SHARE_TAG


class Daemon:
    def __init__(self, config: Config, forkserver: int | None = None) -> None:
        self.config = config
        #: pid of the fork server this daemon started (hull.runtime.forkserver), its child
        self.forkserver = forkserver
        self.idle: list[Slot] = []
        self.leased: set[str] = set()
        self.stopping = asyncio.Event()
        self.clients: set[asyncio.Task[None]] = set()
        self.last_error = ""
        self.last_take = 0.0  # time.monotonic() of the last lease
        self.base = factory.root(config) / SLOTS

    async def run(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.base.iterdir():  # a daemon before us was killed
            _remove_slot(stale)
        path = socket_path(self.config)
        path.unlink(missing_ok=True)
        # A listening socket of its own, not asyncio's server: a take request carries
        # the lessee's taps, and asyncio's streams would drop them (no recvmsg).
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
            listener.bind(str(path))
            listener.listen(64)
            listener.setblocking(False)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
            filler = asyncio.create_task(self._fill())
            accepter = asyncio.create_task(self._accept(listener))
            try:
                await self.stopping.wait()
            finally:
                for task in (accepter, filler):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                path.unlink(missing_ok=True)
        for slot in self.idle:
            await self._discard(slot)
        self.idle.clear()
        while self.leased:  # the lessees' sandboxes run on: wait for them
            await asyncio.sleep(0.2)
        with contextlib.suppress(OSError):
            self.base.rmdir()

    async def _fill(self) -> None:
        while True:
            if self.config.factory.pool_size:  # else the daemon is the fork server's only
                await self._refill()
            self._reap_forkserver()
            # Soon again when only the quiet time held a refill back (never after a failure).
            waiting = len(self.idle) < self.config.factory.pool_size and not self.last_error
            await asyncio.sleep(REFILL_QUIET / 2 if waiting else CHECK_EVERY)

    async def _refill(self) -> None:
        """Drop clones of a template that is no longer current; restore up to pool_size
        (once no take came for REFILL_QUIET)."""
        try:
            key = factory.key_id(factory.current_key(self.config))
            for slot in [s for s in self.idle if s.key != key]:
                self.idle.remove(slot)  # made from a template that is not current
                await self._discard(slot)
            while (len(self.idle) < self.config.factory.pool_size
                   and time.monotonic() - self.last_take >= REFILL_QUIET):
                self.idle.append(await self._restore(key))
            self.last_error = ""
        except (HullError, factory.Unusable, OSError) as exc:
            if str(exc) != self.last_error:
                log.warning("pool: cannot restore a clone: %s", exc)
            self.last_error = str(exc)

    def _reap_forkserver(self) -> None:
        """Reap the fork server if it died (killed: no proxy is forked any more, `hull
        create` starts them itself); it is this daemon's child, asyncio does not wait
        for it."""
        if self.forkserver is None:
            return
        try:
            pid, status = os.waitpid(self.forkserver, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.forkserver, -1
        if pid:
            log.warning("pool: the fork server (pid %d) ended (status %d): CLI sandboxes "
                        "start their proxies themselves", self.forkserver, status)
            self.forkserver = None

    async def _restore(self, key: str) -> Slot:
        slot_id = secrets.token_hex(4)
        path = self.base / slot_id
        share = path / sharedfs.SHARE_TAG
        share.mkdir(parents=True, mode=0o755)
        try:
            sharedfs.mount(str(share), share, None, sharedfs.MS_BIND)
            sharedfs.mount("none", share, None, MS_SHARED)
            vm = pooled_vm(self.config, f"pool-{slot_id}", share, path / "console.log")
            template = factory.find(self.config, vm)
            if factory.key_id(template.manifest["key"]) != key:
                raise factory.Unusable(f"template {template.path} is not the current one")
            fd = os.open(template.state, os.O_RDONLY | os.O_CLOEXEC)
            taps = PrivateTaps(factory.TEMPLATE_NICS)
            try:
                qemu = QemuVM(self.config.hypervisor.path, factory.clone_config(
                    vm, template, fd, taps.__enter__().fds))
                try:
                    await qemu.start()
                    await qemu.wait_restored(self.config.factory.restore_timeout)
                    warm = await warmup.warm_up(
                        await qemu.connect_agent(self.config.hypervisor.boot_timeout),
                        share, slot_id, self.config.factory.restore_timeout)
                except BaseException:
                    await qemu.stop(timeout=1.0)
                    raise
            except BaseException:
                taps.close()
                raise
            finally:
                os.close(fd)
        except BaseException:
            _remove_slot(path)
            raise
        log.debug("pool: clone %s ready (pid %s), warmed up in %.3fs", slot_id, qemu.pid,
                  warm)
        return Slot(slot_id, path, key, qemu, taps)

    async def _discard(self, slot: Slot) -> None:
        await slot.vm.stop(timeout=1.0)
        slot.taps.close()
        _remove_slot(slot.path)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._client(conn))
            self.clients.add(task)  # a reference, until it is done (leases outlive run())
            task.add_done_callback(self.clients.discard)

    async def _client(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            line, fds = await asyncio.to_thread(recv_line, conn, 1)
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except (OSError, ValueError) as exc:
            log.warning("pool: bad request: %s", exc)
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        try:
            request = json.loads(line or b"{}")
            if "take" in request:
                await self._lease(request, fds, reader, writer)
            elif request.get("stop"):
                self.stopping.set()
                await _send(writer, {"stopping": True, "leased": len(self.leased)})
            else:
                await _send(writer, {"pid": os.getpid(), "idle": len(self.idle),
                                     "leased": len(self.leased),
                                     "size": self.config.factory.pool_size,
                                     "error": self.last_error})
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("pool: bad request: %s", exc)
        finally:
            for fd in fds:
                os.close(fd)
            writer.close()

    async def _lease(self, request: dict[str, Any], fds: list[int],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slot = next((s for s in self.idle if s.key == request["take"]), None)
        if slot is None or self.stopping.is_set():
            why = self.last_error or "no pooled clone is ready"
            await _send(writer, {"error": why if slot is None else "the pool is stopping"})
            return
        if len(fds) != (1 if request.get("netns") else 0):
            await _send(writer, {"error": f"{request.get('name')}: {len(fds)} fds came "
                                          f"with a request for netns={request.get('netns')}"})
            return
        self.idle.remove(slot)
        self.leased.add(slot.id)
        self.last_take = time.monotonic()
        log.debug("pool: clone %s leased to %s", slot.id, request.get("name"))
        try:
            names: list[str] = []
            if fds:
                try:
                    names = await asyncio.to_thread(slot.taps.move, fds[0])
                except HullError as exc:  # discarded, never handed out
                    await _send(writer, {"error": str(exc)})
                    return
            agent = await slot.vm.connect_agent(1.0)
            data = json.dumps({"slot": str(slot.path), "pid": slot.vm.pid,
                               "taps": names}).encode() + b"\n"
            # A few bytes on an idle socket: sendmsg does not block. Through a dup, as the
            # transport's own socket object does not do sendmsg.
            with socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno())) as raw:
                socket.send_fds(raw, [data], [agent.fileno()])
            agent.close()  # the lessee's alone now
            await self._serve_lease(slot, reader, writer)
        finally:
            await self._discard(slot)
            self.leased.discard(slot.id)
            log.debug("pool: lease of clone %s ended", slot.id)

    async def _serve_lease(self, slot: Slot, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        exited = asyncio.ensure_future(slot.vm.wait())
        try:
            while True:
                line = asyncio.ensure_future(reader.readline())
                done, _ = await asyncio.wait({line, exited},
                                             return_when=asyncio.FIRST_COMPLETED)
                if exited in done:
                    line.cancel()
                    await _send(writer, {"event": "exit", "status": exited.result(),
                                         "reason": slot.vm.exit_reason()})
                    return
                if not line.result():
                    return  # the lessee is done, or dead
                msg = json.loads(line.result())
                command = msg.get("qmp")
                if command not in LEASE_COMMANDS:
                    await _send(writer, {"id": msg.get("id"), "error": f"{command!r} is "
                                         "not a lease command"})
                    continue
                try:
                    reply = await slot.vm.query(command)
                except HypervisorError as exc:
                    await _send(writer, {"id": msg.get("id"), "error": str(exc)})
                else:
                    await _send(writer, {"id": msg.get("id"), "return": reply})
        except (OSError, ValueError):
            return
        finally:
            exited.cancel()


async def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(json.dumps(msg).encode() + b"\n")
    await writer.drain()


def _remove_slot(path: Path) -> None:
    """Unmount whatever is left in a slot (a lessee that died), then remove it."""
    share = path / sharedfs.SHARE_TAG
    sharedfs.unmount_under(share)
    if sharedfs.mounts_under(path):
        log.error("pool: %s still has mounts: left in place", path)
        return
    shutil.rmtree(path, ignore_errors=True)


def serve(config: Config, lock_fd: int, forkserver: int | None = None) -> int:
    """The daemon's main (``hull factory pool``); ``lock_fd`` holds .pool.lock;
    ``forkserver``: the pid of the fork server it started."""
    try:
        asyncio.run(Daemon(config, forkserver).run())
    finally:
        os.close(lock_fd)
    return 0


# ---------------------------------------------------------------------------- clients


def wanted(config: Config) -> bool:
    """Whether the factory keeps a daemon: for a pool, or for its fork server alone."""
    return config.factory.enabled and bool(config.factory.pool_size
                                           or config.factory.fork_server)


def ensure(config: Config) -> str:
    """Start the pool daemon unless it runs (or the pool is off); what happened."""
    if not wanted(config):
        return "no pool (factory.pool_size is 0, factory.fork_server is off)"
    from hull.runtime.rebuild import start_detached

    if not start_detached(config, factory.root(config) / LOCK, "pool"):
        return "the pool daemon runs"
    return "pool daemon started"


def _ask(config: Config, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path(config)))
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("rb").readline() or b"{}")
    return answer


def status(config: Config) -> dict[str, Any] | None:
    """The daemon's counts (pid, idle, leased, size, error); None when none runs."""
    try:
        return _ask(config, {"status": True})
    except (OSError, ValueError):
        return None


def stop(config: Config, timeout: float = 10.0) -> str:
    """Ask the daemon to stop; wait (``timeout``) until it is gone; what happened."""
    try:
        answer = _ask(config, {"stop": True})
    except (OSError, ValueError):
        return "no pool daemon"
    fd = os.open(factory.root(config) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return "pool daemon stopped"
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return (f"pool daemon stopping: it waits for {answer.get('leased')} "
                            "leased clone(s) to end")
                time.sleep(0.05)
    finally:
        os.close(fd)


async def take(config: Config, vm: VMConfig, name: str, netns: str | None = None
               ) -> PooledVM:
    """Lease a pooled clone for ``vm`` (which must fit()), its taps moved into the
    network namespace ``netns`` (a path; None: no network); PoolError says why not."""
    key = factory.key_id(factory.template_key(vm, factory.vm_binary(config)))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # The answer carries the fd: read it with recvmsg before asyncio owns the socket.
        data, fds = await asyncio.to_thread(_take, sock, config, key, name, netns)
        answer = json.loads(data or b"{}")
        if "error" in answer or not fds:
            for fd in fds:
                os.close(fd)
            raise PoolError(answer.get("error") or "the pool daemon went away")
        reader, writer = await asyncio.open_unix_connection(sock=sock)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise PoolError(f"no pool daemon ({exc.strerror}): {ensure(config)}") from None
    except (OSError, ValueError) as exc:  # a timeout, a garbled answer
        sock.close()
        raise PoolError(f"pool daemon {socket_path(config)}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    agent = socket.socket(fileno=fds[0])
    return PooledVM(name, reader, writer, agent, Path(answer["slot"]), int(answer["pid"]),
                    [str(t) for t in answer.get("taps") or []])


def _take(sock: socket.socket, config: Config, key: str, name: str, netns: str | None
          ) -> tuple[bytes, list[int]]:
    """Ask for a clone, sending the namespace ``netns``; the answer line and the fd
    attached to it."""
    sock.settimeout(REQUEST_TIMEOUT)
    sock.connect(str(socket_path(config)))
    request = json.dumps({"take": key, "name": name, "netns": netns is not None}
                         ).encode() + b"\n"
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns is not None else -1
    try:
        socket.send_fds(sock, [request], [fd] if fd >= 0 else [])  # a short line: whole
    finally:
        if fd >= 0:
            os.close(fd)
    data, fds = recv_line(sock, 1)
    sock.settimeout(None)
    return data, fds


class PooledVM(Hypervisor):
    """A leased pooled clone, as the sandbox sees its VM. The pool daemon stays QEMU's
    parent: QMP goes through the lease, and ending the lease ends QEMU."""

    capabilities = Capability.PAUSE | Capability.FS_SHARE

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 agent: socket.socket, slot: Path, pid: int, taps: list[str]) -> None:
        self.name, self.slot, self._pid = name, slot, pid
        #: the names of the clone's taps, moved into the lessee's network namespace
        self.taps = taps
        self._reader, self._writer, self._agent = reader, writer, agent
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self.returncode: int | None = None
        self._reason = ""
        self._ended = asyncio.Event()
        self._bound: Path | None = None
        self._listener = asyncio.create_task(self._listen())

    @property
    def share(self) -> Path:
        return self.slot / sharedfs.SHARE_TAG

    def bind_share(self, target: Path) -> None:
        """Make the clone's exported directory appear at ``target`` (empty), so that the
        binds the sandbox makes there reach the guest (shared propagation)."""
        sharedfs.mount(str(self.share), target, None, sharedfs.MS_BIND)
        self._bound = target

    async def _listen(self) -> None:
        try:
            while line := await self._reader.readline():
                msg = json.loads(line)
                if msg.get("event") == "exit":
                    self.returncode, self._reason = msg.get("status", -1), msg.get("reason")
                    break
                fut = self._replies.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError):
            pass
        if self.returncode is None:
            self.returncode, self._reason = -1, "the pool daemon went away"
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(HypervisorError(f"vm {self.name}: {self._reason}"))
        self._ended.set()

    async def query(self, command: str) -> dict[str, Any]:
        if self._ended.is_set():
            raise HypervisorError(f"vm {self.name} is not running")
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._replies[self._next] = fut
        await _send(self._writer, {"id": self._next, "qmp": command})
        reply = await fut
        if "error" in reply:
            raise HypervisorError(f"qmp {command} on vm {self.name} failed: {reply['error']}")
        result = reply.get("return")
        return result if isinstance(result, dict) else {}

    async def start(self) -> None:
        """Nothing: the pool daemon started and restored it."""

    async def stop(self, timeout: float = 2.0) -> None:
        if self._bound is not None:
            with contextlib.suppress(sharedfs.MountError):  # the lease's end cleans up
                sharedfs.unmount(self._bound, every_layer=False)
            self._bound = None
        if not self._ended.is_set():
            with contextlib.suppress(HypervisorError, OSError):
                await asyncio.wait_for(self.query("quit"), timeout)
        self._writer.close()  # the lease ends: the daemon kills what is left
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        self._listener.cancel()
        self._agent.close()

    def kill(self) -> None:
        self._writer.close()

    async def pause(self) -> None:
        await self.query("stop")

    async def resume(self) -> None:
        await self.query("cont")

    async def connect_agent(self, timeout: float) -> socket.socket:
        return self._agent

    @property
    def pid(self) -> int | None:
        return self._pid

    async def wait(self) -> int:
        await self._ended.wait()
        return self.returncode if self.returncode is not None else -1

    def exit_reason(self) -> str:
        return self._reason or f"qemu exited with status {self.returncode}"

    def console_tail(self, lines: int = 6) -> str:
        return tail_lines(self.slot / "console.log", lines)
