"""Short-lived connections from CLI commands to a sandbox's proxy: one request each, on
a blocking channel (hull.proxy.blocking; asyncio alone would be ~25 ms of every
command's start-up)."""

from __future__ import annotations

from typing import Any

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.blocking import BlockingChannel
from hull.runtime.proxysock import connect
from hull.runtime.state import ContainerDir

#: How long a CLI command waits for the agent: a hung guest must become a clear error
#: quickly (clients such as podman treat a hanging runtime as a hung container).
TIMEOUT = 5.0


def call(cdir: ContainerDir, method: schema.Method, payload: Any = None,
         timeout: float = TIMEOUT) -> dict[str, Any]:
    body = payload if isinstance(payload, dict) or payload is None else schema.params(payload)
    try:
        channel = BlockingChannel(connect(cdir), f"container {cdir.id}")
        try:
            return channel.request(method, body or {}, timeout=timeout)
        finally:
            channel.close()
    except HullError:
        raise
    except OSError as exc:
        raise HullError(f"container {cdir.id}: {exc}") from exc
