"""Connect the VM to the network namespace a client (CNI, netavark, Docker) prepared.

The "tcfilter" model of Kata Containers: in the container's network namespace, for each
veth-like interface, Hull creates a tap device and joins the two with tc ingress filters
that redirect every frame to the other's egress (``u32 match u8 0 0 action mirred egress
redirect``), both ways. QEMU runs in that namespace and gets the tap as an open fd (its
``-sandbox spawn=deny`` forbids the helper scripts); the guest NIC has the veth's MAC,
and the agent gives it the veth's name, MTU, addresses and routes. The veth itself is
left as it was: on detach the filters (and the ingress qdisc, when Hull added it) go,
and the tap vanishes with its last fd.

The owner of a sandbox (the proxy daemon, `hull run`, the containerd shim) records what
it attached in its state directory (``network.json``). Its filters outlive it when it
is SIGKILLed; the cleanup that follows (``hull delete --force``, the shim's ``delete``)
restores the veths from that record (release_recorded).

Everything that touches the namespace runs in a short-lived thread that entered it with
setns(2) (network namespaces are per thread), so the caller's own namespace never
changes. Netlink through pyroute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hull.agentapi import network as netschema
from hull.agentapi.schema import SchemaError
from hull.errors import HullError

if TYPE_CHECKING:
    # Imported where used: pyroute2 costs ~65 ms to import, and every `hull` command
    # that reaches the runtime imports this module, most without any network to attach.
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

log = logging.getLogger("hull.network")
T = TypeVar("T")


def _pyroute2(module: str) -> Any:
    """``pyroute2.<module>``, without running pyroute2's package ``__init__``.

    That ``__init__`` imports the whole library to export its names (ndb, ipdb,
    conntrack, wireguard, nftables ...: 234 modules, ~65 ms of CPU quiet, ~0.3 s under
    load), on the path of every networked pod; rtnetlink and tc need ~150 of them
    (~40 ms). So a bare package module stands in for it. pyroute2's own modules import
    only submodules of it (``from pyroute2 import config, netns``), which that serves."""
    import sys

    if "pyroute2" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("pyroute2")
        if spec is None:
            raise NetworkError("pyroute2 is not installed")
        sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
    import importlib

    return importlib.import_module(f"pyroute2.{module}")


def _iproute() -> IPRoute:
    """A new rtnetlink socket (pyroute2's IPRoute)."""
    return _pyroute2("iproute.linux").IPRoute()

CLONE_NEWNET = 0x40000000
HOST_NETNS = "/proc/1/ns/net"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_NAME = "hulltap%d"
ETH_P_ALL = 0x0003
TC_H_INGRESS = 0xFFFF0000
#: Priority ("pref") of Hull's redirect filters: recognisable, after the usual 49152 of
#: filters added without one.
FILTER_PRIO = 0xC0DE
#: The u32 filter's class (Kata uses 1:1 too; the mirred action decides the packet's fate).
FILTER_CLASS = 0x10001
ARPHRD_ETHER = 1
#: Link kinds that are never a container's uplink (ours, bridges, tunnels ...).
SKIPPED_KINDS = frozenset({"tun", "bridge", "openvswitch", "vxlan", "geneve", "gre",
                           "gretap", "ip6gre", "ipip", "sit", "wireguard", "dummy", "ifb"})
#: Route protocols the kernel adds by itself when the agent adds an address.
RTPROT_KERNEL = 2
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
#: File name of an attachment's record in its owner's state directory.
RECORD_NAME = "network.json"

_libc = ctypes.CDLL(None, use_errno=True)


class NetworkError(HullError):
    """The container's network namespace cannot be used or mirrored into the VM."""


# ------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class Choice:
    """Which network namespace the VM mirrors: ``netns`` (a path), or None for none."""

    netns: str | None
    why: str


def same_namespace(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def spec_network(spec: dict[str, Any]) -> tuple[bool, str]:
    """(the spec has a ``network`` namespace entry, its path or "")."""
    linux = spec.get("linux") or {}
    for ns in linux.get("namespaces") or [] if isinstance(linux, dict) else []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            return True, path if isinstance(path, str) else ""
    return False, ""


def choose(spec: dict[str, Any], own_netns: str = "/proc/self/ns/net",
           host_netns: str = HOST_NETNS) -> Choice:
    """The network namespace to mirror for a container of ``spec`` (see docs/networking.md).

    - ``network`` entry with a path: that namespace (CNI, netavark, CRI, ``--net=ns:``).
      Refused when it is the host's (PID 1's) namespace, or Hull's own (Hull normally runs
      in the host's, and /proc/1/ns may be unreadable): a VM cannot share it, and its
      interfaces must never be redirected into a guest.
    - ``network`` entry without a path: a new, empty namespace: nothing to mirror, the
      agent gives the container one with only ``lo``.
    - no ``network`` entry: the container has the VM's own network: loopback only.
      (runc would share its own namespace: for a VM that would mean taking over the
      host's interfaces; clients that want a network name a namespace.)
    """
    has, path = spec_network(spec)
    if has and path:
        try:
            os.stat(path)
        except OSError as exc:
            what = "does not exist" if exc.errno == errno.ENOENT else exc.strerror
            raise NetworkError(f"linux.namespaces: network namespace {path} {what}"
                               ) from None
        if same_namespace(path, host_netns) or same_namespace(path, own_netns):
            raise NetworkError(
                f"linux.namespaces: network namespace {path} is the host's: a container in "
                "a VM cannot share the host's network stack (it has its own kernel); give "
                "it a namespace of its own (CNI, podman --network bridge) or none")
        return Choice(path, "the namespace config.json names")
    if has:
        return Choice(None, "a new network namespace: loopback only")
    return Choice(None, "config.json names no network namespace: the container has the "
                        "VM's own network, loopback only")


# ------------------------------------------------------------------------- in the netns


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_netns(netns_fd: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that entered the namespace ``netns_fd`` (-1: the
    caller's, for an ``fn`` that makes a namespace of its own); its result."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if netns_fd >= 0:
                setns(netns_fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name="hull-netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def open_tap(name: str = TAP_NAME) -> tuple[int, str]:
    """A new tap device in the calling thread's namespace: (its fd, its name). The
    device is not persistent: it disappears when its last fd (QEMU's, ours) closes."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        answer = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd, answer[:16].rstrip(b"\0").decode()


class PrivateTaps:
    """``count`` taps in a network namespace made for them, empty and unconnected: the
    backends of the NICs a VM template and its clones have beyond the sandbox's own
    (hull.runtime.factory). A NIC booted with a vnet-header tap lets the guest use
    checksum and segmentation offloads; QEMU then refuses to restore that guest onto a
    NIC without such a backend, so every clone's NIC needs one. A context manager: the
    namespace lives (and with it the taps QEMU holds: a tap whose namespace is gone
    leaves QEMU polling a dead fd) until it is closed, after QEMU stopped.
    ``move`` hands the taps to another namespace (a pooled clone's lessee)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.netns_fd = -1
        self.fds: list[int] = []
        self.names: list[str] = []

    def __enter__(self) -> PrivateTaps:
        if self.count:
            try:
                in_netns(-1, self._make)
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make(self) -> None:  # in a thread of its own (namespaces are per thread)
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"cannot make a network namespace for spare taps: "
                               f"{os.strerror(err)}")
        self.netns_fd = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net",
                                os.O_RDONLY | os.O_CLOEXEC)
        for _ in range(self.count):
            fd, name = open_tap()
            self.fds.append(fd)
            self.names.append(name)

    def move(self, netns_fd: int) -> list[str]:
        """Move the taps (down, as made) into the namespace ``netns_fd``, under names no
        other sandbox there uses; their names there."""
        def work() -> list[str]:
            moved = []
            with _iproute() as ipr:
                for name in self.names:
                    index = ipr.link_lookup(ifname=name)[0]
                    unique = f"hullp{secrets.token_hex(5)}"  # 15 bytes: IFNAMSIZ - 1
                    ipr.link("set", index=index, ifname=unique, net_ns_fd=netns_fd)
                    moved.append(unique)
            return moved

        try:
            return in_netns(self.netns_fd, work)
        except Exception as exc:
            raise NetworkError(f"cannot move spare taps {self.names} into the sandbox's "
                               f"network namespace: {exc}") from exc

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1


@dataclass
class Endpoint:
    """One veth mirrored into the VM through one tap."""

    name: str
    index: int
    mac: str
    mtu: int
    tap_fd: int
    tap_name: str
    tap_index: int
    #: Hull added the veth's ingress qdisc (so it removes it again)
    own_qdisc: bool
    addresses: list[netschema.Address] = field(default_factory=list)


@dataclass
class Attachment:
    """The taps and filters of one sandbox in one network namespace."""

    netns: str
    netns_fd: int
    endpoints: list[Endpoint]
    routes: list[netschema.Route]
    #: where the attachment is recorded for release_recorded (None: nowhere)
    record: Path | None = None

    @property
    def tap_fds(self) -> tuple[int, ...]:
        return tuple(e.tap_fd for e in self.endpoints)

    def config(self, device_macs: tuple[str, ...] = ()) -> netschema.NetworkConfig:
        """The configure_network request for the agent; ``device_macs``: the MACs the
        guest's NICs have now, in order, when not the veths' (a VM template's clone)."""
        devices = device_macs or tuple(e.mac for e in self.endpoints)
        return netschema.NetworkConfig(
            [netschema.Interface(e.name, e.mac, e.mtu, e.addresses, device_mac)
             for e, device_mac in zip(self.endpoints, devices, strict=True)],
            self.routes)


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def candidates(ipr: IPRoute) -> list[Any]:
    """The namespace's veth-like links: Ethernet, not lo, not a tap/bridge/tunnel."""
    found = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if link["ifi_type"] != ARPHRD_ETHER or name == "lo" or _kind(link) in SKIPPED_KINDS:
            continue
        if name.startswith("hulltap"):
            continue
        found.append(link)
    return found


def _addresses(ipr: IPRoute, index: int) -> list[netschema.Address]:
    out = []
    for msg in ipr.get_addr(index=index):
        addr = msg.get_attr("IFA_LOCAL") if msg["family"] == socket.AF_INET else None
        addr = addr or msg.get_attr("IFA_ADDRESS")
        if not addr or msg["scope"] != 0:  # link-local: the guest makes its own (same MAC)
            continue
        out.append(netschema.Address(addr, msg["prefixlen"]))
    return out


def _routes(ipr: IPRoute, names: dict[int, str]) -> list[netschema.Route]:
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            oif = msg.get_attr("RTA_OIF")
            if (oif not in names or msg["proto"] == RTPROT_KERNEL or msg["type"] != RTN_UNICAST
                    or msg.get_attr("RTA_TABLE", RT_TABLE_MAIN) != RT_TABLE_MAIN):
                continue
            dest = msg.get_attr("RTA_DST") or ""
            if family == socket.AF_INET6 and dest.startswith(("fe80:", "ff")):
                continue
            scope = msg["scope"]
            try:
                out.append(netschema.Route(
                    names[oif], family, dest, msg["dst_len"] if dest else 0,
                    msg.get_attr("RTA_GATEWAY") or "", msg.get_attr("RTA_PRIORITY") or 0,
                    scope if scope in (0, 253) else 0, msg.get_attr("RTA_PREFSRC") or ""))
            except SchemaError as exc:
                log.warning("route %s not mirrored: %s", dest or "default", exc)
    return out


def _redirect(ipr: IPRoute, src: int, dst: int) -> None:
    ipr.tc("add-filter", "u32", src, parent=TC_H_INGRESS, prio=FILTER_PRIO,
           protocol=ETH_P_ALL, target=FILTER_CLASS, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": dst})


def _del_filters(ipr: IPRoute, index: int) -> None:
    """Delete Hull's filters (by priority) from ``index``'s ingress: tcm_info holds the
    priority and the protocol (network byte order)."""
    ipr.tc("del-filter", index=index, parent=TC_H_INGRESS,
           info=(FILTER_PRIO << 16) | socket.htons(ETH_P_ALL))


def _drop_stale_filters(ipr: IPRoute, index: int) -> bool:
    """Remove Hull's filters left on ``index`` by a sandbox that was killed."""
    stale = any(f["info"] >> 16 == FILTER_PRIO
                for f in ipr.get_filters(index=index, parent=TC_H_INGRESS))
    if stale:
        _del_filters(ipr, index)
    return stale


def _has_ingress(ipr: IPRoute, index: int) -> bool:
    return any(q["handle"] == TC_H_INGRESS for q in ipr.get_qdiscs(index=index))


def _attach_here(netns: str, netns_fd: int, taps: list[str] | None) -> Attachment:
    endpoints: list[Endpoint] = []
    att = Attachment(netns, netns_fd, endpoints, [])
    with _iproute() as ipr:
        try:
            links = candidates(ipr)
            if taps is not None and len(links) > len(taps):
                raise NetworkError(f"network namespace {netns} has {len(links)} interfaces "
                                   f"to mirror, the vm {len(taps)} NICs")
            for i, link in enumerate(links):
                index = link["index"]
                name = link.get_attr("IFLA_IFNAME")
                mtu = link.get_attr("IFLA_MTU") or 1500
                # A pooled clone's taps were moved here; QEMU holds them (no fd of ours).
                tap_fd, tap_name = open_tap() if taps is None else (-1, taps[i])
                ep = Endpoint(name, index, link.get_attr("IFLA_ADDRESS"), mtu, tap_fd,
                              tap_name, 0, own_qdisc=False)
                endpoints.append(ep)
                ep.tap_index = ipr.link_lookup(ifname=tap_name)[0]
                ipr.link("set", index=ep.tap_index, mtu=mtu, state="up")
                ipr.tc("add", "ingress", ep.tap_index, TC_H_INGRESS)
                if not _has_ingress(ipr, index):
                    ipr.tc("add", "ingress", index, TC_H_INGRESS)
                    ep.own_qdisc = True
                elif _drop_stale_filters(ipr, index):
                    log.warning("netns %s: removed stale hull filters from %s (a hull process "
                                "that died without cleaning up)", netns, name)
                _redirect(ipr, index, ep.tap_index)
                _redirect(ipr, ep.tap_index, index)
                ep.addresses = _addresses(ipr, index)
            att.routes = _routes(ipr, {e.index: e.name for e in endpoints})
        except BaseException:
            _detach_here(ipr, att)
            raise
    return att


def _detach_here(ipr: IPRoute, att: Attachment) -> list[str]:
    problems: list[str] = []
    for ep in att.endpoints:
        try:
            if ep.own_qdisc:
                ipr.tc("del", "ingress", ep.index, TC_H_INGRESS)
            else:
                _del_filters(ipr, ep.index)
        except Exception as exc:  # the veth may be gone already (the client deleted it)
            problems.append(f"{ep.name}: {exc}")
        with contextlib.suppress(OSError):
            os.close(ep.tap_fd)
        ep.tap_fd = -1
        # Gone with its last fd unless QEMU still holds one; then remove it explicitly.
        with contextlib.suppress(Exception):
            if ep.tap_index and ipr.link_lookup(ifname=ep.tap_name) == [ep.tap_index]:
                ipr.link("del", index=ep.tap_index)
    return problems


def _is_host(fd: int) -> bool:
    return any(same_namespace(f"/proc/self/fd/{fd}", ns) for ns in ("/proc/self/ns/net",
                                                                   HOST_NETNS))


def attach(netns: str, record: Path | None = None, taps: list[str] | None = None
           ) -> Attachment:
    """Create the taps and filters in ``netns`` (a path); QEMU then runs there too.
    With ``record``, what was attached is written there (for release_recorded). With
    ``taps``, the names of taps already there (a pooled clone's, PrivateTaps.move), the
    veths are redirected to those instead, in order."""
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"network namespace {netns}: {exc.strerror}") from exc
    # Never the host's interfaces, whatever path led here (choose() refused them already).
    if _is_host(fd):
        os.close(fd)
        raise NetworkError(f"network namespace {netns} is the host's: refusing to connect "
                           "its interfaces to a vm")
    try:
        att = in_netns(fd, lambda: _attach_here(netns, fd, taps))
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError | ValueError) or type(exc).__module__.startswith(
                "pyroute2"):
            raise NetworkError(f"network namespace {netns}: cannot connect it to the vm: "
                               f"{exc}") from exc
        raise
    if record is not None and att.endpoints:
        try:
            _save_record(att, record)
        except OSError as exc:
            detach(att)
            raise NetworkError(f"network namespace {netns}: cannot record its taps in "
                               f"{record}: {exc.strerror}") from exc
        att.record = record
    for ep in att.endpoints:
        log.debug("netns %s: %s (%s, mtu %d) <-> %s", netns, ep.name, ep.mac, ep.mtu,
                  ep.tap_name)
    if not att.endpoints:
        log.info("network namespace %s has no interface to mirror: loopback only", netns)
    return att


def detach(att: Attachment) -> None:
    """Remove the filters (and the qdiscs Hull added) and the taps. Idempotent."""
    if att.netns_fd < 0:
        return

    def work() -> list[str]:
        with _iproute() as ipr:
            return _detach_here(ipr, att)

    try:
        for problem in in_netns(att.netns_fd, work):
            log.debug("netns %s: detach: %s", att.netns, problem)
    except Exception as exc:
        log.warning("network namespace %s: cleanup failed: %s", att.netns, exc)
    finally:
        os.close(att.netns_fd)
        att.netns_fd = -1
        if att.record is not None:
            att.record.unlink(missing_ok=True)


# ------------------------------------------------------------------------- after a SIGKILL


def _save_record(att: Attachment, path: Path) -> None:
    """Write what release_recorded needs: the namespace (path and identity), and per
    veth its tap and whether Hull added the ingress qdisc."""
    ns = os.fstat(att.netns_fd)
    data = {"netns": att.netns, "dev": ns.st_dev, "ino": ns.st_ino,
            "endpoints": [{"name": e.name, "index": e.index, "tap_name": e.tap_name,
                           "tap_index": e.tap_index, "own_qdisc": e.own_qdisc}
                          for e in att.endpoints]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _load_record(path: Path) -> tuple[str, tuple[int, int], list[Endpoint]]:
    data = json.loads(path.read_text())
    endpoints = [Endpoint(str(e["name"]), int(e["index"]), "", 0, -1, str(e["tap_name"]),
                          int(e["tap_index"]), own_qdisc=bool(e["own_qdisc"]))
                 for e in data["endpoints"]]
    return str(data["netns"]), (int(data["dev"]), int(data["ino"])), endpoints


def _link_name(ipr: IPRoute, index: int) -> str | None:
    netlink_error = _pyroute2("netlink.exceptions").NetlinkError
    if index <= 0:  # get_links(0) would list them all
        return None
    try:
        links = ipr.get_links(index)
    except netlink_error:
        return None
    name: str | None = links[0].get_attr("IFLA_IFNAME") if links else None
    return name


def _mirred_targets(flt: Any) -> set[int]:
    """The interfaces a u32 filter's mirred actions redirect to (0: one that was
    deleted: the kernel forgets the target then)."""
    options = flt.get_attr("TCA_OPTIONS")
    actions = options.get_attr("TCA_U32_ACT") if options is not None else None
    targets = set()
    for _, action in actions["attrs"] if actions is not None else []:
        params = action.get_attr("TCA_ACT_OPTIONS")
        mirred = params.get_attr("TCA_MIRRED_PARMS") if params is not None else None
        if mirred is not None:
            targets.add(mirred["ifindex"])
    return targets


def _release_here(ipr: IPRoute, endpoints: list[Endpoint]) -> list[str]:
    problems: list[str] = []
    for ep in endpoints:
        # A tap outlives its sandbox's owner while QEMU (its other holder) is dying.
        if ep.tap_index and ipr.link_lookup(ifname=ep.tap_name) == [ep.tap_index]:
            ipr.link("del", index=ep.tap_index)
        if _link_name(ipr, ep.index) != ep.name:
            problems.append(f"{ep.name} is gone")
            continue
        filters = ipr.get_filters(index=ep.index, parent=TC_H_INGRESS)
        ours = [f for f in filters if f["info"] >> 16 == FILTER_PRIO]
        targets = set().union(*(_mirred_targets(f) for f in ours))
        live = sorted(t for t in targets if _link_name(ipr, t) is not None)
        if live:  # a sandbox started since in this namespace took the veth over
            problems.append(f"{ep.name}: hull filters to running interfaces {live} kept")
            continue
        others = any(f["info"] >> 16 != FILTER_PRIO for f in filters)
        if ep.own_qdisc and not others and _has_ingress(ipr, ep.index):
            ipr.tc("del", "ingress", ep.index, TC_H_INGRESS)
        elif ours:
            _del_filters(ipr, ep.index)
    return problems


def release_recorded(record: Path) -> None:
    """Restore the veths a sandbox whose owner died (SIGKILL) left redirected: from the
    record attach() wrote, delete its tap if QEMU still holds it, then its filters from
    each veth (or the ingress qdisc, when Hull added it and nothing else uses it).
    Nothing recorded (the owner cleaned up), or the namespace gone (its veths went with
    it): nothing to do. Failures are logged: the caller is a cleanup that must finish.
    """
    try:
        netns, identity, endpoints = _load_record(record)
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("network record %s is unreadable, not used: %s", record, exc)
        record.unlink(missing_ok=True)
        return
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("network namespace %s of %s: %s", netns, record, exc.strerror)
        record.unlink(missing_ok=True)
        return
    try:
        ns = os.fstat(fd)
        if (ns.st_dev, ns.st_ino) != identity or _is_host(fd):
            log.debug("network namespace %s is no longer the one %s names", netns, record)
        else:
            def work() -> list[str]:
                with _iproute() as ipr:
                    return _release_here(ipr, endpoints)

            for problem in in_netns(fd, work):
                log.info("network namespace %s: %s", netns, problem)
            log.info("network namespace %s: removed the taps and filters of a sandbox "
                     "whose owner died (%s)", netns, record)
    except Exception as exc:
        log.warning("network namespace %s: cleanup after a dead sandbox (%s) failed: %s",
                    netns, record, exc)
    finally:
        os.close(fd)
    record.unlink(missing_ok=True)
