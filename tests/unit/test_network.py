"""Networking pieces that need no VM: QEMU argv, the agent's netlink encoder, the
configure_network schema, the choice of namespace, guest NIC lookup."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from hull.agent import netlink
from hull.agent.network import guest_links
from hull.agentapi import network as net
from hull.agentapi.schema import SchemaError
from hull.hypervisor.base import Nic, VMConfig
from hull.hypervisor.qemu import argv
from hull.network import host

# ------------------------------------------------------------------------ argv


def vm(**kw: Any) -> VMConfig:
    return VMConfig(name="c1", kernel=Path("/k"), initrd=Path("/i"),
                    console_log=Path("/c"), **kw)


def opt(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_argv_tap_fd_and_virtio_net_with_the_veths_mac() -> None:
    nics = (Nic("02:42:0a:7b:00:02", 7, 1400), Nic("02:42:0a:7c:00:02", 8))
    args = argv.build("q", vm(nics=nics), argv.Fds(3, 4))
    assert opt(args, "-netdev") == ["tap,id=net0,fd=7", "tap,id=net1,fd=8"]
    devices = opt(args, "-device")
    assert "virtio-net-device,netdev=net0,mac=02:42:0a:7b:00:02,host_mtu=1400" in devices
    assert "virtio-net-device,netdev=net1,mac=02:42:0a:7c:00:02,host_mtu=1500" in devices
    # never a script or helper: -sandbox spawn=deny would kill QEMU
    assert not any("script" in a or "helper" in a for a in args)


def test_argv_q35_uses_pci_without_option_rom() -> None:
    args = argv.build("q", vm(machine_type="q35", nics=(Nic("02:00:00:00:00:01", 9),)),
                      argv.Fds(3, 4))
    assert ("virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1500,romfile="
            in opt(args, "-device"))


def test_argv_without_nics_has_no_network() -> None:
    args = argv.build("q", vm(), argv.Fds(3, 4))
    assert "-netdev" not in args and not any("virtio-net" in a for a in args)


# ------------------------------------------------------------------------ netlink encoder


def parse(msg: bytes) -> tuple[tuple[int, ...], bytes, dict[int, bytes]]:
    """(nlmsghdr fields, fixed header bytes after it, {attr type: payload})."""
    hdr = struct.unpack_from("=IHHII", msg)
    assert hdr[0] == len(msg)
    return hdr, msg[16:], {}


def attrs(data: bytes) -> dict[int, bytes]:
    out, off = {}, 0
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        out[kind] = data[off + 4:off + length]
        off += (length + 3) & ~3
    return out


def test_attr_is_padded() -> None:
    assert netlink.attr(3, b"eth0\0") == struct.pack("=HH", 9, 3) + b"eth0\0" + b"\0\0\0"
    assert len(netlink.attr(4, b"\0\0\0\0")) == 8


def test_ipv4_address_request() -> None:
    msg = netlink.address_request(7, 2, "10.123.0.2", 24)
    hdr, body, _ = parse(msg)
    assert hdr[1] == netlink.RTM_NEWADDR and hdr[3] == 7
    assert hdr[2] == (netlink.NLM_F_REQUEST | netlink.NLM_F_ACK | netlink.NLM_F_CREATE
                      | netlink.NLM_F_EXCL)
    family, plen, _flags, scope, index = struct.unpack_from("=BBBBI", body)
    assert (family, plen, scope, index) == (socket.AF_INET, 24, 0, 2)
    a = attrs(body[8:])
    assert a[netlink.IFA_LOCAL] == a[netlink.IFA_ADDRESS] == socket.inet_aton("10.123.0.2")
    assert a[netlink.IFA_BROADCAST] == socket.inet_aton("10.123.0.255")
    assert struct.unpack("=I", a[netlink.IFA_FLAGS])[0] & netlink.IFA_F_NODAD


def test_ipv6_address_request() -> None:
    msg = netlink.address_request(1, 3, "fd00:123::2", 64)
    _, body, _ = parse(msg)
    assert struct.unpack_from("=BB", body) == (socket.AF_INET6, 64)
    a = attrs(body[8:])
    assert a[netlink.IFA_LOCAL] == socket.inet_pton(socket.AF_INET6, "fd00:123::2")
    assert netlink.IFA_BROADCAST not in a


def test_default_route_request() -> None:
    msg = netlink.route_request(2, 5, socket.AF_INET, gateway="10.123.0.1", metric=100)
    hdr, body, _ = parse(msg)
    assert hdr[1] == netlink.RTM_NEWROUTE
    fam, dst_len, _s, _t, table, proto, scope, rtype, _f = struct.unpack_from("=BBBBBBBBI",
                                                                              body)
    assert (fam, dst_len, table, proto, scope, rtype) == (
        socket.AF_INET, 0, netlink.RT_TABLE_MAIN, netlink.RTPROT_BOOT, 0, netlink.RTN_UNICAST)
    a = attrs(body[12:])
    assert netlink.RTA_DST not in a
    assert a[netlink.RTA_GATEWAY] == socket.inet_aton("10.123.0.1")
    assert struct.unpack("=I", a[netlink.RTA_PRIORITY]) == (100,)
    assert struct.unpack("=i", a[netlink.RTA_OIF]) == (5,)


def test_link_request_up_mtu_name() -> None:
    msg = netlink.link_request(4, 2, up=True, mtu=1400, name="eth0")
    _, body, _ = parse(msg)
    _family, _type, index, flags, change = struct.unpack_from("=BxHiII", body)
    assert (index, flags, change) == (2, netlink.IFF_UP, netlink.IFF_UP)
    a = attrs(body[16:])
    assert a[netlink.IFLA_MTU] == struct.pack("=I", 1400)
    assert a[netlink.IFLA_IFNAME] == b"eth0\0"
    _, body, _ = parse(netlink.link_request(5, 2, mtu=9000))
    assert struct.unpack_from("=BxHiII", body)[3:] == (0, 0)  # flags untouched
    _, body, _ = parse(netlink.link_request(6, 2, mac="02:42:0a:7b:00:ff"))
    assert attrs(body[16:])[netlink.IFLA_ADDRESS] == bytes([2, 0x42, 10, 0x7b, 0, 0xff])


def test_parse_ack() -> None:
    ack = struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", 0)
    ack += bytes(16)
    err = struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, 10, 0) + struct.pack("=i", -17)
    err += bytes(16)
    assert netlink.parse_ack(ack, 9) == 0
    assert netlink.parse_ack(ack + err, 10) == 17
    assert netlink.parse_ack(ack, 11) is None
    assert netlink.parse_ack(b"\x05\0\0\0garbage", 1) is None


# ------------------------------------------------------------------------ schema


def good() -> dict[str, Any]:
    return {"interfaces": [{"name": "eth0", "mac": "02:42:0A:7B:00:02", "mtu": 1400,
                            "addresses": [{"address": "10.123.0.2", "prefix_len": 24},
                                          {"address": "fd00:123::2", "prefix_len": 64}]}],
            "routes": [{"device": "eth0", "family": 4, "gateway": "10.123.0.1",
                        "metric": 0, "scope": 0},
                       {"device": "eth0", "family": 6, "dest": "fd00:9::", "prefix_len": 48,
                        "gateway": "fd00:123::1", "metric": 1024, "scope": 0}]}


def test_schema_round_trip() -> None:
    cfg = net.NetworkConfig.from_json(good())
    assert cfg.interfaces[0].mac == "02:42:0a:7b:00:02"  # normalised
    again = net.NetworkConfig.from_json(cfg.to_json())
    assert again.to_json() == cfg.to_json()
    assert [r.family for r in again.routes] == [socket.AF_INET, socket.AF_INET6]


@pytest.mark.parametrize("path,value,message", [
    (("interfaces", 0, "mac"), "02:42:0a:7b:00", "six hex bytes"),
    (("interfaces", 0, "mac"), "01:00:5e:00:00:01", "multicast"),
    (("interfaces", 0, "name"), "eth/0", "not valid"),
    (("interfaces", 0, "name"), "a-very-long-interface", "longer than"),
    (("interfaces", 0, "name"), "lo", "reserved"),
    (("interfaces", 0, "mtu"), 20, "outside"),
    (("interfaces", 0, "addresses", 0, "address"), "10.123.0.300", "not an IP"),
    (("interfaces", 0, "addresses", 0, "prefix_len"), 33, "outside"),
    (("interfaces", 0, "addresses", 1, "prefix_len"), 129, "outside"),
    (("routes", 0, "device"), "eth9", "unknown interface"),
    (("routes", 0, "gateway"), "fd00::1", "not of the route's family"),
    (("routes", 0, "family"), 5, "family"),
    (("routes", 0, "scope"), 200, "scope"),
    (("routes", 1, "prefix_len"), 129, "outside"),
    (("routes",), "none", "must be a list"),
])
def test_schema_refuses(path: tuple[Any, ...], value: Any, message: str) -> None:
    obj = good()
    target: Any = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SchemaError, match=message):
        net.NetworkConfig.from_json(obj)


def test_schema_device_mac_of_a_clone() -> None:
    """A clone's NIC still has the template's MAC: the request names it apart."""
    obj = good()
    cfg = net.NetworkConfig.from_json(obj)
    assert cfg.interfaces[0].device_mac == cfg.interfaces[0].mac
    assert "device_mac" not in cfg.to_json()["interfaces"][0]
    obj["interfaces"][0]["device_mac"] = "02:68:75:6C:6C:00"
    cfg = net.NetworkConfig.from_json(obj)
    assert cfg.interfaces[0].device_mac == "02:68:75:6c:6c:00"
    assert net.NetworkConfig.from_json(cfg.to_json()).to_json() == cfg.to_json()
    obj["interfaces"][0]["device_mac"] = "01:00:5e:00:00:01"
    with pytest.raises(SchemaError, match="multicast"):
        net.NetworkConfig.from_json(obj)


def test_schema_limits() -> None:
    obj = good()
    obj["routes"] = obj["routes"] * (net.MAX_ROUTES // 2 + 1)
    with pytest.raises(SchemaError, match="more than"):
        net.NetworkConfig.from_json(obj)
    obj = good()
    obj["interfaces"].append(dict(obj["interfaces"][0], name="eth1"))
    with pytest.raises(SchemaError, match="share a name or a mac"):
        net.NetworkConfig.from_json(obj)


# ------------------------------------------------------------------------ records


def recorded(tmp_path: Path, netns: Path) -> Path:
    """The record of an attachment of one veth in ``netns`` (any file stands in)."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        att = host.Attachment(str(netns), fd, [host.Endpoint(
            "eth0", 2, "02:00:00:00:00:01", 1500, -1, "hulltap0", 3, own_qdisc=True)], [])
        record = tmp_path / host.RECORD_NAME
        host._save_record(att, record)
    finally:
        os.close(fd)
    return record


def test_record_round_trip(tmp_path: Path) -> None:
    netns = tmp_path / "ns"
    netns.touch()
    path, identity, endpoints = host._load_record(recorded(tmp_path, netns))
    assert (path, identity) == (str(netns), (netns.stat().st_dev, netns.stat().st_ino))
    assert [(e.name, e.index, e.tap_name, e.tap_index, e.own_qdisc) for e in endpoints] == [
        ("eth0", 2, "hulltap0", 3, True)]


@pytest.mark.parametrize("later", ["deleted", "replaced"])
def test_record_of_a_namespace_that_is_gone_is_dropped(tmp_path: Path, later: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deleted namespace took its veths along; a new one at the same path is not the
    one recorded: neither is touched, and the record goes."""
    netns = tmp_path / "ns"
    netns.touch()
    record = recorded(tmp_path, netns)
    if later == "replaced":  # made while the old one exists: surely another inode
        (tmp_path / "new").touch()
        (tmp_path / "new").replace(netns)
    else:
        netns.unlink()

    def entered(*_: object) -> None:
        raise AssertionError("entered a namespace the record does not name")

    monkeypatch.setattr(host, "in_netns", entered)
    host.release_recorded(record)
    assert not record.exists()
    host.release_recorded(record)  # nothing recorded: nothing to do


def test_mirred_targets_of_a_dumped_filter() -> None:
    from pyroute2.netlink.rtnl.tcmsg import tcmsg  # type: ignore[import-untyped]

    msg = tcmsg()
    msg["attrs"] = [("TCA_KIND", "u32"), ("TCA_OPTIONS", {"attrs": [("TCA_U32_ACT", {
        "attrs": [("TCA_ACT_PRIO_1", {"attrs": [
            ("TCA_ACT_KIND", "mirred"),
            ("TCA_ACT_OPTIONS", {"attrs": [("TCA_MIRRED_PARMS", {
                "index": 1, "capab": 0, "action": 4, "refcnt": 1, "bindcnt": 1,
                "eaction": 1, "ifindex": 7})]})]})]})]})]
    msg.encode()
    dumped = tcmsg(msg.data)
    dumped.decode()
    assert host._mirred_targets(dumped) == {7}
    assert host._mirred_targets(tcmsg()) == set()


# ------------------------------------------------------------------------ host choice


def spec(*entries: dict[str, str]) -> dict[str, Any]:
    return {"linux": {"namespaces": [{"type": "pid"}, *entries]}}


def test_choose() -> None:
    assert host.choose(spec()).netns is None  # no entry: the VM's loopback
    assert host.choose(spec({"type": "network"})).netns is None  # new, empty
    with pytest.raises(host.NetworkError, match="cannot share the host's network"):
        host.choose(spec({"type": "network", "path": "/proc/self/ns/net"}))
    with pytest.raises(host.NetworkError, match="does not exist"):
        host.choose(spec({"type": "network", "path": "/nonexistent/netns"}))


def test_choose_a_namespace_of_its_own(tmp_path: Path) -> None:
    # Stand-ins: any two distinct files play "a namespace" and "the host's".
    other, hostns = tmp_path / "ns", tmp_path / "host"
    other.touch()
    hostns.touch()
    choice = host.choose(spec({"type": "network", "path": str(other)}),
                         own_netns=str(hostns), host_netns=str(hostns))
    assert choice.netns == str(other)
    with pytest.raises(host.NetworkError):
        host.choose(spec({"type": "network", "path": str(hostns)}), own_netns=str(hostns),
                    host_netns="/unreadable")


# ------------------------------------------------------------------------ guest lookup


def test_guest_links_by_mac(tmp_path: Path) -> None:
    for name, mac, index in (("lo", "00:00:00:00:00:00", 1), ("eth0", "02:AA:00:00:00:01", 2),
                             ("eth1", "02:aa:00:00:00:02", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
        (tmp_path / name / "ifindex").write_text(f"{index}\n")
    (tmp_path / "broken").mkdir()
    assert guest_links(str(tmp_path)) == {"02:aa:00:00:00:01": (2, "eth0"),
                                          "02:aa:00:00:00:02": (3, "eth1")}


# ------------------------------------------------------------------------ host side

_ATTACH_IN_A_PRIVATE_NAMESPACE = """
import os, subprocess, sys, time
from hull.network import host

holder = subprocess.Popen(["unshare", "-n", "sleep", "60"])
try:
    netns = f"/proc/{holder.pid}/ns/net"
    while os.readlink(netns) == os.readlink("/proc/self/ns/net"):
        time.sleep(0.01)  # until unshare has run
    def make_veth() -> None:
        with host._iproute() as ipr:
            ipr.link("add", ifname="veth0", kind="veth", peer="veth1")
    fd = os.open(netns, os.O_RDONLY)
    host.in_netns(fd, make_veth)
    att = host.attach(netns)
    def u32_filters() -> int:
        with host._iproute() as ipr:
            return len([f for f in ipr.get_filters(index=att.endpoints[0].index,
                                                    parent=0xFFFF0000)
                        if f.get_attr("TCA_KIND") == "u32"])
    filters = host.in_netns(fd, u32_filters)
    host.detach(att)
    print(sorted(ep.name for ep in att.endpoints), filters > 0,
          host.in_netns(fd, u32_filters), "pyroute2.ndb" in sys.modules,
          "pyroute2.ipdb" in sys.modules)
finally:
    holder.kill()
    holder.wait()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_attach_imports_only_the_netlink_part_of_pyroute2() -> None:
    import subprocess
    import sys

    # The namespace is a `sleep`'s (unshare -n), gone with it: nothing left to clean up.
    out = subprocess.run([sys.executable, "-c", _ATTACH_IN_A_PRIVATE_NAMESPACE],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    # Both veths mirrored to a tap each, filters in place, then removed; no ndb, no ipdb.
    assert out.stdout.strip() == "['veth0', 'veth1'] True 0 False False"
