"""configure_network: give the guest's NICs the network of the client's namespace.

Each guest virtio-net device carries the MAC of the veth it stands for (the host set it
on the QEMU command line), so interfaces are matched by MAC; a clone of a VM template
(hull.runtime.factory) has the template's MACs instead: the request names them
(``device_mac``) and the device gets the veth's. Each gets the veth's name,
MTU, IPv4 and IPv6 addresses, then the routes (device routes first, so a gateway is
reachable when the routes through it are added). It all happens in the guest's own
network namespace, which the containers of the VM share (see docs/networking.md).
"""

from __future__ import annotations

import errno
import os

from hull.agent.netlink import (
    RT_SCOPE_LINK,
    Netlink,
    address_request,
    link_request,
    route_request,
)
from hull.agentapi.network import NetworkConfig

SYS_CLASS_NET = "/sys/class/net"


def guest_links(sys_class_net: str = SYS_CLASS_NET) -> dict[str, tuple[int, str]]:
    """MAC -> (ifindex, name) of the guest's links (lo and MAC-less links left out)."""
    found: dict[str, tuple[int, str]] = {}
    for name in sorted(os.listdir(sys_class_net)):
        try:
            with open(os.path.join(sys_class_net, name, "address")) as f:
                mac = f.read().strip().lower()
            with open(os.path.join(sys_class_net, name, "ifindex")) as f:
                index = int(f.read())
        except (OSError, ValueError):
            continue
        if name != "lo" and mac and mac != "00:00:00:00:00:00":
            found[mac] = (index, name)
    return found


def configure(config: NetworkConfig, sys_class_net: str = SYS_CLASS_NET) -> list[str]:
    """Apply ``config``; returns one line per step done (for the log). Raises OSError
    naming the interface, address or route that failed, or LookupError for a NIC that
    is missing."""
    found = guest_links(sys_class_net)
    missing = [i.device_mac for i in config.interfaces if i.device_mac not in found]
    if missing:
        raise LookupError(f"no guest network device with mac {', '.join(missing)} (guest "
                          f"devices: {', '.join(sorted(found)) or 'none'})")
    links = {i.mac: found[i.device_mac] for i in config.interfaces}
    done: list[str] = []
    with Netlink() as nl:
        renamed = [i for i in config.interfaces if links[i.mac][1] != i.name]
        # Two steps, as a guest eth1 may have to become eth0 while eth0 still exists.
        for n, iface in enumerate(renamed):
            index = links[iface.mac][0]
            nl.request(link_request(nl.next_seq(), index, up=False, name=f"hullnet{n}"),
                       f"rename {links[iface.mac][1]}")
        for iface in config.interfaces:
            index = links[iface.mac][0]
            name = iface.name if iface in renamed else None
            mac = iface.mac if iface.device_mac != iface.mac else None
            nl.request(link_request(nl.next_seq(), index, mtu=iface.mtu, name=name, mac=mac),
                       f"{iface.name}: set mtu {iface.mtu}" + (f", mac {mac}" if mac else ""))
            nl.request(link_request(nl.next_seq(), index, up=True), f"{iface.name}: up")
            done.append(f"{iface.name} ({iface.mac}) mtu {iface.mtu} up")
            for addr in iface.addresses:
                try:
                    nl.request(address_request(nl.next_seq(), index, addr.address,
                                               addr.prefix_len), f"{iface.name}: add {addr}")
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                done.append(f"{iface.name}: {addr}")
        index_of = {i.name: links[i.mac][0] for i in config.interfaces}
        # Routes without a gateway first: they make the gateways of the others reachable.
        ordered = sorted(config.routes, key=lambda r: (bool(r.gateway), r.scope != RT_SCOPE_LINK))
        for route in ordered:
            try:
                nl.request(route_request(nl.next_seq(), index_of[route.device], route.family,
                                         route.dest, route.prefix_len, route.gateway,
                                         route.metric, route.scope, route.source),
                           f"route {route}")
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            done.append(f"route {route}")
    return done
