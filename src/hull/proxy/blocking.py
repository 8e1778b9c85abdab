"""BlockingChannel: the host end of the agent protocol over one blocking socket, for the
processes that serve a single guest process and nothing else (a CLI-mode shim, a
foreground `hull exec`).

:class:`hull.proxy.channel.AgentChannel` does the same on asyncio; this one exists
because a shim lives as long as its container process, and asyncio alone costs every
shim ~5 MiB of private memory and ~30 ms of start-up (docs/performance.md). Standard
library, hull.agentapi and hull.errors only.

Threads: the caller's thread reads the socket (:meth:`request`, :meth:`pump`) and
dispatches frames; each output stream has a writer thread, so a blocking write to a slow
reader holds back only that stream's credit (and with it the guest process), never the
signals and requests the reading thread sends. Frames leave whole under one lock.

The peer is untrusted, as in AgentChannel: a frame that does not decode, data beyond a
window or on a stream never opened, a response nobody asked for, is a protocol violation:
the channel fails and every waiter learns it.

Lean: a shim keeps what it imports for its container process's whole life, and
threading, queue, socket and contextlib would bring functools and collections along
(~1 MiB of private memory each; docs/performance.md, host memory). So this module runs
its threads and locks on ``_thread`` and its queues on ``_queue`` (what threading and
queue are built on), and takes any socket object (``_socket.socket`` from a shim).
"""

from __future__ import annotations

import _thread
import itertools
import os
import select
import time
from _queue import SimpleQueue

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.errors import AgentError, InvalidState, ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    from collections.abc import Callable
    from typing import Any

READ_SIZE = 256 * 1024
#: How much a relay reads from a host fd (a process's stdin) at a time.
READ_CHUNK = 64 * 1024


def agent_error(response: schema.Response) -> Exception:
    """The exception an error RESPONSE from the agent stands for."""
    message = response.error_message or "unknown agent error"
    if response.error_kind is schema.ErrorKind.STATE:
        return InvalidState(message)
    return AgentError(message)


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to host ``fd`` (a blocking fd: a pipe, tty, file or socket)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Output:
    """One inbound stream, written to a host fd by its own thread, in order; its credit
    goes back once the bytes are written. A host fd that breaks (EPIPE) drops the rest,
    still returning credit, so the guest process is never wedged on a full window."""

    def __init__(self, channel: BlockingChannel, stream: int, fd: int) -> None:
        self.channel, self.stream, self.fd = channel, stream, fd
        self._queue: SimpleQueue[bytes | None] = SimpleQueue()
        self._done = _thread.allocate_lock()
        self._done.acquire()  # released when the thread ends
        _thread.start_new_thread(self._run, ())

    def put(self, data: bytes | None) -> None:
        self._queue.put(data)

    def _run(self) -> None:
        try:
            broken = False
            while (data := self._queue.get()) is not None:
                if not broken:
                    try:
                        write_all(self.fd, data)
                    except OSError:
                        broken = True
                self.channel.return_credit(self.stream, len(data))
        finally:
            self._done.release()

    def wait_closed(self) -> None:
        with self._done:
            pass


class Condition:
    """threading.Condition's wait / notify_all on ``_thread`` locks (see the module's
    docstring): a lock to hold, and one parked lock per waiter."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._waiters: list[_thread.LockType] = []

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self) -> None:
        """Release the lock until notify_all, then hold it again (call it holding it)."""
        parked = _thread.allocate_lock()
        parked.acquire()
        self._waiters.append(parked)
        self._lock.release()
        try:
            parked.acquire()
        finally:
            self._lock.acquire()

    def notify_all(self) -> None:
        """Wake every waiter (call it holding the lock)."""
        waiters, self._waiters = self._waiters, []
        for parked in waiters:
            parked.release()


class BlockingChannel:
    def __init__(self, sock: _socket.socket, name: str,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.name = name
        self._sock = sock
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._decoder = framing.Decoder()
        self._recv = framing.ReceiveWindow()
        self._send = framing.SendWindow()
        #: request id -> its response (None until it arrives); requests sent without
        #: waiting (signals, resizes) are in _ignored: their responses are dropped.
        self._waiting: dict[int, schema.Response | None] = {}
        self._ignored: set[int] = set()
        self._outputs: dict[int, Output] = {}  # open ones
        self._every_output: list[Output] = []
        self._send_lock = _thread.allocate_lock()
        #: Guards the windows and wakes senders waiting for credit.
        self._credit = Condition()
        self.failure: str | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._fail("channel closed by the host")
        self._sock.close()

    # ------------------------------------------------------------------ requests

    def request(self, method: schema.Method, params: dict[str, Any],
                timeout: float | None = None) -> dict[str, Any]:
        """Send a request and read frames until its response; the result or the agent's
        error (AgentError, InvalidState), ProtocolError when the channel fails."""
        rid = self._send_request(method, params)
        self._waiting[rid] = None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while (response := self._waiting[rid]) is None:
                if self.failure:
                    raise ProtocolError(f"agent of {self.name}: {self.failure}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AgentError(f"agent of {self.name} did not answer {method} within "
                                     f"{timeout:g}s")
                self.pump(left)
        finally:
            self._waiting.pop(rid, None)
        if response.error_kind is not None:
            raise agent_error(response)
        return response.result or {}

    def notify(self, method: schema.Method, params: dict[str, Any]) -> None:
        """Send a request without waiting; its response is dropped. Errors are ignored:
        a signal or resize for a process that is gone is no news."""
        try:
            self._ignored.add(self._send_request(method, params))
        except (ProtocolError, OSError):
            pass

    def _send_request(self, method: schema.Method, params: dict[str, Any]) -> int:
        if self.failure:
            raise ProtocolError(f"agent of {self.name}: {self.failure}")
        rid = next(self._ids)
        payload = schema.encode(schema.Request(rid, method, params).to_json())
        self._write(Frame(Kind.REQUEST, framing.CONTROL_STREAM, payload))
        return rid

    # ------------------------------------------------------------------ streams

    def open_output(self, fd: int) -> Output:
        """A new inbound stream whose bytes go to host ``fd``."""
        stream = next(self._stream_ids)
        with self._credit:
            self._recv.open(stream)
        output = Output(self, stream, fd)
        self._outputs[stream] = output
        self._every_output.append(output)
        return output

    def open_input(self) -> int:
        stream = next(self._stream_ids)
        with self._credit:
            self._send.open(stream)
        return stream

    def send_data(self, stream: int, data: bytes) -> None:
        """Send bytes on an outbound stream, waiting for credit as needed (any thread)."""
        view = memoryview(data)
        while view:
            with self._credit:
                while not self.failure and (room := self._send.available(stream)) == 0:
                    self._credit.wait()
                if self.failure:
                    raise ProtocolError(f"agent of {self.name}: {self.failure}")
                chunk = bytes(view[: min(room, framing.MAX_DATA_CHUNK)])
                self._send.consume(stream, len(chunk))
            self._write(Frame(Kind.DATA, stream, chunk))
            view = view[len(chunk):]

    def close_input(self, stream: int) -> None:
        with self._credit:
            self._send.close(stream)
        try:
            self._write(Frame(Kind.CLOSE, stream))
        except (ProtocolError, OSError):
            pass

    def return_credit(self, stream: int, count: int) -> None:
        with self._credit:
            due = self._recv.consumed(stream, count)
        if due and not self.failure:
            try:
                self._write(framing.credit_frame(stream, count))
            except (ProtocolError, OSError):
                pass

    def drain(self) -> None:
        """Read until every output stream is closed (or the channel fails), and return
        once all their bytes are written."""
        while self._outputs and not self.failure:
            self.pump(None)
        for output in self._every_output:
            output.wait_closed()

    # ------------------------------------------------------------------ I/O

    def _write(self, frame: Frame) -> None:
        data = frame.encode()
        with self._send_lock:
            if self.failure:
                raise ProtocolError(f"agent of {self.name}: channel is closed")
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._fail(f"channel write failed: {exc}")
                raise ProtocolError(f"agent of {self.name}: channel write failed") from exc

    def pump(self, timeout: float | None) -> None:
        """Read what arrives within ``timeout`` seconds (None: until something does) and
        dispatch it. Returns at once when the channel has failed."""
        if self.failure:
            return
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if ready:
            self.pump_ready()

    def pump_ready(self) -> None:
        """Read and dispatch what the socket has (it polled readable)."""
        try:
            data = self._sock.recv(READ_SIZE)
        except InterruptedError:
            return
        except OSError as exc:
            self._fail(f"channel read failed: {exc}")
            return
        if not data:
            self._fail("the guest closed the channel")
            return
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
        except (framing.FrameError, schema.SchemaError) as exc:
            self._fail(f"protocol violation: {exc}")

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind is Kind.RESPONSE:
            response = schema.Response.from_json(schema.decode(frame.payload))
            if response.id in self._waiting:
                self._waiting[response.id] = response
            elif response.id in self._ignored:
                self._ignored.discard(response.id)
            else:
                raise framing.FrameError(f"response to request {response.id}, never sent")
        elif frame.kind is Kind.EVENT:
            if self._on_event is not None:
                self._on_event(schema.decode(frame.payload))
        elif frame.kind is Kind.DATA:
            with self._credit:
                self._recv.received(frame.stream, len(frame.payload))
            self._outputs[frame.stream].put(frame.payload)
        elif frame.kind is Kind.CLOSE:
            output = self._outputs.pop(frame.stream, None)
            if output is None:
                raise framing.FrameError(f"close of stream {frame.stream}, which is not open")
            with self._credit:
                self._recv.close(frame.stream)
            output.put(None)
        elif frame.kind is Kind.CREDIT:
            with self._credit:
                self._send.grant(frame.stream, framing.credit_value(frame))
                self._credit.notify_all()
        else:
            raise framing.FrameError(f"unexpected {frame.kind.name} frame from the guest")

    def _fail(self, why: str) -> None:
        if self.failure:
            return
        self.failure = why
        with self._credit:
            self._credit.notify_all()
        for output in self._outputs.values():
            output.put(None)
        self._outputs.clear()
