"""Wire format of the data channels between subtasks: Arrow IPC messages in length-prefixed frames.

Every frame is ``[kind: u8][length: u32 little-endian][payload: length bytes]``:

=============  =====  ==============================================================================
kind           value  payload
=============  =====  ==============================================================================
HELLO          1      UTF-8 JSON ``{"version", "job_id", "generation", "token", "channel"}``; the
                      first frame of a connection, sender -> receiver
SCHEMA         2      ``pa.Schema.serialize()``; precedes the first batch and every schema change
BATCH          3      ``pa.RecordBatch.serialize()`` (one IPC record-batch message), decoded with
                      the last schema received
WATERMARK      4      ``ts_ms`` as int64
BARRIER        5      ``epoch`` as int64, then ``then_stop`` as one byte (0 or 1)
END_OF_STREAM  6      empty
ACCEPT         7      empty; receiver -> sender: the hello was accepted, data will be read
ERROR          8      UTF-8 text; receiver -> sender: why the connection is refused or closed
IDLE           9      empty; the sender has no records for now (out of the watermark until it has)
=============  =====  ==============================================================================

Everything here is pure (no I/O) so it can be unit-tested byte for byte. Guarantees:

* :class:`MessageEncoder` never copies a batch's column data beyond Arrow's own serialisation: it
  returns the frame header and a ``memoryview`` of the serialised buffer, to be written as is.
* :class:`FrameReader` hands the transport a buffer to receive into and reads a large payload
  straight into one buffer of exactly its size, which the decoder wraps with ``pa.py_buffer``
  (zero-copy: the decoded batch's columns point into that buffer).
* Malformed input (unknown kind, oversized length, truncated frame, undecodable payload, a batch
  before any schema) raises :class:`FramingError` with a message saying what was wrong.
"""

from __future__ import annotations

import json
import re
import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import pyarrow as pa

from sluice.engine.messages import Barrier, EndOfStream, Idle, Message, Watermark

PROTOCOL_VERSION = 1
"""Version carried in the hello frame; a receiver refuses any other."""

HEADER = struct.Struct("<BI")
"""Frame header: kind (u8) and payload length (u32, little-endian)."""
HEADER_SIZE = HEADER.size  # 5

_INT64 = struct.Struct("<q")
_BARRIER = struct.Struct("<q?")

MAX_FRAME_BYTES = 1 << 30
"""Largest payload accepted once a connection is authenticated (1 GiB). A batch that serialises to
more must be split by the sender; the limit keeps garbage lengths from allocating gigabytes."""
MAX_HELLO_BYTES = 64 * 1024
"""Largest payload accepted before the hello was checked: an unauthenticated peer cannot make the
receiver allocate more than this."""

# Frames at most this large are collected in the reader's scratch buffer (one copy out of it);
# larger payloads are received straight into a buffer of their own (no copy at all).
# The scratch buffer is per connection, so it is kept small (a runner may hold hundreds).
_LARGE_FRAME_BYTES = 16 * 1024
_SCRATCH_BYTES = 64 * 1024


class FrameKind(IntEnum):
    """The kind byte of a frame."""

    HELLO = 1
    SCHEMA = 2
    BATCH = 3
    WATERMARK = 4
    BARRIER = 5
    END_OF_STREAM = 6
    ACCEPT = 7
    ERROR = 8
    IDLE = 9


_KINDS = frozenset(int(k) for k in FrameKind)


class FramingError(Exception):
    """The bytes received are not a valid frame stream (garbage, truncation, bad payload)."""


# --------------------------------------------------------------------------------------------
# Channel identity and the hello frame

_CHANNEL_STR = re.compile(r"^(?P<edge>.+)\[(?P<sender>\d+)->(?P<receiver>\d+)\]$")


@dataclass(frozen=True, slots=True)
class ChannelId:
    """Identity of one channel: the edge of the program it belongs to (e.g. ``"gen->win"``), the
    upstream subtask index that sends on it and the downstream subtask index that receives.

    ``str(channel)`` is the stable form ``"gen->win[0->3]"`` (used in logs and errors);
    :meth:`parse` reverses it; :meth:`to_dict` / :meth:`from_dict` are the hello frame's form.
    """

    edge: str
    sender: int
    receiver: int

    def __str__(self) -> str:
        return f"{self.edge}[{self.sender}->{self.receiver}]"

    @classmethod
    def parse(cls, text: str) -> ChannelId:
        """The inverse of ``str()``; raises ValueError on anything else."""
        m = _CHANNEL_STR.match(text)
        if not m:
            raise ValueError(f"not a channel id: {text!r} (expected 'edge[sender->receiver]')")
        return cls(m["edge"], int(m["sender"]), int(m["receiver"]))

    def to_dict(self) -> dict[str, Any]:
        return {"edge": self.edge, "sender": self.sender, "receiver": self.receiver}

    @classmethod
    def from_dict(cls, d: Any) -> ChannelId:
        """Validate a decoded dict (from a peer: do not trust it) into a ChannelId."""
        if not isinstance(d, dict) or set(d) != {"edge", "sender", "receiver"}:
            raise ValueError(f"channel must be an object with edge, sender, receiver; got {d!r}")
        edge, sender, receiver = d["edge"], d["sender"], d["receiver"]
        if not isinstance(edge, str) or not edge:
            raise ValueError(f"channel.edge must be a non-empty string; got {edge!r}")
        for name, v in (("sender", sender), ("receiver", receiver)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"channel.{name} must be an integer >= 0; got {v!r}")
        return cls(edge, sender, receiver)


@dataclass(frozen=True, slots=True)
class Hello:
    """The first frame of a connection: who is sending, for which job generation, on which channel,
    and the generation's runner token (see :func:`sluice.auth.runner_token`)."""

    job_id: str
    generation: int
    token: str
    channel: ChannelId
    version: int = PROTOCOL_VERSION

    def __repr__(self) -> str:
        # Never print the credential.
        return (
            f"Hello(job_id={self.job_id!r}, generation={self.generation}, channel={self.channel}, "
            f"version={self.version})"
        )


def encode_hello(hello: Hello) -> bytes:
    """The complete hello frame (header included)."""
    payload = json.dumps(
        {
            "version": hello.version,
            "job_id": hello.job_id,
            "generation": hello.generation,
            "token": hello.token,
            "channel": hello.channel.to_dict(),
        },
        separators=(",", ":"),
    ).encode()
    return HEADER.pack(FrameKind.HELLO, len(payload)) + payload


def decode_hello(payload: bytes | memoryview | pa.Buffer) -> Hello:
    """Parse and validate a hello payload; FramingError says which field is wrong."""
    try:
        d = json.loads(bytes(payload))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FramingError(f"hello is not valid JSON: {exc}") from None
    if not isinstance(d, dict):
        raise FramingError("hello must be a JSON object")
    missing = {"version", "job_id", "generation", "token", "channel"} - set(d)
    if missing:
        raise FramingError(f"hello lacks {', '.join(sorted(missing))}")
    version, job_id, generation, token = d["version"], d["job_id"], d["generation"], d["token"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise FramingError(f"hello.version must be an integer; got {version!r}")
    if not isinstance(job_id, str):
        raise FramingError(f"hello.job_id must be a string; got {job_id!r}")
    if not isinstance(generation, int) or isinstance(generation, bool):
        raise FramingError(f"hello.generation must be an integer; got {generation!r}")
    if not isinstance(token, str):
        raise FramingError("hello.token must be a string")
    try:
        channel = ChannelId.from_dict(d["channel"])
    except ValueError as exc:
        raise FramingError(f"hello: {exc}") from None
    return Hello(job_id=job_id, generation=generation, token=token, channel=channel, version=version)


def encode_accept() -> bytes:
    """The complete accept frame."""
    return HEADER.pack(FrameKind.ACCEPT, 0)


def encode_error(reason: str) -> bytes:
    """The complete error frame carrying `reason` (truncated to keep it small)."""
    payload = reason.encode("utf-8", "replace")[:4096]
    return HEADER.pack(FrameKind.ERROR, len(payload)) + payload


def decode_error(payload: bytes | memoryview | pa.Buffer) -> str:
    return bytes(payload).decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# Messages

WireBuffer = bytes | memoryview
"""What the encoder returns: buffers to hand to ``transport.write`` in order."""


class MessageEncoder:
    """Turns messages into frames for one channel (it remembers the last schema sent).

    :meth:`encode` returns the buffers to write, in order: a schema frame first when the batch's
    schema differs from the previous batch's, then the message's frame. Batch payloads are
    memoryviews of ``batch.serialize()`` (no further copy).
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._schema: pa.Schema | None = None
        self._max = max_frame_bytes

    def encode(self, msg: Message) -> list[WireBuffer]:
        if isinstance(msg, pa.RecordBatch):
            out: list[WireBuffer] = []
            schema = msg.schema
            # Metadata counts: a receiver must see exactly the schema the sender had.
            if self._schema is None or not schema.equals(self._schema, check_metadata=True):
                s = schema.serialize()
                self._check_size(s.size, "schema")
                out += [HEADER.pack(FrameKind.SCHEMA, s.size), memoryview(s).cast("B")]
                self._schema = schema
            body = msg.serialize()
            self._check_size(body.size, f"batch of {msg.num_rows} rows")
            out += [HEADER.pack(FrameKind.BATCH, body.size), memoryview(body).cast("B")]
            return out
        if isinstance(msg, Watermark):
            return [HEADER.pack(FrameKind.WATERMARK, _INT64.size) + _INT64.pack(msg.ts_ms)]
        if isinstance(msg, Barrier):
            return [HEADER.pack(FrameKind.BARRIER, _BARRIER.size) + _BARRIER.pack(msg.epoch, msg.then_stop)]
        if isinstance(msg, EndOfStream):
            return [HEADER.pack(FrameKind.END_OF_STREAM, 0)]
        if isinstance(msg, Idle):
            return [HEADER.pack(FrameKind.IDLE, 0)]
        raise TypeError(f"not a channel message: {type(msg).__name__}")

    def _check_size(self, n: int, what: str) -> None:
        if n > self._max:
            raise ValueError(
                f"{what} serialises to {n} bytes, more than the {self._max}-byte frame limit; send smaller batches"
            )


class MessageDecoder:
    """Turns data frames (kinds SCHEMA..END_OF_STREAM) back into messages for one channel.

    :meth:`decode` returns the message, or None for a schema frame (which only updates the schema
    used for the batches that follow). A batch's columns are zero-copy views of `payload`.
    """

    def __init__(self) -> None:
        self.schema: pa.Schema | None = None

    def decode(self, kind: int, payload: bytes | memoryview | pa.Buffer) -> Message | None:
        try:
            if kind == FrameKind.BATCH:
                if self.schema is None:
                    raise FramingError("batch frame before any schema frame")
                buf = payload if isinstance(payload, pa.Buffer) else pa.py_buffer(payload)
                return pa.ipc.read_record_batch(buf, self.schema)
            if kind == FrameKind.SCHEMA:
                buf = payload if isinstance(payload, pa.Buffer) else pa.py_buffer(payload)
                self.schema = pa.ipc.read_schema(buf)
                return None
            if kind == FrameKind.WATERMARK:
                self._check_len(kind, payload, _INT64.size)
                return Watermark(_INT64.unpack(bytes(payload))[0])
            if kind == FrameKind.BARRIER:
                self._check_len(kind, payload, _BARRIER.size)
                raw = bytes(payload)
                if raw[-1] not in (0, 1):
                    raise FramingError(f"barrier then_stop byte must be 0 or 1, got {raw[-1]}")
                epoch, then_stop = _BARRIER.unpack(raw)
                return Barrier(epoch=epoch, then_stop=then_stop)
            if kind == FrameKind.END_OF_STREAM:
                self._check_len(kind, payload, 0)
                return EndOfStream()
            if kind == FrameKind.IDLE:
                self._check_len(kind, payload, 0)
                return Idle()
        except pa.ArrowException as exc:
            raise FramingError(f"undecodable {FrameKind(kind).name} frame: {exc}") from None
        name = FrameKind(kind).name if kind in _KINDS else str(kind)
        raise FramingError(f"unexpected frame kind {name} in a data stream")

    @staticmethod
    def _check_len(kind: int, payload: bytes | memoryview | pa.Buffer, n: int) -> None:
        size = payload.size if isinstance(payload, pa.Buffer) else len(payload)
        if size != n:
            raise FramingError(f"{FrameKind(kind).name} frame payload must be {n} bytes, got {size}")


# --------------------------------------------------------------------------------------------
# Splitting a byte stream into frames


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as read: its kind and payload (a ``pa.Buffer`` of exactly the payload bytes)."""

    kind: FrameKind
    payload: pa.Buffer


class FrameReader:
    """Incremental frame splitter, made for ``asyncio.BufferedProtocol``:

    ``get_buffer()`` -> receive into it -> ``advance(n)`` -> ``next_frame()`` until None.

    Small frames accumulate in a scratch buffer and are copied out once; a large payload
    (> 16 KiB) gets a buffer of exactly its size that the socket reads into directly. At most one
    partial frame is held besides the complete frames not yet taken. ``max_frame_bytes`` can be
    changed at any time (e.g. raised once the peer is authenticated). ``finish()`` at end of input
    raises FramingError if a frame was cut short.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._view = memoryview(self._scratch)
        self._start = 0  # first unconsumed byte in scratch
        self._end = 0  # end of received bytes in scratch
        self._large: bytearray | None = None  # payload in progress, received in place
        self._large_kind = FrameKind.BATCH
        self._large_filled = 0
        self._pending: deque[memoryview] = deque()  # fed bytes not yet moved in (feed() only)

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._large is not None:
            return memoryview(self._large)[self._large_filled:]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < _LARGE_FRAME_BYTES + HEADER_SIZE:
            # Keep room for a whole small frame: move the partial frame to the front.
            n = self._end - self._start
            self._view[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        return self._view[self._end:]

    def advance(self, n: int) -> None:
        """`n` bytes were written at the start of the last buffer returned by get_buffer()."""
        if self._large is not None:
            self._large_filled += n
        else:
            self._end += n

    def feed(self, data: bytes | memoryview) -> None:
        """Queue bytes that were received elsewhere (for tests and stream readers); they are copied
        into place as :meth:`next_frame` needs them, so `data` must not change until then."""
        if len(data):
            self._pending.append(memoryview(data).cast("B"))

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        while True:
            frame = self._take()
            if frame is not None or not self._pending:
                return frame
            # Move fed bytes in; get_buffer() never spans past a large payload's end, so a frame
            # boundary is never crossed into the wrong buffer.
            buf = self.get_buffer()
            chunk = self._pending[0]
            n = min(len(buf), len(chunk))
            buf[:n] = chunk[:n]
            self.advance(n)
            if n == len(chunk):
                self._pending.popleft()
            else:
                self._pending[0] = chunk[n:]

    def _take(self) -> Frame | None:
        if self._large is not None:
            if self._large_filled < len(self._large):
                return None
            frame = Frame(self._large_kind, pa.py_buffer(self._large))
            self._large = None
            self._large_filled = 0
            return frame
        avail = self._end - self._start
        if avail < HEADER_SIZE:
            return None
        kind, length = HEADER.unpack_from(self._scratch, self._start)
        if kind not in _KINDS:
            raise FramingError(f"unknown frame kind {kind} (garbage or a different protocol)")
        if length > self.max_frame_bytes:
            raise FramingError(
                f"{FrameKind(kind).name} frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit"
            )
        if avail >= HEADER_SIZE + length:
            body_start = self._start + HEADER_SIZE
            payload = bytes(self._view[body_start:body_start + length])
            self._start = body_start + length
            return Frame(FrameKind(kind), pa.py_buffer(payload))
        if length > _LARGE_FRAME_BYTES:
            # Move what we have of the payload into its own buffer and receive the rest in place.
            have = avail - HEADER_SIZE
            self._large = bytearray(length)
            self._large[:have] = self._view[self._start + HEADER_SIZE:self._end]
            self._large_kind = FrameKind(kind)
            self._large_filled = have
            self._start = self._end = 0
        return None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        extra = sum(len(c) for c in self._pending)
        return self._end - self._start + (self._large_filled if self._large is not None else 0) + extra

    def finish(self) -> None:
        """End of input: raise FramingError if a frame is incomplete (call after next_frame()
        returned None)."""
        if self._large is not None and self._large_filled < len(self._large):
            raise FramingError(
                f"truncated {self._large_kind.name} frame: got {self._large_filled} of {len(self._large)} payload bytes"
            )
        avail = self._end - self._start
        if 0 < avail < HEADER_SIZE:
            raise FramingError(f"truncated frame header: got {avail} of {HEADER_SIZE} bytes")
        if avail >= HEADER_SIZE:
            kind, length = HEADER.unpack_from(self._scratch, self._start)
            if avail < HEADER_SIZE + length:
                name = FrameKind(kind).name if kind in _KINDS else str(kind)
                raise FramingError(f"truncated {name} frame: got {avail - HEADER_SIZE} of {length} payload bytes")


def encode_messages(messages: list[Message]) -> bytes:
    """All frames for `messages` as one bytes object (for tests and tools; copies)."""
    enc = MessageEncoder()
    return b"".join(bytes(b) for m in messages for b in enc.encode(m))


def decode_messages(data: bytes) -> list[Message]:
    """Decode a complete byte string of data frames (for tests and tools); FramingError if the
    bytes are garbage or end inside a frame."""
    reader = FrameReader()
    dec = MessageDecoder()
    out: list[Message] = []
    reader.feed(data)
    while (frame := reader.next_frame()) is not None:
        msg = dec.decode(frame.kind, frame.payload)
        if msg is not None:
            out.append(msg)
    reader.finish()
    return out
