"""What a running sandbox publishes about itself, so that `hull monitor` finds and asks it.

Whoever owns the VM publishes, in the sandbox's state directory: CLI mode's proxy daemon
in ``<root>/<id>/``, a containerd shim v2 pod in ``<shim root>/<namespace>/<sandbox id>/``
(the monitor discovers pods there without containerd's help).

``sandbox.json`` (written atomically once the agent answered, again when ``status``
changes):

- ``proxy_pid``, ``proxy_start``: the process that owns the VM and the agent channel (the
  proxy daemon; in shim v2 mode the shim itself). Once it is gone, the entry is stale;
- ``vm_pid``, ``boot_seconds`` (QEMU start to the agent's answer), ``restored`` (the VM
  is a clone of a factory template: ``boot_seconds`` is its restore time), ``booted_at``;
- shim v2 pods also ``status`` (``running``, or ``paused`` while the whole VM is stopped;
  CLI mode keeps its status in state.json).

The agent is asked through a socket that speaks the agent protocol: CLI mode's proxy
daemon serves ``proxy.sock`` (hull.proxy.router); a shim v2 pod, whose agent channel lives
inside the shim, serves ``status.sock`` with :class:`StatusServer`. The monitor's probe is
then one code path for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.errors import HullError
from hull.runtime.proxysock import short_path
from hull.runtime.state import start_time

if TYPE_CHECKING:
    from hull.runtime.sandbox import Sandbox

log = logging.getLogger("hull.sandboxinfo")
FILE = "sandbox.json"
STATUS_SOCKET = "status.sock"
#: What :class:`StatusServer` forwards to the agent; ``hello`` it answers itself.
READ_ONLY = frozenset({schema.Method.SANDBOX_STATS, schema.Method.STATS_CONTAINER})
#: A status request waits at most this long for the agent.
ASK_TIMEOUT = 5.0
READ_SIZE = 64 * 1024
Ask = Callable[[schema.Method, dict[str, Any], float], Awaitable[dict[str, Any]]]


def record(directory: Path, sandbox: Sandbox, **extra: object) -> None:
    """Write ``directory``/sandbox.json for ``sandbox``, owned by this process."""
    pid = os.getpid()
    info = {"proxy_pid": pid, "proxy_start": start_time(pid) or 0,
            "vm_pid": sandbox.vm.pid if sandbox.vm else 0,
            "boot_seconds": round(sandbox.boot_seconds, 6),
            "restored": sandbox.cloned_from is not None, "booted_at": time.time(), **extra}
    tmp = directory / f".{FILE}.tmp"
    with contextlib.suppress(OSError):  # the monitor's loss, never the sandbox's
        tmp.write_text(json.dumps(info))
        tmp.replace(directory / FILE)


def read(directory: Path) -> dict[str, Any]:
    """``directory``/sandbox.json, {} when it is missing or unreadable."""
    try:
        value = json.loads((directory / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def withdraw(directory: Path) -> bool:
    """Remove a dead owner's entry (sandbox.json, status.sock); True if it was removed."""
    try:
        (directory / FILE).unlink()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        (directory / STATUS_SOCKET).unlink()
    return True


class StatusServer:
    """A read-only door to a sandbox's agent on ``<directory>/status.sock``.

    It speaks the agent protocol, as the proxy daemon does, but answers only ``hello``
    (from the handshake's reply, as the router does) and forwards only the requests of
    :data:`READ_ONLY`: whoever reaches the socket must not create, signal or delete
    anything. Requests of one connection are answered in order. Leaving the ``async
    with`` block closes the socket and every connection.
    """

    def __init__(self, name: str, directory: Path, hello: dict[str, Any], ask: Ask) -> None:
        self.name = name
        self.path = directory / STATUS_SOCKET
        self.hello = hello
        self.ask = ask
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> StatusServer:
        self.path.unlink(missing_ok=True)
        try:
            with short_path(self.path) as name:
                self._server = await asyncio.start_unix_server(self._serve, name)
        except OSError as exc:
            raise HullError(f"{self.name}: cannot serve its status on {self.path}: "
                            f"{exc.strerror}") from exc
        os.chmod(self.path, 0o600)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        decoder = framing.Decoder()
        try:
            while data := await reader.read(READ_SIZE):
                for frame in decoder.feed(data):
                    if frame.kind is not Kind.REQUEST:
                        raise framing.FrameError(f"a status client sent {frame.kind.name}")
                    request = schema.Request.from_json(schema.decode(frame.payload))
                    response = await self._answer(request)
                    writer.write(Frame(Kind.RESPONSE, framing.CONTROL_STREAM, schema.encode(
                        response.to_json())).encode())
                await writer.drain()
        except (framing.FrameError, schema.SchemaError) as exc:
            log.warning("%s: dropping a status client: %s", self.name, exc)
        except OSError as exc:
            log.debug("%s: status client gone: %s", self.name, exc)
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, request: schema.Request) -> schema.Response:
        if request.method is schema.Method.HELLO:
            return schema.Response(request.id, self.hello)
        if request.method not in READ_ONLY:
            return schema.Response(request.id, error_kind=schema.ErrorKind.INVALID,
                                   error_message=f"{self.name}: {request.method} is refused "
                                   f"on {self.path}: it only reads the sandbox's status")
        try:
            return schema.Response(request.id, await self.ask(request.method, request.params,
                                                              ASK_TIMEOUT))
        except HullError as exc:
            return schema.Response(request.id, error_kind=schema.ErrorKind.FAILED,
                                   error_message=str(exc))
