"""`hull run`: a container in its own VM, driven through the CLI as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

from tests.integration.conftest import HULL, BundleFactory, Runner


def test_hello_world(hull: Runner, bundle: BundleFactory) -> None:
    done = hull("run", "--bundle", str(bundle(["echo", "hello world"])), "hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello world\n"


def test_guest_kernel_differs_from_the_host(hull: Runner, bundle: BundleFactory) -> None:
    done = hull("run", "--bundle", str(bundle(["uname", "-r"])), "uname")
    assert done.returncode == 0, done.stderr
    guest = done.stdout.decode().strip()
    assert guest and guest != os.uname().release


def test_exit_codes(hull: Runner, bundle: BundleFactory) -> None:
    for code in (0, 1, 42):
        done = hull("run", "-b", str(bundle(["sh", "-c", f"exit {code}"])), f"exit{code}")
        assert done.returncode == code, done.stderr


def crashing_elf() -> bytes:
    """A static x86_64 ELF whose only instruction is ud2: it dies of SIGILL.

    A signal sent from inside the container cannot kill its PID 1 (the kernel protects a
    namespace's init), but a fault can: this is a real death by signal.
    """
    code = b"\x0f\x0b"  # ud2
    load, ehdr, phdr = 0x400000, 64, 56
    entry = load + ehdr + phdr
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehdr, 0, 0, ehdr, phdr, 1, 64, 0, 0)
    size = ehdr + phdr + len(code)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, load, load, size, size, 0x1000)
    return header + program + code


def test_death_by_signal(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["/bin/crash"])
    (b / "rootfs/bin/crash").write_bytes(crashing_elf())
    (b / "rootfs/bin/crash").chmod(0o755)
    done = hull("run", "-b", str(b), "sig")
    assert done.returncode == 128 + signal.SIGILL, done.stderr


def test_stdin_round_trip(hull: Runner, bundle: BundleFactory) -> None:
    data = os.urandom(300_000)
    done = hull("run", "-b", str(bundle(["cat"])), "cat", input=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data


def test_ten_megabytes_of_stdout_stay_apart_from_stderr(hull: Runner,
                                                        bundle: BundleFactory) -> None:
    script = ("dd if=/dev/urandom of=/tmp/blob bs=1M count=10 2>/dev/null; "
              "cat /tmp/blob; echo to-stderr >&2; md5sum /tmp/blob >&2")
    done = hull("run", "-b", str(bundle(["sh", "-c", script])), "big")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == 10 * 1024 * 1024
    lines = done.stderr.decode().splitlines()
    assert lines[0] == "to-stderr"
    assert lines[1].split()[0] == hashlib.md5(done.stdout).hexdigest()


def test_env_cwd_user_hostname(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["sh", "-c", 'echo "$GREETING|$(pwd)|$(id -u):$(id -g)|$(hostname)"'],
               env=["PATH=/bin", "GREETING=hi there"], cwd="/work", uid=1000, gid=1000)
    done = hull("run", "-b", str(b), "envs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "hi there|/work|1000:1000|hulltest"


def test_readonly_rootfs_refuses_writes(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["sh", "-c", "touch /newfile && echo wrote || echo refused"], readonly=True)
    done = hull("run", "-b", str(b), "ro")
    assert done.stdout.decode().strip() == "refused"
    assert not (b / "rootfs/newfile").exists()


def test_writes_reach_a_writable_rootfs(hull: Runner, bundle: BundleFactory) -> None:
    b = bundle(["sh", "-c", "echo data > /root/out"])
    done = hull("run", "-b", str(b), "rw")
    assert done.returncode == 0, done.stderr
    assert (b / "rootfs/root/out").read_text() == "data\n"


def test_sigterm_to_hull_reaches_the_container(bundle: BundleFactory, state_root: Path,
                                               guest_assets_ready: None) -> None:
    b = bundle(["sh", "-c", "trap 'echo got-term; exit 7' TERM; echo ready; "
                "while true; do sleep 0.1; done"])
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "run", "-b", str(b), "sig"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 7, err
    assert out == b"got-term\n"


def test_sigkill_of_hull_leaves_no_vm(bundle: BundleFactory, state_root: Path,
                                      guest_assets_ready: None) -> None:
    b = bundle(["sh", "-c", "echo ready; sleep 1000"])
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "run", "-b", str(b), "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ps = subprocess.run(["pgrep", "-f", "hull-k,debug-threads"], capture_output=True)
        if ps.returncode != 0:
            break
        time.sleep(0.1)
    assert ps.returncode != 0, "qemu outlived the hull process that started it"
    # `hull run` was killed before it could clean up: its state remains until deleted.
    import shutil

    shutil.rmtree(state_root / "k", ignore_errors=True)


def test_hooks_run_in_the_foreground_too(hull: Runner, bundle: BundleFactory,
                                         tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\nread state; echo \"$1 $state\" >> {log}\n")
    hook.chmod(0o755)

    in_guest = "read -r state; echo \"$0 $(uname -r) $state\" >> /guest-hooks.log"

    def hooks(spec: dict[str, object]) -> None:
        on_host = {kind: [{"path": str(hook), "args": ["hook.sh", kind]}]
                   for kind in ("prestart", "createRuntime", "poststart", "poststop")}
        spec["hooks"] = on_host | {
            kind: [{"path": "/bin/sh", "args": ["sh", "-c", in_guest, kind]}]
            for kind in ("createContainer", "startContainer")}

    b = bundle(["cat", "/guest-hooks.log"], mutate=hooks)
    done = hull("run", "-b", str(b), "hooked")
    assert done.returncode == 0, done.stderr
    kinds = [line.split()[0] for line in log.read_text().splitlines()]
    assert kinds == ["prestart", "createRuntime", "poststart", "poststop"]
    assert '"id": "hooked"' in log.read_text()
    # The guest's hooks ran in the guest's kernel, before the process.
    guest = [line.split(" ", 2) for line in done.stdout.decode().splitlines()]
    assert [g[0] for g in guest] == ["createContainer", "startContainer"]
    assert guest[0][1] != os.uname().release
    assert json.loads(guest[1][2])["id"] == "hooked"


def test_kill_and_state_of_a_foreground_run(bundle: BundleFactory, state_root: Path,
                                            guest_assets_ready: None) -> None:
    b = bundle(["sh", "-c", "trap 'echo got-usr1; exit 9' USR1; echo ready; "
                "while true; do sleep 0.1; done"])
    proc = subprocess.Popen([*HULL, "--root", str(state_root), "run", "-b", str(b), "fg"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        state = subprocess.run([*HULL, "--root", str(state_root), "state", "fg"],
                               capture_output=True, check=True).stdout
        assert b'"status": "running"' in state
        done = subprocess.run([*HULL, "--root", str(state_root), "kill", "fg", "USR1"],
                              capture_output=True, check=False)
        assert done.returncode == 0, done.stderr
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 9 and out == b"got-usr1\n"
