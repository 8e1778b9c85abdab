"""The guest agent, run on the host in test mode, driven through its channel like the host.

Needs root (namespaces, mounts, pivot_root) and busybox-static; see tests/agent_harness.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hull
from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from tests.agent_harness import Agent, AgentDied, make_rootfs, process, running_agent, spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent needs root")

BIG = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def share_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shares = tmp_path_factory.mktemp("shares")
    root = make_rootfs(shares / "rootfs")
    (root / "data.bin").write_bytes(os.urandom(BIG))
    return shares


def _start_agent(tmp_path: Path, share_dir: Path, *, no_pivot: bool = False
                 ) -> Iterator[Agent]:
    with running_agent(tmp_path, share_dir, no_pivot=no_pivot) as agent:
        yield agent


@pytest.fixture
def agent(tmp_path: Path, share_dir: Path) -> Iterator[Agent]:
    yield from _start_agent(tmp_path, share_dir)


def run(agent: Agent, cid: str, args: list[str], **kw: object) -> schema.ProcessExit:
    agent.run(cid, spec(args, **kw), {"stdout": 1, "stderr": 2})  # type: ignore[arg-type]
    return agent.wait_exit(cid)


# ---------------------------------------------------------------------------- handshake


def test_hello_reports_versions(tmp_path: Path, share_dir: Path) -> None:
    agent = Agent(tmp_path, share_dir)
    try:
        early = agent.call("create_container", {"container_id": "x"})
        assert early.error_kind == schema.ErrorKind.INVALID
        assert "hello" in early.error_message
        reply = schema.HelloReply.from_json(agent.hello())
        assert reply.version == schema.PROTOCOL_VERSION
        assert reply.agent_version == hull.__version__
        assert reply.kernel_release == os.uname().release
        bad = agent.call("hello", {"version": 1, "entropy": "zz", "time_ns": 1})
        assert bad.error_kind == schema.ErrorKind.INVALID
    finally:
        assert agent.stop() == 0


# ---------------------------------------------------------------------------- basics


def test_echo_output_exit_and_stream_separation(agent: Agent) -> None:
    pid = agent.run("c1", spec(["sh", "-c", "echo hi; echo oops >&2"]),
                    {"stdout": 1, "stderr": 2})
    assert pid > 1
    event = agent.wait_exit("c1")
    assert (event.status, event.signal) == (0, None)
    assert agent.output(1) == b"hi\n"
    assert agent.output(2) == b"oops\n"
    assert agent.closed >= {1, 2}
    assert agent.ok("delete_container", {"container_id": "c1"}) == {}
    gone = agent.call("start_container", {"container_id": "c1"})
    assert gone.error_kind == schema.ErrorKind.NOT_FOUND
    assert "c1" in gone.error_message


@pytest.mark.parametrize("code", [1, 42])
def test_exit_codes(agent: Agent, code: int) -> None:
    event = run(agent, "c", ["sh", "-c", f"exit {code}"])
    assert (event.status, event.signal) == (code, None)


def test_killed_by_signal(agent: Agent) -> None:
    agent.run("c", spec(["sleep", "100"]), {"stdout": 1, "stderr": 2})
    running = agent.call("delete_container", {"container_id": "c"})
    assert running.error_kind == schema.ErrorKind.STATE
    agent.ok("signal_process", {"container_id": "c", "signal": int(signal.SIGKILL)})
    event = agent.wait_exit("c")
    assert (event.status, event.signal) == (137, 9)
    again = agent.call("signal_process", {"container_id": "c", "signal": 9})
    assert again.error_kind == schema.ErrorKind.STATE


def test_signal_all_reaches_every_process(agent: Agent) -> None:
    # The init (sh, PID 1 of its namespace) ignores SIGTERM; its child sleep does not.
    agent.run("c", spec(["sh", "-c", "sleep 100; echo child-died-$?"]),
              {"stdout": 1, "stderr": 2})
    time.sleep(0.3)
    agent.ok("signal_process", {"container_id": "c", "signal": int(signal.SIGTERM),
                                "all": True})
    event = agent.wait_exit("c")
    assert event.status == 0
    assert agent.output(1) == b"child-died-143\n"


def test_env_cwd_user(agent: Agent) -> None:
    script = 'echo "$FOO"; pwd; id -u; id -g; id -G; umask'
    event = run(agent, "c", ["sh", "-c", script], env=["PATH=/bin", "FOO=bar baz"],
                cwd="/home/user", uid=1000, gid=1000, additional_gids=[5, 6])
    assert event.status == 0, agent.output(2)
    lines = agent.output(1).decode().splitlines()
    assert lines[0] == "bar baz"
    assert lines[1] == "/home/user"
    assert lines[2:4] == ["1000", "1000"]
    assert sorted(lines[4].split()) == ["1000", "5", "6"]
    assert lines[5] == "0022"


def test_hostname_and_own_namespaces(agent: Agent) -> None:
    event = run(agent, "c", ["sh", "-c", "hostname; echo $$; ls /proc | grep -c '^[0-9]'"],
                hostname="inside")
    assert event.status == 0, agent.output(2)
    name, pid, count = agent.output(1).decode().split()
    assert name == "inside"
    assert pid == "1"  # PID 1 of a new pid namespace
    assert int(count) <= 3  # sh, ls, grep: nothing of the host


def test_readonly_root(agent: Agent) -> None:
    event = run(agent, "c", ["sh", "-c", "touch /x && echo wrote; touch /dev/shm/y && echo ok"],
                readonly=True)
    assert b"wrote" not in agent.output(1)
    assert b"ok" in agent.output(1)
    assert b"Read-only file system" in agent.output(2)
    assert event.status == 0


def test_readonly_share(agent: Agent, share_dir: Path) -> None:
    response = agent.create("c", spec(["touch", "/y"]), {"stdout": 1, "stderr": 2},
                            readonly_share=True)
    assert response.error_kind is None, response.error_message
    agent.ok("start_container", {"container_id": "c"})
    assert agent.wait_exit("c").status == 1
    assert not (share_dir / "rootfs" / "y").exists()


def test_masked_and_readonly_paths(agent: Agent) -> None:
    event = run(agent, "c", ["sh", "-c", "cat /proc/keys | wc -c; "
                             "echo 1 > /proc/sys/kernel/domainname || echo denied"])
    assert event.status == 0
    assert agent.output(1).split() == [b"0", b"denied"]


def test_rootfs_view_has_no_guest_mounts(agent: Agent, share_dir: Path) -> None:
    run(agent, "c", ["cat", "/proc/self/mountinfo"])
    mountpoints = {line.split()[4] for line in agent.output(1).decode().splitlines()}
    assert "/" in mountpoints and "/proc" in mountpoints and "/dev/pts" in mountpoints
    assert not any(m.startswith(("/run/", "/tmp/", "/home/")) for m in mountpoints), mountpoints


def test_dev_nodes(agent: Agent) -> None:
    event = run(agent, "c", ["sh", "-c", "echo x > /dev/null && head -c 4 /dev/zero | wc -c; "
                             "readlink /dev/ptmx; readlink /dev/fd; ls /dev/urandom /dev/tty"])
    assert event.status == 0, agent.output(2)
    assert agent.output(1).decode().split() == ["4", "pts/ptmx", "/proc/self/fd",
                                                "/dev/tty", "/dev/urandom"]


def test_no_pivot_fallback(tmp_path: Path, share_dir: Path) -> None:
    """The MS_MOVE + chroot path the guest's initramfs root needs."""
    for agent in _start_agent(tmp_path, share_dir, no_pivot=True):
        event = run(agent, "c", ["sh", "-c", "hostname; cat /proc/self/mountinfo"])
        assert event.status == 0, agent.output(2)
        lines = agent.output(1).decode().splitlines()
        assert lines[0] == "box"
        mountpoints = {line.split()[4] for line in lines[1:]}
        assert "/" in mountpoints and "/dev/pts" in mountpoints
        assert not any(m.startswith(("/run/", "/tmp/")) for m in mountpoints), mountpoints


# ---------------------------------------------------------------------------- errors


def test_missing_executable_fails_create(agent: Agent) -> None:
    response = agent.create("c", spec(["no-such-program"]), {"stdout": 1, "stderr": 2})
    assert response.error_kind == schema.ErrorKind.FAILED
    assert "c" in response.error_message
    assert "no-such-program" in response.error_message
    assert "not found" in response.error_message
    assert "\n" not in response.error_message
    assert agent.call("start_container", {"container_id": "c"}).error_kind == \
        schema.ErrorKind.NOT_FOUND
    # The id and the streams are free again.
    agent.run("c", spec(["true"]), {"stdout": 1, "stderr": 2})
    assert agent.wait_exit("c").status == 0


def test_missing_absolute_executable_and_bad_cwd(agent: Agent) -> None:
    response = agent.create("a", spec(["/bin/nope"]), {})
    assert response.error_kind == schema.ErrorKind.FAILED
    assert "/bin/nope" in response.error_message
    response = agent.create("b", spec(["true"], cwd="/data.bin"), {})
    assert response.error_kind == schema.ErrorKind.FAILED
    assert "cwd" in response.error_message


def test_request_errors(agent: Agent) -> None:
    params = {"container_id": "c", "spec": spec(["true"]), "rootfs": {"tag": "rootfs"}}
    bad_spec = agent.call("create_container", {**params, "spec": {"process": {"args": []}}})
    assert bad_spec.error_kind == schema.ErrorKind.INVALID
    assert "args" in bad_spec.error_message
    bad_id = agent.call("create_container", {**params, "container_id": "../x"})
    assert bad_id.error_kind == schema.ErrorKind.INVALID
    bad_tag = agent.call("create_container", {**params, "rootfs": {"tag": "nope"}})
    assert bad_tag.error_kind == schema.ErrorKind.FAILED
    assert "nope" in bad_tag.error_message
    agent.ok("create_container", params)
    dup = agent.call("create_container", params)
    assert dup.error_kind == schema.ErrorKind.EXISTS
    agent.ok("start_container", {"container_id": "c"})
    twice = agent.call("start_container", {"container_id": "c"})
    assert twice.error_kind == schema.ErrorKind.STATE
    agent.wait_exit("c")
    assert agent.call("signal_process", {"container_id": "zz", "signal": 9}).error_kind == \
        schema.ErrorKind.NOT_FOUND
    unknown = agent.call("signal_process", {"container_id": "c", "exec_id": "e", "signal": 9})
    assert unknown.error_kind == schema.ErrorKind.NOT_FOUND


def test_delete_created_container(agent: Agent) -> None:
    response = agent.create("c", spec(["sh", "-c", "echo started"]), {"stdout": 1})
    assert response.error_kind is None
    assert agent.ok("delete_container", {"container_id": "c"}) == {}
    assert agent.call("start_container", {"container_id": "c"}).error_kind == \
        schema.ErrorKind.NOT_FOUND
    agent.pump(0.3)
    assert agent.output(1) == b""
    assert not agent.events


def test_protocol_violation_ends_the_session(tmp_path: Path, share_dir: Path) -> None:
    agent = Agent(tmp_path, share_dir)
    agent.hello()
    agent.send(Frame(Kind.DATA, 77, b"not a stream"))
    with pytest.raises(AgentDied):
        agent.wait_for(lambda: False, 10, "the agent to drop the channel")
    assert agent.stop() == 1


# ---------------------------------------------------------------------------- streams


def test_stdin_round_trip_and_close(agent: Agent) -> None:
    agent.run("c", spec(["cat"]), {"stdin": 3, "stdout": 1, "stderr": 2})
    payload = os.urandom(1024 * 1024 + 17)  # several windows: needs the agent's credits
    agent.stdin(3, payload, close=True)
    event = agent.wait_exit("c", timeout=30)
    assert event.status == 0
    assert agent.output(1) == payload


def test_stdin_closed_without_data(agent: Agent) -> None:
    agent.run("c", spec(["sh", "-c", "cat; echo eof"]), {"stdin": 3, "stdout": 1})
    agent.stdin(3, b"", close=True)
    assert agent.wait_exit("c").status == 0
    assert agent.output(1) == b"eof\n"


def test_ten_megabytes_byte_exact(agent: Agent, share_dir: Path) -> None:
    expected = hashlib.sha256((share_dir / "rootfs" / "data.bin").read_bytes()).digest()
    agent.run("c", spec(["cat", "/data.bin"]), {"stdout": 1, "stderr": 2})
    event = agent.wait_exit("c", timeout=60)
    assert event.status == 0, agent.output(2)
    assert len(agent.output(1)) == BIG
    assert hashlib.sha256(agent.output(1)).digest() == expected


def test_output_waits_for_credit(agent: Agent) -> None:
    agent.auto_credit = False
    agent.run("c", spec(["head", "-c", str(3 * framing.INITIAL_WINDOW), "/dev/zero"]),
              {"stdout": 1})
    agent.wait_for(lambda: len(agent.output(1)) >= framing.INITIAL_WINDOW, 10, "a full window")
    while agent.pump(0.5):
        pass
    assert len(agent.output(1)) == framing.INITIAL_WINDOW  # and not a byte more
    assert not agent.events  # head is blocked on its pipe
    agent.auto_credit = True
    agent.grant(1, agent.outstanding(1))
    assert agent.wait_exit("c").status == 0
    assert agent.output(1) == bytes(3 * framing.INITIAL_WINDOW)


def test_exec_exit_does_not_wait_for_daemonized_grandchild(agent: Agent) -> None:
    agent.run("c", spec(["sleep", "100"]), {})
    response = agent.exec("c", "e", process(["sh", "-c", "sleep 30 & echo bg"]), {"stdout": 1})
    assert response.error_kind is None, response.error_message
    started = time.monotonic()
    event = agent.wait_exit("c", "e")
    assert time.monotonic() - started < 5
    assert event.status == 0
    assert agent.output(1) == b"bg\n"
    agent.ok("signal_process", {"container_id": "c", "signal": 9})
    agent.wait_exit("c")


# ---------------------------------------------------------------------------- exec


def test_exec_into_running_container(agent: Agent) -> None:
    agent.run("c", spec(["sleep", "100"], hostname="ctr"), {"stdout": 1, "stderr": 2})
    response = agent.exec("c", "e1", process(
        ["sh", "-c", "hostname; cat /proc/1/comm; id -u; pwd; exit 3"], uid=1000, gid=1000,
        cwd="/tmp"), {"stdout": 11, "stderr": 12})
    assert response.error_kind is None, response.error_message
    assert response.result is not None and response.result["pid"] > 1
    event = agent.wait_exit("c", "e1")
    assert event.status == 3
    assert agent.output(11).decode().split() == ["ctr", "sleep", "1000", "/tmp"]
    dup_ok = agent.exec("c", "e1", process(["true"]), {})  # finished: the id may be reused
    assert dup_ok.error_kind is None
    agent.wait_exit("c", "e1")
    missing = agent.exec("c", "e2", process(["nope"]), {"stdout": 13})
    assert missing.error_kind == schema.ErrorKind.FAILED
    assert "nope" in missing.error_message
    # A path is left to execve (no stat of its own): the same errors, the id stays free.
    for path, error in (("/bin/nope", "no such file or directory"),
                        ("/tmp", "permission denied")):
        failed = agent.exec("c", "e2", process([path]), {"stdout": 14})
        assert failed.error_kind == schema.ErrorKind.FAILED, failed
        assert failed.error_message.endswith(f'exec: "{path}": {error}'), failed
    agent.ok("signal_process", {"container_id": "c", "signal": 9})
    assert agent.wait_exit("c").status == 137
    stopped = agent.exec("c", "e3", process(["true"]), {})
    assert stopped.error_kind == schema.ErrorKind.STATE
    agent.ok("delete_container", {"container_id": "c"})


def test_exec_signal_and_stdin(agent: Agent) -> None:
    agent.run("c", spec(["sleep", "100"]), {})
    response = agent.exec("c", "cat", process(["cat"]), {"stdin": 21, "stdout": 22})
    assert response.error_kind is None, response.error_message
    agent.stdin(21, b"ping\n")
    agent.wait_for(lambda: agent.output(22) == b"ping\n", 10, "the echo")
    agent.ok("signal_process", {"container_id": "c", "exec_id": "cat", "signal": 15})
    event = agent.wait_exit("c", "cat")
    assert (event.status, event.signal) == (143, 15)
    agent.ok("signal_process", {"container_id": "c", "signal": 9})
    agent.wait_exit("c")


# ---------------------------------------------------------------------------- terminal


def test_terminal(agent: Agent) -> None:
    config = spec(["sh", "-c", "tty; stty size; read line; echo got:$line"], terminal=True,
                  console_size=(24, 80))
    agent.run("c", config, {"stdin": 3, "stdout": 1})
    agent.wait_for(lambda: b"24 80" in agent.output(1), 10, "stty's output")
    agent.stdin(3, b"hello\n")
    event = agent.wait_exit("c")
    assert event.status == 0
    out = agent.output(1).decode()
    assert out.startswith("/dev/pts/0\r\n"), out
    assert "24 80\r\n" in out
    assert "got:hello\r\n" in out


def test_exec_terminal_and_resize(agent: Agent) -> None:
    agent.run("c", spec(["sleep", "100"]), {})
    response = agent.exec("c", "t", process(["sh", "-c", "read x; stty size; tty"],
                                            terminal=True), {"stdin": 5, "stdout": 6})
    assert response.error_kind is None, response.error_message
    agent.ok("resize_pty", {"container_id": "c", "exec_id": "t", "rows": 50, "cols": 132})
    no_tty = agent.call("resize_pty", {"container_id": "c", "rows": 1, "cols": 1})
    assert no_tty.error_kind == schema.ErrorKind.STATE
    agent.stdin(5, b"go\n")
    assert agent.wait_exit("c", "t").status == 0
    lines = agent.output(6).decode().split("\r\n")
    assert "50 132" in lines
    assert any(line.startswith("/dev/pts/") for line in lines)
    agent.ok("signal_process", {"container_id": "c", "signal": 9})
    agent.wait_exit("c")


# ---------------------------------------------------------------------------- shutdown


def test_shutdown_kills_containers(tmp_path: Path, share_dir: Path) -> None:
    agent = Agent(tmp_path, share_dir)
    agent.hello()
    agent.run("c", spec(["sleep", "100"]), {"stdout": 1})
    assert agent.ok("shutdown", {}) == {}
    assert agent.proc.wait(timeout=10) == 0
    agent.stop()
