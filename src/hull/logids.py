"""Logging of every Hull process (runtime, proxy, shim): --log, --log-format, --debug, and
records that name the container (every component stamps the id it serves).

Standard library only, and little of it: shims import this module and keep it for as long
as their container process lives.
"""

from __future__ import annotations

import logging
import sys

from hull.logline import json_line, text_line


class ContainerIdFilter(logging.Filter):
    """Stamps every record with the container id the process serves (a pod's shim: the
    sandbox's), unless the record names its own container."""

    def __init__(self, container_id: str) -> None:
        super().__init__()
        self.container_id = container_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "container_id", None):
            record.container_id = self.container_id
        return True


class JsonFormatter(logging.Formatter):
    """runc's --log-format json: one object a line; containerd reads the last error's msg."""

    def format(self, record: logging.LogRecord) -> str:
        return json_line(record.levelname, record.created, record.getMessage(),
                         getattr(record, "container_id", None))


class TextFormatter(logging.Formatter):
    """``asctime LEVEL [id] message``, then the traceback if the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        text = text_line(record.levelname, record.created, record.getMessage(),
                         getattr(record, "container_id", None))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return text


def setup_logging(log_path: str | None, log_format: str, debug: bool,
                  container_id: str | None = None) -> None:
    """Logging of every Hull process (runtime, proxy, shim): --log, --log-format, --debug.

    ``container_id``: the container the process works for; every record carries it (as
    "id" in JSON, as runc does, and "[id]" in text).
    """
    root = logging.getLogger("hull")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    handler: logging.Handler
    if log_path:
        handler = logging.FileHandler(log_path)
        handler.setLevel(logging.DEBUG if debug else logging.INFO)
    else:
        # Without --log only warnings and errors reach stderr: a client may treat
        # anything on the runtime's stderr as an error message.
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    if container_id:
        handler.addFilter(ContainerIdFilter(container_id))
    root.addHandler(handler)
