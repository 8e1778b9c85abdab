"""A task's stdio as containerd hands it over, relayed to the process's channel streams.

CreateTaskRequest and ExecProcessRequest carry stdin/stdout/stderr as strings the shim
opens (INTEGRATION.md §2 "Stdio and rootfs"; containerd pkg/process/io.go createIO):
a path with no scheme is a FIFO, ``file://`` a file to append to, ``binary://`` a logging
program the shim starts; "" means none. With a terminal there is one pty in the guest
and its output travels on the stdout stream; the host side only relays the fifos.

Opening fifos without blocking the event loop:

- stdout/stderr are opened O_RDWR: that never blocks and never fails with ENXIO while
  the client has not opened its read side yet, and writes cannot get EPIPE if it goes
  away (containerd's runc shim also keeps a read side open for the same reason).
- stdin is opened O_RDONLY in a worker thread, which blocks until the client opens its
  write side; then EOF arrives when the client closes it, as with runc's shim. CloseIO
  ends it early (ctr and CRI call CloseIO when their own stdin ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.blocking import READ_CHUNK
from hull.proxy.channel import AgentChannel, InboundStream
from hull.runtime.stdio import relay_output

log = logging.getLogger("hull.shim.stdio")
BINARY_READY_TIMEOUT = 10.0


class StdioError(HullError):
    """A stdio path or URI of a task cannot be opened."""


@dataclass(frozen=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


def _open_output(target: str) -> int:
    """An fd to write a process's output to, for a fifo path or a file:// URI."""
    url = urllib.parse.urlparse(target)
    if url.scheme == "file":
        path = Path(urllib.parse.unquote(url.path))
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if url.scheme:
        raise StdioError(f"unsupported stdio uri scheme {url.scheme!r} in {target}")
    return os.open(target, os.O_RDWR | os.O_CLOEXEC)


class _Logger:
    """A ``binary://`` logging program (containerd pkg/process/io.go NewBinaryIO).

    It gets the stdout and stderr pipes' read ends as fds 3 and 4, a "ready" pipe's write
    end as fd 5 (closed when it is ready), CONTAINER_ID and CONTAINER_NAMESPACE in its
    environment, and the URI's query as arguments.
    """

    def __init__(self, uri: str, container_id: str, namespace: str) -> None:
        url = urllib.parse.urlparse(uri)
        self.path = url.path
        args = [url.path]
        for key, values in urllib.parse.parse_qs(url.query, keep_blank_values=True).items():
            args.append(key)
            if values and values[0]:
                args.append(values[0])
        out_r, self.stdout = os.pipe()
        err_r, self.stderr = os.pipe()
        ready_r, ready_w = os.pipe()
        env = {**os.environ, "CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}

        def fds() -> None:  # child: fds 3, 4, 5 as containerd's ExtraFiles
            for i, fd in enumerate((out_r, err_r, ready_w)):
                os.dup2(fd, 3 + i)
            os.setsid()

        try:
            self.proc = subprocess.Popen(args, env=env, preexec_fn=fds, close_fds=False,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except OSError as exc:
            for fd in (out_r, err_r, ready_r, ready_w, self.stdout, self.stderr):
                os.close(fd)
            raise StdioError(f"cannot start logging binary {url.path}: {exc.strerror}"
                             ) from exc
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
        self.ready_fd = ready_r

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, os.read, self.ready_fd, 1),
                                   BINARY_READY_TIMEOUT)
        except TimeoutError:
            log.warning("logging binary %s not ready after %ss", self.path,
                        BINARY_READY_TIMEOUT)
        finally:
            os.close(self.ready_fd)

    def close(self) -> None:
        for fd in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class TaskIO:
    """Host fds of one task process and the channel streams they are relayed on."""

    channel: AgentChannel
    paths: StdioPaths
    streams: schema.Stdio = field(default_factory=schema.Stdio)
    _out_fds: list[int] = field(default_factory=list)
    _outputs: list[InboundStream] = field(default_factory=list)
    _logger: _Logger | None = None
    _stdin_closed: threading.Event = field(default_factory=threading.Event)

    @classmethod
    async def open(cls, channel: AgentChannel, paths: StdioPaths, container_id: str,
                   namespace: str) -> TaskIO:
        io = cls(channel, paths)
        try:
            await io._open(container_id, namespace)
        except BaseException:
            io.close_fds()
            raise
        return io

    async def _open(self, container_id: str, namespace: str) -> None:
        p = self.paths
        out_fd = err_fd = None
        if p.stdout.startswith("binary://"):
            self._logger = _Logger(p.stdout, container_id, namespace)
            await self._logger.wait_ready()
            out_fd, err_fd = self._logger.stdout, self._logger.stderr
        else:
            try:
                out_fd = _open_output(p.stdout) if p.stdout else None
                self._keep(out_fd)
                if not p.terminal and p.stderr:
                    err_fd = _open_output(p.stderr)
                    self._keep(err_fd)
            except OSError as exc:
                raise StdioError(f"cannot open stdio of {container_id}: {exc}") from exc
        stdin = self.channel.open_outbound() if p.stdin else None
        stdout = self._output(out_fd)
        stderr = None if p.terminal else self._output(err_fd)
        self.streams = schema.Stdio(stdin, stdout, stderr)

    def _keep(self, fd: int | None) -> None:
        if fd is not None:
            self._out_fds.append(fd)

    def _output(self, fd: int | None) -> int | None:
        if fd is None:
            return None
        inbound = relay_output(self.channel, fd)
        self._outputs.append(inbound)
        return inbound.stream

    def start_input(self) -> None:
        """Copy the stdin fifo to the process (once the process exists)."""
        if not self.paths.stdin or self.streams.stdin is None:
            return
        loop = asyncio.get_running_loop()
        path, stream, closed = self.paths.stdin, self.streams.stdin, self._stdin_closed

        def pump() -> None:
            fd = -1
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # blocks until a writer
                while not closed.is_set() and (data := os.read(fd, READ_CHUNK)):
                    asyncio.run_coroutine_threadsafe(
                        self.channel.send_data(stream, data), loop).result()
            except (OSError, HullError, RuntimeError, asyncio.CancelledError):
                pass  # the fifo or the channel broke: treat as EOF
            finally:
                if fd >= 0:
                    os.close(fd)
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.channel.close_outbound(stream), loop)

        # A daemon thread: an open() waiting for a writer that never comes must not keep
        # the shim alive.
        threading.Thread(target=pump, name=f"stdin-{stream}", daemon=True).start()

    async def close_stdin(self) -> None:
        """CloseIO: the process sees EOF on stdin."""
        if self.streams.stdin is None or self._stdin_closed.is_set():
            return
        self._stdin_closed.set()
        await self.channel.close_outbound(self.streams.stdin)
        self._wake_stdin_reader()

    def _wake_stdin_reader(self) -> None:
        # A pump blocked in open() waits for a writer: be that writer for a moment.
        with contextlib.suppress(OSError):
            os.close(os.open(self.paths.stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every output stream closed and its bytes were written."""
        try:
            async with asyncio.timeout(timeout):
                for inbound in self._outputs:
                    await inbound.wait_closed()
        except TimeoutError:
            log.warning("output of %s not drained after %ss", self.paths.stdout, timeout)

    def close_fds(self) -> None:
        if self.paths.stdin and not self._stdin_closed.is_set():
            self._stdin_closed.set()
            self._wake_stdin_reader()
        for inbound in self._outputs:
            if not inbound.closed.is_set():
                inbound.abort()
        for fd in self._out_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out_fds.clear()
        if self._logger is not None:
            self._logger.close()
            self._logger = None
