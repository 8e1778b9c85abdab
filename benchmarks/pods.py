"""Helpers for the pod benchmarks: a CRI-enabled containerd and the host cost of pods.

The containerd is the CRI test fixture's (tests/integration/cri/fixture.py): private
socket, root, state and CNI network, a local pause and busybox image, runtime handlers
``hull`` (io.containerd.hull.v2) and ``runc`` (io.containerd.runc.v2). A pod's host
processes are its shim and everything below it (for Hull: QEMU and the placeholder
processes; for runc: pause and the container processes), found from the shims whose
command line names this containerd's socket.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.cri import images
from tests.integration.cri.fixture import CriEnv, start_cri, stop_cri

from benchmarks.common import hull_command, run_quiet

SHIMS = ("containerd-shim-runc-v2", "containerd-shim-hull-v2")


@contextmanager
def cri_containerd() -> Iterator[CriEnv]:
    with tempfile.TemporaryDirectory(prefix="hull-bench-img-") as tmp:
        archives = [images.pause_archive(Path(tmp) / "pause.tar"),
                    images.busybox_archive(Path(tmp) / "busybox.tar")]
        base = Path(tempfile.mkdtemp(prefix="hullcri-", dir="/tmp"))
        env = start_cri(base, archives)
        try:
            yield env
        finally:
            stop_cri(env)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        procs[int(entry)] = (int(stat.rpartition(")")[2].split()[1]),
                             cmdline.decode(errors="replace"))
    return procs


def shim_trees(env: CriEnv) -> dict[int, list[int]]:
    """shim pid -> its process and all its descendants, for this containerd's shims."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    address = f"-address {env.containerd.socket} "
    trees = {}
    for pid, (_, cmd) in procs.items():
        # The long-lived shims, not their short `start`/`delete` invocations. Hull's is
        # the forked child of a `start`, in a session of its own (hull.shim.v2.main).
        if address not in cmd or not any(s in cmd for s in SHIMS):
            continue
        last = cmd.split()[-1]
        if last != "delete" and (last != "start" or _session_leader(pid)):
            tree, todo = [], [pid]
            while todo:
                p = todo.pop()
                tree.append(p)
                todo.extend(children.get(p, []))
            trees[pid] = tree
    return trees


def _session_leader(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return int(fields[3]) == pid  # the session id, after state, ppid and pgrp


def leased_qemus(env: CriEnv) -> list[int]:
    """The pooled QEMUs this containerd's pods leased: the pool daemon is their parent,
    not the shim (the shims log the slot they took; hull.runtime.pool)."""
    slots = re.findall(r"took the pooled clone (\S+)", env.containerd.log.read_text(
        errors="replace"))
    return [pid for pid, (_, cmd) in _processes().items()
            if "qemu-system" in cmd and any(f"{slot}/" in cmd for slot in slots)]


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(c.decode(errors="replace") for c in cmd[:3])
    if "qemu-system" in text:
        return "qemu"
    if "containerd-shim-hull-v2" in text:
        return "hull shim"
    if "containerd-shim-runc-v2" in text:
        return "runc shim"
    if text.startswith("hull-pause"):
        return "placeholder"
    return Path(cmd[0].decode(errors="replace")).name or "?"


# ---------------------------------------------------------------------------- factory


@contextmanager
def factory(env: CriEnv, pool_size: int, timeout: float = 600) -> Iterator[Path]:
    """VM templates enabled in this containerd's own Hull configuration (the CRI runtime's
    ConfigPath, never the default configuration): a template built, ``pool_size`` clones
    restored and waiting. Destroyed at the end (the pool daemon and its clones, the
    template in /dev/shm)."""
    config = env.containerd.base / "hull.toml"
    template_dir = Path("/dev/shm") / f"hull-bench-{secrets.token_hex(6)}"
    config.write_text(config.read_text() + f'[factory]\nenabled = true\n'
                      f'template_dir = "{template_dir}"\npool_size = {pool_size}\n')
    hull = [*hull_command(), "--config", str(config)]
    try:
        run_quiet([*hull, "factory", "init"])
        wait_pool(hull, pool_size, timeout)
        yield config
    finally:
        subprocess.run([*hull, "factory", "destroy"], capture_output=True, check=False)
        shutil.rmtree(template_dir, ignore_errors=True)


def pool_counts(hull: list[str]) -> dict[str, int] | None:
    out = subprocess.run([*hull, "factory", "status", "--json"], capture_output=True,
                         text=True, check=False).stdout
    pooled: dict[str, int] | None = json.loads(out or "{}").get("pool")
    return pooled


def wait_pool(hull: list[str], idle: int, timeout: float) -> None:
    """Until the pool has ``idle`` clones waiting and none leased."""
    deadline = time.monotonic() + timeout
    while (counts := pool_counts(hull)) is None or (
            counts["idle"], counts["leased"]) != (idle, 0):
        if time.monotonic() > deadline:
            raise SystemExit(f"the pool did not fill within {timeout:g}s: {counts}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------- phases

#: (phase, the log event that ends it), in the order of a pod's start. Each phase runs
#: from the previous event to its own; the events come from containerd's log (its own
#: lines, and the shim's, which Hull stamps: hull.shim.v2.daemon.setup_logging).
PHASES = (
    ("CRI: sandbox spec, snapshot", "cni begin"),
    ("CNI (bridge, IPAM)", "cni end"),
    ("shim start (start + daemon python)", "shim serving"),
    ("sandbox VM (network, lease or boot, hello)", "vm ready"),
    ("RunPodSandbox rest (placeholder, task start)", "run end"),
    ("client: to CreateContainer", "create begin"),
    ("CreateContainer (containerd)", "create end"),
    ("client: to StartContainer", "start begin"),
    ("StartContainer (create + start in the guest)", "start end"),
)
_TIME = re.compile(r'^time="([^"]+)"')
_SHIM = re.compile(r"^hull-shim (\S+Z) \S+ \[([0-9a-f]+)\]")


def _stamp(text: str) -> float:
    """containerd's RFC 3339 time (ns) or the shim's (ms), as seconds since the epoch."""
    text = text.rstrip("Z")
    whole, _, frac = text.partition(".")
    when = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    return when.timestamp() + float(f"0.{frac or 0}")


def pod_phases(log: Path, names: list[str]) -> tuple[list[dict[str, float]], list[str]]:
    """Per pod (by CRI name), the seconds of each of PHASES; and the shim's boot lines
    ("sandbox ... ready in ...", "took the pooled clone" ...) for the report."""
    events: dict[str, dict[str, float]] = {}
    sandbox_of: dict[str, str] = {}  # sandbox id -> pod name
    container_of: dict[str, str] = {}  # container id -> pod name
    notes: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        shim = _SHIM.match(line)
        if shim:
            name = sandbox_of.get(shim.group(2))
            if name is None:
                continue
            if "hull.shim: shim for" in line:
                events[name].setdefault("shim serving", _stamp(shim.group(1)))
            elif " ready in " in line and "hull.sandbox" in line:
                events[name].setdefault("vm ready", _stamp(shim.group(1)))
                notes.append(f"{name}: {line.split(' ready in ', 1)[1]}")
            elif any(w in line for w in ("pooled clone", "booting cold", " timing: ")):
                notes.append(f"{name}: {line.split(': ', 2)[-1]}")
            continue
        stamp = _TIME.match(line)
        if not stamp:
            continue
        at = _stamp(stamp.group(1))
        if m := re.search(r'RunPodSandbox for &PodSandboxMetadata\{Name:([^,]+),', line):
            name = m.group(1)
            if name in names:
                key = "run end" if "returns sandbox id" in line else "run begin"
                events.setdefault(name, {})[key] = at
        elif m := re.search(r'generated id for sandbox name \\"([^_]+)_.*podsandboxid=(\w+)',
                            line):
            sandbox_of[m.group(2)] = m.group(1)
        elif m := re.search(r'msg="(begin cni setup|cni result).*podsandboxid=(\w+)', line):
            name = sandbox_of.get(m.group(2), "")
            if name in events:
                events[name]["cni begin" if m.group(1) == "begin cni setup" else "cni end"] = at
        elif m := re.search(r'CreateContainer within sandbox \\"(\w+)\\".*?'
                            r'(returns container id \\"(\w+)\\")?"', line):
            name = sandbox_of.get(m.group(1), "")
            if name in events:
                events[name]["create end" if m.group(3) else "create begin"] = at
                if m.group(3):
                    container_of[m.group(3)] = name
        elif m := re.search(r'StartContainer for \\"(\w+)\\"', line):
            name = container_of.get(m.group(1), "")
            if name in events:
                events[name]["start end" if "returns successfully" in line
                             else "start begin"] = at
    out = []
    for name in names:
        marks = events.get(name, {})
        last = marks.get("run begin")
        phases: dict[str, float] = {}
        for phase, event in PHASES:
            if last is None or event not in marks:
                continue
            phases[phase] = marks[event] - last
            last = marks[event]
        out.append(phases)
    return out, notes
