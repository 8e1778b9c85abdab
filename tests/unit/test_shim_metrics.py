"""The guest's cgroup figures as io.containerd.cgroups.v2.Metrics, and pause bookkeeping."""

from __future__ import annotations

from hull.agentapi import schema
from hull.errors import ConfigError
from hull.shim.proto import cgroups_v2_pb2
from hull.shim.ttrpc import Code
from hull.shim.v2 import metrics, service
from hull.shim.v2.pausing import Pauser


def test_container_stats_become_cgroups_v2_metrics() -> None:
    stats = schema.ContainerStats(
        cpu={"usage_usec": 30, "user_usec": 20, "system_usec": 10, "nr_periods": 4,
             "bogus": 1},
        memory_current=5 << 20, memory_max=None, memory_peak=6 << 20, swap_current=0,
        swap_max=0, memory_stat={"anon": 4 << 20, "file": 1 << 20, "inactive_file": 7,
                                 "pgfault": 99, "unknown_key": 3},
        memory_events={"oom_kill": 2, "max": 5}, pids_current=3, pids_max=None,
        io={"254:0": {"rbytes": 10, "wbytes": 20, "rios": 1, "wios": 2, "dbytes": 9},
            "bad": {"rbytes": 1}})
    any_ = metrics.as_any(metrics.container_metrics(stats))
    assert any_.type_url == "io.containerd.cgroups.v2.Metrics"
    m = cgroups_v2_pb2.Metrics.FromString(any_.value)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec, m.cpu.nr_periods) == \
        (30, 20, 10, 4)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.max_usage) == \
        (5 << 20, 2**64 - 1, 6 << 20)
    assert (m.memory.anon, m.memory.file, m.memory.inactive_file, m.memory.pgfault) == \
        (4 << 20, 1 << 20, 7, 99)
    assert m.memory.swap_limit == 0
    assert (m.pids.current, m.pids.limit) == (3, 0)
    assert (m.memory_events.oom_kill, m.memory_events.max) == (2, 5)
    (entry,) = m.io.usage
    assert (entry.major, entry.minor, entry.rbytes, entry.wios) == (254, 0, 10, 2)


def test_field_numbers_match_containerd() -> None:
    """containerd/cgroups cgroup2/stats/metrics.proto: what CRI and ctr decode."""
    fields = {f.name: f.number for f in cgroups_v2_pb2.MemoryStat.DESCRIPTOR.fields}
    assert (fields["usage"], fields["usage_limit"], fields["swap_usage"],
            fields["max_usage"], fields["inactive_file"], fields["pgmajfault"]) == \
        (32, 33, 34, 36, 13, 19)
    top = {f.name: f.number for f in cgroups_v2_pb2.Metrics.DESCRIPTOR.fields}
    assert top == {"pids": 1, "cpu": 2, "memory": 4, "io": 6, "memory_events": 8}


def test_config_errors_are_invalid_argument() -> None:
    """A refused io.hull.config.* annotation fails Create with InvalidArgument."""
    assert service.grpc_error(ConfigError("annotation x is not allowed")).code == \
        Code.INVALID_ARGUMENT


async def test_pauser_bookkeeping() -> None:
    class Rec:
        sent: list[object] = []

        def publish(self, event: object) -> None:
            self.sent.append(event)

    pauser = Pauser(Rec())  # type: ignore[arg-type]
    assert not pauser.is_paused("") and not pauser.is_paused("c")
    pauser.frozen.add("c")
    pauser.vm_paused_by = "d"
    assert pauser.is_paused("c") and pauser.is_paused("d") and pauser.vm_paused
    pauser.forget("c")
    pauser.forget("d")
    assert not pauser.vm_paused and not pauser.frozen
    await pauser.thaw(None, "c")  # no sandbox: nothing to do
