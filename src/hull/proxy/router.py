"""Router: the proxy's core. Many client connections share the one agent channel.

Clients (shims, CLI commands) speak the agent protocol itself (hull.agentapi) to the
proxy, as if it were the agent: the shim's code is the same whether it talks to a proxy or
to a VM. The router gives each client its own namespaces of request ids and stream ids
and maps them onto the channel's:

- a client REQUEST gets a fresh upstream id; the RESPONSE is routed back with the
  client's id. ``hello`` is answered by the router from the agent's own reply.
- the stdio stream ids named in ``create_container``/``exec_process`` are mapped to fresh
  upstream stream ids; DATA, CLOSE and CREDIT frames then flow through with ids
  rewritten, so credit flow control holds end to end and the router buffers nothing
  beyond the stream windows.
- ``process_exit`` events go to the client that created that process (and to the
  router's own ``on_exit``).

The router enforces the protocol on the guest side as the host channel does (windows,
known ids, schema); a violation kills the VM through ``on_violation``. A client that
misbehaves only loses its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.errors import ProtocolError
from hull.proxy import channel

log = logging.getLogger("hull.proxy")
ProcessKey = tuple[str, str]
ProxyHandler = Callable[[schema.Method], Awaitable[dict[str, Any]]]


class ClientError(Exception):
    """A client broke the protocol: its connection is dropped."""


@dataclass
class Client:
    name: str
    writer: asyncio.StreamWriter
    #: client stream id -> upstream stream id, for streams this client owns
    streams: dict[int, int] = field(default_factory=dict)
    processes: set[ProcessKey] = field(default_factory=set)

    def send(self, frame: Frame) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame.encode())


@dataclass
class Route:
    client: Client | None
    client_stream: int
    guest_to_host: bool


class Router:
    def __init__(self, name: str, on_violation: Callable[[str], None],
                 on_exit: Callable[[schema.ProcessExit], None] | None = None,
                 on_proxy_request: ProxyHandler | None = None) -> None:
        self.name = name
        self.on_violation = on_violation
        self.on_exit = on_exit
        self.on_proxy_request = on_proxy_request
        #: debug_exec is forwarded only when the configuration enables the debug console
        self.allow_debug = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.hello_reply: dict[str, Any] | None = None
        self.failure: str | None = None
        self.closed = asyncio.Event()
        self._upstream: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        #: upstream request id -> (client, client request id) or a future of our own
        #: (None: the asking client left; the late answer is dropped)
        self._pending: dict[int, tuple[Client, int] | asyncio.Future[dict[str, Any]] | None] = {}
        self._routes: dict[int, Route] = {}
        self._owners: dict[ProcessKey, Client | None] = {}
        self._recv = framing.ReceiveWindow()
        self._reader: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- upstream

    async def attach(self, sock: Any) -> None:
        reader, self._upstream = await asyncio.open_connection(sock=sock)
        self._reader = asyncio.create_task(self._read_upstream(reader))

    async def call(self, method: schema.Method, params: dict[str, Any],
                   timeout: float | None = None) -> dict[str, Any]:
        """A request of the proxy's own (hello, shutdown ...)."""
        if self.failure:
            raise ProtocolError(f"agent of {self.name}: {self.failure}")
        async def send(frame: Frame) -> None:
            self._up(frame)
        return await channel.call(self.name, self._pending, next(self._ids), method, params,
                                  timeout, send)

    def _up(self, frame: Frame) -> None:
        if self._upstream is None or self._upstream.is_closing():
            raise ProtocolError(f"agent of {self.name}: channel is closed")
        self._upstream.write(frame.encode())

    async def _read_upstream(self, reader: asyncio.StreamReader) -> None:
        await channel.read_frames(reader, self._from_agent, self._fail, self._drain_upstream)

    async def _drain_upstream(self) -> None:
        if self._upstream is not None:
            await self._upstream.drain()

    def _from_agent(self, frame: Frame) -> None:
        if frame.kind is Kind.RESPONSE:
            response = schema.Response.from_json(schema.decode(frame.payload))
            if response.id not in self._pending:
                raise framing.FrameError(f"response to request {response.id}, never sent")
            waiter = self._pending.pop(response.id)
            if waiter is None:
                return
            if isinstance(waiter, asyncio.Future):
                channel.resolve(waiter, response)
                return
            client, client_id = waiter
            client.send(Frame(Kind.RESPONSE, 0, schema.encode(
                schema.Response(client_id, response.result, response.error_kind,
                                response.error_message).to_json())))
        elif frame.kind is Kind.EVENT:
            self._event(schema.decode(frame.payload))
        elif frame.kind in (Kind.DATA, Kind.CLOSE):
            route = self._routes.get(frame.stream)
            if route is None or not route.guest_to_host:
                raise framing.FrameError(f"{frame.kind.name} on stream {frame.stream}, "
                                         "which is not open")
            if frame.kind is Kind.DATA:
                self._recv.received(frame.stream, len(frame.payload))
                if route.client is None:  # nobody listens any more: discard, keep credit
                    self._recv.consumed(frame.stream, len(frame.payload))
                    self._up(framing.credit_frame(frame.stream, len(frame.payload)))
                    return
            else:
                del self._routes[frame.stream]
                self._recv.close(frame.stream)
            if route.client is not None:
                route.client.send(Frame(frame.kind, route.client_stream, frame.payload))
        elif frame.kind is Kind.CREDIT:
            route = self._routes.get(frame.stream)
            framing.credit_value(frame)
            if route is not None and route.client is not None and not route.guest_to_host:
                route.client.send(Frame(Kind.CREDIT, route.client_stream, frame.payload))
        else:
            raise framing.FrameError(f"unexpected {frame.kind.name} frame from the guest")

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("event") != schema.Event.PROCESS_EXIT:
            raise schema.SchemaError(f"unknown event {message.get('event')!r}")
        event = schema.ProcessExit.from_json(message)
        key = (event.container_id, event.exec_id)
        if key not in self._owners:
            raise schema.SchemaError(f"exit of unknown process {key[0]}/{key[1]}")
        owner = self._owners.pop(key)
        if owner is not None:
            owner.processes.discard(key)
            owner.send(Frame(Kind.EVENT, 0, schema.encode(message)))
        if self.on_exit is not None:
            self.on_exit(event)

    def _fail(self, why: str, violation: bool) -> None:
        if self.failure:
            return
        self.failure = why
        for waiter in self._pending.values():
            if isinstance(waiter, asyncio.Future) and not waiter.done():
                waiter.set_exception(ProtocolError(f"agent of {self.name}: {why}"))
        self._pending.clear()
        self.closed.set()
        if violation:
            self.on_violation(why)

    async def close(self) -> None:
        self._fail("closed by the proxy", violation=False)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._upstream is not None:
            self._upstream.close()

    # ----------------------------------------------------------------- clients

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter, name: str = "client") -> None:
        client = Client(name, writer)
        decoder = framing.Decoder()
        try:
            while not self.failure and (data := await reader.read(channel.READ_SIZE)):
                for frame in decoder.feed(data):
                    self._from_client(client, frame)
                await writer.drain()
                if self._upstream is not None:
                    await self._upstream.drain()
        except (framing.FrameError, schema.SchemaError, ClientError) as exc:
            log.warning("proxy of %s: dropping %s: %s", self.name, name, exc)
        except (OSError, ProtocolError) as exc:
            log.debug("proxy of %s: %s gone: %s", self.name, name, exc)
        finally:
            self._forget(client)
            writer.close()

    def _from_client(self, client: Client, frame: Frame) -> None:
        if frame.kind is Kind.REQUEST:
            self._client_request(client, schema.Request.from_json(schema.decode(frame.payload)))
        elif frame.kind in (Kind.DATA, Kind.CLOSE):
            upstream = client.streams.get(frame.stream)
            route = self._routes.get(upstream) if upstream is not None else None
            if upstream is None or route is None or route.guest_to_host:
                raise ClientError(f"{frame.kind.name} on stream {frame.stream}, not its stdin")
            if frame.kind is Kind.CLOSE:
                del self._routes[upstream]
                del client.streams[frame.stream]
            self._up(Frame(frame.kind, upstream, frame.payload))
        elif frame.kind is Kind.CREDIT:
            upstream = client.streams.get(frame.stream)
            count = framing.credit_value(frame)
            if upstream is None:
                return  # credit for a stream that closed meanwhile: harmless
            if self._recv.consumed(upstream, count):
                self._up(framing.credit_frame(upstream, count))
        else:
            raise ClientError(f"clients do not send {frame.kind.name} frames")

    def _client_request(self, client: Client, request: schema.Request) -> None:
        if request.method is schema.Method.HELLO:
            client.send(Frame(Kind.RESPONSE, 0, schema.encode(
                schema.Response(request.id, self.hello_reply or {}).to_json())))
            return
        if request.method in schema.PROXY_METHODS:
            task = asyncio.get_running_loop().create_task(self._proxy_request(client, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if request.method is schema.Method.DEBUG_EXEC and not self.allow_debug:
            client.send(Frame(Kind.RESPONSE, 0, schema.encode(schema.Response(
                request.id, error_kind=schema.ErrorKind.INVALID,
                error_message=f"{self.name}: the debug console is disabled: set "
                "hypervisor.debug_console = true in the configuration").to_json())))
            return
        params = request.params
        if request.method in (schema.Method.CREATE_CONTAINER, schema.Method.EXEC_PROCESS,
                              schema.Method.DEBUG_EXEC):
            params = self._map_process(client, request.method, params)
        rid = next(self._ids)
        self._pending[rid] = (client, request.id)
        self._up(Frame(Kind.REQUEST, 0, schema.encode(
            schema.Request(rid, request.method, params).to_json())))

    async def _proxy_request(self, client: Client, request: schema.Request) -> None:
        if self.on_proxy_request is None:
            response = schema.Response(request.id, error_kind=schema.ErrorKind.INVALID,
                                       error_message=f"{request.method} is not supported here")
        else:
            try:
                response = schema.Response(request.id, await self.on_proxy_request(
                    request.method))
            except Exception as exc:  # the handler's failure is the client's answer
                response = schema.Response(request.id, error_kind=schema.ErrorKind.FAILED,
                                           error_message=str(exc))
        client.send(Frame(Kind.RESPONSE, 0, schema.encode(response.to_json())))

    def _map_process(self, client: Client, method: schema.Method,
                     params: dict[str, Any]) -> dict[str, Any]:
        if method is schema.Method.CREATE_CONTAINER:
            key = (schema.CreateContainer.from_json(params).container_id, "")
        elif method is schema.Method.DEBUG_EXEC:
            key = (schema.GUEST, schema.DebugExec.from_json(params).exec_id)
        else:
            ex = schema.ExecProcess.from_json(params)
            key = (ex.container_id, ex.exec_id)
        stdio = schema.Stdio.from_json(params.get("stdio", {}))
        mapped: dict[str, int | None] = {}
        for name, stream in (("stdin", stdio.stdin), ("stdout", stdio.stdout),
                             ("stderr", stdio.stderr)):
            if stream is None:
                mapped[name] = None
                continue
            if stream in client.streams:
                raise ClientError(f"stream {stream} is in use")
            upstream = next(self._stream_ids)
            client.streams[stream] = upstream
            guest_to_host = name != "stdin"
            self._routes[upstream] = Route(client, stream, guest_to_host)
            if guest_to_host:
                self._recv.open(upstream)
            mapped[name] = upstream
        if key in self._owners:
            raise ClientError(f"process {key[0]}/{key[1]} exists")
        self._owners[key] = client
        client.processes.add(key)
        return {**params, "stdio": mapped}

    def _reserve(self) -> int:
        """An upstream request id whose answer nobody waits for."""
        rid = next(self._ids)
        self._pending[rid] = None
        return rid

    def _forget(self, client: Client) -> None:
        """A client left: its guest->host streams are drained (discarded) from now on."""
        for upstream in client.streams.values():
            route = self._routes.get(upstream)
            if route is None:
                continue
            if route.guest_to_host:
                route.client = None
            else:  # its stdin: the process sees EOF
                del self._routes[upstream]
                with contextlib.suppress(ProtocolError):
                    self._up(Frame(Kind.CLOSE, upstream))
        for key in client.processes:
            # A shim's process lives exactly as long as the shim: when the shim is gone
            # (killed, say), so is its process.
            self._owners[key] = None
            with contextlib.suppress(ProtocolError):
                self._up(Frame(Kind.REQUEST, 0, schema.encode(schema.Request(
                    self._reserve(), schema.Method.SIGNAL_PROCESS,
                    {"container_id": key[0], "exec_id": key[1], "signal": 9}).to_json())))
        for rid, waiter in list(self._pending.items()):
            if isinstance(waiter, tuple) and waiter[0] is client:
                # keep the id reserved so the agent's late answer is not a violation
                self._pending[rid] = None
