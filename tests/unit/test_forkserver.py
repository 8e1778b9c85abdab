"""The pool's fork server for proxies (hull.runtime.forkserver), with a fake proxy main:
what a forked proxy gets (argv, ready fd, stderr, cwd, env, umask), reaping, refusals,
the server's own descriptors, and its death with the daemon that started it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hull.runtime import forkserver

# The "daemon": starts the server with a fake proxy main, prints the server's pid, and
# lives until its stdin closes (it holds a lock-like fd the server must not keep).
DAEMON = """
import os, sys, time
from pathlib import Path
from hull.runtime import forkserver

def fake_proxy(argv):
    ready = int(argv[argv.index("--ready-fd") + 1])
    sys.stderr.write("proxy stderr\\n")
    sys.stderr.flush()
    os.write(ready, (" ".join(["ok", argv[-1], os.getcwd(), os.environ.get("MARK", "-"),
                               oct(os.umask(0)), str(os.getsid(0) == os.getpid()),
                               str(len(os.environ.get("BIG", ""))),
                               os.environ.get("SERVER_ONLY", "-")])
                     + "\\n").encode())
    os.close(ready)
    if argv[-1] == "linger":
        time.sleep(30)
    return 0

held = os.open(sys.argv[2], os.O_RDONLY)  # as the daemon's lock
pid = forkserver.start(Path(sys.argv[1]), fake_proxy, lambda: None)
print(pid, held, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, int, subprocess.Popen[str]]]:
    path = tmp_path / "fs.sock"
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, str(path), str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "SERVER_ONLY": "1"})
    assert daemon.stdout is not None
    pid, _held = (int(v) for v in daemon.stdout.readline().split())
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    yield path, pid, daemon
    assert daemon.stdin is not None
    daemon.stdin.close()
    daemon.stdout.close()
    daemon.wait(10)
    _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return  # dead; its parent (the test's daemon) reaps it
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive")


def _spawn(path: Path, tmp_path: Path, last: str) -> tuple[int | None, str, Path]:
    read, write = os.pipe()
    log = tmp_path / f"{last}.log"
    with open(log, "ab") as err:
        argv = [sys.executable, "-m", "hull", "proxy", "--ready-fd", "{ready}", last]
        pid = forkserver.spawn(path, argv, write, err.fileno())
    os.close(write)
    with os.fdopen(read) as ready:
        answer = ready.readline().strip() if pid is not None else ""
    return pid, answer, log


def test_a_forked_proxy_gets_the_callers_setting(server: tuple[Path, int, object],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, _ = server
    monkeypatch.setenv("MARK", "from-the-caller")
    monkeypatch.setenv("BIG", "x" * 20000)  # a request far above a pool request's bound
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o027)
    try:
        pid, answer, log = _spawn(path, tmp_path, "c1")
    finally:
        os.umask(old)
    assert pid is not None
    # the caller's environment exactly: its variables, none of the server's own
    assert answer == f"ok c1 {tmp_path} from-the-caller 0o27 True 20000 -"
    assert log.read_text() == "proxy stderr\n"
    _wait_gone(pid)
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists(), "the server reaps its proxies"


def test_the_server_keeps_none_of_the_daemons_descriptors(
        server: tuple[Path, int, object]) -> None:
    _, server_pid, _ = server
    fds = {int(fd) for fd in os.listdir(f"/proc/{server_pid}/fd")}
    targets = {os.readlink(f"/proc/{server_pid}/fd/{fd}") for fd in fds - {0, 1, 2}}
    assert all(t.startswith(("socket:", "pipe:")) for t in targets), targets
    assert len(fds - {0, 1, 2}) == 3  # the listener and the signal wake-up pipe


def test_refusals_leave_the_caller_to_start_its_proxy(server: tuple[Path, int, object],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    path, _, _ = server
    monkeypatch.setattr(forkserver, "code_id", lambda: "another hull")
    assert _spawn(path, tmp_path, "c2")[0] is None
    monkeypatch.undo()
    import socket

    for garbage in (b"not json\n", b'{"argv": 3}\n', b"x" * 5000):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            answer = json.loads(sock.makefile("rb").readline())
            assert "error" in answer
    assert _spawn(path, tmp_path, "c3")[1].startswith("ok c3"), "it serves on"
    assert forkserver.spawn(tmp_path / "none.sock", ["x"], 0, 2) is None
    # Each connection got a child of its own, which answered and exited: all reaped.
    _, server_pid, _ = server
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().strip():
        assert time.monotonic() < deadline, "the server left children behind"
        time.sleep(0.05)


def test_the_server_dies_with_its_daemon_and_proxies_live_on(
        server: tuple[Path, int, subprocess.Popen[str]], tmp_path: Path) -> None:
    path, server_pid, daemon = server
    pid, answer, _ = _spawn(path, tmp_path, "linger")
    assert pid is not None and answer.startswith("ok linger")
    daemon.kill()
    daemon.wait(10)
    _wait_gone(server_pid)
    try:
        assert Path(f"/proc/{pid}").exists(), "a proxy outlives the server"
    finally:
        os.kill(pid, 9)
