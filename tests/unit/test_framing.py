import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hull.agentapi import framing
from hull.agentapi.framing import Frame, FrameError, Kind


def test_round_trip_in_pieces() -> None:
    frames = [Frame(Kind.REQUEST, 0, b'{"id":1}'), Frame(Kind.DATA, 7, b"x" * 70000),
              Frame(Kind.CLOSE, 7), framing.credit_frame(9, 4096)]
    wire = b"".join(f.encode() for f in frames)
    decoder = framing.Decoder()
    got = []
    for i in range(0, len(wire), 333):
        got += decoder.feed(wire[i:i + 333])
    assert got == frames
    assert decoder.buffered == 0
    assert framing.credit_value(got[3]) == 4096


def test_oversized_length_is_refused_at_the_header() -> None:
    header = framing.HEADER.pack(Kind.DATA, 0, 0, 3, framing.MAX_PAYLOAD + 1)
    with pytest.raises(FrameError, match="exceeds"):
        framing.Decoder().feed(header)


@pytest.mark.parametrize("header", [
    framing.HEADER.pack(99, 0, 0, 1, 0),  # unknown kind
    framing.HEADER.pack(Kind.DATA, 0, 1, 1, 0),  # reserved bits
    framing.HEADER.pack(Kind.DATA, 0, 0, 0, 0),  # data on the control stream
    framing.HEADER.pack(Kind.RESPONSE, 0, 0, 5, 0),  # control on a data stream
])
def test_bad_headers(header: bytes) -> None:
    with pytest.raises(FrameError):
        framing.Decoder().feed(header)


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"12345"])
def test_bad_credit(payload: bytes) -> None:
    with pytest.raises(FrameError):
        framing.credit_value(Frame(Kind.CREDIT, 3, payload))


def test_windows_enforce_the_limit() -> None:
    send, recv = framing.SendWindow(), framing.ReceiveWindow()
    send.open(3)
    recv.open(3)
    send.consume(3, framing.INITIAL_WINDOW)
    recv.received(3, framing.INITIAL_WINDOW)
    assert send.available(3) == 0
    with pytest.raises(FrameError):
        recv.received(3, 1)
    with pytest.raises(FrameError):
        send.consume(3, 1)
    assert recv.consumed(3, 1000)
    send.grant(3, 1000)
    assert send.available(3) == 1000
    with pytest.raises(FrameError):
        send.grant(3, framing.INITIAL_WINDOW)
    with pytest.raises(FrameError):
        recv.received(4, 1)  # never opened


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_garbage_never_crashes_the_decoder(data: bytes) -> None:
    decoder = framing.Decoder()
    try:
        for frame in decoder.feed(data):
            assert len(frame.payload) <= framing.MAX_PAYLOAD
    except FrameError:
        pass
    assert decoder.buffered <= framing.HEADER_SIZE + framing.MAX_PAYLOAD
