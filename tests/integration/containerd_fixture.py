"""A real containerd 1.6 (Debian's package) on a private socket, root and state.

The fixture writes its own config.toml (CRI disabled: the ctr tests do not need it),
points containerd's PATH at this venv so it finds ``containerd-shim-hull-v2``, gives the
shims a private state root (HULL_SHIM_ROOT), and at the end removes every task,
container, mount and directory it made. Paths stay short: unix socket paths hold 108
bytes (INTEGRATION.md §2; MEASUREMENTS.md "Real clients").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import terminate

RUNTIME = "io.containerd.hull.v2"
NAMESPACE = "default"

CONFIG = """\
version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{dir}/c.sock"
[debug]
  level = "debug"
"""


class Containerd:
    def __init__(self, base: Path, *, config: str = CONFIG, namespace: str = NAMESPACE) -> None:
        self.base = base
        self.config_template = config  # formatted with dir=base
        self.namespace = namespace
        self.socket = base / "c.sock"
        self.shim_root = base / "shim"
        self.config = base / "config.toml"
        self.log = base / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "HULL_SHIM_ROOT": str(self.shim_root),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}

    def start(self) -> None:
        self.config.write_text(self.config_template.format(dir=self.base))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)],
                                         stdout=log, stderr=log, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.ctr("version", check=False).returncode == 0:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"containerd did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        terminate(self.proc, grace=15)
        self.proc = None

    def ctr(self, *args: str, check: bool = True, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ctr", "-a", str(self.socket), "-n", self.namespace, *args],
                              input=input.decode() if input is not None else None,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({done.returncode}): "
                                 f"{done.stdout}{done.stderr}")
        return done

    def tasks(self) -> dict[str, str]:
        """task id -> status, from `ctr task ls`."""
        out = self.ctr("task", "ls").stdout.splitlines()[1:]
        return {line.split()[0]: line.split()[2] for line in out if line.split()}

    def bundle(self, task_id: str) -> Path:
        return self.base / "state/io.containerd.runtime.v2.task" / self.namespace / task_id

    def cleanup(self) -> None:
        """Remove every task and container (so no shim or VM outlives the test)."""
        if self.proc is None:
            return
        for task_id in self.tasks():
            self.ctr("task", "kill", "-s", "SIGKILL", task_id, check=False)
        for task_id in self.tasks():
            self.ctr("task", "delete", "-f", task_id, check=False)
        for line in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "rm", line, check=False)


def _unmount_under(base: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(f"{base}/")), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    if not shutil.which("containerd") or not shutil.which("ctr"):
        pytest.fail("containerd is missing: apt-get install containerd (scripts/setup-host.sh)")
    base = Path(tempfile.mkdtemp(prefix="hullct-", dir="/tmp"))
    daemon = Containerd(base)
    try:
        daemon.start()
        yield daemon
        daemon.cleanup()
        left = list(daemon.shim_root.rglob("*")) if daemon.shim_root.exists() else []
        assert not [p for p in left if p.name != "s"], f"shim state left behind: {left}"
    finally:
        with contextlib.suppress(Exception):
            daemon.cleanup()
        daemon.stop()
        _unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
