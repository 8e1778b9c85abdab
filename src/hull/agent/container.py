"""A container as the agent tracks it: its state, its processes, its rootfs mount.

States follow runtime-spec runtime.md (creating, created, running, stopped), plus
STARTING between start_container and the init's successful execve.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from hull.agent.process import Process
from hull.agent.spawn import StatusPipe
from hull.agent.spec import ContainerSpec

TYPE_CHECKING = False  # not typing's: the agent must not import typing (agentapi/records.py)
if TYPE_CHECKING:
    from hull.agent.cgroup import Cgroup


class State(enum.Enum):
    CREATING = "being created"
    CREATED = "created"
    STARTING = "being started"
    RUNNING = "running"
    STOPPED = "stopped"


class Container:
    def __init__(self, cid: str, root: str, spec: ContainerSpec, init: Process,
                 start_fd: int | None) -> None:
        self.id = cid
        self.root = root  # where the rootfs share is mounted in the guest
        self.spec = spec
        self.init = init
        self.state = State.CREATING
        #: the agent's end of the start pipe while the init waits for start_container
        self.start_fd = start_fd
        #: readlink of /proc/<init>/ns/pid, to find every process of the container
        self.pidns = ""
        self.execs: dict[str, Process] = {}
        self.status_pipes: dict[int, StatusPipe] = {}
        #: delete_container waits for the init to be reaped (created) or its streams (stopped)
        self.delete_rid: int | None = None
        #: the init was killed by delete_container before it ever started: no exit event
        self.deleting_created = False
        #: the container's cgroup in the guest (None: the agent manages no cgroups)
        self.cgroup: Cgroup | None = None

    def all_processes(self) -> Iterator[Process]:
        yield self.init
        yield from self.execs.values()

    def forget_exec(self, exec_id: str) -> None:
        self.execs.pop(exec_id, None)

    def can_start(self) -> bool:
        return self.state == State.CREATED and self.init.alive and self.start_fd is not None

    def can_exec(self) -> bool:
        return self.state == State.RUNNING and self.init.alive and self.delete_rid is None

    def delete_refusal(self) -> str | None:
        """Why delete_container must wait, or None."""
        if self.delete_rid is not None:
            return "being deleted"
        if self.state in (State.CREATING, State.STARTING):
            return str(self.state.value)
        if self.state == State.RUNNING and self.init.alive:
            return "running"
        return None
