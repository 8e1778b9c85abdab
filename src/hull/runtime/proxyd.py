"""The per-sandbox proxy daemon of CLI mode (`hull proxy`, started by `hull create`).

It boots the sandbox VM, owns QEMU (which dies with it) and the one agent channel, and
serves clients — shims and CLI commands — on ``<state dir>/proxy.sock`` through the
Router. It outlives the `hull create` that started it and exits when the sandbox is shut
down (a client's ``shutdown`` request) or when the VM dies.

Readiness goes back to `hull create` on an inherited pipe: ``ok`` or the error line.
Exits of container processes are recorded in ``<state dir>/exits/<exec id or init>.json``
(written atomically, no lock: a CLI command holding the container lock may be waiting
on this very daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hull.agentapi import schema
from hull.config.settings import Config
from hull.errors import HullError
from hull.runtime.proxysock import SOCKET_NAME, report, short_path
from hull.runtime.state import ContainerDir

if TYPE_CHECKING:  # the VM side's modules: imported in serve()
    from hull.hypervisor.base import Share
    from hull.network import host as netns

log = logging.getLogger("hull.proxyd")


def record_exit(cdir: ContainerDir, event: schema.ProcessExit) -> None:
    if event.container_id == schema.GUEST:
        return  # a `hull debug` process: its client got the exit
    exits = cdir.path / "exits"
    exits.mkdir(exist_ok=True)
    name = event.exec_id or "init"
    tmp = exits / f".{name}.tmp"
    tmp.write_text(json.dumps({"status": event.status, "signal": event.signal,
                               "oom_killed": event.oom_killed, "time": time.time()}))
    tmp.replace(exits / f"{name}.json")


async def serve(config: Config, root: Path, cdir: ContainerDir,
                shares: tuple[Share, ...], ready_fd: int,
                network: netns.Choice | None = None,
                after_boot: Callable[[], None] | None = None) -> int:
    """Boot the sandbox, serve its clients until it stops; the exit status.
    ``after_boot`` runs once the sandbox has its VM, before the handshake (the pod
    layout's binds, hull.runtime.layout)."""
    # Imported here: CLI commands import this module for connect(), and need neither.
    from hull.network import host as netns
    from hull.proxy.router import Router
    from hull.runtime import sandboxinfo
    from hull.runtime.sandbox import Sandbox

    sandbox = Sandbox(config, cdir.id, cdir.console_log, shares, state_root=root,
                      network=network, network_record=cdir.path / netns.RECORD_NAME)
    stop = asyncio.Event()

    def violation(why: str) -> None:
        log.error("sandbox %s: %s; killing the vm", cdir.id, why)
        if sandbox.vm is not None:
            sandbox.vm.kill()

    async def proxy_request(method: schema.Method) -> dict[str, Any]:
        assert sandbox.vm is not None
        if method is schema.Method.PAUSE_SANDBOX:
            await sandbox.vm.pause()
        elif method is schema.Method.RESUME_SANDBOX:
            await sandbox.vm.resume()
        elif method is schema.Method.STOP_SANDBOX:
            stop.set()
        return {}

    router = Router(f"sandbox {cdir.id}", violation,
                    on_exit=lambda event: record_exit(cdir, event),
                    on_proxy_request=proxy_request)
    router.allow_debug = config.hypervisor.debug_console
    server: asyncio.base_events.Server | None = None
    try:
        await sandbox.boot()
        if after_boot is not None:
            after_boot()
        await router.attach(await sandbox.agent_connection())
        router.hello_reply = schema.params(await sandbox.handshake(router.call))
        sandboxinfo.record(cdir.path, sandbox)  # for `hull monitor`

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await router.serve_client(reader, writer, "client")

        sock_path = cdir.path / SOCKET_NAME
        sock_path.unlink(missing_ok=True)
        with short_path(sock_path) as name:
            server = await asyncio.start_unix_server(client, name)
        os.chmod(sock_path, 0o600)
        if not report(ready_fd, "ok"):
            return 1  # `hull create` died waiting for us: nobody will ever use this VM
        ready_fd = -1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        vm_dead = asyncio.ensure_future(sandbox.vm.wait()) if sandbox.vm else None
        stopping = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(router.closed.wait())
        orphaned = asyncio.ensure_future(_watch_dir(cdir))
        waiting = [f for f in (vm_dead, stopping, failed, orphaned) if f is not None]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for f in waiting:
            f.cancel()
        return 0
    except HullError as exc:
        if ready_fd >= 0:
            report(ready_fd, str(exc))
        log.error("%s", exc)
        return 1
    finally:
        if server is not None:
            server.close()
        if not router.failure:
            with contextlib.suppress(HullError, OSError):
                await router.call(schema.Method.SHUTDOWN, {}, timeout=1.0)
        await router.close()
        if sandbox.vm is not None:
            await sandbox.vm.stop(timeout=1.0)
        sandbox.release_network()
        (cdir.path / SOCKET_NAME).unlink(missing_ok=True)


async def _watch_dir(cdir: ContainerDir, every: float = 1.0) -> None:
    """Return once the container's state is gone: a `delete --force` after the command
    that created us died before it could record our pid. Nothing else would stop us."""
    while (cdir.path / "state.json").exists():
        await asyncio.sleep(every)
