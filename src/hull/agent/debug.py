"""Operator helpers in the guest itself: debug_exec (hull debug) and sandbox_stats.

debug_exec runs a program in the guest's root, outside every container, with its stdio
on channel streams like an exec's. It is refused unless the host enabled the debug
console, which it says on the kernel command line (``hull.debug_console=1``). The guest
image has no shell of its own: an image built with ``--with-busybox`` has
/bin/busybox, and a program not found on PATH runs as a busybox applet.
"""

from __future__ import annotations

import os

from hull.agent import spawn
from hull.agent.loop import reset_child_signals

CMDLINE_FLAG = "hull.debug_console=1"
BUSYBOX = "/bin/busybox"
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/", "TERM=linux")


def enabled(cmdline_path: str = "/proc/cmdline") -> bool:
    try:
        with open(cmdline_path) as f:
            return CMDLINE_FLAG in f.read().split()
    except OSError:
        return False


def resolve(args: list[str], env: list[str]) -> tuple[str, list[str]]:
    """The path to execve and its argv; a busybox applet when nothing else matches."""
    path_env = next((e[5:] for e in env if e.startswith("PATH=")), None)
    try:
        return spawn.resolve(args[0], path_env), args
    except spawn.ExecError:
        if "/" not in args[0] and os.access(BUSYBOX, os.X_OK):
            return BUSYBOX, [os.path.basename(BUSYBOX), *args]
        raise


def fork_exec(path: str, argv: list[str], env: list[str], stdio: spawn.Stdio,
              devnull: int) -> int:
    """Fork a child that runs path in its own session with stdio on 0/1/2; its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never return into the agent
        reset_child_signals()
        os.setsid()
        spawn._arrange_fds(stdio, devnull, ())
        os.chdir("/")
        environ = dict(item.split("=", 1) for item in env if "=" in item)
        os.execve(path, argv, environ)
    except BaseException:
        pass
    os._exit(127)


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """MemTotal and MemAvailable in bytes."""
    found: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                found[name] = int(rest.split()[0]) * 1024
    return found


def cpu_usec(path: str = "/proc/stat") -> tuple[int, int, int]:
    """(user+nice, system+irq+softirq, idle+iowait) of the whole guest, in µs."""
    tick = os.sysconf("SC_CLK_TCK") or 100
    with open(path) as f:
        fields = [int(v) for v in f.readline().split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = (fields + [0] * 7)[:7]
    scale = 1_000_000 // tick
    return (user + nice) * scale, (system + irq + softirq) * scale, (idle + iowait) * scale


def uptime_usec(path: str = "/proc/uptime") -> int:
    with open(path) as f:
        return int(float(f.read().split()[0]) * 1_000_000)


def stats(containers: int) -> dict[str, int]:
    mem = meminfo()
    user, system, idle = cpu_usec()
    return {"memory_total": mem.get("MemTotal", 0),
            "memory_available": mem.get("MemAvailable", 0),
            "cpu_user_usec": user, "cpu_system_usec": system, "cpu_idle_usec": idle,
            "containers": containers, "uptime_usec": uptime_usec()}
