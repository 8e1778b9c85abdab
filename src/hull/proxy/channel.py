"""AgentChannel: the host end of the agent protocol over one connected stream socket.

It runs one reader task that decodes frames (hull.agentapi.framing) and routes them:
RESPONSE frames complete pending requests, EVENT frames go to the event handler, DATA
and CLOSE frames go to the process stream they belong to, CREDIT frames release senders.

The guest is untrusted. Anything out of line — a frame that does not decode, data on a
stream the host did not open or beyond its window, a response nobody asked for, a
message that does not fit the schema — is a protocol violation: the channel closes,
every waiter gets :class:`ProtocolError`, and ``on_violation`` lets the owner kill the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.errors import AgentError, ProtocolError
from hull.proxy.blocking import agent_error

log = logging.getLogger("hull.channel")
READ_SIZE = 256 * 1024


class InboundStream:
    """Bytes the guest sends on one stream, handed to a consumer coroutine in order.

    The consumer returns only once the bytes are delivered (e.g. written to a pipe);
    credit goes back to the guest after that, so a slow consumer slows the guest down
    instead of growing a buffer here.
    """

    def __init__(self, channel: AgentChannel, stream: int,
                 consume: Callable[[bytes], Awaitable[None]]) -> None:
        self.channel, self.stream, self._consume = channel, stream, consume
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    def put(self, data: bytes | None) -> None:
        self._queue.put_nowait(data)

    async def _pump(self) -> None:
        try:
            while (data := await self._queue.get()) is not None:
                await self._consume(data)
                self.channel.return_credit(self.stream, len(data))
        except OSError as exc:
            # The consumer went away (EPIPE on our stdout): drop further data, keep credit
            # flowing so the guest process is not wedged on a full window.
            log.debug("stream %d consumer failed: %s", self.stream, exc)
            while (data := await self._queue.get()) is not None:
                self.channel.return_credit(self.stream, len(data))
        finally:
            self.closed.set()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    def abort(self) -> None:
        self._task.cancel()
        self.closed.set()


class AgentChannel:
    def __init__(self, sock: socket.socket, name: str,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_violation: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._sock = sock
        self._on_event = on_event
        self._on_violation = on_violation
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._inbound: dict[int, InboundStream] = {}
        self._recv = framing.ReceiveWindow()
        self._send = framing.SendWindow()
        self._credit_waiters: dict[int, asyncio.Event] = {}
        self._stream_ids = itertools.count(1)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.closed = asyncio.Event()

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=self._sock)
        self._reader_task = asyncio.create_task(self._read_loop(reader))

    async def close(self) -> None:
        self._fail("channel closed by the host", violation=False)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    # ------------------------------------------------------------------ requests

    async def request(self, method: schema.Method, params: dict[str, Any],
                      timeout: float | None = None) -> dict[str, Any]:
        if self.failure:
            raise ProtocolError(f"agent of {self.name}: {self.failure}")
        return await call(self.name, self._pending, next(self._ids), method, params,
                          timeout, self._write)

    # ------------------------------------------------------------------ streams

    def new_stream_id(self) -> int:
        return next(self._stream_ids)

    def open_inbound(self, consume: Callable[[bytes], Awaitable[None]]) -> InboundStream:
        stream = self.new_stream_id()
        self._recv.open(stream)
        inbound = InboundStream(self, stream, consume)
        self._inbound[stream] = inbound
        return inbound

    def open_outbound(self) -> int:
        stream = self.new_stream_id()
        self._send.open(stream)
        self._credit_waiters[stream] = asyncio.Event()
        return stream

    async def send_data(self, stream: int, data: bytes) -> None:
        """Send bytes on an outbound stream, waiting for credit as needed."""
        view = memoryview(data)
        while view:
            if self.failure:
                raise ProtocolError(f"agent of {self.name}: {self.failure}")
            room = self._send.available(stream)
            if room == 0:
                waiter = self._credit_waiters.get(stream)
                if waiter is None:
                    return  # stream closed meanwhile
                waiter.clear()
                await waiter.wait()
                continue
            chunk = bytes(view[: min(room, framing.MAX_DATA_CHUNK)])
            self._send.consume(stream, len(chunk))
            await self._write(Frame(Kind.DATA, stream, chunk))
            view = view[len(chunk):]

    async def close_outbound(self, stream: int) -> None:
        if stream in self._credit_waiters:
            self._send.close(stream)
            self._credit_waiters.pop(stream).set()
            with contextlib.suppress(ProtocolError, OSError):
                await self._write(Frame(Kind.CLOSE, stream))

    def return_credit(self, stream: int, count: int) -> None:
        if self._recv.consumed(stream, count) and not self.failure:
            self._write_nowait(framing.credit_frame(stream, count))

    # ------------------------------------------------------------------ I/O

    async def _write(self, frame: Frame) -> None:
        self._write_nowait(frame)
        assert self._writer is not None
        try:
            await self._writer.drain()
        except OSError as exc:
            self._fail(f"channel write failed: {exc}", violation=False)
            raise ProtocolError(f"agent of {self.name}: channel write failed") from exc

    def _write_nowait(self, frame: Frame) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ProtocolError(f"agent of {self.name}: channel is closed")
        self._writer.write(frame.encode())

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        await read_frames(reader, self._dispatch, self._fail)

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind is Kind.RESPONSE:
            response = schema.Response.from_json(schema.decode(frame.payload))
            fut = self._pending.get(response.id)
            if fut is None:
                raise framing.FrameError(f"response to request {response.id}, never sent")
            resolve(fut, response)
        elif frame.kind is Kind.EVENT:
            if self._on_event is not None:
                self._on_event(schema.decode(frame.payload))
        elif frame.kind is Kind.DATA:
            self._recv.received(frame.stream, len(frame.payload))
            self._inbound[frame.stream].put(frame.payload)
        elif frame.kind is Kind.CLOSE:
            inbound = self._inbound.pop(frame.stream, None)
            if inbound is None:
                raise framing.FrameError(f"close of stream {frame.stream}, which is not open")
            self._recv.close(frame.stream)
            inbound.put(None)
        elif frame.kind is Kind.CREDIT:
            self._send.grant(frame.stream, framing.credit_value(frame))
            waiter = self._credit_waiters.get(frame.stream)
            if waiter is not None:
                waiter.set()
        else:
            raise framing.FrameError(f"unexpected {frame.kind.name} frame from the guest")

    def _fail(self, why: str, violation: bool) -> None:
        if self.failure:
            return
        self.failure = why
        if violation or why != "channel closed by the host":
            log.debug("agent channel of %s: %s", self.name, why)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ProtocolError(f"agent of {self.name}: {why}"))
        for waiter in self._credit_waiters.values():
            waiter.set()
        for inbound in self._inbound.values():
            inbound.put(None)
        self.closed.set()
        if violation and self._on_violation is not None:
            self._on_violation(why)


def resolve(fut: asyncio.Future[dict[str, Any]], response: schema.Response) -> None:
    """Complete a request of our own with the agent's RESPONSE."""
    if fut.done():
        return
    if response.error_kind is not None:
        fut.set_exception(agent_error(response))
    else:
        fut.set_result(response.result or {})


async def call(name: str, pending: MutableMapping[int, Any], rid: int,
               method: schema.Method, params: dict[str, Any], timeout: float | None,
               send: Callable[[Frame], Awaitable[None]]) -> dict[str, Any]:
    """Send request ``rid`` and wait for its response, which the reader completes
    through ``pending[rid]`` (with :func:`resolve`)."""
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    pending[rid] = fut
    try:
        payload = schema.encode(schema.Request(rid, method, params).to_json())
        await send(Frame(Kind.REQUEST, framing.CONTROL_STREAM, payload))
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        raise AgentError(f"agent of {name} did not answer {method} within "
                         f"{timeout:g}s") from None
    finally:
        pending.pop(rid, None)


async def read_frames(reader: asyncio.StreamReader, handle: Callable[[Frame], None],
                      fail: Callable[[str, bool], None],
                      after_batch: Callable[[], Awaitable[None]] | None = None) -> None:
    """Decode the guest's frames into ``handle`` until EOF; any way it ends is told to
    ``fail(why, violation)``: a frame or message that breaks the protocol is a violation."""
    decoder = framing.Decoder()
    try:
        while data := await reader.read(READ_SIZE):
            for frame in decoder.feed(data):
                handle(frame)
            if after_batch is not None:
                await after_batch()
        fail("the guest closed the channel", False)
    except (framing.FrameError, schema.SchemaError) as exc:
        fail(f"protocol violation: {exc}", True)
    except OSError as exc:
        fail(f"channel read failed: {exc}", False)
