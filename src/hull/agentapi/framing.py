"""Length-prefixed, size-bounded frames multiplexed over the single host<->guest channel.

Wire format of one frame (all integers big-endian)::

    kind:u8  flags:u8  reserved:u16  stream:u32  length:u32  payload[length]

Stream 0 carries the control protocol (REQUEST, RESPONSE, EVENT frames holding JSON).
Every other stream id names one byte stream of one process (its stdin, stdout or stderr);
the host allocates the ids when it asks for a process and tells the agent which is which.

Byte streams are flow-controlled per stream by credits, so one busy stream can neither
starve the control stream nor make the receiver buffer without bound: a sender may have
at most the peer's granted window of unacknowledged DATA bytes in flight; the receiver
returns CREDIT frames (payload: u32 byte count) as it hands data on to its consumer.

The decoder never trusts the peer: a length above ``MAX_PAYLOAD``, an unknown kind or a
nonzero reserved field is a :class:`FrameError`, after which the channel must be dropped.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import IntEnum
else:  # every CLI shim imports this module: no enum (hull.agentapi.enums says why)
    from hull.agentapi.enums import IntEnum

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size
#: Upper bound of any payload; control messages and data chunks both fit in it.
MAX_PAYLOAD = 1 << 20
#: Largest DATA chunk a sender emits (it may send less). Large: the guest agent runs
#: under TCG, where each chunk costs a fixed ~1 ms of Python and syscalls; 64 KiB chunks
#: held stdout to ~20-40 MB/s, 1 MiB ones reach ~100 (docs/performance.md).
MAX_DATA_CHUNK = MAX_PAYLOAD
#: Bytes of DATA each side may have in flight per stream before it needs CREDIT: a few
#: chunks, so the sender never idles while credit makes its round trip.
INITIAL_WINDOW = 4 * MAX_DATA_CHUNK
CONTROL_STREAM = 0
#: Kernel command-line word (``hull.vsock_port=N``) that makes the channel vsock: the
#: agent listens on that AF_VSOCK port and the host connects to it. Without the word the
#: channel is the virtio-serial port named "hull.agent".
VSOCK_PORT_PARAM = "hull.vsock_port"
VSOCK_PORT = 1024
_CREDIT = struct.Struct(">I")


class Kind(IntEnum):
    REQUEST = 1  # control: {"id", "method", "params"}
    RESPONSE = 2  # control: {"id", "result"} or {"id", "error": {"kind", "message"}}
    EVENT = 3  # control: {"event", ...} sent by the agent unasked
    DATA = 4  # bytes of one stream
    CLOSE = 5  # the sender will send no more DATA on this stream (EOF)
    CREDIT = 6  # u32: the receiver consumed that many bytes of this stream


class FrameError(ValueError):
    """The peer sent bytes that are not a valid frame."""


class Frame:
    """One frame (immutable). A plain class, not a dataclass: it is made for every frame
    on both sides, and the guest agent must not import dataclasses (see records.py)."""

    __slots__ = ("flags", "kind", "payload", "stream")
    kind: Kind
    stream: int
    payload: bytes
    flags: int

    def __init__(self, kind: Kind, stream: int, payload: bytes = b"", flags: int = 0) -> None:
        _set = object.__setattr__
        _set(self, "kind", kind)
        _set(self, "stream", stream)
        _set(self, "payload", payload)
        _set(self, "flags", flags)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a Frame")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Frame:
            return NotImplemented
        assert isinstance(other, Frame)
        return (self.kind, self.stream, self.payload, self.flags) == (
            other.kind, other.stream, other.payload, other.flags)

    def __hash__(self) -> int:
        return hash((self.kind, self.stream, self.payload, self.flags))

    def __repr__(self) -> str:
        return (f"Frame(kind={self.kind!r}, stream={self.stream!r}, payload="
                f"{self.payload!r}, flags={self.flags!r})")

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise FrameError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        return HEADER.pack(self.kind, self.flags, 0, self.stream, len(self.payload)) + self.payload


def credit_frame(stream: int, count: int) -> Frame:
    return Frame(Kind.CREDIT, stream, _CREDIT.pack(count))


def credit_value(frame: Frame) -> int:
    if len(frame.payload) != _CREDIT.size:
        raise FrameError(f"credit frame on stream {frame.stream} has a bad payload size")
    value: int = _CREDIT.unpack(frame.payload)[0]
    if value == 0 or value > INITIAL_WINDOW:
        raise FrameError(f"credit of {value} on stream {frame.stream} is out of range")
    return value


class Decoder:
    """Incremental decoder: feed bytes, take complete frames.

    Memory stays bounded: at most one header plus ``max_payload`` bytes are buffered,
    because a larger declared length is refused as soon as the header arrives.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER_SIZE:
            kind, flags, reserved, stream, length = HEADER.unpack_from(self._buf)
            if reserved != 0:
                raise FrameError("frame header has nonzero reserved bits")
            try:
                frame_kind = Kind(kind)
            except ValueError:
                raise FrameError(f"unknown frame kind {kind}") from None
            if length > self._max:
                raise FrameError(f"frame of {length} bytes exceeds the limit of {self._max}")
            if frame_kind in _CONTROL_KINDS and stream != CONTROL_STREAM:
                raise FrameError(f"{frame_kind.name} frame on data stream {stream}")
            if frame_kind not in _CONTROL_KINDS and stream == CONTROL_STREAM:
                raise FrameError(f"{frame_kind.name} frame on the control stream")
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            frames.append(Frame(frame_kind, stream, bytes(self._buf[HEADER_SIZE:end]), flags))
            del self._buf[:end]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


_CONTROL_KINDS = frozenset({Kind.REQUEST, Kind.RESPONSE, Kind.EVENT})


class SendWindow:
    """Credit accounting for the streams this side sends on."""

    def __init__(self) -> None:
        self._credit: dict[int, int] = {}

    def open(self, stream: int) -> None:
        self._credit[stream] = INITIAL_WINDOW

    def close(self, stream: int) -> None:
        self._credit.pop(stream, None)

    def available(self, stream: int) -> int:
        return self._credit.get(stream, 0)

    def consume(self, stream: int, count: int) -> None:
        left = self._credit.get(stream, 0) - count
        if left < 0:
            raise FrameError(f"stream {stream} sent beyond its window")
        self._credit[stream] = left

    def grant(self, stream: int, count: int) -> None:
        """Add credit the peer returned; more than the window means the peer lies."""
        if stream not in self._credit:
            return  # credit for a stream already closed here: harmless, ignore
        total = self._credit[stream] + count
        if total > INITIAL_WINDOW:
            raise FrameError(f"peer granted stream {stream} more credit than the window")
        self._credit[stream] = total


class ReceiveWindow:
    """What the peer may still send on each stream this side receives; enforces the window."""

    def __init__(self) -> None:
        self._outstanding: dict[int, int] = {}

    def open(self, stream: int) -> None:
        self._outstanding[stream] = 0

    def close(self, stream: int) -> None:
        self._outstanding.pop(stream, None)

    def is_open(self, stream: int) -> bool:
        return stream in self._outstanding

    def received(self, stream: int, count: int) -> None:
        if stream not in self._outstanding:
            raise FrameError(f"data on stream {stream}, which is not open")
        total = self._outstanding[stream] + count
        if total > INITIAL_WINDOW:
            raise FrameError(f"peer overran the window of stream {stream}")
        self._outstanding[stream] = total

    def consumed(self, stream: int, count: int) -> bool:
        """Record bytes handed on; True when a CREDIT frame should go back to the peer."""
        if stream not in self._outstanding:
            return False
        self._outstanding[stream] = max(0, self._outstanding[stream] - count)
        return True
