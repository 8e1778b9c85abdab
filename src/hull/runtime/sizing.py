"""The VM's size from the container's own limits (issue: "VM sizing").

A VM gets vCPUs = ceil(cpu.quota / cpu.period), at least the configured default, and
memory = the configured default + the memory limit, so the guest kernel and agent do not
eat into the container's budget. Pods through CRI are sized from the pod's annotations
instead (hull.shim.v2.sizing).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from hull.config.settings import Config

MAX_MEMORY_MIB = 1 << 20


def for_spec(config: Config, spec: dict[str, Any]) -> Config:
    """A copy of ``config`` with the VM sized for ``spec``'s linux.resources."""
    resources = (spec.get("linux") or {}).get("resources") or {}
    cpu, memory = resources.get("cpu") or {}, resources.get("memory") or {}
    sized = copy.deepcopy(config)
    hv = sized.hypervisor
    quota, period = _positive(cpu.get("quota")), _positive(cpu.get("period")) or 100_000
    if quota:
        hv.default_vcpus = max(hv.default_vcpus,
                               min(math.ceil(quota / period), os.cpu_count() or 1))
    limit = _positive(memory.get("limit"))
    if limit:
        hv.default_memory_mib = min(hv.default_memory_mib + math.ceil(limit / 2**20),
                                    MAX_MEMORY_MIB)
    return sized


def _positive(value: Any) -> int:
    """A limit as an int, 0 for none: absent, -1 (unlimited) or not a number."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return 0
    return value
