"""Real clients driving Hull as they drive runc: Podman (through conmon), containerd 1.6
(through containerd-shim-runc-v2 with a custom binary) and Docker 20.10.

Every daemon, store and configuration file lives in a private directory under the test
run's temporary directory (so the leak accounting of tests/conftest.py sees what they
start), which the fixtures write and remove; nothing is read from or written to the
host's /etc (see INTEGRATION.md §1/§3 and MEASUREMENTS.md "Real clients on these
machines"). Podman keeps Hull's default --root (/run/hull): it calls `state` without
runtime flags.

The test process is a child subreaper while these fixtures live, as systemd would be:
conmon and containerd's shims daemonize, and PID 1 on these machines does not reap
orphans; the fixtures reap what reparented to them.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import fcntl
import json
import os
import secrets
import select
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.cli_helpers import terminate

PR_SET_CHILD_SUBREAPER = 36
VENV_HULL = Path(sys.executable).parent / "hull"
IMAGE = "localhost/hull-busybox:test"
#: What README.md tells users to register; the venv's own entry point if it is missing.
INSTALLED_HULL = Path("/usr/local/bin/hull")


def hull_binary() -> Path:
    """The `hull` clients are pointed at: /usr/local/bin/hull when it is this venv's."""
    if INSTALLED_HULL.exists() and INSTALLED_HULL.resolve() == VENV_HULL.resolve():
        return INSTALLED_HULL
    return VENV_HULL


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup-host.sh (it installs "
                    "podman, containerd and docker.io)")


# ---------------------------------------------------------------------- processes


def _subreaper(on: bool) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def reap_orphans() -> None:
    """Reap zombie children that no Popen of ours owns (daemons that reparented to us).

    Only call it when no Popen of the caller is still waiting to be waited for.
    """
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z" and fields[1] == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


@pytest.fixture(scope="module")
def reaper() -> Iterator[None]:
    _subreaper(True)
    try:
        yield
    finally:
        reap_orphans()
        _subreaper(False)


def unmount_under(base: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(f"{base}/")), reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{base}/")]


def hull_states(root: Path) -> list[str]:
    """Container state directories Hull left under a --root (accel.json is a cache)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != "accel.json")


@dataclass
class PtyResult:
    output: bytes
    returncode: int

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_window(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


#: (seen, reply) steps: once ``seen`` is in the output, write ``reply`` (bytes) or resize
#: the terminal to ``reply`` (rows, cols).
Dialog = Sequence[tuple[bytes, bytes | tuple[int, int]]]


def run_in_pty(argv: Sequence[str], *, env: dict[str, str] | None = None,
               dialog: Dialog = (),
               size: tuple[int, int] = (33, 101), timeout: float = 120) -> PtyResult:
    """Run a client on a new terminal (its controlling tty) sized ``size``, talking
    to it as ``dialog`` says, in order; its output and exit code."""
    master, slave = os.openpty()
    set_window(master, *size)
    proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True, preexec_fn=_take_terminal)
    os.close(slave)
    out = bytearray()
    steps = list(dialog)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{argv[0]} did not finish in {timeout}s: {bytes(out)!r}")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                if proc.poll() is not None:
                    break  # exited, and nothing more to read
                continue
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""  # EIO: every holder of the slave closed it
            if not data:
                break
            out += data
            while steps and steps[0][0] in out:
                _, reply = steps.pop(0)
                if isinstance(reply, tuple):
                    set_window(master, *reply)
                else:
                    os.write(master, reply)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return PtyResult(bytes(out), code)


def busybox_tar(rootfs: Path, dest: Path) -> Path:
    """A tar of the busybox rootfs: what `podman import` / `docker import` take."""
    with tarfile.open(dest, "w") as tar:
        for entry in sorted(rootfs.iterdir()):
            tar.add(entry, arcname=entry.name)
    return dest


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """A client command that returns (never `create`-like: its stdio are ours to read)."""
    return subprocess.run(list(argv), env=env, capture_output=True, timeout=timeout,
                          input=input.decode() if input is not None else None, text=True,
                          check=False)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{' '.join(done.args)} failed ({done.returncode}): " \
        f"{done.stdout}{done.stderr}"
    return done.stdout


# ---------------------------------------------------------------------- Podman

PODMAN_CONF = """\
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
tmp_dir = "{base}/tmp"
lock_type = "file"
runtime = "hull"
runtime_supports_json = ["crun", "runc", "kata", "runsc", "krun", "hull"]
runtime_supports_kvm = ["kata", "krun", "hull"]

[engine.runtimes]
hull = ["{hull}"]

[network]
network_config_dir = "{base}/networks"
"""


@dataclass
class Podman:
    base: Path
    hull: Path = field(default_factory=hull_binary)

    def __post_init__(self) -> None:
        self.conf = self.base / "containers.conf"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf),
                    "CONTAINERS_REGISTRIES_CONF": str(self.base / "registries.conf"),
                    "CONTAINERS_STORAGE_CONF": str(self.base / "storage.conf")}

    @property
    def argv(self) -> list[str]:
        return [*self.argv_by_conf, "--runtime", str(self.hull)]

    @property
    def argv_by_conf(self) -> list[str]:
        """Without --runtime: containers.conf's `runtime = "hull"` picks Hull."""
        return ["podman", "--root", str(self.base / "root"),
                "--runroot", str(self.base / "runroot"), "--storage-driver", "vfs",
                "--cgroup-manager", "cgroupfs", "--events-backend", "file"]

    def setup(self) -> None:
        self.conf.write_text(PODMAN_CONF.format(base=self.base, hull=self.hull))
        (self.base / "registries.conf").write_text("unqualified-search-registries = []\n")
        (self.base / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{self.base}/root"\n'
            f'runroot = "{self.base}/runroot"\n')

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([*self.argv, *args], env=self.env, timeout=timeout)

    def by_conf(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([*self.argv_by_conf, *args], env=self.env, timeout=timeout)

    def pty(self, *args: str, dialog: Dialog = ()) -> PtyResult:
        return run_in_pty([*self.argv, *args], env=self.env, dialog=dialog)

    def containers(self) -> list[str]:
        return ok(self("ps", "-aq", "--no-trunc")).split()

    def cleanup(self) -> None:
        self("rm", "-af", "-t", "0")


@pytest.fixture(scope="module")
def podman(reaper: None, rootfs_template: Path, guest_assets_ready: None,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    need("podman", "conmon")
    base = tmp_path_factory.mktemp("podman")
    client = Podman(base)
    try:
        client.setup()
        tar = busybox_tar(rootfs_template, base / "busybox.tar")
        ok(client("import", "--change", "CMD=/bin/sh", str(tar), IMAGE))
        tar.unlink()
        yield client
        client.cleanup()
        left = client.containers()
        assert not left, f"podman containers left behind: {left}"
    finally:
        with contextlib.suppress(Exception):
            client.cleanup()
            client("rmi", "-af")
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- Podman networks

#: host-local's state directory (Podman gives its CNI networks no other).
CNI_IPAM_DIR = Path("/var/lib/cni/networks")


def iptables_chains() -> set[tuple[str, str]]:
    """(table, chain) of the host's iptables filter and nat tables."""
    found = set()
    for table in ("filter", "nat"):
        out = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True,
                             check=True).stdout
        found |= {(table, line.split()[1]) for line in out.splitlines()
                  if line.startswith(("-N ", "-P "))}
    return found


def drop_chains_since(before: set[tuple[str, str]]) -> None:
    """Remove the iptables chains made since ``before`` and the rules jumping to them
    (CNI's portmap and firewall plugins make chains that nothing ever removes)."""
    new = iptables_chains() - before
    for table in ("filter", "nat"):
        mine = {chain for t, chain in new if t == table}
        out = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True,
                             check=True).stdout
        for line in out.splitlines():
            rule = shlex.split(line)
            if (rule[0] == "-A" and rule[1] not in mine and "-j" in rule
                    and rule[rule.index("-j") + 1] in mine):
                subprocess.run(["iptables", "-t", table, "-D", *rule[1:]], check=True)
        for flag in ("-F", "-X"):
            for chain in sorted(mine):
                subprocess.run(["iptables", "-t", table, flag, chain], check=True)


@dataclass
class BridgeNetwork:
    name: str
    bridge: str
    subnet: str
    #: the Podman whose default network (`--network bridge`) this one is
    podman: Podman


@contextlib.contextmanager
def bridge_network(podman: Podman) -> Iterator[BridgeNetwork]:
    """A private CNI bridge network (its own bridge and subnet), made the default one so
    that `--network bridge` uses it. Afterwards the network, its bridge, its IPAM state
    and the iptables chains its plugins made are gone."""
    name = f"hull{secrets.token_hex(3)}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24"
    chains = iptables_chains()
    made_ipam_dir = not CNI_IPAM_DIR.exists()
    conf = podman.base / f"containers-{name}.conf"
    conf.write_text(podman.conf.read_text().replace(
        "[network]\n", f'[network]\ndefault_network = "{name}"\n'))
    client = copy.copy(podman)
    client.env = {**podman.env, "CONTAINERS_CONF": str(conf)}
    bridge = ""
    try:
        # Made before it is the default one, or Podman says the default exists already.
        ok(podman("network", "create", "--subnet", subnet, name))
        # Podman 4.3 picks the bridge's name: the first free cni-podmanN.
        bridge = ok(podman("network", "inspect", "--format", "{{.NetworkInterface}}",
                           name)).strip()
        yield BridgeNetwork(name, bridge, subnet, client)
    finally:
        podman("network", "rm", "-f", name)
        if bridge and Path(f"/sys/class/net/{bridge}").exists():
            subprocess.run(["ip", "link", "del", bridge], check=False)
        shutil.rmtree(CNI_IPAM_DIR / name, ignore_errors=True)
        if made_ipam_dir:
            with contextlib.suppress(OSError):
                CNI_IPAM_DIR.rmdir()
        drop_chains_since(chains)
        conf.unlink()


def http_get(host: str, port: int, path: str, timeout: float = 60) -> bytes:
    """The body of an HTTP/1.0 GET, straight over a socket (no proxy from the
    environment may intervene), retried until the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                conn.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                reply = b""
                while chunk := conn.recv(65536):
                    reply += chunk
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        head, _, body = reply.partition(b"\r\n\r\n")
        if b" 200 " in head.split(b"\r\n")[0]:
            return body
        if time.monotonic() > deadline:  # e.g. an empty reply while the server starts
            raise AssertionError(f"GET http://{host}:{port}{path}: {reply[:200]!r}")
        time.sleep(0.5)


# ---------------------------------------------------------------------- containerd

CONTAINERD_CONF = """\
version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{base}/c.sock"
[ttrpc]
  address = ""
"""


@dataclass
class Containerd:
    """containerd on a private socket; tasks run through containerd-shim-runc-v2, which
    calls Hull as its runc (`ctr run --runc-binary`), with a private runc root."""

    base: Path
    hull: Path = field(default_factory=hull_binary)
    namespace: str = "hulltest"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "c.sock"

    @property
    def hull_root(self) -> Path:
        """--root the shim passes to Hull: <runc root>/<namespace>."""
        return self.base / "hr" / self.namespace

    @property
    def runtime_flags(self) -> list[str]:
        return ["--runc-binary", str(self.hull), "--runc-root", str(self.base / "hr")]

    def start(self) -> None:
        conf = self.base / "config.toml"
        conf.write_text(CONTAINERD_CONF.format(base=self.base))
        log = self.base / "containerd.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(["containerd", "--config", str(conf)], stdout=out,
                                         stderr=out, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ctr("version").returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"containerd did not come up:\n{log.read_text()[-3000:]}")

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "-a", str(self.socket), "-n", self.namespace, *args]

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(self.ctr_argv(*args), timeout=timeout)

    def ctr_pty(self, *args: str, dialog: Dialog = ()) -> PtyResult:
        return run_in_pty(self.ctr_argv(*args), dialog=dialog)

    def tasks(self) -> dict[str, tuple[int, str]]:
        """task id -> (pid, status)"""
        rows = [line.split() for line in ok(self.ctr("task", "ls")).splitlines()[1:]]
        return {r[0]: (int(r[1]), r[2]) for r in rows if len(r) >= 3}

    def cleanup(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for task in self.tasks():
            self.ctr("task", "kill", "-s", "SIGKILL", task)
        for task in self.tasks():
            self.ctr("task", "delete", "-f", task)
        for container in ok(self.ctr("containers", "ls", "-q")).split():
            self.ctr("containers", "rm", container)

    def stop(self) -> None:
        terminate(self.proc, grace=15)


@pytest.fixture(scope="module")
def containerd(reaper: None, guest_assets_ready: None,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    need("containerd", "ctr", "containerd-shim-runc-v2")
    base = tmp_path_factory.mktemp("ctd")
    daemon = Containerd(base)
    try:
        daemon.start()
        yield daemon
        daemon.cleanup()
        assert not daemon.tasks(), "containerd tasks left behind"
    finally:
        with contextlib.suppress(Exception):
            daemon.cleanup()
        daemon.stop()
        reap_orphans()
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- Docker

#: /usr/local/bin may hold another docker client: use the one of the docker.io package.
DOCKER_CLIENT = "/usr/bin/docker"
#: Where dockerd 20.10 makes its plugin directory, whatever --exec-root says.
RUN_DOCKER = Path("/run/docker")


def docker_daemon_json(key: Path) -> str:
    """A private trust key: dockerd 20.10 writes /etc/docker/key.json otherwise. (Hull is
    registered with --add-runtime, the same as README.md's daemon.json "runtimes".)"""
    return json.dumps({"deprecated-key-path": str(key)}, indent=2)


@dataclass
class Docker:
    base: Path
    hull: Path = field(default_factory=hull_binary)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "d.sock"

    @property
    def hull_root(self) -> Path:
        """--root containerd's runc shim passes to Hull for Docker (moby namespace)."""
        return self.base / "exec/runtime-runc/moby"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_CONFIG": str(self.base / "client"),
                "DOCKER_HOST": f"unix://{self.socket}"}

    def start(self) -> None:
        conf = self.base / "daemon.json"
        conf.write_text(docker_daemon_json(self.base / "key.json"))
        log = self.base / "dockerd.log"
        argv = ["dockerd", "--config-file", str(conf), "--data-root", str(self.base / "data"),
                "--exec-root", str(self.base / "exec"), "--pidfile", str(self.base / "pid"),
                "-H", f"unix://{self.socket}", "--iptables=false", "--ip6tables=false",
                "--bridge=none", "--add-runtime", f"hull={self.hull}"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self("version").returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if "level=error" in line or "level=fatal" in line or "failed" in line]
        pytest.skip("dockerd cannot run here: "
                    + (lines[-1] if lines else "it did not answer within 60s"))

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([DOCKER_CLIENT, *args], env=self.env, timeout=timeout)

    def cleanup(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        ids = self("ps", "-aq").stdout.split()
        if ids:
            self("rm", "-f", *ids)

    def stop(self) -> None:
        terminate(self.proc, grace=30)


@pytest.fixture(scope="module")
def docker(reaper: None, rootfs_template: Path, guest_assets_ready: None,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    need("dockerd", DOCKER_CLIENT)
    base = tmp_path_factory.mktemp("docker")
    daemon = Docker(base)
    made_run_docker = not RUN_DOCKER.exists()
    try:
        daemon.start()
        tar = busybox_tar(rootfs_template, base / "busybox.tar")
        ok(daemon("import", str(tar), IMAGE))
        tar.unlink()
        yield daemon
        daemon.cleanup()
        left = daemon("ps", "-aq").stdout.split()
        assert not left, f"docker containers left behind: {left}"
    finally:
        with contextlib.suppress(Exception):
            daemon.cleanup()
            daemon("rmi", "-f", IMAGE)
        daemon.stop()
        reap_orphans()
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
        if made_run_docker:  # dockerd always makes its plugin directory there
            for path in (RUN_DOCKER / "plugins", RUN_DOCKER):
                with contextlib.suppress(OSError):
                    path.rmdir()
