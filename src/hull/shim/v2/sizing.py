"""The sandbox VM's size from CRI's pod annotations, else from the configuration.

CRI puts the pod's resources on the sandbox's spec (containerd 1.6
pkg/cri/server/sandbox_run_linux.go; INTEGRATION.md §2 "CRI pod grouping"):
``io.kubernetes.cri.sandbox-cpu-quota`` / ``-cpu-period`` and ``-sandbox-memory`` (bytes,
the sum of the containers' limits). The VM gets the configured default on top of them,
as Kata does, so the guest kernel and agent do not eat into the pod's own budget.
"""

from __future__ import annotations

import copy
import math
import os

from hull.config.settings import Config

CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
MEMORY = "io.kubernetes.cri.sandbox-memory"
MAX_MEMORY_MIB = 1 << 20


def _int(annotations: dict[str, str], key: str) -> int:
    try:
        return max(0, int(annotations.get(key, "0")))
    except ValueError:
        return 0


def apply(config: Config, annotations: dict[str, str]) -> Config:
    """A copy of config with the VM sized for the pod's annotations."""
    sized = copy.deepcopy(config)
    hv = sized.hypervisor
    quota, period = _int(annotations, CPU_QUOTA), _int(annotations, CPU_PERIOD)
    if quota and period:
        hv.default_vcpus = min(hv.default_vcpus + math.ceil(quota / period),
                               os.cpu_count() or 1)
    memory = _int(annotations, MEMORY)
    if memory:
        hv.default_memory_mib = min(hv.default_memory_mib + math.ceil(memory / 2**20),
                                    MAX_MEMORY_MIB)
    return sized
