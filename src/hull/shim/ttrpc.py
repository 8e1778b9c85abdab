"""ttrpc, containerd's small RPC protocol: frames, a server and a client (asyncio).

No Python ttrpc library exists, so this is Hull's own, written from the protocol
description (INTEGRATION.md §2 "ttrpc wire protocol"; ttrpc@PROTOCOL.md, channel.go,
server.go):

- A frame is a 10-byte header — data length (u32 BE, at most 4 MiB), stream id (u32 BE),
  type (u8: 1 request, 2 response, 3 data), flags (u8) — then the data.
- A request's data is a ``ttrpc.Request`` (service, method, payload, timeout, metadata);
  the answer on the same stream id is a ``ttrpc.Response`` (a google.rpc.Status-shaped
  status and the payload). Clients use odd stream ids.
- Many requests are in flight on one connection: the server runs each in its own task
  (the Task service's Wait blocks until a process exits).

A peer that breaks the framing — an oversized or truncated frame, an unknown frame type,
a response sent to the server — loses its connection; other connections keep being
served. A request that frames correctly but cannot be served gets a status instead, as
the Go server does: InvalidArgument for an undecodable request or an even stream id,
Unimplemented (12) for an unknown service or method.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from hull.errors import HullError
from hull.shim.proto import ttrpc_pb2

log = logging.getLogger("hull.ttrpc")

HEADER = struct.Struct(">IIBB")
MAX_DATA = 4 << 20  # ttrpc's messageLengthMax
#: Requests one connection may have in flight; beyond it ResourceExhausted (a bound on
#: the tasks a single peer can make the shim hold).
MAX_IN_FLIGHT = 1024
NAMESPACE_KEY = "containerd-namespace-ttrpc"  # containerd namespaces/ttrpc.go


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code), as containerd's errdefs maps them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class TTRPCError(HullError):
    """A call answered with a non-OK status (client side), or to answer with one (server)."""

    def __init__(self, code: Code | int, message: str) -> None:
        super().__init__(message)
        self.code = Code(code) if code in Code._value2member_map_ else Code.UNKNOWN
        self.message = message


class FrameError(HullError):
    """The peer broke the framing: its connection is dropped."""


# ---------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    stream: int
    type: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        if len(self.data) > MAX_DATA:
            raise FrameError(f"frame of {len(self.data)} bytes exceeds {MAX_DATA}")
        return HEADER.pack(len(self.data), self.stream, self.type, self.flags) + self.data


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame; None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(f"truncated frame header ({len(exc.partial)} bytes)") from None
    length, stream, mtype, flags = HEADER.unpack(header)
    if length > MAX_DATA:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_DATA}")
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"truncated frame: {len(exc.partial)} of {length} bytes") from None
    return Frame(stream, mtype, flags, data)


def status_response(code: Code, message: str) -> bytes:
    return ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=int(code), message=message)
                              ).SerializeToString()


# ---------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Context:
    """What a handler knows about its call besides the payload."""

    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        values = self.metadata.get(NAMESPACE_KEY, ())
        return values[0] if values else ""


Handler = Callable[[bytes, Context], Awaitable[bytes]]


class Server:
    """Serves registered services on a listening unix socket until close()."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Handler]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        self._services.setdefault(service, {}).update(methods)

    def handler(self, service: str, method: str) -> Handler | None:
        return self._services.get(service, {}).get(method)

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock``, an AF_UNIX stream socket already bound and listening."""
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)


class _Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.replies: set[asyncio.Task[None]] = set()
        self.write_lock = asyncio.Lock()

    async def run(self) -> None:
        try:
            while (frame := await read_frame(self.reader)) is not None:
                self._dispatch(frame)
        except FrameError as exc:
            log.warning("ttrpc: dropping a connection: %s", exc)
        except (ConnectionError, OSError) as exc:
            log.debug("ttrpc: connection failed: %s", exc)
        finally:
            await self.close()

    async def close(self) -> None:
        for task in list(self.calls.values()):
            task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    def _dispatch(self, frame: Frame) -> None:
        if frame.type == MessageType.DATA:
            # Only streaming methods use data frames, and no service here streams.
            log.debug("ttrpc: ignoring a data frame on stream %d", frame.stream)
            return
        if frame.type != MessageType.REQUEST:
            raise FrameError(f"unexpected frame type {frame.type} on stream {frame.stream}")
        if frame.stream % 2 != 1:
            self._reply_soon(frame.stream, status_response(
                Code.INVALID_ARGUMENT, "stream id must be odd for client initiated streams"))
        elif frame.stream in self.calls:
            raise FrameError(f"stream {frame.stream} is already in use")
        elif len(self.calls) >= MAX_IN_FLIGHT:
            self._reply_soon(frame.stream, status_response(
                Code.RESOURCE_EXHAUSTED, f"more than {MAX_IN_FLIGHT} requests in flight"))
        else:
            stream = frame.stream
            task = asyncio.create_task(self._call(stream, frame.data))
            self.calls[stream] = task

            def done(_: asyncio.Task[None]) -> None:
                self.calls.pop(stream, None)

            task.add_done_callback(done)

    def _reply_soon(self, stream: int, data: bytes) -> None:
        task = asyncio.create_task(self._send(stream, data))
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)

    async def _call(self, stream: int, data: bytes) -> None:
        await self._send(stream, await self._respond(data))

    async def _respond(self, data: bytes) -> bytes:
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(data)
        except DecodeError as exc:
            return status_response(Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        handler = self.server.handler(request.service, request.method)
        if handler is None:
            return status_response(Code.UNIMPLEMENTED,
                                   f"{request.service}/{request.method} is not implemented")
        metadata: dict[str, tuple[str, ...]] = {}
        for kv in request.metadata:
            metadata[kv.key] = (*metadata.get(kv.key, ()), kv.value)
        ctx = Context(request.service, request.method, metadata)
        timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        try:
            async with asyncio.timeout(timeout):
                payload = await handler(request.payload, ctx)
        except TTRPCError as exc:
            return status_response(exc.code, exc.message)
        except TimeoutError:
            return status_response(Code.DEADLINE_EXCEEDED,
                                   f"{request.method}: deadline exceeded")
        except HullError as exc:
            return status_response(Code.UNKNOWN, str(exc))
        except Exception as exc:  # a bug in one handler must not take the shim down
            log.exception("ttrpc: %s/%s failed", request.service, request.method)
            return status_response(Code.INTERNAL, f"{request.method}: {exc}")
        if len(payload) + 64 > MAX_DATA:
            return status_response(Code.RESOURCE_EXHAUSTED,
                                   f"{request.method}: response exceeds {MAX_DATA} bytes")
        return ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=0), payload=payload
                                  ).SerializeToString()

    async def _send(self, stream: int, data: bytes) -> None:
        frame = Frame(stream, MessageType.RESPONSE, 0, data).encode()
        async with self.write_lock:
            if self.writer.is_closing():
                return
            self.writer.write(frame)
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()


# ---------------------------------------------------------------------------- client


class Client:
    """One connection to a ttrpc server; calls may run concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._streams = itertools.count(1, 2)  # odd ids, as the Go client
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._write_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._read_loop())
        self.closed = asyncio.Event()

    @classmethod
    async def connect(cls, path: str, timeout: float = 5.0) -> Client:
        path = path.removeprefix("unix://")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path),
                                                    timeout)
        except (OSError, TimeoutError) as exc:
            raise TTRPCError(Code.UNAVAILABLE, f"cannot connect to {path}: {exc}") from exc
        return cls(reader, writer)

    async def call(self, service: str, method: str, payload: bytes, *,
                   metadata: Mapping[str, str] | None = None,
                   timeout: float | None = None) -> bytes:
        if self.closed.is_set():
            raise TTRPCError(Code.UNAVAILABLE, "ttrpc: connection closed")
        request = ttrpc_pb2.Request(
            service=service, method=method, payload=payload,
            timeout_nano=int(timeout * 1e9) if timeout else 0,
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()])
        stream = next(self._streams)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[stream] = fut
        try:
            frame = Frame(stream, MessageType.REQUEST, 0, request.SerializeToString())
            async with self._write_lock:
                self._writer.write(frame.encode())
                await self._writer.drain()
            async with asyncio.timeout(timeout):
                data = await fut
        except TimeoutError:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{method}: deadline exceeded") from None
        except (ConnectionError, OSError) as exc:
            raise TTRPCError(Code.UNAVAILABLE, f"ttrpc: {exc}") from exc
        finally:
            self._pending.pop(stream, None)
        response = ttrpc_pb2.Response()
        try:
            response.ParseFromString(data)
        except DecodeError as exc:
            raise TTRPCError(Code.INTERNAL, f"ttrpc: undecodable response: {exc}") from exc
        if response.status.code != 0:
            raise TTRPCError(response.status.code, response.status.message)
        return response.payload

    async def _read_loop(self) -> None:
        why = "connection closed"
        try:
            while (frame := await read_frame(self._reader)) is not None:
                fut = self._pending.get(frame.stream)
                if frame.type == MessageType.RESPONSE and fut is not None and not fut.done():
                    fut.set_result(frame.data)
        except (FrameError, ConnectionError, OSError) as exc:
            why = str(exc)
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(TTRPCError(Code.UNAVAILABLE, f"ttrpc: {why}"))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self.closed.set()
