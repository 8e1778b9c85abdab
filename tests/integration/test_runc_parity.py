"""The same bundle and the same inspection script under runc and under Hull: what a
program can see of its identity, privileges, limits and filesystem must match, except
where the VM boundary makes a difference — those are listed, not hidden."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import HULL

INSPECT = r"""
echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "hostname=$(hostname)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo "nofile=$(ulimit -n)"
echo "umask=$(umask)"
echo "cwd=$(pwd)"
echo "uid_map=$(cat /proc/self/uid_map | tr -s ' ')"
echo "mounts=$(awk '{print $2}' /proc/self/mounts | sort | tr '\n' ' ')"
echo "kcore=$(cat /proc/kcore 2>&1 | head -c 40 | wc -c)"
echo "sysrq=$( (echo x > /proc/sysrq-trigger) 2>/dev/null && echo writable || echo refused)"
echo "rootfs=$(touch /probe 2>/dev/null && echo writable || echo readonly)"
echo "pid1=$(cat /proc/1/comm)"
"""

#: Lines that may differ, and why.
EXPECTED_DIFFERENCES = {
    "mounts": "the VM's guest mounts its cgroup2 and sysfs views itself; compared as sets "
              "of the mount points the spec asks for, below",
}


def bundle_for(tmp: Path, runtime: str) -> Path:
    path = tmp / runtime
    (path / "rootfs/bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (path / "rootfs" / d).mkdir()
    shutil.copy("/bin/busybox", path / "rootfs/bin/busybox")
    for applet in subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                                 check=True).stdout.split():
        if applet != "busybox":
            (path / "rootfs/bin" / applet).symlink_to("busybox")
    (path / "rootfs/etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (path / "rootfs/etc/group").write_text("root:x:0:\n")
    subprocess.run(["runc", "spec"], cwd=path, check=True)
    spec: dict[str, Any] = json.loads((path / "config.json").read_text())
    spec["process"].update(terminal=False, args=["sh", "-c", INSPECT])
    # A network namespace of its own for both: runc's default; Hull gives it loopback only.
    (path / "config.json").write_text(json.dumps(spec))
    return path


def facts(output: str) -> dict[str, str]:
    result = {}
    for line in output.splitlines():
        key, sep, value = line.replace(":\t", "=", 1).partition("=")
        if sep:
            result[key.strip()] = value.strip()
    return result


@pytest.mark.usefixtures("guest_assets_ready")
def test_runc_and_hull_report_the_same(tmp_path: Path, state_root: Path) -> None:
    if not shutil.which("runc"):
        pytest.fail("runc is missing: apt-get install runc (scripts/setup-host.sh does)")
    runc_bundle, hull_bundle = bundle_for(tmp_path, "runc"), bundle_for(tmp_path, "hull")
    runc = subprocess.run(["runc", "--root", str(tmp_path / "runc-state"), "run", "-b",
                           str(runc_bundle), "parity-runc"], capture_output=True, text=True,
                          timeout=60, check=False)
    hull = subprocess.run([*HULL, "--root", str(state_root), "run", "-b", str(hull_bundle),
                           "parity-hull"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert runc.returncode == 0, runc.stderr
    assert hull.returncode == 0, hull.stderr
    r, h = facts(runc.stdout), facts(hull.stdout)
    assert set(r) == set(h), (r, h)
    differences = {k for k in r if r[k] != h[k]}
    unexplained = differences - set(EXPECTED_DIFFERENCES)
    assert not unexplained, {k: (r[k], h[k]) for k in unexplained}
    spec_mounts = {m["destination"] for m in json.loads(
        (hull_bundle / "config.json").read_text())["mounts"]}
    for name, seen in (("runc", r), ("hull", h)):
        assert spec_mounts <= set(seen["mounts"].split()), (name, seen["mounts"])
