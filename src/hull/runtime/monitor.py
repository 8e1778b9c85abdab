"""`hull monitor`: Prometheus metrics of every sandbox under --root.

Each scrape walks the state directories and measures afresh; nothing per sandbox is kept
between scrapes, so the monitor's memory stays flat however many sandboxes come and go.

Per sandbox (label ``sandbox``):

- host overhead: the proportional set size (PSS, /proc/PID/smaps_rollup) of QEMU, the
  proxy and the shims, by ``component`` and in total: what the host pays for the sandbox;
- guest memory and CPU (the agent's ``sandbox_stats``) and the container's own cgroup
  figures (``stats_container``);
- container count, boot time (recorded by the proxy in sandbox.json), and the round-trip
  time of one request to the agent through the proxy.

Per host: sandboxes by status, sandboxes whose agent did not answer in this scrape, and
the count of such failures since the monitor started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from hull.runtime import lifecycle
from hull.runtime.proxyd import SANDBOX_FILE, connect
from hull.runtime.state import ContainerDir, ContainerState, Status, alive

log = logging.getLogger("hull.monitor")
PROBE_TIMEOUT = 2.0
#: At most this many sandboxes are asked at once.
CONCURRENCY = 16


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
    state: ContainerState
    overhead: dict[str, int] = field(default_factory=dict)
    boot_seconds: float | None = None
    probe: Probe | None = None


async def probe(cdir: ContainerDir, timeout: float = PROBE_TIMEOUT) -> Probe:
    """One connection to the sandbox's proxy: sandbox_stats (timed), stats_container."""
    result = Probe()
    try:
        channel = AgentChannel(connect(cdir), f"container {cdir.id}")
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
                schema.Method.STATS_CONTAINER, schema.params(schema.ContainerRef(cdir.id)),
                timeout=timeout))
    except (HullError, OSError, schema.SchemaError) as exc:
        result.error = str(exc) or type(exc).__name__
    finally:
        await channel.close()
    return result


class SandboxCollector(Collector):
    def __init__(self, root: Path, timeout: float = PROBE_TIMEOUT) -> None:
        self.root = root
        self.timeout = timeout
        self.failures = 0  # agent probes that failed since the monitor started
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- gathering

    def sandboxes(self) -> list[tuple[ContainerDir, ContainerState]]:
        found: list[tuple[ContainerDir, ContainerState]] = []
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            if not (entry / "state.json").is_file():
                continue
            with contextlib.suppress(HullError):
                cdir = ContainerDir(self.root, entry.name)
                found.append((cdir, lifecycle.refresh(cdir, cdir.load())))
        return found

    def facts(self) -> list[SandboxFacts]:
        sandboxes = self.sandboxes()
        result = []
        for cdir, state in sandboxes:
            info = _read_json(cdir.path / SANDBOX_FILE)
            facts = SandboxFacts(state)
            boot = info.get("boot_seconds")
            facts.boot_seconds = float(boot) if isinstance(boot, int | float) else None
            if alive(state.proxy_pid, state.proxy_start):
                vm_pid = info.get("vm_pid") if isinstance(info.get("vm_pid"), int) else 0
                qemu = [vm_pid] if vm_pid else children(state.proxy_pid)
                shims = [pid for pid, start in [(state.pid, state.pid_start),
                                                *lifecycle.exec_shims(cdir)]
                         if alive(pid, start)]
                facts.overhead = {"qemu": sum(pss_bytes(p) for p in qemu),
                                  "proxy": pss_bytes(state.proxy_pid),
                                  "shims": sum(pss_bytes(p) for p in shims)}
            result.append(facts)
        live = [(f, ContainerDir(self.root, f.state.id)) for f in result if f.overhead]
        if live:
            probes = asyncio.run(self._probe_all([cdir for _, cdir in live]))
            for (f, _), p in zip(live, probes, strict=True):
                f.probe = p
        return result

    async def _probe_all(self, cdirs: list[ContainerDir]) -> list[Probe]:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(cdir: ContainerDir) -> Probe:
            async with limit:
                return await probe(cdir, self.timeout)

        return list(await asyncio.gather(*(one(c) for c in cdirs)))

    # ----------------------------------------------------------------- exposition

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # scrapes one at a time: a slow guest must not pile them up
            yield from self._collect()

    def _collect(self) -> Iterable[Metric]:
        started = time.monotonic()
        facts = self.facts()
        sb = ["sandbox"]
        g = GaugeMetricFamily
        by_status = g("hull_sandboxes", "Sandboxes under the state root, by status",
                      labels=["status"])
        overhead = g("hull_sandbox_host_overhead_bytes", "Host memory (PSS) of the "
                     "sandbox's host processes, by component", labels=["sandbox", "component"])
        overhead_total = g("hull_sandbox_host_overhead_total_bytes", "Host memory (PSS) of "
                           "QEMU, the proxy and the shims of the sandbox", labels=sb)
        boot = g("hull_sandbox_boot_seconds", "Time from QEMU start to the agent's answer",
                 labels=sb)
        rtt = g("hull_sandbox_agent_rtt_seconds", "Round trip of one request to the agent "
                "through the proxy", labels=sb)
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
            sid = f.state.id
            statuses[str(f.state.status)] += 1
            if f.boot_seconds is not None:
                boot.add_metric([sid], f.boot_seconds)
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
        yield from (overhead, overhead_total, boot, rtt, up, mem_total, mem_used, cpu,
                    containers, ctr_mem, ctr_cpu)
        yield g("hull_monitor_scrape_seconds", "Time this scrape took",
                value=time.monotonic() - started)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def registry(root: Path) -> Any:
    """A registry with the sandbox collector and the monitor's own process metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(SandboxCollector(root))
    ProcessCollector(registry=reg)
    return reg


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HullError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(root: Path, listen: str, ready: Any = None) -> None:
    """Serve /metrics until SIGTERM or SIGINT."""
    import signal

    from prometheus_client import start_http_server

    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, host, registry(root))
    except OSError as exc:
        raise HullError(f"hull monitor: cannot listen on {listen}: {exc.strerror}") from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    bound = server.server_address[1]
    log.info("hull monitor: serving metrics of %s on http://%s:%d/metrics", root, host, bound)
    if ready is not None:
        ready(host, bound)
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join(5)
