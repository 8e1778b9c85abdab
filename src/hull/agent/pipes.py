"""Helpers of the agent's request handlers: stdio pipes of a new process, pty sizes."""

from __future__ import annotations

import contextlib
import fcntl
import os

from hull.agent import spawn
from hull.agent import syscalls as sc
from hull.agent.process import Process
from hull.agentapi import schema


class Pipes:
    """stdio pipes of a new process (none with a terminal: the child opens a pty)."""

    def __init__(self, stdio: schema.Stdio, terminal: bool) -> None:
        self._pairs: list[tuple[int, int] | None] = []
        try:
            for stream in (stdio.stdin, stdio.stdout, stdio.stderr):
                self._pairs.append(None if stream is None or terminal else os.pipe())
        except OSError:
            self._close([p for pair in self._pairs if pair for p in pair])
            raise
        stdin, stdout, stderr = self._pairs
        self.child = spawn.Stdio(stdin[0] if stdin else None, stdout[1] if stdout else None,
                                 stderr[1] if stderr else None)
        self.agent = (stdin[1] if stdin else None, stdout[0] if stdout else None,
                      stderr[0] if stderr else None)

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    def close_child_ends(self) -> None:
        self._close([fd for fd in (self.child.stdin, self.child.stdout, self.child.stderr)
                     if fd is not None])

    def close_agent_ends(self) -> None:
        self._close([fd for fd in self.agent if fd is not None])

    def attach(self, proc: Process) -> None:
        proc.attach_pipes(*self.agent)


def release(proc: Process) -> None:
    """Let an exec's child go on to execve (its pty master is taken, or never will be)."""
    if proc.ack_fd is not None:
        with contextlib.suppress(OSError):
            os.write(proc.ack_fd, b"k")
        os.close(proc.ack_fd)
        proc.ack_fd = None


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, sc.TIOCSWINSZ, sc.winsize(rows, cols))


def unmount(path: str) -> None:
    with contextlib.suppress(OSError):
        sc.umount2(path, sc.MNT_DETACH)
