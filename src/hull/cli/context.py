"""What every verb receives: the global flags, the configuration, and logging set up."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hull.config import settings

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
