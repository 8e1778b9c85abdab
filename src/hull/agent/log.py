"""Terse logging to stderr (the guest console when the agent is PID 1).

No ``logging`` module: every import costs in the guest. Writes never raise.
"""

from __future__ import annotations

import contextlib
import os

_PREFIX = b"hull-agent: "


def log(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, _PREFIX + message.encode(errors="replace") + b"\n")
