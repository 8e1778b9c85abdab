"""Coverage-guided fuzzing (atheris, libFuzzer) of the host-side decoders of guest frames.

Run by tests/unit/test_fuzz.py in a subprocess, with libFuzzer's flags after the script:

    python tests/unit/atheris_decoders.py CORPUS_DIR -runs=100000 -seed=1

Each input is bytes as a hostile guest would write them to the channel. They go through
one frame decoder into the host's AgentChannel and into the proxy's Router, both kept
across inputs so that state built by one input (open streams, windows, pending
requests) meets the next. Only the protocol's own errors may come out: anything else
is a crash, and libFuzzer exits non-zero with the input that caused it.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import atheris

with atheris.instrument_imports(include=["hull"]):
    from hull.agentapi import framing, schema
    from hull.proxy.channel import AgentChannel, InboundStream
    from hull.proxy.router import Router

EXPECTED = (framing.FrameError, schema.SchemaError)


class Discard(InboundStream):
    """A process stream whose consumer takes everything at once (no task to schedule:
    libFuzzer calls the target synchronously, inside the running event loop)."""

    def __init__(self, channel: AgentChannel, stream: int) -> None:
        self.channel, self.stream = channel, stream
        self.closed = asyncio.Event()

    def put(self, data: bytes | None) -> None:
        if data is None:
            self.closed.set()


class Target:
    def __init__(self) -> None:
        self.host, self.guest = socket.socketpair()
        self.router_host, self.router_guest = socket.socketpair()
        self.channel = AgentChannel(self.host, "fuzz",
                                    on_event=lambda e: schema.ProcessExit.from_json(e))
        self.router = Router("fuzz", lambda why: None)

    async def open(self) -> None:
        await self.channel.open()
        await self.router.attach(self.router_host)

    def __call__(self, data: bytes) -> None:
        # Stream 1 open with an empty window, as for a running process.
        self.channel._recv = framing.ReceiveWindow()
        self.channel._recv.open(1)
        self.channel._inbound.setdefault(1, Discard(self.channel, 1))
        decoder = framing.Decoder()
        try:
            for frame in decoder.feed(data):
                self.channel._dispatch(frame)
                self.router._from_agent(frame)
        except EXPECTED:
            pass
        if decoder.buffered > framing.HEADER_SIZE + framing.MAX_PAYLOAD:
            raise AssertionError(f"decoder holds {decoder.buffered} bytes")


async def fuzz() -> None:
    target = Target()
    await target.open()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()  # runs -runs=N inputs, then exits the process


def main() -> None:
    asyncio.run(fuzz())


if __name__ == "__main__":
    main()
