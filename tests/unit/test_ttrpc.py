"""ttrpc framing, server and client against real unix sockets (no containerd)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hull.shim import ttrpc
from hull.shim.proto import ttrpc_pb2
from hull.shim.ttrpc import Code, Context, Frame, MessageType, TTRPCError

SERVICE = "test.v1.Echo"


class Fixture:
    def __init__(self, path: Path, server: ttrpc.Server) -> None:
        self.path, self.server = path, server
        self.release = asyncio.Event()
        self.seen_ns: list[str] = []

    async def client(self) -> ttrpc.Client:
        return await ttrpc.Client.connect(f"unix://{self.path}")

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(str(self.path))


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[Fixture]:
    path = tmp_path / "t.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    server = ttrpc.Server()
    fx = Fixture(path, server)

    async def echo_(payload: bytes, ctx: Context) -> bytes:
        fx.seen_ns.append(ctx.namespace)
        return payload

    async def block(payload: bytes, ctx: Context) -> bytes:
        await fx.release.wait()
        return b"released"

    async def fail(payload: bytes, ctx: Context) -> bytes:
        raise TTRPCError(Code.NOT_FOUND, "task x not found")

    async def crash(payload: bytes, ctx: Context) -> bytes:
        raise RuntimeError("bug")

    server.register(SERVICE, {"Echo": echo_, "Block": block, "Fail": fail, "Crash": crash})
    await server.start(sock)
    yield fx
    await server.close()


def request(method: str, payload: bytes = b"", service: str = SERVICE) -> bytes:
    return ttrpc_pb2.Request(service=service, method=method, payload=payload
                             ).SerializeToString()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, ttrpc_pb2.Response]:
    frame = await ttrpc.read_frame(reader)
    assert frame is not None and frame.type == MessageType.RESPONSE
    response = ttrpc_pb2.Response()
    response.ParseFromString(frame.data)
    return frame.stream, response


async def assert_dropped(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def assert_still_serving(fx: Fixture) -> None:
    client = await fx.client()
    try:
        assert await client.call(SERVICE, "Echo", b"alive") == b"alive"
    finally:
        await client.close()


def test_frame_header_layout() -> None:
    data = Frame(7, MessageType.RESPONSE, 0x1, b"abc").encode()
    assert data == struct.pack(">IIBB", 3, 7, 2, 1) + b"abc"
    with pytest.raises(ttrpc.FrameError):
        Frame(1, 1, 0, b"x" * (ttrpc.MAX_DATA + 1)).encode()


async def test_round_trip_and_namespace_metadata(echo: Fixture) -> None:
    client = await echo.client()
    try:
        out = await client.call(SERVICE, "Echo", b"hello",
                                metadata={ttrpc.NAMESPACE_KEY: "k8s.io"})
        assert out == b"hello"
        assert echo.seen_ns == ["k8s.io"]
    finally:
        await client.close()


async def test_unknown_service_and_method_are_unimplemented(echo: Fixture) -> None:
    client = await echo.client()
    try:
        for service, method in ((SERVICE, "Nope"), ("other.Service", "Echo")):
            with pytest.raises(TTRPCError) as err:
                await client.call(service, method, b"")
            assert err.value.code == Code.UNIMPLEMENTED
        assert await client.call(SERVICE, "Echo", b"x") == b"x"
    finally:
        await client.close()


async def test_handler_status_codes(echo: Fixture) -> None:
    client = await echo.client()
    try:
        with pytest.raises(TTRPCError) as err:
            await client.call(SERVICE, "Fail", b"")
        assert err.value.code == Code.NOT_FOUND and "not found" in err.value.message
        with pytest.raises(TTRPCError) as err:
            await client.call(SERVICE, "Crash", b"")
        assert err.value.code == Code.INTERNAL
    finally:
        await client.close()


async def test_concurrent_requests_on_one_connection(echo: Fixture) -> None:
    client = await echo.client()
    try:
        blocked = asyncio.create_task(client.call(SERVICE, "Block", b""))
        await asyncio.sleep(0.05)
        # A second call on the same connection is answered while the first one waits.
        assert await client.call(SERVICE, "Echo", b"second") == b"second"
        assert not blocked.done()
        echo.release.set()
        assert await asyncio.wait_for(blocked, 5) == b"released"
    finally:
        await client.close()


async def test_request_timeout_is_deadline_exceeded(echo: Fixture) -> None:
    client = await echo.client()
    try:
        with pytest.raises(TTRPCError) as err:
            await client.call(SERVICE, "Block", b"", timeout=0.1)
        assert err.value.code == Code.DEADLINE_EXCEEDED
    finally:
        await client.close()


async def test_garbage_frame_type_drops_the_connection(echo: Fixture) -> None:
    reader, writer = await echo.raw()
    writer.write(struct.pack(">IIBB", 4, 1, 9, 0) + b"junk")
    await assert_dropped(reader)
    writer.close()
    await assert_still_serving(echo)


async def test_random_bytes_drop_the_connection(echo: Fixture) -> None:
    reader, writer = await echo.raw()
    writer.write(b"\xff" * 64)  # length 0xffffffff: oversized
    await assert_dropped(reader)
    writer.close()
    await assert_still_serving(echo)


async def test_oversized_frame_drops_the_connection(echo: Fixture) -> None:
    reader, writer = await echo.raw()
    writer.write(struct.pack(">IIBB", ttrpc.MAX_DATA + 1, 1, 1, 0))
    await assert_dropped(reader)
    writer.close()
    await assert_still_serving(echo)


async def test_truncated_frames_do_not_stop_the_server(echo: Fixture) -> None:
    for data in (b"\x00\x00\x00", struct.pack(">IIBB", 100, 1, 1, 0) + b"short"):
        _, writer = await echo.raw()
        writer.write(data)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.05)
    assert echo.server.connections == 0
    await assert_still_serving(echo)


async def test_undecodable_request_is_invalid_argument(echo: Fixture) -> None:
    reader, writer = await echo.raw()
    writer.write(Frame(1, MessageType.REQUEST, 0, b"\xff\xff\xff").encode())
    stream, response = await read_response(reader)
    assert stream == 1 and response.status.code == Code.INVALID_ARGUMENT
    # The connection stays usable, as with the Go server.
    writer.write(Frame(3, MessageType.REQUEST, 0, request("Echo", b"ok")).encode())
    stream, response = await read_response(reader)
    assert stream == 3 and response.status.code == 0 and response.payload == b"ok"
    writer.close()


async def test_even_stream_id_is_refused(echo: Fixture) -> None:
    reader, writer = await echo.raw()
    writer.write(Frame(2, MessageType.REQUEST, 0, request("Echo", b"x")).encode())
    stream, response = await read_response(reader)
    assert stream == 2 and response.status.code == Code.INVALID_ARGUMENT
    writer.close()


async def test_response_frame_from_a_client_drops_it(echo: Fixture) -> None:
    reader, writer = await echo.raw()
    writer.write(Frame(1, MessageType.RESPONSE, 0, b"").encode())
    await assert_dropped(reader)
    writer.close()
    await assert_still_serving(echo)


async def test_client_fails_pending_calls_when_the_server_goes(echo: Fixture) -> None:
    client = await echo.client()
    blocked = asyncio.create_task(client.call(SERVICE, "Block", b""))
    await asyncio.sleep(0.05)
    await echo.server.close()
    with pytest.raises(TTRPCError) as err:
        await asyncio.wait_for(blocked, 5)
    assert err.value.code == Code.UNAVAILABLE
    await client.close()


async def test_connect_to_nothing_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(TTRPCError) as err:
        await ttrpc.Client.connect(str(tmp_path / "missing.sock"))
    assert err.value.code == Code.UNAVAILABLE
