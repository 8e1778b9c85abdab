"""`hull monitor` sees the pods of containerd-shim-hull-v2, found without containerd.

A real containerd (containerd_fixture.py) runs a pod of two containers in one VM with the
hull shim; `hull monitor`, given only the shims' state root (HULL_SHIM_ROOT, as the shim
has it), serves their figures over HTTP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.integration.cli_helpers import scrape_monitor
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd
from tests.integration.test_shim_v2 import rootfs, wait_status

__all__ = ["containerd", "rootfs"]  # the fixtures, imported for the tests of this module


def test_metrics_endpoint_has_the_pods_overhead(containerd: Containerd, rootfs: Path,
                                                 tmp_path: Path) -> None:
    c = containerd
    second = tmp_path / "rootfs2"
    shutil.copytree(rootfs, second, symlinks=True)

    def pod_run(task_id: str, kind: str, root: Path, netns: str = "") -> None:
        join = ["--with-ns", f"network:{netns}"] if netns else []
        c.ctr("run", "-d", "--runtime", RUNTIME,
              "--annotation", f"io.kubernetes.cri.container-type={kind}",
              "--annotation", "io.kubernetes.cri.sandbox-id=mp", *join,
              "--rootfs", str(root), task_id, "sleep", "1000")

    pod_run("mp", "sandbox", rootfs)
    sandbox_pid = next(line.split()[1] for line in c.ctr("task", "ls").stdout.splitlines()
                       if line.startswith("mp "))
    pod_run("mc", "container", second, netns=f"/proc/{sandbox_pid}/ns/net")

    metrics = scrape_monitor(tmp_path / "cli", c.env)
    pod = 'sandbox="default/mp"'
    assert metrics[f'hull_sandbox_info{{runtime="shim-v2",{pod}}}'] == 1
    qemu = metrics[f'hull_sandbox_host_overhead_bytes{{component="qemu",{pod}}}']
    shim = metrics[f'hull_sandbox_host_overhead_bytes{{component="shim",{pod}}}']
    helpers = metrics[f'hull_sandbox_host_overhead_bytes{{component="helpers",{pod}}}']
    total = metrics[f"hull_sandbox_host_overhead_total_bytes{{{pod}}}"]
    assert qemu > 10e6 and shim > 5e6 and 0 < helpers < shim  # helpers: 2 placeholders
    assert total == qemu + shim + helpers < 2e9
    assert metrics[f"hull_sandbox_agent_up{{{pod}}}"] == 1
    assert metrics[f"hull_sandbox_containers{{{pod}}}"] == 2
    assert 0 < metrics[f"hull_sandbox_boot_seconds{{{pod}}}"] < 120
    assert 0 < metrics[f"hull_sandbox_agent_rtt_seconds{{{pod}}}"] < 2
    assert metrics[f"hull_sandbox_guest_memory_total_bytes{{{pod}}}"] > 100e6
    assert metrics[f"hull_sandbox_container_memory_bytes{{{pod}}}"] > 0  # mp's cgroup
    assert metrics['hull_sandboxes{status="running"}'] == 1
    assert metrics["hull_sandbox_unreachable"] == 0
    assert not [key for key in metrics if 'sandbox="default/mc"' in key]  # one pod, one VM

    c.ctr("task", "kill", "-s", "SIGKILL", "mc")
    wait_status(c, "mc", "STOPPED")
    c.ctr("task", "pause", "mp")  # alone now: the whole VM stops
    try:
        metrics = scrape_monitor(tmp_path / "cli", c.env)
    finally:
        c.ctr("task", "resume", "mp")
    assert metrics['hull_sandboxes{status="paused"}'] == 1
    assert f"hull_sandbox_agent_up{{{pod}}}" not in metrics  # a stopped VM is not asked
    assert metrics["hull_sandbox_probe_failures_total"] == 0
