"""Conformance of Hull's runc-compatible CLI: every verb and flag, the runtime-spec state
transitions and their errors, logs, console socket, hooks — against real VMs."""

from __future__ import annotations

import array
import json
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import Cli, become_subreaper, cleanup, reap, reap_all
from tests.integration.conftest import HULL, BundleFactory

LOOP = ["sh", "-c", "echo started; trap 'echo got-term; exit 3' TERM; "
        "while true; do sleep 0.1; done"]


@pytest.fixture
def cli(state_root: Path, tmp_path: Path, guest_assets_ready: None) -> Iterator[Cli]:
    become_subreaper()
    yield Cli(state_root, tmp_path)
    reap_all()


def one_line(done: object, code: int = 1) -> str:
    assert done.returncode == code, (done.stdout, done.stderr)  # type: ignore[attr-defined]
    lines = done.stderr.decode().strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, lines
    return lines[0]


def test_lifecycle_and_transitions(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(LOOP)
    with cleanup(cli, "life"):
        done, out, _ = cli.create("life", b, "--pid-file", str(cli.work / "pid"))
        assert done.returncode == 0, (cli.work / "life.err").read_text()
        pid = int((cli.work / "pid").read_text())
        state = cli.state("life")
        assert state["status"] == "created" and state["pid"] == pid
        assert state["bundle"] == str(b) and state["rootfs"] == str(b / "rootfs")
        assert state["ociVersion"] and state["created"] and state["owner"] == "root"
        assert os.path.exists(f"/proc/{pid}")
        assert cli("start", "life").returncode == 0
        assert cli.state("life")["status"] == "running"
        assert "already running" in one_line(cli("start", "life"))
        assert "not stopped: running" in one_line(cli("delete", "life"))
        assert json.loads(cli("ps", "--format", "json", "life").stdout) == [pid]
        listing = json.loads(cli("list", "--format", "json").stdout)
        assert [c["id"] for c in listing] == ["life"]
        assert cli("list", "-q").stdout == b"life\n"
        assert cli("kill", "life", "15").returncode == 0
        assert reap(pid) == 3
        state = cli.wait_status("life", "stopped")
        assert state["status"] == "stopped" and state["pid"] == 0
        assert out.read_text() == "started\ngot-term\n"
        assert "container not running" in one_line(cli("kill", "life", "KILL"))
        assert "has stopped" in one_line(cli("start", "life"))
        assert cli("delete", "life").returncode == 0
        assert "does not exist" in one_line(cli("state", "life"))
        assert not (cli.root / "life").exists()


def test_delete_of_created_and_force_of_running(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(LOOP)
    with cleanup(cli, "c1"):
        assert cli.create("c1", b)[0].returncode == 0
        pid = cli.state("c1")["pid"]
        assert cli("delete", "c1").returncode == 0  # runtime-spec: created may be deleted
        assert reap(pid) is not None
        assert cli.create("c1", b)[0].returncode == 0
        assert cli("start", "c1").returncode == 0
        assert cli("delete", "--force", "c1").returncode == 0
        assert not (cli.root / "c1").exists()
    assert cli("delete", "--force", "never-existed").returncode == 0
    assert "does not exist" in one_line(cli("delete", "never-existed"))


def test_exec_foreground_detached_and_errors(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(LOOP)
    with cleanup(cli, "ex"):
        assert cli.create("ex", b)[0].returncode == 0
        assert "cannot exec in a created container" in one_line(
            cli("exec", "ex", "true"), 255)
        assert cli("start", "ex").returncode == 0
        done = cli("exec", "--env", "X=1", "--cwd", "/tmp", "ex", "sh", "-c",
                   'echo "$X $(pwd)"; echo err >&2; exit 4')
        assert done.returncode == 4
        assert done.stdout == b"1 /tmp\n" and done.stderr == b"err\n"
        done = cli("exec", "--user", "1000:1000", "ex", "id", "-u")
        assert done.stdout == b"1000\n"
        assert cli("exec", "ex", "cat", input=b"round trip").stdout == b"round trip"
        process = {"args": ["sh", "-c", "exit 9"], "cwd": "/", "env": ["PATH=/bin"],
                   "user": {"uid": 0, "gid": 0}}
        (cli.work / "p.json").write_text(json.dumps(process))
        done = cli("exec", "--process", str(cli.work / "p.json"), "ex")
        assert done.returncode == 9
        pid_file = cli.work / "exec.pid"
        # As with create, a detached exec's shim keeps the caller's stdio: use files.
        with open(cli.work / "exec.out", "wb") as o:
            done = subprocess.run([*HULL, "--root", str(cli.root), "exec", "--detach",
                                   "--pid-file", str(pid_file), "ex", "sleep", "30"],
                                  stdin=subprocess.DEVNULL, stdout=o, stderr=o, timeout=60,
                                  check=False)
        assert done.returncode == 0, (cli.work / "exec.out").read_text()
        exec_pid = int(pid_file.read_text())
        assert exec_pid in json.loads(cli("ps", "--format", "json", "ex").stdout)
        os.kill(exec_pid, 9)  # podman stops exec sessions by signalling the pid
        assert reap(exec_pid) == -9
        (cli.work / "bad.json").write_text("{ nope")
        assert "not valid JSON" in one_line(
            cli("exec", "--process", str(cli.work / "bad.json"), "ex"), 255)
        assert "exec needs a command" in one_line(cli("exec", "ex"), 255)
        assert "does not exist" in one_line(cli("exec", "nope", "true"), 255)


def recv_master(server: socket.socket, got: dict[str, object]) -> None:
    conn, _ = server.accept()
    fds = array.array("i")
    msg, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    got["name"], got["fds"] = msg.decode(), list(fds)
    conn.close()


def test_console_socket(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(["sh", "-c", "tty; stty size; read line; echo got:$line"], terminal=True)
    path = str(cli.work / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    got: dict[str, object] = {}
    thread = threading.Thread(target=recv_master, args=(server, got))
    thread.start()
    with cleanup(cli, "tty"):
        done, _, err = cli.create("tty", b, "--console-socket", path)
        thread.join(10)
        assert done.returncode == 0, err.read_text()
        fds = got["fds"]
        assert isinstance(fds, list) and len(fds) == 1
        master = fds[0]
        assert str(got["name"]).startswith("/dev/pts/")
        assert stat.S_ISCHR(os.fstat(master).st_mode)
        assert cli("start", "tty").returncode == 0
        os.write(master, b"hello\n")
        output = b""
        while b"got:hello" not in output:
            chunk = os.read(master, 4096)
            if not chunk:
                break
            output += chunk
        assert b"/dev/pts/0" in output and b"got:hello" in output
        os.close(master)
    server.close()


def test_terminal_rules(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(["true"], terminal=True)
    assert "cannot allocate tty" in one_line(cli("create", "--bundle", str(b), "t"))
    b = bundle(["true"])
    assert "console socket" in one_line(cli("create", "--bundle", str(b), "--console-socket",
                                            str(cli.work / "nope.sock"), "t"))
    assert not (cli.root / "t").exists()


def test_hooks_run_in_order_host_ones_on_the_host_guest_ones_in_the_guest(
        cli: Cli, bundle: BundleFactory, tmp_path: Path) -> None:
    shared = tmp_path / "bundle" / "rootfs" / "hooks.log"  # the guest's /hooks.log
    host_hook = tmp_path / "hook.sh"
    host_hook.write_text(f"#!/bin/sh\necho \"$1 host $(uname -r) $(cat)\" >> {shared}\n")
    host_hook.chmod(0o755)
    # Paths in the container: the guest has no such hook, the rootfs's busybox has.
    guest_hook = "echo \"$0 guest $(uname -r) $(hostname) $(cat)\" >> /hooks.log; sync"

    def hooks(spec: dict[str, object]) -> None:
        spec["hooks"] = {
            kind: [{"path": str(host_hook), "args": ["hook.sh", kind]}]
            for kind in ("prestart", "createRuntime", "poststart", "poststop")} | {
            kind: [{"path": "/bin/sh", "args": ["sh", "-c", guest_hook, kind], "timeout": 30}]
            for kind in ("createContainer", "startContainer")}

    b = bundle(["cat", "/hooks.log"], mutate=hooks)
    with cleanup(cli, "hk"):
        done, out, _ = cli.create("hk", b, "--pid-file", str(cli.work / "pid"))
        assert done.returncode == 0, (cli.work / "hk.err").read_text()
        assert [line.split()[0] for line in shared.read_text().splitlines()] == [
            "prestart", "createRuntime", "createContainer"]
        assert cli("start", "hk").returncode == 0
        cli.wait_status("hk", "stopped")
        assert cli("delete", "hk").returncode == 0
    lines = [line.split(" ", 3) for line in shared.read_text().splitlines()]
    assert [line[:2] for line in lines] == [
        ["prestart", "host"], ["createRuntime", "host"], ["createContainer", "guest"],
        ["startContainer", "guest"], ["poststart", "host"], ["poststop", "host"]]
    # The guest's kernel (not the host's) and the container's uts namespace.
    guest_release = lines[2][2]
    assert guest_release != os.uname().release and lines[3][2] == guest_release
    states = {line[0]: json.loads(line[3].split(" ", 1)[1] if line[1] == "guest" else line[3])
              for line in lines}
    assert all(line[3].startswith("hulltest ") for line in lines if line[1] == "guest")
    pid = int((cli.work / "pid").read_text())
    assert states["prestart"]["status"] == "creating" and states["prestart"]["pid"] == pid
    assert states["createRuntime"]["id"] == "hk"
    # In the guest: the init's pid in its own pid namespace, as runc gives it.
    assert states["createContainer"] | {"pid": 0, "status": ""} == \
        states["createRuntime"] | {"pid": 0, "status": ""}
    assert (states["createContainer"]["status"], states["createContainer"]["pid"]) == (
        "creating", 1)
    assert (states["startContainer"]["status"], states["startContainer"]["pid"]) == (
        "created", 1)
    assert states["poststart"]["status"] == "running"
    # The process ran after the startContainer hook (poststart may come before its cat).
    assert [line.split()[0] for line in out.read_text().splitlines()][:4] == [
        "prestart", "createRuntime", "createContainer", "startContainer"]


def test_failing_prestart_hook_fails_create_and_leaves_nothing(cli: Cli,
                                                               bundle: BundleFactory) -> None:
    def hooks(spec: dict[str, object]) -> None:
        spec["hooks"] = {"prestart": [{"path": "/bin/false"}]}

    line = one_line(cli("create", "--bundle", str(bundle(["true"], mutate=hooks)), "hf"))
    assert "prestart hook #0 (/bin/false) failed" in line
    assert not (cli.root / "hf").exists()


def test_failing_guest_hooks_fail_create_and_start(cli: Cli, bundle: BundleFactory) -> None:
    def failing_create(spec: dict[str, object]) -> None:
        spec["hooks"] = {"createContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo 'no gpu here' >&2; exit 4"]}]}

    line = one_line(cli("create", "--bundle", str(bundle(["true"], mutate=failing_create)),
                        "hc"))
    assert line.endswith("container hc: createContainer hook #0 (/bin/sh) failed: "
                         "exit status 4: no gpu here")
    assert not (cli.root / "hc").exists()

    def slow_start(spec: dict[str, object]) -> None:
        spec["hooks"] = {"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "sleep 60"], "timeout": 2}]}

    b = bundle(["touch", "/ran"], mutate=slow_start)
    with cleanup(cli, "hs"):
        assert cli.create("hs", b)[0].returncode == 0
        line = one_line(cli("start", "hs"))
        assert line.endswith("container hs: startContainer hook #0 (/bin/sh) failed: "
                             "timed out after 2s")
        assert cli.wait_status("hs", "stopped")["status"] == "stopped"
        assert cli("delete", "hs").returncode == 0
    assert not (b / "rootfs" / "ran").exists()


def test_json_log_has_the_error_containerd_reads(cli: Cli, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    done = cli("kill", "nope", "9", extra=("--log", str(log), "--log-format", "json"))
    assert done.returncode == 1
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and last["msg"] == "container nope does not exist"


def test_pause_resume(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(LOOP)
    with cleanup(cli, "pz"):
        assert cli.create("pz", b)[0].returncode == 0
        assert "is not running" in one_line(cli("pause", "pz"))
        assert cli("start", "pz").returncode == 0
        assert cli("pause", "pz").returncode == 0
        assert cli.state("pz")["status"] == "paused"
        assert "is not paused" not in cli("resume", "pz").stderr.decode()
        assert cli.state("pz")["status"] == "running"
        assert cli("exec", "pz", "true").returncode == 0


@pytest.mark.parametrize("argv, text", [
    (["bogus"], "invalid choice"),
    (["create"], "required: ID"),
    (["start"], "required: ID"),
    (["kill", "--nope", "x"], "unrecognized arguments"),
    (["kill", "x", "SIGNOPE"], "unknown signal"),
    (["kill", "x", "999"], "unknown signal"),
    (["create", "--bundle", "/nonexistent", "x"], "is not a directory"),
    (["create", "--preserve-fds", "-1", "x"], "must not be negative"),
    (["create", "--bundle", "/", "bad/id"], "invalid container id"),
    (["state", "nope"], "does not exist"),
    (["pause", "nope"], "does not exist"),
    (["ps", "nope"], "does not exist"),
])
def test_bad_usage(cli: Cli, argv: list[str], text: str) -> None:
    assert text in one_line(cli(*argv))
    assert not [p for p in cli.root.glob("*") if p.name != "accel.json"]


def test_spec_features_version(cli: Cli, tmp_path: Path) -> None:
    assert cli("spec", "--bundle", str(tmp_path)).returncode == 0
    spec = json.loads((tmp_path / "config.json").read_text())
    assert spec["process"]["terminal"] is True and spec["root"]["path"] == "rootfs"
    assert "exists" in one_line(cli("spec", "--bundle", str(tmp_path)))
    rootless = tmp_path / "rl"
    rootless.mkdir()
    assert cli("spec", "--rootless", "--bundle", str(rootless)).returncode == 0
    assert {"type": "user"} in json.loads(
        (rootless / "config.json").read_text())["linux"]["namespaces"]
    features = json.loads(cli("features").stdout)
    assert features["ociVersionMin"] and features["ociVersionMax"]
    assert cli("--version").stdout.startswith(b"hull version")
    for verb in ("create", "start", "run", "state", "kill", "delete", "exec", "ps", "list",
                 "pause", "resume", "spec", "features", "check"):
        help_text = cli(verb, "--help")
        assert help_text.returncode == 0 and b"usage: hull " + verb.encode() in help_text.stdout


def test_preserve_fds_is_accepted_with_a_warning(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(["true"])
    with cleanup(cli, "pf"):
        done, _, err = cli.create("pf", b, "--preserve-fds", "2")
        assert done.returncode == 0
        assert "cannot be passed into the VM" in err.read_text()


def test_run_detach(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(LOOP)
    with cleanup(cli, "rd"):
        out, err = cli.work / "rd.out", cli.work / "rd.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            done = subprocess.run([*HULL, "--root", str(cli.root), "run", "--detach",
                                   "--bundle", str(b), "rd"], stdout=o, stderr=e,
                                  stdin=subprocess.DEVNULL, timeout=120, check=False)
        assert done.returncode == 0, err.read_text()
        assert cli.state("rd")["status"] == "running"


def test_state_tells_the_truth_after_the_shim_dies(cli: Cli, bundle: BundleFactory) -> None:
    b = bundle(LOOP)
    with cleanup(cli, "sd"):
        assert cli.create("sd", b)[0].returncode == 0
        assert cli("start", "sd").returncode == 0
        pid = cli.state("sd")["pid"]
        os.kill(pid, 9)
        assert reap(pid) == -9
        state = cli.wait_status("sd", "stopped", timeout=5)
        assert state["status"] == "stopped" and state["pid"] == 0
        assert cli("delete", "sd").returncode == 0
