"""Relaying a process's stdio between host file descriptors and channel streams.

Used by `hull run` (its own fds 0-2) and by shims (the fds they inherited from the
client). Host fds may be pipes, ttys, files or sockets, so blocking I/O runs in worker
threads: a regular file cannot be polled, and a blocking write to a slow reader simply
holds back the stream's credit, which in turn holds back the process in the guest.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.blocking import READ_CHUNK, write_all
from hull.proxy.channel import AgentChannel, InboundStream
from hull.runtime.shim import HostStdio


def relay_output(channel: AgentChannel, fd: int) -> InboundStream:
    """A new inbound stream whose bytes are written to host ``fd`` (in a worker thread:
    a blocking write holds back the stream's credit, and with it the guest process)."""
    loop = asyncio.get_running_loop()

    async def consume(data: bytes) -> None:
        await loop.run_in_executor(None, write_all, fd, data)

    return channel.open_inbound(consume)


@dataclass
class ProcessIO:
    channel: AgentChannel
    host: HostStdio
    streams: schema.Stdio = field(default_factory=schema.Stdio)
    _outputs: list[InboundStream] = field(default_factory=list)
    _stdin_thread: threading.Thread | None = None

    @classmethod
    def open(cls, channel: AgentChannel, host: HostStdio) -> ProcessIO:
        io = cls(channel, host)
        stdin = channel.open_outbound() if host.stdin is not None else None
        stdout = io._output(host.stdout)
        # With a terminal the pty merges both outputs onto the stdout stream.
        stderr = None if host.terminal else io._output(host.stderr)
        io.streams = schema.Stdio(stdin, stdout, stderr)
        return io

    def _output(self, fd: int | None) -> int | None:
        if fd is None:
            return None
        inbound = relay_output(self.channel, fd)
        self._outputs.append(inbound)
        return inbound.stream

    def start_input(self) -> None:
        """Start copying host stdin to the process (call once the process exists)."""
        if self.host.stdin is None or self.streams.stdin is None:
            return
        loop = asyncio.get_running_loop()
        fd, stream = self.host.stdin, self.streams.stdin

        def pump() -> None:
            try:
                while data := os.read(fd, READ_CHUNK):
                    asyncio.run_coroutine_threadsafe(
                        self.channel.send_data(stream, data), loop).result()
            except (OSError, HullError, RuntimeError, asyncio.CancelledError):
                pass  # host stdin broke or the channel/loop ended: treat as EOF
            close = self.channel.close_outbound(stream)
            try:
                asyncio.run_coroutine_threadsafe(close, loop)
            except RuntimeError:  # the loop ended first: nothing left to tell the guest
                close.close()

        # A daemon thread: a read blocked on a terminal must not keep Hull alive.
        self._stdin_thread = threading.Thread(target=pump, name=f"stdin-{stream}", daemon=True)
        self._stdin_thread.start()

    async def drain(self) -> None:
        """Wait until every output stream is closed and all its bytes were written."""
        for inbound in self._outputs:
            await inbound.wait_closed()
