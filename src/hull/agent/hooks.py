"""OCI createContainer and startContainer hooks, run in the container's namespaces.

runtime-spec config.md ("POSIX-platform Hooks"): createContainer hooks run during create,
after the container's mounts are set up and before pivot_root; startContainer hooks run
during start, before the user process is executed; both in the container's namespaces,
and a failing one fails the operation. The container's init (spawn.py, helper B) runs
them, so they get its namespaces, cgroup and (for startContainer) its credentials, as in
runc. Their path and args refer to the container's filesystem: the guest's own root
holds nothing a hook could use, so a createContainer hook is chrooted into the rootfs
(B itself has not pivoted yet); a startContainer hook runs after the pivot.

Each hook gets the state JSON on stdin, its ``env`` as its whole environment, and is
killed after ``timeout`` seconds. Its stdout and stderr go to one pipe whose last line
ends up in the error the host shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import time

from hull.agentapi import wirejson
from hull.agentapi.schema import Hook, hook_failure

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from typing import Any

_TAIL = 4096  # bytes of a hook's output kept for the error message
_DEFAULT_PIPE = 65536


class HookFailed(Exception):
    """A hook failed; the message names the hook kind, index and path."""


def run_all(kind: str, hooks: list[Hook], state: dict[str, Any], root: str | None = None
            ) -> None:
    """Run hooks one after the other; the first failure raises HookFailed.

    root: chroot the hook there first (createContainer, before the init's pivot_root).
    """
    if not hooks:
        return
    data = wirejson.dumps(state)
    for i, hook in enumerate(hooks):
        problem = run_one(hook, data, root)
        if problem:
            raise HookFailed(f"{kind} hook #{i} ({hook.path}) failed: {problem}")


def run_one(hook: Hook, data: bytes, root: str | None) -> str | None:
    """Run one hook with data on its stdin; None when it succeeded, else why not."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        # All of the state goes into the pipe before the hook starts: no writer to block
        # and no SIGPIPE if the hook never reads it (a control frame is at most 1 MiB).
        if len(data) > _DEFAULT_PIPE:
            fcntl.fcntl(in_w, fcntl.F_SETPIPE_SZ, len(data))
        view = memoryview(data)
        while view:
            view = view[os.write(in_w, view):]
        os.close(in_w)
        in_w = -1
        pid = os.fork()
        if pid == 0:
            _child(hook, root, in_r, out_w)
    finally:
        for fd in (in_r, in_w, out_w):
            if fd >= 0:
                os.close(fd)
    try:
        status, output = _wait(pid, out_r, hook.timeout)
    finally:
        os.close(out_r)
    if status is None:
        return f"timed out after {hook.timeout}s"
    return None if status == 0 else hook_failure(status, output)


def _child(hook: Hook, root: str | None, stdin: int, output: int) -> None:
    """The hook's process: never returns."""
    code = 126
    try:
        os.dup2(stdin, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        if root is not None:
            os.chroot(root)
            os.chdir("/")
        env = dict(item.split("=", 1) for item in hook.env if "=" in item)
        os.execve(hook.path, hook.args or [hook.path], env)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        text = f"{hook.path}: {(exc.strerror or str(exc)).lower()}\n"
        with contextlib.suppress(OSError):
            os.write(2, text.encode(errors="replace"))
    finally:
        os._exit(code)


def _wait(pid: int, out_r: int, timeout: int | None) -> tuple[int | None, bytes]:
    """(exit code as waitstatus_to_exitcode gives it, or None on timeout; output tail).

    Waits for the process, not for EOF on its output: a daemon it left behind may hold
    the pipe open.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pidfd = os.pidfd_open(pid)
    tail = b""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(out_r, select.POLLIN)
    os.set_blocking(out_r, False)
    try:
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic())
                                                                * 1000))
            events = dict(poller.poll(wait_ms))
            if out_r in events:
                chunk = _read(out_r)
                if chunk:
                    tail = (tail + chunk)[-_TAIL:]
                else:
                    poller.unregister(out_r)
            if pidfd in events:
                break
            if not events and deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None, tail
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    while chunk := _read(out_r):
        tail = (tail + chunk)[-_TAIL:]
    return os.waitstatus_to_exitcode(status), tail


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""
