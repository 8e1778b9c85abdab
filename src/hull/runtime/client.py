"""Short-lived connections from CLI commands to a sandbox's proxy."""

from __future__ import annotations

import asyncio
from typing import Any

from hull.agentapi import schema
from hull.errors import HullError
from hull.proxy.channel import AgentChannel
from hull.runtime.proxysock import connect
from hull.runtime.state import ContainerDir


async def _call(cdir: ContainerDir, method: schema.Method, payload: dict[str, Any],
                timeout: float) -> dict[str, Any]:
    channel = AgentChannel(connect(cdir), f"container {cdir.id}")
    await channel.open()
    try:
        return await channel.request(method, payload, timeout=timeout)
    finally:
        await channel.close()


#: How long a CLI command waits for the agent: a hung guest must become a clear error
#: quickly (clients such as podman treat a hanging runtime as a hung container).
TIMEOUT = 5.0


def call(cdir: ContainerDir, method: schema.Method, payload: Any = None,
         timeout: float = TIMEOUT) -> dict[str, Any]:
    body = payload if isinstance(payload, dict) or payload is None else schema.params(payload)
    try:
        return asyncio.run(_call(cdir, method, body or {}, timeout))
    except HullError:
        raise
    except OSError as exc:
        raise HullError(f"container {cdir.id}: {exc}") from exc
