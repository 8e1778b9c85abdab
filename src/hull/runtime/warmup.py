"""Warming a pooled clone up before anyone leases it (hull.runtime.pool).

A clone restores the template's memory, not QEMU's: under TCG every guest instruction
is translated again the first time each new QEMU runs it. The first container a clone
serves pays for translating the agent's create path, the kernel's fork, namespace,
mount, 9p, exec and exit paths: measured here, its create, start and exit took 0.3-0.7 s
(cold translations) against ~0.2 s for the second container in the same VM. A pooled
clone has that time to spare while it waits: the pool daemon runs one throw-away
container through create, start, exit and delete, so the sandbox that leases the clone
finds the translations made.

The throw-away container is the default spec (`hull spec`) in an empty rootfs under the
clone's share, whose process is an empty executable file: execve fails (ENOEXEC, exit
126) after the whole setup has run. It gets no stdio streams, so the agent channel is
left as it was found (no stream ids in use, no credit owed) for the lessee, who still
says hello first: the entropy and the clock of every clone are the lessee's, given
before its own containers run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from hull.agentapi import schema
from hull.errors import HullError
from hull.oci.default_spec import example
from hull.proxy.channel import AgentChannel
from hull.runtime.sharedfs import SHARE_TAG

#: The warm-up container's id and its directory in the clone's share.
NAME = "hull-warmup"
#: Its process: an empty file, executable, that execve refuses.
PROGRAM = "/warmup"


def _rootfs(share: Path) -> Path:
    rootfs = share / NAME / "rootfs"
    rootfs.mkdir(parents=True, mode=0o755)
    program = rootfs / PROGRAM.lstrip("/")
    program.touch(mode=0o755)
    return rootfs


async def warm_up(agent: socket.socket, share: Path, name: str, timeout: float) -> float:
    """Run the throw-away container in the clone whose agent is behind ``agent`` and
    whose 9p share is ``share``; the seconds it took. ``agent`` stays open and unread
    beyond the replies (the channel works on a duplicate). HullError says what failed:
    the clone is then not handed out."""
    started = time.monotonic()
    rootfs = _rootfs(share)
    exited = asyncio.get_running_loop().create_future()

    def on_event(message: dict[str, Any]) -> None:
        event = schema.ProcessExit.from_json(message)
        if event.container_id == NAME and not exited.done():
            exited.set_result(event)

    channel = AgentChannel(socket.socket(fileno=os.dup(agent.fileno())),
                           f"pooled clone {name}", on_event=on_event)
    await channel.open()
    try:
        async with asyncio.timeout(timeout):
            await channel.request(schema.Method.HELLO, schema.params(schema.Hello(
                entropy=os.urandom(32).hex(), time_ns=time.time_ns())))
            spec = example()
            spec["process"].update(args=[PROGRAM], terminal=False)
            await channel.request(schema.Method.CREATE_CONTAINER, schema.params(
                schema.CreateContainer(NAME, spec, schema.RootfsShare(
                    SHARE_TAG, False, f"{NAME}/rootfs"), schema.Stdio(),
                    schema.GuestHooks())))
            # execve refuses the empty file, as it should: an error, then the exit
            with contextlib.suppress(HullError):
                await channel.request(schema.Method.START_CONTAINER,
                                      schema.params(schema.ContainerRef(NAME)))
            await exited
            await channel.request(schema.Method.DELETE_CONTAINER,
                                  schema.params(schema.ContainerRef(NAME)))
    except TimeoutError:
        raise WarmUpError(f"pooled clone {name}: the warm-up took over {timeout:g}s"
                          ) from None
    finally:
        await channel.close()
        shutil.rmtree(rootfs.parent, ignore_errors=True)
    return time.monotonic() - started


class WarmUpError(HullError):
    """A pooled clone failed its warm-up: it is discarded, not handed out."""
