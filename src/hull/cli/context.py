"""What every verb receives: the global flags, the configuration, and logging set up."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hull.config import settings
from hull.logids import ContainerIdFilter

DEFAULT_ROOT = Path("/run/hull")
log = logging.getLogger("hull")


@dataclass
class Context:
    root: Path = DEFAULT_ROOT
    config_path: str | None = None
    debug: bool = False
    log_path: str | None = None
    log_format: str = "text"
    _config: settings.Config | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        return cls(root=Path(args.root).absolute(), config_path=args.config, debug=args.debug,
                   log_path=args.log, log_format=args.log_format)

    def hull_argv(self, *verb: str) -> list[str]:
        """The command line of a `hull` helper process with the same global flags."""
        argv = [sys.executable, "-m", "hull", "--root", str(self.root),
                "--log-format", self.log_format]
        if self.config_path:
            argv += ["--config", self.config_path]
        if self.log_path:
            argv += ["--log", self.log_path]
        if self.debug:
            argv.append("--debug")
        return [*argv, *verb]

    @property
    def config(self) -> settings.Config:
        if self._config is None:
            self._config = settings.load(self.config_path)
        return self._config


class JsonFormatter(logging.Formatter):
    """runc's --log-format json: one object a line; containerd reads the last error's msg."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "level": record.levelname.lower().replace("warning", "warning"),
            "msg": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs * 1000):06d}Z",
        }
        cid = getattr(record, "container_id", None)
        if cid:
            entry["id"] = cid
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        cid = getattr(record, "container_id", None)
        if cid:
            head, _, rest = text.partition(f" {record.levelname} ")
            text = f"{head} {record.levelname} [{cid}] {rest}"
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
