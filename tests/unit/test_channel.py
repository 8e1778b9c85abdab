"""AgentChannel against a fake agent peer (no VM): RPC, events, streams, hostile input."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.errors import AgentError, InvalidState, ProtocolError
from hull.proxy.channel import AgentChannel


class FakeAgent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = framing.Decoder()
        self.pending: deque[Frame] = deque()
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(sock=self.sock)

    async def frame(self) -> Frame:
        while not self.pending:
            data = await self.reader.read(65536)
            assert data, "host closed"
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    def send(self, frame: Frame) -> None:
        self.writer.write(frame.encode())

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    def reply(self, rid: int, result: dict[str, Any]) -> None:
        self.send(Frame(Kind.RESPONSE, 0, schema.encode({"id": rid, "result": result})))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AgentChannel, FakeAgent, list[Any], list[str]]]:
    host, guest = socket.socketpair()
    events: list[Any] = []
    violations: list[str] = []
    channel = AgentChannel(host, "sandbox t", on_event=events.append,
                           on_violation=violations.append)
    await channel.open()
    agent = FakeAgent(guest)
    await agent.open()
    yield channel, agent, events, violations
    await channel.close()
    agent.writer.close()


async def test_request_response_and_errors(pair: Any) -> None:
    channel, agent, _, _ = pair
    call = asyncio.create_task(channel.request(schema.Method.HELLO, {"version": 1}))
    frame = await agent.frame()
    req = schema.Request.from_json(schema.decode(frame.payload))
    assert req.method is schema.Method.HELLO and req.params == {"version": 1}
    agent.reply(req.id, {"ok": True})
    assert await call == {"ok": True}

    call = asyncio.create_task(channel.request(schema.Method.START_CONTAINER, {}))
    req = schema.Request.from_json(schema.decode((await agent.frame()).payload))
    agent.send(Frame(Kind.RESPONSE, 0, schema.encode(schema.Response(
        req.id, error_kind=schema.ErrorKind.STATE, error_message="c1 is running").to_json())))
    with pytest.raises(InvalidState, match="c1 is running"):
        await call


async def test_request_timeout(pair: Any) -> None:
    channel, _, _, _ = pair
    with pytest.raises(AgentError, match="did not answer hello within"):
        await channel.request(schema.Method.HELLO, {}, timeout=0.05)


def send_window(agent: Any, stream: int) -> None:
    """A whole window of b"a", in chunks no larger than a frame may carry."""
    for _ in range(framing.INITIAL_WINDOW // framing.MAX_DATA_CHUNK):
        agent.send(Frame(Kind.DATA, stream, b"a" * framing.MAX_DATA_CHUNK))


async def test_inbound_stream_returns_credit_after_consuming(pair: Any) -> None:
    channel, agent, _, violations = pair
    got = bytearray()

    async def consume(data: bytes) -> None:
        got.extend(data)

    inbound = channel.open_inbound(consume)
    send_window(agent, inbound.stream)
    credited = 0
    while credited < framing.INITIAL_WINDOW:  # a CREDIT per chunk consumed
        credit = await agent.frame()
        assert credit.kind is Kind.CREDIT
        credited += framing.credit_value(credit)
    assert credited == framing.INITIAL_WINDOW
    agent.send(Frame(Kind.DATA, inbound.stream, b"b" * 10))
    agent.send(Frame(Kind.CLOSE, inbound.stream))
    await asyncio.wait_for(inbound.wait_closed(), 5)
    assert bytes(got) == b"a" * framing.INITIAL_WINDOW + b"b" * 10
    assert not violations


async def test_outbound_waits_for_credit(pair: Any) -> None:
    channel, agent, _, _ = pair
    stream = channel.open_outbound()
    send = asyncio.create_task(channel.send_data(stream, b"z" * (framing.INITIAL_WINDOW + 5)))
    received = 0
    while received < framing.INITIAL_WINDOW:
        frame = await agent.frame()
        assert frame.kind is Kind.DATA and frame.stream == stream
        received += len(frame.payload)
    await asyncio.sleep(0.05)
    assert not send.done()  # blocked: the window is used up
    agent.send(framing.credit_frame(stream, 5))
    frame = await agent.frame()
    assert frame.payload == b"zzzzz"
    await asyncio.wait_for(send, 5)


async def expect_violation(channel: AgentChannel, violations: list[str], text: str) -> None:
    await asyncio.wait_for(channel.closed.wait(), 5)
    assert violations and text in violations[0]
    with pytest.raises(ProtocolError):
        await channel.request(schema.Method.HELLO, {})


@pytest.mark.parametrize("bad, text", [
    (b"\x63" + b"\0" * 11, "unknown frame kind"),
    (framing.HEADER.pack(Kind.DATA, 0, 0, 99, framing.MAX_PAYLOAD + 1), "exceeds"),
    (Frame(Kind.DATA, 77, b"x").encode(), "not open"),
    (Frame(Kind.RESPONSE, 0, schema.encode({"id": 4242, "result": {}})).encode(), "never sent"),
    (Frame(Kind.RESPONSE, 0, b"not json").encode(), "not JSON"),
    (Frame(Kind.CLOSE, 5).encode(), "not open"),
    (framing.credit_frame(1, framing.INITIAL_WINDOW).encode(), ""),
])
async def test_hostile_frames_close_the_channel(pair: Any, bad: bytes, text: str) -> None:
    channel, agent, _, violations = pair
    if text == "":  # credit for a stream never opened is harmless: no violation
        agent.raw(bad)
        await asyncio.sleep(0.05)
        assert not violations and not channel.failure
        return
    agent.raw(bad)
    await expect_violation(channel, violations, text)


async def test_window_overrun_is_a_violation(pair: Any) -> None:
    channel, agent, _, violations = pair
    stall = asyncio.Event()

    async def consume(data: bytes) -> None:
        await stall.wait()

    inbound = channel.open_inbound(consume)
    send_window(agent, inbound.stream)
    agent.send(Frame(Kind.DATA, inbound.stream, b"a"))
    await expect_violation(channel, violations, "overran the window")
    stall.set()


async def test_guest_hangup_fails_pending_requests(pair: Any) -> None:
    channel, agent, _, violations = pair
    call = asyncio.create_task(channel.request(schema.Method.HELLO, {}))
    await agent.frame()
    agent.writer.close()
    with pytest.raises(ProtocolError, match="closed the channel"):
        await call
    assert not violations  # a hangup is a failure, not a protocol violation


async def test_events_are_delivered(pair: Any) -> None:
    _channel, agent, events, _ = pair
    agent.send(Frame(Kind.EVENT, 0, schema.encode({"event": "process_exit", "status": 3})))
    for _ in range(50):
        if events:
            break
        await asyncio.sleep(0.01)
    assert events == [{"event": "process_exit", "status": 3}]
