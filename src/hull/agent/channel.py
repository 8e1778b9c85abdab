"""Frame I/O on the one host<->guest channel fd: read, decode, queue and write frames.

Three modes:

- the guest's virtio-serial port (found by its name under /sys/class/virtio-ports).
  Reads return EOF (poll: HUP) while no host is connected, so EOF means "wait 20 ms and
  read again", not "closed". A framing error closes the port and reopens it.
- vsock (``hull.vsock_port=N`` on the kernel command line): the agent listens on that
  AF_VSOCK port and serves one connection at a time, from the host's CID only (a process
  in the guest, a container's too, can reach the port through the loopback transport).
  EOF or a framing error ends the connection; a new one from the host replaces the
  current one (a host that lost its end reconnects).
- an fd handed over by a test (a socketpair end): EOF or a framing error ends the agent.

Reads go into one preallocated buffer (``readv``), which on the virtio port is far faster
than ``os.read`` in a loop (each read returns at most 4 KiB there). Writes go through a
queue flushed with ``writev``; its size is bounded by the peer's stream windows plus the
control messages, so there is no unbounded buffering here.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable

from hull.agent.log import log, mark
from hull.agent.loop import Loop, Timer
from hull.agentapi import framing

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    import _socket

PORT_NAME = "hull.agent"
RETRY_DELAY = 0.02
#: The only peer a vsock channel accepts in the guest (VMADDR_CID_HOST).
VSOCK_HOST_CID = 2
_READ_SIZE = 256 * 1024
_READS_PER_WAKEUP = 64
_WRITEV_MAX = 64
#: virtio_console takes at most 32 KiB per write(): larger payloads are queued as 32 KiB
#: views, so one writev() passes up to _WRITEV_MAX of them (the driver writes iovec by
#: iovec) instead of one Python loop round per 32 KiB.
_PORT_WRITE = 32 * 1024

FrameHandler = Callable[[framing.Frame], None]


def listen_vsock(port: int) -> _socket.socket:
    """A non-blocking AF_VSOCK socket listening on ``port`` of any local CID."""
    # _socket, not socket: the socket module's import (enum, selectors ...) costs tens of
    # ms at boot under TCG.
    import _socket

    sock = _socket.socket(_socket.AF_VSOCK,
                          _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
    try:
        sock.bind((_socket.VMADDR_CID_ANY, port))
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def find_port(name: str = PORT_NAME, sysfs: str = "/sys/class/virtio-ports") -> str | None:
    """/dev/<vportNpM> of the virtio-serial port with that name, or None (not there yet)."""
    try:
        ports = os.listdir(sysfs)
    except FileNotFoundError:
        return None
    for port in sorted(ports):
        try:
            with open(f"{sysfs}/{port}/name") as fh:
                if fh.read().strip() == name:
                    return f"/dev/{port}"
        except OSError:
            continue
    return None


class Channel:
    """The channel fd, its decoder and its write queue.

    ``on_frame`` gets every decoded frame and may raise :class:`framing.FrameError` for a
    frame that breaks the protocol; ``on_reset`` is called when the session ends (host
    disconnected or protocol error), so the server forgets its per-session state.
    """

    def __init__(self, loop: Loop, on_frame: FrameHandler, on_reset: Callable[[], None],
                 fd: int | None = None, vsock_port: int | None = None,
                 vsock_peer: int | None = VSOCK_HOST_CID) -> None:
        """``fd``: serve that fd; else ``vsock_port``: listen there for connections from
        ``vsock_peer`` (None: from any CID, for tests); else the virtio-serial port."""
        self._loop = loop
        self._on_frame = on_frame
        self._on_reset = on_reset
        self._fixed = fd is not None
        self.fd = -1 if fd is None else fd
        self._vsock_port = vsock_port
        self._vsock_peer = vsock_peer
        #: the listening socket in vsock mode
        self._listener: _socket.socket | None = None
        self._decoder = framing.Decoder()
        self._wq: deque[bytes | memoryview] = deque()
        self.queued = 0
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._retry: Timer | None = None
        self._waiting_logged = False
        #: exit status for the agent when a fixed fd ends (0: peer closed, 1: protocol error)
        self.exit_status = 0

    # ------------------------------------------------------------------ connection

    def start(self) -> None:
        if self._fixed:
            os.set_blocking(self.fd, False)
            self._loop.set_reader(self.fd, self._on_readable)
        elif self._vsock_port is not None:
            self._listen()
        else:
            self._open_port()

    def _listen(self) -> None:
        assert self._vsock_port is not None
        self._retry = None
        try:
            sock = listen_vsock(self._vsock_port)
        except OSError as exc:
            self._retry_later(f"vsock port {self._vsock_port}: {exc.strerror}; retrying",
                              self._listen)
            return
        self._listener = sock
        self._loop.set_reader(sock.fileno(), self._accept)
        mark("port")

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                # _accept(): the fd and the peer's (cid, port); typeshed lacks it
                fd, (cid, port) = self._listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as exc:  # e.g. ECONNABORTED: that peer is gone already
                log(f"vsock accept: {exc.strerror}")
                return
            if self._vsock_peer is not None and cid != self._vsock_peer:
                log(f"vsock: refused a connection from cid {cid} port {port}")
                os.close(fd)
                continue
            if self.fd >= 0:
                log("vsock: a new host connection replaces the current one")
                self._hang_up()
            os.set_blocking(fd, False)
            self.fd = fd
            self._loop.set_reader(fd, self._on_readable)

    def _hang_up(self) -> None:
        """vsock: end the connection and its session; the listener stays."""
        self._loop.close(self.fd)
        self.fd = -1
        self._end_session()

    def _lost(self) -> None:
        """EOF or a write error: the host side is gone."""
        if self._fixed:
            self._close_fixed()
        elif self._listener is not None:
            self._hang_up()
        else:
            self._loop.set_writer(self.fd, None)
            self._disconnected()

    def _retry_later(self, why: str, again: Callable[[], None]) -> None:
        """Call ``again`` in RETRY_DELAY seconds; log ``why`` the first time only."""
        if not self._waiting_logged:
            log(why)
            self._waiting_logged = True
        self._retry = self._loop.call_later(RETRY_DELAY, again)

    def _open_port(self) -> None:
        self._retry = None
        path = find_port()
        if path is None:
            self._retry_later(f"waiting for the virtio-serial port {PORT_NAME}",
                              self._open_port)
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            log(f"open {path}: {exc.strerror}")
            self._retry = self._loop.call_later(RETRY_DELAY, self._open_port)
            return
        mark("port")
        self._probe()

    def _probe(self) -> None:
        """Read once: data or EAGAIN means a host is connected, EOF means not yet."""
        self._retry = None
        self._loop.set_reader(self.fd, self._on_readable)
        self._on_readable()

    def _disconnected(self) -> None:
        """EOF on the port: no host (any more). Drop the session and poll for a new one."""
        self._loop.forget(self.fd)
        self._end_session()
        self._retry = self._loop.call_later(RETRY_DELAY, self._probe)

    def _end_session(self) -> None:
        had_session = self._decoder.buffered or self._wq
        self._decoder = framing.Decoder()
        self._wq.clear()
        self.queued = 0
        if had_session:
            log("host disconnected")
        self._on_reset()

    def _drop(self, reason: str) -> None:
        """Protocol error: the byte stream cannot be trusted any more."""
        log(f"channel: {reason}")
        if self._fixed:
            self.exit_status = 1
            self._close_fixed()
            return
        if self._listener is not None:
            self._hang_up()
            return
        self._loop.close(self.fd)
        self.fd = -1
        self._end_session()
        self._retry = self._loop.call_later(RETRY_DELAY, self._open_port)

    def _close_fixed(self) -> None:
        self._loop.close(self.fd)
        self.fd = -1
        self._wq.clear()
        self.queued = 0
        self._loop.running = False

    # ------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            if self.fd < 0:
                return
            try:
                n = os.readv(self.fd, [self._buf])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                n = 0
                log(f"channel read: {exc.strerror}")
            if n == 0:
                self._lost()
                return
            try:
                # feed() only appends its argument to a bytearray: a view saves a copy.
                for frame in self._decoder.feed(self._view[:n]):  # type: ignore[arg-type]
                    self._on_frame(frame)
                    if self.fd < 0:  # a handler ended the channel (shutdown)
                        return
            except framing.FrameError as exc:
                self._drop(str(exc))
                return

    # ------------------------------------------------------------------ writing

    def send(self, frame: framing.Frame) -> None:
        self.send_parts(frame.kind, frame.stream, frame.payload)

    def send_parts(self, kind: framing.Kind, stream: int, payload: bytes) -> None:
        if self.fd < 0:
            return
        header = framing.HEADER.pack(kind, 0, 0, stream, len(payload))
        self._wq.append(header)
        self.queued += len(header)
        if payload:
            if len(payload) > _PORT_WRITE:
                view = memoryview(payload)
                self._wq.extend(view[i:i + _PORT_WRITE]
                                for i in range(0, len(payload), _PORT_WRITE))
            else:
                self._wq.append(payload)
            self.queued += len(payload)
        self._flush()

    def _flush(self) -> None:
        wq = self._wq
        while wq:
            chunk = [wq[i] for i in range(min(len(wq), _WRITEV_MAX))]
            try:
                n = os.writev(self.fd, chunk)
            except BlockingIOError:
                self._loop.set_writer(self.fd, self._flush)
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log(f"channel write: {exc.strerror}")
                self._lost()
                return
            self.queued -= n
            while n:
                head = wq[0]
                if n >= len(head):
                    n -= len(head)
                    wq.popleft()
                else:
                    wq[0] = memoryview(head)[n:]
                    n = 0
        if self.fd >= 0:
            self._loop.set_writer(self.fd, None)

    def flush_blocking(self, timeout: float) -> None:
        """Write out the queue before the agent powers off (or exits)."""
        import select

        if self.fd < 0:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        waited = 0.0
        while self._wq and waited < timeout:
            if not poller.poll(50):
                waited += 0.05
                continue
            self._flush()
