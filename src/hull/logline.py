"""Hull's log lines (runc's --log-format json or text), without the logging module.

hull.logids formats every record of the runtime, the proxy and the shim v2 with these
functions. A CLI shim writes its few lines with :class:`LineLog` and never imports
`logging`, whose traceback, tokenize, re, string and weakref modules would stay in its
memory for as long as its container process lives (~1.2 MiB of its ~6; docs/performance.md,
host memory).
"""

from __future__ import annotations

import os
import time

from hull.agentapi import wirejson


def json_line(level: str, created: float, msg: str, container_id: str | None) -> str:
    """runc's --log-format json: one compact object a line (level, msg, time, id);
    containerd and podman read the last error's msg."""
    micros = int((created - int(created)) * 1_000_000)
    entry = {"level": level.lower(), "msg": msg,
             "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
             + f".{micros:06d}Z"}
    if container_id:
        entry["id"] = container_id
    return wirejson.dumps(entry).decode("ascii")


def text_line(level: str, created: float, msg: str, container_id: str | None) -> str:
    """``2026-11-27 01:02:03,456 ERROR [id] msg`` (local time, as logging's asctime)."""
    millis = int((created - int(created)) * 1000)
    head = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f",{millis:03d}"
    tag = f" [{container_id}]" if container_id else ""
    return f"{head} {level.upper()}{tag} {msg}"


class LineLog:
    """Appends whole error lines to a log file (--log, or the container's shim.log); a
    write that fails is dropped (there is nowhere else to say so: stderr is the
    container's)."""

    def __init__(self, path: str, log_format: str, container_id: str) -> None:
        self.path, self.container_id = path, container_id
        self.format = json_line if log_format == "json" else text_line

    def error(self, msg: str) -> None:
        line = (self.format("error", time.time(), msg, self.container_id) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
        except OSError:
            return
        try:
            os.write(fd, line)  # one write: lines of concurrent writers do not interleave
        except OSError:
            pass
        finally:
            os.close(fd)
