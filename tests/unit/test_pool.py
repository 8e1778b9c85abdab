"""The pool's protocol (hull.runtime.pool) against a fake pooled VM: the lessee's network
namespace travels with the take request and the clone's taps are moved there, the agent
socket comes back, bad requests are refused without leaking descriptors."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import pytest

from hull.config import settings
from hull.hypervisor.base import Share, VMConfig
from hull.network.host import NetworkError
from hull.runtime import factory, pool, sharedfs

NETNS = "/proc/self/ns/net"  # any namespace does: FakeTaps only looks at it


class FakeTaps:
    """What the daemon uses of a slot's PrivateTaps."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.moved_to: list[int] = []
        self.closed = False

    def move(self, netns_fd: int) -> list[str]:
        if self.fail:
            raise NetworkError("cannot move spare taps ['hulltap0']: no")
        self.moved_to.append(os.fstat(netns_fd).st_ino)
        return ["hullp0123456789"]

    def close(self) -> None:
        self.closed = True


class FakeVM:
    """What the daemon uses of a pooled QemuVM."""

    def __init__(self) -> None:
        self.agent, self.guest = socket.socketpair()
        self.stopped = asyncio.Event()
        self.pid = 4242

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


def slot(tmp_path: Path, key: str, vm: FakeVM, taps: FakeTaps) -> pool.Slot:
    return pool.Slot("s1", tmp_path / "factory/.pool/s1", key, vm, taps)  # type: ignore[arg-type]


def test_take_moves_the_taps_and_gets_the_agent(tmp_path: Path) -> None:
    config, vm, key = setup(tmp_path)
    before = open_fds()
    fake, taps = FakeVM(), FakeTaps()
    assert pool.fits(vm)

    async def main() -> None:
        daemon, task = await serve(config, slot(tmp_path, key, fake, taps))
        leased = await pool.take(config, vm, "pod1", NETNS)
        assert taps.moved_to == [os.stat(NETNS).st_ino]
        assert leased.taps == ["hullp0123456789"]
        # the agent socket came over: what the guest end sends, the lessee reads
        fake.guest.sendall(b"hello")
        assert (await asyncio.to_thread(leased._agent.recv, 5)) == b"hello"
        assert await leased.query("query-status") == {"status": "running"}
        assert daemon.leased == {"s1"} and not daemon.idle
        await leased.stop(timeout=2.0)  # ends the lease: the daemon stops the clone
        await asyncio.wait_for(fake.stopped.wait(), 2)
        assert taps.closed
        daemon.stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert open_fds() == before, "a descriptor leaked"


def test_without_a_network_nothing_moves(tmp_path: Path) -> None:
    config, vm, key = setup(tmp_path)
    fake, taps = FakeVM(), FakeTaps()

    async def main() -> None:
        daemon, task = await serve(config, slot(tmp_path, key, fake, taps))
        leased = await pool.take(config, vm, "pod1")
        assert leased.taps == [] and taps.moved_to == []
        await leased.stop(timeout=2.0)
        daemon.stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_a_clone_whose_taps_do_not_move_is_discarded(tmp_path: Path) -> None:
    config, vm, key = setup(tmp_path)
    fake, taps = FakeVM(), FakeTaps(fail=True)

    async def main() -> None:
        daemon, task = await serve(config, slot(tmp_path, key, fake, taps))
        with pytest.raises(pool.PoolError, match="cannot move spare taps"):
            await pool.take(config, vm, "pod1", NETNS)
        await asyncio.wait_for(fake.stopped.wait(), 2)
        assert taps.closed and not daemon.idle and not daemon.leased
        daemon.stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_fits() -> None:
    base = VMConfig(name="p", kernel=Path("/k"), initrd=Path("/i"), console_log=Path("/c"),
                    shares=(Share(sharedfs.SHARE_TAG, Path("/s")),))
    assert pool.fits(base)
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
