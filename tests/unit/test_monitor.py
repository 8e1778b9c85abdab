"""hull monitor without a VM: CLI-mode sandboxes and shim v2 pods made of fakes.

A fake CLI sandbox names this test process as its proxy and shim (alive, measurable). A
fake shim v2 pod is what a live shim publishes (hull.runtime.sandboxinfo): sandbox.json
naming this process as the shim, and a real StatusServer whose "agent" is a function.
The servers run on an event loop in a thread: each scrape runs the monitor's own loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import tracemalloc
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest

from hull.agentapi import schema
from hull.errors import AgentError
from hull.proxy.channel import AgentChannel
from hull.runtime import monitor, proxysock, sandboxinfo
from hull.runtime.state import ContainerDir, ContainerState, Status, start_time
from hull.shim.v2.pausing import Pauser

GUEST = schema.SandboxStats(memory_total=256 << 20, memory_available=200 << 20,
                            cpu_user_usec=3_000_000, cpu_system_usec=1_000_000,
                            cpu_idle_usec=9_000_000, containers=2, uptime_usec=5_000_000)


def fake_sandboxes(root: Path, count: int) -> None:
    """CLI-mode sandboxes whose 'proxy' and 'shim' are this test process."""
    me, started = os.getpid(), start_time(os.getpid()) or 0
    for i in range(count):
        cdir = ContainerDir(root, f"sb{i}")
        cdir.create()
        cdir.save(ContainerState(id=cdir.id, bundle="/nonexistent", status=Status.RUNNING,
                                 pid=me, pid_start=started, proxy_pid=me,
                                 proxy_start=started))
        (cdir.path / "sandbox.json").write_text(json.dumps(
            {"proxy_pid": me, "vm_pid": me, "boot_seconds": 1.25}))


def fake_sandbox(vm_pid: int, boot: float = 2.5, restored: bool = False) -> Any:
    """What sandboxinfo.record reads of a Sandbox."""
    return SimpleNamespace(vm=SimpleNamespace(pid=vm_pid), boot_seconds=boot,
                           cloned_from=Path("/template") if restored else None)


async def fake_agent(method: schema.Method, params: dict[str, Any],
                     timeout: float) -> dict[str, Any]:
    if method is schema.Method.SANDBOX_STATS:
        return schema.params(GUEST)
    cid = schema.ContainerRef.from_json(params).container_id
    if not cid.startswith("pod"):
        raise AgentError(f"container {cid} does not exist")
    return schema.params(schema.ContainerStats(cpu={"usage_usec": 4_000_000},
                                               memory_current=12 << 20))


class ServedPods:
    """``count`` shim v2 pods under ``shim_root/<namespace>/pod<i>``, served live."""

    def __init__(self, shim_root: Path, count: int, namespace: str = "k8s.io") -> None:
        self.dirs = [shim_root / namespace / f"pod{i}" for i in range(count)]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.servers: list[sandboxinfo.StatusServer] = []

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __enter__(self) -> ServedPods:
        self.thread.start()
        hello = {"version": schema.PROTOCOL_VERSION, "agent_version": "test",
                 "kernel_release": "6.1-hull"}
        for d in self.dirs:
            d.mkdir(parents=True)
            server = sandboxinfo.StatusServer(f"sandbox {d.name}", d, hello, fake_agent)
            self.run(server.__aenter__())
            self.servers.append(server)
            # the shim's vm pid: this process too (measurable); qemu.pid is the shim's
            sandboxinfo.record(d, fake_sandbox(os.getpid()), status="running")
            (d / "qemu.pid").write_text(f"{os.getpid()}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            self.run(server.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def scrape(reg: Any) -> dict[str, float]:
    text = generate_latest(reg).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def dead_process() -> tuple[int, int]:
    """(pid, start time) of a process that has exited."""
    proc = subprocess.Popen(["sleep", "5"])
    started = start_time(proc.pid) or 0
    proc.kill()
    proc.wait()
    return proc.pid, started


# ---------------------------------------------------------------------- CLI mode


def test_metrics_endpoint_serves_each_sandbox_overhead(tmp_path: Path) -> None:
    from prometheus_client import start_http_server

    fake_sandboxes(tmp_path, 2)
    server, thread = start_http_server(0, "127.0.0.1", monitor.registry(tmp_path))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['hull_sandbox_host_overhead_total_bytes{sandbox="sb0"}'] > 1e6
    assert values['hull_sandbox_host_overhead_bytes{component="qemu",sandbox="sb1"}'] > 1e6
    assert values['hull_sandbox_boot_seconds{sandbox="sb0"}'] == 1.25
    assert values['hull_sandbox_info{runtime="cli",sandbox="sb0"}'] == 1
    assert values['hull_sandboxes{status="running"}'] == 2
    # no proxy socket: the agents count as unreachable
    assert values["hull_sandbox_unreachable"] == 2
    assert values['hull_sandbox_agent_up{sandbox="sb1"}'] == 0
    assert values["hull_sandbox_probe_failures_total"] == 2


def test_a_paused_sandbox_is_not_asked(tmp_path: Path) -> None:
    fake_sandboxes(tmp_path, 1)
    cdir = ContainerDir(tmp_path, "sb0")
    state = cdir.load()
    state.status = Status.PAUSED
    cdir.save(state)
    values = scrape(monitor.registry(tmp_path))
    assert values['hull_sandboxes{status="paused"}'] == 1
    assert values['hull_sandbox_host_overhead_total_bytes{sandbox="sb0"}'] > 0
    assert 'hull_sandbox_agent_up{sandbox="sb0"}' not in values  # a stopped VM: no answer
    assert values["hull_sandbox_probe_failures_total"] == 0


def test_listen_address() -> None:
    assert monitor.parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert monitor.parse_listen(":0") == ("0.0.0.0", 0)
    with pytest.raises(Exception, match="HOST:PORT"):
        monitor.parse_listen("9464")


# ---------------------------------------------------------------------- shim v2 pods


def test_shim_v2_pods_are_found_measured_and_asked(tmp_path: Path) -> None:
    shim_root = tmp_path / "shim"
    (shim_root / "s").mkdir(parents=True)  # the shims' sockets: not a namespace
    (shim_root / "s" / "0123.sock").touch()
    with ServedPods(shim_root, 2):
        values = scrape(monitor.registry(tmp_path / "cli", shim_root))
    pod = 'sandbox="k8s.io/pod0"'
    assert values[f"hull_sandbox_info{{runtime=\"shim-v2\",{pod}}}"] == 1
    assert values[f'hull_sandbox_host_overhead_bytes{{component="qemu",{pod}}}'] > 1e6
    assert values[f'hull_sandbox_host_overhead_bytes{{component="shim",{pod}}}'] > 1e6
    assert f'hull_sandbox_host_overhead_bytes{{component="helpers",{pod}}}' in values
    assert values[f"hull_sandbox_host_overhead_total_bytes{{{pod}}}"] > 2e6
    assert values[f"hull_sandbox_boot_seconds{{{pod}}}"] == 2.5
    assert values[f"hull_sandbox_agent_up{{{pod}}}"] == 1
    assert 0 < values[f"hull_sandbox_agent_rtt_seconds{{{pod}}}"] < 2
    assert values[f"hull_sandbox_containers{{{pod}}}"] == 2
    assert values[f"hull_sandbox_guest_memory_total_bytes{{{pod}}}"] == 256 << 20
    assert values[f"hull_sandbox_guest_memory_used_bytes{{{pod}}}"] == 56 << 20
    assert values[f'hull_sandbox_guest_cpu_seconds_total{{mode="user",{pod}}}'] == 3
    # stats_container asked for the pod's sandbox container (its id is the pod's)
    assert values[f"hull_sandbox_container_memory_bytes{{{pod}}}"] == 12 << 20
    assert values[f"hull_sandbox_container_cpu_seconds_total{{{pod}}}"] == 4
    assert values['hull_sandboxes{status="running"}'] == 2
    assert values["hull_sandbox_unreachable"] == 0
    assert values["hull_shim_v2_lost_total"] == 0


def test_a_restored_pod_reports_its_restore_time(tmp_path: Path) -> None:
    with ServedPods(tmp_path, 1) as pods:
        sandboxinfo.record(pods.dirs[0], fake_sandbox(os.getpid(), 0.4, restored=True),
                           status="running")
        values = scrape(monitor.registry(tmp_path / "cli", tmp_path))
    assert values['hull_sandbox_restore_seconds{sandbox="k8s.io/pod0"}'] == 0.4
    assert 'hull_sandbox_boot_seconds{sandbox="k8s.io/pod0"}' not in values


def test_a_dead_shims_entry_is_removed_and_counted_once(tmp_path: Path) -> None:
    pod = tmp_path / "default" / "gone"
    pod.mkdir(parents=True)
    pid, started = dead_process()
    (pod / "sandbox.json").write_text(json.dumps(
        {"proxy_pid": pid, "proxy_start": started, "vm_pid": 0, "boot_seconds": 1.0}))
    (pod / "status.sock").touch()
    (pod / "qemu.pid").write_text("1\n")  # the rest is containerd's delete's to clean
    reg = monitor.registry(tmp_path / "cli", tmp_path)
    values = scrape(reg)
    assert values["hull_shim_v2_lost_total"] == 1
    assert not any('sandbox="default/gone"' in key for key in values)
    assert sorted(p.name for p in pod.iterdir()) == ["qemu.pid"]
    assert scrape(reg)["hull_shim_v2_lost_total"] == 1


def test_a_pod_whose_shim_does_not_answer_is_a_failure(tmp_path: Path) -> None:
    with ServedPods(tmp_path, 1) as pods:
        (pods.dirs[0] / "status.sock").unlink()
        values = scrape(monitor.registry(tmp_path / "cli", tmp_path))
    assert values['hull_sandbox_agent_up{sandbox="k8s.io/pod0"}'] == 0
    assert values["hull_sandbox_unreachable"] == 1
    assert values["hull_sandbox_probe_failures_total"] == 1


def test_a_paused_pod_is_counted_not_asked(tmp_path: Path) -> None:
    with ServedPods(tmp_path, 1) as pods:
        sandboxinfo.record(pods.dirs[0], fake_sandbox(os.getpid()), status="paused")
        values = scrape(monitor.registry(tmp_path / "cli", tmp_path))
    assert values['hull_sandboxes{status="paused"}'] == 1
    assert 'hull_sandbox_agent_up{sandbox="k8s.io/pod0"}' not in values
    assert values["hull_sandbox_probe_failures_total"] == 0


# ---------------------------------------------------------------------- the status socket


async def test_status_server_answers_only_what_reads(tmp_path: Path) -> None:
    asked: list[schema.Method] = []

    async def agent(method: schema.Method, params: dict[str, Any],
                    timeout: float) -> dict[str, Any]:
        asked.append(method)
        return await fake_agent(method, params, timeout)

    hello = {"version": schema.PROTOCOL_VERSION, "agent_version": "x", "kernel_release": "k"}
    async with sandboxinfo.StatusServer("sandbox ns/p", tmp_path, hello, agent) as server:
        assert (tmp_path / "status.sock").stat().st_mode & 0o777 == 0o600
        channel = AgentChannel(proxysock.connect_unix(server.path, "test"), "status of p")
        await channel.open()
        try:
            assert await channel.request(schema.Method.HELLO, {}) == hello
            stats = await channel.request(schema.Method.SANDBOX_STATS, {})
            assert schema.SandboxStats.from_json(stats) == GUEST
            with pytest.raises(AgentError, match="container nope does not exist"):
                await channel.request(schema.Method.STATS_CONTAINER,
                                      schema.params(schema.ContainerRef("nope")))
            for method in (schema.Method.SHUTDOWN, schema.Method.SIGNAL_PROCESS,
                           schema.Method.DELETE_CONTAINER):
                with pytest.raises(AgentError, match=f"{method} is refused on .*status.sock"):
                    await channel.request(method, {})
        finally:
            await channel.close()
        assert asked == [schema.Method.SANDBOX_STATS, schema.Method.STATS_CONTAINER]
    assert not (tmp_path / "status.sock").exists()


async def test_status_server_drops_a_client_that_sends_data(tmp_path: Path) -> None:
    from hull.agentapi.framing import Frame, Kind

    async with sandboxinfo.StatusServer("sandbox p", tmp_path, {}, fake_agent) as server:
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(Frame(Kind.DATA, 1, b"x").encode())
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
        writer.close()


async def test_a_long_socket_path_is_served_and_reached_without_leaking_fds(
        tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # past sun_path's 108 bytes
    deep.mkdir(parents=True)
    async with sandboxinfo.StatusServer("sandbox deep", deep, {}, fake_agent) as server:
        assert len(str(server.path)) > 108
        fds = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            proxysock.connect_unix(server.path, "test").close()
        assert len(os.listdir("/proc/self/fd")) == fds


async def test_a_pod_publishes_itself_and_withdraws_on_close(tmp_path: Path) -> None:
    from hull.config.settings import Config
    from hull.shim.v2.pod import Pod

    pod = Pod("ns", tmp_path, SimpleNamespace(), lambda path: Config())  # type: ignore[arg-type]
    pod.sandbox_id = "p"
    pod.state_dir.mkdir(parents=True)
    sandbox = fake_sandbox(os.getpid(), 3.0)
    sandbox.hello = schema.HelloReply(schema.PROTOCOL_VERSION, "x", "k")
    sandbox.call = fake_agent
    pod.sandbox = sandbox
    await pod._publish(sandbox)
    info = sandboxinfo.read(pod.state_dir)
    assert (info["proxy_pid"], info["proxy_start"]) == (os.getpid(), start_time(os.getpid()))
    assert (info["status"], info["boot_seconds"], info["restored"]) == ("running", 3.0, False)
    assert (pod.state_dir / "status.sock").exists()
    pod.pauser.vm_paused_by = "p"
    pod.pauser.on_vm_change()  # type: ignore[misc]
    assert sandboxinfo.read(pod.state_dir)["status"] == "paused"
    pod.sandbox = None  # the fake has no VM to stop
    await pod.close()
    assert not pod.state_dir.exists()


async def test_pauser_tells_when_the_whole_vm_stops_and_continues() -> None:
    changes: list[bool] = []
    pauser = Pauser(SimpleNamespace(publish=lambda event: None),  # type: ignore[arg-type]
                    on_vm_change=lambda: changes.append(pauser.vm_paused))

    async def nothing() -> None:
        pass

    vm = SimpleNamespace(pause=nothing, resume=nothing)
    sandbox: Any = SimpleNamespace(vm=vm)
    await pauser.pause(sandbox, "c", alone=True)
    await pauser.resume(sandbox, "c")
    assert changes == [True, False]


# ---------------------------------------------------------------------- memory


def test_monitor_memory_stays_flat_with_many_sandboxes(tmp_path: Path) -> None:
    """100 CLI sandboxes (their proxies do not answer) and 30 live shim v2 pods."""
    fake_sandboxes(tmp_path / "cli", 100)
    with ServedPods(tmp_path / "shim", 30):
        reg = monitor.registry(tmp_path / "cli", tmp_path / "shim")
        for _ in range(3):
            generate_latest(reg)
        assert scrape(reg)['hull_sandbox_agent_up{sandbox="k8s.io/pod29"}'] == 1
        tracemalloc.start()
        try:
            generate_latest(reg)
            before = tracemalloc.take_snapshot()
            for _ in range(10):
                generate_latest(reg)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
    # Only what the monitor's code allocates: other tests' leftover threads must not count.
    mine = [tracemalloc.Filter(True, "*/hull/*"), tracemalloc.Filter(True, "*prometheus_client*")]
    after, before = after.filter_traces(mine), before.filter_traces(mine)
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 200_000, f"the monitor grew by {grown} bytes over 10 scrapes"


def test_monitor_once_finds_pods_in_the_shims_state_root(tmp_path: Path) -> None:
    import sys

    from hull.shim.v2.main import STATE_ROOT_ENV

    hull = [sys.executable, "-m", "hull", "--root", str(tmp_path / "cli"), "monitor", "--once"]
    with ServedPods(tmp_path / "shim", 1, namespace="default"):
        by_env = subprocess.run(hull, capture_output=True, text=True, timeout=60, check=False,
                                env={**os.environ, STATE_ROOT_ENV: str(tmp_path / "shim")})
        by_flag = subprocess.run([*hull, "--shim-root", str(tmp_path / "shim")],
                                 capture_output=True, text=True, timeout=60, check=False)
    for done in (by_env, by_flag):
        assert done.returncode == 0, done.stderr
        assert 'hull_sandbox_containers{sandbox="default/pod0"} 2.0' in done.stdout
