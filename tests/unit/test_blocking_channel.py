"""BlockingChannel (the shims' synchronous agent channel) against a fake peer on a
socketpair (no VM): RPC, ignored responses, output streams with credit, input waiting for
credit, drain, and hostile input."""

from __future__ import annotations

import os
import select
import socket
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from hull.agentapi import framing, schema
from hull.agentapi.framing import Frame, Kind
from hull.errors import AgentError, InvalidState, ProtocolError
from hull.proxy.blocking import BlockingChannel


class Peer:
    """The proxy's side, driven by the test (blocking, with a timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.decoder = framing.Decoder()
        self.pending: deque[Frame] = deque()

    def frame(self) -> Frame:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "host closed"
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    def send(self, frame: Frame) -> None:
        self.sock.sendall(frame.encode())

    def reply(self, rid: int, result: dict[str, Any] | None = None,
              error: tuple[str, str] | None = None) -> None:
        body: dict[str, Any] = {"id": rid}
        if error:
            body["error"] = {"kind": error[0], "message": error[1]}
        else:
            body["result"] = result or {}
        self.send(Frame(Kind.RESPONSE, 0, schema.encode(body)))


@pytest.fixture
def pair() -> Iterator[tuple[BlockingChannel, Peer, list[dict[str, Any]]]]:
    host, guest = socket.socketpair()
    events: list[dict[str, Any]] = []
    channel = BlockingChannel(host, "container t", on_event=events.append)
    yield channel, Peer(guest), events
    channel.close()
    guest.close()


def feed(peer: Peer, frames: list[Frame]) -> threading.Thread:
    """Send frames from a thread: more than a socket buffer needs the host reading."""
    def send_all() -> None:
        for frame in frames:
            try:
                peer.send(frame)
            except OSError:
                return  # the host failed the channel and closed
    thread = threading.Thread(target=send_all, daemon=True)
    thread.start()
    return thread


def answer_in_thread(peer: Peer, respond: Any) -> threading.Thread:
    thread = threading.Thread(target=respond, args=(peer,), daemon=True)
    thread.start()
    return thread


def test_a_request_gets_its_result_while_events_and_ignored_responses_pass(pair: Any
                                                                           ) -> None:
    channel, peer, events = pair
    channel.notify(schema.Method.SIGNAL_PROCESS, {"container_id": "t", "signal": 15})

    def respond(peer: Peer) -> None:
        ignored = peer.frame()
        request = peer.frame()
        assert schema.decode(request.payload)["method"] == "hello"
        peer.send(Frame(Kind.EVENT, 0, schema.encode({"event": "process_exit"})))
        peer.reply(schema.decode(ignored.payload)["id"], error=("not_found", "gone"))
        peer.reply(schema.decode(request.payload)["id"], {"version": 2})

    thread = answer_in_thread(peer, respond)
    assert channel.request(schema.Method.HELLO, {}, timeout=10) == {"version": 2}
    thread.join()
    assert events == [{"event": "process_exit"}]
    assert channel.failure is None


@pytest.mark.parametrize("kind, error", [("state", InvalidState), ("internal", AgentError)])
def test_an_agent_error_is_raised_as_its_exception(pair: Any, kind: str,
                                                   error: type[Exception]) -> None:
    channel, peer, _ = pair
    thread = answer_in_thread(peer, lambda p: p.reply(
        schema.decode(p.frame().payload)["id"], error=(kind, "container t is paused")))
    with pytest.raises(error, match="container t is paused"):
        channel.request(schema.Method.START_CONTAINER, {}, timeout=10)
    thread.join()


def test_a_silent_peer_is_a_timeout_naming_the_method(pair: Any) -> None:
    channel, _, _ = pair
    with pytest.raises(AgentError, match=r"agent of container t did not answer "
                                         r"create_container within 0\.2s"):
        channel.request(schema.Method.CREATE_CONTAINER, {}, timeout=0.2)


@pytest.mark.parametrize("frame, why", [
    (Frame(Kind.RESPONSE, 0, schema.encode({"id": 99, "result": {}})), "never sent"),
    (Frame(Kind.DATA, 7, b"x"), "stream 7, which is not open"),
    (Frame(Kind.CLOSE, 7), "close of stream 7"),
    (Frame(Kind.REQUEST, 0, schema.encode({"id": 1, "method": "hello", "params": {}})),
     "unexpected REQUEST"),
])
def test_hostile_frames_fail_the_channel_and_the_waiter(pair: Any, frame: Frame,
                                                        why: str) -> None:
    channel, peer, _ = pair
    peer.send(frame)
    with pytest.raises(ProtocolError, match="protocol violation"):
        channel.request(schema.Method.HELLO, {}, timeout=10)
    assert channel.failure is not None and why in channel.failure


def test_garbage_bytes_and_eof_fail_the_channel(pair: Any) -> None:
    channel, peer, _ = pair
    peer.sock.sendall(b"\xff" * 16)
    channel.pump(10)
    assert channel.failure is not None and "protocol violation" in channel.failure
    host, guest = socket.socketpair()
    other = BlockingChannel(host, "container u")
    guest.close()
    other.pump(10)
    other.close()
    assert other.failure == "the guest closed the channel"
    with pytest.raises(ProtocolError, match="the guest closed the channel"):
        other.request(schema.Method.HELLO, {}, timeout=10)


def test_output_reaches_the_fd_in_order_and_credit_goes_back(pair: Any) -> None:
    channel, peer, _ = pair
    read, write = os.pipe()
    output = channel.open_output(write)
    chunks = [b"a" * 1000, b"b" * 70000, b"c"]
    sender = feed(peer, [Frame(Kind.DATA, output.stream, c) for c in chunks])
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_read_all(read)), daemon=True)
    reader.start()
    credit = 0
    while credit < sum(map(len, chunks)):  # written to the fd, then credited
        channel.pump(0.05)
        while peer.pending or _readable(peer.sock):
            credit += framing.credit_value(peer.frame())
    assert credit == sum(map(len, chunks))
    sender.join(10)
    peer.send(Frame(Kind.CLOSE, output.stream))
    channel.drain()
    os.close(write)
    reader.join(10)
    assert bytes(got) == b"".join(chunks)


def test_data_beyond_the_window_is_a_violation(pair: Any) -> None:
    channel, peer, _ = pair
    read, write = os.pipe()
    output = channel.open_output(write)
    chunk = Frame(Kind.DATA, output.stream, b"x" * framing.MAX_DATA_CHUNK)
    sender = feed(peer, [chunk] * (framing.INITIAL_WINDOW // framing.MAX_DATA_CHUNK + 1))
    while channel.failure is None:  # nobody reads the pipe: no credit goes back
        channel.pump(10)
    assert "overran the window" in channel.failure
    channel.close()
    sender.join(10)
    os.close(read)  # the writer thread, blocked on the full pipe, gets EPIPE and ends
    output.wait_closed()
    os.close(write)


def test_input_waits_for_credit_and_closes(pair: Any) -> None:
    channel, peer, _ = pair
    stream = channel.open_input()
    data = b"z" * (framing.INITIAL_WINDOW + 10)
    sender = threading.Thread(target=lambda: (channel.send_data(stream, data),
                                              channel.close_input(stream)), daemon=True)
    sender.start()
    received = 0
    while received < framing.INITIAL_WINDOW:
        received += len(peer.frame().payload)
    sender.join(0.3)
    assert sender.is_alive(), "sent beyond its window"
    peer.send(framing.credit_frame(stream, framing.MAX_DATA_CHUNK))
    pumper = threading.Thread(target=lambda: channel.pump(10), daemon=True)
    pumper.start()
    last = peer.frame()
    assert (last.kind, len(last.payload)) == (Kind.DATA, 10)
    assert peer.frame().kind is Kind.CLOSE
    sender.join(10)
    pumper.join(10)


def test_a_failure_wakes_a_sender_waiting_for_credit(pair: Any) -> None:
    channel, peer, _ = pair
    stream = channel.open_input()
    errors: list[Exception] = []

    def send() -> None:
        try:
            channel.send_data(stream, b"q" * (framing.INITIAL_WINDOW + 1))
        except ProtocolError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = 0
    while received < framing.INITIAL_WINDOW:
        received += len(peer.frame().payload)
    peer.sock.close()
    channel.pump(10)
    sender.join(10)
    assert not sender.is_alive() and errors


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0.05)[0])


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while data := os.read(fd, 65536):
        out += data
    os.close(fd)
    return bytes(out)
