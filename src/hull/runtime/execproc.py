"""hull exec: a new process in a running container, through its own shim."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hull.errors import BundleError, HullError, InvalidState
from hull.oci.bundle import check_process
from hull.runtime import shim
from hull.runtime.lifecycle import Runtime, load_spec, write_pid_file
from hull.runtime.state import start_time

log = logging.getLogger("hull.shim")


def build_process(base: dict[str, Any], process_file: str | None, args: list[str],
                  tty: bool, cwd: str | None, env: list[str], user: str | None
                  ) -> dict[str, Any]:
    """The exec's process: --process FILE as is, or the container's process with the
    command line's args, terminal, cwd, env and user (runc exec.go newProcess)."""
    if process_file:
        try:
            process = json.loads(Path(process_file).read_text())
        except OSError as exc:
            raise HullError(f"cannot read process file {process_file}: {exc.strerror}"
                            ) from exc
        except ValueError as exc:
            raise HullError(f"process file {process_file} is not valid JSON: {exc}") from exc
        if not isinstance(process, dict):
            raise HullError(f"process file {process_file} must hold a JSON object")
    else:
        if not args:
            raise HullError("exec needs a command (or --process)")
        process = {**base, "args": args, "terminal": tty}
        process.pop("consoleSize", None)
        if cwd:
            process["cwd"] = cwd
        if env:
            process["env"] = [*base.get("env", []), *env]
        if user:
            uid, _, gid = user.partition(":")
            if not uid.isdigit() or (gid and not gid.isdigit()):
                raise HullError(f"--user must be UID[:GID], not {user!r}")
            process["user"] = {**base.get("user", {}), "uid": int(uid),
                               "gid": int(gid) if gid else 0}
    try:
        check_process(process, "process")
    except BundleError as exc:
        raise HullError(str(exc)) from exc
    return process


def exec_process(rt: Runtime, container_id: str, process: dict[str, Any], detach: bool,
                 pid_file: str | None, console_socket: str | None) -> int:
    cdir, state = rt.load(container_id)
    if not state.can_exec():
        raise InvalidState(f"cannot exec in a stopped or paused container: {container_id}"
                           if state.status.value != "created"
                           else f"cannot exec in a created container: {container_id}")
    load_spec(state)  # the bundle must still be readable
    exec_id = os.urandom(8).hex()  # as secrets.token_hex, without its ~2 ms of imports
    terminal = bool(process.get("terminal", False))
    if terminal and detach and not console_socket:
        raise HullError("cannot allocate tty if runc will detach without setting console "
                        "socket")
    if detach:
        return _detached(rt, cdir, exec_id, process, pid_file, console_socket)
    if pid_file:
        write_pid_file(pid_file, os.getpid())
    request = shim.ShimRequest(cdir.path, cdir.id, exec_id, {"process": process},
                               console_socket, terminal)
    if not terminal or console_socket:
        return shim.serve(request, None, log.error)
    # hull.runtime.run imported only here: it brings the whole VM side (sandbox, QEMU
    # driver), which `hull exec` does not need, ~6-10 ms of an exec's start-up.
    from hull.runtime.run import raw_terminal

    with raw_terminal(0):
        return shim.serve(request, None, log.error)


def _detached(rt: Runtime, cdir: Any, exec_id: str, process: dict[str, Any],
              pid_file: str | None, console_socket: str | None) -> int:
    (cdir.path / "execs").mkdir(exist_ok=True)
    pid = rt.spawn_shim(cdir, exec_id, {"process": process}, console_socket,
                        bool(process.get("terminal", False)))
    record = cdir.path / "execs" / f"{exec_id}.json"
    record.write_text(json.dumps({"pid": pid, "start": start_time(pid) or 0}))
    if pid_file:
        write_pid_file(pid_file, pid)
    return 0
