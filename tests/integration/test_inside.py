"""Issue 5 in the VM: the container behaves as config.json says, checked with busybox."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.integration.cli_helpers import Cli, become_subreaper, cleanup
from tests.integration.conftest import BundleFactory, Runner


def test_oom_kill_exits_137(hull: Runner, bundle: BundleFactory) -> None:
    def limit(spec: dict[str, Any]) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}}

    hog = "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived"
    done = hull("run", "-b", str(bundle(["sh", "-c", hog], mutate=limit)), "oom")
    assert done.returncode == 137, (done.stdout, done.stderr)
    assert b"survived" not in done.stdout


def test_cgroup_limits_visible_inside(hull: Runner, bundle: BundleFactory) -> None:
    def limits(spec: dict[str, Any]) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 50},
                                      "cpu": {"quota": 50000, "period": 100000}}
        spec["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup2",
                               "source": "cgroup"})

    script = ("cat /proc/self/cgroup; cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max "
              "/sys/fs/cgroup/cpu.max")
    done = hull("run", "-b", str(bundle(["sh", "-c", script], mutate=limits)), "cglim")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["0::/", str(64 << 20), "50", "50000", "100000"]


def test_seccomp_mkdir_eperm_and_caps_in_guest(hull: Runner, bundle: BundleFactory) -> None:
    def secure(spec: dict[str, Any]) -> None:
        spec["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}
        spec["process"]["capabilities"] = {k: ["CAP_KILL"] for k in
                                           ("bounding", "effective", "permitted")}
        spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 88}]

    script = ("mkdir /tmp/d 2>&1; touch /tmp/f; chown 1000 /tmp/f 2>&1; ulimit -n; "
              "grep CapEff /proc/self/status")
    done = hull("run", "-b", str(bundle(["sh", "-c", script], mutate=secure)), "sec")
    out = done.stdout.decode()
    assert "mkdir: can't create directory '/tmp/d': Operation not permitted" in out, out
    assert "chown: /tmp/f: Operation not permitted" in out, out
    assert "\n77\n" in out and "CapEff:\t0000000000000020" in out, out


def test_bad_capability_fails_before_boot(hull: Runner, bundle: BundleFactory) -> None:
    def bad(spec: dict[str, Any]) -> None:
        spec["process"]["capabilities"] = {"bounding": ["CAP_FLY"]}

    done = hull("run", "-b", str(bundle(["true"], mutate=bad)), "badcap")
    assert done.returncode != 0
    assert b"process.capabilities.bounding: unknown capability 'CAP_FLY'" in done.stderr


def test_events_stats_and_update(state_root: Path, tmp_path: Path, guest_assets_ready: None,
                                 bundle: BundleFactory) -> None:
    become_subreaper()
    cli = Cli(state_root, tmp_path)

    def limits(spec: dict[str, Any]) -> None:
        spec["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 50}}

    b = bundle(["sleep", "60"], mutate=limits)
    with cleanup(cli, "st"):
        done, _, err = cli.create("st", b)
        assert done.returncode == 0, err.read_text()
        assert cli("start", "st").returncode == 0
        done = cli("events", "--stats", "st")
        assert done.returncode == 0, done.stderr
        event = json.loads(done.stdout)
        assert event["type"] == "stats" and event["id"] == "st"
        data = event["data"]
        assert data["memory"]["usage"]["limit"] == 64 << 20
        assert data["memory"]["usage"]["usage"] > 0
        assert data["pids"] == {"current": 1, "limit": 50}
        assert data["cpu"]["usage"]["total"] >= data["cpu"]["usage"]["user"]
        done = cli("update", "--pids-limit", "9", "--memory", "32m", "st")
        assert done.returncode == 0, done.stderr
        data = json.loads(cli("events", "--stats", "st").stdout)["data"]
        assert data["pids"]["limit"] == 9 and data["memory"]["usage"]["limit"] == 32 << 20
        done = cli("update", "--resources", "-", "st",
                   input=json.dumps({"memory": {"limit": 1 << 40}}).encode())
        assert done.returncode != 0
        assert b"VM's memory" in done.stderr and b"no memory hotplug" in done.stderr
        cli("kill", "st", "KILL")


def test_vm_is_sized_from_the_container_limits(hull: Runner, bundle: BundleFactory) -> None:
    """vCPUs = ceil(quota/period) (at least the default), memory = default + the limit."""
    def limits(spec: dict[str, Any]) -> None:
        spec["linux"]["resources"] = {"cpu": {"quota": 150000, "period": 100000},
                                      "memory": {"limit": 256 * 2**20}}

    b = bundle(["sh", "-c", "nproc; grep MemTotal /proc/meminfo"], mutate=limits)
    done = hull("run", "-b", str(b), "sized")
    assert done.returncode == 0, done.stderr
    nproc, meminfo = done.stdout.decode().splitlines()
    assert int(nproc) == min(2, os.cpu_count() or 1)
    total_kib = int(meminfo.split()[1])
    assert total_kib > 400 * 1024  # 256 MiB default + 256 MiB limit, less the kernel's own


def test_qemu_can_run_as_an_unprivileged_user(tmp_path: Path, rootfs_template: Path,
                                              state_root: Path) -> None:
    """hypervisor.run_as: QEMU drops to `nobody` before exec (its own -runas cannot work
    under its seccomp sandbox); the container still runs, and QEMU is not root."""
    import shutil
    import subprocess
    import tempfile

    from tests.integration.conftest import HULL, default_spec

    # nobody must reach the bundle: pytest's temporary directories are root-only.
    public = Path(tempfile.mkdtemp(prefix="hull-runas-", dir="/var/tmp"))
    try:
        public.chmod(0o755)
        shutil.copytree(rootfs_template, public / "rootfs", symlinks=True)
        spec = default_spec(["sh", "-c", "echo ran; sleep 2"])
        spec["root"]["readonly"] = True
        (public / "config.json").write_text(json.dumps(spec))
        config = tmp_path / "hull.toml"
        config.write_text('[hypervisor]\nrun_as = "nobody"\n')
        proc = subprocess.Popen([*HULL, "--config", str(config), "--root", str(state_root),
                                 "run", "-b", str(public), "runas"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ran\n"
        qemu = subprocess.run(["pgrep", "-f", "hull-runas,debug-threads"],
                              capture_output=True, text=True, check=True).stdout.split()[0]
        owner = subprocess.run(["ps", "-o", "user=", "-p", qemu], capture_output=True,
                               text=True, check=True).stdout.strip()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert owner == "nobody"
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_qemu_runs_without_transparent_huge_pages_unless_configured(
        tmp_path: Path, bundle: BundleFactory, state_root: Path, guest_assets_ready: None
) -> None:
    """hypervisor.transparent_huge_pages: off by default (QEMU gets PR_SET_THP_DISABLE
    before exec: THP_enabled 0 in its status); on, QEMU may use them again."""
    import subprocess

    from tests.integration.conftest import HULL

    b = bundle(["sh", "-c", "echo ran; sleep 2"])
    for value in ("false", "true"):
        config = tmp_path / f"thp-{value}.toml"
        config.write_text(f"[hypervisor]\ntransparent_huge_pages = {value}\n")
        cid = f"thp-{value}"
        proc = subprocess.Popen([*HULL, "--config", str(config), "--root", str(state_root),
                                 "run", "-b", str(b), cid],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ran\n"
        qemu = subprocess.run(["pgrep", "-f", f"hull-{cid},debug-threads"],
                              capture_output=True, text=True, check=True).stdout.split()[0]
        status = Path(f"/proc/{qemu}/status").read_text()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"THP_enabled:\t{1 if value == 'true' else 0}\n" in status


def test_sysctl_and_devices(hull: Runner, bundle: BundleFactory) -> None:
    """linux.sysctl is written in the container's namespaces; linux.devices are created."""
    def settings(spec: dict[str, Any]) -> None:
        spec["linux"]["sysctl"] = {"kernel.domainname": "hull.example"}
        spec["linux"]["devices"] = [{"path": "/dev/hullnull", "type": "c", "major": 1,
                                     "minor": 3, "fileMode": 0o666, "uid": 0, "gid": 0}]

    b = bundle(["sh", "-c", "cat /proc/sys/kernel/domainname; "
                "stat -c '%t:%T %a' /dev/hullnull; echo x > /dev/hullnull && echo wrote"],
               mutate=settings)
    done = hull("run", "-b", str(b), "sysctl")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == ["hull.example", "1:3 666", "wrote"]


def test_dropped_net_raw_makes_raw_sockets_fail(hull: Runner, bundle: BundleFactory) -> None:
    """busybox ping needs a raw (or ping) socket: without CAP_NET_RAW, and with the
    ping group range closed, it fails; with the capability it works on loopback."""
    def caps(keep: list[str]) -> Any:
        def apply(spec: dict[str, Any]) -> None:
            spec["process"]["capabilities"] = {k: keep for k in
                                               ("bounding", "effective", "permitted")}
            spec["linux"]["sysctl"] = {"net.ipv4.ping_group_range": "1 0"}
            spec["linux"]["namespaces"].append({"type": "network"})
        return apply

    script = "ping -c 1 -W 2 127.0.0.1 >/dev/null 2>&1 && echo ok || echo refused"
    without = hull("run", "-b", str(bundle(["sh", "-c", script], mutate=caps(["CAP_CHOWN"]))),
                   "noraw")
    assert without.stdout == b"refused\n", without.stderr
    with_raw = hull("run", "-b", str(bundle(["sh", "-c", script],
                                             mutate=caps(["CAP_CHOWN", "CAP_NET_RAW"]))),
                    "raw")
    assert with_raw.stdout == b"ok\n", with_raw.stderr


# Runs in the container, inside the guest: the agent in test mode listening on vsock, and
# a client reaching it through the guest kernel's loopback transport (CID 1), twice.
_VSOCK_CLIENT = """
import socket, subprocess, sys, time
from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind

agent = subprocess.Popen([sys.executable, "-m", "hull.agent.main", "--test", "--vsock-port",
                          "5000", "--share-dir", "/tmp", "--run-dir", "/tmp/run"])

def call(sock, decoder, rid, method, params):
    sock.sendall(Frame(Kind.REQUEST, 0, schema.encode(
        {"id": rid, "method": method, "params": params})).encode())
    frames = []
    while not frames:
        data = sock.recv(65536)
        assert data, "the agent closed the connection"
        frames += decoder.feed(data)
    return schema.decode(frames[0].payload)

def session(n):
    deadline = time.monotonic() + 60
    while True:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.connect((1, 5000))
            break
        except OSError:
            sock.close()
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.05)
    hello = {"version": schema.PROTOCOL_VERSION, "entropy": "00" * 16,
             "time_ns": time.time_ns()}
    decoder = framing.Decoder()
    reply = call(sock, decoder, n, "hello", hello)
    print("session", n, reply["id"], reply["result"]["version"] == schema.PROTOCOL_VERSION,
          flush=True)
    if n == 2:
        print("shutdown", call(sock, decoder, 3, "shutdown", {}), flush=True)
    sock.close()

session(1)
session(2)  # the agent outlives a session: the next connection is served
print("agent exit", agent.wait(timeout=30), flush=True)
"""


def test_agent_vsock_listener_in_the_guest(hull: Runner, bundle: BundleFactory) -> None:
    """hypervisor.channel = "vsock" needs /dev/vhost-vsock on the host, which this test
    does not: the agent's listener runs in the guest kernel, reached over its loopback
    transport, with the host's python and the hull sources bind-mounted in."""
    import hull as hull_package

    src = Path(hull_package.__file__).parent.parent

    def python_inside(spec: dict[str, Any]) -> None:
        spec["mounts"] += [{"destination": dest, "type": "bind", "source": source,
                            "options": ["rbind", "ro"]}
                           for dest, source in (("/usr", "/usr"), ("/hull-src", str(src)))]
        spec["process"]["env"].append("PYTHONPATH=/hull-src")
        # --test mode gives the agent its own mount namespace
        spec["process"]["capabilities"] = {k: ["CAP_SYS_ADMIN", "CAP_KILL"] for k in
                                           ("bounding", "effective", "permitted")}

    path = bundle(["/usr/bin/python3", "-S", "-c", _VSOCK_CLIENT], mutate=python_inside)
    for link in ("lib", "lib64"):  # the host's merged /usr layout
        if not (path / "rootfs" / link).exists():
            (path / "rootfs" / link).symlink_to(f"usr/{link}")
    done = hull("run", "-b", str(path), "vsockloop", timeout=300)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.decode().split("\n")[:4] == [
        "session 1 1 True", "session 2 2 True", "shutdown {'id': 3, 'result': {}}",
        "agent exit 0"], done.stdout
