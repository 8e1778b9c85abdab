"""Publishing task events to containerd: ``Events.Forward`` over ttrpc to $TTRPC_ADDRESS.

How a containerd 1.6/1.7 shim publishes (INTEGRATION.md §2 "Events"; containerd
runtime/v2/shim/publisher.go): service ``containerd.services.events.ttrpc.v1.Events``,
method ``Forward``, an Envelope with the namespace, the topic and the event as an Any
whose type_url is the bare proto name (``containerd.events.TaskExit``).

The contract orders events (create, start, exit, delete; exec-added, exec-started,
exit), so they go out one at a time from a FIFO queue. A failed forward is retried with
a fresh connection (containerd may be restarting) a few times, then dropped and logged,
as the runc shim's publisher does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from hull.shim import ttrpc
from hull.shim.proto import events_service_pb2

log = logging.getLogger("hull.shim.events")
SERVICE = "containerd.services.events.ttrpc.v1.Events"
ATTEMPTS = 5
CALL_TIMEOUT = 5.0

TOPICS = {
    "TaskCreate": "/tasks/create", "TaskStart": "/tasks/start", "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete", "TaskOOM": "/tasks/oom",
    "TaskExecAdded": "/tasks/exec-added", "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused", "TaskResumed": "/tasks/resumed",
}


def envelope(namespace: str, event: Message) -> events_service_pb2.ForwardRequest:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.GetCurrentTime()
    name = event.DESCRIPTOR.full_name
    return events_service_pb2.ForwardRequest(envelope=events_service_pb2.Envelope(
        timestamp=timestamp, namespace=namespace, topic=TOPICS[event.DESCRIPTOR.name],
        event=any_pb2.Any(type_url=name, value=event.SerializeToString())))


class Publisher:
    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._client: ttrpc.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        self._queue.put_nowait(event)

    async def _run(self) -> None:
        while (event := await self._queue.get()) is not None:
            await self._forward(event)

    async def _forward(self, event: Message) -> None:
        request = envelope(self.namespace, event).SerializeToString()
        for attempt in range(ATTEMPTS):
            try:
                if self._client is None or self._client.closed.is_set():
                    self._client = await ttrpc.Client.connect(self.address)
                await self._client.call(SERVICE, "Forward", request,
                                        metadata={ttrpc.NAMESPACE_KEY: self.namespace},
                                        timeout=CALL_TIMEOUT)
                return
            except ttrpc.TTRPCError as exc:
                log.debug("forward %s failed (attempt %d): %s", event.DESCRIPTOR.name,
                          attempt + 1, exc)
                await self._drop_client()
                await asyncio.sleep(0.1 * 2 ** attempt)
        log.error("event %s dropped: containerd at %s does not take it",
                  event.DESCRIPTOR.name, self.address)

    async def _drop_client(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within timeout), then disconnect."""
        if self._task is not None:
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.warning("events still queued at shutdown were dropped")
            with contextlib.suppress(asyncio.CancelledError):
                self._task.cancel()
        await self._drop_client()
