"""A container's cgroup figures from the guest as ``io.containerd.cgroups.v2.Metrics``.

The agent answers ``stats_container`` with the files of the container's cgroup v2 in the
guest (schema.ContainerStats); this module puts them in the message containerd's
cgroups v2 manager would have filled for runc (containerd/cgroups cgroup2/stats), which
is what CRI's ContainerStats and ``ctr task metrics`` decode. As there: a "max" memory
or swap limit is 2^64-1, a "max" pids limit is 0.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2

from hull.agentapi import schema
from hull.shim.proto import cgroups_v2_pb2

METRICS_TYPE_URL = "io.containerd.cgroups.v2.Metrics"
UNLIMITED = 2**64 - 1

#: memory.stat keys that are MemoryStat fields of the same name (numbers 1-31)
_MEMORY_STAT_FIELDS = tuple(
    f.name for f in cgroups_v2_pb2.MemoryStat.DESCRIPTOR.fields if f.number <= 31)
_CPU_FIELDS = tuple(f.name for f in cgroups_v2_pb2.CPUStat.DESCRIPTOR.fields)
_EVENT_FIELDS = tuple(f.name for f in cgroups_v2_pb2.MemoryEvents.DESCRIPTOR.fields)
_IO_FIELDS = ("rbytes", "wbytes", "rios", "wios")


def _pick(source: dict[str, int], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: source[name] for name in names if name in source}


def container_metrics(s: schema.ContainerStats) -> cgroups_v2_pb2.Metrics:
    memory = cgroups_v2_pb2.MemoryStat(
        usage=s.memory_current,
        usage_limit=UNLIMITED if s.memory_max is None else s.memory_max,
        swap_usage=s.swap_current,
        swap_limit=UNLIMITED if s.swap_max is None else s.swap_max,
        max_usage=s.memory_peak,
        **_pick(s.memory_stat, _MEMORY_STAT_FIELDS))
    io = cgroups_v2_pb2.IOStat()
    for dev, fields in sorted(s.io.items()):
        major, _, minor = dev.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        io.usage.append(cgroups_v2_pb2.IOEntry(major=int(major), minor=int(minor),
                                               **_pick(fields, _IO_FIELDS)))
    return cgroups_v2_pb2.Metrics(
        pids=cgroups_v2_pb2.PidsStat(current=s.pids_current, limit=s.pids_max or 0),
        cpu=cgroups_v2_pb2.CPUStat(**_pick(s.cpu, _CPU_FIELDS)),
        memory=memory, io=io,
        memory_events=cgroups_v2_pb2.MemoryEvents(**_pick(s.memory_events, _EVENT_FIELDS)))


def as_any(metrics: cgroups_v2_pb2.Metrics) -> any_pb2.Any:
    return any_pb2.Any(type_url=METRICS_TYPE_URL, value=metrics.SerializeToString())
