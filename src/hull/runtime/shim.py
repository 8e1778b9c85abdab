"""The CLI-mode shim: one relay process per container process.

Its pid is the "container pid" clients see (pid file, `state`): conmon and containerd's
runc shim reap it as the container's process. It connects to the sandbox's proxy, asks
for its process (the container's init on create, or an exec), relays the stdio it
inherited from the caller — or a host pty sent over the console socket —, forwards every
signal it receives to the process in the guest, and exits with the process's status
(128+N for death by signal N). It lives exactly as long as that process: if the shim is
killed, the proxy kills the process.

`hull create` and `hull exec --detach` start it (:func:`command`) with ``--ready-fd R
--request-fd Q ID`` and write what it serves, as one JSON object, to the
request pipe (:func:`request_json`); it answers "ok" or its error line on the ready pipe.
A foreground `hull exec` runs :func:`serve` in its own process.

Lean and synchronous on purpose (hull.proxy.blocking): a shim lives as long as its
container process, and every module it imports stays in its memory — no asyncio, no CLI,
no runtime state classes, no `logging` (hull.logline), no `json` (hull.agentapi.wirejson);
started without `site` (:func:`command`); and nothing that imports functools or
collections (enum, threading, socket, signal, contextlib): ``_thread``, ``_signal`` and
``_socket`` instead, the protocol's enums from hull.agentapi.enums, the console module
only for a terminal (docs/performance.md, host memory).
"""

from __future__ import annotations

import _thread
import os
import select
import sys

from hull.agentapi import schema, wirejson
from hull.errors import HullError
from hull.logline import LineLog
from hull.proxy.blocking import READ_CHUNK, BlockingChannel, Output
from hull.runtime.proxysock import SOCKET_NAME, connect_unix, report

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # typeshed has no _signal; signal's functions are its own
    from collections.abc import Callable
    from typing import Any

    from hull.runtime.proxysock import PathLike
else:
    import _signal

#: How long create_container / exec_process may take in the guest (without hooks).
CREATE_TIMEOUT = 120.0
#: Exit status when the VM or the proxy died under the process (like a SIGKILL).
LOST = 128 + _signal.SIGKILL
#: Signals a shim does not forward: it needs them itself, or they cannot be caught.
NOT_FORWARDED = {_signal.SIGKILL, _signal.SIGSTOP, _signal.SIGCHLD, _signal.SIGWINCH}


class ShimRequest:
    """What one shim serves: the init (exec_id "") with its spec, or an exec process."""

    def __init__(self, state_dir: PathLike, container_id: str, exec_id: str,
                 payload: dict[str, Any], console_socket: str | None = None,
                 terminal: bool = False) -> None:
        self.state_dir = os.fspath(state_dir)
        self.container_id, self.exec_id = container_id, exec_id
        #: create: {"spec", "rootfs", "state" (the OCI state for hooks, without the pid:
        #: the shim's own)}; exec: {"process"}
        self.payload = payload
        self.console_socket = console_socket
        self.terminal = terminal


class HostStdio:
    """Host fds of one process; None where the process gets nothing (/dev/null). Also
    `hull run`'s and `hull debug`'s (hull.runtime.stdio): defined here, where the shim
    can have it without asyncio or dataclasses."""

    def __init__(self, stdin: int | None = 0, stdout: int | None = 1,
                 stderr: int | None = 2, terminal: bool = False) -> None:
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal


def command(python: str, *args: str) -> list[str]:
    """The argv of a shim process: ``python -S`` (no `site`: its imports, and the
    installation's path hooks, would stay in every shim's memory) with the directory
    this installation of Hull is imported from as the only addition to sys.path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {root!r}); from hull.runtime.shim import main; "
            "sys.exit(main(sys.argv[1:]))")
    return [python, "-S", "-c", code, *args]


def request_json(state_dir: PathLike, container_id: str, exec_id: str, payload: dict[str, Any],
                 console_socket: str | None, terminal: bool, log_path: str | None,
                 log_format: str, debug: bool) -> bytes:
    """What `hull create` / `hull exec -d` write to a shim's request pipe."""
    return wirejson.dumps({
        "state_dir": os.fspath(state_dir), "id": container_id, "exec_id": exec_id,
        "payload": payload, "console_socket": console_socket, "terminal": terminal,
        "log": {"path": log_path, "format": log_format, "debug": debug}})


def serve(req: ShimRequest, ready: int | None, log_error: Callable[[str], None]) -> int:
    """Run the shim; ``ready`` is a pipe fd that gets "ok" or the error line;
    ``log_error`` writes a line to the log (the process's own: logging's in `hull
    exec`, a :class:`LineLog` in a shim process)."""
    cid = req.container_id
    payload = req.payload
    if not req.exec_id:
        # The hooks' state: this shim's pid is the container's (runc gives the init's).
        payload = {**payload, "state": {**payload["state"], "pid": os.getpid()}}
        if payload["spec"].get("hooks"):
            from hull.runtime import hooks  # subprocess & co: only when there are hooks

            try:  # before create_container: createRuntime precedes the guest's hooks
                hooks.run_before_create(payload["spec"], payload["state"])
            except HullError as exc:
                if ready is not None:
                    report(ready, str(exc))
                return 1
    exited: list[schema.ProcessExit] = []

    def on_event(message: dict[str, Any]) -> None:
        if message.get("event") != schema.Event.PROCESS_EXIT:
            return
        event = schema.ProcessExit.from_json(message)
        if (event.container_id, event.exec_id) == (cid, req.exec_id) and not exited:
            exited.append(event)

    channel: BlockingChannel | None = None
    outputs: list[Output] = []
    try:
        host = _host_stdio(req)
        sock = connect_unix(os.path.join(req.state_dir, SOCKET_NAME), f"container {cid}: its proxy")
        channel = BlockingChannel(sock, f"container {cid}", on_event=on_event)
        channel.request(schema.Method.HELLO, schema.params(schema.Hello()), timeout=30)
        stdin = channel.open_input() if host.stdin is not None else None
        for fd in (host.stdout, None if host.terminal else host.stderr):
            if fd is not None:
                outputs.append(channel.open_output(fd))
        # With a terminal the pty merges both outputs onto the stdout stream.
        stdout = outputs[0].stream if host.stdout is not None else None
        stderr = outputs[-1].stream if host.stderr is not None and not host.terminal else None
        streams = schema.Stdio(stdin, stdout, stderr)
        if req.terminal and host.stdout is not None and (size := _window_size(host.stdout)):
            payload = _with_console_size(payload, req.exec_id, size)
        method, body, timeout = _process_request(req, payload, streams)
        channel.request(method, body, timeout=timeout)
    except HullError as exc:
        if ready is not None:
            report(ready, str(exc))
        if channel is not None:
            channel.close()
        return 1
    if ready is not None and not report(ready, "ok"):
        channel.close()  # `hull create` died waiting: the proxy kills the process
        return LOST
    if stdin is not None and host.stdin is not None:
        # A thread the exit does not wait for: a read blocked on a terminal must not
        # keep the shim alive.
        _thread.start_new_thread(_pump_input, (channel, host.stdin, stdin))
    try:
        return _relay(req, channel, host, exited, log_error)
    finally:
        channel.close()


def _host_stdio(req: ShimRequest) -> HostStdio:
    """The fds we inherited, or a new pty whose master went to the console socket."""
    if not req.console_socket:
        return HostStdio(terminal=req.terminal)
    from hull.runtime import console  # socket, termios ...: only for a terminal

    try:
        master, slave, name = console.open_pty()
        console.make_controlling(slave)
    except OSError as exc:
        raise HullError(f"container {req.container_id}: cannot open a pty: {exc}") from exc
    try:
        console.send_master(req.console_socket, master, name)
    finally:
        os.close(master)
    return HostStdio(stdin=slave, stdout=slave, stderr=None, terminal=True)


def _process_request(req: ShimRequest, payload: dict[str, Any], streams: schema.Stdio
                     ) -> tuple[schema.Method, dict[str, Any], float]:
    cid = req.container_id
    if req.exec_id:
        return (schema.Method.EXEC_PROCESS, schema.params(schema.ExecProcess(
            cid, req.exec_id, payload["process"], streams)), CREATE_TIMEOUT)
    spec, state = payload["spec"], payload["state"]
    if spec.get("hooks"):
        from hull.runtime import hooks

        guest = hooks.guest_hooks(spec, state)
        timeout = CREATE_TIMEOUT + hooks.guest_wait(guest.create_container)
    else:
        guest, timeout = schema.GuestHooks(state), CREATE_TIMEOUT
    return (schema.Method.CREATE_CONTAINER, schema.params(schema.CreateContainer(
        cid, spec, schema.RootfsShare.from_json(payload["rootfs"]), streams, guest)),
        timeout)


def _pump_input(channel: BlockingChannel, fd: int, stream: int) -> None:
    try:
        while data := os.read(fd, READ_CHUNK):
            channel.send_data(stream, data)
    except (OSError, HullError):
        pass  # host stdin broke or the channel ended: treat as EOF
    channel.close_input(stream)


def _relay(req: ShimRequest, channel: BlockingChannel, host: HostStdio,
           exited: list[schema.ProcessExit], log_error: Callable[[str], None]) -> int:
    cid, exec_id = req.container_id, req.exec_id

    def resize() -> None:
        size = _window_size(host.stdout) if host.stdout is not None else None
        if size:
            channel.notify(schema.Method.RESIZE_PTY,
                           schema.params(schema.ResizePty(cid, exec_id, size[0], size[1])))

    # Signals reach the loop below as bytes on a pipe (the handlers themselves do
    # nothing): a frame is never sent from inside a handler, half-way through another.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in _signal.valid_signals() & _named_signals():
        if sig in NOT_FORWARDED:
            continue
        try:
            _signal.signal(sig, _noted)
        except (OSError, ValueError, RuntimeError):
            pass
    if host.terminal:
        _signal.signal(_signal.SIGWINCH, _noted)
        # A caller may size the console between create and now (containerd's shim does,
        # right after create): that SIGWINCH came before the handler, so look once.
        resize()
    poller = select.poll()
    poller.register(channel.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while not exited and not channel.failure:
            for fd, _ in poller.poll():
                if fd != wake_r:
                    channel.pump_ready()
                    continue
                for signum in os.read(wake_r, 256):
                    if signum == _signal.SIGWINCH:
                        resize()
                    elif signum not in NOT_FORWARDED:
                        channel.notify(schema.Method.SIGNAL_PROCESS,
                                       schema.params(schema.SignalProcess(cid, exec_id, signum)))
    finally:
        _signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    if not exited:
        log_error(f"container {cid}: lost its process: {channel.failure}")
        return LOST
    channel.drain()  # all of the process's output, written
    return exited[0].status


def _noted(signum: int, frame: object) -> None:
    """Handler of the signals a shim forwards: the wake-up pipe carries the number."""


def _named_signals() -> set[int]:
    """The signals with a name (signal.Signals' members): not the unnamed real-time ones
    between SIGRTMIN and SIGRTMAX."""
    return {value for name, value in vars(_signal).items()
            if name.startswith("SIG") and not name.startswith("SIG_") and isinstance(value, int)}


def _window_size(fd: int) -> tuple[int, int] | None:
    """A terminal's (rows, columns); None for anything else (no console module needed:
    isatty first)."""
    if not os.isatty(fd):
        return None
    from hull.runtime import console

    return console.window_size(fd)


def _with_console_size(payload: dict[str, Any], exec_id: str, size: tuple[int, int]
                       ) -> dict[str, Any]:
    process = payload["process"] if exec_id else payload["spec"]["process"]
    process = {**process, "consoleSize": {"height": size[0], "width": size[1]}}
    if exec_id:
        return {**payload, "process": process}
    return {**payload, "spec": {**payload["spec"], "process": process}}


def main(argv: list[str]) -> int:
    """``--ready-fd R --request-fd Q ID``, as `hull create` and `hull exec -d` start us
    (:func:`command`)."""
    if len(argv) != 5 or argv[0] != "--ready-fd" or argv[2] != "--request-fd" or not (
            argv[1].isdigit() and argv[3].isdigit()):
        print("usage: hull.runtime.shim --ready-fd R --request-fd Q ID "
              "(started by hull, not by people)", file=sys.stderr)
        return 2
    ready = int(argv[1])
    try:
        with os.fdopen(int(argv[3]), "rb") as pipe:
            request: Any = wirejson.loads(pipe.read())
        settings = request["log"]
        req = ShimRequest(request["state_dir"], request["id"], request["exec_id"],
                          request["payload"], request["console_socket"],
                          bool(request["terminal"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report(ready, f"shim of container {argv[4]}: bad request: {exc}")
        return 1
    # stderr is the container's: the shim must never write its own messages there.
    path = settings["path"] or os.path.join(req.state_dir, "shim.log")
    log = LineLog(path, settings["format"], req.container_id)
    if not req.exec_id and req.payload.get("spec", {}).get("hooks"):
        from hull.logids import setup_logging  # hull.runtime.hooks logs through logging

        setup_logging(path, settings["format"], bool(settings["debug"]),
                      container_id=req.container_id)
    if not req.console_socket:
        os.setsid()  # out of the caller's process group: signals reach us only as sent
    return serve(req, ready, log.error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
