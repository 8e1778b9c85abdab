"""The vsock agent channel without a vhost-vsock host: selection, CID claims, QEMU argv,
the host's bounded connect, and the agent's listener (against a fake listening socket).

The in-guest test (tests/integration/test_inside.py) runs the agent's listener for real,
over the guest kernel's vsock loopback transport.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from hull.agent import channel as agent_channel
from hull.agent.channel import VSOCK_HOST_CID, Channel
from hull.agent.loop import Loop
from hull.agentapi import framing
from hull.agentapi.framing import VSOCK_PORT, VSOCK_PORT_PARAM, Frame, Kind
from hull.config import settings
from hull.errors import ConfigError, HypervisorError
from hull.hypervisor import vsock
from hull.hypervisor.base import Accel, ChannelKind, VMConfig
from hull.hypervisor.qemu import argv


def vm(**kw: Any) -> VMConfig:
    return VMConfig(name="v", kernel=Path("/k"), initrd=Path("/i"), console_log=Path("/c"),
                    **kw)


# ---------------------------------------------------------------------------------------
# selection


def test_channel_policy_picks_vsock_only_where_vhost_vsock_opens() -> None:
    probed: list[str] = []

    def works() -> str | None:
        probed.append("probe")
        return None

    def missing() -> str:
        return "cannot open /dev/vhost-vsock: No such file or directory"

    assert vsock.choose("virtio-serial", works) is ChannelKind.VIRTIO_SERIAL
    assert probed == []  # an explicit virtio-serial never touches the device
    assert vsock.choose("auto", works) is ChannelKind.VSOCK
    assert vsock.choose("auto", missing) is ChannelKind.VIRTIO_SERIAL
    assert vsock.choose("vsock", works) is ChannelKind.VSOCK
    with pytest.raises(HypervisorError, match=r'"vsock", but cannot open /dev/vhost-vsock'):
        vsock.choose("vsock", missing)


def test_probe_names_the_device(tmp_path: Path) -> None:
    assert vsock.vhost_vsock_problem(str(tmp_path / "vhost-vsock")) == (
        f"cannot open {tmp_path}/vhost-vsock: No such file or directory")
    assert vsock.vhost_vsock_problem(os.devnull) is None


def test_channel_setting_is_checked(tmp_path: Path) -> None:
    assert settings.Config().hypervisor.channel == "auto"
    path = tmp_path / "c.toml"
    path.write_text('[hypervisor]\nchannel = "vsock"\n')
    assert settings.load(path).hypervisor.channel == "vsock"
    path.write_text('[hypervisor]\nchannel = "tcp"\n')
    with pytest.raises(ConfigError, match=r"hypervisor\.channel must be one of auto, "
                                          r"virtio-serial, vsock, not 'tcp'"):
        settings.load(path)


# ---------------------------------------------------------------------------------------
# guest CIDs


class FakeVhost:
    """The kernel's side of VHOST_VSOCK_SET_GUEST_CID: one CID per fd, EADDRINUSE for a
    CID another fd holds (vhost_vsock_set_cid)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: dict[int, int] = {}  # cid -> fd
        self.refused = 0

    def set_cid(self, fd: int, cid: int) -> None:
        with self.lock:
            holder = self.owner.get(cid)
            if holder is not None and holder != fd:
                self.refused += 1
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            for other, owner in list(self.owner.items()):
                if owner == fd:
                    del self.owner[other]
            self.owner[cid] = fd
        time.sleep(0.001)  # let the other threads interleave


class FewCids(random.Random):
    """CIDs from a range of 8, so that concurrent claims collide."""

    def randint(self, a: int, b: int) -> int:
        return super().randint(a, a + 7)


def test_concurrent_claims_get_distinct_cids() -> None:
    kernel = FakeVhost()
    got: dict[int, int] = {}
    errors: list[BaseException] = []

    def claim(fd: int) -> None:
        try:
            got[fd] = vsock.claim_cid(fd, kernel.set_cid, FewCids(fd))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(fd,)) for fd in range(100, 108)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(got.values()) == list(range(vsock.FIRST_GUEST_CID, vsock.FIRST_GUEST_CID + 8))
    assert kernel.owner == {cid: fd for fd, cid in got.items()}
    assert kernel.refused > 0  # there were collisions, and each one was retried


def test_claim_gives_up_with_the_device_named() -> None:
    kernel = FakeVhost()
    for fd in range(8):
        vsock.claim_cid(fd, kernel.set_cid, FewCids(1))
    with pytest.raises(HypervisorError, match=r"/dev/vhost-vsock: no free guest cid in 5"):
        vsock.claim_cid(99, kernel.set_cid, FewCids(2), attempts=5)

    def broken(fd: int, cid: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    with pytest.raises(HypervisorError, match=r"/dev/vhost-vsock: cannot set guest cid \d+: "
                                              "Operation not permitted"):
        vsock.claim_cid(99, broken)


def test_claimed_cids_are_never_reserved_ones() -> None:
    rng = random.Random(7)
    kernel = FakeVhost()
    cids = {vsock.claim_cid(fd, kernel.set_cid, rng) for fd in range(200)}
    assert min(cids) >= 3 and max(cids) <= 0xFFFFFFFE and len(cids) == 200


def test_open_device_fails_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match=f"cannot open {tmp_path}/vhost-vsock: No such"):
        vsock.open_device(str(tmp_path / "vhost-vsock"))


def test_open_device_closes_its_fd_when_no_cid_is_free() -> None:
    before = set(os.listdir("/proc/self/fd"))

    def busy(fd: int, cid: int) -> None:
        raise OSError(errno.EADDRINUSE, "busy")

    with pytest.raises(HypervisorError, match="no free guest cid"):
        vsock.open_device(os.devnull, busy)
    assert set(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------------------------------
# QEMU argv


@pytest.mark.parametrize(("machine", "device"), [("microvm", "vhost-vsock-device"),
                                                 ("q35", "vhost-vsock-pci"),
                                                 ("virt", "vhost-vsock-device")])
def test_vsock_argv(machine: str, device: str) -> None:
    config = vm(machine_type=machine, channel=ChannelKind.VSOCK)
    args = argv.build("q", config, argv.Fds(-1, 4, vhost_vsock=7, vsock_cid=1234))
    assert f"{device},id=vsock0,guest-cid=1234,vhostfd=7" in args
    joined = " ".join(args)
    assert "virtserialport" not in joined and "id=agent" not in joined
    cmdline = args[args.index("-append") + 1].split()
    assert f"{VSOCK_PORT_PARAM}={VSOCK_PORT}" in cmdline


def test_virtio_serial_argv_has_no_vsock() -> None:
    args = argv.build("q", vm(), argv.Fds(3, 4))
    assert "virtserialport,bus=vser0.0,chardev=agent,name=hull.agent" in args
    assert "vsock" not in " ".join(args)


def test_vsock_argv_needs_the_device_fd() -> None:
    with pytest.raises(ValueError, match="vhost-vsock fd"):
        argv.build("q", vm(channel=ChannelKind.VSOCK), argv.Fds(-1, 4))


def test_kernel_patch_parameters_only_under_tcg_on_x86() -> None:
    def cmdline(**kw: Any) -> list[str]:
        args = argv.build("q", vm(**kw), argv.Fds(3, 4))
        return args[args.index("-append") + 1].split()

    tcg = ["lapic_timer_hz=1000000000", "initmem_poison=0"]
    assert cmdline(accel=Accel.TCG)[-3:-1] == tcg  # microvm's pci=off comes last
    assert cmdline(accel=Accel.TCG, machine_type="q35")[-2:] == tcg
    for words in (cmdline(accel=Accel.KVM), cmdline(machine_type="virt")):
        assert not any(w.startswith(("lapic_timer_hz", "initmem_poison")) for w in words)


# ---------------------------------------------------------------------------------------
# the host's connect (AF_UNIX stands in for AF_VSOCK: same stream semantics)


async def test_connect_retries_until_the_peer_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def listen_later() -> None:
        await asyncio.sleep(0.2)
        server.bind(path)
        server.listen(1)

    task = asyncio.ensure_future(listen_later())
    started = time.monotonic()
    try:
        sock = await vsock.connect(socket.AF_UNIX, path, 5.0, lambda: None, "agent")
        await task
        assert 0.2 <= time.monotonic() - started < 3
        peer, _ = server.accept()
        sock.sendall(b"x")
        assert peer.recv(1) == b"x"
        peer.close()
        sock.close()
    finally:
        server.close()


async def test_connect_is_bounded(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(HypervisorError, match=r"agent: nothing listens after 0.3s \(No such"):
        await vsock.connect(socket.AF_UNIX, str(tmp_path / "s"), 0.3, lambda: None, "agent")
    assert time.monotonic() - started < 1.5


async def test_connect_stops_when_the_vm_is_gone(tmp_path: Path) -> None:
    calls = []

    def gone() -> str | None:
        calls.append(1)
        return "qemu exited with status 1" if len(calls) > 2 else None

    with pytest.raises(HypervisorError, match="vm x: qemu exited with status 1"):
        await vsock.connect(socket.AF_UNIX, str(tmp_path / "s"), 30, gone, "vm x")
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------
# the agent's listener, against a fake listening socket


class FakeListener:
    """Stands in for the agent's AF_VSOCK listening socket: a pipe makes it readable
    whenever connections are queued, which are socketpair ends with a (cid, port)."""

    instances: list[FakeListener] = []

    def __init__(self, port: int) -> None:
        self.port = port
        self.r, self.w = os.pipe()
        self.queue: deque[tuple[int, tuple[int, int]]] = deque()
        FakeListener.instances.append(self)

    def fileno(self) -> int:
        return self.r

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)

    def connect_from(self, cid: int) -> socket.socket:
        host, guest = socket.socketpair()
        self.queue.append((guest.detach(), (cid, 50000 + len(self.queue))))
        os.write(self.w, b"x")
        return host

    def _accept(self) -> tuple[int, tuple[int, int]]:
        if not self.queue:
            raise BlockingIOError
        os.read(self.r, 1)
        return self.queue.popleft()


def ping(sock: socket.socket) -> None:
    sock.sendall(Frame(Kind.REQUEST, framing.CONTROL_STREAM, b'{"id":1}').encode())


def test_agent_listens_and_serves_only_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_channel, "listen_vsock", FakeListener)
    FakeListener.instances.clear()
    loop = Loop()
    frames: list[Frame] = []
    resets: list[int] = []
    channel = Channel(loop, frames.append, lambda: resets.append(1), vsock_port=1024,
                      vsock_peer=VSOCK_HOST_CID)
    channel.start()
    listener = FakeListener.instances[0]
    assert listener.port == 1024

    intruder = listener.connect_from(3)  # e.g. a container, through the loopback
    loop.run_once(0.5)
    assert channel.fd == -1
    assert intruder.recv(1) == b""  # refused: closed at once

    host = listener.connect_from(VSOCK_HOST_CID)
    loop.run_once(0.5)
    assert channel.fd >= 0
    ping(host)
    loop.run_once(0.5)
    assert [f.payload for f in frames] == [b'{"id":1}']
    channel.send(Frame(Kind.RESPONSE, 0, b"{}"))
    assert list(framing.Decoder().feed(host.recv(100))) == [Frame(Kind.RESPONSE, 0, b"{}")]

    # A new host connection replaces the current one; EOF ends a session, not the agent.
    second = listener.connect_from(VSOCK_HOST_CID)
    loop.run_once(0.5)
    assert host.recv(1) == b"" and resets == [1]
    second.close()
    loop.run_once(0.5)
    assert channel.fd == -1 and resets == [1, 1]
    third = listener.connect_from(VSOCK_HOST_CID)
    loop.run_once(0.5)
    ping(third)
    loop.run_once(0.5)
    assert len(frames) == 2
    third.close()
    loop.run_once(0.5)
    assert channel.fd == -1 and resets == [1, 1, 1]
    loop.forget(listener.fileno())  # the loop and the channel are garbage now
    for sock in (intruder, host):
        sock.close()
    listener.close()
    FakeListener.instances.clear()


@pytest.mark.skipif(os.path.exists(vsock.VHOST_VSOCK), reason="this host has vhost-vsock")
def test_hull_check_reports_the_channel() -> None:
    from hull.runtime.hostcheck import check_channel

    config = settings.Config()
    auto = check_channel(config)
    assert auto.ok and auto.detail == ("virtio-serial (cannot open /dev/vhost-vsock: "
                                       "No such file or directory)")
    config.hypervisor.channel = "vsock"
    required = check_channel(config)
    assert not required.ok and "/dev/vhost-vsock" in required.detail
    config.hypervisor.channel = "virtio-serial"
    assert check_channel(config).detail == "virtio-serial (hypervisor.channel)"


@pytest.mark.skipif(os.path.exists(vsock.VHOST_VSOCK), reason="this host has vhost-vsock")
async def test_vm_start_without_vhost_vsock_fails_and_closes_everything(
        tmp_path: Path) -> None:
    from hull.hypervisor.qemu.machine import QemuVM

    before = set(os.listdir("/proc/self/fd"))
    config = VMConfig(name="v", kernel=Path("/k"), initrd=Path("/i"),
                      console_log=tmp_path / "console.log", channel=ChannelKind.VSOCK)
    machine = QemuVM("/bin/true", config)
    with pytest.raises(HypervisorError, match="cannot open /dev/vhost-vsock"):
        await machine.start()
    assert machine.pid is None
    with pytest.raises(HypervisorError, match="vm v is not running"):
        await machine.connect_agent(1.0)
    assert set(os.listdir("/proc/self/fd")) == before
