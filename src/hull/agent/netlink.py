"""A small rtnetlink client for the agent: links, addresses and routes (stdlib only).

The guest has no iproute2 and the agent no pyroute2; IPv6 addresses cannot be set with
the old SIOCSIFADDR ioctls, so the agent speaks rtnetlink itself. The encoders are pure
functions (unit-tested against the kernel's struct layouts); :class:`Netlink` sends one
request at a time and waits for its ACK. The socket comes from libc through ctypes:
the ``socket`` module is a costly import in the guest.
"""

from __future__ import annotations

import _socket
import ctypes
import os
import struct

# <linux/netlink.h>
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
# <linux/if_link.h>, <linux/if_addr.h>, <linux/rtnetlink.h> attribute types
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
IFA_F_PERMANENT = 0x80
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_TABLE = 15
IFF_UP = 0x1

AF_NETLINK = 16
AF_INET, AF_INET6 = 2, 10
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto,
# scope, type, flags
_RTATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, data: bytes) -> bytes:
    """One rtattr (length, type, payload) padded to 4 bytes."""
    length = _RTATTR.size + len(data)
    return _RTATTR.pack(length, kind) + data + b"\0" * (_align(length) - length)


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A complete netlink message: nlmsghdr + body (already 4-byte aligned)."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def pack_addr(address: str) -> tuple[int, bytes]:
    fam = AF_INET6 if ":" in address else AF_INET
    return fam, _socket.inet_pton(fam, address)


def link_request(seq: int, index: int, *, up: bool | None = None, mtu: int | None = None,
                 name: str | None = None, mac: str | None = None) -> bytes:
    """RTM_NEWLINK on an existing link: set it up/down, its MTU, its name, its MAC."""
    flags = change = 0
    if up is not None:
        change = IFF_UP
        flags = IFF_UP if up else 0
    body = _IFINFOMSG.pack(0, 0, index, flags, change)
    if mac is not None:
        body += attr(IFLA_ADDRESS, bytes(int(part, 16) for part in mac.split(":")))
    if mtu is not None:
        body += attr(IFLA_MTU, struct.pack("=I", mtu))
    if name is not None:
        body += attr(IFLA_IFNAME, name.encode() + b"\0")
    return message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def address_request(seq: int, index: int, address: str, prefix_len: int) -> bytes:
    """RTM_NEWADDR: ``address/prefix_len`` on link ``index`` (IPv6 without DAD, as the
    address was already unique on the client's veth; IPv4 with its broadcast)."""
    fam, raw = pack_addr(address)
    body = _IFADDRMSG.pack(fam, prefix_len, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
    if fam == AF_INET and prefix_len < 31:
        host_mask = (1 << (32 - prefix_len)) - 1
        body += attr(IFA_BROADCAST, struct.pack("!I", struct.unpack("!I", raw)[0] | host_mask))
    body += attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD | IFA_F_PERMANENT))
    return message(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq,
                   body)


def route_request(seq: int, index: int, family: int, dest: str = "", prefix_len: int = 0,
                  gateway: str = "", metric: int = 0, scope: int = RT_SCOPE_UNIVERSE,
                  source: str = "") -> bytes:
    """RTM_NEWROUTE in the main table via link ``index`` (``dest`` "" = default route)."""
    body = _RTMSG.pack(family, prefix_len if dest else 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                       scope, RTN_UNICAST, 0)
    if dest:
        body += attr(RTA_DST, pack_addr(dest)[1])
    if gateway:
        body += attr(RTA_GATEWAY, pack_addr(gateway)[1])
    if source:
        body += attr(RTA_PREFSRC, pack_addr(source)[1])
    if metric:
        body += attr(RTA_PRIORITY, struct.pack("=I", metric))
    body += attr(RTA_OIF, struct.pack("=i", index))
    return message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq,
                   body)


def parse_ack(data: bytes, seq: int) -> int | None:
    """The errno of the NLMSG_ERROR answering ``seq`` in ``data`` (0 = ACK), None if absent."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        if kind == NLMSG_ERROR and msg_seq == seq and length >= _NLMSGHDR.size + 4:
            code: int = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
            return -code
        offset += _align(length)
    return None


_libc = ctypes.CDLL(None, use_errno=True)


class Netlink:
    """A NETLINK_ROUTE socket; :meth:`request` raises OSError with the kernel's errno."""

    def __init__(self) -> None:
        sock_raw, sock_cloexec = 3, 0o2000000
        fd = _libc.socket(AF_NETLINK, sock_raw | sock_cloexec, NETLINK_ROUTE)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"netlink socket: {os.strerror(err)}")
        self.fd: int = fd
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, data: bytes, what: str) -> None:
        seq = _NLMSGHDR.unpack_from(data)[3]
        os.write(self.fd, data)  # a netlink socket's peer is the kernel: write() sends
        while True:
            err = parse_ack(os.read(self.fd, 65536), seq)
            if err is None:
                continue
            if err:
                raise OSError(err, f"{what}: {os.strerror(err)}")
            return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
