"""Bind mounts of host paths through containerd-shim-hull-v2: staged in the pod's one
share at <shared>/<cid>/mounts/<i> (hull.runtime.sharedfs), gone after delete, and gone
after the shim was SIGKILLed (its `delete` unmounts them before removing the state)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from hull.runtime import sharedfs
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd
from tests.integration.test_shim_v2 import rootfs, shim_pids

__all__ = ["containerd", "rootfs"]  # fixtures, imported for the tests of this module


def ctr_run(c: Containerd, rootfs: Path, task_id: str, vol: Path, *args: str,
            detach: bool = False) -> str:
    done = c.ctr("run", "-d" if detach else "--rm", "--runtime", RUNTIME,
                 "--mount", f"type=bind,src={vol},dst=/vol,options=rbind:rw",
                 "--mount", f"type=bind,src={vol / 'file'},dst=/etc/ro-file,options=bind:ro",
                 "--rootfs", str(rootfs), task_id, *args, check=False)
    assert done.returncode == 0, done.stderr
    return str(done.stdout)


def test_pod_binds_rw_ro_file(containerd: Containerd, rootfs: Path, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "file").write_text("from the host\n")
    out = ctr_run(containerd, rootfs, "b1", vol, "sh", "-c",
                  "cat /etc/ro-file; echo new > /vol/new; "
                  "(echo x > /etc/ro-file) 2>/dev/null && echo WROTE || echo refused")
    assert out == "from the host\nrefused\n"
    assert (vol / "new").read_text() == "new\n"
    assert (vol / "file").read_text() == "from the host\n"
    assert sharedfs.mounts_under(containerd.base) == []


def test_killed_shim_leaves_no_staged_bind(containerd: Containerd, rootfs: Path,
                                           tmp_path: Path) -> None:
    c = containerd
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "file").write_text("keep me\n")
    ctr_run(c, rootfs, "b2", vol, "sleep", "1000", detach=True)
    staged = [p for p in sharedfs.mounts_under(c.shim_root) if "/b2/mounts/" in p]
    assert len(staged) == 2, staged
    (pid,) = shim_pids("b2")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "b2" in c.tasks() and time.monotonic() < deadline:
        time.sleep(0.2)
    c.ctr("containers", "rm", "b2")
    deadline = time.monotonic() + 10
    while sharedfs.mounts_under(c.shim_root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sharedfs.mounts_under(c.shim_root) == []
    assert (vol / "file").read_text() == "keep me\n"
