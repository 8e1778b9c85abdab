"""vsock as the agent channel: choosing it, giving each VM its own guest CID, connecting.

The channel is virtio-serial unless the host has a usable ``/dev/vhost-vsock``
(configuration ``hypervisor.channel``: "auto", "virtio-serial" or "vsock"). With vsock:

- Hull opens /dev/vhost-vsock itself and claims a guest CID on that fd with
  VHOST_VSOCK_SET_GUEST_CID; QEMU inherits the fd (``vhostfd=``). The kernel refuses a
  CID another VM holds (EADDRINUSE), atomically and across every process on the host
  (other Hull sandboxes, other VMMs), so a collision only costs a retry with another
  random CID. The CID is held as long as QEMU holds the fd: it is freed when QEMU exits,
  whatever happened to Hull.
- The guest agent listens on the port named on the kernel command line
  (hull.agentapi.framing.VSOCK_PORT_PARAM); the host connects once the agent listens,
  retrying for a bounded time, and gives up early when QEMU exits.

Everything above the connected socket (framing, proxy) is the same for both channels.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import socket
import struct
from collections.abc import Callable

from hull.errors import HypervisorError
from hull.hypervisor.base import ChannelKind

VHOST_VSOCK = "/dev/vhost-vsock"
#: _IOW(VHOST_VIRTIO = 0xAF, 0x60, __u64) from linux/vhost.h
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
#: CIDs 0-2 are the hypervisor, the local loopback and the host; U32_MAX is "any".
FIRST_GUEST_CID = 3
LAST_GUEST_CID = 0xFFFFFFFE
CID_ATTEMPTS = 64
#: The host's connect(): each attempt is bounded (a vsock connect to a guest whose driver
#: is not up yet waits for its 2 s default timeout), failed ones are retried at this pace.
ATTEMPT_TIMEOUT = 1.0
RETRY_DELAY = 0.02

SetCid = Callable[[int, int], None]


def vhost_vsock_problem(path: str = VHOST_VSOCK) -> str | None:
    """None when this host can give a VM a vhost-vsock device; otherwise why not.

    open(2) of a character device with O_NONBLOCK returns at once: the probe cannot hang.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {path}: {exc.strerror}"
    os.close(fd)
    return None


def choose(policy: str, problem: Callable[[], str | None] = vhost_vsock_problem) -> ChannelKind:
    """The channel for ``policy`` (configuration hypervisor.channel)."""
    if policy == ChannelKind.VIRTIO_SERIAL:
        return ChannelKind.VIRTIO_SERIAL
    why = problem()
    if why is None:
        return ChannelKind.VSOCK
    if policy == ChannelKind.VSOCK:
        raise HypervisorError(f'hypervisor.channel is "vsock", but {why} '
                              "(modprobe vhost_vsock, or use \"auto\")")
    return ChannelKind.VIRTIO_SERIAL


def set_guest_cid(fd: int, cid: int) -> None:
    fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))


def claim_cid(fd: int, set_cid: SetCid = set_guest_cid,
              rng: random.Random | None = None, attempts: int = CID_ATTEMPTS) -> int:
    """Claim a free guest CID on the vhost-vsock ``fd``: random ones until the kernel
    takes one (it answers EADDRINUSE for a CID another VM holds)."""
    rng = rng or random.SystemRandom()
    for _ in range(attempts):
        cid = rng.randint(FIRST_GUEST_CID, LAST_GUEST_CID)
        try:
            set_cid(fd, cid)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise HypervisorError(f"{VHOST_VSOCK}: cannot set guest cid {cid}: "
                                  f"{exc.strerror}") from exc
        return cid
    raise HypervisorError(f"{VHOST_VSOCK}: no free guest cid in {attempts} attempts")


def open_device(path: str = VHOST_VSOCK, set_cid: SetCid = set_guest_cid) -> tuple[int, int]:
    """(fd, cid): /dev/vhost-vsock opened for one VM, with its guest CID claimed. The
    caller passes the fd to QEMU (vhostfd=) and closes its own copy once QEMU runs."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HypervisorError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        return fd, claim_cid(fd, set_cid)
    except BaseException:
        os.close(fd)
        raise


async def connect(family: int, address: tuple[int, int] | str, timeout: float,
                  gone: Callable[[], str | None], what: str) -> socket.socket:
    """A stream socket connected to ``address``, retried until the peer listens.

    Bounded: gives up after ``timeout`` seconds, or as soon as ``gone()`` says why the
    peer can never answer (QEMU exited). ``what`` names the peer in the error.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no attempt"
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            budget = max(0.001, min(ATTEMPT_TIMEOUT, deadline - loop.time()))
            await asyncio.wait_for(loop.sock_connect(sock, address), budget)
        except TimeoutError:
            sock.close()
            last = "connect timed out"
        except OSError as exc:
            sock.close()
            last = exc.strerror or str(exc)
        except BaseException:
            sock.close()
            raise
        else:
            return sock
        if (why := gone()) is not None:
            raise HypervisorError(f"{what}: {why}")
        if loop.time() + RETRY_DELAY >= deadline:
            raise HypervisorError(f"{what}: nothing listens after {timeout:g}s ({last})")
        await asyncio.sleep(RETRY_DELAY)
