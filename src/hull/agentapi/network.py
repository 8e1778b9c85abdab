"""The ``configure_network`` request: the interfaces, addresses and routes the guest gets.

The host reads them from the container's network namespace (hull.network.host) and the
agent applies them to the guest's NICs, matched by MAC address (hull.agent.network).
Shared by both sides, stdlib only and cheap to import (the guest imports it at boot: no
dataclasses, no ipaddress). Everything is validated on the agent side too: the agent
must never apply a half-checked request (a bad one fails whole, before any change).
"""

from __future__ import annotations

import _socket  # not socket: its import costs the guest ~10 ms of enum conversions

from hull.agentapi.schema import SchemaError, get_int, get_str

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

AF_INET, AF_INET6 = 2, 10

MAX_INTERFACES = 16
MAX_ADDRESSES = 64  # per interface
MAX_ROUTES = 256
MIN_MTU, MAX_MTU = 68, 65535
_IFNAME_BAD = frozenset("/: \t\n\0")

#: rtnetlink scopes a route may have (RT_SCOPE_UNIVERSE, RT_SCOPE_LINK)
SCOPE_UNIVERSE, SCOPE_LINK = 0, 253


def family_of(address: str) -> int:
    """AF_INET or AF_INET6 for a textual address; SchemaError when it is neither."""
    fam = AF_INET6 if ":" in address else AF_INET
    try:
        _socket.inet_pton(fam, address)
    except (OSError, ValueError):
        raise SchemaError(f"{address!r} is not an IP address") from None
    return fam


def _prefix(obj: dict[str, Any], key: str, fam: int) -> int:
    return get_int(obj, key, 0, 32 if fam == AF_INET else 128)


def check_mac(mac: str) -> str:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise SchemaError(f"mac {mac!r} is not six hex bytes")
    try:
        value = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise SchemaError(f"mac {mac!r} is not six hex bytes") from None
    if value[0] & 1:
        raise SchemaError(f"mac {mac} is a multicast address")
    return mac.lower()


def check_ifname(name: str) -> str:
    if not 1 <= len(name.encode()) <= 15 or name in (".", "..") or (
            set(name) & _IFNAME_BAD):
        raise SchemaError(f"interface name {name!r} is not valid (1-15 bytes, no '/', ':' "
                          "or spaces)")
    return name


def _list(obj: dict[str, Any], key: str, limit: int) -> list[Any]:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise SchemaError(f"{key} must be a list")
    if len(value) > limit:
        raise SchemaError(f"{key} has more than {limit} entries")
    return value


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{what} is not an object")
    return value


class Address:
    __slots__ = ("address", "family", "prefix_len")

    def __init__(self, address: str, prefix_len: int) -> None:
        self.family = family_of(address)
        self.address = address
        self.prefix_len = prefix_len

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "prefix_len": self.prefix_len}

    @classmethod
    def from_json(cls, obj: Any) -> Address:
        o = _obj(obj, "address")
        address = get_str(o, "address", max_len=64)
        return cls(address, _prefix(o, "prefix_len", family_of(address)))

    def __repr__(self) -> str:
        return f"{self.address}/{self.prefix_len}"


class Interface:
    """One NIC: the guest device whose MAC is ``device_mac`` (by default ``mac``) gets
    ``name``, ``mac``, ``mtu`` and addresses. The two differ in a clone of a VM template
    (hull.runtime.factory): its devices still carry the template's MACs."""

    __slots__ = ("addresses", "device_mac", "mac", "mtu", "name")

    def __init__(self, name: str, mac: str, mtu: int, addresses: list[Address],
                 device_mac: str = "") -> None:
        self.name = check_ifname(name)
        self.mac = check_mac(mac)
        self.device_mac = check_mac(device_mac) if device_mac else self.mac
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise SchemaError(f"mtu={mtu} of {name} is outside [{MIN_MTU}, {MAX_MTU}]")
        self.mtu = mtu
        self.addresses = addresses

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "mac": self.mac, "mtu": self.mtu,
               "addresses": [a.to_json() for a in self.addresses]}
        if self.device_mac != self.mac:
            out["device_mac"] = self.device_mac
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Interface:
        o = _obj(obj, "interface")
        return cls(get_str(o, "name", max_len=15), get_str(o, "mac", max_len=17),
                   get_int(o, "mtu", MIN_MTU, MAX_MTU),
                   [Address.from_json(a) for a in _list(o, "addresses", MAX_ADDRESSES)],
                   get_str(o, "device_mac", max_len=17, optional=True))


class Route:
    """A route of the main table: ``dest``/``prefix_len`` ("" and 0: the default route)."""

    __slots__ = ("dest", "device", "family", "gateway", "metric", "prefix_len", "scope",
                 "source")

    def __init__(self, device: str, family: int, dest: str = "", prefix_len: int = 0,
                 gateway: str = "", metric: int = 0, scope: int = SCOPE_UNIVERSE,
                 source: str = "") -> None:
        if family not in (AF_INET, AF_INET6):
            raise SchemaError(f"route family {family} is neither inet nor inet6")
        for what, addr in (("dest", dest), ("gateway", gateway), ("source", source)):
            if addr and family_of(addr) != family:
                raise SchemaError(f"route {what} {addr} is not of the route's family")
        if scope not in (SCOPE_UNIVERSE, SCOPE_LINK):
            raise SchemaError(f"route scope {scope} is neither universe (0) nor link (253)")
        if not dest and prefix_len:
            raise SchemaError("a route without dest must have prefix_len 0")
        self.device = check_ifname(device)
        self.family = family
        self.dest, self.prefix_len = dest, prefix_len
        self.gateway, self.metric, self.scope, self.source = gateway, metric, scope, source

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "family": 6 if self.family == AF_INET6 else 4,
                "dest": self.dest, "prefix_len": self.prefix_len, "gateway": self.gateway,
                "metric": self.metric, "scope": self.scope, "source": self.source}

    @classmethod
    def from_json(cls, obj: Any) -> Route:
        o = _obj(obj, "route")
        if o.get("family") not in (4, 6):
            raise SchemaError("route family must be 4 or 6")
        fam = AF_INET6 if o["family"] == 6 else AF_INET
        o = {"prefix_len": 0, "metric": 0, "scope": SCOPE_UNIVERSE, **o}
        return cls(get_str(o, "device", max_len=15), fam,
                   get_str(o, "dest", max_len=64, optional=True), _prefix(o, "prefix_len", fam),
                   get_str(o, "gateway", max_len=64, optional=True),
                   get_int(o, "metric", 0, 2**32 - 1), get_int(o, "scope", 0, 255),
                   get_str(o, "source", max_len=64, optional=True))

    def __repr__(self) -> str:
        dest = f"{self.dest}/{self.prefix_len}" if self.dest else "default"
        via = f" via {self.gateway}" if self.gateway else ""
        return f"{dest}{via} dev {self.device}"


class NetworkConfig:
    """Params of ``configure_network``; its reply is an empty object."""

    __slots__ = ("interfaces", "routes")

    def __init__(self, interfaces: list[Interface], routes: list[Route]) -> None:
        names = [i.name for i in interfaces]
        macs = [i.mac for i in interfaces]
        devices = [i.device_mac for i in interfaces]
        if len(set(names)) != len(names) or len(set(macs)) != len(macs) or (
                len(set(devices)) != len(devices)):
            raise SchemaError("two interfaces share a name or a mac")
        if "lo" in names:
            raise SchemaError("interface name lo is reserved")
        for route in routes:
            if route.device not in names:
                raise SchemaError(f"route {route} names an unknown interface")
        self.interfaces = interfaces
        self.routes = routes

    def to_json(self) -> dict[str, Any]:
        return {"interfaces": [i.to_json() for i in self.interfaces],
                "routes": [r.to_json() for r in self.routes]}

    @classmethod
    def from_json(cls, obj: Any) -> NetworkConfig:
        o = _obj(obj, "network")
        return cls([Interface.from_json(i) for i in _list(o, "interfaces", MAX_INTERFACES)],
                   [Route.from_json(r) for r in _list(o, "routes", MAX_ROUTES)])
