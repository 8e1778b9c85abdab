"""Processes the agent watches, and the relay of their stdio over the channel's streams.

Flow control (hull.agentapi.framing): a process's pipe is read only while its stream
has send credit, in chunks of at most MAX_DATA_CHUNK, so output waits in the pipe (and
the process blocks) instead of piling up in the agent. Host stdin data is bounded by the
window the host may use; CREDIT goes back as bytes reach the pipe.

A process's ``process_exit`` goes out only once it was reaped AND its output streams
sent CLOSE. Output pipes normally hit EOF when the process dies, but a grandchild that
inherited them may hold them open: after a grace period the agent drains what is
readable and closes the stream anyway.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections import deque
from collections.abc import Callable

from hull.agent.channel import Channel
from hull.agent.log import log
from hull.agent.loop import Loop, Timer
from hull.agentapi import framing
from hull.agentapi.schema import Stdio

_DRAIN_BUDGET = 256 * 1024
#: Pipe buffer of a process's output (the default is 64 KiB): the agent, slow under TCG,
#: then reads up to a whole DATA chunk at a time instead of 64 KiB.
_PIPE_SIZE = framing.MAX_DATA_CHUNK
_EOT = b"\x04"


class Relay:
    """The byte streams of all processes: windows, stream tables, frame dispatch."""

    def __init__(self, loop: Loop, channel: Channel) -> None:
        self.loop = loop
        self.channel = channel
        self.send_window = framing.SendWindow()
        self.recv_window = framing.ReceiveWindow()
        self.outputs: dict[int, OutputStream] = {}
        self.inputs: dict[int, InputStream] = {}
        #: stdin streams of processes that are gone (or never were, for the host): data
        #: the host still sends on them is dropped and credited back, not a protocol error.
        self.retired: set[int] = set()

    def in_use(self, stream: int) -> bool:
        return stream in self.outputs or stream in self.inputs

    def retire_input(self, stream: int) -> None:
        if self.inputs.pop(stream, None) is not None:
            self.recv_window.close(stream)
            self.retired.add(stream)

    def on_frame(self, frame: framing.Frame) -> None:
        """DATA, CLOSE or CREDIT from the host; raises FrameError on a protocol breach."""
        kind, stream = frame.kind, frame.stream
        if kind == framing.Kind.DATA:
            if stream in self.retired:
                if len(frame.payload) > framing.INITIAL_WINDOW:
                    raise framing.FrameError(f"peer overran the window of stream {stream}")
                if frame.payload:
                    self.channel.send(framing.credit_frame(stream, len(frame.payload)))
                return
            self.recv_window.received(stream, len(frame.payload))
            if frame.payload:
                self.inputs[stream].write(frame.payload)
        elif kind == framing.Kind.CREDIT:
            count = framing.credit_value(frame)
            out = self.outputs.get(stream)
            if out is not None:
                self.send_window.grant(stream, count)
                out.resume()
        elif kind == framing.Kind.CLOSE:
            self.retired.discard(stream)
            inp = self.inputs.pop(stream, None)
            if inp is not None:
                self.recv_window.close(stream)
                inp.close()

    def credit(self, stream: int, count: int) -> None:
        if count > 0 and self.recv_window.consumed(stream, count):
            self.channel.send(framing.credit_frame(stream, count))

    def reset(self) -> None:
        """A new host session: the old streams mean nothing to it any more.

        Output is still read (and dropped) so no process blocks on a full pipe; stdin
        pipes are closed, which the processes see as EOF.
        """
        for out in list(self.outputs.values()):
            out.detach()
        for inp in list(self.inputs.values()):
            inp.close_fd()
        self.outputs.clear()
        self.inputs.clear()
        self.retired.clear()
        self.send_window = framing.SendWindow()
        self.recv_window = framing.ReceiveWindow()


class FdRef:
    """An fd shared by a pty's two directions; closed when both are done with it."""

    def __init__(self, loop: Loop, fd: int, users: int) -> None:
        self.loop = loop
        self.fd = fd
        self.users = users

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.fd >= 0:
            self.loop.close(self.fd)
            self.fd = -1


class OutputStream:
    """stdout, stderr or a pty master: the process's output on one stream."""

    def __init__(self, relay: Relay, stream: int, ref: FdRef,
                 on_done: Callable[[OutputStream], None]) -> None:
        self.relay = relay
        self.stream = stream
        self.ref = ref
        self.on_done = on_done
        self.done = False
        self.closing = False  # drain what is readable, then close even without EOF
        self.detached = False  # no host session for it any more: read and drop
        self._budget = _DRAIN_BUDGET
        os.set_blocking(ref.fd, False)
        with contextlib.suppress(OSError):  # a pty master is no pipe: EBADF, leave it
            fcntl.fcntl(ref.fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        relay.send_window.open(stream)
        relay.outputs[stream] = self
        relay.loop.set_reader(ref.fd, self._on_readable)

    def _credit(self) -> int:
        if self.detached:
            return framing.MAX_DATA_CHUNK
        return min(self.relay.send_window.available(self.stream), framing.MAX_DATA_CHUNK)

    def _on_readable(self) -> None:
        self._pump(once=not self.closing)

    def _pump(self, *, once: bool) -> None:
        while not self.done:
            credit = self._credit()
            if credit <= 0:
                self.relay.loop.set_reader(self.ref.fd, None)  # resumed by CREDIT
                return
            try:
                data = os.read(self.ref.fd, credit)
            except BlockingIOError:
                if self.closing:
                    self.finish()
                return
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: a pty master whose slaves are all closed
                    log(f"read stream {self.stream}: {exc.strerror}")
                data = b""
            if not data:
                self.finish()
                return
            if not self.detached:
                self.relay.send_window.consume(self.stream, len(data))
                self.relay.channel.send_parts(framing.Kind.DATA, self.stream, data)
            if self.closing:
                self._budget -= len(data)
                if self._budget <= 0:
                    self.finish()
                    return
            elif once:
                return

    def resume(self) -> None:
        if self.done:
            return
        if self.closing:
            self._pump(once=False)
        else:
            self.relay.loop.set_reader(self.ref.fd, self._on_readable)

    def detach(self) -> None:
        """Stop relaying without a CLOSE: read and drop until EOF."""
        if self.done or self.detached:
            return
        self.detached = True
        self.relay.send_window.close(self.stream)
        if self.relay.outputs.get(self.stream) is self:
            del self.relay.outputs[self.stream]
        self.resume()

    def drain_and_close(self) -> None:
        if not self.done:
            self.closing = True
            self._pump(once=False)

    def finish(self) -> None:
        """Send CLOSE and let go of the fd."""
        if self.done:
            return
        self.done = True
        if self.ref.fd >= 0:
            self.relay.loop.set_reader(self.ref.fd, None)
        if not self.detached:
            self.relay.channel.send_parts(framing.Kind.CLOSE, self.stream, b"")
            self.relay.send_window.close(self.stream)
            if self.relay.outputs.get(self.stream) is self:
                del self.relay.outputs[self.stream]
        self.ref.release()
        self.on_done(self)


class InputStream:
    """Host data for a process's stdin pipe (or its pty master)."""

    def __init__(self, relay: Relay, stream: int, ref: FdRef, *, terminal: bool) -> None:
        self.relay = relay
        self.stream = stream
        self.ref: FdRef | None = ref
        self.terminal = terminal
        self._queue: deque[memoryview] = deque()
        self._eof = False
        os.set_blocking(ref.fd, False)
        relay.retired.discard(stream)
        relay.recv_window.open(stream)
        relay.inputs[stream] = self

    def write(self, payload: bytes) -> None:
        if self.ref is None:
            self.relay.credit(self.stream, len(payload))  # nobody reads it: drop
            return
        self._queue.append(memoryview(payload))
        if len(self._queue) == 1:
            self._flush()

    def _flush(self) -> None:
        assert self.ref is not None
        queue = self._queue
        while queue:
            head = queue[0]
            try:
                n = os.write(self.ref.fd, head)
            except BlockingIOError:
                self.relay.loop.set_writer(self.ref.fd, self._flush)
                return
            except OSError:  # EPIPE (reader gone), EIO (pty without slave)
                dropped = sum(len(m) for m in queue)
                queue.clear()
                self.relay.credit(self.stream, dropped)
                self.close_fd()
                return
            self.relay.credit(self.stream, n)
            if n == len(head):
                queue.popleft()
            else:
                queue[0] = head[n:]
        self.relay.loop.set_writer(self.ref.fd, None)
        if self._eof:
            self._end()

    def close(self) -> None:
        """CLOSE from the host: EOF once the queue is written."""
        self._eof = True
        if self.ref is not None and not self._queue:
            self._end()

    def _end(self) -> None:
        if self.terminal and self.ref is not None:
            # A pty has no EOF of its own: ^D ends a read in canonical mode, as a
            # terminal user would type it.
            with contextlib.suppress(OSError):
                os.write(self.ref.fd, _EOT)
        self.close_fd()

    def close_fd(self) -> None:
        if self.ref is not None:
            ref, self.ref = self.ref, None
            if ref.fd >= 0:
                self.relay.loop.set_writer(ref.fd, None)
            ref.release()
            self._queue.clear()


def exit_status(wait_status: int) -> tuple[int, int | None]:
    """(status, signal) in the shell convention: code, or 128+N for death by signal N."""
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        return 128 + sig, sig
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status), None
    return 255, None


class Process:
    """A container's init or exec process as the agent sees it."""

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio, terminal: bool,
                 relay: Relay, grace: float, on_finished: Callable[[Process], None]) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.terminal = terminal
        self.relay = relay
        self.grace = grace
        self.on_finished = on_finished
        self.pid: int | None = None
        self.wait_status: int | None = None
        self.outputs: list[OutputStream] = []
        self.stdin: InputStream | None = None
        self.master: FdRef | None = None
        #: request id of the create/start/exec reply this process's setup decides
        self.pending_rid: int | None = None
        #: setup failed and the host got an error: no exit event, no streams
        self.failed = False
        #: a resize that came before the pty master was taken over
        self.pending_winsize: tuple[int, int] | None = None
        #: an exec with a terminal waits on this pipe until the agent took its pty master
        self.ack_fd: int | None = None
        self.finished = False
        self._grace_timer: Timer | None = None

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.wait_status is None

    def label(self) -> str:
        if not self.exec_id:
            return f"container {self.container_id}"
        return f"exec {self.exec_id} of container {self.container_id}"

    # ------------------------------------------------------------------ stdio

    def attach_pipes(self, stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        """The agent's ends: stdin's write end, stdout's and stderr's read ends."""
        loop = self.relay.loop
        if stdin is not None and self.stdio.stdin is not None:
            self.stdin = InputStream(self.relay, self.stdio.stdin, FdRef(loop, stdin, 1),
                                     terminal=False)
        for fd, stream in ((stdout, self.stdio.stdout), (stderr, self.stdio.stderr)):
            if fd is not None and stream is not None:
                self.outputs.append(OutputStream(self.relay, stream, FdRef(loop, fd, 1),
                                                 self._output_done))

    def attach_terminal(self, master: int) -> None:
        """The pty master taken over from the child: stdin in, output on stdout."""
        loop = self.relay.loop
        stdin, stdout = self.stdio.stdin, self.stdio.stdout
        ref = FdRef(loop, master, (stdin is not None) + (stdout is not None) + 1)
        self.master = ref  # the process's own reference, for resize_pty
        if stdin is not None:
            self.stdin = InputStream(self.relay, stdin, ref, terminal=True)
        if stdout is not None:
            self.outputs.append(OutputStream(self.relay, stdout, ref, self._output_done))

    # ------------------------------------------------------------------ lifecycle

    def reaped(self, wait_status: int) -> None:
        self.wait_status = wait_status
        if self.stdin is not None and self.master is None:
            self.stdin.close_fd()  # nobody will read it any more
        if any(not o.done for o in self.outputs):
            self._grace_timer = self.relay.loop.call_later(self.grace, self._grace_over)
        self._maybe_finish()

    def _grace_over(self) -> None:
        self._grace_timer = None
        for out in list(self.outputs):
            out.drain_and_close()

    def _output_done(self, out: OutputStream) -> None:
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.finished or self.wait_status is None:
            return
        if any(not o.done for o in self.outputs):
            return
        self.finished = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        if self.stdin is not None:
            self.stdin.close_fd()  # the stream itself stays open until the host closes it
        if self.master is not None:
            master, self.master = self.master, None
            master.release()
        self.on_finished(self)

    def close_outputs(self) -> None:
        """CLOSE every output stream now, data still in the pipes or not (delete)."""
        for out in list(self.outputs):
            out.finish()

    def silence(self) -> None:
        """Drop the process's streams without a word to the host (failed setup, removal)."""
        for out in self.outputs:
            out.detach()
        if self.stdin is not None:
            self.stdin.close_fd()
            self.relay.retire_input(self.stdin.stream)
