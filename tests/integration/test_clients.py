"""Real clients drive Hull unchanged: Podman 4.3 (conmon), containerd 1.6 through
containerd-shim-runc-v2 (`ctr run --runc-binary`), and Docker 20.10 (`dockerd
--add-runtime`) — configured as README.md's "Use with Podman / containerd / Docker" says.

Each container boots its own VM, so each test runs few of them. The daemons are started
once per module on private paths (clients.py) and every test removes what it made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hull.cli.context import DEFAULT_ROOT
from tests.integration.clients import (
    IMAGE,
    Containerd,
    Docker,
    Podman,
    bridge_network,
    containerd,
    docker,
    http_get,
    hull_states,
    ok,
    podman,
    reaper,
    run,
    wait_for,
)
from tests.integration.conftest import HULL

__all__ = ["containerd", "docker", "podman", "reaper"]  # fixtures used by the tests here

#: A process that reports TERM and carries on: `stop` must fall back to KILL.
STUBBORN = "echo started; trap 'echo got-term' TERM; while true; do sleep 0.1; done"
#: Talks over a terminal: where it is, its size, a line of input, a resize, an exit code.
#: A size is waited for: clients set it right after `start` (ctr) and it travels through
#: the shim and the proxy to the guest's pty, as a SIGWINCH would.
TTY_DIALOG = ("size() { for i in $(seq 100); do s=$(stty size 2>/dev/null); "
              "[ \"$s\" = \"$1\" ] && break; sleep 0.1; done; echo size:$s; }; "
              "tty; size '33 101'; echo READY; read x; echo got:$x; size '40 120'; exit 4")
DIALOG = ((b"READY", b"hello-input\r"), (b"got:hello-input", (40, 120)))


def check_tty_dialog(text: str) -> None:
    assert "/dev/pts/0" in text, text
    assert "size:33 101" in text, text  # the caller's window size reached the guest's pty
    assert "got:hello-input" in text, text
    assert "size:40 120" in text, text  # and so did a resize


# ---------------------------------------------------------------------- Podman


def test_podman_run_rm_echo_and_exit_codes(podman: Podman, tmp_path: Path) -> None:
    cidfile = tmp_path / "cid"
    done = podman("run", "--rm", "--network", "none", "--cidfile", str(cidfile), IMAGE,
                  "echo", "hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n"
    cid = cidfile.read_text().strip()
    assert not (DEFAULT_ROOT / cid).exists(), "podman run --rm left Hull's state behind"
    assert podman.containers() == []

    done = podman("run", "--rm", "--network", "none", IMAGE, "sh", "-c", "exit 3")
    assert done.returncode == 3, done.stderr
    # Podman maps the runtime's "executable file not found" to 127, as with runc.
    done = podman("run", "--rm", "--network", "none", IMAGE, "/no/such/command")
    assert done.returncode == 127, done.stderr
    assert "/no/such/command" in done.stderr
    assert podman.containers() == []


def test_podman_run_sees_its_etc_files_and_a_volume(podman: Podman, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "f").write_text("from the host\n")
    script = ("echo $(cat /etc/hostname); grep -c hullbox /etc/hosts; cat /vol/f; "
              "echo out > /vol/g; "
              "grep -q ' /dev/shm ' /proc/mounts && echo shm; mount | grep -c ' /etc/hosts '")
    done = podman("run", "--rm", "--network", "none", "--hostname", "hullbox",
                  "-v", f"{vol}:/vol", IMAGE, "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "hullbox" and int(lines[1]) >= 1, done.stdout
    assert lines[2:] == ["from the host", "shm", "1"], done.stdout
    assert (vol / "g").read_text() == "out\n"
    assert podman.containers() == []


def test_podman_run_interactive_tty(podman: Podman) -> None:
    result = podman.pty("run", "-it", "--rm", "--network", "none", IMAGE,
                        "sh", "-c", TTY_DIALOG, dialog=DIALOG)
    assert result.returncode == 4, result.text
    check_tty_dialog(result.text)
    assert podman.containers() == []


def test_podman_detached_exec_logs_stop(podman: Podman) -> None:
    name = "hull-detached"
    cid = ok(podman("run", "-d", "--network", "none", "--name", name, IMAGE,
                    "sh", "-c", STUBBORN)).strip()
    try:
        assert (DEFAULT_ROOT / cid / "state.json").exists()
        state = ok(podman("inspect", "--format", "{{.State.Status}} {{.State.Pid}}", name))
        status, pid = state.split()
        assert status == "running"
        assert "shim" in Path(f"/proc/{pid}/cmdline").read_text()  # Hull's relay

        done = podman("exec", name, "sh", "-c", "echo in-exec; echo to-err >&2; exit 5")
        assert (done.returncode, done.stdout, done.stderr) == (5, "in-exec\n", "to-err\n")
        result = podman.pty("exec", "-it", name, "sh", "-c", TTY_DIALOG, dialog=DIALOG)
        assert result.returncode == 4, result.text
        check_tty_dialog(result.text)

        assert ok(podman("logs", name)) == "started\n"

        # TERM first (the trap reports it), KILL once the timeout has passed.
        began = time.monotonic()
        ok(podman("stop", "-t", "3", name))
        assert time.monotonic() - began >= 3
        state = ok(podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                          name))
        assert state.split() == ["exited", "137"]
        assert ok(podman("logs", name)).splitlines()[:2] == ["started", "got-term"]
    finally:
        ok(podman("rm", "-f", name))
    assert not (DEFAULT_ROOT / cid).exists()
    assert podman.containers() == []


def test_podman_rm_force_of_a_running_container(podman: Podman) -> None:
    # Hull chosen by containers.conf ([engine] runtime = "hull"), not by --runtime.
    cid = ok(podman.by_conf("run", "-d", "--network", "none", "--stop-timeout", "1", IMAGE,
                            "sleep", "1000")).strip()
    state = ok(podman.by_conf("inspect", "--format", "{{.State.Status}} {{.OCIRuntime}}",
                              cid))
    assert state.split() == ["running", "hull"]
    ok(podman.by_conf("rm", "-f", cid))
    assert podman.containers() == []
    assert not (DEFAULT_ROOT / cid).exists()


#: The host port Podman publishes (on loopback only).
PUBLISHED_PORT = 18080


def test_podman_bridge_network_publishes_a_port(podman: Podman) -> None:
    """`--network bridge -p`: Podman's CNI bridge gives the container's namespace a
    veth, which Hull mirrors into the VM; the published port on the host's loopback
    (portmap's DNAT, conmon holding the port) reaches busybox httpd in the guest."""
    with bridge_network(podman) as net:
        serve = "echo hello-from-hull > /tmp/index.html && exec httpd -f -p 80 -h /tmp"
        cid = ok(net.podman("run", "-d", "--network", "bridge",
                            "-p", f"127.0.0.1:{PUBLISHED_PORT}:80", IMAGE,
                            "sh", "-c", serve)).strip()
        try:
            address = ok(net.podman("inspect", "--format",
                                    "{{.NetworkSettings.IPAddress}}", cid)).strip()
            assert ipaddress.ip_address(address) in ipaddress.ip_network(net.subnet)
            body = http_get("127.0.0.1", PUBLISHED_PORT, "/index.html", timeout=90)
            assert body == b"hello-from-hull\n"
            netns = ok(net.podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}",
                                  cid)).strip()
            assert os.path.exists(netns), netns
        finally:
            ok(net.podman("rm", "-f", "-t", "0", cid))
        assert not os.path.exists(netns), f"podman left the namespace {netns}"
        assert not os.listdir(f"/sys/class/net/{net.bridge}/brif"), "a veth is left"
    assert podman.containers() == []
    assert not os.path.exists(f"/sys/class/net/{net.bridge}")


# ---------------------------------------------------------------------- containerd


@pytest.fixture
def rootfs(tmp_path: Path, rootfs_template: Path) -> Path:
    """A private copy of the busybox rootfs (ctr --rootfs uses the directory itself)."""
    path = tmp_path / "rootfs"
    shutil.copytree(rootfs_template, path, symlinks=True)
    return path


def ctr_run(ctd: Containerd, rootfs: Path, cid: str, *args: str,
            flags: tuple[str, ...] = ()) -> list[str]:
    return ["run", *ctd.runtime_flags, *flags, "--rootfs", str(rootfs), cid, *args]


def test_ctr_run_exit_code_env_cwd(containerd: Containerd, rootfs: Path) -> None:
    done = containerd.ctr(*ctr_run(containerd, rootfs, "envcwd", "sh", "-c",
                                   'echo "$GREETING|$(pwd)"; echo to-err >&2; exit 7',
                                   flags=("--rm", "--env", "GREETING=hi there",
                                          "--cwd", "/work")))
    assert done.returncode == 7, done.stderr
    assert done.stdout == "hi there|/work\n"
    assert "to-err" in done.stderr
    assert containerd.tasks() == {}
    assert hull_states(containerd.hull_root) == []


def test_ctr_run_error_comes_from_hulls_json_log(containerd: Containerd,
                                                 rootfs: Path) -> None:
    """The shim reads the last {"level":"error","msg":...} line of `--log`."""
    done = containerd.ctr(*ctr_run(containerd, rootfs, "nocmd", "/no/such/command",
                                   flags=("--rm",)))
    assert done.returncode != 0
    assert re.search(r"OCI runtime create failed: .*/no/such/command", done.stderr), \
        done.stderr
    assert hull_states(containerd.hull_root) == []


def test_ctr_readonly_bind_mount(containerd: Containerd, rootfs: Path,
                                 tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_text("from the host\n")
    done = containerd.ctr(*ctr_run(
        containerd, rootfs, "bindro", "sh", "-c",
        "cat /mnt/file; touch /mnt/new 2>/dev/null && echo wrote || echo refused",
        flags=("--rm", "--mount", f"type=bind,src={host},dst=/mnt,options=rbind:ro")))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the host\nrefused\n"
    assert not (host / "new").exists()


def test_ctr_run_tty(containerd: Containerd, rootfs: Path) -> None:
    result = containerd.ctr_pty(*ctr_run(containerd, rootfs, "tty", "sh", "-c", TTY_DIALOG,
                                         flags=("--rm", "--tty")), dialog=DIALOG)
    assert result.returncode == 4, result.text
    check_tty_dialog(result.text)
    assert containerd.tasks() == {}


#: Counts on stdout (a detached task's goes to its --log-uri file) and exits 9 on TERM.
TICKER = ("trap 'echo got-term; exit 9' TERM; i=0; "
          "while true; do i=$((i+1)); echo tick $i; sleep 0.1; done")


def ticks(log: Path) -> int:
    """The last count the container wrote (the shim writes its stdout to ``log``)."""
    counts = re.findall(r"^tick (\d+)$", log.read_text() if log.exists() else "", re.M)
    return int(counts[-1]) if counts else 0


def task_pids(containerd: Containerd, cid: str) -> list[int]:
    rows = ok(containerd.ctr("task", "ps", cid)).splitlines()[1:]
    return [int(row.split()[0]) for row in rows if row.strip()]


def test_ctr_detached_exec_ps_pause_resume_kill_delete(containerd: Containerd,
                                                       rootfs: Path, tmp_path: Path) -> None:
    ctr, cid, log = containerd.ctr, "detached", tmp_path / "stdout.log"
    ok(ctr(*ctr_run(containerd, rootfs, cid, "sh", "-c", TICKER,
                    flags=("--detach", "--log-uri", f"file://{log}"))))
    try:
        pid, status = containerd.tasks()[cid]
        assert status == "RUNNING"
        assert "shim" in Path(f"/proc/{pid}/cmdline").read_text()  # Hull's relay
        state = json.loads(ok(run([*HULL, "--root", str(containerd.hull_root), "state",
                                   cid])))
        assert (state["status"], state["pid"]) == ("running", pid)
        wait_for(lambda: ticks(log) > 0, "the container to tick")

        # exec without a terminal: its output and exit code
        done = ctr("task", "exec", "--exec-id", "plain", cid,
                   "sh", "-c", "echo in-exec; echo to-err >&2; exit 3")
        assert (done.returncode, done.stdout) == (3, "in-exec\n"), done.stderr
        assert "to-err" in done.stderr
        # exec with one
        result = containerd.ctr_pty("task", "exec", "--tty", "--exec-id", "tty", cid,
                                    "sh", "-c", "tty; echo READY; read x; echo got:$x; "
                                    "exit 6", dialog=DIALOG[:1])
        assert result.returncode == 6, result.text
        assert "/dev/pts/" in result.text and "got:hello-input" in result.text

        # ps: one host pid per process (the relays of the init and of a running exec)
        sleeper = subprocess.Popen(
            containerd.ctr_argv("task", "exec", "--exec-id", "sleeper", cid, "sleep", "600"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(task_pids(containerd, cid)) == 2, "the exec in `ctr task ps`")
            assert pid in task_pids(containerd, cid)
            # The shim signals an exec's pid itself: Hull's relay forwards the signal, and
            # exits as the process did.
            ok(ctr("task", "kill", "--exec-id", "sleeper", "--signal", "SIGTERM", cid))
            assert sleeper.wait(30) == 128 + signal.SIGTERM
        finally:
            if sleeper.poll() is None:
                sleeper.kill()
                sleeper.wait()
        wait_for(lambda: task_pids(containerd, cid) == [pid], "the exec to leave `task ps`")

        ok(ctr("task", "pause", cid))
        assert containerd.tasks()[cid][1] == "PAUSED"
        time.sleep(0.5)  # output already on its way out of the VM may still land
        frozen = ticks(log)
        time.sleep(1.5)
        assert ticks(log) == frozen, "a paused container kept running"
        ok(ctr("task", "resume", cid))
        assert containerd.tasks()[cid][1] == "RUNNING"
        wait_for(lambda: ticks(log) > frozen, "the resumed container to tick")

        ok(ctr("task", "kill", cid))  # SIGTERM: the trap exits 9
        wait_for(lambda: containerd.tasks()[cid][1] == "STOPPED", "the task to stop")
        assert log.read_text().endswith("got-term\n")
        done = ctr("task", "delete", cid)
        assert done.returncode == 0, done.stderr
        assert "exit code 9" in done.stderr
    finally:
        ctr("task", "kill", "--signal", "SIGKILL", cid)
        ctr("task", "delete", "--force", cid)
        ctr("container", "rm", cid)
    assert containerd.tasks() == {}
    assert hull_states(containerd.hull_root) == []


# ---------------------------------------------------------------------- Docker


def test_docker_run_rm_echo(docker: Docker) -> None:
    done = docker("run", "--runtime", "hull", "--network", "none", "--rm", IMAGE,
                  "echo", "hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi\n"
    done = docker("run", "--runtime", "hull", "--network", "none", "--rm", IMAGE,
                  "sh", "-c", "exit 5")
    assert done.returncode == 5, done.stderr
    assert docker("ps", "-aq").stdout.split() == []
    assert hull_states(docker.hull_root) == []
