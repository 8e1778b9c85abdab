"""Run the guest agent on the host (test mode) and talk to it like the host side does.

The agent runs as PID 1 of its own pid namespace (``unshare --pid --fork --kill-child
--mount-proc``), so whatever it starts dies with it, and in its own mount namespace, so
its mounts never reach the host. It serves one end of a socketpair; the other end is a
small synchronous client (frames + JSON) that also checks the agent's side of the
protocol: no DATA beyond the window or after CLOSE, and ``process_exit`` only after the
process's output streams were closed.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "true", "false", "id", "hostname", "pwd", "env", "sleep",
           "ls", "mkdir", "touch", "dd", "head", "wc", "tty", "stty", "test", "sha256sum",
           "grep", "readlink", "kill", "ps")
SHARE_TAG = "rootfs"


class AgentDied(AssertionError):
    pass


def make_rootfs(path: Path) -> Path:
    """A busybox-static rootfs: /bin/busybox, its applet links, the usual mount points."""
    if not Path(BUSYBOX).exists():
        subprocess.run(["apt-get", "install", "-y", "busybox-static"], check=True,
                       capture_output=True)
    (path / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc", "root", "home/user"):
        (path / d).mkdir(parents=True, exist_ok=True)
    (path / "tmp").chmod(0o1777)
    os.chown(path / "home/user", 1000, 1000)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "user:x:1000:1000:user:/home/user:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nuser:x:1000:\n")
    return path


def default_mounts() -> list[dict[str, Any]]:
    """The mounts of `runc spec`."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]


def process(args: list[str], *, terminal: bool = False, cwd: str = "/",
            env: list[str] | None = None, uid: int = 0, gid: int = 0,
            additional_gids: list[int] | None = None,
            console_size: tuple[int, int] | None = None) -> dict[str, Any]:
    proc: dict[str, Any] = {
        "terminal": terminal,
        "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids or []},
        "args": args,
        "env": env if env is not None else ["PATH=/bin", "TERM=xterm"],
        "cwd": cwd,
    }
    if console_size is not None:
        proc["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
    return proc


def spec(args: list[str], *, hostname: str = "box", readonly: bool = False,
         **proc: Any) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": process(args, **proc),
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname,
        "mounts": default_mounts(),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def share_with_rootfs(shares: Path) -> Path:
    """A share directory holding a busybox rootfs (the SHARE_TAG share)."""
    make_rootfs(shares / SHARE_TAG)
    return shares


@contextlib.contextmanager
def running_agent(tmp: Path, share_dir: Path, **options: Any) -> Iterator[Agent]:
    """An Agent after hello; on exit it must stop cleanly (status 0)."""
    agent = Agent(tmp, share_dir, **options)
    try:
        agent.hello()
        yield agent
    finally:
        status = agent.stop()
    assert status == 0, f"agent exited with {status}; log:\n{agent.log()}"


class Agent:
    """The agent in a subprocess and a blocking client on the other end of its channel."""

    def __init__(self, tmp: Path, share_dir: Path, *, no_pivot: bool = False,
                 cgroup_root: Path | None = None) -> None:
        self.sock, guest = socket.socketpair()
        self.log_path = tmp / "agent.log"
        run_dir = tmp / "run"
        run_dir.mkdir(exist_ok=True)
        argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                sys.executable, "-m", "hull.agent.main", "--test", "--fd", str(guest.fileno()),
                "--share-dir", str(share_dir), "--run-dir", str(run_dir)]
        if no_pivot:
            argv.append("--no-pivot")
        if cgroup_root is not None:
            argv += ["--cgroup-root", str(cgroup_root)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, pass_fds=(guest.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        guest.close()
        self.decoder = framing.Decoder()
        self.next_id = 1
        self.responses: dict[int, schema.Response] = {}
        self.events: list[schema.ProcessExit] = []
        self.data: dict[int, bytearray] = {}
        self.closed: set[int] = set()
        self.recv = framing.ReceiveWindow()
        self.send_window = framing.SendWindow()
        self.auto_credit = True
        #: (container, exec id) -> its output streams, to check CLOSE-before-exit
        self.outputs: dict[tuple[str, str], list[int]] = {}

    # ------------------------------------------------------------------ lifecycle

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Close the channel (the agent tears down and exits); kill it if it hangs."""
        try:
            self.sock.close()
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    # ------------------------------------------------------------------ frames

    def send(self, frame: Frame) -> None:
        self.sock.sendall(frame.encode())

    def pump(self, timeout: float) -> bool:
        """Read and handle the frames that arrive within timeout; False on timeout."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise AgentDied(f"the agent closed the channel; log:\n{self.log()}")
        for frame in self.decoder.feed(chunk):
            self._handle(frame)
        return True

    def _handle(self, frame: Frame) -> None:
        if frame.kind == Kind.RESPONSE:
            response = schema.Response.from_json(schema.decode(frame.payload))
            self.responses[response.id] = response
        elif frame.kind == Kind.EVENT:
            obj = schema.decode(frame.payload)
            assert obj.pop("event") == "process_exit", obj
            event = schema.ProcessExit.from_json(obj)
            for stream in self.outputs.get((event.container_id, event.exec_id), []):
                assert stream in self.closed, f"process_exit before CLOSE of stream {stream}"
            self.events.append(event)
        elif frame.kind == Kind.DATA:
            assert frame.stream not in self.closed, f"DATA after CLOSE on {frame.stream}"
            self.recv.received(frame.stream, len(frame.payload))  # raises past the window
            self.data.setdefault(frame.stream, bytearray()).extend(frame.payload)
            if self.auto_credit:
                self.grant(frame.stream, len(frame.payload))
        elif frame.kind == Kind.CLOSE:
            assert frame.stream not in self.closed, f"second CLOSE on {frame.stream}"
            self.closed.add(frame.stream)
        elif frame.kind == Kind.CREDIT:
            self.send_window.grant(frame.stream, framing.credit_value(frame))

    def grant(self, stream: int, count: int) -> None:
        if count and self.recv.consumed(stream, count):
            self.send(framing.credit_frame(stream, count))

    def outstanding(self, stream: int) -> int:
        """Bytes received on stream and not credited back yet."""
        return self.recv._outstanding.get(stream, 0)

    def wait_for(self, predicate: Any, timeout: float = 10.0, what: str = "it") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; log:\n{self.log()}")
            self.pump(left)

    # ------------------------------------------------------------------ control

    def call(self, method: str, params: dict[str, Any], timeout: float = 10.0
             ) -> schema.Response:
        rid = self.next_id
        self.next_id += 1
        self.send(Frame(Kind.REQUEST, 0, schema.encode(
            {"id": rid, "method": method, "params": params})))
        self.wait_for(lambda: rid in self.responses, timeout, f"the reply to {method}")
        return self.responses.pop(rid)

    def ok(self, method: str, params: dict[str, Any], timeout: float = 10.0
           ) -> dict[str, Any]:
        response = self.call(method, params, timeout)
        assert response.error_kind is None, (
            f"{method}: {response.error_kind}: {response.error_message}\nlog:\n{self.log()}")
        assert response.result is not None
        return response.result

    def hello(self) -> dict[str, Any]:
        return self.ok("hello", {"version": schema.PROTOCOL_VERSION, "entropy": "00" * 16,
                                 "time_ns": time.time_ns()})

    def open_streams(self, key: tuple[str, str], stdio: dict[str, int | None],
                     terminal: bool = False) -> None:
        outs = [s for k, s in stdio.items() if k != "stdin" and s is not None]
        self.outputs[key] = outs
        for s in outs:
            self.recv.open(s)
        if stdio.get("stdin") is not None:
            stdin = stdio["stdin"]
            assert stdin is not None
            self.send_window.open(stdin)

    def create(self, cid: str, config: dict[str, Any], stdio: dict[str, int | None],
               *, readonly_share: bool = False) -> schema.Response:
        self.open_streams((cid, ""), stdio)
        return self.call("create_container", {
            "container_id": cid, "spec": config,
            "rootfs": {"tag": SHARE_TAG, "readonly": readonly_share}, "stdio": stdio})

    def run(self, cid: str, config: dict[str, Any], stdio: dict[str, int | None]) -> int:
        """create + start; returns the init's pid."""
        response = self.create(cid, config, stdio)
        assert response.error_kind is None, (
            f"create: {response.error_kind}: {response.error_message}\nlog:\n{self.log()}")
        assert response.result is not None
        pid = schema.ProcessPid.from_json(response.result).pid
        self.ok("start_container", {"container_id": cid})
        return pid

    def exec(self, cid: str, exec_id: str, proc: dict[str, Any],
             stdio: dict[str, int | None]) -> schema.Response:
        self.open_streams((cid, exec_id), stdio)
        return self.call("exec_process", {"container_id": cid, "exec_id": exec_id,
                                          "process": proc, "stdio": stdio})

    def stdin(self, stream: int, data: bytes, *, close: bool = False,
              timeout: float = 30.0) -> None:
        """Send data within the agent's window (waiting for its CREDIT), then CLOSE."""
        view = memoryview(data)
        while view:
            self.wait_for(lambda: self.send_window.available(stream) > 0, timeout,
                          f"credit on stream {stream}")
            n = min(len(view), self.send_window.available(stream), framing.MAX_DATA_CHUNK)
            self.send_window.consume(stream, n)
            self.send(Frame(Kind.DATA, stream, bytes(view[:n])))
            view = view[n:]
        if close:
            self.send(Frame(Kind.CLOSE, stream))
            self.send_window.close(stream)

    def wait_exit(self, cid: str, exec_id: str = "", timeout: float = 10.0
                  ) -> schema.ProcessExit:
        def find() -> schema.ProcessExit | None:
            for event in self.events:
                if event.container_id == cid and event.exec_id == exec_id:
                    return event
            return None

        self.wait_for(lambda: find() is not None, timeout, f"the exit of {cid}/{exec_id!r}")
        event = find()
        assert event is not None
        self.events.remove(event)
        return event

    def output(self, stream: int) -> bytes:
        return bytes(self.data.get(stream, b""))
