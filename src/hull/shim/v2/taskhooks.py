"""The OCI hooks of a pod's containers (runtime-spec config.md "POSIX-platform Hooks").

The shim runs them as CLI mode does, with the same code (hull.runtime.hooks):
prestart and createRuntime on the host, in the shim's namespaces (the runtime
namespace), before create_container; createContainer and startContainer in the guest,
handed to the agent in create_container; poststart after start; poststop after the
task's delete. A CRI sandbox's pause container is a task like any other: its hooks run
the same way.

The state's pid is the task's placeholder (placeholder.py), the pid containerd sees: it
lives in the container's network namespace, as a prestart hook that opens
``/proc/<pid>/ns/net`` (CNI-style) expects. Host hooks run in a thread, so the shim keeps
serving the pod's other tasks and relaying their output meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hull.agentapi import schema
from hull.errors import HullError
from hull.runtime import hooks

#: How long create_container and start_container may take, besides the guest's hooks
#: (Sandbox.call's default).
GUEST_TIMEOUT = 30.0
#: The runtime-spec version of the state JSON (runtime.md "State"), as CLI mode gives it.
STATE_VERSION = "1.0.2"


@dataclass(frozen=True)
class TaskHooks:
    """The hooks of one task (container), with what its state JSON says."""

    id: str
    bundle: Path
    spec: dict[str, Any]
    pid: int

    def state(self, status: str) -> dict[str, Any]:
        """runtime-spec runtime.md state of the task."""
        return {"ociVersion": STATE_VERSION, "id": self.id, "status": status,
                "pid": self.pid, "bundle": str(self.bundle),
                "annotations": self.spec.get("annotations") or {}}

    def guest(self) -> schema.GuestHooks:
        """createContainer and startContainer, for the create_container request."""
        return hooks.guest_hooks(self.spec, self.state("creating"))

    def create_timeout(self) -> float:
        """How long create_container may take, the guest's createContainer hooks included."""
        return GUEST_TIMEOUT + hooks.guest_wait(self.guest().create_container)

    def start_timeout(self) -> float:
        """How long start_container may take, the guest's startContainer hooks included."""
        return GUEST_TIMEOUT + hooks.guest_wait(self.guest().start_container)

    async def before_create(self) -> None:
        """prestart, then createRuntime: a failure fails the task's Create."""
        if self._has("prestart", "createRuntime"):
            try:
                await asyncio.to_thread(hooks.run_before_create, self.spec,
                                        self.state("creating"))
            except HullError as exc:
                raise HullError(f"container {self.id}: {exc}") from exc

    async def after(self, kind: str, status: str) -> None:
        """poststart or poststop: a failure is logged (by hull.runtime.hooks), not raised."""
        if self._has(kind):
            await asyncio.to_thread(hooks.run, self.spec, kind, self.state(status))

    def _has(self, *kinds: str) -> bool:
        found = self.spec.get("hooks") or {}
        return any(found.get(kind) for kind in kinds)
