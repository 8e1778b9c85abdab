"""Terse logging to stderr (the guest console when the agent is PID 1).

No ``logging`` module: every import costs in the guest. Writes never raise.
"""

from __future__ import annotations

import contextlib
import os
import time

_PREFIX = b"hull-agent: "

#: Boot milestones, in seconds of the guest's CLOCK_MONOTONIC (about the time since the
#: kernel started): the agent reports them to the host in its hello reply, which turns
#: them into the phases of a boot (see hull.runtime.sandbox.BootProfile).
marks: dict[str, float] = {}


def mark(name: str, when: float | None = None) -> None:
    """Record a milestone once (the first time counts)."""
    marks.setdefault(name, time.monotonic() if when is None else when)


def log(message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, _PREFIX + message.encode(errors="replace") + b"\n")
