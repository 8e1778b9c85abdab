"""`hull debug`: a command in the guest VM itself, outside the container.

A client of the sandbox's proxy like a shim, asking for ``debug_exec`` (which the proxy
forwards only with hypervisor.debug_console = true) and relaying the caller's stdio over
the process's own streams of the channel.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.channel import AgentChannel
from hull.runtime.proxysock import connect
from hull.runtime.shim import HostStdio
from hull.runtime.state import ContainerDir
from hull.runtime.stdio import ProcessIO

#: Without a command: busybox's shell (an image built with --with-busybox).
DEFAULT_SHELL = ["sh", "-i"]


async def debug_exec(cdir: ContainerDir, argv: list[str], host: HostStdio | None = None
                     ) -> int:
    exec_id = f"debug-{os.getpid()}-{os.urandom(3).hex()}"
    exited: asyncio.Future[schema.ProcessExit] = asyncio.get_running_loop().create_future()

    def on_event(message: dict[str, Any]) -> None:
        event = schema.ProcessExit.from_json(message)
        if (event.container_id, event.exec_id) == (schema.GUEST, exec_id) and not (
                exited.done()):
            exited.set_result(event)

    channel = AgentChannel(connect(cdir), f"container {cdir.id}", on_event=on_event)
    await channel.open()
    try:
        await channel.request(schema.Method.HELLO, schema.params(schema.Hello()), timeout=10)
        io = ProcessIO.open(channel, host or HostStdio())
        await channel.request(schema.Method.DEBUG_EXEC, schema.params(schema.DebugExec(
            exec_id, argv or DEFAULT_SHELL, [], io.streams)), timeout=30)
        io.start_input()
        lost = asyncio.ensure_future(channel.closed.wait())
        try:
            waiting: list[asyncio.Future[Any]] = [exited, lost]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not exited.done():
            raise HullError(f"container {cdir.id}: debug process lost: {channel.failure}")
        await io.drain()
        return exited.result().status
    finally:
        await channel.close()
