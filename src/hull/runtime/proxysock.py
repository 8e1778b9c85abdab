"""Reaching a CLI-mode sandbox's proxy (``<state dir>/proxy.sock``), and the readiness
line helpers send to the `hull` command that started them.

Lean on purpose: shims, `hull exec` and every CLI command that talks to a sandbox import
this module, and a shim keeps what it imports for as long as its container process lives
(docs/performance.md, host memory). Standard library and hull.errors only.
"""

from __future__ import annotations

import contextlib
import os
import socket

from hull.errors import HullError

TYPE_CHECKING = False
if TYPE_CHECKING:  # pathlib alone (with urllib.parse, ipaddress) costs a shim ~0.4 MiB
    from collections.abc import Iterator

    from hull.runtime.state import ContainerDir

    PathLike = str | os.PathLike[str]

SOCKET_NAME = "proxy.sock"


@contextlib.contextmanager
def short_path(path: PathLike) -> Iterator[str]:
    """A name for ``path`` short enough for sun_path (108 bytes), valid in the block.

    Container ids from containerd are 64 characters and --root paths can be long: then
    the directory is opened and the socket reached through the fd's /proc link, closed
    after the bind or connect (`hull monitor` connects at every scrape).
    """
    name = os.fspath(path)
    if len(name) < 100:
        yield name
        return
    fd = os.open(os.path.dirname(name), os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(name)}"
    finally:
        os.close(fd)


def connect(cdir: ContainerDir) -> socket.socket:
    """A connected socket to the proxy of ``cdir``'s sandbox."""
    return connect_unix(cdir.path / SOCKET_NAME, f"container {cdir.id}: its proxy")


def connect_unix(path: PathLike, who: str) -> socket.socket:
    """A connected socket to ``path``, where ``who`` (named in the error) serves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
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
        with contextlib.suppress(OSError):
            os.close(fd)
    return True
