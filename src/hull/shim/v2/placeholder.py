"""The host process whose pid containerd sees for a task.

containerd and CRI want a real host pid per task: CRI joins ``/proc/<sandbox task
pid>/ns/{net,ipc,uts}`` for the pod's other containers (INTEGRATION.md §2 "CRI pod
grouping"), and ``ctr task ls``, Connect and the events carry it. The processes of a
container live in the guest, so each task (container) gets a tiny placeholder: ``sleep
infinity`` run in the network namespace the spec names (the CNI netns for a pod's
sandbox, ``/proc/<sandbox pid>/ns/net`` for its other containers, a new empty one when
the spec asks for a new namespace without a path). Its argv[0] is ``hull-pause <id>``, so
a leaked one is easy to find. Exec processes report their container's placeholder pid:
they have no host process of their own.

The placeholder dies with the shim (PR_SET_PDEATHSIG) and is killed on task delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
from typing import Any

from hull.errors import HullError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child, between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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
        body = ["bash", "-c", 'exec -a "hull-pause $0" sleep infinity', task_id]
        if path:
            argv = ["nsenter", f"--net={path}", "--", *body]
        elif has_netns:
            argv = ["unshare", "--net", "--", *body]
        else:
            argv = body
        if not shutil.which(argv[0]):
            raise HullError(f"task {task_id}: {argv[0]} is not installed")
        # Started from the event loop's thread: PDEATHSIG follows the thread that forked.
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent,
            start_new_session=True)
        placeholder = cls(proc)
        # nsenter/unshare fail fast (no such netns); sleep runs forever.
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.05)
        except TimeoutError:
            return placeholder
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode(errors="replace").strip()
        raise HullError(f"task {task_id}: cannot enter network namespace {path or '(new)'}: "
                        f"{err or f'exit status {proc.returncode}'}")

    async def stop(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._proc.wait(), 5)
