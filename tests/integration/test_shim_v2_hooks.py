"""OCI hooks of a config.json through containerd-shim-hull-v2 (hull.shim.v2.taskhooks).

`ctr run --config` hands containerd a whole spec, hooks included, with an absolute
root.path (no snapshot): prestart, createRuntime, poststart and poststop run on the host,
createContainer and startContainer in the guest, and a failing one fails the request
that runs it, naming the hook.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.conftest import default_spec
from tests.integration.containerd_fixture import RUNTIME, Containerd, containerd
from tests.integration.test_shim_v2 import qemu_of, rootfs, shim_pids, wait_status

__all__ = ["containerd", "rootfs"]  # fixtures, imported for the tests of this module

HOST_KINDS = ("prestart", "createRuntime", "poststart", "poststop")
GUEST_KINDS = ("createContainer", "startContainer")
#: A guest hook: paths are the container's (the rootfs's busybox); sync, for the host
#: reads the file through the 9p share.
GUEST_HOOK = "echo \"$0 guest $(uname -r) $(hostname) $(cat)\" >> /hooks.log; sync"


def ctr_run(c: Containerd, tmp_path: Path, task_id: str, spec: dict[str, Any],
            *flags: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"{task_id}.json"
    config.write_text(json.dumps(spec))
    return c.ctr("run", *flags, "--runtime", RUNTIME, "--config", str(config), task_id,
                 check=False)


def spec_with(rootfs: Path, args: list[str], hooks: dict[str, Any]) -> dict[str, Any]:
    spec = default_spec(args)
    spec["root"]["path"] = str(rootfs)
    spec["hooks"] = hooks
    return spec


def guest_hook(kind: str) -> dict[str, Any]:
    return {"path": "/bin/sh", "args": ["sh", "-c", GUEST_HOOK, kind], "timeout": 30}


def failing(script: str, **more: Any) -> dict[str, Any]:
    return {"path": "/bin/sh", "args": ["sh", "-c", script], **more}


def test_hooks_run_in_order_host_ones_on_the_host_guest_ones_in_the_guest(
        containerd: Containerd, rootfs: Path, tmp_path: Path) -> None:
    c = containerd
    log = rootfs / "hooks.log"  # the guest's /hooks.log
    host_hook = tmp_path / "hook.sh"
    host_hook.write_text(f"#!/bin/sh\necho \"$1 host $(uname -r) $(cat)\" >> {log}\n")
    host_hook.chmod(0o755)
    hooks = {kind: [{"path": str(host_hook), "args": ["hook.sh", kind]}]
             for kind in HOST_KINDS} | {kind: [guest_hook(kind)] for kind in GUEST_KINDS}
    # The process copies what the hooks wrote so far: startContainer came before it
    # (poststart may come before its cat, or after).
    spec = spec_with(rootfs, ["sh", "-c", "cat /hooks.log > /seen"], hooks)
    done = ctr_run(c, tmp_path, "hk", spec, "-d")
    assert done.returncode == 0, done.stderr
    pid = int(c.ctr("task", "ls").stdout.splitlines()[1].split()[1])
    wait_status(c, "hk", "STOPPED")
    assert "poststop" not in log.read_text()
    c.ctr("task", "delete", "hk")

    lines = [line.split(" ", 3) for line in log.read_text().splitlines()]
    assert [line[:2] for line in lines] == [
        ["prestart", "host"], ["createRuntime", "host"], ["createContainer", "guest"],
        ["startContainer", "guest"], ["poststart", "host"], ["poststop", "host"]]
    assert [line.split()[0] for line in (rootfs / "seen").read_text().splitlines()][:4] == [
        "prestart", "createRuntime", "createContainer", "startContainer"]
    # Host hooks see the host's kernel; guest ones the guest's, in the container's uts.
    host_release, guest_release = os.uname().release, lines[2][2]
    assert guest_release != host_release and lines[3][2] == guest_release
    assert all(line[2] == host_release for line in lines if line[1] == "host")
    assert all(line[3].startswith("hulltest ") for line in lines if line[1] == "guest")
    states = {line[0]: json.loads(line[3].split(" ", 1)[1] if line[1] == "guest" else line[3])
              for line in lines}
    bundle = str(c.bundle("hk"))
    for kind, status in (("prestart", "creating"), ("createRuntime", "creating"),
                         ("poststart", "running"), ("poststop", "stopped")):
        assert (states[kind]["id"], states[kind]["pid"], states[kind]["bundle"],
                states[kind]["status"]) == ("hk", pid, bundle, status), kind
    # In the guest: the init's pid in its own pid namespace, as runc gives it.
    assert (states["createContainer"]["id"], states["createContainer"]["bundle"]) == (
        "hk", bundle)
    assert (states["createContainer"]["status"], states["createContainer"]["pid"]) == (
        "creating", 1)
    assert (states["startContainer"]["status"], states["startContainer"]["pid"]) == (
        "created", 1)


def test_failing_hooks_fail_create_or_start_and_leave_nothing(
        containerd: Containerd, rootfs: Path, tmp_path: Path) -> None:
    c = containerd
    marker = tmp_path / "ran"
    never = {"path": "/bin/sh", "args": ["sh", "-c", f"echo $0 >> {marker}", "later"]}

    # A failing prestart: no createRuntime after it, no VM or shim left.
    spec = spec_with(rootfs, ["true"], {"prestart": [failing("echo 'no netns' >&2; exit 3")],
                                        "createRuntime": [never]})
    done = ctr_run(c, tmp_path, "hp", spec, "--rm")
    assert done.returncode != 0
    assert "container hp: prestart hook #0 (/bin/sh) failed: exit status 3: no netns" in (
        done.stderr), done.stderr
    assert not marker.exists()

    # A failing createContainer (in the guest) fails Create as well.
    spec = spec_with(rootfs, ["true"], {
        "createContainer": [failing("echo 'no gpu here' >&2; exit 4")],
        "startContainer": [guest_hook("startContainer")]})
    done = ctr_run(c, tmp_path, "hc", spec, "--rm")
    assert done.returncode != 0
    assert "createContainer hook #0 (/bin/sh) failed: exit status 4: no gpu here" in (
        done.stderr), done.stderr
    assert not (rootfs / "hooks.log").exists()
    for task_id in ("hp", "hc"):
        assert task_id not in c.tasks()
        assert not qemu_of(task_id) and not shim_pids(task_id)
        c.ctr("containers", "rm", task_id, check=False)  # what --rm leaves after a failure

    # A startContainer hook that times out fails Start; the process never runs.
    spec = spec_with(rootfs, ["touch", "/started"], {
        "startContainer": [failing("sleep 60", timeout=2)], "poststart": [never]})
    done = ctr_run(c, tmp_path, "hs", spec, "-d")
    assert done.returncode != 0
    assert "startContainer hook #0 (/bin/sh) failed: timed out after 2s" in done.stderr, (
        done.stderr)
    # ctr leaves the task of a failed start behind: its init is gone, its exit reported.
    wait_status(c, "hs", "STOPPED")
    c.ctr("task", "delete", "hs")
    c.ctr("containers", "rm", "hs")
    assert not (rootfs / "started").exists() and not marker.exists()
    assert not qemu_of("hs")
