"""Reaching a CLI-mode sandbox's proxy (``<state dir>/proxy.sock``), and the readiness
line helpers send to the `hull` command that started them.

Lean on purpose: shims, `hull exec` and every CLI command that talks to a sandbox import
this module, and a shim keeps what it imports for as long as its container process lives
(docs/performance.md, host memory). Standard library and hull.errors only, and not
even socket or contextlib (with enum, functools and collections): :func:`connect_unix`
gives a ``_socket.socket``, which has every method the blocking channel uses.
"""

from __future__ import annotations

import _socket
import os

from hull.errors import HullError

TYPE_CHECKING = False
if TYPE_CHECKING:  # pathlib alone (with urllib.parse, ipaddress) costs a shim ~0.4 MiB
    import socket

    from hull.runtime.state import ContainerDir

    PathLike = str | os.PathLike[str]

SOCKET_NAME = "proxy.sock"


class short_path:  # lower case: it was a function (``with short_path(path) as name``)
    """A name for ``path`` short enough for sun_path (108 bytes), valid in the block.

    Container ids from containerd are 64 characters and --root paths can be long: then
    the directory is opened and the socket reached through the fd's /proc link, closed
    after the bind or connect (`hull monitor` connects at every scrape).
    """

    def __init__(self, path: PathLike) -> None:
        self._name = os.fspath(path)
        self._fd: int | None = None

    def __enter__(self) -> str:
        if len(self._name) < 100:
            return self._name
        self._fd = os.open(os.path.dirname(self._name), os.O_PATH | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._fd}/{os.path.basename(self._name)}"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def connect(cdir: ContainerDir) -> socket.socket:
    """A connected socket to the proxy of ``cdir``'s sandbox (a ``socket.socket``: the
    CLI's callers use it as one)."""
    import socket

    sock = connect_unix(cdir.path / SOCKET_NAME, f"container {cdir.id}: its proxy")
    return socket.socket(fileno=sock.detach())


def connect_unix(path: PathLike, who: str) -> _socket.socket:
    """A connected socket to ``path``, where ``who`` (named in the error) serves: a bare
    ``_socket.socket`` (wrap it in ``socket.socket(fileno=s.detach())`` for more)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        with short_path(path) as name:
            sock.connect(name)
    except OSError as exc:
        sock.close()
        raise HullError(f"{who} does not answer ({exc.strerror})") from exc
    return sock


def report(fd: int, message: str) -> bool:
    """Tell the waiting `hull` command how we did; False if it is gone (EPIPE)."""
    try:
        os.write(fd, message.encode()[:4000] + b"\n")
    except OSError:
        return False
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return True
