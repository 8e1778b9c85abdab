"""Driving `hull create/start/...` the way conmon and containerd's runc shim do.

`hull create` hands its stdio to the container's shim, which outlives it: a test must
give create files (or pipes it keeps reading), never wait for EOF on create's pipes. The
test process is made a child subreaper, as conmon and containerd's shim are, so shims
reparent to it and are reaped here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.conftest import HULL

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(pid: int, timeout: float = 30) -> int | None:
    """Wait for a reparented shim; its exit code, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    return None


def terminate(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """Stop a daemon the tests started: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reap_all() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


@dataclass
class Cli:
    root: Path
    work: Path

    def __call__(self, *argv: str, input: bytes = b"", timeout: float = 60,
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*HULL, "--root", str(self.root), *extra, *argv], input=input,
                              capture_output=True, timeout=timeout, check=False)

    def create(self, cid: str, bundle: Path, *flags: str, extra: tuple[str, ...] = ()
               ) -> tuple[subprocess.CompletedProcess[bytes], Path, Path]:
        """create with stdout/stderr going to files (as a client's pipes would)."""
        out, err = self.work / f"{cid}.out", self.work / f"{cid}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            done = subprocess.run([*HULL, "--root", str(self.root), *extra, "create",
                                   "--bundle", str(bundle), *flags, cid],
                                  stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                  timeout=120, check=False)
        return done, out, err

    def state(self, cid: str) -> dict[str, Any]:
        done = self("state", cid)
        assert done.returncode == 0, done.stderr
        value: dict[str, Any] = json.loads(done.stdout)
        return value

    def wait_status(self, cid: str, status: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(cid)
            if state["status"] == status or time.monotonic() > deadline:
                return state
            time.sleep(0.05)


@contextlib.contextmanager
def cleanup(cli: Cli, *cids: str) -> Iterator[None]:
    try:
        yield
    finally:
        for cid in cids:
            cli("delete", "--force", cid)
        reap_all()


def scrape_monitor(root: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """One scrape of a `hull monitor` started for it (and stopped after): series -> value,
    e.g. 'hull_sandbox_containers{sandbox="x"}'."""
    import re
    import urllib.request

    proc = subprocess.Popen([*HULL, "--root", str(root), "monitor", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        url = re.search(r"http://\S+", proc.stdout.readline())
        assert url, "hull monitor did not say where it serves"
        with urllib.request.urlopen(url.group(0), timeout=60) as response:
            text = response.read().decode()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(hull_\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)}
