"""The pool's protocol (hull.runtime.pool) against a fake pooled VM: taps travel with the
take request and join the clone's hubs, the agent socket comes back, bad requests are
refused without leaking descriptors."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import pytest

from hull.config import settings
from hull.errors import HypervisorError
from hull.hypervisor.base import Nic, Share, VMConfig
from hull.runtime import factory, pool, sharedfs


class FakeVM:
    """What the daemon uses of a pooled QemuVM."""

    def __init__(self, fail_attach: bool = False) -> None:
        self.agent, self.guest = socket.socketpair()
        self.taps: list[tuple[int, os.stat_result]] = []
        self.fail_attach = fail_attach
        self.stopped = asyncio.Event()
        self.pid = 4242

    async def attach_tap(self, hub: int, tap_fd: int) -> None:
        if self.fail_attach:
            raise HypervisorError("vm fake: cannot attach a tap to network hub 0: no")
        self.taps.append((hub, os.fstat(tap_fd)))

    async def connect_agent(self, timeout: float) -> socket.socket:
        return self.agent

    async def query(self, command: str) -> dict[str, object]:
        return {"status": "running"}

    async def wait(self) -> int:
        await self.stopped.wait()
        return 0

    def exit_reason(self) -> str:
        return "stopped"

    async def stop(self, timeout: float = 2.0) -> None:
        self.stopped.set()
        self.agent.close()
        self.guest.close()


def setup(tmp_path: Path) -> tuple[settings.Config, VMConfig, str]:
    config = settings.Config()
    config.factory = dataclasses.replace(config.factory, enabled=True, pool_size=1,
                                         template_dir=str(tmp_path / "factory"))
    for name in ("vmlinux", "initrd"):
        (tmp_path / name).write_bytes(b"x")
    vm = VMConfig(name="pod1", kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd",
                  console_log=tmp_path / "console.log",
                  shares=(Share(sharedfs.SHARE_TAG, tmp_path / "share"),))
    key = factory.key_id(factory.template_key(vm, factory.vm_binary(config)))
    return config, vm, key


async def serve(config: settings.Config, slot: pool.Slot) -> tuple[pool.Daemon,
                                                                    asyncio.Task[None]]:
    daemon = pool.Daemon(config)

    async def no_refill() -> None:
        await asyncio.Event().wait()

    daemon._fill = no_refill  # type: ignore[method-assign]
    daemon.idle.append(slot)
    task = asyncio.create_task(daemon.run())
    while not pool.socket_path(config).exists():
        await asyncio.sleep(0.01)
    return daemon, task


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_take_sends_the_taps_and_gets_the_agent(tmp_path: Path) -> None:
    config, vm, key = setup(tmp_path)
    before = open_fds()
    fake = FakeVM()
    tap_r, tap_w = os.pipe()  # any fd stands for a tap
    vm = dataclasses.replace(vm, nics=(Nic("02:00:00:00:00:01", tap_r),))
    assert pool.fits(vm)

    async def main() -> None:
        slot = pool.Slot("s1", tmp_path / "factory/.pool/s1", key, fake)  # type: ignore[arg-type]
        daemon, task = await serve(config, slot)
        leased = await pool.take(config, vm, "pod1")
        (hub, st), = fake.taps
        assert hub == 0 and (st.st_dev, st.st_ino) == (os.fstat(tap_r).st_dev,
                                                          os.fstat(tap_r).st_ino)
        # the agent socket came over: what the guest end sends, the lessee reads
        fake.guest.sendall(b"hello")
        assert (await asyncio.to_thread(leased._agent.recv, 5)) == b"hello"
        assert await leased.query("query-status") == {"status": "running"}
        assert daemon.leased == {"s1"} and not daemon.idle
        await leased.stop(timeout=2.0)  # ends the lease: the daemon stops the clone
        await asyncio.wait_for(fake.stopped.wait(), 2)
        daemon.stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    os.close(tap_r)
    os.close(tap_w)
    assert open_fds() == before, "a descriptor leaked"


def test_a_clone_whose_tap_does_not_attach_is_discarded(tmp_path: Path) -> None:
    config, vm, key = setup(tmp_path)
    fake = FakeVM(fail_attach=True)
    tap_r, tap_w = os.pipe()
    vm = dataclasses.replace(vm, nics=(Nic("02:00:00:00:00:01", tap_r),))

    async def main() -> None:
        slot = pool.Slot("s1", tmp_path / "factory/.pool/s1", key, fake)  # type: ignore[arg-type]
        daemon, task = await serve(config, slot)
        with pytest.raises(pool.PoolError, match="network hub 0"):
            await pool.take(config, vm, "pod1")
        await asyncio.wait_for(fake.stopped.wait(), 2)
        assert not daemon.idle and not daemon.leased
        daemon.stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    os.close(tap_r)
    os.close(tap_w)


def test_fits() -> None:
    base = VMConfig(name="p", kernel=Path("/k"), initrd=Path("/i"), console_log=Path("/c"),
                    shares=(Share(sharedfs.SHARE_TAG, Path("/s")),))
    assert pool.fits(base)
    assert pool.fits(dataclasses.replace(base, nics=(Nic("02:00:00:00:00:01", 5),)))
    assert not pool.fits(dataclasses.replace(base, nics=tuple(
        Nic(f"02:00:00:00:00:0{i}", 5 + i) for i in range(factory.TEMPLATE_NICS + 1))))
    assert not pool.fits(dataclasses.replace(base, shares=(Share("hullroot", Path("/r")),)))


def test_recv_line_takes_the_fds_and_refuses_too_many() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        socket.send_fds(a, [b'{"x": 1}\nrest'], [r])
        line, fds = pool.recv_line(b, 1)
        assert line == b'{"x": 1}\n' and len(fds) == 1
        assert b.recv(4) == b"rest", "bytes after the line were consumed"
        os.close(fds[0])
        before = open_fds()
        socket.send_fds(a, [b"x\n"], [r, w])
        with pytest.raises(ValueError, match="more than 1 file"):
            pool.recv_line(b, 1)
        assert open_fds() == before
        assert b.recv(1) == b"\n"  # the refused request's rest
        a.sendall(b"y" * (pool.MAX_LINE + 10))
        with pytest.raises(ValueError, match="longer"):
            pool.recv_line(b, 1)
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)
