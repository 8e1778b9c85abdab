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

log = logging.getLogger("hull.forkserver")
SOCKET = "forkserver.sock"
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
REQUEST_TIMEOUT = 5.0


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
                    _handle(conn, listener, run, (wake_r, wake_w))


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _handle(conn: socket.socket, listener: socket.socket,
            run: Callable[[list[str]], int], wake: tuple[int, int]) -> None:
    from hull.runtime.pool import recv_line  # the server's: the callers need none of pool

    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT)
        line, fds = recv_line(conn, 2)
        request = json.loads(line)
        argv = [str(a) for a in request["argv"]]
        cwd, env = str(request["cwd"]), {str(k): str(v) for k, v in request["env"].items()}
        umask = int(request["umask"])
        if request.get("code") != code_id():
            raise ValueError("started by another Hull installation")
        if len(fds) != 2:
            raise ValueError(f"{len(fds)} fds instead of 2")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for fd in (*wake, listener.fileno(), conn.fileno()):
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Its command line stays the daemon's; ps -o comm, top and pgrep show this.
            ctypes.CDLL(None).prctl(PR_SET_NAME, b"hull-proxy", 0, 0, 0)
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(fds[1], 2)
            os.close(devnull)
            os.close(fds[1])
            os.set_inheritable(fds[0], False)
            os.chdir(cwd)
            os.umask(umask)
            os.environ.clear()
            os.environ.update(env)
            status = run([str(fds[0]) if a == "{ready}" else a for a in argv])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("forked proxy failed")
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


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
