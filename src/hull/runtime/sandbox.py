"""Sandbox: one VM with its agent channel. The first container of a sandbox boots it.

``async with Sandbox(...)`` boots QEMU, connects the agent and completes the handshake;
leaving the block shuts the guest down and stops QEMU, whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import pwd
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hull import __version__
from hull.agentapi import schema
from hull.config.settings import Config
from hull.errors import (
    AgentError,
    BootError,
    ConfigError,
    HullError,
    HypervisorError,
    ProtocolError,
)
from hull.hypervisor import accel, vsock
from hull.hypervisor.base import Accel, Nic, Share, VMConfig
from hull.hypervisor.qemu.machine import QemuVM
from hull.network import host as netns
from hull.proxy.channel import AgentChannel
from hull.runtime.assets import resolve

if TYPE_CHECKING:
    from hull.runtime.pool import PooledVM

log = logging.getLogger("hull.sandbox")
ExitKey = tuple[str, str]  # (container id, exec id)
Asker = Callable[[schema.Method, dict[str, Any]], Awaitable[dict[str, Any]]]


def run_as_ids(user: str) -> tuple[int, int] | None:
    """hypervisor.run_as as (uid, gid); None when QEMU keeps the caller's user."""
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"hypervisor.run_as: no user {user!r} on this host") from None
    return entry.pw_uid, entry.pw_gid


def host_tsc_khz() -> int:
    """The host TSC frequency, passed as tsc_early_khz (avoids PIT calibration under TCG)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 0


class BootProfile:
    """Where the time of one boot went, from QEMU's start to the agent's hello reply.

    Host marks (time.monotonic): ``spawn`` (QEMU about to start), ``qemu`` (QMP answered:
    the machine runs), ``ready`` (hello reply received). The agent's marks (guest
    CLOCK_MONOTONIC, schema.HelloReply.boot) are put on the host's time line by anchoring
    its "hello" mark at ``ready``: the reply leaves right after it, a fraction of a ms
    before the host reads it. The guest's clock starts late and runs coarse during early
    boot, so the first guest phase absorbs that error: only later phases are exact.
    """

    #: (phase, guest mark that ends it, what it covers), in boot order
    GUEST_PHASES = (
        ("kernel", "kernel.init", "kernel boot until it runs /init (profile mode only)"),
        ("kernel+python", "python", "kernel boot, then python's own start until /init runs"),
        ("agent imports", "main", "importing hull.agent.main"),
        ("agent init", "init", "PID 1 duties: mounts, modules, cgroups, lo"),
        ("agent load", "loaded", "importing the agent server, setting it up"),
        ("port", "port", "finding and opening the virtio-serial port"),
        ("hello", "hello", "waiting for the host's hello and handling it"),
    )

    def __init__(self, spawn: float, qemu: float, ready: float,
                 guest: dict[str, float], restore: tuple[tuple[str, float], ...] = ()
                 ) -> None:
        self.spawn, self.qemu, self.ready, self.guest = spawn, qemu, ready, guest
        #: a clone's host marks (phase, time it ended) until the VM ran: its guest marks
        #: are the template's boot, not this sandbox's (hull.runtime.factory)
        self.restore = restore

    @property
    def total(self) -> float:
        return self.ready - self.spawn

    def phases(self) -> list[tuple[str, float]]:
        """(phase, seconds) in order; phases whose marks the agent did not send are left
        out (an older agent sends none: then the boot is one "guest" phase)."""
        if self.restore:
            out: list[tuple[str, float]] = []
            last = self.spawn
            for name, at in self.restore:
                out.append((name, at - last))
                last = at
            return [*out, ("hello", self.ready - last)]
        out = [("qemu start", self.qemu - self.spawn)]
        hello = self.guest.get("hello")
        last = self.qemu
        if hello is not None:
            for name, key, _ in self.GUEST_PHASES:
                if key not in self.guest:
                    continue
                at = self.ready - (hello - self.guest[key])
                if name == "kernel+python" and "kernel.init" in self.guest:
                    name = "python start"
                out.append((name, at - last))
                last = at
        if self.ready - last > 0.0005 or hello is None:
            out.append(("guest" if hello is None else "hello reply", self.ready - last))
        return out

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds:.3f}s" for name, seconds in self.phases())


class Timeline:
    """Named checkpoints (time.monotonic) and the time between them, for --debug logs.
    ``since``: when the time line starts (default: now)."""

    def __init__(self, since: float | None = None) -> None:
        self.points: list[tuple[str, float]] = [
            ("", time.monotonic() if since is None else since)]

    def mark(self, name: str) -> None:
        """``name`` is the phase that ends now."""
        self.points.append((name, time.monotonic()))

    @property
    def total(self) -> float:
        return self.points[-1][1] - self.points[0][1]

    def describe(self) -> str:
        steps = (f"{name} {t - prev:.3f}s" for (_, prev), (name, t)
                 in zip(self.points, self.points[1:], strict=False))
        return f"total {self.total:.3f}s: " + ", ".join(steps)


class Sandbox:
    def __init__(self, config: Config, sandbox_id: str, console_log: Path,
                 shares: tuple[Share, ...] = (), state_root: Path | None = None,
                 network: netns.Choice | None = None,
                 network_record: Path | None = None) -> None:
        self.config = config
        self.id = sandbox_id
        self.console_log = console_log
        self.shares = shares
        self.state_root = state_root
        #: the network namespace the VM mirrors (hull.network.host.choose); None: none
        self.network = network
        #: where the taps and filters are recorded, so that a cleanup after the owner of
        #: this object was SIGKILLed can remove them (hull.network.host.release_recorded)
        self.network_record = network_record
        self.attachment: netns.Attachment | None = None
        self.vm: QemuVM | PooledVM | None = None
        self.channel: AgentChannel | None = None
        self.hello: schema.HelloReply | None = None
        self._exits: dict[ExitKey, asyncio.Future[schema.ProcessExit]] = {}
        self.on_exit: Callable[[schema.ProcessExit], None] | None = None
        self.boot_seconds = 0.0
        self.boot_profile: BootProfile | None = None
        self._started = 0.0
        self._qemu_up = 0.0
        #: a clone's restore phases (BootProfile.restore)
        self._restore_marks: list[tuple[str, float]] = []
        #: boot exactly this VM (a template being made, hull.runtime.factory), no clone
        self.template_config: VMConfig | None = None
        #: the template this sandbox was cloned from (None: booted cold)
        self.cloned_from: Path | None = None
        #: the MACs the guest's NICs have, in order, when not the veths' (a clone's)
        self.device_macs: tuple[str, ...] = ()
        #: a clone's NICs beyond the sandbox's own need taps too (PrivateTaps)
        self.spare_taps: netns.PrivateTaps | None = None

    def vm_config(self) -> VMConfig:
        hv = self.config.hypervisor
        assets = resolve(self.config)
        cache = self.state_root / "accel.json" if self.state_root else None
        if hv.arch != platform.machine():
            # Another architecture's guest (machine_type "virt" on x86_64): only TCG.
            if hv.accelerator == "kvm":
                raise HypervisorError(f"configuration requires KVM, but the {hv.arch} guest "
                                      f"cannot use it on this {platform.machine()} host")
            decision = accel.Decision(Accel.TCG, f"emulated {hv.arch} guest")
        else:
            decision = accel.choose(hv.accelerator, hv.path, cache)
        if decision.accel is Accel.TCG:
            log.info("sandbox %s: using TCG (software emulation, slower): %s", self.id,
                     decision.reason)
        return VMConfig(
            name=self.id, kernel=assets.kernel, initrd=assets.initrd,
            console_log=self.console_log, accel=decision.accel,
            machine_type=hv.machine_type, vcpus=hv.default_vcpus,
            memory_mib=self.memory_mib(), kernel_params=(
                *hv.kernel_params.split(),
                *(("hull.debug_console=1",) if hv.debug_console else ())),
            shares=self.shares, sandbox=hv.sandbox, tsc_khz=host_tsc_khz(),
            run_as=run_as_ids(hv.run_as), channel=vsock.choose(hv.channel),
            transparent_huge_pages=hv.transparent_huge_pages, nics=self.nics(),
            netns_fd=self.attachment.netns_fd if self.attachment else -1)

    def memory_mib(self) -> int:
        """The VM's memory: the configured size, rounded up to a template size class
        while the factory is enabled (hull.runtime.factory.memory_class)."""
        memory = self.config.hypervisor.default_memory_mib
        if self.config.factory.enabled:
            from hull.runtime.factory import memory_class

            memory = memory_class(memory)
        return memory

    async def __aenter__(self) -> Sandbox:
        await self.boot()
        try:
            self.channel = AgentChannel(await self.agent_connection(), f"sandbox {self.id}",
                                        on_event=self._event, on_violation=self._violation)
            await self.channel.open()
            reply = await self.handshake(self.channel.request)
        except BaseException:
            await self._teardown()
            raise
        self.hello = reply
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._teardown()

    async def boot(self) -> None:
        """Start the VM (the guest is not up yet: follow with handshake())."""
        factory = self.template_config is None and self.config.factory.enabled
        try:
            # A pooled clone comes first: its taps are moved into the sandbox's namespace
            # before the veths are redirected to them (no taps of its own).
            self._started = time.monotonic()
            if factory and await self._take_pooled():
                self._qemu_up = time.monotonic()
                return
            await self.attach_network()
            vm_config = self.template_config or self.vm_config()
            if factory:
                self._started = time.monotonic()
                if await self._boot_clone(vm_config):
                    self._qemu_up = time.monotonic()
                    return
            self.vm = QemuVM(self.config.hypervisor.path, vm_config)
            self._started = time.monotonic()
            try:
                await self.vm.start()
            except HypervisorError as exc:
                if isinstance(exc, BootError):
                    raise
                # Name the sandbox: "qemu exited ..." alone does not say whose VM it was.
                raise BootError(f"vm of {self.id} failed to start: {exc}",
                                self.vm.console_tail()) from exc
        except BaseException:
            self.release_network()
            raise
        self._qemu_up = time.monotonic()

    async def _boot_clone(self, vm_config: VMConfig) -> bool:
        """Restore a clone of the factory's template (True), or say why not and return
        False: the caller boots cold. A template that fails to restore is never waited on
        beyond factory.restore_timeout."""
        from hull.runtime import factory

        try:
            template = factory.find(self.config, vm_config)
        except (factory.Unusable, HullError) as exc:
            log.warning("sandbox %s: no usable vm template, booting cold: %s%s", self.id, exc,
                        self._rebuild(vm_config, str(exc)))
            return False
        fd = os.open(template.state, os.O_RDONLY | os.O_CLOEXEC)
        vm: QemuVM | None = None
        spares = netns.PrivateTaps(0)
        try:
            spares = netns.PrivateTaps(factory.spare_taps_needed(vm_config)).__enter__()
            clone = factory.clone_config(vm_config, template, fd, spares.fds)
            vm = QemuVM(self.config.hypervisor.path, clone)
            await vm.start()
            self._restore_marks = [("qemu start", time.monotonic())]
            await vm.wait_restored(self.config.factory.restore_timeout)
            self._restore_marks.append(("restore", time.monotonic()))
        except (factory.Unusable, HullError) as exc:
            log.warning("sandbox %s: vm template %s did not restore, booting cold: %s%s",
                        self.id, template.path, exc, self._rebuild(vm_config, str(exc)))
            if vm is not None:
                vm.kill()
                await vm.stop(timeout=1.0)
            spares.close()
            return False
        finally:
            os.close(fd)
        self.vm = vm
        self.spare_taps = spares
        self.cloned_from = template.path
        self.device_macs = factory.device_macs(len(vm_config.nics))
        log.debug("sandbox %s: cloned from %s", self.id, template.path)
        return True

    async def _take_pooled(self) -> bool:
        """Lease a clone the pool restored ahead of demand (factory.pool_size), for a
        sandbox it can serve (hull.runtime.pool.fits) whose share directory is still
        empty. The daemon moves the clone's taps into the sandbox's network namespace;
        the veths are redirected to them (attach). False: the caller makes taps of its
        own and restores a clone of its own."""
        if not self.config.factory.pool_size:
            return False
        from hull.runtime import factory, pool

        vm_config = self.vm_config()  # no NICs yet: what the pool matches on
        if not pool.fits(vm_config) or any(vm_config.shares[0].path.iterdir()):
            return False
        target = self.network.netns if self.network is not None else None
        try:
            vm = await pool.take(self.config, vm_config, self.id, target)
        except HullError as exc:
            log.info("sandbox %s: no pooled clone: %s", self.id, exc)
            return False
        try:
            vm.bind_share(vm_config.shares[0].path)
            if target is not None:
                self.attachment = await asyncio.to_thread(
                    netns.attach, target, self.network_record, vm.taps)
            elif self.network is not None:
                log.info("sandbox %s: %s", self.id, self.network.why)
        except (OSError, HullError) as exc:
            log.warning("sandbox %s: cannot use the pooled clone %s: %s", self.id, vm.slot,
                        exc)
            await vm.stop(timeout=1.0)
            self.release_network()
            return False
        self.vm = vm
        self.cloned_from = vm.slot
        self._restore_marks = [("lease", time.monotonic())]
        self.device_macs = factory.device_macs(len(self.nics()))
        log.debug("sandbox %s: took the pooled clone %s", self.id, vm.slot)
        return True

    def _rebuild(self, vm_config: VMConfig, why: str) -> str:
        """Ask for the missing template in the background (factory.auto_rebuild); the
        notice's tail."""
        if not self.config.factory.auto_rebuild:
            return ""
        from hull.runtime import factory, rebuild

        try:
            key = factory.key_id(factory.template_key(vm_config, factory.vm_binary(
                self.config)))
        except (factory.Unusable, HullError) as exc:
            return f"; cannot rebuild it: {exc}"
        return f"; {rebuild.request(self.config, key, why)}"

    async def agent_connection(self) -> socket.socket:
        """The host end of the agent channel. Over vsock it exists once the agent listens:
        bounded by hypervisor.boot_timeout, and by QEMU's exit."""
        assert self.vm is not None
        try:
            return await self.vm.connect_agent(self.config.hypervisor.boot_timeout)
        except HypervisorError as exc:
            raise BootError(f"vm of {self.id} failed to boot: {exc}",
                            self.vm.console_tail()) from exc

    # ----------------------------------------------------------------- network

    async def attach_network(self) -> None:
        """Taps and tc filters in the namespace the VM mirrors (before QEMU starts)."""
        if self.network is None or self.attachment is not None:
            return
        if self.network.netns is None:
            log.info("sandbox %s: %s", self.id, self.network.why)
            return
        self.attachment = await asyncio.to_thread(netns.attach, self.network.netns,
                                                  self.network_record)

    def nics(self) -> tuple[Nic, ...]:
        if self.attachment is None:
            return ()
        return tuple(Nic(ep.mac, ep.tap_fd, ep.mtu) for ep in self.attachment.endpoints)

    async def configure_network(self, ask: Asker) -> None:
        """Give the guest's NICs the names, addresses and routes of the veths (after hello,
        before any container)."""
        if self.attachment is None or not self.attachment.endpoints:
            return
        try:
            await ask(schema.Method.CONFIGURE_NETWORK,
                      self.attachment.config(self.device_macs).to_json())
        except (AgentError, ProtocolError) as exc:
            where = self.attachment.netns
            raise netns.NetworkError(f"vm of {self.id}: cannot configure the network of "
                                     f"{where} in the guest: {exc}") from exc

    def release_network(self) -> None:
        """Remove the taps and filters (after QEMU stopped). Idempotent."""
        if self.attachment is not None:
            netns.detach(self.attachment)
            self.attachment = None
        if self.spare_taps is not None:
            self.spare_taps.close()
            self.spare_taps = None

    async def handshake(self, ask: Asker) -> schema.HelloReply:
        """Say hello through ``ask`` until the agent answers, the VM dies, or time is up."""
        assert self.vm is not None
        timeout = self.config.hypervisor.boot_timeout
        hello = schema.Hello(entropy=os.urandom(32).hex(), time_ns=time.time_ns())
        asking = asyncio.ensure_future(ask(schema.Method.HELLO, schema.params(hello)))
        died = asyncio.ensure_future(self.vm.wait())
        try:
            done, _ = await asyncio.wait({asking, died}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if asking not in done:
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking
            what = (self.vm.exit_reason() if died in done
                    else f"the agent did not answer within {timeout:g}s")
            raise BootError(f"vm of {self.id} failed to boot: {what}", self.vm.console_tail())
        try:
            reply = schema.HelloReply.from_json(asking.result())
        except (schema.SchemaError, ProtocolError, AgentError) as exc:
            raise BootError(f"vm of {self.id}: agent handshake failed: {exc}",
                            self.vm.console_tail()) from exc
        if reply.version != schema.PROTOCOL_VERSION:
            raise BootError(f"vm of {self.id}: agent speaks protocol {reply.version}, hull "
                            f"{__version__} speaks {schema.PROTOCOL_VERSION}: rebuild the "
                            "guest image with `hull image build`")
        ready = time.monotonic()
        self.boot_seconds = ready - self._started
        self.boot_profile = BootProfile(self._started, self._qemu_up, ready, reply.boot,
                                        tuple(self._restore_marks))
        log.debug("sandbox %s ready in %.3fs: %s", self.id, self.boot_seconds,
                  self.boot_profile.describe())
        await self.configure_network(ask)
        return reply

    async def shutdown(self) -> None:
        """Stop the guest and the VM (after the agent's own shutdown, if it answers)."""
        await self._teardown()

    async def _teardown(self) -> None:
        if self.channel is not None and not self.channel.failure:
            with contextlib.suppress(HullError, OSError):
                await self.channel.request(schema.Method.SHUTDOWN, {}, timeout=1.0)
        if self.channel is not None:
            await self.channel.close()
        if self.vm is not None:
            await self.vm.stop(timeout=1.0)
        self.release_network()
        for fut in self._exits.values():
            if not fut.done():
                fut.set_exception(HypervisorError(f"vm of {self.id} stopped"))
                fut.exception()  # a waiter may have gone already: do not log it as lost

    # ----------------------------------------------------------------- requests

    async def call(self, method: schema.Method, payload: Any,
                   timeout: float | None = 30.0) -> dict[str, Any]:
        if self.channel is None:
            raise HypervisorError(f"sandbox {self.id} is not running")
        body = payload if isinstance(payload, dict) else schema.params(payload)
        return await self.channel.request(method, body, timeout=timeout)

    def exit_future(self, container_id: str, exec_id: str = "") -> asyncio.Future[
            schema.ProcessExit]:
        key = (container_id, exec_id)
        if key not in self._exits:
            self._exits[key] = asyncio.get_running_loop().create_future()
        return self._exits[key]

    def forget_exit(self, container_id: str, exec_id: str = "") -> None:
        """Drop a finished process's exit record, so its exec id can be used again."""
        self._exits.pop((container_id, exec_id), None)

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("event") != schema.Event.PROCESS_EXIT:
            raise schema.SchemaError(f"unknown event {message.get('event')!r}")
        event = schema.ProcessExit.from_json(message)
        fut = self._exits.get((event.container_id, event.exec_id))
        if fut is None:
            raise schema.SchemaError(f"exit of unknown process {event.container_id}/"
                                     f"{event.exec_id}")
        if fut.done():
            raise schema.SchemaError(f"second exit of {event.container_id}/{event.exec_id}")
        fut.set_result(event)
        if self.on_exit is not None:
            self.on_exit(event)

    def _violation(self, why: str) -> None:
        log.error("sandbox %s: %s; killing the vm", self.id, why)
        if self.vm is not None:
            self.vm.kill()

    async def watch_vm(self) -> str:
        """Returns (with the reason) when the VM or the agent channel dies."""
        assert self.vm is not None and self.channel is not None
        vm_dead = asyncio.ensure_future(self.vm.wait())
        channel_dead = asyncio.ensure_future(self.channel.closed.wait())
        try:
            done, _ = await asyncio.wait({vm_dead, channel_dead},
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            vm_dead.cancel()
            channel_dead.cancel()
        if vm_dead in done:
            return self.vm.exit_reason()
        return f"agent channel failed: {self.channel.failure}"
