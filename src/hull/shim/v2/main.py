"""``containerd-shim-hull-v2``: the binary containerd runs for runtime io.containerd.hull.v2.

containerd calls it three ways (INTEGRATION.md §2 "start subcommand", "delete
subcommand"; containerd runtime/v2/binary.go, shim/shim.go):

- ``-namespace NS -address A -publish-binary P -id ID [-debug] start`` in the bundle:
  print the ttrpc address (and only that: containerd reads stdout+stderr as the
  address) and write it to ``<bundle>/address``. A container whose
  ``io.kubernetes.cri.sandbox-id`` names a pod whose shim already listens gets that
  shim's address (one VM per pod, as Kata). Otherwise the socket is bound here, so it
  already accepts when the address is printed, and handed to a detached daemon (new
  session, stdio off containerd's pipes, stderr to the bundle's ``log`` fifo).
- ``... -bundle B delete``: clean up after a shim that died; prints a DeleteResponse.
- ``... serve``: the daemon (internal; what ``start`` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE_ROOT_ENV = "HULL_SHIM_ROOT"
LISTEN_FD_ENV = "HULL_SHIM_LISTEN_FD"
DEFAULT_STATE_ROOT = "/run/hull-shim"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
KILLED_STATUS = 128 + 9  # containerd's runc shim reports 137 for a task it cleaned up

log = logging.getLogger("hull.shim")


def state_root() -> Path:
    return Path(os.environ.get(STATE_ROOT_ENV, DEFAULT_STATE_ROOT))


def parse_args(argv: list[str]) -> argparse.Namespace:
    # Go's flag package: single-dash long flags (two dashes work too).
    parser = argparse.ArgumentParser(prog="containerd-shim-hull-v2", prefix_chars="-")
    for flag in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        parser.add_argument(f"-{flag}", f"--{flag}", default="")
    parser.add_argument("-debug", "--debug", action="store_true")
    parser.add_argument("-v", "--version", action="store_true")
    parser.add_argument("action", nargs="?", default="")
    return parser.parse_args(argv)


def group_of(bundle: Path, task_id: str) -> str:
    """The pod a task belongs to: CRI's sandbox id, else the task itself."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
        group = (spec.get("annotations") or {}).get(SANDBOX_ID)
    except (OSError, ValueError, AttributeError):
        group = None
    return group if isinstance(group, str) and group else task_id


def socket_path(containerd_address: str, namespace: str, group: str) -> Path:
    # Short and unique per containerd instance, namespace and pod (cf. runc's
    # shim/util_unix.go SocketAddress): sun_path holds only 108 bytes.
    digest = hashlib.sha256(f"{containerd_address}/{namespace}/{group}".encode()).hexdigest()
    return state_root() / "s" / f"{digest[:32]}.sock"


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------- start


def start(args: argparse.Namespace) -> int:
    bundle = Path.cwd()
    path = socket_path(args.address, args.namespace, group_of(bundle, args.id))
    address = f"unix://{path}"
    if not listening(path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead shim's socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(128)
        try:
            _spawn_daemon(args, bundle, sock)
        except OSError:
            path.unlink(missing_ok=True)
            raise
        finally:
            sock.close()
    (bundle / "address").write_text(address)
    sys.stdout.write(address)
    return 0


def _log_fd(bundle: Path) -> int:
    """The bundle's `log` fifo (containerd reads it), else /dev/null; never blocking."""
    try:
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


def _spawn_daemon(args: argparse.Namespace, bundle: Path, sock: socket.socket) -> None:
    argv = [sys.executable, "-m", "hull.shim.v2.main", "-namespace", args.namespace,
            "-address", args.address, "-publish-binary", args.publish_binary,
            "-id", args.id, *(["-debug"] if args.debug else []), "serve"]
    env = {**os.environ, LISTEN_FD_ENV: str(sock.fileno())}
    log_fd = _log_fd(bundle)
    try:
        # A new session and no inherited pipes: containerd waits for start's output to
        # end (cmd.CombinedOutput), which must not wait for the daemon.
        subprocess.Popen(argv, cwd=bundle, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=log_fd, pass_fds=(sock.fileno(),),
                         start_new_session=True)
    finally:
        os.close(log_fd)


# ---------------------------------------------------------------------------- delete


def delete(args: argparse.Namespace) -> int:
    """Clean up what a dead shim left for task ``args.id``: VM, network, mounts, state,
    socket."""
    from hull.network import host as netns
    from hull.runtime import sharedfs
    from hull.shim.proto import shim_pb2
    from hull.shim.v2 import mounts

    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    group = group_of(bundle, args.id)
    state = state_root() / args.namespace / group
    path = socket_path(args.address, args.namespace, group)
    alive = listening(path)
    if not alive:
        _kill_pidfile(state / "qemu.pid")
        # The dead shim's tc filters are still on the pod's veths (Pod.close removes them).
        netns.release_recorded(state / netns.RECORD_NAME)
    share = state / "shared" / args.id / "rootfs"
    with contextlib.suppress(sharedfs.ShareError):
        sharedfs.release(share.parent / "mounts")  # staged bind sources (sharedfs)
    with contextlib.suppress(mounts.MountError):
        mounts.remove_bind(share)
    with contextlib.suppress(mounts.MountError):
        mounts.unmount(bundle / "rootfs")
    if not alive:
        shared = state / "shared"
        if shared.is_dir():
            for child in shared.iterdir():
                with contextlib.suppress(mounts.MountError):
                    mounts.remove_bind(child / "rootfs")
        import shutil

        sharedfs.unmount_under(state)  # never rmtree through a host bind
        shutil.rmtree(state, ignore_errors=True)
        with contextlib.suppress(OSError):
            state.parent.rmdir()
        path.unlink(missing_ok=True)
    exited = shim_pb2.DeleteResponse(pid=0, exit_status=KILLED_STATUS)
    exited.exited_at.FromDatetime(datetime.datetime.now(datetime.UTC))
    sys.stdout.buffer.write(exited.SerializeToString())
    return 0


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"qemu" in cmdline:  # the pid may have been reused by something else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------- serve


async def serve(args: argparse.Namespace) -> int:
    import asyncio

    from hull.config import settings
    from hull.shim import ttrpc
    from hull.shim.v2 import service
    from hull.shim.v2.events import Publisher
    from hull.shim.v2.pod import Pod

    sock = socket.socket(fileno=int(os.environ.pop(LISTEN_FD_ENV)))
    sock_path = sock.getsockname()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{args.address}.ttrpc"
    publisher = Publisher(ttrpc_address, args.namespace)
    pod = Pod(args.namespace, state_root(), publisher,
              lambda path: settings.load(path or None))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    server = ttrpc.Server()
    server.register(service.SERVICE, service.TaskService(pod, done.set).handlers())
    await server.start(sock)
    log.info("shim for %s/%s serving on %s", args.namespace, args.id, sock_path)
    try:
        await done.wait()
    finally:
        await pod.close()
        await publisher.close()
        await server.close()
        with contextlib.suppress(OSError):
            os.unlink(sock_path)
    return 0


class _TaskId(logging.Filter):
    """Stamps records with the id of the task the shim was started for (a pod's shim: the
    sandbox's), unless a record names its own container."""

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "container_id", None):
            record.container_id = self.task_id
        return True


#: Libraries whose debug and info lines are per-message chatter, costly to format (a
#: netlink message, a QMP exchange): only their warnings are kept.
CHATTY = ("pyroute2", "qemu.qmp")


def _not_chatty(record: logging.LogRecord) -> bool:
    # A filter, not a level: importing pyroute2 resets its logger's level to NOTSET.
    return record.levelno >= logging.WARNING or not record.name.startswith(CHATTY)


def setup_logging(task_id: str, debug: bool) -> None:
    """Log lines on stderr (containerd's `log` fifo once serving), each with the id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TaskId(task_id or "-"))
    handler.addFilter(_not_chatty)
    # containerd copies these lines to its log as they are, without a time of its own:
    # the shim stamps them (ms: benchmarks/bench_pods.py reads where the time went).
    formatter = logging.Formatter(
        "hull-shim %(asctime)s.%(msecs)03dZ %(levelname)s [%(container_id)s] %(name)s: "
        "%(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime  # UTC, as containerd's own lines
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Hull's own loggers report through the root handler here (the CLI gives "hull" a
    # handler of its own; the shim process must not depend on what else configured it).
    hull_logger = logging.getLogger("hull")
    hull_logger.handlers.clear()
    hull_logger.propagate = True
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        from hull import __version__

        print(f"containerd-shim-hull-v2 (hull {__version__})")
        return 0
    setup_logging(args.id, args.debug)
    if args.action == "start":
        return start(args)
    if args.action == "delete":
        return delete(args)
    if args.action == "serve":
        import asyncio  # only the daemon: `start` runs for every task, and must be quick

        return asyncio.run(serve(args))
    print(f"containerd-shim-hull-v2: unknown action {args.action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
