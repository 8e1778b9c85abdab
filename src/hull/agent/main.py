"""Entry point of the guest agent: ``/init`` runs ``main()``.

As the guest's PID 1 it does the init duties (mounts, modules, lo), finds the
virtio-serial port (or listens on the vsock port the kernel command line names) and
serves the host until shutdown, then powers the VM off.

Test mode runs the agent on an ordinary host, e.g. under ``unshare --pid --fork
--mount-proc``, serving one already-open fd (a socketpair end)::

    python3 -m hull.agent.main --test --fd N --run-dir DIR --share-dir DIR [--no-pivot]
        [--cgroup-root DIR]

``--fd N`` (or ``HULL_AGENT_FD=N``) serves that fd; its EOF ends the agent.
``--vsock-port N`` instead listens on that AF_VSOCK port, for connections from any CID
(as PID 1 the port comes from ``hull.vsock_port=N`` and only the host may connect).
``--test`` skips the init duties even as PID 1, leaves the clock and RNG alone, makes
the agent a child subreaper and gives it a private mount namespace, and requires
``--share-dir``: a create_container rootfs tag then names the directory
``<share-dir>/<tag>``, bind-mounted instead of a virtio-9p share. Container cgroups go
under ``--cgroup-root`` (a plain directory will do for tests), none without it.
Unknown arguments are ignored (the kernel passes its leftover words to init).
"""

from __future__ import annotations

import os
import sys

from hull.agent.log import log, mark


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """``started``: when /init began to run (its first line), for the boot profile."""
    if started is not None:
        mark("python", started)
    mark("main")
    args = sys.argv[1:] if argv is None else argv
    test = "--test" in args
    fd_text = _value(args, "--fd") or os.environ.get("HULL_AGENT_FD")
    is_init = os.getpid() == 1 and not test
    if is_init:
        from hull.agent import init

        init.early_setup()
        mark("init")
    elif test:
        _isolate()
    share_dir = _value(args, "--share-dir") if test else None
    if test and share_dir is None:
        log("--test needs --share-dir")
        return 2
    vsock_port = _vsock_port(args, is_init)
    from hull.agent.server import Options, Server

    options = Options(init=is_init, run_dir=_value(args, "--run-dir") or "/run/hull",
                      share_dir=share_dir, no_pivot=test and "--no-pivot" in args,
                      cgroup_root=_value(args, "--cgroup-root") if test else "/sys/fs/cgroup",
                      vsock_port=vsock_port)
    try:
        server = Server(options, None if fd_text is None else int(fd_text))
        mark("loaded")
        status = server.run()
    except BaseException:
        if not is_init:
            raise
        import traceback

        log(f"fatal:\n{traceback.format_exc()}")
        status = 1
    if is_init:  # PID 1 must not exit: the kernel would panic
        _power_off()
    return status


def _value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _vsock_port(args: list[str], is_init: bool) -> int | None:
    """The vsock port to listen on: ``--vsock-port``, or as PID 1 the kernel's
    ``hull.vsock_port=`` (a dotted word: the kernel keeps it from init's arguments)."""
    from hull.agentapi.framing import VSOCK_PORT_PARAM

    text = _value(args, "--vsock-port")
    if text is None and is_init:
        try:
            with open("/proc/cmdline") as f:
                text = _value(f.read().split(), VSOCK_PORT_PARAM)
        except OSError as exc:
            log(f"/proc/cmdline: {exc.strerror}")
    if text is None:
        return None
    if not text.isdigit() or not 0 < int(text) < 0xFFFFFFFF:
        log(f"vsock port {text!r} is not a port number; using the virtio-serial port")
        return None
    return int(text)


def _isolate() -> None:
    """Test mode: keep container mounts off the host and reap reparented containers."""
    from hull.agent import syscalls as sc

    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def _power_off() -> None:
    from hull.agent import syscalls as sc

    os.sync()
    try:
        sc.reboot(sc.RB_POWER_OFF)
    except OSError as exc:
        log(f"power off: {exc.strerror}")
    import time

    while True:  # never return from PID 1
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
