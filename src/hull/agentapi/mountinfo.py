"""Mount points from /proc/self/mountinfo, for the host's share cleanup and the agent.

Stdlib only: the agent imports it in the guest.
"""

from __future__ import annotations

import os

MOUNTINFO = "/proc/self/mountinfo"


def mount_points(path: str = MOUNTINFO) -> list[str]:
    """Every mount point of this mount namespace, in mountinfo's order."""
    points = []
    with open(path, "rb") as fh:
        for line in fh:
            fields = line.split(b" ", 5)
            if len(fields) > 4:
                points.append(unescape(fields[4]))
    return points


def unescape(raw: bytes) -> str:
    """A mountinfo field: space, tab, newline and backslash are escaped as \\ooo."""
    if b"\\" not in raw:
        return os.fsdecode(raw)
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"\\" and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))
