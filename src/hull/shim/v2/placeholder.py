"""The host process whose pid containerd sees for a task.

containerd and CRI want a real host pid per task: CRI joins ``/proc/<sandbox task
pid>/ns/{net,ipc,uts}`` for the pod's other containers (INTEGRATION.md §2 "CRI pod
grouping"), and ``ctr task ls``, Connect and the events carry it. The processes of a
container live in the guest, so each task (container) gets a tiny placeholder: ``sleep
infinity`` run in the network namespace the spec names (the CNI netns for a pod's
sandbox, ``/proc/<sandbox pid>/ns/net`` for its other containers, a new empty one when
the spec asks for a new namespace without a path). Its argv[0] is ``hull-pause <id>``, so
a leaked one is easy to find. The child enters the namespace itself between fork and
exec (setns, or unshare for a new one): one exec, no nsenter and shell, and a namespace
it cannot enter fails the spawn at once instead of after a grace period. Exec processes
report their container's placeholder pid: they have no host process of their own.

The placeholder dies with the shim (PR_SET_PDEATHSIG) and is killed on task delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from hull.errors import HullError

PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000


def _child_setup(netns_fd: int, new_netns: bool) -> Callable[[], None]:
    """In the child, between fork and exec: die with the shim, enter the namespace."""
    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if netns_fd >= 0 and libc.setns(netns_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        if new_netns and libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare")

    return setup


def network_namespace(spec: dict[str, Any]) -> tuple[bool, str]:
    """(the spec has a network namespace, its path or "") from linux.namespaces."""
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            return True, path if isinstance(path, str) else ""
    return False, ""


class Placeholder:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def spawn(cls, task_id: str, spec: dict[str, Any]) -> Placeholder:
        has_netns, path = network_namespace(spec)
        sleep = shutil.which("sleep")
        if not sleep:
            raise HullError(f"task {task_id}: sleep is not installed")
        where = path or "(new)"
        netns_fd = -1
        try:
            if path:
                netns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            # Started from the event loop's thread: PDEATHSIG follows the thread that
            # forked. The child's setup runs before subprocess closes the other fds.
            proc = await asyncio.create_subprocess_exec(
                f"hull-pause {task_id}", "infinity", executable=sleep,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=_child_setup(netns_fd, has_netns and not path),
                start_new_session=True)
        except (OSError, subprocess.SubprocessError) as exc:
            # A failure in the child (setns refused: not a network namespace) comes back
            # as a SubprocessError without its errno.
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                   else "setns or unshare failed in the placeholder")
            raise HullError(f"task {task_id}: cannot enter network namespace {where}: "
                            f"{why}") from exc
        finally:
            if netns_fd >= 0:
                os.close(netns_fd)
        return cls(proc)

    async def stop(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._proc.wait(), 5)
