"""The Hypervisor interface every driver implements, and the VM description it consumes."""

from __future__ import annotations

import enum
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


class Accel(enum.StrEnum):
    KVM = "kvm"
    TCG = "tcg"


class ChannelKind(enum.StrEnum):
    """The device that carries the agent channel (hull.hypervisor.vsock chooses)."""

    VIRTIO_SERIAL = "virtio-serial"
    VSOCK = "vsock"


class Capability(enum.Flag):
    NONE = 0
    PAUSE = enum.auto()
    FS_SHARE = enum.auto()
    CPU_HOTPLUG = enum.auto()
    MEMORY_HOTPLUG = enum.auto()


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-9p under ``tag``."""

    tag: str
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class Nic:
    """A virtio-net device backed by a tap device Hull opened: QEMU inherits ``tap_fd``
    (-1: no backend)."""

    mac: str
    tap_fd: int
    mtu: int = 1500


@dataclass(frozen=True)
class VMConfig:
    """Everything a driver needs to start one sandbox VM. Pure data: no side effects."""

    name: str
    kernel: Path
    initrd: Path
    console_log: Path
    accel: Accel = Accel.TCG
    machine_type: str = "microvm"
    vcpus: int = 1
    memory_mib: int = 256
    kernel_params: tuple[str, ...] = ()
    shares: tuple[Share, ...] = ()
    sandbox: bool = True
    #: host TSC frequency for tsc_early_khz (0: unknown); avoids a slow PIT calibration.
    tsc_khz: int = 0
    #: network devices (the container's network namespace, see hull.network.host)
    nics: tuple[Nic, ...] = ()
    #: run QEMU in this network namespace (an open fd; -1: the caller's own)
    netns_fd: int = -1
    #: (uid, gid) QEMU drops to before exec (configuration hypervisor.run_as), or None.
    run_as: tuple[int, int] | None = None
    #: False: QEMU runs with transparent huge pages disabled (PR_SET_THP_DISABLE)
    transparent_huge_pages: bool = False
    #: guest RAM in this file (a VM template's, on tmpfs) instead of anonymous memory;
    #: ``memory_shared``: map it shared (the template writes it) or private
    #: (copy-on-write: a clone). None: anonymous memory.
    memory_file: Path | None = None
    memory_shared: bool = False
    #: restore device state from this inherited fd (-incoming fd:N) instead of booting;
    #: -1: boot. Template RAM is never part of the stream (x-ignore-shared).
    incoming_fd: int = -1
    #: the agent channel: a virtio-serial port, or vsock (a vhost-vsock device)
    channel: ChannelKind = ChannelKind.VIRTIO_SERIAL
    extra_args: tuple[str, ...] = field(default=())


class Hypervisor(ABC):
    """One VM. Drivers are async context managers: leaving the block always stops the VM."""

    capabilities: Capability = Capability.NONE

    @abstractmethod
    async def start(self) -> None:
        """Start the VM; returns once the hypervisor runs (not when the guest is up)."""

    @abstractmethod
    async def stop(self, timeout: float = 2.0) -> None:
        """Stop the VM: politely, then by force after ``timeout`` seconds. Idempotent."""

    @abstractmethod
    async def pause(self) -> None: ...

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def connect_agent(self, timeout: float) -> socket.socket:
        """The host end of the agent channel (a connected stream socket). Over vsock it
        exists once the agent listens: wait for that, at most ``timeout`` seconds."""

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The hypervisor's host pid while it runs."""

    @abstractmethod
    async def wait(self) -> int:
        """Wait for the hypervisor process to end; its exit status."""

    @abstractmethod
    def console_tail(self, lines: int = 6) -> str:
        """The last lines the guest printed on its console (for error messages)."""

    async def __aenter__(self) -> Hypervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
