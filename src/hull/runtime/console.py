"""The console socket contract (runc docs/terminals.md): a host pty whose master goes to
the caller over an AF_UNIX socket, as exactly one SCM_RIGHTS message with one fd.

A terminal's shim imports it: ``_socket``, not socket (with enum, functools and
collections; hull.runtime.shim says why).
"""

from __future__ import annotations

import _socket
import fcntl
import os
import struct
import termios
import tty

from hull.errors import HullError


def open_pty() -> tuple[int, int, str]:
    """(master, slave, slave name); the slave is raw: the guest's pty does line discipline."""
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def send_master(socket_path: str, master: int, name: str) -> None:
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(socket_path)
            sock.sendmsg([name.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                            struct.pack("i", master))])
        finally:
            sock.close()
    except OSError as exc:
        raise HullError(f"console socket {socket_path}: {exc.strerror or exc}") from exc


def window_size(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def make_controlling(slave: int) -> None:
    """Make ``slave`` our controlling tty, so a resize on the master sends us SIGWINCH."""
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
