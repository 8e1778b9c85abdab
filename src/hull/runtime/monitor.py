"""`hull monitor`: Prometheus metrics of every sandbox on the host.

It finds the sandboxes of both front ends without anyone's help: CLI mode's under --root
(state.json), containerd shim v2 pods under the shims' state root (their sandbox.json,
hull.runtime.sandboxinfo). Each scrape walks them and measures afresh; nothing per
sandbox is kept between scrapes, so the monitor's memory stays flat however many
sandboxes come and go.

Per sandbox (label ``sandbox``: the container id in CLI mode, ``<namespace>/<sandbox
id>`` for a shim v2 pod, whose ids are unique only within a containerd namespace):

- host overhead: the proportional set size (PSS, /proc/PID/smaps_rollup) of its host
  processes, by ``component`` and in total: what the host pays for the sandbox. CLI mode:
  ``qemu``, ``proxy``, ``shims``; shim v2: ``qemu``, ``shim`` (runtime, proxy and Task
  service in one process), ``helpers`` (the shim's other children: the tasks'
  placeholder processes, binary log drivers);
- guest memory and CPU and the container count (the agent's ``sandbox_stats``), and the
  cgroup figures of the sandbox's own container (``stats_container``: the CLI container,
  the pod's sandbox container);
- boot time, or restore time for a clone of a VM template (recorded in sandbox.json),
  and the round-trip time of one request to the agent through the proxy or the shim.

The agent is asked the same way in both modes (:func:`probe`), through the socket the
sandbox's owner serves; a paused VM is not asked (it would not answer).

Per host: sandboxes by status, sandboxes whose agent did not answer in this scrape, the
count of such failures since the monitor started, and the shim v2 pods whose shim died
without cleaning up (their entries are removed once counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.channel import AgentChannel
from hull.runtime import lifecycle, sandboxinfo
from hull.runtime.proxysock import SOCKET_NAME, connect_unix
from hull.runtime.state import ContainerDir, Status, alive

log = logging.getLogger("hull.monitor")
PROBE_TIMEOUT = 2.0
#: At most this many sandboxes are asked at once.
CONCURRENCY = 16
CLI = "cli"
SHIM_V2 = "shim-v2"


def pss_bytes(pid: int) -> int:
    """The process's proportional set size, 0 if it is gone (or unreadable)."""
    if pid <= 0:
        return 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


@dataclass
class Probe:
    """What one sandbox answered in one scrape."""

    rtt: float | None = None
    guest: schema.SandboxStats | None = None
    container: schema.ContainerStats | None = None
    error: str = ""


@dataclass
class SandboxFacts:
    """One sandbox as this scrape found it."""

    label: str
    runtime: str  # CLI or SHIM_V2
    status: str
    #: where its agent is asked (proxy.sock, status.sock), and by whom it is served
    socket: Path
    server: str
    #: whose cgroup figures stats_container reads
    container_id: str
    overhead: dict[str, int] = field(default_factory=dict)  # component -> PSS; {}: gone
    boot_seconds: float | None = None
    restored: bool = False
    probe: Probe | None = None

    def timing(self, info: dict[str, Any]) -> None:
        boot = info.get("boot_seconds")
        self.boot_seconds = float(boot) if isinstance(boot, int | float) else None
        self.restored = info.get("restored") is True

    def measure(self, components: dict[str, list[int]]) -> None:
        self.overhead = {name: sum(pss_bytes(p) for p in pids)
                         for name, pids in components.items()}

    @property
    def askable(self) -> bool:
        """Its owner lives and its VM runs: the agent should answer."""
        return bool(self.overhead) and self.status != Status.PAUSED


async def probe(facts: SandboxFacts, timeout: float = PROBE_TIMEOUT) -> Probe:
    """One connection to the sandbox's proxy or shim: sandbox_stats (timed),
    stats_container."""
    result = Probe()
    try:
        raw = connect_unix(facts.socket, f"sandbox {facts.label}: its {facts.server}")
        channel = AgentChannel(socket.socket(fileno=raw.detach()), f"sandbox {facts.label}")
    except HullError as exc:
        result.error = str(exc)
        return result
    await channel.open()
    try:
        await channel.request(schema.Method.HELLO, schema.params(schema.Hello()),
                              timeout=timeout)
        started = time.monotonic()
        guest = await channel.request(schema.Method.SANDBOX_STATS, {}, timeout=timeout)
        result.rtt = time.monotonic() - started
        result.guest = schema.SandboxStats.from_json(guest)
        with contextlib.suppress(HullError, schema.SchemaError):
            result.container = schema.ContainerStats.from_json(await channel.request(
                schema.Method.STATS_CONTAINER,
                schema.params(schema.ContainerRef(facts.container_id)), timeout=timeout))
    except (HullError, OSError, schema.SchemaError) as exc:
        result.error = str(exc) or type(exc).__name__
    finally:
        await channel.close()
    return result


# --------------------------------------------------------------------------- discovery


def cli_sandboxes(root: Path) -> Iterator[SandboxFacts]:
    """The sandboxes of CLI mode under ``root`` (one per container: state.json)."""
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if not (entry / "state.json").is_file():
            continue
        try:
            cdir = ContainerDir(root, entry.name)
            state = lifecycle.refresh(cdir, cdir.load())
        except HullError:
            continue
        facts = SandboxFacts(cdir.id, CLI, str(state.status), cdir.path / SOCKET_NAME,
                             "proxy", cdir.id)
        info = sandboxinfo.read(cdir.path)
        facts.timing(info)
        if alive(state.proxy_pid, state.proxy_start):
            vm_pid = _int(info, "vm_pid")
            shims = [pid for pid, start in [(state.pid, state.pid_start),
                                            *lifecycle.exec_shims(cdir)]
                     if alive(pid, start)]
            facts.measure({"qemu": [vm_pid] if vm_pid else children(state.proxy_pid),
                           "proxy": [state.proxy_pid], "shims": shims})
        yield facts


def shim_pods(shim_root: Path) -> Iterator[SandboxFacts | Path]:
    """The pods of live shim v2 processes under ``shim_root``
    (``<namespace>/<sandbox id>/sandbox.json``); the directory of a dead shim's entry."""
    for path in sorted(shim_root.glob(f"*/*/{sandboxinfo.FILE}")):
        pod = path.parent
        info = sandboxinfo.read(pod)
        shim = _int(info, "proxy_pid")
        if not alive(shim, _int(info, "proxy_start")):
            yield pod
            continue
        status = Status.PAUSED if info.get("status") == Status.PAUSED else Status.RUNNING
        facts = SandboxFacts(f"{pod.parent.name}/{pod.name}", SHIM_V2, str(status),
                             pod / sandboxinfo.STATUS_SOCKET, "shim", pod.name)
        facts.timing(info)
        vm_pid = _int(info, "vm_pid")
        facts.measure({"qemu": [vm_pid] if vm_pid else [], "shim": [shim],
                       "helpers": [p for p in children(shim) if p != vm_pid]})
        yield facts


def _int(info: dict[str, Any], key: str) -> int:
    value = info.get(key)
    return value if isinstance(value, int) else 0


class SandboxCollector(Collector):
    def __init__(self, root: Path, shim_root: Path | None = None,
                 timeout: float = PROBE_TIMEOUT) -> None:
        self.root = root
        self.shim_root = shim_root
        self.timeout = timeout
        self.failures = 0  # agent probes that failed since the monitor started
        self.lost_shims = 0  # shim v2 entries found stale (and removed) since then
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- gathering

    def facts(self) -> list[SandboxFacts]:
        result = list(cli_sandboxes(self.root))
        if self.shim_root is not None:
            for found in shim_pods(self.shim_root):
                if isinstance(found, SandboxFacts):
                    result.append(found)
                elif sandboxinfo.withdraw(found):
                    # containerd's `delete` of its tasks cleans the rest (VM, mounts).
                    log.warning("shim v2 pod %s/%s: its shim is gone; removed its entry",
                                found.parent.name, found.name)
                    self.lost_shims += 1
        asked = [f for f in result if f.askable]
        if asked:
            for f, p in zip(asked, asyncio.run(self._probe_all(asked)), strict=True):
                f.probe = p
        return result

    async def _probe_all(self, sandboxes: list[SandboxFacts]) -> list[Probe]:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(facts: SandboxFacts) -> Probe:
            async with limit:
                return await probe(facts, self.timeout)

        return list(await asyncio.gather(*(one(f) for f in sandboxes)))

    # ----------------------------------------------------------------- exposition

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # scrapes one at a time: a slow guest must not pile them up
            yield from self._collect()

    def _collect(self) -> Iterable[Metric]:
        started = time.monotonic()
        facts = self.facts()
        sb = ["sandbox"]
        g = GaugeMetricFamily
        by_status = g("hull_sandboxes", "Sandboxes on the host (CLI mode and shim v2), by "
                      "status", labels=["status"])
        overhead = g("hull_sandbox_host_overhead_bytes", "Host memory (PSS) of the "
                     "sandbox's host processes, by component", labels=["sandbox", "component"])
        overhead_total = g("hull_sandbox_host_overhead_total_bytes", "Host memory (PSS) of "
                           "all the sandbox's host processes: QEMU, proxy, shims",
                           labels=sb)
        info = g("hull_sandbox_info", "1 per sandbox; runtime: cli or shim-v2",
                 labels=["sandbox", "runtime"])
        boot = g("hull_sandbox_boot_seconds", "Time from QEMU start to the agent's answer "
                 "(a cold boot)", labels=sb)
        restore = g("hull_sandbox_restore_seconds", "Time from QEMU start to the agent's "
                    "answer (a clone of a VM template)", labels=sb)
        rtt = g("hull_sandbox_agent_rtt_seconds", "Round trip of one request to the agent "
                "through the proxy (or the shim v2)", labels=sb)
        up = g("hull_sandbox_agent_up", "1 if the agent answered in this scrape", labels=sb)
        mem_total = g("hull_sandbox_guest_memory_total_bytes", "Guest MemTotal", labels=sb)
        mem_used = g("hull_sandbox_guest_memory_used_bytes", "Guest MemTotal - MemAvailable",
                     labels=sb)
        cpu = CounterMetricFamily("hull_sandbox_guest_cpu_seconds", "Guest CPU time by mode",
                                  labels=["sandbox", "mode"])
        containers = g("hull_sandbox_containers", "Containers in the sandbox", labels=sb)
        ctr_mem = g("hull_sandbox_container_memory_bytes", "memory.current of the "
                    "container's cgroup in the guest", labels=sb)
        ctr_cpu = CounterMetricFamily("hull_sandbox_container_cpu_seconds", "cpu.stat "
                                      "usage of the container's cgroup in the guest", labels=sb)
        statuses = {str(s): 0 for s in Status}
        unreachable = 0
        for f in facts:
            sid = f.label
            statuses[f.status] += 1
            info.add_metric([sid, f.runtime], 1)
            if f.boot_seconds is not None:
                (restore if f.restored else boot).add_metric([sid], f.boot_seconds)
            if f.overhead:
                for component, value in f.overhead.items():
                    overhead.add_metric([sid, component], value)
                overhead_total.add_metric([sid], sum(f.overhead.values()))
            p = f.probe
            if p is None:
                continue
            up.add_metric([sid], 0 if p.error else 1)
            if p.error:
                unreachable += 1
                log.debug("sandbox %s: %s", sid, p.error)
            if p.rtt is not None:
                rtt.add_metric([sid], p.rtt)
            if p.guest is not None:
                st = p.guest
                mem_total.add_metric([sid], st.memory_total)
                mem_used.add_metric([sid], max(0, st.memory_total - st.memory_available))
                for mode, usec in (("user", st.cpu_user_usec), ("system", st.cpu_system_usec),
                                   ("idle", st.cpu_idle_usec)):
                    cpu.add_metric([sid, mode], usec / 1e6)
                containers.add_metric([sid], st.containers)
            if p.container is not None:
                ctr_mem.add_metric([sid], p.container.memory_current)
                ctr_cpu.add_metric([sid], p.container.cpu.get("usage_usec", 0) / 1e6)
        self.failures += unreachable
        for status, count in statuses.items():
            by_status.add_metric([status], count)
        yield by_status
        yield g("hull_sandbox_unreachable", "Running sandboxes whose agent did not answer "
                "in this scrape", value=unreachable)
        yield CounterMetricFamily("hull_sandbox_probe_failures", "Agent probes that failed "
                                  "since the monitor started", value=self.failures)
        yield CounterMetricFamily("hull_shim_v2_lost", "Shim v2 pods whose shim died "
                                  "without cleaning up, found since the monitor started",
                                  value=self.lost_shims)
        yield from (info, overhead, overhead_total, boot, restore, rtt, up, mem_total,
                    mem_used, cpu, containers, ctr_mem, ctr_cpu)
        yield g("hull_monitor_scrape_seconds", "Time this scrape took",
                value=time.monotonic() - started)


def registry(root: Path, shim_root: Path | None = None) -> Any:
    """A registry with the sandbox collector and the monitor's own process metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(SandboxCollector(root, shim_root))
    ProcessCollector(registry=reg)
    return reg


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HullError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(root: Path, listen: str, ready: Any = None, shim_root: Path | None = None) -> None:
    """Serve /metrics until SIGTERM or SIGINT."""
    import signal

    from prometheus_client import start_http_server

    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, host, registry(root, shim_root))
    except OSError as exc:
        raise HullError(f"hull monitor: cannot listen on {listen}: {exc.strerror}") from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    bound = server.server_address[1]
    log.info("hull monitor: serving metrics of %s and %s on http://%s:%d/metrics", root,
             shim_root, host, bound)
    if ready is not None:
        ready(host, bound)
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join(5)
