"""The CLI-mode shim: one relay process per container process (`hull shim`).

Its pid is the "container pid" clients see (pid file, `state`): conmon and containerd's
runc shim reap it as the container's process. It connects to the sandbox's proxy, asks
for its process (the container's init on create, or an exec), relays the stdio it
inherited from the caller — or a host pty sent over the console socket —, forwards every
signal it receives to the process in the guest, and exits with the process's status
(128+N for death by signal N). It lives exactly as long as that process: if the shim is
killed, the proxy kills the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.channel import AgentChannel
from hull.runtime import console, hooks
from hull.runtime.proxyd import connect, report
from hull.runtime.state import ContainerDir
from hull.runtime.stdio import HostStdio, ProcessIO

log = logging.getLogger("hull.shim")
#: How long create_container / exec_process may take in the guest (without hooks).
CREATE_TIMEOUT = 120.0
#: Exit status when the VM or the proxy died under the process (like a SIGKILL).
LOST = 128 + signal.SIGKILL
#: Signals a shim does not forward: it needs them itself, or they cannot be caught.
NOT_FORWARDED = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH}


@dataclass
class ShimRequest:
    """What one shim serves: the init (exec_id "") with its spec, or an exec process."""

    cdir: ContainerDir
    exec_id: str
    #: create: {"spec", "rootfs", "state" (the OCI state for hooks)}; exec: {"process"}
    payload: dict[str, Any]
    console_socket: str | None = None
    terminal: bool = False


async def serve(req: ShimRequest, ready: int | None) -> int:
    """Run the shim; ``ready`` is a pipe fd that gets "ok" or the error line."""
    if not req.exec_id and req.payload["spec"].get("hooks"):
        try:  # before create_container: createRuntime precedes the guest's createContainer
            await asyncio.to_thread(hooks.run_before_create, req.payload["spec"],
                                    req.payload["state"])
        except HullError as exc:
            if ready is not None:
                report(ready, str(exc))
            return 1
    host = HostStdio(terminal=req.terminal)
    if req.console_socket:
        master, slave, name = console.open_pty()
        console.make_controlling(slave)
        console.send_master(req.console_socket, master, name)
        os.close(master)
        host = HostStdio(stdin=slave, stdout=slave, stderr=None, terminal=True)
    sock = connect(req.cdir)
    exited: asyncio.Future[schema.ProcessExit] = asyncio.get_running_loop().create_future()

    def on_event(message: dict[str, Any]) -> None:
        event = schema.ProcessExit.from_json(message)
        if (event.container_id, event.exec_id) == (req.cdir.id, req.exec_id) and not (
                exited.done()):
            exited.set_result(event)

    channel = AgentChannel(sock, f"container {req.cdir.id}", on_event=on_event)
    await channel.open()
    try:
        await channel.request(schema.Method.HELLO, schema.params(schema.Hello()), timeout=30)
        io = ProcessIO.open(channel, host)
        payload = dict(req.payload)
        if req.terminal and host.stdout is not None and (size := console.window_size(
                host.stdout)):
            _set_console_size(payload, req.exec_id, size)
        timeout = CREATE_TIMEOUT
        if req.exec_id:
            method = schema.Method.EXEC_PROCESS
            body = schema.params(schema.ExecProcess(req.cdir.id, req.exec_id,
                                                    payload["process"], io.streams))
        else:
            method = schema.Method.CREATE_CONTAINER
            guest = hooks.guest_hooks(payload["spec"], payload["state"])
            timeout += hooks.guest_wait(guest.create_container)
            body = schema.params(schema.CreateContainer(
                req.cdir.id, payload["spec"], schema.RootfsShare.from_json(payload["rootfs"]),
                io.streams, guest))
        await channel.request(method, body, timeout=timeout)
    except HullError as exc:
        if ready is not None:
            report(ready, str(exc))
        await channel.close()
        return 1
    if ready is not None and not report(ready, "ok"):
        await channel.close()  # `hull create` died waiting: the proxy kills the process
        return LOST
    io.start_input()
    try:
        return await _relay(req, channel, io, exited)
    finally:
        await channel.close()


async def _relay(req: ShimRequest, channel: AgentChannel, io: ProcessIO,
                 exited: asyncio.Future[schema.ProcessExit]) -> int:
    loop = asyncio.get_running_loop()
    cid, exec_id = req.cdir.id, req.exec_id

    tasks: set[asyncio.Task[None]] = set()

    def background(coro: Any) -> None:
        task = loop.create_task(_quiet(coro))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def forward(signum: int) -> None:
        background(channel.request(schema.Method.SIGNAL_PROCESS,
                                   schema.params(schema.SignalProcess(cid, exec_id, signum))))

    def resize() -> None:
        size = console.window_size(io.host.stdout) if io.host.stdout is not None else None
        if size:
            background(channel.request(
                schema.Method.RESIZE_PTY,
                schema.params(schema.ResizePty(cid, exec_id, size[0], size[1]))))

    for sig in signal.valid_signals():
        if sig in NOT_FORWARDED or not isinstance(sig, signal.Signals):
            continue
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            loop.add_signal_handler(sig, forward, int(sig))
    if io.host.terminal:
        loop.add_signal_handler(signal.SIGWINCH, resize)
        # A caller may size the console between create and now (containerd's shim does,
        # right after create): that SIGWINCH came before the handler, so look once.
        resize()
    lost = asyncio.ensure_future(channel.closed.wait())
    waiting: list[asyncio.Future[Any]] = [exited, lost]
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
    if not exited.done():
        log.error("container %s: lost its process: %s", cid, channel.failure)
        return LOST
    await io.drain()
    return exited.result().status


def _set_console_size(payload: dict[str, Any], exec_id: str, size: tuple[int, int]) -> None:
    process = payload["process"] if exec_id else payload["spec"]["process"]
    process = {**process, "consoleSize": {"height": size[0], "width": size[1]}}
    if exec_id:
        payload["process"] = process
    else:
        payload["spec"] = {**payload["spec"], "process": process}


async def _quiet(coro: Any) -> None:
    with contextlib.suppress(HullError, OSError):
        await coro


def cdir_for(root: Path, container_id: str) -> ContainerDir:
    return ContainerDir(root, container_id)
