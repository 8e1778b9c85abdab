"""The long-lived shim daemon of a pod: serves the Task service on the socket ``start``
bound, in the process ``start`` forked (hull.shim.v2.main)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time

from hull.logids import ContainerIdFilter

log = logging.getLogger("hull.shim")


async def serve(namespace: str, containerd_address: str, task_id: str,
                sock: socket.socket, state_root: str) -> int:
    import asyncio
    from pathlib import Path

    from hull.config import settings
    from hull.shim import ttrpc
    from hull.shim.v2 import service
    from hull.shim.v2.events import Publisher
    from hull.shim.v2.pod import Pod

    sock_path = sock.getsockname()
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or f"{containerd_address}.ttrpc"
    publisher = Publisher(ttrpc_address, namespace)
    pod = Pod(namespace, Path(state_root), publisher,
              lambda path: settings.load(path or None))
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    server = ttrpc.Server()
    server.register(service.SERVICE, service.TaskService(pod, done.set).handlers())
    await server.start(sock)
    log.info("shim for %s/%s serving on %s", namespace, task_id, sock_path)
    try:
        await done.wait()
    finally:
        await pod.close()
        await publisher.close()
        await server.close()
        with contextlib.suppress(OSError):
            os.unlink(sock_path)
    return 0


#: Libraries whose debug and info lines are per-message chatter, costly to format (a
#: netlink message, a QMP exchange): only their warnings are kept.
CHATTY = ("pyroute2", "qemu.qmp")


def _not_chatty(record: logging.LogRecord) -> bool:
    # A filter, not a level: importing pyroute2 resets its logger's level to NOTSET.
    return record.levelno >= logging.WARNING or not record.name.startswith(CHATTY)


def setup_logging(task_id: str, debug: bool) -> None:
    """Log lines on stderr (containerd's `log` fifo once serving), each with the id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContainerIdFilter(task_id or "-"))
    handler.addFilter(_not_chatty)
    # containerd copies these lines to its log as they are, without a time of its own:
    # the shim stamps them (ms: benchmarks/bench_pods.py reads where the time went).
    formatter = logging.Formatter(
        "hull-shim %(asctime)s.%(msecs)03dZ %(levelname)s [%(container_id)s] %(name)s: "
        "%(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime  # UTC, as containerd's own lines
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Hull's own loggers report through the root handler here (the CLI gives "hull" a
    # handler of its own; the shim process must not depend on what else configured it).
    hull_logger = logging.getLogger("hull")
    hull_logger.handlers.clear()
    hull_logger.propagate = True
    root.setLevel(logging.DEBUG if debug else logging.INFO)
