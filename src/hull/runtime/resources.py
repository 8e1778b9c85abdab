"""Container statistics and resource updates (hull events / hull update), in runc's terms.

The agent reports cgroup v2 figures (schema.ContainerStats); :func:`runc_stats` turns them
into the ``data`` object of ``runc events --stats`` (libcontainer/types Stats: times in
nanoseconds, "max" limits as 2^64-1 for memory and 0 for pids, as runc's fs2 driver).
"""

from __future__ import annotations

from typing import Any

from hull.agentapi import schema
from hull.errors import InvalidState
from hull.runtime import client
from hull.runtime.lifecycle import Runtime

UNLIMITED = 2**64 - 1


def container_stats(rt: Runtime, container_id: str) -> schema.ContainerStats:
    cdir, state = rt.load(container_id)
    if not state.can_kill():
        raise InvalidState(f"container {container_id} is not running")
    reply = client.call(cdir, schema.Method.STATS_CONTAINER, schema.ContainerRef(container_id))
    try:
        return schema.ContainerStats.from_json(reply)
    except schema.SchemaError as exc:
        raise InvalidState(f"container {container_id}: bad stats from the guest: {exc}"
                           ) from None


def update(rt: Runtime, container_id: str, resources: dict[str, Any]) -> None:
    cdir, state = rt.load(container_id)
    if not state.can_kill():
        raise InvalidState(f"container {container_id} is not running")
    client.call(cdir, schema.Method.UPDATE_CONTAINER,
                schema.UpdateContainer(container_id, resources))


def runc_stats(s: schema.ContainerStats) -> dict[str, Any]:
    cpu, raw = s.cpu, s.memory_stat
    return {
        "cpu": {
            "usage": {"total": cpu.get("usage_usec", 0) * 1000,
                      "kernel": cpu.get("system_usec", 0) * 1000,
                      "user": cpu.get("user_usec", 0) * 1000},
            "throttling": {"periods": cpu.get("nr_periods", 0),
                           "throttledPeriods": cpu.get("nr_throttled", 0),
                           "throttledTime": cpu.get("throttled_usec", 0) * 1000},
        },
        "memory": {
            "cache": raw.get("file", 0),
            "usage": {"usage": s.memory_current, "max": s.memory_peak,
                      "limit": UNLIMITED if s.memory_max is None else s.memory_max,
                      "failcnt": s.memory_events.get("max", 0)},
            "swap": {"usage": s.swap_current + s.memory_current,
                     "limit": UNLIMITED if s.swap_max is None else s.swap_max},
            "raw": raw,
        },
        "pids": {"current": s.pids_current, "limit": s.pids_max or 0},
        "blkio": {
            "ioServiceBytesRecursive": [
                {"major": int(dev.split(":")[0]), "minor": int(dev.split(":")[1]),
                 "op": op, "value": fields.get(key, 0)}
                for dev, fields in s.io.items() if dev.count(":") == 1
                for op, key in (("Read", "rbytes"), ("Write", "wbytes"))],
        },
        "oom_kill": s.memory_events.get("oom_kill", 0),
    }
