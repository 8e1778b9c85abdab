"""The agent's own log inside the guest console log.

The agent writes its log to the guest console (its stderr when it is PID 1), each line
prefixed "hull-agent: " (hull.agent.log); kernel messages share the console. The agent's
log is the prefixed lines, wherever a kernel message interleaved before the prefix.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "hull-agent: "


def agent_lines(console: str) -> list[str]:
    found = []
    for line in console.splitlines():
        at = line.find(PREFIX)
        if at >= 0:
            found.append(line[at + len(PREFIX):].rstrip())
    return found


def read_agent_log(console_log: Path) -> list[str]:
    try:
        text = console_log.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return []
    return agent_lines(text)
