"""Networking: the network namespace a client prepared appears unchanged inside the VM.

Every test builds its own world: a "container" network namespace holding the veth a CNI
plugin would have made (addresses, MTU, routes), and a "peer" namespace holding the
other end (the host side of the veth). Traffic only ever flows between these namespaces
and the VM; nothing reaches the host's own network. Everything is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_helpers import Cli, become_subreaper, cleanup, reap_all
from tests.integration.clients import wait_for
from tests.integration.conftest import HULL, BundleFactory, Runner
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd
from tests.integration.test_shim_v2 import qemu_of, shim_pids

__all__ = ["containerd"]  # the fixture, imported for the tests of this module

CTR_V4, PEER_V4 = "10.123.0.2", "10.123.0.1"
CTR_V6, PEER_V6 = "fd00:123::2", "fd00:123::1"
CTR2_V4, PEER2_V4 = "10.124.0.2", "10.124.0.1"


def ip(*argv: str, netns: str | None = None) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *argv]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def in_ns(netns: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                          text=True, check=False, **kw)


@dataclass
class Net:
    """The two namespaces of a test and the veth pairs between them."""

    ctr: str
    peer: str
    pairs: list[str] = field(default_factory=list)

    @property
    def ctr_path(self) -> str:
        return f"/var/run/netns/{self.ctr}"

    def add_pair(self, ctr_if: str, peer_if: str, ctr_addrs: list[str],
                 peer_addrs: list[str], mtu: int = 1500) -> None:
        ip("link", "add", ctr_if, "netns", self.ctr, "type", "veth", "peer", "name", peer_if,
           "netns", self.peer)
        for ns, dev, addrs in ((self.ctr, ctr_if, ctr_addrs), (self.peer, peer_if, peer_addrs)):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                ip("addr", "add", addr, "dev", dev, *extra, netns=ns)
            ip("link", "set", dev, "mtu", str(mtu), "up", netns=ns)
        self.pairs.append(ctr_if)

    def snapshot(self) -> str:
        """What teardown must leave as it was: links, addresses, routes, qdiscs, filters."""
        parts = [ip("-d", "link", netns=self.ctr), ip("addr", netns=self.ctr),
                 ip("route", netns=self.ctr), ip("-6", "route", netns=self.ctr)]
        for dev in self.pairs:
            for what in (["qdisc", "show", "dev", dev], ["filter", "show", "dev", dev,
                                                         "ingress"]):
                parts.append(in_ns(self.ctr, ["tc", *what]).stdout)
        # IPv6 duplicate address detection ends on its own schedule: not Hull's doing.
        return re.sub(r" tentative", "", "\n".join(parts))


@pytest.fixture
def net() -> Iterator[Net]:
    tag = f"{os.getpid()}-{time.monotonic_ns() % 100000}"
    n = Net(f"hullt-ctr-{tag}", f"hullt-peer-{tag}")
    for ns in (n.ctr, n.peer):
        ip("netns", "add", ns)
        ip("link", "set", "lo", "up", netns=ns)
    try:
        yield n
    finally:
        for ns in (n.ctr, n.peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def one_veth(net: Net) -> Net:
    net.add_pair("eth0", "peer0", [f"{CTR_V4}/24", f"{CTR_V6}/64"],
                 [f"{PEER_V4}/24", f"{PEER_V6}/64"])
    ip("route", "add", "default", "via", PEER_V4, netns=net.ctr)
    return net


def with_netns(path: str | None) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        entry: dict[str, str] = {"type": "network"}
        if path is not None:
            entry["path"] = path
        spec["linux"]["namespaces"].append(entry)
        spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs"})

    return mutate


PY_ECHO_SERVER = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); s.settimeout(90)
print("listening", flush=True)
c, _ = s.accept(); c.settimeout(30)
data = c.recv(4096)
c.sendall(b"echo:" + data); c.close()
"""


@contextlib.contextmanager
def peer_echo_server(net: Net, addr: str, port: int) -> Iterator[None]:
    """PY_ECHO_SERVER listening on ``addr``:``port`` in the peer namespace."""
    server = subprocess.Popen(["ip", "netns", "exec", net.peer, sys.executable, "-c",
                               PY_ECHO_SERVER, addr, str(port)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield
    finally:
        server.kill()
        server.wait()


PY_CLIENT = """
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
deadline = time.monotonic() + 90
while True:
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
c.sendall(sys.argv[3].encode()); c.shutdown(socket.SHUT_WR)
out = b""
while chunk := c.recv(4096):
    out += chunk
print(out.decode())
"""


def background(hull_argv: list[str], state_root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*HULL, "--root", str(state_root), *hull_argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out.decode(), err.decode()


# ------------------------------------------------------------------------- tests


def echo_client(net: Net, text: str) -> subprocess.CompletedProcess[str]:
    """PY_CLIENT in the peer's namespace: ``text`` to CTR_V4:7000, the echo printed."""
    return in_ns(net.peer, [sys.executable, "-c", PY_CLIENT, CTR_V4, "7000", text],
                 timeout=120)


def echo_round_trip(net: Net, hull_argv: list[str], state_root: Path, text: str
                    ) -> tuple[subprocess.CompletedProcess[str], int, str, str]:
    """`hull <hull_argv>` (a container echoing one connection on 7000) in the background,
    then echo_client: the client's result and the container's (status, stdout, stderr)."""
    ctr = background(hull_argv, state_root)
    try:
        client = echo_client(net, text)
    finally:
        code, out, err = finish(ctr)
    return client, code, out, err


def test_container_sees_the_veth(hull: Runner, bundle: BundleFactory, one_veth: Net) -> None:
    """Same name, MAC, MTU, IPv4/IPv6 addresses and default route as the client's veth."""
    ip("link", "set", "eth0", "mtu", "1400", netns=one_veth.ctr)
    mac = re.search(r"link/ether (\S+)", ip("link", "show", "eth0", netns=one_veth.ctr))
    assert mac
    b = bundle(["sh", "-c", "ip addr; ip route; ip -6 route"],
               mutate=with_netns(one_veth.ctr_path))
    done = hull("run", "-b", str(b), "netsee")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert f"link/ether {mac.group(1)}" in out
    assert re.search(r"eth0: <[^>]*UP[^>]*> mtu 1400", out), out
    assert f"inet {CTR_V4}/24" in out and f"inet6 {CTR_V6}/64" in out
    assert f"default via {PEER_V4} dev eth0" in out


def test_echo_server_in_container_reached_from_peer(hull: Runner, bundle: BundleFactory,
                                                    one_veth: Net, state_root: Path) -> None:
    b = bundle(["nc", "-l", "-p", "7000", "-e", "cat"], mutate=with_netns(one_veth.ctr_path))
    client, code, _, err = echo_round_trip(one_veth, ["run", "-b", str(b), "echo-in"],
                                           state_root, "ping-pong")
    assert client.returncode == 0, client.stderr + err
    assert client.stdout.strip() == "ping-pong"
    assert code == 0, err


def test_container_reaches_server_on_peer(hull: Runner, bundle: BundleFactory,
                                          one_veth: Net) -> None:
    with peer_echo_server(one_veth, PEER_V4, 7001):
        b = bundle(["sh", "-c", f"echo hello | nc {PEER_V4} 7001"],
                   mutate=with_netns(one_veth.ctr_path))
        done = hull("run", "-b", str(b), "reach")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "echo:hello"


def test_ping_both_ways(hull: Runner, bundle: BundleFactory, one_veth: Net,
                        state_root: Path) -> None:
    b = bundle(["sh", "-c", f"ping -c 2 -W 5 {PEER_V4} && sleep 8"],
               mutate=with_netns(one_veth.ctr_path))
    ctr = background(["run", "-b", str(b), "ping"], state_root)
    try:
        deadline, answered = time.monotonic() + 90, False
        while not answered and time.monotonic() < deadline and ctr.poll() is None:
            answered = in_ns(one_veth.peer, ["busybox", "ping", "-c", "1", "-W", "1",
                                             CTR_V4]).returncode == 0
    finally:
        code, out, err = finish(ctr)
    assert code == 0, out + err
    assert "2 packets received" in out
    assert answered, "the container never answered the peer's ping"


def test_ipv6(hull: Runner, bundle: BundleFactory, one_veth: Net) -> None:
    with peer_echo_server(one_veth, PEER_V6, 7002):
        b = bundle(["sh", "-c", f"ping6 -c 1 -W 5 {PEER_V6} >/dev/null && "
                                f"echo six | nc {PEER_V6} 7002"],
                   mutate=with_netns(one_veth.ctr_path))
        done = hull("run", "-b", str(b), "six")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "echo:six"


def test_mtu_is_honoured(hull: Runner, bundle: BundleFactory, net: Net) -> None:
    """A 1280-byte MTU: pings that fit pass, pings that do not fit fail (DF set)."""
    net.add_pair("eth0", "peer0", [f"{CTR_V4}/24"], [f"{PEER_V4}/24"], mtu=1280)
    fits, too_big = 1280 - 28, 1280 - 28 + 1
    b = bundle(["sh", "-c", f"cat /sys/class/net/eth0/mtu; "
                            f"ping -c 1 -W 5 -s {fits} {PEER_V4} >/dev/null && echo fits; "
                            f"ping -c 1 -W 2 -s {too_big} -M do {PEER_V4} >/dev/null 2>&1 "
                            "|| echo refused"],
               mutate=with_netns(net.ctr_path))
    done = hull("run", "-b", str(b), "mtu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["1280", "fits", "refused"]


def test_two_interfaces(hull: Runner, bundle: BundleFactory, one_veth: Net) -> None:
    one_veth.add_pair("eth1", "peer1", [f"{CTR2_V4}/24"], [f"{PEER2_V4}/24"], mtu=1450)
    b = bundle(["sh", "-c", f"cat /sys/class/net/eth1/mtu && "
                            f"ping -c 1 -W 5 {PEER_V4} >/dev/null && "
                            f"ping -c 1 -W 5 {PEER2_V4} >/dev/null && echo both"],
               mutate=with_netns(one_veth.ctr_path))
    done = hull("run", "-b", str(b), "two")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["1450", "both"]


def test_teardown_leaves_the_veth_as_it_was(hull: Runner, bundle: BundleFactory,
                                            one_veth: Net) -> None:
    before = one_veth.snapshot()
    b = bundle(["true"], mutate=with_netns(one_veth.ctr_path))
    done = hull("run", "-b", str(b), "tidy")
    assert done.returncode == 0, done.stderr
    assert one_veth.snapshot() == before


def hull_filters(net: Net, dev: str = "eth0") -> str:
    """Hull's redirect filters on ``dev``'s ingress (priority 0xC0DE = 49374)."""
    out = in_ns(net.ctr, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
    return "\n".join(line for line in out.splitlines() if "pref 49374" in line)


def created_and_started(cli: Cli, b: Path, cid: str, net: Net) -> dict[str, Any]:
    """`hull create` + `hull start` in CLI mode (the proxy daemon owns QEMU); the
    container's state.json. Its taps and filters are in place."""
    done, _, err = cli.create(cid, b)
    assert done.returncode == 0, err.read_text()
    assert cli("start", cid).returncode == 0
    assert hull_filters(net) and "hulltap" in ip("link", netns=net.ctr)
    state: dict[str, Any] = json.loads((cli.root / cid / "state.json").read_text())
    return state


@pytest.fixture
def cli(state_root: Path, tmp_path: Path, guest_assets_ready: None) -> Iterator[Cli]:
    become_subreaper()  # the proxies and shims reparent to us, as to conmon
    try:
        yield Cli(state_root, tmp_path)
    finally:
        reap_all()


def test_create_start_delete_cleans_up(cli: Cli, bundle: BundleFactory,
                                       one_veth: Net) -> None:
    """CLI mode: filters exist while it runs, go on delete."""
    before = one_veth.snapshot()
    b = bundle(["sleep", "30"], mutate=with_netns(one_veth.ctr_path))
    with cleanup(cli, "cli"):
        created_and_started(cli, b, "cli", one_veth)
        ping = in_ns(one_veth.peer, ["busybox", "ping", "-c", "1", "-W", "10", CTR_V4])
        assert ping.returncode == 0, ping.stdout
    assert one_veth.snapshot() == before


@pytest.mark.parametrize("victim", ["proxy", "qemu"])
def test_delete_force_after_a_sigkill_restores_the_veth(cli: Cli, bundle: BundleFactory,
                                                        one_veth: Net, victim: str) -> None:
    """SIGKILL of the proxy (QEMU dies with it): nothing removes its filters but the
    `delete --force` that follows, from the sandbox's network.json. SIGKILL of QEMU: the
    proxy sees it and cleans up itself. Either way the veth ends as it was: no tap, no
    Hull filter, no ingress qdisc Hull added."""
    before = one_veth.snapshot()
    b = bundle(["sleep", "300"], mutate=with_netns(one_veth.ctr_path))
    with cleanup(cli, "killed"):
        state = created_and_started(cli, b, "killed", one_veth)
        proxy = state["proxy_pid"]
        qemu = subprocess.run(["pgrep", "-P", str(proxy), "qemu-system"],
                              capture_output=True, text=True, check=False).stdout.split()
        assert len(qemu) == 1, f"no qemu under proxy {proxy}"
        os.kill(proxy if victim == "proxy" else int(qemu[0]), signal.SIGKILL)
        # QEMU exits either way (PDEATHSIG), and its tap with its last fd.
        wait_for(lambda: not os.path.exists(f"/proc/{qemu[0]}/cmdline")
                   or not Path(f"/proc/{qemu[0]}/cmdline").read_bytes(), "qemu to exit")
        if victim == "proxy":
            wait_for(lambda: "hulltap" not in ip("link", netns=one_veth.ctr), "the tap")
            assert hull_filters(one_veth), "the killed proxy's filters are gone already"
        done = cli("delete", "--force", "killed")
        assert done.returncode == 0, done.stderr
        assert not (cli.root / "killed").exists()
    assert "hulltap" not in ip("link", netns=one_veth.ctr)
    assert not hull_filters(one_veth)
    assert one_veth.snapshot() == before


def test_shim_delete_after_the_shim_was_killed_restores_the_veth(
        containerd: Containerd, bundle: BundleFactory, one_veth: Net) -> None:
    """shim v2: containerd runs `containerd-shim-hull-v2 delete` for a shim that died; it
    removes the dead shim's filters from the task's namespace (from network.json)."""
    before = one_veth.snapshot()
    rootfs = bundle(["true"]) / "rootfs"
    done = containerd.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns",
                          f"network:{one_veth.ctr_path}", "--rootfs", str(rootfs), "n1",
                          "sleep", "1000", check=False)
    assert done.returncode == 0, done.stderr
    assert hull_filters(one_veth) and "hulltap" in ip("link", netns=one_veth.ctr)
    (shim,) = shim_pids("n1")
    os.kill(shim, signal.SIGKILL)
    wait_for(lambda: "n1" not in containerd.tasks(), "containerd to forget the task", 30)
    containerd.ctr("containers", "rm", "n1")
    # containerd forgets the task, then runs the shim's delete
    wait_for(lambda: not qemu_of("n1") and not hull_filters(one_veth),
               "the shim's delete to remove the vm and the filters", 30)
    assert "hulltap" not in ip("link", netns=one_veth.ctr)
    assert one_veth.snapshot() == before


def test_preexisting_ingress_qdisc_is_kept(hull: Runner, bundle: BundleFactory,
                                           one_veth: Net) -> None:
    in_ns(one_veth.ctr, ["tc", "qdisc", "add", "dev", "eth0", "ingress"]).check_returncode()
    before = one_veth.snapshot()
    b = bundle(["ping", "-c", "1", "-W", "5", PEER_V4], mutate=with_netns(one_veth.ctr_path))
    done = hull("run", "-b", str(b), "qdisc")
    assert done.returncode == 0, done.stdout + done.stderr
    assert one_veth.snapshot() == before


def test_new_empty_namespace_has_loopback_only(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["ls", "/sys/class/net"], mutate=with_netns(None))
    done = hull("run", "-b", str(b), "empty")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["lo"]


def test_no_network_namespace_is_the_vms_loopback(hull: Runner,
                                                  bundle: BundleFactory) -> None:
    def sysfs(spec: dict[str, Any]) -> None:
        spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs"})

    done = hull("run", "-b", str(bundle(["ls", "/sys/class/net"], mutate=sysfs)), "nonet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["lo"]


def test_host_network_namespace_is_refused(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["true"], mutate=with_netns(f"/proc/{os.getpid()}/ns/net"))
    for argv in (["run", "-b", str(b), "hostnet"], ["create", "-b", str(b), "hostnet2"]):
        done = hull(*argv)
        assert done.returncode != 0
        assert b"cannot share the host's network" in done.stderr, done.stderr


def test_missing_network_namespace_is_refused(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["true"], mutate=with_netns("/var/run/netns/hull-no-such-namespace"))
    done = hull("run", "-b", str(b), "nons")
    assert done.returncode != 0
    assert b"does not exist" in done.stderr, done.stderr
