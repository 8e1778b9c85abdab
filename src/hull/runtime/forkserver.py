"""A fork server for sandbox proxies, kept by the factory's daemon (hull.runtime.pool;
factory.fork_server, with or without a pool).

A `hull proxy` lives as long as its sandbox and is mostly its imports (asyncio, QMP, the
runtime): ~15 MiB of private memory in each, and ~0.15 s of CPU to import them at every
`hull create`. The fork server imports all of that once, freezes it (gc.freeze, so the
collector never writes to those objects) and forks a proxy per request: the proxies
share those pages with the server and with each other, copy-on-write, and start at once.

The server is a child of the pool daemon, forked before the daemon's event loop exists,
with no descriptor of the daemon's but stdio (not its lock, which would keep the pool
"running" for ever); it dies with the daemon (PR_SET_PDEATHSIG). It is a subreaper and
reaps its proxies. A proxy it forks lives on without it. Its command line is the pool
daemon's (a fork does not change it); its name (``ps -o comm``, ``pgrep hull-proxy``)
says what it is.

Protocol (``<template_dir>/forkserver.sock``, mode 0600, root's): one JSON line
``{"argv": [...], "cwd": str, "env": {...}, "umask": n, "code": str}`` with two fds
attached, the proxy's ready pipe and its stderr (proxy.log); ``"{ready}"`` in argv
stands for the ready fd's number in the proxy. Answer ``{"pid": n}`` or ``{"error":
why}``. ``code`` names the Hull installation the caller runs (:func:`code_id`): a server
started by an older installation refuses, and the caller starts its proxy the usual way.
The server forks as soon as it accepts a connection: the child reads the request,
answers, and becomes the proxy or exits (:func:`_fork_for` says why).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import select
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import hull

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # typeshed has no _signal; signal's functions are its own
else:
    import _signal

log = logging.getLogger("hull.forkserver")
SOCKET = "forkserver.sock"
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
REQUEST_TIMEOUT = 5.0
#: Bound of a request line (the caller's environment is most of it).
MAX_REQUEST = 1 << 20


def code_id() -> str:
    """Which Hull this is: version and installed package directory, with its mtime (an
    upgrade in place changes it)."""
    where = Path(hull.__file__).parent
    return f"{hull.__version__} {where} {where.stat().st_mtime_ns}"


def start(path: Path, run: Callable[[list[str]], int], preload: Callable[[], None]) -> int:
    """Fork the server; its pid. ``preload`` imports what proxies need; ``run(argv)``
    is a proxy's main (the `hull` command line, in the forked child)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        status = _serve(path, run, preload, parent)
    except BaseException:  # never back into the caller's code in the child
        log.exception("fork server failed")
    finally:
        os._exit(status)


def _serve(path: Path, run: Callable[[list[str]], int], preload: Callable[[], None],
           parent: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 0  # the daemon died before the death signal was armed
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the daemon's lock above all
    preload()
    own_code = code_id()  # what this server runs, whatever is installed later
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(64)
        while True:
            ready, _, _ = select.select([listener.fileno(), wake_r], [], [])
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                _reap()
            if listener.fileno() in ready:
                conn, _ = listener.accept()
                with conn:
                    _fork_for(conn, (listener.fileno(), wake_r, wake_w), run, libc, own_code)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _fork_for(conn: socket.socket, server_fds: tuple[int, ...],
              run: Callable[[list[str]], int], libc: ctypes.CDLL, own_code: str) -> None:
    """Fork at once; the child reads and checks the request, answers with its own pid
    and becomes the proxy, or answers why not and exits.

    The server does as little as it can between forks: every page it writes after a fork
    stays a private copy in the children forked before (a page they all shared until
    then). Reading and parsing the request in the server cost each proxy ~0.5 MiB that
    way (docs/performance.md, host memory)."""
    try:
        pid = os.fork()
    except OSError as exc:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": f"fork: {exc.strerror}"}).encode() + b"\n")
        return
    if pid:
        return
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        for fd in server_fds:
            os.close(fd)
        _signal.signal(signal.SIGCHLD, _signal.SIG_DFL)  # _signal: no enum conversions
        request = _read_request(conn, own_code)
        if request is None:
            status = 0
            return
        argv, cwd, env, umask, (ready_fd, stderr_fd) = request
        # Its command line stays the daemon's; ps -o comm, top and pgrep show this.
        libc.prctl(PR_SET_NAME, b"hull-proxy", 0, 0, 0)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(stderr_fd, 2)
        os.close(devnull)
        os.close(stderr_fd)
        os.set_inheritable(ready_fd, False)
        os.chdir(cwd)
        os.umask(umask)
        _set_environ(env)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        conn.close()
        status = run([str(ready_fd) if a == "{ready}" else a for a in argv])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("forked proxy failed")
    finally:
        os._exit(status)


def _read_request(conn: socket.socket, own_code: str
                  ) -> tuple[list[str], str, dict[str, str], int, list[int]] | None:
    """The request on ``conn`` (argv, cwd, env, umask, [ready fd, stderr fd]); None
    after answering why it cannot be served."""
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT)
        line = _recv_line(conn, fds)
        request = json.loads(line)
        argv = [str(a) for a in request["argv"]]
        cwd, env = str(request["cwd"]), {str(k): str(v) for k, v in request["env"].items()}
        umask = int(request["umask"])
        if request.get("code") != own_code:
            raise ValueError("started by another Hull installation")
        if len(fds) != 2:
            raise ValueError(f"{len(fds)} fds instead of 2")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
        for fd in fds:
            os.close(fd)
        return None
    return argv, cwd, env, umask, fds


def _recv_line(conn: socket.socket, fds: list[int]) -> bytes:
    """The request line, in large reads (the child owns the connection: nothing after
    the line matters), with the fds that came along added to ``fds`` (at most 2)."""
    chunks: list[bytes] = []
    size = 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        data, got, flags, _ = socket.recv_fds(conn, 1 << 16, 2)
        fds.extend(got)
        if flags & socket.MSG_CTRUNC or len(fds) > 2:
            raise ValueError("more than 2 file descriptors sent")
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if size > MAX_REQUEST:
            raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    return b"".join(chunks)


def _set_environ(env: dict[str, str]) -> None:
    """Make os.environ ``env``, changing only what differs: the server's environment is
    usually the caller's, and every string replaced would be a page written."""
    for key in [key for key in os.environ if key not in env]:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def spawn(path: Path, argv: list[str], ready_fd: int, stderr_fd: int) -> int | None:
    """A proxy forked by the server at ``path`` (argv: a `hull` command line, "{ready}"
    for the ready fd); its pid, or None when there is no server or it refused (the
    caller then starts the proxy itself)."""
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                          "umask": _umask(), "code": code_id()}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(REQUEST_TIMEOUT)
            sock.connect(str(path))
            socket.send_fds(sock, [request], [ready_fd, stderr_fd])
            answer = json.loads(sock.makefile("rb").readline() or b"{}")
    except (OSError, ValueError) as exc:
        log.debug("fork server %s: %s", path, exc)
        return None
    if "pid" not in answer:
        log.info("fork server %s: %s", path, answer.get("error", "no answer"))
        return None
    return int(answer["pid"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
