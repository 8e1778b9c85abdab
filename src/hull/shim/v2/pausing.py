"""Pause and resume of a pod's containers, and thawing what a kill or delete needs.

Two ways to pause (pod.py decides which):

- the whole VM (QMP stop/cont) when the container is the only one running in its
  sandbox: nothing in the guest runs, not even the agent, so every agent call waits
  until the VM continues;
- the container's cgroup in the guest (agent pause_container: cgroup.freeze) when other
  containers of the pod keep running.

A Kill or a Delete of a paused task must not wait for a Resume that may never come:
:meth:`Pauser.thaw` resumes first (publishing ``/tasks/resumed``), then the signal goes
through as to a running task, as ``runc kill`` of a frozen container does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hull.agentapi import schema
from hull.errors import HullError, InvalidState
from hull.runtime.sandbox import Sandbox
from hull.shim.proto import events_pb2
from hull.shim.v2.events import Publisher

log = logging.getLogger("hull.shim.pod")


class Pauser:
    def __init__(self, publisher: Publisher,
                 on_vm_change: Callable[[], None] | None = None) -> None:
        self.publisher = publisher
        #: told after the whole VM stopped or continued (the pod republishes its status)
        self.on_vm_change = on_vm_change
        #: the container whose pause stopped the whole VM ("" when the VM runs)
        self.vm_paused_by = ""
        #: containers frozen in the guest (cgroup.freeze)
        self.frozen: set[str] = set()

    @property
    def vm_paused(self) -> bool:
        return bool(self.vm_paused_by)

    def is_paused(self, cid: str) -> bool:
        return bool(cid) and (cid == self.vm_paused_by or cid in self.frozen)

    async def pause(self, sandbox: Sandbox, cid: str, alone: bool) -> None:
        """Pause ``cid``; ``alone``: no other container of the pod is running."""
        if self.is_paused(cid):
            raise InvalidState(f"container {cid} is already paused")
        if self.vm_paused:
            raise InvalidState(f"the sandbox is paused (by {self.vm_paused_by})")
        if alone:
            assert sandbox.vm is not None
            await sandbox.vm.pause()
            self.vm_paused_by = cid
            self._vm_changed()
        else:
            await sandbox.call(schema.Method.PAUSE_CONTAINER, schema.ContainerRef(cid))
            self.frozen.add(cid)
        self.publisher.publish(events_pb2.TaskPaused(container_id=cid))

    async def resume(self, sandbox: Sandbox, cid: str) -> None:
        if not self.is_paused(cid):
            raise InvalidState(f"container {cid} is not paused")
        if cid == self.vm_paused_by:
            assert sandbox.vm is not None
            await sandbox.vm.resume()
            self.vm_paused_by = ""
            self._vm_changed()
        else:
            await sandbox.call(schema.Method.RESUME_CONTAINER, schema.ContainerRef(cid))
            self.frozen.discard(cid)
        self.publisher.publish(events_pb2.TaskResumed(container_id=cid))

    async def thaw(self, sandbox: Sandbox | None, cid: str) -> None:
        """Before a kill of ``cid`` or any agent call: resume the VM and ``cid``."""
        if sandbox is None:
            return
        # The VM first: the agent answers nothing while it is stopped.
        for paused in dict.fromkeys(c for c in (self.vm_paused_by, cid) if self.is_paused(c)):
            try:
                await self.resume(sandbox, paused)
            except HullError as exc:  # the VM may be dying: the caller's error says so
                log.warning("resume of %s before a kill or delete: %s", paused, exc)

    def _vm_changed(self) -> None:
        if self.on_vm_change is not None:
            self.on_vm_change()

    def forget(self, cid: str) -> None:
        self.frozen.discard(cid)
        if cid == self.vm_paused_by:
            self.vm_paused_by = ""
