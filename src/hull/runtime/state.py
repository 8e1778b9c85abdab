"""Per-container state under --root: one directory per container, written atomically.

``<root>/<id>/state.json`` holds the container's status and what later commands need; a
lock file serializes commands on one container (flock, released when the holder dies,
so a killed `hull` never leaves it wedged).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hull.errors import ContainerExists, ContainerNotFound, HullError

# runc's rule for container ids (libcontainer/factory_linux.go).
_ID = re.compile(r"^[\w+\-.]+$")
MAX_ID_LEN = 1024


class Status(enum.StrEnum):
    """runtime-spec runtime.md states (runc adds "paused")."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


def check_id(container_id: str) -> str:
    if not container_id:
        raise HullError("container id cannot be empty")
    if len(container_id) > MAX_ID_LEN or not _ID.match(container_id) or container_id in (
            ".", ".."):
        raise HullError(f"invalid container id format: {container_id}")
    return container_id


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it is gone or a zombie.

    Comparing it with the recorded value tells a live process from a reused pid.
    """
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    return pid > 0 and start_time(pid) == started


@dataclass
class ContainerState:
    id: str
    bundle: str
    status: Status = Status.CREATING
    #: The container pid clients see: the init process's shim.
    pid: int = 0
    pid_start: int = 0
    created: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    rootfs: str = ""
    owner: str = ""
    #: The sandbox's proxy daemon (CLI mode), which owns QEMU.
    proxy_pid: int = 0
    proxy_start: int = 0
    #: Host pid of the hypervisor process serving this container.
    vm_pid: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = str(self.status)
        return data

    # Transitions allowed by runtime-spec runtime.md ("Lifecycle", "Operations").
    def can_start(self) -> bool:
        return self.status is Status.CREATED

    def can_kill(self) -> bool:
        return self.status in (Status.CREATED, Status.RUNNING, Status.PAUSED)

    def can_exec(self) -> bool:
        return self.status is Status.RUNNING

    def can_delete(self) -> bool:
        return self.status in (Status.STOPPED, Status.CREATED)

    def can_pause(self) -> bool:
        return self.status is Status.RUNNING

    def can_resume(self) -> bool:
        return self.status is Status.PAUSED


class ContainerDir:
    """The state directory of one container."""

    def __init__(self, root: Path, container_id: str) -> None:
        self.id = check_id(container_id)
        self.path = root / container_id

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    def create(self) -> None:
        """Make the directory; fails if a container of this id exists."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            raise ContainerExists(self.id) from None
        except OSError as exc:
            raise HullError(f"cannot create state directory {self.path}: {exc.strerror}"
                            ) from exc

    def exists(self) -> bool:
        return (self.path / "state.json").exists()

    def load(self) -> ContainerState:
        try:
            data = json.loads((self.path / "state.json").read_text())
            data["status"] = Status(data["status"])
            known = {f for f in ContainerState.__dataclass_fields__}
            return ContainerState(**{k: v for k, v in data.items() if k in known})
        except FileNotFoundError:
            raise ContainerNotFound(self.id) from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise HullError(f"state of container {self.id} is unreadable: {exc}") from exc

    def save(self, state: ContainerState) -> None:
        tmp = self.path / f".state.json.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(state.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path / "state.json")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def remove(self) -> None:
        # Unmount first: host binds staged for the VM (sharedfs) must never be removed
        # through, and a crashed `hull` may have left them.
        from hull.runtime import sharedfs

        left = sharedfs.unmount_under(self.path)
        if left:
            raise HullError(f"container {self.id}: cannot unmount {', '.join(left)}; "
                            f"state left in {self.path}")
        import shutil  # with bz2 and lzma: not for the verbs that never remove

        shutil.rmtree(self.path, ignore_errors=True)
