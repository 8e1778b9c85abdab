"""``containerd-shim-hull-v2``: the binary containerd runs for runtime io.containerd.hull.v2.

containerd calls it three ways (INTEGRATION.md §2 "start subcommand", "delete
subcommand"; containerd runtime/v2/binary.go, shim/shim.go):

- ``-namespace NS -address A -publish-binary P -id ID [-debug] start`` in the bundle:
  print the ttrpc address (and only that: containerd reads stdout+stderr as the
  address) and write it to ``<bundle>/address``. A container whose
  ``io.kubernetes.cri.sandbox-id`` names a pod whose shim already listens gets that
  shim's address (one VM per pod, as Kata). Otherwise the socket is bound here, so it
  already accepts when the address is printed, and the daemon is ``start``'s forked
  child (new session, stdio off containerd's pipes, stderr to the bundle's ``log`` fifo;
  hull.shim.v2.daemon).
- ``... -bundle B delete``: clean up after a shim that died; prints a DeleteResponse.
"""

from __future__ import annotations

# `start` runs for every task of every pod, and a new pod's daemon is this same process
# after a fork: only what `start` needs is imported here (no argparse, logging, json,
# pathlib, subprocess: ~25 ms and 70 modules of a start that a joining container paid
# in full, and a new pod twice, the daemon being a second interpreter before).
import _socket  # socket.py would add enum and selectors (~5 ms); the daemon wraps it
import os
import sys

from hull.errors import HullError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

STATE_ROOT_ENV = "HULL_SHIM_ROOT"
DEFAULT_STATE_ROOT = "/run/hull-shim"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
KILLED_STATUS = 128 + 9  # containerd's runc shim reports 137 for a task it cleaned up

_STRING_FLAGS = ("namespace", "address", "publish-binary", "id", "bundle", "socket")
_BOOL_FLAGS = ("debug", "v", "version")


class Flags:
    """The command line, as containerd's shim package defines it (Go's ``flag``)."""

    def __init__(self) -> None:
        self.namespace = self.address = self.publish_binary = self.id = ""
        self.bundle = self.socket = self.action = ""
        self.debug = self.version = False


class UsageError(HullError):
    """A command line the shim does not understand (exit status 2, as Go's flag)."""


def parse_args(argv: list[str]) -> Flags:
    """Go's flag package: ``-name value``, ``-name=value``, ``--name`` alike, bool flags
    without a value; the first argument that is not a flag is the action."""
    flags = Flags()
    args = iter(argv)
    for arg in args:
        if arg == "--":  # the end of the flags
            flags.action = next(args, "")
            break
        if not arg.startswith("-") or arg == "-":
            flags.action = arg
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            on = not has_value or value.lower() in ("1", "t", "true")
            if name == "debug":
                flags.debug = on
            else:
                flags.version = on
        elif name in _STRING_FLAGS:
            if not has_value:
                try:
                    value = next(args)
                except StopIteration:
                    raise UsageError(f"flag needs an argument: -{name}") from None
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
    return flags


def state_root() -> Path:
    from pathlib import Path

    return Path(_state_root())


def _state_root() -> str:
    return os.environ.get(STATE_ROOT_ENV, DEFAULT_STATE_ROOT)


def group_of(bundle: str | os.PathLike[str], task_id: str) -> str:
    """The pod a task belongs to: CRI's sandbox id, else the task itself."""
    from hull.agentapi import wirejson  # the json package would import re (~5 ms)

    try:
        with open(os.path.join(bundle, "config.json"), "rb") as spec_file:
            spec = wirejson.loads(spec_file.read().strip())
        annotations = spec.get("annotations") if isinstance(spec, dict) else None
        group = annotations.get(SANDBOX_ID) if isinstance(annotations, dict) else None
    except (OSError, ValueError):
        group = None
    return group if isinstance(group, str) and group else task_id


def socket_path(containerd_address: str, namespace: str, group: str) -> str:
    # CPython's own SHA-256: hashlib would load OpenSSL's libcrypto (~2 ms of every start).
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:
        from hashlib import sha256

    # Short and unique per containerd instance, namespace and pod (cf. runc's
    # shim/util_unix.go SocketAddress): sun_path holds only 108 bytes.
    digest = sha256(f"{containerd_address}/{namespace}/{group}".encode()).hexdigest()
    return os.path.join(_state_root(), "s", f"{digest[:32]}.sock")


def listening(path: str) -> bool:
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


# ---------------------------------------------------------------------------- start


def start(args: Flags) -> int:
    """Print the pod's address; a new pod's shim is this process's forked child."""
    bundle = os.getcwd()
    path = socket_path(args.address, args.namespace, group_of(bundle, args.id))
    address = f"unix://{path}"
    if not listening(path):
        os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
        _unlink(path)  # a dead shim's socket
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(128)  # accepting before containerd learns the address
            sys.stdout.flush()
            sys.stderr.flush()
            # A fork, not a fresh interpreter: the daemon starts from this one's imports.
            child = os.fork()
        except OSError:
            sock.close()
            _unlink(path)
            raise
        if child == 0:
            return _daemon(args, bundle, sock)
        sock.close()
    with open(os.path.join(bundle, "address"), "w") as address_file:
        address_file.write(address)
    sys.stdout.write(address)
    return 0


def _unlink(path: str) -> None:
    # Not contextlib.suppress: contextlib (with collections, functools) is ~2 ms of start.
    try:  # noqa: SIM105
        os.unlink(path)
    except FileNotFoundError:
        pass


def _log_fd(bundle: str) -> int:
    """The bundle's `log` fifo (containerd reads it), else /dev/null; never blocking."""
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


def _daemon(args: Flags, bundle: str, sock: _socket.socket) -> int:
    """The forked child: detach from containerd, then serve until Shutdown or SIGTERM."""
    # A new session and none of containerd's pipes: containerd waits for start's output
    # to end (cmd.CombinedOutput), which must not wait for the daemon; its log lines go
    # to the bundle's `log` fifo.
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    log_fd = _log_fd(bundle)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    import asyncio
    import socket

    from hull.shim.v2 import daemon

    daemon.setup_logging(args.id, args.debug)
    listener = socket.socket(fileno=sock.detach())
    return asyncio.run(daemon.serve(args.namespace, args.address, args.id, listener,
                                    _state_root()))


# ---------------------------------------------------------------------------- delete


def delete(args: Flags) -> int:
    """Clean up what a dead shim left for task ``args.id``: VM, network, mounts, state,
    socket."""
    import contextlib
    import datetime
    from pathlib import Path

    from hull.network import host as netns
    from hull.runtime import sharedfs
    from hull.shim.proto import shim_pb2
    from hull.shim.v2 import mounts

    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    group = group_of(bundle, args.id)
    state = state_root() / args.namespace / group
    path = Path(socket_path(args.address, args.namespace, group))
    alive = listening(str(path))
    if not alive:
        _kill_pidfile(state / "qemu.pid")
        # The dead shim's tc filters are still on the pod's veths (Pod.close removes them).
        netns.release_recorded(state / netns.RECORD_NAME)
    share = state / "shared" / args.id / "rootfs"
    with contextlib.suppress(sharedfs.ShareError):
        sharedfs.release(share.parent / "mounts")  # staged bind sources (sharedfs)
    with contextlib.suppress(sharedfs.MountError):
        mounts.remove_bind(share)
    with contextlib.suppress(sharedfs.MountError):
        sharedfs.unmount(bundle / "rootfs")
    if not alive:
        shared = state / "shared"
        if shared.is_dir():
            for child in shared.iterdir():
                with contextlib.suppress(sharedfs.MountError):
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
    import contextlib
    import signal

    try:
        pid = int(path.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            cmdline = cmdline_file.read()
    except (OSError, ValueError):
        return
    if b"qemu" in cmdline:  # the pid may have been reused by something else
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"containerd-shim-hull-v2: {exc}", file=sys.stderr)
        return 2
    if args.version:
        from hull import __version__

        print(f"containerd-shim-hull-v2 (hull {__version__})")
        return 0
    if args.action == "start":
        return start(args)
    if args.action == "delete":
        from hull.shim.v2 import daemon

        daemon.setup_logging(args.id, args.debug)
        return delete(args)
    print(f"containerd-shim-hull-v2: unknown action {args.action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
