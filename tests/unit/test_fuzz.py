"""Hostile guest: the host-side decoders fed 100,000 garbage, truncated, oversized and
mutated frames. Only the protocol's own errors may come out, and memory stays bounded."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.proxy.channel import AgentChannel, InboundStream

FRAMES = 100_000
EXPECTED = (framing.FrameError, schema.SchemaError)

SEEDS = [
    Frame(Kind.RESPONSE, 0, schema.encode({"id": 1, "result": {"pid": 5}})),
    Frame(Kind.RESPONSE, 0, schema.encode({"id": 2, "error": {"kind": "state", "message": "x"}})),
    Frame(Kind.EVENT, 0, schema.encode({"event": "process_exit", "container_id": "c",
                                        "exec_id": "", "status": 0})),
    Frame(Kind.DATA, 1, b"hello"),
    Frame(Kind.CLOSE, 1),
    framing.credit_frame(2, 100),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.3 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif choice < 0.5:
            buf = buf[: rng.randrange(len(buf) + 1)]  # truncated
        elif choice < 0.7:
            buf += rng.randbytes(rng.randint(1, 64))
        elif choice < 0.85 and len(buf) >= framing.HEADER_SIZE:
            # a lying length: up to far beyond the limit
            buf[8:12] = rng.choice([0, 1, framing.MAX_PAYLOAD, framing.MAX_PAYLOAD + 1,
                                    2**32 - 1, rng.randrange(2**32)]).to_bytes(4, "big")
        else:
            buf = bytearray(rng.randbytes(rng.randint(0, 32)))
    return bytes(buf)


def hostile_input(wire: bytes, dispatch: Callable[[Frame], None]) -> int:
    """Decode ``wire`` into ``dispatch``: 1 if the protocol refused it, 0 if it passed.
    Any other exception fails the test, and the decoder must stay bounded."""
    decoder = framing.Decoder()
    try:
        for frame in decoder.feed(wire):
            dispatch(frame)
    except EXPECTED:
        return 1
    finally:
        assert decoder.buffered <= framing.HEADER_SIZE + framing.MAX_PAYLOAD
    return 0


async def _fuzz_channel(rng: random.Random, count: int) -> int:
    errors = 0
    host, guest = socket.socketpair()
    try:
        channel = AgentChannel(host, "fuzz", on_event=lambda e: schema.ProcessExit.from_json(e))
        await channel.open()
        channel.open_inbound(_discard)  # stream 1 open, as for a real process
        for _ in range(count):
            errors += hostile_input(mutate(rng, rng.choice(SEEDS).encode()), channel._dispatch)
            # Reset stream 1 to open with an empty window for the next frame.
            channel._recv = framing.ReceiveWindow()
            channel._recv.open(1)
            if 1 not in channel._inbound:
                channel._inbound[1] = InboundStream(channel, 1, _discard)
        await channel.close()
    finally:
        host.close()
        guest.close()
    return errors


async def _discard(data: bytes) -> None:
    return None


def test_hundred_thousand_hostile_frames() -> None:
    rng = random.Random(20261126)
    errors = asyncio.run(_fuzz_channel(rng, FRAMES))
    assert errors > FRAMES // 4  # most mutations must have been caught as errors


def test_a_flood_of_partial_frames_stays_bounded() -> None:
    decoder = framing.Decoder()
    header = framing.HEADER.pack(Kind.DATA, 0, 0, 1, framing.MAX_PAYLOAD)
    decoder.feed(header)
    for _ in range(100):
        decoder.feed(b"x" * 8192)
    assert decoder.buffered <= framing.HEADER_SIZE + framing.MAX_PAYLOAD


async def _fuzz_router(rng: random.Random, count: int) -> int:
    from hull.proxy.router import Router

    errors = 0
    host, guest = socket.socketpair()
    violations: list[str] = []
    router = Router("fuzz", violations.append)
    await router.attach(host)
    try:
        for _ in range(count):
            errors += hostile_input(mutate(rng, rng.choice(SEEDS).encode()), router._from_agent)
        await router.close()
    finally:
        host.close()
        guest.close()
    return errors


def test_the_proxy_router_survives_hostile_frames() -> None:
    rng = random.Random(7)
    errors = asyncio.run(_fuzz_router(rng, FRAMES // 2))
    assert errors > FRAMES // 8


def test_atheris_coverage_guided_fuzzing_of_the_decoders(tmp_path: Path) -> None:
    """libFuzzer (atheris) mutates the seed frames guided by coverage of hull's decoders:
    100,000 inputs into the host channel and the proxy's router, no crash allowed."""
    pytest.importorskip("atheris", reason="atheris has no wheel for this platform")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number, frame in enumerate(SEEDS):
        (corpus / f"seed{number}").write_bytes(frame.encode())
    target = Path(__file__).with_name("atheris_decoders.py")
    done = subprocess.run(
        [sys.executable, str(target), str(corpus), f"-runs={FRAMES}", "-seed=20261126",
         "-max_len=4096", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {FRAMES} runs" in done.stderr
