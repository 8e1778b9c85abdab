"""`hull run` in the foreground: one container in one VM, torn down when it exits.

Built from the pieces create/start reuse: the bundle check, the state directory, the
Sandbox (VM + agent), ProcessIO (stdio streams), signal forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hull.agentapi import schema
from hull.config.settings import Config
from hull.errors import HypervisorError
from hull.network import host as netns
from hull.oci.bundle import Bundle
from hull.runtime import hooks, sizing
from hull.runtime.layout import Files, rootfs_request
from hull.runtime.lifecycle import network_record, oci_state, shared_dir
from hull.runtime.sandbox import Sandbox, Timeline
from hull.runtime.shim import HostStdio
from hull.runtime.state import ContainerDir, ContainerState, Status, start_time
from hull.runtime.stdio import ProcessIO

log = logging.getLogger("hull.run")
#: How long create_container and start_container may take, besides the guest's hooks.
CALL_TIMEOUT = 30.0
#: Signals `hull run` passes on to the container process (as runc's signal forwarding).
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGPIPE, signal.SIGALRM, signal.SIGCONT, signal.SIGTSTP,
             signal.SIGTTIN, signal.SIGTTOU, signal.SIGURG, signal.SIGXCPU, signal.SIGXFSZ,
             signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO, signal.SIGPWR, signal.SIGSYS)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put the caller's terminal in raw mode while a container owns it."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


def with_console_size(bundle: Bundle, spec: dict[str, Any] | None = None
                      ) -> dict[str, object]:
    """The spec to send: with a terminal, the caller's window size as consoleSize."""
    out = dict(bundle.spec if spec is None else spec)
    size = terminal_size(1) if bundle.terminal else None
    if size:
        out["process"] = {**bundle.process,
                          "consoleSize": {"height": size[0], "width": size[1]}}
    return out


def process_started() -> float | None:
    """When this process started, on time.monotonic()'s clock (to a clock tick), for
    the "host start" phase: python's start and hull's imports. None if unknown."""
    started = start_time(os.getpid())
    if started is None:
        return None
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


async def run_container(config: Config, root: Path, container_id: str, bundle: Bundle) -> int:
    timeline = Timeline(process_started())
    timeline.mark("host start")
    cdir = ContainerDir(root, container_id)
    cdir.create()
    try:
        with cdir.locked():
            state = ContainerState(id=container_id, bundle=str(bundle.path),
                                   created=datetime.datetime.now(datetime.UTC).isoformat(),
                                   annotations=bundle.annotations)
            cdir.save(state)
            with raw_terminal(0) if bundle.terminal else contextlib.nullcontext():
                return await _run_in_vm(config, root, cdir, state, bundle, timeline)
    finally:
        cdir.remove()
        timeline.mark("cleanup")
        log.debug("run %s timing: %s", container_id, timeline.describe())


async def _run_in_vm(config: Config, root: Path, cdir: ContainerDir, state: ContainerState,
                     bundle: Bundle, timeline: Timeline) -> int:
    cid = cdir.id
    # The rootfs and the host sources of bind mounts (run_container's cdir.remove()
    # unmounts what the sandbox's teardown left).
    files = Files.of(config, bundle, shared_dir(cdir), cid)
    shares = files.before_boot()
    timeline.mark("setup")
    async with Sandbox(config, cid, cdir.console_log, shares, state_root=root,
                       network=netns.choose(bundle.spec),
                       network_record=network_record(cdir)) as sandbox:
        timeline.mark("boot")
        files.after_boot()
        assert sandbox.channel is not None and sandbox.vm is not None
        state.vm_pid = sandbox.vm.pid or 0
        exited = sandbox.exit_future(cid)
        state.pid = os.getpid()
        state.pid_start = start_time(state.pid) or 0
        # prestart and createRuntime before create_container: the agent runs the
        # createContainer hooks, which come after them (hull.runtime.hooks).
        await _hooks(bundle, state, *hooks.FATAL)
        guest = hooks.guest_hooks(bundle.spec, oci_state(state))
        io = ProcessIO.open(sandbox.channel, HostStdio(terminal=bundle.terminal))
        request = schema.CreateContainer(cid, with_console_size(bundle, files.guest_spec()),
                                         rootfs_request(bundle, files.staging, cid),
                                         io.streams, guest)
        await sandbox.call(schema.Method.CREATE_CONTAINER, request,
                           timeout=CALL_TIMEOUT + hooks.guest_wait(guest.create_container))
        timeline.mark("create")
        state.status = Status.CREATED
        cdir.save(state)
        io.start_input()
        await sandbox.call(schema.Method.START_CONTAINER, schema.ContainerRef(cid),
                           timeout=CALL_TIMEOUT + hooks.guest_wait(guest.start_container))
        timeline.mark("start")
        state.status = Status.RUNNING
        cdir.save(state)
        await _hooks(bundle, state, "poststart")
        with _forward_signals(sandbox, cid, bundle.terminal):
            vm_died = asyncio.ensure_future(sandbox.watch_vm())
            waiting: list[asyncio.Future[Any]] = [exited, vm_died]
            try:
                done, _ = await asyncio.wait(waiting,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                vm_died.cancel()
            if exited not in done:
                raise HypervisorError(f"vm of container {cid} died: {vm_died.result()}")
            timeline.mark("run")
            await io.drain()
            timeline.mark("drain")
        state.status = Status.STOPPED
        cdir.save(state)
    timeline.mark("teardown")
    await _hooks(bundle, state, "poststop")
    return exited.result().status


async def _hooks(bundle: Bundle, state: ContainerState, *kinds: str) -> None:
    """Run OCI hooks off the event loop (output keeps flowing while a hook runs)."""
    if not bundle.spec.get("hooks"):
        return
    loop = asyncio.get_running_loop()
    for kind in kinds:
        await loop.run_in_executor(None, hooks.run, bundle.spec, kind, oci_state(state))


@contextlib.contextmanager
def _forward_signals(sandbox: Sandbox, cid: str, terminal: bool) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[object]] = set()

    def send(signum: int) -> None:
        request = schema.SignalProcess(cid, "", signum)
        task = loop.create_task(sandbox.call(schema.Method.SIGNAL_PROCESS, request))
        tasks.add(task)
        task.add_done_callback(_forget(tasks))

    def resize() -> None:
        size = terminal_size(1)
        if size:
            request = schema.ResizePty(cid, "", size[0], size[1])
            task = loop.create_task(sandbox.call(schema.Method.RESIZE_PTY, request))
            tasks.add(task)
            task.add_done_callback(_forget(tasks))

    installed: list[signal.Signals] = []
    for sig in FORWARDED:
        loop.add_signal_handler(sig, send, int(sig))
        installed.append(sig)
    if terminal:
        loop.add_signal_handler(signal.SIGWINCH, resize)
        installed.append(signal.SIGWINCH)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        # remove_signal_handler() leaves SIG_DFL behind, but Python runs with SIGPIPE
        # ignored: without this, a write to a socket QEMU closed during the teardown
        # killed `hull run` with SIGPIPE (exit status -13) now and then.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def _forget(tasks: set[asyncio.Task[object]]):  # type: ignore[no-untyped-def]
    def done(task: asyncio.Task[object]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("forwarding failed: %s", task.exception())

    return done


def run(config: Config, root: Path, container_id: str, bundle: Bundle) -> int:
    config = sizing.for_spec(config, bundle.spec)
    try:
        return asyncio.run(run_container(config, root, container_id, bundle))
    finally:
        sys.stdout.flush()
